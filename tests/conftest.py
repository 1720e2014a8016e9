"""Shared fixtures: test targets are small C programs compiled here with gcc."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
TARGETS = TESTS / "targets"
BUILD = TESTS / "_build"

#: gcc flags that give every function a recorded nop5 fentry site (needs non-PIE).
FENTRY_FLAGS = ("-fno-pie", "-pg", "-mfentry", "-mnop-mcount", "-mrecord-mcount")


def compile_c(
    source: Path,
    *,
    fentry: bool = True,
    pie: bool = False,
    opt: str = "-O2",
    extra: tuple[str, ...] = (),
    name: str | None = None,
) -> Path:
    """Compile ``source`` into tests/_build (cached by content and flags).

    fentry sites come from ``-pg -mfentry -mnop-mcount -mrecord-mcount`` at compile
    time only: linking without ``-pg`` keeps gcrt/gmon.out out of the targets.
    """
    compiler = "g++" if source.suffix in (".cpp", ".cc") else "gcc"
    if shutil.which(compiler) is None:
        pytest.skip(f"{compiler} is needed to build test targets")
    cflags = [opt, "-g", "-pthread", "-fno-omit-frame-pointer", *extra]
    if fentry:
        cflags += FENTRY_FLAGS
    elif not pie:
        cflags.append("-fno-pie")
    ldflags = ["-pthread"] + (["-pie"] if pie else ["-no-pie"])
    key = hashlib.sha256(
        source.read_bytes() + repr((cflags, ldflags)).encode()
    ).hexdigest()[:12]
    BUILD.mkdir(exist_ok=True)
    out = BUILD / f"{name or source.stem}-{key}"
    if out.exists():
        return out
    obj = out.with_suffix(".o")
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    subprocess.run([compiler, *cflags, "-c", str(source), "-o", str(obj)], check=True)
    subprocess.run([compiler, str(obj), "-o", str(tmp), *ldflags], check=True)
    tmp.rename(out)
    obj.unlink()
    return out


@pytest.fixture(scope="session")
def build_target():
    """``build_target("name", **opts)`` compiles tests/targets/name.c (or name.cpp, with g++)."""

    def build(name: str, **opts) -> Path:
        source = TARGETS / f"{name}.c"
        return compile_c(source if source.exists() else TARGETS / f"{name}.cpp", **opts)

    return build
