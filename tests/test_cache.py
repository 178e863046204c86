"""The content-addressed cache: layout, atomic publish, safe links, refs, remove/prune/verify, locks."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import hubload.cache as cache_mod
from hubload.cache import Cache, cache_os_error, default_cache_dir
from hubload.errors import CacheError

ROOT = Path(__file__).resolve().parents[1]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    return Cache(tmp_path / "cache")


def _put(cache: Cache, data: bytes) -> str:
    """Publish ``data`` as a blob; return its sha256."""
    tmp = cache.tmp_path("t")
    tmp.write_bytes(data)
    sha = _sha(data)
    cache.publish(tmp, sha)
    return sha


def _age(path: Path, hours: float) -> None:
    """Make a file look ``hours`` old."""
    t = time.time() - hours * 3600
    os.utime(path, (t, t), follow_symlinks=False)


# ------------------------------------------------------------------------------------------ layout


def test_default_root_reads_the_environment_at_call_time(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HUBLOAD_CACHE", str(tmp_path / "one"))
    assert Cache().root == tmp_path / "one"
    monkeypatch.setenv("HUBLOAD_CACHE", str(tmp_path / "two"))
    assert Cache().root == default_cache_dir() == tmp_path / "two"
    monkeypatch.delenv("HUBLOAD_CACHE")
    assert "hubload" in str(Cache().root)


def test_blob_layout_publish_and_has_blob(cache) -> None:
    sha = _put(cache, b"hello")
    blob = cache.blob_path(sha)
    assert blob == cache.root / "blobs" / sha[:2] / sha
    assert blob.read_bytes() == b"hello" and blob.stat().st_mode & 0o777 == 0o444
    assert cache.has_blob(sha) and cache.has_blob(sha, 5)
    assert not cache.has_blob(sha, 6) and not cache.has_blob("0" * 64)
    # Publishing the same content again keeps the existing blob and drops the temp file.
    tmp = cache.tmp_path("t")
    tmp.write_bytes(b"hello")
    ino = blob.stat().st_ino
    assert cache.publish(tmp, sha) == blob
    assert not tmp.exists() and blob.stat().st_ino == ino
    with pytest.raises(ValueError):
        cache.blob_path("../../etc/passwd")
    assert list(cache.partial_dir.iterdir()) == []


# ------------------------------------------------------------------------------------------ links


def test_link_makes_relative_symlinks_inside_the_snapshot(cache) -> None:
    a, b = _put(cache, b"A" * 10), _put(cache, b"B" * 20)
    link = cache.link("org/model", "abc123", "sub/dir/model-00001.safetensors", a)
    snap = cache.snapshot_dir("org/model", "abc123")
    assert snap == cache.root / "models" / "org--model" / "abc123"
    assert link == snap / "sub" / "dir" / "model-00001.safetensors"
    assert link.is_symlink() and not os.path.isabs(os.readlink(link))
    assert link.read_bytes() == b"A" * 10
    assert cache.link("org/model", "abc123", "sub/dir/model-00001.safetensors", b).read_bytes() == b"B" * 20
    assert cache.link("local-model", None, "w.bin", a).parent == cache.root / "models" / "local-model" / "local"
    # The whole cache can move: relative links follow it.
    moved = Cache(cache.root.parent / "moved")
    cache.root.rename(moved.root)
    assert (moved.snapshot_dir("org/model", "abc123") / "sub/dir/model-00001.safetensors").read_bytes() == b"B" * 20


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/../b", "a//b", "a\\b", "", "./a", "a/", "C:/x", "a/./b"])
def test_link_refuses_unsafe_paths(cache, bad) -> None:
    sha = _put(cache, b"x")
    with pytest.raises(CacheError):
        cache.link("org/model", "main", bad, sha)
    assert not any(p.is_symlink() for p in cache.root.rglob("*"))


@pytest.mark.parametrize("bad", ["../x", "/abs", "a/../b", "a//b", "", "a\\b", "."])
def test_unsafe_model_ids_are_refused(cache, bad) -> None:
    sha = _put(cache, b"x")
    with pytest.raises(CacheError):
        cache.link(bad, "main", "w.bin", sha)
    with pytest.raises(CacheError):
        cache.write_ref(bad, {"files": {}})


def test_link_refuses_a_symlinked_folder_that_escapes(cache, tmp_path) -> None:
    sha = _put(cache, b"x")
    snap = cache.snapshot_dir("org/model", "main")
    snap.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (snap / "sub").symlink_to(outside)
    with pytest.raises(CacheError, match="outside"):
        cache.link("org/model", "main", "sub/w.bin", sha)
    assert list(outside.iterdir()) == []


def test_link_needs_the_blob(cache) -> None:
    with pytest.raises(CacheError, match="not in the cache"):
        cache.link("org/model", "main", "w.bin", "a" * 64)


# ------------------------------------------------------------------------------------------ refs, ls, remove


def _model(cache: Cache, model_id: str, files: dict[str, bytes], revision: str | None = "r1") -> dict:
    entries = {}
    for path, data in files.items():
        sha = _put(cache, data)
        cache.link(model_id, revision, path, sha)
        entries[path] = {"sha256": sha, "size": len(data)}
    ref = {"source": f"hf://{model_id}", "revision": revision, "files": entries, "pulled_at": "2026-01-01T00:00:00Z"}
    cache.write_ref(model_id, ref)
    return ref


def test_refs_round_trip_and_collisions_are_refused(cache) -> None:
    ref = _model(cache, "org/a", {"w.bin": b"1"})
    assert cache.read_ref("org/a") == {"id": "org/a", **ref}
    assert cache.read_ref("org/none") is None
    assert [p.name for p in cache.refs_dir.iterdir()] == ["org--a.json"]  # no temp files left
    with pytest.raises(CacheError, match="same cache folder"):
        cache.write_ref("org--a", {"files": {}})
    (cache.refs_dir / "org--a.json").write_text("{broken")
    with pytest.raises(CacheError, match="corrupt"):
        cache.read_ref("org/a")


def test_ls_lists_files_sizes_totals_and_revision(cache) -> None:
    _model(cache, "org/b", {"model.safetensors": b"x" * 100, "config.json": b"{}"}, revision="abc")
    _model(cache, "org/a", {"w.bin": b"y" * 7}, revision=None)
    models = cache.ls()
    assert [m.id for m in models] == ["org/a", "org/b"]
    b = models[1]
    assert b.revision == "abc" and b.total_size == 102 and b.complete
    assert [(f.path, f.size, f.present) for f in b.files] == [("config.json", 2, True), ("model.safetensors", 100, True)]
    assert b.snapshot == cache.snapshot_dir("org/b", "abc")


def test_remove_drops_the_model_and_only_its_unshared_blobs(cache) -> None:
    _model(cache, "org/a", {"shared.bin": b"S" * 50, "own.bin": b"A" * 30})
    _model(cache, "org/b", {"shared.bin": b"S" * 50})
    assert cache.remove("org/a") == 30
    assert cache.read_ref("org/a") is None
    assert not (cache.models_dir / "org--a").exists()
    assert not cache.has_blob(_sha(b"A" * 30)) and cache.has_blob(_sha(b"S" * 50))
    assert (cache.snapshot_dir("org/b", "r1") / "shared.bin").read_bytes() == b"S" * 50
    assert cache.remove("org/b") == 50
    assert list(cache.blobs_dir.iterdir()) == []
    with pytest.raises(CacheError, match="not in the cache"):
        cache.remove("org/b")


# ------------------------------------------------------------------------------------------ prune, verify


def test_prune_frees_unreferenced_blobs_stale_partials_and_empty_dirs(cache) -> None:
    _model(cache, "org/a", {"w.bin": b"keep"})
    old, young = _put(cache, b"orphan-old"), _put(cache, b"orphan-young")
    _age(cache.blob_path(old), 2)
    stale = cache.partial_path("a" * 64)
    stale.write_bytes(b"p" * 100)
    cache.partial_meta_path("a" * 64).write_text("{}")
    _age(stale, 48)
    fresh = cache.partial_path("b" * 64)
    fresh.write_bytes(b"q" * 10)
    locked = cache.partial_path("c" * 64)
    locked.write_bytes(b"r" * 10)
    _age(locked, 48)
    (cache.models_dir / "empty" / "dir").mkdir(parents=True)
    with cache.lock("c" * 64):  # an old partial someone is resuming right now
        freed = cache.prune(partial_max_age_hours=24)
    assert freed == len(b"orphan-old") + 100
    assert not cache.has_blob(old) and cache.has_blob(young) and cache.has_blob(_sha(b"keep"))
    assert not stale.exists() and not cache.partial_meta_path("a" * 64).exists()
    assert fresh.exists() and locked.exists()
    assert not (cache.models_dir / "empty").exists()


def test_verify_evicts_a_corrupted_blob_and_its_links(cache) -> None:
    _model(cache, "org/a", {"good.bin": b"good", "bad.bin": b"bad!"})
    bad = cache.blob_path(_sha(b"bad!"))
    bad.chmod(0o644)
    bad.write_bytes(b"rot!")
    results = {r.sha256: r for r in cache.verify("org/a")}
    assert results[_sha(b"good")].ok
    r = results[_sha(b"bad!")]
    assert (r.status, r.actual) == ("corrupt", _sha(b"rot!"))
    assert not bad.exists()
    snap = cache.snapshot_dir("org/a", "r1")
    assert (snap / "good.bin").exists() and not os.path.lexists(snap / "bad.bin")
    assert sorted(r.status for r in cache.verify("org/a")) == ["missing", "ok"]
    assert [r.status for r in cache.verify()] == ["ok"]  # every blob on disk
    assert not cache.ls()[0].complete


# ------------------------------------------------------------------------------------------ locks


def test_lock_of_a_killed_process_is_released(cache) -> None:
    code = (
        "import time; from hubload.cache import Cache\n"
        f"with Cache({str(cache.root)!r}).lock('k'):\n"
        "    print('locked', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(CacheError, match="gave up waiting"):
            with cache.lock("k", timeout=0.2):
                pass
    finally:
        proc.kill()
        proc.wait()
    with cache.lock("k", timeout=10) as lease:
        assert lease.path == cache.locks_dir / "k.lock" and lease.held


def test_lock_waits_while_the_holder_makes_progress(cache) -> None:
    watch = cache.partial_path("k")
    watch.parent.mkdir(parents=True)
    watch.write_bytes(b"")
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with cache.lock("k"):
            held.set()
            for _ in range(15):  # grows the partial every 0.1 s for ~1.5 s: alive and progressing
                with open(watch, "ab") as f:
                    f.write(b"x")
                time.sleep(0.1)
            release.wait(5)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(5)
    try:
        # 1 s of no progress is allowed; the holder takes longer than that in total but keeps progressing,
        # then stops writing and never releases: the wait must end with an error, not hang.
        with pytest.raises(CacheError, match="no progress"):
            with cache.lock("k", timeout=1.0, watch=watch):
                pass
        assert watch.stat().st_size == 15
    finally:
        release.set()
        t.join()


# ------------------------------------------------------------------------------------------ errors


def test_read_only_or_full_cache_gives_a_clear_cache_error(cache, monkeypatch) -> None:
    for code, words in ((errno.EROFS, "not writable"), (errno.ENOSPC, "disk is full")):
        err = cache_os_error(OSError(code, os.strerror(code)), cache.root / "blobs", "creating")
        assert isinstance(err, CacheError) and words in str(err) and str(cache.root / "blobs") in str(err)
        assert "HUBLOAD_CACHE" in str(err)

    def read_only_mkdir(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(cache_mod.Path, "mkdir", read_only_mkdir)
    with pytest.raises(CacheError, match="not writable"):
        cache.tmp_path("t")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores directory permissions")
def test_real_read_only_directory(tmp_path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(CacheError, match="not writable"):
            Cache(ro / "cache").tmp_path("t")
    finally:
        ro.chmod(0o755)


# ------------------------------------------------------------------------------------------ HF cache reuse


def test_reuse_from_hf_cache_links_a_verified_file(cache, hub_server, tmp_path, monkeypatch) -> None:
    from huggingface_hub import hf_hub_download

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    data = os.urandom(100_000)
    sha = _sha(data)
    commit = "d" * 40
    hub_server.add_file("org/m", commit, "model.safetensors", data)
    hf_path = hf_hub_download("org/m", "model.safetensors", revision=commit, endpoint=hub_server.url,
                              cache_dir=str(cache_mod.hf_hub_cache_dir()))
    assert str(tmp_path / "hf-cache") in hf_path
    assert cache.reuse_from_hf_cache("org/m", commit, "model.safetensors", "0" * 64, len(data)) is None
    assert cache.reuse_from_hf_cache("org/m", commit, "model.safetensors", sha, len(data) + 1) is None
    assert cache.reuse_from_hf_cache("org/m", commit, "other.bin", sha, len(data)) is None
    assert not cache.has_blob(sha)
    blob = cache.reuse_from_hf_cache("org/m", commit, "model.safetensors", sha, len(data))
    assert blob == cache.blob_path(sha) and blob.read_bytes() == data
    assert blob.stat().st_ino == Path(hf_path).resolve().stat().st_ino  # a hard link, no copy
    assert list(cache.partial_dir.iterdir()) == []
