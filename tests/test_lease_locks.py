"""Locks are leases, and correctness never depends on them.

* A holder that stops making progress (SIGSTOP) does not block anyone past ``HUBLOAD_LOCK_LEASE``: the waiter
  goes on by itself, continuing from a *copy* of the stalled holder's partial; when the holder wakes up it
  finishes harmlessly and the cache still verifies.
* With a lock that does nothing (NFS or Lustre without flock), concurrent writers cost bandwidth, never a
  corrupt blob: each writes its own partial file and publishes only what it verified.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import hubload.cache as cache_mod
from hubload.cache import Cache, Lease
from hubload.errors import HashMismatchError
from hubload.transfer import RetryPolicy, download
from tests.servers import Fault, FileServer

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024


def _data(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def test_a_waiter_waits_while_the_holder_beats_and_goes_on_once_it_stops(tmp_path) -> None:
    cache = Cache(tmp_path / "c")
    held, stopped = threading.Event(), threading.Event()
    release = threading.Event()

    def holder() -> None:
        with cache.lock("k", lease=0.5) as lease:
            held.set()
            for _ in range(20):  # 2 s of progress, four leases long
                lease.beat()
                time.sleep(0.1)
            stopped.set()  # alive, holding the flock, but no progress any more
            release.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert held.wait(10)
        with cache.lock("k", lease=0.5) as mine:
            assert stopped.is_set(), "the waiter went on while the holder was still making progress"
            assert not mine.held
    finally:
        release.set()
        t.join()
    with cache.lock("k", lease=0.5) as again:
        assert again.held


def _holder(url: str, cache: Cache, sha: str, size: int, env: dict[str, str]) -> subprocess.Popen:
    code = (
        "import hubload.ranges as r, hubload.transfer as t; from hubload.cache import Cache\n"
        "t.PARALLEL_MIN_SIZE, r.SEGMENT_SIZE = 1024 * 1024, 512 * 1024\n"
        f"print(t.download({url!r}, Cache({str(cache.root)!r}), sha256={sha!r}, size={size}, parallel=4))\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)


def test_a_stalled_holder_does_not_block_and_does_no_harm_when_it_wakes(file_server: FileServer, tmp_path,
                                                                       monkeypatch, caplog) -> None:
    import hubload.ranges as ranges
    import hubload.transfer as transfer

    monkeypatch.setattr(transfer, "PARALLEL_MIN_SIZE", MiB)
    monkeypatch.setattr(ranges, "SEGMENT_SIZE", 512 * 1024)
    monkeypatch.setenv("HUBLOAD_LOCK_LEASE", "1")
    data = _data(8 * MiB, 11)
    sha = hashlib.sha256(data).hexdigest()
    url = file_server.add("/w.bin", data)
    file_server.throttle = 4 * MiB
    cache = Cache(tmp_path / "c")
    proc = _holder(url, cache, sha, len(data), dict(os.environ))
    try:
        deadline = time.monotonic() + 60
        while file_server.bytes_sent("/w.bin") < len(data) // 3:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.005)
        proc.send_signal(signal.SIGSTOP)  # alive, holding the lock, no progress: a dead node of a shared FS
        stalled_at = file_server.bytes_sent("/w.bin")
        file_server.throttle = None
        mark = len(file_server.requests)
        result: dict[str, object] = {}

        def waiter() -> None:
            try:
                result["blob"] = download(url, cache, sha256=sha, size=len(data), parallel=4,
                                          retries=RetryPolicy(base_delay=0.01))
            except BaseException as exc:  # noqa: BLE001 - reported below
                result["error"] = exc

        with caplog.at_level(logging.WARNING, logger="hubload"):
            t = threading.Thread(target=waiter)
            t.start()
            t.join(60)  # a hang guard only: without the lease it would wait as long as the holder lives
        assert not t.is_alive(), "the waiter is still blocked by a stalled holder"
        assert "error" not in result, result.get("error")
        assert Path(result["blob"]).read_bytes() == data
        assert any("going on without the lock" in r.getMessage() for r in caplog.records)
        # It continued from a copy of what the stalled holder had written, not from byte 0.
        assert file_server.bytes_sent("/w.bin", since=mark) <= len(data) - stalled_at + len(data) // 10
    finally:
        proc.send_signal(signal.SIGCONT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0  # the holder woke up and finished: the blob was there, nothing overwritten
    assert out.strip() == str(cache.blob_path(sha))
    assert cache.blob_path(sha).read_bytes() == data
    assert all(r.ok for r in cache.verify())
    leftovers = [p.name for p in cache.partial_dir.iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


@contextlib.contextmanager
def _no_lock(self, key, **_kw):
    """A lock that locks nothing, as flock on some network filesystems."""
    yield Lease(self.locks_dir / f"{key}.lock", held=False)


def test_with_a_no_op_lock_concurrent_writers_never_publish_a_corrupt_blob(file_server: FileServer, tmp_path,
                                                                          monkeypatch) -> None:
    import hubload.ranges as ranges
    import hubload.transfer as transfer

    monkeypatch.setattr(cache_mod.Cache, "lock", _no_lock)
    monkeypatch.setattr(transfer, "PARALLEL_MIN_SIZE", MiB)
    monkeypatch.setattr(ranges, "SEGMENT_SIZE", 256 * 1024)
    data = _data(4 * MiB, 12)
    sha = hashlib.sha256(data).hexdigest()
    url = file_server.add("/w.bin", data)
    file_server.throttle = 16 * MiB  # slow enough that the writers overlap
    cache = Cache(tmp_path / "c")
    # An earlier run's partial, which exactly one writer takes over, and one writer gets damaged bytes.
    cache.partial_dir.mkdir(parents=True)
    cache.partial_path(sha).write_bytes(data[: MiB])
    cache.partial_meta_path(sha).write_text(
        f'{{"version": 1, "sha256": "{sha}", "size": {len(data)}, "bytes_done": {MiB}, "etag": null}}')
    file_server.inject("/w.bin", Fault("wrong_bytes", offset=2 * MiB + 5, count=3))
    outcomes: list[object] = []
    lock = threading.Lock()
    go = threading.Barrier(6)

    def writer(parallel: int) -> None:
        go.wait()
        try:
            got: object = download(url, cache, sha256=sha, size=len(data), parallel=parallel,
                                   retries=RetryPolicy(base_delay=0.01))
        except HashMismatchError as exc:
            got = exc
        with lock:
            outcomes.append(got)

    threads = [threading.Thread(target=writer, args=(1 + i % 2 * 3,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(outcomes) == 6
    blobs = {o for o in outcomes if isinstance(o, Path)}
    assert blobs == {cache.blob_path(sha)}
    assert cache.blob_path(sha).read_bytes() == data
    assert all(r.ok for r in cache.verify())
    file_server.wait_idle()
    # No lock: several writers each downloaded (bandwidth), yet what was published is right.
    assert file_server.bytes_sent("/w.bin") > len(data)
