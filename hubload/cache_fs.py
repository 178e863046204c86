"""Filesystem primitives of the cache: safe names, atomic writes, hashing and actionable OSError mapping.

Everything here is about getting bytes and names onto disk safely, independent of the cache's layout:
model IDs, revisions and keys become file names only after validation, a JSON index is replaced atomically,
and a full or read-only disk becomes a :class:`~hubload.errors.CacheError` that says what to do. Shared by
``hubload.cache`` and its maintenance (``cache_admin``) and Hugging Face reuse (``hf_cache``) parts.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import re
import stat
import tempfile
from pathlib import Path
from collections.abc import Iterator
from typing import Any, BinaryIO

from hubload.errors import CacheError, HubloadError

__all__ = [
    "NO_SPACE",
    "READ_ONLY",
    "SHA256_RE",
    "atomic_write_json",
    "cache_errors",
    "cache_os_error",
    "check_key",
    "check_rel_path",
    "check_sha256",
    "digest_mismatch",
    "fsync_dir",
    "hash_into",
    "remove_file",
    "safe_model_dir",
    "safe_revision",
    "sha256_file",
]

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
_HASH_CHUNK = 8 * 1024 * 1024

NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}


def cache_os_error(exc: OSError, path: str | os.PathLike[str], action: str) -> CacheError:
    """Turn an OSError from a cache write into a CacheError that says what to do.

    Args:
        exc: The original error.
        path: The file or folder involved.
        action: What hubload was doing ("writing", "creating", ...).

    Returns:
        A CacheError to raise ``from exc``.
    """
    if exc.errno in NO_SPACE:
        hint = ("the disk is full. Free space (e.g. `hubload cache prune`, or remove models you no longer "
                "need), or point HUBLOAD_CACHE at a larger disk")
    elif exc.errno in READ_ONLY:
        hint = ("the cache directory is not writable. Point HUBLOAD_CACHE (or cache_dir=) at a writable "
                "directory, or fix its permissions")
    else:
        hint = f"{exc.strerror or exc}. Check the cache directory, or point HUBLOAD_CACHE elsewhere"
    err = CacheError(f"hubload cache: {action} {os.fspath(path)} failed: {hint}.")
    err.errno = exc.errno
    err.filename = os.fspath(path)
    return err


@contextlib.contextmanager
def cache_errors(path: str | os.PathLike[str], action: str) -> Iterator[None]:
    """Map any ``OSError`` raised in the block to a :class:`CacheError` about ``path`` (``httpx.map_exceptions``).

    hubload's own errors pass through unchanged (``DownloadError`` and ``CacheError`` are ``OSError``\ s too).

    Args:
        path: The file or folder the block works on.
        action: What it does ("writing", "publishing", ...), for the message.

    Raises:
        CacheError: in place of the ``OSError``.
    """
    try:
        yield
    except HubloadError:
        raise
    except OSError as exc:
        raise cache_os_error(exc, path, action) from exc


def digest_mismatch(digest: str, size: int, *, sha256: str | None, sha256_prefix: str | None = None,
                    expected_size: int | None = None) -> str | None:
    """Compare a file's digest and size with what was expected; say what differs, or None if it matches.

    Args:
        digest: The sha256 computed while the bytes were written.
        size: Their count.
        sha256: The expected full digest, or None.
        sha256_prefix: Accept a digest starting with this (torch.hub style) when ``sha256`` is None.
        expected_size: The expected size, or None.

    Returns:
        None when everything matches, else a phrase such as ``"sha256 mismatch: expected X, got Y"``.
    """
    if expected_size is not None and size != expected_size:
        return f"size mismatch: expected {expected_size} bytes, got {size}"
    if sha256 is not None and digest != sha256.lower():
        return f"sha256 mismatch: expected {sha256.lower()}, got {digest}"
    if sha256 is None and sha256_prefix and not digest.startswith(sha256_prefix.lower()):
        return f"sha256 mismatch: expected {sha256_prefix.lower()}..., got {digest}"
    return None


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hash a file with sha256 in large chunks.

    Args:
        path: The file to hash.

    Returns:
        The lowercase hex digest.
    """
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        hash_into(f, h)
    return h.hexdigest()


def hash_into(f: BinaryIO, hasher: Any, *, limit: int | None = None, out: BinaryIO | None = None) -> int:
    """Feed a file, from its current position, into a hash object in large chunks.

    Args:
        f: A binary file open for reading (unbuffered avoids a copy).
        hasher: A ``hashlib`` object; ``update`` is called with each chunk.
        limit: Read at most this many bytes (None: to the end of the file).
        out: Also write each chunk to this binary file (hash while copying).

    Returns:
        The number of bytes read (fewer than ``limit`` if the file ended first).
    """
    buf = bytearray(_HASH_CHUNK if limit is None else min(_HASH_CHUNK, limit))
    view = memoryview(buf)
    done = 0
    while limit is None or done < limit:
        n = f.readinto(view if limit is None else view[: limit - done])
        if not n:
            break
        hasher.update(view[:n])
        if out is not None:
            out.write(view[:n])
        done += n
    return done


def check_sha256(sha256: str) -> str:
    """Validate a lowercase hex sha256 (it becomes a file name)."""
    if not isinstance(sha256, str) or not SHA256_RE.match(sha256):
        raise ValueError(f"not a sha256 hex digest: {sha256!r} (expected 64 lowercase hex characters)")
    return sha256


def check_key(key: str) -> str:
    """Validate a lock/partial key (it becomes a file name)."""
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(f"invalid cache key {key!r}: use letters, digits, '.', '_' and '-' only")
    return key


def check_rel_path(path: str, what: str) -> list[str]:
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
    parts = check_rel_path(model_id, "model ID")
    if any(ord(c) < 32 for c in model_id):
        raise CacheError(f"hubload cache: refusing model ID {model_id!r}: it contains control characters.")
    return "--".join(parts)


@functools.lru_cache(maxsize=1024)
def safe_revision(revision: str | None) -> str:
    """Map a revision (commit, branch, ``refs/pr/1``) to one folder name; None means ``local``."""
    if revision is None or revision == "":
        return "local"
    return "--".join(check_rel_path(revision, "revision"))


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename in it survives a crash (no-op where unsupported)."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_file(path: Path) -> bool:
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


def atomic_write_json(path: Path, data: Any, *, durable: bool = True) -> None:
    """Write JSON to ``path`` via a temp file in the same folder (fsync unless not ``durable``) and ``os.replace``."""
    with cache_errors(path, "writing"):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.write("\n")
                f.flush()
                if durable:  # progress records skip it: losing one only costs a re-download, never correctness
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
