"""The patcher: ftrace's text_poke_bp protocol as an actor of the model.

One patch changes one site, in the steps of arch/x86/kernel/ftrace.c as of 2019
(``update_ftrace_func`` + ``ftrace_modify_code``), each its own scheduler step:

1. :meth:`Patcher._poke_int3` -- check the old bytes, publish the descriptor,
   write ``int3``; sync.
2. :meth:`Patcher._poke_tail` -- write the new bytes 1..4; sync.
3. :meth:`Patcher._poke_head` -- write the new first byte; sync.
4. :meth:`Patcher._finish` -- retract the descriptor.

**Sync, in the model.**  The kernel's ``run_sync()`` IPIs every CPU and waits
for each to run ``sync_core()``.  A CPU takes the IPI at its next instruction
boundary -- unless it is inside the int3 path, which runs with interrupts off
(#BP is an interrupt gate); there the IPI waits until ``iret``, itself a
serializing instruction.  So a sync started by a write completes once every CPU
that was inside the int3 path at the write has executed its ``iret``; CPUs
outside it serialize at once.  The model's patcher therefore refuses its next
step until the set of CPUs pending at its last write is empty
(:meth:`Patcher.serialized` removes one).  The flushing of translated code is
not part of sync here: :meth:`Machine.write_code` does it on every write, so the
write is visible to the very next fetch (coherent, as x86 is for the stores
themselves); what sync adds is the guarantee about CPUs still in the handler.

A plan is a sequence of patches; with ``repeat`` the patcher cycles through it
forever (random runs), otherwise it stops after the last one.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from .._errors import SiteMismatch
from ..x86.insn import CALL_SIZE, INT3, NOP5, rel32_target
from .kernel import FENTRY, FTRACE_CALL, FTRACE_REGS_CALL, Kernel
from .machine import Machine


@dataclass(frozen=True)
class Patch:
    """Change ``site`` from ``call old`` to ``call new`` (``None``: the nop)."""

    site: str
    old: str | None
    new: str | None

    def describe(self) -> str:
        def form(target: str | None) -> str:
            return "nop5" if target is None else f"call {target}"

        return f"{self.site}: {form(self.old)} -> {form(self.new)}"


#: One full cycle: tracing on, callback A -> B at both callback sites, callback off
#: (the ``ftrace_update_func_call == 0`` case), tracing off, back to A.
CYCLE: tuple[Patch, ...] = (
    Patch(FENTRY, None, "ftrace_caller"),
    Patch(FTRACE_CALL, "tracer_a", "tracer_b"),
    Patch(FTRACE_REGS_CALL, "tracer_a", "tracer_b"),
    Patch(FTRACE_CALL, "tracer_b", None),
    Patch(FTRACE_REGS_CALL, "tracer_b", None),
    Patch(FENTRY, "ftrace_caller", None),
    Patch(FTRACE_CALL, None, "tracer_a"),
    Patch(FTRACE_REGS_CALL, None, "tracer_a"),
)


def site_state_after(initial: Mapping[str, str | None], patches: Iterable[Patch]) -> dict[str, str | None]:
    """What every site calls after ``patches`` were applied to ``initial``."""
    state = dict(initial)
    for patch in patches:
        if state[patch.site] != patch.old:
            raise ValueError(f"plan does not chain: {patch.describe()} but site holds {state[patch.site]}")
        state[patch.site] = patch.new
    return state


class PatchStep(enum.Enum):
    """The patcher's next action on its current patch."""

    INT3 = "int3"
    TAIL = "tail"
    HEAD = "head"
    DONE = "done"


class SitePhase(enum.Enum):
    """Where a site is in its patch: what a CPU fetching it can find."""

    IDLE = "idle"    # whole instruction, no patch in flight
    INT3 = "int3"    # int3 + old tail
    TAIL = "tail"    # int3 + new tail
    HEAD = "head"    # new instruction, final sync not done yet


class Protocol(enum.Enum):
    """How the bytes are replaced."""

    #: The kernel's: int3 first, then tail, then head, a sync after each.
    INT3 = "int3"
    #: No breakpoint: tail, sync, head -- CPUs can fetch a torn instruction.
    DIRECT = "direct"


@dataclass(frozen=True)
class Transition:
    """A site's current (or last) change: both instructions and where they go."""

    site: int
    old: bytes
    new: bytes
    old_targets: frozenset[int]
    new_targets: frozenset[int]


@dataclass(frozen=True)
class PatcherEvent:
    """One patcher step, for traces."""

    step: PatchStep
    patch: Patch
    addr: int
    data: bytes

    def describe(self) -> str:
        if self.step is PatchStep.DONE:
            return f"patcher: done: {self.patch.describe()} (descriptor retracted)"
        return f"patcher: {self.step.value}: {self.data.hex(' ')} -> {self.addr:#x} ({self.patch.describe()})"


def targets_of(kernel: Kernel, site: int, insn: bytes) -> frozenset[int]:
    """Where a call through ``site`` holding ``insn`` may go.

    A nop goes to ``site + 5``; ``call T`` goes to ``T``.  For an fentry site a call
    to ``ftrace_caller`` and a call to ``ftrace_regs_caller`` are the same call:
    both call the current callback through their own site, and the int3 handler
    emulates the second for any fentry site.
    """
    if insn == NOP5:
        return frozenset({site + CALL_SIZE})
    target = rel32_target(site, insn)
    if site == kernel.sites[FENTRY] and target in (kernel.sym("ftrace_caller"), kernel.sym("ftrace_regs_caller")):
        return frozenset({kernel.sym("ftrace_caller"), kernel.sym("ftrace_regs_caller")})
    return frozenset({target})


class Patcher:
    """Runs a plan of patches, one protocol step per :meth:`step`."""

    def __init__(
        self,
        machine: Machine,
        plan: Sequence[Patch],
        *,
        site_state: Mapping[str, str | None],
        in_int3_path: Callable[[], Iterable[int]],
        repeat: bool = False,
        protocol: Protocol = Protocol.INT3,
    ) -> None:
        if not plan:
            raise ValueError("empty plan")
        self.machine = machine
        self.kernel = machine.kernel
        self.plan = tuple(plan)
        self.repeat = repeat
        self.protocol = protocol
        self._in_int3_path = in_int3_path
        self._index = 0
        self._next = self._first_step()
        self._pending: set[int] = set()
        self.finished = False
        self.steps = 0
        self._phase: dict[int, SitePhase] = {addr: SitePhase.IDLE for addr in self.kernel.sites.values()}
        self._transition: dict[int, Transition] = {}
        for name, target in site_state.items():
            addr = self.kernel.sites[name]
            insn = self.kernel.site_bytes(name, target)
            targets = targets_of(self.kernel, addr, insn)
            self._transition[addr] = Transition(addr, insn, insn, targets, targets)

    # -- queries used by the scheduler and the checks -------------------------------

    @property
    def patch(self) -> Patch:
        return self.plan[self._index]

    @property
    def next_step(self) -> PatchStep:
        return self._next

    def enabled(self) -> bool:
        """May the patcher take its next step now (not finished, sync complete)?"""
        return not self.finished and not self._pending

    def phase(self, site: int) -> SitePhase:
        return self._phase[site]

    def transition(self, site: int) -> Transition:
        return self._transition[site]

    def serialized(self, cpu: int) -> None:
        """CPU ``cpu`` executed iret: it has passed a serializing point."""
        self._pending.discard(cpu)

    # -- the protocol -------------------------------------------------------------

    def step(self) -> PatcherEvent:
        """Take the next step of the current patch."""
        if not self.enabled():
            raise RuntimeError("patcher stepped while waiting for a sync")
        self.steps += 1
        step = self._next
        if step is PatchStep.INT3:
            event = self._poke_int3()
            self._next = PatchStep.TAIL
        elif step is PatchStep.TAIL:
            event = self._poke_tail()
            self._next = PatchStep.HEAD
        elif step is PatchStep.HEAD:
            event = self._poke_head()
            self._next = PatchStep.DONE
        else:
            event = self._finish()
        return event

    def _first_step(self) -> PatchStep:
        return PatchStep.INT3 if self.protocol is Protocol.INT3 else PatchStep.TAIL

    def _bytes(self) -> tuple[int, bytes, bytes]:
        patch = self.patch
        addr = self.kernel.sites[patch.site]
        return addr, self.kernel.site_bytes(patch.site, patch.old), self.kernel.site_bytes(patch.site, patch.new)

    def _begin_sync(self) -> None:
        """IPI every CPU; those inside the int3 path answer only at their iret."""
        self._pending = set(self._in_int3_path())

    def _publish(self, addr: int, old: bytes, new: bytes) -> None:
        """Check the site holds ``old``, then open its transition (before any byte changes)."""
        current = self.machine.memory.read(addr, CALL_SIZE)
        if current != old:
            raise SiteMismatch(
                f"{self.patch.site} at {addr:#x} holds {current.hex(' ')}, expected {old.hex(' ')}"
            )
        kernel = self.kernel
        self._transition[addr] = Transition(
            addr, old, new, targets_of(kernel, addr, old), targets_of(kernel, addr, new)
        )

    def _poke_int3(self) -> PatcherEvent:
        """Step 1: descriptor, then ``int3`` over the first byte; sync.

        Pairs with :func:`~textpoke.model.handler.do_kernel_int3`, which reads
        ``modifying_ftrace_code`` and ``ftrace_update_func`` / ``_call``: they are
        stored before the int3 byte, so a CPU that traps on it finds them (x86
        keeps stores in order: the kernel's smp_wmb is a compiler barrier).
        """
        addr, old, new = self._bytes()
        self._publish(addr, old, new)
        kernel, machine = self.kernel, self.machine
        machine.write_word(kernel.modifying_ftrace_code, 1)
        if self.patch.site != FENTRY:
            target = 0 if self.patch.new is None else kernel.sym(self.patch.new)
            machine.write_word(kernel.ftrace_update_func, addr)
            machine.write_word(kernel.ftrace_update_func_call, target)
        machine.write_code(addr, INT3)
        self._phase[addr] = SitePhase.INT3
        self._begin_sync()
        return PatcherEvent(PatchStep.INT3, self.patch, addr, INT3)

    def _poke_tail(self) -> PatcherEvent:
        """Step 2: the new bytes 1..4 behind the int3; sync.

        A CPU fetching the site now reads int3 + new tail and traps; it never
        executes the mix.  (``Protocol.DIRECT`` has no int3 in front: its CPUs do.)
        """
        addr, old, new = self._bytes()
        if self.protocol is Protocol.DIRECT:
            self._publish(addr, old, new)
        self.machine.write_code(addr + 1, new[1:])
        self._phase[addr] = SitePhase.TAIL
        self._begin_sync()
        return PatcherEvent(PatchStep.TAIL, self.patch, addr + 1, new[1:])

    def _poke_head(self) -> PatcherEvent:
        """Step 3: the new first byte replaces the int3; sync.

        After this sync no CPU is still inside a trap taken on this site, which is
        what lets :meth:`_finish` retract the descriptor.
        """
        addr, _old, new = self._bytes()
        self.machine.write_code(addr, new[:1])
        self._phase[addr] = SitePhase.HEAD
        self._begin_sync()
        return PatcherEvent(PatchStep.HEAD, self.patch, addr, new[:1])

    def _finish(self) -> PatcherEvent:
        """Step 4: retract the descriptor; the site's transition is complete.

        Pairs with :func:`~textpoke.model.handler.do_kernel_int3`: the sync after
        the head write waited for every CPU inside the int3 path, so no handler
        can still be about to read what is cleared here.
        """
        addr, _old, new = self._bytes()
        machine, kernel = self.machine, self.kernel
        machine.write_word(kernel.modifying_ftrace_code, 0)
        machine.write_word(kernel.ftrace_update_func, 0)
        machine.write_word(kernel.ftrace_update_func_call, 0)
        targets = targets_of(kernel, addr, new)
        self._transition[addr] = Transition(addr, new, new, targets, targets)
        self._phase[addr] = SitePhase.IDLE
        event = PatcherEvent(PatchStep.DONE, self.patch, addr, b"")
        self._index += 1
        if self._index == len(self.plan):
            if self.repeat:
                self._index = 0
            else:
                self.finished = True
        self._next = self._first_step()
        return event
