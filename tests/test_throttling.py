"""Throttling: ``Retry-After`` and the IETF ``RateLimit`` / ``RateLimit-Policy`` headers are honoured, a pause
asked for by a host applies to every request to it, connections per host are capped, and a spent retry
budget is a clear ``DownloadError`` naming the URL. Delays are counted with the recorded sleep, never timed.
"""

from __future__ import annotations

import hashlib
import random

import pytest

import hubload.ranges as ranges
import hubload.transfer as transfer
from hubload.cache import Cache
from hubload.errors import DownloadError
from hubload.transfer import RetryPolicy, download
from tests.servers import Fault, FileServer

MiB = 1024 * 1024


@pytest.fixture
def blob(file_server: FileServer) -> tuple[str, bytes, str]:
    data = random.Random(5).randbytes(3 * MiB)
    return file_server.add("/w.bin", data), data, hashlib.sha256(data).hexdigest()


@pytest.fixture
def policy(sleeps) -> RetryPolicy:
    return RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05, sleep=sleeps)


def _rate_limited(headers: dict[str, str], times: int | None = 1) -> Fault:
    return Fault("ratelimit", times=times, headers=headers)


@pytest.mark.parametrize(("headers", "wait"), [
    ({"RateLimit": '"api";r=0;t=2'}, 2.0),
    # the exhausted policy decides, not the one with quota left
    ({"RateLimit": '"burst";r=0;t=5, "daily";r=900;t=3600',
      "RateLimit-Policy": '"burst";q=100;w=60, "daily";q=1000;w=86400'}, 5.0),
    ({"RateLimit-Policy": '"api";q=500;w=300;t=7'}, 7.0),
    ({"RateLimit-Reset": "4"}, 4.0),  # older drafts
    ({"Retry-After": "3", "RateLimit": '"api";r=0;t=9'}, 3.0),  # Retry-After wins
], ids=["ratelimit-t", "exhausted-policy", "policy-t", "ratelimit-reset", "retry-after-first"])
def test_a_429_waits_as_long_as_the_server_asks(file_server, blob, tmp_path, policy, sleeps, headers, wait) -> None:
    url, data, sha = blob
    file_server.inject("/w.bin", _rate_limited(headers))
    path = download(url, Cache(tmp_path / "c"), sha256=sha, size=len(data), retries=policy)
    assert path.read_bytes() == data
    assert sleeps.calls == [wait]
    assert file_server.count("GET", "/w.bin") == 2


def test_a_429_without_any_hint_backs_off_with_jitter(file_server, blob, tmp_path, sleeps) -> None:
    url, data, sha = blob
    file_server.inject("/w.bin", _rate_limited({}, times=2))
    retries = RetryPolicy(attempts=5, base_delay=1.0, max_delay=8.0, sleep=sleeps)
    download(url, Cache(tmp_path / "c"), sha256=sha, size=len(data), retries=retries)
    first, second = sleeps.calls
    assert 0.5 <= first <= 1.0 and 1.0 <= second <= 2.0  # "equal jitter": capped exponential, never near zero


def test_a_spent_retry_budget_is_a_clear_error_naming_the_url(file_server, blob, tmp_path, policy, sleeps) -> None:
    url, data, sha = blob
    file_server.inject("/w.bin", _rate_limited({"RateLimit": '"api";r=0;t=2'}, times=None))
    with pytest.raises(DownloadError) as ei:
        download(url, Cache(tmp_path / "c"), sha256=sha, size=len(data), retries=policy, file="w.bin")
    msg = str(ei.value)
    assert url in msg and "429" in msg and "rate limited" in msg and "retry budget" in msg
    assert ei.value.url == url
    assert file_server.count("GET", "/w.bin") == policy.attempts
    assert sleeps.calls == [2.0] * (policy.attempts - 1)


def test_a_pause_asked_by_the_host_holds_every_range_worker(file_server, blob, tmp_path, sleeps, monkeypatch) -> None:
    url, data, sha = blob
    monkeypatch.setattr(transfer, "PARALLEL_MIN_SIZE", MiB)
    monkeypatch.setattr(ranges, "SEGMENT_SIZE", 128 * 1024)
    file_server.inject("/w.bin", _rate_limited({"RateLimit": '"api";r=0;t=30'}))
    retries = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05, sleep=sleeps)
    path = download(url, Cache(tmp_path / "c"), sha256=sha, size=len(data), retries=retries, parallel=4)
    assert path.read_bytes() == data
    # The worker that got the 429 waits the 30 s, and so does every other worker before its next request
    # (the recorded sleep returns at once, so the host's pause is still running when they ask).
    long_waits = [c for c in sleeps.calls if c > 25]
    assert long_waits[0] == 30.0 and len(long_waits) >= 2


def test_connections_per_host_are_capped(file_server, blob, tmp_path, policy, monkeypatch) -> None:
    url, data, sha = blob
    monkeypatch.setenv("HUBLOAD_MAX_PER_HOST", "2")
    monkeypatch.setattr(transfer, "PARALLEL_MIN_SIZE", MiB)
    monkeypatch.setattr(ranges, "SEGMENT_SIZE", 128 * 1024)
    file_server.throttle = 8 * MiB  # slow enough that eight workers would overlap
    path = download(url, Cache(tmp_path / "c"), sha256=sha, size=len(data), retries=policy, parallel=8)
    assert path.read_bytes() == data
    assert file_server.count("GET", "/w.bin") > 4  # many ranges ...
    assert file_server.peak_inflight <= 2  # ... never more than two at once
