"""The one retry delay of the project: bounded exponential backoff with jitter, and a sleep a stop can cut short.

Every loop that waits before trying again (a consumer whose database is away, a background task being
restarted, a dead letter that Kafka refused) takes its delays from a `Backoff`:

    backoff = Backoff(initial=0.25, cap=30.0)
    attempt = 0
    while True:
        try:
            return await work()
        except TransientError:
            attempt += 1
            if await backoff.sleep(attempt, stop):   # True: stop was set meanwhile
                raise Stopped

`delay(n)` is `initial * factor ** (n - 1)` capped at `cap`, shortened by a random share of up to `jitter`
(so processes retrying together spread out, and the delay never exceeds the cap).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays of a retry loop: exponential from `initial`, at most `cap`, minus up to `jitter` of it at random."""

    initial: float = 0.25
    factor: float = 2.0
    cap: float = 30.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.initial < 0 or self.cap < 0 or self.factor < 1 or not 0 <= self.jitter <= 1:
            raise ValueError(f"invalid backoff: {self}")

    def base(self, attempt: int) -> float:
        """The delay after the `attempt`-th failure (1 for the first) before jitter: never above `cap`."""
        if attempt < 1:
            return 0.0
        # Capped before it can overflow: factor ** 1000 is already too large for a float.
        exponent = min(attempt - 1, 64)
        return min(self.cap, self.initial * self.factor**exponent)

    def delay(self, attempt: int) -> float:
        """The delay after the `attempt`-th failure, jittered: between (1 - jitter) and 1 times `base(attempt)`."""
        return self.base(attempt) * (1.0 - self.jitter * random.random())

    async def sleep(self, attempt: int, stop: asyncio.Event | None = None) -> bool:
        """Wait `delay(attempt)` seconds, or less if `stop` is set meanwhile; True if `stop` is set."""
        return await sleep_or_stop(self.delay(attempt), stop)


async def sleep_or_stop(seconds: float, stop: asyncio.Event | None = None) -> bool:
    """Wait `seconds`, returning early once `stop` is set; True if `stop` is set (before or during the wait)."""
    if stop is None:
        await asyncio.sleep(seconds)
        return False
    if stop.is_set():
        return True
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()
