"""The usage queries (SQL only), over the daily rollup plus the raw events at the window's edges.

A window [since, until] is in whole epoch seconds, both ends included: an event counts when
since <= ts < until + 1. Whole UTC days inside the window are read from `usage_daily`; the partial days
at either end from `access_events`, whose (hour, user, model) order keeps those scans short.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from registry_analytics.store import Store

DAY = 86_400
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

_FILTERS = {
    None: "",
    "user": "AND user_id = {uid:UInt64}",
    "users": "AND user_id IN (SELECT arrayJoin({uids:Array(UInt64)}))",
}

_TOTALS = """
SELECT sum(events), sum(manifests), sum(files_list), sum(downloads), toUnixTimestamp(max(last_ts)),
       uniqExactIf(repo_id, repo_id != '')
FROM ({src})
"""

_TOP_MODELS = """
SELECT repo_id, sum(downloads) AS d
FROM ({src})
WHERE repo_id != ''
GROUP BY repo_id
HAVING d > 0
ORDER BY d DESC, repo_id
LIMIT {{limit:UInt32}}
"""

_DAILY = """
SELECT toString(day), sum(events), sum(downloads)
FROM ({src})
GROUP BY day
ORDER BY day
"""

_TOP_USERS = """
SELECT t.user_id, u.email, u.name, t.events, t.downloads, t.last_seen
FROM (
    SELECT user_id, sum(events) AS events, sum(downloads) AS downloads, toUnixTimestamp(max(last_ts)) AS last_seen
    FROM ({src})
    GROUP BY user_id
    ORDER BY events DESC, downloads DESC, user_id
    LIMIT {{limit:UInt32}}
) AS t
LEFT JOIN (SELECT user_id, email, name FROM users FINAL) AS u ON u.user_id = t.user_id
ORDER BY t.events DESC, t.downloads DESC, t.user_id
"""

_DOWNLOADS = """
SELECT repo_id, sum(downloads) AS d
FROM ({src})
WHERE repo_id != ''
GROUP BY repo_id
HAVING d > 0
ORDER BY repo_id
"""

_USERS_BY_EMAIL = "SELECT DISTINCT user_id FROM users FINAL WHERE lower(email) = lower({email:String})"


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
        return {
            "d0": _EPOCH.fromordinal(_EPOCH.toordinal() + d0),
            "d1": _EPOCH.fromordinal(_EPOCH.toordinal() + d1),
            "a0": a0,
            "a1": a1,
            "b0": b0,
            "b1": b1,
        }


def _source(filter_kind: str | None) -> str:
    return _SOURCE.replace("{filter}", _FILTERS[filter_kind])


def _summary(store: Store, window: Window, filter_kind: str | None, params: dict[str, Any]) -> dict[str, Any]:
    src = _source(filter_kind)
    p = {**window.params(), **params}
    events, manifests, files_list, downloads, last_seen, distinct = store.query(_TOTALS.format(src=src), p)[0]
    return {
        "window": {"since": window.since, "until": window.until},
        "totals": {
            "events": int(events),
            "manifests": int(manifests),
            "files_list": int(files_list),
            "downloads": int(downloads),
        },
        "last_seen_ts": int(last_seen) if events else None,
        "distinct_models": int(distinct),
    }


def _top_models(store: Store, src: str, p: dict[str, Any], limit: int) -> list[dict[str, Any]]:
    rows = store.query(_TOP_MODELS.format(src=src), {**p, "limit": limit})
    return [{"repo_id": r, "downloads": int(d)} for r, d in rows]


def _daily(store: Store, src: str, p: dict[str, Any]) -> list[dict[str, Any]]:
    rows = store.query(_DAILY.format(src=src), p)
    return [{"day": d, "events": int(e), "downloads": int(n)} for d, e, n in rows]


def user_usage(store: Store, user_id: int, window: Window, top_models_limit: int) -> dict[str, Any]:
    """The body of `GET /v1/users/me/usage` for one user."""
    p = {**window.params(), "uid": user_id}
    src = _source("user")
    body = _summary(store, window, "user", p)
    body["top_models"] = _top_models(store, src, p, top_models_limit) if body["totals"]["events"] else []
    body["timeseries_daily"] = _daily(store, src, p) if body["totals"]["events"] else []
    return body


def admin_usage(
    store: Store,
    window: Window,
    top_users_limit: int,
    top_models_limit: int,
    filter_user_id: int | None = None,
    filter_email: str | None = None,
) -> dict[str, Any]:
    """The body of `GET /v1/admin/usage`, optionally for the users matching an id and/or an e-mail."""
    p: dict[str, Any] = window.params()
    kind: str | None = None
    if filter_user_id is not None or filter_email is not None:
        ids: set[int] | None = None
        if filter_email is not None:
            ids = {int(r[0]) for r in store.query(_USERS_BY_EMAIL, {"email": filter_email})}
        if filter_user_id is not None:
            ids = {filter_user_id} if ids is None else ids & {filter_user_id}
        kind, p["uids"] = "users", sorted(ids or ())
    src = _source(kind)
    body = _summary(store, window, kind, p)
    body["top_users"] = []
    body["top_models"] = []
    body["timeseries_daily"] = []
    if body["totals"]["events"]:
        rows = store.query(_TOP_USERS.format(src=src), {**p, "limit": top_users_limit})
        body["top_users"] = [
            {
                "user_id": int(uid),
                "email": email or None,
                "name": name or None,
                "events": int(ev),
                "downloads": int(dl),
                "last_seen_ts": int(seen),
            }
            for uid, email, name, ev, dl, seen in rows
        ]
        body["top_models"] = _top_models(store, src, p, top_models_limit)
        body["timeseries_daily"] = _daily(store, src, p)
    return body


def model_downloads(store: Store, since_ts: int, until_ts: int | None = None) -> list[dict[str, Any]]:
    """Downloads per model since `since_ts` (the catalog's downloads counter)."""
    until = until_ts if until_ts is not None else int(datetime.now(UTC).timestamp())
    window = Window(since_ts, max(until, since_ts))
    rows = store.query(_DOWNLOADS.format(src=_source(None)), window.params())
    return [{"repo_id": r, "downloads": int(d)} for r, d in rows]
