"""A Postgres outage under the shared consumer policy, for the notifier: a notifier of our own reaches Postgres
through a proxy the test cuts. The batch that meets the outage is retried with backoff, `/healthz` says
`retrying: <reason> since <time>` (still 200), its offset is not committed; once Postgres is back the batch
is stored, the health is ok and the offset moves past it. Nothing is dead-lettered."""

from __future__ import annotations

import asyncio
import threading
import uuid
from urllib.parse import urlsplit

import pytest
from ingest_helpers import TcpProxy
from notifier_helpers import Api, committed_offset, notifier_process, publish_raw, read_topic, wait_for
from test_ingest_outage import through

from registry_shared.events import Topics, UserKeyRotated, encode_event, make_event

pytestmark = pytest.mark.timeout(240)


def test_a_database_outage_is_retried_reported_and_then_stored(api_base_url: str, pg_settings) -> None:
    pg = urlsplit(pg_settings.database_url)
    proxy = TcpProxy(pg.hostname or "127.0.0.1", pg.port or 5432)
    loop = asyncio.new_event_loop()  # the proxy runs on a loop of its own, beside the synchronous test
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def on_loop(coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(30)  # type: ignore[arg-type]

    on_loop(proxy.start())
    token = uuid.uuid4().hex[:10]
    group = f"test-notifier-outage-{token}"
    proc = notifier_process(
        group, f"test-{token}", None, DATABASE_URL=through(pg_settings.database_url, proxy.port)
    ).start()
    api = Api(api_base_url)
    try:
        wait_for(lambda: proc.health().get("consumer_ready"), 60, "the notifier's consumer", interval=0.2)
        dev = api.register("Dev")
        on_loop(proxy.cut())
        rotated = UserKeyRotated(user_id=dev.user_id, email=dev.email, key_prefix="sk_live_x", rotated_ts=1)
        event = make_event(rotated, source="/tests/notifier", subject=f"user:{dev.user_id}")
        ((partition, offset),) = publish_raw(Topics.USERS, [(encode_event(event), event.key)])

        def retrying() -> dict | None:
            c = proc.health()["consumers"]["notifier-events"]
            return c if c["state"] == "retrying" else None

        state = wait_for(retrying, 90, "the consumer to report that it is retrying")
        assert state["status"].startswith("retrying: ") and " since " in state["status"]  # type: ignore[index]
        assert committed_offset(group, Topics.USERS, partition) <= offset  # not past the batch being retried

        on_loop(proxy.restore())
        wait_for(
            lambda: committed_offset(group, Topics.USERS, partition) > offset,
            90,
            "the offset to move past the event once Postgres is back",
        )
        wait_for(lambda: proc.health()["consumers"]["notifier-events"]["state"] == "ok", 30, "health back to ok")
        health = proc.health()
        assert health["ok"] is True and health["consumers"]["notifier-events"]["dead_lettered"] == 0
        letters = read_topic(Topics.DEAD_LETTER, lambda r: dict(r.headers).get("consumer_group") == group.encode())
        assert letters == []
    finally:
        proc.stop()
        api.close()
        on_loop(proxy.cut())
        loop.call_soon_threadsafe(loop.stop)
