"""Synthetic function-graph recordings whose every number is known, and a plain
Python reference the vectorized pass is compared with."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from textpoke.report._frames import CUT, ENTER, EXIT, RESYNC, UNWOUND
from textpoke.ring import RECORD_DTYPE, Recording, SiteInfo, Symbols, ThreadInfo

CALL = 0
KINDS = {"E": ENTER, "X": EXIT, "U": UNWOUND, "C": CALL}
BASE = 1_000_000_000  # the recordings' start_ns: times below are relative to it

FUNCTIONS = ("main", "parse", "lex", "fib", "run", "deep1", "deep2", "emit", "work", "worker_loop", "idle",
             "thread_fn", "inner", "never")


def sites(functions: Sequence[str] = FUNCTIONS) -> tuple[SiteInfo, ...]:
    return tuple(SiteInfo(i, 0x401000 + 0x100 * i, "fentry", name, None) for i, name in enumerate(functions))


def symbols(functions: Sequence[str] = FUNCTIONS) -> Symbols:
    return Symbols.from_ranges((0x401000 + 0x100 * i, 0x401100 + 0x100 * i, name) for i, name in enumerate(functions))


def records(rows: Sequence[tuple[int, int, str, str]], *, functions: Sequence[str] = FUNCTIONS) -> np.ndarray:
    """Records from (relative ts, tid, kind letter E/X/U/C, function) rows.

    Each record's caller is an address inside the function that called it (the
    thread's enclosing frame; 0x400000 for an outermost one), arg0 the row's index,
    cpu the tid modulo 7."""
    index = {name: i for i, name in enumerate(functions)}
    out = np.zeros(len(rows), dtype=RECORD_DTYPE)
    stacks: dict[int, list[str]] = {}
    for i, (ts, tid, kind, name) in enumerate(rows):
        stack = stacks.setdefault(tid, [])
        caller = 0x401000 + 0x100 * index[stack[-1]] + 0x10 if stack else 0x400000
        if kind == "E":
            stack.append(name)
        elif kind in "XU" and stack and stack[-1] == name:
            stack.pop()
        out[i] = (BASE + ts, tid, index[name], caller, i, tid % 7, KINDS[kind], b"")
    return out


def recording(rows: Sequence[tuple[int, int, str, str]] | np.ndarray, *, end: int,
              functions: Sequence[str] = FUNCTIONS, metadata: dict | None = None, **fields) -> Recording:
    """A function-graph recording of ``rows`` (see :func:`records`, or records already made)."""
    fields.setdefault("lost", 0)
    made = rows if isinstance(rows, np.ndarray) else records(rows, functions=functions)
    return Recording(records=made, sites=sites(functions), pid=100,
                     command="./prog -v", start_ns=BASE, end_ns=BASE + end, symbols=symbols(functions),
                     metadata={"graph": True, **(metadata or {})}, **fields)


class Chunked:
    """A recording whose records come in the chunks given (boundaries as row indexes)."""

    def __init__(self, recording: Recording, bounds: Sequence[int]) -> None:
        self._recording = recording
        self._bounds = list(bounds)

    def __getattr__(self, name: str):
        return getattr(self._recording, name)

    def chunks(self, *, merged: bool = True) -> Iterator[np.ndarray]:  # in time order: merged or not
        for part in np.split(self._recording.records, self._bounds):
            if len(part):
                yield part


# -- the program every exact test reads ------------------------------------------------------
#: Thread 100: main (cut off by the end) calls parse (lex twice), fib recursing
#: 3 deep, run whose deep1 -> deep2 are left by a longjmp, and emit (cut off by
#: the end) with an entry-only call of lex.  Thread 200 was inside worker_loop
#: when the recording began (its exit has no entry).  Thread 300 exits inside
#: thread_fn -> inner (both unwound).
PROGRAM = [
    (0, 100, "E", "main"),
    (100, 100, "E", "parse"),
    (100, 300, "E", "thread_fn"),
    (200, 100, "E", "lex"),
    (200, 300, "E", "inner"),
    (300, 200, "E", "work"),
    (500, 100, "X", "lex"),
    (600, 100, "E", "lex"),
    (700, 300, "U", "inner"),
    (700, 300, "U", "thread_fn"),
    (800, 200, "X", "work"),
    (900, 200, "X", "worker_loop"),
    (1000, 100, "X", "lex"),
    (1000, 200, "E", "idle"),
    (1500, 100, "X", "parse"),
    (2000, 100, "E", "fib"),
    (2100, 100, "E", "fib"),
    (2200, 100, "E", "fib"),
    (2300, 100, "X", "fib"),
    (2500, 100, "X", "fib"),
    (3000, 100, "X", "fib"),
    (4000, 100, "E", "run"),
    (4100, 100, "E", "deep1"),
    (4200, 100, "E", "deep2"),
    (4500, 100, "U", "deep2"),
    (4500, 100, "U", "deep1"),
    (5000, 100, "X", "run"),
    (6000, 100, "E", "emit"),
    (6500, 100, "C", "lex"),
    (9000, 200, "X", "idle"),
]
END = 10_000


def program(**fields) -> Recording:
    threads = {100: ThreadInfo(100, "prog"), 200: ThreadInfo(100, "worker"), 300: ThreadInfo(100, "short")}
    fields.setdefault("threads", threads)
    fields.setdefault("metadata", {"shadow_full": 1})
    return recording(PROGRAM, end=END, **fields)


@dataclass(frozen=True)
class Expected:
    """A function's row: calls, timed frames, total, self, avg, min, max, notes."""

    calls: int
    frames: int
    total: int
    self: int
    avg: int | None
    min: int | None
    max: int | None
    notes: str = ""


#: In the report's default order: most total time first, ties by name.
EXPECTED = {
    "main": Expected(1, 1, 10_000, 2_600, 10_000, 10_000, 10_000, "1 cut off by the end"),
    "idle": Expected(1, 1, 8_000, 8_000, 8_000, 8_000, 8_000),
    "emit": Expected(1, 1, 4_000, 4_000, 4_000, 4_000, 4_000, "1 cut off by the end"),
    "parse": Expected(1, 1, 1_400, 700, 1_400, 1_400, 1_400),
    "fib": Expected(3, 3, 1_000, 1_000, 500, 100, 1_000),
    "run": Expected(1, 1, 1_000, 600, 1_000, 1_000, 1_000),
    "lex": Expected(3, 2, 700, 700, 350, 300, 400, "1 entry-only"),
    "thread_fn": Expected(1, 1, 600, 100, 600, 600, 600, "1 unwound"),
    "inner": Expected(1, 1, 500, 500, 500, 500, 500, "1 unwound"),
    "work": Expected(1, 1, 500, 500, 500, 500, 500),
    "deep1": Expected(1, 1, 400, 100, 400, 400, 400, "1 unwound"),
    "deep2": Expected(1, 1, 300, 300, 300, 300, 300, "1 unwound"),
    "worker_loop": Expected(0, 0, 0, 0, None, None, None, "1 cut off by the start"),
}


# -- the reference: one record at a time ------------------------------------------------------
@dataclass(frozen=True)
class Frame:
    tid: int
    function: str
    start: int  # absolute ns
    end: int
    self_ns: int
    ended: int  # EXIT, UNWOUND, CUT or RESYNC
    path: tuple[str, ...]
    nested: bool


def reference(rows: np.ndarray, names: Sequence[str], *, end_ns: int) -> dict[str, object]:
    """Pair ``rows`` (RECORD_DTYPE, site id = index into ``names``) the obvious way, with
    the pass's rules for damage: an exit of a frame deeper in the stack closes the ones
    above it (RESYNC), an exit of no open frame is ignored, with none open it is an orphan."""
    stacks: dict[int, list[list]] = {}
    frames: list[Frame] = []
    orphans: list[tuple[int, str, int]] = []
    calls: list[tuple[int, str, tuple[str, ...]]] = []
    ignored = 0
    indent: list[int] = []

    def close(tid: int, ts: int, how: int) -> None:
        stack = stacks[tid]
        fn, start, child, path, nested = stack.pop()
        if stack:
            stack[-1][2] += ts - start
        frames.append(Frame(tid, fn, start, ts, ts - start - child, how, path, nested))

    last = 0
    for row in rows:
        ts, tid, kind, fn = int(row["ts_ns"]), int(row["tid"]), int(row["kind"]), names[int(row["site"])]
        last = max(last, ts)
        stack = stacks.setdefault(tid, [])
        if kind == ENTER:
            indent.append(len(stack))
            path = (stack[-1][3] if stack else ()) + (fn,)
            stack.append([fn, ts, 0, path, any(f[0] == fn for f in stack)])
        elif kind == CALL:
            indent.append(len(stack))
            calls.append((tid, fn, (stack[-1][3] if stack else ()) + (fn,)))
        elif kind in (EXIT, UNWOUND):
            if not stack:
                orphans.append((tid, fn, ts))
                indent.append(0)
            elif kind == UNWOUND or stack[-1][0] == fn:
                close(tid, ts, kind)
                indent.append(len(stack))
            elif any(f[0] == fn for f in stack):
                while stack[-1][0] != fn:
                    indent.append(len(stack) - 1)
                    close(tid, ts, RESYNC)
                close(tid, ts, kind)
                indent.append(len(stack))
            else:
                ignored += 1
                indent.append(len(stack))
    end = max(end_ns, last)
    for tid, stack in stacks.items():
        while stack:
            close(tid, max(end, stack[-1][1]), CUT)
    return {"frames": frames, "orphans": orphans, "calls": calls, "ignored": ignored, "indent": indent}


# -- a big one, in closed form -----------------------------------------------------------------
BIG_FUNCTIONS = ("main", "a", "b", "c")


def big_program(threads: int, iterations: int) -> tuple[Recording, int]:
    """Each thread runs main (cut off by the end) looping ``iterations`` times over
    a() { b(); c(); }: a lasts 90 ns, b 5 + i % 7 ns, c 20 + t % 3 ns (thread t,
    iteration i).  Iteration i of thread t starts at 1000 + 100 i + t ns; thread t
    runs on CPU t.  Returns the recording and its end (relative ns)."""
    t = np.arange(threads, dtype=np.int64)[:, None]
    i = np.arange(iterations, dtype=np.int64)[None, :]
    start = 1000 + 100 * i + t
    b_dur = 5 + i % 7 + 0 * t
    c_dur = 20 + t % 3 + 0 * i
    # per iteration: a E, b E, b X, c E, c X, a X
    times = np.stack([start, start + 10, start + 10 + b_dur, start + 40, start + 40 + c_dur, start + 90], axis=-1)
    sites = np.array([1, 2, 2, 3, 3, 1], dtype=np.uint32)
    kinds = np.array([ENTER, ENTER, EXIT, ENTER, EXIT, EXIT], dtype=np.uint8)
    n = threads * (iterations * 6 + 1)
    out = np.zeros(n, dtype=RECORD_DTYPE)
    body = threads * iterations * 6
    out["ts_ns"][:body] = (BASE + times).reshape(-1)
    out["tid"][:body] = np.repeat(1000 + np.arange(threads), iterations * 6)
    out["site"][:body] = np.tile(sites, threads * iterations)
    out["kind"][:body] = np.tile(kinds, threads * iterations)
    out["ts_ns"][body:] = BASE + np.arange(threads)  # main's entries (sorted below)
    out["tid"][body:] = 1000 + np.arange(threads)
    out["site"][body:] = 0
    out["kind"][body:] = ENTER
    out["cpu"] = out["tid"] - 1000
    out["caller"] = 0x400000
    out = out[np.lexsort((np.arange(n), out["ts_ns"]))]  # time order, each thread's order kept
    end = 1000 + 100 * iterations + 50
    rec = Recording(records=out, sites=sites_of(BIG_FUNCTIONS), lost=0, pid=1000, command="./big", start_ns=BASE,
                    end_ns=BASE + end, symbols=symbols(BIG_FUNCTIONS), metadata={"graph": True})
    return rec, end


def sites_of(functions: Sequence[str]) -> tuple[SiteInfo, ...]:
    return sites(functions)
