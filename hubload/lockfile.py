"""Writing registry files: new pinned entries (``hubload add``) and in-place pinning (``hubload lock``).

Registries are hand-written YAML with comments that cite where each hash came from, so they are never
re-serialised: this module edits the text line by line (block-style registries, as hubload writes and
documents them) and leaves every other line, comment and the order of entries as they were. Every
rewrite is parsed back with :func:`hubload.registry.parse_registry` (the one YAML parser) before it
replaces the file, atomically.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import RegistryError
from .registry import parse_registry

__all__ = ["EntryPin", "add_entry", "apply_pins", "flow", "render_entry"]

_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_PLAIN_STR = re.compile(r"^[A-Za-z0-9_./:@+-]+$")
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~"}
_HEADER = "version: 1\nmodels:\n"


def _scalar(value: Any) -> str:
    """One YAML flow scalar that PyYAML's safe loader reads back as ``value``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
        text = repr(value)
        if "e" in text and "." not in text.split("e")[0]:  # YAML 1.1 floats need a dot: 1e-12 -> 1.0e-12
            mant, _, exp = text.partition("e")
            text = f"{mant}.0e{exp}"
        return text
    text = str(value)
    plain = (_PLAIN_STR.match(text) and text.lower() not in _YAML_WORDS and not text[0] in "-:@"
             and not re.match(r"^[-+]?(\d|\.\d)", text))
    return text if plain else json.dumps(text)


def flow(value: Any) -> str:
    """``value`` as a one-line YAML flow node (mappings, lists, scalars)."""
    if isinstance(value, Mapping):
        items = ", ".join(f"{k if _PLAIN_KEY.match(str(k)) else json.dumps(str(k))}: {flow(v)}"
                          for k, v in value.items())
        return "{" + items + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(flow(v) for v in value) + "]"
    return _scalar(value)


def render_entry(model_id: str, fields: Mapping[str, Any], *, comments: Sequence[str] = (), indent: int = 2) -> str:
    """One registry entry as block YAML (``files`` one flow item per line, ``config`` one key per line).

    Args:
        model_id: The entry's ID.
        fields: Entry fields in the order to write them.
        comments: Comment lines written first inside the entry (provenance).
        indent: Indentation of the ID under ``models:``.
    """
    pad, sub = " " * indent, " " * (indent + 2)
    lines = [f"{pad}{model_id}:"]
    lines += [f"{sub}# {c}" for c in comments]
    for key, value in fields.items():
        if value is None or value == {} or value == []:
            continue
        if key == "files":
            lines.append(f"{sub}files:")
            lines += [f"{sub}  - {flow(f)}" for f in value]
        elif key == "config" and isinstance(value, Mapping):
            lines.append(f"{sub}config:")
            lines += [f"{sub}  {k if _PLAIN_KEY.match(str(k)) else json.dumps(str(k))}: {flow(v)}"
                      for k, v in value.items()]
        else:
            lines.append(f"{sub}{key}: {flow(value)}")
    return "\n".join(lines) + "\n"


def _write_checked(path: Path, text: str) -> None:
    """Validate ``text`` as a registry, then replace ``path`` atomically."""
    parse_registry(text, file=str(path), base_dir=str(path.absolute().parent))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _models_block(lines: list[str], file: str) -> tuple[int, int]:
    """``(first, end)``: the line after ``models:`` and the end (exclusive) of its block."""
    start = next((i for i, ln in enumerate(lines) if re.match(r"^models:\s*(#.*)?$", ln)), None)
    if start is None:
        if any(re.match(r"^models:", ln) for ln in lines):
            raise RegistryError("'models:' is written in flow style; hubload edits block-style registries only "
                                "(one entry per indented block)", file=file)
        raise RegistryError("no 'models:' section to add to", file=file)
    end = start + 1
    for i in range(start + 1, len(lines)):
        ln = lines[i]
        if ln.strip() and not ln.startswith((" ", "\t", "#")):
            break
        end = i + 1
    while end > start + 1 and not lines[end - 1].strip():  # trailing blank lines stay outside
        end -= 1
    return start + 1, end


def add_entry(path: str | os.PathLike[str], model_id: str, block: str, *, replace: bool = False) -> bool:
    """Add (or, with ``replace``, swap in) an entry in a registry file, creating the file if needed.

    Args:
        path: The registry file.
        model_id: The entry's ID.
        block: The entry as :func:`render_entry` writes it.
        replace: Replace an entry of the same ID (its lines) instead of refusing.

    Returns:
        True if an existing entry was replaced.

    Raises:
        RegistryError: The ID exists (and not ``replace``), or the result would not validate.
    """
    p = Path(path).expanduser()
    text = p.read_text(encoding="utf-8") if p.exists() else ""
    if not text.strip():
        _write_checked(p, _HEADER + block)
        return False
    entries = parse_registry(text, file=str(p), base_dir=str(p.absolute().parent))
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    first, end = _models_block(lines, str(p))
    if model_id in entries:
        if not replace:
            raise RegistryError(f"entry {model_id!r} exists already; pass --force to replace it, or --id NEW",
                                file=str(p), entry=model_id)
        span = _entry_spans(lines, first, end).get(model_id)
        if span is None:
            raise RegistryError("cannot locate the entry's lines to replace it", file=str(p), entry=model_id)
        lines[span[0]:span[1]] = [block]
        _write_checked(p, "".join(lines))
        return True
    sep = "\n" if any(ln.strip() for ln in lines[first:end]) else ""
    lines[end:end] = [sep + block]
    _write_checked(p, "".join(lines))
    return False


def _entry_spans(lines: list[str], first: int, end: int) -> dict[str, tuple[int, int]]:
    """Model ID → (first line, end line) of its block inside ``models:`` (comments above go with it)."""
    keys: list[tuple[int, str]] = []
    indent = None
    for i in range(first, end):
        m = re.match(r"^( +)([^\s#][^:]*?)\s*:\s*(#.*)?$", lines[i])
        if m and (indent is None or len(m.group(1)) == indent):
            indent = len(m.group(1))
            keys.append((i, m.group(2).strip("'\"")))
    spans: dict[str, tuple[int, int]] = {}
    for n, (i, mid) in enumerate(keys):
        stop = keys[n + 1][0] if n + 1 < len(keys) else end
        while stop > i + 1 and (not lines[stop - 1].strip() or lines[stop - 1].lstrip().startswith("#")) \
                and n + 1 < len(keys):
            stop -= 1  # comments and blanks just above the next ID belong to it
        spans[mid] = (i, stop)
    return spans


@dataclass(frozen=True)
class EntryPin:
    """What ``hubload lock`` writes into one entry.

    Attributes:
        model_id: The entry.
        revision: The commit to pin (hf:// entries), or None to leave the revision line alone.
        was: The revision it replaces (kept as a comment), if any.
        files: ``path -> {sha256, size}`` to fill in (existing keys such as ``sha256_prefix`` are kept).
    """

    model_id: str
    revision: str | None
    was: str | None
    files: Mapping[str, Mapping[str, Any]]


def _field_line(lines: list[str], start: int, stop: int, key: str) -> tuple[int, int] | None:
    """``(line, indent)`` of an entry field ``key:`` between start and stop."""
    sub = None
    for i in range(start + 1, stop):
        m = re.match(r"^( +)([A-Za-z_]+)\s*:", lines[i])
        if not m:
            continue
        if sub is None:
            sub = len(m.group(1))
        if len(m.group(1)) == sub and m.group(2) == key:
            return i, sub
    return None


def _files_block(lines: list[str], at: int, indent: int, stop: int) -> int:
    """End (exclusive) of the ``files:`` block whose key is on line ``at``."""
    end = at + 1
    for i in range(at + 1, stop):
        ln = lines[i]
        if not ln.strip() or ln.lstrip().startswith("#"):
            continue
        ind = len(ln) - len(ln.lstrip(" "))
        if ind < indent or (ind == indent and not ln.lstrip().startswith("-")):
            break
        end = i + 1
    return end


def apply_pins(path: str | os.PathLike[str], pins: Sequence[EntryPin], original: Mapping[str, Any]) -> None:
    """Write pins into a registry file in place, keeping every comment, blank line and the entry order.

    Args:
        path: The registry file.
        pins: What to pin, per entry.
        original: The file's parsed entries (``parse_registry``), for the files' other fields.

    Raises:
        RegistryError: An entry cannot be located or the result would not validate.
    """
    p = Path(path)
    lines = p.read_text(encoding="utf-8").splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    # Bottom-up, so earlier line numbers stay valid while later entries change length.
    first, end = _models_block(lines, str(p))
    spans = _entry_spans(lines, first, end)
    for pin in sorted(pins, key=lambda x: -spans.get(x.model_id, (0, 0))[0]):
        if pin.model_id not in spans:
            raise RegistryError("cannot locate the entry's lines (flow-style entry?)", file=str(p),
                                entry=pin.model_id)
        start, stop = spans[pin.model_id]
        entry = original[pin.model_id]
        fl = _field_line(lines, start, stop, "files")
        if fl is None:
            raise RegistryError("cannot locate the entry's 'files:' lines", file=str(p), entry=pin.model_id)
        at, ind = fl
        fend = _files_block(lines, at, ind, stop)
        if lines[at].rstrip().endswith(":") or "#" in lines[at].split(":", 1)[1]:
            head = lines[at]
        else:  # flow list on the key line: files: [...]
            head = " " * ind + "files:\n"
        kept_comments = [ln for ln in lines[at + 1:fend] if ln.lstrip().startswith("#")]
        items = []
        for spec in entry.files:
            item: dict[str, Any] = {"path": spec.path}
            new = pin.files.get(spec.path, {})
            if spec.sha256_prefix:
                item["sha256_prefix"] = spec.sha256_prefix
            item["sha256"] = spec.sha256 or new.get("sha256")
            item["size"] = spec.size if spec.size is not None else new.get("size")
            items.append(" " * (ind + 2) + "- " + flow({k: v for k, v in item.items() if v is not None}) + "\n")
        lines[at:fend] = [head, *kept_comments, *items]
        if pin.revision is not None:
            rv = _field_line(lines, start, stop + len(items) + 1, "revision")
            note = f"  # pinned by `hubload lock` (was {pin.was})" if pin.was else "  # pinned by `hubload lock`"
            if rv is not None:
                i, rind = rv
                lines[i] = f"{' ' * rind}revision: {pin.revision}{note}\n"
            else:
                src = _field_line(lines, start, stop, "source")
                i, sind = src if src is not None else (start, ind)
                lines.insert(i + 1, f"{' ' * sind}revision: {pin.revision}{note}\n")
    _write_checked(p, "".join(lines))
