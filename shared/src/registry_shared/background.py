"""A long-running asyncio task of a service (a consumer, a relay, a flusher), supervised: start, stop, restart.

Subclasses implement `run()`, which loops until cancelled. `start()` runs it under a supervisor: if
`run()` raises (or returns) while nobody asked it to stop, the death is logged, counted
(`health.restarts`) and `run()` is started again after a `Backoff` delay; the component's health says
`retrying: died: <error> since <time>` meanwhile. After `max_restarts` deaths in a row (each within
`healthy_after` seconds of its start) the health turns `dead` — `/healthz` answers 503 — while the
supervisor keeps restarting it (slowly, at the backoff's cap); a run that lasts `healthy_after` seconds
clears the count and the health again. `stop()` cancels the run and waits for it.

For a coroutine function instead of a subclass: `supervise("name", make_coroutine)`.

Subclasses need not call `__init__`: everything has a class-level default.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from registry_shared.backoff import Backoff, sleep_or_stop
from registry_shared.consumer_policy import describe
from registry_shared.health import HEALTH, ComponentHealth, HealthRegistry

log = logging.getLogger(__name__)


class BackgroundTask:
    """A supervised background loop; subclasses implement `run()`."""

    name = "background-task"
    #: Delays between restarts after deaths in a row.
    restart_backoff = Backoff(initial=0.5, factor=2.0, cap=30.0)
    #: Deaths in a row (each within `healthy_after` s of its start) after which the health is `dead`.
    max_restarts = 5
    #: A run that lasted this long resets the count of deaths in a row.
    healthy_after = 60.0

    _task: asyncio.Task[None] | None = None
    _stopping: asyncio.Event | None = None
    _registry: HealthRegistry | None = None
    health: ComponentHealth | None = None

    async def run(self) -> None:
        """The loop; runs until cancelled."""
        raise NotImplementedError

    def start(self, registry: HealthRegistry = HEALTH) -> None:
        """Run in the background on the current event loop, supervised, reporting to `registry`."""
        self._stopping = asyncio.Event()
        self._registry = registry
        self.health = registry.component(self.name)
        self.health.ok()
        self._task = asyncio.create_task(self._supervise(), name=self.name)

    def report_ok(self) -> None:
        """For `run()`: a round of work succeeded (clears a `retrying` state)."""
        if self.health is not None:
            self.health.ok()

    def report_retrying(self, exc: BaseException) -> None:
        """For `run()`: a round of work failed and will be tried again (a transient failure, handled by the
        loop itself: not a death)."""
        if self.health is not None:
            self.health.retrying(describe(exc))

    @property
    def running(self) -> bool:
        """Started and not stopped."""
        return self._task is not None and not self._task.done()

    async def _supervise(self) -> None:
        assert self._stopping is not None and self.health is not None
        deaths = 0
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                await self.run()
                error = "run() returned"
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = describe(exc)
                log.exception("%s died", self.name, extra={"fields": {"task": self.name}})
            if self._stopping.is_set():
                return
            lasted = time.monotonic() - started
            deaths = 1 if lasted >= self.healthy_after else deaths + 1
            self.health.restarts += 1
            if deaths >= self.max_restarts:
                self.health.dead(f"died {deaths} times in a row, last: {error}")
            elif self.health.state != "dead":
                self.health.retrying(f"died: {error}")
            delay = self.restart_backoff.delay(deaths)
            log.warning(
                "%s restarting in %.1f s (%d deaths in a row): %s",
                self.name,
                delay,
                deaths,
                error,
                extra={"fields": {"task": self.name, "restarts": self.health.restarts}},
            )
            if await sleep_or_stop(delay, self._stopping):
                return
            asyncio.get_running_loop().call_later(self.healthy_after, self._settled, self.health.restarts)

    def _settled(self, restarts: int) -> None:
        # Still the same run `healthy_after` seconds after a restart: healthy again.
        h = self.health
        if h is None or h.restarts != restarts or not self.running:
            return
        if h.state == "dead" or (h.state == "retrying" and (h.reason or "").startswith("died:")):
            h.revive()

    async def stop(self) -> None:
        """Cancel the loop and wait for it to finish."""
        if self._stopping is not None:
            self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self._registry is not None and self.health is not None:
            self._registry.remove(self.health.name)


class _Supervised(BackgroundTask):
    def __init__(self, name: str, make: Callable[[], Awaitable[None]]) -> None:
        self.name = name
        self._make = make

    async def run(self) -> None:
        await self._make()


def supervise(
    name: str, make: Callable[[], Awaitable[None]], registry: HealthRegistry = HEALTH, *, start: bool = True
) -> BackgroundTask:
    """A `BackgroundTask` running `make()` (a fresh coroutine each start), started unless `start=False`."""
    task = _Supervised(name, make)
    if start:
        task.start(registry)
    return task
