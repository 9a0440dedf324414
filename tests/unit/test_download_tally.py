"""The download counter's pure part (catalog.service.tally_downloads): downloads per model, and the messages
that are not valid events, each with the reason it is dead-lettered."""

from __future__ import annotations

import json

from registry_api.catalog.service import downloads_of, tally_downloads
from registry_shared.events import FileAccessed, UserRegistered, encode_event, make_event


def event(kind: str = "download", repo: str | None = "acme/bert", **fields) -> bytes:
    return encode_event(make_event(FileAccessed(user_id=7, kind=kind, repo_id=repo, ts=1.0), source="/t", **fields))


def test_downloads_are_counted_and_poison_is_named():
    usual = [event(), event(), event(repo="acme/gpt"), event("manifest"), event(repo=None)]
    loose = json.loads(event())
    loose["data"]["user_id"] = "7"  # the shared model coerces it: valid, through the slow path
    other = encode_event(make_event(UserRegistered(user_id=1, email="a@b.c", name="A", role="admin"), source="/t"))
    poison = {
        5: b"not json",
        6: event(id="not-a-uuid"),
        7: event().replace(b'"download"', b'"teleport"'),
        8: None,
        9: json.dumps({**json.loads(event()), "data": {"kind": "download"}}).encode(),
        10: event(repo="acme/\x00bert"),
    }
    values = [*usual, *poison.values(), json.dumps(loose).encode(), other]
    tally = tally_downloads(values)
    assert tally.counts == {"acme/bert": 3, "acme/gpt": 1}
    assert set(tally.invalid) == set(poison)
    assert "UUID" in tally.invalid[6] and "kind" in tally.invalid[7] and "NUL" in tally.invalid[10]
    assert all(reason.startswith("PermanentError: ") for reason in tally.invalid.values())
    assert downloads_of(values, {"acme/gpt"}) == {2: "acme/gpt"}
