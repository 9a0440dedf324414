"""The api's one rule for incoming text (registry_api.kit.text)."""

from __future__ import annotations

import pytest

from registry_api.kit.text import (
    INVALID_JSON,
    NUL_MESSAGE,
    SURROGATE_MESSAGE,
    body_problem,
    is_json,
    query_problem,
    unstorable_at,
)


def test_unstorable_text_is_found_at_any_depth_in_values_and_keys():
    assert unstorable_at({"a": [1, {"b": "x\x00"}]}) == ("a.1.b", NUL_MESSAGE)
    assert unstorable_at({"a\x00": 1}) == ("a\x00", NUL_MESSAGE)
    assert unstorable_at(["ok", "n\x00"]) == ("1", NUL_MESSAGE)
    assert unstorable_at("\x00") == ("body", NUL_MESSAGE)
    assert unstorable_at({"a": "\ud800"}) == ("a", SURROGATE_MESSAGE)
    assert unstorable_at({"a": ["fine", 1, None, True, {"b": "é\\u0000 😀"}]}) is None  # an escaped backslash


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b'{"name": "a\\u0000b"}', f"name: {NUL_MESSAGE}"),
        (b'{"a\\u0000": 1}', f"a?: {NUL_MESSAGE}"),
        (b'{"name": "x\\ud800"}', f"name: {SURROGATE_MESSAGE}"),
        (b'{"\\udfff": 1}', f"?: {SURROGATE_MESSAGE}"),
        (b'{"name": "\\ud83d\\ude00"}', None),  # a surrogate pair is one character
        (b'{"name": "\xff"}', INVALID_JSON),
        ('{"a": 1}'.encode("utf-16"), INVALID_JSON),
        (b"\xef\xbb\xbf{}", INVALID_JSON),
        (b"[" * 50_000, INVALID_JSON),
        (b'{"n": ' + b"9" * 5000 + b"}", INVALID_JSON),  # beyond Python's int conversion limit
        (b'{"name": "a\\\\u0000b"}', None),  # a backslash then "u0000": no NUL
        (b'{"name": "\xc3\xa9"}', None),
    ],
)
def test_body_problem(body, problem):
    assert body_problem(body) == problem


def test_query_problem():
    assert query_problem(b"q=a%00b&limit=1") == f"q: {NUL_MESSAGE}"
    assert query_problem(b"a%00=1") == f"a?: {NUL_MESSAGE}"
    assert query_problem(b"q=a%2500b") is None  # "%2500" is the text "%00"
    assert query_problem(b"q=plain") is None


@pytest.mark.parametrize(
    ("ctype", "json"),
    [
        ("application/json", True),
        ("Application/JSON; charset=utf-8", True),
        ("application/merge-patch+json", True),
        ("text/plain", False),
        ("", False),
        ("multipart/form-data; boundary=x", False),
    ],
)
def test_is_json(ctype, json):
    assert is_json(ctype) is json
