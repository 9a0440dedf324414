"""Downloads: files in parallel, each resumable (HTTP `Range` into `<file>.part`), its sha256 and size checked
against the registry's before it is renamed into place; files already present and verified are skipped.

Local layout (see the README): `<local_dir>/<rfilename>` for the files, and `<local_dir>/.registry/<rfilename>.json`
recording the sha256, size and mtime of each verified file, so that a second run skips it without hashing it
again. Without `--local-dir`, `<local_dir>` is `<cache>/models/<repo_id>/<version or "latest">`.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from registry_client.errors import ExitCode, RegistryError
from registry_client.progress import NullReporter, RateLimiter, Reporter

if TYPE_CHECKING:
    from registry_client.client import RegistryClient

MiB = 1024 * 1024
CHUNK = MiB  # the receive buffer of a segment
STREAM_CHUNK = MiB // 2  # the receive buffers of one stream (small enough to stay in the CPU cache between recv, pwrite
STREAM_BUFFERS = 16  # and sha256), hashed in a thread of their own
READ_CHUNK = 8 * 1024 * 1024
RETRIES = 5
READ_TIMEOUT = 120.0  # seconds without a byte before a connection counts as dropped
META_DIR = ".registry"


@dataclass
class DownloadOptions:
    parallel: int = 4
    limit_rate: int | None = None
    url_expires: int = 3600
    segments: int = 4  # a large file is fetched as this many ranges at once
    segment_threshold: int = 64 * 1024 * 1024  # from this size on
    reporter: Reporter = field(default_factory=NullReporter)


def default_local_dir(repo_id: str, version: str | None) -> Path:
    from registry_client.config import cache_dir

    return cache_dir() / "models" / repo_id / (version or "latest")


def _inside(base: Path, rfilename: str) -> Path:
    """`base/rfilename`, refusing names that would land outside `base`."""
    target = (base / rfilename).resolve()
    if base.resolve() not in target.parents:
        raise RegistryError(f"refusing a file name outside the download folder: {rfilename}", exit_code=ExitCode.VERIFY)
    return target


def _segments_path(part: Path) -> Path:
    """The progress of a file fetched in segments, next to its `.part`."""
    return part.with_name(part.name + ".json")


def hash_file(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(READ_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


TRANSFER_ERRORS = (OSError, http.client.HTTPException)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


@contextmanager
def range_get(url: str, start: int, end: int | None) -> Iterator[http.client.HTTPResponse]:
    """GET a presigned URL from byte `start` (to `end`, excluded), on a connection of its own.

    The bulk bytes go through the standard library's http.client rather than httpx: `readinto` a reused buffer
    costs about half the CPU per byte (no new object per chunk), which is what a download on a busy machine is
    bound by. The API calls stay on httpx.
    """
    u = urlsplit(url)
    cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
    conn = cls(u.hostname or "", u.port, timeout=READ_TIMEOUT)
    try:
        headers = {"Range": f"bytes={start}-{'' if end is None else end - 1}"} if start or end is not None else {}
        conn.request("GET", f"{u.path}?{u.query}" if u.query else u.path, headers=headers)
        response = conn.getresponse()
        if response.status >= 300:
            response.read()
        yield response
    finally:
        conn.close()


class _StreamHasher:
    """The sha256 of a stream, computed in a thread of its own straight from the receive buffers.

    The receiving thread takes a free buffer, `readinto`s it, writes it to the file and hands it over; the
    hashing thread updates the sha256 from it (hashlib releases the GIL for large buffers) and gives it back. A
    few large buffers are reused: no copy and no read-back of the file, and little Python work per byte.
    """

    def __init__(self, sha: Any, buffers: int = STREAM_BUFFERS, size: int = STREAM_CHUNK) -> None:
        self.sha = sha
        self.free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(buffers):
            self.free.put(bytearray(size))
        self.full: queue.SimpleQueue[tuple[bytearray, int] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.full.get()) is not None:
            buf, n = item
            self.sha.update(memoryview(buf)[:n])
            self.free.put(buf)

    def take(self) -> bytearray:
        return self.free.get()

    def give(self, buf: bytearray, n: int) -> None:
        self.full.put((buf, n))

    def finish(self) -> Any:
        """Wait for the bytes handed over to be hashed; the sha256 object."""
        self.full.put(None)
        self.thread.join()
        return self.sha


class Downloader:
    """Downloads one model's files."""

    def __init__(self, client: RegistryClient, options: DownloadOptions) -> None:
        self.client = client
        self.opts = options
        self.reporter = options.reporter
        self.limiter = RateLimiter(options.limit_rate)
        self.stop = threading.Event()

    # ------------------------------------------------------------------ which files

    def files_of(self, repo_id: str, version: str | None) -> list[dict]:
        """The files to fetch: the model's current files, or those of `version`."""
        if version is None:
            return self.client.manifest(repo_id)["files"]
        # No endpoint lists one version's files to every reader: a platform user finds them in its manifest,
        # the owner in the version's uploads, anyone else among the current files.
        try:
            for item in self.client.platform_manifest()["items"]:
                if item["repo_id"] == repo_id:
                    for v in item["versions"]:
                        if v["version"] == version:
                            return v["files"]
        except RegistryError as exc:
            if exc.status != 403:
                raise
        try:
            latest: dict[str, dict] = {}
            for up in self.client.list_uploads(repo_id, version)["items"]:
                if up["status"] == "available":
                    latest[up["rfilename"]] = {**up, "version": version}
            if latest:
                return list(latest.values())
        except RegistryError as exc:
            if exc.status not in (403, 404):
                raise
        files = [f for f in self.client.manifest(repo_id)["files"] if f.get("version") == version]
        if not files:
            raise RegistryError(f"version not found or without verified files: {version}", exit_code=ExitCode.NOT_FOUND)
        return files

    # ------------------------------------------------------------------ the whole command

    def download(
        self, repo_id: str, version: str | None, local_dir: str | Path | None, files: list[dict] | None = None
    ) -> list[dict]:
        """Fetch `files` (default: `files_of(repo_id, version)`) into `local_dir`; one result dict per file."""
        if files is None:
            files = self.files_of(repo_id, version)
        base = Path(local_dir) if local_dir is not None else default_local_dir(repo_id, version)
        base.mkdir(parents=True, exist_ok=True)
        plan = [(f, _inside(base, f["rfilename"])) for f in files]
        results: list[dict] = []
        with ThreadPoolExecutor(max(1, self.opts.parallel), thread_name_prefix="download") as pool:
            futures = [pool.submit(self._one, repo_id, version, base, f, target) for f, target in plan]
            try:
                for fut in futures:
                    results.append(fut.result())
            except BaseException:
                self.stop.set()
                for fut in futures:
                    fut.cancel()
                raise
        return results

    def _meta_path(self, base: Path, rfilename: str) -> Path:
        return base / META_DIR / f"{rfilename}.json"

    def _one(self, repo_id: str, version: str | None, base: Path, f: dict, target: Path) -> dict:
        size, sha256 = int(f["size"]), f["sha256"].lower()
        task = self.reporter.add_file(f["rfilename"], size)
        result = {"rfilename": f["rfilename"], "path": str(target), "size": size, "sha256": sha256, "resumed_from": 0}
        meta_path = self._meta_path(base, f["rfilename"])
        if target.is_file() and target.stat().st_size == size:
            st = target.stat()
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                meta = {}
            if meta.get("sha256") == sha256 and meta.get("size") == size and meta.get("mtime_ns") == st.st_mtime_ns:
                self.reporter.finish_file(task, "already verified")
                return {**result, "status": "already verified"}
            if hash_file(target) == sha256:
                self._write_meta(meta_path, target, sha256, size)
                self.reporter.finish_file(task, "verified")
                return {**result, "status": "verified"}
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + ".part")
        file_version = version or f.get("version")
        if size >= self.opts.segment_threshold and self.opts.segments > 1:
            offset, sha, result["resumed_from"] = self._fetch_segments(
                repo_id, file_version, f["rfilename"], part, size, sha256, task
            )
        else:
            offset = part.stat().st_size if part.is_file() else 0
            if offset > size or _segments_path(part).exists():  # too long, or a segmented one: start over
                part.unlink(missing_ok=True)
                _segments_path(part).unlink(missing_ok=True)
                offset = 0
            result["resumed_from"] = offset
            sha = hashlib.sha256()
            if offset:
                with part.open("rb") as fh:  # what is already here counts in the sha256 (read locally, not sent)
                    left = offset
                    while left and (chunk := fh.read(min(READ_CHUNK, left))):
                        sha.update(chunk)
                        left -= len(chunk)
                self.reporter.advance(task, offset)
            offset, sha = self._fetch(repo_id, file_version, f["rfilename"], part, offset, size, sha, task)
        digest = sha.hexdigest()
        if offset != size or digest != sha256:
            part.unlink(missing_ok=True)
            _segments_path(part).unlink(missing_ok=True)
            self.reporter.finish_file(task, "[red]corrupt")
            raise RegistryError(
                f"{f['rfilename']}: downloaded bytes do not match the registry's "
                f"(size {offset}/{size}, sha256 {digest[:12]}… vs {sha256[:12]}…); removed, run again",
                exit_code=ExitCode.VERIFY,
            )
        os.replace(part, target)
        _segments_path(part).unlink(missing_ok=True)
        self._write_meta(meta_path, target, sha256, size)
        self.reporter.finish_file(task, "resumed, verified" if result["resumed_from"] else "verified")
        return {**result, "status": "downloaded"}

    def _fetch(
        self, repo_id: str, version: str | None, rfilename: str, part: Path, offset: int, size: int, sha: Any, task: int
    ) -> tuple[int, Any]:
        """Bring `part` from `offset` to `size` bytes, hashing what arrives; (new offset, sha)."""
        last = ""
        for _attempt in range(RETRIES):
            if offset >= size:
                break
            if self.stop.is_set():
                raise KeyboardInterrupt
            url = self.client.download_url(repo_id, rfilename, version=version, expires=self.opts.url_expires)["url"]
            try:
                with range_get(url, offset, None) as response:
                    if response.status == 200 and offset:  # the range was ignored: start over
                        self.reporter.advance(task, -offset)
                        offset, sha = 0, hashlib.sha256()
                    elif response.status not in (200, 206):
                        last = f"storage answered {response.status}"
                        if response.status in (403, 500, 502, 503, 504):
                            continue  # expired URL or a busy server: a new URL and again
                        break
                    hasher = _StreamHasher(sha)
                    try:
                        with part.open("r+b" if offset else "wb", buffering=0) as out:
                            out.truncate(offset)
                            fd = out.fileno()
                            # Under --limit-rate, small reads: the bytes come evenly rather than in bursts.
                            step = CHUNK if self.limiter.rate else STREAM_CHUNK
                            while True:
                                buf = hasher.take()
                                n = response.readinto(memoryview(buf)[:step])
                                if not n:
                                    break
                                if self.stop.is_set():
                                    raise KeyboardInterrupt
                                _pwrite_all(fd, memoryview(buf)[:n], offset)
                                hasher.give(buf, n)
                                offset += n
                                self.limiter.consume(n)
                                self.reporter.advance(task, n)
                    finally:
                        hasher.finish()
            except TRANSFER_ERRORS as exc:  # dropped: keep what arrived, ask for the rest
                last = str(exc) or type(exc).__name__
                continue
        if offset < size:
            raise RegistryError(f"{rfilename}: download failed at {offset}/{size} bytes: {last}; run again to resume")
        return offset, sha

    def _fetch_segments(
        self, repo_id: str, version: str | None, rfilename: str, part: Path, size: int, sha256: str, task: int
    ) -> tuple[int, Any, int]:
        """A large file as blocks fetched `segments` at a time (in file order, each an HTTP range), written in
        place into `part`. The blocks done are kept in `<part>.json`, so a new run fetches only the others. The
        sha256 follows the contiguous prefix of done blocks in a thread of its own (read back from the page
        cache), close behind the downloads. Returns (bytes, sha, bytes there before)."""
        block = min(16 * MiB, max(MiB, size // (self.opts.segments * 8)))
        count = -(-size // block)
        state_path = _segments_path(part)
        done: set[int] = set()
        try:
            state = json.loads(state_path.read_text())
            if (state["size"], state["sha256"], state["block"]) == (
                size,
                sha256,
                block,
            ) and part.stat().st_size == size:
                done = {int(i) for i in state["done"]}
        except (OSError, ValueError, KeyError, TypeError):
            done = set()

        def length(i: int) -> int:
            return min(block, size - i * block)

        before = sum(length(i) for i in done)
        self.reporter.advance(task, before)
        todo = [i for i in range(count) if i not in done]
        fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
        cv = threading.Condition()
        failed: list[BaseException] = []
        url: list[str] = []
        sha = hashlib.sha256()
        save_lock = threading.Lock()
        saved = [0.0]

        def save(every: float = 0.0) -> None:
            """Record the blocks done (at most every `every` seconds): a killed run resumes from them."""
            if every and time.monotonic() - saved[0] < every:
                return
            with save_lock:
                saved[0] = time.monotonic()
                with cv:
                    data = json.dumps({"size": size, "sha256": sha256, "block": block, "done": sorted(done)})
                tmp = state_path.with_name(state_path.name + ".tmp")
                tmp.write_text(data)
                os.replace(tmp, state_path)

        def get_url(fresh: bool) -> str:
            with cv:
                if fresh or not url:
                    answer = self.client.download_url(
                        repo_id, rfilename, version=version, expires=self.opts.url_expires
                    )
                    url[:] = [answer["url"]]
                return url[0]

        def worker() -> None:
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            while True:
                with cv:
                    if not todo or failed:
                        return
                    i = todo.pop(0)
                start, end = i * block, i * block + length(i)
                last = ""
                for attempt in range(RETRIES):
                    pos = start
                    try:
                        with range_get(get_url(attempt > 0), start, end) as response:
                            if response.status != 206:
                                last = f"storage answered {response.status}"
                                if response.status in (403, 500, 502, 503, 504):
                                    continue
                                break
                            while n := response.readinto(buf):
                                if self.stop.is_set() or failed:
                                    raise KeyboardInterrupt
                                _pwrite_all(fd, view[:n], pos)
                                pos += n
                                self.limiter.consume(n)
                                self.reporter.advance(task, n)
                    except TRANSFER_ERRORS as exc:
                        last = str(exc) or type(exc).__name__
                        self.reporter.advance(task, start - pos)
                        continue
                    if pos == end:
                        break
                    self.reporter.advance(task, start - pos)
                    last = f"short answer ({pos - start} of {end - start} bytes)"
                else:
                    pos = start
                if pos != end:
                    raise RegistryError(f"{rfilename}: download failed: {last}; run again to resume")
                with cv:
                    done.add(i)
                    cv.notify_all()
                save(every=0.5)

        def hash_in_order() -> None:
            view = memoryview(bytearray(READ_CHUNK))
            for i in range(count):
                with cv:
                    while i not in done and not failed:
                        cv.wait(0.5)
                    if failed:
                        return
                hashed, end = i * block, i * block + length(i)
                while hashed < end:
                    n = os.preadv(fd, [view[: min(READ_CHUNK, end - hashed)]], hashed)
                    sha.update(view[:n])
                    hashed += n

        try:
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)
            save()
            hasher = threading.Thread(target=hash_in_order, daemon=True)
            hasher.start()
            with ThreadPoolExecutor(self.opts.segments, thread_name_prefix="segment") as pool:
                futures = [pool.submit(worker) for _ in range(self.opts.segments)]
                try:
                    for fut in futures:
                        fut.result()
                except BaseException as exc:
                    with cv:
                        failed.append(exc)
                        cv.notify_all()
                    raise
            hasher.join()
        finally:
            save()
            os.close(fd)
        return sum(length(i) for i in done), sha, before

    def _write_meta(self, meta_path: Path, target: Path, sha256: str, size: int) -> None:
        meta_path.parent.mkdir(parents=True, exist_ok=True)
        meta_path.write_text(json.dumps({"sha256": sha256, "size": size, "mtime_ns": target.stat().st_mtime_ns}))
