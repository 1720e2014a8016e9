"""A capture from start to end: attach (or start), select, trampolines, batch, drain, write.

:func:`capture_pid` traces a running process, :func:`capture_command` a
program it starts; both stream the records to a recording file while the
target runs (``output``, or a temporary file the returned :class:`Recording`
reads from) and return the recording, opened on that file.
"""

from __future__ import annotations

import enum
import os
import shlex
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .._errors import ForeignTrap, RecordingFailed, TargetError, TextpokeError
from ..poke.session import Session, attach, spawn
from ..ring.file import Codec, ChunkKind, RecordingWriter
from ..ring.format import write_ring_header
from ..ring.reader import RingReader, TscClock, clock_sample
from ..ring.recording import Recording
from ..target.process import Process
from ..trampolines.graph import GraphRuntime, hook_sites
from ..trampolines.tracer import Mode, StubKind, TracedSite, Tracer, probe_thread_abi
from .drain import Pipeline
from .options import CaptureOptions, Overflow, check_options
from .quiesce import Quiescence
from .select import SymbolsChunk, command_line, select_sites, site_info, site_table, traced_sites

#: How often the main thread looks at the stop conditions, and how often progress is sent.
POLL_S = 0.01
PROGRESS_INTERVAL_S = 0.25
#: After the restore: the longest the capture waits for threads still inside a
#: trampoline (see quiesce.py) before it ends; what they write later is counted lost.
SETTLE_LIMIT_S = 2.0


@dataclass(frozen=True)
class CaptureProgress:
    """Sent to ``on_progress`` about four times per second (from the capturing thread)."""

    seconds: float
    records: int  # records drained so far (count mode: calls counted so far)
    lost: int
    sites: int
    written: int = 0  # records in the file so far


class StopReason(enum.Enum):
    DURATION = "duration"
    STOP_EVENT = "stop_event"
    EXITED = "exited"
    FAILED = "failed"  # the recording file could not be written


@dataclass
class _Run:
    """What one capture measured while it ran."""

    start_ns: int = 0
    end_ns: int = 0
    stopped: StopReason = StopReason.EXITED
    applied: bool = False


def _output(output: str | os.PathLike[str] | None) -> tuple[str, bool]:
    """The file to write and whether it is a temporary one (removed once opened)."""
    if output is not None:
        return os.fspath(output), False
    fd, path = tempfile.mkstemp(prefix="textpoke-", suffix=".tpk")
    os.close(fd)
    return path, True


def _capture(
    session: Session,
    options: CaptureOptions,
    mode: Mode,
    *,
    command: str,
    listing: str,
    output: str | os.PathLike[str] | None,
    exited: Callable[[], bool],
    stop_event: threading.Event | None,
    on_progress: Callable[[CaptureProgress], None] | None,
) -> Recording:
    """One capture on an attached session.

    1. find the sites (SymbolNotFound when the globs match nothing: nothing was
       written, and a spawned program has not run);
    2. check the thread ABI (tid and rseq, one thread seized for a moment);
    3. open the recording file (``FILE.partial``) and write its header chunk;
    4. map the trampolines and the ring near the sites, write code and header;
       start the drain and write threads;
    5. sample the clock and the traced interval's start, then apply ONE batch
       sending every site to its stub; release a spawned program;
    6. wait for the duration, the stop event, the target's exit or a failure of
       the file, sending progress about 4 times per second;
    7. restore every site (one batch): the traced interval ends;
    8. drain until no thread can still be in a trampoline, then what is left;
       write the end chunk and rename the file; open it for the caller.
    The session itself detaches when its ``with`` block ends.
    """
    pid = session.pid
    sites, skipped = select_sites(pid, options, listing=listing)
    graph = mode is Mode.TRACE and not options.calls_to and not options.entry_only
    table = site_table(sites)
    abi = probe_thread_abi(session.process, exclude=frozenset({session.resident.agent_tid}),
                           held=session.resident.held)
    path, temporary = _output(output)
    writer = RecordingWriter(path, codec=Codec.ZSTD if options.compress else Codec.NONE)
    try:
        writer.open()
    except OSError as exc:
        if temporary:
            os.unlink(path)
        raise RecordingFailed(f"cannot write {writer.partial}: {exc.strerror}", hint="pick another -o") from exc
    # Names for the callers, read while the trace runs (count mode records no caller).
    names = SymbolsChunk(pid, writer) if mode is not Mode.COUNT else None
    run = _Run()
    release = False
    tracer: Tracer | None = None
    pipeline: Pipeline | None = None
    wait_s = options.wait_s if options.overflow is Overflow.WAIT else None
    metadata = {
        "skipped_sites": skipped, "library": options.library, "thread_abi": abi.note,
        "thread_ids": "kernel tid" if abi.tid_offset is not None else "thread pointer (opaque)",
        "rseq": abi.rseq_offset is not None, "cpus": abi.cpus,
        "overflow": options.overflow.value, "wait_s": wait_s,
        "compression": "zstd" if options.compress else "none",
        "graph": graph,
    }
    try:
        head = Recording(sites=site_info(sites), lost=0, pid=pid, command=command, start_ns=time.monotonic_ns(),
                         end_ns=0, mode=mode.value, metadata=metadata)
        _file_step(writer, run, lambda: writer.write_json(ChunkKind.META, head.head_json()))
        runtime, hooks = _graph_runtime(session, options) if graph else (None, [])
        tracer = Tracer(session.resident, traced_sites(sites) + hooks, mode=mode, abi=abi,
                        ring_records=options.ring_records, runtime=runtime)
        geometry = tracer.ring if tracer.ring is not None else tracer.counters
        assert geometry is not None
        write_ring_header(tracer.data, geometry)
        first = clock_sample()
        if tracer.ring is not None:
            reader = RingReader(tracer.data, start=first)
            metadata["ring_records"] = tracer.ring.buffers * tracer.ring.capacity
            pipeline = Pipeline(reader, table, writer, cpus=abi.cpus, wait_s=wait_s, pid=pid,
                                name_threads=abi.tid_offset is not None)
            pipeline.start()
        run.start_ns = time.monotonic_ns()
        run.applied = _apply(session, tracer, exited)
        foreign = session.foreign_sites & {s.address for s in sites}
        if run.applied and len(foreign) == len(sites):
            raise ForeignTrap(f"every one of the {len(sites)} sites holds an int3 that is not textpoke's (a "
                              f"debugger's breakpoint or a uprobe): {_addresses(sorted(foreign))}; nothing was "
                              "written", sites=tuple(sorted(foreign)))
        session.release()  # a spawned program starts now, with every site in place
        restored = False
        if run.applied:
            _wait(run, options, tracer, pipeline, exited=exited, stop_event=stop_event, on_progress=on_progress)
            restored = _restore(session, exited)
        run.end_ns = time.monotonic_ns()
        counts = None
        lost = 0
        code = range(tracer.region.address, tracer.region.address + tracer.code_size)
        quiet = Quiescence(pid, code, frozenset({session.resident.agent_tid}))
        if pipeline is not None:
            pipeline.finish(settled=quiet.settled, limit_s=SETTLE_LIMIT_S, then=tracer.disable)
            reader = pipeline.reader
            late = int(reader.committed().sum()) - reader.records  # committed after the last drain
            stats = pipeline.stats
            lost = reader.lost() + late + stats.unwritten
            metadata.update(calls=stats.calls, lost_full=reader.lost(), lost_late=late, lost_unwritten=stats.unwritten,
                            writer_wakes=reader.wakes, drains=stats.drains, merged_drains=stats.merges,
                            threads_unsettled=quiet.waiting)
            pipeline.reader = None  # type: ignore[assignment]  # drop its views before the tracer closes
            del reader
            if pipeline.error is not None:
                raise _failed(pipeline.error, writer, run, stats.written)
        else:
            quiet.wait(SETTLE_LIMIT_S)
            counts = tracer.counts()
        # Given back for a later session only when nothing can lead into it any more: every
        # site restored, every thread seen out of it, and no hooked frame returning through it.
        release = restored and quiet.waiting == 0 and (
            runtime is None or _frames_returned(runtime, session.process, code))
        if session.foreign_sites:
            metadata["foreign_sites"] = sorted(session.foreign_sites & {s.address for s in sites})
        if runtime is not None:
            no_thread, full = tracer.shadow_counts()
            metadata.update(shadow_no_thread=no_thread, shadow_full=full, shadow_depth=runtime.geometry.depth,
                            shadow_threads=runtime.geometry.threads)
        clock = TscClock.between(first, clock_sample())
        metadata.update(stopped=run.stopped.value if run.applied else "exited before tracing started",
                        ns_per_tick=clock.ns_per_tick)
        tail = Recording(sites=(), lost=lost, pid=pid, command=command, start_ns=run.start_ns,
                         end_ns=run.end_ns, metadata={**metadata, "finished_ns": time.monotonic_ns()},
                         threads=pipeline.threads if pipeline is not None else {})
        trailer = tail.tail_json()
        trailer["records"] = writer.records
        if counts is not None:
            _file_step(writer, run, lambda: writer.write_counts(counts))
        if names is not None:
            names.join()
            if names.error is not None:
                raise _failed(names.error, writer, run, writer.records)
        _file_step(writer, run, lambda: writer.finish(trailer))
        if on_progress is not None:
            done = int(counts.sum()) if counts is not None else writer.records
            on_progress(CaptureProgress(seconds=(run.end_ns - run.start_ns) / 1e9, records=done, lost=lost,
                                        sites=len(sites), written=writer.records))
    finally:
        if names is not None:
            names.join()  # it may be writing: the file closes after it
        writer.close()
        if tracer is not None:
            tracer.close(discard=True, release=release)
    recording = Recording.load(path)
    if temporary:
        os.unlink(path)  # the recording keeps it open; its space goes when that is closed
    return recording


def _frames_returned(runtime: GraphRuntime, process: Process, code: range, *, limit_s: float = 0.05) -> bool:
    """Whether no hooked frame will return through this session's exit routine: waited
    for a moment, since a busy thread is inside a short traced call at almost any instant
    (a long-running one keeps the region, rightly: it returns through it later)."""
    deadline = time.monotonic() + limit_s
    while runtime.frames_returning_to(process, code):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def _graph_runtime(session: Session, options: CaptureOptions) -> tuple[GraphRuntime, list[TracedSite]]:
    """The process's graph runtime (installed by the first session that needs it) with
    its hooks on the C++ runtime's calls into the unwinder in place, and the hooks of
    this session: the traced object's calls to ``__cxa_begin_catch`` and
    ``pthread_exit``. The unwinder hooks are applied in a batch of their own, before
    any frame can be hooked, and kept after the session: a frame hooked now may be
    unwound through at any time later."""
    process = session.process
    runtime = GraphRuntime.find(process) or GraphRuntime.install(session.resident)
    patches = runtime.unwinder_hook_patches(process)
    if patches:
        session.apply(patches)
        session.keep(patch.site for patch in patches)
    rehook, restore = hook_sites(process.pid, options.library)
    hooks = [TracedSite(site, StubKind.REHOOK, insn) for site, insn, _ in rehook]
    hooks += [TracedSite(site, StubKind.RESTORE, insn) for site, insn, _ in restore]
    return runtime, hooks


def _addresses(addresses: Sequence[int], most: int = 8) -> str:
    text = ", ".join(f"{a:#x}" for a in addresses[:most])
    return text + (f" and {len(addresses) - most} more" if len(addresses) > most else "")


def _file_step(writer: RecordingWriter, run: _Run, step: Callable[[], None]) -> None:
    """A write to the recording file; its OSError becomes RecordingFailed."""
    try:
        step()
    except OSError as exc:
        raise _failed(exc, writer, run, writer.records) from exc


def _failed(error: BaseException, writer: RecordingWriter, run: _Run, written: int) -> TextpokeError:
    """A TextpokeError saying the file failed, where what was written is, and that the
    target is whole (this runs after the restore)."""
    if isinstance(error, TextpokeError):
        return error
    reason = getattr(error, "strerror", None) or str(error)
    seconds = max(0, (run.end_ns or time.monotonic_ns()) - run.start_ns) / 1e9
    return RecordingFailed(
        f"cannot write {writer.partial}: {reason}; tracing stopped after {seconds:.1f} s and every site "
        f"was restored",
        hint=f"the {written:,} records written before that are in {writer.partial} "
             f"(`textpoke report {shlex.quote(writer.partial)}` reads it); free some space or pick another -o",
    )


def _apply(session: Session, tracer: Tracer, exited: Callable[[], bool]) -> bool:
    """Apply the tracer's batch; False if the target exited before or during it. Sites
    holding someone else's int3 (a debugger's breakpoint, a uprobe) are left out
    (Session.foreign_sites names them); if that is every site, ForeignTrap says so."""
    try:
        session.apply(tracer.patches, skip_foreign=True)
    except TextpokeError:
        if exited():
            return False
        raise
    return True


def _restore(session: Session, exited: Callable[[], bool]) -> bool:
    """Revert every site of the session; True if it was done (not when the target ended)."""
    if exited():
        return False
    try:
        session.revert()
    except TextpokeError:
        if not exited():
            raise
        return False
    return True


def _wait(run: _Run, options: CaptureOptions, tracer: Tracer, pipeline: Pipeline | None, *,
          exited: Callable[[], bool], stop_event: threading.Event | None,
          on_progress: Callable[[CaptureProgress], None] | None) -> None:
    """Step 6: until a stop condition; progress every PROGRESS_INTERVAL_S."""
    deadline = None if options.duration is None else run.start_ns + int(options.duration * 1e9)
    next_progress = time.monotonic_ns()
    sites = len(tracer.sites)
    while True:
        now = time.monotonic_ns()
        if on_progress is not None and now >= next_progress:
            next_progress = now + int(PROGRESS_INTERVAL_S * 1e9)
            if pipeline is not None:
                reader = pipeline.reader
                progress = CaptureProgress(seconds=(now - run.start_ns) / 1e9, records=reader.records,
                                           lost=reader.lost() + pipeline.stats.unwritten, sites=sites,
                                           written=pipeline.stats.written)
            else:
                progress = CaptureProgress(seconds=(now - run.start_ns) / 1e9,
                                           records=int(tracer.counts().sum()), lost=0, sites=sites)
            on_progress(progress)
        if deadline is not None and now >= deadline:
            run.stopped = StopReason.DURATION
            return
        if stop_event is not None and stop_event.is_set():
            run.stopped = StopReason.STOP_EVENT
            return
        if pipeline is not None and pipeline.failed.is_set():
            run.stopped = StopReason.FAILED
            return
        if exited():
            run.stopped = StopReason.EXITED
            return
        # A sleep, not stop_event.wait(): the event is set from signal handlers, which
        # run on this thread, and would deadlock on the lock a wait holds.
        time.sleep(POLL_S if deadline is None else max(0.0, min(POLL_S, (deadline - now) / 1e9)))


def capture_pid(
    pid: int,
    options: CaptureOptions,
    *,
    output: str | os.PathLike[str] | None = None,
    stop_event: threading.Event | None = None,
    on_progress: Callable[[CaptureProgress], None] | None = None,
) -> Recording:
    """Trace (or count) calls in the running process ``pid``; see :func:`_capture` for the steps.

    Stops after ``options.duration``, when ``stop_event`` is set, or when the
    process exits; every patched byte is restored before this returns (if the
    process still runs) and the process is left running, detached. The records
    go to ``output`` (a recording file) as they are drained, or to a temporary
    file when it is None; the recording returned reads them from there."""
    mode = check_options(options)
    with attach(pid) as session:
        return _capture(session, options, mode, command=command_line(pid), listing=f"textpoke sites {pid}",
                        output=output, exited=lambda: not session.process.alive(), stop_event=stop_event,
                        on_progress=on_progress)


def capture_command(
    argv: Sequence[str],
    options: CaptureOptions,
    *,
    output: str | os.PathLike[str] | None = None,
    stop_event: threading.Event | None = None,
    abandon_event: threading.Event | None = None,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[CaptureProgress], None] | None = None,
    on_traced: Callable[[Recording], None] | None = None,
    on_failure: Callable[[TextpokeError], None] | None = None,
    **popen: object,
) -> tuple[Recording, int | None]:
    """Start ``argv`` (resident part installed before its ``main``), trace it until it exits.

    Returns the recording and the program's exit status (``Popen.returncode``:
    negative for a signal). The program is held at its entry point until the
    batch is applied, so every call it makes (after its constructors) is seen,
    and a selection that matches nothing is refused before it runs an instruction
    of its own (it is killed there, never having run). ``duration`` or
    ``stop_event`` end the tracing earlier: every site is restored and the
    program runs on untraced; it is never signalled by textpoke. Then this waits
    for it to exit, unless ``abandon_event`` is set, which returns at once with
    the status None (the program keeps running). ``on_start(pid)`` is called
    once the program exists, ``on_traced(recording)`` once the recording is
    whole (before the wait). If tracing fails once the program runs (the file
    cannot be written, say), ``on_failure(error)`` is called, the program is
    waited for all the same, and then the error is raised. ``popen`` goes to
    ``subprocess.Popen``.
    """
    mode = check_options(options)
    argv = list(argv)
    proc, session = spawn(argv, hold=True, **popen)
    if on_start is not None:
        on_start(proc.pid)
    exited = lambda: proc.poll() is not None  # noqa: E731 - reaps the child when it ends
    killed = False
    try:
        with session:
            try:
                recording = _capture(session, options, mode, command=shlex.join(argv),
                                     listing=f"textpoke sites {shlex.quote(argv[0])}", output=output,
                                     exited=exited, stop_event=stop_event, on_progress=on_progress)
            except BaseException:
                if session.resident.held is not None:
                    proc.kill()  # refused before it ran: it never executes an instruction of its own
                    killed = True
                raise
    except TargetError as error:  # TargetExited, NoSuchProcess: the program ended first
        if killed or not exited():
            if killed:
                proc.wait()
            else:
                _wait_then_raise(proc, error, abandon_event, on_failure)
            raise
        recording = _empty(proc.pid, argv, mode, output)
    except TextpokeError as error:
        if killed:
            proc.wait()
            raise
        _wait_then_raise(proc, error, abandon_event, on_failure)
    except BaseException:
        if killed:
            proc.wait()
        raise
    if on_traced is not None:
        on_traced(recording)
    return recording, _wait_program(proc, abandon_event)


def _wait_program(proc: subprocess.Popen, abandon_event: threading.Event | None) -> int | None:
    """The program's exit status, or None once ``abandon_event`` is set (it runs on).
    Polled (not Event.wait): the event is set from a signal handler on this thread."""
    while proc.poll() is None:
        if abandon_event is not None and abandon_event.is_set():
            return None
        time.sleep(0.05)
    return proc.returncode


def _wait_then_raise(proc: subprocess.Popen, error: TextpokeError, abandon_event: threading.Event | None,
                     on_failure: Callable[[TextpokeError], None] | None) -> None:
    """Tracing failed after the program started: it runs on (never killed by us); say
    so at once, wait for it like a finished trace would, then raise."""
    if on_failure is not None:
        on_failure(error)
    _wait_program(proc, abandon_event)
    raise error


def _empty(pid: int, argv: Sequence[str], mode: Mode, output: str | os.PathLike[str] | None) -> Recording:
    """The recording of a program that ended before its sites could be patched."""
    now = time.monotonic_ns()
    recording = Recording(sites=(), lost=0, pid=pid, command=shlex.join(argv), start_ns=now, end_ns=now,
                          counts=np.zeros(0, dtype=np.uint64) if mode is Mode.COUNT else None, mode=mode.value,
                          metadata={"stopped": "exited before tracing started"})
    if output is not None:
        recording.save(output)
    return recording


__all__ = ["CaptureProgress", "RecordingFailed", "StopReason", "capture_command", "capture_pid"]
