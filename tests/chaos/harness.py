"""Helpers for the chaos tests: targets spoken to line by line, the CLI, memory."""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from elftools.elf.elffile import ELFFile

ROOT = Path(__file__).resolve().parents[2]


def env_count(name: str, default: int) -> int:
    """A trial count from the environment (CI keeps the defaults small)."""
    return int(os.environ.get(name, default))


@contextlib.contextmanager
def cpu_hogs(count: int) -> Iterator[None]:
    """``count`` processes spinning on the CPU while the block runs: preemption
    at every instant (it found races a quiet machine hid)."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def symbols(path: Path) -> dict[str, int]:
    with open(path, "rb") as f:
        table = ELFFile(f).get_section_by_name(".symtab")
        return {s.name: s["st_value"] for s in table.iter_symbols() if s["st_value"]}


def text_section(path: Path) -> tuple[int, bytes]:
    with open(path, "rb") as f:
        section = ELFFile(f).get_section_by_name(".text")
        return section["sh_addr"], section.data()


def read_mem(pid: int, address: int, size: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        mem.seek(address)
        return mem.read(size)


def fields(line: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"(\w+)=(-?\d+)", line)}


class Target:
    """A test target started with pipes; every read has a timeout (no hung test)."""

    def __init__(self, argv: Sequence[str], *, ready: str = "ready", preexec_fn=None) -> None:
        self.proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     preexec_fn=preexec_fn)
        self._buffer = b""
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.proc.stdout, selectors.EVENT_READ)
        line = self.readline()
        assert line.startswith(ready), f"target did not start: {line!r}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def readline(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            assert remaining > 0 and self._selector.select(remaining), f"target {self.pid} did not answer"
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            assert chunk, f"target {self.pid} closed its output (exit {self.proc.poll()})"
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def send(self, command: str) -> None:
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def ask(self, command: str) -> str:
        self.send(command)
        return self.readline()

    def stop(self, command: str = "stop", timeout: float = 60.0) -> dict[str, int]:
        """Tell the target to finish; its last line as ints; it must exit 0."""
        self.send(command)
        self.proc.stdin.close()
        lines = self.read_to_end(timeout).splitlines()
        assert self.proc.wait(timeout) == 0, f"target exited with {self.proc.returncode}: {lines!r}"
        return fields(lines[-1])

    def read_to_end(self, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0 and self._selector.select(remaining), f"target {self.pid} did not finish"
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                break
            self._buffer += chunk
        text, self._buffer = self._buffer.decode(), b""
        return text

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def fork_and_kill(tool: Callable[[int], None], events: Callable[[int], list[str]], delay: float) -> list[str]:
    """Fork ``tool(write_fd)`` (it reports events on the pipe and never returns),
    read them with ``events(read_fd)``, then SIGKILL it ``delay`` s later; the events seen."""
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read_fd)
        tool(write_fd)
        os._exit(0)
    os.close(write_fd)
    try:
        seen = events(read_fd)
        time.sleep(delay)
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(read_fd)
    return seen


def run_cli(*args: str, timeout: float = 120.0, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "textpoke", *args], capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def assert_one_error(done: subprocess.CompletedProcess[str], code: int, message: str) -> None:
    """The CLI failed with ``code``: one error line equal to ``message``, one hint, no traceback."""
    lines = done.stderr.splitlines()
    assert (done.returncode, lines[0] if lines else "") == (code, f"textpoke: error: {message}"), done.stderr
    assert len(lines) == 2 and lines[1].startswith("textpoke: hint: "), done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
