"""Interleave the CPUs and the patcher instruction by instruction, and check every step.

One :class:`Run` is one interleaving: the machine reset to an image, a patcher
with a plan, and per-CPU checking state (a shadow stack of the returns each CPU
owes, the calls through sites in progress, the trap it is in).  Its two step
functions -- :meth:`Run.cpu_step` and :meth:`Run.patcher_step` -- are the only way
anything happens; each CPU step executes exactly one instruction (the handler
step runs the Python do_int3 and then the ``ret`` at its address).

Two drivers choose the steps:

- **random** (:func:`explore_random`): ``runs`` interleavings seeded from
  ``seed``; at every step the patcher goes with a per-run probability (when its
  sync allows), otherwise a uniformly chosen CPU executes one instruction; the
  patcher cycles through :data:`~textpoke.model.patcher.CYCLE`; ``steps`` is the
  number of instructions per interleaving, all CPUs together.
- **exhaustive** (:func:`explore_exhaustive`): for each patch of the cycle, from
  the text as the earlier patches left it, every interleaving of that patch's
  steps with ``steps`` instructions per CPU -- up to reordering of steps that
  commute.  CPUs share no writable memory (each has its own stack, log and
  counters; the text and descriptor are written only by the patcher), so two CPU
  steps always commute, and a CPU step commutes with a patcher step unless it
  reads what the patcher writes: a fetch of the site being patched, or
  do_int3 (which reads the descriptor).  ``iret`` also touches the patcher
  (its sync waits for it), but only to enable it: running it later can only
  delay the patcher.  So the search branches only at those *visible* steps: one
  CPU runs up to and including its next visible step, and between two patcher
  steps CPUs take turns in index order (one representative per class).
  ``interleavings`` counts the classes explored.  Interactions between two
  patches are left to the random runs (the sync before each descriptor change
  is what keeps them apart).

After its bound every interleaving is *drained*: each CPU runs on, the patcher
idle, until it is back at ``cpu_loop`` outside the int3 path, so every call
through a site has returned and the totals are exact (calls == completed,
records in memory == callback calls, body runs == loop calls).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from .._errors import UsageError
from ..x86.insn import CALL_SIZE, InsnKind, decode_site
from .asm import disassemble
from .checks import (
    Fetch,
    ModelViolation,
    SiteCounters,
    SiteStats,
    Violation,
    ViolationKind,
    classify_fetch,
    sum_stats,
)
from .handler import Action, HandlerContext, Int3Outcome, PtRegs, do_int3
from .isa import Arch, Isa, isa_for
from .kernel import (
    CALLBACK_SITES,
    INITIAL_SITE_STATE,
    PERCPU_BODY,
    PERCPU_LOG_HEAD,
    RECORD_WORDS,
    SITES,
    EntryFlavor,
    Kernel,
    StepKind,
    build_kernel,
)
from .machine import EMU_START, NO_UNTIL, REG_READ, Machine, ModelFault, TrapDelivery
from .patcher import CYCLE, Patch, Patcher, Transition, site_state_after
from .trace import STACK_WORDS, TraceEvent, TraceRecorder, format_trace
from .variants import Variant, VariantSpec, spec_for

K = ViolationKind

#: A choice in an exhaustive schedule that is the patcher rather than a CPU.
PATCHER = -1
#: Per-run probabilities of the patcher taking a step (random mode), and how often
#: each is drawn: a slow patcher leaves long windows; a fast one crowds its steps,
#: so that a CPU still in the code a trap sent it to meets the next patch (the
#: only way ftrace_regs_call is hit mid-patch).  Fast runs are drawn less often:
#: every code write makes every CPU retranslate the blocks around the site.
PATCHER_RATES = (0.003, 0.01, 0.03, 0.1)
PATCHER_RATE_WEIGHTS = (3, 3, 3, 1)
#: Steps a CPU may take to get back to cpu_loop when an interleaving ends.
DRAIN_LIMIT = 1000


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """What to run: ISA, variant, CPUs, bounds, and how to choose interleavings."""

    arch: Arch = Arch.X86_64
    variant: Variant = Variant.PROPOSED
    cpus: int = 2
    #: random: instructions per interleaving (all CPUs); exhaustive: per CPU.
    steps: int = 20_000
    #: random: interleavings to run.
    runs: int = 20
    seed: int = 1
    exhaustive: bool = False
    #: Stop at the first violating interleaving instead of counting them all.
    stop_at_first: bool = False
    #: Steps of the failing CPU shown in the annotated trace.
    trace_lines: int = 60
    #: Invalidate translated code on every CPU after each patcher write
    #: (False only to show what happens without it).
    flush_code: bool = True
    #: Restrict the exhaustive search to these patch indices of the cycle.
    patches: tuple[int, ...] | None = None
    #: After the bound, let every CPU return to cpu_loop (exact end-of-run totals).
    drain: bool = True


# -- one interleaving -----------------------------------------------------------------


def _pt_field(register: str) -> str:
    """The pt_regs field that saves ``register`` (rax -> ax, eax -> ax, r8 -> r8)."""
    if register[0] in "re" and register[1:2].isalpha():
        return register[1:]
    return register


@dataclass
class _Shadow:
    """A return a CPU owes: the address its call pushed and the sp it left."""

    ret: int
    sp: int


@dataclass
class _Pass:
    """A call through a site, from the fetch to the return to site + 5."""

    site: int
    sp: int
    log_head: int
    transition: Transition
    target: int | None = None


@dataclass
class _Trap:
    """A CPU inside the int3 path (also its entry on the shadow stack)."""

    delivery: TrapDelivery
    passing: _Pass
    live: bytes
    outcome: Int3Outcome | None = None
    resume_sp: int | None = None


@dataclass
class _CpuState:
    index: int
    top: int
    budget: int
    shadow: list[_Shadow | _Trap] = field(default_factory=list)
    passes: dict[int, _Pass] = field(default_factory=dict)
    trap: _Trap | None = None
    parent: int = 0
    body_mark: int = 0


@dataclass(frozen=True)
class RunResult:
    """What one interleaving did."""

    instructions: int
    patcher_steps: int
    loop_calls: int
    violation: Violation | None
    sites: Mapping[str, SiteStats]
    #: Read from memory at the end: records the callbacks logged, times the body ran.
    records: int = 0
    bodies: int = 0
    schedule: tuple[int, ...] = ()


class World:
    """Everything built once per configuration: the kernel and the machine."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.spec: VariantSpec = spec_for(config.variant, config.arch)
        self.isa: Isa = isa_for(config.arch)
        self.kernel: Kernel = build_kernel(self.isa, self.spec.entry)
        self.machine = Machine(self.kernel, ncpus=config.cpus, flush_code=config.flush_code)
        self.handler = HandlerContext(self.machine.memory, self.kernel, self.spec.handler, self.spec.push)
        self._images: dict[tuple[tuple[str, str | None], ...], bytes] = {}

    def image(self, site_state: Mapping[str, str | None]) -> bytes:
        """Initial memory with the sites as ``site_state`` says (cached)."""
        key = tuple(sorted(site_state.items()))
        if key not in self._images:
            self._images[key] = self.kernel.initial_memory(self.config.cpus, site_state)
        return self._images[key]

    def __enter__(self) -> World:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.machine.close()


class Run:
    """One interleaving; drive it with :meth:`cpu_step` and :meth:`patcher_step`."""

    def __init__(
        self,
        world: World,
        *,
        plan: Sequence[Patch],
        site_state: Mapping[str, str | None],
        repeat: bool,
        budget: int,
        visible: frozenset[int] = frozenset(),
        trace: TraceRecorder | None = None,
    ) -> None:
        self.world = world
        self.kernel = kernel = world.kernel
        self.isa = world.isa
        self.machine = machine = world.machine
        self.mem = machine.memory
        machine.reset(world.image(site_state))
        self.patcher = Patcher(
            machine, plan, site_state=site_state, repeat=repeat,
            in_int3_path=self._in_int3_path, protocol=world.spec.protocol,
        )
        self.cpus = [_CpuState(i, kernel.stack_top(i), budget) for i in range(len(machine.cpus))]
        self.visible = visible
        self.trace = trace
        self.violation: Violation | None = None
        self.instructions = 0
        self.events = 0
        self.loop_calls = 0
        self.counters = {kernel.sites[name]: SiteCounters(name) for name in SITES}
        self._mcpus = machine.cpus
        self._view = self.mem.view
        self._base = self.mem.base
        self._reg_pc = self.isa.reg_pc
        self._valid = kernel.boundaries
        self._call_len = {p.addr: p.length for p in kernel.image.insns}
        self._word = self.isa.word
        self._traced_func = kernel.sym("traced_func")
        self._complete_frames = self.isa.hw_pushes_sp or world.spec.entry is EntryFlavor.COMPLETE_FRAME
        by_kind: dict[StepKind, Callable[[_CpuState], None]] = {
            StepKind.CALL: self._call,
            StepKind.LOOP_CALL: self._loop_call,
            StepKind.RET: self._ret,
            StepKind.IRET: self._iret,
            StepKind.SITE: self._site,
            StepKind.HANDLER: self._handler,
            StepKind.RESTORE: self._restore,
            StepKind.PASS_END: self._pass_end,
            StepKind.CALL_DONE: self._call_done,
        }
        # Keyed by address, not by kind: one int-keyed lookup per step (enum hashing
        # is a Python-level call).
        self._special: dict[int, Callable[[_CpuState], None]] = {
            addr: by_kind[kind] for addr, kind in kernel.kinds.items()
        }
        self._word_struct = self.isa.word_struct
        self._limit = self.mem.size - self._word
        self._reg_sp = self.isa.reg_sp

    # -- driving ------------------------------------------------------------------

    def _in_int3_path(self) -> list[int]:
        return [st.index for st in self.cpus if st.trap is not None]

    def cpu_step(self, c: int) -> None:
        """CPU ``c`` executes one instruction, with the checks that belong to it."""
        st = self.cpus[c]
        cpu = self._mcpus[c]
        st.budget -= 1
        self.instructions += 1
        self.events += 1
        pc = cpu.pc
        special = self._special.get(pc)
        if special is None and self.trace is None and EMU_START is not None and REG_READ is not None:
            # The common case, kept lean (Cpu.step inlined): one plain instruction.
            handle = cpu.handle
            status = EMU_START(handle, pc, NO_UNTIL, 0, 1)
            REG_READ(handle, self._reg_pc, cpu.reg_ref)
            after = cpu.pc = cpu.reg_val.value
            if status or cpu.trap is not None or cpu.fault is not None or after not in self._valid:
                self._slow_fault(st, pc, status)
                return
            trap = st.trap
            if trap is not None:
                lo = trap.delivery.sp - self._base
                if self._view[lo : lo + len(trap.live)] != trap.live:
                    try:
                        self._check_live(st)
                    except ModelViolation as v:
                        self._fail(st, pc, v)
            return
        if self.trace is not None:
            self._trace_begin(st, pc)
        try:
            if special is None:
                self._exec(st)
            else:
                special(st)
            if st.trap is not None:
                self._check_live(st)
        except ModelViolation as v:
            self._fail(st, pc, v)
        if self.trace is not None:
            self._trace_end(st)

    def _slow_fault(self, st: _CpuState, pc: int, status: int) -> None:
        """The fast path saw something wrong after executing: report it as _exec would."""
        cpu = self._mcpus[st.index]
        try:
            if status != 0 or cpu.fault is not None:
                raise ModelViolation(K.CPU_FAULT, cpu.fault or f"unicorn error {status} at {cpu.pc:#x}")
            if cpu.trap is not None:
                raise ModelViolation(K.CPU_FAULT, f"int3 executed outside a site, at {cpu.trap.ip - 1:#x}")
            self._off_boundary(cpu.pc)
        except ModelViolation as v:
            self._fail(st, pc, v)

    def advance(self, c: int) -> None:
        """Run CPU ``c`` through invisible steps up to its next visible one (exhaustive)."""
        st = self.cpus[c]
        cpu = self.machine.cpus[c]
        visible = self.visible
        while st.budget > 0 and self.violation is None and cpu.pc not in visible:
            self.cpu_step(c)

    def patcher_step(self) -> None:
        self.events += 1
        event = self.patcher.step()
        if self.trace is not None:
            self.trace.begin(actor="patcher", cpu=None, where=event.patch.site, text=event.step.value)
            self.trace.note(event.describe())
            self.trace.end()

    def drain(self, *, limit: int = DRAIN_LIMIT) -> None:
        """Let every CPU finish what it is in, back to ``cpu_loop`` outside the int3 path.

        The patcher takes no step meanwhile (a patch in flight stays in flight, and
        CPUs that meet its int3 are handled); afterwards every call through a site
        has come back, so the end-of-run identities are exact: calls == completed,
        records in memory == callback calls, body runs == loop calls.
        """
        loop = self.kernel.sym("cpu_loop")
        for st in self.cpus:
            cpu = self.machine.cpus[st.index]
            for _ in range(limit):
                if self.violation is not None or (cpu.pc == loop and st.trap is None):
                    break
                self.cpu_step(st.index)
            else:
                self._fail(st, cpu.pc, ModelViolation(K.CPU_FAULT, f"cpu{st.index} did not get back to cpu_loop"))
            if self.violation is not None:
                return

    def result(self, schedule: Sequence[int] = ()) -> RunResult:
        records = sum(self._word_at(self.kernel.percpu(st.index, PERCPU_LOG_HEAD)) for st in self.cpus)
        bodies = sum(self._word_at(self.kernel.percpu(st.index, PERCPU_BODY)) for st in self.cpus)
        return RunResult(
            instructions=self.instructions,
            patcher_steps=self.patcher.steps,
            loop_calls=self.loop_calls,
            violation=self.violation,
            sites={c.name: c.freeze() for c in self.counters.values()},
            records=records,
            bodies=bodies,
            schedule=tuple(schedule),
        )

    # -- plain execution ----------------------------------------------------------

    def _exec(self, st: _CpuState) -> None:
        cpu = self.machine.cpus[st.index]
        if not cpu.step():
            raise ModelViolation(K.CPU_FAULT, cpu.fault or "fault")
        if cpu.trap is not None:
            raise ModelViolation(K.CPU_FAULT, f"int3 executed outside a site, at {cpu.trap.ip - 1:#x}")
        if cpu.pc not in self._valid:
            self._off_boundary(cpu.pc)

    def _off_boundary(self, pc: int) -> None:
        for site in self.kernel.sites.values():
            if site < pc < site + CALL_SIZE:
                raise ModelViolation(K.TORN_INSN, f"execution continues inside site {self._sym(site)} at {pc:#x}")
        raise ModelViolation(K.CPU_FAULT, f"execution left the kernel text's instructions: pc={pc:#x}")

    def _sp(self, st: _CpuState) -> int:
        return self._mcpus[st.index].reg(self._reg_sp)

    def _word_at(self, addr: int) -> int:
        off = addr - self._base
        if not 0 <= off <= self._limit:
            raise ModelViolation(K.CPU_FAULT, f"read of {addr:#x} outside model memory")
        return self._word_struct.unpack_from(self._view, off)[0]

    # -- calls and returns --------------------------------------------------------

    def _call(self, st: _CpuState) -> None:
        """After the call: it owes a return to the next instruction at this sp."""
        cpu = self.machine.cpus[st.index]
        ret = cpu.pc + self._call_len[cpu.pc]
        self._exec(st)
        st.shadow.append(_Shadow(ret, self._sp(st)))

    def _loop_call(self, st: _CpuState) -> None:
        cpu = self.machine.cpus[st.index]
        st.parent = cpu.pc + self._call_len[cpu.pc]
        st.body_mark = self._word_at(self.kernel.percpu(st.index, PERCPU_BODY))
        self._call(st)

    def _ret(self, st: _CpuState) -> None:
        """Before the ret: the word it pops is the one its call pushed, at that depth."""
        sp = self._sp(st)
        popped = self._word_at(sp)
        if not st.shadow or not isinstance(st.shadow[-1], _Shadow):
            raise ModelViolation(K.WRONG_RETURN, f"ret pops {popped:#x} with no call outstanding")
        owed = st.shadow.pop()
        if sp != owed.sp:
            raise ModelViolation(K.STACK_IMBALANCE, f"ret at sp={sp:#x}, its call left sp={owed.sp:#x}")
        if popped != owed.ret:
            raise ModelViolation(
                K.WRONG_RETURN, f"ret pops {self._sym(popped)} ({popped:#x}), its call pushed {self._sym(owed.ret)}"
            )
        self._exec(st)

    def _call_done(self, st: _CpuState) -> None:
        """Back in cpu_loop: the traced function's body ran exactly once."""
        ran = self._word_at(self.kernel.percpu(st.index, PERCPU_BODY)) - st.body_mark
        if ran == 0:
            raise ModelViolation(K.LOST_CALL, "traced_func returned without its body running")
        if ran > 1:
            raise ModelViolation(K.DOUBLED_CALL, f"traced_func's body ran {ran} times for one call")
        self.loop_calls += 1
        self._exec(st)

    # -- sites ----------------------------------------------------------------------

    def _site(self, st: _CpuState) -> None:
        """A fetch of a patchable site: classify it, execute it, check what the CPU did."""
        cpu = self.machine.cpus[st.index]
        site = cpu.pc
        patcher = self.patcher
        transition = patcher.transition(site)
        phase = patcher.phase(site)
        data = self.mem.read(site, CALL_SIZE)
        fetch = classify_fetch(data, transition)
        counters = self.counters[site]
        per_phase = counters.phases[phase]
        per_phase[0] += 1
        if fetch is Fetch.TORN:
            raise ModelViolation(
                K.TORN_INSN,
                f"{counters.name} fetched as {data.hex(' ')}: neither {transition.old.hex(' ')} "
                f"nor {transition.new.hex(' ')} nor int3 in front of either",
            )
        if site in st.passes:
            raise ModelViolation(K.STACK_IMBALANCE, f"a call through {counters.name} never came back to site+5")
        sp = self._sp(st)
        passing = _Pass(site, sp, self._log_head(st), transition)
        st.passes[site] = passing
        if not cpu.step():
            raise ModelViolation(K.CPU_FAULT, cpu.fault or "fault")
        if cpu.trap is not None:
            delivery, cpu.trap = cpu.trap, None
            if fetch is not Fetch.INT3:
                raise ModelViolation(
                    K.STALE_CODE, f"CPU trapped on {counters.name} although memory holds {data.hex(' ')}"
                )
            per_phase[1] += 1
            trap = _Trap(delivery, passing, self.mem.read(delivery.sp, st.top - delivery.sp))
            st.trap = trap
            st.shadow.append(trap)
            if self.trace is not None:
                words = self.isa.hw_frame
                frame = ", ".join(f"{n}={self._word_at(delivery.frame + i * self._word):#x}" for i, n in enumerate(words))
                self.trace.note(f"int3 trap ({phase.value} window): CPU pushed [{frame}] at {delivery.frame:#x}")
            return
        if fetch is Fetch.INT3:
            raise ModelViolation(
                K.STALE_CODE,
                f"memory holds int3 at {counters.name} but the CPU executed a cached instruction "
                f"(went to {self._sym(cpu.pc)})",
            )
        insn = decode_site(site, data)
        expected = site + CALL_SIZE if insn.target is None else insn.target
        if insn.kind is InsnKind.CALL:
            st.shadow.append(_Shadow(site + CALL_SIZE, sp - self._word))
        if cpu.pc != expected:
            raise ModelViolation(
                K.STALE_CODE,
                f"{counters.name} holds {data.hex(' ')} (-> {self._sym(expected)}) but the CPU went to {self._sym(cpu.pc)}",
            )
        per_phase[2 if fetch is Fetch.OLD else 3] += 1
        self._resolve(st, passing, cpu.pc)

    def _resolve(self, st: _CpuState, passing: _Pass, target: int) -> None:
        """A call through a site reached ``target``: it must be the old or the new one."""
        counters = self.counters[passing.site]
        counters.calls += 1
        passing.target = target
        if target in passing.transition.new_targets:
            counters.new_hits += 1
        elif target in passing.transition.old_targets:
            counters.old_hits += 1
        else:
            allowed = sorted(passing.transition.old_targets | passing.transition.new_targets)
            names = " / ".join(self._sym(a) for a in allowed)
            if target == passing.site + CALL_SIZE:
                raise ModelViolation(K.LOST_CALL, f"call through {counters.name} skipped: expected {names}")
            raise ModelViolation(K.WRONG_TARGET, f"call through {counters.name} went to {self._sym(target)}, expected {names}")

    def _log_head(self, st: _CpuState) -> int:
        return self._word_at(self.kernel.percpu(st.index, PERCPU_LOG_HEAD))

    def _pass_end(self, st: _CpuState) -> None:
        """Arrival at site + 5: the call through the site is complete; check depth and record."""
        cpu = self.machine.cpus[st.index]
        site = cpu.pc - CALL_SIZE
        passing = st.passes.pop(site, None)
        if passing is not None:
            counters = self.counters[site]
            sp = self._sp(st)
            if sp != passing.sp:
                raise ModelViolation(
                    K.STACK_IMBALANCE, f"back at {counters.name}+5 with sp={sp:#x}, the call started at sp={passing.sp:#x}"
                )
            counters.completed += 1
            if counters.name in CALLBACK_SITES:
                self._check_record(st, passing)
        self._exec(st)

    def _check_record(self, st: _CpuState, passing: _Pass) -> None:
        """A callback site's call leaves exactly one record, naming the right call."""
        name = self.counters[passing.site].name
        tag = self.kernel.tag_of(passing.target) if passing.target is not None else None
        expected = 0 if tag is None else 1
        head = self._log_head(st)
        written = head - passing.log_head
        if written < expected:
            raise ModelViolation(K.LOST_CALL, f"call through {name} reached {self._sym(passing.target)} but left no record")
        if written > expected:
            raise ModelViolation(K.DOUBLED_CALL, f"call through {name} left {written} records, expected {expected}")
        if expected == 0:
            return
        self.counters[passing.site].callbacks += 1
        base = self.kernel.record_addr(st.index, head - 1)
        cpu_id, got_tag, function, parent = (self._word_at(base + i * self._word) for i in range(RECORD_WORDS))
        problems = []
        if got_tag != tag:
            problems.append(f"tag {got_tag:#x} != {tag:#x}")
        if function != self._traced_func:
            problems.append(f"function {self._sym(function)} != traced_func")
        if parent != st.parent:
            problems.append(f"parent {self._sym(parent)} != {self._sym(st.parent)}")
        if cpu_id != st.index:
            problems.append(f"cpu {cpu_id} != {st.index}")
        if problems:
            raise ModelViolation(K.WRONG_RECORD, f"record of the call through {name}: " + "; ".join(problems))

    # -- the int3 path --------------------------------------------------------------

    def _check_live(self, st: _CpuState) -> None:
        """The interrupted stack, from its sp up, is exactly as it was at the trap."""
        trap = st.trap
        assert trap is not None
        lo = trap.delivery.sp
        now = self.mem.read(lo, len(trap.live))
        if now != trap.live:
            word = self._word
            for off in range(0, len(now), word):
                if now[off : off + word] != trap.live[off : off + word]:
                    old = int.from_bytes(trap.live[off : off + word], "little")
                    new = int.from_bytes(now[off : off + word], "little")
                    raise ModelViolation(
                        K.LIVE_STACK_OVERWRITTEN,
                        f"interrupted stack word at {lo + off:#x} (sp+{off}) changed {old:#x} -> {new:#x}",
                    )

    def _handler(self, st: _CpuState) -> None:
        """do_int3: run the handler over pt_regs in memory, check its frame, then ``ret``."""
        cpu = self.machine.cpus[st.index]
        trap = st.trap
        if trap is None:
            raise ModelViolation(K.CPU_FAULT, "do_int3 reached outside the int3 path")
        regs_addr = cpu.reg(self.isa.reg_regs_arg)
        try:
            outcome = do_int3(self.world.handler, regs_addr)
        except ModelFault as exc:
            self._check_live(st)  # the store that came before the wild one is the story
            raise ModelViolation(K.CPU_FAULT, f"do_int3 faulted: {exc}") from exc
        trap.outcome = outcome
        if self.trace is not None:
            self.trace.note(f"do_int3(regs={regs_addr:#x}): {outcome.describe()}")
            frame = PtRegs(self.mem, self.isa, outcome.regs_out)
            fields = ("ip", "cs", "flags", "sp", "ss") if self._complete_frames else ("ip", "cs", "flags")
            words = ", ".join(f"{name}={frame.get(name):#x}" for name in fields)
            self.trace.note(f"frame handed back at {outcome.regs_out:#x}: {words}")
        if outcome.action is Action.NOT_OURS:
            raise ModelViolation(K.UNHANDLED_INT3, f"kernel int3 at {self._sym(outcome.site)} not handled: the kernel oopses")
        if outcome.warned:
            raise ModelViolation(K.FRAME_MOVED, f"do_int3: regs moved {outcome.regs_in:#x} -> {outcome.regs_out:#x}")
        if self.isa.arch is Arch.I386:
            cpu.set_reg(self.isa.reg_ret, outcome.regs_out)
        delivered = trap.delivery
        trap.resume_sp = delivered.sp - self._word if outcome.action is Action.CALL else delivered.sp
        self._check_live(st)
        self._check_returned_frame(trap)
        self._ret(st)

    def _frame_problems(self, regs: PtRegs, trap: _Trap) -> list[str]:
        """How the pt_regs at ``regs`` differ from the frame this trap must return through."""
        outcome, delivered = trap.outcome, trap.delivery
        assert outcome is not None and trap.resume_sp is not None
        problems = []
        if regs.get("ip") != outcome.resume_ip:
            problems.append(f"ip={self._sym(regs.get('ip'))}, emulated {self._sym(outcome.resume_ip)}")
        if regs.get("cs") != delivered.cs:
            problems.append(f"cs={regs.get('cs'):#x}, delivered {delivered.cs:#x}")
        if regs.get("flags") != delivered.flags:
            problems.append(f"flags={regs.get('flags'):#x}, delivered {delivered.flags:#x}")
        if self._complete_frames:
            if regs.get("sp") != trap.resume_sp:
                problems.append(f"sp={regs.get('sp'):#x}, emulated {trap.resume_sp:#x}")
            if regs.get("ss") & 0xFFFF != delivered.ss:
                problems.append(f"ss={regs.get('ss'):#x}, delivered {delivered.ss:#x}")
        elif outcome.action is Action.CALL and regs.addr + self.isa.off("sp") != trap.resume_sp:
            problems.append(
                f"the frame's sp slot {regs.addr + self.isa.off('sp'):#x} is not the emulated stack top "
                f"{trap.resume_sp:#x}"
            )
        return problems

    def _check_returned_frame(self, trap: _Trap) -> None:
        """The frame do_int3 hands back says: resume at the emulated target, same cs/flags."""
        assert trap.outcome is not None
        problems = self._frame_problems(PtRegs(self.mem, self.isa, trap.outcome.regs_out), trap)
        if problems:
            raise ModelViolation(K.CORRUPT_FRAME, "frame returned by do_int3: " + "; ".join(problems))

    def _restore(self, st: _CpuState) -> None:
        """The entry starts popping pt_regs: they must be the registers saved at the trap."""
        trap = st.trap
        if trap is None or trap.outcome is None:
            raise ModelViolation(K.CPU_FAULT, "int3 restore path reached outside a handled trap")
        sp = self._sp(st)
        regs = PtRegs(self.mem, self.isa, sp)
        problems = [
            f"{field}={got:#x}, saved {value:#x}"
            for (name, _), value in zip(self.isa.gprs, trap.delivery.gprs)
            if (got := regs.get(field := _pt_field(name))) != value
        ]
        problems += self._frame_problems(regs, trap)
        if problems:
            where = f"entry restores pt_regs from {sp:#x}"
            if sp != trap.outcome.regs_out:
                where += f", but do_int3 returned the frame at {trap.outcome.regs_out:#x}"
            raise ModelViolation(K.CORRUPT_FRAME, f"{where}: " + "; ".join(problems))
        self._exec(st)

    def _iret(self, st: _CpuState) -> None:
        """iret pops the frame delivered at the trap, changed only as the handler decided."""
        cpu = self.machine.cpus[st.index]
        trap = st.trap
        if trap is None or trap.outcome is None or trap.resume_sp is None:
            raise ModelViolation(K.CPU_FAULT, "iret outside a handled trap")
        outcome, delivered = trap.outcome, trap.delivery
        sp = self._sp(st)
        word = self._word
        ip, cs, flags = (self._word_at(sp + i * word) for i in range(3))
        problems = []
        if ip != outcome.resume_ip:
            problems.append(f"ip={self._sym(ip)} ({ip:#x}), handler chose {self._sym(outcome.resume_ip)}")
        if cs != delivered.cs:
            problems.append(f"cs={cs:#x}, delivered {delivered.cs:#x}")
        if flags != delivered.flags:
            problems.append(f"flags={flags:#x}, delivered {delivered.flags:#x}")
        if self.isa.hw_pushes_sp:
            new_sp, ss = self._word_at(sp + 3 * word), self._word_at(sp + 4 * word)
            if ss != delivered.ss:
                problems.append(f"ss={ss:#x}, delivered {delivered.ss:#x}")
        else:
            new_sp = sp + 3 * word
        if new_sp != trap.resume_sp:
            problems.append(f"resumes with sp={new_sp:#x}, handler chose {trap.resume_sp:#x}")
        if problems:
            raise ModelViolation(K.CORRUPT_FRAME, f"iret frame at {sp:#x}: " + "; ".join(problems))
        if not cpu.step():
            raise ModelViolation(K.CPU_FAULT, cpu.fault or "fault")
        changed = [
            f"{name} {before:#x} -> {after:#x}"
            for (name, reg), before in zip(self.isa.gprs, delivered.gprs)
            if (after := cpu.reg(reg)) != before
        ]
        if changed:
            raise ModelViolation(K.CORRUPT_REGS, "registers after iret: " + ", ".join(changed))
        st.trap = None
        if not st.shadow or st.shadow[-1] is not trap:
            raise ModelViolation(K.WRONG_RETURN, "iret with calls of the int3 path still outstanding")
        st.shadow.pop()
        if outcome.action is Action.CALL:
            assert outcome.pushed is not None
            st.shadow.append(_Shadow(outcome.pushed, trap.resume_sp))
        self.patcher.serialized(st.index)
        self._resolve(st, trap.passing, cpu.pc)

    # -- failures and traces ----------------------------------------------------------

    def _fail(self, st: _CpuState, pc: int, v: ModelViolation) -> None:
        # events counts steps from 1; traces number them from 0, like this index.
        self.violation = Violation(v.kind, st.index, self.events - 1, pc, v.message)
        if self.trace is not None:
            self.trace.note(f"VIOLATION {v.kind.value}: {v.message}")

    def _sym(self, addr: int | None) -> str:
        return "none" if addr is None else self.kernel.image.symbolize(addr)

    def _trace_begin(self, st: _CpuState, pc: int) -> None:
        assert self.trace is not None
        try:
            text, _ = disassemble(self.isa.bits, pc, self.mem.read(pc, 15))
        except ModelFault:
            text = "(unmapped)"
        if pc in self.kernel.sites.values():
            text += f"   [{self.mem.read(pc, CALL_SIZE).hex(' ')}]"
        self.trace.begin(actor=f"cpu{st.index}", cpu=st.index, where=self._sym(pc), text=text)

    def _trace_end(self, st: _CpuState) -> None:
        assert self.trace is not None
        cpu = self.machine.cpus[st.index]
        sp = cpu.reg(self.isa.reg_sp)
        regs = [("ip", cpu.pc)] + [(name, cpu.reg(reg)) for name, reg in self.isa.trace_regs]
        stack = []
        for i in range(STACK_WORDS):
            try:
                stack.append(self.machine.read_word(sp + i * self._word))
            except ModelFault:
                break
        self.trace.end(sp=sp, regs=regs, stack=stack)


# -- reports --------------------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    """The first violating interleaving, replayed with a trace."""

    violation: Violation
    interleaving: str
    trace: tuple[TraceEvent, ...]
    trace_total: int

    def trace_lines(self, *, limit: int, word: int) -> list[str]:
        return format_trace(self.trace, cpu=self.violation.cpu, limit=limit, word=word)


@dataclass(frozen=True)
class Report:
    """Totals over every interleaving explored, and the first violation."""

    config: ModelConfig
    spec: VariantSpec
    interleavings: int
    violating: int
    instructions: int
    patcher_steps: int
    loop_calls: int
    records: int
    bodies: int
    seconds: float
    sites: tuple[SiteStats, ...]
    kinds: Mapping[ViolationKind, int]
    first: Failure | None

    @property
    def calls(self) -> int:
        return sum(s.calls for s in self.sites)

    @property
    def old_hits(self) -> int:
        return sum(s.old_hits for s in self.sites)

    @property
    def new_hits(self) -> int:
        return sum(s.new_hits for s in self.sites)

    @property
    def instructions_per_second(self) -> float:
        return self.instructions / self.seconds if self.seconds > 0 else 0.0

    def site(self, name: str) -> SiteStats:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)


class _Totals:
    def __init__(self) -> None:
        self.interleavings = 0
        self.violating = 0
        self.instructions = 0
        self.patcher_steps = 0
        self.loop_calls = 0
        self.records = 0
        self.bodies = 0
        self.site_runs: list[Mapping[str, SiteStats]] = []
        self.kinds: dict[ViolationKind, int] = {}
        self.first: tuple[RunResult, Callable[[TraceRecorder], str]] | None = None

    def add(self, result: RunResult, replay: Callable[[TraceRecorder], str]) -> None:
        self.interleavings += 1
        self.instructions += result.instructions
        self.patcher_steps += result.patcher_steps
        self.loop_calls += result.loop_calls
        self.records += result.records
        self.bodies += result.bodies
        self.site_runs.append(result.sites)
        if result.violation is not None:
            self.violating += 1
            self.kinds[result.violation.kind] = self.kinds.get(result.violation.kind, 0) + 1
            if self.first is None:
                self.first = (result, replay)

    def report(self, world: World, seconds: float) -> Report:
        first = None
        if self.first is not None:
            result, replay = self.first
            recorder = TraceRecorder()
            description = replay(recorder)
            assert result.violation is not None
            first = Failure(result.violation, description, tuple(recorder.events), recorder.total)
        return Report(
            config=world.config,
            spec=world.spec,
            interleavings=self.interleavings,
            violating=self.violating,
            instructions=self.instructions,
            patcher_steps=self.patcher_steps,
            loop_calls=self.loop_calls,
            records=self.records,
            bodies=self.bodies,
            seconds=seconds,
            sites=sum_stats(SITES, self.site_runs),
            kinds=dict(self.kinds),
            first=first,
        )


# -- random interleavings ---------------------------------------------------------------


def _random_run(world: World, run_index: int, trace: TraceRecorder | None = None) -> tuple[RunResult, float]:
    config = world.config
    rng = random.Random(f"textpoke-model:{config.seed}:{run_index}")
    rate = rng.choices(PATCHER_RATES, weights=PATCHER_RATE_WEIGHTS)[0]
    run = Run(world, plan=CYCLE, site_state=INITIAL_SITE_STATE, repeat=True,
              budget=config.steps, trace=trace)
    ncpus = config.cpus
    patcher = run.patcher
    steps = config.steps
    rand = rng.random
    cpu_step = run.cpu_step
    while run.instructions < steps and run.violation is None:
        if rand() < rate and patcher.enabled():
            run.patcher_step()
        else:
            cpu_step(int(rand() * ncpus))
    if config.drain:
        run.drain()
    return run.result(), rate


def explore_random(world: World, *, progress: Callable[[int], None] | None = None) -> Report:
    """``runs`` seeded random interleavings of ``steps`` instructions each."""
    config = world.config
    totals = _Totals()
    start = time.perf_counter()
    for index in range(config.runs):
        result, rate = _random_run(world, index)

        def replay(recorder: TraceRecorder, index: int = index, rate: float = rate) -> str:
            _random_run(world, index, recorder)
            return f"random interleaving {index}, random seed {config.seed} (patcher step probability {rate})"

        totals.add(result, replay)
        if progress is not None:
            progress(index + 1)
        if config.stop_at_first and result.violation is not None:
            break
    return totals.report(world, time.perf_counter() - start)


# -- exhaustive interleavings -------------------------------------------------------------


def _exhaustive_leaf(
    world: World, patch_index: int, prefix: Sequence[int], stack: list[tuple[int, ...]] | None,
    trace: TraceRecorder | None = None,
) -> tuple[RunResult, bool]:
    """Run one schedule: follow ``prefix``, then take the first choice, pushing the others.

    Returns the result and whether the run is maximal (every CPU used its budget,
    or a violation ended it); a run that stops because the only CPUs left are
    below the turn order is a duplicate of another class and is not counted.
    """
    config = world.config
    patch = CYCLE[patch_index]
    state = site_state_after(INITIAL_SITE_STATE, CYCLE[:patch_index])
    kernel = world.kernel
    visible = frozenset({kernel.sites[patch.site], kernel.sym("do_int3")})
    run = Run(world, plan=(patch,), site_state=state, repeat=False, budget=config.steps,
              visible=visible, trace=trace)
    ncpus = config.cpus
    for c in range(ncpus):
        run.advance(c)
    taken: list[int] = []
    turn = 0
    while run.violation is None:
        choices = [PATCHER] if run.patcher.enabled() else []
        choices += [c for c in range(turn, ncpus) if run.cpus[c].budget > 0]
        if not choices:
            break
        depth = len(taken)
        if depth < len(prefix):
            choice = prefix[depth]
        else:
            choice = choices[0]
            if stack is not None:
                stack.extend((*taken, alt) for alt in reversed(choices[1:]))
        taken.append(choice)
        if choice == PATCHER:
            run.patcher_step()
            turn = 0
        else:
            run.cpu_step(choice)
            run.advance(choice)
            turn = choice
    maximal = run.violation is not None or all(st.budget <= 0 for st in run.cpus)
    if maximal and config.drain:
        run.drain()
    return run.result(taken), maximal


def _schedule_text(schedule: Sequence[int]) -> str:
    return " ".join("P" if c == PATCHER else str(c) for c in schedule)


def iter_exhaustive(world: World) -> Iterator[tuple[int, RunResult]]:
    """Every interleaving class, patch by patch: ``(patch index, result)`` per class."""
    config = world.config
    indices = config.patches if config.patches is not None else tuple(range(len(CYCLE)))
    for patch_index in indices:
        stack: list[tuple[int, ...]] = [()]
        while stack:
            prefix = stack.pop()
            result, maximal = _exhaustive_leaf(world, patch_index, prefix, stack)
            if maximal:
                yield patch_index, result


def explore_exhaustive(world: World, *, progress: Callable[[int], None] | None = None) -> Report:
    """Every interleaving class, patch by patch, ``steps`` instructions per CPU."""
    config = world.config
    totals = _Totals()
    start = time.perf_counter()
    for patch_index, result in iter_exhaustive(world):

        def replay(recorder: TraceRecorder, patch_index: int = patch_index,
                   schedule: tuple[int, ...] = result.schedule) -> str:
            _exhaustive_leaf(world, patch_index, schedule, None, recorder)
            return (
                f"exhaustive, patch {patch_index} ({CYCLE[patch_index].describe()}), "
                f"schedule [{_schedule_text(schedule)}] (P = patcher step, n = CPU n runs up to "
                f"and including its next visible step)"
            )

        totals.add(result, replay)
        if progress is not None:
            progress(totals.interleavings)
        if config.stop_at_first and result.violation is not None:
            break
    return totals.report(world, time.perf_counter() - start)


def run_model(config: ModelConfig, *, progress: Callable[[int], None] | None = None) -> Report:
    """Build the machine for ``config``, explore, report."""
    if config.cpus < 1 or config.steps < 1 or config.runs < 1:
        raise UsageError(f"cpus, steps and runs must be at least 1 (got {config.cpus}, {config.steps}, {config.runs})")
    with World(config) as world:
        if config.exhaustive:
            return explore_exhaustive(world, progress=progress)
        return explore_random(world, progress=progress)
