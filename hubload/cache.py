"""The content-addressed cache: verified blobs, per-model snapshot folders and indexes.

Layout under the cache root (``$HUBLOAD_CACHE`` or the platform cache dir)::

    blobs/<sha256[:2]>/<sha256>             verified bytes, published atomically, read-only
    partial/<key>.part, <key>.part.json     an unfinished transfer and its resume metadata
    locks/<key>.lock                        one flock per transfer target (released by the kernel on death)
    models/<safe id>/<revision>/<path>      relative symlinks to blobs: the snapshot a framework opens
    refs/<safe id>.json                     {id, source, revision, files: {path: {sha256, size}}, pulled_at}

Partial files live inside the cache root, on the same filesystem as ``blobs/``, so publishing is one
``os.replace``: a reader sees either no blob or a complete, verified one.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock

from hubload.errors import CacheError

__all__ = ["Cache", "CachedFile", "CachedModel", "VerifyResult", "default_cache_dir", "sha256_file"]

logger = logging.getLogger("hubload")

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
_HASH_CHUNK = 8 * 1024 * 1024
# Blobs younger than this are never pruned as unreferenced: a concurrent pull publishes its blob a
# moment before it writes the model's ref, and prune must not delete it in between.
_PRUNE_BLOB_GRACE_S = 600.0

_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}


def default_cache_dir() -> Path:
    """Return the cache root: ``$HUBLOAD_CACHE`` if set, else the platform's user cache dir.

    Returns:
        The (not necessarily existing) cache root.
    """
    from .config import cache_dir

    return cache_dir()


def cache_os_error(exc: OSError, path: str | os.PathLike[str], action: str) -> CacheError:
    """Turn an OSError from a cache write into a CacheError that says what to do.

    Args:
        exc: The original error.
        path: The file or folder involved.
        action: What hubload was doing ("writing", "creating", ...).

    Returns:
        A CacheError to raise ``from exc``.
    """
    if exc.errno in _NO_SPACE:
        hint = ("the disk is full. Free space (e.g. `hubload cache prune`, or remove models you no longer "
                "need), or point HUBLOAD_CACHE at a larger disk")
    elif exc.errno in _READ_ONLY:
        hint = ("the cache directory is not writable. Point HUBLOAD_CACHE (or cache_dir=) at a writable "
                "directory, or fix its permissions")
    else:
        hint = f"{exc.strerror or exc}. Check the cache directory, or point HUBLOAD_CACHE elsewhere"
    err = CacheError(f"hubload cache: {action} {os.fspath(path)} failed: {hint}.")
    err.errno = exc.errno
    err.filename = os.fspath(path)
    return err


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hash a file with sha256 in large chunks.

    Args:
        path: The file to hash.

    Returns:
        The lowercase hex digest.
    """
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_HASH_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _check_sha256(sha256: str) -> str:
    """Validate a lowercase hex sha256 (it becomes a file name)."""
    if not isinstance(sha256, str) or not _SHA256_RE.match(sha256):
        raise ValueError(f"not a sha256 hex digest: {sha256!r} (expected 64 lowercase hex characters)")
    return sha256


def _check_key(key: str) -> str:
    """Validate a lock/partial key (it becomes a file name)."""
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(f"invalid cache key {key!r}: use letters, digits, '.', '_' and '-' only")
    return key


def _check_rel_path(path: str, what: str) -> list[str]:
    """Split a repo-relative POSIX path, refusing anything that could escape its folder."""
    if not isinstance(path, str) or not path:
        raise CacheError(f"hubload cache: {what} must be a non-empty relative path, got {path!r}.")
    bad = (
        path.startswith("/")
        or "\\" in path
        or "\x00" in path
        or re.match(r"^[A-Za-z]:", path) is not None
    )
    parts = path.split("/")
    if bad or any(p in ("", ".", "..") for p in parts):
        raise CacheError(
            f"hubload cache: refusing {what} {path!r}: it must be a relative POSIX path without '..', '.', "
            "empty segments, backslashes or a drive letter. Fix the registry entry that lists it."
        )
    return parts


@functools.lru_cache(maxsize=1024)  # pure; a warm hit maps the same ID on every call
def safe_model_dir(model_id: str) -> str:
    """Map a model ID (which may contain ``/``) to one folder name; refuse unsafe IDs.

    Args:
        model_id: e.g. ``"sentence-transformers/all-MiniLM-L6-v2"``.

    Returns:
        e.g. ``"sentence-transformers--all-MiniLM-L6-v2"``.

    Raises:
        CacheError: the ID is absolute, contains ``..``/``.``/empty segments, backslashes or control characters.
    """
    parts = _check_rel_path(model_id, "model ID")
    if any(ord(c) < 32 for c in model_id):
        raise CacheError(f"hubload cache: refusing model ID {model_id!r}: it contains control characters.")
    return "--".join(parts)


@functools.lru_cache(maxsize=1024)
def _safe_revision(revision: str | None) -> str:
    """Map a revision (commit, branch, ``refs/pr/1``) to one folder name; None means ``local``."""
    if revision is None or revision == "":
        return "local"
    return "--".join(_check_rel_path(revision, "revision"))


def _fsync_dir(path: Path) -> None:
    """fsync a directory so a rename in it survives a crash (no-op where unsupported)."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _unlink(path: Path) -> bool:
    """Remove a file or symlink (read-only too); True if something was removed."""
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False
    except PermissionError:
        if os.name == "nt":  # Windows refuses to delete read-only files
            os.chmod(path, stat.S_IWRITE)
            path.unlink()
            return True
        raise


@dataclass(frozen=True)
class CachedFile:
    """One file of a cached model, as :meth:`Cache.ls` reports it."""

    path: str
    sha256: str
    size: int
    present: bool


@dataclass(frozen=True)
class CachedModel:
    """One cached model, as :meth:`Cache.ls` reports it."""

    id: str
    source: str
    revision: str | None
    pulled_at: str | None
    files: tuple[CachedFile, ...]
    snapshot: Path

    @property
    def total_size(self) -> int:
        """Bytes of the files that are present in the cache."""
        return sum(f.size for f in self.files if f.present)

    @property
    def complete(self) -> bool:
        """True when every file of the model is present."""
        return all(f.present for f in self.files)


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of re-hashing one blob: ``status`` is ``"ok"``, ``"corrupt"`` or ``"missing"``."""

    sha256: str
    path: Path
    status: str
    actual: str | None = None
    size: int | None = None

    @property
    def ok(self) -> bool:
        """True when the blob is present and its bytes hash to its name."""
        return self.status == "ok"


class Cache:
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

    def _refs(self) -> Iterator[tuple[Path, dict[str, Any]]]:
        """Every readable index in ``refs/`` (unreadable ones are skipped with a warning)."""
        try:
            paths = sorted(self.refs_dir.glob("*.json"))
        except OSError:
            return
        for p in paths:
            try:
                data = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                logger.warning("hubload cache: skipping unreadable index %s (%s)", p, exc)
                continue
            if isinstance(data, dict):
                yield p, data

    def _referenced(self) -> set[str]:
        """The sha256 of every file listed by any index."""
        out: set[str] = set()
        for _, data in self._refs():
            for info in (data.get("files") or {}).values():
                if isinstance(info, dict) and isinstance(info.get("sha256"), str):
                    out.add(info["sha256"])
        return out

    def ls(self) -> list[CachedModel]:
        """List cached models with their files, sizes and revision.

        Returns:
            One :class:`CachedModel` per index, sorted by ID.
        """
        out = []
        for _, data in self._refs():
            model_id = str(data.get("id", ""))
            files = []
            for fpath, info in sorted((data.get("files") or {}).items()):
                sha = str(info.get("sha256", ""))
                size = int(info.get("size") or 0)
                present = bool(_SHA256_RE.match(sha)) and self.has_blob(sha, size if info.get("size") else None)
                files.append(CachedFile(path=fpath, sha256=sha, size=size, present=present))
            try:
                snap = self.snapshot_dir(model_id, data.get("revision"))
            except CacheError:
                continue
            out.append(CachedModel(
                id=model_id, source=str(data.get("source", "")), revision=data.get("revision"),
                pulled_at=data.get("pulled_at"), files=tuple(files), snapshot=snap,
            ))
        return sorted(out, key=lambda m: m.id)

    def remove(self, model_id: str) -> int:
        """Forget a model: drop its index and snapshot, and its blobs that no other model references.

        Args:
            model_id: The model ID.

        Returns:
            Bytes freed.

        Raises:
            CacheError: the model is not cached, or the cache is not writable.
        """
        ref_path = self._ref_path(model_id)
        data = self.read_ref(model_id)
        model_dir = self.models_dir / safe_model_dir(model_id)
        if data is None and not model_dir.exists():
            raise CacheError(f"hubload cache: {model_id!r} is not in the cache at {self.root}; see `hubload cache ls`.")
        mine = {info["sha256"] for info in ((data or {}).get("files") or {}).values()
                if isinstance(info, dict) and isinstance(info.get("sha256"), str)}
        try:
            _unlink(ref_path)
            if model_dir.exists():
                shutil.rmtree(model_dir)
        except OSError as exc:
            raise cache_os_error(exc, model_dir, "removing") from exc
        still_used = self._referenced()
        freed = 0
        for sha in sorted(mine - still_used):
            if _SHA256_RE.match(sha):
                freed += self._drop_blob(sha)
        self._remove_empty_dirs()
        return freed

    def _drop_blob(self, sha256: str) -> int:
        """Delete one blob; return its size (0 if absent)."""
        p = self.blob_path(sha256)
        try:
            size = p.stat().st_size
            _unlink(p)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise cache_os_error(exc, p, "removing") from exc
        return size

    def _linked_blobs(self) -> dict[str, list[Path]]:
        """Map blob sha256 -> snapshot links pointing at it."""
        out: dict[str, list[Path]] = {}
        if not self.models_dir.is_dir():
            return out
        for dirpath, _dirs, files in os.walk(self.models_dir):
            for name in files:
                p = Path(dirpath) / name
                if p.is_symlink():
                    target = os.path.basename(os.readlink(p))
                    if _SHA256_RE.match(target):
                        out.setdefault(target, []).append(p)
        return out

    def _all_blobs(self) -> Iterator[tuple[str, Path]]:
        """Every blob file in ``blobs/`` (name, path)."""
        if not self.blobs_dir.is_dir():
            return
        for sub in sorted(self.blobs_dir.iterdir()):
            if sub.is_dir():
                for p in sorted(sub.iterdir()):
                    if _SHA256_RE.match(p.name):
                        yield p.name, p

    def prune(self, *, partial_max_age_hours: float = 24.0) -> int:
        """Free space: unreferenced blobs, stale partial downloads, empty folders.

        A blob is kept if an index lists it, a snapshot links to it, or it is younger than 10 minutes (a
        pull in progress publishes before it records the model). A partial is deleted only if it is older
        than ``partial_max_age_hours`` and no process holds its lock.

        Args:
            partial_max_age_hours: Age (by last modification) after which an unlocked partial is stale.

        Returns:
            Bytes freed.
        """
        freed = 0
        keep = self._referenced() | set(self._linked_blobs())
        now = time.time()
        for sha, p in list(self._all_blobs()):
            if sha in keep:
                continue
            try:
                st = p.stat()
            except OSError:
                continue
            if now - st.st_mtime < _PRUNE_BLOB_GRACE_S:
                continue
            freed += self._drop_blob(sha)
        if self.partial_dir.is_dir():
            for part in sorted(self.partial_dir.glob("*.part")):
                key = part.name[: -len(".part")]
                try:
                    if now - part.stat().st_mtime < partial_max_age_hours * 3600:
                        continue
                    size = part.stat().st_size
                except OSError:
                    continue
                try:
                    with self.lock(key, timeout=0.01):
                        _unlink(part)
                        _unlink(self.partial_meta_path(key))
                        freed += size
                except CacheError:
                    logger.debug("hubload cache: %s is in use; not pruning it", part)
                except ValueError:
                    continue
            for tmp in [*self.partial_dir.glob("*.tmp"), *self.partial_dir.glob("*.link")]:
                # Temp files of crashed runs; live ones are rewritten constantly, so age tells them apart.
                try:
                    st = tmp.stat()
                    if now - st.st_mtime >= partial_max_age_hours * 3600:
                        _unlink(tmp)
                        freed += st.st_size
                except OSError:
                    continue
            for meta in self.partial_dir.glob("*.part.json"):  # metadata whose partial is gone
                if not meta.with_suffix("").exists() and now - meta.stat().st_mtime > partial_max_age_hours * 3600:
                    _unlink(meta)
        self._remove_empty_dirs()
        return freed

    def _remove_empty_dirs(self) -> None:
        """Delete empty folders under blobs/ and models/ (bottom-up)."""
        for top in (self.blobs_dir, self.models_dir):
            if not top.is_dir():
                continue
            for dirpath, _dirs, _files in os.walk(top, topdown=False):
                if Path(dirpath) != top:
                    with contextlib.suppress(OSError):
                        os.rmdir(dirpath)

    def verify(self, model_id: str | None = None) -> list[VerifyResult]:
        """Re-hash cached blobs; evict corrupt ones and the snapshot links pointing at them.

        Args:
            model_id: Verify only this model's files; None verifies every blob in the cache.

        Returns:
            One :class:`VerifyResult` per blob (``ok``/``corrupt``/``missing``).

        Raises:
            CacheError: ``model_id`` is not cached.
        """
        if model_id is not None:
            data = self.read_ref(model_id)
            if data is None:
                raise CacheError(f"hubload cache: {model_id!r} is not in the cache at {self.root}.")
            shas = sorted({info["sha256"] for info in (data.get("files") or {}).values()
                           if isinstance(info, dict) and _SHA256_RE.match(str(info.get("sha256", "")))})
        else:
            shas = [sha for sha, _ in self._all_blobs()]
        links = self._linked_blobs()
        results = []
        for sha in shas:
            p = self.blob_path(sha)
            try:
                size = p.stat().st_size
                actual = sha256_file(p)
            except FileNotFoundError:
                results.append(VerifyResult(sha, p, "missing"))
                continue
            if actual == sha:
                results.append(VerifyResult(sha, p, "ok", actual, size))
                continue
            logger.warning("hubload cache: blob %s is corrupt (hashes to %s); evicting it", p, actual)
            self._drop_blob(sha)
            for link in links.get(sha, []):
                with contextlib.suppress(OSError):
                    _unlink(link)
            results.append(VerifyResult(sha, p, "corrupt", actual, size))
        return results

    # ------------------------------------------------------------------ Hugging Face cache reuse
    def reuse_from_hf_cache(
        self, repo_id: str, revision: str | None, filename: str, sha256: str, size: int | None
    ) -> Path | None:
        """Adopt a file the user already has in their Hugging Face cache, if it is the right one.

        The HF cache location honours ``HF_HUB_CACHE``, ``HF_HOME`` and ``XDG_CACHE_HOME`` (read now). The
        candidate is hashed once; on a match it is hard-linked into ``blobs/`` (copied across devices).

        Args:
            repo_id: The Hub repo, e.g. ``"sentence-transformers/all-MiniLM-L6-v2"``.
            revision: Commit or branch (None: ``main``).
            filename: The file inside the repo.
            sha256: The expected digest.
            size: The expected size, if known.

        Returns:
            The blob path, or None if the HF cache has no matching file.
        """
        _check_sha256(sha256)
        if self.has_blob(sha256, size):
            return self.blob_path(sha256)
        # Most pulls have no HF copy: one stat spares importing huggingface_hub (~0.3 s) on the way to a download.
        if not (hf_hub_cache_dir() / f"models--{repo_id.replace('/', '--')}").is_dir():
            return None
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # optional: the HF cache is only a shortcut
            return None
        try:
            found = try_to_load_from_cache(repo_id, filename, cache_dir=str(hf_hub_cache_dir()),
                                           revision=revision or None)
        except Exception as exc:  # a malformed repo id / odd cache must never break a pull
            logger.debug("hubload: HF cache lookup for %s/%s failed: %s", repo_id, filename, exc)
            return None
        if not isinstance(found, str):
            return None
        src = Path(os.path.realpath(found))
        try:
            if not src.is_file() or (size is not None and src.stat().st_size != size):
                return None
        except OSError:
            return None
        key = f"hf-{sha256}"
        self._mkdir(self.partial_dir)
        tmp = self.partial_dir / f"{key}.{os.getpid()}.{os.urandom(6).hex()}.link"
        linked = False
        try:
            try:
                os.link(src, tmp)
                linked = True
                actual = sha256_file(tmp)
            except OSError:  # cross-device or no hard links: copy, hashing as we go
                actual = _copy_hashing(src, tmp)
            if actual != sha256:
                logger.info("hubload: %s in the HF cache does not match sha256 %s; downloading instead", src, sha256)
                _unlink(tmp)
                return None
            # A hard link shares the inode with HF's file: leave its mode alone.
            return self._publish(tmp, sha256, make_read_only=not linked)
        except OSError as exc:
            with contextlib.suppress(OSError):
                _unlink(tmp)
            if isinstance(exc, CacheError):
                raise
            logger.debug("hubload: could not reuse %s from the HF cache: %s", src, exc)
            return None


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder, from the environment as it is now.

    Returns:
        ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub`` or ``~/.cache/...``.
    """
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(env).expanduser()
    home = os.environ.get("HF_HOME")
    if home:
        return Path(home).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "huggingface" / "hub"


def _copy_hashing(src: Path, dst: Path) -> str:
    """Copy src to dst in large chunks, hashing on the way; return the digest."""
    h = hashlib.sha256()
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    with open(src, "rb", buffering=0) as fi, open(dst, "wb") as fo:
        while n := fi.readinto(buf):
            h.update(view[:n])
            fo.write(view[:n])
    return h.hexdigest()


def atomic_write_json(path: Path, data: Any, *, durable: bool = True) -> None:
    """Write JSON to ``path`` via a temp file in the same folder (fsync unless not ``durable``) and ``os.replace``."""
    folder = path.parent
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise cache_os_error(exc, path, "writing") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            if durable:  # progress records skip it: losing one only costs a re-download, never correctness
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise cache_os_error(exc, path, "writing") from exc

