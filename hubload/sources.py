"""Sources: turn a registry file into something the transfer engine can fetch.

``hf://`` uses huggingface_hub for what it does well (endpoint, token, revision → commit, file URL and
metadata, typed errors); ``https://``/``http://`` are plain URLs; ``file://`` and relative sources are local
files. A pinned hf:// file (commit + sha256) resolves without any request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

from . import config
from .errors import DownloadError, ModelNotFoundError, OfflineError
from .registry import _HEX40, _HEX64, FileSpec, ModelEntry

if TYPE_CHECKING:
    from huggingface_hub import HfFileMetadata

__all__ = ["ResolvedFile", "hf_file_url", "hf_request_headers", "resolve_file", "resolve_hf_revision"]

log = logging.getLogger("hubload")

_USER_AGENT = "hubload/0.1"


@dataclass(frozen=True)
class ResolvedFile:
    """Where one file's bytes come from and what they must hash to.

    Attributes:
        spec: The registry's FileSpec.
        url: HTTP(S) URL, or None for local files.
        local_path: The local file of a file source, else None.
        sha256: The expected full digest (registry, else the Hub's LFS sha256), or None.
        size: The expected size, or None.
        revision: The commit the file was resolved at (hf://), else None.
        headers: Request headers (the Authorization header only for the hub).
        auth_host: The only host that may receive ``headers['Authorization']``.
    """

    spec: FileSpec
    url: str | None
    local_path: Path | None
    sha256: str | None
    size: int | None
    revision: str | None
    headers: dict[str, str]
    auth_host: str | None

    def __repr__(self) -> str:  # never show the token
        return f"ResolvedFile(path={self.spec.path!r}, url={self.url!r}, sha256={self.sha256!r}, revision={self.revision!r})"


def hf_file_url(repo_id: str, revision: str, path: str, endpoint: str | None = None) -> str:
    """The Hub's resolve URL of one file (same shape as ``huggingface_hub.hf_hub_url``)."""
    ep = (endpoint or config.hf_endpoint()).rstrip("/")
    return f"{ep}/{repo_id}/resolve/{quote(revision, safe='')}/{quote(path)}"


def _hf_headers(token: str | None) -> tuple[dict[str, str], str | None]:
    """Headers for Hub requests and the host allowed to see the token."""
    host = urlsplit(config.hf_endpoint()).netloc.rpartition("@")[2].lower()  # host[:port], never credentials
    headers = {"user-agent": _USER_AGENT}
    if token:
        headers["authorization"] = f"Bearer {token}"
    return headers, host


def hf_request_headers(token: str | None) -> tuple[dict[str, str], str | None]:
    """Headers for Hub requests and the only host allowed to receive the token in them."""
    return _hf_headers(token)


def _map_hf_error(exc: BaseException, entry: ModelEntry, path: str | None, url: str) -> Exception:
    """Translate huggingface_hub's typed errors into hubload's tree."""
    from huggingface_hub import errors as hf_errors

    name = type(exc).__name__
    gated = getattr(hf_errors, "GatedRepoError", ())
    disabled = getattr(hf_errors, "DisabledRepoError", ())
    what = f"model {entry.id!r}" + (f" file {path!r}" if path else "")
    if gated and isinstance(exc, gated):
        return DownloadError(f"{what}: the repository {entry.repo_id} is gated; accept its terms on the Hub, "
                             f"then set HF_TOKEN (or run `hf auth login`) — {url}", url=url, model_id=entry.id)
    if isinstance(exc, getattr(hf_errors, "RepositoryNotFoundError", ())):
        return ModelNotFoundError(f"{what}: repository {entry.repo_id!r} not found at {config.hf_endpoint()} "
                                  "(or it is private: set HF_TOKEN) — check the registry's source", model_id=entry.id)
    if isinstance(exc, getattr(hf_errors, "RevisionNotFoundError", ())):
        return ModelNotFoundError(f"{what}: revision {entry.revision!r} not found in {entry.repo_id} — check the "
                                  "registry's revision", model_id=entry.id)
    if isinstance(exc, getattr(hf_errors, "EntryNotFoundError", ())):
        return ModelNotFoundError(f"{what}: no such file in {entry.repo_id}@{entry.revision} — check the registry's "
                                  f"files ({url})", model_id=entry.id)
    if disabled and isinstance(exc, disabled):
        return DownloadError(f"{what}: repository {entry.repo_id} is disabled on the Hub ({url})", url=url,
                             model_id=entry.id)
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status is not None:
        return DownloadError(f"{what}: the Hub answered HTTP {status} for {url}; retry later or check HF_ENDPOINT",
                             url=url, model_id=entry.id)
    if "Offline" in name:
        return OfflineError(f"{what} is not cached and offline mode is on (HUBLOAD_OFFLINE/HF_HUB_OFFLINE); "
                            "unset it to download", url=url, model_id=entry.id)
    return OfflineError(f"{what}: cannot reach {config.hf_endpoint()} ({name}: {exc}); check the network or "
                        "HF_ENDPOINT, or pin the entry (commit + sha256) and pull it once while online",
                        url=url, model_id=entry.id)


def _hf_metadata(entry: ModelEntry, path: str, url: str, token: str | None) -> HfFileMetadata:
    """The Hub's metadata of ``url`` (a HEAD request); huggingface_hub's errors become hubload's."""
    from huggingface_hub import get_hf_file_metadata

    try:
        return get_hf_file_metadata(url, token=token or False, endpoint=config.hf_endpoint(), timeout=10)
    except Exception as exc:  # huggingface_hub raises typed HTTP errors and transport errors
        raise _map_hf_error(exc, entry, path, url) from None


def resolve_hf_revision(entry: ModelEntry, *, token: str | None = None) -> str:
    """The commit an hf:// entry's revision points to (a 40-hex revision is returned as is)."""
    rev = entry.revision or "main"
    if _HEX40.match(rev):
        return rev
    url = hf_file_url(entry.repo_id, rev, entry.files[0].path)
    meta = _hf_metadata(entry, entry.files[0].path, url, token)
    if not meta.commit_hash:
        raise DownloadError(f"model {entry.id!r}: the Hub gave no commit for revision {rev!r} ({url})", url=url,
                            model_id=entry.id)
    return meta.commit_hash


def resolve_file(entry: ModelEntry, spec: FileSpec, *, token: str | None = None, commit: str | None = None,
                 offline: bool = False) -> ResolvedFile:
    """Resolve one file of ``entry``.

    Args:
        entry: The registry entry.
        spec: One of ``entry.files``.
        token: Hub token for hf:// sources (sent to the hub's host only).
        commit: An already-resolved commit for hf:// entries (saves a request per file).
        offline: Never touch the network; unresolvable files raise OfflineError.

    Returns:
        A ResolvedFile.
    """
    if entry.scheme == "file":
        base = entry.local_dir()
        local = base / spec.path
        return ResolvedFile(spec, None, local, spec.sha256, spec.size, None, {}, None)
    if entry.scheme in ("http", "https"):
        return ResolvedFile(spec, entry.file_url(spec.path), None, spec.sha256, spec.size, None,
                            {"user-agent": _USER_AGENT}, None)

    headers, host = _hf_headers(token)
    rev = commit or entry.revision or "main"
    url = hf_file_url(entry.repo_id, rev, spec.path)
    if _HEX40.match(rev) and spec.sha256:
        return ResolvedFile(spec, url, None, spec.sha256, spec.size, rev, headers, host)
    if offline:
        raise OfflineError(f"model {entry.id!r} file {spec.path!r} is not pinned (commit + sha256) and cannot be "
                           "resolved offline; unset HUBLOAD_OFFLINE/HF_HUB_OFFLINE or pin the entry", url=url,
                           model_id=entry.id)
    meta = _hf_metadata(entry, spec.path, url, token)
    commit_hash = meta.commit_hash or (rev if _HEX40.match(rev) else None)
    etag = (meta.etag or "").strip('"').removeprefix("W/").strip('"')
    sha = spec.sha256 or (etag if _HEX64.match(etag) else None)
    if sha is None:
        log.warning("model %r file %r has no sha256 in the registry and is not an LFS file on the Hub; "
                    "it is verified by size and TLS only", entry.id, spec.path)
    if spec.sha256 and _HEX64.match(etag) and etag != spec.sha256:
        log.warning("model %r file %r: the Hub's LFS sha256 %s differs from the registry's %s; the registry wins",
                    entry.id, spec.path, etag, spec.sha256)
    size = spec.size if spec.size is not None else meta.size
    url = hf_file_url(entry.repo_id, commit_hash or rev, spec.path)
    return ResolvedFile(spec, url, None, sha, size, commit_hash, headers, host)
