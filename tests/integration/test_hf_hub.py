"""The official `huggingface_hub` client, its `hf` CLI and `transformers` against the running stack's /hf
surface: downloads, model info and listings, uploads through the LFS batch API and the ndjson commit, the
authorization matrix, verification and usage counting. Real servers, no mocks, no network beyond loopback.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import Account, Registry
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import _detect_agent


def _localhost_works(port: int) -> bool:
    try:
        httpx.get(f"http://localhost:{port}/healthz", timeout=2)
        return True
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def endpoints(api_base_url: str) -> dict[str, str]:
    """The two layouts: api and MinIO on different host names (api on `localhost`, presigned URLs on
    127.0.0.1) and on the same host name (127.0.0.1 for both)."""
    port = urlsplit(api_base_url).port
    assert port is not None
    out = {"same_host": f"http://127.0.0.1:{port}/hf"}
    if _localhost_works(port):
        out["other_host"] = f"http://localhost:{port}/hf"
    return out


@pytest.fixture(params=["same_host", "other_host"])
def endpoint(request: pytest.FixtureRequest, endpoints: dict[str, str]) -> str:
    if request.param not in endpoints:
        pytest.fail("localhost does not reach the api on this machine: the other-host layout cannot be tested")
    return endpoints[request.param]


@pytest.fixture(autouse=True)
def _no_xet(monkeypatch: pytest.MonkeyPatch, api_base_url: str) -> None:
    """The registry stores files through Git LFS: the client is told not to use Xet (README). Its agent
    registry (fetched from huggingface.co on first use) is set empty: nothing leaves loopback."""
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(_detect_agent, "_registry", _detect_agent._EMPTY_REGISTRY)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


FILES = {
    "config.json": json.dumps({"model_type": "bert", "hidden_size": 32}).encode(),
    "weights/part-1.bin": os.urandom(3000),
    "weights/deep/part-2.bin": os.urandom(1234),
    "README.md": b"# tiny\n",
}


@pytest.fixture(scope="module")
def published(registry: Registry) -> tuple[Account, str, dict[str, bytes]]:
    """A private model with a verified multi-file version v1 (nested folders), published natively."""
    dev = registry.register("HfDev")
    repo_id = registry.create_model(dev, visibility="private")
    registry.create_version(dev, repo_id, "v1")
    for name, data in FILES.items():
        registry.publish(dev, repo_id, "v1", name, data)
    return dev, repo_id, FILES


# ---------------------------------------------------------------- download side


def test_hf_hub_download_both_layouts(
    published: tuple[Account, str, dict[str, bytes]], endpoint: str, tmp_path: Path
) -> None:
    dev, repo_id, files = published
    path = hf_hub_download(repo_id, "weights/deep/part-2.bin", endpoint=endpoint, token=dev.api_key, cache_dir=tmp_path)
    assert Path(path).read_bytes() == files["weights/deep/part-2.bin"]
    # The metadata came from /hf, not from the object store: the etag is the verified sha256.
    blob = Path(path).resolve()
    assert blob.name == _sha(files["weights/deep/part-2.bin"])
    # A re-run is answered from the cache: same file, no second blob.
    again = hf_hub_download(
        repo_id, "weights/deep/part-2.bin", endpoint=endpoint, token=dev.api_key, cache_dir=tmp_path
    )
    assert again == path
    assert len(list((tmp_path / f"models--{repo_id.replace('/', '--')}" / "blobs").iterdir())) == 1
    # local_dir: the file lands under its own path; the second run keeps it.
    local = tmp_path / "local"
    p = hf_hub_download(repo_id, "config.json", endpoint=endpoint, token=dev.api_key, local_dir=local)
    assert Path(p) == local / "config.json" and Path(p).read_bytes() == files["config.json"]
    mtime = Path(p).stat().st_mtime_ns
    p2 = hf_hub_download(repo_id, "config.json", endpoint=endpoint, token=dev.api_key, local_dir=local)
    assert Path(p2).stat().st_mtime_ns == mtime


def test_resolve_headers(published: tuple[Account, str, dict[str, bytes]], endpoints: dict[str, str]) -> None:
    dev, repo_id, files = published
    data = files["config.json"]
    for name, base in endpoints.items():
        url = f"{base}/{repo_id}/resolve/main/config.json"
        headers = {"authorization": f"Bearer {dev.api_key}"}
        head = httpx.head(url, headers=headers)
        get = httpx.get(url, headers=headers)
        assert get.status_code == 302, (name, get.text)
        for r in (head, get):
            assert r.headers["x-linked-etag"] == f'"{_sha(data)}"'
            assert r.headers["etag"] == f'"{_sha(data)}"'
            assert r.headers["x-linked-size"] == str(len(data))
            assert len(r.headers["x-repo-commit"]) == 40
            assert r.headers["location"].startswith("http://")
        if name == "same_host":
            # a client following same-host redirects has nothing to follow: the metadata is on this answer
            assert head.status_code == 200
        else:
            assert head.status_code == 302
        assert httpx.get(get.headers["location"]).content == data
    # x-api-key works as on /v1
    assert httpx.head(
        f"{endpoints['same_host']}/{repo_id}/resolve/v1/config.json", headers=dev.headers
    ).status_code in (200, 302)


def test_repo_id_is_case_insensitive(
    published: tuple[Account, str, dict[str, bytes]], endpoints: dict[str, str], tmp_path: Path
) -> None:
    """Repo ids are case-insensitive (issue 11): /hf finds the model whatever the case it is named in, and
    answers with the model's own spelling."""
    dev, repo_id, files = published
    other = repo_id.upper()
    assert other != repo_id
    base = endpoints["same_host"]
    r = httpx.get(f"{base}/{other}/resolve/main/config.json", headers={"authorization": f"Bearer {dev.api_key}"})
    assert r.status_code == 302, r.text
    assert r.headers["x-linked-etag"] == f'"{_sha(files["config.json"])}"'
    path = hf_hub_download(other, "config.json", endpoint=base, token=dev.api_key, cache_dir=tmp_path)
    assert Path(path).read_bytes() == files["config.json"]
    api = HfApi(endpoint=base, token=dev.api_key)
    info = api.model_info(other)
    assert info.id == repo_id and info.author == repo_id.split("/")[0]
    assert sorted(s.rfilename for s in info.siblings or []) == sorted(files)
    assert api.model_info(other, revision="v1").id == repo_id
    assert sorted(api.list_repo_files(other)) == sorted(files)


def test_revisions(published: tuple[Account, str, dict[str, bytes]], endpoints: dict[str, str], tmp_path: Path) -> None:
    dev, repo_id, files = published
    api = HfApi(endpoint=endpoints["same_host"], token=dev.api_key)
    info = api.model_info(repo_id)
    sha = info.sha
    assert sha and len(sha) == 40
    assert api.model_info(repo_id, revision="v1").sha == sha
    assert api.model_info(repo_id, revision=sha).sha == sha
    assert api.model_info(repo_id, revision="refs/heads/main").sha == sha  # sent %2F-encoded
    for rev in ("v1", sha, "main"):
        p = hf_hub_download(
            repo_id, "README.md", revision=rev, endpoint=endpoints["same_host"], token=dev.api_key, cache_dir=tmp_path
        )
        assert Path(p).read_bytes() == files["README.md"]
    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo_id, revision="v999")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(
            repo_id,
            "README.md",
            revision="0" * 40,
            endpoint=endpoints["same_host"],
            token=dev.api_key,
            cache_dir=tmp_path,
        )
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "nope.txt", endpoint=endpoints["same_host"], token=dev.api_key, cache_dir=tmp_path)


def _raw_head(url: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    """HEAD with the path sent exactly as written (httpx would normalize '..' away)."""
    import http.client

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("HEAD", parts.path, headers=headers)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}
    finally:
        conn.close()


def test_bad_paths(published: tuple[Account, str, dict[str, bytes]], endpoints: dict[str, str]) -> None:
    dev, repo_id, _ = published
    base = endpoints["same_host"]
    h = {"authorization": f"Bearer {dev.api_key}"}
    for raw in ("weights/%2E%2E/config.json", "weights%2Fpart-1.bin", "a/../config.json"):
        status, headers = _raw_head(f"{base}/{repo_id}/resolve/main/{raw}", h)
        assert status == 400, (raw, status)
        assert headers["x-error-code"] == "InvalidPath", raw
    r = httpx.get(f"{base}/{repo_id}/resolve/weird%20rev/config.json", headers=h)
    assert r.status_code == 404 and r.headers["x-error-code"] == "RevisionNotFound"
    r = httpx.get(f"{base}/{repo_id}/resolve/main/missing.txt", headers=h)
    assert r.status_code == 404 and r.headers["x-error-code"] == "EntryNotFound" and "x-repo-commit" in r.headers


def test_snapshot_info_tree_and_listing(
    published: tuple[Account, str, dict[str, bytes]], endpoint: str, tmp_path: Path
) -> None:
    dev, repo_id, files = published
    folder = Path(snapshot_download(repo_id, endpoint=endpoint, token=dev.api_key, cache_dir=tmp_path))
    got = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert got == files
    api = HfApi(endpoint=endpoint, token=dev.api_key)
    info = api.model_info(repo_id, files_metadata=True)
    assert info.id == repo_id and info.private is True
    assert {s.rfilename for s in info.siblings} == set(files)
    assert {s.rfilename: s.lfs.sha256 for s in info.siblings} == {k: _sha(v) for k, v in files.items()}
    tree = list(api.list_repo_tree(repo_id, recursive=True))
    assert {t.path for t in tree} == {*files, "weights", "weights/deep"}
    assert {t.path for t in api.list_repo_tree(repo_id, path_in_repo="weights")} == {
        "weights/part-1.bin",
        "weights/deep",
    }
    paths = api.get_paths_info(repo_id, ["config.json", "weights", "absent"])
    assert sorted(p.path for p in paths) == ["config.json", "weights"]
    assert any(m.id == repo_id for m in api.list_models(author=repo_id.split("/")[0]))
    assert [m.id for m in api.list_models(search=repo_id.split("/")[1])] == [repo_id]
    assert api.whoami()["email"] == dev.email


def test_tree_pagination_link_is_absolute(
    published: tuple[Account, str, dict[str, bytes]], endpoints: dict[str, str]
) -> None:
    dev, repo_id, files = published
    base = endpoints["same_host"]
    h = {"authorization": f"Bearer {dev.api_key}"}
    url, seen = f"{base}/api/models/{repo_id}/tree/main?recursive=true&limit=2", []
    while url:
        r = httpx.get(url, headers=h)
        assert r.status_code == 200, r.text
        seen += [e["path"] for e in r.json()]
        url = r.links.get("next", {}).get("url")
        if url:
            assert url.startswith(base + "/api/models/")
    assert sorted(seen) == sorted([*files, "weights", "weights/deep"])


def test_list_models_pagination(registry: Registry, endpoints: dict[str, str]) -> None:
    dev = registry.register("Lister")
    ns = f"ns{os.urandom(5).hex()}"
    repos = set()
    for i in range(5):
        r = registry.http.post(
            "/v1/dev/models",
            headers=dev.headers,
            json={"repo_id": f"{ns}/m{i}", "model_name": f"M{i}", "visibility": "private"},
        )
        assert r.status_code == 201, r.text
        repos.add(f"{ns}/m{i}")
    base = endpoints["same_host"]
    url, seen, pages = f"{base}/api/models?author={ns}&limit=2", [], 0
    while url:
        r = httpx.get(url, headers={"authorization": f"Bearer {dev.api_key}"})
        assert r.status_code == 200, r.text
        assert len(r.json()) <= 2
        seen += [m["id"] for m in r.json()]
        pages += 1
        url = r.links.get("next", {}).get("url")
        assert url is None or url.startswith(f"{base}/api/models?")
    assert pages == 3 and sorted(seen) == sorted(repos)
    api = HfApi(endpoint=base, token=dev.api_key)
    assert {m.id for m in api.list_models(author=ns)} == repos
    assert len(list(api.list_models(author=ns, limit=3))) == 3
    # another developer's private models are not listed
    assert list(HfApi(endpoint=base, token=registry.register("Nosy").api_key).list_models(author=ns)) == []


def _hf_env(token: str, endpoint: str, home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "HF_ENDPOINT": endpoint,
        "HF_TOKEN": token,
        "HF_HOME": str(home),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    }


def test_hf_cli_download(
    published: tuple[Account, str, dict[str, bytes]], endpoints: dict[str, str], tmp_path: Path
) -> None:
    dev, repo_id, files = published
    hf = Path(sys.executable).parent / "hf"
    out = tmp_path / "out"
    r = subprocess.run(
        [str(hf), "download", repo_id, "--local-dir", str(out)],
        env=_hf_env(dev.api_key, endpoints["same_host"], tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert {
        str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file() and ".cache" not in p.parts
    } == files


def test_transformers_autoconfig_and_tokenizer(registry: Registry, endpoints: dict[str, str], tmp_path: Path) -> None:
    """A tiny BERT config and WordPiece tokenizer written by the test, published, then loaded by transformers."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    dev = registry.register("Tf")
    repo_id = registry.create_model(dev)
    registry.create_version(dev, repo_id, "v1")
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "registry"])}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    files = {
        "config.json": json.dumps(
            {
                "model_type": "bert",
                "vocab_size": 8,
                "hidden_size": 16,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 32,
            }
        ).encode(),
        "tokenizer.json": tok.to_str().encode(),
        "tokenizer_config.json": json.dumps(
            {
                "tokenizer_class": "BertTokenizerFast",
                "unk_token": "[UNK]",
                "pad_token": "[PAD]",
                "cls_token": "[CLS]",
                "sep_token": "[SEP]",
                "mask_token": "[MASK]",
                "do_lower_case": True,
            }
        ).encode(),
    }
    for name, data in files.items():
        registry.publish(dev, repo_id, "v1", name, data)
    code = (
        "import sys\n"
        "from transformers import AutoConfig, AutoTokenizer\n"
        f"c = AutoConfig.from_pretrained({repo_id!r})\n"
        f"t = AutoTokenizer.from_pretrained({repo_id!r})\n"
        "print(c.model_type, c.hidden_size, t('hello registry')['input_ids'])\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        env=_hf_env(dev.api_key, endpoints["same_host"], tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "bert 16 [2, 5, 7, 3]"


# ---------------------------------------------------------------- authorization


def test_authorization_matrix(registry: Registry, endpoints: dict[str, str], tmp_path: Path) -> None:
    dev = registry.register("Owner")
    repo_id = registry.create_model(dev, visibility="private")
    registry.create_version(dev, repo_id, "v1")
    registry.publish(dev, repo_id, "v1", "config.json", b"{}")
    base = endpoints["same_host"]

    def fetch(acc: Account) -> str:
        return hf_hub_download(
            repo_id, "config.json", endpoint=base, token=acc.api_key, cache_dir=tmp_path / acc.email, etag_timeout=30
        )

    stranger = registry.create_user("platform")
    with pytest.raises(RepositoryNotFoundError):
        fetch(stranger)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=base, token=stranger.api_key).model_info(repo_id)
    # the same answer as a repo that does not exist at all
    r1 = httpx.head(
        f"{base}/{repo_id}/resolve/main/config.json", headers={"authorization": f"Bearer {stranger.api_key}"}
    )
    r2 = httpx.head(
        f"{base}/nobody/nothing/resolve/main/config.json", headers={"authorization": f"Bearer {stranger.api_key}"}
    )
    assert (
        (r1.status_code, r1.headers["x-error-code"], r1.content)
        == (r2.status_code, r2.headers["x-error-code"], r2.content)
        == (404, "RepoNotFound", r2.content)
    )

    later = registry.create_user("platform")
    registry.grant(later, repo_id, from_ts=int(time.time()) + 3600)
    with pytest.raises(RepositoryNotFoundError):
        fetch(later)

    granted = registry.create_user("platform")
    grant = registry.grant(granted, repo_id)
    assert Path(fetch(granted)).read_bytes() == b"{}"

    # a revoked grant ends access at once (the cached resolve is dropped with it)
    revoked = registry.create_user("platform")
    g = registry.grant(revoked, repo_id)
    url = f"{base}/{repo_id}/resolve/main/config.json"
    assert httpx.head(url, headers={"authorization": f"Bearer {revoked.api_key}"}).status_code == 200
    assert registry.http.delete(f"/v1/admin/grants/{g['grant_id']}", headers=registry.admin).status_code == 200
    r = httpx.head(url, headers={"authorization": f"Bearer {revoked.api_key}"})
    assert (r.status_code, r.headers["x-error-code"]) == (404, "RepoNotFound")
    assert grant["grant_id"] != g["grant_id"]

    # a rotated (revoked) key stops working at once
    r = registry.http.post("/v1/users/rotate-key", headers=granted.headers)
    assert r.status_code == 200, r.text
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=base, token=granted.api_key).model_info(repo_id)
    assert err.value.response.status_code == 401
    assert (
        httpx.head(
            f"{base}/{repo_id}/resolve/main/config.json", headers={"authorization": f"Bearer {granted.api_key}"}
        ).status_code
        == 401
    )


# ---------------------------------------------------------------- usage


def test_resolves_are_counted_as_downloads(registry: Registry, endpoints: dict[str, str]) -> None:
    dev = registry.register("Counter")
    repo_id = registry.create_model(dev)
    registry.create_version(dev, repo_id, "v1")
    registry.publish(dev, repo_id, "v1", "a.bin", b"abc")
    platform = registry.create_user("platform")
    registry.grant(platform, repo_id)
    n = 7
    h = {"authorization": f"Bearer {platform.api_key}"}
    for _ in range(n):
        assert httpx.head(f"{endpoints['same_host']}/{repo_id}/resolve/main/a.bin", headers=h).status_code in (200, 302)
    # an error is not a download
    assert httpx.head(f"{endpoints['same_host']}/{repo_id}/resolve/main/b.bin", headers=h).status_code == 404
    deadline = time.monotonic() + 60
    while True:
        r = registry.http.get("/v1/users/me/usage", headers=platform.headers)
        assert r.status_code == 200, r.text
        body = r.json()
        downloads = _downloads(body)
        if downloads == n or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert downloads == n, body


def _downloads(usage: dict) -> int:
    return usage["totals"]["downloads"]


async def test_resolve_fast_path_and_documented_route_answer_alike(
    published: tuple[Account, str, dict[str, bytes]], registry: Registry
) -> None:
    """HfResolve (plain ASGI ahead of routing) answers as the documented route does, case by case."""
    from registry_api.app import create_app
    from registry_api.settings import ApiSettings

    dev, repo_id, _ = published
    stranger = registry.create_user("platform")
    bearer = {"authorization": f"Bearer {dev.api_key}"}
    base = f"/hf/{repo_id}/resolve"
    cases = [
        ("HEAD", f"{base}/main/config.json", bearer),
        ("GET", f"{base}/main/config.json", bearer),
        ("HEAD", f"{base}/main/config.json", {**bearer, "host": "127.0.0.1:8081"}),  # the store's host name
        ("GET", f"{base}/v1/weights/deep/part-2.bin", dev.headers),
        ("HEAD", f"{base}/refs%2Fheads%2Fmain/README.md", bearer),
        ("HEAD", f"{base}/v9/config.json", bearer),
        ("HEAD", f"{base}/main/absent.json", bearer),
        ("HEAD", f"{base}/main/weights%2Fpart-1.bin", bearer),
        ("HEAD", f"{base}/main/weights/%2E%2E/config.json", bearer),
        ("HEAD", f"{base}/main/config.json", {}),
        ("HEAD", f"{base}/main/config.json", {"authorization": "Bearer sk_live_nope"}),
        ("HEAD", f"{base}/main/config.json", {"authorization": f"Bearer {stranger.api_key}"}),
        ("HEAD", "/hf/nobody/nothing/resolve/main/config.json", bearer),
    ]

    def comparable(r: httpx.Response) -> tuple:
        headers = {k: v for k, v in r.headers.items() if k not in ("date", "x-request-id", "location")}
        location = r.headers.get("location")
        return r.status_code, headers, r.content, location.split("?")[0] if location else None

    settings = ApiSettings(outbox_relay=False, api_consume_events=False, api_run_migrations=False)
    fast, routed = create_app(settings), create_app(settings, fast_download=False)
    async with fast.router.lifespan_context(fast), routed.router.lifespan_context(routed):
        async with (
            httpx.AsyncClient(transport=httpx.ASGITransport(app=fast), base_url="http://api") as a,
            httpx.AsyncClient(transport=httpx.ASGITransport(app=routed), base_url="http://api") as b,
        ):
            seen = set()
            for method, path, headers in cases:
                ra, rb = await a.request(method, path, headers=headers), await b.request(method, path, headers=headers)
                assert comparable(ra) == comparable(rb), (method, path)
                seen.add((ra.status_code, ra.headers.get("x-error-code")))
    assert seen == {
        (200, None),
        (302, None),
        (404, "RevisionNotFound"),
        (404, "EntryNotFound"),
        (400, "InvalidPath"),
        (401, "Unauthorized"),
        (404, "RepoNotFound"),
    }, seen
