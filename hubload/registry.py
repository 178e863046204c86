"""The model registry: ``registry.yaml`` files mapping model IDs to pinned, hashed weight artifacts.

Schema (version 1)::

    version: 1
    models:
      all-minilm-l6-v2:
        source: hf://sentence-transformers/all-MiniLM-L6-v2   # hf://, https://, http://, file:///dir, or relative dir
        revision: 1110a243fdf4706b3f48f1d95db1a4f5529b4d41    # hf:// only; 40 hex = pinned commit
        files:
          - {path: model.safetensors, sha256: 53aa...d9db, size: 90868376}
        format: safetensors
        layout: torch
        architecture: {torch: "module:callable", tf: "module:callable"}
        config: {}
        license: apache-2.0
        description: ...

Lookup is layered: an explicit ``registry=`` argument, then the files in ``HUBLOAD_REGISTRY``, then the user
registry in the config dir, then the built-in ``registry.yaml``. A higher layer shadows an ID of a lower one.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Union
from urllib.parse import quote, unquote, urlsplit

from . import config
from ._yaml import Node, json_nodes, plain, to_nodes, yaml_nodes
from .errors import ModelNotFoundError, RegistryError, UsageError

__all__ = [
    "COMMIT_HASH",
    "FORMATS",
    "LAYOUTS",
    "SHA256_HEX",
    "FileSpec",
    "ModelEntry",
    "Registry",
    "builtin_registry_path",
    "check_relative_path",
    "load_registry",
    "parse_registry",
]

log = logging.getLogger("hubload")

FORMATS = ("safetensors", "torch", "tf-checkpoint", "keras-weights", "npz", "savedmodel", "keras")
LAYOUTS = ("torch", "keras")
FRAMEWORKS = ("torch", "tf")
SCHEMES = ("hf", "https", "http", "file")

COMMIT_HASH = re.compile(r"^[0-9a-f]{40}$")  # a full git commit hash (resolve.py, cli/lock_cmds.py use it)
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")  # a full sha256 hex digest
# Shared with sources.py and archive.py, which import them from here (their old names).
_HEX40 = COMMIT_HASH
_HEX64 = SHA256_HEX
_HEXPREFIX = re.compile(r"^[0-9a-f]{8,63}$")
_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_HF_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_CALLABLE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")

_ENTRY_KEYS = {
    "source", "revision", "files", "format", "layout", "architecture", "config", "license",
    "description", "homepage", "head", "ignore", "rename", "key", "tags",
    "probe",
}
_REQUIRED_KEYS = ("source", "files")
_FILE_KEYS = {"path", "sha256", "sha256_prefix", "size"}
_SUFFIX_FORMATS = {
    ".safetensors": "safetensors", ".pt": "torch", ".pth": "torch", ".bin": "torch", ".ckpt": "torch",
    ".npz": "npz", ".keras": "keras", ".h5": "keras-weights", ".index": "tf-checkpoint",
}

RegistryArg = Union["Registry", str, os.PathLike, Mapping[str, Any], Iterable[Union[str, os.PathLike]], None]


def check_relative_path(path: str) -> str:
    """Return ``path`` if it is a safe relative POSIX path inside its folder, else raise UsageError.

    Refused: empty, absolute (``/x``, ``C:x``), ``..`` or ``.`` segments, backslashes, empty segments,
    NUL or control characters.
    """
    if not isinstance(path, str) or not path:
        raise UsageError("the path is empty")
    if "\\" in path:
        raise UsageError(f"{path!r} contains a backslash; use '/'")
    if any(ord(c) < 32 for c in path):
        raise UsageError(f"{path!r} contains a control character")
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        raise UsageError(f"{path!r} is absolute; give a path relative to the source")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UsageError(f"{path!r} has an empty, '.' or '..' segment and could escape its folder")
    return path


@dataclass(frozen=True)
class FileSpec:
    """One weight file of an entry.

    Attributes:
        path: Path relative to the entry's source (POSIX, never escapes it).
        sha256: Full lowercase hex digest, or None when the registry gives none.
        size: Size in bytes, or None.
        sha256_prefix: A leading part of the sha256 (torch.hub style), when no full digest is published.
    """

    path: str
    sha256: str | None = None
    size: int | None = None
    sha256_prefix: str | None = None

    @property
    def pinned(self) -> bool:
        """True when the bytes are fixed by a full sha256."""
        return self.sha256 is not None


@dataclass(frozen=True)
class ModelEntry:
    """A registry entry: where a model's weights live, how to verify them, and how to build the model."""

    id: str
    source: str
    files: tuple[FileSpec, ...]
    format: str
    layout: str = "torch"
    revision: str | None = None
    architecture: Mapping[str, str] = field(default_factory=dict)
    config: Mapping[str, Any] = field(default_factory=dict)
    license: str | None = None
    description: str | None = None
    homepage: str | None = None
    head: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    rename: tuple[tuple[str, str], ...] = ()
    key: str | None = None
    tags: tuple[str, ...] = ()
    registry_file: str | None = None
    base_dir: str | None = None
    probe: Mapping[str, Any] | None = None  # seeded input + expected output digest (see hubload.probe)

    @property
    def scheme(self) -> str:
        """``hf``, ``https``, ``http`` or ``file`` (relative sources resolve to ``file``)."""
        head, sep, _ = self.source.partition("://")
        return head if sep else "file"

    @property
    def repo_id(self) -> str:
        """The Hub repository of an ``hf://`` source."""
        if self.scheme != "hf":
            raise RegistryError("only hf:// sources have a repository", entry=self.id, field="source")
        return self.source[len("hf://"):].strip("/")

    @property
    def pinned(self) -> bool:
        """True when every file has a full sha256 and an hf:// source is pinned to a commit."""
        if self.scheme == "hf" and not (self.revision and COMMIT_HASH.match(self.revision)):
            return False
        return all(f.pinned for f in self.files)

    @property
    def weakly_pinned(self) -> bool:
        """True when some file is checked only by a sha256 prefix (or not at all)."""
        return any(f.sha256 is None for f in self.files)

    def local_dir(self) -> Path:
        """The folder of a ``file://`` or relative source."""
        if self.scheme != "file":
            raise RegistryError("only file sources have a local folder", entry=self.id, field="source")
        if self.source.startswith("file://"):
            raw = unquote(urlsplit(self.source).path)
            return Path(raw)
        base = Path(self.base_dir) if self.base_dir else Path.cwd()
        return (base / self.source).resolve()

    def file_url(self, path: str) -> str:
        """The URL (or local path for file sources) of one file: the source joined with its path."""
        try:
            check_relative_path(path)
        except ValueError as exc:
            raise RegistryError(str(exc), entry=self.id, field="files") from None
        if self.scheme == "file":
            return str(self.local_dir() / path)
        if self.scheme == "hf":
            return f"hf://{self.repo_id}/{path}"
        return self.source.rstrip("/") + "/" + quote(path)

    def file(self, path: str) -> FileSpec:
        """The FileSpec for ``path``."""
        for f in self.files:
            if f.path == path:
                return f
        raise ModelNotFoundError(f"model {self.id!r} has no file {path!r}; it has: "
                                 + ", ".join(f.path for f in self.files), model_id=self.id)

    def frameworks(self) -> list[str]:
        """Frameworks this entry can build an architecture for."""
        return sorted(self.architecture)

    def is_head(self, name: str) -> bool:
        """True when a canonical tensor name belongs to the declared classification head."""
        return any(fnmatch.fnmatchcase(name, g) for g in self.head)


# --------------------------------------------------------------------------------------------------------
# Validation

class _Ctx:
    """Error context for one entry."""

    def __init__(self, file: str, entry: str | None = None) -> None:
        self.file = file
        self.entry = entry

    def fail(self, msg: str, *, field: str | None = None, line: int | None = None) -> RegistryError:
        return RegistryError(msg, file=self.file, entry=self.entry, field=field, line=line or None)


def _str(ctx: _Ctx, node: Node, field: str) -> str:
    """A non-empty string field."""
    if not isinstance(node.value, str) or not node.value.strip():
        raise ctx.fail(f"must be a non-empty string, got {type(node.value).__name__} {node.value!r}",
                       field=field, line=node.line)
    return node.value.strip()


def _str_list(ctx: _Ctx, node: Node, field: str) -> tuple[str, ...]:
    """A list of non-empty strings (a single string is accepted as a one-item list)."""
    if isinstance(node.value, str):
        return (_str(ctx, node, field),)
    if not isinstance(node.value, list):
        raise ctx.fail("must be a list of strings", field=field, line=node.line)
    return tuple(_str(ctx, item, field) for item in node.value)


def _validate_source(ctx: _Ctx, node: Node) -> str:
    """Check the source's scheme and shape."""
    src = _str(ctx, node, "source")
    scheme, sep, rest = src.partition("://")
    if not sep:
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", src) and not re.match(r"^[A-Za-z]:[\\/]", src):
            raise ctx.fail(f"scheme of {src!r} is not allowed; use one of hf://, https://, http://, file:// "
                           "or a path relative to the registry file", field="source", line=node.line)
        if "\\" in src:
            raise ctx.fail("use '/' in relative paths, not backslashes", field="source", line=node.line)
        return src
    scheme = scheme.lower()
    if scheme not in SCHEMES:
        raise ctx.fail(f"scheme {scheme + '://'!r} is not allowed; use one of hf://, https://, http://, file://",
                       field="source", line=node.line)
    if scheme == "hf":
        repo = rest.strip("/")
        if not _HF_REPO.match(repo) or ".." in repo:
            raise ctx.fail(f"{src!r} is not a Hub repository; expected hf://org/name", field="source", line=node.line)
    elif scheme in ("http", "https"):
        parts = urlsplit(src)
        if not parts.hostname:
            raise ctx.fail(f"{src!r} has no host", field="source", line=node.line)
        if parts.username or parts.password:
            raise ctx.fail("credentials in the URL are not allowed (they would be logged); use a token env var",
                           field="source", line=node.line)
    elif scheme == "file":
        if urlsplit(src).netloc not in ("", "localhost"):
            raise ctx.fail("file:// sources take no host; write file:///abs/dir (three slashes)", field="source",
                           line=node.line)
        if not urlsplit(src).path.startswith("/"):
            raise ctx.fail("file:// sources need an absolute path (file:///dir); use a plain relative path "
                           "for folders beside the registry", field="source", line=node.line)
    return scheme + "://" + rest


def _validate_file(ctx: _Ctx, node: Node, idx: int) -> FileSpec:
    """One item of ``files``."""
    fld = f"files[{idx}]"
    if isinstance(node.value, str):
        raise ctx.fail("each file needs at least 'path' and 'sha256' (or 'sha256_prefix'); "
                       "write {path: ..., sha256: ..., size: ...}", field=fld, line=node.line)
    if not isinstance(node.value, dict):
        raise ctx.fail("must be a mapping with path, sha256, size", field=fld, line=node.line)
    items: dict[str, Node] = node.value
    unknown = sorted(set(items) - _FILE_KEYS)
    if unknown:
        raise ctx.fail(f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_FILE_KEYS))}",
                       field=fld, line=items[unknown[0]].line)
    if "path" not in items:
        raise ctx.fail("missing 'path'", field=fld, line=node.line)
    path = _str(ctx, items["path"], f"{fld}.path")
    try:
        check_relative_path(path)
    except ValueError as exc:
        raise ctx.fail(str(exc), field=f"{fld}.path", line=items["path"].line) from None
    sha = prefix = None
    size = None
    if "sha256" in items and items["sha256"].value is not None:
        sha = str(items["sha256"].value).strip().lower()
        if not _HEX64.match(sha):
            raise ctx.fail(f"sha256 must be 64 hex digits, got {len(sha)} characters {sha!r}",
                           field=f"{fld}.sha256", line=items["sha256"].line)
    if "sha256_prefix" in items and items["sha256_prefix"].value is not None:
        prefix = str(items["sha256_prefix"].value).strip().lower()
        if not _HEXPREFIX.match(prefix):
            raise ctx.fail(f"sha256_prefix must be 8 to 63 hex digits, got {prefix!r}",
                           field=f"{fld}.sha256_prefix", line=items["sha256_prefix"].line)
        if sha and not sha.startswith(prefix):
            raise ctx.fail("sha256_prefix does not match sha256", field=f"{fld}.sha256_prefix",
                           line=items["sha256_prefix"].line)
    if "size" in items and items["size"].value is not None:
        size = items["size"].value
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ctx.fail(f"size must be a non-negative integer (bytes), got {size!r}",
                           field=f"{fld}.size", line=items["size"].line)
    return FileSpec(path=path, sha256=sha, size=size, sha256_prefix=prefix)


def infer_format(files: tuple[FileSpec, ...]) -> str | None:
    """Guess the format from the first file's suffix."""
    for f in files:
        name = f.path.lower()
        if name.endswith((".tar", ".tar.gz", ".tgz", ".zip")):
            return "savedmodel"  # whole-model folders travel as archives
        if name.endswith(".weights.h5"):
            return "keras-weights"
        if name.endswith(".safetensors.index.json"):
            return "safetensors"
        suffix = PurePosixPath(name).suffix
        if suffix in _SUFFIX_FORMATS:
            return _SUFFIX_FORMATS[suffix]
    return None


def _validate_entry(ctx: _Ctx, node: Node, base_dir: str | None) -> ModelEntry:
    """One entry of ``models``."""
    mid = ctx.entry or ""
    if not _MODEL_ID.match(mid):
        raise ctx.fail("model IDs are letters, digits, '.', '_', '-' with at most one '/', "
                       "starting with a letter or digit", line=node.line)
    if not isinstance(node.value, dict):
        raise ctx.fail("an entry must be a mapping", line=node.line)
    items: dict[str, Node] = node.value
    unknown = sorted(set(items) - _ENTRY_KEYS)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(_ENTRY_KEYS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ctx.fail(f"unknown key {unknown[0]!r}{hint}; allowed: {', '.join(sorted(_ENTRY_KEYS))}",
                       field=unknown[0], line=items[unknown[0]].line)
    for req in _REQUIRED_KEYS:
        if req not in items:
            raise ctx.fail(f"missing required field {req!r}", field=req, line=node.line)
    source = _validate_source(ctx, items["source"])
    scheme = source.partition("://")[0] if "://" in source else "file"

    revision = None
    if "revision" in items and items["revision"].value is not None:
        revision = _str(ctx, items["revision"], "revision")
        if scheme != "hf":
            raise ctx.fail("'revision' applies to hf:// sources only", field="revision", line=items["revision"].line)
        if any(c in revision for c in "\\") or ".." in revision:
            raise ctx.fail(f"revision {revision!r} is not a valid commit or branch", field="revision",
                           line=items["revision"].line)

    fnode = items["files"]
    if not isinstance(fnode.value, list) or not fnode.value:
        raise ctx.fail("must be a non-empty list of {path, sha256, size}", field="files", line=fnode.line)
    files = tuple(_validate_file(ctx, f, i) for i, f in enumerate(fnode.value))
    seen: set[str] = set()
    for f in files:
        if f.path in seen:
            raise ctx.fail(f"file {f.path!r} is listed twice", field="files", line=fnode.line)
        seen.add(f.path)
    if scheme in ("http", "https", "file") and any(f.sha256 is None and f.sha256_prefix is None for f in files):
        bad = next(f.path for f in files if f.sha256 is None and f.sha256_prefix is None)
        raise ctx.fail(f"file {bad!r} has no sha256: {scheme} sources must be verified by a hash "
                       "(only hf:// sources may fall back to the Hub's LFS sha256)", field="files", line=fnode.line)

    if "format" in items:
        fmt = _str(ctx, items["format"], "format")
        if fmt not in FORMATS:
            raise ctx.fail(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}", field="format",
                           line=items["format"].line)
    else:
        inferred = infer_format(files)
        if inferred is None:
            raise ctx.fail(f"cannot infer the format from the file names; add 'format:' ({', '.join(FORMATS)})",
                           field="format", line=node.line)
        fmt = inferred

    layout = "torch"
    if "layout" in items:
        layout = _str(ctx, items["layout"], "layout")
        if layout not in LAYOUTS:
            raise ctx.fail(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}", field="layout",
                           line=items["layout"].line)

    arch: dict[str, str] = {}
    if "architecture" in items and items["architecture"].value is not None:
        an = items["architecture"]
        if not isinstance(an.value, dict):
            raise ctx.fail("must be a mapping {torch: 'module:callable', tf: 'module:callable'}",
                           field="architecture", line=an.line)
        for fw, vnode in an.value.items():
            if fw not in FRAMEWORKS:
                raise ctx.fail(f"unknown framework {fw!r}; use {' or '.join(FRAMEWORKS)}",
                               field=f"architecture.{fw}", line=vnode.line)
            target = _str(ctx, vnode, f"architecture.{fw}")
            if not _CALLABLE.match(target):
                raise ctx.fail(f"{target!r} is not 'module:callable'", field=f"architecture.{fw}", line=vnode.line)
            arch[fw] = target

    cfg: dict[str, Any] = {}
    if "config" in items and items["config"].value is not None:
        if not isinstance(items["config"].value, dict):
            raise ctx.fail("must be a mapping of keyword arguments", field="config", line=items["config"].line)
        cfg = plain(items["config"])

    rename: list[tuple[str, str]] = []
    if "rename" in items and items["rename"].value is not None:
        rn = items["rename"]
        if not isinstance(rn.value, list):
            raise ctx.fail("must be a list of {pattern: regex, replace: str}", field="rename", line=rn.line)
        for i, r in enumerate(rn.value):
            if not isinstance(r.value, dict) or set(r.value) != {"pattern", "replace"}:
                raise ctx.fail("each rule is {pattern: regex, replace: str}", field=f"rename[{i}]", line=r.line)
            pat = _str(ctx, r.value["pattern"], f"rename[{i}].pattern")
            rep = r.value["replace"].value
            if not isinstance(rep, str):
                raise ctx.fail("replace must be a string", field=f"rename[{i}].replace", line=r.line)
            try:
                re.compile(pat)
            except re.error as exc:
                raise ctx.fail(f"invalid regex {pat!r}: {exc}", field=f"rename[{i}].pattern", line=r.line) from None
            rename.append((pat, rep))

    def opt_str(name: str) -> str | None:
        if name in items and items[name].value is not None:
            return _str(ctx, items[name], name)
        return None

    def opt_list(name: str) -> tuple[str, ...]:
        if name in items and items[name].value is not None:
            return _str_list(ctx, items[name], name)
        return ()

    probe = None
    if "probe" in items and items["probe"].value is not None:
        from .probe import validate_probe

        pnode = items["probe"]
        probe = validate_probe(plain(pnode), lambda msg, fld: ctx.fail(msg, field=fld, line=pnode.line))

    return ModelEntry(
        id=mid, source=source, files=files, format=fmt, layout=layout, revision=revision,
        architecture=arch, config=cfg, license=opt_str("license"), description=opt_str("description"),
        homepage=opt_str("homepage"), head=opt_list("head"), ignore=opt_list("ignore"), rename=tuple(rename),
        key=opt_str("key"), tags=opt_list("tags"), registry_file=ctx.file, base_dir=base_dir,
        probe=probe,
    )


def parse_registry(data: str | Mapping[str, Any], *, file: str = "<registry>",
                   base_dir: str | None = None) -> dict[str, ModelEntry]:
    """Validate a registry document and return its entries.

    Args:
        data: YAML text or an already-parsed mapping.
        file: Name used in error messages.
        base_dir: Folder that relative sources are resolved against.

    Returns:
        Model ID → ModelEntry, in file order.

    Raises:
        RegistryError: naming the file, the entry, the field and the YAML line where known.
    """
    if isinstance(data, str):
        fast = json_nodes(data)  # a JSON registry needs no YAML parser
        if fast is not None:
            try:
                return _parse_root(fast, file, base_dir)
            except RegistryError:
                pass  # parse again as YAML below, for the line number in the message
        return _parse_root(yaml_nodes(data, file), file, base_dir)
    return _parse_root(to_nodes(data), file, base_dir)


def _parse_root(root: Node, file: str, base_dir: str | None) -> dict[str, ModelEntry]:
    """Validate a parsed registry document (see :func:`parse_registry`)."""
    ctx = _Ctx(file)
    if not isinstance(root.value, dict):
        raise ctx.fail("the top level must be a mapping with 'version: 1' and 'models:'", line=root.line)
    unknown = sorted(set(root.value) - {"version", "models"})
    if unknown:
        raise ctx.fail(f"unknown top-level key {unknown[0]!r}; allowed: version, models",
                       line=root.value[unknown[0]].line)
    version = root.value.get("version")
    if version is None:
        raise ctx.fail("missing 'version: 1'", line=root.line)
    if type(version.value) is not int or version.value != 1:  # not True, not 1.0
        raise ctx.fail(f"unsupported version {version.value!r}; this hubload reads version 1",
                       field="version", line=version.line)
    models = root.value.get("models")
    if models is None or models.value is None:
        return {}
    if not isinstance(models.value, dict):
        raise ctx.fail("'models' must be a mapping of model ID to entry", field="models", line=models.line)
    out: dict[str, ModelEntry] = {}
    for mid, node in models.value.items():
        out[mid] = _validate_entry(_Ctx(file, mid), node, base_dir)
    return out


# --------------------------------------------------------------------------------------------------------
# Layers

# Parsed files keyed by (path, mtime_ns, size): a warm pull must not re-parse YAML.
_PARSED: dict[tuple[str, int, int], dict[str, ModelEntry]] = {}


def _load_file(path: Path) -> dict[str, ModelEntry]:
    """Parse one registry file (memoised on path + mtime + size)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise RegistryError("registry file not found; check the path (or HUBLOAD_REGISTRY)", file=str(path)) from None
    key = (str(path), st.st_mtime_ns, st.st_size)
    hit = _PARSED.get(key)
    if hit is not None:
        return hit
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RegistryError(f"cannot read the registry file: {exc}", file=str(path)) from None
    # Relative sources resolve against the folder the file is *seen* in (not through symlinks), so the
    # built-in registry's relative sources point inside the installed package in checkouts and wheels alike.
    entries = parse_registry(text, file=str(path), base_dir=str(path.absolute().parent))
    _PARSED[key] = entries
    return entries


@functools.lru_cache(maxsize=1)
def builtin_registry_path() -> Path:
    """The built-in registry shipped with hubload (checkout symlink or wheel copy)."""
    from importlib.resources import files

    return Path(str(files("hubload") / "registry.yaml"))


class _Layer:
    """One registry layer: its entries, or the file they are parsed from on first use (the built-in layer, so
    an ID found in a higher layer costs no YAML import or parse of the built-in file)."""

    def __init__(self, name: str, entries: Mapping[str, ModelEntry] | None = None, path: Path | None = None) -> None:
        self.name = name
        self._entries = dict(entries) if entries is not None else None
        self._path = path

    @property
    def entries(self) -> dict[str, ModelEntry]:
        if self._entries is None:
            assert self._path is not None
            self._entries = dict(_load_file(self._path))
        return self._entries


class Registry:
    """Model IDs → entries, looked up through ordered layers (first layer wins)."""

    def __init__(self, layers: Iterable[tuple[str, Mapping[str, ModelEntry]] | _Layer] = ()) -> None:
        self._layers = [x if isinstance(x, _Layer) else _Layer(x[0], x[1]) for x in layers]

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Registry:
        """A registry of one YAML file."""
        p = Path(path).expanduser()
        return cls([(str(p), _load_file(p))])

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, name: str = "<dict>", base_dir: str | None = None) -> Registry:
        """A registry from an already-parsed document."""
        return cls([(name, parse_registry(data, file=name, base_dir=base_dir))])

    @property
    def layers(self) -> list[str]:
        """Names (file paths) of the layers, highest priority first."""
        return [layer.name for layer in self._layers]

    def __contains__(self, model_id: object) -> bool:
        return any(model_id in layer.entries for layer in self._layers)

    def __iter__(self) -> Iterator[ModelEntry]:
        seen: set[str] = set()
        for layer in self._layers:
            for mid, entry in layer.entries.items():
                if mid not in seen:
                    seen.add(mid)
                    yield entry

    def __len__(self) -> int:
        return len(self.ids())

    def ids(self) -> list[str]:
        """All visible model IDs, sorted."""
        return sorted({mid for layer in self._layers for mid in layer.entries})

    def get(self, model_id: str) -> ModelEntry:
        """The entry for ``model_id``.

        Raises:
            ModelNotFoundError: the ID is in no layer; the message suggests close IDs.
        """
        for layer in self._layers:
            entry = layer.entries.get(model_id)
            if entry is not None:
                return entry
        ids = self.ids()
        lowered = {i.lower(): i for i in ids}
        close = [lowered[c] for c in difflib.get_close_matches(model_id.lower(), list(lowered), n=3, cutoff=0.5)]
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        where = ", ".join(self.layers) or "no registry files"
        raise ModelNotFoundError(f"unknown model ID {model_id!r} (searched {where}).{hint} "
                                 "Run `hubload list` to see the known IDs.", model_id=model_id, suggestions=close)


def load_registry(registry: RegistryArg = None) -> Registry:
    """Build the layered registry.

    Args:
        registry: Highest-priority layer(s): a Registry, a YAML path, a list of paths, or a parsed mapping.

    Returns:
        A Registry whose layers are: ``registry``, ``HUBLOAD_REGISTRY`` files, the user registry
        (if it exists), the built-in registry.

    Raises:
        UsageError: ``registry`` is none of those kinds (or a list holding something that is not a path).
        RegistryError: A registry file or entry is invalid.
    """
    layers: list[tuple[str, Mapping[str, ModelEntry]] | _Layer] = []
    if isinstance(registry, Registry):
        layers.extend(registry._layers)
    elif isinstance(registry, (str, os.PathLike)):  # before the Mapping ABC check, which is slow the first time
        p = Path(registry).expanduser()
        layers.append((str(p), _load_file(p)))
    elif isinstance(registry, Mapping):
        layers.append(("<registry argument>", parse_registry(registry, file="<registry argument>",
                                                             base_dir=str(Path.cwd()))))
    elif registry is not None:
        items = list(registry) if isinstance(registry, Iterable) else None
        bad = [i for i in items if not isinstance(i, (str, os.PathLike))] if items is not None else [registry]
        if bad:
            raise UsageError(f"registry={registry!r}: pass a Registry, a YAML file path, a list of paths or a "
                             f"mapping (got a {type(bad[0]).__name__})")
        for item in items:
            p = Path(item).expanduser()
            layers.append((str(p), _load_file(p)))
    for p in config.registry_env_paths():
        layers.append((str(p), _load_file(p)))
    user = config.user_registry_path()
    if user.is_file():
        layers.append((str(user), _load_file(user)))
    builtin = builtin_registry_path()
    if builtin.is_file():
        layers.append(_Layer(str(builtin), path=builtin))  # parsed when an ID is not found above it
    return Registry(layers)
