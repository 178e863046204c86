"""Small helpers shared by the CLI command modules."""

from __future__ import annotations

import json
from typing import Any

import click

__all__ = ["echo_json", "human_size", "registry_option"]


def human_size(n: int | None) -> str:
    """1536 -> '1.5 KiB'."""
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def echo_json(data: Any) -> None:
    """Print ``data`` as indented JSON on stdout."""
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


registry_option = click.option(
    "--registry", "registry", multiple=True, type=click.Path(dir_okay=False),
    help="Extra registry YAML file(s), looked up before HUBLOAD_REGISTRY and the built-in one.",
)
