"""Start a program under textpoke, held at its ELF entry point.

The child asks to be traced (PTRACE_TRACEME) and stops at exec; we plant an
int3 at the entry point (AT_ENTRY from /proc/PID/auxv), let the dynamic loader
map every library and run the constructors, and catch the thread there with
the int3 removed and rip rewound.  The caller installs what it needs through
that stopped thread (nothing else runs yet) and then lets it go.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
from collections.abc import Sequence

from .._errors import InjectionError, PermissionDenied, TargetError, TargetExited, UsageError
from . import _ptrace
from .process import Process
from ..x86.insn import INT3

_AT_ENTRY = 9


def _entry_point(pid: int) -> int:
    data = open(f"/proc/{pid}/auxv", "rb").read()
    for key, value in struct.iter_unpack("<QQ", data):
        if key == _AT_ENTRY:
            return value
    raise InjectionError(f"process {pid} has no AT_ENTRY in its auxiliary vector")


def _wait_trap(pid: int) -> None:
    _, status = _ptrace.wait_thread(pid)
    if not os.WIFSTOPPED(status):
        raise TargetExited(f"process {pid} exited before reaching its entry point")
    if os.WSTOPSIG(status) != signal.SIGTRAP:
        raise TargetError(f"process {pid} stopped with signal {os.WSTOPSIG(status)} before its entry point")


def _already_traced() -> str:
    """Why a child of ours could not ask to be traced: another tracer follows our children."""
    try:
        status = open("/proc/self/status").read()
        tracer = int(next(line for line in status.splitlines() if line.startswith("TracerPid:")).split()[1])
        name = open(f"/proc/{tracer}/comm").read().strip() if tracer else ""
    except (OSError, StopIteration, ValueError):
        tracer, name = 0, ""
    if tracer:
        return (f"it is already traced by {name or '?'} (pid {tracer}), which traces textpoke and the programs "
                "it starts; a process has only one tracer")
    return "it is already traced by another tool; a process has only one tracer"


def spawn(argv: Sequence[str], **popen: object) -> subprocess.Popen:
    """Start ``argv`` and return it stopped (ptrace-stopped by us) at its entry point.

    Pass the result's pid to :class:`BorrowedThread` with ``already_stopped=True``
    (``Resident.attach(..., spawned=True)`` does), which resumes it at the end."""
    if not argv:
        raise UsageError("no command to start")
    try:
        proc = subprocess.Popen(list(argv), preexec_fn=_ptrace.traceme, **popen)  # type: ignore[arg-type]
    except OSError as exc:
        raise UsageError(f"cannot start {argv[0]}: {exc.strerror}", hint="check the command and its path") from exc
    except subprocess.SubprocessError as exc:  # PTRACE_TRACEME failed in the child: it has a tracer already
        raise PermissionDenied(f"cannot trace {argv[0]}: {_already_traced()}",
                               hint="run textpoke outside strace -f or gdb, or start the program on its own "
                               "and attach with `textpoke trace -p PID`") from exc
    try:
        _wait_trap(proc.pid)  # the SIGTRAP of exec
        entry = _entry_point(proc.pid)
        with Process(proc.pid) as process:
            original = process.read(entry, 1)
            process.write(entry, INT3)
            _ptrace.cont(proc.pid)
            _wait_trap(proc.pid)
            regs = _ptrace.get_regs(proc.pid)
            if regs.rip != entry + 1:
                raise InjectionError(f"process {proc.pid} trapped at {regs.rip:#x}, not at its entry point")
            process.write(entry, original)
            _ptrace.set_regs(proc.pid, regs._replace(rip=entry))
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc
