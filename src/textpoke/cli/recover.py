"""``textpoke recover``: undo what textpoke changed in a process, whatever state it was left in.

Finishes any batch a killed textpoke left in flight and puts every site back
to its original bytes (or, with ``--to baseline``, to what sessions committed),
in one batch. The resident handler, agent and trampolines stay mapped (a thread
may still be running in them), idle. Sites are named by function (the ELF
symbols of the object each lies in), so the user sees what was undone.

The poke and sites machinery (numpy, iced-x86, pyelftools) is imported when the
command runs, not when the CLI starts.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

import click

from .._errors import TextpokeError, UnsafeTarget
from ..target.maps import read_maps
from ..target.process import Process
from ..target.security import check_architecture, owning_mapping
from . import target_errors

if TYPE_CHECKING:
    from ..poke.recover import Recovery, Restore, SiteState

_RESTORES = ("original", "baseline")  # textpoke.poke.recover.Restore's values (a test keeps them equal)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def site_names(pid: int, sites: Iterable[int]) -> dict[int, str]:
    """``function+offset`` of each runtime address of ``pid`` that lies in a
    function of a mapped ELF file (``in LIB`` added outside the executable);
    addresses with no symbol are left out."""
    from ..sites import mapped_object

    maps = read_maps(pid)
    try:
        exe = os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
    except OSError:
        exe = ""
    objects: dict[str, object] = {}
    names: dict[int, str] = {}
    for site in sites:
        mapping = owning_mapping(maps, site)
        if mapping is None or not mapping.inode or not mapping.path.startswith("/"):
            continue
        path = mapping.file_path
        if path not in objects:
            try:
                objects[path] = mapped_object(pid, path=path)
            except TextpokeError:
                objects[path] = None
        found = objects[path]
        if found is None:
            continue
        obj, image = found  # type: ignore[misc]
        name = image.name_of(site - obj.base)
        if name is None:
            continue
        if "+" not in name:
            name += "+0x0"
        names[site] = name if path == exe else f"{name} in {os.path.basename(path)}"
    return names


def _line(state: SiteState, restore: Restore, names: dict[int, str]) -> str:
    goal = state.goal(restore)
    flight = f" in flight (int3, entry {state.entry.hex(' ')})" if state.in_flight and state.entry else ""
    name = f" ({names[state.site]})" if state.site in names else ""
    return f"{state.site:#x}{name}: {state.current.hex(' ')}{flight} -> {goal.hex(' ')}"


def _summary(pid: int, result: Recovery) -> str:
    parts = [f"process {pid}: {plural(result.sites, 'site')} known to textpoke"]
    if result.in_flight:
        parts.append(f"{len(result.in_flight)} left in flight by an interrupted batch")
    parts.append(f"{len(result.written)} rewritten to {'its' if len(result.written) == 1 else 'their'} "
                 f"{result.restore.value} bytes ({plural(result.syncs, 'sync')})")
    return ", ".join(parts)


@click.command("recover")
@click.option("-p", "--pid", type=int, required=True, help="The process.")
@click.option("--to", "to", type=click.Choice(_RESTORES), default=_RESTORES[0],
              show_default=True, help="original: as before textpoke; baseline: keep committed `textpoke patch` changes.")
@click.option("--dry-run", is_flag=True, help="Show what would be rewritten; write nothing.")
@click.option("-v", "--verbose", is_flag=True, help="One line per site rewritten.")
def command(pid: int, to: str, dry_run: bool, verbose: bool) -> None:
    """Put back every site textpoke changed in PID, finishing half-done batches."""
    with target_errors(pid):
        _recover(pid, to, dry_run=dry_run, verbose=verbose)


def _recover(pid: int, to: str, *, dry_run: bool, verbose: bool) -> None:
    from ..poke.recover import Restore, inspect, recover
    from ..poke.resident import wait_unfinished
    from ..poke.session import attach

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
        names = site_names(pid, [s.site for s in pending])
        for state in pending:
            click.echo(_line(state, restore, names))
        click.echo(f"process {pid}: {plural(len(states), 'site')} known to textpoke, "
                   f"{len(pending)} would be rewritten to {'its' if len(pending) == 1 else 'their'} "
                   f"{restore.value} bytes")
        return
    # No automatic recovery on this attach: the one batch below does it all.
    session = attach(pid, restore=None, refuse_unsafe=False)
    try:
        before = {s.site: s for s in states}
        result = recover(session.resident, restore=restore)
        prepared = session.recovery
    finally:
        session.close(revert=False)
    names = site_names(pid, [*result.written, *result.foreign, *result.held_back])
    if verbose:
        for site in result.written:
            if site in before:
                click.echo(_line(before[site], restore, names))
    click.echo(_summary(pid, result))
    if prepared is not None and prepared.inherited_from:
        click.echo(f"copied the state inherited from the parent process (region {prepared.inherited_from:#x})")
    if prepared is not None and prepared.handler_reinstalled:
        click.echo("the program had replaced textpoke's SIGTRAP handler: reinstalled in front of the program's")
    if result.foreign:
        shown = ", ".join(_named(site, names) for site in result.foreign[:8])
        more = f" and {len(result.foreign) - 8} more" if len(result.foreign) > 8 else ""
        click.echo(f"left alone {plural(len(result.foreign), 'site')} holding bytes neither textpoke's nor the "
                   f"program's: {shown}{more}")
    regions = result.trampoline_regions
    click.echo(f"textpoke's handler and agent stay in the process, idle; {plural(regions, 'trampoline region')} "
               f"{'stays' if regions == 1 else 'stay'} mapped, unused")
    if result.held_back:
        shown = ", ".join(_named(site, names) for site in result.held_back[:8])
        raise UnsafeTarget(
            f"{plural(len(result.held_back), 'site')} of process {pid} "
            f"{'was' if len(result.held_back) == 1 else 'were'} left as they are ({shown}): a thread blocks "
            "SIGTRAP, and putting them back needs an int3 there",
            hint="run `textpoke recover` again when no thread blocks SIGTRAP",
        )


def _named(site: int, names: dict[int, str]) -> str:
    return f"{site:#x} ({names[site]})" if site in names else f"{site:#x}"
