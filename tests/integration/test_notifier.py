"""The notifier end to end, with real services: flows driven through the api over HTTP (its events reach
Kafka through the stack's outbox relay), verdict events published to Kafka directly, webhooks received by
real HTTP servers on loopback, e-mail by a real SMTP server (aiosmtpd) on loopback.

Our notifier runs in its own consumer group and deployment, and may reach only this run's loopback address
(LOOPBACK). The stack's notifier and any other run's notifier leave our subscriptions alone: their targets
are literal addresses outside those notifiers' allowlists, so they never queue them; and e-mail rows belong
to the deployment that queued them, so ours reach our SMTP server.
"""

from __future__ import annotations

import ipaddress
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from aiokafka import ConsumerRecord
from notifier_helpers import (
    LOOPBACK,
    Api,
    Receiver,
    ServiceProcess,
    SmtpSink,
    User,
    api_process,
    committed_offset,
    notifier_process,
    publish,
    publish_raw,
    read_topic,
    receiver,
    wait_consumer_ready,
    wait_for,
)
from standardwebhooks import Webhook

from registry_shared.events import (
    CloudEvent,
    Topics,
    UploadRejected,
    UploadVerified,
    UserKeyRotated,
    encode_event,
    make_event,
)
from registry_shared.settings import PostgresSettings

MAX_FAILURES = 8
# Quick retries for the tests: ~0.3 s apart, 30 attempts before a delivery is given up.
RETRY_SCHEDULE = ",".join(["0.2", "0.3"] + ["0.4"] * 28)


@pytest.fixture(scope="module")
def smtp() -> Iterator[SmtpSink]:
    sink = SmtpSink().start()
    try:
        yield sink
    finally:
        sink.stop()


@pytest.fixture(scope="module")
def api() -> Iterator[Api]:
    proc = api_process(allow_private="127.0.0.0/8", relay=True).start()
    client = Api(proc.url)
    try:
        yield client
    finally:
        client.close()
        proc.stop()


def _notifier(smtp: SmtpSink, group: str, deployment: str) -> ServiceProcess:
    return notifier_process(
        group,
        deployment,
        smtp.port,
        NOTIFIER_RETRY_SCHEDULE_S=RETRY_SCHEDULE,
        NOTIFIER_RETRY_JITTER="0.1",
        NOTIFIER_MAX_CONSECUTIVE_FAILURES=str(MAX_FAILURES),
    )


@pytest.fixture(scope="module")
def notifier_ids() -> tuple[str, str]:
    token = uuid.uuid4().hex[:10]
    return f"test-notifier-{token}", f"test-{token}"


@pytest.fixture(scope="module")
def notifier(smtp: SmtpSink, notifier_ids: tuple[str, str]) -> Iterator[ServiceProcess]:
    proc = _notifier(smtp, *notifier_ids).start()
    wait_consumer_ready(proc)
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def hooks(api: Api) -> Iterator[list[tuple[User, int]]]:
    """Subscriptions to delete after the test (their receivers go away with it)."""
    made: list[tuple[User, int]] = []
    yield made
    for user, webhook_id in made:
        api.unsubscribe(user, webhook_id)


def _subscribe(api: Api, hooks: list, user: User, url: str, types: list[str], **extra: object) -> dict:
    hook = api.subscribe(user, url, types, **extra)
    hooks.append((user, hook["id"]))
    return hook


def _types(r: Receiver) -> list[str]:
    return [x.event["type"].removeprefix("registry.").removesuffix(".v1") for x in r.events()]


def test_each_event_reaches_the_right_subscriber_signed(
    api: Api, notifier: ServiceProcess, smtp: SmtpSink, hooks: list
) -> None:
    dev, other_dev = api.register("Dev"), api.register("Other")
    plat, other_plat = api.create_platform_user("Plat"), api.create_platform_user("Other")
    everything = ["upload.verified", "upload.rejected", "version.created", "user.key_rotated", "grant.created"]
    with (
        receiver() as r_dev,
        receiver() as r_other_dev,
        receiver() as r_plat,
        receiver() as r_other_plat,
    ):
        h_dev = _subscribe(api, hooks, dev, r_dev.url, everything)
        _subscribe(api, hooks, other_dev, r_other_dev.url, everything)
        plat_types = ["grant.created", "grant.revoked", "version.created", "user.key_rotated"]
        h_plat = _subscribe(api, hooks, plat, r_plat.url, plat_types)
        _subscribe(api, hooks, other_plat, r_other_plat.url, plat_types)

        repo = api.create_model(dev)
        api.create_version(dev, repo, "v1")  # dev only: nobody is granted yet
        ok = api.initiate_upload(dev, repo, "v1", "model.safetensors")
        bad = api.initiate_upload(dev, repo, "v1", "weights.bin")
        sha = "0" * 64
        publish(
            UploadVerified(
                upload_id=ok["upload_id"],
                repo_id=repo,
                version="v1",
                rfilename="model.safetensors",
                object_key=ok["object_key"],
                size=10,
                sha256=sha,
            ),
            UploadRejected(
                upload_id=bad["upload_id"],
                repo_id=repo,
                version="v1",
                rfilename="weights.bin",
                object_key=bad["object_key"],
                reason="sha256_mismatch",
                detail="declared 00…, stored ff…",
            ),
        )
        # Routing happens once per event: with v1 delivered to dev, nobody else will be considered for it.
        wait_for(lambda: r_dev.events("registry.version.created.v1"), 30, "version v1 at the developer")
        grant = api.grant(plat, repo)
        api.create_version(dev, repo, "v2")  # dev and the granted platform user
        # A version event reaches a platform user only while the grant is in force when it is routed.
        wait_for(lambda: r_plat.events("registry.version.created.v1"), 30, "version v2 at the platform user")
        api.revoke(grant["grant_id"])
        api.create_version(dev, repo, "v3")  # dev only again
        api.rotate_key(dev)

        want_dev = [
            "version.created",
            "upload.verified",
            "upload.rejected",
            "version.created",
            "version.created",
            "user.key_rotated",
        ]
        wait_for(lambda: len(r_dev.events()) >= len(want_dev), 30, "the developer's webhooks")
        wait_for(lambda: len(r_plat.events()) >= 3, 30, "the platform user's webhooks")
        wait_for(lambda: len(smtp.to(dev.email)) >= 2 and len(smtp.to(plat.email)) >= 2, 30, "the e-mails")
        time.sleep(0.5)  # a straggler would arrive by now; then count exactly
        assert sorted(_types(r_dev)) == sorted(want_dev)
        # Per model, in order: the three versions of `repo` arrive as they were created.
        versions = [x.event["data"]["version"] for x in r_dev.events("registry.version.created.v1")]
        assert versions == ["v1", "v2", "v3"]
        assert _types(r_plat) == ["grant.created", "version.created", "grant.revoked"]
        assert r_plat.events("registry.version.created.v1")[0].event["data"]["version"] == "v2"
        assert r_other_dev.events() == [] and r_other_plat.events() == []

        # Standard Webhooks: each delivery verifies with the subscription's secret, and only with it.
        for rec, hook in ((r_dev, h_dev), (r_plat, h_plat)):
            for x in rec.events():
                assert Webhook(hook["secret"]).verify(x.body, x.headers)["id"] == x.event["id"]
                assert x.headers["webhook-id"].startswith("msg_")
                assert x.event["specversion"] == "1.0" and x.headers["content-type"] == "application/json"
        with pytest.raises(Exception, match="signature"):
            Webhook(h_plat["secret"]).verify(r_dev.events()[0].body, r_dev.events()[0].headers)

        # The delivery log tells the same story.
        log = api.deliveries(dev, h_dev["id"])
        assert len(log) == len(want_dev)
        assert all(d["status"] == "delivered" and d["last_status_code"] == 204 for d in log)
        assert {d["message_id"] for d in log} == {x.headers["webhook-id"] for x in r_dev.events()}

    subjects = {m["Subject"] for m in smtp.to(dev.email)}
    assert subjects == {f"Upload rejected: {repo} v1/weights.bin (sha256_mismatch)", "Your API key was rotated"}
    rejected = next(m for m in smtp.to(dev.email) if m["Subject"].startswith("Upload rejected"))
    assert "Reason: sha256_mismatch" in rejected.get_content()
    assert {m["Subject"] for m in smtp.to(plat.email)} == {f"Model granted: {repo}", f"Grant revoked: {repo}"}
    assert smtp.to(other_dev.email) == [] and smtp.to(other_plat.email) == []


def test_a_redelivered_event_keeps_its_webhook_id(api: Api, notifier: ServiceProcess, hooks: list) -> None:
    dev = api.register("Dev")
    repo = api.create_model(dev)
    api.create_version(dev, repo, "v1")
    up = api.initiate_upload(dev, repo, "v1", "a.safetensors")
    with receiver() as r:
        hook = _subscribe(api, hooks, dev, r.url, ["upload.verified"])
        verified = UploadVerified(
            upload_id=up["upload_id"],
            repo_id=repo,
            version="v1",
            rfilename="a.safetensors",
            object_key=up["object_key"],
            size=1,
            sha256="1" * 64,
        )
        (event,) = publish(verified)
        wait_for(lambda: r.events(), 20, "the first delivery")
        publish(events=[event])  # Kafka hands the same event (same id) over again
        (marker,) = publish(verified)  # a different event after it: once it is here, the duplicate was seen
        wait_for(lambda: marker.id in r.event_ids(), 20, "the marker event")
        assert r.event_ids() == [event.id, marker.id]
        first = r.events()[0]
        # Redeliver from the log: the same event, the same webhook-id.
        log = {d["event_id"]: d for d in api.deliveries(dev, hook["id"])}
        resp = api.http.post(
            f"/v1/webhooks/{hook['id']}/deliveries/{log[event.id]['id']}/redeliver", headers=dev.headers
        )
        assert resp.status_code == 202, resp.text
        wait_for(lambda: len(r.events()) == 3, 20, "the redelivery")
        again = r.events()[2]
        assert again.event["id"] == event.id and again.headers["webhook-id"] == first.headers["webhook-id"]
        detail = api.http.get(f"/v1/webhooks/{hook['id']}/deliveries/{log[event.id]['id']}", headers=dev.headers)
        assert [a["status_code"] for a in detail.json()["attempt_log"]] == [204, 204]


def test_a_receiver_down_for_a_while_gets_everything_in_order_per_model(
    api: Api, smtp: SmtpSink, notifier: ServiceProcess, notifier_ids: tuple[str, str], hooks: list
) -> None:
    dev = api.register("Dev")
    repos = [api.create_model(dev), api.create_model(dev)]
    r = Receiver().start()
    hook = _subscribe(api, hooks, dev, r.url, ["version.created"])
    r.stop()  # down: connections are refused
    try:
        for i in range(1, 4):
            for repo in repos:
                api.create_version(dev, repo, f"v{i}")

        def failed_attempts() -> bool:
            log = api.deliveries(dev, hook["id"])
            return len(log) == 6 and any(d["attempts"] >= 2 and d["last_error"] for d in log)

        wait_for(failed_attempts, 20, "failed attempts while the receiver is down")
        # The notifier restarts meanwhile: the pending deliveries are in Postgres, not in its memory.
        notifier.stop()
        notifier.start()
        wait_consumer_ready(notifier)
        r.start()  # back on the same port
        wait_for(lambda: len(r.events()) >= 6, 30, "every event once the receiver is back")
        for repo in repos:
            got = [x.event["data"]["version"] for x in r.events() if x.event["data"]["repo_id"] == repo]
            assert got == ["v1", "v2", "v3"], (repo, got)
        log = api.deliveries(dev, hook["id"])
        assert all(d["status"] == "delivered" for d in log)
        first = min(log, key=lambda d: d["id"])
        assert first["attempts"] >= 2
        detail = api.http.get(f"/v1/webhooks/{hook['id']}/deliveries/{first['id']}", headers=dev.headers).json()
        assert detail["attempt_log"][0]["status_code"] is None and "Connect" in detail["attempt_log"][0]["error"]
        assert detail["attempt_log"][-1]["status_code"] == 204
        assert api.webhook(dev, hook["id"])["enabled"] is True
    finally:
        r.stop()


def test_a_subscription_that_keeps_failing_is_disabled_and_its_owner_emailed(
    api: Api, notifier: ServiceProcess, smtp: SmtpSink, hooks: list
) -> None:
    dev = api.register("Dev")
    with receiver(status=500) as r:
        hook = _subscribe(api, hooks, dev, r.url, ["version.created"])
        for _ in range(3):
            repo = api.create_model(dev)
            api.create_version(dev, repo, "v1")
        wait_for(lambda: not api.webhook(dev, hook["id"])["enabled"], 30, "the webhook to be disabled")
        state = api.webhook(dev, hook["id"])
        assert state["consecutive_failures"] >= MAX_FAILURES
        assert "consecutive failed delivery attempts" in state["disabled_reason"]
        assert "HTTP 500" in state["disabled_reason"]
        mails = wait_for(lambda: smtp.to(dev.email), 20, "the e-mail to the owner")
        assert mails[0]["Subject"] == f"Webhook {hook['id']} disabled"
        assert r.url in mails[0].get_content()
        # Disabled: nothing more is attempted.
        seen = len(r.events())
        assert seen >= MAX_FAILURES
        time.sleep(1.0)
        assert len(r.events()) == seen
        log = api.deliveries(dev, hook["id"])
        assert all(d["last_status_code"] == 500 for d in log if d["attempts"])
        # The owner fixes the receiver and re-enables the webhook: the kept deliveries go out.
        r.status = 204
        resp = api.http.patch(f"/v1/webhooks/{hook['id']}", headers=dev.headers, json={"enabled": True})
        assert resp.status_code == 200 and resp.json()["consecutive_failures"] == 0
        wait_for(
            lambda: all(d["status"] == "delivered" for d in api.deliveries(dev, hook["id"])),
            20,
            "the kept deliveries after re-enabling",
        )
        assert len({x.event["id"] for x in r.events()}) == 3


def test_an_ssrf_target_is_refused_at_delivery(api: Api, notifier: ServiceProcess, hooks: list) -> None:
    """The api (allowing 127.0.0.0/8) accepts a host name (an address written as one number) that resolves
    to another loopback address; the notifier, whose allowlist is only LOOPBACK/32, resolves it before
    sending and refuses: nothing reaches the target."""
    dev = api.register("Dev")
    other = ipaddress.IPv4Address(LOOPBACK) + 1
    with receiver(host=str(other)) as target, receiver() as control:
        hidden = _subscribe(api, hooks, dev, f"http://{int(other)}:{target.port}/hook", ["user.key_rotated"])
        _subscribe(api, hooks, dev, control.url, ["user.key_rotated"])
        api.rotate_key(dev)
        wait_for(lambda: control.events(), 20, "the allowed delivery")

        def refused() -> dict | None:
            log = api.deliveries(dev, hidden["id"])
            return log[0] if log and log[0]["last_error"] else None

        d = wait_for(refused, 20, "the refused attempt")
        assert d["last_status_code"] is None
        assert "refused" in d["last_error"] and str(other) in d["last_error"]
        assert target.events() == []


def test_emails_are_not_duplicated_on_a_replayed_event(
    api: Api, notifier: ServiceProcess, smtp: SmtpSink, notifier_ids: tuple[str, str]
) -> None:
    dev = api.register("Dev")
    repo = api.create_model(dev)
    api.create_version(dev, repo, "v1")
    up = api.initiate_upload(dev, repo, "v1", "x.bin")
    rejected = UploadRejected(
        upload_id=up["upload_id"],
        repo_id=repo,
        version="v1",
        rfilename="x.bin",
        object_key=up["object_key"],
        reason="size_mismatch",
    )
    (event,) = publish(rejected)
    wait_for(lambda: smtp.to(dev.email), 20, "the e-mail")
    publish(events=[event])  # the same event again
    second = api.initiate_upload(dev, repo, "v1", "y.bin")
    publish(rejected.model_copy(update={"upload_id": second["upload_id"], "rfilename": "y.bin"}))
    # Same model, same partition: once the e-mail about y.bin is here, the replay has been consumed.
    wait_for(lambda: len(smtp.to(dev.email)) >= 2, 20, "the e-mail about the second upload")
    time.sleep(0.3)
    subjects = sorted(m["Subject"] for m in smtp.to(dev.email))
    assert subjects == [
        f"Upload rejected: {repo} v1/x.bin (size_mismatch)",
        f"Upload rejected: {repo} v1/y.bin (size_mismatch)",
    ]
    with psycopg.connect(PostgresSettings().database_url) as conn:
        n = conn.execute(
            "select count(*) from notifier_emails where deployment = %s and dedupe_key = %s",
            [notifier_ids[1], f"upload_rejected:{event.id}"],
        ).fetchone()[0]
    assert n == 1


def test_an_event_with_a_bad_payload_does_not_stop_the_flow(api: Api, notifier: ServiceProcess, hooks: list) -> None:
    dev = api.register("Dev")
    with receiver() as r:
        _subscribe(api, hooks, dev, r.url, ["user.key_rotated"])
        bad = CloudEvent(
            source="/tests/notifier", type=UserKeyRotated.event_type, subject=f"user:{dev.user_id}", data={"x": 1}
        )
        publish(events=[bad])
        api.rotate_key(dev)  # same key, same partition: after the bad event
        wait_for(lambda: r.events(), 20, "the event after the bad one")
        assert [x.event["type"] for x in r.events()] == [UserKeyRotated.event_type]
        assert bad.id not in r.event_ids()


def test_poison_events_are_dead_lettered_and_the_next_one_delivered(
    api: Api, notifier: ServiceProcess, notifier_ids: tuple[str, str], hooks: list
) -> None:
    """Each kind of poison, then a good event on the same partition (same key): every poison lands in the
    dead-letter topic with its error and source, the good one is delivered, and the group's committed offset
    moves past both."""
    group = notifier_ids[0]
    dev = api.register("Dev")
    key = f"user:{dev.user_id}".encode()
    rotated = UserKeyRotated(user_id=dev.user_id, email=dev.email, key_prefix="sk_live_test", rotated_ts=1)
    nobody = 2**62
    poisons = [
        (b"\xff not json {", "PermanentError: not a CloudEvent: invalid JSON"),
        (
            encode_event(CloudEvent(source="/t", type=UserKeyRotated.event_type, subject=key.decode(), data={"x": 1})),
            "PermanentError: registry.user.key_rotated.v1: user_id: Field required",
        ),
        (encode_event(make_event(rotated, source="/t", id="not-a-uuid")), "event id is not a UUID: 'not-a-uuid'"),
        (
            encode_event(make_event(rotated.model_copy(update={"user_id": nobody}), source="/t")),
            "MissingReference: registry.user.key_rotated.v1",
        ),
    ]
    with receiver() as r:
        _subscribe(api, hooks, dev, r.url, ["user.key_rotated"])
        placed = publish_raw(Topics.USERS, [(value, key) for value, _ in poisons])
        api.rotate_key(dev)  # the good event: same key, same partition, after the poisons
        wait_for(lambda: r.events(), 30, "the key rotation after the poisons")
        assert [x.event["type"] for x in r.events()] == [UserKeyRotated.event_type]
        assert r.events()[0].event["data"]["user_id"] == dev.user_id

    def ours(rec: ConsumerRecord) -> bool:
        return rec.key == key and dict(rec.headers).get("consumer_group") == group.encode()

    letters = wait_for(lambda: (got := read_topic(Topics.DEAD_LETTER, ours)) and len(got) >= 4 and got, 30, "4")
    assert [x.value for x in letters] == [value for value, _ in poisons]
    for letter, (_, error), (partition, offset) in zip(letters, poisons, placed, strict=True):
        headers = {k: v.decode() for k, v in letter.headers}
        assert error in headers["error"], headers["error"]
        assert headers["source_topic"] == Topics.USERS
        assert (int(headers["source_partition"]), int(headers["source_offset"])) == (partition, offset)
        assert headers["consumer"] == "notifier-events"
    assert f"user {nobody} does not exist" in dict(letters[3].headers)["error"].decode()

    partition = placed[0][0]
    good = read_topic(Topics.USERS, lambda rec: rec.key == key and rec.partition == partition)[-1]
    assert good.offset > placed[-1][1] and b"registry.user.key_rotated.v1" in good.value
    wait_for(
        lambda: committed_offset(group, Topics.USERS, partition) > good.offset,
        30,
        "the group's committed offset to move past the poisons and the good event",
    )
    health = notifier.health()
    assert health["ok"] is True
    assert health["consumers"]["notifier-events"]["dead_lettered"] >= 4
    assert health["consumers"]["notifier-events"]["state"] == "ok"


def test_health_lists_the_consumer_and_the_workers(notifier: ServiceProcess) -> None:
    consumers = notifier.health()["consumers"]
    assert {"notifier-events", "notifier-offsets", "notifier-delivery", "notifier-mail"} <= set(consumers)
    assert all(c["state"] in ("ok", "starting") for c in consumers.values()), consumers


def test_the_notifier_records_its_own_migrations() -> None:
    with psycopg.connect(PostgresSettings().database_url) as conn:
        rows = conn.execute("select name, checksum from notifier_schema_migrations").fetchall()
    assert [r[0] for r in rows] == ["0001_notifier_tables.sql"]
    assert rows[0][1] is not None


def test_an_event_with_a_binary_kafka_header_is_delivered(api: Api, notifier: ServiceProcess, hooks: list) -> None:
    dev = api.register("Dev")
    with receiver() as r:
        _subscribe(api, hooks, dev, r.url, ["user.key_rotated"])
        rotated = UserKeyRotated(user_id=dev.user_id, email=dev.email, key_prefix="sk_live_test", rotated_ts=1)
        event = make_event(rotated, source="/tests/notifier", subject=f"user:{dev.user_id}")
        publish(events=[event], headers=[("trace", b"\xff\xfe not UTF-8")])
        api.rotate_key(dev)  # and one without a header after it
        wait_for(lambda: len(r.events()) == 2, 20, "both key rotations")
        assert r.event_ids()[0] == event.id


def test_a_retried_version_event_is_withheld_once_the_grant_is_revoked(
    api: Api, notifier: ServiceProcess, hooks: list
) -> None:
    dev, plat = api.register("Dev"), api.create_platform_user("Plat")
    repo = api.create_model(dev)
    r = Receiver().start()
    hook = _subscribe(api, hooks, plat, r.url, ["version.created", "grant.revoked"])
    grant = api.grant(plat, repo)
    r.stop()  # the platform user's receiver is down
    try:
        api.create_version(dev, repo, "v1")  # visible to the platform user now: queued for it
        wait_for(lambda: any(d["attempts"] >= 1 for d in api.deliveries(plat, hook["id"])), 20, "a failed attempt")
        api.revoke(grant["grant_id"])
        r.start()
        wait_for(lambda: r.events("registry.grant.revoked.v1"), 20, "the revocation, after the version event")
        assert [x.event["type"] for x in r.events()] == ["registry.grant.revoked.v1"]
        (version,) = [d for d in api.deliveries(plat, hook["id"]) if d["event_type"] == "registry.version.created.v1"]
        assert version["status"] == "failed" and version["last_error"].startswith("withheld")
        assert api.webhook(plat, hook["id"])["consecutive_failures"] == 0
    finally:
        r.stop()
