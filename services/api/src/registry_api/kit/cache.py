"""An in-process cache whose entries stay true because every change is announced (Postgres NOTIFY).

The api caches verified keys (auth) and download lookups (catalog.cache) in each process. Entries are right
as long as the process hears every invalidation: the LISTEN loop (kit.listen) evicts or clears them, and
clears everything whenever it (re)connects. So what an entry may be trusted for depends on that loop:

- listener connected: an entry is served until its expiry (`ttl`, or earlier for a bound such as the end of
  a grant window);
- listener down, database up (changes could be made that this process does not hear): entries are trusted
  for UNTRUSTED_S after the listener went down, then no longer; nothing new is stored until it is back
  (which clears everything). So a key rotated meanwhile stops working within UNTRUSTED_S;
- database down (`outage`, set by the database monitor): nothing can change, so an entry stored while the
  listener was connected is served up to OUTAGE_GRACE_S after it was stored, past its expiry (never past its
  own bound, e.g. a grant's end). This is what keeps downloads answering while Postgres is away.

`get` is on the download hot path: a hit is one dict look-up and two float comparisons.
"""

from __future__ import annotations

import math
import time
from collections.abc import Hashable
from typing import Generic, TypeVar

V = TypeVar("V")

#: How long entries are trusted once the LISTEN loop is down (while the database is up).
UNTRUSTED_S = 2.0
#: While the database is down, entries are served up to this long after they were stored.
OUTAGE_GRACE_S = 300.0


class InvalidatedCache(Generic[V]):
    """key → value, with expiry; kept true by invalidations (see the module doc). Times are epoch seconds."""

    def __init__(self, ttl: float, max_items: int) -> None:
        self.ttl = ttl
        self.max_items = max_items
        self._items: dict[Hashable, tuple[V, float, float, float]] = {}  # value, expires, stale until, bound
        self.generation = 0
        self.listening = False  # the LISTEN loop is connected: entries may be stored and trusted
        self._trusted_until = math.inf  # when the listener went down: the time entries stop being trusted
        self.outage = False  # the database is down: serve stored entries past their expiry

    def get(self, key: Hashable) -> V | None:
        item = self._items.get(key)
        if item is None:
            return None
        now = time.time()
        if now < item[1] and now < self._trusted_until:
            return item[0]
        if self.outage and now < item[2] and now < item[3]:
            return item[0]
        if now >= item[1]:
            self._items.pop(key, None)
        return None

    def put(self, key: Hashable, value: V, bound: float | None = None, generation: int | None = None) -> None:
        """Store unless the cache was cleared since the look-up began (`generation`, read before it), or the
        listener is down. `bound`: an epoch time after which the entry is never served (a grant's end)."""
        if not self.listening or (generation is not None and generation != self.generation):
            return
        if len(self._items) >= self.max_items:
            self._items.clear()
        now = time.time()
        bound = math.inf if bound is None else float(bound)
        self._items[key] = (value, min(now + self.ttl, bound), now + OUTAGE_GRACE_S, bound)

    def evict(self, key: Hashable) -> None:
        """Drop one entry; a look-up in flight (begun before) will not store its answer either."""
        self.generation += 1
        self._items.pop(key, None)

    def clear(self) -> None:
        self.generation += 1
        self._items.clear()

    def listener_up(self) -> None:
        """The LISTEN loop (re)connected: forget everything (changes may have been missed), trust again."""
        self.clear()
        self.listening = True
        self._trusted_until = math.inf

    def listener_down(self) -> None:
        """The LISTEN loop lost its connection: trust entries for UNTRUSTED_S more, store nothing new."""
        if self.listening:
            self.listening = False
            self._trusted_until = time.time() + UNTRUSTED_S

    def __len__(self) -> int:
        return len(self._items)
