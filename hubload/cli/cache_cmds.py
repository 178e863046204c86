"""``hubload verify`` and ``hubload cache ls|rm|prune``."""

from __future__ import annotations

import sys

import click

from ..cache import Cache
from ..fetch import verify as verify_cached
from ._common import echo_json, human_size, registry_option


@click.command("verify")
@click.argument("model_ids", nargs=-1)
@registry_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def verify_cmd(model_ids: tuple[str, ...], registry: tuple[str, ...], as_json: bool) -> None:
    """Re-hash cached files (of MODEL_IDS, or everything); evict any that do not match. Exit 1 if any were bad."""
    results = verify_cached(list(model_ids) or None, registry=list(registry) or None)
    rows = [{"sha256": r.sha256, "path": str(r.path), "status": r.status, "actual": r.actual, "size": r.size}
            for r in results]
    bad = [r for r in rows if r["status"] != "ok"]
    if as_json:
        echo_json({"ok": not bad, "files": rows})
    else:
        for r in rows:
            line = f"{r['status']:<8} {human_size(r['size']):>10}  {r['path']}"
            if r["status"] == "corrupt":
                line += f"  (expected {r['sha256']}, got {r['actual']}; evicted)"
            click.echo(line)
        click.echo(f"{len(rows) - len(bad)} ok, {len(bad)} bad" + ("; pull again to restore them" if bad else ""))
    if bad:
        sys.exit(1)


@click.group("cache")
def cache_group() -> None:
    """Inspect and clean the local cache (HUBLOAD_CACHE)."""


@cache_group.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def cache_ls(as_json: bool) -> None:
    """List cached models, their files and sizes."""
    cache = Cache()
    models = cache.ls()
    if as_json:
        echo_json({"root": str(cache.root), "models": [
            {"id": m.id, "source": m.source, "revision": m.revision, "complete": m.complete,
             "size": m.total_size, "files": [{"path": f.path, "sha256": f.sha256, "size": f.size,
                                               "present": f.present} for f in m.files]} for m in models]})
        return
    click.echo(f"cache: {cache.root}")
    for m in models:
        state = "" if m.complete else "  (incomplete: pull again)"
        click.echo(f"{m.id:<28} {human_size(m.total_size):>10}  {len(m.files)} file(s){state}")
    click.echo(f"{len(models)} model(s), {human_size(sum(m.total_size for m in models))}")


@cache_group.command("rm")
@click.argument("model_ids", nargs=-1, required=True)
def cache_rm(model_ids: tuple[str, ...]) -> None:
    """Remove cached models (blobs still used by another model are kept)."""
    cache = Cache()
    for mid in model_ids:
        if cache.read_ref(mid) is None:
            raise click.ClickException(f"model {mid!r} is not in the cache at {cache.root} (see `hubload cache ls`)")
        freed = cache.remove(mid)
        click.echo(f"removed {mid} ({human_size(freed)} freed)")


@cache_group.command("prune")
def cache_prune() -> None:
    """Delete unreferenced blobs and stale partial downloads."""
    freed = Cache().prune()
    click.echo(f"pruned {human_size(freed)}")


def register(cli: click.Group) -> None:
    """Attach this module's commands."""
    cli.add_command(verify_cmd)
    cli.add_command(cache_group)
