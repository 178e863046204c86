"""Cache maintenance: list, verify, prune and remove, as the ``hubload cache`` commands use them.

These walk the whole cache (every index, blob and snapshot link), unlike the hot path of a pull, which
touches one file. :class:`CacheMaintenance` is mixed into :class:`hubload.cache.Cache` and relies on its
paths, ``read_ref``, ``blob_path``, ``has_blob``, ``snapshot_dir`` and ``lock``; its result types
(:class:`CachedModel`, :class:`CachedFile`, :class:`VerifyResult`) are re-exported by ``hubload.cache``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hubload.cache_fs import SHA256_RE, cache_errors, remove_file, safe_model_dir, sha256_file
from hubload.errors import CacheError

__all__ = ["CacheMaintenance", "CachedFile", "CachedModel", "VerifyResult"]

logger = logging.getLogger("hubload")

# Blobs younger than this are never pruned as unreferenced: a concurrent pull publishes its blob a
# moment before it writes the model's ref, and prune must not delete it in between.
_PRUNE_BLOB_GRACE_S = 600.0


def _index_shas(data: dict[str, Any]) -> set[str]:
    """The sha256 strings an index (a ``refs/*.json`` dict) lists for its files."""
    return {info["sha256"] for info in (data.get("files") or {}).values()
            if isinstance(info, dict) and isinstance(info.get("sha256"), str)}


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


class CacheMaintenance:
    """``ls``, ``remove``, ``prune`` and ``verify`` of :class:`~hubload.cache.Cache` (a mixin; see the module doc)."""

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
            out |= _index_shas(data)
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
                present = bool(SHA256_RE.match(sha)) and self.has_blob(sha, size if info.get("size") else None)
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
        mine = _index_shas(data or {})
        with cache_errors(model_dir, "removing"):
            remove_file(ref_path)
            if model_dir.exists():
                shutil.rmtree(model_dir)
        still_used = self._referenced()
        freed = 0
        for sha in sorted(mine - still_used):
            if SHA256_RE.match(sha):
                freed += self._drop_blob(sha)
        self._remove_empty_dirs()
        return freed

    def _drop_blob(self, sha256: str) -> int:
        """Delete one blob; return its size (0 if absent)."""
        p = self.blob_path(sha256)
        with cache_errors(p, "removing"):
            try:
                size = p.stat().st_size
                remove_file(p)
            except FileNotFoundError:
                return 0
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
                    if SHA256_RE.match(target):
                        out.setdefault(target, []).append(p)
        return out

    def _all_blobs(self) -> Iterator[tuple[str, Path]]:
        """Every blob file in ``blobs/`` (name, path)."""
        if not self.blobs_dir.is_dir():
            return
        for sub in sorted(self.blobs_dir.iterdir()):
            if sub.is_dir():
                for p in sorted(sub.iterdir()):
                    if SHA256_RE.match(p.name):
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
                # <key>.part (handed back) or <key>.<writer>.part (a writer's own; see hubload.partial)
                key = part.name[: -len(".part")].split(".", 1)[0]
                try:
                    st = part.stat()
                except OSError:
                    continue
                if now - st.st_mtime < partial_max_age_hours * 3600:
                    continue
                try:
                    with self.lock(key, timeout=0.01):
                        remove_file(part)
                        remove_file(part.with_name(part.name + ".json"))
                        freed += st.st_size
                except CacheError:
                    logger.debug("hubload cache: %s is in use; not pruning it", part)
                except ValueError:
                    continue
            for tmp in [*self.partial_dir.glob("*.tmp"), *self.partial_dir.glob("*.link")]:
                # Temp files of crashed runs; live ones are rewritten constantly, so age tells them apart.
                try:
                    st = tmp.stat()
                    if now - st.st_mtime >= partial_max_age_hours * 3600:
                        remove_file(tmp)
                        freed += st.st_size
                except OSError:
                    continue
            for meta in self.partial_dir.glob("*.part.json"):  # metadata whose partial is gone
                if not meta.with_suffix("").exists() and now - meta.stat().st_mtime > partial_max_age_hours * 3600:
                    remove_file(meta)
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
            shas = sorted(sha for sha in _index_shas(data) if SHA256_RE.match(sha))
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
                    remove_file(link)
            results.append(VerifyResult(sha, p, "corrupt", actual, size))
        return results
