"""What a service's `/healthz` says about its consumers and background tasks.

Each consumer or background task holds a `ComponentHealth` from the process's `HealthRegistry` and says
how it is doing as it goes:

- `ok()`: working (the last message was handled, the task is running);
- `retrying(reason)`: a transient failure (database, Kafka or storage away) is being retried; the first
  the latest reason and the time the failures started are kept until `ok()`, so `/healthz` shows
  `"retrying: OperationalError: connection refused since 2026-12-06T02:30:00Z"`;
- `dead(reason)`: it stopped for good, or keeps dying: `/healthz` answers 503.

`HealthRegistry.report()` gives `/healthz` its status code and body. `HEALTH` is the process's registry
(one service per process); tests and embedded uses may build their own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

State = Literal["starting", "ok", "retrying", "dead"]


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class ComponentHealth:
    """The health of one consumer or background task, and its counters."""

    name: str
    state: State = "starting"
    reason: str | None = None
    since: float = field(default_factory=time.time)
    retries: int = 0
    restarts: int = 0
    handled: int = 0
    dead_lettered: int = 0

    def ok(self) -> None:
        """Working normally (clears a retrying state; a dead component stays dead until `revive`)."""
        if self.state in ("starting", "retrying"):
            self.state, self.reason, self.since = "ok", None, time.time()

    def retrying(self, reason: str) -> None:
        """A transient failure is being retried: the latest reason, since the first failure (until `ok()`)."""
        self.retries += 1
        if self.state == "dead":
            return
        if self.state != "retrying":
            self.state, self.since = "retrying", time.time()
        self.reason = reason

    def dead(self, reason: str) -> None:
        """Stopped for good, or keeps dying: the service is unhealthy."""
        self.state, self.reason, self.since = "dead", reason, time.time()

    def revive(self) -> None:
        """Back to ok after `dead` (a supervised task that has run long enough again)."""
        self.state, self.reason, self.since = "ok", None, time.time()

    @property
    def healthy(self) -> bool:
        """Anything but dead (retrying is healthy: it recovers by itself once the dependency is back)."""
        return self.state != "dead"

    @property
    def status(self) -> str:
        """One line: `ok`, `starting`, `retrying: <reason> since <time>` or `dead: <reason> since <time>`."""
        if self.state in ("ok", "starting"):
            return self.state
        return f"{self.state}: {self.reason} since {_iso(self.since)}"

    def as_dict(self) -> dict[str, object]:
        """The component as `/healthz` shows it."""
        return {
            "status": self.status,
            "state": self.state,
            "reason": self.reason,
            "since": _iso(self.since),
            "retries": self.retries,
            "restarts": self.restarts,
            "handled": self.handled,
            "dead_lettered": self.dead_lettered,
        }


class HealthRegistry:
    """The components of one process, by name."""

    def __init__(self) -> None:
        self._components: dict[str, ComponentHealth] = {}

    def component(self, name: str) -> ComponentHealth:
        """The component called `name`, created (starting) the first time."""
        c = self._components.get(name)
        if c is None:
            c = self._components[name] = ComponentHealth(name)
        return c

    def remove(self, name: str) -> None:
        """Forget a component (stopped on purpose)."""
        self._components.pop(name, None)

    def components(self) -> dict[str, ComponentHealth]:
        """Every registered component, by name."""
        return dict(self._components)

    @property
    def healthy(self) -> bool:
        """No component is dead."""
        return all(c.healthy for c in self._components.values())

    def report(self) -> tuple[int, dict[str, object]]:
        """(HTTP status, body part) for `/healthz`: 503 when a component is dead, and each component's state."""
        body: dict[str, object] = {
            "consumers": {name: c.as_dict() for name, c in sorted(self._components.items())},
        }
        return (200 if self.healthy else 503), body


#: The registry of this process.
HEALTH = HealthRegistry()
