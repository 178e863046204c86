"""Small helpers shared by the CLI command modules."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import click

from .. import config
from ..errors import AccessDeniedError, HubloadError, ModelNotFoundError, NoWeightsError

__all__ = ["EXIT_CODES", "echo_json", "exit_code", "fail", "human_size", "registry_option"]

# Exit codes of `add` (and `lock`): 0 done; 1 `lock --check` found unpinned entries; 2 any other error;
# 3 repo or revision not found; 4 access denied (gated/private, no usable token); 5 no weight files.
EXIT_CODES = {NoWeightsError: 5, AccessDeniedError: 4, ModelNotFoundError: 3}


def exit_code(exc: HubloadError) -> int:
    """The exit code for an error of `add`/`lock` (see :data:`EXIT_CODES`; 2 for the rest)."""
    for cls, code in EXIT_CODES.items():
        if isinstance(exc, cls):
            return code
    return 2


def fail(exc: HubloadError, as_json: bool) -> NoReturn:
    """Report ``exc`` (one line on stderr, or a JSON object on stdout) and exit with :func:`exit_code`.

    With ``HUBLOAD_DEBUG=1`` the error is re-raised for its traceback instead.
    """
    if config.debug():
        raise exc
    code = exit_code(exc)
    if as_json:
        echo_json({"ok": False, "error": type(exc).__name__, "message": str(exc), "exit_code": code})
    else:
        click.echo(f"hubload: error: {type(exc).__name__}: {exc}", err=True)
    sys.exit(code)


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
