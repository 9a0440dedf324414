"""Pure logic of the notifier: the SSRF guard (with a stand-in resolver, to play DNS rebinding), the retry
schedule, message ids, signatures, e-mail texts, and which consumed records become events to route."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime
from typing import get_args

import pytest
from aiokafka import ConsumerRecord, TopicPartition
from standardwebhooks import Webhook

from registry_notifier import mail
from registry_notifier.consumer import OffsetCommitter, decode_records
from registry_notifier.delivery import retry_delay, sign
from registry_notifier.repository import message_id
from registry_notifier.routing import Router
from registry_notifier.settings import DEFAULT_RETRY_SCHEDULE, NotifierSettings
from registry_shared.events import (
    EVENT_TYPES,
    CloudEvent,
    GrantRevoked,
    UploadVerified,
    UserKeyRotated,
    UserRegistered,
    VersionCreated,
    encode_event,
    make_event,
)
from registry_shared.webhooks import (
    SUBSCRIBABLE_EVENTS,
    SUBSCRIPTION_NAME_OF,
    SubscriptionName,
    TargetGuard,
    TargetRefused,
    address_allowed,
    parse_networks,
    statically_allowed,
)


def _resolver(answers: dict[str, list[str]]):
    async def resolve(host: str, port: int) -> list[str]:
        if host not in answers:
            raise OSError("no such host")
        return answers[host]

    return resolve


@pytest.mark.parametrize(
    ("ip", "allowed"),
    [
        ("93.184.216.34", True),
        ("2606:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.0.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),  # noqa: S104
        ("224.0.0.1", False),
        ("::1", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("::ffff:10.0.0.1", False),
        ("::ffff:93.184.216.34", True),
    ],
)
def test_only_public_addresses_by_default(ip: str, allowed: bool) -> None:
    assert address_allowed(ipaddress.ip_address(ip), []) is allowed


def test_the_allowlist_opens_exactly_its_networks() -> None:
    nets = parse_networks("127.0.0.1/32, 10.0.0.0/8")
    assert address_allowed(ipaddress.ip_address("127.0.0.1"), nets)
    assert address_allowed(ipaddress.ip_address("10.9.9.9"), nets)
    assert not address_allowed(ipaddress.ip_address("127.0.0.2"), nets)
    assert not address_allowed(ipaddress.ip_address("192.168.1.1"), nets)


def test_static_check_leaves_names_to_delivery_time() -> None:
    nets = parse_networks("127.0.0.1/32")
    assert statically_allowed("http://127.0.0.1:9000/x", nets)
    assert not statically_allowed("http://127.0.0.2:9000/x", nets)
    assert not statically_allowed("http://[::1]/x", nets)
    assert statically_allowed("https://hooks.example.com/x", nets)
    assert not statically_allowed("ftp://hooks.example.com/x", nets)
    assert not statically_allowed("http://u:p@hooks.example.com/x", nets)


async def test_dns_rebinding_is_refused_at_delivery() -> None:
    guard = TargetGuard([], _resolver({"evil.example": ["93.184.216.34", "169.254.169.254"]}), cache_s=0)
    with pytest.raises(TargetRefused, match=r"169\.254\.169\.254"):
        await guard.pin("https://evil.example/hook")
    guard = TargetGuard([], _resolver({"inside.example": ["10.0.0.5"]}), cache_s=0)
    with pytest.raises(TargetRefused, match="not a public address"):
        await guard.pin("http://inside.example/hook")
    with pytest.raises(TargetRefused, match="cannot resolve"):
        await guard.pin("http://unknown.example/hook")


async def test_a_public_name_is_pinned_to_the_checked_address() -> None:
    guard = TargetGuard([], _resolver({"hooks.example.com": ["93.184.216.34"]}), cache_s=0)
    pinned = await guard.pin("https://hooks.example.com:8443/in?x=1")
    assert pinned.url == "https://93.184.216.34:8443/in?x=1"
    assert pinned.host_header == "hooks.example.com:8443"
    assert pinned.sni_hostname == "hooks.example.com"
    plain = await guard.pin("http://hooks.example.com/")
    assert plain.url == "http://93.184.216.34:80/" and plain.host_header == "hooks.example.com"
    assert plain.sni_hostname is None


def test_retry_schedule_with_jitter_then_give_up() -> None:
    delays = NotifierSettings().retry_delays
    assert delays == [float(x) for x in DEFAULT_RETRY_SCHEDULE.split(",")]
    assert sum(delays) > 12 * 3600  # retried over hours
    for attempts, base in enumerate(delays, start=1):
        d = retry_delay(delays, attempts, 0.2)
        assert d is not None and base * 0.8 <= d <= base
    assert retry_delay(delays, len(delays) + 1, 0.2) is None


def test_message_id_is_stable_per_webhook_and_event() -> None:
    ev = "0b9b0c1e-7f3a-4a59-9a8e-2f1f3c1d2e4f"
    assert message_id(7, ev) == message_id(7, ev)
    assert message_id(7, ev) != message_id(8, ev)
    assert message_id(7, ev).startswith("msg_")


def test_signature_verifies_with_the_standard_library() -> None:
    secret = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    now = datetime.now(UTC)
    body = '{"id":"1","type":"registry.upload.verified.v1"}'
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(int(now.timestamp()))}
    headers["webhook-signature"] = sign(secret, "msg_1", now, body)
    assert Webhook(secret).verify(body, headers) == {"id": "1", "type": "registry.upload.verified.v1"}


def test_email_texts() -> None:
    subject, body = mail.upload_rejected(
        {
            "upload_id": 3,
            "repo_id": "acme/bert",
            "version": "v1",
            "rfilename": "m.bin",
            "reason": "size_mismatch",
            "detail": "declared 10, stored 9",
        }
    )
    assert subject == "Upload rejected: acme/bert v1/m.bin (size_mismatch)"
    assert "Reason: size_mismatch" in body and "declared 10, stored 9" in body
    subject, body = mail.grant_created(
        {"grant_id": 1, "repo_id": "acme/bert", "permitted_from_ts": 0, "permitted_until_ts": None}
    )
    assert subject == "Model granted: acme/bert" and "1970-01-01 00:00:00 UTC" in body
    assert mail.key_rotated({"rotated_ts": 0, "key_prefix": "abc"})[0] == "Your API key was rotated"
    assert "PATCH /v1/webhooks/5" in mail.webhook_disabled(5, "https://x", "boom")[1]


def _event(data: object, at: float) -> CloudEvent:
    return make_event(data, source="/tests", time=datetime.fromtimestamp(at, UTC))  # type: ignore[arg-type]


def test_who_may_receive_what() -> None:
    router = Router([], "test", email_enabled=True)
    t = 1_700_000_000.0
    uploads = {5: {"developer_id": 11, "email": "dev@example.com"}}
    models = {"acme/bert": {"visibility": "private", "grants": [(21, t - 100), (22, t + 100)]}}
    version = _event(VersionCreated(repo_id="acme/bert", version="v2", owner_id=11), t)
    # the owner, and the platform user whose grant started before the event; not the one granted later
    assert router._audience(version, "version.created", uploads, models) == ({11, 21}, False)
    public = {"acme/bert": {"visibility": "public", "grants": []}}
    assert router._audience(version, "version.created", uploads, public) == ({11}, True)
    verified = _event(
        UploadVerified(
            upload_id=5, repo_id="acme/bert", version="v2", rfilename="m", object_key="k", size=1, sha256="0" * 64
        ),
        t,
    )
    assert router._audience(verified, "upload.verified", uploads, models) == ({11}, False)
    unknown = _event(
        UploadVerified(
            upload_id=6, repo_id="acme/bert", version="v2", rfilename="m", object_key="k", size=1, sha256="0" * 64
        ),
        t,
    )
    assert router._audience(unknown, "upload.verified", uploads, models) == (set(), False)
    grant = _event(GrantRevoked(grant_id=1, platform_user_id=21, repo_id="acme/bert", permitted_from_ts=0), t)
    assert router._audience(grant, "grant.revoked", uploads, models) == ({21}, False)
    rotated = _event(UserKeyRotated(user_id=11, email="dev@example.com", key_prefix="abc", rotated_ts=1), t)
    assert router._audience(rotated, "user.key_rotated", uploads, models) == ({11}, False)
    # e-mails: grant revoked to the platform user, key rotated to the account, deduplicated per event
    mails = router._emails(grant, "grant.revoked", uploads, {21: "plat@example.com"})
    assert [(m[1], m[2], m[3]) for m in mails] == [(f"grant_revoked:{grant.id}", "grant_revoked", "plat@example.com")]
    assert router._emails(rotated, "user.key_rotated", uploads, {})[0][3] == "dev@example.com"
    assert router._emails(verified, "upload.verified", uploads, {}) == []


async def test_the_api_check_refuses_what_the_notifier_would_refuse() -> None:
    guard = TargetGuard(parse_networks("127.0.0.1/32"), _resolver({"inside.example": ["10.0.0.5"]}), cache_s=0)
    with pytest.raises(TargetRefused, match=r"^10\.1\.2\.3 is not a public address"):
        await guard.check("http://10.1.2.3/x")
    with pytest.raises(TargetRefused, match=r"^inside\.example resolves to 10\.0\.0\.5, which is not a public"):
        await guard.check("http://inside.example/x")
    with pytest.raises(TargetRefused, match="must be http or https"):
        await guard.check("ftp://hooks.example.com/x")
    assert [str(ip) for ip in await guard.check("http://127.0.0.1:9/x")] == ["127.0.0.1"]


def test_the_subscribable_types_are_one_list() -> None:
    assert set(get_args(SubscriptionName)) == {e.name for e in SUBSCRIBABLE_EVENTS}
    assert all(SUBSCRIPTION_NAME_OF[e.cloudevents_type] == e.name for e in SUBSCRIBABLE_EVENTS)
    assert all(t in EVENT_TYPES for t in SUBSCRIPTION_NAME_OF)  # every one is a published event type


def _record(offset: int, value: bytes, partition: int = 0) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        topic="registry.users.v1",
        partition=partition,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=None,
        value=value,
        checksum=None,
        serialized_key_size=0,
        serialized_value_size=len(value),
        headers=[],
    )


def test_a_batch_keeps_readable_subscribable_events_and_sets_poison_apart() -> None:
    rotated = make_event(UserKeyRotated(user_id=1, email="a@example.com", key_prefix="abc", rotated_ts=1), source="/t")
    bad = CloudEvent(source="/t", type=UserKeyRotated.event_type, subject="user:1", data={"x": 1})
    other = make_event(UserRegistered(user_id=2, email="b@example.com", name="B", role="developer"), source="/t")
    not_uuid = rotated.model_copy(update={"id": "42"})
    values = [encode_event(bad), encode_event(other), encode_event(rotated), b"\xff not json", encode_event(not_uuid)]
    decoded = decode_records([_record(offset, value) for offset, value in enumerate(values)])
    assert [i.event.id for i in decoded.items] == [rotated.id]
    assert decoded.items[0].raw == encode_event(rotated).decode()
    assert decoded.items[0].record.offset == 2  # what a dead letter of it would carry
    # Unsubscribable but valid (user.registered): consumed, neither routed nor dead-lettered.
    assert [(r.offset, error.split(":")[0]) for r, error in decoded.poison] == [
        (0, "PermanentError"),
        (3, "PermanentError"),
        (4, "PermanentError"),
    ]
    assert "event id is not a UUID" in decoded.poison[2][1]


class _Consumer:
    """Stands in for the Kafka consumer in front of the committer: its assignment and the commits asked."""

    def __init__(self, assigned: set[TopicPartition]) -> None:
        self.assigned = assigned
        self.commits: list[dict[TopicPartition, int]] = []

    def assignment(self) -> set[TopicPartition]:
        return self.assigned

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(dict(offsets))


async def test_stored_positions_are_committed_together_and_only_while_assigned() -> None:
    p0, p1, gone = (TopicPartition("registry.users.v1", p) for p in (0, 1, 2))
    consumer = _Consumer({p0, p1})
    committer = OffsetCommitter(lambda: consumer)  # type: ignore[arg-type,return-value]  # a stand-in
    await committer.flush()
    assert consumer.commits == []  # nothing stored, nothing committed
    committer.stored({p0: 8, p1: 3})
    committer.stored({p0: 6, p1: 10, gone: 4})  # noted meanwhile: committed with the others, never backwards
    await committer.flush()
    assert consumer.commits == [{p0: 8, p1: 10}]  # a partition no longer assigned is left to its new owner
    await committer.flush()
    assert len(consumer.commits) == 1
