"""``textpoke recover``: undo what textpoke changed in a process, whatever state it was left in.

Finishes any batch a killed textpoke left in flight and puts every site back
to its original bytes (or, with ``--to baseline``, to what sessions committed),
in one batch. The resident handler, agent and trampolines stay mapped (a thread
may still be running in them), idle.
"""

from __future__ import annotations

import click

from .._errors import UnsafeTarget
from ..poke.recover import Recovery, Restore, SiteState, inspect, recover
from ..poke.resident import wait_unfinished
from ..poke.session import attach
from ..target.process import Process
from ..target.security import check_architecture


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _line(state: SiteState, restore: Restore) -> str:
    goal = state.goal(restore)
    flight = f" in flight (int3, entry {state.entry.hex(' ')})" if state.in_flight and state.entry else ""
    return f"{state.site:#x}: {state.current.hex(' ')}{flight} -> {goal.hex(' ')}"


def _summary(pid: int, result: Recovery) -> str:
    parts = [f"process {pid}: {_plural(result.sites, 'site')} known to textpoke"]
    if result.in_flight:
        parts.append(f"{len(result.in_flight)} left in flight by an interrupted batch")
    parts.append(f"{len(result.written)} rewritten to their {result.restore.value} bytes ({result.syncs} syncs)")
    return ", ".join(parts)


@click.command("recover")
@click.option("-p", "--pid", type=int, required=True, help="The process.")
@click.option("--to", "to", type=click.Choice([r.value for r in Restore]), default=Restore.ORIGINAL.value,
              show_default=True, help="original: as before textpoke; baseline: keep committed `textpoke patch` changes.")
@click.option("--dry-run", is_flag=True, help="Show what would be rewritten; write nothing.")
@click.option("-v", "--verbose", is_flag=True, help="One line per site rewritten.")
def command(pid: int, to: str, dry_run: bool, verbose: bool) -> None:
    """Put back every site textpoke changed in PID, finishing half-done batches."""
    restore = Restore(to)
    with Process(pid) as process:
        check_architecture(pid)
        region, states = inspect(process)
    if region is None:
        with Process(pid) as process:
            unfinished = wait_unfinished(process)
        if not unfinished:
            click.echo(f"process {pid} holds nothing of textpoke; nothing to recover")
            return
        if dry_run:
            click.echo(f"process {pid}: a textpoke killed during its first attach left its agent thread waiting; "
                       "recover would finish installing it (no site was changed)")
            return
        attach(pid, restore=None, refuse_unsafe=False).close(revert=False)
        click.echo(f"process {pid}: finished the install a killed textpoke left (its agent thread was waiting); "
                   "no site had been changed")
        return
    if dry_run:
        pending = [s for s in states if s.in_flight or s.current != s.goal(restore)]
        for state in pending:
            click.echo(_line(state, restore))
        click.echo(f"process {pid}: {_plural(len(states), 'site')} known to textpoke, "
                   f"{len(pending)} would be rewritten to their {restore.value} bytes")
        return
    # No automatic recovery on this attach: the one batch below does it all.
    session = attach(pid, restore=None, refuse_unsafe=False)
    try:
        before = {s.site: s for s in states}
        result = recover(session.resident, restore=restore)
        prepared = session.recovery
    finally:
        session.close(revert=False)
    if verbose:
        for site in result.written:
            if site in before:
                click.echo(_line(before[site], restore))
    click.echo(_summary(pid, result))
    if prepared is not None and prepared.inherited_from:
        click.echo(f"copied the state inherited from the parent process (region {prepared.inherited_from:#x})")
    if prepared is not None and prepared.handler_reinstalled:
        click.echo("the program had replaced textpoke's SIGTRAP handler: reinstalled in front of the program's")
    if result.foreign:
        click.echo(f"left alone {_plural(len(result.foreign), 'site')} holding bytes neither textpoke's nor the "
                   f"program's: {', '.join(f'{s:#x}' for s in result.foreign[:8])}")
    click.echo(f"textpoke's handler and agent stay in the process, idle; {result.trampoline_regions} trampoline "
               "regions stay mapped, unused")
    if result.held_back:
        raise UnsafeTarget(
            f"{_plural(len(result.held_back), 'site')} of process {pid} were left as they are: a thread blocks "
            "SIGTRAP, and putting them back needs an int3 there",
            hint="run `textpoke recover` again when no thread blocks SIGTRAP",
        )
