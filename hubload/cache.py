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
    _NO_SPACE,
    _READ_ONLY,
    _check_key,
    _check_rel_path,
    _check_sha256,
    _fsync_dir,
    _safe_revision,
    _unlink,
    atomic_write_json,
    cache_os_error,
    safe_model_dir,
    sha256_file,
)
from hubload.errors import CacheError
from hubload.hf_cache import HFCacheReuse, hf_hub_cache_dir  # re-exported

__all__ = [
    "Cache",
    "CachedFile",
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
        _check_sha256(sha256)
        return self.blobs_dir / sha256[:2] / sha256

    def partial_path(self, key: str) -> Path:
        """The partial file of an unfinished transfer (``partial/<key>.part``)."""
        return self.partial_dir / f"{_check_key(key)}.part"

    def partial_meta_path(self, key: str) -> Path:
        """The resume metadata next to a partial file (``partial/<key>.part.json``)."""
        return self.partial_dir / f"{_check_key(key)}.part.json"

    def tmp_path(self, key: str) -> Path:
        """A fresh temporary file name in ``partial/`` (same filesystem as ``blobs/``, so publish is atomic).

        Args:
            key: A name hint (sha256 or other key-safe text).

        Returns:
            A path that does not exist yet; the caller creates it and publishes or deletes it.
        """
        self._mkdir(self.partial_dir)
        return self.partial_dir / f"{_check_key(key)}.{os.getpid()}.{os.urandom(6).hex()}.tmp"

    def snapshot_dir(self, model_id: str, revision: str | None) -> Path:
        """The folder holding a model's files side by side (symlinks to blobs).

        Args:
            model_id: The model ID (may contain ``/``).
            revision: Commit/branch, or None for a local (non-versioned) source.

        Returns:
            ``<root>/models/<safe id>/<revision or "local">``.
        """
        return self.models_dir / safe_model_dir(model_id) / _safe_revision(revision)

    def _ref_path(self, model_id: str) -> Path:
        """Where a model's index lives."""
        return self.refs_dir / f"{safe_model_dir(model_id)}.json"

    def _mkdir(self, path: Path) -> Path:
        """Create a cache folder, turning permission/space errors into CacheError."""
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise cache_os_error(exc, path, "creating") from exc
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
        _check_sha256(sha256)
        try:  # plain string path: this runs on every warm hit, and pathlib would cost more than the stat
            st = os.stat(os.path.join(self.root, "blobs", sha256[:2], sha256))
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and (size is None or st.st_size == size)

    def publish(self, tmp_path: str | os.PathLike[str], sha256: str) -> Path:
        """Move a verified file into ``blobs/`` atomically (fsync, then ``os.replace``), read-only.

        The caller must have verified ``tmp_path`` hashes to ``sha256``. If the blob already exists it is
        kept and ``tmp_path`` is dropped. ``tmp_path`` must be on the cache's filesystem (use
        :meth:`partial_path`).

        Args:
            tmp_path: The verified temporary file.
            sha256: Its digest.

        Returns:
            The blob path.

        Raises:
            CacheError: the cache is read-only or full.
        """
        return self._publish(Path(tmp_path), sha256, make_read_only=True)

    def _publish(self, tmp: Path, sha256: str, *, make_read_only: bool) -> Path:
        """Publish ``tmp`` as the blob; optionally chmod it 0o444."""
        dest = self.blob_path(sha256)
        if self.has_blob(sha256):
            _unlink(tmp)
            return dest
        self._mkdir(dest.parent)
        try:
            with open(tmp, "rb") as f:  # data must be on disk before the name points at it
                os.fsync(f.fileno())
            if make_read_only:
                os.chmod(tmp, 0o444)
            os.replace(tmp, dest)
        except OSError as exc:
            raise cache_os_error(exc, dest, "publishing") from exc
        _fsync_dir(dest.parent)
        return dest

    # ------------------------------------------------------------------ locks
    @contextlib.contextmanager
    def lock(
        self,
        key: str,
        *,
        timeout: float | None = None,
        watch: str | os.PathLike[str] | None = None,
    ) -> Iterator[Path]:
        """Hold the cross-process lock ``locks/<key>.lock`` for the ``with`` block.

        The lock is a ``flock`` (via :class:`filelock.FileLock`): the kernel releases it when the holding
        process dies, even by SIGKILL, so a stale lock file never blocks anyone.

        Args:
            key: The transfer target (a sha256, or ``url-<hash>``).
            timeout: Seconds to wait; None waits as long as the holder is alive (and, with ``watch``,
                making progress).
            watch: A file the holder is writing (its partial). With ``timeout``, the wait only gives up
                after ``timeout`` seconds *without that file changing size*, so a slow but alive
                download is waited for and a hung one is not.

        Yields:
            The lock file path.

        Raises:
            CacheError: timed out, or the locks folder is not writable.
        """
        lock_path = self.locks_dir / f"{_check_key(key)}.lock"
        self._mkdir(self.locks_dir)
        lk = filelock.FileLock(str(lock_path))
        last_size: int | None = None
        last_change = time.monotonic()
        while True:
            step = 1.0 if timeout is None or watch is not None else timeout
            if watch is not None and timeout is not None:
                step = min(1.0, timeout)
            try:
                lk.acquire(timeout=step)
                break
            except filelock.Timeout:
                now = time.monotonic()
                if watch is not None:
                    try:
                        size: int | None = os.stat(watch).st_size
                    except OSError:
                        size = None
                    if size != last_size:
                        last_size, last_change = size, now
                if timeout is None:
                    logger.debug("waiting for %s (another process holds it)", lock_path)
                    continue
                if now - last_change >= timeout:
                    what = "made no progress" if watch is not None else "was not released"
                    raise CacheError(
                        f"hubload cache: gave up waiting for lock {lock_path}: another process holds it and "
                        f"{what} for {timeout:g}s. If no hubload process is running, the lock is stale only "
                        "on filesystems without flock (e.g. some NFS); delete the file and retry."
                    ) from None
            except OSError as exc:
                raise cache_os_error(exc, lock_path, "locking") from exc
        try:
            yield lock_path
        finally:
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
        parts = _check_rel_path(path, f"file path of {model_id!r}")
        snap = self.snapshot_dir(model_id, revision)
        blob = self.blob_path(sha256)
        if not self.has_blob(sha256):
            raise CacheError(f"hubload cache: cannot link {model_id!r} {path!r}: blob {blob} is not in the cache.")
        dest = snap.joinpath(*parts)
        self._mkdir(dest.parent)
        # A symlinked folder inside the snapshot could still point elsewhere; check where it really lands.
        real_snap = os.path.realpath(snap)
        real_parent = os.path.realpath(dest.parent)
        if os.path.commonpath([real_snap, real_parent]) != real_snap:
            raise CacheError(f"hubload cache: refusing {path!r} of {model_id!r}: it resolves outside {snap}.")
        target = os.path.relpath(blob, real_parent)
        tmp = dest.parent / f".{dest.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        try:
            try:
                os.symlink(target, tmp)
            except (NotImplementedError, OSError) as exc:
                if isinstance(exc, OSError) and exc.errno in _NO_SPACE | _READ_ONLY - {errno.EPERM}:
                    raise
                # No symlinks (Windows without developer mode): a hard link is the next best thing.
                try:
                    os.link(blob, tmp)
                except OSError:
                    shutil.copyfile(blob, tmp)
            os.replace(tmp, dest)
        except OSError as exc:
            with contextlib.suppress(OSError):
                _unlink(tmp)
            raise cache_os_error(exc, dest, "linking") from exc
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
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise cache_os_error(exc, path, "reading") from exc
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
        self._mkdir(self.refs_dir)
        atomic_write_json(path, data)
        return path
