"""What ``record``, ``trace``, ``report``, ``dump`` and ``demo`` share: reading
recordings and writing outputs (OS errors become one-line TextpokeErrors here, at
the CLI boundary), stopping on signals, the live counter on stderr, and the
options that choose what is traced and how."""

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

from .._errors import NoSuchProcess, PermissionDenied, TargetError, TextpokeError, UsageError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.live import Live

    from ..capture import CaptureOptions, CaptureProgress
    from ..ring.recording import Recording

DEFAULT_OUTPUT = "textpoke.tpk"
_RECORD_HINT = "make one with `textpoke record -o FILE -- CMD` or `textpoke trace -p PID -o FILE`"


# The capture engine is imported when a command runs, not when the CLI starts:
# `textpoke sites` must work even if the capture or ring package is broken or missing.
def _engine(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise  # a real bug inside the engine: let it show
        raise TextpokeError(f"this textpoke has no capture engine ({name} is missing)",
                            hint="reinstall textpoke") from exc


def recording_module() -> ModuleType:
    return _engine("textpoke.ring.recording")


def capture_module() -> ModuleType:
    return _engine("textpoke.capture")


def _os_message(exc: OSError) -> str:
    return exc.strerror or str(exc)


def load_recording(path: str) -> Recording:
    """``Recording.load`` with file errors as one clear line."""
    if os.path.isdir(path):
        raise UsageError(f"{path} is a directory, not a recording", hint=_RECORD_HINT)
    if not os.path.exists(path):
        partial = path + ".partial"
        if os.path.exists(partial):
            raise UsageError(f"no such recording: {path}, but {partial} is there (a recording cut short)",
                             hint=f"read what it holds with `textpoke report {partial}`")
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


@contextlib.contextmanager
def output_stream(path: str | None) -> Iterator[TextIO]:
    """``-o OUT`` opened for text, or stdout; a closed pipe (``| head``) ends quietly.

    A file is written as ``OUT.partial`` and renamed to ``OUT`` when whole: a
    failure (disk full, an error in the middle) removes it and leaves an existing
    ``OUT`` as it was. A write error on stdout (``> /dev/full``) is one line."""
    try:
        if path is None or path == "-":
            try:
                yield sys.stdout
                sys.stdout.flush()
            except OSError as exc:
                if isinstance(exc, BrokenPipeError):
                    raise
                _quiet_stdout()
                raise TextpokeError(f"cannot write the output: {_os_message(exc)}",
                                    hint="write it to a file with -o, on a disk with room") from exc
            return
        if os.path.exists(path) and not os.path.isfile(path):
            yield from _special_stream(path)  # /dev/full, a fifo, /dev/stdout: no rename there
            return
        partial = path + ".partial"
        try:
            out = open(partial, "w", encoding="utf-8")
        except OSError as exc:
            raise TextpokeError(f"cannot write {path}: {_os_message(exc)}", hint="pick another -o") from exc
        try:
            with out:
                yield out
            os.replace(partial, path)
        except OSError as exc:
            _remove(partial)
            raise TextpokeError(f"cannot write {path}: {_os_message(exc)}; nothing was written",
                                hint="free some space or pick another -o") from exc
        except BaseException:
            _remove(partial)
            raise
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): not an error.
        _quiet_stdout()


def _special_stream(path: str) -> Iterator[TextIO]:
    try:
        out = open(path, "w", encoding="utf-8")
    except OSError as exc:
        raise TextpokeError(f"cannot write {path}: {_os_message(exc)}", hint="pick another -o") from exc
    try:
        with out:
            yield out
    except OSError as exc:
        raise TextpokeError(f"cannot write {path}: {_os_message(exc)}", hint="pick another -o") from exc


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not complain again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


#: Recordings with more records than this show a progress bar while read (on a terminal).
PROGRESS_RECORDS = 5_000_000


class ProgressReading:
    """A recording whose walk over its chunks shows a progress bar on stderr (a terminal
    only, and only for big recordings); every other attribute is the recording's."""

    def __init__(self, recording: Recording, what: str) -> None:
        self._recording = recording
        self._what = what

    def __getattr__(self, name: str) -> Any:
        return getattr(self._recording, name)

    def chunks(self, *, merged: bool = True) -> Iterator[Any]:
        total = self._recording.record_count
        console = stderr_console() if total >= PROGRESS_RECORDS else None
        if console is None:
            yield from self._recording.chunks(merged=merged)
            return
        from rich.progress import Progress  # only big recordings on a terminal get here

        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(f"{self._what} {total:,} records", total=total)
            for chunk in self._recording.chunks(merged=merged):
                yield chunk
                progress.advance(task, len(chunk))


def stderr_console() -> Console | None:
    """rich's console on stderr if it is a terminal (rich decides, FORCE_TERMINAL
    included), else None. rich is imported only when stderr may be a terminal: the
    capture commands start in a pipe without it."""
    if not (sys.stderr.isatty() or os.environ.get("FORCE_TERMINAL") or os.environ.get("TTY_COMPATIBLE")):
        return None
    from rich.console import Console

    console = Console(stderr=True)
    return console if console.is_terminal else None


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
def stop_on_signals(stop: threading.Event, *, on_signal: Callable[[int], None] | None = None) -> Iterator[None]:
    """While the block runs, SIGINT, SIGTERM and SIGHUP set ``stop`` instead of killing us.

    The capture engine sees the event and ends cleanly (every byte restored,
    detached, the recording saved), so one Ctrl-C is enough; ``on_signal(signum)``
    is called too (from the signal handler); the old handlers come back afterwards."""

    def handler(signum: int, frame: FrameType | None) -> None:
        if on_signal is not None:
            on_signal(signum)
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
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
        self.console = console if console is not None else stderr_console()
        self.live: Live | None = None

    def __enter__(self) -> LiveCounter:
        if self.console is not None and self.console.is_terminal:
            from rich.live import Live
            from rich.text import Text

            self.live = Live(Text(f"{self.what}: starting"), console=self.console,
                             refresh_per_second=4, transient=True)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Take the live line away (for good): what follows is printed as plain lines."""
        if self.live is not None:
            live, self.live = self.live, None
            live.__exit__(None, None, None)

    def __call__(self, progress: CaptureProgress) -> None:
        if self.live is None:
            return
        # Short enough for an 80-column terminal: a wrapped Live line redraws badly.
        from rich.text import Text

        live = self.live
        text = Text(f"{self.what}: {progress.seconds:.1f} s, {progress.records:,} records, ")
        text.append(f"{progress.lost:,} lost", style="bold red" if progress.lost else "")
        text.append(f", {_plural(progress.sites, 'site')} (Ctrl-C stops)")
        live.update(text)


def recording_totals(recording: Recording) -> tuple[str, int]:
    """("N records" or "N calls counted", lost) for one-line summaries."""
    if recording.counts is not None:
        return f"{_plural(int(recording.counts.sum()), 'call')} counted", int(recording.lost)
    calls = recording.metadata.get("calls")
    if recording.metadata.get("graph") and calls is not None:  # entries and exits: two records a call
        return f"{_plural(int(calls), 'call')} ({_plural(recording.record_count, 'record')})", int(recording.lost)
    return _plural(recording.record_count, "record"), int(recording.lost)


def final_line(recording: Recording, *, verb: str, output: str | None, note_exit: bool = False) -> str:
    """One line: what was traced, for how long (the traced interval), what was kept and lost."""
    what, lost = recording_totals(recording)
    seconds = recording.duration_ns / 1e9
    traced = len(recording.sites) - len(recording.metadata.get("foreign_sites") or ())
    line = (f"textpoke: {verb} pid {recording.pid} for {seconds:.1f} s: {what}, {lost:,} lost, "
            f"{_plural(traced, 'site')}")
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
        if recording.metadata.get("overflow") == "drop":
            line += " (LOST records: --drop was given; record without it to lose none)"
        else:
            line += " (LOST records: see `textpoke report` for why)"
    return line


def notes(recording: Recording) -> list[str]:
    """Lines worth a note after the one-line result: sites left out (someone else's int3)."""
    foreign = recording.metadata.get("foreign_sites") or []
    if not foreign:
        return []
    names = dict((s.address, s.function) for s in recording.sites)
    shown = ", ".join(f"{a:#x} ({names.get(a, '?')})" for a in foreign[:8])
    more = f" and {len(foreign) - 8} more" if len(foreign) > 8 else ""
    return [f"textpoke: note: {len(foreign)} of {len(recording.sites)} sites hold someone else's int3 (a "
            f"debugger's breakpoint or a uprobe) and were not traced: {shown}{more}"]


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
    drop: bool = False, wait_limit: float | None = None, no_compress: bool = False, entry_only: bool = False,
    duration: float | None = None, library: str | None = None,
) -> CaptureOptions:
    capture = capture_module()
    options: dict[str, Any] = {"functions": functions, "calls_to": calls_to, "mode": "count" if count else "trace",
                               "duration": duration, "library": library,
                               "overflow": capture.Overflow.DROP if drop else capture.Overflow.WAIT,
                               "compress": not no_compress, "entry_only": entry_only}
    if ring is not None:
        options["ring_records"] = ring
    if wait_limit is not None:
        options["wait_s"] = wait_limit
    return capture.CaptureOptions(**options)


def selection_options(command: Callable[..., object]) -> Callable[..., object]:
    """The options that choose what is traced and how, shared by ``record`` and ``trace``."""
    for option in reversed((
        click.option("-f", "--function", "functions", multiple=True, metavar="GLOB",
                     help="Trace functions matching GLOB at their fentry sites (repeatable; default: every "
                          "function that has one). With --calls-to: only call sites inside these functions."),
        click.option("--calls-to", "calls_to", multiple=True, metavar="SYM",
                     help="Trace the call sites whose callee matches SYM, e.g. malloc (a glob; repeatable). "
                          "Works on any binary, no -pg build needed."),
        click.option("--count", is_flag=True, help="Only count calls per function (cheapest; no callers or times)."),
        click.option("--entry-only", is_flag=True,
                     help="At fentry sites, record entries only: no exits, durations or call graph (about half "
                          "the cost per call). Default: every call's entry and exit (call sites: entries)."),
        click.option("--ring", type=RingSize(), metavar="N",
                     help="Records the ring holds, at least (e.g. 4M; default 768k, split per CPU and rounded up "
                          "to powers of two). A bigger ring makes traced threads wait less often."),
        click.option("--drop", is_flag=True,
                     help="Never make a traced thread wait: a record that finds the ring full is dropped and "
                          "counted (for latency-critical processes). Default: threads wait for textpoke, so no "
                          "record is lost."),
        click.option("--wait-limit", type=click.FloatRange(min=0, min_open=True), metavar="S",
                     help="The longest a traced thread waits for textpoke before it drops a record (default 2 s); "
                          "if textpoke dies, waits end at once."),
        click.option("--no-compress", is_flag=True,
                     help="Write records uncompressed (zstd by default): faster while the page cache absorbs "
                          "them, 3-10x bigger files."),
    )):
        command = option(command)
    return command
