"""``hubload.pull`` end to end against the local servers: every source kind, pinning, tokens, HF cache reuse."""

from __future__ import annotations

import hashlib
import logging
import os
import random
from pathlib import Path

import pytest
import yaml

from hubload.cache import Cache
from hubload.errors import DownloadError, HashMismatchError, HubloadError, OfflineError, RegistryError
from hubload.fetch import cached_files, pull
from hubload.registry import load_registry
from tests.servers import MINILM_COMMIT, MINILM_REPO_ID, Fault, FileServer, HubServer

TOKEN = "hf_PullTestSecret0123456789abcdef"
REPO = "acme/gated-tiny"
COMMIT = "a" * 40


def _data(n: int, seed: int = 0) -> bytes:
    """Deterministic pseudo-random bytes."""
    return random.Random(seed).randbytes(n)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_registry(path: Path, models: dict) -> Path:
    """Write a version-1 registry YAML file and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"version": 1, "models": models}, sort_keys=False), encoding="utf-8")
    return path


def published(cache: Cache) -> list[Path]:
    """Every file under blobs/ and models/ (links included)."""
    out: list[Path] = []
    for top in (cache.blobs_dir, cache.models_dir):
        if top.exists():
            out += [p for p in top.rglob("*") if p.is_file() or p.is_symlink()]
    return out


def body_gets(server: FileServer | HubServer, pattern: str = "*") -> list:
    """GET requests that carried a body (status 200/206) on paths matching ``pattern``."""
    server.wait_idle()
    return [r for r in server.requests
            if r.method == "GET" and r.status in (200, 206) and r.bytes_sent and _match(r.path, pattern)]


def _match(path: str, pattern: str) -> bool:
    import fnmatch

    return fnmatch.fnmatchcase(path, pattern)


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    return Cache(os.environ["HUBLOAD_CACHE"])


# ------------------------------------------------------------------------------------------ https://


def test_https_source_pulls_verifies_and_warm_hit_is_silent(file_server, tmp_path, cache) -> None:
    data = _data(300_000)
    file_server.add("/models/w.safetensors", data)
    reg = write_registry(tmp_path / "r.yaml", {"tiny": {
        "source": file_server.url + "/models/", "format": "safetensors",
        "files": [{"path": "w.safetensors", "sha256": _sha(data), "size": len(data)}]}})
    out = pull("tiny", registry=reg)
    assert out["w.safetensors"].read_bytes() == data
    assert out["w.safetensors"].is_relative_to(cache.models_dir)
    assert cache.read_ref("tiny")["files"]["w.safetensors"]["sha256"] == _sha(data)
    assert len(body_gets(file_server)) == 1
    file_server.reset_log()
    assert pull("tiny", registry=reg) == out
    assert file_server.requests == []


def test_https_wrong_bytes_keep_nothing(file_server, tmp_path, cache) -> None:
    data = _data(200_000)
    file_server.add("/w.safetensors", data)
    file_server.inject("/w.safetensors", Fault("wrong_bytes", times=None))
    reg = write_registry(tmp_path / "r.yaml", {"tiny": {
        "source": file_server.url + "/", "files": [{"path": "w.safetensors", "sha256": _sha(data)}]}})
    with pytest.raises(HashMismatchError) as ei:
        pull("tiny", registry=reg)
    assert _sha(data) in str(ei.value) and ei.value.actual in str(ei.value) and "tiny" in str(ei.value)
    assert published(cache) == []
    assert cache.read_ref("tiny") is None


def test_sha256_prefix_only_file_is_recorded_and_warm_hit_is_silent(file_server, tmp_path, cache) -> None:
    data = _data(100_000, seed=3)
    file_server.add("/m/w-abc.pth", data)
    reg = write_registry(tmp_path / "r.yaml", {"prefixed": {
        "source": file_server.url + "/m/", "format": "torch",
        "files": [{"path": "w-abc.pth", "sha256_prefix": _sha(data)[:8], "size": len(data)}]}})
    entry = load_registry(reg).get("prefixed")
    assert entry.weakly_pinned and not entry.pinned
    out = pull("prefixed", registry=reg)
    assert out["w-abc.pth"].read_bytes() == data
    # The full digest computed while streaming is what later warm hits trust.
    assert cache.read_ref("prefixed")["files"]["w-abc.pth"]["sha256"] == _sha(data)
    file_server.reset_log()
    assert pull("prefixed", registry=reg) == out
    assert file_server.requests == []


def test_sha256_prefix_mismatch_is_refused(file_server, tmp_path, cache) -> None:
    data = _data(50_000, seed=4)
    file_server.add("/w.pth", data)
    wrong = format((int(_sha(data)[:8], 16) ^ 1), "08x")
    reg = write_registry(tmp_path / "r.yaml", {"p": {
        "source": file_server.url + "/", "format": "torch",
        "files": [{"path": "w.pth", "sha256_prefix": wrong}]}})
    with pytest.raises(HashMismatchError):
        pull("p", registry=reg)
    assert published(cache) == []


def test_one_file_under_two_ids_is_stored_once_and_survives_removing_one(file_server, tmp_path, cache) -> None:
    data = _data(80_000, seed=5)
    file_server.add("/w.safetensors", data)
    spec = [{"path": "w.safetensors", "sha256": _sha(data), "size": len(data)}]
    reg = write_registry(tmp_path / "r.yaml", {
        "first": {"source": file_server.url + "/", "files": spec},
        "second": {"source": file_server.url + "/", "files": spec}})
    a = pull("first", registry=reg)["w.safetensors"]
    file_server.reset_log()
    b = pull("second", registry=reg)["w.safetensors"]
    assert file_server.requests == []
    assert a.resolve() == b.resolve()
    assert sorted(m.id for m in cache.ls()) == ["first", "second"]
    cache.remove("first")
    assert b.read_bytes() == data  # the blob is still referenced by "second"


# ------------------------------------------------------------------------------------------ file:// and relative


def _local_source(tmp_path: Path, data: bytes) -> Path:
    src = tmp_path / "weights"
    src.mkdir()
    (src / "w.safetensors").write_bytes(data)
    return src


def test_relative_and_file_url_sources(tmp_path, cache) -> None:
    data = _data(40_000, seed=6)
    _local_source(tmp_path, data)
    spec = [{"path": "w.safetensors", "sha256": _sha(data), "size": len(data)}]
    reg = write_registry(tmp_path / "r.yaml", {
        "rel": {"source": "weights", "files": spec},
        "abs": {"source": (tmp_path / "weights").as_uri(), "files": spec}})
    for mid in ("rel", "abs"):
        out = pull(mid, registry=reg)
        assert out["w.safetensors"].read_bytes() == data
        assert out["w.safetensors"].resolve().is_relative_to(cache.blobs_dir)


def test_local_file_that_changed_is_refused_and_nothing_is_cached(tmp_path, cache) -> None:
    data = _data(40_000, seed=7)
    src = _local_source(tmp_path, data)
    (src / "w.safetensors").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit differs
    reg = write_registry(tmp_path / "r.yaml", {"rel": {
        "source": "weights", "files": [{"path": "w.safetensors", "sha256": _sha(data), "size": len(data)}]}})
    with pytest.raises(HashMismatchError) as ei:
        pull("rel", registry=reg)
    assert _sha(data) in str(ei.value) and "w.safetensors" in str(ei.value)
    assert published(cache) == []
    assert not [p for p in cache.partial_dir.glob("*") if p.is_file()] if cache.partial_dir.exists() else True


def test_local_symlink_escaping_the_source_folder_is_refused(tmp_path, cache) -> None:
    data = _data(10_000, seed=8)
    outside = tmp_path / "secret.bin"
    outside.write_bytes(data)
    src = tmp_path / "weights"
    src.mkdir()
    (src / "w.safetensors").symlink_to(outside)
    reg = write_registry(tmp_path / "r.yaml", {"rel": {
        "source": "weights", "files": [{"path": "w.safetensors", "sha256": _sha(data)}]}})
    with pytest.raises(RegistryError, match="outside"):
        pull("rel", registry=reg)
    assert published(cache) == []


# ------------------------------------------------------------------------------------------ hf://


def test_hf_unpinned_main_uses_hub_sha_then_metadata_only_then_offline(hub_server, tmp_path, cache,
                                                                       monkeypatch) -> None:
    data = _data(120_000, seed=9)
    hub_server.add_file(REPO, COMMIT, "w.safetensors", data)
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    reg = write_registry(tmp_path / "r.yaml", {"floating": {
        "source": f"hf://{REPO}", "revision": "main", "files": [{"path": "w.safetensors"}]}})
    out = pull("floating", registry=reg)
    assert out["w.safetensors"].read_bytes() == data
    ref = cache.read_ref("floating")
    assert ref["commit"] == COMMIT and ref["files"]["w.safetensors"]["sha256"] == _sha(data)
    assert COMMIT in str(out["w.safetensors"])  # the snapshot is named by the resolved commit

    hub_server.reset_log()
    assert pull("floating", registry=reg) == out
    hub_server.wait_idle()
    assert hub_server.requests, "a moving branch must be re-resolved online"
    assert {r.method for r in hub_server.requests} == {"HEAD"}

    hub_server.reset_log()
    monkeypatch.setenv("HUBLOAD_OFFLINE", "1")
    assert pull("floating", registry=reg) == out
    assert hub_server.requests == []


def test_hf_unpinned_entry_is_verified_against_the_hub_lfs_sha256(hub_server, tmp_path, cache, monkeypatch) -> None:
    data = _data(90_000, seed=10)
    hub_server.add_file(REPO, COMMIT, "w.safetensors", data)
    hub_server.inject("*/w.safetensors", Fault("wrong_bytes", times=None))
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    reg = write_registry(tmp_path / "r.yaml", {"floating": {
        "source": f"hf://{REPO}", "revision": "main", "files": [{"path": "w.safetensors"}]}})
    with pytest.raises(HashMismatchError) as ei:
        pull("floating", registry=reg)
    assert ei.value.expected == _sha(data)
    assert published(cache) == []


def _gated_registry(tmp_path: Path, data: bytes, *, pinned: bool) -> Path:
    entry = {"source": f"hf://{REPO}", "revision": COMMIT if pinned else "main",
             "files": [{"path": "w.safetensors", **({"sha256": _sha(data), "size": len(data)} if pinned else {})}]}
    return write_registry(tmp_path / "r.yaml", {"gated": entry})


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "unpinned"])
def test_gated_repo_needs_a_token_which_only_the_hub_sees(tmp_path, cache, monkeypatch, caplog, pinned) -> None:
    data = _data(150_000, seed=11)
    hub = HubServer(redirect_lfs=True)
    hub.add_repo(REPO, gated=True, token=TOKEN)
    hub.add_file(REPO, COMMIT, "w.safetensors", data)
    reg = _gated_registry(tmp_path, data, pinned=pinned)
    caplog.set_level(logging.DEBUG)
    with hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(DownloadError) as ei:
            pull("gated", registry=reg)
        msg = str(ei.value)
        assert "HF_TOKEN" in msg and "gated" in msg and REPO in msg
        assert published(cache) == []

        monkeypatch.setenv("HF_TOKEN", TOKEN)
        hub.reset_log()
        out = pull("gated", registry=reg)
        assert out["w.safetensors"].read_bytes() == data
        hub.wait_idle()
        hub_host = hub.url.split("//")[1]
        cdn = [r for r in hub.requests if not r.host.startswith(hub_host)]
        on_hub = [r for r in hub.requests if r.host.startswith(hub_host)]
        assert cdn and any(r.bytes_sent for r in cdn), "the body must come from the CDN host"
        assert all(r.authorization is None for r in cdn)
        assert on_hub and all(r.authorization == f"Bearer {TOKEN}" for r in on_hub)

        monkeypatch.setenv("HF_TOKEN", TOKEN + "-wrong")
        Cache().remove("gated")
        with pytest.raises(HubloadError) as bad:
            pull("gated", registry=reg)
        assert TOKEN not in str(bad.value) and TOKEN not in repr(bad.value)
    assert TOKEN not in caplog.text
    assert all(TOKEN not in str(r.args) for r in caplog.records)


def test_file_in_the_user_hf_cache_is_reused_without_a_body_transfer(minilm_hub, minilm_sha256, cache,
                                                                    monkeypatch) -> None:
    from huggingface_hub import hf_hub_download

    monkeypatch.setenv("HF_ENDPOINT", minilm_hub.url)
    hf_path = hf_hub_download(MINILM_REPO_ID, "model.safetensors", revision=MINILM_COMMIT,
                              cache_dir=str(Path(os.environ["HF_HOME"]) / "hub"), endpoint=minilm_hub.url)
    assert Path(hf_path).is_file()
    minilm_hub.reset_log()
    out = pull("all-minilm-l6-v2")  # the built-in, pinned entry
    assert body_gets(minilm_hub) == []
    assert out["model.safetensors"].resolve().name == minilm_sha256
    assert cached_files(load_registry().get("all-minilm-l6-v2")) == out


def test_offline_miss_is_an_offline_error_without_requests(file_server, tmp_path, monkeypatch) -> None:
    data = _data(1000, seed=12)
    file_server.add("/w.safetensors", data)
    reg = write_registry(tmp_path / "r.yaml", {"tiny": {
        "source": file_server.url + "/", "files": [{"path": "w.safetensors", "sha256": _sha(data)}]}})
    monkeypatch.setenv("HUBLOAD_OFFLINE", "1")
    with pytest.raises(OfflineError, match="tiny"):
        pull("tiny", registry=reg)
    assert file_server.requests == []


def test_offline_mode_still_reads_local_sources(tmp_path, cache, monkeypatch) -> None:
    data = _data(20_000, seed=13)
    _local_source(tmp_path, data)
    reg = write_registry(tmp_path / "r.yaml", {"rel": {
        "source": "weights", "files": [{"path": "w.safetensors", "sha256": _sha(data), "size": len(data)}]}})
    monkeypatch.setenv("HUBLOAD_OFFLINE", "1")  # a local folder needs no network
    assert pull("rel", registry=reg)["w.safetensors"].read_bytes() == data


def test_offline_prefer_uses_the_cache_with_zero_requests_and_fetches_only_what_is_missing(
        hub_server, tmp_path, cache, monkeypatch) -> None:
    cached, missing = _data(50_000, seed=14), _data(60_000, seed=15)
    hub_server.add_file(REPO, COMMIT, "a.safetensors", cached)
    hub_server.add_file(REPO, COMMIT, "b.safetensors", missing)
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    reg = write_registry(tmp_path / "r.yaml", {
        "floating": {"source": f"hf://{REPO}", "revision": "main", "files": [{"path": "a.safetensors"}]},
        "other": {"source": f"hf://{REPO}", "revision": "main", "files": [{"path": "b.safetensors"}]},
    })
    first = pull("floating", registry=reg)
    hub_server.wait_idle()
    hub_server.reset_log()

    monkeypatch.setenv("HUBLOAD_OFFLINE", "prefer")
    # Cached, on a moving branch: used as it is, without even re-resolving the branch.
    assert pull("floating", registry=reg) == first
    assert cached_files(load_registry(reg).get("floating")) == first  # what load's header pre-check asks
    hub_server.wait_idle()
    assert hub_server.requests == []
    # Not cached: fetched online, verified.
    out = pull("other", registry=reg)
    assert out["b.safetensors"].read_bytes() == missing
    assert len(body_gets(hub_server)) == 1
    hub_server.reset_log()
    assert pull("other", registry=reg) == out
    assert pull("floating", registry=reg, offline="prefer") == first
    hub_server.wait_idle()
    assert hub_server.requests == []
