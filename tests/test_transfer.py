"""The transfer engine against the local file server and Hub look-alike, with injected faults."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

import hubload.httpio as httpio
import hubload.ranges as ranges
import hubload.transfer as transfer
from hubload.cache import Cache
from hubload.errors import DownloadError, HashMismatchError, ModelNotFoundError, OfflineError
from hubload.transfer import RetryPolicy, download, fetch_range
from tests.servers import Fault, FileServer, HubServer

TOKEN = "hf_SeCrEtToKeN1234567890"
COMMIT = "c" * 40
REPO = "acme/tiny"
ROOT = Path(__file__).resolve().parents[1]


def _data(n: int, seed: int = 0) -> bytes:
    """Deterministic pseudo-random bytes."""
    return random.Random(seed).randbytes(n)


@pytest.fixture
def policy(sleeps) -> RetryPolicy:
    return RetryPolicy(attempts=5, base_delay=0.01, max_delay=0.05, max_retry_after=3600, sleep=sleeps)


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    return Cache(tmp_path / "cache")


@pytest.fixture
def blob3(file_server: FileServer) -> tuple[str, bytes, str]:
    """A 3 MB file served at /w.bin: (url, data, sha256)."""
    data = _data(3_000_000)
    return file_server.add("/w.bin", data), data, hashlib.sha256(data).hexdigest()


def _nothing_published(cache: Cache) -> bool:
    """No blob and no snapshot entry exists."""
    blobs = [p for p in cache.blobs_dir.rglob("*") if p.is_file()] if cache.blobs_dir.exists() else []
    models = list(cache.models_dir.rglob("*")) if cache.models_dir.exists() else []
    return not blobs and not models


def _writer_partial(cache: Cache, key: str) -> tuple[Path, Path]:
    """The partial file (and metadata) a running writer keeps under its own name, ``<key>.<writer>.part``."""
    found = sorted(cache.partial_dir.glob(f"{key}.*.part")) if cache.partial_dir.exists() else []
    part = found[0] if found else cache.partial_dir / f"{key}.none.part"
    return part, part.with_name(part.name + ".json")


def _gets(server: FileServer | HubServer, path: str = "/w.bin") -> list:
    server.wait_idle()
    return [r for r in server.requests if r.method == "GET" and r.path == path]


# ------------------------------------------------------------------------------------------ basics


def test_download_verifies_publishes_read_only_and_cleans_up(file_server, blob3, cache, policy) -> None:
    url, data, sha = blob3
    path = download(url, cache, sha256=sha, size=len(data), retries=policy, model_id="acme/w", file="w.bin")
    assert path == cache.blob_path(sha)
    assert path.read_bytes() == data
    assert path.stat().st_mode & 0o777 == 0o444
    assert list(cache.partial_dir.iterdir()) == []  # neither partial nor metadata left behind
    assert len(_gets(file_server)) == 1


def test_warm_hit_makes_zero_requests_and_hashes_nothing(file_server, blob3, cache, policy, monkeypatch) -> None:
    url, data, sha = blob3
    download(url, cache, sha256=sha, size=len(data), retries=policy)
    file_server.wait_idle()
    before = len(file_server.requests)

    def no_hashing(*a, **k):
        raise AssertionError("a warm hit must not hash")

    monkeypatch.setattr(transfer.hashlib, "sha256", no_hashing)
    monkeypatch.setattr(transfer.requests, "Session", no_hashing)
    again = download(url, cache, sha256=sha, size=len(data), retries=policy, offline=True)
    assert again == cache.blob_path(sha)
    assert len(file_server.requests) == before


def test_hash_mismatch_raises_names_everything_and_keeps_nothing(file_server, blob3, cache, policy) -> None:
    url, data, sha = blob3
    file_server.inject("/w.bin", Fault("wrong_bytes", offset=1234, count=3))
    with pytest.raises(HashMismatchError) as info:
        download(url, cache, sha256=sha, size=len(data), retries=policy, model_id="acme/w", file="w.bin")
    err = info.value
    actual = hashlib.sha256(data[:1234] + bytes(b ^ 0xFF for b in data[1234:1237]) + data[1237:]).hexdigest()
    assert (err.expected, err.actual) == (sha, actual)
    for part in ("acme/w", "w.bin", url, sha, actual):
        assert part in str(err)
    assert _nothing_published(cache)
    assert list(cache.partial_dir.iterdir()) == []


def test_sha256_prefix_and_unknown_digest(file_server, blob3, cache, policy) -> None:
    url, data, sha = blob3
    with pytest.raises(HashMismatchError):
        download(url, cache, sha256=None, size=len(data), sha256_prefix="00000000", retries=policy)
    assert _nothing_published(cache)
    path = download(url, cache, sha256=None, size=len(data), sha256_prefix=sha[:8], retries=policy)
    assert path == cache.blob_path(sha) and path.read_bytes() == data
    path.chmod(0o644)
    path.unlink()
    assert download(url, cache, sha256=None, size=None, retries=policy) == cache.blob_path(sha)


# ------------------------------------------------------------------------------------------ resume


def test_truncated_body_resumes_from_exact_offset(file_server, blob3, cache, policy) -> None:
    url, data, sha = blob3
    file_server.inject("/w.bin", Fault("truncate", after=700_000))
    path = download(url, cache, sha256=sha, size=len(data), retries=policy)
    assert path.read_bytes() == data
    gets = _gets(file_server)
    assert [r.range for r in gets] == [None, "bytes=700000-"]
    assert gets[1].header("If-Range") == f'"{sha}"'  # the server's ETag, so a changed file cannot be spliced


def test_reset_mid_body_resumes(file_server, blob3, cache, policy) -> None:
    url, data, sha = blob3
    file_server.inject("/w.bin", Fault("reset", after=2_000_000))
    path = download(url, cache, sha256=sha, size=len(data), retries=policy)
    assert path.read_bytes() == data
    gets = _gets(file_server)
    assert len(gets) == 2
    if gets[1].range is not None:  # an RST may discard bytes still in the socket buffer: any offset <= cut
        offset = int(gets[1].range.split("=")[1].rstrip("-"))
        assert 0 < offset <= 2_000_000


def test_resume_after_sigkill_of_a_previous_run(file_server, blob3, cache, tmp_path) -> None:
    url, data, sha = blob3
    file_server.inject("/w.bin", Fault("slow", rate=400_000))
    code = (
        "import sys; from hubload.cache import Cache; from hubload.transfer import download; "
        f"download({url!r}, Cache({str(cache.root)!r}), sha256={sha!r}, size={len(data)})"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while True:
            part, meta = _writer_partial(cache, sha)
            if part.exists() and part.stat().st_size >= 300_000 and meta.exists():
                break
            assert proc.poll() is None, "the first run ended before it could be killed"
            assert time.monotonic() < deadline, "the first run never wrote its partial"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    have = part.stat().st_size
    assert 0 < have < len(data)
    assert json.loads(meta.read_text())["sha256"] == sha
    assert not cache.has_blob(sha)
    file_server.reset_log()
    path = download(url, cache, sha256=sha, size=len(data), retries=RetryPolicy(base_delay=0.001))
    assert path.read_bytes() == data
    assert [r.range for r in _gets(file_server)] == [f"bytes={have}-"]


def test_ignored_range_restarts_from_zero_without_appending(file_server, blob3, cache, policy) -> None:
    url, data, sha = blob3
    file_server.inject("/w.bin", Fault("truncate", after=1_000_000))
    file_server.inject("/w.bin", Fault("ignore_range"))
    path = download(url, cache, sha256=sha, size=len(data), retries=policy)
    assert path.read_bytes() == data
    gets = _gets(file_server)
    assert [(r.range, r.status) for r in gets] == [(None, 200), ("bytes=1000000-", 200)]


def _leave_partial(cache: Cache, key: str, content: bytes, **meta) -> None:
    """Write a partial file and metadata as an earlier run would have."""
    cache.partial_dir.mkdir(parents=True, exist_ok=True)
    cache.partial_path(key).write_bytes(content)
    cache.partial_meta_path(key).write_text(json.dumps({"version": 1, "bytes_done": len(content), **meta}))


def test_416_restarts_cleanly(file_server, blob3, cache, policy) -> None:
    url, data, sha = blob3
    _leave_partial(cache, sha, b"x" * (len(data) + 10), sha256=sha, size=None, etag=None)
    path = download(url, cache, sha256=sha, size=None, retries=policy)
    assert path.read_bytes() == data
    assert [(r.range, r.status) for r in _gets(file_server)] == [(f"bytes={len(data) + 10}-", 416), (None, 200)]


def test_changed_etag_restarts_cleanly(file_server, blob3, cache, policy) -> None:
    url, data, sha = blob3
    _leave_partial(cache, sha, b"old bytes of another version", sha256=sha, size=len(data), etag='"old"')
    path = download(url, cache, sha256=sha, size=len(data), retries=policy)
    assert path.read_bytes() == data
    gets = _gets(file_server)
    assert gets[0].header("If-Range") == '"old"' and gets[0].range == "bytes=28-"
    assert gets[-1].range is None


def test_damaged_resumed_prefix_gets_one_clean_retry(file_server, blob3, cache, policy) -> None:
    url, data, sha = blob3
    _leave_partial(cache, sha, b"\0" * 1000, sha256=sha, size=len(data), etag=None)  # e.g. after a power cut
    path = download(url, cache, sha256=sha, size=len(data), retries=policy)
    assert path.read_bytes() == data
    assert [r.range for r in _gets(file_server)] == ["bytes=1000-", None]


# ------------------------------------------------------------------------------------------ retries


def test_5xx_bursts_and_429_retry_after_are_recovered(file_server, blob3, cache, policy, sleeps) -> None:
    url, data, sha = blob3
    file_server.inject("/w.bin", Fault("status", status=500, times=2))
    file_server.inject("/w.bin", Fault("429", retry_after=7))
    file_server.inject("/w.bin", Fault("status", status=503))
    path = download(url, cache, sha256=sha, size=len(data), retries=policy)
    assert path.read_bytes() == data
    assert [r.status for r in _gets(file_server)] == [500, 500, 429, 503, 200]
    assert len(sleeps.calls) == 4
    assert sleeps.calls[2] == 7.0  # Retry-After honoured (below the cap)
    assert all(0 < s <= policy.max_delay for i, s in enumerate(sleeps.calls) if i != 2)


def test_retry_after_is_capped_and_parses_http_dates() -> None:
    policy = RetryPolicy(max_retry_after=30)
    assert policy.delay(1, retry_after=10_000) == 30
    resp = requests.Response()
    resp.headers["Retry-After"] = "Wed, 21 Oct 2015 07:28:00 GMT"  # in the past
    assert httpio._retry_after(resp) == 0.0
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 100))
    resp.headers["Retry-After"] = future
    assert 90 < httpio._retry_after(resp) <= 100
    resp.headers["Retry-After"] = "soon"
    assert httpio._retry_after(resp) is None


def test_retries_are_bounded_and_the_error_names_model_file_url(file_server, blob3, cache, policy, sleeps) -> None:
    url, data, sha = blob3
    file_server.inject("/w.bin", Fault("status", status=503, times=None))
    with pytest.raises(DownloadError) as info:
        download(url, cache, sha256=sha, size=len(data), retries=policy, model_id="acme/w", file="w.bin")
    assert not isinstance(info.value, (HashMismatchError, OfflineError))
    assert all(s in str(info.value) for s in ("acme/w", "w.bin", url, "503"))
    assert len(_gets(file_server)) == policy.attempts
    assert len(sleeps.calls) == policy.attempts - 1


def test_truncated_bodies_are_never_published_and_resume_later(file_server, blob3, cache, policy) -> None:
    url, data, sha = blob3
    file_server.inject("/w.bin", Fault("truncate", after=1000, times=None))
    with pytest.raises(DownloadError, match="truncat|IncompleteRead"):
        download(url, cache, sha256=sha, size=len(data), retries=policy)
    assert _nothing_published(cache)
    ranges = [r.range for r in _gets(file_server)]
    assert ranges == [None] + [f"bytes={1000 * i}-" for i in range(1, policy.attempts)]
    assert cache.partial_path(sha).stat().st_size == 1000 * policy.attempts
    file_server.clear_faults()
    file_server.reset_log()
    assert download(url, cache, sha256=sha, size=len(data), retries=policy).read_bytes() == data
    assert [r.range for r in _gets(file_server)] == [f"bytes={1000 * policy.attempts}-"]


def test_overlong_bodies_never_reach_the_blob(file_server, blob3, cache, policy) -> None:
    url, data, sha = blob3
    file_server.inject("/w.bin", Fault("overlong", extra=5000))
    assert download(url, cache, sha256=sha, size=len(data), retries=policy).read_bytes() == data
    # A server announcing more bytes than the registry's size is refused every time, never published.
    other = file_server.add("/longer.bin", data + b"tail")
    with pytest.raises(DownloadError, match="expected 3000000"):
        download(other, Cache(cache.root / "x"), sha256=hashlib.sha256(data).hexdigest(), size=len(data),
                 retries=policy)
    assert _nothing_published(Cache(cache.root / "x"))


def test_404_and_401_fail_fast_without_retries(hub_server, cache, policy, sleeps) -> None:
    hub_server.add_repo(REPO, gated=True, token=TOKEN)
    hub_server.add_file(REPO, COMMIT, "w.bin", b"abc")
    url = hub_server.url_for(REPO, "main", "w.bin")
    with pytest.raises(DownloadError, match="HF_TOKEN") as info:
        download(url, cache, sha256=None, size=None, retries=policy, model_id="acme/tiny", file="w.bin")
    assert "401" in str(info.value)
    with pytest.raises(DownloadError, match="403") as info:
        download(url, cache, sha256=None, size=None, retries=policy, headers={"Authorization": "Bearer nope"})
    assert "nope" not in str(info.value)
    missing = hub_server.url_for(REPO, "main", "missing.bin")
    with pytest.raises(ModelNotFoundError, match="missing.bin"):
        download(missing, cache, sha256=None, size=None, retries=policy, headers={"Authorization": f"Bearer {TOKEN}"},
                 model_id="acme/tiny", file="missing.bin")
    assert hub_server.count("GET") == 3
    assert sleeps.calls == []
    path = download(url, cache, sha256=None, size=3, retries=policy, headers={"Authorization": f"Bearer {TOKEN}"})
    assert path.read_bytes() == b"abc"


def _dead_url() -> str:
    """A URL on a local port nothing listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again at once: nothing listens there
    return f"http://127.0.0.1:{port}/w.bin"


@pytest.mark.parametrize("parallel", [1, 4])
def test_unreachable_server_fails_fast_with_an_offline_error(cache, policy, sleeps, small_parallel,
                                                             parallel) -> None:
    url = _dead_url()
    with pytest.raises(OfflineError, match="unreachable") as info:
        download(url, cache, sha256="0" * 64, size=3_000_000, retries=policy, parallel=parallel,
                 model_id="acme/w", file="w.bin")
    assert all(s in str(info.value) for s in ("acme/w", "w.bin", url, "2 attempts"))
    # Two attempts, one short pause between them: not the whole backoff schedule.
    assert len(sleeps.calls) == transfer.UNREACHABLE_ATTEMPTS - 1
    assert max(sleeps.calls) <= policy.base_delay
    assert _nothing_published(cache)


def test_dns_failure_fails_fast_and_fetch_range_too(cache, policy, sleeps, monkeypatch) -> None:
    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(OfflineError, match="unreachable"):
        download("http://hub.invalid/w.bin", cache, sha256="0" * 64, size=1, retries=policy)
    assert len(sleeps.calls) == 1
    with pytest.raises(OfflineError, match="unreachable"):
        fetch_range("http://hub.invalid/w.bin", 0, 8, retries=policy)
    assert len(sleeps.calls) == 2


def test_a_connect_timeout_keeps_the_full_retry_policy(cache, policy, sleeps, monkeypatch) -> None:
    def slow_dns(*args, **kwargs):
        raise socket.timeout("timed out")  # urllib3 reports this as a connect timeout, not "refused"

    monkeypatch.setattr(socket, "getaddrinfo", slow_dns)
    with pytest.raises(OfflineError):
        download("http://hub.example/w.bin", cache, sha256="0" * 64, size=1, retries=policy)
    assert len(sleeps.calls) == policy.attempts - 1


def test_a_server_that_sent_bytes_then_went_down_gets_the_full_retry_policy(file_server, blob3, cache) -> None:
    url, data, sha = blob3
    file_server.inject("/w.bin", Fault("truncate", after=500_000))
    calls: list[float] = []

    def sleep_and_stop(seconds: float) -> None:  # the server dies after the first (partial) response
        calls.append(seconds)
        file_server.stop()

    policy = RetryPolicy(attempts=5, base_delay=0.01, max_delay=0.05, sleep=sleep_and_stop)
    with pytest.raises(DownloadError, match="resume") as info:
        download(url, cache, sha256=sha, size=len(data), retries=policy)
    assert not isinstance(info.value, OfflineError)
    assert len(calls) == policy.attempts - 1
    assert cache.partial_path(sha).stat().st_size == 500_000  # kept for the next run


def test_offline_miss_fails_at_once(file_server, blob3, cache) -> None:
    url, data, sha = blob3
    with pytest.raises(OfflineError) as info:
        download(url, cache, sha256=sha, size=len(data), offline=True, model_id="acme/w", file="w.bin")
    assert all(s in str(info.value) for s in ("acme/w", "w.bin", url, "offline"))
    assert file_server.requests == []


# ------------------------------------------------------------------------------------------ tokens


def test_redirect_to_another_host_drops_authorization(file_server, blob3, cache, policy, caplog) -> None:
    url, data, sha = blob3
    file_server.inject("/w.bin", Fault("redirect_other_host"))
    caplog.set_level(logging.DEBUG)
    path = download(url, cache, sha256=sha, size=len(data), retries=policy,
                    headers={"Authorization": f"Bearer {TOKEN}"}, progress={"disable": False})
    assert path.read_bytes() == data
    gets = _gets(file_server)
    assert [(r.host.split(":")[0], r.status) for r in gets] == [("127.0.0.1", 302), ("127.0.0.2", 200)]
    assert gets[0].authorization == f"Bearer {TOKEN}"
    assert gets[1].authorization is None
    assert TOKEN not in caplog.text


def test_hub_cdn_redirect_keeps_the_token_on_the_hub_only(cache, policy, capsys) -> None:
    data = _data(200_000, 3)
    with HubServer(redirect_lfs=True) as hub:
        hub.add_repo(REPO, gated=True, token=TOKEN)
        hub.add_file(REPO, COMMIT, "model.safetensors", data)
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {TOKEN}"  # even a token set on the session stays home
        host = hub.url.split("//")[1]
        path = download(hub.url_for(REPO, COMMIT, "model.safetensors"), cache,
                        sha256=hashlib.sha256(data).hexdigest(), size=len(data), auth_host=host,
                        session=session, retries=policy, progress={"disable": False})
        hub.wait_idle()
        log = [(r.path, r.authorization) for r in hub.requests]
    assert path.read_bytes() == data
    assert log[0] == (f"/{REPO}/resolve/{COMMIT}/model.safetensors", f"Bearer {TOKEN}")
    assert log[1][0].startswith("/cdn-lfs/") and log[1][1] is None
    assert TOKEN not in capsys.readouterr().err


def test_progress_is_silent_unless_asked_and_never_shows_tokens(file_server, blob3, cache, policy, capsys) -> None:
    url, data, sha = blob3
    download(url, cache, sha256=sha, size=len(data), retries=policy, progress=True,  # stderr is not a TTY here
             headers={"Authorization": f"Bearer {TOKEN}"})
    assert capsys.readouterr() == ("", "")
    other = Cache(cache.root / "o")
    download(url, other, sha256=sha, size=len(data), retries=policy, file="w.bin", progress={"disable": False})
    out = capsys.readouterr()
    assert out.out == "" and "w.bin" in out.err


# ------------------------------------------------------------------------------------------ concurrency


def test_six_threads_make_one_transfer(file_server, cache) -> None:
    data = _data(1_000_000, 1)
    sha = hashlib.sha256(data).hexdigest()
    url = file_server.add("/t.bin", data)
    file_server.inject("/t.bin", Fault("slow", rate=2_000_000))  # keep the one transfer busy while others wait
    barrier = threading.Barrier(6)
    results: list[Path | BaseException] = []

    def pull() -> None:
        barrier.wait()
        try:
            results.append(download(url, cache, sha256=sha, size=len(data)))
        except BaseException as exc:  # noqa: BLE001 - reported below
            results.append(exc)

    threads = [threading.Thread(target=pull) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [cache.blob_path(sha)] * 6
    assert len(_gets(file_server, "/t.bin")) == 1
    assert cache.blob_path(sha).read_bytes() == data


def test_six_processes_make_one_transfer(file_server, cache, tmp_path) -> None:
    data = _data(1_000_000, 2)
    sha = hashlib.sha256(data).hexdigest()
    url = file_server.add("/p.bin", data)
    file_server.inject("/p.bin", Fault("slow", rate=1_000_000))
    go = tmp_path / "go"
    code = (
        "import os, sys, time\n"
        "from hubload.cache import Cache\nfrom hubload.transfer import download\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
        f"print(download({url!r}, Cache({str(cache.root)!r}), sha256={sha!r}, size={len(data)}))\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
             for _ in range(6)]
    time.sleep(0.5)  # let them import; correctness does not depend on it, only the overlap does
    go.touch()
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0] * 6
    assert outs == [str(cache.blob_path(sha))] * 6
    assert len(_gets(file_server, "/p.bin")) == 1


def test_lock_left_by_a_killed_process_does_not_hang_a_download(file_server, blob3, cache, policy) -> None:
    url, data, sha = blob3
    code = (
        "import sys, time; from hubload.cache import Cache\n"
        f"with Cache({str(cache.root)!r}).lock({sha!r}):\n"
        "    print('locked', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
    finally:
        proc.kill()
        proc.wait()
    assert (cache.locks_dir / f"{sha}.lock").exists()  # the file stays; the kernel dropped the flock
    path = download(url, cache, sha256=sha, size=len(data), retries=policy, lock_timeout=20)
    assert path.read_bytes() == data


# ------------------------------------------------------------------------------------------ parallel ranges


@pytest.fixture
def small_parallel(monkeypatch) -> None:
    """Make the parallel path kick in for a few-MB file, with small segments."""
    monkeypatch.setattr(transfer, "PARALLEL_MIN_SIZE", 1_000_000)
    monkeypatch.setattr(ranges, "SEGMENT_SIZE", 300_000)


def test_parallel_ranges_download_correctly(file_server, blob3, cache, policy, small_parallel) -> None:
    url, data, sha = blob3
    file_server.inject("/w.bin", Fault("reset", after=100_000))  # one worker's segment dies mid-way
    path = download(url, cache, sha256=sha, size=len(data), retries=policy, parallel=4)
    assert path.read_bytes() == data
    ranges = {r.range for r in _gets(file_server) if r.status == 206}
    expected = {f"bytes={a}-{min(a + 300_000, len(data)) - 1}" for a in range(0, len(data), 300_000)}
    assert expected <= ranges


def test_parallel_needs_a_digest_to_splice_ranges(file_server, blob3, cache, policy, small_parallel) -> None:
    url, data, sha = blob3
    assert download(url, cache, sha256=None, size=len(data), retries=policy, parallel=4).read_bytes() == data
    assert [r.range for r in _gets(file_server)] == [None]


def test_parallel_falls_back_when_range_is_ignored(file_server, blob3, cache, policy, small_parallel) -> None:
    url, data, sha = blob3
    file_server.inject("/w.bin", Fault("ignore_range", times=None))
    path = download(url, cache, sha256=sha, size=len(data), retries=policy, parallel=4)
    assert path.read_bytes() == data


def test_parallel_detects_wrong_bytes(file_server, blob3, cache, policy, small_parallel) -> None:
    url, data, sha = blob3
    file_server.inject("/w.bin", Fault("wrong_bytes", offset=1_500_000, times=None))
    with pytest.raises(HashMismatchError):
        download(url, cache, sha256=sha, size=len(data), retries=policy, parallel=3)
    assert _nothing_published(cache)
    assert list(cache.partial_dir.iterdir()) == []


def test_parallel_resume_uses_only_the_recorded_hashed_prefix(file_server, blob3, cache, policy,
                                                              small_parallel) -> None:
    url, data, sha = blob3
    # A killed parallel run: preallocated file, holes past the recorded prefix.
    _leave_partial(cache, sha, data[:1_200_000] + b"\0" * (len(data) - 1_200_000), sha256=sha, size=len(data),
                   etag=f'"{sha}"', preallocated=True)
    meta = json.loads(cache.partial_meta_path(sha).read_text())
    meta["bytes_done"] = 900_000
    cache.partial_meta_path(sha).write_text(json.dumps(meta))
    path = download(url, cache, sha256=sha, size=len(data), retries=policy, parallel=2)
    assert path.read_bytes() == data
    assert min(int(r.range.split("=")[1].split("-")[0]) for r in _gets(file_server)) == 900_000


def _starts(gets: list) -> list[int]:
    return sorted(int(r.range.split("=")[1].split("-")[0]) for r in gets if r.range)


def test_killed_parallel_download_resumes_every_range_where_it_stopped(file_server, blob3, cache, small_parallel,
                                                                       tmp_path) -> None:
    url, data, sha = blob3
    file_server.inject("/w.bin", Fault("slow", times=None, rate=150_000))
    code = (
        "import hubload.ranges as r, hubload.transfer as t; from hubload.cache import Cache\n"
        "t.PARALLEL_MIN_SIZE, r.SEGMENT_SIZE, r.CHECKPOINT_SECONDS = 1_000_000, 300_000, 0.05\n"
        f"t.download({url!r}, Cache({str(cache.root)!r}), sha256={sha!r}, size={len(data)}, parallel=4)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)

    def partly_written() -> int:
        try:
            segs = json.loads(_writer_partial(cache, sha)[1].read_text()).get("segments", {})
        except (OSError, ValueError):
            return 0
        return sum(1 for a, w in segs.items() if int(a) < w < int(a) + 300_000)

    try:
        deadline = time.monotonic() + 30
        while partly_written() < 2:
            assert proc.poll() is None, "the parallel run ended before it could be killed"
            assert time.monotonic() < deadline, "the parallel run never recorded range progress"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    meta = json.loads(_writer_partial(cache, sha)[1].read_text())
    assert meta["preallocated"] and not cache.has_blob(sha)
    done, segs = meta["bytes_done"], {int(a): w for a, w in meta["segments"].items()}
    bounds = sorted(segs)
    # What the killed run recorded decides exactly which ranges the next run asks for.
    expected = set()
    for a, b in zip(bounds, [*bounds[1:], len(data)]):
        start = max(a, done, segs[a])
        if start < b:
            expected.add(f"bytes={start}-{b - 1}")
    file_server.clear_faults()
    file_server.wait_idle()
    file_server.reset_log()

    path = download(url, cache, sha256=sha, size=len(data), retries=RetryPolicy(base_delay=0.001), parallel=4)
    assert path.read_bytes() == data
    gets = _gets(file_server)
    assert {r.range for r in gets} == expected and len(gets) == len(expected)
    resumed_inside = [s for s in _starts(gets) if s not in segs]
    assert len(resumed_inside) >= 2, "ranges restarted from their beginnings instead of where they stopped"
    assert sum(r.bytes_sent for r in gets) == len(data) - done - sum(max(w, done) - max(a, done)
                                                                    for a, w in segs.items())


def _leave_ranges(cache: Cache, sha: str, data: bytes, done: int, segments: dict[int, int], *,
                  damage: int | None = None) -> None:
    """A killed parallel run's partial: the prefix and each range's written part on disk, zeros elsewhere."""
    content = bytearray(len(data))
    content[:done] = data[:done]
    for a, w in segments.items():
        content[a:w] = data[a:w]
    if damage is not None:
        content[damage] ^= 0xFF
    _leave_partial(cache, sha, bytes(content), sha256=sha, size=len(data), etag=f'"{sha}"', preallocated=True)
    meta = json.loads(cache.partial_meta_path(sha).read_text())
    meta.update(bytes_done=done, segments={str(a): w for a, w in segments.items()})
    cache.partial_meta_path(sha).write_text(json.dumps(meta))


# Ranges of 300 kB: the first hashed, one half written, one complete, one untouched, the rest 50 kB in.
_RECORDED = {0: 300_000, 300_000: 450_000, 600_000: 900_000, 900_000: 900_000,
             **{a: a + 50_000 for a in range(1_200_000, 3_000_000, 300_000)}}


def test_recorded_ranges_are_continued_and_the_result_verifies(file_server, blob3, cache, policy,
                                                               small_parallel) -> None:
    url, data, sha = blob3
    _leave_ranges(cache, sha, data, 300_000, _RECORDED)
    path = download(url, cache, sha256=sha, size=len(data), retries=policy, parallel=3)
    assert path.read_bytes() == data
    gets = _gets(file_server)
    assert sorted(r.range for r in gets) == sorted(
        ["bytes=450000-599999", "bytes=900000-1199999"]
        + [f"bytes={a + 50_000}-{a + 299_999}" for a in range(1_200_000, 3_000_000, 300_000)])
    assert all(r.header("If-Range") == f'"{sha}"' for r in gets)
    assert sum(r.bytes_sent for r in gets) == len(data) - sum(w - a for a, w in _RECORDED.items())


def test_a_damaged_recorded_range_gets_one_clean_retry(file_server, blob3, cache, policy, small_parallel) -> None:
    url, data, sha = blob3
    _leave_ranges(cache, sha, data, 300_000, _RECORDED, damage=1_210_000)  # e.g. a power cut lost that write
    path = download(url, cache, sha256=sha, size=len(data), retries=policy, parallel=3)
    assert path.read_bytes() == data
    assert min(_starts(_gets(file_server))) == 0


def test_recorded_ranges_with_a_single_stream_resume_from_the_prefix(file_server, blob3, cache, policy,
                                                                     small_parallel) -> None:
    url, data, sha = blob3
    _leave_ranges(cache, sha, data, 300_000, _RECORDED)
    path = download(url, cache, sha256=sha, size=len(data), retries=policy, parallel=1)
    assert path.read_bytes() == data
    assert [r.range for r in _gets(file_server)] == ["bytes=300000-"]


@pytest.mark.parametrize("segments", [{"x": 1}, {"0": 10, "5": 3}, {"600000": 600_000}, []])
def test_unusable_range_records_fall_back_to_the_prefix(file_server, blob3, cache, policy, small_parallel,
                                                        segments) -> None:
    url, data, sha = blob3
    _leave_ranges(cache, sha, data, 300_000, {})
    meta = json.loads(cache.partial_meta_path(sha).read_text())
    meta["segments"] = segments
    cache.partial_meta_path(sha).write_text(json.dumps(meta))
    path = download(url, cache, sha256=sha, size=len(data), retries=policy, parallel=3)
    assert path.read_bytes() == data
    assert min(_starts(_gets(file_server))) == 300_000


# ------------------------------------------------------------------------------------------ fetch_range


def test_fetch_range(file_server, blob3, policy) -> None:
    url, data, _ = blob3
    assert fetch_range(url, 8, 100, retries=policy) == data[8:100]
    file_server.inject("/w.bin", Fault("ignore_range"))
    assert fetch_range(url, 1000, 1010, retries=policy) == data[1000:1010]
    assert fetch_range(url, len(data) - 5, len(data) + 50, retries=policy) == data[-5:]
    assert fetch_range(url, len(data) + 1, len(data) + 2, retries=policy) == b""
    file_server.inject("/w.bin", Fault("status", status=503))
    file_server.inject("/w.bin", Fault("redirect_other_host"))
    assert fetch_range(url, 0, 8, headers={"Authorization": f"Bearer {TOKEN}"}, retries=policy) == data[:8]
    last = _gets(file_server)[-2:]
    assert [(r.host.split(":")[0], r.authorization) for r in last] == [("127.0.0.1", f"Bearer {TOKEN}"),
                                                                      ("127.0.0.2", None)]
    with pytest.raises(ModelNotFoundError):
        fetch_range(file_server.url_for("/nope"), 0, 8, retries=policy)
    with pytest.raises(OfflineError):
        fetch_range(url, 0, 8, offline=True)
