"""How the api cuts a file into parts under S3's rules, and the multipart ETag it predicts."""

from __future__ import annotations

import hashlib

import pytest

from registry_api.errors import Unprocessable
from registry_api.uploads.service import DEFAULT_PART_SIZE, part_length, plan_parts
from registry_api.uploads.storage import multipart_etag

MIB = 1024 * 1024


@pytest.mark.parametrize(
    ("size", "part_size", "expected"),
    [
        (1, None, (DEFAULT_PART_SIZE, 1)),
        (DEFAULT_PART_SIZE, None, (DEFAULT_PART_SIZE, 1)),
        (DEFAULT_PART_SIZE + 1, None, (DEFAULT_PART_SIZE, 2)),
        (150 * 1024**3, None, (DEFAULT_PART_SIZE, 2400)),
        (1024**4, None, (105 * MIB, 9987)),  # 1 TiB: 64 MiB would need 16,384 parts
        (5 * 1024**4, None, (525 * MIB, 9987)),
        (10 * 5 * MIB, 5 * MIB, (5 * MIB, 10)),
        (10_000 * 5 * MIB, 5 * MIB, (5 * MIB, 10_000)),
    ],
)
def test_plan_parts(size, part_size, expected):
    got = plan_parts(size, part_size)
    assert got == expected
    assert got[1] <= 10_000 and got[0] * got[1] >= size > got[0] * (got[1] - 1)


@pytest.mark.parametrize(
    ("size", "part_size", "needle"),
    [
        (0, None, "size must be"),
        (5 * 1024**4 + 1, None, "size must be"),
        (100 * MIB, 5 * MIB - 1, "part_size must be"),
        (100 * MIB, 5 * 1024 * MIB + 1, "part_size must be"),
        (10_001 * 5 * MIB, 5 * MIB, "at least 5243405 bytes"),
    ],
)
def test_plan_parts_refuses(size, part_size, needle):
    with pytest.raises(Unprocessable) as exc:
        plan_parts(size, part_size)
    assert needle in exc.value.detail


def test_last_part_holds_the_rest():
    row = {"size": 2 * 5 * MIB + 7, "part_size": 5 * MIB, "part_count": 3}
    assert [part_length(row, n) for n in (1, 2, 3)] == [5 * MIB, 5 * MIB, 7]


def test_multipart_etag_is_the_md5_of_the_part_md5s():
    parts = [b"a" * 10, b"b" * 3]
    etags = [f'"{hashlib.md5(p).hexdigest()}"' for p in parts]  # noqa: S324
    joined = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest()  # noqa: S324
    assert multipart_etag(etags) == f"{joined}-2"
    assert multipart_etag(["not-an-md5"]) is None
