"""``hubload pull ID...``."""

from __future__ import annotations

import click

from ..cache import Cache
from ..fetch import pull_entry
from ..errors import RegistryError, UsageError
from ..registry import load_registry
from ._common import echo_json, human_size, registry_option


@click.command("pull")
@click.argument("model_ids", nargs=-1, required=True)
@registry_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--offline", is_flag=True, default=None, help="Use the cache only (like HUBLOAD_OFFLINE=1).")
@click.option("--prefer-cache", is_flag=True,
              help="Use cached files with zero requests (a branch is not re-resolved) and download only what is "
                   "missing (like HUBLOAD_OFFLINE=prefer).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--parallel", type=click.IntRange(1, 64), default=None, help="Concurrent connections (default 8).")
@click.option("--frozen", is_flag=True,
              help="Refuse entries not pinned to a commit + sha256 + size (run `hubload lock` first).")
def pull_cmd(model_ids: tuple[str, ...], registry: tuple[str, ...], as_json: bool, offline: bool | None,
             prefer_cache: bool, no_progress: bool, parallel: int | None, frozen: bool) -> None:
    """Download and verify the weight files of each MODEL_ID into the cache."""
    if offline and prefer_cache:
        raise UsageError("--offline and --prefer-cache contradict each other: --offline never downloads, "
                         "--prefer-cache downloads what is missing; pass one of them")
    mode: bool | str | None = "prefer" if prefer_cache else offline
    reg = load_registry(list(registry) or None)
    if frozen:
        from .lock_cmds import unpinned_reasons

        loose = {mid: unpinned_reasons(reg.get(mid)) for mid in model_ids}
        loose = {mid: why for mid, why in loose.items() if why}
        if loose:
            detail = "; ".join(f"{mid} ({', '.join(why)})" for mid, why in loose.items())
            raise RegistryError(f"--frozen: not pinned: {detail}; run `hubload lock` on the registry file, "
                                "review the diff, then pull again")
    cache = Cache()
    report = []
    for mid in model_ids:
        entry = reg.get(mid)
        paths = pull_entry(entry, cache=cache, offline=mode, progress=False if no_progress else None,
                           parallel=parallel)
        files = []
        for spec in entry.files:
            local = paths[spec.path]
            blob = local.resolve()
            files.append({"path": spec.path, "local": str(local), "size": blob.stat().st_size,
                          "sha256": blob.name, "verified": "sha256" if spec.sha256 else
                          ("sha256 prefix" if spec.sha256_prefix else "hub LFS sha256")})
        report.append({"id": mid, "files": files})
    if as_json:
        echo_json(report)
        return
    for item in report:
        for f in item["files"]:
            click.echo(f"{item['id']}  {f['path']}  {human_size(f['size'])}  {f['verified']} ok  {f['local']}")


def register(cli: click.Group) -> None:
    """Attach this module's commands."""
    cli.add_command(pull_cmd)
