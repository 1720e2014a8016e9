"""``textpoke trace -p PID``: attach to a running process, trace, restore, detach."""

from __future__ import annotations

import threading

import click

from ..report import TimeKey, summary_reporter
from . import _capture
from ._capture import (
    LiveCounter,
    capture_options,
    check_writable,
    echo_err,
    final_line,
    notes,
    os_errors,
    output_stream,
    require_process,
    selection_options,
    stop_on_signals,
)


@click.command("trace")
@click.option("-p", "--pid", required=True, type=int, help="The running process to trace.")
@selection_options
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), metavar="S",
              help="Stop after S seconds (default: at Ctrl-C, SIGTERM or SIGHUP).")
@click.option("-o", "--output", metavar="FILE", help="Save the recording to FILE instead of printing the summary.")
@click.option("--lib", "library", metavar="NAME", help="Trace in a library mapped by the process (path or name, e.g. libc.so).")
@click.option("--sort", type=click.Choice([k.value for k in TimeKey]), default=None,
              help="Order of the summary's rows (as `textpoke report --sort`).")
def command(pid: int, functions: tuple[str, ...], calls_to: tuple[str, ...], count: bool, entry_only: bool,
            ring: int | None, drop: bool, wait_limit: float | None, no_compress: bool, duration: float | None,
            output: str | None, library: str | None, sort: str | None) -> None:
    """Trace calls in running process PID until Ctrl-C, SIGTERM or --duration.

    Stopping restores every patched byte and detaches; the process keeps running
    as if textpoke had never been there.  Every call is recorded: a traced
    thread whose buffer is full waits for textpoke (see --drop).  Without -o
    the summary (as `textpoke report` prints it) goes to stdout; with -o the
    recording is saved instead (streamed while tracing, any length).

    \b
    Example:
      textpoke trace -p 1234 -f 'parse_*' --duration 5
      textpoke trace -p 1234 --calls-to malloc --lib libc.so -o malloc.tpk
    """
    require_process(pid)
    if output is not None:
        check_writable(output)
    options = capture_options(functions=functions, calls_to=calls_to, count=count, ring=ring, drop=drop,
                              wait_limit=wait_limit, no_compress=no_compress, entry_only=entry_only,
                              duration=duration, library=library)
    stop = threading.Event()
    with (
        os_errors(f"cannot trace pid {pid}"),
        stop_on_signals(stop),
        LiveCounter(f"tracing pid {pid}") as live,
    ):
        recording = _capture.capture_module().capture_pid(pid, options, output=output, stop_event=stop,
                                                          on_progress=live)
    with recording:
        echo_err(final_line(recording, verb="traced", output=output, note_exit=True))
        for note in notes(recording):
            echo_err(note)
        if output is None:
            reporter = summary_reporter(recording, sort=sort)
            with output_stream(None) as out:
                reporter.render(recording, out)
