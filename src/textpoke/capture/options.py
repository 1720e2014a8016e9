"""What a capture is asked to do: :class:`CaptureOptions`, checked before anything runs."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .._errors import UsageError
from ..trampolines.tracer import DEFAULT_RING_RECORDS, Mode

#: The whole ring must fit within rel32 reach of the sites, with room to spare.
MAX_RING_RECORDS = 1 << 25
#: How long a traced thread whose buffer is full waits for the reader before it
#: drops a record (lossless mode): long enough for a reader starved of CPU on a
#: loaded machine, short enough that a stopped textpoke never hangs the program
#: for long (a killed one ends the waits at once: trampolines.tracer).
DEFAULT_WAIT_S = 2.0


class Overflow(enum.Enum):
    """What a traced thread does when its buffer is full."""

    WAIT = "wait"  # lossless (the default): wait for the reader, up to wait_s
    DROP = "drop"  # never wait: count the record as lost (latency-critical processes)


@dataclass(frozen=True)
class CaptureOptions:
    """What to trace and how; see :func:`textpoke.capture.capture_pid`."""

    functions: tuple[str, ...] = ()  # fnmatch globs over fentry function names ("" -> all fentry sites);
    #                                  with calls_to: the functions whose call sites count
    calls_to: tuple[str, ...] = ()  # globs over callee names (malloc matches malloc@plt): call-site mode
    mode: str = "trace"  # "trace" | "count"
    ring_records: int = DEFAULT_RING_RECORDS  # total capacity in records, at least (see RingGeometry)
    duration: float | None = None  # seconds; None: until stop_event is set or the target exits
    library: str | None = None  # object to take sites from (default main executable)
    overflow: Overflow = Overflow.WAIT
    wait_s: float = DEFAULT_WAIT_S  # Overflow.WAIT: the longest a thread waits for the reader
    compress: bool = True  # zstd-compress the file's record chunks
    entry_only: bool = False  # fentry sites: record entries only (no exits, durations or call graph)


def check_options(options: CaptureOptions) -> Mode:
    """The tracer mode, or a UsageError naming what is wrong (nothing has run yet)."""
    if not isinstance(options, CaptureOptions):
        raise UsageError(f"options must be CaptureOptions, not {type(options).__name__}")
    try:
        mode = Mode(options.mode)
    except ValueError:
        raise UsageError(f"unknown capture mode {options.mode!r}", hint="use 'trace' or 'count'") from None
    if not 16 <= options.ring_records <= MAX_RING_RECORDS:
        raise UsageError(f"ring of {options.ring_records} records: give between 16 and {MAX_RING_RECORDS}",
                         hint="the default is 768k records (24 MiB, mapped in the target)")
    if options.duration is not None and not options.duration > 0:
        raise UsageError(f"duration must be positive, not {options.duration}")
    if not isinstance(options.overflow, Overflow):
        raise UsageError(f"overflow must be an Overflow, not {options.overflow!r}")
    if not options.wait_s > 0:
        raise UsageError(f"the wait limit must be positive, not {options.wait_s}")
    return mode


__all__ = ["CaptureOptions", "DEFAULT_WAIT_S", "MAX_RING_RECORDS", "Overflow", "check_options"]
