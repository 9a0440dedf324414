"""OpenTelemetry traces of every service: OTLP export when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, nothing when not.

- `configure_tracing(service)` (called by `serve` before the app is imported): a tracer provider exporting
  over OTLP/HTTP in batches, and the psycopg 3 instrumentation (a span per SQL statement, sync and async
  connections, pools included). Without the variable nothing is installed: the API's no-op tracer makes every
  span below cost next to nothing, and `ENABLED` stays False so the hot paths skip even that.
- HTTP: FastAPI's own OpenTelemetry support makes a server span per request (`METHOD <route template>`,
  continuing the caller's `traceparent` header) as soon as a tracer provider is installed: nothing to add.
- Events carry the trace: `registry_shared.events.make_event` puts the current span's W3C `traceparent` in the
  CloudEvent (the CloudEvents distributed-tracing extension attribute); a consumer continues it with
  `consuming(event, name)`, so one upload is one trace from the api's `complete` through ingest's verdict to
  the notifier's webhook delivery (whose receiver gets the same `traceparent` in the event it is sent).
- Logs carry `trace_id` and `span_id` (registry_shared.logging) while a span is current.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanProcessor
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

#: Whether this process records spans (set by `configure_tracing`).
ENABLED = False
_PROPAGATOR = TraceContextTextMapPropagator()
tracer = trace.get_tracer("registry")


def configure_tracing(
    service: str, exporter: SpanExporter | None = None, processor: SpanProcessor | None = None
) -> bool:
    """Install a tracer provider for `service` when OTEL_EXPORTER_OTLP_ENDPOINT is set (or an exporter or
    processor is given: the tests' in-memory one), and instrument psycopg. True when tracing is on."""
    global ENABLED
    if exporter is None and processor is None:
        if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            return False
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service)}))
    provider.add_span_processor(processor or BatchSpanProcessor(exporter))  # type: ignore[arg-type]
    trace.set_tracer_provider(provider)
    instrument_psycopg()
    ENABLED = True
    return True


def instrument_psycopg() -> None:
    """A span per SQL statement of psycopg 3 (connections opened after this call)."""
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor

    instrumentor = PsycopgInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument(enable_commenter=False, skip_dep_check=True)


# ---------------------------------------------------------------- context in events
def current_traceparent() -> str | None:
    """The W3C traceparent of the current span, or None when there is none (tracing off)."""
    if not ENABLED:
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent")


def context_of(traceparent: str | None) -> otel_context.Context | None:
    """The context a `traceparent` continues (None when there is none: a new trace starts)."""
    if not traceparent:
        return None
    return _PROPAGATOR.extract({"traceparent": traceparent})


def in_span() -> bool:
    """Whether a recording span is current (a new span would be its child)."""
    return trace.get_current_span().is_recording()


def traceparent_in(payload: str | bytes) -> str | None:
    """The `traceparent` attribute of a CloudEvent's JSON, if it has one."""
    try:
        doc = json.loads(payload)
    except ValueError:
        return None
    value = doc.get("traceparent") if isinstance(doc, dict) else None
    return value if isinstance(value, str) else None


@contextlib.contextmanager
def consuming(
    traceparent: str | None, name: str, kind: SpanKind = SpanKind.CONSUMER, **attributes: Any
) -> Iterator[Span]:
    """A span continuing the trace of the event being handled (its `traceparent`): a consumer's, or the
    notifier's delivery of it (`kind=SpanKind.CLIENT`)."""
    with tracer.start_as_current_span(name, context=context_of(traceparent), kind=kind, attributes=attributes) as span:
        yield span


@contextlib.contextmanager
def producing(name: str, **attributes: Any) -> Iterator[Span]:
    """A producer span (a publish to Kafka)."""
    with tracer.start_as_current_span(name, kind=SpanKind.PRODUCER, attributes=attributes) as span:
        yield span


def log_ids() -> dict[str, str] | None:
    """`trace_id` and `span_id` of the current span, for a log line (None when no span is recording)."""
    if not ENABLED:
        return None
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}
