"""Progress of transfers: a bar per file and one overall (rich), or nothing (the SDK's default)."""

from __future__ import annotations

import threading
import time
from typing import Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


class Reporter(Protocol):
    """What the transfer engines tell about their progress."""

    def add_file(self, name: str, total: int) -> int: ...
    def advance(self, task: int, amount: int) -> None: ...
    def finish_file(self, task: int, note: str) -> None: ...


class NullReporter:
    """No progress shown."""

    def add_file(self, name: str, total: int) -> int:
        return 0

    def advance(self, task: int, amount: int) -> None:
        pass

    def finish_file(self, task: int, note: str) -> None:
        pass


class RichReporter:
    """Bars on the terminal (stderr): one per file and an overall one; finished files keep their line."""

    def __init__(self, console: Console, total: int, label: str) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}", justify="left"),
            BarColumn(bar_width=None),
            TaskProgressColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[note]}"),
            console=console,
            transient=False,
            refresh_per_second=8,
        )
        self.overall = self.progress.add_task(label, total=total, note="")
        self._lock = threading.Lock()

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def add_file(self, name: str, total: int) -> int:
        return int(self.progress.add_task(name, total=total, note=""))

    def advance(self, task: int, amount: int) -> None:
        with self._lock:
            self.progress.advance(TaskID(task), amount)
            self.progress.advance(self.overall, amount)

    def finish_file(self, task: int, note: str) -> None:
        with self._lock:
            t = self.progress.tasks[[x.id for x in self.progress.tasks].index(TaskID(task))]
            rest = (t.total or 0) - t.completed
            if rest > 0 and note in ("skipped", "already published", "verified", "already verified"):
                # Counted in the overall total, but nothing was transferred: the overall bar still ends at 100%.
                self.progress.advance(self.overall, rest)
                self.progress.update(TaskID(task), completed=t.total)
            self.progress.update(TaskID(task), note=note)


class RateLimiter:
    """A shared byte budget per second (`--limit-rate`): callers sleep until their bytes fit."""

    def __init__(self, rate: int | None) -> None:
        self.rate = rate
        self._lock = threading.Lock()
        self._next = time.monotonic()

    def consume(self, amount: int) -> None:
        if not self.rate:
            return
        with self._lock:
            now = time.monotonic()
            start = max(self._next, now)
            self._next = start + amount / self.rate
            wait = start - now
        if wait > 0:
            time.sleep(wait)
