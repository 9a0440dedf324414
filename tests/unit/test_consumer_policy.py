"""The shared consumer policy, backoff, health registry and supervised background tasks (no servers needed)."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from dataclasses import dataclass, field

import psycopg
import pytest
from aiokafka.errors import CommitFailedError, KafkaConnectionError, KafkaTimeoutError
from minio.error import S3Error

from registry_shared.background import BackgroundTask, supervise
from registry_shared.backoff import Backoff, sleep_or_stop
from registry_shared.consumer_policy import (
    DEFAULT_CLASSIFIER,
    ConsumerPolicy,
    MissingReference,
    Outcome,
    PermanentError,
    Stopped,
    TransientError,
    dead_letter_headers,
    decode_cloud_event,
)
from registry_shared.events import UploadVerified, encode_event, make_event
from registry_shared.health import HealthRegistry

FAST = Backoff(initial=0.001, cap=0.005, jitter=0.0)


@dataclass
class Rec:
    """A consumed record, as aiokafka hands it over."""

    value: bytes | None
    topic: str = "registry.verdicts.v1"
    partition: int = 2
    offset: int = 41
    key: bytes | None = b"acme/model"
    timestamp: int = 1_700_000_000_000
    headers: list[tuple[str, bytes]] = field(default_factory=list)


class Sink:
    """A dead-letter sink that records what it is given, failing the first `fail` calls with `error`."""

    def __init__(self, fail: int = 0, error: Exception | None = None) -> None:
        self.sent: list[tuple[str, bytes, bytes | None, dict[str, str]]] = []
        self.fail = fail
        self.error = error or KafkaConnectionError("broker away")
        self.calls = 0

    async def __call__(self, topic: str, value: bytes, key: bytes | None, headers: dict[str, str]) -> None:
        self.calls += 1
        if self.calls <= self.fail:
            raise self.error
        self.sent.append((topic, value, key, headers))


def policy(sink: Sink, registry: HealthRegistry | None = None, **kw: object) -> ConsumerPolicy:
    return ConsumerPolicy(
        "test-consumer", group="test-group", sink=sink, backoff=FAST, registry=registry or HealthRegistry(), **kw
    )


def good_event() -> bytes:
    data = UploadVerified(
        upload_id=1, repo_id="a/b", version="v1", rfilename="x.bin", object_key="uploads/x", size=1, sha256="0" * 64
    )
    return encode_event(make_event(data, source="/test"))


# ---------------------------------------------------------------- backoff
def test_backoff_grows_exponentially_up_to_the_cap() -> None:
    b = Backoff(initial=0.5, factor=2.0, cap=4.0, jitter=0.0)
    assert [b.delay(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert b.delay(10_000) == 4.0  # no overflow however long it has been failing
    assert b.delay(0) == 0.0


def test_backoff_jitter_only_shortens_the_delay() -> None:
    b = Backoff(initial=1.0, cap=8.0, jitter=0.5)
    delays = [b.delay(3) for _ in range(200)]
    assert all(2.0 <= d <= 4.0 for d in delays)
    assert len(set(delays)) > 100  # actually random


def test_backoff_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        Backoff(jitter=2.0)
    with pytest.raises(ValueError):
        Backoff(factor=0.5)


async def test_backoff_sleep_is_cut_short_by_stop() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.05, stop.set)
    started = time.monotonic()
    assert await Backoff(initial=30.0, cap=30.0, jitter=0.0).sleep(1, stop) is True
    assert time.monotonic() - started < 1.0
    assert await sleep_or_stop(0.01, asyncio.Event()) is False


# ---------------------------------------------------------------- classification
@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (psycopg.OperationalError("connection refused"), "transient"),
        (KafkaConnectionError(), "transient"),
        (KafkaTimeoutError(), "transient"),
        (ConnectionResetError(), "transient"),
        (TimeoutError(), "transient"),
        (TransientError("later"), "transient"),
        (S3Error(None, "SlowDown", "busy", "r", "i", "h", None), "transient"),
        (psycopg.errors.InvalidTextRepresentation("invalid input syntax for type uuid"), "permanent"),
        (psycopg.errors.ForeignKeyViolation("no such row"), "permanent"),
        (ValueError("badly formed hexadecimal UUID string"), "permanent"),
        (MissingReference("upload 7 does not exist"), "permanent"),
        (S3Error(None, "KeyTooLongError", "too long", "r", "i", "h", None), "unexpected"),
        (CommitFailedError(), "unexpected"),
        (KeyError("x"), "unexpected"),
    ],
)
def test_default_classification(exc: Exception, kind: str) -> None:
    assert DEFAULT_CLASSIFIER(exc) == kind


def test_classifier_extension_and_causes() -> None:
    class Quirk(Exception):
        pass

    extended = DEFAULT_CLASSIFIER.extend(
        permanent=(Quirk,),
        rule=lambda e: "permanent" if isinstance(e, S3Error) and e.code == "KeyTooLongError" else None,
    )
    assert extended(Quirk()) == "permanent"
    assert extended(S3Error(None, "KeyTooLongError", "too long", "r", "i", "h", None)) == "permanent"
    assert DEFAULT_CLASSIFIER(Quirk()) == "unexpected"  # the base is unchanged
    # An unknown wrapper is judged by its cause.
    try:
        try:
            raise psycopg.OperationalError("gone")
        except psycopg.OperationalError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert DEFAULT_CLASSIFIER(outer) == "transient"


# ---------------------------------------------------------------- decoding
@pytest.mark.parametrize(
    ("value", "error"),
    [
        (None, "empty message"),
        (b"", "empty message"),
        (b"not json at all", "not a CloudEvent: invalid JSON: expected ident at line 1 column 2"),
        (b"\xff\xfe\x00", "not a CloudEvent"),
        (b'{"specversion": "1.0", "source": "/x"}', "not a CloudEvent"),
        (
            b'{"specversion":"1.0","id":"not-a-uuid","source":"/x","type":"registry.upload.verified.v1","data":{}}',
            "event id is not a UUID",
        ),
        (
            b'{"specversion":"1.0","id":"%s","source":"/x","type":"registry.nope.v1","data":{}}'
            % str(uuid.uuid4()).encode(),
            "unknown event type",
        ),
        (
            b'{"specversion":"1.0","id":"%s","source":"/x","type":"registry.upload.verified.v1","data":{"upload_id":"x"}}'
            % str(uuid.uuid4()).encode(),
            "registry.upload.verified.v1: upload_id",
        ),
    ],
)
def test_decode_refuses_poison_as_permanent(value: bytes | None, error: str) -> None:
    with pytest.raises(PermanentError) as caught:
        decode_cloud_event(value)
    assert error in str(caught.value)


def test_decode_accepts_a_good_event() -> None:
    event, payload = decode_cloud_event(good_event())
    assert isinstance(payload, UploadVerified)
    assert uuid.UUID(event.id)


# ---------------------------------------------------------------- the policy, one message
async def test_permanent_failure_is_dead_lettered_with_its_error_and_source() -> None:
    sink, registry = Sink(), HealthRegistry()
    p = policy(sink, registry)
    rec = Rec(b"garbage")

    async def handler(r: Rec) -> None:
        decode_cloud_event(r.value)

    assert await p.handle(rec, handler) is Outcome.DEAD_LETTERED
    assert len(sink.sent) == 1
    topic, value, key, headers = sink.sent[0]
    assert (topic, value, key) == ("registry.dead-letter.v1", b"garbage", b"acme/model")
    assert headers["error"].startswith("PermanentError: not a CloudEvent")
    assert headers["source_topic"] == "registry.verdicts.v1"
    assert (headers["source_partition"], headers["source_offset"]) == ("2", "41")
    assert headers["consumer_group"] == "test-group"
    assert headers["consumer"] == "test-consumer"
    assert registry.component("test-consumer").dead_lettered == 1
    assert registry.healthy


async def test_transient_failure_retries_until_it_works_and_health_says_so() -> None:
    registry = HealthRegistry()
    p = policy(Sink(), registry)
    seen: list[str] = []
    calls = 0

    async def handler(r: Rec) -> None:
        nonlocal calls
        calls += 1
        if calls < 4:
            raise psycopg.OperationalError("connection refused")
        seen.append(registry.component("test-consumer").status)

    assert await p.handle(Rec(good_event()), handler) is Outcome.HANDLED
    assert calls == 4
    assert seen[0].startswith("retrying: OperationalError: connection refused since ")
    c = registry.component("test-consumer")
    assert (c.state, c.retries, c.handled) == ("ok", 3, 1)


async def test_unexpected_failure_is_retried_a_few_times_then_dead_lettered() -> None:
    sink = Sink()
    p = policy(sink, max_unexpected=3)
    calls = 0

    async def handler(r: Rec) -> None:
        nonlocal calls
        calls += 1
        raise KeyError("bug")

    assert await p.handle(Rec(b"{}"), handler) is Outcome.DEAD_LETTERED
    assert calls == 3
    assert sink.sent[0][3]["error"] == "failed 3 times: KeyError: 'bug'"


async def test_stop_during_a_transient_retry_abandons_the_message_uncommitted() -> None:
    stop = asyncio.Event()
    p = ConsumerPolicy(
        "c", group="g", sink=Sink(), backoff=Backoff(initial=30.0, cap=30.0), registry=HealthRegistry(), stop=stop
    )

    async def handler(r: Rec) -> None:
        raise psycopg.OperationalError("down")

    asyncio.get_running_loop().call_later(0.05, stop.set)
    outcome = await asyncio.wait_for(p.handle(Rec(b"x"), handler), 5)
    assert outcome is Outcome.STOPPED
    assert not outcome.committable


async def test_dead_letter_retries_while_kafka_is_away() -> None:
    sink = Sink(fail=3)
    registry = HealthRegistry()
    p = policy(sink, registry)
    assert await p.dead_letter(Rec(b"x"), "PermanentError: bad") is Outcome.DEAD_LETTERED
    assert sink.calls == 4 and len(sink.sent) == 1
    assert registry.component("test-consumer").retries == 3


async def test_retry_raises_stopped_and_permanent_errors() -> None:
    stop = asyncio.Event()
    stop.set()
    p = policy(Sink(), stop=stop)

    async def down() -> None:
        raise TimeoutError

    with pytest.raises(Stopped):
        await p.retry(down)

    async def poison() -> None:
        raise PermanentError("no")

    with pytest.raises(PermanentError):
        await p.retry(poison)


# ---------------------------------------------------------------- the policy, batches
async def test_a_batch_failing_for_good_is_split_and_only_the_culprit_dead_lettered() -> None:
    sink = Sink()
    p = policy(sink)
    stored: list[int] = []
    records = {i: Rec(b"v%d" % i, offset=i) for i in range(5)}

    async def store(items: list[int]) -> None:
        if 3 in items:
            raise psycopg.errors.InvalidTextRepresentation("invalid input syntax for type uuid")
        stored.extend(items)

    assert await p.handle_batch([0, 1, 2, 3, 4], store, records.__getitem__) is Outcome.HANDLED
    assert stored == [0, 1, 2, 4]
    assert [s[1] for s in sink.sent] == [b"v3"]
    assert sink.sent[0][3]["source_offset"] == "3"


async def test_a_batch_is_retried_whole_while_the_database_is_away() -> None:
    p = policy(Sink())
    calls = 0

    async def store(items: list[int]) -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise psycopg.OperationalError("away")

    assert await p.handle_batch([1, 2], store, lambda i: Rec(b"x", offset=i)) is Outcome.HANDLED
    assert calls == 3
    assert p.health.handled == 2


# ---------------------------------------------------------------- health
def test_health_registry_reports_503_when_a_component_is_dead() -> None:
    registry = HealthRegistry()
    registry.component("a").ok()
    registry.component("b").retrying("OperationalError: away")
    status, body = registry.report()
    assert status == 200
    consumers = body["consumers"]
    assert isinstance(consumers, dict)
    assert consumers["b"]["status"].startswith("retrying: OperationalError: away since ")
    registry.component("a").dead("gave up")
    assert registry.report()[0] == 503
    registry.remove("a")
    assert registry.report()[0] == 200


# ---------------------------------------------------------------- supervised background tasks
class Flaky(BackgroundTask):
    name = "flaky"
    restart_backoff = Backoff(initial=0.001, cap=0.002, jitter=0.0)
    max_restarts = 3

    def __init__(self, deaths: int) -> None:
        self.deaths = deaths
        self.runs = 0
        self.steady = asyncio.Event()

    async def run(self) -> None:
        self.runs += 1
        if self.runs <= self.deaths:
            raise RuntimeError(f"boom {self.runs}")
        self.steady.set()
        await asyncio.Event().wait()


async def test_a_dying_task_is_restarted_and_counted() -> None:
    registry = HealthRegistry()
    task = Flaky(deaths=2)
    task.start(registry)
    await asyncio.wait_for(task.steady.wait(), 5)
    h = registry.component("flaky")
    assert task.runs == 3 and h.restarts == 2
    assert h.state == "retrying" and h.reason == "died: RuntimeError: boom 2"
    assert registry.healthy
    await task.stop()
    assert not task.running
    assert "flaky" not in registry.components()


async def test_a_task_that_keeps_dying_makes_health_fail() -> None:
    registry = HealthRegistry()
    task = Flaky(deaths=10)
    task.start(registry)
    deadline = time.monotonic() + 5
    while registry.healthy and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    status, body = registry.report()
    assert status == 503
    assert re.match(
        r"dead: died [3-9] times in a row, last: RuntimeError: boom \d+ since ", body["consumers"]["flaky"]["status"]
    )
    await asyncio.wait_for(task.steady.wait(), 5)  # still restarted: it recovers once the cause is gone
    await task.stop()


async def test_a_task_whose_run_returns_is_restarted_too() -> None:
    registry = HealthRegistry()
    runs = 0
    again = asyncio.Event()

    async def once() -> None:
        nonlocal runs
        runs += 1
        if runs >= 2:
            again.set()
            await asyncio.Event().wait()

    task = supervise("returns", once, registry)
    task.restart_backoff = FAST
    await asyncio.wait_for(again.wait(), 5)
    assert registry.component("returns").restarts == 1
    await task.stop()


def test_dead_letter_headers_are_text() -> None:
    headers = dead_letter_headers(Rec(b"x"), "E" * 5000, "g", "c")
    assert len(headers["error"]) == 4000
    assert all(isinstance(v, str) for v in headers.values())
    assert headers["source_timestamp"] == "1700000000000"
