"""Random and exhaustive exploration: proposed and merged pass, every other variant fails as it must.

Bounds are small (the whole directory runs within the CI budget); the numbers
asserted are exact identities between what the scheduler observed and what the
machine code left in memory.
"""

from __future__ import annotations

import itertools

import pytest

from textpoke.model import CYCLE, Arch, Report, Run, Variant, ViolationKind, spec_for
from textpoke.model.kernel import CALLBACK_SITES, FENTRY, FTRACE_CALL, INITIAL_SITE_STATE
from textpoke.model.patcher import SitePhase, site_state_after
from textpoke.model.scheduler import RunResult, World, explore_exhaustive, explore_random, iter_exhaustive

K = ViolationKind
FAILING = [Variant.NO_GAP, Variant.SKIP, Variant.NOTIFIER, Variant.NO_INT3]


def _exact_identities(report: Report) -> None:
    """What holds, to the unit, for every interleaving set without a violation."""
    assert report.violating == 0, report.first and report.first.violation
    for site in report.sites:
        assert site.calls == site.old_hits + site.new_hits, site.name
        assert site.calls == site.completed, site.name        # drained: every call came back
    # Records are written by the callbacks' machine code; callbacks are counted by the scheduler.
    assert report.records == sum(s.callbacks for s in report.sites if s.name in CALLBACK_SITES)
    assert report.records == sum(s.callbacks for s in report.sites)
    # The traced function's body (machine code) ran once per call from the loop and per fentry pass.
    assert report.bodies == report.loop_calls == report.site(FENTRY).calls


def _windows_executed(report: Report, site: str) -> None:
    """CPUs really fetched the site in each state of the patch (int3, int3 + new tail, new)."""
    stats = report.site(site)
    int3, tail, head = (stats.phase(p) for p in (SitePhase.INT3, SitePhase.TAIL, SitePhase.HEAD))
    assert int3.traps > 0 and int3.traps == int3.fetches
    assert tail.traps > 0 and tail.traps == tail.fetches
    assert head.executed_new > 0 and head.traps == 0 and head.executed_new == head.fetches
    assert int3.executed_old == tail.executed_old == 0


@pytest.mark.parametrize("arch", list(Arch))
def test_random_run_of_proposed_passes_with_exact_counts(make_world, arch):
    world = make_world(arch=arch, variant=Variant.PROPOSED, cpus=2, runs=3, steps=8000, seed=1)
    report = explore_random(world)
    assert report.interleavings == 3
    assert report.instructions >= 3 * 8000
    _exact_identities(report)
    _windows_executed(report, FENTRY)
    _windows_executed(report, FTRACE_CALL)
    assert report.site(FENTRY).old_hits > 0, "some calls reached the old target while it changed"


@pytest.mark.parametrize("arch", list(Arch))
def test_random_runs_with_three_cpus_pass(make_world, arch):
    report = explore_random(make_world(arch=arch, variant=Variant.PROPOSED, cpus=3, runs=2, steps=6000, seed=7))
    _exact_identities(report)


@pytest.mark.parametrize("variant", FAILING)
@pytest.mark.parametrize("arch", list(Arch))
def test_random_failing_variants_fail_with_their_kind(make_world, arch, variant):
    spec = spec_for(variant, arch)
    world = make_world(arch=arch, variant=variant, cpus=2, runs=4, steps=8000, seed=1, trace_lines=20)
    report = explore_random(world)
    if spec.expect is None:  # x86-64 notifier: the gap makes it work
        _exact_identities(report)
        return
    assert report.violating > 0
    assert set(report.kinds) == {spec.expect}
    first = report.first
    assert first is not None and first.violation.kind is spec.expect
    lines = first.trace_lines(limit=20, word=world.isa.word)
    assert any(f"VIOLATION {spec.expect.value}" in line for line in lines)
    assert "random interleaving" in first.interleaving


@pytest.mark.parametrize("arch", list(Arch))
def test_exhaustive_run_of_proposed_passes_and_sees_every_window(make_world, arch):
    world = make_world(arch=arch, variant=Variant.PROPOSED, cpus=1, steps=80, exhaustive=True)
    report = explore_exhaustive(world)
    assert report.interleavings > len(CYCLE)
    _exact_identities(report)
    _windows_executed(report, FENTRY)
    _windows_executed(report, FTRACE_CALL)


@pytest.mark.parametrize("variant", [Variant.NO_GAP, Variant.SKIP, Variant.NOTIFIER])
@pytest.mark.parametrize("arch", list(Arch))
def test_exhaustive_failing_variants(make_world, arch, variant):
    spec = spec_for(variant, arch)
    report = explore_exhaustive(make_world(arch=arch, variant=variant, cpus=1, steps=70, exhaustive=True))
    if spec.expect is None:
        _exact_identities(report)
        return
    assert 0 < report.violating < report.interleavings
    assert set(report.kinds) == {spec.expect}
    assert "exhaustive, patch" in report.first.interleaving


def test_exhaustive_two_cpus_counts_more_classes_and_passes(make_world):
    one = explore_exhaustive(make_world(arch=Arch.I386, cpus=1, steps=40, exhaustive=True, patches=(1,)))
    two = explore_exhaustive(make_world(arch=Arch.I386, cpus=2, steps=40, exhaustive=True, patches=(1,)))
    _exact_identities(one)
    _exact_identities(two)
    assert two.interleavings > one.interleavings
    assert two.site(FTRACE_CALL).phase(SitePhase.INT3).traps > 0


def _signature(result: RunResult) -> tuple:
    v = result.violation
    return (
        None if v is None else (v.kind, v.message),
        tuple(sorted((name, s.calls, s.old_hits, s.new_hits, s.completed, tuple(sorted(
            (p.value, c.fetches, c.traps, c.executed_old, c.executed_new) for p, c in s.phases.items()
        ))) for name, s in result.sites.items())),
    )


def _brute_force(world: World, patch_index: int, budget: int) -> set[tuple]:
    """Every placement of the patch's 4 steps among one CPU's ``budget`` instructions."""
    patch = CYCLE[patch_index]
    state = site_state_after(INITIAL_SITE_STATE, CYCLE[:patch_index])
    seen = set()
    for positions in itertools.combinations_with_replacement(range(budget + 1), 4):
        run = Run(world, plan=(patch,), site_state=state, repeat=False, budget=budget)
        pending = list(positions)
        for i in range(budget + 1):
            # A step whose sync is not complete waits: the schedule stays a real one.
            while pending and pending[0] <= i and run.patcher.enabled() and run.violation is None:
                run.patcher_step()
                pending.pop(0)
            if i == budget or run.violation is not None:
                break
            run.cpu_step(0)
        seen.add(_signature(run.result()))
    return seen


@pytest.mark.parametrize("variant", [Variant.PROPOSED, Variant.NO_GAP])
def test_reduced_search_finds_exactly_what_brute_force_finds(make_world, variant):
    """The exhaustive search skips reorderings of commuting steps; it must lose no outcome."""
    budget = 20  # i386: fetch at instruction 2, do_int3 at about 19
    world = make_world(arch=Arch.I386, variant=variant, cpus=1, steps=budget, exhaustive=True,
                       patches=(0,), drain=False)
    reduced = {_signature(result) for _, result in iter_exhaustive(world)}
    brute = _brute_force(world, 0, budget)
    assert reduced == brute
    kinds = {sig[0][0] for sig in brute if sig[0] is not None}
    assert kinds == ({K.LIVE_STACK_OVERWRITTEN} if variant is Variant.NO_GAP else set())


@pytest.mark.parametrize("arch", list(Arch))
def test_without_flushing_the_cpus_run_stale_code(make_world, arch):
    world = make_world(arch=arch, variant=Variant.PROPOSED, cpus=2, runs=3, steps=8000, flush_code=False)
    report = explore_random(world)
    assert report.violating > 0 and set(report.kinds) == {K.STALE_CODE}


def test_stop_at_first(make_world):
    world = make_world(arch=Arch.X86_64, variant=Variant.SKIP, cpus=2, runs=5, steps=8000, stop_at_first=True)
    report = explore_random(world)
    assert report.violating == 1 and report.interleavings == 1
