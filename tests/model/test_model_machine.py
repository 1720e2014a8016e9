"""The machine: the trap frame exactly as the CPU pushes it, shared memory, code caches."""

from __future__ import annotations

import pytest

from textpoke.model.isa import FLAG_IF, I386, X86_64, Isa
from textpoke.model.kernel import FENTRY, KERNEL_CS, KERNEL_DS, EntryFlavor
from textpoke.model.machine import Machine
from textpoke.x86.insn import CALL_SIZE, INT3

SENTINEL = 0xA5


def _words(machine: Machine, addr: int, count: int) -> list[int]:
    return [machine.read_word(addr + i * machine.isa.word) for i in range(count)]


def _trap_at_fentry(machine: Machine, sp: int) -> tuple[bytes, bytes]:
    """Put int3 on fentry, run CPU 0 into it at ``sp``; return the stack area before/after."""
    kernel = machine.kernel
    site = kernel.sites[FENTRY]
    machine.write_code(site, INT3)
    cpu = machine.cpus[0]
    machine.memory.write(sp - 128, bytes([SENTINEL]) * 160)
    before = machine.memory.read(sp - 128, 160)
    cpu.set_reg(machine.isa.reg_sp, sp)
    cpu.pc = site
    assert cpu.step()
    return before, machine.memory.read(sp - 128, 160)


@pytest.mark.parametrize("misalign", [0, 8], ids=["rsp%16==0", "rsp%16==8"])
def test_x86_64_trap_aligns_and_pushes_ss_sp_flags_cs_ip(make_machine, misalign):
    machine = make_machine(X86_64, EntryFlavor.GAP)
    kernel, cpu = machine.kernel, machine.cpus[0]
    sp = kernel.stack_top(0) - 0x108 + misalign
    assert (sp - misalign) % 16 == 0
    before, after = _trap_at_fentry(machine, sp)

    site = kernel.sites[FENTRY]
    trap = cpu.trap
    assert trap is not None
    frame = (sp & ~15) - 5 * 8
    assert trap.frame == frame
    assert (trap.ip, trap.sp) == (site + 1, sp)
    assert _words(machine, frame, 5) == [site + 1, KERNEL_CS, trap.flags, sp, KERNEL_DS]
    assert trap.flags & FLAG_IF
    assert not cpu.reg(X86_64.reg_flags) & FLAG_IF, "an interrupt gate clears IF"
    assert cpu.pc == kernel.sym("int3_entry")
    assert cpu.reg(X86_64.reg_sp) == frame
    # Exactly the 40 frame bytes changed: with rsp%16==8 the padding word stays.
    changed = [i for i, (x, y) in enumerate(zip(before, after)) if x != y]
    lo = frame - (sp - 128)
    assert changed and min(changed) >= lo and max(changed) < lo + 40
    if misalign:
        assert machine.read_word(sp - 8) == int.from_bytes(bytes([SENTINEL]) * 8, "little")


def test_i386_same_privilege_trap_pushes_only_flags_cs_ip(make_machine):
    machine = make_machine(I386, EntryFlavor.RETURNED_FRAME)
    kernel, cpu = machine.kernel, machine.cpus[0]
    sp = kernel.stack_top(0) - 0x104  # not 16-aligned: x86-32 does not align
    before, after = _trap_at_fentry(machine, sp)

    site = kernel.sites[FENTRY]
    trap = cpu.trap
    assert trap is not None and trap.frame == sp - 12
    assert _words(machine, sp - 12, 3) == [site + 1, KERNEL_CS, trap.flags]
    assert cpu.reg(I386.reg_sp) == sp - 12
    changed = [i for i, (x, y) in enumerate(zip(before, after)) if x != y]
    assert min(changed) == 128 - 12 and max(changed) == 127, "only eflags, cs, eip: no esp, no ss"


@pytest.mark.parametrize("isa,entry", [(X86_64, EntryFlavor.GAP), (I386, EntryFlavor.RETURNED_FRAME)])
def test_code_writes_are_seen_only_after_the_cache_is_flushed(make_machine, isa: Isa, entry):
    """Why write_code flushes on every CPU: unicorn keeps executing its old translation."""
    machine = make_machine(isa, entry, flush_code=False)
    cpu, site = machine.cpus[0], machine.kernel.sites[FENTRY]
    cpu.pc = site
    assert cpu.step() and cpu.pc == site + CALL_SIZE      # nop5, now translated
    machine.write_code(site, INT3)                        # shared memory holds int3 ...
    assert machine.memory.read(site, 1) == INT3
    cpu.pc = site
    assert cpu.step() and cpu.trap is None and cpu.pc == site + CALL_SIZE   # ... the CPU runs the nop
    cpu.flush(site, site + 1)
    cpu.pc = site
    assert cpu.step() and cpu.trap is not None and cpu.trap.ip == site + 1


def test_flushing_machine_makes_every_cpu_see_the_write(make_machine):
    machine = make_machine(X86_64, EntryFlavor.GAP, ncpus=3)
    site = machine.kernel.sites[FENTRY]
    for cpu in machine.cpus:
        cpu.pc = site
        assert cpu.step() and cpu.pc == site + CALL_SIZE
    machine.write_code(site, INT3)
    for cpu in machine.cpus:
        cpu.pc = site
        assert cpu.step() and cpu.trap is not None, f"cpu{cpu.index} missed the int3"


def test_cpus_share_one_memory(make_machine):
    """A store by one CPU is in the buffer the other CPUs and Python read."""
    machine = make_machine(X86_64, EntryFlavor.GAP, ncpus=2)
    kernel = machine.kernel
    body = kernel.percpu(1, 1)
    cpu = machine.cpus[1]
    # traced_func's body increments this CPU's counter: run cpu1 from cpu_loop through it.
    while cpu.pc != kernel.sym("ret_a"):
        assert cpu.step()
    assert machine.read_word(body) == 1
    assert machine.read_word(kernel.percpu(0, 1)) == 0
    # cpu0 reads cpu1's counter through its own mapping of the same buffer.
    assert int.from_bytes(machine.cpus[0].uc.mem_read(body, 8), "little") == 1


def test_ctrl_c_raised_inside_the_trap_hook_stops_the_step(make_machine, monkeypatch):
    """Python raises a pending SIGINT's KeyboardInterrupt wherever it runs next, also in
    the trap hook unicorn calls from C; the binding's wrapper keeps it, and step() (which
    calls the C library directly) must raise it, not go on as if nothing happened."""
    machine = make_machine(X86_64, EntryFlavor.GAP)
    cpu, site = machine.cpus[0], machine.kernel.sites[FENTRY]
    machine.write_code(site, INT3)

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cpu, "_deliver_int3", interrupted)
    cpu.pc = site
    with pytest.raises(KeyboardInterrupt):
        cpu.step()
    monkeypatch.undo()
    cpu.pc = site
    assert cpu.step() and cpu.trap is not None  # nothing left over: the next step traps as ever


def test_ctrl_c_under_interruptible_is_raised_by_the_next_step_wherever_it_landed(make_machine, monkeypatch):
    """The model's command runs its CPUs under interruptible(): a SIGINT that arrives while
    the trap hook runs (called from C) is noted, and the step after it raises it."""
    import os
    import signal

    from textpoke.model.machine import interruptible

    machine = make_machine(X86_64, EntryFlavor.GAP)
    cpu, site = machine.cpus[0], machine.kernel.sites[FENTRY]
    machine.write_code(site, INT3)
    deliver = cpu._deliver_int3

    def interrupted():
        os.kill(os.getpid(), signal.SIGINT)  # its handler runs in the hook, or just after
        return deliver()

    monkeypatch.setattr(cpu, "_deliver_int3", interrupted)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with interruptible():
            cpu.pc = site
            cpu.step()
            for _ in range(100):  # the handler ran by now (a Python signal runs at the next bytecode)
                cpu.step()
    assert signal.getsignal(signal.SIGINT) is before
    with interruptible():  # nothing noted is left over
        assert cpu.step()
