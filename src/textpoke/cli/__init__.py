"""The ``textpoke`` command: one module per command, thin over the library.

Each command module defines ``command`` (a click command); this module adds
them to the group and is the one place where errors become a message, a hint and
an exit status.
"""

from __future__ import annotations

import importlib
import sys

import click

from .._errors import TextpokeError

# One module per command (uftrace style); a module that is not there yet is skipped.
_COMMAND_MODULES = (
    "sites",
    "patch",
    "selftest",
    "record",
    "trace",
    "report",
    "graph",
    "dump",
    "demo",
    "recover",
    "model",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="textpoke")
def cli() -> None:
    """Patch and trace calls in running x86-64 Linux processes, exactly."""


for _name in _COMMAND_MODULES:
    try:
        _module = importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{_name}":
            raise
        continue
    cli.add_command(_module.command)


def fail(error: TextpokeError) -> None:
    """Print ``error`` as one line plus a hint and exit with its code."""
    click.echo(f"textpoke: error: {error.message}", err=True)
    if error.hint:
        click.echo(f"textpoke: hint: {error.hint}", err=True)
    sys.exit(error.exit_code)


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="textpoke", standalone_mode=False)
    except TextpokeError as error:
        fail(error)
    except click.exceptions.Abort:
        click.echo("textpoke: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
