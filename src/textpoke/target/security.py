"""What textpoke checks so that pointing it at a process cannot hurt that process.

- :func:`check_architecture`: the process runs x86-64 code (the resident part
  and every encoding are x86-64; injecting them into an i386 process would
  crash it), read from the ELF header of its executable;
- :func:`ours` / :func:`writable_and_executable` / :func:`shared_modes`: what
  of ours is mapped in a process, that no page of it (or of anything) is both
  writable and executable, and that our shared memory is private to its owner
  (memfds: no path in /dev/shm or /tmp that another user could guess or open;
  :func:`added` and :func:`openable_by_path` find such a path among what an
  attach mapped, whatever the program's own files are).

Who may trace whom is the kernel's decision; when it refuses,
:func:`textpoke.target.process.why_not_traceable` names the reason.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence

from .._errors import ElfError, NoSuchProcess, PermissionDenied
from .maps import Mapping

#: Prefix of the /proc/PID/maps path of every memfd textpoke creates.
OUR_PREFIX = "/memfd:textpoke"
_EM_X86_64 = 62
_MACHINES = {3: "i386", 40: "ARM", 183: "AArch64", 243: "RISC-V"}


def check_architecture(pid: int) -> None:
    """Refuse a process that does not run x86-64 code (ElfError)."""
    try:
        with open(f"/proc/{pid}/exe", "rb") as f:
            ident = f.read(20)
    except FileNotFoundError as exc:
        raise NoSuchProcess(f"no process with pid {pid}") from exc
    except PermissionError as exc:
        raise PermissionDenied(f"cannot read the executable of process {pid}") from exc
    if len(ident) < 20 or ident[:4] != b"\x7fELF":
        raise ElfError(f"process {pid} does not run an ELF program", hint="textpoke patches x86-64 Linux processes only")
    machine = int.from_bytes(ident[18:20], "little")
    if ident[4] != 2 or machine != _EM_X86_64:
        bits = "32-bit" if ident[4] == 1 else "64-bit"
        name = _MACHINES.get(machine, f"machine {machine}")
        raise ElfError(
            f"process {pid} runs a {bits} {name} program; textpoke patches x86-64 processes only",
            hint="the resident handler and every site encoding are x86-64 machine code",
        )


def ours(maps: Iterable[Mapping]) -> list[Mapping]:
    """The mappings of textpoke's memfds: resident regions and trampolines."""
    return [m for m in maps if m.path.startswith(OUR_PREFIX)]


def owning_mapping(maps: Sequence[Mapping], address: int) -> Mapping | None:
    for mapping in maps:
        if address in mapping:
            return mapping
    return None


def added(before: Iterable[Mapping], after: Iterable[Mapping]) -> list[Mapping]:
    """Mappings of ``after`` that ``before`` did not have (same range, same source):
    what was mapped in between, e.g. by textpoke's attach."""
    seen = {(m.start, m.end, m.inode, m.path) for m in before}
    return [m for m in after if (m.start, m.end, m.inode, m.path) not in seen]


def openable_by_path(maps: Iterable[Mapping]) -> list[Mapping]:
    """Mappings of a file that has a path another process could open (not a memfd,
    not anonymous memory): none of textpoke's may be one."""
    return [m for m in maps if m.inode and m.path.startswith("/") and not m.path.startswith("/memfd:")]


def writable_and_executable(maps: Iterable[Mapping]) -> list[Mapping]:
    """Mappings that are writable and executable at once (there must be none of ours)."""
    return [m for m in maps if m.writable and m.executable]


def shared_modes(pid: int, maps: Iterable[Mapping]) -> dict[str, int]:
    """Permission bits of each of our memfds mapped in ``pid``, by maps path and inode."""
    modes: dict[str, int] = {}
    by_inode: dict[int, os.stat_result] | None = None
    for mapping in ours(maps):
        key = f"{mapping.path}@{mapping.inode}"
        if key in modes:
            continue
        try:
            st = os.stat(f"/proc/{pid}/map_files/{mapping.start:x}-{mapping.end:x}")
        except PermissionError:
            # map_files needs privileges; a descriptor of the target reaches the same file.
            if by_inode is None:
                by_inode = _open_files(pid)
            found = by_inode.get(mapping.inode)
            if found is None:
                continue  # no descriptor open on it (trampolines close theirs): not seen
            st = found
        modes[key] = stat.S_IMODE(st.st_mode)
    return modes


def _open_files(pid: int) -> dict[int, os.stat_result]:
    found = {}
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for name in names:
        try:
            st = os.stat(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        found[st.st_ino] = st
    return found


__all__ = [
    "OUR_PREFIX",
    "added",
    "check_architecture",
    "openable_by_path",
    "ours",
    "owning_mapping",
    "shared_modes",
    "writable_and_executable",
]
