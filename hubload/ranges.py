"""Parallel ranged requests: one large file fetched over several connections into a preallocated partial.

Only used when a file is big, its digest is known (segments of two versions of a file cannot then be spliced
undetected) and the server honours Range; ``hubload.transfer`` decides when and falls back to one stream on
:class:`NoRanges`. Each range's progress is checkpointed, so a killed parallel download resumes every range
where it stopped.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from typing import Any

import requests

from hubload.cache_fs import cache_errors
from hubload.httpio import (
    CHUNK_SIZE,
    NETWORK_ERRORS,
    Body,
    Job,
    Restart,
    Transient,
    content_range,
    open_response,
    range_headers,
)
from hubload.partial import State, pwrite_all, segments_from, start_writeback, write_meta

__all__ = ["CHECKPOINT_SECONDS", "SEGMENT_MAX", "SEGMENT_SIZE", "WRITE_SECONDS", "NoRanges", "fetch_parallel"]

SEGMENT_SIZE = 16 * 1024 * 1024       # smallest unit of work of a parallel download
SEGMENT_MAX = 64 * 1024 * 1024        # largest
# What a SIGKILL loses is what arrived but was not yet written, plus what was written since the last record of
# the per-range progress: a slow link writes at least every WRITE_SECONDS, and the record is rewritten every
# CHECKPOINT_SECONDS (a small JSON file, no fsync: about a hundred microseconds).
CHECKPOINT_SECONDS = 0.1
WRITE_SECONDS = 0.1


class NoRanges(Exception):
    """The server does not honour Range: a parallel download must fall back to one stream."""


def _checkpoint(job: Job, state: State) -> None:
    """Record a parallel download's ``bytes_done`` and per-range progress (no fsync: see below).

    A crash can leave the metadata claiming bytes the disk never got; the resumed file then fails
    verification, and the one clean retry from byte 0 in :func:`_transfer` handles it. A SIGKILL loses nothing
    that was written (the page cache survives the process). Syncing every checkpoint cost more than the whole
    transfer on a fast link; one fsync before publish keeps the published blob crash-safe.
    """
    write_meta(job, state, durable=False)


def fetch_parallel(job: Job, state: State, f: Any, workers: int) -> None:
    """Fetch ``[state.offset, size)`` with ``workers`` ranged requests into a preallocated file.

    Args:
        job: The transfer (its ``size`` must be known).
        state: Its progress; ``offset``/``hasher`` advance as the file completes in order.
        f: The partial file, open ``r+b``.
        workers: Connections.

    Raises:
        NoRanges: the server ignores Range (fall back to one stream).
        Transient, Restart: as for one stream.

    Workers ``pwrite`` their segments; this thread hashes the file in order as contiguous bytes complete,
    re-reading just-written data from the page cache (one memory copy, no disk read in practice) so memory
    stays bounded to one chunk per worker. Raises ``NoRanges`` if the server ignores Range.

    ``state.segments`` (start -> written end) is the plan: reused as is when resuming (from disk or after a
    retry), so each range continues after its written bytes; the hasher reads every segment from its start,
    which also hashes the bytes an earlier run left in it. The progress is checkpointed about every
    ``CHECKPOINT_SECONDS`` and whenever a range completes.
    """
    if job.size is None:
        raise NoRanges()
    size = job.size
    fd = f.fileno()
    with cache_errors(job.part, "preallocating"):
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size)
        else:
            os.ftruncate(fd, size)
    if state.segments and min(state.segments) <= state.offset:
        state.segments = segments_from(state.segments, state.offset, size)
    else:
        # Fewer, larger segments on big files (each request costs a round trip and a new connection), but at
        # least 4 per worker so a slow connection cannot hold up the end for long.
        seg = min(max(SEGMENT_SIZE, -(-(size - state.offset) // (workers * 4))), max(SEGMENT_SIZE, SEGMENT_MAX))
        state.segments = {a: a for a in range(state.offset, size, seg)}
    starts = sorted(state.segments)
    segments = list(zip(starts, [*starts[1:], size]))
    write_meta(job, state)

    done: dict[int, int] = {}  # segment start -> end, once fully written
    landed = [0]  # segments fully written so far; each one triggers a checkpoint
    cond = threading.Condition()
    next_seg = [0]
    errors: list[BaseException] = []
    window = workers * 4  # a worker never runs further ahead of the hasher than this many segments

    def worker() -> None:
        session = requests.Session()
        session.mount("http://", job.session.get_adapter("http://"))
        session.mount("https://", job.session.get_adapter("https://"))
        sub = dataclasses.replace(job, session=session, bar=None)
        try:
            while True:
                with cond:
                    while not errors and next_seg[0] < len(segments) and next_seg[0] - hashed_seg[0] >= window:
                        cond.wait(0.5)
                    if errors or next_seg[0] >= len(segments):
                        return
                    a, b = segments[next_seg[0]]
                    next_seg[0] += 1
                _fetch_segment(sub, state, etag, fd, a, b)
                with cond:
                    done[a] = b
                    landed[0] += 1
                    cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - reported to the hashing thread
            with cond:
                errors.append(exc)
                cond.notify_all()
        finally:
            session.close()

    hashed_seg = [0]
    etag = [state.etag]  # the first response's ETag binds every other segment to the same file version
    threads = [threading.Thread(target=worker, name=f"hubload-range-{i}", daemon=True) for i in range(workers)]
    for t in threads:
        t.start()
    buf = bytearray(CHUNK_SIZE)
    view = memoryview(buf)
    saved_landed, saved_at = 0, time.monotonic()
    try:
        while state.offset < size:
            with cond:
                if not errors and state.offset not in done:
                    cond.wait(CHECKPOINT_SECONDS / 4)  # wake up now and then to checkpoint a slow download
                ready = state.offset in done
                if errors and not ready:
                    raise errors[0]
                end = done.pop(state.offset) if ready else None
                now_landed = landed[0]
            if end is not None:
                pos = state.offset
                while pos < end:
                    n = os.preadv(fd, [view[: min(len(buf), end - pos)]], pos) if hasattr(os, "preadv") else \
                        _pread_into(fd, view[: min(len(buf), end - pos)], pos)
                    if n <= 0:
                        raise Restart("partial file shorter than written data")
                    state.hasher.update(view[:n])
                    pos += n
                    if job.bar is not None:
                        job.bar.update(n)
                state.offset = end
                with cond:
                    hashed_seg[0] += 1
                    cond.notify_all()
            if now_landed != saved_landed or time.monotonic() - saved_at >= CHECKPOINT_SECONDS:
                state.etag = etag[0]  # the version every recorded byte belongs to, for If-Range on resume
                _checkpoint(job, state)
                saved_landed, saved_at = now_landed, time.monotonic()
        state.etag = etag[0]
    finally:
        with cond:
            if state.offset < size:
                errors.append(Transient("parallel download interrupted"))
            cond.notify_all()
        for t in threads:
            t.join()


_tls = threading.local()


def _buffer() -> memoryview:
    """This thread's reusable read buffer (a worker fetches many segments; allocate once)."""
    view = getattr(_tls, "view", None)
    if view is None or len(view) != CHUNK_SIZE:
        view = _tls.view = memoryview(bytearray(CHUNK_SIZE))
    return view


def _pread_into(fd: int, view: memoryview, pos: int) -> int:
    """``preadv`` for platforms without it."""
    data = os.pread(fd, len(view), pos)
    view[: len(data)] = data
    return len(data)


def _fetch_segment(job: Job, state: State, etag: list[str | None], fd: int, a: int, b: int) -> None:
    """Fetch bytes ``[a, b)`` into the file at ``a``, from ``state.segments[a]`` on; retries resume inside it.

    ``state.segments[a]`` advances after each write, so a checkpoint (or a later run) knows what is on disk.
    """
    view = _buffer()
    pos = min(max(state.segments.get(a, a) if state.segments else a, a), b)
    failures = 0
    while pos < b:
        before = pos
        try:
            resp, _ = open_response(job, range_headers(pos, b, etag[0]))
            with resp:
                cr = content_range(resp, pos)
                if resp.status_code != 206 or cr is None or cr[0] != b - 1:
                    raise NoRanges()
                got = resp.headers.get("ETag")
                if etag[0] is None:
                    etag[0] = got
                elif got and got != etag[0]:
                    raise Restart("the ETag changed during a parallel download")
                body = Body(resp.raw)
                try:
                    while pos < b:
                        # On a slow link, write at least every WRITE_SECONDS: what is written is what a resume keeps.
                        n = body.fill(view[: min(len(view), b - pos)], deadline=time.monotonic() + WRITE_SECONDS)
                        if not n:
                            raise Transient(f"range {a}-{b - 1} ended at byte {pos} (truncated)")
                        state.received = True
                        with cache_errors(job.part, "writing"):
                            pwrite_all(fd, view[:n], pos)
                        start_writeback(fd, pos, n)
                        pos += n
                        job.beat()
                        if state.segments is not None:
                            state.segments[a] = pos
                except NETWORK_ERRORS as exc:
                    raise Transient(f"connection lost in range {a}-{b - 1}: {type(exc).__name__}: {exc}") from None
        except Transient as exc:
            failures = 1 if pos > before else failures + 1
            # Nothing listening and nothing received yet: let _transfer's short give-up rule decide.
            if failures >= job.retries.attempts or (exc.unreachable and not state.received):
                raise
            job.pause(job.retries.delay(failures, exc.retry_after), exc)
