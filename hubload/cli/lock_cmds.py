"""``hubload lock [FILE...]`` (and ``--check``): pin every entry to a commit, a sha256 and a size, in place."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

import click

from .. import config
from ..cache import Cache
from ..errors import HubloadError, RegistryError
from ..registry import COMMIT_HASH, ModelEntry, parse_registry
from ._common import echo_json, fail

__all__ = ["register", "unpinned_reasons"]


def unpinned_reasons(entry: ModelEntry) -> list[str]:
    """Why an entry is not fully pinned (empty when it is): a moving revision, a missing sha256 or size."""
    out = []
    if entry.scheme == "hf" and not (entry.revision and COMMIT_HASH.match(entry.revision)):
        out.append(f"revision {entry.revision or 'main'!r} is a branch or tag, not a commit")
    for f in entry.files:
        if f.sha256 is None:
            out.append(f"{f.path}: no sha256" + (f" (only the prefix {f.sha256_prefix})" if f.sha256_prefix else ""))
        if f.size is None:
            out.append(f"{f.path}: no size")
    return out


def _pin_hf(entry: ModelEntry, cache: Cache) -> tuple[str, dict[str, dict[str, Any]]]:
    """The commit and the files' sha256/size of an hf:// entry, from the Hub at that commit."""
    from ..hub_repo import RepoFetcher, repo_snapshot

    snap = repo_snapshot(entry.repo_id, entry.revision or "main")
    fetch = RepoFetcher(snap, config.hf_token(), cache)
    files: dict[str, dict[str, Any]] = {}
    for spec in entry.files:
        f = snap.file(spec.path)
        if f is None:
            raise RegistryError(f"file {spec.path!r} does not exist in hf://{entry.repo_id} at commit {snap.commit}",
                                file=entry.registry_file, entry=entry.id, field="files")
        sha, size = f.sha256, f.size
        if sha is None and spec.sha256 is None:
            body = fetch.whole(spec.path)
            sha, size = hashlib.sha256(body).hexdigest(), len(body)
        if spec.sha256 and sha and spec.sha256 != sha:
            raise RegistryError(f"file {spec.path!r}: the registry's sha256 {spec.sha256} differs from the Hub's "
                                f"{sha} at commit {snap.commit}; fix the entry (or its revision) by hand",
                                file=entry.registry_file, entry=entry.id, field="files")
        if spec.sha256_prefix and sha and not sha.startswith(spec.sha256_prefix):
            raise RegistryError(f"file {spec.path!r}: the Hub's sha256 {sha} does not start with the registry's "
                                f"sha256_prefix {spec.sha256_prefix}", file=entry.registry_file, entry=entry.id,
                                field="files")
        files[spec.path] = {"sha256": sha, "size": size}
    return snap.commit, files


def _pin_other(entry: ModelEntry, cache: Cache) -> dict[str, dict[str, Any]]:
    """Missing sizes of file/URL entries: from the local file, or from a verified cached copy."""
    files: dict[str, dict[str, Any]] = {}
    for spec in entry.files:
        if spec.size is not None:
            continue
        if spec.sha256 and cache.has_blob(spec.sha256):
            files[spec.path] = {"size": cache.blob_path(spec.sha256).stat().st_size}
        elif entry.scheme == "file" and spec.sha256:
            local = entry.local_dir() / spec.path
            h = hashlib.sha256()
            with open(local, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            if h.hexdigest() != spec.sha256:
                raise RegistryError(f"file {spec.path!r}: {local} does not match the registry's sha256",
                                    file=entry.registry_file, entry=entry.id, field="files")
            files[spec.path] = {"size": local.stat().st_size}
    return files


@click.command("lock")
@click.argument("files", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--check", is_flag=True, help="Change nothing: exit 1 and list what is not pinned (for CI).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def lock_cmd(files: tuple[str, ...], check: bool, as_json: bool) -> None:
    """Pin every entry of FILE (default: the user registry) to a commit, a sha256 and a size.

    Entries naming a branch or tag, or lacking a sha256 or size, are resolved on the Hub (hf://) and
    rewritten in place; comments, blank lines and the order of entries are kept. Exit codes: 0 all
    pinned, 1 (--check) something is unpinned, 2 error, 3/4 repo or revision not found / access denied.
    """
    from ..lockfile import EntryPin, apply_pins

    paths = [Path(f) for f in files] or [config.user_registry_path()]
    cache = Cache()
    result: list[dict[str, Any]] = []
    left = 0
    try:
        for path in paths:
            if not path.is_file():
                raise RegistryError("registry file not found", file=str(path))
            entries = parse_registry(path.read_text(encoding="utf-8"), file=str(path),
                                     base_dir=str(path.absolute().parent))
            pins = []
            for entry in entries.values():
                reasons = unpinned_reasons(entry)
                if not reasons:
                    continue
                row: dict[str, Any] = {"file": str(path), "id": entry.id, "unpinned": reasons}
                if not check:
                    if entry.scheme == "hf":
                        commit, pinned = _pin_hf(entry, cache)
                        was = entry.revision if entry.revision != commit else None
                        pins.append(EntryPin(entry.id, commit if entry.revision != commit else None, was, pinned))
                        row["pinned"] = {"revision": commit, "files": pinned}
                    else:
                        pinned = _pin_other(entry, cache)
                        pins.append(EntryPin(entry.id, None, None, pinned))
                        row["pinned"] = {"files": pinned}
                result.append(row)
            if pins:
                apply_pins(path, pins, entries)
                after = parse_registry(path.read_text(encoding="utf-8"), file=str(path),
                                       base_dir=str(path.absolute().parent))
                for row in result:
                    if row["file"] == str(path):
                        row["still_unpinned"] = unpinned_reasons(after[row["id"]])
                        left += bool(row["still_unpinned"])
    except HubloadError as exc:
        fail(exc, as_json)
    if as_json:
        echo_json({"ok": not (check and result) and not left, "entries": result})
    else:
        for row in result:
            if check:
                click.echo(f"{row['file']}: {row['id']}: not pinned: {'; '.join(row['unpinned'])}")
            else:
                rest = row.get("still_unpinned")
                tail = f" (still not pinned: {'; '.join(rest)})" if rest else ""
                click.echo(f"{row['file']}: {row['id']}: pinned{tail}")
        if not result:
            click.echo(f"all entries pinned ({', '.join(map(str, paths))})")
    if (check and result) or left:
        sys.exit(1)


def register(cli: click.Group) -> None:
    """Attach this module's commands."""
    cli.add_command(lock_cmd)
