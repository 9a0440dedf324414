"""What makes a stored object acceptable: streaming size + sha256, the safetensors header, the judgement.

Everything here is synchronous and free of I/O of its own: `stream_digest` pulls bytes through a
`readinto` callable, so it runs in a worker thread (hashlib and socket reads release the GIL) while
the event loop stays free, and the checks are pure functions unit tests call directly.
"""

from __future__ import annotations

import hashlib
import json
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

FileFormat = Literal["safetensors", "pickle", "other"]
RejectReason = Literal[
    "size_mismatch", "sha256_mismatch", "object_missing", "bad_safetensors_header", "expired", "unverifiable"
]

#: Extensions of formats that unpickle on load (arbitrary code execution): clients are warned.
PICKLE_EXTENSIONS = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

#: Bytes per element of the safetensors dtypes with a whole number of bytes (the format's own list).
SAFETENSORS_DTYPE_BYTES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}


class SafetensorsHeaderError(ValueError):
    """The object does not start with a well-formed safetensors header."""


class VerificationCancelled(Exception):
    """The stream was stopped from outside (lease lost, shutdown, partition revoked)."""


def file_format_of(rfilename: str) -> tuple[FileFormat, bool]:
    """The format clients are told about, from the file name, and whether loading it unpickles."""
    name = rfilename.lower()
    if name.endswith(".safetensors"):
        return "safetensors", False
    if name.endswith(PICKLE_EXTENSIONS):
        return "pickle", True
    return "other", False


class HeadCapture:
    """Keeps a copy of the first bytes of a stream: the 8-byte length and the safetensors JSON header.

    Only the header is copied (capped at `max_header` bytes), never the tensor data behind it.
    """

    def __init__(self, max_header: int) -> None:
        self.max_header = max_header
        self._buf = bytearray()
        self._want = 8

    def feed(self, chunk: memoryview | bytes) -> None:
        """Take what is still missing of the head from the next chunk of the stream."""
        pos = 0
        while len(self._buf) < self._want and pos < len(chunk):
            take = min(self._want - len(self._buf), len(chunk) - pos)
            self._buf += chunk[pos : pos + take]
            pos += take
            if self._want == 8 and len(self._buf) >= 8:
                declared = int.from_bytes(self._buf[:8], "little")
                # Beyond the cap only the length matters: it is rejected without reading further.
                self._want = 8 + min(declared, self.max_header)

    @property
    def data(self) -> bytes:
        """The bytes captured so far."""
        return bytes(self._buf)


def check_safetensors_header(head: bytes, size: int, max_header: int = 100 * 1024 * 1024) -> dict[str, object]:
    """Check a safetensors file from its first bytes and its total size; return the parsed header.

    `head` must hold at least the 8-byte length and the header it announces (what `HeadCapture`
    keeps). Checks: the length fits in the file, the header is a JSON object, every tensor has a
    dtype, a shape and `data_offsets` [begin, end] with 0 <= begin <= end inside the data area
    (8 + header length + end <= size), and, for dtypes of whole bytes, end - begin matches the shape.
    Raises SafetensorsHeaderError with a readable reason otherwise.
    """
    if size < 8 or len(head) < 8:
        raise SafetensorsHeaderError(f"file of {size} bytes is shorter than the 8-byte header length")
    n = int.from_bytes(head[:8], "little")
    if n < 2:
        raise SafetensorsHeaderError(f"header length {n} is too small for a JSON object")
    if n > max_header:
        raise SafetensorsHeaderError(f"header length {n} exceeds the limit of {max_header} bytes")
    if 8 + n > size:
        raise SafetensorsHeaderError(f"header length {n} runs past the end of the file ({size} bytes)")
    if len(head) < 8 + n:
        raise SafetensorsHeaderError(f"header truncated: {len(head) - 8} of {n} bytes")
    try:
        header = json.loads(head[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsHeaderError(f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise SafetensorsHeaderError("header is not a JSON object")
    data_size = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise SafetensorsHeaderError("__metadata__ must map strings to strings")
            continue
        _check_tensor(name, info, data_size)
    return header


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_tensor(name: str, info: object, data_size: int) -> None:
    if not isinstance(info, dict):
        raise SafetensorsHeaderError(f"tensor {name!r}: entry is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        raise SafetensorsHeaderError(f"tensor {name!r}: dtype missing")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise SafetensorsHeaderError(f"tensor {name!r}: shape must be a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise SafetensorsHeaderError(f"tensor {name!r}: data_offsets must be [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise SafetensorsHeaderError(f"tensor {name!r}: data_offsets [{begin}, {end}] are not ordered")
    if end > data_size:
        raise SafetensorsHeaderError(
            f"tensor {name!r}: data_offsets [{begin}, {end}] lie outside the {data_size} data bytes of the file"
        )
    width = SAFETENSORS_DTYPE_BYTES.get(dtype)
    if width is not None and end - begin != math.prod(shape) * width:
        raise SafetensorsHeaderError(
            f"tensor {name!r}: {end - begin} bytes do not hold shape {shape} of {dtype} ({width} bytes each)"
        )


@dataclass(frozen=True)
class Judgement:
    """The outcome of comparing a stored object with what its developer declared."""

    verified: bool
    file_format: FileFormat
    is_pickle: bool
    reason: RejectReason | None = None
    detail: str = ""


def judge(
    *,
    rfilename: str,
    declared_size: int,
    declared_sha256: str,
    size: int,
    sha256: str,
    head: bytes,
    max_header: int = 100 * 1024 * 1024,
) -> Judgement:
    """Verified, or rejected with the first failing check (size, then sha256, then the format)."""
    fmt, is_pickle = file_format_of(rfilename)
    if size != declared_size:
        return Judgement(False, fmt, is_pickle, "size_mismatch", f"declared {declared_size} bytes, stored {size}")
    if sha256.lower() != declared_sha256.strip().lower():
        return Judgement(False, fmt, is_pickle, "sha256_mismatch", f"declared {declared_sha256}, stored {sha256}")
    if fmt == "safetensors":
        try:
            check_safetensors_header(head, size, max_header)
        except SafetensorsHeaderError as exc:
            return Judgement(False, fmt, is_pickle, "bad_safetensors_header", str(exc))
    return Judgement(True, fmt, is_pickle)


class Progress:
    """Bytes read so far by a running `stream_digest` (read by the heartbeat, written by the reader)."""

    def __init__(self) -> None:
        self.bytes_read = 0


def stream_digest(
    readinto: Callable[[memoryview], int],
    *,
    chunk_bytes: int = 8 * 1024 * 1024,
    buffers: int = 3,
    head: HeadCapture | None = None,
    max_bytes_per_second: float = 0.0,
    stop: threading.Event | None = None,
    progress: Progress | None = None,
) -> tuple[int, str]:
    """Read a stream to its end through `readinto`; return (size, sha256 hex).

    Two threads overlap the work: this one fills preallocated buffers straight from the socket
    (no per-chunk allocation or copy), a second one hashes filled buffers; `buffers` of them circulate,
    so memory stays at buffers * chunk_bytes whatever the object's size. Call from a worker thread.
    """
    stop = stop or threading.Event()
    free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
    full: queue.SimpleQueue[tuple[bytearray, int] | None] = queue.SimpleQueue()
    for _ in range(buffers):
        free.put(bytearray(chunk_bytes))
    sha = hashlib.sha256()

    def hasher() -> None:
        while (item := full.get()) is not None:
            buf, n = item
            sha.update(memoryview(buf)[:n])
            free.put(buf)

    thread = threading.Thread(target=hasher, name="ingest-sha256", daemon=True)
    thread.start()
    total = 0
    started = time.monotonic()
    try:
        eof = False
        while not eof:
            if stop.is_set():
                raise VerificationCancelled("stopped")
            buf = free.get()
            view = memoryview(buf)
            filled = 0
            while filled < chunk_bytes:
                n = readinto(view[filled:])
                if not n:
                    eof = True
                    break
                filled += n
            if not filled:
                free.put(buf)
                break
            if head is not None:
                head.feed(memoryview(buf)[:filled])
            full.put((buf, filled))
            total += filled
            if progress is not None:
                progress.bytes_read = total
            if max_bytes_per_second:
                ahead = total / max_bytes_per_second - (time.monotonic() - started)
                if ahead > 0 and stop.wait(ahead):
                    raise VerificationCancelled("stopped")
    finally:
        full.put(None)
        thread.join()
    return total, sha.hexdigest()
