"""Helpers for the sites tests: a shared-library build, objdump as the oracle, live targets."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
TARGETS = TESTS / "targets"
BUILD = TESTS / "_build"

_LIB_FLAGS = ("-O2", "-g", "-fno-pic", "-pg", "-mfentry", "-mnop-mcount", "-mrecord-mcount")


def _cached_build(name: str, key_material: bytes, commands: list[list[str]], out_name: str) -> Path:
    key = hashlib.sha256(key_material).hexdigest()[:12]
    BUILD.mkdir(exist_ok=True)
    out = BUILD / f"{out_name}-{key}"
    if out.exists():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    for command in commands:
        subprocess.run(
            [arg.replace("{out}", str(tmp)) for arg in command], check=True, capture_output=True
        )
    tmp.rename(out)
    return out


@pytest.fixture(scope="session")
def sites_lib() -> Path:
    """tests/targets/sites_lib.c as a shared object with RELATIVE-relocated __mcount_loc."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build test targets")
    source = TARGETS / "sites_lib.c"
    obj = BUILD / f"sites_lib-{os.getpid()}.o"
    BUILD.mkdir(exist_ok=True)
    try:
        return _cached_build(
            "sites_lib",
            source.read_bytes() + repr(_LIB_FLAGS).encode(),
            [
                ["gcc", *_LIB_FLAGS, "-c", str(source), "-o", str(obj)],
                # The TEXTREL warning is expected: __mcount_loc is read-only.
                ["gcc", "-shared", str(obj), "-o", "{out}"],
            ],
            "libsites_lib.so",
        )
    finally:
        obj.unlink(missing_ok=True)


# -- objdump as an independent oracle ------------------------------------------

_LINE = re.compile(r"^\s*([0-9a-f]+):\t([0-9a-f ]+?)\s*\t(\S+)(?:\s+(\S+))?(?:\s+<([^>]+)>)?")


@dataclass(frozen=True)
class Disassembled:
    address: int
    raw: bytes
    mnemonic: str
    target_name: str | None


def objdump(path: Path, *, start: int | None = None, stop: int | None = None) -> list[Disassembled]:
    """Every instruction objdump -d decodes in ``path`` (optionally an address range)."""
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is needed as the test oracle")
    args = ["objdump", "-d", "-w", str(path)]
    if start is not None:
        args.append(f"--start-address={start:#x}")
    if stop is not None:
        args.append(f"--stop-address={stop:#x}")
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    result = []
    for line in out.splitlines():
        m = _LINE.match(line)
        if m is None:
            continue
        result.append(
            Disassembled(int(m[1], 16), bytes.fromhex(m[2].replace(" ", "")), m[3], m[5])
        )
    return result


# -- live targets --------------------------------------------------------------


@dataclass(frozen=True)
class Live:
    pid: int
    path: Path


@pytest.fixture
def start_waiting() -> Iterator:
    """``start_waiting(binary, env=None)`` runs ``binary wait`` until it printed "ready"."""
    started: list[subprocess.Popen[str]] = []

    def start(binary: Path, *, env: dict[str, str] | None = None) -> Live:
        proc = subprocess.Popen(
            [str(binary), "wait"],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        started.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("ready"), line
        return Live(proc.pid, binary)

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
