"""Capture orchestration: attach (or start), trace or count, drain, revert, detach.

This is the API the ``record`` and ``trace`` commands are written against:
:func:`capture_pid` for a running process, :func:`capture_command` for a
program started under textpoke; both return a :class:`Recording`.
"""

from __future__ import annotations

import enum
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .._errors import TargetError, TextpokeError, UsageError
from ..poke.session import Session, attach, spawn
from ..sites import Site, SiteKind, mapped_object, sites_in_process
from ..trampolines.tracer import Mode, StubKind, TracedSite, Tracer, probe_thread_abi
from ..x86.insn import NOP5
from .format import RECORD_DTYPE, write_ring_header
from .reader import RingReader, SiteTable, TscClock, clock_sample
from .recording import Recording, SiteInfo, Symbols

#: How often the ring is drained while the target runs, and how often progress is sent.
DRAIN_INTERVAL_S = 0.01
COUNT_INTERVAL_S = 0.05
PROGRESS_INTERVAL_S = 0.25
#: After the revert: time for threads still inside a trampoline to finish their record.
SETTLE_S = 0.005
#: How long the program of capture_command gets to end after a stop_event, before SIGTERM.
STOP_GRACE_S = 2.0
#: The whole ring must fit within rel32 reach of the sites, with room to spare.
_MAX_RING_RECORDS = 1 << 25


@dataclass(frozen=True)
class CaptureOptions:
    """What to trace and how; see :func:`capture_pid`."""

    functions: tuple[str, ...] = ()  # fnmatch globs over fentry function names ("" -> all fentry sites);
    #                                  with calls_to: the functions whose call sites count
    calls_to: tuple[str, ...] = ()  # globs over callee names (malloc matches malloc@plt): call-site mode
    mode: str = "trace"  # "trace" | "count"
    ring_records: int = 1 << 20  # total capacity in records
    duration: float | None = None  # seconds; None: until stop_event is set or the target exits
    library: str | None = None  # object to take sites from (default main executable)


@dataclass(frozen=True)
class CaptureProgress:
    """Sent to ``on_progress`` about four times per second (from the capturing thread)."""

    seconds: float
    records: int  # records drained so far (count mode: calls counted so far)
    lost: int
    sites: int


class StopReason(enum.Enum):
    DURATION = "duration"
    STOP_EVENT = "stop_event"
    EXITED = "exited"


@dataclass
class _Capture:
    """Mutable state of one capture loop: the reader and the chunks of records it drained."""

    tracer: Tracer
    reader: RingReader | None
    chunks: list[np.ndarray] = field(default_factory=list)
    stopped: StopReason = StopReason.EXITED


def _check_options(options: CaptureOptions) -> Mode:
    if not isinstance(options, CaptureOptions):
        raise UsageError(f"options must be CaptureOptions, not {type(options).__name__}")
    try:
        mode = Mode(options.mode)
    except ValueError:
        raise UsageError(f"unknown capture mode {options.mode!r}", hint="use 'trace' or 'count'") from None
    if not 16 <= options.ring_records <= _MAX_RING_RECORDS:
        raise UsageError(f"ring of {options.ring_records} records: give between 16 and {_MAX_RING_RECORDS}",
                         hint="the default is 1M records (32 MiB, mapped in the target)")
    if options.duration is not None and not options.duration > 0:
        raise UsageError(f"duration must be positive, not {options.duration}")
    return mode


def _select_sites(pid: int, options: CaptureOptions) -> tuple[list[Site], int]:
    """The sites to patch (unchanged ones only) and how many were skipped as already changed."""
    functions = tuple(g for g in options.functions if g)  # "" selects every function
    kinds = {SiteKind.CALL} if options.calls_to else {SiteKind.FENTRY}
    found = sites_in_process(pid, path=options.library, kinds=kinds, functions=functions,
                             calls_to=options.calls_to)
    usable = [s for s in found if not s.changed and (s.kind is SiteKind.CALL or s.insn == NOP5)]
    if not usable:
        what = (f"call sites to {', '.join(options.calls_to)}" if options.calls_to
                else f"fentry sites in {', '.join(functions) or 'any function'}")
        where = options.library or "the main executable"
        if found:
            raise UsageError(f"glob matched nothing usable: every one of the {len(found)} {what} in {where} "
                             "is already patched", hint="end the other textpoke session first")
        hint = ("check the names with `textpoke sites PID --kind call --calls-to GLOB`" if options.calls_to else
                "check the names with `textpoke sites PID --kind fentry`; fentry sites need a build with "
                "-pg -mfentry -mnop-mcount (or trace call sites with --calls-to)")
        raise UsageError(f"glob matched nothing: no {what} in {where}", hint=hint)
    return usable, len(found) - len(usable)


def _symbols(pid: int, library: str | None) -> Symbols:
    """Function and PLT ranges of the main executable (and ``library``), at runtime addresses."""
    ranges: list[tuple[int, int, str]] = []
    for path in dict.fromkeys((None, library)):
        try:
            obj, image = mapped_object(pid, path=path)
        except TextpokeError:
            continue
        ranges += [(obj.base + f.address, obj.base + f.address + max(f.size, 1), f.name) for f in image.functions]
        ranges += [(obj.base + stub, obj.base + stub + 16, name) for stub, name in image.plt.items()]
    return Symbols.from_ranges(ranges)


def _command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return ""
    return shlex.join(argv)


def _site_info(sites: Sequence[Site]) -> tuple[SiteInfo, ...]:
    return tuple(SiteInfo(id=i, address=s.address, kind=s.kind.value, function=s.function,
                          target_name=s.target_name if s.kind is SiteKind.CALL else None)
                 for i, s in enumerate(sites))


def _traced(sites: Sequence[Site]) -> list[TracedSite]:
    return [TracedSite(address=s.address, kind=StubKind.CALL if s.kind is SiteKind.CALL else StubKind.ENTRY,
                       original=s.insn) for s in sites]


def _site_table(sites: Sequence[Site]) -> SiteTable:
    """Per site id: is it a call site, and the traced function (entry) or the callee (call)."""
    return SiteTable.build(
        is_call=[s.kind is SiteKind.CALL for s in sites],
        address=[s.address for s in sites],
        callee=[(s.target or 0) if s.kind is SiteKind.CALL else s.address - s.offset_in_function for s in sites],
    )


def _capture(
    session: Session,
    options: CaptureOptions,
    mode: Mode,
    *,
    command: str,
    exited: Callable[[], bool],
    stop_event: threading.Event | None,
    on_progress: Callable[[CaptureProgress], None] | None,
) -> Recording:
    """One capture on an attached session.

    1. find the sites (UsageError when the globs match nothing);
    2. check the thread ABI (tid and rseq, one thread seized for a moment);
    3. map the trampolines and the ring near the sites, write code and header;
    4. sample the clock (start_ns), then apply ONE batch sending every site to
       its stub;
    5. drain the ring until the duration, the stop event or the target's
       exit: each drain decodes its records in bulk (numpy), timestamps
       included (see RingReader); progress about 4 times per second;
    6. revert every site (one batch), let threads still inside a routine
       finish, drain what is left (end_ns after it: every record is inside
       [start_ns, end_ns]);
    7. concatenate the chunks and sort them by time.
    The session itself detaches when its ``with`` block ends.
    """
    pid = session.pid
    sites, skipped = _select_sites(pid, options)
    symbols = _symbols(pid, options.library)
    abi = probe_thread_abi(session.process, exclude=frozenset({session.resident.agent_tid}),
                           held=session.resident.held)
    tracer = Tracer(session.resident, _traced(sites), mode=mode, abi=abi, ring_records=options.ring_records)
    try:
        geometry = tracer.ring if tracer.ring is not None else tracer.counters
        assert geometry is not None
        write_ring_header(tracer.data, geometry)
        first = clock_sample()
        start_ns = time.monotonic_ns()
        reader = None
        if tracer.ring is not None:
            reader = RingReader(tracer.data, _site_table(sites), start=first)
        state = _Capture(tracer, reader)
        del reader
        applied = _apply(session, tracer, exited)
        session.release()  # a spawned program starts now, with every site in place
        if applied:
            _run(state, options, start_ns=start_ns, exited=exited, stop_event=stop_event, on_progress=on_progress)
            _revert(session, exited)
        time.sleep(SETTLE_S)
        counts = None
        records = np.empty(0, dtype=RECORD_DTYPE)
        lost = 0
        if state.reader is not None:
            _drain_final(state)
            records = np.concatenate(state.chunks) if state.chunks else records
            state.chunks.clear()
            lost = state.reader.lost() + state.reader.reserved_uncommitted()
            state.reader = None  # drop its numpy views of the shared memory before closing
        else:
            counts = tracer.counts()
        end_ns = time.monotonic_ns()
        clock = TscClock.between(first, clock_sample())
        records = records[np.argsort(records["ts_ns"], kind="stable")]
        if on_progress is not None:
            done = int(counts.sum()) if counts is not None else len(records)
            on_progress(CaptureProgress(seconds=(end_ns - start_ns) / 1e9, records=done, lost=lost,
                                        sites=len(sites)))
    finally:
        tracer.close(discard=True)
    return Recording(
        records=records,
        sites=_site_info(sites), lost=lost, pid=pid, command=command, start_ns=start_ns, end_ns=end_ns,
        symbols=symbols, counts=counts, mode=mode.value,
        metadata={
            "stopped": state.stopped.value if applied else "exited before tracing started",
            "skipped_sites": skipped, "library": options.library, "thread_abi": abi.note,
            "thread_ids": "kernel tid" if abi.tid_offset is not None else "thread pointer (opaque)",
            "rseq": abi.rseq_offset is not None, "cpus": abi.cpus, "ns_per_tick": clock.ns_per_tick,
        },
    )


def _apply(session: Session, tracer: Tracer, exited: Callable[[], bool]) -> bool:
    """Apply the tracer's batch; False if the target exited before or during it."""
    try:
        session.apply(tracer.patches)
    except TextpokeError:
        if exited():
            return False
        raise
    return True


def _revert(session: Session, exited: Callable[[], bool]) -> None:
    if exited():
        return
    try:
        session.revert()
    except TextpokeError:
        if not exited():
            raise


def _run(
    state: _Capture,
    options: CaptureOptions,
    *,
    start_ns: int,
    exited: Callable[[], bool],
    stop_event: threading.Event | None,
    on_progress: Callable[[CaptureProgress], None] | None,
) -> None:
    """Step 5: drain until a stop condition; progress every PROGRESS_INTERVAL_S."""
    deadline = None if options.duration is None else start_ns + int(options.duration * 1e9)
    interval = DRAIN_INTERVAL_S if state.reader is not None else COUNT_INTERVAL_S
    next_progress = time.monotonic_ns()
    sites = len(state.tracer.sites)
    while True:
        busy = False
        if state.reader is not None:
            chunk = state.reader.drain()
            if len(chunk):
                state.chunks.append(chunk)
                busy = len(chunk) > state.reader.geometry.capacity // 4
        now = time.monotonic_ns()
        if on_progress is not None and now >= next_progress:
            next_progress = now + int(PROGRESS_INTERVAL_S * 1e9)
            if state.reader is not None:
                done, lost = state.reader.records, state.reader.lost()
            else:
                done, lost = int(state.tracer.counts().sum()), 0
            on_progress(CaptureProgress(seconds=(now - start_ns) / 1e9, records=done, lost=lost, sites=sites))
        if deadline is not None and now >= deadline:
            state.stopped = StopReason.DURATION
            return
        if stop_event is not None and stop_event.is_set():
            state.stopped = StopReason.STOP_EVENT
            return
        if exited():
            state.stopped = StopReason.EXITED
            return
        if busy:
            continue
        wait = interval if deadline is None else max(0.0, min(interval, (deadline - now) / 1e9))
        if stop_event is not None:
            stop_event.wait(wait)
        else:
            time.sleep(wait)


def _drain_final(state: _Capture) -> None:
    """Step 6: what is left, waiting a little for fallback slots still being written."""
    assert state.reader is not None
    deadline = time.monotonic() + 0.1
    while True:
        chunk = state.reader.drain()
        if len(chunk):
            state.chunks.append(chunk)
        if state.reader.reserved_uncommitted() == 0 or time.monotonic() > deadline:
            return
        time.sleep(0.001)


def capture_pid(
    pid: int,
    options: CaptureOptions,
    *,
    stop_event: threading.Event | None = None,
    on_progress: Callable[[CaptureProgress], None] | None = None,
) -> Recording:
    """Trace (or count) calls in the running process ``pid``; see :func:`_capture` for the steps.

    Stops after ``options.duration``, when ``stop_event`` is set, or when the
    process exits; every patched byte is restored before this returns (if the
    process still runs) and the process is left running, detached."""
    mode = _check_options(options)
    with attach(pid) as session:
        return _capture(session, options, mode, command=_command_line(pid),
                        exited=lambda: not session.process.alive(), stop_event=stop_event,
                        on_progress=on_progress)


def capture_command(
    argv: Sequence[str],
    options: CaptureOptions,
    *,
    stop_event: threading.Event | None = None,
    on_progress: Callable[[CaptureProgress], None] | None = None,
    **popen: object,
) -> tuple[Recording, int]:
    """Start ``argv`` (resident part installed before its ``main``), trace it until it exits.

    Returns the recording and the program's exit status (``Popen.returncode``:
    negative for a signal). ``duration`` or ``stop_event`` end the tracing
    earlier; the program keeps running and is waited for (after a stop_event
    it gets STOP_GRACE_S to end, e.g. on the terminal's own SIGINT, then
    SIGTERM, then SIGKILL). ``popen`` goes to ``subprocess.Popen`` (stdin, stdout, env, cwd...).
    The program is held at its entry point until the batch is applied, so
    every call it makes (after its constructors) is seen.
    """
    mode = _check_options(options)
    argv = list(argv)
    proc, session = spawn(argv, hold=True, **popen)
    try:
        exited = lambda: proc.poll() is not None  # noqa: E731 - reaps the child when it ends
        try:
            with session:
                recording = _capture(session, options, mode, command=shlex.join(argv), exited=exited,
                                     stop_event=stop_event, on_progress=on_progress)
        except TargetError:  # TargetExited, NoSuchProcess: the program ended first
            if not exited():
                raise
            recording = _empty(proc.pid, argv, mode)
        if stop_event is not None and stop_event.is_set():
            _end_program(proc)
        return recording, proc.wait()
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise


def _end_program(proc: subprocess.Popen) -> None:
    """After a stop_event: STOP_GRACE_S to end on its own, then SIGTERM, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            proc.wait(timeout=STOP_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            proc.send_signal(sig)


def _empty(pid: int, argv: Sequence[str], mode: Mode) -> Recording:
    """The recording of a program that ended before its sites could be patched."""
    now = time.monotonic_ns()
    return Recording(records=np.empty(0, dtype=RECORD_DTYPE), sites=(), lost=0, pid=pid,
                     command=shlex.join(argv), start_ns=now, end_ns=now,
                     counts=np.zeros(0, dtype=np.uint64) if mode is Mode.COUNT else None, mode=mode.value,
                     metadata={"stopped": "exited before tracing started"})


__all__ = ["CaptureOptions", "CaptureProgress", "StopReason", "capture_command", "capture_pid"]
