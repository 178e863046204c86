"""What a ``source`` argument names, and how to get its checkpoint: registry IDs, URLs and local paths.

``hubload.load``/``check``/``inspect`` accept one string for all of these; this module decides which it is
(refusing ambiguous names rather than guessing), pulls remote files through the verified cache, and reads a
remote safetensors header with HTTP Range requests so a compatibility check can run before any download.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

from . import config
from .cache import Cache
from .errors import CheckpointError, HubloadError, ModelNotFoundError, UsageError
from .registry import (COMMIT_HASH, SHA256_HEX, FileSpec, ModelEntry, RegistryArg, check_relative_path, infer_format,
                       load_registry)
from .safetensors_io import layout_from_metadata
from .sources import resolve_file, resolve_hf_revision

__all__ = ["Artifact", "RemoteHeader", "canonical_tensors", "fetch_artifact", "open_artifact", "reader_format",
           "remote_safetensors_header", "resolve_source", "weight_files", "with_key"]

log = logging.getLogger("hubload")

_HF_URL = re.compile(r"^hf://(?P<org>[A-Za-z0-9][\w.-]*)/(?P<name>[A-Za-z0-9][\w.-]*?)(?:@(?P<rev>[\w./-]+?))?"
                     r"/(?P<file>.+)$")
_HF_REPO_URL = re.compile(r"^hf://(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*?)(?:@(?P<rev>[\w.-]+))?/?$")
# Files of an entry that are not checkpoint data (config.json, tokenizer files): pinned, never opened by a reader.
_AUX_SUFFIXES = (".json", ".txt", ".md", ".model", ".tiktoken", ".py", ".jinja")
# How much of a remote safetensors file to ask for first: most headers fit, so one request usually does.
_HEADER_GUESS = 64 * 1024
# Whole saved models (loaded without a model, no checkpoint reader).
_FULL_MODEL_FORMATS = ("savedmodel", "keras")


@dataclass(frozen=True)
class Artifact:
    """A checkpoint named by a ``source`` argument.

    Attributes:
        label: How messages name it (model ID, URL or path).
        entry: The registry (or ad-hoc) entry for remote sources and registry IDs, else None.
        path: The local file/folder/prefix, once known (local sources, or after ``fetch_artifact``).
        format: Checkpoint format (``safetensors``, ``torch`` ...), or None to detect from the file.
        layout: ``torch`` or ``keras``, or None to take the reader's guess.
        rename: Rename rules (registry's first, then the caller's).
        ignore: Checkpoint tensors to ignore (globs), with the registry's reason.
        head: Classification-head globs declared by the registry entry.
        key: Nested state-dict key for pickles.
    """

    label: str
    entry: ModelEntry | None = None
    path: Path | None = None
    format: str | None = None
    layout: str | None = None
    rename: tuple[Any, ...] = ()
    ignore: tuple[str, ...] = ()
    head: tuple[str, ...] = ()
    key: str | None = None


def with_key(art: Artifact, key: str | None) -> Artifact:
    """The artifact with a nested state-dict key (unchanged when ``key`` is None)."""
    return art if key is None else replace(art, key=key)


class RemoteHeader(NamedTuple):
    """A remote safetensors header read with Range requests.

    Attributes:
        tensors: Name -> TensorInfo.
        nbytes: Bytes transferred to read it.
        metadata: The header's ``__metadata__``.
    """

    tensors: dict[str, Any]
    nbytes: int
    metadata: dict[str, str]

    @property
    def layout(self) -> str:
        """The layout the file declares (``torch`` when it says nothing)."""
        return layout_from_metadata(self.metadata, "torch")


def _adhoc_id(url: str) -> str:
    """A cache-safe ID for a URL source: one readable path segment, unique per URL."""
    import hashlib

    # The cache files an entry under its ID, so it must be one safe segment (a URL has '://' and '/').
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", url.partition("://")[2]).strip("-.")[:80]
    return f"{slug or 'url'}-{hashlib.sha256(url.encode()).hexdigest()[:10]}"


def _adhoc_entry(label: str, source: str, files: tuple[FileSpec, ...], revision: str | None = None) -> ModelEntry:
    """An unregistered entry for a URL source (verified by the Hub's hash, or hashed and recorded)."""
    fmt = infer_format(files) or "safetensors"
    return ModelEntry(id=_adhoc_id(label), source=source, files=files, format=fmt, revision=revision)


def _from_entry(entry: ModelEntry) -> Artifact:
    """An Artifact for a registry entry."""
    return Artifact(label=entry.id, entry=entry, format=entry.format, layout=entry.layout,
                    rename=tuple(entry.rename), ignore=tuple(entry.ignore), head=tuple(entry.head), key=entry.key)


def weight_files(entry: ModelEntry) -> tuple[FileSpec, ...]:
    """The entry's checkpoint files (its config.json and tokenizer files left out)."""
    return tuple(f for f in entry.files if f.path.endswith(".index.json") or not f.path.endswith(_AUX_SUFFIXES))


def _resolution_path(cache: Cache, repo: str, rev: str) -> Path:
    """Where the cache records what a bare ``hf://repo@rev`` resolved to (per endpoint)."""
    import hashlib

    key = hashlib.sha256(f"{config.hf_endpoint()}\n{repo}\n{rev}".encode()).hexdigest()[:32]
    return cache.root / "resolutions" / f"{key}.json"


def _hub_repo_entry(source: str, repo: str, rev: str | None, *, cache: Cache | None, offline: bool | None,
                    token: str | bool | None) -> ModelEntry:
    """An in-memory pinned entry for a bare ``hf://org/name[@rev]``, its resolution recorded in the cache.

    A revision that is a commit is resolved once: later loads read the record and make no request. A branch
    or tag is re-resolved online (it may move); offline, the last record is used.
    """
    from .hub_repo import RepoResolution, resolve_repo

    cache = cache or Cache()
    want = rev or "main"
    record = _resolution_path(cache, repo, want)
    res = None
    if COMMIT_HASH.match(want) or config.is_offline(offline):
        try:
            res = RepoResolution.from_json(json.loads(record.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            res = None
    if res is None:
        res = resolve_repo(repo, want, token=token, offline=offline, cache=cache)
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(res.to_json(), indent=1))
        os.replace(tmp, record)
    level = logging.INFO if COMMIT_HASH.match(want) else logging.WARNING
    log.log(level, "%s has no registry entry: resolved in memory to commit %s (%s); run `hubload add %s` for a "
            "reproducible, reviewed pin", source, res.commit, res.weights.reason, f"hf://{repo}@{res.commit}")
    files = tuple(FileSpec(path=f["path"], sha256=f.get("sha256"), size=f.get("size")) for f in res.files)
    return ModelEntry(id=_adhoc_id(f"hf://{repo}@{res.commit}"), source=f"hf://{repo}", files=files,
                      format=res.format, layout=res.layout, revision=res.commit, architecture=res.architecture,
                      config=res.config, homepage=f"{res.endpoint}/{repo}")


def resolve_source(source: str | os.PathLike[str], *, registry: RegistryArg = None,
                   sha256: str | None = None, cache: Cache | None = None, offline: bool | None = None,
                   token: str | bool | None = None) -> Artifact:
    """Decide what ``source`` names.

    Args:
        source: A registry ID, ``hf://org/name[@revision]/file``, an ``https://``/``http://`` URL, a
            ``file://`` URL or a local path (file, sharded folder, TF checkpoint prefix or folder), or a whole
            Hub repo ``hf://org/name[@revision]`` (resolved like ``hubload add``, in memory).
        registry: Extra registry layer(s) for IDs.
        sha256: Expected digest for a bare URL (registry entries carry their own).
        cache, offline, token: For a whole Hub repo: where its resolution is recorded, offline mode, token.

    Returns:
        An Artifact; remote ones still need :func:`fetch_artifact`.

    Raises:
        ModelNotFoundError: Not an ID, URL or existing path (close IDs are suggested).
        UsageError: The name is both a registry ID and a local path, or ``sha256`` is not a sha256 hex digest.
    """
    if sha256 is not None and not (isinstance(sha256, str) and SHA256_HEX.match(sha256)):
        raise UsageError(f"{source!r}: sha256={sha256!r} is not a sha256 digest; pass the file's 64 lowercase hex "
                         "characters (e.g. from `sha256sum FILE`), or leave it out")
    if isinstance(source, os.PathLike):
        return Artifact(label=str(source), path=Path(source))
    if not isinstance(source, str) or not source:
        raise ModelNotFoundError(f"source must be a registry ID, URL or path, got {source!r}")
    if source.startswith("hf://") and (whole := _HF_REPO_URL.match(source)):
        entry = _hub_repo_entry(source, whole["repo"], whole["rev"], cache=cache, offline=offline, token=token)
        return replace(_from_entry(entry), label=source)
    if source.startswith("hf://"):
        m = _HF_URL.match(source)
        if not m:
            raise ModelNotFoundError(f"{source!r} is not hf://org/name[@revision]/file (e.g. "
                                     "hf://sentence-transformers/all-MiniLM-L6-v2/model.safetensors)")
        repo, rev, file = f"{m['org']}/{m['name']}", m["rev"], m["file"]
        try:
            check_relative_path(file)
        except ValueError as exc:
            raise ModelNotFoundError(f"{source!r}: bad file path: {exc}") from None
        spec = FileSpec(path=file, sha256=sha256)
        # A bare URL declares no layout: the file's metadata or the reader decides (layout= overrides).
        return replace(_from_entry(_adhoc_entry(source, f"hf://{repo}", (spec,), revision=rev or "main")),
                       label=source, layout=None)
    if source.startswith(("https://", "http://")):
        base, _, name = source.rpartition("/")
        if not name:
            raise ModelNotFoundError(f"{source!r} names a folder; give the URL of a checkpoint file")
        from urllib.parse import unquote

        spec = FileSpec(path=unquote(name.split("?")[0]), sha256=sha256)
        return replace(_from_entry(_adhoc_entry(source, base + "/", (spec,))), label=source, layout=None)
    if source.startswith("file://"):
        from urllib.parse import unquote, urlsplit

        return Artifact(label=source, path=Path(unquote(urlsplit(source).path)))
    if "://" in source:
        raise ModelNotFoundError(f"{source!r}: unsupported scheme; use a registry ID, hf://, https://, http://, "
                                 "file:// or a local path")

    local = Path(source).expanduser()
    looks_like_path = source.startswith((".", "/", "~")) or os.sep in source or local.suffix != ""
    exists = _exists_locally(local)
    if exists and source.startswith(("/", "./", "../", "~")):  # explicitly a path: never an ID, skip the registry
        return Artifact(label=source, path=local)
    reg = load_registry(registry)
    if source in reg:
        if exists and not source.startswith((".", "/", "~")):
            raise UsageError(f"{source!r} is both a registry ID and a local path; say which: "
                             f"'./{source}' for the path, or remove/rename the file")
        return _from_entry(reg.get(source))
    if exists:
        return Artifact(label=source, path=local)
    if looks_like_path:
        raise ModelNotFoundError(f"{source!r}: no such file or folder (and not a registry ID)")
    reg.get(source)  # raises ModelNotFoundError with suggestions
    raise AssertionError("unreachable")  # pragma: no cover


def _exists_locally(path: Path) -> bool:
    """A local file/folder, or a TF checkpoint prefix (``<path>.index`` exists)."""
    return path.exists() or Path(str(path) + ".index").exists()


def _local_checkpoint(entry: ModelEntry, files: dict[str, Path]) -> Path:
    """The path a reader should open for an entry's local files."""
    weights = {f.path for f in weight_files(entry)}
    if weights and len(weights) < len(files):  # config.json etc. are pinned beside the weights, never read
        files = {name: p for name, p in files.items() if name in weights}
    if len(files) == 1:
        return next(iter(files.values()))
    index = [p for name, p in files.items() if name.endswith(".index.json")]
    if index:
        return index[0]
    if entry.format == "tf-checkpoint":
        idx = [p for name, p in files.items() if name.endswith(".index")]
        if idx:
            return idx[0].with_suffix("")
    # several files in one snapshot folder: the reader opens the folder (sharded safetensors)
    return next(iter(files.values())).parent


def _expand_sharded(entry: ModelEntry, index_path: Path) -> ModelEntry:
    """An ad-hoc entry that also lists the shards named by a pulled ``*.index.json``."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{entry.id}: {index_path.name} is not a safetensors index: {exc}") from None
    folder = entry.files[0].path.rpartition("/")[0]
    shards = sorted(set(weight_map.values()))
    extra = tuple(FileSpec(path=f"{folder}/{s}" if folder else s) for s in shards)
    for f in extra:
        try:
            check_relative_path(f.path)
        except ValueError as exc:
            raise CheckpointError(f"{entry.id}: {index_path.name} names a shard outside its folder ({exc}); "
                                  "refusing to fetch it: the index is corrupt or hostile") from None
    return replace(entry, files=entry.files + extra)


def reader_format(art: Artifact) -> str | None:
    """The format a checkpoint reader should be forced to (None = detect; whole-model formats have no reader)."""
    return art.format if art.format not in _FULL_MODEL_FORMATS else None


def open_artifact(art: Artifact) -> Any:
    """Open a fetched artifact's checkpoint lazily (see :func:`hubload.readers.open_checkpoint`)."""
    from .readers import open_checkpoint

    return open_checkpoint(art.path, format=reader_format(art), key=art.key)


def canonical_tensors(reader: Any, art: Artifact, layout: str | None = None,
                      rename: Sequence[Any] = ()) -> dict[str, Any]:
    """An open checkpoint's tensors in the canonical layout.

    Args:
        reader: The artifact's open checkpoint reader.
        art: The artifact (its layout and rename rules).
        layout: The caller's layout override; else the artifact's, else the reader's (which honours a layout the
            file declares, as ``hubload convert`` writes it).
        rename: The caller's rename rules, applied after the artifact's.
    """
    from .layout import to_canonical

    return to_canonical(reader.tensors(), layout or art.layout or reader.layout,
                        rename=tuple(art.rename) + tuple(rename), layer_kinds=getattr(reader, "layer_kinds", None))


def fetch_artifact(art: Artifact, *, cache: Cache | None = None, offline: bool | None = None,
                   token: str | bool | None = None, progress: bool | None = None) -> Artifact:
    """Pull a remote/registry artifact through the verified cache; local ones are returned as they are.

    Returns:
        The Artifact with ``path`` set to what a checkpoint reader should open.
    """
    if art.entry is None:
        if art.path is None or not _exists_locally(art.path):
            raise ModelNotFoundError(f"{art.label}: no such file or folder")
        return art
    from .fetch import pull_entry

    cache = cache or Cache()
    entry = art.entry
    files = pull_entry(entry, cache=cache, offline=offline, token=token, progress=progress)
    if entry.registry_file is None and len(entry.files) == 1 and entry.files[0].path.endswith(".index.json"):
        entry = _expand_sharded(entry, files[entry.files[0].path])
        files = pull_entry(entry, cache=cache, offline=offline, token=token, progress=progress)
    path = _local_checkpoint(entry, files)
    if entry.format == "savedmodel" and len(entry.files) == 1:
        from .archive import extract_to_cache, is_archive, savedmodel_root

        if is_archive(entry.files[0].path):  # a SavedModel folder shipped as .tar/.zip: unpack it safely, once
            sha = os.path.basename(os.path.realpath(path))  # blobs are named by their verified sha256
            path = savedmodel_root(extract_to_cache(path, sha, cache=cache))
    return replace(art, entry=entry, path=path)


def remote_safetensors_header(art: Artifact, *, cache: Cache | None = None, offline: bool | None = None,
                              token: str | bool | None = None) -> RemoteHeader | None:
    """Read the tensor table of an uncached, remote, single-file safetensors artifact with Range requests.

    Returns:
        The :class:`RemoteHeader`, or None when a pre-check does not apply (cached already, local, not
        safetensors, several files, offline).
    """
    entry = art.entry
    if entry is None or entry.scheme == "file" or entry.format != "safetensors" or len(weight_files(entry)) != 1:
        return None
    spec = weight_files(entry)[0]
    if not spec.path.endswith(".safetensors") or config.is_offline(offline):
        return None
    from .fetch import cached_files

    if cached_files(entry, cache=cache or Cache()) is not None:
        return None
    from . import httpio
    from .safetensors_io import parse_safetensors_header, safetensors_header_length

    tok = config.hf_token(token) if entry.scheme == "hf" else None
    commit = resolve_hf_revision(entry, token=tok) if entry.scheme == "hf" else None
    rf = resolve_file(entry, spec, token=tok, commit=commit)
    if rf.url is None:
        return None
    kw = dict(headers=rf.headers, auth_host=rf.auth_host, model_id=entry.id, file=spec.path)
    first = httpio.fetch_range(rf.url, 0, _HEADER_GUESS, **kw)
    if len(first) < 8:
        raise CheckpointError(f"{entry.id}: {spec.path} at {rf.url} is shorter than a safetensors header")
    n = safetensors_header_length(first[:8], file_size=rf.size, source=rf.url)
    if 8 + n > len(first):
        first += httpio.fetch_range(rf.url, len(first), 8 + n, **kw)
    header = parse_safetensors_header(first[:8], first[8:8 + n], file_size=rf.size, source=rf.url)
    return RemoteHeader(header.tensors, len(first), dict(header.metadata))

