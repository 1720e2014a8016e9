"""Emulated CPUs sharing one memory, and the int3 trap as the CPU delivers it.

One host buffer is mapped at the same guest address into every unicorn instance
(``mem_map_ptr``), so a store by one CPU, by the patcher or by the Python handler
is a store into the memory every CPU sees.  Data is coherent by construction;
*code* is not: each instance caches translated blocks, and a write to code is
not seen by an instance until ``ctl_remove_cache`` is called on it (measured, see
docs/design.md section 7).  :meth:`Machine.write_code` therefore invalidates the
written range on every CPU after every write; ``flush_code=False`` exists only
to show, in a test, what happens without it.

Trap delivery is done the way the hardware does it, in the unicorn interrupt
hook that fires when a CPU *executes* ``int3`` (so a trap proves the CPU fetched
the int3 byte, not that Python peeked at memory):

- x86-64, same privilege: align rsp down to 16 bytes, push ss, rsp, rflags, cs,
  rip (rip = the byte after the int3), clear IF and TF, jump to the IDT entry;
- x86-32, same privilege: push eflags, cs, eip only -- no esp/ss, no alignment
  -- clear IF and TF, jump to the IDT entry.

Single-stepping goes through unicorn's C entry points directly: the Python
wrapper methods cost about twice as much per call, and a step is two calls.
"""

from __future__ import annotations

import ctypes
import mmap
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from unicorn import UC_ARCH_X86, UC_HOOK_INTR, UC_PROT_ALL, Uc
from unicorn import x86_const as ux

from .isa import FLAG_IF, FLAG_TF, INITIAL_FLAGS, Isa
from .kernel import BASE, GDT, KERNEL_CS, KERNEL_DS, TEXT, TEXT_LIMIT, Kernel, gdt_for

try:  # the binding's ctypes handle: one C call per step instead of a wrapper chain
    from unicorn.unicorn_py3.unicorn import uclib as _uclib
except ImportError:  # pragma: no cover - other binding layouts fall back to the wrapper
    _uclib = None

#: ``uc_emu_start`` / ``uc_reg_read`` of the C library (None: use the wrapper).
EMU_START = _uclib.uc_emu_start if _uclib is not None else None
REG_READ = _uclib.uc_reg_read if _uclib is not None else None
#: Interrupt vector of #BP (int3).
VECTOR_BP = 3
#: Far beyond every mapped address: emu_start's "until" never stops a single step.
NO_UNTIL = 0xFFFF_FFF0


class ModelFault(Exception):
    """An access outside the model's memory (a wild pointer in the handler)."""


class Memory:
    """The one host buffer every CPU maps; Python reads and writes it directly."""

    def __init__(self, size: int) -> None:
        self.base = BASE
        self.size = size
        self._map = mmap.mmap(-1, size)
        self._anchor = ctypes.c_char.from_buffer(self._map)
        self.host_address = ctypes.addressof(self._anchor)

    def close(self) -> None:
        # The exported pointer must go before the map can be closed.
        del self._anchor
        self._map.close()

    @property
    def view(self) -> mmap.mmap:
        return self._map

    def _offset(self, addr: int, size: int) -> int:
        off = addr - self.base
        if off < 0 or off + size > self.size:
            raise ModelFault(f"access to {addr:#x}+{size} outside model memory")
        return off

    def read(self, addr: int, size: int) -> bytes:
        off = self._offset(addr, size)
        return self._map[off : off + size]

    def write(self, addr: int, data: bytes) -> None:
        off = self._offset(addr, len(data))
        self._map[off : off + len(data)] = data

    def load(self, image: bytes) -> None:
        self._map[: len(image)] = image


@dataclass(frozen=True)
class TrapDelivery:
    """What the CPU did when it executed int3: the frame it pushed and where."""

    ip: int              #: pushed ip: the address after the int3 byte
    cs: int
    flags: int
    sp: int              #: the interrupted stack pointer
    ss: int
    frame: int           #: address of the pushed ip word (lowest word of the frame)
    gprs: tuple[int, ...]  #: general registers at the trap, for the restore check


class _CtrlC:
    noted = False


_ctrl_c = _CtrlC()


@contextmanager
def interruptible() -> Iterator[None]:
    """While the block runs, a SIGINT is noted, and raised as KeyboardInterrupt by the
    next :meth:`Cpu.step` (or when the block ends). Raised where Python happens to be,
    it may land in the code that calls a hook of ours from C, before the binding's own
    guard: ctypes prints it and drops it, and the run goes on unheard. Main thread only
    (elsewhere a no-op: signals reach the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def note(_signum: int, _frame: object) -> None:
        _ctrl_c.noted = True

    previous = signal.signal(signal.SIGINT, note)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if _ctrl_c.noted:
            _ctrl_c.noted = False
            raise KeyboardInterrupt


class Cpu:
    """One emulated CPU: a unicorn instance over the shared memory."""

    def __init__(self, index: int, isa: Isa, memory: Memory, kernel: Kernel) -> None:
        self.index = index
        self.isa = isa
        self.kernel = kernel
        self.memory = memory
        self.uc = Uc(UC_ARCH_X86, isa.uc_mode)
        self.uc.mem_map_ptr(BASE, memory.size, UC_PROT_ALL, memory.host_address)
        #: The C handle and a reusable register cell, for the fast step path.
        self.handle = self.uc._uch  # noqa: SLF001 - the binding keeps it private
        self.reg_val = ctypes.c_uint64()
        self.reg_ref = ctypes.byref(self.reg_val)
        self._entry = kernel.sym("int3_entry")
        #: Set by the interrupt hook during a step; the scheduler consumes it.
        self.trap: TrapDelivery | None = None
        self.fault: str | None = None
        self.pc = 0
        self._hook = self.uc.hook_add(UC_HOOK_INTR, self._on_interrupt)
        self._setup()
        self._context = self.uc.context_save()

    def _setup(self) -> None:
        uc, isa = self.uc, self.isa
        gdt = gdt_for(isa)
        uc.reg_write(ux.UC_X86_REG_GDTR, (0, GDT, len(gdt) - 1, 0))
        uc.reg_write(ux.UC_X86_REG_CS, KERNEL_CS)
        segs = [ux.UC_X86_REG_SS, ux.UC_X86_REG_DS, ux.UC_X86_REG_ES]
        if isa.word == 4:
            segs += [ux.UC_X86_REG_FS, ux.UC_X86_REG_GS]
        for seg in segs:
            uc.reg_write(seg, KERNEL_DS)
        uc.reg_write(isa.reg_sp, self.kernel.stack_top(self.index))
        uc.reg_write(isa.reg_flags, INITIAL_FLAGS)
        uc.reg_write(isa.reg_pc, self.kernel.sym("cpu_loop"))

    def reset(self) -> None:
        """Back to the start of ``cpu_loop`` with the initial registers."""
        self.uc.context_restore(self._context)
        self.pc = self.kernel.sym("cpu_loop")
        self.trap = None
        self.fault = None

    def close(self) -> None:
        self.uc.hook_del(self._hook)
        self.uc.mem_unmap(BASE, self.memory.size)

    # -- stepping ---------------------------------------------------------------

    def step(self) -> bool:
        """Execute one instruction at ``self.pc``; False if the CPU faulted."""
        if EMU_START is not None and REG_READ is not None:
            status = EMU_START(self.handle, self.pc, NO_UNTIL, 0, 1)
            REG_READ(self.handle, self.isa.reg_pc, self.reg_ref)
            self.pc = self.reg_val.value
            # A Ctrl-C that Python raised inside our hook: the binding's wrapper kept it
            # and stopped the CPU, and raises it from its own emu_start only, not from
            # this direct call (lost, the run went on: a test's Ctrl-C went unheard).
            held = getattr(self.uc, "_hook_exception", None)
            if held is not None:
                self.uc._hook_exception = None  # noqa: SLF001 - see above
                raise held
            if _ctrl_c.noted:  # (under interruptible(): see there)
                _ctrl_c.noted = False
                raise KeyboardInterrupt
        else:  # pragma: no cover
            try:
                self.uc.emu_start(self.pc, NO_UNTIL, 0, 1)
                status = 0
            except Exception as exc:  # noqa: BLE001 - any unicorn error is a CPU fault
                status, self.fault = 1, str(exc)
            self.pc = self.uc.reg_read(self.isa.reg_pc)
        if status != 0 and self.fault is None:
            self.fault = f"unicorn error {status} at {self.pc:#x}"
        return self.fault is None

    def reg(self, reg_id: int) -> int:
        if REG_READ is not None:
            REG_READ(self.handle, reg_id, self.reg_ref)
            return self.reg_val.value
        return self.uc.reg_read(reg_id)  # pragma: no cover

    def set_reg(self, reg_id: int, value: int) -> None:
        self.uc.reg_write(reg_id, value)

    @property
    def sp(self) -> int:
        return self.reg(self.isa.reg_sp)

    def flush(self, lo: int, hi: int) -> None:
        """Drop this CPU's translations of [lo, hi): the next fetch re-reads memory."""
        self.uc.ctl_remove_cache(lo, hi)

    # -- the trap, as the CPU delivers it -------------------------------------------

    def _on_interrupt(self, uc: Uc, intno: int, _user_data: object) -> None:
        # Never raise from here: unicorn calls this from C (a KeyboardInterrupt does
        # get out: the binding's wrapper keeps it and step() raises it).
        try:
            if intno != VECTOR_BP:
                self.fault = f"CPU exception vector {intno}"
                uc.emu_stop()
                return
            self.trap = self._deliver_int3()
        except Exception as exc:  # noqa: BLE001
            self.fault = f"trap delivery failed: {exc}"
            uc.emu_stop()

    def _deliver_int3(self) -> TrapDelivery:
        """Push the hardware frame of a same-privilege #BP and enter ``int3_entry``."""
        isa, uc = self.isa, self.uc
        reg = self.reg
        ip = reg(isa.reg_pc)       # unicorn reports the address after int3
        sp = reg(isa.reg_sp)
        flags = reg(isa.reg_flags)
        cs = reg(isa.reg_cs)
        ss = reg(isa.reg_ss)
        gprs = tuple(reg(r) for _, r in isa.gprs)
        words = [ip, cs, flags, sp, ss] if isa.hw_pushes_sp else [ip, cs, flags]
        top = sp & ~(isa.frame_align - 1)
        frame = top - len(words) * isa.word
        pack = isa.word_struct.pack
        self.memory.write(frame, b"".join(pack(w & isa.mask) for w in words))
        uc.reg_write(isa.reg_sp, frame)
        # #BP is an interrupt gate in Linux: IF off until iret restores the flags.
        uc.reg_write(isa.reg_flags, flags & ~(FLAG_IF | FLAG_TF))
        uc.reg_write(isa.reg_pc, self._entry)
        return TrapDelivery(ip=ip, cs=cs, flags=flags, sp=sp, ss=ss, frame=frame, gprs=gprs)


def _changed_ranges(before: bytes, after: bytes, *, chunk: int = 64) -> list[tuple[int, int]]:
    """[start, end) chunks where two equal-length byte strings differ (coarse is enough
    for invalidation, and a byte loop over the text would cost more than the run)."""
    return [
        (at, min(at + chunk, len(after)))
        for at in range(0, len(after), chunk)
        if before[at : at + chunk] != after[at : at + chunk]
    ]


class Machine:
    """N CPUs over one memory holding one kernel."""

    def __init__(self, kernel: Kernel, *, ncpus: int, flush_code: bool = True) -> None:
        if ncpus < 1:
            raise ValueError("the model needs at least one CPU")
        self.kernel = kernel
        self.isa = kernel.isa
        self.flush_code = flush_code
        self.memory = Memory(kernel.memory_size(ncpus))
        # Loading a segment register reads its descriptor: the GDT must be there first.
        self.memory.write(GDT, gdt_for(kernel.isa))
        self.cpus = [Cpu(i, kernel.isa, self.memory, kernel) for i in range(ncpus)]

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        for cpu in self.cpus:
            cpu.close()
        self.cpus = []
        self.memory.close()

    def reset(self, image: bytes) -> None:
        """Load ``image`` into memory and put every CPU back at its start.

        Code that differs from what memory held is invalidated on every CPU (only
        that: retranslating the whole text for every interleaving would dominate
        short runs).
        """
        lo, hi = TEXT - BASE, TEXT - BASE + TEXT_LIMIT
        before = self.memory.view[lo:hi]
        self.memory.load(image)
        after = self.memory.view[lo:hi]
        changed = _changed_ranges(before, after) if before != after else []
        for cpu in self.cpus:
            cpu.reset()
            for start, end in changed:
                cpu.flush(TEXT + start, TEXT + end)

    def write_code(self, addr: int, data: bytes) -> None:
        """Store into the text and make every CPU's next fetch of it see the store."""
        self.memory.write(addr, data)
        if self.flush_code:
            for cpu in self.cpus:
                cpu.flush(addr, addr + len(data))

    def read_word(self, addr: int) -> int:
        off = addr - BASE
        if off < 0 or off + self.isa.word > self.memory.size:
            raise ModelFault(f"read of {addr:#x} outside model memory")
        return self.isa.word_struct.unpack_from(self.memory.view, off)[0]

    def write_word(self, addr: int, value: int) -> None:
        self.memory.write(addr, self.isa.word_struct.pack(value & self.isa.mask))
