"""``hubload check``, ``hubload inspect`` and ``hubload convert``."""

from __future__ import annotations

import sys

import click

from ._common import echo_json, human_size, registry_option

_FRAMEWORKS = click.Choice(["torch", "pt", "pytorch", "tf", "tensorflow", "keras"], case_sensitive=False)


@click.command("check")
@click.argument("source")
@click.option("--framework", "-f", type=_FRAMEWORKS, required=True, help="Build the entry's architecture for this.")
@registry_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--num-classes", type=click.IntRange(1), default=None, help="Check with a re-sized head.")
@click.option("--exclude", multiple=True, help="Glob of model tensors to leave alone (repeatable).")
@click.option("--non-strict", is_flag=True, help="Only shape mismatches count as incompatible.")
@click.option("--verify", "verify", is_flag=True,
              help="Also load into the architecture and compare its output with the entry's probe (downloads).")
def check_cmd(source: str, framework: str, registry: tuple[str, ...], as_json: bool, num_classes: int | None,
              exclude: tuple[str, ...], non_strict: bool, verify: bool) -> None:
    """Compare SOURCE's checkpoint with its architecture, before downloading it when possible.

    Prints the report, its warnings (known cross-framework traps, each naming the layer), the entry's probe
    and, with --verify, the numeric verification against it. Exit 0 when compatible, 1 when not (or when the
    verification failed), 2 on other errors.
    """
    from ..api import check

    report = check(source, framework=framework, registry=list(registry) or None, num_classes=num_classes,
                   exclude=exclude, strict=not non_strict, verify=True if verify else "auto")
    if as_json:
        click.echo(report.to_json(indent=2))
    else:
        click.echo(report.render())
        _echo_probe(source, registry, report)
    failed = report.verification is not None and not report.verification.passed
    ok = report.ok or (non_strict and not report.shape_mismatches and not report.behaviour)
    sys.exit(0 if ok and not failed else 1)


def _echo_probe(source: str, registry: tuple[str, ...], report: object) -> None:
    """One line about the registry entry's probe (whether it ran)."""
    from ..errors import HubloadError
    from ..registry import load_registry

    try:
        entry = load_registry(list(registry) or None).get(source)
    except HubloadError:
        return  # not a registry ID
    if entry.probe is None:
        return
    ran = getattr(report, "verification", None) is not None
    click.echo(f"probe: {entry.probe['reference']}" + ("" if ran else " (not run; pass --verify to run it)"))


@click.command("inspect")
@click.argument("source")
@registry_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--key", default=None, help="Nested state dict to read in a pickle (state_dict, model ...).")
def inspect_cmd(source: str, registry: tuple[str, ...], as_json: bool, key: str | None) -> None:
    """List SOURCE's tensors: name, shape, dtype, bytes (no tensor data is read)."""
    from ..api import inspect

    tensors = inspect(source, registry=list(registry) or None, key=key)
    rows = [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "bytes": t.nbytes} for t in tensors.values()]
    if as_json:
        echo_json(rows)
        return
    width = max((len(r["name"]) for r in rows), default=4)
    for r in rows:
        shape = "[" + ", ".join(map(str, r["shape"])) + "]"
        click.echo(f"{r['name']:<{width}}  {shape:<20} {r['dtype']:<9} {human_size(r['bytes']):>10}")
    click.echo(f"{len(rows)} tensors, {human_size(sum(r['bytes'] for r in rows))}")


@click.command("convert")
@click.argument("source")
@click.option("--layout", type=click.Choice(["torch", "keras"]), required=True, help="Target tensor convention.")
@click.option("--out", "out", type=click.Path(dir_okay=False), required=True, help="Output .safetensors file.")
@registry_option
@click.option("--key", default=None, help="Nested state dict to read in a pickle.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def convert_cmd(source: str, layout: str, out: str, registry: tuple[str, ...], key: str | None,
                as_json: bool) -> None:
    """Re-lay SOURCE out for the torch or keras convention and write it as safetensors."""
    from ..relayout import convert

    summary = convert(source, layout=layout, out=out, registry=list(registry) or None, key=key)
    if as_json:
        echo_json(summary)
        return
    click.echo(f"wrote {summary['tensors']} tensors ({human_size(summary['bytes'])}) in {layout} layout to {out}")
    for name, why in summary["dropped"].items():
        click.echo(f"  dropped {name}: {why}")


def register(cli: click.Group) -> None:
    """Attach this module's commands."""
    for cmd in (check_cmd, inspect_cmd, convert_cmd):
        cli.add_command(cmd)
