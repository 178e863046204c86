"""``hubload list`` and ``hubload info ID``."""

from __future__ import annotations

import click

from ..cache import Cache
from ..fetch import cached_files
from ..registry import ModelEntry, load_registry
from ._common import echo_json, human_size, registry_option


@click.command("list")
@registry_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_cmd(registry: tuple[str, ...], as_json: bool) -> None:
    """List the model IDs of every registry layer."""
    reg = load_registry(list(registry) or None)
    rows = [{"id": e.id, "source": e.source, "format": e.format, "frameworks": e.frameworks(),
             "size": sum(f.size or 0 for f in e.files), "description": e.description or ""} for e in reg]
    rows.sort(key=lambda r: r["id"])
    if as_json:
        echo_json(rows)
        return
    for r in rows:
        fws = ",".join(r["frameworks"]) or "-"
        click.echo(f"{r['id']:<28} {r['format']:<13} {fws:<9} {human_size(r['size']):>10}  {r['description']}")


def pinning_text(entry: ModelEntry) -> str:
    """What the entry is actually pinned by, for its source kind (an https:// URL has no commit)."""
    sizes = "" if all(f.size is not None for f in entry.files) else "; some files have no size"
    if entry.weakly_pinned:
        weak = "WEAKLY PINNED: " + ", ".join(
            f"{f.path} is checked only by {'its sha256 prefix ' + f.sha256_prefix if f.sha256_prefix else 'the Hub LFS sha256 at download'}"
            for f in entry.files if f.sha256 is None)
        if entry.scheme == "hf" and not entry.pinned and not (entry.revision and len(entry.revision) == 40):
            weak += f"; revision {entry.revision or 'main'!r} may move (run `hubload lock`)"
        return weak + sizes
    if entry.scheme == "hf":
        if entry.pinned:
            return f"pinned: Hub commit {entry.revision[:12]} + sha256 of every file" + sizes
        return (f"NOT PINNED to a commit: revision {entry.revision or 'main'!r} may move; each file has a sha256 "
                "(run `hubload lock`)" + sizes)
    if entry.scheme in ("http", "https"):
        return f"pinned by sha256 of every file (a URL has no commit: the bytes are fixed, not the URL){sizes}"
    return f"pinned by sha256 of every file (local files){sizes}"


@click.command("info")
@click.argument("model_id")
@registry_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info_cmd(model_id: str, registry: tuple[str, ...], as_json: bool) -> None:
    """Show one registry entry: source, pinning, files, architectures, cache state."""
    entry = load_registry(list(registry) or None).get(model_id)
    cached = cached_files(entry, cache=Cache(), allow_unpinned=True)
    pin = pinning_text(entry)
    data = {
        "id": entry.id, "source": entry.source, "revision": entry.revision, "format": entry.format,
        "layout": entry.layout, "pinning": pin, "pinned": entry.pinned, "weakly_pinned": entry.weakly_pinned,
        "architecture": dict(entry.architecture), "config": dict(entry.config), "license": entry.license,
        "description": entry.description, "homepage": entry.homepage, "head": list(entry.head),
        "registry_file": entry.registry_file, "cached": cached is not None, "probe": entry.probe,
        "files": [{"path": f.path, "sha256": f.sha256, "sha256_prefix": f.sha256_prefix, "size": f.size}
                  for f in entry.files],
    }
    if as_json:
        echo_json(data)
        return
    for key in ("id", "source", "revision", "format", "layout", "pinning", "license", "description", "homepage",
                "registry_file"):
        if data[key] is not None:
            click.echo(f"{key + ':':<15}{data[key]}")
    click.echo(f"{'frameworks:':<15}{', '.join(entry.frameworks()) or '-'}")
    click.echo(f"{'cached:':<15}{'yes' if cached else 'no'}")
    if entry.probe is not None:
        p = entry.probe
        inp, out = p["input"], p["output"]
        click.echo(f"{'probe:':<15}{p['reference']}")
        click.echo(f"{'':<15}input {inp.get('dtype', 'float32')}{list(inp['shape'])} seed {inp.get('seed', 0)} -> "
                   f"output {list(out['shape'])} norm {out.get('norm', '?')}")
    for f in entry.files:
        digest = f.sha256 or (f"{f.sha256_prefix}… (prefix only)" if f.sha256_prefix else "(Hub LFS sha256)")
        click.echo(f"  {f.path}  {human_size(f.size)}  sha256 {digest}")


def register(cli: click.Group) -> None:
    """Attach this module's commands."""
    cli.add_command(list_cmd)
    cli.add_command(info_cmd)
