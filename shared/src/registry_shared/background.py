"""A long-running asyncio task of a service (a consumer, a relay, a flusher) with start/stop."""

from __future__ import annotations

import asyncio
import contextlib


class BackgroundTask:
    """Subclasses implement `run()`, which loops until cancelled; `stop()` cancels and waits."""

    name = "background-task"
    _task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        """Run in the background on the current event loop."""
        self._task = asyncio.create_task(self.run(), name=self.name)

    async def stop(self) -> None:
        """Cancel the loop and wait for it to finish."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
