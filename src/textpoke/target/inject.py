"""Borrow one thread of a running process to run syscalls inside it.

This is the only time textpoke stops anything: one thread, briefly.  The steps:

1. choose a thread whose interruption the program cannot observe: one blocked
   in a syscall that restarts transparently (read, nanosleep, futex, ...), else
   one running user code; never one in epoll_wait & co, which would see EINTR;
2. ``PTRACE_SEIZE`` + ``PTRACE_INTERRUPT`` it (no other thread is touched:
   ptrace attaches per thread) and save its registers; a thread stopped
   inside an rseq critical section is resumed at its abort handler, as the
   kernel does after any preemption;
3. before the first register change, write a restore frame on its stack
   (sigframe.py): from then on, whatever instruction the thread is left at,
   the code it runs on ends in rt_sigreturn to its own state, so a tool killed
   at any instant leaves it running as if never stopped;
4. for each syscall: point ``rip`` at a ``syscall; ret`` of the target with
   the frame under ``rsp``, set ``orig_rax = -1`` (so the kernel's restart
   logic leaves *our* syscall alone), run to its syscall-exit stop
   (PTRACE_SYSCALL: the kernel drops syscall tracing when the tracer dies,
   unlike single-stepping, whose trap would kill an untraced thread), read ``rax``;
5. bring the thread back into the kernel's signal path (an interrupt stop),
   restore its mask and every register there, re-send the program's signals
   that arrived meanwhile, and detach: an interrupted syscall restarts, or
   returns EINTR to a handler, exactly as it would have without us.
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import struct
import time
from dataclasses import dataclass
from types import TracebackType

from .._errors import InjectionError, TargetError, TargetExited, TextpokeError
from ..x86.asm import Asm, R
from ..x86.insn import INT3
from . import _ptrace, sigframe
from ._ptrace import Regs
from .process import Process, access_denied, seize_found_gone
from .syscalls import SI_KERNEL, SYS_rt_sigreturn, TRANSPARENT_RESTART

_ERRNO_MAX = 4095
_U64 = 0xFFFF_FFFF_FFFF_FFFF
#: Every signal blocked (the kernel keeps SIGKILL and SIGSTOP deliverable).
ALL_SIGNALS = _U64
_RSEQ_CS = 8  # struct rseq: u32 cpu_id_start, u32 cpu_id, u64 rseq_cs
_RSEQ_CS_FORMAT = "<IIQQQ"  # struct rseq_cs: version, flags, start_ip, post_commit_offset, abort_ip
_MAX_STOPS = 100  # stops tolerated (program signals, group stops) before one syscall completes


def _assemble(*ops: tuple[object, ...]) -> bytes:
    a = Asm()
    for op in ops:
        a.op(*op)
    return a.assemble(0)[0]


@functools.cache
def _syscall_ret() -> bytes:
    return _assemble(("SYSCALL",), ("RETNQ",))


@functools.cache
def _sigreturn_patterns() -> tuple[bytes, ...]:
    """``mov rax, 15; syscall`` (glibc's and musl's __restore_rt) and its short form."""
    return (_assemble(("MOV_RM64_IMM32", R.RAX, SYS_rt_sigreturn), ("SYSCALL",)),
            _assemble(("MOV_R32_IMM32", R.EAX, SYS_rt_sigreturn), ("SYSCALL",)))


@dataclass(frozen=True)
class Gadgets:
    """Code of the target a borrowed thread runs on (step 4)."""

    syscall_ret: int  # ``syscall; ret``
    sigreturn: int  # ``mov rax, 15; syscall``


def choose_thread(process: Process, *, exclude: frozenset[int] = frozenset(), wait_s: float = 2.0) -> int:
    """Pick the thread to borrow (step 1). Blocked-and-restartable beats running:
    a blocked thread stays where it is, a running one may enter epoll_wait just
    as the interrupt arrives."""
    deadline = time.monotonic() + wait_s
    while True:
        running = []
        for tid in process.threads():
            if tid in exclude:
                continue
            nr = process.thread_syscall(tid)
            if nr is None:
                running.append(tid)
            elif nr in TRANSPARENT_RESTART:
                return tid
        if running:
            return running[0]
        if time.monotonic() > deadline:
            raise InjectionError(
                f"every thread of process {process.pid} is blocked in a syscall that a ptrace "
                "stop would interrupt with EINTR (epoll_wait, sigtimedwait, ...)",
                hint="retry when the process is busy, or give it a thread that sleeps in read/nanosleep",
            )
        time.sleep(0.005)


def find_gadgets(process: Process) -> Gadgets:
    """Find a ``syscall; ret`` and an rt_sigreturn in the target's executable
    mappings (libc has both: its syscall wrappers and __restore_rt)."""
    maps = [m for m in process.maps() if m.executable and m.path != "[vsyscall]"]
    maps.sort(key=lambda m: ("libc" not in m.path, m.path != "[vdso]", m.start))
    syscall_ret = sigreturn = None
    for mapping in maps:
        size = min(mapping.end - mapping.start, 4 << 20)
        try:
            code = process.read(mapping.start, size)
        except TargetError:
            continue
        if syscall_ret is None and (offset := code.find(_syscall_ret())) >= 0:
            syscall_ret = mapping.start + offset
        for pattern in _sigreturn_patterns():
            if sigreturn is None and (offset := code.find(pattern)) >= 0:
                sigreturn = mapping.start + offset
        if syscall_ret is not None and sigreturn is not None:
            return Gadgets(syscall_ret=syscall_ret, sigreturn=sigreturn)
    raise InjectionError(
        f"process {process.pid} has no 'syscall; ret' and rt_sigreturn code to return through "
        "(glibc and musl have both), so a thread of it cannot be borrowed safely",
        hint="textpoke attaches to programs linked with a C library",
    )


def rseq_resume_point(process: Process, tid: int, regs: Regs, *,
                      config: tuple[int, int, int] | None = None) -> Regs:
    """``regs`` with rip at the abort handler if the thread was stopped inside an
    rseq critical section (the kernel aborts a preempted one the same way; our
    code running in between would otherwise make it forget to). ``config``: the
    thread's rseq configuration, if already read (_ptrace.rseq_configuration)."""
    try:
        area, _, _ = config if config is not None else _ptrace.rseq_configuration(tid)
        if not area:
            return regs
        (cs,) = struct.unpack("<Q", process.read(area + _RSEQ_CS, 8))
        if not cs:
            return regs
        _, _, start, post_commit, abort = struct.unpack(_RSEQ_CS_FORMAT, process.read(cs, 32))
    except (OSError, TargetError):
        return regs  # no rseq request (old kernel) or an unreadable descriptor: nothing to abort
    if start <= regs.rip < start + post_commit:
        return regs._replace(rip=abort)
    return regs


class Urgent:
    """The tool's own thread on SCHED_FIFO (priority 1) while it holds a thread of the
    program stopped, when it may (root, CAP_SYS_NICE, or an RLIMIT_RTPRIO): on a loaded
    machine a fair-scheduled tool waits out other threads' slices between its ptrace
    requests (tens of milliseconds with 16 busy threads on 2 CPUs, measured), and the
    borrowed thread waits with it. Put back after the release, whatever happens; a
    tool without the right runs as it did. Also around a whole attach (session.attach):
    a few milliseconds of work and waits on the agent. Nested use changes nothing."""

    def __init__(self) -> None:
        self._saved: tuple[int, os.sched_param] | None = None

    def __enter__(self) -> Urgent:
        try:
            saved = (os.sched_getscheduler(0), os.sched_getparam(0))
            if saved[0] in (os.SCHED_OTHER, os.SCHED_BATCH):
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
                self._saved = saved
        except OSError:
            self._saved = None  # not allowed: stay as we are
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None:
            policy, param = self._saved
            self._saved = None
            try:
                os.sched_setscheduler(0, policy, param)
            except OSError:
                pass  # dropping back to a fair policy is always allowed


class BorrowedThread:
    """One seized thread, stopped, with its registers saved (steps 2-5)."""

    def __init__(self, process: Process, tid: int | None = None, *, already_stopped: bool = False,
                 keep_stopped: bool = False, exclude: frozenset[int] = frozenset()) -> None:
        self.process = process
        # Chosen here (tid None): a thread that exits before it is seized is replaced by
        # another choice (a program whose threads come and go); a given tid is that thread.
        self._exclude = exclude if tid is None else None
        self.tid = tid if tid is not None else choose_thread(process, exclude=exclude)
        # A thread we already trace and hold stopped (spawn): no seize/interrupt.
        self._already_stopped = already_stopped
        # Leave the thread stopped at the end of the ``with`` block; release() lets it go
        # (spawn: the program's first instruction waits until the tracing is in place).
        self.keep_stopped = keep_stopped
        self._stopped_regs: Regs | None = None  # as the stop found them
        self._saved: Regs | None = None  # what the thread resumes with (rseq abort applied)
        self._pending_signals: list[int] = []
        self._gadgets: Gadgets | None = None
        self._frame: int | None = None  # the restore frame, once written (step 3)
        self._mask = 0
        self._restored = False
        self._last_status = 0
        self.stopped_ns = 0
        self._stop_start = 0
        #: (rseq area, size, signature) the thread registered, as the stop found it
        #: (None: the kernel cannot tell); what the thread-ABI check needs.
        self.rseq_config: tuple[int, int, int] | None = None
        #: Of stopped_ns: from the interrupt until the thread's stop was seen (it was
        #: woken, or preempted, and had to get a CPU to reach the stop).
        self.stop_wait_ns = 0
        self._urgent = Urgent()
        #: Bytes to move rip back at the first stop: an int3's trap taken back.
        self._rewind = 0

    # step 2 ---------------------------------------------------------------
    def __enter__(self) -> BorrowedThread:
        if self._already_stopped:
            self._stop_start = time.perf_counter_ns()
            try:
                _ptrace.set_options(self.tid, _ptrace.PTRACE_O_TRACESYSGOOD)
                self._save()
            except BaseException:
                self._release(restore=False)
                raise
            return self
        self._urgent.__enter__()
        self._seize()
        self._stop_start = time.perf_counter_ns()
        try:
            _ptrace.interrupt(self.tid)
            self._wait_stop()
            self._take_back_int3_trap()
            self.stop_wait_ns = time.perf_counter_ns() - self._stop_start
            self._save()
        except BaseException:
            self._release(restore=False)
            raise
        return self

    def _seize(self, attempts: int = 5) -> None:
        """Seize the thread (its Urgent entered); a chosen thread found exiting is replaced."""
        gone: set[int] = set()
        while True:
            try:
                _ptrace.seize(self.tid, options=_ptrace.PTRACE_O_TRACESYSGOOD)
                return
            except OSError as exc:
                exiting = seize_found_gone(exc, self.process.pid, self.tid)
                if exiting and self._exclude is not None and len(gone) < attempts and self.process.alive():
                    gone.add(self.tid)
                    try:
                        self.tid = choose_thread(self.process, exclude=self._exclude | gone)
                    except TextpokeError:  # no thread left to choose: that is the error to say
                        self._urgent.__exit__()
                        raise
                    continue
                self._urgent.__exit__()
                if exiting:
                    raise TargetExited(f"thread {self.tid} of process {self.process.pid} is gone") from exc
                if exc.errno == errno.EPERM:
                    raise access_denied(self.process.pid, f"ptrace process {self.process.pid}") from exc
                raise InjectionError(f"ptrace seize of thread {self.tid} failed: {exc.strerror}") from exc

    def _take_back_int3_trap(self) -> None:
        """A thread stopped right after an int3 whose SIGTRAP it has not received yet (a
        fork child running into a site its parent's batch had in flight; an int3 of the
        program's own): the trap is taken back instead of held and sent again. The
        thread resumes *at* the int3 (rip - 1), so it traps anew and its handler sees a
        trap of the kernel's (SI_KERNEL), which textpoke's handler emulates; sent again
        the signal would be SI_TKILL, taken for someone else's and fatal, and the thread
        would resume one byte into the site (through the restore frame too, if we die).

        From an interrupt stop with SIGTRAP pending, PTRACE_CONT brings the thread to
        that signal's delivery stop at once (get_signal dequeues it before any
        instruction runs); there ``si_code`` tells a trap from a sent SIGTRAP, which is
        held as any signal is."""
        for _ in range(_MAX_STOPS):
            delivery = self._last_status >> 16 == 0 and os.WSTOPSIG(self._last_status) == signal.SIGTRAP
            if delivery:
                if _ptrace.get_siginfo_code(self.tid) == SI_KERNEL:
                    self._pending_signals.remove(signal.SIGTRAP)  # suppressed: the int3 runs again
                    self._rewind = len(INT3)
                return
            if not self.process.thread_signal_mask(self.tid, "SigPnd") >> (signal.SIGTRAP - 1) & 1:
                return
            _ptrace.cont(self.tid)
            self._wait_stop()

    def _save(self) -> None:
        self._stopped_regs = _ptrace.get_regs(self.tid)
        if self._rewind:
            self._stopped_regs = self._stopped_regs._replace(rip=self._stopped_regs.rip - self._rewind)
        try:
            self.rseq_config = _ptrace.rseq_configuration(self.tid)
        except OSError:
            self.rseq_config = None  # a kernel without PTRACE_GET_RSEQ_CONFIGURATION
        self._saved = rseq_resume_point(self.process, self.tid, self._stopped_regs,
                                        config=self.rseq_config or (0, 0, 0))

    def _wait_stop(self) -> int:
        """Wait for our thread's next ptrace stop; its WSTOPSIG.

        A signal-delivery-stop for a signal of the program is held (the signal
        is suppressed now and sent again at step 5), so the program loses no
        signal and never runs its handler on our injected state."""
        _, status = _ptrace.wait_thread(self.tid)
        self._last_status = status
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            raise TargetExited(f"process {self.process.pid} exited while textpoke injected code")
        sig = os.WSTOPSIG(status)
        if status >> 16 == 0 and sig != _ptrace.SYSCALL_STOP:
            self._pending_signals.append(sig)
        return sig

    # step 3 ---------------------------------------------------------------
    def prepare(self) -> None:
        """Do the slow lookups (the gadgets) before the thread is stopped."""
        if self._gadgets is None:
            self._gadgets = find_gadgets(self.process)

    @property
    def held_signals(self) -> tuple[int, ...]:
        """Signals of the program that arrived while we held the thread (sent again at step 5)."""
        return tuple(self._pending_signals)

    @property
    def saved_regs(self) -> Regs:
        assert self._saved is not None
        return self._saved

    def _arm(self) -> int:
        """Write the restore frame below the thread's red zone; its address."""
        if self._frame is not None:
            return self._frame
        self.prepare()
        assert self._gadgets is not None
        xstate = sigframe.fit(_ptrace.get_xstate(self.tid), sigframe.xsave_layout())
        self._mask = _ptrace.get_sigmask(self.tid)
        at = sigframe.place(self.saved_regs.rsp, sigframe.frame_size(len(xstate)))
        frame = sigframe.build(self.saved_regs, xstate=xstate, sigmask=self._mask, at=at,
                               pretcode=self._gadgets.sigreturn)
        try:
            self.process.write(at, frame)
        except TargetError as exc:
            raise InjectionError(
                f"no room below the stack pointer of thread {self.tid} for textpoke's restore frame",
                hint="retry: another thread may be borrowed",
            ) from exc
        self._frame = at
        return at

    @property
    def frame_sp(self) -> int:
        """The ``rsp`` under which code of ours finds the restore frame for
        rt_sigreturn (which reads the frame at rsp - 8)."""
        return self._arm() + 8

    # step 4 ---------------------------------------------------------------
    def syscall(self, nr: int, *args: int) -> int:
        """Run ``nr(args)`` in the borrowed thread; negative errno raises InjectionError.

        Runs at a ``syscall; ret`` gadget with ``rsp`` at the frame, whose first
        word sends the ``ret`` into rt_sigreturn."""
        frame = self._arm()
        assert self._gadgets is not None
        return self._run_syscall(self._gadgets.syscall_ret, nr, args, rsp=frame)

    def syscall_at(self, rip: int, nr: int, *args: int, block_signals: bool = False) -> int:
        """Run the ``syscall`` instruction at ``rip``: code of ours whose
        fall-through returns through rt_sigreturn (rsp = :attr:`frame_sp`).

        ``block_signals``: with every signal blocked (a thread it clones starts so)."""
        rsp = self.frame_sp
        if block_signals:
            _ptrace.set_sigmask(self.tid, ALL_SIGNALS)
        return self._run_syscall(rip, nr, args, rsp=rsp)

    def _run_syscall(self, rip: int, nr: int, args: tuple[int, ...], *, rsp: int) -> int:
        regs6 = list(args) + [0] * (6 - len(args))
        regs = self.saved_regs._replace(
            rip=rip,
            rax=nr & _U64,
            orig_rax=_U64,  # -1: not in a syscall, no restart fix-up
            rdi=regs6[0] & _U64,
            rsi=regs6[1] & _U64,
            rdx=regs6[2] & _U64,
            r10=regs6[3] & _U64,
            r8=regs6[4] & _U64,
            r9=regs6[5] & _U64,
            rsp=rsp,
        )
        _ptrace.set_regs(self.tid, regs)
        entered = False
        for _ in range(_MAX_STOPS):
            _ptrace.syscall(self.tid)
            if self._wait_stop() != _ptrace.SYSCALL_STOP:
                continue  # a program signal (held) or a group stop before the syscall: again
            if entered:
                break
            entered = True
        else:
            raise InjectionError(f"injected syscall {nr} never completed in thread {self.tid}")
        after = _ptrace.get_regs(self.tid)
        if after.rip != rip + sigframe.SYSCALL_INSN_SIZE:
            raise InjectionError(f"injected syscall {nr} stopped at {after.rip:#x}, not after {rip:#x}")
        result = after.rax if after.rax < 2**63 else after.rax - 2**64
        if -_ERRNO_MAX <= result < 0:
            raise InjectionError(
                f"syscall {nr} in process {self.process.pid} failed: {os.strerror(-result)}"
            )
        return result

    # step 5 ---------------------------------------------------------------
    def _back_into_get_signal(self) -> None:
        """From a syscall-exit stop, move the thread to an interrupt stop.

        Only the kernel's signal path (get_signal, where an interrupt stops a
        thread) decides exactly what an interrupted syscall of the program
        does next: restart it, resume it through restart_syscall, or return
        EINTR to a handler without SA_RESTART, for whatever signal arrived
        meanwhile. PTRACE_INTERRUPT marks the stopped thread; PTRACE_CONT lets
        it leave the syscall and stop there, before it reaches user mode.
        (Not from the entry stop, which would save a stop: a pending
        interrupt makes clone fail with ERESTARTNOINTR.) A
        thread traced since exec (spawn: PTRACE_TRACEME, where
        PTRACE_INTERRUPT does not apply) gets a SIGSTOP instead, which stops
        it at its delivery and is then suppressed."""
        if self._already_stopped:
            _ptrace.tgkill(self.process.pid, self.tid, signal.SIGSTOP)
        else:
            _ptrace.interrupt(self.tid)
        for _ in range(_MAX_STOPS):
            _ptrace.cont(self.tid)
            sig = self._wait_stop()
            if self._last_status >> 16 == _ptrace.PTRACE_EVENT_STOP:
                return
            if self._already_stopped and sig == signal.SIGSTOP:
                self._pending_signals.remove(signal.SIGSTOP)
                return
        raise InjectionError(f"thread {self.tid} never reached a stop in its signal path")

    def _restore(self) -> None:
        """Give the thread its own state back, in the kernel's signal path
        (:meth:`_back_into_get_signal`), so it resumes exactly as from the
        first stop. The order matters if we die meanwhile: the mask first (the
        thread would still reach rt_sigreturn, which restores it anyway), then
        the registers (from then on it resumes as its own)."""
        if self._saved is None or self._restored:
            return
        if self._frame is not None:
            self._back_into_get_signal()
            _ptrace.set_sigmask(self.tid, self._mask)
        if self._saved != _ptrace.get_regs(self.tid):
            _ptrace.set_regs(self.tid, self._saved)
        for sig in self._pending_signals:
            _ptrace.tgkill(self.process.pid, self.tid, sig)  # queued until we detach
        self._restored = True

    def _release(self, *, restore: bool) -> None:
        try:
            if restore:
                self._restore()
            _ptrace.detach(self.tid, 0)
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise InjectionError(f"could not detach thread {self.tid}: {exc.strerror}") from exc
        finally:
            self.stopped_ns = time.perf_counter_ns() - self._stop_start
            self._urgent.__exit__()

    def abandon(self) -> None:
        """Detach leaving the thread where it is, as a killed tool would: it
        returns through its restore frame (textpoke selftest checks that this
        kernel and CPU take our frame)."""
        self._restored = True
        self._release(restore=False)

    def release(self) -> None:
        """Restore the thread and detach (the end of a kept-stopped borrow)."""
        self._release(restore=True)

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self.keep_stopped and et is None:
            # Its own state back now (its mask matters to who checks it), still stopped.
            try:
                self._restore()
            except OSError as exc:
                raise InjectionError(f"could not restore thread {self.tid}: {exc.strerror}") from exc
            return
        self._release(restore=True)
