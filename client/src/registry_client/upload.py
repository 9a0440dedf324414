"""Uploads: single presigned PUT below a threshold, multipart above it (parts in parallel), sha256 computed in
the same pass that reads the bytes, resumable, and a final wait for ingest's verdict.

Resume: for every multipart upload a small state file (`<cache>/uploads/<key>.json`: upload id, part size,
the local file's path, size and mtime) is kept until the upload is completed. Run the same command again and
the parts the API lists as stored are not sent again (their bytes are still read, for the sha256, and
checked against the part's ETag when it is a plain MD5).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from registry_client.errors import ExitCode, RegistryError
from registry_client.progress import NullReporter, RateLimiter, Reporter

if TYPE_CHECKING:
    from registry_client.client import RegistryClient

MiB = 1024 * 1024
CHUNK = 1 * MiB  # what is sent (and counted on the bars) at a time
MIN_PART = 5 * MiB  # S3's rules: parts of 5 MiB to 5 GiB, at most 10,000 of them
MAX_PART = 5 * 1024 * MiB
MAX_PARTS = 10_000
URL_BATCH = 16  # part URLs asked for at a time
RETRIES = 5

# Test hook (never set it otherwise): the named rfilename's bytes are altered after they were hashed, so the
# declared sha256 differs from what is stored and ingest must reject the upload.
CORRUPT_ENV = "REGISTRY_TEST_CORRUPT_AFTER_HASH"


@dataclass
class UploadOptions:
    part_size: int = 64 * MiB
    multipart_threshold: int = 64 * MiB
    parallel: int = 4
    limit_rate: int | None = None  # bytes/s over all transfers
    url_expires: int = 3600  # lifetime asked for presigned URLs
    wait: bool = True  # wait for ingest's verdict
    verdict_timeout: float = 600.0
    state_dir: Path | None = None  # default: <cache>/uploads
    reporter: Reporter = field(default_factory=NullReporter)


@dataclass
class LocalFile:
    path: Path
    rfilename: str
    size: int


def collect_files(paths: Iterable[str | Path]) -> list[LocalFile]:
    """Files to upload: a file by its name, a folder by every file under it, relative paths kept."""
    found: dict[str, LocalFile] = {}
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            for f in sorted(x for x in p.rglob("*") if x.is_file()):
                rel = f.relative_to(p).as_posix()
                if rel.split("/")[0] == ".registry":
                    continue  # a download folder's bookkeeping (registry_client.download)
                found[rel] = LocalFile(f, rel, f.stat().st_size)
        elif p.is_file():
            found[p.name] = LocalFile(p, p.name, p.stat().st_size)
        else:
            raise RegistryError(f"no such file or folder: {raw}", exit_code=ExitCode.USAGE)
    if not found:
        raise RegistryError("nothing to upload: the folders given are empty", exit_code=ExitCode.USAGE)
    return list(found.values())


def plan_part_size(size: int, wanted: int) -> int:
    """`wanted`, raised so the file fits in 10,000 parts, kept within S3's 5 MiB–5 GiB."""
    part = max(wanted, MIN_PART, -(-size // MAX_PARTS))
    if part > MAX_PART:
        raise RegistryError(f"file too large for a multipart upload: {size} bytes", exit_code=ExitCode.USAGE)
    return part


class _Cancelled(Exception):
    pass


class Uploader:
    """Uploads files to one version of a model."""

    def __init__(self, client: RegistryClient, options: UploadOptions) -> None:
        from registry_client.config import cache_dir

        self.client = client
        self.opts = options
        self.reporter = options.reporter
        self.limiter = RateLimiter(options.limit_rate)
        self.stop = threading.Event()
        self.state_dir = options.state_dir or cache_dir() / "uploads"
        self.corrupt = os.environ.get(CORRUPT_ENV)

    # ------------------------------------------------------------------ the whole command

    def upload(self, repo_id: str, version: str, paths: Iterable[str | Path]) -> list[dict]:
        """Upload every file, then wait for the verdicts; one result dict per file.

        Raises RegistryError (exit code REJECTED) after all files are done if ingest rejected any.
        """
        files = collect_files(paths)
        existing: dict[str, dict] = {}
        for up in self.client.list_uploads(repo_id, version)["items"]:  # oldest first: the newest one wins
            existing[up["rfilename"]] = up
        # Small files (one PUT each) go `parallel` at a time; a large one at a time, its parts in parallel.
        small = [lf for lf in files if lf.size < self.opts.multipart_threshold]
        large = [lf for lf in files if lf.size >= self.opts.multipart_threshold]
        by_name: dict[str, dict] = {}
        with ThreadPoolExecutor(max(1, self.opts.parallel), thread_name_prefix="file") as pool:
            futures = [pool.submit(self._one, repo_id, version, lf, existing.get(lf.rfilename)) for lf in small]
            try:
                for lf in large:
                    by_name[lf.rfilename] = self._one(repo_id, version, lf, existing.get(lf.rfilename))
                for fut in futures:
                    res = fut.result()
                    by_name[res["rfilename"]] = res
            except BaseException:
                self.stop.set()
                for fut in futures:
                    fut.cancel()
                raise
        results = [by_name[lf.rfilename] for lf in files]
        if self.opts.wait:
            for res in results:
                if res["status"] == "pending_verification":
                    verdict = self.client.wait_for_verdict(res["upload_id"], timeout=self.opts.verdict_timeout)
                    res.update(status=verdict["status"], reason=verdict.get("reason"), detail=verdict.get("detail"))
                    self.reporter.finish_file(res["_task"], verdict["status"])
        for res in results:
            res.pop("_task", None)
        rejected = [r for r in results if r["status"] in ("rejected", "expired")]
        if rejected:
            lines = "; ".join(
                f"{r['rfilename']}: {r['status']}"
                + (f" ({r['reason']}" + (f": {r['detail']})" if r.get("detail") else ")") if r.get("reason") else "")
                for r in rejected
            )
            err = RegistryError(f"upload rejected by the registry: {lines}", exit_code=ExitCode.REJECTED)
            err.results = results  # type: ignore[attr-defined]
            raise err
        return results

    def _one(self, repo_id: str, version: str, lf: LocalFile, previous: dict | None) -> dict:
        task = self.reporter.add_file(lf.rfilename, lf.size)
        result: dict[str, Any] = {
            "rfilename": lf.rfilename,
            "path": str(lf.path),
            "size": lf.size,
            "_task": task,
            "parts_total": 1,
            "parts_sent": 0,
            "parts_reused": 0,
            "resumed": False,
            "urls_resigned": 0,
        }
        if previous is not None and previous["status"] == "available":
            if previous.get("size") != lf.size:
                raise RegistryError(
                    f"{lf.rfilename} is already published in this version with another size "
                    f"({previous.get('size')} bytes); create a new version to change it",
                    exit_code=ExitCode.CONFLICT,
                )
            self.reporter.finish_file(task, "already published")
            return {**result, **_verdict_fields(previous), "skipped": True}
        if previous is not None and previous["status"] == "pending_verification" and previous.get("size") == lf.size:
            # Completed by an earlier run that stopped before the verdict: only wait for it.
            self.reporter.finish_file(task, "verifying")
            return {**result, **_verdict_fields(previous), "skipped": True}
        if lf.size >= self.opts.multipart_threshold:
            done = self._multipart(repo_id, version, lf, task, result)
        else:
            done = self._single(repo_id, version, lf, task, result)
        self.reporter.finish_file(task, "verifying" if self.opts.wait else "uploaded")
        return {**done, "skipped": False}

    # ------------------------------------------------------------------ single PUT

    def _single(self, repo_id: str, version: str, lf: LocalFile, task: int, result: dict) -> dict:
        for attempt in range(RETRIES):
            # A whole-file PUT URL lives at least 60 s (the API's minimum); part URLs may live shorter.
            up = self.client.initiate_upload(repo_id, version, lf.rfilename, expires=max(60, self.opts.url_expires))
            sha = hashlib.sha256()
            sent = [0]
            try:
                response = self.client.transfer.put(
                    up["url"],
                    content=self._file_chunks(lf, sha, task, sent),
                    headers={"content-length": str(lf.size)},
                )
            except httpx.HTTPError as exc:
                self.reporter.advance(task, -sent[0])
                if attempt == RETRIES - 1:
                    raise RegistryError(f"{lf.rfilename}: upload failed: {exc}") from exc
                continue
            if response.status_code == 403 and attempt < RETRIES - 1:  # the URL expired: a new upload
                self.reporter.advance(task, -sent[0])
                continue
            if response.status_code >= 300:
                raise RegistryError(f"{lf.rfilename}: storage answered {response.status_code}: {_s3_message(response)}")
            break
        digest = sha.hexdigest()
        done = self.client.complete_upload(repo_id, version, lf.rfilename, lf.size, digest)
        return {**result, **_verdict_fields(done), "sha256": digest, "parts_sent": 1}

    def _file_chunks(self, lf: LocalFile, sha: Any, task: int, sent: list[int]) -> Iterator[bytes]:
        with lf.path.open("rb") as f:
            first = True
            while chunk := f.read(CHUNK):
                if self.stop.is_set():
                    raise _Cancelled
                sha.update(chunk)
                if first and self.corrupt == lf.rfilename:
                    chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                first = False
                self.limiter.consume(len(chunk))
                yield chunk
                sent[0] += len(chunk)
                self.reporter.advance(task, len(chunk))

    # ------------------------------------------------------------------ multipart

    def _state_path(self, repo_id: str, version: str, rfilename: str) -> Path:
        key = hashlib.sha256(f"{self.client.base_url}|{repo_id}|{version}|{rfilename}".encode()).hexdigest()[:32]
        return self.state_dir / f"{key}.json"

    def _load_state(self, path: Path, lf: LocalFile) -> dict | None:
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        st = lf.path.stat()
        if (
            state.get("path") != str(lf.path.resolve())
            or state.get("size") != st.st_size
            or state.get("mtime_ns") != st.st_mtime_ns
        ):
            # The local file changed since: its stored parts are worthless.
            with contextlib.suppress(RegistryError):
                self.client.abort_multipart(state["upload_id"])
            path.unlink(missing_ok=True)
            return None
        return state

    def _save_state(self, path: Path, state: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, path)

    def _multipart(self, repo_id: str, version: str, lf: LocalFile, task: int, result: dict) -> dict:
        state_path = self._state_path(repo_id, version, lf.rfilename)
        state = self._load_state(state_path, lf)
        stored: dict[int, dict] = {}
        if state is not None:
            try:
                listed = self.client.list_parts(state["upload_id"])
            except RegistryError as exc:
                if exc.status not in (404, 409):
                    raise
                listed = {"status": "gone"}
            if listed["status"] == "initiated" and listed.get("part_size") == state["part_size"]:
                stored = {p["part_number"]: p for p in listed["parts"]}
                result["resumed"] = True
            else:
                state = None  # completed, aborted or expired meanwhile: start over
        if state is None:
            part_size = plan_part_size(lf.size, self.opts.part_size)
            up = self.client.initiate_multipart(repo_id, version, lf.rfilename, lf.size, part_size)
            st = lf.path.stat()
            state = {
                "upload_id": up["upload_id"],
                "part_size": up["part_size"],
                "path": str(lf.path.resolve()),
                "size": st.st_size,
                "mtime_ns": st.st_mtime_ns,
                "repo_id": repo_id,
                "version": version,
                "rfilename": lf.rfilename,
            }
            self._save_state(state_path, state)
        upload_id, part_size = state["upload_id"], state["part_size"]
        count = max(1, -(-lf.size // part_size))
        urls = _PartUrls(self.client, upload_id, count, self.opts.url_expires)
        etags: dict[int, str] = {}
        sha = hashlib.sha256()
        parallel = max(1, self.opts.parallel)
        # Part buffers, reused: the ones being sent and one read ahead (no new allocation per part).
        free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(min(parallel + 1, count)):
            free.put(bytearray(part_size))
        futures: list[Future] = []
        with ThreadPoolExecutor(parallel, thread_name_prefix="part") as pool, lf.path.open("rb", buffering=0) as f:
            try:
                for number in range(1, count + 1):
                    buf = free.get()
                    for p in futures:  # fail fast: a part that failed for good stops the reading
                        if p.done() and p.exception() is not None:
                            raise p.exception()  # type: ignore[misc]
                    view = _read_part(f, buf, min(part_size, lf.size - (number - 1) * part_size))
                    sha.update(view)
                    if number == 1 and self.corrupt == lf.rfilename:
                        view[0] ^= 0xFF
                    have = stored.get(number)
                    if have is not None and have.get("size") == len(view) and _etag_matches(have["etag"], view):
                        etags[number] = have["etag"]
                        result["parts_reused"] += 1
                        self.reporter.advance(task, len(view))
                        free.put(buf)
                        continue
                    fut = pool.submit(self._send_part, urls, number, view, task)
                    fut.add_done_callback(lambda _f, b=buf: free.put(b))
                    futures.append(fut)
                for p in futures:
                    number, etag = p.result()
                    etags[number] = etag
            except BaseException:
                self.stop.set()
                for p in futures:
                    p.cancel()
                raise
        result["parts_total"] = count
        result["parts_sent"] = count - result["parts_reused"]
        result["urls_resigned"] = urls.resigned
        parts = [{"part_number": n, "etag": etags[n]} for n in range(1, count + 1)]
        digest = sha.hexdigest()
        done_up = self.client.complete_multipart(upload_id, parts, lf.size, digest)
        state_path.unlink(missing_ok=True)
        return {**result, **_verdict_fields(done_up), "sha256": digest}

    def _send_part(self, urls: _PartUrls, number: int, buf: memoryview, task: int) -> tuple[int, str]:
        last: str = ""
        for attempt in range(RETRIES):
            if self.stop.is_set():
                raise _Cancelled
            url = urls.get(number, fresh=attempt > 0)
            sent = [0]
            try:
                response = self.client.transfer.put(
                    url, content=self._buffer_chunks(buf, task, sent), headers={"content-length": str(len(buf))}
                )
            except httpx.HTTPError as exc:  # a dropped connection: sign again and resend this part
                self.reporter.advance(task, -sent[0])
                last = str(exc) or type(exc).__name__
                continue
            if response.status_code == 200:
                etag = response.headers.get("etag", "")
                return number, etag
            self.reporter.advance(task, -sent[0])
            last = f"storage answered {response.status_code}: {_s3_message(response)}"
            if response.status_code not in (400, 403) and response.status_code < 500:
                break  # 403: expired or bad signature, 5xx: busy — sign again and retry; anything else is final
        raise RegistryError(f"part {number} failed: {last}")

    def _buffer_chunks(self, view: memoryview, task: int, sent: list[int]) -> Iterator[memoryview]:
        for start in range(0, len(view), CHUNK):
            if self.stop.is_set():
                raise _Cancelled
            chunk = view[start : start + CHUNK]
            self.limiter.consume(len(chunk))
            yield chunk
            sent[0] += len(chunk)
            self.reporter.advance(task, len(chunk))


class _PartUrls:
    """Presigned part URLs, asked for in batches and signed again when one is refused (expired)."""

    def __init__(self, client: RegistryClient, upload_id: int, count: int, expires: int) -> None:
        self.client = client
        self.upload_id = upload_id
        self.count = count
        self.expires = expires
        self._urls: dict[int, str] = {}
        self._lock = threading.Lock()
        self.resigned = 0  # URLs asked for again because storage refused them (expired) or a PUT failed

    def get(self, number: int, fresh: bool = False) -> str:
        with self._lock:
            if fresh or number not in self._urls:
                self.resigned += fresh
                numbers = [n for n in range(number, min(self.count, number + URL_BATCH - 1) + 1)]
                self._urls.update(self.client.part_urls(self.upload_id, numbers, self.expires))
            return self._urls[number]


def _read_part(f: Any, buf: bytearray, length: int) -> memoryview:
    """Exactly `length` bytes of the file into `buf` (a file that shrank meanwhile is an error)."""
    view = memoryview(buf)[:length]
    got = 0
    while got < length:
        n = f.readinto(view[got:])
        if not n:
            raise RegistryError(f"{f.name}: the file shrank while it was being uploaded", exit_code=ExitCode.ERROR)
        got += n
    return view


def _etag_matches(etag: str, buf: memoryview) -> bool:
    """A stored part's ETag against the local bytes: S3 part ETags are the part's MD5 (if not, trust it)."""
    plain = etag.strip('"').lower()
    if len(plain) != 32 or any(c not in "0123456789abcdef" for c in plain):
        return True
    return hashlib.md5(buf, usedforsecurity=False).hexdigest() == plain


def _verdict_fields(up: dict) -> dict:
    return {
        "upload_id": up["upload_id"],
        "status": up["status"],
        "sha256": up.get("sha256"),
        "reason": up.get("reason"),
        "detail": up.get("detail"),
    }


def _s3_message(response: httpx.Response) -> str:
    """The <Code>/<Message> of an S3 error answer, on one line."""
    import re

    text = response.text
    code = re.search(r"<Code>(.*?)</Code>", text)
    msg = re.search(r"<Message>(.*?)</Message>", text)
    if code or msg:
        return " ".join(x.group(1) for x in (code, msg) if x)
    return text.strip().splitlines()[0][:200] if text.strip() else response.reason_phrase
