"""``textpoke record``: start a program, trace it until it exits, save the recording."""

from __future__ import annotations

import os
import sys
import threading

import click

from . import _capture
from ._capture import (
    selection_options,
    DEFAULT_OUTPUT,
    LiveCounter,
    RingSize,
    capture_options,
    check_writable,
    echo_err,
    final_line,
    save_recording,
    os_errors,
    stop_on_signals,
)


def exit_status(returncode: int) -> int:
    """A child's status as a shell reports it: 128 + N when signal N killed it."""
    return 128 - returncode if returncode < 0 else returncode


@click.command("record", context_settings={"allow_interspersed_args": False})
@selection_options
@click.option("-o", "--output", default=DEFAULT_OUTPUT, show_default=True, metavar="FILE",
              help="Where to save the recording.")
@click.option("--ring", type=RingSize(), metavar="N",
              help="Ring buffer size in records (e.g. 1M); calls beyond what the reader keeps up with are counted as lost.")
@click.option("--lib", "library", metavar="NAME", help="Trace in a shared library of the program (path or name, e.g. libc.so).")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED, metavar="-- CMD [ARGS]...")
def command(functions: tuple[str, ...], calls_to: tuple[str, ...], count: bool, output: str,
            ring: int | None, library: str | None, argv: tuple[str, ...]) -> None:
    """Start CMD, trace it until it exits, and save the recording to FILE.

    Like `time` and `strace`, textpoke exits with CMD's own exit status (128+N if
    signal N killed it), and its own messages go to stderr, so CMD's output stays
    as it was.  Ctrl-C stops tracing; CMD receives it too, as without textpoke.

    \b
    Example:
      textpoke record -f 'work*' -o run.tpk -- ./server --port 8080
      textpoke report run.tpk
    """
    check_writable(output)
    options = capture_options(functions=functions, calls_to=calls_to, count=count, ring=ring, library=library)
    stop = threading.Event()
    with (
        os_errors(f"cannot record {argv[0]}"),
        stop_on_signals(stop),
        LiveCounter(f"recording {os.path.basename(argv[0])}") as live,
    ):
        recording, returncode = _capture.capture_module().capture_command(
            list(argv), options, stop_event=stop, on_progress=live)
    save_recording(recording, output)
    echo_err(final_line(recording, verb="recorded", output=output))
    sys.stdout.flush()
    raise SystemExit(exit_status(returncode))

