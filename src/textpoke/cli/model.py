"""``textpoke model``: run the kernel's int3 patching path on emulated CPUs and check it.

Exit status 0 when no interleaving violated a check, 1 when one did (the first
one is printed with an annotated trace).  Every variant runs on both ISAs: where
a variant does not exist on an ISA its meaningful analogue runs instead, and the
summary line says which (see :mod:`textpoke.model.variants`).  A run takes
seconds: on a terminal a progress bar counts the interleavings (on stderr),
elsewhere nothing is printed before the report.  unicorn, iced-x86 and rich load
when the command runs, not when the CLI starts.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import click

from .._errors import UsageError
from ..model.names import Arch, Variant

if TYPE_CHECKING:
    from rich.console import Console

    from ..model import ModelConfig, Report

#: Defaults of --steps: instructions per interleaving (random), per CPU (exhaustive).
RANDOM_STEPS = 20_000
EXHAUSTIVE_STEPS = 60
RANDOM_RUNS = 20
MAX_CPUS = 16


@click.command("model")
@click.option("--arch", type=click.Choice([a.value for a in Arch]), default=Arch.X86_64.value,
              show_default=True, help="Which kernel to run.")
@click.option("--variant", type=click.Choice([v.value for v in Variant]), default=Variant.PROPOSED.value,
              show_default=True, help="The design under test: proposed (the 2019 design as posted: on x86-32 "
              "the handler moves the frame and returns it) and merged (what Linux merged: on x86-32 complete "
              "trap frames) pass; no-gap, skip and no-int3 fail on both ISAs, notifier on i386.  A variant "
              "without a form on the ISA runs its analogue; the first output line says which.")
@click.option("--cpus", type=click.IntRange(1, MAX_CPUS), default=2, show_default=True,
              help="Emulated CPUs sharing the memory.")
@click.option("--steps", type=click.IntRange(1), default=None,
              help=f"Random: instructions per interleaving, all CPUs (default {RANDOM_STEPS}). "
              f"Exhaustive: instructions per CPU (default {EXHAUSTIVE_STEPS}).")
@click.option("--seed", type=int, default=None, help="Random seed of the interleavings (default 1).")
@click.option("--runs", type=click.IntRange(1), default=None,
              help=f"Random interleavings to run (default {RANDOM_RUNS}).")
@click.option("--exhaustive", is_flag=True, help="Every interleaving class within --steps, patch by patch.")
@click.option("--trace-lines", type=click.IntRange(0), default=60, show_default=True,
              help="Steps of the failing CPU shown in the annotated trace.")
def command(
    *,
    arch: str,
    variant: str,
    cpus: int,
    steps: int | None,
    seed: int | None,
    runs: int | None,
    exhaustive: bool,
    trace_lines: int,
) -> None:
    """Run the Linux kernel's int3 patching path (ftrace, 2019) on emulated x86-64 / x86-32 CPUs and check it."""
    if exhaustive and seed is not None:
        raise UsageError("--seed and --exhaustive exclude each other",
                         hint="an exhaustive run has no randomness; drop one of them")
    if exhaustive and runs is not None:
        raise UsageError("--runs applies to random runs only",
                         hint="bound an exhaustive run with --steps and --cpus")
    from rich.console import Console

    from ..model import ModelConfig, run_model
    from ..model.machine import interruptible

    config = ModelConfig(
        arch=Arch(arch),
        variant=Variant(variant),
        cpus=cpus,
        steps=steps if steps is not None else (EXHAUSTIVE_STEPS if exhaustive else RANDOM_STEPS),
        runs=runs if runs is not None else RANDOM_RUNS,
        seed=seed if seed is not None else 1,
        exhaustive=exhaustive,
        trace_lines=trace_lines,
    )
    with _progress(config) as progress, interruptible():
        report = run_model(config, progress=progress)
    console = Console(highlight=False)
    print_report(console, report)
    if report.violating:
        sys.exit(1)


@contextmanager
def _progress(config: ModelConfig) -> Iterator[Callable[[int], None] | None]:
    """A progress bar of interleavings on stderr when it is a terminal; else nothing."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    total = None if config.exhaustive else config.runs
    columns = [TextColumn(f"textpoke model {config.arch.value} / {config.variant.value}"), BarColumn(),
               MofNCompleteColumn() if total else TextColumn("{task.completed} interleavings"), TimeElapsedColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("interleavings", total=total)
        yield lambda done: bar.update(task, completed=done)


def print_report(console: Console, report: Report) -> None:
    """Summary table, per-site table, and the first violation with its trace."""
    from rich.table import Table

    from ..model import Arch, SitePhase
    config, spec = report.config, report.spec
    mode = (f"exhaustive, {config.steps} instructions per CPU" if config.exhaustive
            else f"random (random seed {config.seed}), {config.steps} instructions per interleaving")
    console.print(f"[bold]textpoke model[/bold] {config.arch.value} / {config.variant.value}: {spec.summary}")
    console.print(f"{config.cpus} CPUs, {mode}", markup=False)

    summary = Table(title="summary", show_header=True)
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    for metric, value in (
        ("interleavings", f"{report.interleavings}"),
        ("instructions", f"{report.instructions} ({report.instructions_per_second:,.0f}/s)"),
        ("calls through sites", f"{report.calls}"),
        ("  reached old target", f"{report.old_hits}"),
        ("  reached new target", f"{report.new_hits}"),
        ("callback records", f"{report.records}"),
        ("patcher steps", f"{report.patcher_steps}"),
        ("violations", f"{report.violating}"),
    ):
        summary.add_row(metric, value)
    console.print(summary)

    sites = Table(title="per site (traps and executions while it changed)", show_header=True)
    for name in ("site", "calls", "old", "new", "int3 trap", "tail trap", "head new", "records"):
        sites.add_column(name, justify="left" if name == "site" else "right")
    for s in report.sites:
        sites.add_row(
            s.name, str(s.calls), str(s.old_hits), str(s.new_hits),
            str(s.phase(SitePhase.INT3).traps), str(s.phase(SitePhase.TAIL).traps),
            str(s.phase(SitePhase.HEAD).executed_new), str(s.callbacks),
        )
    console.print(sites)
    console.print(f"traced_func bodies run: {report.bodies}; calls from cpu_loop: {report.loop_calls}",
                  markup=False)

    expect = spec.expect.value if spec.expect is not None else "no violation"
    if report.kinds:
        kinds = ", ".join(f"{kind.value}: {n}" for kind, n in report.kinds.items())
        console.print(f"violations by kind: {kinds} (expected for this variant: {expect})", markup=False)
    else:
        console.print(f"no violation (expected for this variant: {expect})", markup=False)

    first = report.first
    if first is None:
        return
    v = first.violation
    console.print()
    console.print(f"[bold red]first violation[/bold red]: {v.kind.value}, cpu{v.cpu}, step {v.step}")
    console.print(f"  {v.message}", markup=False)
    console.print(f"  interleaving: {first.interleaving}", markup=False)
    word = 8 if config.arch is Arch.X86_64 else 4
    for line in first.trace_lines(limit=config.trace_lines, word=word):
        console.print(line, markup=False, soft_wrap=True)
