"""The content-addressed cache: verified blobs, per-model snapshot folders and indexes.

Layout under the cache root (``$HUBLOAD_CACHE`` or the platform cache dir)::

    blobs/<sha256[:2]>/<sha256>             verified bytes, published atomically, read-only
    partial/<key>.part, <key>.part.json     an unfinished transfer and its resume metadata
    locks/<key>.lock                        one flock per transfer target (released by the kernel on death)
    models/<safe id>/<revision>/<path>      relative symlinks to blobs: the snapshot a framework opens
    refs/<safe id>.json                     {id, source, revision, files: {path: {sha256, size}}, pulled_at}

Partial files live inside the cache root, on the same filesystem as ``blobs/``, so publishing is one
``os.replace``: a reader sees either no blob or a complete, verified one.

This module holds the layout, blobs, locks and the snapshot/ref index. Maintenance (``ls``, ``verify``,
``prune``, ``remove``) comes from ``hubload.cache_admin`` and Hugging Face cache reuse from
``hubload.hf_cache``, both mixed into :class:`Cache`; the filesystem primitives live in
``hubload.cache_fs``. Their public names are re-exported here.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import filelock

from hubload.cache_admin import CachedFile, CacheMaintenance, CachedModel, VerifyResult  # re-exported
from hubload.cache_fs import (  # the public ones are re-exported: see __all__
    NO_SPACE,
    READ_ONLY,
    atomic_write_json,
    cache_errors,
    cache_os_error,
    check_key,
    check_rel_path,
    check_sha256,
    digest_mismatch,
    fsync_dir,
    remove_file,
    safe_model_dir,
    safe_revision,
    sha256_file,
)
from hubload.errors import CacheError, HashMismatchError
from hubload.hf_cache import HFCacheReuse, hf_hub_cache_dir  # re-exported

__all__ = [
    "Cache",
    "CachedFile",
    "Lease",
    "CachedModel",
    "VerifyResult",
    "atomic_write_json",
    "cache_os_error",
    "default_cache_dir",
    "hf_hub_cache_dir",
    "safe_model_dir",
    "sha256_file",
]

logger = logging.getLogger("hubload")


def default_cache_dir() -> Path:
    """Return the cache root: ``$HUBLOAD_CACHE`` if set, else the platform's user cache dir.

    Returns:
        The (not necessarily existing) cache root.
    """
    from .config import cache_dir

    return cache_dir()


def _mtime(path: str | os.PathLike[str]) -> float | None:
    """A file's mtime, or None."""
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


def _size(path: str | os.PathLike[str]) -> int | None:
    """A file's size, or None."""
    try:
        return os.stat(path).st_size
    except OSError:
        return None


class Lease:
    """A held (or, after a stalled holder's lease ran out, a bypassed) lock of :meth:`Cache.lock`.

    Attributes:
        path: The lock file.
        held: Whether this process holds the flock (False: it went on after the holder's lease ran out).
    """

    def __init__(self, path: Path, *, held: bool, interval: float = 1.0) -> None:
        self.path = path
        self.held = held
        self._interval = interval
        self._last = 0.0

    def beat(self, *, force: bool = False) -> None:
        """Show progress: touch the lock file (at most every ``lease / 10`` seconds; cheap to call often).

        Waiters watch its mtime. A bypassing writer beats too, so other waiters wait for it in turn.

        Args:
            force: Touch now, whatever the interval.
        """
        now = time.monotonic()
        if not force and now - self._last < self._interval:
            return
        self._last = now
        with contextlib.suppress(OSError):
            os.utime(self.path)


class Cache(CacheMaintenance, HFCacheReuse):
    """A content-addressed cache of verified files, safe to share between processes.

    Args:
        root: The cache root; default ``$HUBLOAD_CACHE`` or the platform user cache dir (read at call time).
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()

    def __repr__(self) -> str:
        return f"Cache({str(self.root)!r})"

    # ------------------------------------------------------------------ paths
    @property
    def blobs_dir(self) -> Path:
        """``<root>/blobs``."""
        return self.root / "blobs"

    @property
    def partial_dir(self) -> Path:
        """``<root>/partial``."""
        return self.root / "partial"

    @property
    def locks_dir(self) -> Path:
        """``<root>/locks``."""
        return self.root / "locks"

    @property
    def models_dir(self) -> Path:
        """``<root>/models``."""
        return self.root / "models"

    @property
    def refs_dir(self) -> Path:
        """``<root>/refs``."""
        return self.root / "refs"

    def blob_path(self, sha256: str) -> Path:
        """Where the blob with this sha256 lives (whether or not it exists).

        Args:
            sha256: Lowercase hex digest.

        Returns:
            ``<root>/blobs/<sha256[:2]>/<sha256>``.
        """
        check_sha256(sha256)
        return self.blobs_dir / sha256[:2] / sha256

    def partial_path(self, key: str) -> Path:
        """The partial file of an unfinished transfer (``partial/<key>.part``)."""
        return self.partial_dir / f"{check_key(key)}.part"

    def partial_meta_path(self, key: str) -> Path:
        """The resume metadata next to a partial file (``partial/<key>.part.json``)."""
        return self.partial_dir / f"{check_key(key)}.part.json"

    def tmp_path(self, key: str) -> Path:
        """A fresh temporary file name in ``partial/`` (same filesystem as ``blobs/``, so publish is atomic).

        Args:
            key: A name hint (sha256 or other key-safe text).

        Returns:
            A path that does not exist yet; the caller creates it and publishes or deletes it.
        """
        self.ensure_dir(self.partial_dir)
        return self.partial_dir / f"{check_key(key)}.{os.getpid()}.{os.urandom(6).hex()}.tmp"

    def snapshot_dir(self, model_id: str, revision: str | None) -> Path:
        """The folder holding a model's files side by side (symlinks to blobs).

        Args:
            model_id: The model ID (may contain ``/``).
            revision: Commit/branch, or None for a local (non-versioned) source.

        Returns:
            ``<root>/models/<safe id>/<revision or "local">``.
        """
        return self.models_dir / safe_model_dir(model_id) / safe_revision(revision)

    def _ref_path(self, model_id: str) -> Path:
        """Where a model's index lives."""
        return self.refs_dir / f"{safe_model_dir(model_id)}.json"

    def ensure_dir(self, path: Path) -> Path:
        """Create a cache folder (and its parents) if needed.

        Args:
            path: The folder.

        Returns:
            ``path``.

        Raises:
            CacheError: the cache is read-only or full.
        """
        with cache_errors(path, "creating"):
            path.mkdir(parents=True, exist_ok=True)
        return path

    # ------------------------------------------------------------------ blobs
    def has_blob(self, sha256: str, size: int | None = None) -> bool:
        """Whether a verified blob is present (one ``stat``; never re-hashes).

        Args:
            sha256: Lowercase hex digest.
            size: If given, the blob must also have exactly this size.

        Returns:
            True if the blob is there (with the right size).
        """
        check_sha256(sha256)
        try:  # plain string path: this runs on every warm hit, and pathlib would cost more than the stat
            st = os.stat(os.path.join(self.root, "blobs", sha256[:2], sha256))
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and (size is None or st.st_size == size)

    def publish(self, tmp_path: str | os.PathLike[str], sha256: str, *, read_only: bool = True) -> Path:
        """Move a verified file into ``blobs/`` atomically (fsync, then ``os.replace``).

        The caller must have verified that ``tmp_path`` hashes to ``sha256`` (see :meth:`publish_verified`).
        If the blob already exists it is kept and ``tmp_path`` is dropped. ``tmp_path`` must be on the cache's
        filesystem (use :meth:`tmp_path`).

        Args:
            tmp_path: The verified temporary file.
            sha256: Its digest.
            read_only: chmod the blob 0o444 (False for a hard link that shares its inode with a foreign file).

        Returns:
            The blob path.

        Raises:
            CacheError: the cache is read-only or full.
        """
        tmp = Path(tmp_path)
        dest = self.blob_path(sha256)
        if self.has_blob(sha256):
            remove_file(tmp)
            return dest
        self.ensure_dir(dest.parent)
        with cache_errors(dest, "publishing"):
            with open(tmp, "rb") as f:  # data must be on disk before the name points at it
                os.fsync(f.fileno())
            if read_only:
                os.chmod(tmp, 0o444)
            os.replace(tmp, dest)
        fsync_dir(dest.parent)
        return dest

    def publish_verified(
        self,
        tmp_path: str | os.PathLike[str],
        digest: str,
        size: int,
        *,
        sha256: str | None,
        sha256_prefix: str | None = None,
        expected_size: int | None = None,
        where: str,
        hint: str = "If the file changed upstream, update the registry's sha256; otherwise retry.",
        read_only: bool = True,
        url: str | None = None,
        model_id: str | None = None,
        path: str | None = None,
    ) -> Path:
        """The one verify-then-publish step of every way a blob enters the cache (download, local import, HF reuse).

        ``digest`` and ``size`` are what the caller computed while writing ``tmp_path`` (hash while streaming,
        never re-read). On a match the file is published with :meth:`publish`; otherwise it is deleted and
        nothing enters ``blobs/``.

        Args:
            tmp_path: The finished temporary file (in ``partial/``).
            digest: Its sha256.
            size: Its size.
            sha256: The expected digest, or None (then the blob is named by ``digest``).
            sha256_prefix: Accept a digest starting with this when ``sha256`` is None.
            expected_size: The expected size, if known.
            where: ``model: file (url or path)`` for the message.
            hint: What the user should do about a mismatch.
            read_only: As for :meth:`publish`.
            url: Carried by the error.
            model_id: Carried by the error.
            path: Carried by the error (the file in the model, or the local source).

        Returns:
            The blob path.

        Raises:
            HashMismatchError: the bytes are not the expected ones (the file was deleted).
            CacheError: the cache is read-only or full.
        """
        problem = digest_mismatch(digest, size, sha256=sha256, sha256_prefix=sha256_prefix,
                                  expected_size=expected_size)
        if problem is not None:
            with contextlib.suppress(OSError):
                remove_file(Path(tmp_path))
            raise HashMismatchError(f"{where}: {problem}. The download was discarded. {hint}",
                                    url=url, model_id=model_id or None, expected=sha256 or sha256_prefix,
                                    actual=digest, path=path)
        return self.publish(tmp_path, digest, read_only=read_only)

    # ------------------------------------------------------------------ locks
    @contextlib.contextmanager
    def lock(
        self,
        key: str,
        *,
        timeout: float | None = None,
        watch: str | os.PathLike[str] | None = None,
        lease: float | None = None,
    ) -> Iterator[Lease]:
        """Hold the cross-process lease lock ``locks/<key>.lock`` for the ``with`` block.

        The lock is a ``flock`` (via :class:`filelock.FileLock`), which the kernel releases when the holder
        dies, even by SIGKILL. It is also a *lease*: the holder shows progress by calling
        :meth:`Lease.beat`, which touches the lock file. A waiter whose holder has shown no progress for
        ``lease`` seconds (a suspended process, a dead node on a shared filesystem, a filesystem whose flock
        never releases) goes on without the lock (``Lease.held`` is False). That is safe because nothing
        correct depends on the lock: writers keep their own partial files and a blob is published only
        after it is verified; the lock only saves bandwidth.

        Args:
            key: The transfer target (a sha256, or ``url-<hash>``).
            timeout: Give up with :class:`CacheError` after this many seconds without progress (None: never).
            watch: A file the holder writes (its partial): a change of its size also counts as progress.
            lease: Seconds without progress after which a waiter goes on (default ``HUBLOAD_LOCK_LEASE``,
                60). ``0`` or less never goes on.

        Yields:
            The :class:`Lease` (``path``, ``held``, ``beat()``).

        Raises:
            CacheError: timed out, or the locks folder is not writable.
        """
        from .config import lock_lease

        lease = lock_lease() if lease is None else lease
        lock_path = self.locks_dir / f"{check_key(key)}.lock"
        self.ensure_dir(self.locks_dir)
        lk = filelock.FileLock(str(lock_path))
        seen: tuple[float | None, int | None] | None = None
        last_change = time.monotonic()
        held = False
        while True:
            step = 1.0
            for limit in (timeout, lease if lease and lease > 0 else None):
                if limit is not None:
                    step = min(step, max(limit / 4, 0.01))
            try:
                lk.acquire(timeout=step)
                held = True
                break
            except filelock.Timeout:
                now = time.monotonic()
                progress = (_mtime(lock_path), _size(watch) if watch is not None else None)
                if progress != seen:
                    if seen is not None:
                        last_change = now
                    seen = progress
                idle = now - last_change
                if timeout is not None and idle >= timeout and (not lease or lease <= 0 or timeout <= lease):
                    what = "made no progress" if watch is not None or lease else "was not released"
                    raise CacheError(
                        f"hubload cache: gave up waiting for lock {lock_path}: another process holds it and "
                        f"{what} for {timeout:g}s. If no hubload process is running, the lock is stale only "
                        "on filesystems without flock (e.g. some NFS); delete the file and retry."
                    ) from None
                if lease and lease > 0 and idle >= lease:
                    logger.warning("hubload: the holder of %s made no progress for %.0fs (HUBLOAD_LOCK_LEASE); "
                                   "going on without the lock", lock_path, idle)
                    break
                logger.debug("waiting for %s (another process holds it)", lock_path)
            except OSError as exc:  # filelock.Timeout is an OSError too: this order matters
                raise cache_os_error(exc, lock_path, "locking") from exc
        handle = Lease(lock_path, held=held, interval=max(0.05, lease / 10) if lease and lease > 0 else 1.0)
        handle.beat(force=True)
        try:
            yield handle
        finally:
            if held:
                lk.release()

    # ------------------------------------------------------------------ snapshots and refs
    def link(self, model_id: str, revision: str | None, path: str, sha256: str) -> Path:
        """Create (or refresh) ``models/<id>/<revision>/<path>`` as a relative symlink to a blob.

        Args:
            model_id: The model ID.
            revision: Commit/branch, or None (``local``).
            path: The file's path inside the model (POSIX, relative; sub-folders allowed).
            sha256: The blob it should point to (must be present).

        Returns:
            The link path inside the snapshot folder.

        Raises:
            CacheError: ``path`` is unsafe (absolute, ``..``, backslashes, empty segments, escapes the
                snapshot), the blob is missing, or the cache is not writable.
        """
        parts = check_rel_path(path, f"file path of {model_id!r}")
        snap = self.snapshot_dir(model_id, revision)
        blob = self.blob_path(sha256)
        if not self.has_blob(sha256):
            raise CacheError(f"hubload cache: cannot link {model_id!r} {path!r}: blob {blob} is not in the cache.")
        dest = snap.joinpath(*parts)
        self.ensure_dir(dest.parent)
        # A symlinked folder inside the snapshot could still point elsewhere; check where it really lands.
        real_snap = os.path.realpath(snap)
        real_parent = os.path.realpath(dest.parent)
        if os.path.commonpath([real_snap, real_parent]) != real_snap:
            raise CacheError(f"hubload cache: refusing {path!r} of {model_id!r}: it resolves outside {snap}.")
        target = os.path.relpath(blob, real_parent)
        tmp = dest.parent / f".{dest.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        with cache_errors(dest, "linking"):
            try:
                try:
                    os.symlink(target, tmp)
                except (NotImplementedError, OSError) as exc:
                    if isinstance(exc, OSError) and exc.errno in NO_SPACE | READ_ONLY - {errno.EPERM}:
                        raise
                    # No symlinks (Windows without developer mode): a hard link is the next best thing.
                    try:
                        os.link(blob, tmp)
                    except OSError:
                        shutil.copyfile(blob, tmp)
                os.replace(tmp, dest)
            except OSError:
                with contextlib.suppress(OSError):
                    remove_file(tmp)
                raise
        return dest

    def has_ref(self, model_id: str) -> bool:
        """True when an index exists for ``model_id`` (one stat, no parsing)."""
        return os.path.exists(self._ref_path(model_id))

    def read_ref(self, model_id: str) -> dict[str, Any] | None:
        """Read a model's index (``refs/<safe id>.json``).

        Args:
            model_id: The model ID.

        Returns:
            The index dict, or None if the model is not cached.

        Raises:
            CacheError: the index exists but is not valid JSON.
        """
        path = self._ref_path(model_id)
        with cache_errors(path, "reading"):
            try:
                text = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                return None
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise CacheError(
                f"hubload cache: index {path} is corrupt ({exc}). Run `hubload cache remove {model_id}` "
                "and pull the model again."
            ) from exc
        if not isinstance(data, dict):
            raise CacheError(f"hubload cache: index {path} is not a JSON object; remove it and pull again.")
        return data

    def write_ref(self, model_id: str, data: dict[str, Any]) -> Path:
        """Write a model's index atomically (temp file + ``os.replace``).

        Args:
            model_id: The model ID; stored as ``data["id"]`` if absent.
            data: ``{id, source, revision, files: {path: {sha256, size}}, pulled_at}``.

        Returns:
            The index path.

        Raises:
            CacheError: another model ID maps to the same folder name, or the cache is not writable.
        """
        path = self._ref_path(model_id)
        data = {"id": model_id, **data}
        if data["id"] != model_id:
            raise ValueError(f"write_ref({model_id!r}): data['id'] is {data['id']!r}")
        existing = self.read_ref(model_id)
        if existing is not None and existing.get("id", model_id) != model_id:
            raise CacheError(
                f"hubload cache: model IDs {model_id!r} and {existing.get('id')!r} map to the same cache "
                f"folder {path.stem!r}; rename one of them in the registry."
            )
        self.ensure_dir(self.refs_dir)
        atomic_write_json(path, data)
        return path
