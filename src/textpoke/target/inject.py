"""Borrow one thread of a running process to run syscalls inside it.

This is the only time textpoke stops anything: one thread, briefly.  The steps:

1. choose a thread whose interruption the program cannot observe: one blocked
   in a syscall that restarts transparently (read, nanosleep, futex, ...), else
   one running user code; never one in epoll_wait & co, which would see EINTR;
2. ``PTRACE_SEIZE`` + ``PTRACE_INTERRUPT`` it (no other thread is touched:
   ptrace attaches per thread) and save its registers;
3. for each syscall: point ``rip`` at a ``syscall`` instruction of the target,
   set ``orig_rax = -1`` (so the kernel's restart logic leaves *our* syscall
   alone), single-step, read ``rax``;
4. restore every register exactly, so an interrupted syscall restarts as it
   would have, and detach, delivering any signal that arrived meanwhile.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from types import TracebackType

from .._errors import InjectionError, PermissionDenied, TargetError, TargetExited
from . import _ptrace
from ._ptrace import Regs
from .process import Process, why_not_traceable
from .syscalls import TRANSPARENT_RESTART

SYSCALL_INSN = b"\x0f\x05"
_ERRNO_MAX = 4095
_U64 = 0xFFFF_FFFF_FFFF_FFFF


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


def find_syscall_gadget(process: Process) -> int:
    """Address of a ``syscall`` instruction in the target's executable mappings."""
    maps = [m for m in process.maps() if m.executable and m.path != "[vsyscall]"]
    # The vdso and libc are tiny to scan and always have one.
    maps.sort(key=lambda m: (m.path != "[vdso]", "libc" not in m.path, m.start))
    for mapping in maps:
        size = min(mapping.end - mapping.start, 4 << 20)
        try:
            code = process.read(mapping.start, size)
        except TargetError:
            continue
        offset = code.find(SYSCALL_INSN)
        if offset >= 0:
            return mapping.start + offset
    raise InjectionError(f"no syscall instruction found in process {process.pid}")


class BorrowedThread:
    """One seized thread, stopped, with its registers saved (steps 2-4)."""

    def __init__(self, process: Process, tid: int | None = None, *, already_stopped: bool = False,
                 keep_stopped: bool = False) -> None:
        self.process = process
        self.tid = tid if tid is not None else choose_thread(process)
        # A thread we already trace and hold stopped (spawn): no seize/interrupt.
        self._already_stopped = already_stopped
        # Leave the thread stopped at the end of the ``with`` block; release() lets it go
        # (spawn: the program's first instruction waits until the tracing is in place).
        self.keep_stopped = keep_stopped
        self._saved: Regs | None = None
        self._pending_signals: list[int] = []
        self._gadget: int | None = None
        self.stopped_ns = 0
        self._stop_start = 0

    # step 2 ---------------------------------------------------------------
    def __enter__(self) -> BorrowedThread:
        if self._already_stopped:
            self._stop_start = time.perf_counter_ns()
            self._saved = _ptrace.get_regs(self.tid)
            return self
        try:
            _ptrace.seize(self.tid)
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                raise TargetExited(f"thread {self.tid} of process {self.process.pid} is gone") from exc
            if exc.errno == errno.EPERM:
                raise PermissionDenied(
                    f"may not ptrace process {self.process.pid}: {why_not_traceable(self.process.pid)}"
                ) from exc
            raise InjectionError(f"ptrace seize of thread {self.tid} failed: {exc.strerror}") from exc
        self._stop_start = time.perf_counter_ns()
        try:
            _ptrace.interrupt(self.tid)
            self._wait_stopped()
            self._saved = _ptrace.get_regs(self.tid)
        except BaseException:
            self._release(restore=False)
            raise
        return self

    def _wait_stopped(self) -> None:
        """Wait for our thread's next ptrace stop.

        A signal-delivery-stop for a signal of the program (anything but the
        SIGTRAP of our own single step or int3) is held and re-delivered at
        detach (step 4), so the program loses no signal."""
        _, status = _ptrace.wait_thread(self.tid)
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            raise TargetExited(f"process {self.process.pid} exited while textpoke injected code")
        sig = os.WSTOPSIG(status)
        if status >> 16 == 0 and sig != signal.SIGTRAP:
            self._pending_signals.append(sig)

    # step 3 ---------------------------------------------------------------
    def prepare(self) -> None:
        """Do the slow lookups (the syscall gadget) before the thread is stopped."""
        if self._gadget is None:
            self._gadget = find_syscall_gadget(self.process)

    @property
    def saved_regs(self) -> Regs:
        assert self._saved is not None
        return self._saved

    def syscall(self, nr: int, *args: int) -> int:
        """Run ``nr(args)`` in the borrowed thread; negative errno raises InjectionError."""
        if self._gadget is None:
            self._gadget = find_syscall_gadget(self.process)
        return self.run_at(self._gadget, nr, *args, stop_after=len(SYSCALL_INSN))

    def run_at(self, rip: int, nr: int, *args: int, stop_after: int | None) -> int:
        """Run from ``rip`` with rax=nr and the syscall argument registers set.

        ``stop_after``: single-step once and expect ``rip + stop_after``;
        None: continue until the code executes an ``int3`` (our own stubs)."""
        regs6 = list(args) + [0] * (6 - len(args))
        base = self.saved_regs
        regs = Regs(
            **{
                **base.__dict__,
                "rip": rip,
                "rax": nr & _U64,
                "orig_rax": _U64,  # -1: not in a syscall, no restart fix-up
                "rdi": regs6[0] & _U64,
                "rsi": regs6[1] & _U64,
                "rdx": regs6[2] & _U64,
                "r10": regs6[3] & _U64,
                "r8": regs6[4] & _U64,
                "r9": regs6[5] & _U64,
                # Keep the red zone and our pushes away from the interrupted frame.
                "rsp": (base.rsp - 256) & ~0xF,
            }
        )
        for _ in range(50):
            _ptrace.set_regs(self.tid, regs)
            if stop_after is not None:
                _ptrace.singlestep(self.tid)
            else:
                _ptrace.cont(self.tid)
            self._wait_stopped()
            after = _ptrace.get_regs(self.tid)
            if stop_after is not None and after.rip == rip + stop_after:
                break
            if stop_after is None and after.rip != rip:
                break
            # Stopped before the instruction ran (a signal or group stop): again.
        else:
            raise InjectionError(f"injected syscall {nr} never completed in thread {self.tid}")
        result = after.rax if after.rax < 2**63 else after.rax - 2**64
        if -_ERRNO_MAX <= result < 0:
            raise InjectionError(
                f"syscall {nr} in process {self.process.pid} failed: {os.strerror(-result)}"
            )
        return result

    def run_stub(self, rip: int) -> Regs:
        """Run generated code at ``rip`` until it executes an ``int3``; its registers then.

        One round trip for a whole sequence of syscalls (the stub's), where
        :meth:`syscall` costs one per syscall: each round trip waits for the
        borrowed thread to be scheduled, which dominates the stop on a busy
        machine."""
        base = self.saved_regs
        regs = Regs(**{**base.__dict__, "rip": rip, "orig_rax": _U64, "rsp": (base.rsp - 256) & ~0xF})
        for _ in range(50):
            _ptrace.set_regs(self.tid, regs)
            _ptrace.cont(self.tid)
            self._wait_stopped()
            after = _ptrace.get_regs(self.tid)
            if after.rip != rip:
                return after
            # Stopped before the first instruction ran (a signal or group stop): again.
        raise InjectionError(f"injected code never ran in thread {self.tid}")

    # step 4 ---------------------------------------------------------------
    def _release(self, *, restore: bool) -> None:
        try:
            if restore and self._saved is not None:
                _ptrace.set_regs(self.tid, self._saved)
            first = self._pending_signals[0] if self._pending_signals else 0
            _ptrace.detach(self.tid, first)
            for extra in self._pending_signals[1:]:
                os.kill(self.process.pid, extra)  # rare: re-queue process-wide
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise InjectionError(f"could not detach thread {self.tid}: {exc.strerror}") from exc
        finally:
            self.stopped_ns = time.perf_counter_ns() - self._stop_start

    def release(self) -> None:
        """Restore the registers and detach (the end of a kept-stopped borrow)."""
        self._release(restore=True)

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self.keep_stopped and et is None:
            return
        self._release(restore=True)
