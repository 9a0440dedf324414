"""Response bodies of the usage API (the shapes of the spec's usage endpoints)."""

from __future__ import annotations

from pydantic import BaseModel


class UsageWindow(BaseModel):
    """The window the numbers cover, in epoch seconds (both ends included)."""

    since: int
    until: int


class UsageTotals(BaseModel):
    """Event counts: `manifests` = manifest + platform_manifest, `events` = every kind."""

    events: int
    manifests: int
    files_list: int
    downloads: int


class ModelDownloads(BaseModel):
    """Downloads of one model."""

    repo_id: str
    downloads: int


class DailyPoint(BaseModel):
    """One UTC day of the series."""

    day: str
    events: int
    downloads: int


class TopUser(BaseModel):
    """One user of the admin overview (email/name are null for a user the analytics never heard of)."""

    user_id: int
    email: str | None
    name: str | None
    events: int
    downloads: int
    last_seen_ts: int


class UserUsage(BaseModel):
    """`GET /v1/users/me/usage`."""

    window: UsageWindow
    totals: UsageTotals
    last_seen_ts: int | None
    distinct_models: int
    top_models: list[ModelDownloads]
    timeseries_daily: list[DailyPoint]


class AdminUsage(UserUsage):
    """`GET /v1/admin/usage`."""

    top_users: list[TopUser]


class DownloadCounts(BaseModel):
    """Downloads per model, for the catalog's downloads counter."""

    items: list[ModelDownloads]
