"""Secrets that must be read back (webhook signing secrets) are stored encrypted, never in clear.

`SecretBox(key)` seals a string with AES-256-GCM under a 32-byte key (WEBHOOK_SECRET_KEY, base64) into
`enc:v1:<base64(nonce + ciphertext + tag)>`, and opens it again. A value without the prefix was stored in
clear by an older version: `open` returns it as it is, and `is_sealed` tells the two apart so that such
rows can be sealed in place. A wrong key, or a value altered in the database, fails to open.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PREFIX = "enc:v1:"
_AAD = b"model-registry webhook secret v1"


class SecretKeyError(ValueError):
    """The key is not base64 of 32 bytes, or a sealed value does not open with it."""


def parse_key(text: str) -> bytes:
    """The 32 bytes of a base64 (standard or URL-safe) key."""
    try:
        raw = base64.b64decode(text.strip().replace("-", "+").replace("_", "/") + "==", validate=False)
    except (binascii.Error, ValueError) as exc:
        raise SecretKeyError("the key is not base64") from exc
    if len(raw) != 32:
        raise SecretKeyError(f"the key must be 32 bytes (base64), not {len(raw)}")
    return raw


def new_key() -> str:
    """A fresh key, base64."""
    return base64.b64encode(os.urandom(32)).decode()


def is_sealed(stored: str) -> bool:
    """Whether `stored` is a sealed value (not a secret stored in clear by an older version)."""
    return stored.startswith(PREFIX)


class SecretBox:
    """Seals and opens secrets with one key."""

    def __init__(self, key: str) -> None:
        self._aead = AESGCM(parse_key(key))

    def seal(self, secret: str) -> str:
        """The stored form of `secret` (a new random nonce each time)."""
        nonce = os.urandom(12)
        return PREFIX + base64.b64encode(nonce + self._aead.encrypt(nonce, secret.encode(), _AAD)).decode()

    def open(self, stored: str) -> str:
        """The secret of a stored value (one stored in clear is returned as it is)."""
        if not is_sealed(stored):
            return stored
        try:
            blob = base64.b64decode(stored[len(PREFIX) :], validate=True)
            return self._aead.decrypt(blob[:12], blob[12:], _AAD).decode()
        except (binascii.Error, ValueError, InvalidTag) as exc:
            raise SecretKeyError("a stored secret does not open with WEBHOOK_SECRET_KEY") from exc
