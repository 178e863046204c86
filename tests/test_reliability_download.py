"""Issue 6, download half: SIGKILL storms, concurrency, misbehaving servers, full and read-only disks, offline.

Every scenario ends in a verified file or a clear error, and after every step the cache is *sound*: each blob
hashes to its name, each snapshot link points at a present blob, each index lists only present blobs, and no
partial file is ever visible where a reader looks (``blobs/``, ``models/``).
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hubload.cache import Cache, sha256_file
from hubload.errors import CacheError, DownloadError, HashMismatchError, ModelNotFoundError, OfflineError
from hubload.fetch import pull
from hubload.transfer import UNREACHABLE_ATTEMPTS, RetryPolicy
from tests.servers import Fault, FileServer, HubServer
from tests.test_pull import _data, _sha, published, write_registry

MiB = 1 << 20
TOKEN = "hf_ReliabilitySecret000111222333"


@pytest.fixture
def retries(sleeps) -> RetryPolicy:
    return RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05, max_retry_after=3600, sleep=sleeps)


@pytest.fixture
def cache() -> Cache:
    return Cache(os.environ["HUBLOAD_CACHE"])


def assert_sound(cache: Cache) -> None:
    """The cache invariants every scenario must keep."""
    if cache.blobs_dir.exists():
        for p in cache.blobs_dir.rglob("*"):
            if p.is_file():
                assert sha256_file(p) == p.name, f"blob {p} does not hash to its name"
    if cache.models_dir.exists():
        for p in cache.models_dir.rglob("*"):
            if p.is_symlink() or p.is_file():
                assert p.exists() and p.resolve().parent.parent == cache.blobs_dir.resolve(), f"dangling {p}"
    for m in cache.ls():
        assert m.complete, f"index of {m.id} lists a missing blob"


def hubload(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    """Start ``python -m hubload ARGS`` in the test's environment."""
    return subprocess.Popen([sys.executable, "-m", "hubload", *args], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.fixture
def big(file_server: FileServer, tmp_path: Path) -> tuple[Path, str, int, Path]:
    """A generated 32 MiB file served at /big.safetensors: (registry, sha256, size, URL path)."""
    src = tmp_path / "big.bin"
    rng = random.Random(6)
    with open(src, "wb") as f:
        for _ in range(32):
            f.write(rng.randbytes(MiB))
    sha, size = sha256_file(src), src.stat().st_size
    file_server.add("/big.safetensors", src)
    reg = write_registry(tmp_path / "r.yaml", {"big": {
        "source": file_server.url + "/", "files": [{"path": "big.safetensors", "sha256": sha, "size": size}]}})
    return reg, sha, size, Path("/big.safetensors")


def _partial_file(cache: Cache, key: str) -> Path:
    """The partial file of ``key`` a killed run left: its writer's own ``<key>.<writer>.part`` or ``<key>.part``."""
    found = sorted(cache.partial_dir.glob(f"{key}.*.part")) if cache.partial_dir.exists() else []
    return found[0] if found else cache.partial_path(key)


def _position(server: FileServer, run_start: int) -> int:
    """Absolute file offset the server has sent up to, for the GETs logged since ``run_start``."""
    pos = 0
    for r in server.requests[run_start:]:
        if r.method == "GET" and r.bytes_sent:
            start = int(r.range.split("=")[1].split("-")[0]) if r.range and r.status == 206 else 0
            pos = max(pos, start + r.bytes_sent)
    return pos


# ---------------------------------------------------------------------------------------------- SIGKILL storm


@pytest.mark.slow
def test_twenty_sigkills_at_random_points_then_a_verified_file(file_server, big, cache) -> None:
    reg, sha, size, _ = big
    rng = random.Random(20240606)
    points = sorted(rng.sample(range(MiB // 2, size - 2 * MiB), 20))
    file_server.inject("/big.safetensors", Fault("slow", times=None, rate=5 * MiB))
    kills = resumed = 0
    for target in points:
        part = _partial_file(cache, sha)
        have = part.stat().st_size if part.exists() else 0
        run_start = len(file_server.requests)
        proc = hubload("pull", "big", "--registry", str(reg))
        target = max(target, have + 256 * 1024)
        while _position(file_server, run_start) < target:
            assert proc.poll() is None, proc.communicate()
            # Nothing unverified ever shows up where a reader looks, at any moment of the transfer.
            assert not cache.blobs_dir.exists() or not any(cache.blobs_dir.rglob("*")), "a blob appeared early"
            time.sleep(0.003)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        kills += 1
        gets = [r for r in file_server.requests[run_start:] if r.method == "GET"]
        if have:
            assert gets[0].range == f"bytes={have}-", f"run {kills} did not resume from {have}: {gets[0].range}"
            resumed += 1
        assert published(cache) == [] and cache.read_ref("big") is None
        assert _partial_file(cache, sha).stat().st_size <= _position(file_server, run_start)
    file_server.clear_faults()
    file_server.wait_idle()
    have = _partial_file(cache, sha).stat().st_size
    run_start = len(file_server.requests)
    done = hubload("pull", "big", "--registry", str(reg))
    out, err = done.communicate(timeout=120)
    assert done.returncode == 0, err
    assert file_server.requests[run_start].range == f"bytes={have}-"
    blob = cache.blob_path(sha)
    assert sha256_file(blob) == sha
    assert Path(out.split()[-1]).resolve() == blob.resolve()
    assert not part.exists()
    assert_sound(cache)
    # Counts for the closing note: every kill survived, every run after the first resumed with a Range.
    assert kills == 20 and resumed >= 17  # a kill before the first flush leaves nothing to resume from
    print(f"\nSIGKILL storm: {kills} kills survived, {resumed + 1} Range resumes, final sha256 verified")


# ---------------------------------------------------------------------------------------------- concurrency


def test_six_processes_make_one_transfer(file_server, big, cache) -> None:
    reg, sha, size, _ = big
    file_server.inject("/big.safetensors", Fault("slow", times=None, rate=24 * MiB))
    procs = [hubload("pull", "big", "--registry", str(reg)) for _ in range(6)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, [e for _, e in outs]
    file_server.wait_idle()
    gets = [r for r in file_server.requests if r.method == "GET"]
    assert len(gets) == 1 and gets[0].bytes_sent == size
    assert len({out for out, _ in outs}) == 1
    assert sha256_file(cache.blob_path(sha)) == sha
    assert_sound(cache)


def test_lock_of_a_sigkilled_pull_is_recovered_at_once(file_server, big, cache) -> None:
    reg, sha, size, _ = big
    file_server.inject("/big.safetensors", Fault("slow", times=1, rate=4 * MiB))
    holder = hubload("pull", "big", "--registry", str(reg))
    # it holds the lock while it writes its partial
    while not (part := _partial_file(cache, sha)).exists() or part.stat().st_size < MiB:
        assert holder.poll() is None, holder.communicate()
        time.sleep(0.005)
    holder.send_signal(signal.SIGKILL)
    holder.communicate()
    have = part.stat().st_size
    nxt = hubload("pull", "big", "--registry", str(reg))
    # A hang guard only: the lock wait would otherwise last lock_timeout (600 s).
    out, err = nxt.communicate(timeout=60)
    assert nxt.returncode == 0, err
    assert [r.range for r in file_server.requests if r.method == "GET"][-1] == f"bytes={have}-"
    assert_sound(cache)


# ---------------------------------------------------------------------------------------------- server faults


@pytest.fixture
def small(file_server: FileServer, tmp_path: Path) -> tuple[Path, bytes]:
    """A 2 MB file at /w.safetensors and its registry."""
    data = _data(2_000_000, seed=66)
    file_server.add("/w.safetensors", data)
    reg = write_registry(tmp_path / "small.yaml", {"w": {
        "source": file_server.url + "/", "files": [{"path": "w.safetensors", "sha256": _sha(data), "size": len(data)}]}})
    return reg, data


RECOVERABLE = {
    "reset mid-body": [Fault("reset", after=700_000)],
    "500 burst": [Fault("status", status=500, times=3)],
    "503 burst": [Fault("status", status=503, times=3)],
    "429 + Retry-After": [Fault("429", retry_after=7)],
    "truncated body, correct Content-Length": [Fault("truncate", after=900_000)],
    "overlong body": [Fault("overlong", extra=64)],
    "200 to a Range request": [Fault("reset", after=500_000), Fault("ignore_range")],
    "stalled connection": [Fault("stall", after=300_000, seconds=1.5)],
    "reset then 503 then truncated": [Fault("reset", after=100_000), Fault("status", status=503),
                                      Fault("truncate", after=300_000)],
}


@pytest.mark.parametrize("name", list(RECOVERABLE))
def test_server_fault_recovers_within_the_retry_budget(name, file_server, small, cache, retries, sleeps) -> None:
    reg, data = small
    faults = [dataclasses.replace(f) for f in RECOVERABLE[name]]  # fresh copies: times counts down
    budget = 1 + sum(f.times for f in faults)  # one request per injected failure, plus the one that works
    for fault in faults:
        file_server.inject("/w.safetensors", fault)
    out = pull("w", registry=reg, retries=retries, timeout=(2, 0.5))
    assert out["w.safetensors"].read_bytes() == data
    assert_sound(cache)
    file_server.wait_idle()
    gets = [r for r in file_server.requests if r.method == "GET"]
    assert len(gets) <= budget  # bounded: one retry per failure
    if name == "429 + Retry-After":
        assert sleeps.calls == [7]  # the server's Retry-After, honoured exactly
    if name in ("reset mid-body", "truncated body, correct Content-Length", "stalled connection"):
        assert gets[-1].range and gets[-1].range != "bytes=0-", "the retry should resume, not restart"
    if name == "200 to a Range request":
        assert gets[-1].status == 200 and gets[-1].bytes_sent == len(data)


@pytest.mark.parametrize("name, fault, error", [
    ("wrong bytes", Fault("wrong_bytes", times=None), HashMismatchError),
    ("endless 503", Fault("status", status=503, times=None), DownloadError),
    ("endless stall", Fault("stall", times=None, seconds=1.5), DownloadError),
    ("404", Fault("status", status=404, times=None), ModelNotFoundError),
    ("403", Fault("status", status=403, times=None), DownloadError),
])
def test_server_fault_that_persists_is_a_clear_error_and_nothing_is_cached(name, fault, error, file_server, small,
                                                                           cache, retries) -> None:
    reg, data = small
    file_server.inject("/w.safetensors", fault)
    with pytest.raises(error) as ei:
        pull("w", registry=reg, retries=retries, timeout=(2, 0.3))
    msg = str(ei.value)
    assert "w.safetensors" in msg and "\n" not in msg
    assert published(cache) == [] and cache.read_ref("w") is None
    file_server.wait_idle()
    gets = [r for r in file_server.requests if r.method == "GET"]
    assert len(gets) <= retries.attempts
    if error is not DownloadError or name in ("403",):
        assert len(gets) == 1  # hash mismatch and 4xx are not retried
    assert_sound(cache)
    file_server.clear_faults()
    assert pull("w", registry=reg, retries=retries)["w.safetensors"].read_bytes() == data  # and it heals


def test_redirect_to_another_host_never_forwards_the_token(tmp_path, cache, monkeypatch, retries) -> None:
    data = _data(500_000, seed=67)
    hub = HubServer()
    hub.add_file("acme/r", "d" * 40, "w.safetensors", data)
    hub.inject("*/w.safetensors", Fault("redirect_other_host", times=None))
    reg = write_registry(tmp_path / "r.yaml", {"r": {
        "source": "hf://acme/r", "revision": "d" * 40,
        "files": [{"path": "w.safetensors", "sha256": _sha(data), "size": len(data)}]}})
    with hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        assert pull("r", registry=reg, retries=retries)["w.safetensors"].read_bytes() == data
        hub.wait_idle()
    host = hub.url.split("//")[1]
    origin = [r for r in hub.requests if r.host.startswith(host)]
    other = [r for r in hub.requests if not r.host.startswith(host)]
    assert origin and other and other[-1].bytes_sent == len(data)
    assert all(r.authorization == f"Bearer {TOKEN}" for r in origin)
    assert all(r.authorization is None for r in other)


# ---------------------------------------------------------------------------------------------- disks


@pytest.fixture
def tmpfs(tmp_path: Path):
    """Mount a small tmpfs (root only); yields (mount point, remount function)."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()

    def mount(*opts: str) -> None:
        subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(opts), "tmpfs", str(mnt)], check=True,
                       capture_output=True)

    def remount(*opts: str) -> None:
        subprocess.run(["mount", "-o", ",".join(("remount", *opts)), str(mnt)], check=True, capture_output=True)

    try:
        mount("size=4m")
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here ({exc}); the disk-full/read-only scenarios need one")
    try:
        yield mnt, remount
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_is_a_clear_cache_error_and_the_partial_resumes(file_server, tmpfs, tmp_path, monkeypatch,
                                                                  retries) -> None:
    mnt, remount = tmpfs
    data = _data(6 * MiB, seed=68)
    file_server.add("/w.safetensors", data)
    reg = write_registry(tmp_path / "r.yaml", {"w": {
        "source": file_server.url + "/", "files": [{"path": "w.safetensors", "sha256": _sha(data), "size": len(data)}]}})
    cache = Cache(mnt / "cache")
    with pytest.raises(CacheError) as ei:
        pull("w", registry=reg, cache_dir=cache.root, retries=retries)
    assert "disk is full" in str(ei.value) and "HUBLOAD_CACHE" in str(ei.value)
    assert published(cache) == [] and cache.ls() == []
    assert_sound(cache)
    part = cache.partial_path(_sha(data))
    have = part.stat().st_size if part.exists() else 0
    assert have < len(data)
    print(f"\ndisk full: CacheError after {have} of {len(data)} bytes kept for resuming")

    remount("size=16m")  # the user frees space
    file_server.reset_log()
    out = pull("w", registry=reg, cache_dir=cache.root, retries=retries)
    assert out["w.safetensors"].read_bytes() == data
    file_server.wait_idle()
    if have:
        assert file_server.requests[0].range == f"bytes={have}-"
    assert [m.id for m in cache.ls()] == ["w"]
    assert_sound(cache)


def test_read_only_cache_serves_hits_and_refuses_misses_clearly(file_server, tmpfs, tmp_path) -> None:
    mnt, remount = tmpfs
    one, two = _data(100_000, seed=69), _data(100_000, seed=70)
    file_server.add("/one.safetensors", one)
    file_server.add("/two.safetensors", two)
    reg = write_registry(tmp_path / "r.yaml", {
        "one": {"source": file_server.url + "/", "files": [{"path": "one.safetensors", "sha256": _sha(one)}]},
        "two": {"source": file_server.url + "/", "files": [{"path": "two.safetensors", "sha256": _sha(two)}]}})
    cache = Cache(mnt / "cache")
    pull("one", registry=reg, cache_dir=cache.root)
    remount("ro")
    file_server.reset_log()
    assert pull("one", registry=reg, cache_dir=cache.root)["one.safetensors"].read_bytes() == one
    assert file_server.requests == []
    with pytest.raises(CacheError, match="not writable"):
        pull("two", registry=reg, cache_dir=cache.root)
    assert_sound(cache)


# ---------------------------------------------------------------------------------------------- offline


def test_offline_mode_loads_cached_pinned_entries_and_fails_misses_without_requests(file_server, small, tmp_path,
                                                                                     cache, monkeypatch) -> None:
    reg, data = small
    other = _data(1000, seed=71)
    file_server.add("/other.safetensors", other)
    reg2 = write_registry(tmp_path / "r2.yaml", {"other": {
        "source": file_server.url + "/", "files": [{"path": "other.safetensors", "sha256": _sha(other)}]}})
    pull("w", registry=reg)
    file_server.reset_log()
    for var in ("HUBLOAD_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
        assert pull("w", registry=reg)["w.safetensors"].read_bytes() == data
        with pytest.raises(OfflineError, match="other"):
            pull("other", registry=reg2)
        monkeypatch.delenv(var)
    assert file_server.requests == []


def test_server_down_cached_entries_load_and_misses_fail_after_a_bounded_number_of_attempts(
        tmp_path, cache, retries, sleeps, monkeypatch) -> None:
    data = _data(50_000, seed=72)
    server = FileServer({"/w.safetensors": data, "/x.safetensors": data[::-1]}).start()
    base = server.url + "/"
    reg = write_registry(tmp_path / "r.yaml", {
        "w": {"source": base, "files": [{"path": "w.safetensors", "sha256": _sha(data)}]},
        "x": {"source": base, "files": [{"path": "x.safetensors", "sha256": _sha(data[::-1])}]},
        "floating": {"source": "hf://acme/gone", "revision": "main", "files": [{"path": "w.safetensors"}]}})
    pull("w", registry=reg)
    server.stop()  # the network is gone now
    monkeypatch.setenv("HF_ENDPOINT", base.rstrip("/"))
    assert pull("w", registry=reg, retries=retries)["w.safetensors"].read_bytes() == data
    with pytest.raises(OfflineError, match="x.safetensors"):
        pull("x", registry=reg, retries=retries)
    assert len(sleeps.calls) == UNREACHABLE_ATTEMPTS - 1  # server down: fail fast, no long retry loop
    with pytest.raises(OfflineError, match="floating"):
        pull("floating", registry=reg, retries=retries)
    assert_sound(cache)

