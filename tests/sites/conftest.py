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


# -- builds beyond the tests' C recipe -------------------------------------------

#: The C++ fentry recipe of the README: compile with the fentry flags, link -no-pie without -pg.
CXX_FENTRY_FLAGS = ("-O2", "-fno-pie", "-pg", "-mfentry", "-mnop-mcount", "-mrecord-mcount")


def build(source: Path, *, cflags: tuple[str, ...], ldflags: tuple[str, ...] = (), compiler: str = "gcc",
          name: str | None = None) -> Path:
    """Compile and link ``source`` into tests/_build (cached by content, flags and compiler)."""
    if shutil.which(compiler) is None:
        pytest.skip(f"{compiler} is needed to build this test target")
    obj = BUILD / f"{name or source.stem}-{os.getpid()}.o"
    BUILD.mkdir(exist_ok=True)
    try:
        return _cached_build(
            name or source.stem,
            source.read_bytes() + repr((compiler, cflags, ldflags)).encode(),
            [
                [compiler, *cflags, "-c", str(source), "-o", str(obj)],
                [compiler, str(obj), "-o", "{out}", *ldflags],
            ],
            name or source.stem,
        )
    finally:
        obj.unlink(missing_ok=True)


def stripped_copy(binary: Path, out: Path) -> Path:
    """``strip`` of a copy of ``binary`` (no .symtab, no debug sections)."""
    if shutil.which("strip") is None:
        pytest.skip("strip (binutils) is needed")
    shutil.copyfile(binary, out)
    subprocess.run(["strip", str(out)], check=True, capture_output=True)
    out.chmod(0o755)
    return out


def many_functions(n: int, *, cflags: tuple[str, ...], ldflags: tuple[str, ...] = (), tag: str = "") -> Path:
    """tests/targets/many_functions.py's program with ``n`` functions, built with ``cflags``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("many_functions", TARGETS / "many_functions.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    BUILD.mkdir(exist_ok=True)
    source = module.write(n, BUILD / f"many_functions_{n}.c")
    return build(source, cflags=cflags, ldflags=ldflags, name=f"many_functions_{n}{tag}")


def nm_functions(binary: Path) -> dict[int, set[str]]:
    """Oracle: function symbols with a size (nm), address -> names."""
    if shutil.which("nm") is None:
        pytest.skip("nm (binutils) is needed as the test oracle")
    out = subprocess.run(["nm", "-S", "--defined-only", str(binary)], check=True, capture_output=True,
                         text=True).stdout
    found: dict[int, set[str]] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[2] in "tTwW" and int(parts[1], 16) > 0:
            found.setdefault(int(parts[0], 16), set()).add(parts[3])
    return found


class Commanded:
    """A target that prints "ready" and answers each stdin command with one "done ..." line
    (tests/targets/exact_calls.c's protocol)."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("ready"), f"target did not start: {line!r}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ask(self, command: str) -> dict[str, str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line.startswith("done"), f"unexpected answer to {command!r}: {line!r}"
        return dict(re.findall(r"(\w+)=(\S+)", line))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


def debian_binary(path: str, package: str) -> Path:
    """A binary of a Debian package, installed with apt-get if it is missing (the tests run as root in CI)."""
    binary = Path(path)
    if not binary.exists() and shutil.which("apt-get") and os.geteuid() == 0:
        install = ["apt-get", "install", "-y", "-q", package]
        if subprocess.run(install, capture_output=True, timeout=600).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=600)
            subprocess.run(install, capture_output=True, timeout=600)
    if not binary.exists():
        pytest.skip(f"{path} is not installed and `apt-get install {package}` did not install it")
    return binary
