"""Holding a thread in a ptrace stop for a few milliseconds, and giving it back exactly.

poke/guard.py decides which threads (those that block SIGTRAP) and when (while
a batch has int3s in place); this module does it to one thread:

1. ``PTRACE_SEIZE`` + ``PTRACE_INTERRUPT``: the thread stops in the kernel's
   signal path, before it runs another user instruction: an interrupt stop,
   or a signal-delivery stop if a signal of the program was being delivered
   right then (kept as it is and passed on at the release, siginfo and all).
   A thread blocked in a syscall is woken out of it: most syscalls then hold
   -ERESTART*, which the kernel turns into a restart when the thread goes on
   without a handler running, exactly as after any stop. The few that return
   EINTR to any wake-up but did nothing then (syscalls.REISSUE_AFTER_EINTR:
   epoll_wait, sigtimedwait, semop, io_getevents) get -ERESTARTNOHAND instead,
   so the kernel issues them again (a finite timeout starts over), unless a
   handler runs for a signal that arrived meanwhile: that one gets EINTR, as it
   would have without us. The caller does not interrupt a thread blocked in
   any other syscall that returns EINTR (:func:`interruptible_quietly`).
2. :meth:`HeldThread.arm_gate`: the thread's own state goes into a restore
   frame below its red zone (sigframe.py, as for a borrowed thread) and its
   registers point at ``gate`` (resident code): should the tool die now, the
   kernel releases the thread there; it waits until the batch is finished and
   returns to itself through rt_sigreturn.
3. :meth:`HeldThread.release`: registers (as the stop found them, but for the
   EINTR rewrite) and the mask back, then detach, with the signal of a
   signal-delivery stop. The kernel's signal path then decides about the
   interrupted syscall and any signal that arrived meanwhile, as without us.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass

from .._errors import InjectionError, TargetError
from . import _ptrace, sigframe
from ._ptrace import Regs
from .inject import rseq_resume_point
from .process import Process, access_denied, seize_found_gone
from .sigframe import SYS_restart_syscall
from .syscalls import REISSUE_AFTER_EINTR, TRANSPARENT_RESTART

_U64 = 0xFFFF_FFFF_FFFF_FFFF
_EINTR = -errno.EINTR & _U64
_ERESTARTNOHAND = -sigframe.ERESTARTNOHAND & _U64


#: Blocking syscalls outside TRANSPARENT_RESTART (the borrow's list) that a stop
#: also ends with -ERESTART* (restarted as after any stop): rt_sigsuspend,
#: futex_waitv, msgsnd, msgrcv, flock, fcntl (F_SETLKW), and restart_syscall
#: (resuming a call an earlier stop ended with -ERESTART_RESTARTBLOCK).
_ALSO_RESTARTED = frozenset({130, 449, 69, 70, 73, 72, SYS_restart_syscall})


def interruptible_quietly(process: Process, tid: int) -> bool:
    """Whether a ptrace stop now would go unnoticed by thread ``tid``: it runs
    user code (the instant it may enter a syscall is a window of microseconds,
    covered for REISSUE_AFTER_EINTR), or it is blocked in a syscall that
    restarts after a stop or that :class:`HeldThread` issues again."""
    nr = process.thread_syscall(tid)
    return nr is None or nr in _ALSO_RESTARTED or nr in TRANSPARENT_RESTART or nr in REISSUE_AFTER_EINTR


@dataclass(frozen=True)
class Position:
    """Where a held thread is: ``rip`` (user code it returns to), and the
    syscall it was in (``syscall`` >= 0) with the instruction it restarts at."""

    rip: int
    syscall: int
    restart_rip: int | None


class HeldThread:
    """One thread held stopped; :meth:`release` gives it back (idempotent)."""

    def __init__(self, process: Process, tid: int) -> None:
        self.process = process
        self.tid = tid
        self.held = False
        self.gone = False  # it exited before it stopped
        self.signal = 0  # held at the delivery of this signal of the program
        self.reissued = False  # its syscall got -ERESTARTNOHAND for -EINTR
        self.gated = False
        self.mask = 0  # its blocked signals, as the stop found them
        self._seized = False
        self._regs: Regs | None = None  # what the thread resumes with

    def hold(self) -> None:
        """Step 1. TargetError subclasses if it cannot be held (a debugger traces it, ...)."""
        self.start()
        self.finish()

    def start(self) -> None:
        """Seize and interrupt (:meth:`finish` waits for the stop): several
        threads started first stop together, not one after the other."""
        try:
            _ptrace.seize(self.tid)
        except OSError as exc:
            if seize_found_gone(exc, self.process.pid, self.tid):
                self.gone = True
                return
            if exc.errno == errno.EPERM:
                raise access_denied(self.process.pid,
                                    f"hold thread {self.tid} of process {self.process.pid}") from exc
            raise InjectionError(f"ptrace seize of thread {self.tid} failed: {exc.strerror}") from exc
        self._seized = True
        try:
            _ptrace.interrupt(self.tid)
        except OSError as exc:
            self._detach()
            if exc.errno == errno.ESRCH:
                self.gone = True
                return
            raise InjectionError(f"could not interrupt thread {self.tid}: {exc.strerror}") from exc

    def finish(self) -> None:
        """Wait for the stop :meth:`start` asked for; the thread is held after it (or gone)."""
        if self.gone or not self._seized:
            return
        try:
            status = self._wait_stop()
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                self.gone, self._seized = True, False
                return
            self.held = True
            if status >> 16 == 0:
                self.signal = os.WSTOPSIG(status)  # a signal-delivery stop: passed on at the release
            self.mask = _ptrace.get_sigmask(self.tid)
            regs = _ptrace.get_regs(self.tid)
            nr = regs.orig_rax if regs.orig_rax < 2**63 else -1
            if nr in REISSUE_AFTER_EINTR and regs.rax == _EINTR:
                regs = regs._replace(rax=_ERESTARTNOHAND)
                _ptrace.set_regs(self.tid, regs)
                self.reissued = True
            self._regs = regs
        except OSError as exc:
            self._detach()
            if exc.errno == errno.ESRCH:
                self.gone, self.held = True, False
                return
            raise InjectionError(f"could not hold thread {self.tid}: {exc.strerror}") from exc
        except BaseException:
            self._detach()
            raise

    def _wait_stop(self, timeout_s: float = 5.0) -> int:
        """The status of the stop asked for; InjectionError if the thread does not
        stop in ``timeout_s`` (uninterruptible in the kernel all that time)."""
        deadline = time.monotonic() + timeout_s
        delay = 0.0
        while True:
            tid, status = _ptrace.wait_thread(self.tid, nohang=True)
            if tid:
                return status
            if time.monotonic() > deadline:
                raise InjectionError(f"thread {self.tid} of process {self.process.pid} did not stop within "
                                     f"{timeout_s:g} s (uninterruptible in the kernel)")
            time.sleep(delay)
            delay = min(delay + 0.00005, 0.001)

    @property
    def position(self) -> Position:
        assert self._regs is not None
        regs = self._regs
        nr = regs.orig_rax if regs.orig_rax < 2**63 else -1
        restart = sigframe.resumed_state(regs, restart_block_intact=True).rip if nr >= 0 else None
        return Position(rip=regs.rip, syscall=nr, restart_rip=restart)

    def arm_gate(self, gate: int) -> None:
        """Step 2: if the tool dies from now on, the thread waits at ``gate``
        (resident code ending in rt_sigreturn on the frame written here).
        InjectionError if its stack has no room for the frame (nothing changed)."""
        assert self._regs is not None and self.held
        regs = self._regs
        xstate = sigframe.fit(_ptrace.get_xstate(self.tid), sigframe.xsave_layout())
        mask = _ptrace.get_sigmask(self.tid)
        resume = rseq_resume_point(self.process, self.tid, regs)
        at = sigframe.place(regs.rsp, sigframe.frame_size(len(xstate)))
        frame = sigframe.build(resume, xstate=xstate, sigmask=mask, at=at, pretcode=0)
        try:
            self.process.write(at, frame)
        except TargetError as exc:
            raise InjectionError(f"no room below the stack pointer of thread {self.tid} for its restore "
                                 "frame") from exc
        # orig_rax = -1: the kernel's restart fix-up is in the frame already.
        _ptrace.set_regs(self.tid, regs._replace(rip=gate, rsp=at + 8, orig_rax=_U64))
        self.gated = True

    def release(self) -> None:
        """Step 3 (idempotent): the thread runs on as if never stopped."""
        if not self._seized:
            return
        if not self.held:
            self.finish()  # started, not yet waited for: detach needs it stopped
            if not self._seized:
                return
        try:
            if self.gated:
                assert self._regs is not None
                _ptrace.set_regs(self.tid, self._regs)
                self.gated = False
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise InjectionError(f"could not restore thread {self.tid}: {exc.strerror}") from exc
        finally:
            self._detach()

    def abandon(self) -> None:
        """Detach leaving the thread where the gate put it: it waits there until
        the batch is finished (the batch could not be, yet)."""
        if self._seized:
            self.gated = False
            self._detach()

    def _detach(self) -> None:
        try:
            _ptrace.detach(self.tid, self.signal)
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise InjectionError(f"could not release thread {self.tid}: {exc.strerror}") from exc
            self._reap()
        finally:
            self.held = self._seized = False

    def _reap(self) -> None:
        """The thread died while held (the process exited): as its tracer we
        must reap it, or the process stays a zombie its parent waits on forever."""
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                tid, status = _ptrace.wait_thread(self.tid, nohang=True)
            except ChildProcessError:
                return  # reaped, or no longer ours
            if tid and (os.WIFEXITED(status) or os.WIFSIGNALED(status)):
                return
            time.sleep(0.001)


__all__ = ["HeldThread", "Position", "interruptible_quietly"]
