"""The kernel text per entry flavor, and the patcher's protocol steps and sync."""

from __future__ import annotations

import pytest

from textpoke._errors import SiteMismatch
from textpoke.model.asm import disassemble
from textpoke.model.isa import I386, X86_64
from textpoke.model.kernel import (
    FENTRY,
    FTRACE_CALL,
    FTRACE_REGS_CALL,
    INITIAL_SITE_STATE,
    EntryFlavor,
    StepKind,
    build_kernel,
)
from textpoke.model.patcher import CYCLE, Patch, Patcher, PatchStep, Protocol, SitePhase, site_state_after
from textpoke.x86.insn import CALL_SIZE, INT3, NOP5, encode_call


def _entry_text(kernel) -> list[str]:
    """Disassembly of int3_entry .. do_int3."""
    image = kernel.image
    lo, hi = kernel.sym("int3_entry"), kernel.sym("do_int3")
    out = []
    for placed in image.insns:
        if lo <= placed.addr < hi:
            off = placed.addr - image.base
            out.append(disassemble(kernel.isa.bits, placed.addr, image.code[off : off + 15])[0])
    return [" ".join(t.split()) for t in out]


def test_x86_64_gap_entry_copies_the_frame_down_six_words():
    kernel = build_kernel(X86_64, EntryFlavor.GAP)
    gap = _entry_text(kernel)
    assert gap.count("pushq 0x28(%rsp)") == 6
    assert gap[:3] == ["push $0xFFFFFFFFFFFFFFFF", "testb $3,0x10(%rsp)",
                       f"jne 0x{kernel.sym('int3_save'):016X}"]
    assert gap[3:9] == ["pushq 0x28(%rsp)"] * 6
    assert gap[-1] == "iretq"
    no_gap = _entry_text(build_kernel(X86_64, EntryFlavor.NO_GAP))
    assert "pushq 0x28(%rsp)" not in no_gap
    assert len(gap) - len(no_gap) == 8  # test, jne, 6 copies


@pytest.mark.parametrize(
    "entry,before_call,after_call",
    [
        (EntryFlavor.RETURNED_FRAME, "sub $8,%esp", "mov %eax,%esp"),
        (EntryFlavor.DISCARDED_FRAME, "sub $8,%esp", "add $8,%esp"),
        (EntryFlavor.PLAIN, "xor %edx,%edx", "pop %ebx"),
    ],
)
def test_i386_entry_reserve_and_frame_switch(entry, before_call, after_call):
    text = _entry_text(build_kernel(I386, entry))
    call = next(i for i, t in enumerate(text) if t.startswith("call"))
    assert text[call - 1] == before_call
    assert text[call + 1] == after_call
    assert text[-1] == "iret"


def test_i386_merged_entry_builds_a_complete_frame_and_rebuilds_the_iret_frame():
    text = _entry_text(build_kernel(I386, EntryFlavor.COMPLETE_FRAME))
    assert text[3:6] == ["push %ss", "push %esp", "addl $0x14,(%esp)"]
    assert text[6:10] == ["pushl 0x14(%esp)"] * 4
    assert "lea -0x10(%eax),%esp" in text


@pytest.mark.parametrize("isa,entry", [(X86_64, EntryFlavor.GAP), (I386, EntryFlavor.RETURNED_FRAME)])
def test_sites_and_checkpoints(isa, entry):
    kernel = build_kernel(isa, entry)
    mem = kernel.initial_memory(1, INITIAL_SITE_STATE)
    base = kernel.image.base
    fentry, call, regs_call = (kernel.sites[n] for n in (FENTRY, FTRACE_CALL, FTRACE_REGS_CALL))
    assert fentry == kernel.sym("traced_func"), "the fentry site is the function's first instruction"
    assert mem[fentry - base : fentry - base + 5] == NOP5
    assert mem[call - base : call - base + 5] == encode_call(call, kernel.sym("tracer_a"))
    assert mem[regs_call - base : regs_call - base + 5] == encode_call(regs_call, kernel.sym("tracer_a"))
    for site in (fentry, call, regs_call):
        assert kernel.kinds[site] is StepKind.SITE
        assert kernel.kinds[site + CALL_SIZE] is StepKind.PASS_END
    assert kernel.kinds[kernel.sym("do_int3")] is StepKind.HANDLER
    assert kernel.kinds[kernel.sym("int3_iret")] is StepKind.IRET
    assert kernel.kinds[kernel.sym("cpu_loop")] is StepKind.LOOP_CALL


def test_cycle_chains_and_returns_to_the_initial_state():
    assert site_state_after(INITIAL_SITE_STATE, CYCLE) == dict(INITIAL_SITE_STATE)
    with pytest.raises(ValueError):
        site_state_after(INITIAL_SITE_STATE, [Patch(FTRACE_CALL, "tracer_b", None)])


def _patcher(machine, patch: Patch, in_trap: list[int], protocol=Protocol.INT3) -> Patcher:
    return Patcher(machine, [patch], site_state=INITIAL_SITE_STATE, in_int3_path=lambda: list(in_trap),
                   protocol=protocol)


def test_patcher_steps_write_int3_tail_head_and_retract_the_descriptor(make_machine):
    machine = make_machine(X86_64, EntryFlavor.GAP)
    kernel = machine.kernel
    site = kernel.sites[FTRACE_CALL]
    old, new = encode_call(site, kernel.sym("tracer_a")), encode_call(site, kernel.sym("tracer_b"))
    patcher = _patcher(machine, Patch(FTRACE_CALL, "tracer_a", "tracer_b"), [])
    seen = []
    for expected_step in (PatchStep.INT3, PatchStep.TAIL, PatchStep.HEAD, PatchStep.DONE):
        assert patcher.enabled()
        event = patcher.step()
        assert event.step is expected_step
        seen.append((machine.memory.read(site, 5), patcher.phase(site),
                     machine.read_word(kernel.modifying_ftrace_code),
                     machine.read_word(kernel.ftrace_update_func),
                     machine.read_word(kernel.ftrace_update_func_call)))
    b_addr = kernel.sym("tracer_b")
    assert seen == [
        (INT3 + old[1:], SitePhase.INT3, 1, site, b_addr),
        (INT3 + new[1:], SitePhase.TAIL, 1, site, b_addr),
        (new, SitePhase.HEAD, 1, site, b_addr),
        (new, SitePhase.IDLE, 0, 0, 0),
    ]
    assert patcher.finished and not patcher.enabled()


def test_patcher_refuses_a_site_that_does_not_hold_the_old_bytes(make_machine):
    machine = make_machine(X86_64, EntryFlavor.GAP)
    site = machine.kernel.sites[FTRACE_CALL]
    machine.write_code(site, encode_call(site, machine.kernel.sym("tracer_b")))
    before = machine.memory.read(machine.kernel.image.base, 0x2000)
    patcher = _patcher(machine, Patch(FTRACE_CALL, "tracer_a", "tracer_b"), [])
    with pytest.raises(SiteMismatch):
        patcher.step()
    assert machine.memory.read(machine.kernel.image.base, 0x2000) == before


def test_sync_waits_for_every_cpu_that_was_in_the_int3_path(make_machine):
    machine = make_machine(X86_64, EntryFlavor.GAP)
    in_trap: list[int] = [0, 2]
    patcher = _patcher(machine, Patch(FENTRY, None, "ftrace_caller"), in_trap)
    patcher.step()                       # int3; the sync now waits for cpu0 and cpu2
    in_trap.append(1)                    # a CPU trapping after the write took the IPI first
    assert not patcher.enabled()
    patcher.serialized(0)
    assert not patcher.enabled()
    patcher.serialized(1)
    assert not patcher.enabled()
    patcher.serialized(2)
    assert patcher.enabled()


def test_direct_protocol_writes_tail_then_head_without_int3(make_machine):
    machine = make_machine(X86_64, EntryFlavor.GAP)
    kernel = machine.kernel
    site = kernel.sites[FENTRY]
    new = encode_call(site, kernel.sym("ftrace_caller"))
    patcher = _patcher(machine, Patch(FENTRY, None, "ftrace_caller"), [], Protocol.DIRECT)
    assert patcher.step().step is PatchStep.TAIL
    assert machine.memory.read(site, 5) == NOP5[:1] + new[1:]
    assert patcher.step().step is PatchStep.HEAD
    assert machine.memory.read(site, 5) == new
