"""What ``record``, ``trace``, ``report``, ``dump`` and ``demo`` share: reading and
writing recordings (OS errors become one-line TextpokeErrors here, at the CLI
boundary), stopping on signals, and the live counter on stderr."""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType, ModuleType
from typing import TYPE_CHECKING, Any, TextIO

import click
from rich.console import Console
from rich.live import Live
from rich.text import Text

from .._errors import NoSuchProcess, PermissionDenied, TargetError, TextpokeError, UsageError

if TYPE_CHECKING:
    from ..ring.capture import CaptureOptions, CaptureProgress
    from ..ring.recording import Recording

DEFAULT_OUTPUT = "textpoke.tpk"
_RECORD_HINT = "make one with `textpoke record -o FILE -- CMD` or `textpoke trace -p PID -o FILE`"


# The capture engine is imported when a command runs, not when the CLI starts:
# `textpoke sites` must work even if the ring package is broken or missing.
def _engine(name: str) -> ModuleType:
    try:
        return importlib.import_module(f"textpoke.ring.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"textpoke.ring.{name}":
            raise  # a real bug inside the engine: let it show
        raise TextpokeError(f"this textpoke has no capture engine (textpoke.ring.{name} is missing)",
                            hint="reinstall textpoke") from exc


def recording_module() -> ModuleType:
    return _engine("recording")


def capture_module() -> ModuleType:
    return _engine("capture")


def _os_message(exc: OSError) -> str:
    return exc.strerror or str(exc)


def load_recording(path: str) -> Recording:
    """``Recording.load`` with file errors as one clear line."""
    if os.path.isdir(path):
        raise UsageError(f"{path} is a directory, not a recording", hint=_RECORD_HINT)
    if not os.path.exists(path):
        raise UsageError(f"no such recording: {path}", hint=_RECORD_HINT)
    try:
        return recording_module().Recording.load(path)
    except OSError as exc:
        raise TextpokeError(f"cannot read {path}: {_os_message(exc)}",
                            hint="check the file's permissions") from exc


def check_writable(path: str) -> None:
    """Refuse an output path we could not write *before* a trace starts, not after it."""
    parent = Path(path).resolve().parent
    if os.path.isdir(path):
        raise UsageError(f"{path} is a directory", hint="give a file name to -o")
    if not parent.is_dir():
        raise UsageError(f"cannot write {path}: directory {parent} does not exist", hint="create it or pick another -o")
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UsageError(f"cannot write {path}: permission denied", hint="pick another -o")


def save_recording(recording: Recording, path: str) -> None:
    try:
        recording.save(path)
    except OSError as exc:
        raise TextpokeError(f"cannot write {path}: {_os_message(exc)}",
                            hint="pick another -o (the trace itself is complete)") from exc


@contextlib.contextmanager
def output_stream(path: str | None) -> Iterator[TextIO]:
    """``-o OUT`` opened for text, or stdout; a closed pipe (``| head``) ends quietly."""
    try:
        if path is None or path == "-":
            yield sys.stdout
            sys.stdout.flush()
            return
        try:
            out = open(path, "w", encoding="utf-8")
        except OSError as exc:
            raise TextpokeError(f"cannot write {path}: {_os_message(exc)}", hint="pick another -o") from exc
        with out:
            yield out
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): not an error.  Point stdout at
        # /dev/null so the interpreter's final flush does not complain again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def require_process(pid: int) -> None:
    if pid <= 0 or not os.path.exists(f"/proc/{pid}"):
        raise NoSuchProcess(f"no process with pid {pid}")


@contextlib.contextmanager
def os_errors(what: str) -> Iterator[None]:
    """The CLI boundary for the capture engine: an OS error it lets through
    becomes one line (with the file it concerns) instead of a traceback."""
    try:
        yield
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        if isinstance(exc, PermissionError):
            raise PermissionDenied(f"{what}: permission denied{where}") from exc
        raise TargetError(f"{what}: {_os_message(exc)}{where}",
                          hint="check that the process still runs and that you may trace it") from exc


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """While the block runs, SIGINT and SIGTERM set ``stop`` instead of killing us.

    The capture engine sees the event and ends cleanly (every byte restored,
    detached), so one Ctrl-C is enough; the old handlers come back afterwards."""

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


class LiveCounter:
    """The capture's ``on_progress``: a live line on stderr when it is a terminal.

    The engine may call it from its own thread; rich's Live serializes updates.
    When stderr is not a terminal nothing is drawn while tracing, and the
    command prints one final line instead (see :func:`final_line`)."""

    def __init__(self, what: str, *, console: Console | None = None) -> None:
        self.what = what
        self.console = console or Console(stderr=True)
        self.live: Live | None = None

    def __enter__(self) -> LiveCounter:
        if self.console.is_terminal:
            self.live = Live(Text(f"{self.what}: starting"), console=self.console,
                             refresh_per_second=4, transient=True)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)

    def __call__(self, progress: CaptureProgress) -> None:
        if self.live is None:
            return
        # Short enough for an 80-column terminal: a wrapped Live line redraws badly.
        text = Text(f"{self.what}: {progress.seconds:.1f} s, {progress.records:,} records, ")
        text.append(f"{progress.lost:,} lost", style="bold red" if progress.lost else "")
        text.append(f", {_plural(progress.sites, 'site')} (Ctrl-C stops)")
        self.live.update(text)


def recording_totals(recording: Recording) -> tuple[str, int]:
    """("N records" or "N calls counted", lost) for one-line summaries."""
    if recording.counts is not None:
        return f"{_plural(int(recording.counts.sum()), 'call')} counted", int(recording.lost)
    return _plural(len(recording.records), "record"), int(recording.lost)


def final_line(recording: Recording, *, verb: str, output: str | None, note_exit: bool = False) -> str:
    what, lost = recording_totals(recording)
    seconds = max(0, int(recording.end_ns) - int(recording.start_ns)) / 1e9
    line = (f"textpoke: {verb} pid {recording.pid} for {seconds:.1f} s: {what}, {lost:,} lost, "
            f"{_plural(len(recording.sites), 'site')}")
    if output is not None:
        line += f" -> {output}"
    # The engine notes why it stopped; a target that ended on its own is worth saying
    # when it was attached to (note_exit), and always when nothing could be traced.
    stopped = recording.metadata.get("stopped")
    if stopped == "exited before tracing started":
        line += " (the process ended before tracing started)"
    elif note_exit and stopped == "exited":
        line += " (the process exited)"
    if lost:
        line += " (LOST records: use a larger --ring)"
    return line


def echo_err(line: str) -> None:
    click.echo(line, err=True)


class RingSize(click.ParamType):
    """A record count: ``1048576``, ``1M`` or ``64k`` (binary multiples)."""

    name = "N"
    _SUFFIX = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().lower()
        scale = self._SUFFIX.get(text[-1:], 1)
        digits = text[:-1] if scale != 1 else text
        if not digits.isdigit() or int(digits) == 0:
            self.fail(f"{value!r} is not a record count such as 1048576, 1M or 64k", param, ctx)
        return int(digits) * scale


def capture_options(
    *, functions: tuple[str, ...], calls_to: tuple[str, ...], count: bool, ring: int | None,
    duration: float | None = None, library: str | None = None,
) -> CaptureOptions:
    options: dict[str, Any] = {"functions": functions, "calls_to": calls_to, "mode": "count" if count else "trace",
                               "duration": duration, "library": library}
    if ring is not None:
        options["ring_records"] = ring
    return capture_module().CaptureOptions(**options)



def selection_options(command: Callable[..., object]) -> Callable[..., object]:
    """The options that choose what is traced, shared by ``record`` and ``trace``."""
    for option in reversed((
        click.option("-f", "--function", "functions", multiple=True, metavar="GLOB",
                     help="Trace functions matching GLOB at their fentry sites (repeatable; default: every "
                          "function that has one). With --calls-to: only call sites inside these functions."),
        click.option("--calls-to", "calls_to", multiple=True, metavar="SYM",
                     help="Trace the call sites whose callee matches SYM, e.g. malloc (a glob; repeatable). "
                          "Works on any binary, no -pg build needed."),
        click.option("--count", is_flag=True, help="Only count calls per function (cheapest; no callers or times)."),
    )):
        command = option(command)
    return command
