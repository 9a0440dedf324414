"""Prometheus metrics of every service (prometheus-client), and `/metrics`.

One process is one service, so the series carry no `service` label: Prometheus adds the scrape's `job`.

- `HttpMetrics` (pure ASGI, outermost middleware): requests by method, route *template* and status, and a
  latency histogram by method and route. The template is FastAPI's matched route, or what a middleware
  answering ahead of routing put in `scope["route_template"]` (the download fast paths); anything else is
  `unmatched`, so the label set stays bounded whatever paths clients send. One dict look-up and one
  histogram observation per request: cheap enough for the download hot path.
- Consumers: `ConsumerPolicy` (registry_shared.consumer_policy) counts what each consumer handled,
  dead-lettered and retried, and keeps the position it has handled per partition; `CONSUMER_LAG`
  (highwater − handled position, per group, topic and partition) is computed when `/metrics` is scraped from
  the consumers a policy `watch`es.
- Services add their own counters here (one place, so names stay consistent) and register async
  `refresher`s for gauges that need a query (the api's outbox depth and age), run before each scrape.

`metrics_app()` is the ASGI app serving the text format; each service mounts it at `/metrics`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

log = logging.getLogger(__name__)

# ASGI types, spelled out so that this module needs no web framework.
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

disable_created_metrics()  # no `_created` series beside every counter: nobody graphs them

#: Latency buckets (seconds): the download path answers in about a millisecond, uploads' calls in tens.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# ---------------------------------------------------------------- HTTP
HTTP_REQUESTS = Counter(
    "registry_http_requests",
    "HTTP requests answered, by method, route template and status.",
    ["method", "route", "status"],
)
HTTP_LATENCY = Histogram(
    "registry_http_request_duration_seconds",
    "Time to answer an HTTP request, by method and route template.",
    ["method", "route"],
    buckets=LATENCY_BUCKETS,
)

# ---------------------------------------------------------------- consumers (the shared policy)
CONSUMER_MESSAGES = Counter(
    "registry_consumer_messages",
    "Messages a consumer finished with, by outcome (handled, dead_lettered).",
    ["consumer", "group", "outcome"],
)
CONSUMER_RETRIES = Counter(
    "registry_consumer_retries",
    "Retries of a failed step, by kind (transient, unexpected).",
    ["consumer", "group", "kind"],
)
CONSUMER_LAG = Gauge(
    "registry_consumer_lag",
    "Messages not handled yet (highwater − handled position) per consumer group, topic and partition.",
    ["group", "topic", "partition"],
)

# ---------------------------------------------------------------- api
OUTBOX_DEPTH = Gauge("registry_outbox_depth", "Outbox rows not yet published to Kafka.")
OUTBOX_OLDEST_AGE = Gauge("registry_outbox_oldest_age_seconds", "Age of the oldest outbox row (0 when empty).")
OUTBOX_PUBLISHED = Counter("registry_outbox_published", "Outbox rows published to Kafka by this process.")
DOWNLOADS = Counter(
    "registry_downloads",
    "Downloads counted (download route and its fast path, the Hub's resolve): one per URL handed out.",
)

# ---------------------------------------------------------------- ingest
VERIFICATIONS = Counter(
    "registry_verifications",
    "Verdicts ingest reached, by verdict (verified, rejected, quarantined) and reason (ok or the rejection's).",
    ["verdict", "reason"],
)
VERIFIED_BYTES = Counter(
    "registry_verification_bytes", "Bytes ingest streamed to verify objects, by verdict.", ["verdict"]
)

# ---------------------------------------------------------------- analytics
ANALYTICS_ROWS = Counter("registry_analytics_rows_loaded", "Access events loaded into ClickHouse.")
ANALYTICS_LAST_LOAD = Gauge("registry_analytics_last_load_timestamp_seconds", "When the loader last stored a batch.")
ANALYTICS_NEWEST_EVENT = Gauge(
    "registry_analytics_newest_event_timestamp_seconds", "Time of the newest access event loaded (freshness)."
)

# ---------------------------------------------------------------- notifier
WEBHOOK_DELIVERIES = Counter(
    "registry_webhook_delivery_attempts",
    "Webhook delivery attempts, by outcome (delivered, failed).",
    ["outcome"],
)
WEBHOOK_GAVE_UP = Counter("registry_webhook_deliveries_given_up", "Webhook deliveries failed for good (no retry left).")
WEBHOOK_RETRIES = Counter("registry_webhook_retries", "Webhook attempts that were retries (attempt > 1).")
WEBHOOKS_DISABLED = Counter(
    "registry_webhooks_auto_disabled", "Webhooks disabled automatically after failing too long."
)
EMAILS = Counter("registry_emails", "E-mails, by outcome (sent, failed).", ["outcome"])

# ---------------------------------------------------------------- refreshers and the endpoint
Refresher = Callable[[], Awaitable[None]]
_refreshers: list[Refresher] = []
#: Longest a refresher may take before the scrape answers without it.
REFRESH_TIMEOUT_S = 2.0


def refresher(fn: Refresher) -> Refresher:
    """Register `fn`, awaited before each scrape to update gauges (errors are logged, never fail the scrape)."""
    _refreshers.append(fn)
    return fn


def remove_refresher(fn: Refresher) -> None:
    """Forget a refresher (its owner stopped)."""
    if fn in _refreshers:
        _refreshers.remove(fn)


async def refresh() -> None:
    """Run every refresher (each under REFRESH_TIMEOUT_S)."""
    for fn in list(_refreshers):
        try:
            await asyncio.wait_for(fn(), REFRESH_TIMEOUT_S)
        except Exception as exc:
            log.warning("metrics refresher %s failed: %s", getattr(fn, "__qualname__", fn), exc)


async def consumer_lag() -> None:
    """Set CONSUMER_LAG from every watched consumer of this process (partitions no longer owned disappear)."""
    from registry_shared.consumer_policy import POLICIES  # the policies register themselves

    rows: dict[tuple[str, str, str], int] = {}
    for policy in list(POLICIES):
        for group, topic, partition, lag in await policy.lag():
            rows[(group, topic, str(partition))] = lag
    CONSUMER_LAG.clear()
    for labels, lag in rows.items():
        CONSUMER_LAG.labels(*labels).set(lag)


refresher(consumer_lag)


def metrics_app() -> ASGIApp:
    """The `/metrics` ASGI app: runs the refreshers, then answers the text exposition format."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await refresh()
        body = generate_latest()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", CONTENT_TYPE_LATEST.encode()),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


class HttpMetrics:
    """Counts and times every HTTP request by route template (see the module doc); serves `/metrics` itself."""

    def __init__(self, app: ASGIApp, path: str = "/metrics") -> None:
        self.app = app
        self.path = path
        self._metrics = metrics_app()
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def _child(self, method: str, route: str, status: int) -> tuple[Any, Any]:
        key = (method, route, status)
        child = self._children.get(key)
        if child is None:
            child = (HTTP_REQUESTS.labels(method, route, str(status)), HTTP_LATENCY.labels(method, route))
            if len(self._children) < 10_000:
                self._children[key] = child
        return child

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] == self.path:
            await self._metrics(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route_template")
            if route is None:
                matched = scope.get("route")
                route = getattr(matched, "path", None) or "unmatched"
            method = scope["method"] if scope["method"] in _METHODS else "OTHER"
            count, latency = self._child(method, route, status)
            count.inc()
            latency.observe(time.perf_counter() - start)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
