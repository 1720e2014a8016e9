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


def build_demo() -> Path:
    """Compile demo.c (once per source version) and return the binary's path."""
    source = resources.files(__package__).joinpath("demo.c").read_bytes()
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise TextpokeError("no C compiler found to build the demo", hint="install gcc (apt-get install gcc)")
    key = hashlib.sha256(source + repr(FENTRY_CFLAGS).encode()).hexdigest()[:12]
    out_dir = cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    binary = out_dir / f"demo-{key}"
    if binary.exists():
        return binary
    src, obj = out_dir / f"demo-{key}.c", out_dir / f"demo-{key}.o"
    src.write_bytes(source)
    try:
        # -pg at compile time only: linking without it keeps gcrt and gmon.out out.
        subprocess.run([compiler, *FENTRY_CFLAGS, "-c", str(src), "-o", str(obj)], check=True, capture_output=True)
        tmp = binary.with_suffix(f".tmp{os.getpid()}")
        subprocess.run([compiler, str(obj), "-o", str(tmp), "-no-pie", "-pthread"], check=True, capture_output=True)
        tmp.rename(binary)
    except subprocess.CalledProcessError as exc:
        raise TextpokeError(
            f"building the demo failed: {exc.stderr.decode(errors='replace').strip()[:300]}",
            hint="the demo needs gcc with -mfentry/-mnop-mcount support (x86-64)",
        ) from exc
    finally:
        obj.unlink(missing_ok=True)
    return binary
