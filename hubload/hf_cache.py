"""Reuse of files the user already has in their Hugging Face hub cache, verified before they are adopted.

A shortcut, never a requirement: a file found there is hashed once and hard-linked (or copied) into
``blobs/`` only if it matches the registry's sha256; any failure falls back to a normal download.
:class:`HFCacheReuse` is mixed into :class:`hubload.cache.Cache` and relies on its ``has_blob``,
``blob_path``, ``tmp_path`` and ``publish_verified`` (the one verify-then-publish path). huggingface_hub is imported only when the HF
cache has a folder for the repo.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path

from hubload.cache_fs import check_sha256, hash_into, remove_file
from hubload.errors import CacheError, HashMismatchError

__all__ = ["HFCacheReuse", "hf_hub_cache_dir"]

logger = logging.getLogger("hubload")


class HFCacheReuse:
    """``reuse_from_hf_cache`` of :class:`~hubload.cache.Cache` (a mixin; see the module doc)."""

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
        check_sha256(sha256)
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
        tmp = self.tmp_path(f"hf-{sha256}")
        linked = False
        try:
            h = hashlib.sha256()
            try:
                os.link(src, tmp)
                linked = True
                with open(tmp, "rb", buffering=0) as f:
                    n = hash_into(f, h)
            except OSError:  # cross-device or no hard links: copy, hashing as we go
                with open(src, "rb", buffering=0) as fi, open(tmp, "wb") as fo:
                    n = hash_into(fi, h, out=fo)
            # A hard link shares the inode with HF's file: leave its mode alone.
            return self.publish_verified(tmp, h.hexdigest(), n, sha256=sha256, expected_size=size,
                                         where=f"{repo_id}: {filename} (Hugging Face cache: {src})",
                                         read_only=not linked)
        except HashMismatchError as exc:
            logger.info("hubload: %s; downloading instead", exc)
            return None
        except OSError as exc:
            with contextlib.suppress(OSError):
                remove_file(tmp)
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
