"""``textpoke demo``: build the bundled program, attach live, count, detach, report."""

from __future__ import annotations

import signal
import subprocess
import time

import click
from rich.console import Console
from rich.live import Live
from rich.table import Table

from .._errors import TextpokeError
from ..demo import build_demo
from ..poke.session import attach
from ..sites.discover import SiteKind
from ..sites.process import sites_in_process
from ..trampolines.counter import CountingSession


def _table(names: list[str], counts, seconds: float, *, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("function")
    table.add_column("calls", justify="right")
    table.add_column("calls/s", justify="right")
    order = sorted(range(len(names)), key=lambda i: -int(counts[i]))
    for i in order:
        calls = int(counts[i])
        table.add_row(names[i], f"{calls:,}", f"{calls / seconds:,.0f}" if seconds > 0 else "-")
    return table


@click.command("demo")
@click.option("--duration", default=3.0, show_default=True, help="Seconds to count calls.")
def command(duration: float) -> None:
    """Build the bundled demo, attach to it while it runs, count every call, detach."""
    console = Console(stderr=False)
    binary = build_demo()
    console.print(f"[bold]textpoke demo[/]: built {binary}")
    proc = subprocess.Popen([str(binary)], stdout=subprocess.PIPE, text=True)
    try:
        ready = proc.stdout.readline()
        if not ready.startswith("ready"):
            raise TextpokeError("the demo program did not start", hint=f"run {binary} by hand to see why")
        console.print(f"started demo pid {proc.pid} (3 worker threads)")
        with attach(proc.pid) as session:
            sites = sites_in_process(proc.pid, kinds={SiteKind.FENTRY})
            names = [s.function for s in sites]
            stop_us = session.resident.attach_stop_ns / 1e3
            console.print(f"attached: one thread stopped {stop_us:.0f} us to install the resident handler")
            before = session.stats()
            with CountingSession(session, [s.address for s in sites]) as counting:
                console.print(f"patched {len(sites)} fentry sites in one batch "
                              f"({counting.patch_seconds * 1e3:.1f} ms, 3 syncs); counting for {duration:g} s")
                started = time.monotonic()
                with Live(console=console, refresh_per_second=4, transient=True) as live:
                    while (elapsed := time.monotonic() - started) < duration:
                        live.update(_table(names, counting.counts(), elapsed, title="live"))
                        time.sleep(0.25)
                counts = counting.counts()
                seconds = time.monotonic() - started
            after = session.stats()
        console.print(_table(names, counts, seconds, title=f"calls counted live in {seconds:.1f} s"))
        console.print(f"detached: every site restored; batches used {after.syncs - before.syncs} syncs, "
                      f"{after.emulated - before.emulated} traps were emulated by the resident handler")
        if proc.poll() is not None:
            raise TextpokeError(f"the demo program died (exit {proc.returncode})", hint="this is a textpoke bug")
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
