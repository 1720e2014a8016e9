"""``textpoke record``: start a program, trace it until it exits, stream the recording to a file."""

from __future__ import annotations

import os
import signal
import sys
import threading

import click

from .._errors import TextpokeError
from . import _capture
from ._capture import (
    DEFAULT_OUTPUT,
    LiveCounter,
    capture_options,
    check_writable,
    echo_err,
    final_line,
    notes,
    os_errors,
    selection_options,
    stop_on_signals,
)

#: Signals textpoke passes on to the program it started: they were meant for it
#: (a supervisor stopping the job, a hangup). SIGINT is not passed on: the terminal's
#: Ctrl-C reaches the program itself, as every process of the foreground job.
FORWARDED = (signal.SIGTERM, signal.SIGHUP)


def exit_status(returncode: int) -> int:
    """A child's status as a shell reports it: 128 + N when signal N killed it."""
    return 128 - returncode if returncode < 0 else returncode


@click.command("record", context_settings={"allow_interspersed_args": False})
@selection_options
@click.option("-o", "--output", default=DEFAULT_OUTPUT, show_default=True, metavar="FILE",
              help="Where to save the recording (written while tracing, as FILE.partial until it is whole).")
@click.option("--lib", "library", metavar="NAME", help="Trace in a shared library of the program (path or name, e.g. libc.so).")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED, metavar="-- CMD [ARGS]...")
def command(functions: tuple[str, ...], calls_to: tuple[str, ...], count: bool, entry_only: bool, ring: int | None,
            drop: bool, wait_limit: float | None, no_compress: bool, output: str, library: str | None,
            argv: tuple[str, ...]) -> None:
    """Start CMD, trace it until it exits, and save the recording to FILE.

    Every call is recorded: a traced thread whose buffer is full waits for
    textpoke (see --drop).  The recording streams to FILE.partial while CMD
    runs and becomes FILE when it is whole, so it may be longer than memory,
    and a recording cut short stays readable up to its last whole chunk.

    Like `time` and `strace`, textpoke exits with CMD's own exit status (128+N if
    signal N killed it), and its own messages go to stderr, so CMD's output stays
    as it was.  Ctrl-C (or SIGTERM, SIGHUP) stops tracing: every site is restored
    and the recording saved; CMD gets the signal as it would without textpoke
    (SIGTERM and SIGHUP are passed on to it) and textpoke waits for it to exit;
    a second Ctrl-C leaves it running.  A selection that matches nothing is
    refused before CMD runs an instruction of its own.

    \b
    Example:
      textpoke record -f 'work*' -o run.tpk -- ./server --port 8080
      textpoke report run.tpk
    """
    check_writable(output)
    options = capture_options(functions=functions, calls_to=calls_to, count=count, ring=ring, drop=drop,
                              wait_limit=wait_limit, no_compress=no_compress, entry_only=entry_only,
                              library=library)
    stop, abandon = threading.Event(), threading.Event()
    program: list[int] = []
    name = os.path.basename(argv[0])

    def on_signal(signum: int) -> None:
        if stop.is_set():
            abandon.set()  # a second one: stop waiting for the program
        if program and signum in FORWARDED:
            try:
                os.kill(program[0], signum)
            except OSError:
                pass

    def on_traced(recording: object) -> None:
        echo_err(final_line(recording, verb="recorded", output=output))  # type: ignore[arg-type]
        for note in notes(recording):  # type: ignore[arg-type]
            echo_err(note)
        if stop.is_set():
            echo_err(f"textpoke: tracing stopped; every site is restored and {name} (pid {program[0]}) runs on "
                     "untraced; waiting for it to exit (Ctrl-C again to leave it running)")

    failed: list[TextpokeError] = []

    def on_failure(error: TextpokeError) -> None:
        failed.append(error)
        stop.set()  # so that one Ctrl-C leaves the program running
        live.stop()
        echo_err(f"textpoke: error: {error.message}")
        if error.hint:
            echo_err(f"textpoke: hint: {error.hint}")
        echo_err(f"textpoke: {name} (pid {program[0]}) runs on; waiting for it to exit "
                 "(Ctrl-C to leave it running)")

    try:
        with (
            os_errors(f"cannot record {argv[0]}"),
            stop_on_signals(stop, on_signal=on_signal),
            LiveCounter(f"recording {name}") as live,
        ):
            recording, returncode = _capture.capture_module().capture_command(
                list(argv), options, output=output, stop_event=stop, abandon_event=abandon,
                on_start=program.append, on_progress=live, on_traced=lambda r: (live.stop(), on_traced(r)),
                on_failure=on_failure)
    except TextpokeError as error:
        if failed and failed[0] is error:
            raise SystemExit(error.exit_code) from None  # said already, when it happened
        raise
    sys.stdout.flush()
    if returncode is None:
        echo_err(f"textpoke: {name} (pid {recording.pid}) keeps running, untraced: "
                 f"`kill {recording.pid}` ends it")
        raise SystemExit(0)
    raise SystemExit(exit_status(returncode))
