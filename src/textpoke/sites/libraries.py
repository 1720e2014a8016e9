"""Which file a binary's ``DT_NEEDED`` name (``libc.so.6``) is, found as ld.so would.

Only for advice: ``textpoke sites ./prog --lib libc.so`` is told the path of the
library ``./prog`` would load.  Searched in the dynamic loader's order, short of
its cache's hardware-capability subdirectories: ``DT_RPATH``/``DT_RUNPATH``
(``$ORIGIN`` expanded), ``LD_LIBRARY_PATH``, the directories of
``/etc/ld.so.conf`` (and its includes), then the default ones.  Nothing is
executed (``ldd`` may run the program's own loader).
"""

from __future__ import annotations

import glob
import os

from .elf import ElfImage

_DEFAULT_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib")


def _conf_dirs(path: str = "/etc/ld.so.conf", depth: int = 0) -> list[str]:
    out: list[str] = []
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("include ") and depth < 4:
            pattern = line.split(None, 1)[1]
            if not os.path.isabs(pattern):
                pattern = os.path.join(os.path.dirname(path), pattern)
            for included in sorted(glob.glob(pattern)):
                out += _conf_dirs(included, depth + 1)
        else:
            out.append(line)
    return out


def search_dirs(image: ElfImage, binary: str) -> list[str]:
    origin = os.path.dirname(os.path.realpath(binary))
    dirs = [d.replace("$ORIGIN", origin).replace("${ORIGIN}", origin) for d in image.runpath]
    dirs += [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    dirs += _conf_dirs()
    dirs += list(_DEFAULT_DIRS)
    return list(dict.fromkeys(dirs))


def find_needed(image: ElfImage, binary: str, name: str) -> list[tuple[str, str]]:
    """``(needed name, path)`` of each DT_NEEDED entry whose name contains ``name``
    (``libc.so`` -> ``libc.so.6``), with the file the loader would map; the path is
    "" where none was found."""
    dirs = search_dirs(image, binary)
    found = []
    for needed in image.needed:
        if name not in needed:
            continue
        path = next((os.path.join(d, needed) for d in dirs if os.path.isfile(os.path.join(d, needed))), "")
        found.append((needed, path))
    return found


def resolve_all(image: ElfImage, binary: str) -> list[tuple[str, str]]:
    """Every DT_NEEDED entry with its file (see :func:`find_needed`)."""
    return find_needed(image, binary, "")


__all__ = ["find_needed", "resolve_all", "search_dirs"]
