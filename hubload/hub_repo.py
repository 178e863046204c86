"""A Hub repository → a complete, pinned registry entry, from the Hub's own metadata.

    resolve REV → commit ─► list files (size + LFS sha256) ─► choose the weights (and say why)
        ─► small non-LFS files (config.json, a shard index) downloaded at the commit and hashed here
        ─► format, layout (safetensors header, Range request), architecture (config.json family)

Used by ``hubload add`` (written to a registry), ``hubload lock`` (re-pinning entries) and bare
``hf://org/name[@rev]`` sources (resolved in memory, the resolution recorded in the cache).
Metadata comes from huggingface_hub's ``HfApi.model_info(files_metadata=True)`` against ``HF_ENDPOINT``.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from . import config
from .errors import (AccessDeniedError, CheckpointError, DownloadError, HubloadError, ModelNotFoundError,
                     NoWeightsError, OfflineError, UsageError)

__all__ = ["RepoFetcher", "RepoFile", "RepoResolution", "RepoSnapshot", "WeightChoice", "choose_weights", "repo_snapshot",
           "resolve_repo"]

log = logging.getLogger("hubload")

# Files hashed locally are fetched whole; anything bigger than this without an LFS sha256 is refused.
_SMALL_FILE_LIMIT = 16 * 1024 * 1024
# Keys of config.json that describe the checkpoint's provenance, not the architecture.
_CONFIG_DROP = ("_name_or_path", "transformers_version", "_commit_hash", "torch_dtype", "dtype")
_HEADER_GUESS = 64 * 1024


@dataclass(frozen=True)
class RepoFile:
    """One file of a repo at a commit, as the Hub lists it.

    Attributes:
        path: Path in the repo.
        size: Size in bytes (of the content, for LFS files).
        sha256: The LFS sha256 (None for a plain git file: its content must be hashed locally).
    """

    path: str
    size: int | None
    sha256: str | None


@dataclass(frozen=True)
class RepoSnapshot:
    """A repo's file list at one commit."""

    repo_id: str
    revision: str
    commit: str
    files: tuple[RepoFile, ...]
    gated: bool = False
    private: bool = False

    def file(self, path: str) -> RepoFile | None:
        """The file at ``path``, or None."""
        return next((f for f in self.files if f.path == path), None)


@dataclass(frozen=True)
class WeightChoice:
    """Which weight files were chosen, in which format, and why.

    Attributes:
        paths: The weight files (an index first, then its shards).
        format: ``safetensors``, ``torch`` or ``keras-weights``.
        reason: One sentence: what was chosen over what.
    """

    paths: tuple[str, ...]
    format: str
    reason: str


@dataclass(frozen=True)
class RepoResolution:
    """Everything a pinned registry entry needs, resolved from the Hub.

    Attributes:
        repo_id, revision, commit: The repo, the revision asked for, the commit it resolved to.
        files: ``[{path, sha256, size}]``, weights first, then config.json and included files.
        format, layout: The checkpoint format and tensor layout.
        weights: The :class:`WeightChoice`.
        architecture: ``{torch: ..., tf: ...}`` from config.json's family (may be empty).
        config: config.json without provenance keys (empty when the repo has none).
        endpoint: The Hub endpoint used.
        resolved_at: UTC timestamp (ISO 8601).
        notes: Things the user should know (no architecture known, files without LFS hash ...).
    """

    repo_id: str
    revision: str
    commit: str
    files: tuple[dict[str, Any], ...]
    format: str
    layout: str
    weights: WeightChoice
    architecture: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    endpoint: str = ""
    resolved_at: str = ""
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """A JSON-friendly dict (the cache's record of a bare ``hf://`` resolution uses it too)."""
        return {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit,
                "files": [dict(f) for f in self.files], "format": self.format, "layout": self.layout,
                "weights": {"paths": list(self.weights.paths), "format": self.weights.format,
                            "reason": self.weights.reason},
                "architecture": dict(self.architecture), "config": self.config, "endpoint": self.endpoint,
                "resolved_at": self.resolved_at, "notes": list(self.notes)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RepoResolution:
        """Inverse of :meth:`to_json`."""
        w = data["weights"]
        return cls(repo_id=data["repo_id"], revision=data["revision"], commit=data["commit"],
                   files=tuple(dict(f) for f in data["files"]), format=data["format"], layout=data["layout"],
                   weights=WeightChoice(tuple(w["paths"]), w["format"], w["reason"]),
                   architecture=dict(data.get("architecture") or {}), config=dict(data.get("config") or {}),
                   endpoint=data.get("endpoint", ""), resolved_at=data.get("resolved_at", ""),
                   notes=tuple(data.get("notes") or ()))


# ------------------------------------------------------------------------------------------ metadata


def _map_hub_error(exc: BaseException, repo_id: str, revision: str, token: str | None) -> HubloadError:
    """huggingface_hub's typed errors → hubload's, one line each; the token is never shown."""
    from huggingface_hub import errors as hf_errors

    where = f"{config.hf_endpoint()}"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, getattr(hf_errors, "GatedRepoError", ())):
        has = "the token given has no access" if token else "no token was given"
        return AccessDeniedError(f"hf://{repo_id} is a gated repository and {has}; accept its terms on the Hub, "
                                 "then set HF_TOKEN (or run `hf auth login`)", url=where, model_id=repo_id)
    if isinstance(exc, getattr(hf_errors, "RevisionNotFoundError", ())):
        return ModelNotFoundError(f"hf://{repo_id}: revision {revision!r} not found (no such branch, tag or "
                                  f"commit at {where})", model_id=repo_id)
    if isinstance(exc, getattr(hf_errors, "RepositoryNotFoundError", ())):
        if token:
            return ModelNotFoundError(f"hf://{repo_id}: no such repository at {where}, or the token given has "
                                      "no access to it", model_id=repo_id)
        return ModelNotFoundError(f"hf://{repo_id}: no such repository at {where} (if it is private, set "
                                  "HF_TOKEN or run `hf auth login`)", model_id=repo_id)
    if status in (401, 403):
        return AccessDeniedError(f"hf://{repo_id}: the Hub refused access (HTTP {status}); set HF_TOKEN to a "
                                 "token with access", url=where, model_id=repo_id)
    if status is not None:
        return DownloadError(f"hf://{repo_id}: the Hub answered HTTP {status} at {where}; retry later",
                             url=where, model_id=repo_id)
    return OfflineError(f"hf://{repo_id}: cannot reach {where} ({type(exc).__name__}); check the network or "
                        "HF_ENDPOINT", url=where, model_id=repo_id)


def repo_snapshot(repo_id: str, revision: str = "main", *, token: str | bool | None = None,
                  offline: bool | None = None) -> RepoSnapshot:
    """A repo's files (size + LFS sha256) at ``revision``, through ``HfApi.model_info(files_metadata=True)``.

    Args:
        repo_id: ``org/name``.
        revision: Branch, tag or commit.
        token: Hub token (default ``HF_TOKEN`` / the saved login; False: none).
        offline: Refuse the network (default ``HUBLOAD_OFFLINE``/``HF_HUB_OFFLINE``).

    Raises:
        ModelNotFoundError: Unknown repo or revision.
        AccessDeniedError: Gated or private without a token that has access.
        OfflineError, DownloadError: Offline mode, unreachable Hub, other HTTP errors.
    """
    if config.is_offline(offline):
        raise OfflineError(f"hf://{repo_id}@{revision}: resolving a Hub revision needs the network and offline "
                           "mode is on (HUBLOAD_OFFLINE/HF_HUB_OFFLINE)", model_id=repo_id)
    from huggingface_hub import HfApi

    tok = config.hf_token(token)
    api = HfApi(endpoint=config.hf_endpoint(), token=tok or False)
    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=True, timeout=30)
    except Exception as exc:  # huggingface_hub raises typed HTTP and transport errors
        raise _map_hub_error(exc, repo_id, revision, tok) from None
    if not info.sha or not re.fullmatch(r"[0-9a-f]{40}", info.sha):
        raise DownloadError(f"hf://{repo_id}@{revision}: the Hub gave no commit for this revision",
                            model_id=repo_id)
    files = []
    for s in info.siblings or ():
        lfs = getattr(s, "lfs", None)
        sha = getattr(lfs, "sha256", None) if lfs is not None else None
        size = getattr(lfs, "size", None) if lfs is not None else None
        files.append(RepoFile(s.rfilename, size if size is not None else s.size, sha))
    return RepoSnapshot(repo_id, revision, info.sha, tuple(files), gated=bool(info.gated),
                        private=bool(info.private))


# ------------------------------------------------------------------------------------------- choice


def _complete_index(snap: RepoSnapshot, index: str, weight_map: dict[str, str]) -> tuple[str, ...]:
    """The shard paths an index names, all present in the repo (else NoWeightsError)."""
    folder = index.rpartition("/")[0]
    shards = sorted(set(weight_map.values()))
    paths = tuple(f"{folder}/{s}" if folder else s for s in shards)
    missing = [p for p in paths if snap.file(p) is None]
    if missing:
        raise NoWeightsError(f"hf://{snap.repo_id}@{snap.commit}: {index} names shard(s) missing from the repo: "
                             f"{', '.join(missing[:3])}", model_id=snap.repo_id)
    return paths


def choose_weights(snap: RepoSnapshot, read_index: Any = None) -> WeightChoice:
    """Pick the weight files of a repo, preferring safetensors (no pickle) over torch pickles over Keras h5.

    Order: ``model.safetensors``; ``model.safetensors.index.json`` with all its shards; ``pytorch_model.bin``
    (read with ``weights_only``); its sharded index; ``tf_model.h5``.

    Args:
        snap: The repo snapshot.
        read_index: ``callable(path) -> dict`` returning a shard index's JSON (needed only for sharded repos).

    Raises:
        NoWeightsError: None of these exist (the message lists what the repo holds).
    """
    have = {f.path for f in snap.files}
    others = [p for p in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack") if p in have]
    also = f" (preferred over {', '.join(others)}: no pickle, lazy, mmap)" if others else ""
    if "model.safetensors" in have:
        return WeightChoice(("model.safetensors",), "safetensors", f"model.safetensors{also}")
    for index, fmt, what in (("model.safetensors.index.json", "safetensors", "sharded safetensors"),
                             ("pytorch_model.bin", "torch", None),
                             ("pytorch_model.bin.index.json", "torch", "sharded torch pickle")):
        if index not in have:
            continue
        if what is None:
            reason = "pytorch_model.bin (no safetensors in the repo; read with torch.load(weights_only=True))"
            return WeightChoice((index,), fmt, reason)
        if read_index is None:
            raise UsageError(f"{index}: choosing the weights of a sharded repo needs read_index= to read the index")
        shards = _complete_index(snap, index, dict(read_index(index).get("weight_map") or {}))
        return WeightChoice((index, *shards), fmt, f"{index} with all {len(shards)} shards ({what})")
    if "tf_model.h5" in have:
        return WeightChoice(("tf_model.h5",), "keras-weights",
                            "tf_model.h5 (no safetensors or torch weights in the repo; Keras layout)")
    listing = ", ".join(sorted(have)[:8]) or "nothing"
    raise NoWeightsError(f"hf://{snap.repo_id}@{snap.commit}: no weight file hubload can load (model.safetensors, "
                         f"a sharded index, pytorch_model.bin or tf_model.h5); the repo holds: {listing}",
                         model_id=snap.repo_id)


# ---------------------------------------------------------------------------------------- resolution


class RepoFetcher:
    """Small Hub reads at one commit: whole small files and safetensors header ranges."""

    def __init__(self, snap: RepoSnapshot, token: str | None, cache: Any) -> None:
        from .sources import hf_file_url, hf_request_headers

        self.snap = snap
        self.headers, self.host = hf_request_headers(token)
        self.url = lambda path: hf_file_url(snap.repo_id, snap.commit, path)
        self.cache = cache
        self.bodies: dict[str, bytes] = {}

    def whole(self, path: str) -> bytes:
        """A small file's bytes, published into the verified cache by their sha256."""
        if path in self.bodies:
            return self.bodies[path]
        from . import httpio

        f = self.snap.file(path)
        size = f.size if f is not None and f.size is not None else _SMALL_FILE_LIMIT
        if size > _SMALL_FILE_LIMIT:
            raise NoWeightsError(f"hf://{self.snap.repo_id}: {path} is {size} bytes and not an LFS file; hubload "
                                 "hashes only small plain files locally", model_id=self.snap.repo_id)
        body = httpio.fetch_range(self.url(path), 0, size + 1, headers=self.headers, auth_host=self.host,
                                  model_id=self.snap.repo_id, file=path) if size else b""
        if f is not None and f.size is not None and len(body) != f.size:
            raise DownloadError(f"hf://{self.snap.repo_id}@{self.snap.commit}: {path} is {len(body)} bytes, the Hub "
                                f"listed {f.size}", url=self.url(path), model_id=self.snap.repo_id)
        self.bodies[path] = body
        if self.cache is not None:
            sha = hashlib.sha256(body).hexdigest()
            if not self.cache.has_blob(sha, len(body)):
                tmp = self.cache.tmp_path(sha)
                tmp.write_bytes(body)
                self.cache.publish(tmp, sha)
        return body

    def json(self, path: str) -> dict[str, Any]:
        """A small JSON file of the repo."""
        try:
            data = json.loads(self.whole(path))
        except ValueError as exc:
            raise CheckpointError(f"hf://{self.snap.repo_id}@{self.snap.commit}: {path} is not valid JSON ({exc}); "
                                  "the repo is broken at this commit: pin another revision (@REV)") \
                from None
        if not isinstance(data, dict):
            raise CheckpointError(f"hf://{self.snap.repo_id}@{self.snap.commit}: {path} is not a JSON object; "
                                  "the repo is broken at this commit: pin another revision (@REV)")
        return data

    def safetensors_layout(self, path: str) -> str:
        """The layout a remote safetensors file declares (``torch`` if none), from its header (Range)."""
        from . import httpio
        from .safetensors_io import layout_from_metadata, parse_safetensors_header, safetensors_header_length

        f = self.snap.file(path)
        size = f.size if f is not None else None
        kw = dict(headers=self.headers, auth_host=self.host, model_id=self.snap.repo_id, file=path)
        first = httpio.fetch_range(self.url(path), 0, _HEADER_GUESS, **kw)
        n = safetensors_header_length(first[:8], file_size=size, source=self.url(path))
        if 8 + n > len(first):
            first += httpio.fetch_range(self.url(path), len(first), 8 + n, **kw)
        header = parse_safetensors_header(first[:8], first[8:8 + n], file_size=size, source=self.url(path))
        return layout_from_metadata(dict(header.metadata), "torch")


def resolve_repo(repo_id: str, revision: str | None = None, *, include: Sequence[str] = (),
                 token: str | bool | None = None, offline: bool | None = None, cache: Any = None) -> RepoResolution:
    """Resolve a Hub repo to everything a pinned registry entry needs.

    Args:
        repo_id: ``org/name``.
        revision: Branch, tag or commit (default ``main``).
        include: Globs of further repo files to pin (tokenizer files ...), beside the weights and config.json.
        token: Hub token (default ``HF_TOKEN`` / saved login; never logged).
        offline: Refuse the network.
        cache: A :class:`~hubload.cache.Cache` that small downloaded files are published into (optional).

    Returns:
        The :class:`RepoResolution`.

    Raises:
        ModelNotFoundError: Unknown repo or revision. NoWeightsError: no loadable weights.
        AccessDeniedError: Gated/private without access. OfflineError/DownloadError: network trouble.
    """
    rev = revision or "main"
    tok = config.hf_token(token)
    snap = repo_snapshot(repo_id, rev, token=tok or False, offline=offline)
    try:
        return _resolve(snap, include, tok, cache)
    except DownloadError as exc:
        # A gated repo's metadata is public, its files are not: httpio's 401/403 becomes a typed refusal.
        if snap.gated and re.search(r"HTTP 40[13]\b", str(exc)) and not isinstance(exc, AccessDeniedError):
            has = "the token given has no access" if tok else "no token was given"
            raise AccessDeniedError(f"hf://{repo_id} is a gated repository and {has}; accept its terms on the "
                                    "Hub, then set HF_TOKEN (or run `hf auth login`)", url=config.hf_endpoint(),
                                    model_id=repo_id) from None
        raise


def _resolve(snap: RepoSnapshot, include: Sequence[str], tok: str | None, cache: Any) -> RepoResolution:
    """:func:`resolve_repo` once the snapshot is known."""
    repo_id, rev = snap.repo_id, snap.revision
    fetch = RepoFetcher(snap, tok, cache)
    choice = choose_weights(snap, read_index=fetch.json)
    wanted = list(choice.paths)
    if snap.file("config.json") is not None:
        wanted.append("config.json")
    for pattern in include:
        matched = [f.path for f in snap.files if fnmatch.fnmatchcase(f.path, pattern)]
        if not matched:
            raise ModelNotFoundError(f"hf://{repo_id}@{snap.commit}: --include {pattern!r} matches no file",
                                     model_id=repo_id)
        wanted.extend(p for p in matched if p not in wanted)
    notes: list[str] = []
    files = []
    for path in wanted:
        f = snap.file(path)
        assert f is not None  # every wanted path comes from the listing
        if f.sha256:
            files.append({"path": path, "sha256": f.sha256, "size": f.size})
        else:  # a plain git file: the Hub publishes no sha256, so hash its bytes here
            body = fetch.whole(path)
            files.append({"path": path, "sha256": hashlib.sha256(body).hexdigest(), "size": len(body)})
    cfg: dict[str, Any] = {}
    arch: dict[str, str] = {}
    if "config.json" in wanted:
        raw = fetch.json("config.json")
        cfg = {k: v for k, v in raw.items() if k not in _CONFIG_DROP}
        from .families import architecture_for

        arch = architecture_for(cfg)
        if not arch:
            notes.append(f"no architecture known for model_type {cfg.get('model_type')!r}; load it with model=")
    else:
        notes.append("the repo has no config.json, so no architecture is recorded; load it with model=")
    if choice.format == "safetensors":
        first = next(p for p in choice.paths if p.endswith(".safetensors"))
        layout = fetch.safetensors_layout(first)
    else:
        layout = "keras" if choice.format == "keras-weights" else "torch"
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    log.info("hf://%s@%s resolved to commit %s: %s", repo_id, rev, snap.commit, choice.reason)
    return RepoResolution(repo_id=repo_id, revision=rev, commit=snap.commit, files=tuple(files),
                          format=choice.format, layout=layout, weights=choice, architecture=arch, config=cfg,
                          endpoint=config.hf_endpoint(), resolved_at=now, notes=tuple(notes))
