"""Helpers for the tracing tests: the exact_calls target and captures in a background thread."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from textpoke.capture import CaptureOptions, CaptureProgress, capture_pid
from textpoke.ring import Recording


class Target:
    """A test target that prints "ready" and then answers one "done ..." line per command."""

    def __init__(self, argv: Sequence[str], *, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env)
        line = self.proc.stdout.readline()
        assert line.startswith("ready"), f"target did not start: {line!r}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ask(self, command: str) -> dict[str, str]:
        """Send one command; its answer line as {key: value} (values may be lists: "1,2")."""
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line.startswith("done"), f"unexpected answer to {command!r}: {line!r}"
        return dict(re.findall(r"(\w+)=(\S+)", line))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


@dataclass
class Capture:
    """A capture_pid running in a thread; ``armed`` once the sites are patched."""

    stop: threading.Event = field(default_factory=threading.Event)
    armed: threading.Event = field(default_factory=threading.Event)
    progress: list[CaptureProgress] = field(default_factory=list)
    recording: Recording | None = None
    error: BaseException | None = None

    def on_progress(self, progress: CaptureProgress) -> None:
        self.progress.append(progress)
        self.armed.set()


@contextlib.contextmanager
def capturing(pid: int, options: CaptureOptions, *, timeout: float = 30.0, output=None) -> Iterator[Capture]:
    """Run capture_pid(pid, options) while the block runs; the recording is set after it."""
    capture = Capture()

    def run() -> None:
        try:
            capture.recording = capture_pid(pid, options, output=output, stop_event=capture.stop,
                                            on_progress=capture.on_progress)
        except BaseException as exc:  # handed to the test thread
            capture.error = exc
        finally:
            capture.armed.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert capture.armed.wait(timeout), "the capture did not start"
        if capture.error is not None:
            raise capture.error
        yield capture
    finally:
        capture.stop.set()
        thread.join(timeout)
    assert not thread.is_alive(), "the capture did not stop"
    if capture.error is not None:
        raise capture.error


@pytest.fixture(scope="session")
def exact_calls(build_target) -> Path:
    return build_target("exact_calls")


@pytest.fixture
def target(exact_calls) -> Iterator[Target]:
    running = Target([str(exact_calls)])
    yield running
    running.close()


def tids_of(answer: dict[str, str]) -> set[int]:
    return {int(t) for t in answer["tids"].split(",")}


def symbols_of(path: Path) -> dict[str, int]:
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        table = ELFFile(f).get_section_by_name(".symtab")
        return {s.name: s["st_value"] for s in table.iter_symbols() if s["st_info"]["type"] == "STT_FUNC"}


def no_rseq_env() -> dict[str, str]:
    """An environment in which glibc does not register rseq: every call takes the fallback."""
    return {**os.environ, "GLIBC_TUNABLES": "glibc.pthread.rseq=0"}
