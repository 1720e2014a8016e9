"""A target process: identity checks, threads, and memory through /proc/PID/mem.

Memory access needs no ptrace attachment, only ptrace *permission*, so after
injection the tool works on the running process without stopping anything.
Writes through /proc/PID/mem reach read-only text (the kernel breaks COW for us)
and shared mappings alike.
"""

from __future__ import annotations

import errno
import os
import pwd
from pathlib import Path
from types import TracebackType

from .._errors import NoSuchProcess, NotAUserProcess, PermissionDenied, TargetError, TargetExited, TargetReplaced
from .maps import Mapping, read_maps

_CAP_SYS_PTRACE = 19


def thread_cpu_ns(pid: int, tid: int) -> int | None:
    """CPU time thread ``tid`` has run (/proc/PID/task/TID/schedstat), None if it is gone."""
    try:
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


_PF_EXITING = 0x4  # include/linux/sched.h: set as a thread starts to exit


def thread_exiting(pid: int, tid: int) -> bool:
    """Whether thread ``tid`` is exiting or gone. ptrace refuses to attach to a thread
    that has finished exiting (a zombie, or dead and not yet removed) with EPERM, not
    ESRCH: a refusal to take for "gone", not for a lack of permission."""
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return True
    return fields[0] in ("Z", "X", "x") or bool(int(fields[6]) & _PF_EXITING)


def seize_found_gone(error: OSError, pid: int, tid: int) -> bool:
    """Whether a refused PTRACE_SEIZE of ``tid`` means the thread is gone: ESRCH, or
    EPERM for a thread that is exiting (see :func:`thread_exiting`)."""
    return error.errno == errno.ESRCH or (error.errno == errno.EPERM and thread_exiting(pid, tid))


def _status_fields(pid: int) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError as exc:
        raise NoSuchProcess(f"no process with pid {pid}") from exc
    except ProcessLookupError as exc:  # pragma: no cover - raced with exit
        raise NoSuchProcess(f"no process with pid {pid}") from exc
    result = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        result[key] = value.strip()
    return result


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


#: The hint when another tracer holds the process: changing user would not help.
TRACER_HINT = ("a process has one tracer at a time: detach that one (quit strace; `detach` in gdb), "
               "then run textpoke again")


def access_denied(pid: int, doing: str) -> PermissionDenied:
    """The error for a refused access to ``pid`` (``doing``: "access process 12",
    "ptrace process 12"): the reason named, and a hint that fits it (another
    tracer holds it: detach that one; else: run as its user or as root)."""
    reason = why_not_traceable(pid)
    tracer = int(_status_fields(pid).get("TracerPid", "0"))
    hint = TRACER_HINT if tracer and tracer != os.getpid() else None
    return PermissionDenied(f"may not {doing}: {reason}", hint=hint)


def why_not_traceable(pid: int) -> str:
    """The most likely reason this process may not trace ``pid`` (for messages)."""
    status = _status_fields(pid)
    tracer = int(status.get("TracerPid", "0"))
    tracer_comm = Path(f"/proc/{tracer}/comm")
    scope_file = Path("/proc/sys/kernel/yama/ptrace_scope")
    me = _status_fields(os.getpid())
    return refusal_reason(
        status,
        my_pid=os.getpid(),
        my_uid=os.geteuid(),
        my_caps=int(me.get("CapEff", "0"), 16),
        my_permitted=int(me.get("CapPrm", "0"), 16),
        yama_scope=scope_file.read_text().strip() if scope_file.exists() else None,
        tracer_name=tracer_comm.read_text().strip() if tracer and tracer_comm.exists() else "?",
    )


def refusal_reason(
    status: dict[str, str],
    *,
    my_pid: int,
    my_uid: int,
    my_caps: int,
    my_permitted: int,
    yama_scope: str | None,
    tracer_name: str = "?",
) -> str:
    """Why the kernel refuses us ptrace access to a process whose
    /proc/PID/status fields are ``status``, in the order the kernel checks
    (pure, so each reason is testable on any machine)."""
    tracer = int(status.get("TracerPid", "0"))
    if tracer and tracer != my_pid:
        return f"it is already traced by pid {tracer} ({tracer_name}); detach that tracer first"
    target_uid = int(status.get("Uid", "0").split()[1])
    has_cap = bool(my_caps & (1 << _CAP_SYS_PTRACE))
    if target_uid != my_uid and not has_cap:
        return (
            f"it belongs to user {_user(target_uid)} and you are {_user(my_uid)} "
            "without CAP_SYS_PTRACE"
        )
    # Same user, but the kernel also wants the target's permitted capabilities
    # to be a subset of ours (commoncap's ptrace_access_check).
    target_caps = int(status.get("CapPrm", "0"), 16)
    if not has_cap and target_caps & ~my_permitted:
        return (
            f"it has capabilities you lack (CapPrm {target_caps:#x}, yours {my_permitted:#x}) "
            "and you have no CAP_SYS_PTRACE"
        )
    if yama_scope == "3":
        return "yama ptrace_scope is 3: ptrace is disabled on this machine"
    if yama_scope in ("1", "2") and not has_cap:
        return f"yama ptrace_scope is {yama_scope}: only root (CAP_SYS_PTRACE) may attach to non-children"
    if not has_cap and status.get("State", "").startswith("D"):
        return "the process is in uninterruptible sleep"
    return "the kernel refused ptrace access (not dumpable, or a security module)"


class Process:
    """An open target; use as a context manager (closes the memory file)."""

    def __init__(self, pid: int) -> None:
        if pid <= 0:
            raise NoSuchProcess(f"no process with pid {pid}")
        self.pid = pid
        status = _status_fields(pid)
        state = status.get("State", "?")
        if state.startswith("Z"):
            others = [t for t in self.threads() if t != pid and not thread_exiting(pid, t)]
            if others:
                raise NotAUserProcess(
                    f"the main thread of process {pid} has exited (pthread_exit) while "
                    f"{len(others)} thread{'s' if len(others) > 1 else ''} run{'' if len(others) > 1 else 's'} on: "
                    "textpoke cannot trace such a process",
                    hint="textpoke reads and writes a process through its main thread; keep it alive (join the others)",
                )
            raise NotAUserProcess(
                f"process {pid} is a zombie (exited, not yet reaped)",
                hint="there is no code left to patch; its parent must reap it",
            )
        if not Path(f"/proc/{pid}/maps").read_text(errors="replace").strip() and not self._has_exe():
            raise NotAUserProcess(
                f"pid {pid} is a kernel thread",
                hint="textpoke patches user-space processes only",
            )
        self.name = status.get("Name", "?")
        self._mem_fd = self._open_mem()

    def _has_exe(self) -> bool:
        try:
            os.readlink(f"/proc/{self.pid}/exe")
            return True
        except OSError:
            return False

    def _open_mem(self) -> int:
        try:
            return os.open(f"/proc/{self.pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise NoSuchProcess(f"no process with pid {self.pid}") from exc
        except PermissionError as exc:
            raise access_denied(self.pid, f"access process {self.pid}") from exc

    # -- lifetime ---------------------------------------------------------
    def close(self) -> None:
        if self._mem_fd >= 0:
            os.close(self._mem_fd)
            self._mem_fd = -1

    def __enter__(self) -> Process:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def alive(self) -> bool:
        try:
            state = _status_fields(self.pid).get("State", "Z")
        except NoSuchProcess:
            return False
        return not state.startswith(("Z", "X"))

    def stopped(self) -> bool:
        """Stopped by a signal (SIGSTOP, SIGTSTP, ...): no thread runs, our agent neither."""
        try:
            state = _status_fields(self.pid).get("State", "")
        except NoSuchProcess:
            return False
        return state.startswith("T")

    def replaced(self) -> bool:
        """The process executed a new program since we opened it.

        Our /proc/PID/mem descriptor pins the address space of the program we
        opened; after an exec that one is gone and every access reads 0 bytes
        (an unmapped address in a live one fails with EIO instead), so no write
        of ours can ever land in the new program."""
        try:
            return os.pread(self._mem_fd, 1, 0) == b""
        except OSError:
            return False

    # -- identity -----------------------------------------------------------
    @property
    def exe(self) -> str:
        try:
            return os.readlink(f"/proc/{self.pid}/exe")
        except FileNotFoundError as exc:
            raise TargetExited(f"process {self.pid} exited") from exc

    def threads(self) -> list[int]:
        try:
            return sorted(int(t) for t in os.listdir(f"/proc/{self.pid}/task"))
        except FileNotFoundError as exc:
            raise TargetExited(f"process {self.pid} exited") from exc

    def thread_syscall(self, tid: int) -> int | None:
        """The syscall ``tid`` is blocked in, or None when it runs user code (or is gone)."""
        try:
            text = Path(f"/proc/{self.pid}/task/{tid}/syscall").read_text().split()
        except OSError:
            return None
        if not text or text[0] == "running":
            return None
        return int(text[0])

    def thread_signal_mask(self, tid: int, field: str = "SigBlk") -> int:
        """The signals ``tid`` blocks (SigBlk; bit n-1 for signal n), or with ``field="SigPnd"``
        has pending for itself; 0 if it is gone."""
        try:
            status = Path(f"/proc/{self.pid}/task/{tid}/status").read_text()
        except OSError:
            return 0
        for line in status.splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1], 16)
        return 0

    def maps(self) -> list[Mapping]:
        return read_maps(self.pid)

    # -- memory -------------------------------------------------------------
    def read(self, address: int, size: int) -> bytes:
        try:
            data = os.pread(self._mem_fd, size, address)
        except OSError as exc:
            raise self._memory_error("read", address, size, exc) from exc
        if len(data) != size:
            self._check_replaced()
            raise TargetError(f"short read of {size} bytes at {address:#x} in process {self.pid}")
        return data

    def write(self, address: int, data: bytes) -> None:
        try:
            written = os.pwrite(self._mem_fd, data, address)
        except OSError as exc:
            raise self._memory_error("write", address, len(data), exc) from exc
        if written != len(data):
            self._check_replaced()
            raise TargetError(f"short write of {len(data)} bytes at {address:#x} in process {self.pid}")

    def _check_replaced(self) -> None:
        if not self.alive():
            raise TargetExited(f"process {self.pid} exited")
        if self.replaced():
            raise TargetReplaced(f"process {self.pid} executed a new program (exec) while textpoke worked on it")

    def _memory_error(self, what: str, address: int, size: int, exc: OSError) -> TargetError:
        if not self.alive():
            return TargetExited(f"process {self.pid} exited")
        if exc.errno == errno.EIO:
            return TargetError(
                f"cannot {what} {size} bytes at {address:#x} in process {self.pid}: not mapped",
                hint="the address is outside the process's mappings (see /proc/PID/maps)",
            )
        return TargetError(f"cannot {what} memory of process {self.pid}: {exc.strerror}")
