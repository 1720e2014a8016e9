"""``textpoke selftest``: does everything textpoke needs work on this machine?

Like the kernel's boot-time int3 self-test, it exercises the real mechanism on a
private target (target.c, built with the system C compiler into the cache
directory) rather than trusting configuration: ptrace permission, writes
through /proc/PID/mem, the mode of the shared memory, membarrier SYNC_CORE, and
the emulation of the new instruction by the resident handler, with exact counts
(a batch is held at its int3 step while the target calls the site: every call
must trap and be emulated, none lost or doubled), then signal chaining and that
the text is byte-identical after the revert.
"""

from __future__ import annotations

import enum
import os
import selectors
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from elftools.elf.elffile import ELFFile

from .._errors import TextpokeError
from ..demo import build_bundled
from ..poke.protocol import Patch, Step
from ..poke.resident import thread_pc
from ..poke.session import Session, attach
from ..sites import SiteKind, find_sites
from ..target import _ptrace
from ..target import syscalls as sc
from ..target.inject import BorrowedThread
from ..target.process import Process
from ..target.maps import Mapping
from ..target.security import added, openable_by_path, shared_modes, writable_and_executable
from ..x86.insn import SITE_SIZE, encode_call

CFLAGS = ("-O2", "-fno-pie", "-pthread")
#: Calls each of the target's two threads makes per "run".
CALLS = 1000
_MEMBARRIER_CMD_QUERY = 0
_SCRATCH_VALUE = 0x7E57_C0DE_5E1F_7E57


class Status(enum.Enum):
    OK = "ok"
    FAIL = "FAIL"
    SKIP = "skip"


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str


def build_target() -> Path:
    """Compile target.c once per source version into the cache directory."""
    return build_bundled(__package__, "target.c", stem="selftest", cflags=CFLAGS, what="the selftest target")


class _Target:
    """The running target, spoken to line by line (with a timeout: a hung target is a failure)."""

    def __init__(self, binary: Path) -> None:
        self.proc = subprocess.Popen([str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._buffer = b""
        self._selector = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        self._selector.register(self.proc.stdout, selectors.EVENT_READ)
        if not self.readline().startswith("ready"):
            raise TextpokeError("the selftest target did not start")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def readline(self, timeout_s: float = 20.0) -> str:
        deadline = time.monotonic() + timeout_s
        assert self.proc.stdout is not None
        while b"\n" not in self._buffer:
            if not self._selector.select(max(deadline - time.monotonic(), 0)):
                raise TextpokeError("the selftest target stopped answering")
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise TextpokeError(f"the selftest target died (exit {self.proc.wait()})")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def ask(self, command: str) -> dict[str, int]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        fields = [field.split("=") for field in self.readline().split() if "=" in field]
        return {key: int(value, 16 if key == "scratch" else 10) for key, value in fields}

    def close(self) -> int:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(b"quit\n")
                self.proc.stdin.close()
                return self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        return self.proc.wait()


def _symbol(binary: Path, name: str) -> int:
    with open(binary, "rb") as f:
        symtab = ELFFile(f).get_section_by_name(".symtab")
        return next(s["st_value"] for s in symtab.iter_symbols() if s.name == name)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _check(name: str, ok: bool, detail: str) -> Check:
    return Check(name, Status.OK if ok else Status.FAIL, detail)


@dataclass(frozen=True)
class _Counts:
    """Call totals the target reported, and traps the handler emulated, around one batch."""

    start: dict[str, int]  # before the batch
    held: dict[str, int]  # after the calls made while the batch held at its int3 step
    emulated_held: int
    after: dict[str, int]  # after the calls made once the batch completed
    emulated_after: int


def _patch_while_calling(session: Session, target: _Target, patch: Patch) -> _Counts:
    """Apply ``patch`` held at its int3 step while the target makes 2 x CALLS
    calls through the site (every one traps), then 2 x CALLS more after it."""
    held: list[tuple[dict[str, int], int]] = []

    def hold(step: Step) -> None:
        if step is Step.INT3:
            before = session.stats().emulated
            held.append((target.ask(f"run {CALLS}"), session.stats().emulated - before))

    start = target.ask("run 0")
    session.apply([patch], on_step=hold)
    ((during, emulated),) = held
    before = session.stats().emulated
    after = target.ask(f"run {CALLS}")
    return _Counts(start, during, emulated, after, session.stats().emulated - before)


def _exact(session: Session, target: _Target, site: int, to_a: bytes, to_b: bytes) -> tuple[bool, str]:
    """A->B then B->A: every call made mid-patch goes to the new callee through
    the handler, exactly once; none traps once the batch is done."""
    calls = 2 * CALLS
    problems = []
    for old, new, callee, other in ((to_a, to_b, "b", "a"), (to_b, to_a, "a", "b")):
        counts = _patch_while_calling(session, target, Patch(site=site, old=old, new=new))
        held = (counts.held[callee] - counts.start[callee], counts.held[other] - counts.start[other],
                counts.emulated_held)
        if held != (calls, 0, calls):
            problems.append(f"held at int3: {held[0]} calls to {callee.upper()}, {held[1]} to {other.upper()}, "
                            f"{held[2]} emulated; expected {calls}, 0, {calls}")
        after = (counts.after[callee] - counts.held[callee], counts.emulated_after)
        if after != (calls, 0):
            problems.append(f"after the batch: {after[0]} calls, {after[1]} traps; expected {calls}, 0")
        if counts.after["bad"]:
            problems.append(f"{counts.after['bad']} wrong results")
    if problems:
        return False, "; ".join(problems)
    return True, f"{2 * calls} calls made mid-patch, each trapped and emulated exactly once (A->B and back)"


class _Run:
    """One selftest run: the target, the session, and the rows so far."""

    def __init__(self, binary: Path, target: _Target, session: Session, *, maps_before: list[Mapping]) -> None:
        self.binary = binary
        self.maps_before = maps_before  # the target's mappings before textpoke attached
        self.target = target
        self.session = session
        self.site = find_sites(binary, kinds={SiteKind.CALL}, functions=["site_caller"], calls_to=["A"])[0].address
        self.file_bytes = _file_bytes(binary, self.site)

    def memory(self) -> Check:
        scratch = _symbol(self.binary, "scratch")
        self.session.process.write(scratch, struct.pack("<Q", _SCRATCH_VALUE))
        seen = self.target.ask("peek")["scratch"]
        return _check("/proc/PID/mem writes", seen == _SCRATCH_VALUE,
                      f"the target read back {seen:#x} (wrote {_SCRATCH_VALUE:#x})")

    def shared_memory(self) -> Check:
        maps = self.session.process.maps()
        modes = shared_modes(self.target.pid, maps)
        rwx = writable_and_executable(maps)
        # Only what the attach mapped: the program's own files may live anywhere (its
        # binary is in the cache directory, which may be under /tmp).
        files = openable_by_path(added(self.maps_before, maps))
        shown = ", ".join(sorted({oct(mode) for mode in modes.values()}))
        return _check("shared memory private",
                      bool(modes) and set(modes.values()) == {0o600} and not rwx and not files,
                      f"{_plural(len(modes), 'memfd')}, mode {shown}; "
                      f"{_plural(len(rwx), 'writable+executable mapping')}; "
                      f"{len(files)} of textpoke's mappings with a file path"
                      + (f" ({', '.join(sorted({m.path for m in files}))})" if files else ""))

    def membarrier(self) -> Check:
        resident = self.session.resident
        mask = resident.syscall(sc.SYS_membarrier, _MEMBARRIER_CMD_QUERY, 0, 0)
        syncs = self.session.stats().syncs
        resident.sync()
        synced = self.session.stats().syncs - syncs
        wanted = sc.MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE
        return _check("membarrier SYNC_CORE", bool(mask & wanted) and synced == 1,
                      f"supported commands {mask:#x}; the agent's sync ran {_plural(synced, 'time')}")

    def emulation(self) -> Check:
        to_b = encode_call(self.site, _symbol(self.binary, "B"))
        ok, detail = _exact(self.session, self.target, self.site, self.file_bytes, to_b)
        return _check("int3 emulation", ok, detail)

    def chaining(self) -> Check:
        not_ours = self.session.stats().not_ours
        own = self.target.ask("trap")["own"]
        passed = self.session.stats().not_ours - not_ours
        return _check("signal chaining", (own, passed) == (1, 1),
                      f"the target's own SIGTRAP handler ran {_plural(own, 'time')}; textpoke's handler passed "
                      f"{_plural(passed, 'trap')} on to it")

    def restored(self) -> Check:
        now = _live_bytes(self.target.pid, self.site)
        return _check("text restored", now == self.file_bytes,
                      f"site {self.site:#x} holds {now.hex(' ')} (file: {self.file_bytes.hex(' ')})")


def _crash_safe_borrow(target: _Target) -> Check:
    """Borrow the target's main thread (blocked in read), run a syscall in it,
    and abandon it there as a killed tool would: it must return through its
    restore frame to the read it was in, and answer the next command."""
    process = Process(target.pid)
    try:
        # It printed "ready" (or its last answer) and may still be returning from
        # that write: wait until it blocks in read, the syscall it must come back to.
        deadline = time.monotonic() + 5
        while process.thread_syscall(target.pid) != sc.SYS_read and time.monotonic() < deadline:
            time.sleep(0.001)
        with BorrowedThread(process, target.pid) as thread:
            before = thread.saved_regs
            pid = thread.syscall(sc.SYS_getpid)
            xstate = len(_ptrace.get_xstate(target.pid))
            thread.abandon()
        deadline = time.monotonic() + 5
        back = None
        while time.monotonic() < deadline:
            number = process.thread_syscall(target.pid)
            if number is not None and thread_pc(target.pid, target.pid) == before.rip:
                back = number
                break
            time.sleep(0.001)
    finally:
        process.close()
    answered = target.ask("peek").get("scratch") is not None
    ok = pid == target.pid and back == before.orig_rax and answered
    return _check("crash-safe borrow", ok,
                  f"a thread left mid-injection returned through its restore frame ({xstate}-byte XSAVE area) "
                  f"to syscall {back} at {before.rip:#x} and answered" if ok else
                  f"getpid gave {pid}; thread back in syscall {back} (was {before.orig_rax}); answered: {answered}")


def run_selftest(*, progress: Callable[[str], None] | None = None) -> list[Check]:
    """Run every check; an error in one is its FAIL row, and the others still run."""
    say = progress or (lambda _: None)
    try:
        binary = build_target()
    except TextpokeError as exc:
        return [Check("C compiler", Status.FAIL, exc.message)]
    checks = [Check("C compiler", Status.OK, f"built {binary}")]
    target = _Target(binary)
    try:
        say("crash-safe borrow")
        try:
            checks.append(_crash_safe_borrow(target))
        except TextpokeError as exc:
            checks.append(Check("crash-safe borrow", Status.FAIL, exc.message))
        say("attaching")
        with Process(target.pid) as process:
            maps_before = process.maps()
        try:
            session = attach(target.pid)
        except TextpokeError as exc:
            checks.append(Check("ptrace permission", Status.FAIL, exc.message))
            return checks
        stop_us = session.resident.attach_stop_ns / 1e3
        checks.append(_check("ptrace permission", True,
                             f"one thread borrowed for {stop_us:.0f} us to install the handler and agent"))
        run = _Run(binary, target, session, maps_before=maps_before)
        with session:
            for name, step in (("/proc/PID/mem writes", run.memory), ("shared memory private", run.shared_memory),
                               ("membarrier SYNC_CORE", run.membarrier), ("int3 emulation", run.emulation),
                               ("signal chaining", run.chaining)):
                say(name)
                try:
                    checks.append(step())
                except TextpokeError as exc:
                    checks.append(Check(name, Status.FAIL, exc.message))
        checks.append(run.restored())
    finally:
        code = target.close()
    checks.append(_check("target survived", code == 0, f"exit status {code}"))
    return checks


def _file_bytes(binary: Path, address: int) -> bytes:
    with open(binary, "rb") as f:
        text = ELFFile(f).get_section_by_name(".text")
        start = address - text["sh_addr"]
        return text.data()[start : start + SITE_SIZE]


def _live_bytes(pid: int, address: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        mem.seek(address)
        return mem.read(SITE_SIZE)


__all__ = ["Check", "Status", "build_target", "run_selftest"]
