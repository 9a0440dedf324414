"""Webhook signing secrets at rest: sealed with AES-GCM, opened only with the same key."""

from __future__ import annotations

import base64

import pytest

from registry_shared.secretbox import PREFIX, SecretBox, SecretKeyError, is_sealed, new_key, parse_key

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def test_a_sealed_secret_opens_with_its_key_only():
    box = SecretBox(new_key())
    stored = box.seal(SECRET)
    assert stored.startswith(PREFIX) and is_sealed(stored) and SECRET not in stored
    assert box.open(stored) == SECRET
    assert box.seal(SECRET) != stored  # a new nonce each time
    with pytest.raises(SecretKeyError):
        SecretBox(new_key()).open(stored)


def test_an_altered_value_does_not_open():
    box = SecretBox(new_key())
    stored = box.seal(SECRET)
    tampered = stored[:-6] + ("A" if stored[-6] != "A" else "B") + stored[-5:]
    for bad in (tampered, PREFIX + "not base64!", PREFIX):
        with pytest.raises(SecretKeyError):
            box.open(bad)


def test_a_secret_stored_in_clear_by_an_older_version_reads_as_it_is():
    assert not is_sealed(SECRET)
    assert SecretBox(new_key()).open(SECRET) == SECRET


@pytest.mark.parametrize("key", ["", "c2hvcnQ=", "not base64 at all", "A" * 60])
def test_a_key_must_be_32_bytes_of_base64(key):
    with pytest.raises(SecretKeyError):
        parse_key(key)


def test_urlsafe_and_standard_base64_keys_are_the_same_key():
    raw = bytes(range(250, 256)) * 5 + b"\xfb\xff"
    std, url = base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()
    assert std != url and parse_key(std) == parse_key(url) == raw
    assert SecretBox(url).open(SecretBox(std).seal(SECRET)) == SECRET
