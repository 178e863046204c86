"""The partial file of a download in progress: its state, its resume metadata and writes into it.

A transfer's verified-so-far prefix (and, for a parallel download, each range's written end) is recorded
next to the partial file in the cache, so a later process — even after SIGKILL — resumes where the last one
stopped instead of from byte 0. Shared by the single-stream engine (``hubload.transfer``) and the parallel
ranges (``hubload.ranges``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from hubload.cache_fs import atomic_write_json, cache_os_error, hash_into
from hubload.httpio import _Job, redact_url

logger = logging.getLogger("hubload")

_META_VERSION = 1


@dataclass
class _State:
    """Progress of one transfer: the contiguous verified-so-far prefix of the partial file.

    A parallel download also tracks ``segments``: each range's start mapped to the end of what its worker has
    written so far (not yet hashed), so a resumed run continues every range instead of the prefix only.
    """

    offset: int = 0
    hasher: Any = field(default_factory=hashlib.sha256)
    etag: str | None = None
    resumed_from_disk: int = 0
    segments: dict[int, int] | None = None
    received: bool = False  # any byte of the body arrived during this call (the server is reachable)

    @property
    def preallocated(self) -> bool:
        """The partial file has its final size (a parallel layout): exactly when ``segments`` are tracked."""
        return self.segments is not None


def _write_meta(job: _Job, state: _State, *, durable: bool = True) -> None:
    """Record what the partial file is, so a later process can resume it safely."""
    data: dict[str, Any] = {
        "version": _META_VERSION, "url": redact_url(job.url), "sha256": job.sha256, "size": job.size,
        "etag": state.etag, "bytes_done": state.offset, "preallocated": state.preallocated,
        "model_id": job.model_id, "file": job.file, "updated_at": time.time(),
    }
    if state.segments:
        # dict() is one atomic copy while range workers keep updating the values.
        data["segments"] = {str(a): w for a, w in dict(state.segments).items()}
    atomic_write_json(job.meta, durable=durable, data=data)


def _load_segments(raw: Any, size: int | None, prefix: int) -> dict[int, int] | None:
    """Validate recorded ``{start: written_end}`` ranges (their sorted starts are the boundaries); None if unusable."""
    if not isinstance(raw, dict) or not raw or size is None:
        return None
    try:
        items = sorted((int(a), int(w)) for a, w in raw.items())
    except (TypeError, ValueError):
        return None
    starts = [a for a, _ in items]
    if starts[0] > prefix:  # bytes between the prefix and the first range would never be fetched
        return None
    segments: dict[int, int] = {}
    for (a, w), b in zip(items, [*starts[1:], size]):
        if not (0 <= a < b and a <= w <= b):
            return None
        segments[a] = w
    return segments


def _segments_from(segments: dict[int, int], offset: int, size: int) -> dict[int, int]:
    """The ranges still to hash from ``offset`` on; the one containing ``offset`` is cut to start there."""
    starts = sorted(segments)
    out: dict[int, int] = {}
    for a, b in zip(starts, [*starts[1:], size]):
        if b <= offset:
            continue
        if a < offset:
            out[offset] = max(segments[a], offset)
        else:
            out[a] = segments[a]
    return out


def _load_state(job: _Job) -> _State:
    """Resume from a previous partial if its metadata matches; otherwise start from 0."""
    state = _State()
    try:
        meta = json.loads(job.meta.read_text(encoding="utf-8"))
        have = job.part.stat().st_size
    except (OSError, ValueError):
        meta, have = None, 0
    ok = (
        isinstance(meta, dict)
        and meta.get("version") == _META_VERSION
        and meta.get("sha256") == job.sha256
        and meta.get("size") == job.size
        # Without a digest, only an ETag (sent as If-Range) tells us the bytes are still the same file.
        and (job.sha256 is not None or bool(meta.get("etag")))
    )
    segments = None
    if ok and meta.get("preallocated"):
        # A parallel run preallocates the file: the hashed prefix it recorded is known good, and each range's
        # recorded written end is on disk too (or, after a power cut, caught by the final digest).
        file_size = have
        have = min(have, int(meta.get("bytes_done") or 0))
        if file_size == job.size:
            segments = _load_segments(meta.get("segments"), job.size, have)
    if not ok or (job.size is not None and have > job.size):
        have, segments = 0, None
    try:
        with open(job.part, "ab") as f:  # create if missing; drop anything past the resume point
            if segments is None:
                f.truncate(have)
    except OSError as exc:
        raise cache_os_error(exc, job.part, "writing") from exc
    if segments is not None and job.size is not None:
        state.segments = _segments_from(segments, have, job.size)
        in_ranges = sum(w - a for a, w in state.segments.items())
        state.resumed_from_disk = have + in_ranges
        if in_ranges:
            logger.info("hubload: resuming %s: %d bytes in order plus %d bytes in %d ranges", job.where, have,
                        in_ranges, len(state.segments))
    if have:
        logger.info("hubload: resuming %s at byte %d (re-hashing the partial prefix once)", job.where, have)
        with open(job.part, "rb", buffering=0) as f:
            hash_into(f, state.hasher, limit=have)
        state.offset = have
        state.resumed_from_disk = max(state.resumed_from_disk, have)
    if have or state.segments is not None:  # resuming: both imply the metadata matched (``ok``)
        state.etag = meta.get("etag")
    return state


def _reset(job: _Job, state: _State) -> None:
    """Truncate the partial and forget the hash so far."""
    try:
        with open(job.part, "r+b") as f:
            f.truncate(0)
    except OSError as exc:
        raise cache_os_error(exc, job.part, "writing") from exc
    state.offset = 0
    state.hasher = hashlib.sha256()
    state.resumed_from_disk = 0
    state.segments = None
    if job.bar is not None:
        job.bar.reset(total=job.size)


def _pwrite_all(fd: int, view: memoryview, pos: int) -> None:
    """``os.pwrite`` until every byte is written."""
    while view:
        n = os.pwrite(fd, view, pos)
        view = view[n:]
        pos += n
