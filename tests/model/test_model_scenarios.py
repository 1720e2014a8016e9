"""Hand-scheduled interleavings: each shows one mechanism of docs/design.md sections 3-4, exactly.

Every test drives a :class:`Run` step by step (one CPU, one patch) to a chosen
instant -- a CPU fetching a site while it holds int3 -- and then checks the
numbers the model keeps and the bytes the machine code wrote.
"""

from __future__ import annotations

from textpoke.model import Arch, CYCLE, Run, Variant, ViolationKind
from textpoke.model.checks import PhaseCounts
from textpoke.model.kernel import FENTRY, FTRACE_CALL, INITIAL_SITE_STATE, PERCPU_LOG_HEAD, TAG_B
from textpoke.model.patcher import PatchStep, SitePhase, site_state_after
from textpoke.model.scheduler import World
from textpoke.x86.insn import CALL_SIZE

import pytest

K = ViolationKind
ENABLE, RETARGET = 0, 1   # CYCLE[0]: fentry nop -> call ftrace_caller; CYCLE[1]: ftrace_call A -> B
assert CYCLE[RETARGET].site == FTRACE_CALL and (CYCLE[RETARGET].old, CYCLE[RETARGET].new) == ("tracer_a", "tracer_b")


def _run(world: World, patch_index: int) -> Run:
    state = site_state_after(INITIAL_SITE_STATE, CYCLE[:patch_index])
    return Run(world, plan=(CYCLE[patch_index],), site_state=state, repeat=False, budget=10**6)


def _until(run: Run, addr: int, *, limit: int = 400) -> None:
    cpu = run.machine.cpus[0]
    for _ in range(limit):
        if cpu.pc == addr or run.violation is not None:
            return
        run.cpu_step(0)
    raise AssertionError(f"cpu0 never reached {addr:#x}")


def _trap_at(run: Run, site: int) -> None:
    """CPU 0 runs to ``site``, the patcher writes its int3, the CPU fetches it."""
    _until(run, site)
    assert run.patcher.next_step is PatchStep.INT3
    run.patcher_step()
    run.cpu_step(0)
    assert run.cpus[0].trap is not None, "the CPU must have executed the int3"


def _last_record(run: Run) -> tuple[int, ...]:
    kernel = run.kernel
    head = run.machine.read_word(kernel.percpu(0, PERCPU_LOG_HEAD))
    base = kernel.record_addr(0, head - 1)
    return tuple(run.machine.read_word(base + i * run.isa.word) for i in range(4))


@pytest.mark.parametrize("arch", list(Arch))
def test_retarget_trap_emulates_the_new_call_exactly_once(make_world, arch):
    world = make_world(arch=arch, variant=Variant.PROPOSED, cpus=1)
    run = _run(world, RETARGET)
    kernel = world.kernel
    site = kernel.sites[FTRACE_CALL]
    _trap_at(run, site)
    _until(run, kernel.sym("ret_a"))
    assert run.violation is None
    stats = run.result().sites[FTRACE_CALL]
    assert (stats.calls, stats.old_hits, stats.new_hits, stats.completed, stats.callbacks) == (1, 0, 1, 1, 1)
    assert stats.phase(SitePhase.INT3) == PhaseCounts(fetches=1, traps=1)
    # The record tracer_b wrote names the traced function and its caller: the
    # emulated call pushed ftrace_call + 5 and the callback got the right frame.
    assert _last_record(run) == (0, TAG_B, kernel.sym("traced_func"), kernel.sym("ret_a"))
    for step in (PatchStep.TAIL, PatchStep.HEAD, PatchStep.DONE):
        assert run.patcher.enabled() and run.patcher.next_step is step
        run.patcher_step()
    # The next call runs the new instruction itself.
    _until(run, kernel.sym("ret_b"))
    stats = run.result().sites[FTRACE_CALL]
    assert (stats.calls, stats.new_hits, stats.callbacks) == (2, 2, 2)
    assert stats.phase(SitePhase.IDLE) == PhaseCounts(fetches=1, executed_new=1)
    assert _last_record(run) == (0, TAG_B, kernel.sym("traced_func"), kernel.sym("ret_b"))


@pytest.mark.parametrize("arch", list(Arch))
def test_skipping_instead_of_emulating_loses_the_call(make_world, arch):
    world = make_world(arch=arch, variant=Variant.SKIP, cpus=1)
    run = _run(world, RETARGET)
    site = world.kernel.sites[FTRACE_CALL]
    _trap_at(run, site)
    _until(run, world.kernel.sym("ret_a"))
    assert run.violation is not None and run.violation.kind is K.LOST_CALL
    assert run.violation.message == "call through ftrace_call skipped: expected tracer_a / tracer_b"
    assert run.machine.read_word(world.kernel.percpu(0, PERCPU_LOG_HEAD)) == 0, "neither callback ran"


@pytest.mark.parametrize("arch", list(Arch))
def test_a_trap_handled_after_the_tail_write_still_finds_the_descriptor(make_world, arch):
    """Sync: the head write waits for the CPU in the int3 path; its late handler emulates B."""
    world = make_world(arch=arch, variant=Variant.PROPOSED, cpus=1)
    run = _run(world, RETARGET)
    kernel = world.kernel
    _trap_at(run, kernel.sites[FTRACE_CALL])
    assert run.patcher.enabled()      # the trap came after the int3 write: not part of its sync
    run.patcher_step()                # tail, while cpu0 is still before do_int3
    assert not run.patcher.enabled(), "the sync after the tail waits for cpu0's iret"
    iret = kernel.sym("int3_iret")
    _until(run, iret)
    assert not run.patcher.enabled()
    run.cpu_step(0)                   # iret: serializing
    assert run.patcher.enabled() and run.violation is None
    _until(run, kernel.sym("ret_a"))
    stats = run.result().sites[FTRACE_CALL]
    assert (stats.new_hits, stats.callbacks) == (1, 1)


def test_x86_64_without_the_gap_the_push_lands_on_the_frame_at_an_aligned_rsp(make_world):
    world = make_world(arch=Arch.X86_64, variant=Variant.NO_GAP, cpus=1)
    run = _run(world, ENABLE)
    kernel = world.kernel
    _trap_at(run, kernel.sites[FENTRY])           # first loop call: rsp % 16 == 0 at fentry
    assert run.cpus[0].trap.delivery.sp % 16 == 0
    _until(run, kernel.sym("ret_a"))
    v = run.violation
    assert v is not None and v.kind is K.CORRUPT_FRAME
    assert v.pc == kernel.sym("do_int3")
    assert v.message == f"frame returned by do_int3: ss={kernel.sites[FENTRY] + CALL_SIZE:#x}, delivered 0x10"


def test_x86_64_without_the_gap_a_misaligned_rsp_hides_the_bug(make_world):
    """At rsp % 16 == 8 the CPU's alignment leaves a free word: the push lands there."""
    world = make_world(arch=Arch.X86_64, variant=Variant.NO_GAP, cpus=1)
    run = _run(world, ENABLE)
    kernel = world.kernel
    _until(run, kernel.sym("loop_call_b"))
    run.cpu_step(0)                               # the call one word deeper
    _trap_at(run, kernel.sites[FENTRY])
    assert run.cpus[0].trap.delivery.sp % 16 == 8
    _until(run, kernel.sym("ret_b"))
    assert run.violation is None
    fentry = run.result().sites[FENTRY]
    assert (fentry.calls, fentry.new_hits) == (2, 2)   # the nop before the patch, the emulated call
    assert fentry.phase(SitePhase.INT3) == PhaseCounts(fetches=1, traps=1)


def test_i386_notifier_resumes_from_the_frame_it_could_not_return(make_world):
    world = make_world(arch=Arch.I386, variant=Variant.NOTIFIER, cpus=1)
    run = _run(world, ENABLE)
    kernel = world.kernel
    _trap_at(run, kernel.sites[FENTRY])
    _until(run, kernel.sym("ret_a"))
    v = run.violation
    assert v is not None and v.kind is K.CORRUPT_FRAME
    assert v.pc == kernel.sym("int3_restore")
    outcome = run.cpus[0].trap.outcome
    assert outcome.regs_out == outcome.regs_in - 4
    assert v.message.startswith(
        f"entry restores pt_regs from {outcome.regs_in:#x}, but do_int3 returned the frame at {outcome.regs_out:#x}: "
    )
    assert "ip=0x8, emulated ftrace_regs_caller" in v.message   # cs slid into ip's place


def test_x86_64_notifier_needs_no_returned_frame(make_world):
    world = make_world(arch=Arch.X86_64, variant=Variant.NOTIFIER, cpus=1)
    run = _run(world, ENABLE)
    _trap_at(run, world.kernel.sites[FENTRY])
    _until(run, world.kernel.sym("ret_a"))
    assert run.violation is None
    assert run.result().sites[FENTRY].new_hits == 1


def test_i386_generic_push_without_room_overwrites_the_live_stack(make_world):
    world = make_world(arch=Arch.I386, variant=Variant.NO_GAP, cpus=1)
    run = _run(world, ENABLE)
    kernel = world.kernel
    _trap_at(run, kernel.sites[FENTRY])
    sp = run.cpus[0].trap.delivery.sp
    _until(run, kernel.sym("ret_a"))
    v = run.violation
    assert v is not None and v.kind is K.LIVE_STACK_OVERWRITTEN
    ret_a = kernel.sym("ret_a")
    assert v.message == f"interrupted stack word at {sp:#x} (sp+0) changed {ret_a:#x} -> {ret_a - 4:#x}"


@pytest.mark.parametrize("variant", [Variant.PROPOSED, Variant.MERGED])
def test_i386_proposed_and_merged_both_emulate_the_fentry_call(make_world, variant):
    world = make_world(arch=Arch.I386, variant=variant, cpus=1)
    run = _run(world, ENABLE)
    kernel = world.kernel
    _trap_at(run, kernel.sites[FENTRY])
    _until(run, kernel.sym("ret_a"))
    assert run.violation is None
    result = run.result()
    fentry, regs_call = result.sites[FENTRY], result.sites["ftrace_regs_call"]
    assert (fentry.calls, fentry.new_hits, fentry.completed) == (1, 1, 1)
    # The emulated call went to ftrace_regs_caller, which called the callback through its own site.
    assert (regs_call.calls, regs_call.callbacks) == (1, 1)
    assert result.records == 1 and result.bodies == 1
