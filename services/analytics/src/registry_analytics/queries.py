"""The usage queries (SQL only), over the daily rollup plus the raw events at the window's edges.

A window [since, until] is in whole epoch seconds, both ends included: an event counts when
since <= ts < until + 1. Whole UTC days inside the window are read from `usage_daily`; the partial days
at either end from `access_events`, whose (hour, user, model) order keeps those scans short.

The admin overview reads closed periods (whole days and whole hours before the current hour) from the
per-user and per-model rollups, and only the partial hours from the raw events. Only late events can change
a closed period, so its part of an overview can be kept (`ClosedPeriods`) until the loader stores one.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from registry_analytics.store import Store

DAY = 86_400
HOUR = 3_600
_EPOCH = date(1970, 1, 1)

#: Rows of the window as (day, user_id, repo_id, events, manifests, files_list, downloads, last_ts):
#: whole days from the rollup, partial days from the raw events. {filter} narrows both to some users.
_SOURCE = """
    SELECT day, user_id, repo_id, events, manifests, files_list, downloads, last_ts
    FROM usage_daily
    WHERE day >= {d0:Date} AND day <= {d1:Date} {filter}
    UNION ALL
    SELECT toDate(ts) AS day, user_id, repo_id, toUInt64(1) AS events,
           toUInt64(kind IN ('manifest', 'platform_manifest')) AS manifests,
           toUInt64(kind = 'files_list') AS files_list, toUInt64(kind = 'download') AS downloads, ts AS last_ts
    FROM access_events
    WHERE ((ts >= toDateTime64({a0:UInt64}, 3, 'UTC') AND ts < toDateTime64({a1:UInt64}, 3, 'UTC'))
        OR (ts >= toDateTime64({b0:UInt64}, 3, 'UTC') AND ts < toDateTime64({b1:UInt64}, 3, 'UTC'))) {filter}
"""

#: Every number of a usage answer in one pass over the window: the whole window, per model, per day and
#: per user, told apart by grouping() (0 = the column is part of that row's grouping key).
_USAGE = """
SELECT grouping(repo_id), grouping(day), grouping(user_id), repo_id, toString(day), user_id,
       sum(events), sum(manifests), sum(files_list), sum(downloads), toUnixTimestamp(max(last_ts))
FROM ({src})
GROUP BY GROUPING SETS ((), (repo_id), (day), (user_id))
"""

#: The same window over the per-user or per-model rollups: whole days, then whole hours of the edge days,
#: then the raw events of the partial hours. {key} is user_id or repo_id, {rollup} users or models.
_NARROW_SOURCE = """
    SELECT day, {key}, events, manifests, files_list, downloads, last_ts
    FROM usage_daily_{rollup}
    WHERE day >= {{d0:Date}} AND day <= {{d1:Date}}
    UNION ALL
    SELECT toDate(hour) AS day, {key}, events, manifests, files_list, downloads, last_ts
    FROM usage_hourly_{rollup}
    WHERE (hour >= toDateTime({{h0:UInt64}}, 'UTC') AND hour < toDateTime({{h1:UInt64}}, 'UTC'))
       OR (hour >= toDateTime({{h2:UInt64}}, 'UTC') AND hour < toDateTime({{h3:UInt64}}, 'UTC'))
    UNION ALL
    SELECT toDate(ts) AS day, {key}, toUInt64(1) AS events,
           toUInt64(kind IN ('manifest', 'platform_manifest')) AS manifests,
           toUInt64(kind = 'files_list') AS files_list, toUInt64(kind = 'download') AS downloads, ts AS last_ts
    FROM access_events
    WHERE {raw}
"""
_RAW_RANGES = " OR ".join(
    f"(ts >= toDateTime64({{r{i}:UInt64}}, 3, 'UTC') AND ts < toDateTime64({{r{i + 1}:UInt64}}, 3, 'UTC'))"
    for i in range(0, 8, 2)
)
_USERS_SOURCE = _NARROW_SOURCE.format(key="user_id", rollup="users", raw=_RAW_RANGES)
_MODELS_SOURCE = _NARROW_SOURCE.format(key="repo_id", rollup="models", raw=_RAW_RANGES)

#: The admin overview without a user filter, as rows carrying zeros in the columns that are not their own:
#: events .. last_ts count for totals, days and users; m_downloads and m_rows for models. Closed periods
#: come from the per-user rollups (totals, days, users) and the per-model ones (models): the whole days
#: (_DAYS_SOURCE) and the whole hours of the edge days (_HOURS_SOURCE); the partial hours from the raw events,
#: read once for both (_OPEN_SOURCE).
_DAYS_SOURCE = """
    SELECT day, user_id, '' AS repo_id, events, manifests, files_list, downloads, last_ts,
           toUInt64(0) AS m_downloads, toUInt64(0) AS m_rows
    FROM usage_daily_users
    WHERE day >= {d0:Date} AND day <= {d1:Date}
    UNION ALL
    SELECT day, toUInt64(0), repo_id, toUInt64(0), toUInt64(0), toUInt64(0), toUInt64(0), toDateTime64(0, 3, 'UTC'),
           downloads, toUInt64(1)
    FROM usage_daily_models
    WHERE day >= {d0:Date} AND day <= {d1:Date}
"""
_HOURS_SOURCE = """
    SELECT toDate(hour) AS day, user_id, '' AS repo_id, events, manifests, files_list, downloads, last_ts,
           toUInt64(0) AS m_downloads, toUInt64(0) AS m_rows
    FROM usage_hourly_users
    WHERE {hours}
    UNION ALL
    SELECT toDate(hour), toUInt64(0), repo_id, toUInt64(0), toUInt64(0), toUInt64(0), toUInt64(0),
           toDateTime64(0, 3, 'UTC'), downloads, toUInt64(1)
    FROM usage_hourly_models
    WHERE {hours}
""".replace(
    "{hours}",
    "(hour >= toDateTime({h0:UInt64}, 'UTC') AND hour < toDateTime({h1:UInt64}, 'UTC'))"
    " OR (hour >= toDateTime({h2:UInt64}, 'UTC') AND hour < toDateTime({h3:UInt64}, 'UTC'))",
)
_OPEN_SOURCE = """
    SELECT toDate(ts) AS day, user_id, repo_id, toUInt64(1) AS events,
           toUInt64(kind IN ('manifest', 'platform_manifest')) AS manifests, toUInt64(kind = 'files_list') AS files_list,
           toUInt64(kind = 'download') AS downloads, ts AS last_ts, toUInt64(kind = 'download') AS m_downloads,
           toUInt64(1) AS m_rows
    FROM access_events
    WHERE {raw}
""".replace("{raw}", _RAW_RANGES)

#: Columns: grouping(day), grouping(user_id), day, user_id, repo_id, events, manifests, files_list,
#: downloads, last_ts, then the downloads and row count of the model rows (the totals are the sums of the
#: days). {src} is one or more of the sources above.
_OVERVIEW = """
SELECT grouping(day), grouping(user_id), toString(day), user_id, repo_id,
       sum(events), sum(manifests), sum(files_list), sum(downloads), toUnixTimestamp(max(last_ts)),
       sum(m_downloads), sum(m_rows)
FROM ({src})
GROUP BY GROUPING SETS ((day), (user_id), (repo_id))
"""
_DAYS_OVERVIEW = _OVERVIEW.replace("{src}", _DAYS_SOURCE)
_HOURS_OVERVIEW = _OVERVIEW.replace("{src}", _HOURS_SOURCE)
_OPEN_OVERVIEW = _OVERVIEW.replace("{src}", _OPEN_SOURCE)
_WHOLE_OVERVIEW = _OVERVIEW.replace("{src}", _DAYS_SOURCE + "UNION ALL" + _HOURS_SOURCE + "UNION ALL" + _OPEN_SOURCE)

_USER_NAMES = """
SELECT user_id, argMax(email, updated_at), argMax(name, updated_at)
FROM users
WHERE user_id IN (SELECT arrayJoin({uids:Array(UInt64)}))
GROUP BY user_id
"""

_DOWNLOADS = (
    """
SELECT repo_id, sum(downloads) AS d
FROM ("""
    + _MODELS_SOURCE
    + """)
WHERE repo_id != ''
GROUP BY repo_id
HAVING d > 0
ORDER BY repo_id
"""
)

_BY_USER = "AND user_id = {uid:UInt64}"
_BY_EMAIL = "AND user_id IN (SELECT user_id FROM users FINAL WHERE lower(email) = lower({email:String}))"


@dataclass(frozen=True)
class Window:
    """A usage window in whole epoch seconds, both ends included."""

    since: int
    until: int

    def params(self) -> dict[str, Any]:
        """Query parameters splitting the window into whole days (rollup) and partial edges (raw)."""
        end = self.until + 1
        first_full = -(-self.since // DAY) * DAY
        last_full_end = end // DAY * DAY
        if first_full < last_full_end:
            d0, d1 = first_full // DAY, last_full_end // DAY - 1
            a0, a1, b0, b1 = self.since, first_full, last_full_end, end
        else:  # no whole day: the rollup part is empty, the raw part is the whole window
            d0, d1 = 1, 0
            a0, a1, b0, b1 = self.since, end, 0, 0
        params: dict[str, Any] = {
            "d0": _EPOCH.fromordinal(_EPOCH.toordinal() + d0),
            "d1": _EPOCH.fromordinal(_EPOCH.toordinal() + d1),
            "a0": a0,
            "a1": a1,
            "b0": b0,
            "b1": b1,
        }
        # The edges (a, b) again, as whole hours (h0..h3, for the hourly rollups) and partial hours (r0..r7).
        raw: list[int] = []
        for i, (lo, hi) in enumerate(((a0, a1), (b0, b1))):
            first_hour, last_hour_end = -(-lo // HOUR) * HOUR, hi // HOUR * HOUR
            if lo < hi and first_hour < last_hour_end:
                params[f"h{2 * i}"], params[f"h{2 * i + 1}"] = first_hour, last_hour_end
                raw += [lo, first_hour, last_hour_end, hi]
            else:
                params[f"h{2 * i}"] = params[f"h{2 * i + 1}"] = 0
                raw += [lo, hi, 0, 0]
        params.update({f"r{i}": v for i, v in enumerate(raw)})
        return params


class ClosedPeriods:
    """The closed-period numbers of recent admin overviews, keyed by their whole days and hours.

    A closed period (a whole day or hour before the current hour) changes only when a late event for it is
    stored, and the loader then calls `invalidate()`. A computation that began before an invalidation is not
    kept (`put` compares generations), and one kept just before it is dropped by it. Valid only when this
    process's loader is the store's only writer: the in-process engine (chDB), whose files one process holds.
    """

    def __init__(self, size: int = 64) -> None:  # two entries (days, hours) per window
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple, Any] = OrderedDict()
        self._size = size
        self.generation = 0

    def get(self, key: tuple) -> Any:
        """What is kept for `key`, or None."""
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: tuple, generation: int, value: Any) -> None:
        """Keep `value`, computed from the store as of `generation`, unless a late event came in since."""
        with self._lock:
            if generation == self.generation:
                self._entries[key] = value
                self._entries.move_to_end(key)
                while len(self._entries) > self._size:
                    self._entries.popitem(last=False)

    def invalidate(self) -> None:
        """A closed period changed: forget everything kept."""
        with self._lock:
            self.generation += 1
            self._entries.clear()


#: An overview's numbers: days (day -> [events, manifests, files_list, downloads, last_ts]), users (user ->
#: [events, downloads, last_ts]) and every model seen (repo -> downloads).
_Parts = tuple[dict[str, list[int]], dict[int, list[int]], dict[str, int]]


def _add_day(days: dict[str, list[int]], day: str, ev: int, man: int, fl: int, dl: int, last: int) -> None:
    d = days.setdefault(day, [0, 0, 0, 0, 0])
    d[0] += ev
    d[1] += man
    d[2] += fl
    d[3] += dl
    d[4] = max(d[4], last)


def _add_user(users: dict[int, list[int]], uid: int, ev: int, dl: int, last: int) -> None:
    u = users.setdefault(uid, [0, 0, 0])
    u[0] += ev
    u[1] += dl
    u[2] = max(u[2], last)


def _add(parts: _Parts, rows: list[tuple]) -> _Parts:
    """Add _OVERVIEW rows into `parts` (in place) and return them."""
    days, users, models = parts
    for g_day, g_user, day, uid, repo, ev, man, fl, dl, last, m_dl, m_rows in rows:
        if not g_day:
            if ev:
                _add_day(days, day, ev, man, fl, dl, last)
        elif not g_user:
            if ev:
                _add_user(users, uid, ev, dl, last)
        elif repo and m_rows:
            models[repo] = models.get(repo, 0) + m_dl
    return parts


def _combined(*parts: _Parts) -> _Parts:
    """New numbers adding up `parts` (which stay as they are)."""
    days: dict[str, list[int]] = {}
    users: dict[int, list[int]] = {}
    models: dict[str, int] = {}
    for p_days, p_users, p_models in parts:
        for day, numbers in p_days.items():
            _add_day(days, day, *numbers)
        for uid, numbers in p_users.items():
            _add_user(users, uid, *numbers)
        for repo, dl in p_models.items():
            models[repo] = models.get(repo, 0) + dl
    return days, users, models


def _closed_parts(store: Store, params: dict[str, Any], closed: ClosedPeriods) -> list[_Parts]:
    """The window's whole days and its whole hours (all closed), each as kept in `closed` (never changed in
    place). They are kept apart: when the hour turns, the window's days are usually the same and only its
    hours are read again."""
    generation = closed.generation
    parts = []
    for key, sql in (
        (("days", params["d0"], params["d1"]), _DAYS_OVERVIEW),
        (("hours", params["h0"], params["h1"], params["h2"], params["h3"]), _HOURS_OVERVIEW),
    ):
        part = closed.get(key)
        if part is None:
            part = _add(({}, {}, {}), store.query(sql, params))
            closed.put(key, generation, part)
        parts.append(part)
    return parts


def _usage(store: Store, window: Window, filters: str, params: dict[str, Any]) -> dict[str, Any]:
    """Run the one-pass query and split its rows into totals, models, days and users."""
    sql = _USAGE.format(src=_SOURCE.replace("{filter}", filters))
    totals = (0, 0, 0, 0, 0)
    models: list[tuple[str, int]] = []
    days: list[dict[str, Any]] = []
    users: list[tuple[int, int, int, int]] = []
    distinct = 0
    for g_repo, g_day, g_user, repo, day, uid, ev, man, fl, dl, last in store.query(sql, {**window.params(), **params}):
        if g_repo and g_day and g_user:
            totals = (int(ev), int(man), int(fl), int(dl), int(last))
        elif not g_repo:
            if repo:
                distinct += 1
                if dl:
                    models.append((repo, int(dl)))
        elif not g_day:
            days.append({"day": day, "events": int(ev), "downloads": int(dl)})
        elif not g_user:
            users.append((int(uid), int(ev), int(dl), int(last)))
    models.sort(key=lambda m: (-m[1], m[0]))
    days.sort(key=lambda d: d["day"])
    users.sort(key=lambda u: (-u[1], -u[2], u[0]))
    events = totals[0]
    return {
        "window": {"since": window.since, "until": window.until},
        "totals": {"events": events, "manifests": totals[1], "files_list": totals[2], "downloads": totals[3]},
        "last_seen_ts": totals[4] if events else None,
        "distinct_models": distinct,
        "top_models": [{"repo_id": r, "downloads": d} for r, d in models],
        "timeseries_daily": days,
        "_users": users,
    }


def _overview(store: Store, window: Window, closed: ClosedPeriods | None) -> dict[str, Any]:
    """The unfiltered admin overview: the closed periods' numbers (kept, or read and kept) plus the partial
    hours'; in one statement when nothing can be kept."""
    params = window.params()
    days_end = (params["d1"].toordinal() - _EPOCH.toordinal() + 1) * DAY if params["d0"] <= params["d1"] else 0
    if closed is None or max(days_end, params["h1"], params["h3"]) > time.time() // HOUR * HOUR:
        days, users, models = _add(({}, {}, {}), store.query(_WHOLE_OVERVIEW, params))
    else:
        parts = _combined(*_closed_parts(store, params, closed))  # new dicts: what is kept stays as it is
        days, users, models = _add(parts, store.query(_OPEN_OVERVIEW, params))
    events = sum(d[0] for d in days.values())
    top_models = sorted(((r, d) for r, d in models.items() if d), key=lambda m: (-m[1], m[0]))
    return {
        "window": {"since": window.since, "until": window.until},
        "totals": {
            "events": events,
            "manifests": sum(d[1] for d in days.values()),
            "files_list": sum(d[2] for d in days.values()),
            "downloads": sum(d[3] for d in days.values()),
        },
        "last_seen_ts": max(d[4] for d in days.values()) if events else None,
        "distinct_models": len(models),
        "top_models": [{"repo_id": r, "downloads": d} for r, d in top_models],
        "timeseries_daily": [{"day": k, "events": v[0], "downloads": v[3]} for k, v in sorted(days.items())],
        "_users": sorted(
            ((uid, ev, dl, last) for uid, (ev, dl, last) in users.items()), key=lambda u: (-u[1], -u[2], u[0])
        ),
    }


def user_usage(store: Store, user_id: int, window: Window, top_models_limit: int) -> dict[str, Any]:
    """The body of `GET /v1/users/me/usage` for one user."""
    body = _usage(store, window, _BY_USER, {"uid": user_id})
    del body["_users"]
    body["top_models"] = body["top_models"][:top_models_limit]
    return body


def admin_usage(
    store: Store,
    window: Window,
    top_users_limit: int,
    top_models_limit: int,
    filter_user_id: int | None = None,
    filter_email: str | None = None,
    closed: ClosedPeriods | None = None,
) -> dict[str, Any]:
    """The body of `GET /v1/admin/usage`, optionally for the users matching an id and/or an e-mail;
    `closed` keeps the unfiltered overview's closed periods between calls."""
    filters, params = "", {}
    if filter_user_id is not None:
        filters, params = _BY_USER, {"uid": filter_user_id}
    if filter_email is not None:
        filters, params = f"{filters} {_BY_EMAIL}", {**params, "email": filter_email}
    body = _usage(store, window, filters, params) if filters else _overview(store, window, closed)
    top = body.pop("_users")[:top_users_limit]
    names: dict[int, tuple[str, str]] = {}
    if top:
        rows = store.query(_USER_NAMES, {"uids": [u[0] for u in top]})
        names = {int(uid): (email, name) for uid, email, name in rows}
    body["top_users"] = [
        {
            "user_id": uid,
            "email": names.get(uid, (None, None))[0] or None,
            "name": names.get(uid, (None, None))[1] or None,
            "events": ev,
            "downloads": dl,
            "last_seen_ts": last,
        }
        for uid, ev, dl, last in top
    ]
    body["top_models"] = body["top_models"][:top_models_limit]
    return body


def model_downloads(store: Store, since_ts: int, until_ts: int | None = None) -> list[dict[str, Any]]:
    """Downloads per model since `since_ts` (the catalog's downloads counter)."""
    until = until_ts if until_ts is not None else int(datetime.now(UTC).timestamp())
    window = Window(since_ts, max(until, since_ts))
    rows = store.query(_DOWNLOADS, window.params())
    return [{"repo_id": r, "downloads": int(d)} for r, d in rows]
