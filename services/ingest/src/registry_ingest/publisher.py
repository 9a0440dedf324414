"""Producing to Kafka durably: every send waits for the acknowledgement of all in-sync replicas."""

from __future__ import annotations

import time

from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord


class Publisher:
    """An idempotent producer with acks=all; `send` returns only once the record is durable."""

    def __init__(self, bootstrap_servers: str, client_id: str) -> None:
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap_servers,
            client_id=client_id,
            acks="all",
            enable_idempotence=True,
            linger_ms=0,
            request_timeout_ms=30000,
        )

    async def start(self) -> None:
        """Connect to the cluster."""
        await self._producer.start()

    async def stop(self) -> None:
        """Flush and disconnect."""
        await self._producer.stop()

    async def send(
        self, topic: str, value: bytes, key: bytes | None, headers: list[tuple[str, bytes]] | None = None
    ) -> None:
        """Produce one record and wait until Kafka acknowledged it."""
        await self._producer.send_and_wait(topic, value, key=key, headers=headers)

    async def dead_letter(self, topic: str, record: ConsumerRecord, error: str, group_id: str) -> None:
        """Park an unprocessable record: its value and key unchanged, where it came from and why in headers."""
        headers = [
            ("error", error.encode()[:4000]),
            ("source_topic", record.topic.encode()),
            ("source_partition", str(record.partition).encode()),
            ("source_offset", str(record.offset).encode()),
            ("consumer_group", group_id.encode()),
            ("failed_at", str(int(time.time())).encode()),
        ]
        await self.send(topic, record.value or b"", record.key, headers)
