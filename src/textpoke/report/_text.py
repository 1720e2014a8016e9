"""Text helpers the timed outputs share: durations, the frames header, aligned columns."""

from __future__ import annotations

from typing import Any

from ._frames import FrameCounts
from ._view import RecordingLike, RecordingView

_KIND_ORDER = {"fentry": 0, "call": 1, "jmp": 2}


def site_kinds(view: RecordingView) -> tuple[tuple[str, int], ...]:
    """(kind, sites of that kind), fentry first."""
    kinds: dict[str, int] = {}
    for site in view.sites:
        kinds[site.kind] = kinds.get(site.kind, 0) + 1
    return tuple(sorted(kinds.items(), key=lambda kv: (_KIND_ORDER.get(kv[0], len(_KIND_ORDER)), kv[0])))


def plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def duration_text(ns: int) -> str:
    """A duration the way uftrace prints one: ns below a microsecond, else three
    decimals of the largest unit that keeps the number at least 1 (us, ms, s)."""
    if ns < 1000:
        return f"{ns} ns"
    for unit, scale in (("us", 1_000), ("ms", 1_000_000)):
        if ns < scale * 1000:
            return f"{ns / scale:.3f} {unit}"
    return f"{ns / 1e9:.3f} s"


def columns(header: tuple[str, ...], rows: list[tuple[str, ...]], right: int) -> list[str]:
    """Align ``rows`` under ``header``: the first ``right`` columns right-aligned
    (numbers), the rest left-aligned; the last column is never padded."""
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    lines = []
    for row in (header, *rows):
        cells = [cell.rjust(w) if i < right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append(("  " + "  ".join(cells)).rstrip())
    return lines


def frame_lines(counts: FrameCounts, metadata: dict[str, Any]) -> list[str]:
    """What a reader must know about how the frames ended before trusting a time."""
    c = counts
    parts = [f"{c.returned:,} returned"]
    if c.unwound:
        parts.append(f"{c.unwound:,} unwound")
    if c.cut_end:
        parts.append(f"{c.cut_end:,} cut off by the end")
    if c.cut_start:
        parts.append(f"{c.cut_start:,} cut off by the start")
    if c.resynced:
        parts.append(f"{c.resynced:,} closed to resynchronize")
    lines = [f"frames: {c.enters + c.cut_start:,} (" + ", ".join(parts) + ")"
             + (f"; {plural(c.entry_only, 'call')} entry-only" if c.entry_only else "")]
    if c.unwound:
        lines.append("  unwound: left without a return (longjmp, exception, thread exit); timed to when the "
                     "tracer saw it: an upper bound")
    if c.cut_end:
        lines.append("  cut off by the end: still running when the recording ended; timed to its end: a lower bound")
    if c.cut_start:
        lines.append("  cut off by the start: running when the recording began (an exit, no entry); not timed")
    full = int(metadata.get("shadow_full") or 0)
    if c.entry_only or full:
        why = f"a shadow stack was full {plural(full, 'time')}" if full else "no exit was hooked"
        lines.append(f"  entry-only: calls recorded without their exit ({why}, or call sites): counted, not timed")
    if c.resynced or c.ignored:
        lines.append(f"  DAMAGED: exits that did not match their thread's open frames: {c.resynced:,} frames closed "
                     f"to resynchronize (timed to that exit), {c.ignored:,} records ignored")
    return lines


def recording_head(recording: RecordingLike, *, records: int, site_kinds: tuple[tuple[str, int], ...]) -> list[str]:
    """The first two lines every report starts with (pid, command; duration, records, sites)."""
    kinds = ", ".join(f"{n:,} {kind}" for kind, n in site_kinds)
    sites = sum(n for _, n in site_kinds)
    seconds = max(0, int(recording.end_ns) - int(recording.start_ns)) / 1e9
    return [
        f"pid {recording.pid}  command {recording.command}",
        f"duration {seconds:.3f} s, {plural(records, 'record')}, {int(recording.lost):,} lost, "
        f"{plural(sites, 'site')}" + (f" ({kinds})" if kinds else ""),
    ]
