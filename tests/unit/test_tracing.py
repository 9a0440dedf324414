"""The trace context travels inside each CloudEvent (`traceparent`), HTTP requests get server spans, and log lines
carry the ids: checked with OpenTelemetry's in-memory exporter."""

from __future__ import annotations

import json
import logging

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from registry_shared import tracing
from registry_shared.consumer_policy import decode_cloud_event
from registry_shared.events import UploadCompleted, UploadVerified, encode_event, make_event
from registry_shared.logging import JsonFormatter

EXPORTER = InMemorySpanExporter()


@pytest.fixture(autouse=True)
def spans() -> InMemorySpanExporter:
    if not tracing.ENABLED:  # the provider can be set once per process
        assert tracing.configure_tracing("test", processor=SimpleSpanProcessor(EXPORTER))
    EXPORTER.clear()
    return EXPORTER


def _completed() -> UploadCompleted:
    return UploadCompleted(
        upload_id=1,
        repo_id="ns/m",
        version="v1",
        rfilename="w.bin",
        object_key="uploads/ns/m/v1/w.bin",
        developer_id=7,
        size=3,
        sha256="0" * 64,
    )


def _verified() -> UploadVerified:
    return UploadVerified(
        upload_id=1, repo_id="ns/m", version="v1", rfilename="w.bin", object_key="k", size=3, sha256="0" * 64
    )


def test_one_upload_is_one_trace_across_events(spans: InMemorySpanExporter) -> None:
    # api: the `complete` request writes the event (into the outbox) inside its span
    with tracing.tracer.start_as_current_span("POST complete") as api_span:
        completed = encode_event(make_event(_completed(), source="/registry/api"))
    # ingest: consumes it (bytes from Kafka), verifies, and publishes its verdict inside the verification span
    event, _ = decode_cloud_event(completed)
    assert event.traceparent is not None
    with tracing.consuming(event.traceparent, "ingest consume"), tracing.tracer.start_as_current_span("ingest verify"):
        verdict = encode_event(make_event(_verified(), source="/registry/ingest"))
    # notifier: delivers the verdict's exact JSON later, continuing the trace found in it
    with tracing.consuming(tracing.traceparent_in(verdict), "webhook deliver", SpanKind.CLIENT):
        pass

    finished = {s.name: s for s in spans.get_finished_spans()}
    assert set(finished) == {"POST complete", "ingest consume", "ingest verify", "webhook deliver"}
    trace_id = api_span.get_span_context().trace_id
    assert {s.context.trace_id for s in finished.values()} == {trace_id}
    assert finished["ingest consume"].parent.span_id == api_span.get_span_context().span_id
    assert finished["ingest consume"].kind is SpanKind.CONSUMER
    assert finished["ingest verify"].parent.span_id == finished["ingest consume"].context.span_id
    assert finished["webhook deliver"].parent.span_id == finished["ingest verify"].context.span_id
    assert json.loads(verdict)["traceparent"].startswith(
        f"00-{trace_id:032x}-{finished['ingest verify'].context.span_id:016x}-"
    )


def test_no_traceparent_outside_a_span_or_with_tracing_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "traceparent" not in json.loads(encode_event(make_event(_completed(), source="/x")))
    monkeypatch.setattr(tracing, "ENABLED", False)
    with tracing.tracer.start_as_current_span("ignored"):
        assert "traceparent" not in json.loads(encode_event(make_event(_completed(), source="/x")))
    assert tracing.traceparent_in(b"not json") is None


def test_a_consumer_without_context_starts_a_new_trace(spans: InMemorySpanExporter) -> None:
    with tracing.consuming(None, "orphan"):
        pass
    (span,) = spans.get_finished_spans()
    assert span.parent is None


async def test_http_requests_get_a_server_span_named_by_route(spans: InMemorySpanExporter) -> None:
    """FastAPI's own OpenTelemetry support, once the provider is installed: nothing of ours to add."""
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        assert (await client.get("/items/42", headers={"traceparent": parent})).status_code == 200
        assert (await client.get("/nope")).status_code == 404
    first, second = (s for s in spans.get_finished_spans() if s.kind is SpanKind.SERVER)
    assert first.name == "GET /items/{item_id}"
    assert first.kind is SpanKind.SERVER
    assert first.attributes["http.response.status_code"] == 200
    assert first.context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert first.parent.span_id == 0xB7AD6B7169203331
    assert second.name == "GET"
    assert second.attributes["http.response.status_code"] == 404


def test_log_lines_carry_the_trace_and_span_ids() -> None:
    formatter = JsonFormatter("test")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
    assert "trace_id" not in json.loads(formatter.format(record))
    with tracing.tracer.start_as_current_span("work") as span:
        line = json.loads(formatter.format(record))
    assert line["trace_id"] == f"{span.get_span_context().trace_id:032x}"
    assert line["span_id"] == f"{span.get_span_context().span_id:016x}"
