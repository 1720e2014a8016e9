"""``textpoke demo``: build the bundled program, attach live, trace every call, detach, report.

The demo's three workers call their functions flat out, on every CPU, at normal
priority; every call becomes a record, and none is lost: a worker whose buffer
is full waits for textpoke's reader (the recording's default), so the demo's
own counts and the recording's agree exactly.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

import click
from rich.console import Console

from .._errors import TextpokeError
from ..demo import build_demo
from ..report import summary_reporter
from ..target.process import Process
from ..x86.insn import NOP5
from . import _capture
from ._capture import LiveCounter, final_line, os_errors, stop_on_signals

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
    proc = subprocess.Popen([str(binary)], stdout=subprocess.PIPE, text=True)
    try:
        ready = proc.stdout.readline()
        if not ready.startswith("ready"):
            raise TextpokeError("the demo program did not start", hint=f"run {binary} by hand to see why")
        console.print(f"started demo pid {proc.pid} (3 worker threads); tracing every function for {duration:g} s")
        capture = _capture.capture_module()
        options = capture.CaptureOptions(duration=duration)  # no globs: every fentry site; lossless
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
        console.print(final_line(recording, verb="traced", output=None), markup=False, highlight=False,
                      soft_wrap=True)
        console.print()
        console.file.flush()
        with recording:
            summary_reporter(recording).render(recording, sys.stdout)
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
