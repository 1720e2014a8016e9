"""Symbols a stripped binary keeps elsewhere: separate debug files and MiniDebugInfo.

Distributions strip their binaries and ship the full symbol table in a
separate file that the binary's GNU build-id names
(``/usr/lib/debug/.build-id/ab/cdef....debug``, Debian's ``*-dbgsym`` and
``libc6-dbg`` packages) or that its ``.gnu_debuglink`` section names (checked by
its CRC32).  Fedora also embeds an xz-compressed ELF holding a symbol table
of the local functions (``.gnu_debugdata``, "MiniDebugInfo").  Each is used
only if it is verifiably the same build: same build-id, or same CRC.

The directories searched are ``$TEXTPOKE_DEBUG_DIRS`` (colon-separated), else
``/usr/lib/debug``.
"""

from __future__ import annotations

import lzma
import os
import struct
import zlib

from .._errors import ElfError
from .elffile import SHT_SYMTAB, ElfFile, open_file

DEFAULT_DEBUG_DIRS = ("/usr/lib/debug",)


def debug_dirs() -> tuple[str, ...]:
    value = os.environ.get("TEXTPOKE_DEBUG_DIRS")
    if value is None:
        return DEFAULT_DEBUG_DIRS
    return tuple(d for d in value.split(":") if d)


def _candidates(elf: ElfFile, real_path: str) -> list[tuple[str, str]]:
    """``(path, how)`` of the debug files to try, best first."""
    found: list[tuple[str, str]] = []
    build_id = elf.build_id
    if build_id and len(build_id) > 1:
        text = build_id.hex()
        for root in debug_dirs():
            found.append((os.path.join(root, ".build-id", text[:2], text[2:] + ".debug"), "build-id"))
    link = elf.section(".gnu_debuglink")
    if link is not None:
        data = elf.data(link)
        name = data[: data.find(b"\0")].decode("utf-8", "replace") if b"\0" in data else ""
        if name and "/" not in name:
            directory = os.path.dirname(real_path)
            found.append((os.path.join(directory, name), "debuglink"))
            found.append((os.path.join(directory, ".debug", name), "debuglink"))
            for root in debug_dirs():
                found.append((os.path.join(root, directory.lstrip("/"), name), "debuglink"))
    return found


def _debuglink_crc(elf: ElfFile) -> int | None:
    link = elf.section(".gnu_debuglink")
    if link is None:
        return None
    data = elf.data(link)
    end = data.find(b"\0")
    at = (end + 4) // 4 * 4
    if end < 0 or at + 4 > len(data):
        return None
    return struct.unpack_from("<I", data, at)[0]


def _crc_of(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def find_debug_file(elf: ElfFile, real_path: str) -> ElfFile | None:
    """The separate debug file of ``elf`` (open; the caller closes it), verified, or None."""
    crc = None
    for path, how in _candidates(elf, real_path):
        if not os.path.isfile(path) or os.path.realpath(path) == os.path.realpath(real_path):
            continue
        try:
            debug = open_file(path)
        except ElfError:
            continue
        if how == "build-id":
            same = debug.build_id == elf.build_id
        else:
            if crc is None:
                crc = _debuglink_crc(elf)
            try:
                same = crc is not None and _crc_of(path) == crc
            except OSError:
                same = False
        if same and any(s.type == SHT_SYMTAB for s in debug.sections):
            return debug
        debug.close()
    return None


def mini_debuginfo(elf: ElfFile) -> ElfFile | None:
    """The ELF embedded xz-compressed in ``.gnu_debugdata``, or None."""
    section = elf.section(".gnu_debugdata")
    if section is None:
        return None
    try:
        data = lzma.decompress(elf.data(section))
        inner = ElfFile.from_bytes(f"{elf.path}[.gnu_debugdata]", data)
    except (lzma.LZMAError, ElfError):
        return None
    return inner if any(s.type == SHT_SYMTAB for s in inner.sections) else None


__all__ = ["DEFAULT_DEBUG_DIRS", "debug_dirs", "find_debug_file", "mini_debuginfo"]
