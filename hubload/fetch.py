"""``hubload.pull`` (this module is ``hubload.fetch``): resolve a registry entry, fetch its files, link them.

A pull of a pinned entry whose files are cached makes zero network requests and hashes nothing: a blob's
presence (with the right size) under ``blobs/`` means it was verified when it was published.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import config
from .cache import Cache
from .cache_fs import cache_errors, hash_into
from .errors import CacheError, ModelNotFoundError, OfflineError, RegistryError
from .registry import FileSpec, ModelEntry, RegistryArg, load_registry
from .sources import ResolvedFile, resolve_file, resolve_hf_revision

if TYPE_CHECKING:  # httpio imports requests: keep `import hubload.fetch` light
    from .httpio import RetryPolicy

__all__ = ["cached_files", "pull", "pull_entry", "verify"]

log = logging.getLogger("hubload")


def _snapshot_rev(entry: ModelEntry, commit: str | None) -> str:
    """Name of the snapshot folder: the commit for hf://, else the scheme."""
    if entry.scheme == "hf":
        return commit or entry.revision or "main"
    return "local" if entry.scheme == "file" else "url"


def _known_sha(entry: ModelEntry, spec: FileSpec, ref: Mapping[str, Any] | None) -> str | None:
    """The sha256 a cached copy must have: the registry's, else one recorded at an earlier verified pull."""
    if spec.sha256:
        return spec.sha256
    if not ref:
        return None
    rec = (ref.get("files") or {}).get(spec.path) or {}
    sha = rec.get("sha256")
    if not sha:
        return None
    if spec.sha256_prefix and not sha.startswith(spec.sha256_prefix):
        return None
    if entry.scheme == "hf" and entry.revision and ref.get("revision") not in (None, entry.revision) \
            and ref.get("commit") != entry.revision:
        return None
    return sha


def cached_files(entry: ModelEntry, *, cache: Cache | None = None,
                 allow_unpinned: bool | None = None) -> dict[str, Path] | None:
    """The local files of ``entry`` if all are cached, without any network request or hashing.

    Args:
        entry: The registry entry.
        cache: The cache (default: ``HUBLOAD_CACHE``).
        allow_unpinned: Also accept files of unpinned entries recorded by an earlier pull (offline use);
            default: only with ``HUBLOAD_OFFLINE=prefer``.

    Returns:
        File path → local path, or None when something is missing.
    """
    cache = cache or Cache()
    if allow_unpinned is None:
        allow_unpinned = config.prefers_cache()
    ref = None
    if not entry.pinned:
        ref = cache.read_ref(entry.id)
        if ref is None:
            return None
        if entry.scheme == "hf" and not allow_unpinned and not (entry.revision and len(entry.revision) == 40):
            return None  # a branch may have moved: only an online resolve may answer (or offline mode)
    commit = entry.revision if entry.scheme == "hf" else None
    if ref is not None and entry.scheme == "hf":
        commit = ref.get("commit") or commit
    out: dict[str, Path] = {}
    for spec in entry.files:
        sha = _known_sha(entry, spec, ref)
        if sha is None or not cache.has_blob(sha, spec.size):
            return None
        link = cache.snapshot_dir(entry.id, _snapshot_rev(entry, commit)) / spec.path
        if not (link.is_symlink() or link.exists()):
            link = cache.link(entry.id, _snapshot_rev(entry, commit), spec.path, sha)
        out[spec.path] = link
    return out


def _import_local(entry: ModelEntry, rf: ResolvedFile, cache: Cache) -> Path:
    """Copy a local source file into the cache, hashing while copying, then verify and publish."""
    spec = rf.spec
    base = entry.local_dir().resolve()
    src = rf.local_path
    assert src is not None
    try:
        real = src.resolve(strict=True)
    except (FileNotFoundError, OSError):
        raise ModelNotFoundError(f"model {entry.id!r}: file {spec.path!r} not found at {src}; check the registry's "
                                 "source folder", model_id=entry.id) from None
    if base != real and base not in real.parents:
        raise RegistryError(f"file {spec.path!r} resolves to {real}, outside the source folder {base} (a symlink "
                            "escapes it); refusing to read it — copy the file into the folder instead",
                            file=entry.registry_file, entry=entry.id, field="files")
    key = spec.sha256 or hashlib.sha256(str(real).encode()).hexdigest()
    with cache.lock(key):
        if spec.sha256 and cache.has_blob(spec.sha256, spec.size):
            return cache.blob_path(spec.sha256)
        tmp = cache.tmp_path(key)
        h = hashlib.sha256()
        try:
            with cache_errors(tmp, "writing"), open(real, "rb", buffering=0) as fin, open(tmp, "wb") as fout:
                size = hash_into(fin, h, out=fout)
            return cache.publish_verified(
                tmp, h.hexdigest(), size, sha256=spec.sha256, sha256_prefix=spec.sha256_prefix,
                expected_size=spec.size, where=f"model {entry.id!r} file {spec.path!r} ({real})",
                hint="The file changed: fix the registry or the file; nothing was cached.",
                model_id=entry.id, path=str(real),
            )
        finally:
            if tmp.exists():
                tmp.unlink()


def _fetch_one(entry: ModelEntry, rf: ResolvedFile, cache: Cache, *, offline: bool, progress: bool | None,
               parallel: int, timeout: float | tuple[float, float] | None,
               retries: RetryPolicy | None) -> tuple[str, Path]:
    """Fetch one resolved file into the cache; return (sha256, blob path)."""
    from . import transfer

    if rf.local_path is not None:
        blob = _import_local(entry, rf, cache)
        return blob.name, blob
    if rf.sha256 and cache.has_blob(rf.sha256, rf.size):
        return rf.sha256, cache.blob_path(rf.sha256)
    if entry.scheme == "hf" and rf.sha256 and rf.revision:
        reused = cache.reuse_from_hf_cache(entry.repo_id, rf.revision, rf.spec.path, rf.sha256, rf.size)
        if reused is not None:
            log.info("model %r file %r: reused from the Hugging Face cache", entry.id, rf.spec.path)
            return rf.sha256, reused
    assert rf.url is not None
    extra: dict[str, Any] = {}
    if timeout is not None:
        extra["timeout"] = timeout
    if retries is not None:
        extra["retries"] = retries
    blob = transfer.download(
        rf.url, cache, sha256=rf.sha256, size=rf.size, sha256_prefix=rf.spec.sha256_prefix, headers=rf.headers,
        auth_host=rf.auth_host, model_id=entry.id, file=rf.spec.path, offline=offline, progress=progress,
        parallel=parallel, **extra,
    )
    return blob.name, blob


def pull_entry(entry: ModelEntry, *, cache: Cache | None = None, offline: bool | str | None = None,
               token: str | bool | None = None, progress: bool | None = None,
               parallel: int | None = None, timeout: float | tuple[float, float] | None = None,
               retries: RetryPolicy | None = None) -> dict[str, Path]:
    """Make every file of ``entry`` available locally, verified.

    Under an initialised ``torch.distributed`` process group, local rank 0 of each node pulls while the other
    ranks wait, then read the cache; a failure reaches every rank (``HUBLOAD_DISTRIBUTED=0`` turns this off).

    Args:
        entry: A registry entry.
        cache: The cache (default: ``HUBLOAD_CACHE`` or the user cache dir).
        offline: Forbid network access; ``"prefer"`` uses cached files without any request and fetches only
            missing ones (default: ``HUBLOAD_OFFLINE`` = ``1`` / ``prefer`` / ``0``, or ``HF_HUB_OFFLINE``).
        token: Hub token for hf:// sources (default: ``HF_TOKEN`` or the saved login; False disables).
        progress: Show tqdm progress on stderr (default: only on a TTY).
        parallel: Concurrent connections (default: ``HUBLOAD_PARALLEL`` or 8).
        timeout: ``(connect, read)`` seconds per request (default: the transfer engine's, 10 and 60).
        retries: A ``hubload.transfer.RetryPolicy`` (default: 5 attempts, exponential backoff).

    Returns:
        File path in the entry → local path (inside the cache's snapshot folder for the entry).

    Raises:
        OfflineError: a file is missing and the network may not be used.
        HashMismatchError: downloaded bytes did not match; nothing was kept.
        DownloadError, ModelNotFoundError: the transfer failed.
    """
    from .distributed import run_once_per_node  # framework-free; collective only under torch.distributed

    return run_once_per_node(lambda: _pull_entry(entry, cache=cache, offline=offline, token=token, progress=progress,
                                                 parallel=parallel, timeout=timeout, retries=retries),
                             label=f"model {entry.id!r}")


def _pull_entry(entry: ModelEntry, *, cache: Cache | None, offline: bool | str | None, token: str | bool | None,
                progress: bool | None, parallel: int | None, timeout: float | tuple[float, float] | None,
                retries: RetryPolicy | None) -> dict[str, Path]:
    """The pull itself (one process)."""
    cache = cache or Cache()
    # HUBLOAD_OFFLINE=prefer: what is cached is used as it is (a branch is not re-resolved), zero requests;
    # only an entry with a missing file goes online.
    prefer = config.prefers_cache(offline)
    offline = config.is_offline(offline)
    hit = cached_files(entry, cache=cache, allow_unpinned=offline or prefer)
    if hit is not None:
        log.debug("model %r: cache hit, no network", entry.id)
        if entry.pinned and not cache.has_ref(entry.id):
            # The blobs came from another ID with the same files: record this ID too, so `cache ls` shows it
            # and `cache rm` of the other ID does not delete blobs this one still uses. A read-only shared
            # cache still serves the hit.
            shas = {spec.path: spec.sha256 for spec in entry.files if spec.sha256}
            try:
                _write_ref(entry, cache, entry.revision if entry.scheme == "hf" else None,
                           {path: (sha, cache.blob_path(sha)) for path, sha in shas.items()})
            except CacheError as exc:
                log.debug("model %r: could not record the index (%s)", entry.id, exc)
        return hit
    if offline and entry.scheme != "file":  # local sources need no network
        url = entry.source
        raise OfflineError(f"model {entry.id!r} is not (fully) cached at {cache.root} and offline mode is on "
                           "(HUBLOAD_OFFLINE/HF_HUB_OFFLINE); unset it and run `hubload pull "
                           f"{entry.id}` once", url=url, model_id=entry.id)
    tok = config.hf_token(token) if entry.scheme == "hf" else None
    commit = None
    if entry.scheme == "hf":
        commit = resolve_hf_revision(entry, token=tok)
    resolved = [resolve_file(entry, spec, token=tok, commit=commit) for spec in entry.files]
    nconn = config.parallelism(parallel)
    # Files of one entry move in parallel; a single large file may split into ranges inside the engine.
    workers = min(len(resolved), nconn)
    per_file = max(1, nconn // max(1, workers))
    results: dict[str, tuple[str, Path]] = {}
    if workers <= 1:
        for rf in resolved:
            results[rf.spec.path] = _fetch_one(entry, rf, cache, offline=offline, progress=progress,
                                               parallel=per_file, timeout=timeout, retries=retries)
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hubload-pull") as pool:
            futs = {rf.spec.path: pool.submit(_fetch_one, entry, rf, cache, offline=offline, progress=progress,
                                              parallel=per_file, timeout=timeout, retries=retries)
                    for rf in resolved}
            for path, fut in futs.items():
                results[path] = fut.result()
    rev = _snapshot_rev(entry, commit)
    out = {path: cache.link(entry.id, rev, path, sha) for path, (sha, _) in results.items()}
    _write_ref(entry, cache, commit, results)
    return out


def _write_ref(entry: ModelEntry, cache: Cache, commit: str | None, results: Mapping[str, tuple[str, Path]]) -> None:
    """Record what was pulled (the index `cache ls/rm/prune` and unpinned warm hits read)."""
    cache.write_ref(entry.id, {
        "id": entry.id, "source": entry.source, "revision": entry.revision, "commit": commit,
        "files": {path: {"sha256": sha, "size": blob.stat().st_size} for path, (sha, blob) in results.items()},
        "pulled_at": time.time(),
    })


def pull(model_id: str, *, registry: RegistryArg = None, cache_dir: str | os.PathLike[str] | None = None,
         offline: bool | str | None = None, token: str | bool | None = None, progress: bool | None = None,
         parallel: int | None = None, timeout: float | tuple[float, float] | None = None,
         retries: RetryPolicy | None = None) -> dict[str, Path]:
    """Pull a registry model's weight files into the local cache, every byte verified.

    Args:
        model_id: A registry ID (see ``hubload list``).
        registry: Extra registry (path, list of paths, mapping or Registry) looked up first.
        cache_dir: Cache root (default: ``HUBLOAD_CACHE`` or the user cache dir).
        offline: Forbid network access, or ``"prefer"`` the cache (see :func:`pull_entry`).
        token: Hub token for hf:// sources (default: ``HF_TOKEN`` or the saved login).
        progress: Show progress bars on stderr (default: only on a TTY).
        parallel: Concurrent connections (default 8).
        timeout: ``(connect, read)`` seconds per request.
        retries: A ``hubload.transfer.RetryPolicy``.

    Returns:
        File path in the entry → local path.

    Raises:
        ModelNotFoundError: unknown ID, or the file/repository/revision does not exist upstream.
        OfflineError: not cached and offline (or the server is unreachable).
        HashMismatchError: the bytes did not match; nothing was kept.
        DownloadError, CacheError: the transfer or the cache failed.
    """
    entry = load_registry(registry).get(model_id)
    return pull_entry(entry, cache=Cache(cache_dir), offline=offline, token=token, progress=progress,
                      parallel=parallel, timeout=timeout, retries=retries)


def verify(model_ids: list[str] | None = None, *, registry: RegistryArg = None,
           cache_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """Re-hash cached files, evicting any that no longer match; see ``Cache.verify``."""
    cache = Cache(cache_dir)
    if not model_ids:
        return list(cache.verify())
    reg = load_registry(registry)
    out: list[dict[str, Any]] = []
    for mid in model_ids:
        if mid not in reg and cache.read_ref(mid) is None:
            reg.get(mid)  # raises ModelNotFoundError with suggestions
        out.extend(cache.verify(mid))
    return out
