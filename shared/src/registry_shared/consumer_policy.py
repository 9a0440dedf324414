"""The one policy of every Kafka consumer of the project: what happens to a message that fails.

- **Permanent** failures (the message can never be processed: not JSON, a wrong schema, an event id that
  is not a UUID, a reference to a row that does not exist, anything a service classifies permanent): the
  message goes to the dead-letter topic `registry.dead-letter.v1`, value and key unchanged, the error and
  where it came from in headers (`dead_letter_headers`), and the consumer moves on (its offset may be
  committed past it).
- **Transient** failures (Postgres, Kafka or storage unavailable, timeouts): the same work is tried again
  after a bounded exponential backoff (`registry_shared.backoff.Backoff`), for as long as it takes or until
  the consumer stops; each retry is logged and the consumer's health says
  `retrying: <reason> since <time>` until it succeeds.
- **Unexpected** failures (neither: most likely a bug meeting this message): retried like transient ones
  `max_unexpected` times, then dead-lettered with `failed N times: ...`, so one message never stalls a
  partition for good.

Framework-agnostic: it works on any record with `topic, partition, offset, key, value, headers, timestamp`
(aiokafka's `ConsumerRecord`, which FastStream hands over as `message.raw_message`), and publishes dead
letters through a `DeadLetterSink` (`faststream_sink(broker)` or `aiokafka_sink(producer)`).

    policy = ConsumerPolicy("api-verdicts", group="registry-api-verdicts", sink=aiokafka_sink(producer))
    outcome = await policy.handle(record, apply)   # HANDLED, DEAD_LETTERED or STOPPED
    if outcome.committable:
        await consumer.commit()

Batch consumers use `handle_batch`: a batch is stored as one unit (transient failures retried); if it fails
permanently, its items are stored one at a time so only the culprits are dead-lettered.

Services extend the classification: `DEFAULT_CLASSIFIER.extend(permanent=(MyError,), rule=my_rule)`.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

import psycopg
import urllib3.exceptions
from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError
from minio.error import S3Error
from pydantic import ValidationError

from registry_shared.backoff import Backoff, sleep_or_stop
from registry_shared.events import CloudEvent, EventData, Topics, decode_event
from registry_shared.health import HEALTH, ComponentHealth, HealthRegistry
from registry_shared.metrics import CONSUMER_MESSAGES, CONSUMER_RETRIES

log = logging.getLogger(__name__)

T = TypeVar("T")
Kind = Literal["permanent", "transient", "unexpected"]

#: Longest error text kept in a dead letter's `error` header.
MAX_ERROR_CHARS = 4000


# ---------------------------------------------------------------- errors and their classification
class PermanentError(Exception):
    """The message can never be processed as it is: dead-letter it and move on."""


class MissingReference(PermanentError):
    """The message refers to a row that does not exist (and never will: ids are never reused)."""


class TransientError(Exception):
    """Something the message needs is unavailable for now: try again later."""


class Stopped(Exception):
    """The consumer is stopping: the work was abandoned, and its offset must not be committed."""


Rule = Callable[[BaseException], Kind | None]

#: S3 error codes that say the storage is busy or unwell, not that the request is wrong.
TRANSIENT_S3_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "SlowDownRead",
        "SlowDownWrite",
        "RequestTimeout",
        "OperationTimedOut",
        "XMinioServerNotInitialized",
        "XMinioStorageFull",
    }
)


def _infrastructure(exc: BaseException) -> Kind | None:
    if isinstance(exc, S3Error):
        return "transient" if exc.code in TRANSIENT_S3_CODES else None
    if isinstance(exc, KafkaError):
        retriable = isinstance(exc, KafkaConnectionError | KafkaTimeoutError) or getattr(exc, "retriable", False)
        return "transient" if retriable else None
    return None


@dataclass(frozen=True)
class Classifier:
    """Tells a failure's kind: `rules` first (newest first), then the exception types, then its cause."""

    permanent: tuple[type[BaseException], ...] = ()
    transient: tuple[type[BaseException], ...] = ()
    rules: tuple[Rule, ...] = ()

    def extend(
        self,
        *,
        permanent: Sequence[type[BaseException]] = (),
        transient: Sequence[type[BaseException]] = (),
        rule: Rule | None = None,
    ) -> Classifier:
        """A classifier that also knows these types (checked before the ones known already) and this rule."""
        return Classifier(
            permanent=(*permanent, *self.permanent),
            transient=(*transient, *self.transient),
            rules=((rule,) if rule else ()) + self.rules,
        )

    def __call__(self, exc: BaseException) -> Kind:
        """The kind of `exc`, looking at its `__cause__` chain when the exception itself is not known."""
        seen = 0
        current: BaseException | None = exc
        while current is not None and seen < 8:
            kind = self._own(current)
            if kind is not None:
                return kind
            current, seen = current.__cause__, seen + 1
        return "unexpected"

    def _own(self, exc: BaseException) -> Kind | None:
        for rule in self.rules:
            kind = rule(exc)
            if kind is not None:
                return kind
        # Markers first: a PermanentError is permanent even if it is also, say, a ValueError.
        if isinstance(exc, PermanentError):
            return "permanent"
        if isinstance(exc, TransientError):
            return "transient"
        if isinstance(exc, self.transient):
            return "transient"
        if isinstance(exc, self.permanent):
            return "permanent"
        return None


#: What every service starts from. Transient: the database, Kafka (retriable errors), storage (busy
#: codes, connection errors), the network, timeouts. Permanent: what the message itself carries — an
#: undecodable or invalid value (pydantic, JSON, Unicode, ValueError such as a malformed UUID) and what
#: Postgres refuses in it (DataError: a value it cannot hold; IntegrityError: a reference to a missing row).
DEFAULT_CLASSIFIER = Classifier(
    permanent=(ValidationError, UnicodeDecodeError, ValueError, psycopg.DataError, psycopg.IntegrityError),
    transient=(psycopg.OperationalError, urllib3.exceptions.HTTPError, ConnectionError, TimeoutError, OSError),
    rules=(_infrastructure,),
)


def describe(exc: BaseException) -> str:
    """`Type: message` of an exception, on one line."""
    text = str(exc).strip().replace("\n", " ")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---------------------------------------------------------------- records and dead letters
class Record(Protocol):
    """A consumed Kafka record (aiokafka's ConsumerRecord has these)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int
    headers: Sequence[tuple[str, bytes]]


#: Publishes one dead letter (topic, value, key, headers) and returns once Kafka acknowledged it.
DeadLetterSink = Callable[[str, bytes, bytes | None, dict[str, str]], Awaitable[None]]


def dead_letter_headers(record: Record, error: str, group: str, consumer: str) -> dict[str, str]:
    """The headers of a dead letter: why, where it came from, who gave up on it, when.

    `error` (`Type: message`, at most MAX_ERROR_CHARS), `source_topic`, `source_partition`, `source_offset`,
    `source_timestamp` (ms, the record's), `consumer_group`, `consumer` (which consumer of the group's
    service), `failed_at` (epoch seconds).
    """
    return {
        "error": error[:MAX_ERROR_CHARS],
        "source_topic": record.topic,
        "source_partition": str(record.partition),
        "source_offset": str(record.offset),
        "source_timestamp": str(record.timestamp),
        "consumer_group": group,
        "consumer": consumer,
        "failed_at": str(int(time.time())),
    }


def faststream_sink(broker: object) -> DeadLetterSink:
    """Dead letters through a FastStream `KafkaBroker` (its producer; `publish` waits for the acknowledgement)."""

    async def send(topic: str, value: bytes, key: bytes | None, headers: dict[str, str]) -> None:
        await broker.publish(value, topic, key=key, headers=headers)  # type: ignore[attr-defined]

    return send


def aiokafka_sink(producer: object) -> DeadLetterSink:
    """Dead letters through a started `aiokafka.AIOKafkaProducer` (send_and_wait)."""

    async def send(topic: str, value: bytes, key: bytes | None, headers: dict[str, str]) -> None:
        encoded = [(k, v.encode()) for k, v in headers.items()]
        await producer.send_and_wait(topic, value, key=key, headers=encoded)  # type: ignore[attr-defined]

    return send


# ---------------------------------------------------------------- decoding
def decode_cloud_event(value: bytes | None) -> tuple[CloudEvent, EventData]:
    """A registry event and its typed payload, or PermanentError saying why the value is not one.

    Refused: an empty value, bytes that are not a CloudEvent JSON, an `id` that is not a UUID, a type
    outside the contract (`registry_shared.events.EVENT_TYPES`), data that does not match its type.
    """
    if not value:
        raise PermanentError("empty message")
    try:
        event = decode_event(value)
    except (ValidationError, ValueError, UnicodeDecodeError) as exc:
        raise PermanentError(f"not a CloudEvent: {_short(exc)}") from None
    try:
        uuid.UUID(event.id)
    except ValueError:
        raise PermanentError(f"event id is not a UUID: {event.id[:100]!r}") from None
    try:
        payload = event.payload()
    except (ValidationError, ValueError) as exc:
        raise PermanentError(f"{event.type[:200]}: {_short(exc)}") from None
    return event, payload


def _short(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors(include_url=False)[0]
        if first["type"] == "json_invalid":
            return f"invalid JSON: {first['ctx'].get('error', first['msg']) if first.get('ctx') else first['msg']}"
        return "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" for e in exc.errors(include_url=False)[:5]
        )
    if isinstance(exc, json.JSONDecodeError):
        return f"invalid JSON: {exc.msg}"
    return str(exc)[:500]


# ---------------------------------------------------------------- the policy
class Outcome(enum.Enum):
    """What became of a message (or batch)."""

    HANDLED = "handled"
    DEAD_LETTERED = "dead_lettered"
    STOPPED = "stopped"

    @property
    def committable(self) -> bool:
        """Whether the consumer may commit past it (not when it was abandoned because of a stop)."""
        return self is not Outcome.STOPPED


#: Every policy of the process (the metrics' consumer lag is computed from them).
POLICIES: weakref.WeakSet[ConsumerPolicy] = weakref.WeakSet()

#: Gives the Kafka consumers (aiokafka) a policy's records come from; None where one is not started.
ConsumerSource = Callable[[], Iterable[object | None]]


class ConsumerPolicy:
    """The failure policy of one consumer: retries, dead letters, its health and its metrics.

    `name` names the consumer in logs, dead letters, `/healthz` and the metrics; `group` is its Kafka consumer
    group. `stop` (an asyncio.Event) cuts retry waits short: work abandoned that way ends in `Outcome.STOPPED`.

    Metrics (registry_shared.metrics): messages handled and dead-lettered, retries by kind, and, once the
    consumer's Kafka consumers are given to `watch`, its lag per partition (highwater − the position past the
    last record handled, or the consumer's own position before any).
    """

    def __init__(
        self,
        name: str,
        *,
        group: str,
        sink: DeadLetterSink,
        dead_letter_topic: str = Topics.DEAD_LETTER,
        classifier: Classifier = DEFAULT_CLASSIFIER,
        backoff: Backoff | None = None,
        max_unexpected: int = 5,
        registry: HealthRegistry = HEALTH,
        stop: asyncio.Event | None = None,
    ) -> None:
        self.name = name
        self.group = group
        self.sink = sink
        self.dead_letter_topic = dead_letter_topic
        self.classifier = classifier
        self.backoff = backoff or Backoff()
        self.max_unexpected = max_unexpected
        self.health: ComponentHealth = registry.component(name)
        self.stop = stop or asyncio.Event()
        #: (topic, partition) → the offset after the last record this consumer finished with.
        self.positions: dict[tuple[str, int], int] = {}
        self._sources: ConsumerSource | None = None
        self._handled = CONSUMER_MESSAGES.labels(name, group, "handled")
        self._dead = CONSUMER_MESSAGES.labels(name, group, "dead_lettered")
        POLICIES.add(self)

    # ------------------------------------------------------------ lag
    def watch(self, sources: ConsumerSource) -> None:
        """Report the lag of the aiokafka consumers `sources()` gives (called at each scrape)."""
        self._sources = sources

    def _done(self, record: Record) -> None:
        self.positions[(record.topic, record.partition)] = record.offset + 1

    async def lag(self) -> list[tuple[str, str, int, int]]:
        """(group, topic, partition, lag) of each partition the watched consumers own and have fetched from."""
        if self._sources is None:
            return []
        rows = []
        for consumer in self._sources():
            if consumer is None:
                continue
            try:
                assignment = consumer.assignment()  # type: ignore[attr-defined]
            except KafkaError:  # not started, or stopped meanwhile
                continue
            for tp in assignment:
                highwater = consumer.highwater(tp)  # type: ignore[attr-defined]
                if highwater is None:
                    continue
                position = self.positions.get((tp.topic, tp.partition))
                if position is None:
                    try:
                        position = await asyncio.wait_for(consumer.position(tp), 1.0)  # type: ignore[attr-defined]
                    except (KafkaError, TimeoutError):  # revoked meanwhile, or its position not known yet
                        continue
                rows.append((self.group, tp.topic, tp.partition, max(0, highwater - position)))
        return rows

    # ------------------------------------------------------------ one message
    async def handle(self, record: Record, handler: Callable[[Record], Awaitable[object]]) -> Outcome:
        """Run `handler(record)` to an outcome: handled, dead-lettered (permanent, or unexpected too often),
        or stopped while retrying a transient failure."""
        try:
            await self.retry(lambda: handler(record), record)
        except Stopped:
            return Outcome.STOPPED
        except Exception as exc:  # permanent, or unexpected max_unexpected times: retry() raised it
            return await self._give_up(record, exc)
        self.health.handled += 1
        self._handled.inc()
        self._done(record)
        return Outcome.HANDLED

    async def retry(self, op: Callable[[], Awaitable[T]], record: Record | None = None) -> T:
        """`await op()` until it succeeds. Transient failures are retried with backoff without limit,
        unexpected ones up to `max_unexpected` times; a permanent failure (or the last unexpected one) is
        raised. Raises Stopped once `stop` is set during a wait."""
        attempt = unexpected = 0
        while True:
            try:
                result = await op()
            except (asyncio.CancelledError, Stopped):
                raise
            except Exception as exc:
                kind = self.classifier(exc)
                if kind == "permanent":
                    raise
                if kind == "unexpected":
                    unexpected += 1
                    if unexpected >= self.max_unexpected:
                        raise
                attempt += 1
                delay = self.backoff.delay(attempt)
                self.health.retrying(describe(exc))
                CONSUMER_RETRIES.labels(self.name, self.group, kind).inc()
                log.warning(
                    "%s: %s failure, retrying in %.2f s: %s",
                    self.name,
                    kind,
                    delay,
                    describe(exc),
                    exc_info=kind == "unexpected",
                    extra={"fields": {"consumer": self.name, "attempt": attempt, **_where(record)}},
                )
                if await sleep_or_stop(delay, self.stop):
                    raise Stopped from exc
                continue
            self.health.ok()
            return result

    async def dead_letter(self, record: Record, error: str) -> Outcome:
        """Publish `record` to the dead-letter topic with `error`; Kafka being away is retried like any
        transient failure. DEAD_LETTERED once acknowledged, STOPPED if the consumer stopped first."""
        headers = dead_letter_headers(record, error, self.group, self.name)
        log.error(
            "%s: dead-lettering message: %s",
            self.name,
            error[:500],
            extra={"fields": {"consumer": self.name, **_where(record)}},
        )
        try:
            await self.retry(lambda: self.sink(self.dead_letter_topic, record.value or b"", record.key, headers))
        except Stopped:
            return Outcome.STOPPED
        self.health.dead_lettered += 1
        self._dead.inc()
        self._done(record)
        return Outcome.DEAD_LETTERED

    async def _give_up(self, record: Record, exc: Exception) -> Outcome:
        error = describe(exc)
        if self.classifier(exc) != "permanent":
            error = f"failed {self.max_unexpected} times: {error}"
            log.error("%s: giving up on message", self.name, exc_info=exc, extra={"fields": _where(record)})
        return await self.dead_letter(record, error)

    # ------------------------------------------------------------ batches
    async def handle_batch(
        self,
        items: Sequence[T],
        store: Callable[[Sequence[T]], Awaitable[object]],
        record_of: Callable[[T], Record],
    ) -> Outcome:
        """Store `items` together (transient failures retried); if that fails for good, store them one at a
        time through `handle`, so only the items that cannot be stored are dead-lettered.

        HANDLED (some items may have been dead-lettered) or STOPPED; `health.handled` counts stored items.
        """
        if not items:
            return Outcome.HANDLED
        try:
            await self.retry(lambda: store(items), record_of(items[0]))
        except Stopped:
            return Outcome.STOPPED
        except Exception as exc:
            if len(items) == 1:
                return await self._give_up(record_of(items[0]), exc)
            log.warning(
                "%s: batch of %d failed (%s); storing its items one at a time",
                self.name,
                len(items),
                describe(exc),
                extra={"fields": {"consumer": self.name}},
            )
            for item in items:
                outcome = await self.handle(record_of(item), lambda _r, item=item: store([item]))
                if outcome is Outcome.STOPPED:
                    return outcome
            return Outcome.HANDLED
        self.health.handled += len(items)
        self._handled.inc(len(items))
        for item in items:
            self._done(record_of(item))
        return Outcome.HANDLED


def _where(record: Record | None) -> dict[str, object]:
    if record is None:
        return {}
    return {"topic": record.topic, "partition": record.partition, "offset": record.offset}
