"""The ``hubload`` command line: thin wiring over the library API, one module per command group.

Known errors print one line and exit non-zero; ``HUBLOAD_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from .. import __version__, config
from ..errors import HubloadError, IncompatibleWeightsError

__all__ = ["main"]

# Exit codes: 1 = the command's answer is "no" (e.g. incompatible, verification failed); 2 = an error.
EXIT_ERROR = 2


class _Group(click.Group):
    """A click group that maps hubload errors to one-line messages."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except IncompatibleWeightsError as exc:
            if config.debug():
                raise
            click.echo(f"hubload: error: {exc}", err=True)
            sys.exit(1)
        except HubloadError as exc:
            if config.debug():
                raise
            click.echo(f"hubload: error: {type(exc).__name__}: {exc}", err=True)
            sys.exit(EXIT_ERROR)
        except KeyboardInterrupt:
            click.echo("hubload: interrupted (a partial download resumes next time)", err=True)
            sys.exit(130)
        except Exception as exc:  # a bug or an unforeseen failure: still one line unless debugging
            if config.debug():
                raise
            click.echo(f"hubload: unexpected error: {type(exc).__name__}: {exc} "
                       "(set HUBLOAD_DEBUG=1 for the traceback and please report it)", err=True)
            sys.exit(EXIT_ERROR)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hubload")
def cli() -> None:
    """Pull verified model weights and load them into PyTorch or Keras models."""


def _register() -> None:
    """Attach the command modules (imported here so `hubload --help` stays quick)."""
    from . import add_cmds, cache_cmds, load_cmds, lock_cmds, pull_cmds, registry_cmds

    for mod in (pull_cmds, registry_cmds, cache_cmds, load_cmds, add_cmds, lock_cmds):
        mod.register(cli)


_register()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="hubload")
