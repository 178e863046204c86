"""The transfer engine: one verified, resumable, lock-protected download path for every remote source.

A download streams into the cache's partial file while a writer thread hashes and writes each chunk
(network, hashing and disk overlap: ``hashlib`` and file writes release the GIL). The digest is checked
against the expected sha256 (or prefix) and size, and only then is the file published into ``blobs/``
with one ``os.replace``. Nothing unverified ever appears under ``blobs/`` or ``models/``.

Robustness, in order of what goes wrong in practice:

* a per-target lease lock (``flock`` plus a heartbeat, ``HUBLOAD_LOCK_LEASE``) makes N threads/processes
  pulling the same file do one transfer, and a stalled holder blocks nobody for longer than the lease;
  nothing correct depends on it: each writer has its own partial file (``hubload.partial``);
* an interrupted transfer (even SIGKILL) resumes with ``Range`` (+ ``If-Range``); a server that ignores
  the Range (200), answers 416, or whose ETag changed restarts cleanly from byte 0;
* connection errors, timeouts, resets, 5xx and 429 (honouring ``Retry-After`` and the IETF ``RateLimit``
  headers, for every request to that host) retry with capped exponential backoff and jitter, each retry
  resuming from the bytes already written; other 4xx fail at once;
  a server nobody answers for (refused, no DNS) before any byte arrived fails fast with ``OfflineError``;
* redirects are followed by hand so ``Authorization`` only ever goes to ``auth_host``;
* large files can be fetched with parallel ranged requests into one preallocated file; each range's progress
  is recorded, so a killed parallel download resumes every range where it stopped.

The HTTP rules live in ``hubload.httpio``, the partial file's resume state in ``hubload.partial`` and the
parallel ranges in ``hubload.ranges``; this module is the single-stream engine and :func:`download`.

Resuming in a *new* process re-hashes the partial prefix once (``hashlib`` state cannot be saved);
retries inside one process keep the running hash and never re-read anything.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from hubload import config
from hubload.cache import Cache
from hubload.cache_fs import cache_errors, digest_mismatch
from hubload.errors import DownloadError, OfflineError
from hubload.httpio import (  # the public ones are re-exported: see __all__
    CHUNK_SIZE,
    DEFAULT_RETRY,
    NETWORK_ERRORS,
    UNREACHABLE_ATTEMPTS,
    Body,
    Job,
    Restart,
    RetryPolicy,
    Transient,
    content_range,
    fetch_range,
    open_response,
    range_headers,
    redact_url,
)
from hubload.partial import PartialFile, State, load_state, pwrite_all, reset_partial, start_writeback, write_meta
from hubload.ranges import WRITE_SECONDS, NoRanges, fetch_parallel

__all__ = ["CHUNK_SIZE", "DEFAULT_RETRY", "UNREACHABLE_ATTEMPTS", "RetryPolicy", "download", "fetch_range",
           "redact_url"]

logger = logging.getLogger("hubload")

PIPELINE_BUFFERS = 6                  # buffers in flight in one stream (reading, writing, hashing, spare)
PARALLEL_MIN_SIZE = 64 * 1024 * 1024  # smaller files are not worth several connections
PROBE_MIN_SIZE = 256 * 1024 * 1024    # files this large start as one stream and split only if it proves slow
PROBE_SECONDS = 0.3                   # how long that first stream is timed
STREAM_FAST = 256 * 1024 * 1024       # bytes/s from which one stream is kept: the client's CPU, not the link, is
                                      # then the limit, and more connections would only compete for it


class _GoParallel(Exception):
    """The probing stream is slow (a per-connection cap): continue from ``state.offset`` with ranges."""


# ---------------------------------------------------------------------------------------------- one stream
def _stream(job: Job, state: State, f: Any, *, probe: bool = False) -> None:
    """One GET from ``state.offset`` to the end, appending to ``f`` and hashing on the way.

    With ``probe``, raise ``_GoParallel`` (everything received so far kept) if the stream runs slower than
    ``STREAM_FAST`` after ``PROBE_SECONDS`` and enough of the file is left to be worth splitting.
    """
    extra = range_headers(state.offset, etag=state.etag) if state.offset else {}
    resp, _final_url = open_response(job, extra)
    with resp:
        status = resp.status_code
        etag = resp.headers.get("ETag")
        if status == 200 and state.offset:
            logger.info("hubload: %s ignored the Range request (or the file changed); restarting from 0", job.where)
            reset_partial(job, state)
            f.seek(0)
        elif status == 206:
            cr = content_range(resp, state.offset)
            if cr is None:
                raise Restart(f"bad Content-Range {resp.headers.get('Content-Range')!r} for offset {state.offset}")
            if state.etag and etag and etag != state.etag:
                raise Restart("the ETag changed since the partial was written")
            total = cr[1]
            if job.size is not None and total is not None and total != job.size:
                raise Transient(f"server reports {total} bytes, expected {job.size}")
        elif status != 200:
            raise DownloadError(f"{job.where}: unexpected HTTP {status}.", url=job.url, model_id=job.model_id)
        if etag != state.etag or state.offset == 0:
            state.etag = etag
            write_meta(job, state)
        length = resp.headers.get("Content-Length")
        end = state.offset + int(length) if length and length.isdigit() else None
        if job.size is not None and end is not None and end != job.size:
            raise Transient(f"server announces {end} bytes in all, expected {job.size}")
        limit = job.size if job.size is not None else end  # equal to end when both are known (checked above)
        _pump(job, state, resp.raw, f, limit=limit, probe=probe)
    if limit is not None and state.offset < limit:
        raise Transient(f"body ended at byte {state.offset} of {limit} (truncated)")


def _pump(job: Job, state: State, raw: Any, f: Any, *, limit: int | None, probe: bool = False) -> None:
    """Read the body into a ring of buffers; a writer thread writes them and a hashing thread hashes them.

    Three stages overlap (socket reads, ``pwrite``, sha256 all release the GIL) and no chunk is copied in
    Python. ``state.offset``/``state.hasher`` only advance once a chunk is both written and hashed, so after
    an error the retry resumes exactly after the bytes that are on disk and in the hash.
    """
    f.flush()
    fd = f.fileno()
    free: queue.Queue[bytearray] = queue.Queue()
    for _ in range(PIPELINE_BUFFERS):
        free.put(bytearray(CHUNK_SIZE))
    to_write: queue.Queue[tuple[bytearray, int, int] | None] = queue.Queue()
    to_hash: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()
    failure: list[BaseException] = []

    def writer() -> None:
        while (item := to_write.get()) is not None:
            buf, pos, n = item
            if not failure:
                try:
                    with cache_errors(job.part, "writing"):
                        pwrite_all(fd, memoryview(buf)[:n], pos)
                    start_writeback(fd, pos, n)
                    job.beat()
                except BaseException as exc:  # noqa: BLE001 - handed to the reader thread
                    failure.append(exc)
            if failure:
                free.put(buf)  # keep draining so the reader never blocks on a dead stage
            else:
                to_hash.put((buf, n))
        to_hash.put(None)

    def hasher() -> None:
        while (item := to_hash.get()) is not None:
            buf, n = item
            if not failure:
                try:
                    state.hasher.update(memoryview(buf)[:n])
                    state.offset += n
                    if job.bar is not None:
                        job.bar.update(n)
                except BaseException as exc:  # noqa: BLE001 - handed to the reader thread
                    failure.append(exc)
            free.put(buf)

    threads = [threading.Thread(target=writer, name="hubload-writer", daemon=True),
               threading.Thread(target=hasher, name="hubload-hasher", daemon=True)]
    for t in threads:
        t.start()
    body = Body(raw)
    received = started_at = state.offset
    t0 = time.monotonic()
    try:
        while not failure:
            buf = free.get()
            # Big chunks on a fast link; on a slow one, hand over at least every WRITE_SECONDS so the partial
            # file (what a killed run resumes from) keeps growing.
            view = memoryview(buf)
            got = 0
            lost: BaseException | None = None
            deadline = time.monotonic() + WRITE_SECONDS
            try:
                while got < len(view):
                    n = body.readinto1(view[got:])
                    if not n:
                        break
                    got += n
                    if time.monotonic() >= deadline:
                        break
            except NETWORK_ERRORS as exc:
                lost = exc  # bytes that arrived before a reset are kept: the retry resumes after them
            if got and limit is not None and received + got > limit:
                free.put(buf)
                raise Restart(f"server sent more than the expected {limit} bytes")
            if got:
                state.received = True
                to_write.put((buf, received, got))
                received += got
            else:
                free.put(buf)
            if lost is not None:
                raise Transient(f"connection lost after {received} bytes: {type(lost).__name__}: {lost}") from None
            if not got:
                break
            if probe and (elapsed := time.monotonic() - t0) >= PROBE_SECONDS:
                probe = False
                rate = (received - started_at) / elapsed
                if rate < STREAM_FAST and limit is not None and limit - received >= PARALLEL_MIN_SIZE:
                    logger.debug("hubload: %s streams at %.0f MB/s; switching to ranged requests", job.where,
                                 rate / 1e6)
                    raise _GoParallel()
    finally:
        to_write.put(None)
        for t in threads:
            t.join()
        if failure:
            raise failure[0]


# ---------------------------------------------------------------------------------------------- the engine
def _transfer(job: Job, parallel: int, lease: float) -> Path:
    """Claim a partial file (see ``hubload.partial``), run the download loop into it, verify and publish it."""
    cache = job.cache
    assert cache is not None  # noqa: S101 - download() always sets it
    partial = PartialFile.claim(cache, job.key, lease=lease)
    job.part, job.meta = partial.path, partial.meta
    try:
        blob = _transfer_into(job, parallel)
    except BaseException:
        if job.part.exists():
            partial.hand_back()
        else:
            partial.discard()
        raise
    partial.finish()
    return blob


def _transfer_into(job: Job, parallel: int) -> Path:
    """The retry loop over one partial file; return the published blob."""
    cache = job.cache
    assert cache is not None  # noqa: S101 - see _transfer
    state = load_state(job)
    job.beat()  # re-hashing a long prefix is progress too
    failures = 0
    unreachable = 0  # consecutive "nobody is listening" failures before any byte arrived
    restarts = 0
    # Parallel ranges need a digest to check against: without one, segments of two versions of a file that
    # changed mid-download could be spliced together undetected.
    use_parallel = (parallel > 1 and job.size is not None and job.size >= PARALLEL_MIN_SIZE
                    and bool(job.sha256 or job.sha256_prefix))
    # A big file first streams on one connection; if that is fast, ranges would only add CPU work (localhost,
    # LAN); if it is slow (a CDN capping each connection) the rest is split into ranges.
    # A resumed parallel download goes straight back to its ranges.
    probe = use_parallel and job.size is not None and job.size >= PROBE_MIN_SIZE and not state.segments
    if job.bar is not None:
        job.bar.reset(total=job.size)
        job.bar.update(state.offset)
    with cache_errors(job.part, "opening"):
        f = open(job.part, "r+b")  # noqa: SIM115 - closed in finally, needed across retries
    try:
        while True:
            before = state.offset
            try:
                if job.size is None or state.offset < job.size:
                    if use_parallel and not probe:
                        fetch_parallel(job, state, f, parallel)
                    else:
                        if state.preallocated:
                            _drop_ranges(job, state, f)
                        f.seek(state.offset)
                        try:
                            _stream(job, state, f, probe=probe)
                        except _GoParallel:
                            probe = False
                            continue
                f.flush()
                digest = state.hasher.hexdigest()
                problem = digest_mismatch(digest, state.offset, sha256=job.sha256, sha256_prefix=job.sha256_prefix,
                                          expected_size=job.size)
                if problem is None:
                    break
                if state.resumed_from_disk and restarts == 0:
                    # The prefix from an earlier run may be damaged (power loss): one clean retry from 0.
                    logger.warning("hubload: %s: resumed file failed verification; downloading it again", job.where)
                    restarts += 1
                    reset_partial(job, state)
                    continue
                break  # publish_verified below refuses it, deletes it and says why
            except NoRanges:
                logger.info("hubload: %s does not honour Range; using a single stream", job.where)
                use_parallel = False
                reset_partial(job, state)
            except Restart as exc:
                restarts += 1
                logger.info("hubload: %s: %s; restarting from byte 0", job.where, exc)
                if restarts > job.retries.attempts:
                    raise DownloadError(f"{job.where}: gave up after {restarts} restarts ({exc}).",
                                        url=job.url, model_id=job.model_id) from None
                reset_partial(job, state)
            except Transient as exc:
                # A flaky link that still makes progress should finish the file, not burn the attempts.
                failures = 1 if state.offset - before >= (1 << 20) else failures + 1
                # Refused / no DNS with no byte ever received: the server is down or the machine offline, and
                # the whole backoff schedule would only make the user wait; once more after a short pause.
                unreachable = unreachable + 1 if exc.unreachable and not state.received else 0
                with suppress(OSError):
                    write_meta(job, state)
                if unreachable >= UNREACHABLE_ATTEMPTS:
                    kept = " (the partial download is kept for the next attempt)" if state.resumed_from_disk else ""
                    raise OfflineError(
                        f"{job.where}: the server is unreachable ({exc}); gave up after {unreachable} attempts"
                        f"{kept}. Check the network and the server address (HF_ENDPOINT, the registry URL), "
                        "or use offline mode with a cached copy.",
                        url=job.url, model_id=job.model_id) from None
                if failures >= job.retries.attempts:
                    cls = OfflineError if exc.connect and state.offset == 0 else DownloadError
                    hint = ("the server is unreachable; check the network or use offline mode with a "
                            "cached copy" if cls is OfflineError else
                            "the server kept limiting the request rate; wait a while, or lower "
                            "HUBLOAD_PARALLEL / HUBLOAD_MAX_PER_HOST, then run the command again (the bytes "
                            "already downloaded are kept)" if exc.retry_after is not None else
                            "run the command again to resume from the bytes already downloaded")
                    raise cls(f"{job.where}: failed after {failures} attempts (the retry budget): {exc}; {hint}.",
                              url=job.url, model_id=job.model_id) from None
                wait = job.retries.delay(unreachable or failures, exc.retry_after)
                logger.info("hubload: %s: %s; retrying in %.1fs (attempt %d of %d)",
                            job.where, exc, wait, failures + 1, job.retries.attempts)
                job.beat()  # alive and doing what the server asked: not a stalled holder
                job.pause(wait, exc)
        f.close()
        return cache.publish_verified(
            job.part, digest, state.offset, sha256=job.sha256, sha256_prefix=job.sha256_prefix,
            expected_size=job.size, where=job.where, url=job.url, model_id=job.model_id, path=job.file or None,
        )
    finally:
        if not f.closed:
            f.close()


def _drop_ranges(job: Job, state: State, f: Any) -> None:
    """Before one stream continues a preallocated file: keep only the hashed prefix, as a stream expects."""
    with cache_errors(job.part, "writing"):
        f.truncate(state.offset)
    state.segments = None  # no longer ``preallocated``


def _make_bar(job: Job, progress: bool | Mapping[str, Any] | None) -> Any:
    """A tqdm bar on stderr, or None; ``disable=None`` switches it off when stderr is not a TTY."""
    if progress is False:
        return None
    from tqdm import tqdm

    kwargs: dict[str, Any] = {
        "total": job.size, "unit": "B", "unit_scale": True, "unit_divisor": 1024, "file": sys.stderr,
        "desc": job.file or os.path.basename(urlsplit(job.url).path) or "download", "disable": None,
        "leave": False,
    }
    if isinstance(progress, Mapping):
        kwargs.update(progress)
    return tqdm(**kwargs)


def download(
    url: str,
    cache: Cache,
    *,
    sha256: str | None,
    size: int | None,
    sha256_prefix: str | None = None,
    headers: Mapping[str, str] | None = None,
    auth_host: str | None = None,
    model_id: str = "",
    file: str = "",
    offline: bool = False,
    progress: bool | Mapping[str, Any] | None = False,
    retries: RetryPolicy = DEFAULT_RETRY,
    parallel: int | None = None,
    session: requests.Session | None = None,
    timeout: float | tuple[float, float] = (10, 60),
    lock_timeout: float | None = 600.0,
    lock_lease: float | None = None,
) -> Path:
    """Download ``url`` into the cache, verified, and return the blob path.

    A warm hit (``sha256`` given and the blob present with the right size) returns at once: no request,
    no hashing.

    Args:
        url: An http(s) URL (after the source resolved it).
        cache: The cache to publish into.
        sha256: Expected sha256 (lowercase hex); None if unknown (then the blob is named by the digest).
        size: Expected size in bytes, or None.
        sha256_prefix: Accept a digest starting with this (torch.hub ``check_hash`` style) when ``sha256``
            is None.
        headers: Extra request headers (e.g. ``Authorization``, ``User-Agent``). Never logged.
        auth_host: ``host[:port]`` that may receive ``Authorization``; default: the host of ``url``.
            Any redirect to another host (a CDN) drops the header.
        model_id: For messages.
        file: For messages and the progress bar.
        offline: Refuse the network: a miss raises :class:`OfflineError` at once.
        progress: True or None for a tqdm bar on stderr that switches itself off when stderr is not a TTY;
            a dict of tqdm kwargs (e.g. ``{"disable": False}`` to force it); False for none.
        retries: The :class:`RetryPolicy`.
        parallel: Ranged connections for files >= 64 MiB (None/1: one stream).
        session: A ``requests.Session`` to reuse; one is created per call otherwise.
        timeout: ``(connect, read)`` timeout in seconds.
        lock_timeout: Give up waiting for another process downloading the same file after this many seconds
            *without progress* (None: wait as long as it lives). Only matters when it is below ``lock_lease``.
        lock_lease: Seconds without progress from that other process after which this one goes on by itself
            (default ``HUBLOAD_LOCK_LEASE``, 60). Safe: each writer has its own partial file and only verified
            bytes are published, so a stalled holder that wakes up later does no harm.

    Returns:
        The path of the verified, read-only blob.

    Raises:
        OfflineError: ``offline`` and not cached, or the server stayed unreachable.
        HashMismatchError: the bytes did not match; nothing was kept.
        ModelNotFoundError: HTTP 404/410.
        DownloadError: other HTTP errors (401/403 say how to authenticate) or retries exhausted.
        CacheError: the cache is read-only or the disk is full.
    """
    if sha256 is not None:
        sha256 = sha256.lower()
        if cache.has_blob(sha256, size):
            return cache.blob_path(sha256)
    who = ": ".join(x for x in (model_id, file) if x) or "file"
    if offline:
        raise OfflineError(
            f"{who} is not in the hubload cache ({cache.root}) and offline mode is on, so {redact_url(url)} "
            "was not fetched. Pull it once while online, or turn offline mode off (unset HUBLOAD_OFFLINE / "
            "HF_HUB_OFFLINE, or pass offline=False).",
            url=url, model_id=model_id or None,
        )
    key = sha256 if sha256 is not None else "url-" + hashlib.sha256(url.encode()).hexdigest()[:40]
    own_session = session is None
    job = Job(
        url=url, cache=cache, sha256=sha256, size=size, sha256_prefix=sha256_prefix, headers=dict(headers or {}),
        auth_host=auth_host or urlsplit(url).netloc.rsplit("@", 1)[-1], model_id=model_id, file=file,
        retries=retries, session=session or requests.Session(), timeout=timeout, key=key,
    )
    lease = config.lock_lease() if lock_lease is None else lock_lease
    try:
        with cache.lock(key, timeout=lock_timeout, lease=lease) as held:
            if sha256 is not None and cache.has_blob(sha256, size):  # someone else just finished it
                return cache.blob_path(sha256)
            job.beat = held.beat
            job.bar = _make_bar(job, progress)
            try:
                return _transfer(job, parallel or 1, lease)
            finally:
                if job.bar is not None:
                    job.bar.close()
    finally:
        if own_session:
            job.session.close()
