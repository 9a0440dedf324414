"""Producing to Kafka durably, through the process's FastStream `KafkaBroker`.

The broker's producer is idempotent with acks=all (see `consumer.make_broker`), and every publish here
waits for Kafka's confirmation: a send returns only once all in-sync replicas have the record.
"""

from __future__ import annotations

from faststream.kafka import KafkaBroker

from registry_shared import tracing

#: Verdicts are CloudEvents in structured mode: the whole event, JSON, is the record's value.
CLOUDEVENTS_JSON = "application/cloudevents+json"


class Publisher:
    """Publishes through the broker and waits for the acknowledgement (FastStream's `no_confirm=False`)."""

    def __init__(self, broker: KafkaBroker) -> None:
        self.broker = broker

    async def send(
        self,
        topic: str,
        value: bytes,
        key: bytes | None,
        headers: dict[str, str] | None = None,
        correlation_id: str | None = None,
    ) -> None:
        """Produce one record and wait until Kafka acknowledged it."""
        with tracing.producing(f"publish {topic}", **{"messaging.destination.name": topic}):
            await self.broker.publish(value, topic, key=key, headers=headers, correlation_id=correlation_id)

    async def send_event(self, topic: str, event: bytes, key: bytes, event_id: str) -> None:
        """Produce an encoded CloudEvent (the same bytes every time it is sent) and wait for the acknowledgement."""
        await self.send(topic, event, key, {"content-type": CLOUDEVENTS_JSON}, correlation_id=event_id)
