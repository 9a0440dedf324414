"""Who receives an event: the rules of the notifier.

- upload.completed / upload.verified / upload.rejected → the developer who uploaded the file
- grant.created / grant.updated / grant.revoked → the platform user of the grant
- version.created → the model's owner; platform users whose grant covers the event's time and is
  still in force now; for a public model, anyone whose subscription names it in its repo_id filter
- user.key_rotated → the account's owner
A subscription receives an event only if it was created before the event, wants its type, and (if it
has a repo_id filter) the event is about that model. E-mails go, whatever the subscriptions, for an
upload rejected (developer), a grant created or revoked (platform user) and a key rotated (account).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg

from registry_notifier import mail, repository
from registry_shared.consumer_policy import MissingReference
from registry_shared.events import CloudEvent
from registry_shared.webhooks import SUBSCRIPTION_NAME_OF, IPNetwork, statically_allowed

log = logging.getLogger(__name__)


@dataclass
class Incoming:
    """An event as consumed: the parsed envelope, the exact JSON to deliver, and the Kafka record it came in
    (what a dead letter of it carries)."""

    event: CloudEvent
    raw: str
    record: Any = None


@dataclass
class Plan:
    """What one batch of events produces: delivery rows and e-mail rows."""

    deliveries: list[tuple] = field(default_factory=list)
    emails: list[tuple] = field(default_factory=list)


#: The field naming the account an event is about, for the event types routed to an account.
_USER_FIELD = {
    "registry.grant.created.v1": "platform_user_id",
    "registry.grant.updated.v1": "platform_user_id",
    "registry.grant.revoked.v1": "platform_user_id",
    "registry.user.key_rotated.v1": "user_id",
}


def _check_references(
    batch: list[Incoming], uploads: dict[int, dict], users: dict[int, str], models: dict[str, dict]
) -> None:
    """MissingReference for the first event referring to an upload, account or model that does not exist.

    Every one of them is created before its event is written (the api's outbox, in the same transaction) and
    never deleted, so a missing row is the event's fault, not a matter of time: it is dead-lettered."""
    for item in batch:
        ev, d = item.event, item.event.data
        if ev.type.startswith("registry.upload.") and int(d["upload_id"]) not in uploads:
            raise MissingReference(f"{ev.type} {ev.id}: upload {d['upload_id']} does not exist")
        field = _USER_FIELD.get(ev.type)
        if field and int(d[field]) not in users:
            raise MissingReference(f"{ev.type} {ev.id}: user {d[field]} does not exist")
        if ev.type == "registry.version.created.v1" and d["repo_id"] not in models:
            raise MissingReference(f"{ev.type} {ev.id}: model {d['repo_id']!r} does not exist")


class Router:
    """Turns events into deliveries and e-mails."""

    def __init__(self, allowed: list[IPNetwork], deployment: str, email_enabled: bool) -> None:
        self._allowed = allowed
        self._deployment = deployment
        self._email = email_enabled
        self._url_ok: dict[str, bool] = {}

    def _reachable(self, url: str) -> bool:
        ok = self._url_ok.get(url)
        if ok is None:
            if len(self._url_ok) > 10_000:
                self._url_ok.clear()
            ok = self._url_ok[url] = statically_allowed(url, self._allowed)
        return ok

    async def plan(self, conn: psycopg.AsyncConnection, batch: list[Incoming]) -> Plan:
        """Deliveries and e-mails for `batch`, in the batch's order."""
        plan = Plan()
        routable = [i for i in batch if i.event.type in SUBSCRIPTION_NAME_OF]
        if not routable:
            return plan
        by_owner: dict[int, list[dict]] = {}
        by_repo: dict[str, list[dict]] = {}
        for h in await repository.enabled_webhooks(conn):
            by_owner.setdefault(h["owner_id"], []).append(h)
            if h["repo_id"] is not None:
                by_repo.setdefault(h["repo_id"], []).append(h)
        upload_ids = [int(i.event.data["upload_id"]) for i in routable if i.event.type.startswith("registry.upload.")]
        uploads = await repository.upload_developers(conn, upload_ids)
        account_users = [int(i.event.data[field]) for i in routable if (field := _USER_FIELD.get(i.event.type))]
        emails = await repository.user_emails(conn, account_users)
        version_repos = [i.event.data["repo_id"] for i in routable if i.event.type == "registry.version.created.v1"]
        models = await repository.model_audiences(conn, version_repos, int(time.time()))
        _check_references(routable, uploads, emails, models)
        for item in routable:
            ev, name = item.event, SUBSCRIPTION_NAME_OF[item.event.type]
            owners, anyone_filtering = self._audience(ev, name, uploads, models)
            repo = ev.data.get("repo_id")
            order_key = ev.subject or repo or "-"
            candidates = {h["id"]: h for owner in sorted(owners) for h in by_owner.get(owner, ())}
            if anyone_filtering and repo is not None:  # a public model: whoever names it in a filter
                candidates.update((h["id"], h) for h in by_repo.get(repo, ()))
            for h in sorted(candidates.values(), key=lambda h: h["id"]):
                if name not in h["event_types"] or h["created_at"] > ev.time:
                    continue
                if h["repo_id"] is not None and h["repo_id"] != repo:
                    continue
                if not self._reachable(h["url"]):
                    log.debug("webhook target left to another notifier", extra={"fields": {"webhook_id": h["id"]}})
                    continue
                plan.deliveries.append(
                    repository.delivery_row(h["id"], ev.id, ev.type, order_key, item.raw, ev.time, self._deployment)
                )
            if self._email:
                plan.emails.extend(self._emails(ev, name, uploads, emails))
        return plan

    def _audience(
        self, ev: CloudEvent, name: str, uploads: dict[int, dict], models: dict[str, dict]
    ) -> tuple[set[int], bool]:
        """(user ids who may receive `ev`, whether any subscription naming the model may)."""
        d = ev.data
        if name.startswith("upload."):
            up = uploads.get(int(d["upload_id"]))
            return ({up["developer_id"]} if up else set()), False
        if name.startswith("grant."):
            return {int(d["platform_user_id"])}, False
        if name == "user.key_rotated":
            return {int(d["user_id"])}, False
        if name == "version.created":
            model = models.get(d["repo_id"], {"visibility": "private", "grants": []})
            at = ev.time.timestamp()
            granted = {user for user, from_ts in model["grants"] if from_ts <= at}
            return {int(d["owner_id"]), *granted}, model["visibility"] == "public"
        return set(), False

    def _emails(self, ev: CloudEvent, name: str, uploads: dict[int, dict], emails: dict[int, str]) -> list[tuple]:
        d = ev.data
        out: list[tuple[str, str, tuple[str, str]]] = []
        if name == "upload.rejected":
            up = uploads.get(int(d["upload_id"]))
            if up:
                out.append(("upload_rejected", up["email"], mail.upload_rejected(d)))
        elif name in ("grant.created", "grant.revoked"):
            to = emails.get(int(d["platform_user_id"]))
            if to:
                content = mail.grant_created(d) if name == "grant.created" else mail.grant_revoked(d)
                out.append((name.replace(".", "_"), to, content))
        elif name == "user.key_rotated":
            out.append(("key_rotated", d["email"], mail.key_rotated(d)))
        return [(self._deployment, f"{kind}:{ev.id}", kind, to, s, b) for kind, to, (s, b) in out]
