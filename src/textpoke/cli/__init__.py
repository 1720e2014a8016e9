"""The ``textpoke`` command: one module per command, thin over the library.

Each command module defines ``command`` (a click command). This module lists
them in :data:`COMMANDS` with their one-line help, loads a command's module only
when that command runs (so ``textpoke --version`` or ``textpoke --help`` never
imports numpy, unicorn, iced-x86 or pyelftools), and is the one place where
errors become a message, a hint and an exit status.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator

try:
    import click

    from .._errors import TextpokeError
except KeyboardInterrupt:  # Ctrl-C while Python loads the CLI: say so, no traceback
    sys.stderr.write("textpoke: interrupted\n")
    raise SystemExit(130) from None

#: Every command, in the order `textpoke --help` lists them, with the line it shows
#: there. The command is ``command`` in ``textpoke.cli.<name>``; adding a command
#: is adding its line here (a module that is not there is left out).
COMMANDS: dict[str, str] = {
    "record": "Start a program, trace it until it exits, save the recording.",
    "trace": "Attach to a running process, trace it for a while, detach.",
    "report": "Summarize a recording: calls, times, callers per function; --html flame graph.",
    "dump": "Print every call of a recording: ftrace text, JSON, Perfetto, folded stacks.",
    "graph": "Show a recording's call tree with times per call path.",
    "sites": "List the patchable 5-byte sites of a binary or a process.",
    "patch": "Change sites of a running process; the change stays.",
    "recover": "Put back every site textpoke changed in a process.",
    "hotfix": "Load a fixed function into a running process and redirect every call to it.",
    "selftest": "Check that everything textpoke needs works on this machine.",
    "demo": "Build the bundled demo, trace it live, detach, report.",
    "model": "Run the kernel's int3 patching path on emulated CPUs and check it.",
}

#: Exit status of every command (a TextpokeError carries its own; see _errors.py).
EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "the check failed (a selftest check, a model violation) or another error",
    2: "usage error",
    3: "no such process, or it exited or executed a new program meanwhile",
    4: "permission denied (the reason is named)",
    5: "not a site (not an instruction start, textpoke's own code, ...)",
    6: "not an x86-64 ELF program",
    7: "a batch failed",
    8: "running code in the target failed (injection, agent)",
    9: "another textpoke session holds the process",
    10: "not a user process (zombie, kernel thread)",
    11: "a site's bytes changed since they were listed",
    12: "function, symbol or glob not found, or the binary is stripped",
    13: "unsafe target (a thread blocks SIGTRAP)",
    14: "the target is stopped (SIGSTOP, a debugger)",
    15: "the recording file could not be written (what was written is kept as FILE.partial)",
    16: "a hot-fix textpoke cannot load (TLS, a constructor, a relocation type it does not handle)",
    130: "interrupted (Ctrl-C)",
}

_EPILOG = "\b\nExit status (record: the program's own):\n" + "\n".join(
    f"  {code:<4} {meaning}" for code, meaning in EXIT_CODES.items()
)


def _module_name(command: str) -> str:
    return f"{__name__}.{command}"


class _LazyGroup(click.Group):
    """A group whose commands are imported when they run, not when it starts."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if importlib.util.find_spec(_module_name(name)) is not None]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        try:
            module = importlib.import_module(_module_name(cmd_name))
        except ModuleNotFoundError as exc:
            if exc.name != _module_name(cmd_name):
                raise  # a real bug inside the command: let it show
            return None
        command: click.Command = module.command
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args:  # bare `textpoke`: the help, and success
            click.echo(ctx.get_help())
            ctx.exit(0)
        return super().parse_args(ctx, args)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=_EPILOG)
@click.version_option(package_name="textpoke")
def cli() -> None:
    """Patch and trace calls in running x86-64 Linux processes, exactly."""


@contextlib.contextmanager
def target_errors(pid: int) -> Iterator[None]:
    """A PermissionError that escaped untranslated (``Process`` reads /proc/PID/maps,
    which another user's process does not let us read) as the one-line error it should
    be: PermissionDenied naming why, with the hint that fits (exit 4)."""
    from ..target.process import access_denied

    try:
        yield
    except PermissionError as exc:
        raise access_denied(pid, f"access process {pid}") from exc


def refuse_foreign_tracer(pid: int) -> None:
    """PermissionDenied, as a borrowing attach would raise it, if another tracer holds ``pid``."""
    from ..target.process import access_denied

    try:
        with open(f"/proc/{pid}/status") as f:
            tracer = next((int(line.split()[1]) for line in f if line.startswith("TracerPid:")), 0)
    except (OSError, ValueError):
        return
    if tracer and tracer != os.getpid():
        raise access_denied(pid, f"ptrace process {pid}")


def fail(error: TextpokeError) -> None:
    """Print ``error`` as one line plus a hint and exit with its code."""
    click.echo(f"textpoke: error: {error.message}", err=True)
    if error.hint:
        click.echo(f"textpoke: hint: {error.hint}", err=True)
    sys.exit(error.exit_code)


def _interrupted() -> None:
    click.echo("textpoke: interrupted", err=True)
    sys.exit(130)


def main(argv: list[str] | None = None) -> None:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``) and exit.

    Unlike ``click``'s own ``main`` it prints nothing of its own on Ctrl-C (one
    line, exit 130, wherever it lands) and turns every TextpokeError into the
    error line, the hint line and the error's exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            with cli.make_context("textpoke", args) as ctx:
                cli.invoke(ctx)
        except TextpokeError as error:
            fail(error)
        except (click.exceptions.Abort, KeyboardInterrupt):
            _interrupted()
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except BrokenPipeError:
            # The reader went away (`textpoke ... | head`): nothing more to say to it.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C while reporting another error
        _interrupted()
