"""Checks made before anything is written to a target: refuse what could kill it.

Each check runs before a batch writes its first byte (and the thread check also
before the resident part is installed), so a refusal leaves the target exactly
as it was:

- :func:`refuse_sigtrap_blockers`: a thread that blocks SIGTRAP and runs into
  an int3 is killed (the kernel forces the signal: it unblocks it and resets it
  to the default action). Sessions no longer refuse such a thread: each batch
  holds it while its int3s are in place (poke/guard.py); the readers here
  (:func:`_blocks_sigtrap`, :func:`sigtrap_blockers`) serve the guard and tools;
- :func:`check_addresses`: every site lies in the program's executable memory,
  never in textpoke's own mappings, and every call/jmp written goes to
  executable code that is not the resident handler;
- :func:`ensure_handler`: SIGTRAP still reaches the resident handler (a program
  may install its own handler after we attached); if not, a fresh copy of ours
  is installed in front of the program's, which then still gets every trap that
  is not an in-flight site (each copy chains to its own saved disposition);
- :func:`attach_guard`: two tools attaching to one process at once do not both
  install a resident part (the session lock only exists once one is there).
"""

from __future__ import annotations

import bisect
import errno
import os
import socket
import struct
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .._errors import BusyError, OwnCodeRefused, SiteError, UnsafeTarget
from ..target import syscalls as sc
from ..target.maps import Mapping
from ..target.process import Process
from ..target.security import OUR_PREFIX
from ..x86.insn import CALL_OPCODE, JMP_OPCODE, NOP5, SITE_SIZE, InsnKind, decode_site
from .bulk import PatchArray
from .protocol import Patch
from .resident import (AGENT_NAME, FIX_CODE_NAME, HANDLER_COPIES, HDR_FRONT, OLD_ACTIONS, SCRATCH, Resident,
                       handler_label, pc_in, thread_pc)

#: Where ensure_handler has the agent read and write sigactions (in SCRATCH,
#: past what map_shared and the installer use).
_QUERY = SCRATCH + 0x100
_ACTION = SCRATCH + 0x140
_ACTION_FORMAT = "<4Q"  # struct k_sigaction: handler, flags, restorer, mask
#: The resident code region itself (trampoline regions are named textpoke-*).
_RESIDENT_PATH = OUR_PREFIX + " "
#: A hot-fix's code: textpoke's mapping, but the program's code now (a fixed function's
#: fentry site may be traced like the program's own).
_FIX_CODE_PATH = f"/memfd:{FIX_CODE_NAME} "


def _our_own(mapping: Mapping) -> bool:
    """textpoke's own code or data, where no site may be (a hot-fix's code is the program's)."""
    return mapping.path.startswith(OUR_PREFIX) and not mapping.path.startswith(_FIX_CODE_PATH)
_SIGTRAP_BIT = 1 << (sc.SIGTRAP - 1)


def _sigtrap_in(pid: int, tid: int, field: bytes) -> bool:
    """Whether SIGTRAP is in the signal mask ``field`` (SigBlk, SigPnd) of one
    thread's status (a lean read: this runs around every batch)."""
    try:
        fd = os.open(f"/proc/{pid}/task/{tid}/status", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False  # gone
    try:
        text = os.read(fd, 8192)
    except OSError:
        return False
    finally:
        os.close(fd)
    at = text.find(b"\n" + field + b":")
    if at < 0:
        return False
    start = at + len(field) + 2
    mask = int(text[start : text.index(b"\n", start)].strip(), 16)
    return bool(mask & _SIGTRAP_BIT)


def _blocks_sigtrap(pid: int, tid: int) -> bool:
    return _sigtrap_in(pid, tid, b"SigBlk")


def settle_traps(process: Process, *, exclude: frozenset[int] = frozenset(), timeout_s: float = 1.0) -> bool:
    """Wait until no thread of ``process`` has a SIGTRAP pending; False on timeout.

    A thread that trapped on an int3 of a batch gets its SIGTRAP when it next
    returns to user mode, and the handler is chosen then, not at the trap. A
    batch returns only once every such trap was delivered (while the handler is
    certainly ours), so a program that installs its own handler right after a
    batch never receives one of our traps. A pending trap is normally
    delivered within microseconds; a thread preempted in between, within a
    scheduling period."""
    pid = process.pid
    pending = {tid for tid in process.threads() if tid not in exclude and _sigtrap_in(pid, tid, b"SigPnd")}
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        time.sleep(0.0005)
        pending = {tid for tid in pending if _sigtrap_in(pid, tid, b"SigPnd")}
    return not pending


def _thread_name(pid: int, tid: int) -> str:
    try:
        return Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
    except OSError:
        return ""


def sigtrap_blockers(process: Process, *, exclude: frozenset[int] = frozenset(), patience_s: float = 1.0,
                     ours: Sequence[range] = ()) -> list[int]:
    """Threads of ``process`` that keep SIGTRAP blocked.

    A thread has SIGTRAP blocked for a moment while it runs a SIGTRAP handler
    (ours: after a trap on an in-flight site) or inside pthread_create, and on
    a loaded machine it can be preempted there for tens of milliseconds (a
    thread that creates threads in a loop was measured blocked half of the
    time, in runs of up to 50 ms); so a thread counts only if every read over
    ``patience_s``, one per millisecond, finds it blocked. A thread that is not
    blocked costs one read, and so does one stopped or blocked in a syscall at
    an address in ``ours`` (our code pages: our handler, blocked only until it
    returns, or an agent, which blocks every signal and never runs a site), or
    one named as our agents are (an install thread names itself first)."""
    pid = process.pid

    def suspect(tid: int) -> bool:
        if not _blocks_sigtrap(pid, tid):
            return False
        return not pc_in(thread_pc(pid, tid), *ours) and _thread_name(pid, tid) != AGENT_NAME

    suspects = {tid for tid in process.threads() if tid not in exclude and suspect(tid)}
    deadline = time.monotonic() + patience_s
    while suspects and time.monotonic() < deadline:
        time.sleep(0.001)
        suspects = {tid for tid in suspects if suspect(tid)}
    return sorted(suspects)


def refuse_sigtrap_blockers(process: Process, *, exclude: frozenset[int] = frozenset(),
                            ours: Sequence[range] = ()) -> None:
    """UnsafeTarget if a thread of ``process`` (but ``exclude``) blocks SIGTRAP."""
    blockers = sigtrap_blockers(process, exclude=exclude, ours=ours)
    if not blockers:
        return
    tid = blockers[0]
    name = _thread_name(process.pid, tid) or "?"
    others = f" (and {len(blockers) - 1} more)" if len(blockers) > 1 else ""
    raise UnsafeTarget(
        f"thread {tid} ({name}){others} of process {process.pid} blocks SIGTRAP: an int3 it ran into "
        "would kill the process; nothing was written",
        hint="textpoke cannot patch a process while one of its threads blocks SIGTRAP "
        "(sigprocmask/pthread_sigmask); retry when it unblocks it",
    )


class _Maps:
    """Mappings sorted by address, for many lookups (one at a time, or as arrays)."""

    def __init__(self, maps: Sequence[Mapping]) -> None:
        self.maps = sorted(maps, key=lambda m: m.start)
        self.starts = [m.start for m in self.maps]
        self._starts = np.array(self.starts, dtype=np.uint64)
        self._ends = np.array([m.end for m in self.maps], dtype=np.uint64)
        #: Where a site may be: executable, not ours. Where a call/jmp may go:
        #: executable, not our resident handler (trampolines are fine).
        self.site_ok = np.array([m.executable and not _our_own(m) for m in self.maps], dtype=bool)
        self.target_ok = np.array([m.executable and not m.path.startswith(_RESIDENT_PATH) for m in self.maps],
                                  dtype=bool)
        self._writable = np.array([m.writable for m in self.maps], dtype=bool)

    def at(self, address: int) -> Mapping | None:
        index = bisect.bisect_right(self.starts, address) - 1
        if index >= 0 and address in self.maps[index]:
            return self.maps[index]
        return None

    def all_in(self, addresses: np.ndarray, ok: np.ndarray) -> bool:
        """Whether every address lies in a mapping for which ``ok`` is true."""
        if not len(self.maps):
            return not len(addresses)
        index = np.searchsorted(self._starts, addresses, side="right") - 1
        clipped = np.maximum(index, 0)
        return bool(((index >= 0) & (addresses < self._ends[clipped]) & ok[clipped]).all())


    def coalescable(self, sites: np.ndarray) -> np.ndarray:
        """Per site: may its bytes be written together with its neighbours' and the
        code between them (bulk.apply_patches)? Not in a writable mapping, whose
        bytes the program itself may change at any moment; not where no mapping is."""
        if not len(self.maps):
            return np.zeros(len(sites), dtype=bool)
        index = np.searchsorted(self._starts, sites, side="right") - 1
        clipped = np.maximum(index, 0)
        return (index >= 0) & (sites < self._ends[clipped]) & ~self._writable[clipped]


class MapsCache:
    """The target's mappings, read again only when an address is not found in
    an executable mapping of the last read (code mappings rarely change)."""

    def __init__(self, process: Process) -> None:
        self.process = process
        self._maps: _Maps | None = None

    def current(self) -> _Maps:
        if self._maps is None:
            self._maps = _Maps(self.process.maps())
        return self._maps

    def fresh(self) -> _Maps:
        self._maps = _Maps(self.process.maps())
        return self._maps


def _all_clear(maps: _Maps, patches: Sequence[Patch] | PatchArray) -> bool:
    """check_addresses for a whole batch at once, as arrays: True when every
    site lies in executable memory that is not ours and every call/jmp written
    goes to executable code outside our handler. False means "look closer":
    the caller then checks one patch at a time, which names what is wrong."""
    batch = PatchArray.of(patches)
    sites, new, old = batch.sites, batch.new, batch.old
    if (sites >= np.uint64(1 << 63)).any():
        return False
    if not (maps.all_in(sites, maps.site_ok) and maps.all_in(sites + np.uint64(SITE_SIZE - 1), maps.site_ok)):
        return False
    changed = (new != old).any(axis=1)
    branch = changed & np.isin(new[:, 0], (CALL_OPCODE, JMP_OPCODE))
    nop = (new == np.frombuffer(NOP5, dtype=np.uint8)).all(axis=1)
    if (changed & ~branch & ~nop).any():
        return False
    rel32 = np.ascontiguousarray(new[branch, 1:SITE_SIZE]).view("<i4").ravel().astype(np.int64)
    targets = sites[branch].astype(np.int64) + SITE_SIZE + rel32  # sites are user addresses: < 2**63
    if (targets < 0).any():
        return False
    return maps.all_in(targets.astype(np.uint64), maps.target_ok)


def check_addresses(process: Process, patches: Sequence[Patch] | PatchArray, *,
                    maps: MapsCache | None = None) -> None:
    """Refuse a batch that would write outside the program's code, or make it
    jump anywhere but executable code (SiteError, OwnCodeRefused)."""
    cache = maps or MapsCache(process)
    batch = PatchArray.of(patches)
    if not len(batch) or _all_clear(cache.current(), batch):
        return
    lookup = cache.fresh()  # the mappings may have changed since they were read
    if _all_clear(lookup, batch):
        return
    pid = process.pid
    for patch in batch:
        first, last = lookup.at(patch.site), lookup.at(patch.site + SITE_SIZE - 1)
        for mapping in (first, last):
            if mapping is not None and _our_own(mapping):
                raise OwnCodeRefused(
                    f"{patch.site:#x} is inside textpoke's own code or data in process {pid} "
                    f"({mapping.path.removesuffix(' (deleted)')}); nothing was written"
                )
        if first is None or last is None or not (first.executable and last.executable):
            raise SiteError(
                f"{patch.site:#x} is not in executable memory of process {pid}; nothing was written",
                hint="sites are instructions of the program's code (see `textpoke sites PID`)",
            )
        if not patch.changes:
            continue
        insn = decode_site(patch.site, patch.new)
        if insn.kind is InsnKind.NOP:
            continue
        assert insn.target is not None
        target = lookup.at(insn.target)
        if target is not None and target.path.startswith(_RESIDENT_PATH):
            raise OwnCodeRefused(
                f"the {insn.kind.value} written at {patch.site:#x} would go into textpoke's resident "
                f"handler at {insn.target:#x}; nothing was written"
            )
        if target is None or not target.executable:
            raise SiteError(
                f"the {insn.kind.value} written at {patch.site:#x} would go to {insn.target:#x}, "
                f"which is not executable code in process {pid}; nothing was written",
                hint="call or jump to a function of the program or to a trampoline",
            )


def _store_action(ctl: memoryview, offset: int, action: tuple[int, int, int, int]) -> None:
    """Write a k_sigaction the handler may be reading: the handler word (the
    only one it reads, one aligned store) last."""
    struct.pack_into("<3Q", ctl, offset + 8, *action[1:])
    struct.pack_into("<Q", ctl, offset, action[0])


def sigtrap_action(resident: Resident) -> tuple[int, int, int, int]:
    """The target's current SIGTRAP disposition, read by the agent."""
    resident.syscall(sc.SYS_rt_sigaction, sc.SIGTRAP, 0, resident.ctl_address + _QUERY, 8)
    return struct.unpack_from(_ACTION_FORMAT, resident.ctl, _QUERY)


def ensure_handler(resident: Resident) -> bool:
    """Make sure SIGTRAP goes to a resident handler; True if one had to be put back.

    1. read the disposition (the agent runs rt_sigaction(SIGTRAP, NULL, &cur));
       one of our handler copies: done;
    2. otherwise (the program installed its own, or an install was cut short)
       take the next unused copy (resident.OLD_ACTIONS: a copy whose place in
       a chain is fixed is never reused, so a program handler that chains to
       the copy it replaced never loops back into itself) and save the current
       disposition as what it chains to; record the copy as used;
    3. install it, reading back what it replaced; if the program changed it
       again between 1 and 3, chain to that one instead.
    No in-flight int3 exists while this runs (it runs before a batch), so no
    trap of ours can have reached the program's handler. UnsafeTarget once
    every copy is used (the program keeps replacing the handler).
    """
    current = sigtrap_action(resident)
    copies = [resident.labels[handler_label(k)] for k in range(HANDLER_COPIES)]
    if current[0] in copies:
        return False
    copy = struct.unpack_from("<I", resident.ctl, HDR_FRONT)[0] + 1
    if copy >= HANDLER_COPIES:
        raise UnsafeTarget(
            f"process {resident.process.pid} replaced textpoke's SIGTRAP handler {HANDLER_COPIES} times; "
            "no int3 is written while SIGTRAP does not reach it",
            hint="restart the process, or patch it before it installs its SIGTRAP handler",
        )
    _store_action(resident.ctl, OLD_ACTIONS[copy], current)
    # Recorded before installing: a tool killed in between never reuses a copy
    # that SIGTRAP may already name.
    struct.pack_into("<I", resident.ctl, HDR_FRONT, copy)
    ours = (copies[copy], resident.handler_flags, resident.labels["restorer"], 0)
    struct.pack_into(_ACTION_FORMAT, resident.ctl, _ACTION, *ours)
    resident.syscall(sc.SYS_rt_sigaction, sc.SIGTRAP, resident.ctl_address + _ACTION,
                     resident.ctl_address + _QUERY, 8)
    replaced = struct.unpack_from(_ACTION_FORMAT, resident.ctl, _QUERY)
    if replaced != current and replaced[0] not in copies:
        _store_action(resident.ctl, OLD_ACTIONS[copy], replaced)
    return True


def _start_time(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "0"
    return stat[stat.rindex(")") + 2 :].split()[19]


@contextmanager
def attach_guard(pid: int, *, wait_s: float = 10.0) -> Iterator[None]:
    """Hold the right to find-or-install the resident part of ``pid``.

    An abstract unix socket name (no file anywhere; the kernel frees it when
    its holder dies, even by SIGKILL) keyed by pid and start time, so that a
    reused pid is another name. Another tool holding it is waited for, then
    BusyError."""
    name = f"\0textpoke-attach-{pid}-{_start_time(pid)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    deadline = time.monotonic() + wait_s
    try:
        while True:
            try:
                sock.bind(name)
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                if time.monotonic() > deadline:
                    raise BusyError(f"another textpoke is attaching to process {pid}") from exc
                time.sleep(0.01)
        yield
    finally:
        sock.close()


__all__ = [
    "MapsCache",
    "settle_traps",
    "attach_guard",
    "check_addresses",
    "ensure_handler",
    "refuse_sigtrap_blockers",
    "sigtrap_action",
    "sigtrap_blockers",
]
