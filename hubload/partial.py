"""The partial file of a download in progress: how a writer claims one, its resume metadata, writes into it.

Correctness never depends on a lock. Every writer works on a partial file of its own,
``partial/<key>.<writer>.part`` (``<writer>`` = host, pid and a random tag), next to its metadata
``<name>.json``. A writer that starts takes over an earlier partial of the same target *without a lock*:

* the canonical ``<key>.part`` (what a writer that stopped on an error handed back), or the own file of a
  writer that is gone (same host, its pid is dead, e.g. after SIGKILL), by one atomic ``os.rename`` to its
  own name: of two writers racing for it, exactly one rename succeeds and the other starts afresh;
* the own file of a writer that may still live but showed no progress for the lease
  (``HUBLOAD_LOCK_LEASE``; a suspended process, a dead node of a shared filesystem), by *copying* it, so the
  stalled writer, should it wake up, never writes into a file someone else will publish.

Whatever a writer publishes is the file only it wrote, hashed as it was written, verified, then renamed
into ``blobs/``. A broken lock therefore costs bandwidth (two writers download the same file), never a
corrupt blob.

The verified-so-far prefix (and, for a parallel download, each range's written end) is recorded in the
metadata, so a later process - even after SIGKILL - resumes where the last one stopped instead of from byte
0. Shared by the single-stream engine (``hubload.transfer``) and the parallel ranges (``hubload.ranges``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubload.cache_fs import atomic_write_json, cache_errors, hash_into, remove_file
from hubload.httpio import Job, redact_url

if TYPE_CHECKING:
    from hubload.cache import Cache

__all__ = ["PartialFile", "State", "load_state", "pwrite_all", "reset_partial", "segments_from", "start_writeback",
           "write_meta"]

logger = logging.getLogger("hubload")

_META_VERSION = 1
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_active: set[str] = set()  # writer tags of this process that are downloading now
_active_lock = threading.Lock()


def _meta_of(part: Path) -> Path:
    """The metadata file next to a partial file."""
    return part.with_name(part.name + ".json")


def _pid_gone(pid: int) -> bool:
    """Whether no process with this pid exists on this host (never guessed off POSIX: it waits for the lease)."""
    if pid == os.getpid() or os.name != "posix":  # Windows' os.kill(pid, 0) would send CTRL_C_EVENT
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: it exists (another user's)
        return False
    return False


def _idle_for(part: Path) -> float:
    """Seconds since the partial or its metadata last changed."""
    newest = 0.0
    for p in (part, _meta_of(part)):
        with contextlib.suppress(OSError):
            newest = max(newest, p.stat().st_mtime)
    return time.time() - newest


class PartialFile:
    """This writer's own partial file of one transfer target (see the module doc for the protocol).

    Attributes:
        path: The partial file, ``partial/<key>.<writer>.part``.
        meta: Its metadata, ``<path>.json``.
    """

    def __init__(self, cache: Cache, key: str) -> None:
        self.cache = cache
        self.key = key
        self.tag = f"{_HOST}-{os.getpid()}-{os.urandom(3).hex()}"
        self.path = cache.partial_dir / f"{key}.{self.tag}.part"
        self.meta = _meta_of(self.path)

    @classmethod
    def claim(cls, cache: Cache, key: str, *, lease: float) -> PartialFile:
        """Start a writer's partial file, taking over an abandoned one of the same target if there is one.

        Args:
            cache: The cache.
            key: The transfer target.
            lease: Seconds without progress after which another live writer's file may be copied (<= 0: never).

        Returns:
            The claimed partial (its file may not exist yet: then it starts from byte 0).

        Raises:
            CacheError: the partial folder is not writable.
        """
        cache.ensure_dir(cache.partial_dir)
        me = cls(cache, key)
        with _active_lock:
            _active.add(me.tag)
        for cand, how in me._candidates(lease):
            try:
                if how == "rename":
                    os.rename(cand, me.path)  # the claim: of racing writers, exactly one succeeds
                    with contextlib.suppress(FileNotFoundError):
                        os.rename(_meta_of(cand), me.meta)
                else:
                    shutil.copyfile(cand, me.path)
                    with contextlib.suppress(FileNotFoundError):
                        shutil.copyfile(_meta_of(cand), me.meta)
            except FileNotFoundError:
                continue  # another writer took it first
            except OSError as exc:
                logger.debug("hubload: cannot take over %s: %s", cand, exc)
                for p in (me.path, me.meta):
                    with contextlib.suppress(OSError):
                        remove_file(p)
                continue
            with contextlib.suppress(OSError):
                os.utime(me.path)  # fresh again: others must not take it as a stalled writer's
            logger.info("hubload: continuing the partial download %s (%s)", cand.name,
                        "left by a finished or dead writer" if how == "rename" else
                        "copied from a writer that made no progress for the lease")
            break
        return me

    def _candidates(self, lease: float) -> list[tuple[Path, str]]:
        """Earlier partials of this target, each with how it may be taken: ``rename`` or ``copy``."""
        canonical = self.cache.partial_dir / f"{self.key}.part"
        free: list[tuple[Path, str]] = [(canonical, "rename")] if canonical.exists() else []
        stale: list[tuple[Path, str]] = []
        with cache_errors(self.cache.partial_dir, "listing"):
            others = sorted(self.cache.partial_dir.glob(f"{self.key}.*.part"))
        for part in others:
            host, _, rest = part.name[len(self.key) + 1: -len(".part")].partition("-")
            pid_text, _, _ = rest.partition("-")
            if host == _HOST and pid_text.isdigit():
                pid = int(pid_text)
                with _active_lock:
                    mine_idle = pid == os.getpid() and part.name.split(".")[-2] not in _active
                if mine_idle or _pid_gone(pid):
                    free.append((part, "rename"))
                    continue
            if lease > 0 and _idle_for(part) >= lease:
                stale.append((part, "copy"))
        return free + stale

    def hand_back(self) -> None:
        """After a failure: make this partial the canonical one, for the next writer to continue."""
        self._release()
        canonical = self.cache.partial_dir / f"{self.key}.part"
        if not self.path.exists():
            return
        try:
            os.link(self.path, canonical)  # never replaces a canonical partial someone else handed back
        except FileExistsError:
            return  # keep ours under its own name: the next writer finds it (its owner is then gone)
        except OSError:
            if canonical.exists():
                return
            with contextlib.suppress(OSError):
                os.rename(self.path, canonical)
        with contextlib.suppress(OSError):
            os.replace(self.meta, _meta_of(canonical))
        with contextlib.suppress(OSError):
            remove_file(self.path)

    def finish(self) -> None:
        """After a publish: drop the metadata, and partials of the same target that nobody can use now."""
        self._release()
        with contextlib.suppress(OSError):
            remove_file(self.meta)
        for cand, how in self._candidates(0):
            if how == "rename":
                for p in (cand, _meta_of(cand)):
                    with contextlib.suppress(OSError):
                        remove_file(p)

    def discard(self) -> None:
        """Delete this partial and its metadata (it failed verification)."""
        self._release()
        for p in (self.path, self.meta):
            with contextlib.suppress(OSError):
                remove_file(p)

    def _release(self) -> None:
        """This writer no longer uses its file."""
        with _active_lock:
            _active.discard(self.tag)


@dataclass
class State:
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


def write_meta(job: Job, state: State, *, durable: bool = True) -> None:
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


def segments_from(segments: dict[int, int], offset: int, size: int) -> dict[int, int]:
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


def load_state(job: Job) -> State:
    """Resume from a previous partial if its metadata matches; otherwise start from 0."""
    state = State()
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
    with cache_errors(job.part, "writing"), open(job.part, "ab") as f:  # create if missing
        if segments is None:
            f.truncate(have)  # drop anything past the resume point
    if segments is not None and job.size is not None:
        state.segments = segments_from(segments, have, job.size)
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


def reset_partial(job: Job, state: State) -> None:
    """Truncate the partial and forget the hash so far."""
    with cache_errors(job.part, "writing"), open(job.part, "r+b") as f:
        f.truncate(0)
    state.offset = 0
    state.hasher = hashlib.sha256()
    state.resumed_from_disk = 0
    state.segments = None
    if job.bar is not None:
        job.bar.reset(total=job.size)


def pwrite_all(fd: int, view: memoryview, pos: int) -> None:
    """``os.pwrite`` until every byte is written.

    Args:
        fd: The open partial file.
        view: The bytes.
        pos: Where they go.
    """
    while view:
        n = os.pwrite(fd, view, pos)
        view = view[n:]
        pos += n


_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range: Any = None  # libc's, looked up on first use; False where there is none


def start_writeback(fd: int, pos: int, n: int) -> None:
    """Ask the kernel to start writing ``[pos, pos + n)`` to disk now, without waiting (Linux ``sync_file_range``).

    The fsync before publishing then only waits for the last few chunks instead of flushing the whole file
    after the transfer: on a real disk, writeback overlaps the download. Elsewhere (or on failure) a no-op;
    durability still comes from that fsync.

    Args:
        fd: The open partial file.
        pos: First byte written.
        n: Bytes written.
    """
    global _sync_file_range
    if _sync_file_range is None:
        _sync_file_range = False
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                fn = ctypes.CDLL(None, use_errno=True).sync_file_range
                fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                fn.restype = ctypes.c_int
                _sync_file_range = fn
            except (OSError, AttributeError):
                pass
    if _sync_file_range:
        _sync_file_range(fd, pos, n, _SYNC_FILE_RANGE_WRITE)
