"""The Python handler over pt_regs in emulated memory: every branch of its logic."""

from __future__ import annotations

import pytest

from textpoke.model.handler import Action, HandlerContext, HandlerFlavor, PushFlavor, do_int3
from textpoke.model.isa import I386, X86_64, Isa
from textpoke.model.kernel import FENTRY, FTRACE_CALL, KERNEL_CS, KERNEL_DS, EntryFlavor
from textpoke.model.machine import Machine
from textpoke.x86.insn import CALL_SIZE

FLAGS = 0x246
USER_CS = 0x33


def _frame(machine: Machine, ip: int, *, cs: int = KERNEL_CS) -> tuple[int, int]:
    """Write a pt_regs with distinct register values; return (regs address, interrupted sp).

    x86-64: a complete frame (sp = the interrupted sp).  x86-32: truncated, the
    interrupted sp is the address of the sp field, and the word there is live data.
    """
    isa = machine.isa
    kernel = machine.kernel
    regs = kernel.stack_base(0) + 0x400
    for i, name in enumerate(isa.pt_regs):
        machine.write_word(regs + isa.off(name), 0x1000 + i)
    machine.write_word(regs + isa.off("ip"), ip)
    machine.write_word(regs + isa.off("cs"), cs)
    machine.write_word(regs + isa.off("flags"), FLAGS)
    if isa.hw_pushes_sp:
        sp = regs + 0x200
        machine.write_word(regs + isa.off("sp"), sp)
        machine.write_word(regs + isa.off("ss"), KERNEL_DS)
    else:
        sp = regs + isa.off("sp")
        machine.write_word(sp, 0x5EED)      # the interrupted stack's top word
    return regs, sp


def _arm(machine: Machine, *, update_func: int = 0, update_func_call: int = 0) -> None:
    kernel = machine.kernel
    machine.write_word(kernel.modifying_ftrace_code, 1)
    machine.write_word(kernel.ftrace_update_func, update_func)
    machine.write_word(kernel.ftrace_update_func_call, update_func_call)


def _ctx(machine: Machine, handler=HandlerFlavor.EMULATE, push=PushFlavor.REGS_SP) -> HandlerContext:
    return HandlerContext(machine.memory, machine.kernel, handler, push)


ISAS = [(X86_64, EntryFlavor.GAP, PushFlavor.REGS_SP), (I386, EntryFlavor.RETURNED_FRAME, PushFlavor.MOVE_FRAME)]


@pytest.mark.parametrize("isa,entry,push", ISAS)
def test_user_mode_trap_is_not_ours(make_machine, isa: Isa, entry, push):
    machine = make_machine(isa, entry)
    site = machine.kernel.sites[FENTRY]
    _arm(machine)
    regs, _ = _frame(machine, site + 1, cs=USER_CS)
    snapshot = machine.memory.read(regs - 64, 256)
    outcome = do_int3(_ctx(machine, push=push), regs)
    assert outcome.action is Action.NOT_OURS
    assert machine.memory.read(regs - 64, 256) == snapshot


@pytest.mark.parametrize("isa,entry,push", ISAS)
def test_trap_when_ftrace_is_not_modifying_code_is_not_ours(make_machine, isa, entry, push):
    machine = make_machine(isa, entry)
    regs, _ = _frame(machine, machine.kernel.sites[FENTRY] + 1)
    assert do_int3(_ctx(machine, push=push), regs).action is Action.NOT_OURS


@pytest.mark.parametrize("isa,entry,push", ISAS)
def test_trap_elsewhere_is_not_ours(make_machine, isa, entry, push):
    machine = make_machine(isa, entry)
    kernel = machine.kernel
    _arm(machine, update_func=kernel.sites[FTRACE_CALL], update_func_call=kernel.sym("tracer_b"))
    regs, _ = _frame(machine, kernel.sym("traced_func") + 6)
    assert do_int3(_ctx(machine, push=push), regs).action is Action.NOT_OURS


def test_x86_64_fentry_emulates_call_ftrace_regs_caller_into_the_gap(make_machine):
    machine = make_machine(X86_64, EntryFlavor.GAP)
    kernel = machine.kernel
    site = kernel.sites[FENTRY]
    _arm(machine)
    regs, sp = _frame(machine, site + 1)
    outcome = do_int3(_ctx(machine), regs)
    assert outcome.action is Action.CALL
    assert outcome.regs_out == regs and not outcome.warned
    assert outcome.resume_ip == kernel.sym("ftrace_regs_caller")
    assert outcome.pushed == site + CALL_SIZE
    assert machine.read_word(regs + X86_64.off("ip")) == kernel.sym("ftrace_regs_caller")
    assert machine.read_word(regs + X86_64.off("sp")) == sp - 8
    assert machine.read_word(sp - 8) == site + CALL_SIZE
    assert machine.read_word(regs + X86_64.off("ss")) == KERNEL_DS


@pytest.mark.parametrize("isa,entry,push", ISAS)
def test_caller_site_emulates_call_to_update_func_call(make_machine, isa, entry, push):
    machine = make_machine(isa, entry)
    kernel = machine.kernel
    site = kernel.sites[FTRACE_CALL]
    _arm(machine, update_func=site, update_func_call=kernel.sym("tracer_b"))
    regs, sp = _frame(machine, site + 1)
    outcome = do_int3(_ctx(machine, push=push), regs)
    assert outcome.action is Action.CALL
    assert outcome.resume_ip == kernel.sym("tracer_b")
    assert outcome.pushed == site + CALL_SIZE
    assert machine.read_word(sp - isa.word) == site + CALL_SIZE, "the return address is the new stack top"


@pytest.mark.parametrize("isa,entry,push", ISAS)
def test_caller_site_becoming_a_nop_jumps_over_it(make_machine, isa, entry, push):
    machine = make_machine(isa, entry)
    kernel = machine.kernel
    site = kernel.sites[FTRACE_CALL]
    _arm(machine, update_func=site, update_func_call=0)
    regs, sp = _frame(machine, site + 1)
    # Around the frame and the interrupted stack top: nothing may change but regs->ip.
    lo, hi = regs - 16, max(sp, regs + isa.off("sp")) + 16
    before = bytearray(machine.memory.read(lo, hi - lo))
    outcome = do_int3(_ctx(machine, push=push), regs)
    assert outcome.action is Action.JMP
    assert (outcome.resume_ip, outcome.pushed, outcome.regs_out) == (site + CALL_SIZE, None, regs)
    assert machine.read_word(regs + isa.off("ip")) == site + CALL_SIZE
    ip_at = regs + isa.off("ip") - lo
    before[ip_at : ip_at + isa.word] = (site + CALL_SIZE).to_bytes(isa.word, "little")
    assert machine.memory.read(lo, hi - lo) == bytes(before), "a jump pushes nothing"


@pytest.mark.parametrize("isa,entry,push", ISAS)
def test_skip_handler_only_moves_ip_past_the_site(make_machine, isa, entry, push):
    machine = make_machine(isa, entry)
    kernel = machine.kernel
    site = kernel.sites[FTRACE_CALL]
    _arm(machine, update_func=site, update_func_call=kernel.sym("tracer_b"))
    regs, sp = _frame(machine, site + 1)
    outcome = do_int3(_ctx(machine, HandlerFlavor.SKIP, push), regs)
    assert outcome.action is Action.SKIP
    assert outcome.resume_ip == site + CALL_SIZE and outcome.pushed is None


def test_i386_proposed_push_moves_the_truncated_frame_down_one_word(make_machine):
    machine = make_machine(I386, EntryFlavor.RETURNED_FRAME)
    kernel = machine.kernel
    site = kernel.sites[FENTRY]
    _arm(machine)
    regs, sp = _frame(machine, site + 1)
    before = [machine.read_word(regs + 4 * i) for i in range(I386.off("sp") // 4)]
    outcome = do_int3(_ctx(machine, push=PushFlavor.MOVE_FRAME), regs)
    assert outcome.regs_out == regs - 4
    moved = [machine.read_word(regs - 4 + 4 * i) for i in range(I386.off("sp") // 4)]
    ip_index = I386.off("ip") // 4
    assert moved[:ip_index] == before[:ip_index]
    assert moved[ip_index] == kernel.sym("ftrace_regs_caller")
    assert moved[ip_index + 1 :] == before[ip_index + 1 :]
    # The moved frame's sp field is the word just below the interrupted stack.
    assert regs - 4 + I386.off("sp") == sp - 4
    assert machine.read_word(sp - 4) == site + CALL_SIZE
    assert machine.read_word(sp) == 0x5EED, "the interrupted stack's top word is untouched"


def test_i386_generic_push_on_a_truncated_frame_writes_the_live_stack(make_machine):
    """The no-gap analogue: regs->sp of a truncated frame *is* the interrupted stack's top."""
    machine = make_machine(I386, EntryFlavor.PLAIN)
    kernel = machine.kernel
    site = kernel.sites[FENTRY]
    _arm(machine)
    regs, sp = _frame(machine, site + 1)
    machine.write_word(sp, kernel.stack_base(0) + 0x300)   # a plausible live word (an address)
    outcome = do_int3(_ctx(machine, push=PushFlavor.REGS_SP), regs)
    assert outcome.action is Action.CALL
    assert machine.read_word(sp) == kernel.stack_base(0) + 0x300 - 4
    assert machine.read_word(kernel.stack_base(0) + 0x300 - 4) == site + CALL_SIZE
