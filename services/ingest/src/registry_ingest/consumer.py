"""Kafka plumbing with FastStream: one subscriber per topic, one consumer group, an ack after each message's effect.

`IngestConsumer` puts two subscribers on the process's `KafkaBroker`, the api's uploads topic and MinIO's
bucket notifications, both in the consumer group `INGEST_GROUP_ID`. Their ack policy is
`AckPolicy.MANUAL`: auto-commit is off and FastStream never commits on its own; the handler acks a
message (FastStream commits its consumer's position) only once the message's effect is durable. A message
that leads to a verdict is acked once Kafka acknowledged the verdict (acks=all); one that only adds a fact
(the other half of the upload is not there yet) once the fact is in Postgres, from where any process's
sweeper finishes the work. A consumer hands out one record at a time and the next only after the handler
returned, so its position is one past the last record handled: an ack never covers a record still in work.

Each subscriber runs `INGEST_CONSUMERS_PER_TOPIC` consumers (FastStream's concurrency between partitions:
every one a member of the group with partitions of its own, handled in order), so a long verification
holds up only its own consumer's partitions. Failures follow the shared consumer policy
(`registry_shared.consumer_policy`, one `ConsumerPolicy` per topic): a message that can never be processed
(undecodable, outside the contract, contradicting the recorded upload) goes to the dead-letter topic with the
error and the worker moves on; Postgres, Kafka or MinIO away is retried with the shared backoff, for as long
as it takes, and `/healthz` says so. On shutdown, FastStream stops fetching, lets the handlers in flight finish
for up to `graceful_timeout` (INGEST_SHUTDOWN_TIMEOUT_SECONDS) and cancels the rest, unacknowledged.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Awaitable, Callable

from aiokafka.errors import KafkaError
from faststream import AckPolicy
from faststream.kafka import ConsumerRecord, KafkaBroker, Topic
from faststream.kafka.annotations import KafkaMessage
from faststream.kafka.message import KafkaMessage as StreamKafkaMessage
from faststream.kafka.subscriber.usecase import LogicSubscriber

from registry_ingest.notifications import BadNotification, message_key_outside, parse_notification
from registry_ingest.publisher import Publisher
from registry_ingest.service import CLASSIFIER, IngestService, PoisonMessage
from registry_ingest.settings import IngestSettings
from registry_shared import tracing
from registry_shared.consumer_policy import ConsumerPolicy, Outcome, decode_cloud_event, faststream_sink
from registry_shared.logging import correlation_id

log = logging.getLogger(__name__)


def make_broker(bootstrap_servers: str, client_id: str, graceful_timeout: float) -> KafkaBroker:
    """The process's broker: an idempotent producer with acks=all, and the consumers of its subscribers.

    FastStream's per-message "Received/Processed" lines are logged at DEBUG (MinIO's topic is busy);
    everything else it logs goes through the service's JSON logging.
    """
    return KafkaBroker(
        bootstrap_servers,
        client_id=client_id,
        acks="all",
        enable_idempotence=True,
        linger_ms=0,
        request_timeout_ms=30000,
        graceful_timeout=graceful_timeout,
        logger=logging.getLogger("registry_ingest.kafka"),
        log_level=logging.DEBUG,
    )


class IngestConsumer:
    """The subscribers of one ingest process, and what they do with each message."""

    def __init__(
        self, settings: IngestSettings, broker: KafkaBroker, publisher: Publisher, stopping: asyncio.Event
    ) -> None:
        self.settings = settings
        self.broker = broker
        self.publisher = publisher
        self.service: IngestService | None = None  # set once Postgres and MinIO are connected (on startup)
        self.handled = 0
        #: Set once a record was abandoned (stopping while retrying): nothing is committed after it.
        self._abandoned = False
        s = settings

        def policy(name: str) -> ConsumerPolicy:
            return ConsumerPolicy(
                name,
                group=s.group_id,
                sink=faststream_sink(broker),
                dead_letter_topic=s.dead_letter_topic,
                classifier=CLASSIFIER,
                max_unexpected=s.max_attempts,
                stop=stopping,
            )

        self.policies = {s.uploads_topic: policy("ingest-uploads"), s.minio_topic: policy("ingest-minio")}
        options = {
            "group_id": s.group_id,
            "auto_offset_reset": "earliest",
            "session_timeout_ms": 15000,
            "heartbeat_interval_ms": 3000,
            # A verification of a large object runs inside the handler; the member must not be dropped meanwhile.
            "max_poll_interval_ms": 600000,
            "fetch_max_wait_ms": s.fetch_max_wait_ms,
            "ack_policy": AckPolicy.MANUAL,
            "max_workers": s.consumers_per_topic,
            "parser": _tolerant_headers,
            "decoder": _raw_body,
        }
        # declare=False: the topics are the platform's (created by the stack), not created by ingest.
        uploads = broker.subscriber(Topic(s.uploads_topic, declare=False), **options)
        uploads(self.on_upload_message)
        minio = broker.subscriber(Topic(s.minio_topic, declare=False), **options)
        minio(self.on_minio_message)
        self.subscribers: list[LogicSubscriber] = [uploads, minio]
        for topic, sub in ((s.uploads_topic, uploads), (s.minio_topic, minio)):
            self.policies[topic].watch(lambda sub=sub: getattr(sub, "consumer_subgroup", None) or [sub.consumer])

    # ------------------------------------------------------------ lifecycle
    async def stop(self) -> None:
        """Stop fetching; messages in hand finish for up to the broker's graceful timeout, the rest is cancelled.

        The broker would do the same when it stops, but only after the app's shutdown hooks: this lets the
        worker stop consuming first, while the producer is still there for the handlers in flight.
        """
        results = await asyncio.gather(*(sub.stop() for sub in self.subscribers), return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                log.error("subscriber did not stop cleanly", exc_info=result)

    async def wait_assigned(self, within: float) -> bool:
        """Until this process owns partitions of every topic it subscribes to (False after `within` seconds).

        The subscribers' consumers join the group one after the other, each join a rebalance; once every
        topic has partitions here, the members of this process have all been through one. (With more
        processes than partitions, a topic may rightly have none here: hence the limit.)
        """
        topics = {self.settings.uploads_topic, self.settings.minio_topic}
        deadline = asyncio.get_running_loop().time() + within
        while {p.rsplit(":", 1)[0] for p in self.assignment()} != topics:
            if asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(0.1)
        return True

    def assignment(self) -> list[str]:
        """The partitions this process's consumers own, as topic:partition."""
        owned: set[str] = set()
        for sub in self.subscribers:
            # One consumer per subscriber, or a subgroup of them with concurrency between partitions.
            consumers = getattr(sub, "consumer_subgroup", None) or [sub.consumer]
            for consumer in consumers:
                if consumer is not None:
                    owned.update(f"{tp.topic}:{tp.partition}" for tp in consumer.assignment())
        return sorted(owned)

    # ------------------------------------------------------------ the handlers
    async def on_upload_message(self, body: bytes, message: KafkaMessage) -> None:
        """UploadInitiated / UploadCompleted from the api's outbox."""
        await self._consume(message, self._handle_upload)

    async def on_minio_message(self, body: bytes, message: KafkaMessage) -> None:
        """An S3 event record of MinIO's bucket notifications."""
        await self._consume(message, self._handle_notification)

    async def _consume(self, message: StreamKafkaMessage, handle: Callable[[ConsumerRecord], Awaitable[None]]) -> None:
        """Handle one record to its durable effect (or dead-letter it), then ack it (commit).

        A cancellation (shutdown past the graceful timeout), or a stop while a transient failure is being
        retried, leaves the record unacknowledged, and nothing after it is acknowledged by this process:
        whoever owns the partition next handles it again, idempotently. A handler whose partition moved to
        another member in a rebalance runs on (leases keep the two from verifying at once); its commit is
        then refused.
        """
        record: ConsumerRecord = message.raw_message  # type: ignore[assignment]
        try:
            outcome = await self.policies[record.topic].handle(record, handle)
        except asyncio.CancelledError:
            self._abandoned = True
            # FastStream logs the cancellation as an error of the handler; this says what it means.
            log.warning("message abandoned unacknowledged (stopping)", extra={"fields": _where(record)})
            raise
        finally:
            correlation_id.set(None)
        if outcome is Outcome.STOPPED:
            self._abandoned = True
            log.warning("message abandoned unacknowledged (stopping)", extra={"fields": _where(record)})
        if self._abandoned:
            return
        self.handled += 1
        try:
            await message.ack()
        except KafkaError as exc:
            # Typically the partition moved to another member during a rebalance: it resumes from the last
            # commit and finds the work done. A later ack of this consumer commits past the record anyway.
            log.warning("commit refused: %r", exc, extra={"fields": _where(record)})

    async def _handle_upload(self, record: ConsumerRecord) -> None:
        assert self.service is not None
        event, payload = decode_cloud_event(record.value)
        correlation_id.set(event.id)
        with tracing.consuming(event.traceparent, f"ingest {event.type}", **{"messaging.message.id": event.id}):
            await self.service.on_upload_event(event, payload)

    async def _handle_notification(self, record: ConsumerRecord) -> None:
        assert self.service is not None
        if message_key_outside(record.key, self.service.bucket.name, self.settings.upload_prefix):
            return
        if record.value is None:
            raise PoisonMessage("empty message")
        try:
            notifications = parse_notification(record.value)
        except BadNotification as exc:
            raise PoisonMessage(f"undecodable MinIO notification: {exc}") from None
        for n in notifications:
            correlation_id.set(n.correlation_id)
            await self.service.on_notification(n)


def _where(record: ConsumerRecord) -> dict[str, object]:
    return {"topic": record.topic, "partition": record.partition, "offset": record.offset}


async def _raw_body(message: StreamKafkaMessage) -> bytes:
    """The handlers read the record itself: FastStream is not to guess a format (JSON, text) from headers."""
    return message.body


async def _tolerant_headers(
    record: ConsumerRecord, original: Callable[[ConsumerRecord], Awaitable[StreamKafkaMessage]]
) -> StreamKafkaMessage:
    """FastStream's parser, for records whose header values are not all UTF-8 text (or are null).

    FastStream decodes every header value as UTF-8; a record it cannot parse would never reach the handler,
    so it would be neither handled nor dead-lettered. Such values are passed on with replacement characters
    (the record's key and value are untouched).
    """
    try:
        return await original(record)
    except (UnicodeDecodeError, AttributeError):
        clean = copy.copy(record)  # keeps the attributes FastStream added (the consumer it came from)
        clean.headers = [(k, (v or b"").decode(errors="replace").encode()) for k, v in record.headers]
        return await original(clean)
