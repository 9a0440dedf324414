"""Publishing through /hf with the official client: create_repo, upload_file, upload_folder (LFS batch with
`basic` and `multipart` transfers, the ndjson commit), verification by ingest before anything is served,
ownership of namespaces, Xet refused clearly, and bad input answered with 4xx and X-Error-Code."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import Account, Registry
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError
from huggingface_hub.utils import _detect_agent
from minio.error import S3Error

from registry_shared.storage import minio_client

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def base(api_base_url: str) -> str:
    return f"http://127.0.0.1:{urlsplit(api_base_url).port}/hf"


@pytest.fixture(autouse=True)
def _no_xet(monkeypatch: pytest.MonkeyPatch, base: str) -> None:
    """No Xet (README); the client's agent registry is set empty, so nothing leaves loopback."""
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(_detect_agent, "_registry", _detect_agent._EMPTY_REGISTRY)


def _safetensors(n: int) -> bytes:
    """A valid safetensors file holding one uint8 tensor of `n` random bytes (ingest checks the header)."""
    header = json.dumps({"w": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + os.urandom(n)


def _bearer(acc: Account) -> dict[str, str]:
    return {"authorization": f"Bearer {acc.api_key}"}


def _new_repo(registry: Registry, base: str) -> tuple[Account, HfApi, str]:
    dev = registry.register("Pub")
    api = HfApi(endpoint=base, token=dev.api_key)
    repo_id = f"ns{os.urandom(5).hex()}/up-{os.urandom(3).hex()}"
    url = api.create_repo(repo_id, private=True)
    assert url.repo_id == repo_id
    api.create_repo(repo_id, private=True, exist_ok=True)  # idempotent with exist_ok
    return dev, api, repo_id


def test_upload_file_then_download(registry: Registry, base: str, tmp_path: Path, minio_settings) -> None:
    dev, api, repo_id = _new_repo(registry, base)
    data = os.urandom(5000)
    info = api.upload_file(path_or_fileobj=data, path_in_repo="weights/model.bin", repo_id=repo_id)
    assert len(info.oid) == 40
    assert api.model_info(repo_id).sha == info.oid
    p = hf_hub_download(repo_id, "weights/model.bin", endpoint=base, token=dev.api_key, cache_dir=tmp_path)
    assert Path(p).read_bytes() == data
    # the staged LFS object is gone once verified; the same content again needs no upload
    r = httpx.post(
        f"{base}/{repo_id}.git/info/lfs/objects/batch",
        headers=_bearer(dev),
        json={"operation": "upload", "objects": [{"oid": hashlib.sha256(data).hexdigest(), "size": len(data)}]},
    )
    assert r.status_code == 200 and "actions" not in r.json()["objects"][0], r.text
    staged = f"hf-lfs/{repo_id}/{hashlib.sha256(data).hexdigest()}"
    with pytest.raises(S3Error):
        minio_client(minio_settings).stat_object(minio_settings.minio_bucket, staged)
    # a second commit keeps the first one's files and adds its own: a new version, a new main
    info2 = api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=repo_id)
    assert info2.oid != info.oid
    assert sorted(api.list_repo_files(repo_id)) == ["config.json", "weights/model.bin"]
    assert api.list_repo_files(repo_id, revision=info.oid) == ["weights/model.bin"]
    # the versions are the registry's: visible on /v1
    r = registry.http.get(f"/v1/dev/models/{repo_id}/versions", headers=dev.headers)
    assert [v["version"] for v in r.json()["items"]] == ["hf-1", "hf-2"]
    # deleting a file is a commit too
    info3 = api.delete_file("config.json", repo_id=repo_id)
    assert api.list_repo_files(repo_id) == ["weights/model.bin"]
    assert api.model_info(repo_id).sha == info3.oid


def test_upload_folder_with_multipart_then_snapshot(registry: Registry, base: str, tmp_path: Path) -> None:
    dev, api, repo_id = _new_repo(registry, base)
    src = tmp_path / "src"
    files = {
        "config.json": json.dumps({"model_type": "bert"}).encode(),
        "tokenizer/vocab.txt": b"hello\nworld\n",
        "shards/a/model-00001.safetensors": _safetensors(2 * MIB),
        "big.bin": os.urandom(20 * MIB + 123),  # above HF_MULTIPART_THRESHOLD (16 MiB): multipart transfer
        "empty.txt": b"",  # sent inline (regular) by the client
    }
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    info = api.upload_folder(folder_path=src, repo_id=repo_id)
    out = Path(snapshot_download(repo_id, endpoint=base, token=dev.api_key, cache_dir=tmp_path / "cache"))
    got = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert got == files
    assert api.model_info(repo_id).sha == info.oid
    # the multipart object went through ingest like any upload: verified sha256 and size
    sib = {s.rfilename: s for s in api.model_info(repo_id, files_metadata=True).siblings}
    assert sib["big.bin"].lfs.sha256 == hashlib.sha256(files["big.bin"]).hexdigest()
    assert sib["big.bin"].size == len(files["big.bin"])
    # unchanged files are not uploaded again: a second upload_folder is a no-op commit
    again = api.upload_folder(folder_path=src, repo_id=repo_id)
    assert again.oid == info.oid


def test_hf_upload_cli(registry: Registry, base: str, tmp_path: Path) -> None:
    dev = registry.register("Cli")
    repo_id = f"ns{os.urandom(5).hex()}/cli-{os.urandom(3).hex()}"
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_bytes(b'{"a": 1}')
    env = {
        **os.environ,
        "HF_ENDPOINT": base,
        "HF_TOKEN": dev.api_key,
        "HF_HOME": str(tmp_path / "home"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    hf = Path(sys.executable).parent / "hf"
    r = subprocess.run(
        [str(hf), "upload", repo_id, str(tmp_path / "m"), "."], env=env, capture_output=True, text=True, timeout=180
    )
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run(
        [str(hf), "download", repo_id, "config.json", "--local-dir", str(tmp_path / "d")],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "d" / "config.json").read_bytes() == b'{"a": 1}'


def test_other_developer_cannot_push(registry: Registry, base: str) -> None:
    dev, api, repo_id = _new_repo(registry, base)
    api.upload_file(path_or_fileobj=b"mine", path_in_repo="a.txt", repo_id=repo_id)
    other = registry.register("Other")
    other_api = HfApi(endpoint=base, token=other.api_key)
    with pytest.raises(HfHubHTTPError) as err:
        other_api.upload_file(path_or_fileobj=b"theirs", path_in_repo="a.txt", repo_id=repo_id)
    assert err.value.response.status_code == 404  # a private repo of someone else does not exist for them
    with pytest.raises(HfHubHTTPError) as err:
        other_api.create_repo(f"{repo_id.split('/')[0]}/squat")
    assert err.value.response.status_code == 403
    platform = registry.create_user("platform")
    registry.grant(platform, repo_id)
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=base, token=platform.api_key).upload_file(
            path_or_fileobj=b"x", path_in_repo="a.txt", repo_id=repo_id
        )
    assert err.value.response.status_code == 403
    assert HfApi(endpoint=base, token=dev.api_key).list_repo_files(repo_id) == ["a.txt"]


def _lfs_put(base: str, acc: Account, repo_id: str, oid: str, size: int, data: bytes) -> None:
    r = httpx.post(
        f"{base}/{repo_id}.git/info/lfs/objects/batch",
        headers=_bearer(acc),
        json={"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": size}]},
    )
    assert r.status_code == 200, r.text
    href = r.json()["objects"][0]["actions"]["upload"]["href"]
    assert httpx.put(href, content=data).status_code == 200


def _commit(
    base: str, acc: Account, repo_id: str, lines: list[dict], header: dict | None = None, **kw: object
) -> httpx.Response:
    head = {"key": "header", "value": header or {"summary": "t"}}
    body = b"".join(json.dumps(x).encode() + b"\n" for x in [head, *lines])
    return httpx.post(
        f"{base}/api/models/{repo_id}/commit/main",
        headers={**_bearer(acc), "content-type": "application/x-ndjson"},
        content=body,
        timeout=180,
        **kw,
    )


def test_rejected_upload_is_never_resolvable(registry: Registry, base: str, tmp_path: Path) -> None:
    dev, api, repo_id = _new_repo(registry, base)
    good = api.upload_file(path_or_fileobj=b"good", path_in_repo="ok.txt", repo_id=repo_id)
    declared = os.urandom(100)
    oid = hashlib.sha256(declared).hexdigest()
    _lfs_put(base, dev, repo_id, oid, 100, os.urandom(100))  # other bytes than the oid declares
    r = _commit(
        base,
        dev,
        repo_id,
        [{"key": "lfsFile", "value": {"path": "evil.bin", "algo": "sha256", "oid": oid, "size": 100}}],
    )
    assert r.status_code == 422 and r.headers["x-error-code"] == "UploadRejected", r.text
    # main did not move; the file resolves nowhere, not even by the failed version's name
    assert api.model_info(repo_id).sha == good.oid
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "evil.bin", endpoint=base, token=dev.api_key, cache_dir=tmp_path)
    versions = registry.http.get(f"/v1/dev/models/{repo_id}/versions", headers=dev.headers).json()["items"]
    for v in versions:
        h = httpx.head(f"{base}/{repo_id}/resolve/{v['version']}/evil.bin", headers=_bearer(dev))
        assert h.status_code == 404 and h.headers["x-error-code"] in ("EntryNotFound", "RevisionNotFound")


def test_commit_bad_input(registry: Registry, base: str) -> None:
    dev, api, repo_id = _new_repo(registry, base)
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
    before = registry.http.get(f"/v1/dev/models/{repo_id}/versions", headers=dev.headers).json()["items"]
    never = hashlib.sha256(b"never uploaded").hexdigest()
    cases = [
        (
            [{"key": "lfsFile", "value": {"path": "a.bin", "algo": "sha256", "oid": never, "size": 14}}],
            422,
            "LfsObjectNotFound",
        ),
        (
            [{"key": "file", "value": {"path": "../escape.txt", "content": "eA==", "encoding": "base64"}}],
            400,
            "InvalidPath",
        ),
        ([{"key": "file", "value": {"path": "a/./b", "content": "eA==", "encoding": "base64"}}], 400, "InvalidPath"),
        ([{"key": "file", "value": {"path": "ok.txt", "content": "%%%", "encoding": "base64"}}], 400, "BadRequest"),
        ([{"key": "lfsFile", "value": {"path": "b.bin", "oid": "nothex", "size": 1}}], 400, "InvalidOid"),
        ([{"key": "deletedFile", "value": {"path": "nope.txt"}}], 404, "EntryNotFound"),
        ([{"key": "surprise", "value": {}}], 400, "BadRequest"),
    ]
    for lines, status, code in cases:
        r = _commit(base, dev, repo_id, lines)
        assert (r.status_code, r.headers.get("x-error-code")) == (status, code), (lines, r.text)
    big = base64.b64encode(os.urandom(13 * MIB)).decode()  # > HF_COMMIT_MAX_BYTES (16 MiB) once encoded
    r = _commit(
        base, dev, repo_id, [{"key": "file", "value": {"path": "big.txt", "content": big, "encoding": "base64"}}]
    )
    assert r.status_code == 413 and r.headers["x-error-code"] == "PayloadTooLarge"
    add = [{"key": "file", "value": {"path": "y.txt", "content": "eA==", "encoding": "base64"}}]
    r = _commit(base, dev, repo_id, add, header={"summary": "t", "parentCommit": "0" * 40})
    assert r.status_code == 412 and r.headers["x-error-code"] == "ParentCommitMismatch"
    r = _commit(base, dev, repo_id, [])  # changes nothing
    assert r.status_code == 400 and r.headers["x-error-code"] == "BadRequest"
    r = httpx.post(f"{base}/api/models/{repo_id}/commit/v1", headers=_bearer(dev), content=b"")
    assert r.status_code == 404 and r.headers["x-error-code"] == "RevisionNotFound"
    # nothing was written: no new version
    after = registry.http.get(f"/v1/dev/models/{repo_id}/versions", headers=dev.headers).json()["items"]
    assert after == before


def test_multipart_part_list_must_match(registry: Registry, base: str) -> None:
    dev, _api, repo_id = _new_repo(registry, base)
    data = os.urandom(17 * MIB)
    oid = hashlib.sha256(data).hexdigest()
    r = httpx.post(
        f"{base}/{repo_id}.git/info/lfs/objects/batch",
        headers=_bearer(dev),
        json={"operation": "upload", "transfers": ["basic", "multipart"], "objects": [{"oid": oid, "size": len(data)}]},
    )
    assert r.status_code == 200, r.text
    action = r.json()["objects"][0]["actions"]["upload"]
    chunk = int(action["header"]["chunk_size"])
    urls = [v for k, v in sorted(action["header"].items()) if k.isdigit()]
    assert len(urls) == -(-len(data) // chunk) >= 2
    etags = [
        httpx.put(u, content=data[i * chunk : (i + 1) * chunk], timeout=60).headers["etag"] for i, u in enumerate(urls)
    ]
    # the completion URL authorizes itself; a wrong part list is refused and the upload aborted
    bad = {"oid": oid, "parts": [{"partNumber": 1, "etag": etags[0]}]}
    r = httpx.post(action["href"], json=bad)
    assert r.status_code == 400 and r.headers["x-error-code"] == "PartsMismatch", r.text
    swapped = {"oid": oid, "parts": [{"partNumber": i + 1, "etag": e} for i, e in enumerate(reversed(etags))]}
    r = httpx.post(action["href"], json=swapped)
    assert r.status_code in (400, 404), r.text
    r = _commit(
        base,
        dev,
        repo_id,
        [{"key": "lfsFile", "value": {"path": "m.bin", "algo": "sha256", "oid": oid, "size": len(data)}}],
    )
    assert r.status_code == 422 and r.headers["x-error-code"] == "LfsObjectNotFound"
    # a tampered completion URL is refused
    r = httpx.post(action["href"][:-3] + "abc", json={"oid": oid, "parts": []})
    assert r.status_code == 403


def test_xet_is_refused_with_a_clear_message(registry: Registry, base: str, tmp_path: Path) -> None:
    dev, api, repo_id = _new_repo(registry, base)
    r = httpx.get(f"{base}/api/models/{repo_id}/xet-write-token/main", headers=_bearer(dev))
    assert r.status_code == 400 and r.headers["x-error-code"] == "XetNotSupported"
    assert "HF_HUB_DISABLE_XET=1" in r.headers["x-error-message"]
    # the client itself (hf_xet installed, Xet not disabled) stops at that answer and names it
    code = f"from huggingface_hub import HfApi; HfApi().upload_file(path_or_fileobj=b'x', path_in_repo='a', repo_id={repo_id!r})"
    env = {**os.environ, "HF_ENDPOINT": base, "HF_TOKEN": dev.api_key, "HF_HOME": str(tmp_path / "home")}
    env.pop("HF_HUB_DISABLE_XET", None)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode != 0
    assert "400" in r.stderr and "xet-write-token" in r.stderr, r.stderr[-2000:]
    assert api.list_repo_files(repo_id) == []


def test_validate_yaml_and_readme(registry: Registry, base: str) -> None:
    _dev, api, repo_id = _new_repo(registry, base)
    api.upload_file(path_or_fileobj=b"---\nlicense: mit\n---\n# card\n", path_in_repo="README.md", repo_id=repo_id)
    with pytest.raises(ValueError, match="invalid YAML"):
        api.upload_file(path_or_fileobj=b"---\nlicense: [mit\n---\n# card\n", path_in_repo="README.md", repo_id=repo_id)
    assert api.list_repo_files(repo_id) == ["README.md"]


def test_read_only_key_cannot_write(registry: Registry, base: str) -> None:
    """A read-only key (issue 15) reads through /hf but gets 403 on every state-changing call."""
    dev, api, repo_id = _new_repo(registry, base)
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
    r = registry.http.patch(f"/v1/dev/models/{repo_id}", headers=dev.headers, json={"visibility": "public"})
    assert r.status_code == 200, r.text
    email = f"ro-{os.urandom(6).hex()}@partner.example"
    body = {"email": email, "name": "ReadOnly", "role": "developer", "key_scope": "read-only"}
    r = registry.http.post("/v1/admin/users", headers=registry.admin, json=body)
    assert r.status_code == 200, r.text
    ro = Account(r.json()["user_id"], r.json()["api_key"], email, "developer")
    own = f"ro{os.urandom(5).hex()}/m"
    oid = hashlib.sha256(b"y").hexdigest()
    line = {"key": "file", "value": {"path": "y.txt", "content": "eQ==", "encoding": "base64"}}
    commit = b"\n".join(json.dumps(x).encode() for x in ({"key": "header", "value": {"summary": "s"}}, line))
    calls = [
        ("/api/repos/create", {"json": {"name": own.split("/")[1], "organization": own.split("/")[0]}}),
        (f"/api/models/{repo_id}/preupload/main", {"json": {"files": [{"path": "y.txt", "size": 1}]}}),
        (
            f"/{repo_id}.git/info/lfs/objects/batch",
            {"json": {"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": 1}]}},
        ),
        (
            f"/api/models/{repo_id}/commit/main",
            {"content": commit, "headers": {"content-type": "application/x-ndjson"}},
        ),
    ]
    for path, kwargs in calls:
        headers = {**_bearer(ro), **kwargs.pop("headers", {})}
        r = httpx.post(f"{base}{path}", headers=headers, **kwargs)
        assert (r.status_code, r.headers.get("x-error-code")) == (403, "Forbidden"), (path, r.text)
        assert r.json()["detail"] == "api key is read-only"
    ro_api = HfApi(endpoint=base, token=ro.api_key)
    with pytest.raises(HfHubHTTPError) as err:
        ro_api.create_repo(own)
    assert err.value.response.status_code == 403
    # nothing was written; reads still work with the read-only key (paths-info is a read sent as POST)
    assert registry.http.get(f"/v1/models/{own}", headers=registry.admin).status_code == 404
    assert api.list_repo_files(repo_id) == ["x.txt"]
    r = httpx.post(f"{base}/api/models/{repo_id}/paths-info/main", headers=_bearer(ro), data={"paths": ["x.txt"]})
    assert r.status_code == 200 and [e["path"] for e in r.json()] == ["x.txt"], r.text
    assert [f.rfilename for f in ro_api.model_info(repo_id).siblings or []] == ["x.txt"]
    r = httpx.post(f"{base}/api/validate-yaml", headers=_bearer(ro), json={"content": "---\na: 1\n---\n"})
    assert r.status_code == 200, r.text


def test_upload_under_another_case_of_the_repo_id(registry: Registry, base: str, tmp_path: Path) -> None:
    """Repo ids are case-insensitive (issue 11): an upload naming the repository in another case lands in
    the model (its objects, commit URL and events under the model's own spelling)."""
    dev, api, repo_id = _new_repo(registry, base)
    other = repo_id.upper()
    data = _safetensors(2000)
    info = api.upload_file(path_or_fileobj=data, path_in_repo="w.safetensors", repo_id=other)
    assert f"/{repo_id}/commit/" in info.commit_url, info.commit_url
    # the LFS object staged under one spelling is found by a commit naming another
    more = _safetensors(1500)
    oid = hashlib.sha256(more).hexdigest()
    r = httpx.post(
        f"{base}/{repo_id.lower()}.git/info/lfs/objects/batch",
        headers=_bearer(dev),
        json={"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": len(more)}]},
    )
    assert r.status_code == 200, r.text
    put = r.json()["objects"][0]["actions"]["upload"]
    assert httpx.put(put["href"], content=more, headers=put.get("header") or {}).status_code == 200
    lines = [{"key": "lfsFile", "value": {"path": "r.safetensors", "algo": "sha256", "oid": oid, "size": len(more)}}]
    r = _commit(base, dev, other, lines)
    assert r.status_code == 200, r.text
    path = hf_hub_download(repo_id, "r.safetensors", endpoint=base, token=dev.api_key, cache_dir=tmp_path)
    assert Path(path).read_bytes() == more
    assert sorted(api.list_repo_files(repo_id)) == ["r.safetensors", "w.safetensors"]


def test_hf_bodies_follow_the_text_rule(registry: Registry, base: str) -> None:
    """The api's rule for text (kit.text) holds for /hf bodies too, also those read by hand: a body that is
    not UTF-8 JSON answers 422 `invalid JSON body`, text holding NUL answers 422; nothing is written."""
    dev, api, repo_id = _new_repo(registry, base)
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
    before = registry.http.get(f"/v1/dev/models/{repo_id}/versions", headers=dev.headers).json()["items"]
    commit_url = f"{base}/api/models/{repo_id}/commit/main"
    ndjson = {**_bearer(dev), "content-type": "application/x-ndjson"}
    head = json.dumps({"key": "header", "value": {"summary": "t"}}).encode()
    add = json.dumps({"key": "file", "value": {"path": "y.txt", "content": "eQ==", "encoding": "base64"}}).encode()
    r = httpx.post(commit_url, headers=ndjson, content=head + b"\n" + add[:-2] + b'\xff"}')
    assert (r.status_code, r.json()["detail"]) == (422, "invalid JSON body: line 2"), r.text
    r = httpx.post(commit_url, headers=ndjson, content=b"{not json\n" + add)
    assert (r.status_code, r.json()["detail"]) == (422, "invalid JSON body: line 1"), r.text
    nul = json.dumps({"key": "header", "value": {"summary": "a\u0000b"}}).encode()
    r = httpx.post(commit_url, headers=ndjson, content=nul + b"\n" + add)
    assert r.status_code == 422 and r.json()["detail"].startswith("line 1: value.summary: text must not contain NUL")
    assert r.headers["x-error-code"] == "BadRequest"
    # LFS bodies are read by hand, whatever their content type
    for url in (f"{base}/{repo_id}.git/info/lfs/objects/batch", f"{base}/api/lfs/complete/x.y"):
        for content, ctype in ((b"\xff{}", "application/vnd.git-lfs+json"), (b"{oops", "text/plain"), (b"", None)):
            headers = {**_bearer(dev), **({"content-type": ctype} if ctype else {})}
            r = httpx.post(url, headers=headers, content=content)
            assert (r.status_code, r.json()["detail"]) == (422, "invalid JSON body"), (url, content, r.text)
    # paths-info takes form fields: NUL in one answers 422
    r = httpx.post(f"{base}/api/models/{repo_id}/paths-info/main", headers=_bearer(dev), data={"paths": ["a\x00b"]})
    assert r.status_code == 422 and "NUL" in r.json()["detail"], r.text
    after = registry.http.get(f"/v1/dev/models/{repo_id}/versions", headers=dev.headers).json()["items"]
    assert after == before


def test_validate_yaml_refuses_unconstructible_scalars(registry: Registry, base: str) -> None:
    """A scalar its YAML tag cannot build (an impossible date, `!!int x`) or nesting too deep for the parser
    is bad input: 400 InvalidYaml with the message the client shows, never a 5xx."""
    dev = registry.register("Yaml")
    for header in ("a: 2020-13-45", "a: !!int x", "a: !!float x", "[" * 5000):
        r = httpx.post(
            f"{base}/api/validate-yaml", headers=_bearer(dev), json={"content": f"---\n{header}\n---\n# card\n"}
        )
        assert (r.status_code, r.headers.get("x-error-code")) == (400, "InvalidYaml"), (header[:20], r.text)
        assert r.json()["errors"][0]["message"].startswith("invalid YAML"), r.text
