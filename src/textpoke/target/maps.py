"""``/proc/PID/maps``: what is mapped where in a target, and where there is room.

Parsing and the address arithmetic are pure functions over the maps text, so they
are tested with literal text; only :func:`read_maps` touches ``/proc``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .._errors import NoSuchProcess, PermissionDenied, TargetError

PAGE_SIZE = 4096
#: Lowest address user space may map (the default ``vm.mmap_min_addr``).
MMAP_MIN_ADDR = 0x10000
#: End of the x86-64 4-level user address space (TASK_SIZE: the last page is a guard).
USER_TOP = 0x7FFF_FFFF_F000
#: Default reach for :func:`find_free_near`: a rel32 reaches +-2 GiB; the 1 MiB
#: margin leaves room for the code inside the pages to still reach back.
DEFAULT_REACH = 2**31 - 2**20
#: Room left free above ``[heap]`` so the program's ``brk`` can keep growing
#: (glibc falls back to mmap if it cannot, but the program would behave differently).
HEAP_GROWTH_GUARD = 256 * 2**20
#: Room left free below ``[stack]``: the main stack grows down into it (default
#: RLIMIT_STACK is 8 MiB; the kernel also keeps a 1 MiB guard gap).
STACK_GROWTH_GUARD = 64 * 2**20

_DELETED = " (deleted)"


@dataclass(frozen=True)
class Mapping:
    """One line of ``/proc/PID/maps``: ``[start, end)`` with its permissions and source."""

    start: int
    end: int
    perms: str
    offset: int
    dev: str
    inode: int
    path: str

    @property
    def readable(self) -> bool:
        return self.perms[0] == "r"

    @property
    def writable(self) -> bool:
        return self.perms[1] == "w"

    @property
    def executable(self) -> bool:
        return self.perms[2] == "x"

    @property
    def shared(self) -> bool:
        return self.perms[3] == "s"

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def deleted(self) -> bool:
        """The file was unlinked or replaced after it was mapped."""
        return self.inode != 0 and self.path.endswith(_DELETED)

    @property
    def file_path(self) -> str:
        """``path`` without the kernel's ``" (deleted)"`` suffix."""
        return self.path[: -len(_DELETED)] if self.deleted else self.path

    def __contains__(self, address: object) -> bool:
        return isinstance(address, int) and self.start <= address < self.end


def parse_maps(text: str) -> list[Mapping]:
    """Parse the text of ``/proc/PID/maps`` (lines in address order)."""
    mappings: list[Mapping] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        # The path is the rest of the line after the fifth field and may contain
        # spaces; split at most five times and strip only the column padding.
        fields = line.split(maxsplit=5)
        if len(fields) < 5:
            raise TargetError(
                f"/proc/PID/maps line {number} is malformed: {line!r}",
                hint="this is a kernel format textpoke does not know",
            )
        span, perms, offset, dev, inode = fields[:5]
        start, _, end = span.partition("-")
        try:
            mappings.append(
                Mapping(
                    start=int(start, 16),
                    end=int(end, 16),
                    perms=perms,
                    offset=int(offset, 16),
                    dev=dev,
                    inode=int(inode),
                    path=fields[5].strip() if len(fields) == 6 else "",
                )
            )
        except ValueError as exc:
            raise TargetError(
                f"/proc/PID/maps line {number} is malformed: {line!r}",
                hint="this is a kernel format textpoke does not know",
            ) from exc
    return mappings


def read_maps(pid: int) -> list[Mapping]:
    """The current mappings of process ``pid``."""
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise NoSuchProcess(f"no process with pid {pid}") from exc
    except PermissionError as exc:
        raise PermissionDenied(f"cannot read the mappings of pid {pid}") from exc
    return parse_maps(text)


def _page_down(value: int) -> int:
    return value & ~(PAGE_SIZE - 1)


def _page_up(value: int) -> int:
    return (value + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


def _same_file(mapping: Mapping, path: str) -> bool:
    return mapping.path == path or mapping.file_path == path


def mappings_of(maps: Iterable[Mapping], path: str) -> list[Mapping]:
    """The mappings of the file ``path`` (``" (deleted)"`` in maps is ignored)."""
    return [m for m in maps if m.inode != 0 and _same_file(m, path)]


def first_load_vaddr(path: str | os.PathLike[str]) -> int:
    """Page-rounded ``p_vaddr`` of the ELF's ``PT_LOAD`` at file offset 0.

    The link-time address that the mapping with file offset 0 corresponds to;
    0 for most PIEs and shared objects, 0x400000 for a classic non-PIE.
    """
    # Imported here: maps.py is otherwise free of ELF parsing.
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    from .._errors import ElfError

    try:
        with open(path, "rb") as f:
            loads = [
                seg for seg in ELFFile(f).iter_segments() if seg["p_type"] == "PT_LOAD"
            ]
    except (OSError, ELFError) as exc:
        raise ElfError(f"cannot read program headers of {os.fspath(path)}: {exc}") from exc
    for seg in loads:
        if _page_down(seg["p_offset"]) == 0:
            return _page_down(seg["p_vaddr"])
    raise ElfError(
        f"{os.fspath(path)} has no PT_LOAD segment at file offset 0",
        hint="textpoke relocates by the segment that maps the ELF header",
    )


def load_base(maps: Sequence[Mapping], path: str, *, link_vaddr: int | None = None) -> int:
    """Load bias of the ELF mapped from ``path``: add it to a link-time address.

    The mapping with file offset 0 holds the ``PT_LOAD`` whose ``p_offset`` is 0, so
    ``bias = mapping.start - page_down(that p_vaddr)``.  ``link_vaddr`` is that
    page-rounded ``p_vaddr``; when omitted it is read from the file at ``path``.
    A non-PIE executable therefore has bias 0, not its mapping address.
    """
    own = mappings_of(maps, path)
    if not own:
        raise TargetError(
            f"{path} is not mapped in the process",
            hint="see /proc/PID/maps for the files the process has mapped",
        )
    head = [m for m in own if m.offset == 0]
    if not head:
        raise TargetError(
            f"{path} has no mapping at file offset 0 in the process",
            hint="the ELF header of the object is not mapped; textpoke cannot relocate it",
        )
    if link_vaddr is None:
        link_vaddr = first_load_vaddr(path)
    # The lowest offset-0 mapping: a file mapped twice (rare, e.g. dlopen'ed
    # copies) is relocated by its first instance.
    return min(m.start for m in head) - _page_down(link_vaddr)


def _free_gaps(maps: Sequence[Mapping]) -> list[tuple[int, int]]:
    """Unmapped ``[start, end)`` ranges of user space, with growth guards applied."""
    gaps: list[tuple[int, int]] = []
    cursor = MMAP_MIN_ADDR
    previous: Mapping | None = None
    for m in sorted(maps, key=lambda m: m.start):
        if m.start >= USER_TOP:  # [vsyscall] and other kernel-provided pages
            break
        low = cursor
        if previous is not None and previous.path == "[heap]":
            low = max(cursor, previous.end + HEAP_GROWTH_GUARD)
        high = m.start - STACK_GROWTH_GUARD if m.path == "[stack]" else m.start
        if high > low:
            gaps.append((low, high))
        cursor = max(cursor, m.end)
        previous = m
    low = cursor
    if previous is not None and previous.path == "[heap]":
        low = max(cursor, previous.end + HEAP_GROWTH_GUARD)
    if USER_TOP > low:
        gaps.append((low, USER_TOP))
    return gaps


def find_free_near(
    maps: Sequence[Mapping], addr: int, size: int, *, reach: int = DEFAULT_REACH
) -> int:
    """A page-aligned start of ``size`` free bytes, every byte within ``reach`` of ``addr``.

    The closest such start is returned (the one whose farthest byte is nearest to
    ``addr``), so trampolines land next to the code they serve.  ``size`` is
    rounded up to whole pages.  Gaps just above ``[heap]`` and just below
    ``[stack]`` are kept free for their growth.
    """
    if size <= 0:
        raise TargetError(f"cannot reserve {size} bytes", hint="ask for a positive size")
    size = _page_up(size)
    # Every byte b of [start, start + size) must satisfy |b - addr| <= reach.
    window_low = _page_up(max(addr - reach, 0))
    window_high = _page_down(addr + reach + 1)
    best: tuple[int, int] | None = None  # (farthest byte distance, start)
    for gap_low, gap_high in _free_gaps(maps):
        low = max(_page_up(gap_low), window_low)
        high = min(_page_down(gap_high), window_high)
        if high - low < size:
            continue
        # Closest start inside [low, high - size]: the page of addr, clamped.
        start = min(max(_page_down(addr), low), high - size)
        distance = max(abs(start - addr), abs(start + size - 1 - addr))
        if best is None or distance < best[0]:
            best = (distance, start)
    if best is None:
        raise TargetError(
            f"no free {size:#x}-byte range within {reach:#x} bytes of {addr:#x}",
            hint="the address space near the code is full; fewer or smaller trampolines may fit",
        )
    return best[1]


__all__ = [
    "PAGE_SIZE",
    "DEFAULT_REACH",
    "Mapping",
    "parse_maps",
    "read_maps",
    "mappings_of",
    "first_load_vaddr",
    "load_base",
    "find_free_near",
]
