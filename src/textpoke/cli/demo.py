"""``textpoke demo``: build the bundled program, attach live, trace every call, detach, report.

The demo's three workers call their functions flat out, tens of millions of
times a second; every call becomes a record the tool's ring reader must drain,
or count as lost.  So the demo program runs on one CPU at nice 19: whatever the
machine, the reader gets a CPU and priority (the advice for real use too: give
the tracer a CPU), and a ring of 4M records absorbs the reader's pauses.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import click
from rich.console import Console

from .._errors import TextpokeError
from ..demo import build_demo
from ..report import SummaryReporter
from ..target.process import Process
from ..x86.insn import NOP5
from . import _capture
from ._capture import LiveCounter, final_line, os_errors, stop_on_signals

_DEMO_RING = 1 << 22


def _modest() -> None:
    """In the demo's child before exec: one CPU, lowest priority (see the module docstring)."""
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cpus[-1:])
    os.nice(19)


def _restored(pid: int, addresses: list[int]) -> int:
    """How many of the fentry sites at ``addresses`` hold their nop5 again (read from the live process)."""
    with Process(pid) as process:
        return sum(process.read(address, len(NOP5)) == NOP5 for address in addresses)


@click.command("demo")
@click.option("--duration", default=3.0, show_default=True, help="Seconds to trace calls.")
def command(duration: float) -> None:
    """Build the bundled demo, attach to it while it runs, trace every call, detach."""
    console = Console(stderr=False)
    binary = build_demo()
    console.print(f"[bold]textpoke demo[/]: built {binary}")
    proc = subprocess.Popen([str(binary)], stdout=subprocess.PIPE, text=True, preexec_fn=_modest)
    try:
        ready = proc.stdout.readline()
        if not ready.startswith("ready"):
            raise TextpokeError("the demo program did not start", hint=f"run {binary} by hand to see why")
        console.print(f"started demo pid {proc.pid} (3 worker threads); tracing every function for {duration:g} s")
        capture = _capture.capture_module()
        options = capture.CaptureOptions(duration=duration, ring_records=_DEMO_RING)  # no globs: every fentry site
        stop = threading.Event()
        with (
            os_errors(f"cannot trace pid {proc.pid}"),
            stop_on_signals(stop),
            LiveCounter(f"tracing pid {proc.pid}", console=console) as live,
        ):
            recording = capture.capture_pid(proc.pid, options, stop_event=stop, on_progress=live)
        sites = [site.address for site in recording.sites if site.kind == "fentry"]
        console.print(f"patched {len(sites)} fentry sites in one batch, traced, restored them, detached")
        if proc.poll() is not None:
            raise TextpokeError(f"the demo program died (exit {proc.returncode})", hint="this is a textpoke bug")
        console.print(f"read back from the running process: {_restored(proc.pid, sites)} of {len(sites)} "
                      "sites hold their nop5 again")
        console.print(final_line(recording, verb="traced", output=None), markup=False, highlight=False)
        console.print()
        console.file.flush()
        SummaryReporter().render(recording, sys.stdout)
        sys.stdout.flush()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
        line = out.strip().splitlines()[-1] if out.strip() else ""
        console.print(f"demo program's own result: {line}")
        if proc.returncode != 0 or "checks=ok" not in line:
            raise TextpokeError(f"the demo program reported a problem: {line!r}", hint="this is a textpoke bug")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
