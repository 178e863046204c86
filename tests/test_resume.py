"""A SIGKILLed pull loses only what was in flight: single stream, parallel ranges, and through a 302 to a
storage host that serves the bytes without the Hub's headers.

Each scenario runs the first pull in a subprocess against a throttled server, kills it with SIGKILL once the
server has sent a chosen share of the file, and lets a second pull finish. Bytes are counted on the server
side: the second pull may re-send at most what the first did not send plus 10% of the file (what was in
flight). No test reads a clock to decide anything.
"""

from __future__ import annotations

import hashlib
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import hubload.ranges as ranges
import hubload.transfer as transfer
from hubload.cache import Cache
from hubload.transfer import RetryPolicy, download
from tests.servers import MINILM_COMMIT, MINILM_REPO_ID, FileServer, HubServer

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
LOST_AT_MOST = 0.10  # of the file: what may be in flight at the kill

# The child runs the real engine; for the small files only the two size thresholds are lowered, so a few MiB
# take the same parallel-range path a multi-GiB file takes.
_CHILD = """
import sys
import hubload.ranges as r, hubload.transfer as t
from hubload.cache import Cache
if {small}:
    t.PARALLEL_MIN_SIZE, r.SEGMENT_SIZE = 1024 * 1024, 512 * 1024
t.download({url!r}, Cache({root!r}), sha256={sha!r}, size={size}, parallel={parallel}, auth_host={auth!r})
"""


def _kill_at(server, proc: subprocess.Popen, path: str, share: float, size: int) -> int:
    """SIGKILL ``proc`` once the server has sent ``share`` of the file; return the bytes it had sent in all."""
    deadline = time.monotonic() + 60  # a hang guard only
    while server.bytes_sent(path) < share * size:
        assert proc.poll() is None, "the first pull ended before it could be killed"
        assert time.monotonic() < deadline, "the first pull made no progress"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    server.wait_idle()
    return server.bytes_sent(path)


def _killed_then_resumed(server, url: str, path: str, data_sha_size: tuple[bytes | None, str, int], cache: Cache,
                         *, share: float, parallel: int, small: bool, auth: str | None) -> tuple[int, int, list]:
    """Run, kill at ``share``, resume; return (sent before the kill, re-sent after it, the resume's GETs)."""
    data, sha, size = data_sha_size
    code = _CHILD.format(small=small, url=url, root=str(cache.root), sha=sha, size=size, parallel=parallel,
                         auth=auth)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    try:
        first = _kill_at(server, proc, path, share, size)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not cache.has_blob(sha)
    mark = len(server.requests)
    blob = download(url, cache, sha256=sha, size=size, parallel=parallel, auth_host=auth,
                    retries=RetryPolicy(base_delay=0.01))
    server.wait_idle()
    if data is not None:
        assert blob.read_bytes() == data
    else:
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == sha
    gets = [r for r in server.requests[mark:] if r.method == "GET" and r.bytes_sent]
    return first, server.bytes_sent(path, since=mark), gets


@pytest.fixture
def small_layout(monkeypatch) -> None:
    """The resuming pull (in this process) uses the child's thresholds."""
    monkeypatch.setattr(transfer, "PARALLEL_MIN_SIZE", MiB)
    monkeypatch.setattr(ranges, "SEGMENT_SIZE", 512 * 1024)


def _data(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.mark.parametrize(("parallel", "seed"), [(4, 1), (4, 2), (1, 3)], ids=["ranges-a", "ranges-b", "one-stream"])
def test_a_sigkill_at_a_random_point_loses_only_what_was_in_flight(file_server: FileServer, tmp_path, small_layout,
                                                                    parallel, seed) -> None:
    data = _data(16 * MiB, seed)
    sha = hashlib.sha256(data).hexdigest()
    url = file_server.add("/w.bin", data)
    file_server.throttle = 4 * MiB
    share = random.Random(seed).uniform(0.3, 0.7)
    first, again, gets = _killed_then_resumed(file_server, url, "/w.bin", (data, sha, len(data)),
                                              Cache(tmp_path / "c"), share=share, parallel=parallel, small=True,
                                              auth=None)
    assert first >= share * len(data)
    assert again <= len(data) - first + LOST_AT_MOST * len(data), (
        f"killed after {first / len(data):.0%} was sent, the resume re-sent {again / len(data):.0%}")
    if parallel > 1:
        assert len(gets) >= 2 and all(r.status == 206 for r in gets)  # the parallel path, on both runs
    else:
        assert len(gets) == 1 and gets[0].range == f"bytes={len(data) - again}-"


def test_resume_through_a_redirect_to_a_storage_host_without_hub_headers(tmp_path, small_layout) -> None:
    data = _data(16 * MiB, 7)
    sha = hashlib.sha256(data).hexdigest()
    with HubServer(redirect_lfs=True, bare_cdn=True) as hub:
        hub.add_file("acme/big", "c" * 40, "model.safetensors", data)
        hub.throttle = 4 * MiB
        url = hub.url_for("acme/big", "c" * 40, "model.safetensors")
        auth = hub.url.split("//", 1)[1]
        first, again, gets = _killed_then_resumed(hub, url, "/cdn-lfs/*", (data, sha, len(data)),
                                                  Cache(tmp_path / "c"), share=0.5, parallel=4, small=True,
                                                  auth=auth)
        assert again <= len(data) - first + LOST_AT_MOST * len(data), (
            f"killed after {first / len(data):.0%} was sent, the resume re-sent {again / len(data):.0%}")
        assert gets and all(r.host.startswith("127.0.0.2") or r.host.startswith("localhost") for r in gets)
        assert all(r.status == 206 for r in gets) and len(gets) >= 2
        assert all(r.authorization is None for r in hub.requests if r.path.startswith("/cdn-lfs/"))


def test_minilm_through_the_hub_redirect_at_default_sizes(minilm_file, minilm_sha256, tmp_path) -> None:
    """The realistic case: the 90 MB MiniLM file takes the default parallel path (>= 64 MiB), 30 MB/s link."""
    size = minilm_file.stat().st_size
    assert size >= transfer.PARALLEL_MIN_SIZE
    with HubServer(redirect_lfs=True, bare_cdn=True) as hub:
        hub.add_file(MINILM_REPO_ID, MINILM_COMMIT, "model.safetensors", minilm_file)
        hub.throttle = 30_000_000
        url = hub.url_for(MINILM_REPO_ID, MINILM_COMMIT, "model.safetensors")
        first, again, gets = _killed_then_resumed(hub, url, "/cdn-lfs/*", (None, minilm_sha256, size),
                                                  Cache(tmp_path / "c"), share=0.5, parallel=8, small=False,
                                                  auth=hub.url.split("//", 1)[1])
        assert again <= size - first + LOST_AT_MOST * size, (
            f"killed after {first / size:.0%} was sent, the resume re-sent {again / size:.0%}")
        assert len(gets) >= 2 and all(r.status == 206 for r in gets)
