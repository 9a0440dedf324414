"""FastStream pieces shared by the services that consume Kafka in batches and commit offsets themselves."""

from __future__ import annotations

from aiokafka import ConsumerRecord
from faststream.kafka.message import FAKE_CONSUMER, KafkaMessage


def raw_batch(records: tuple[ConsumerRecord, ...]) -> KafkaMessage:
    """FastStream parser of a fetched batch: the records as they are, with no per-message work.

    FastStream's own batch parser decodes every header value of every record as UTF-8: one record with a
    binary header would fail the whole batch before the handler sees it, and since the consumer's position
    is already past it, the batch's events would be skipped. Here headers are never decoded; the handler
    reads `message.raw_message` (the ConsumerRecords). The message counts as acknowledged (FAKE_CONSUMER):
    the service commits its offsets itself once what it read is stored.
    """
    first = records[0]
    msg_id = f"{first.topic}/{first.partition}@{first.offset}+{len(records)}"
    return KafkaMessage(raw_message=records, body=b"", consumer=FAKE_CONSUMER, message_id=msg_id, correlation_id=msg_id)
