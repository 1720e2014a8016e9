"""Sites of an object mapped in a live process: relocated, and checked against memory.

The ELF is read through ``/proc/PID/map_files/START-END`` when possible, which is
the very file the process mapped even if it was deleted or replaced since (the
maps path then ends in " (deleted)"), or lives in another mount namespace.  The
live bytes of every site are read from ``/proc/PID/mem``; a site whose bytes
differ from the file is reported with ``changed`` set, never silently listed.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace

import numpy as np

from .._errors import ElfError, NoSuchProcess, PermissionDenied, TargetError, TargetExited, UsageError
from ..target.maps import Mapping, load_base, read_maps
from ..x86.insn import CALL_SIZE
from ._arrays import unique
from .discover import DEFAULT_KINDS, Site, SiteKind, SiteScan, scan_sites
from .site import branch_target
from .elf import ElfImage, open_elf
from .validate import check_site

#: Sites closer than this are read with one pread (one syscall for a whole text).
_READ_MERGE_GAP = 1 << 16


@dataclass(frozen=True)
class MappedObject:
    """An ELF file mapped in a process and where it is."""

    pid: int
    #: The path as /proc/PID/maps shows it (without " (deleted)").
    path: str
    #: What textpoke opened to read the ELF (a map_files link or ``path``).
    elf_path: str
    #: Add to a link-time address to get the runtime address.
    base: int
    mappings: tuple[Mapping, ...]
    deleted: bool


@dataclass(frozen=True)
class ProcessScan:
    """The sites of one mapped object of a process, with live bytes."""

    mapped: MappedObject
    scan: SiteScan

    @property
    def sites(self) -> tuple[Site, ...]:
        return self.scan.sites

    @property
    def changed(self) -> tuple[Site, ...]:
        from .discover import materialize

        return materialize(self.scan, np.flatnonzero(self.scan.columns.changed))


def _dev_of(mapping: Mapping) -> tuple[int, int]:
    major, _, minor = mapping.dev.partition(":")
    return int(major, 16), int(minor, 16)


def _exe_identity(pid: int) -> tuple[int, int, str]:
    """(device, inode, path) of the process's main executable."""
    link = f"/proc/{pid}/exe"
    try:
        st = os.stat(link)
        path = os.readlink(link)
    except (FileNotFoundError, ProcessLookupError) as exc:
        if not os.path.exists(f"/proc/{pid}"):
            raise NoSuchProcess(f"no process with pid {pid}") from exc
        raise TargetError(
            f"pid {pid} has no executable (a kernel thread or a zombie)",
            hint="give the pid of a running user-space process",
        ) from exc
    except PermissionError as exc:
        raise PermissionDenied(f"cannot inspect the executable of pid {pid}") from exc
    return st.st_dev, st.st_ino, path.removesuffix(" (deleted)")


def _file_objects(maps: Sequence[Mapping]) -> dict[str, list[Mapping]]:
    objects: dict[str, list[Mapping]] = {}
    for m in maps:
        if m.inode != 0 and m.path.startswith("/"):
            objects.setdefault(m.file_path, []).append(m)
    return objects


def _select(pid: int, maps: Sequence[Mapping], path: str | os.PathLike[str] | None) -> tuple[str, list[Mapping]]:
    objects = _file_objects(maps)
    if path is None:
        dev, ino, exe = _exe_identity(pid)
        # Match by identity, not by name: the exe path may be deleted or namespaced.
        for name, own in objects.items():
            m = own[0]
            if m.inode == ino and os.makedev(*_dev_of(m)) == dev:
                return name, own
        if exe in objects:
            return exe, objects[exe]
        raise TargetError(f"the executable of pid {pid} ({exe}) is not mapped")
    wanted = os.fspath(path)
    if "/" in wanted:
        candidates = [wanted, os.path.realpath(wanted)]
        for name in candidates:
            if name in objects:
                return name, objects[name]
        matches: list[str] = []
    else:
        # A soname substring such as "libc.so" picks the one object whose file name has it.
        matches = [name for name in objects if wanted in os.path.basename(name)]
        if len(matches) == 1:
            return matches[0], objects[matches[0]]
    if len(matches) > 1:
        raise UsageError(
            f"{wanted!r} matches several objects mapped in pid {pid}: {', '.join(sorted(matches))}",
            hint="give a longer name or the full path",
        )
    names = sorted({os.path.basename(n) for n in objects})
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    raise UsageError(f"{wanted!r} is not mapped in pid {pid}", hint=f"mapped objects: {shown}")


def mapped_object(pid: int, *, path: str | os.PathLike[str] | None = None) -> tuple[MappedObject, ElfImage]:
    """Find ``path`` (default: the main executable; or a soname substring) in ``pid``."""
    maps = read_maps(pid)
    name, own = _select(pid, maps, path)
    head = min((m for m in own if m.offset == 0), key=lambda m: m.start, default=None)
    if head is None:
        raise TargetError(f"{name} has no mapping at file offset 0 in pid {pid}")
    deleted = any(m.deleted for m in own)
    elf_path = f"/proc/{pid}/map_files/{head.start:x}-{head.end:x}"
    try:
        image = open_elf(elf_path, real_path=name)
    except ElfError as exc:
        # Only an unreadable link falls back (map_files needs CAP_SYS_ADMIN on older
        # kernels); a file that is not a usable ELF is refused as it is.
        if not isinstance(exc.__cause__, OSError):
            raise
        if deleted:
            # The named file is gone or replaced: it is not the code that was mapped.
            raise ElfError(
                f"{name} was deleted after pid {pid} mapped it and {elf_path} cannot be read",
                hint="run textpoke as root to read the mapped file through map_files",
            ) from exc
        elf_path = name
        image = open_elf(name)
    base = load_base(own, head.path, link_vaddr=image.link_vaddr)
    obj = MappedObject(
        pid=pid, path=name, elf_path=elf_path, base=base, mappings=tuple(own), deleted=deleted
    )
    return obj, image.with_path(name)


def _translate(pid: int, exc: OSError, what: str) -> TargetError:
    if isinstance(exc, (FileNotFoundError, ProcessLookupError)) or exc.errno == errno.ESRCH:
        return NoSuchProcess(f"no process with pid {pid}")
    if isinstance(exc, PermissionError):
        return PermissionDenied(f"cannot read the memory of pid {pid}")
    return TargetError(f"cannot read {what} of pid {pid}: {exc.strerror or exc}")


def read_live(pid: int, addresses: Sequence[int], size: int = CALL_SIZE) -> dict[int, bytes]:
    """``size`` bytes at each address, read from ``/proc/PID/mem`` in merged chunks."""
    ordered = unique(np.asarray(list(addresses), dtype=np.uint64))
    data = read_live_array(pid, ordered, size)
    return {a: data[i].tobytes() for i, a in enumerate(ordered.tolist())}


def read_live_array(pid: int, addresses: np.ndarray, size: int = CALL_SIZE) -> np.ndarray:
    """``size`` bytes at each address (any order) as an ``(n, size)`` uint8 array.

    Addresses closer than ``_READ_MERGE_GAP`` are read with one pread: one
    syscall for a whole text section."""
    addresses = np.asarray(addresses, dtype=np.uint64)
    out = np.zeros((len(addresses), size), dtype=np.uint8)
    if not len(addresses):
        return out
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise _translate(pid, exc, "the memory") from exc
    try:
        order = np.argsort(addresses, kind="stable")
        ordered = addresses[order]
        breaks = np.flatnonzero(np.diff(ordered) >= _READ_MERGE_GAP) + 1
        bounds = zip(np.concatenate([[0], breaks]).tolist(), np.concatenate([breaks, [len(ordered)]]).tolist())
        for i, j in bounds:
            start, end = int(ordered[i]), int(ordered[j - 1]) + size
            try:
                chunk = os.pread(fd, end - start, start)
            except OSError as exc:
                if exc.errno != errno.EIO:
                    raise _translate(pid, exc, f"memory at {start:#x}") from exc
                chunk = b""  # a hole inside the range: fall back to one read per address
            rows = order[i:j]
            if len(chunk) == end - start:
                buf = np.frombuffer(chunk, dtype=np.uint8)
                offsets = (ordered[i:j] - np.uint64(start)).astype(np.int64)
                out[rows] = buf[offsets[:, None] + np.arange(size)]
                continue
            for row, a in zip(rows.tolist(), ordered[i:j].tolist()):
                try:
                    data = os.pread(fd, size, a)
                except OSError as exc:
                    raise _translate(pid, exc, f"memory at {a:#x}") from exc
                if len(data) != size:
                    if not os.path.exists(f"/proc/{pid}"):
                        raise TargetExited(f"pid {pid} exited while its memory was read")
                    raise TargetError(f"memory at {a:#x} of pid {pid} is not readable")
                out[row] = np.frombuffer(data, dtype=np.uint8)
    finally:
        os.close(fd)
    return out


def scan_process(
    pid: int,
    *,
    path: str | os.PathLike[str] | None = None,
    kinds: Collection[SiteKind] = DEFAULT_KINDS,
    functions: Sequence[str] = (),
    calls_to: Sequence[str] = (),
) -> ProcessScan:
    """Sites of one object of ``pid`` with live bytes; see :func:`sites_in_process`."""
    obj, image = mapped_object(pid, path=path)
    scan = scan_sites(image, kinds=kinds, functions=functions, calls_to=calls_to, base=obj.base)
    columns = scan.columns
    live = read_live_array(pid, columns.address)
    columns = replace(columns, insn=live, file_insn=columns.insn)
    changed = np.flatnonzero(columns.changed)
    targets = {
        target
        for i in changed.tolist()
        if (target := branch_target(int(columns.address[i]), live[i].tobytes())) is not None
    }
    names = name_addresses(pid, sorted(targets), own=(obj, image)) if targets else {}
    return ProcessScan(mapped=obj, scan=replace(scan, columns=columns, current_names=names))


def name_addresses(pid: int, addresses: Sequence[int], *,
                   own: tuple[MappedObject, ElfImage] | None = None) -> dict[int, str | None]:
    """A name for each runtime address of ``pid``: ``f``, ``f+0x1c``, ``f@plt`` of any
    mapped object, ``textpoke trampoline`` inside textpoke's own code, else None."""
    from ..target.security import OUR_PREFIX
    from .symbols import symbol_ranges

    names: dict[int, str | None] = {}
    rest = []
    for address in addresses:
        name = None
        if own is not None:
            obj, image = own
            if any(address in m for m in obj.mappings):
                name = image.name_of(address - obj.base)
        if name is None:
            rest.append(address)
        names[address] = name
    if rest:
        maps = read_maps(pid)
        ranges = None
        for address in rest:
            mapping = next((m for m in maps if address in m), None)
            if mapping is not None and mapping.path.startswith(OUR_PREFIX):
                names[address] = f"textpoke trampoline ({mapping.file_path.lstrip('/')})"
                continue
            if ranges is None:
                ranges = symbol_ranges(pid)
            index = int(np.searchsorted(ranges.starts, np.uint64(address), side="right")) - 1
            if index >= 0 and address < int(ranges.ends[index]):
                start = int(ranges.starts[index])
                label = str(ranges.names[index])
                names[address] = label if address == start else f"{label}+{address - start:#x}"
    return names


def sites_in_process(
    pid: int,
    *,
    path: str | os.PathLike[str] | None = None,
    kinds: Collection[SiteKind] = DEFAULT_KINDS,
    functions: Sequence[str] = (),
    calls_to: Sequence[str] = (),
) -> list[Site]:
    """The sites of an object mapped in ``pid``, at runtime addresses.

    ``path`` is the main executable by default, else a mapped library's path or a
    substring of its file name (``"libc.so"``).  Each site's ``insn`` holds the live
    bytes and ``file_insn`` the file's; ``site.changed`` marks the ones that differ
    (already patched, or caught mid-patch).
    """
    return list(
        scan_process(pid, path=path, kinds=kinds, functions=functions, calls_to=calls_to).sites
    )


def check_process_site(
    pid: int, address: int, expected: bytes | None, *, path: str | os.PathLike[str] | None = None
) -> Site:
    """:func:`check_site` for a runtime address of ``pid``, against the live bytes."""
    obj, image = mapped_object(pid, path=path)
    live = read_live(pid, [address])[address]
    return check_site(image, address, expected, obj.base, actual=live)


__all__ = [
    "MappedObject",
    "ProcessScan",
    "mapped_object",
    "name_addresses",
    "read_live",
    "read_live_array",
    "scan_process",
    "sites_in_process",
    "check_process_site",
]
