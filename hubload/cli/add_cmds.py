"""``hubload add hf://ORG/NAME[@REV]``: a complete, validated, pinned registry entry from the Hub's metadata."""

from __future__ import annotations

import re

import click

from .. import config
from ..cache import Cache
from ..errors import HubloadError
from ._common import EXIT_CODES, echo_json, exit_code, fail

__all__ = ["EXIT_CODES", "exit_code", "parse_repo_source", "register"]


_REPO_SOURCE = re.compile(r"^hf://(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w./-]+))?/?$")


def parse_repo_source(source: str) -> tuple[str, str | None]:
    """``hf://org/name[@rev]`` → ``(repo_id, rev)``.

    Raises:
        click.BadParameter: Not of that shape.
    """
    m = _REPO_SOURCE.match(source)
    if not m or ".." in source:
        raise click.BadParameter(f"{source!r} is not hf://ORG/NAME[@REVISION] "
                                 "(e.g. hf://sentence-transformers/all-MiniLM-L6-v2@main)", param_hint="SOURCE")
    return m["repo"], m["rev"]


def entry_fields(res: object, homepage: bool = True) -> dict[str, object]:
    """Registry fields (in file order) for a :class:`~hubload.hub_repo.RepoResolution`."""
    fields: dict[str, object] = {
        "source": f"hf://{res.repo_id}", "revision": res.commit, "files": [dict(f) for f in res.files],
        "format": res.format, "layout": res.layout, "architecture": dict(res.architecture),
    }
    if homepage:
        fields["homepage"] = f"{res.endpoint}/{res.repo_id}"
    fields["config"] = dict(res.config)
    return fields


def provenance(res: object, command: str) -> list[str]:
    """The provenance comment lines of an entry written by `add`/`lock`."""
    return [f"{command} on {res.resolved_at} from {res.endpoint}: revision {res.revision!r} = commit {res.commit}",
            "sha256/size: the Hub's LFS metadata; plain files (config.json ...) downloaded at the commit and "
            "hashed locally",
            f"weights: {res.weights.reason}"]


@click.command("add")
@click.argument("source")
@click.option("--id", "model_id", default=None, help="Registry ID (default: the repo name, lower-cased).")
@click.option("--registry", "registry_file", type=click.Path(dir_okay=False), default=None,
              help="Registry file to write (default: the user registry).")
@click.option("--include", "include", multiple=True, metavar="GLOB",
              help="Also pin these repo files (e.g. tokenizer.json); repeatable.")
@click.option("--force", is_flag=True, help="Replace an entry of the same ID.")
@click.option("--json", "as_json", is_flag=True, help="Print the entry (or the error) as JSON.")
def add_cmd(source: str, model_id: str | None, registry_file: str | None, include: tuple[str, ...], force: bool,
            as_json: bool) -> None:
    """Pin a Hub repo: resolve REV (default main) to its commit, choose the weights, write the entry.

    SOURCE is hf://ORG/NAME[@REVISION]. Exit codes: 0 written, 2 error, 3 repo or revision not found,
    4 gated/private without access, 5 no weight files.
    """
    from ..hub_repo import resolve_repo
    from ..lockfile import add_entry, render_entry

    repo_id, rev = parse_repo_source(source)
    mid = model_id or repo_id.rpartition("/")[2].lower()
    path = registry_file or str(config.user_registry_path())
    try:
        res = resolve_repo(repo_id, rev, include=include, cache=Cache())
        fields = entry_fields(res)
        block = render_entry(mid, fields, comments=provenance(res, f"`hubload add {source}`"))
        replaced = add_entry(path, mid, block, replace=force)
    except HubloadError as exc:
        fail(exc, as_json)
    if as_json:
        echo_json({"ok": True, "id": mid, "registry": path, "replaced": replaced, **res.to_json()})
        return
    click.echo(f"{'replaced' if replaced else 'added'} {mid!r} in {path}")
    click.echo(f"  hf://{repo_id}@{res.revision} -> commit {res.commit}")
    click.echo(f"  weights: {res.weights.reason}")
    for f in res.files:
        click.echo(f"  {f['path']}  {f['size']} bytes  sha256 {f['sha256']}")
    arch = ", ".join(f"{k}: {v}" for k, v in res.architecture.items()) or "none"
    click.echo(f"  format {res.format}, layout {res.layout}, architecture {arch}")
    for note in res.notes:
        click.echo(f"  note: {note}")


def register(cli: click.Group) -> None:
    """Attach this module's commands."""
    cli.add_command(add_cmd)
