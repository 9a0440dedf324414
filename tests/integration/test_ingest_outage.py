"""A transient failure under the shared consumer policy, for real: a test ingest worker reaches Postgres through
a proxy the test cuts. The message that meets the outage is retried (with backoff, logged), `/healthz` says
`retrying: <reason> since <time>`, nothing past it is committed; once Postgres is back it is handled, the
health is ok again and the offset moves on. Nothing is dead-lettered."""

from __future__ import annotations

import uuid
from urllib.parse import urlsplit, urlunsplit

import pytest
from ingest_helpers import (
    EventBus,
    TcpProxy,
    TopicReader,
    Upload,
    WorkerConfig,
    committed_and_end_offsets,
    eventually,
    forget_prefix,
    upload_row,
)
from test_ingest import start_ingest

pytestmark = pytest.mark.timeout(240)


def through(database_url: str, port: int) -> str:
    """The same database URL, via 127.0.0.1:`port`."""
    parts = urlsplit(database_url)
    userinfo = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{userinfo}127.0.0.1:{port}"))


async def test_a_database_outage_is_retried_reported_and_then_handled(
    kafka_settings, pg_settings, tmp_path_factory
) -> None:
    bootstrap = kafka_settings.kafka_bootstrap_servers
    pg = urlsplit(pg_settings.database_url)
    proxy = TcpProxy(pg.hostname or "127.0.0.1", pg.port or 5432)
    await proxy.start()
    tag = uuid.uuid4().hex[:8]
    config = WorkerConfig(tag=tag, overrides={"DATABASE_URL": through(pg_settings.database_url, proxy.port)})
    await config.prepare(bootstrap)
    worker = await start_ingest(bootstrap, config, tmp_path_factory.mktemp("outage"), "worker")
    bus, dead = EventBus(bootstrap), TopicReader(bootstrap, config.dead_letter_topic)
    await bus.start()
    await dead.start()
    try:
        await proxy.cut()
        up = Upload(config.prefix, f"acme/outage-{tag}", "model.safetensors")
        event = await bus.publish(config.uploads_topic, up.initiated())

        async def retrying() -> dict | None:
            h = await worker.health()  # 200: retrying is not dead
            c = h and h["consumers"]["ingest-uploads"]
            return c if c and c["state"] == "retrying" else None

        state = await eventually(retrying, 60, "the consumer to report that it is retrying")
        assert state["status"].startswith("retrying: ") and " since " in state["status"]
        assert any(word in state["reason"] for word in ("OperationalError", "PoolTimeout")), state
        # Nothing past the message is committed while it is retried.
        offsets = await committed_and_end_offsets(bootstrap, config.group, config.uploads_topic)
        assert any(committed < end for committed, end in offsets.values()), offsets
        retries = [
            line
            for line in worker.log_lines()
            if line.get("consumer") == "ingest-uploads" and "retrying in" in line.get("msg", "")
        ]
        assert retries, worker.log_tail()

        await proxy.restore()

        async def recorded() -> bool:
            row = await upload_row(pg_settings.database_url, up.upload_id)
            return bool(row and row["initiated_event_id"] == event.id)

        await eventually(recorded, 90, "the upload to be recorded once Postgres is back")

        async def healthy_and_committed() -> bool:
            h = await worker.health()
            offsets = await committed_and_end_offsets(bootstrap, config.group, config.uploads_topic)
            return bool(
                h
                and h["consumers"]["ingest-uploads"]["state"] == "ok"
                and all(committed == end or (end == 0 and committed < 0) for committed, end in offsets.values())
            )

        await eventually(healthy_and_committed, 60, "health back to ok and the offset past the message")
        assert dead.records == []  # an outage is never the message's fault
    finally:
        worker.stop()
        await dead.stop()
        await bus.stop()
        await proxy.cut()
        await forget_prefix(pg_settings.database_url, config.prefix)
