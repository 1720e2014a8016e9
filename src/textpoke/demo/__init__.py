"""The bundled demo program: its C source ships in the package and is built
with the system C compiler into a cache directory on first use."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from importlib import resources
from pathlib import Path

from .._errors import TextpokeError

#: fentry nop5 at every function entry; recorded in __mcount_loc; needs non-PIE.
FENTRY_CFLAGS = ("-O2", "-fno-pie", "-pg", "-mfentry", "-mnop-mcount", "-mrecord-mcount", "-pthread")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "textpoke"


def build_bundled(package: str, source_name: str, *, stem: str, cflags: tuple[str, ...], what: str) -> Path:
    """Compile a C file shipped in ``package`` (once per source and flags) into the cache.

    Compiled with ``cflags`` and linked apart, non-PIE, without them: ``-pg``
    at compile time only keeps gcrt and gmon.out out of the program."""
    source = resources.files(package).joinpath(source_name).read_bytes()
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise TextpokeError(f"no C compiler found to build {what}", hint="install gcc (apt-get install gcc)")
    key = hashlib.sha256(source + repr(cflags).encode()).hexdigest()[:12]
    out_dir = cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    binary = out_dir / f"{stem}-{key}"
    if binary.exists():
        return binary
    src, obj = out_dir / f"{stem}-{key}.c", out_dir / f"{stem}-{key}.o"
    src.write_bytes(source)
    tmp = binary.with_suffix(f".tmp{os.getpid()}")
    try:
        subprocess.run([compiler, *cflags, "-c", str(src), "-o", str(obj)], check=True, capture_output=True)
        subprocess.run([compiler, str(obj), "-o", str(tmp), "-no-pie", "-pthread"], check=True, capture_output=True)
        tmp.rename(binary)
    except subprocess.CalledProcessError as exc:
        raise TextpokeError(
            f"building {what} failed: {exc.stderr.decode(errors='replace').strip()[:300]}",
            hint="it needs gcc for x86-64 (with -mfentry/-mnop-mcount support for fentry sites)",
        ) from exc
    finally:
        obj.unlink(missing_ok=True)
    return binary


def build_demo() -> Path:
    """Compile demo.c (once per source version) and return the binary's path."""
    return build_bundled(__package__, "demo.c", stem="demo", cflags=FENTRY_CFLAGS, what="the demo")
