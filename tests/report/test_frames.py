"""The pairing pass (report/_frames.py) against a plain per-record reference, on
random programs with every way of leaving a frame, chunked anywhere; and on
damaged recordings, which it resynchronizes and counts without crashing."""

from __future__ import annotations

import numpy as np
import pytest

from textpoke.report._frames import CUT, ENTER, EXIT, IGNORED, RESYNC, UNWOUND, FramePass, stable_order
from textpoke.report._view import RecordingView

from .synth import BASE, CALL, END, FUNCTIONS, Chunked, Frame, program, recording, records, reference


def run_pass(rec, *, slice_rows: int = 1 << 20, paths: bool = True, leaves: bool = True):
    frames = FramePass(RecordingView(rec), paths=paths, leaves=leaves, slice_rows=slice_rows)
    return frames, list(frames.chunks())


def frames_of(frames: FramePass, chunks) -> list[Frame]:
    tree = frames.tree
    names = frames.view.function_names

    def path(node: int) -> tuple[str, ...]:
        out = []
        while tree.function[node] >= 0:
            out.append(names[tree.function[node]])
            node = tree.parent[node]
        return tuple(out[::-1])

    out = []
    for c in chunks:
        for i in np.flatnonzero(c.timed).tolist():
            out.append(Frame(int(c.records["tid"][i]), names[c.function[i]], int(c.start_ns[i]),
                             int(c.records["ts_ns"][i]), int(c.self_ns[i]), int(c.records["kind"][i]),
                             path(int(c.node[i])), bool(c.nested[i])))
    return out


def random_program(seed: int, *, threads: int = 4, steps: int = 400, damage: float = 0.0) -> np.ndarray:
    """Interleaved threads each doing calls, returns, unwinds (several frames at once),
    entry-only calls and exits of frames entered before the recording; ``damage``
    drops that share of the records (a lost entry, a lost exit)."""
    rng = np.random.default_rng(seed)
    names = FUNCTIONS
    events: list[tuple[int, str, str]] = []  # (tid, kind, function) in program order per thread
    per_thread = []
    for t in range(threads):
        tid = 1000 + t
        hidden = [names[i] for i in rng.integers(0, len(names), rng.integers(0, 3))]
        stack: list[str] = []
        mine = []
        for _ in range(steps):
            r = rng.random()
            if r < 0.42 and len(stack) < 12:
                fn = names[rng.integers(0, len(names))] if rng.random() < 0.8 else (stack[-1] if stack else "fib")
                stack.append(fn)
                mine.append((tid, "E", fn))
            elif r < 0.80:
                if stack:
                    mine.append((tid, "X", stack.pop()))
                elif hidden:
                    mine.append((tid, "X", hidden.pop()))
            elif r < 0.86 and stack:
                for _ in range(rng.integers(1, len(stack) + 1)):
                    mine.append((tid, "U", stack.pop()))
            else:
                mine.append((tid, "C", names[rng.integers(0, len(names))]))
        per_thread.append(mine)
    # Interleave: pick a thread at random each step, keeping each thread's order.
    cursors = [0] * threads
    while any(c < len(p) for c, p in zip(cursors, per_thread)):
        t = int(rng.choice([i for i in range(threads) if cursors[i] < len(per_thread[i])]))
        events.append(per_thread[t][cursors[t]])
        cursors[t] += 1
    if damage:
        keep = rng.random(len(events)) >= damage
        events = [e for e, k in zip(events, keep) if k]
    gaps = rng.integers(0, 50, len(events))  # equal times happen (0 gaps)
    times = np.cumsum(gaps)
    rows = [(int(ts), tid, kind, fn) for ts, (tid, kind, fn) in zip(times, events)]
    return records(rows)


def check_against_reference(rec_array: np.ndarray, *, end: int, slice_rows: int) -> FramePass:
    rec = recording(rec_array, end=end)
    frames, chunks = run_pass(rec, slice_rows=slice_rows)
    ref = reference(rec_array, FUNCTIONS, end_ns=BASE + end)
    got = frames_of(frames, chunks)
    assert sorted(got, key=repr) == sorted(ref["frames"], key=repr)
    # orphans: closes without an entry, in order
    orphans = [(int(c.records["tid"][i]), FUNCTIONS[c.records["site"][i]], int(c.records["ts_ns"][i]))
               for c in chunks for i in np.flatnonzero(c.close & c.orphan).tolist()]
    assert orphans == ref["orphans"]
    # every row's indentation (the synthetic CUT rows aside), in time order
    indent = [int(x) for c in chunks for x, k in zip(c.indent, c.records["kind"]) if k != CUT]
    assert indent == ref["indent"]
    counts = frames.counts
    assert counts.ignored == ref["ignored"]
    assert counts.cut_start == len(ref["orphans"])
    assert counts.entry_only == len(ref["calls"])
    assert counts.enters == counts.returned + counts.unwound + counts.cut_end + counts.resynced
    by_how = {how: sum(1 for f in ref["frames"] if f.ended == how) for how in (EXIT, UNWOUND, CUT, RESYNC)}
    assert (counts.returned, counts.unwound, counts.cut_end, counts.resynced) == (
        by_how[EXIT], by_how[UNWOUND], by_how[CUT], by_how[RESYNC])
    # entry-only calls hang under the right path
    tree, names = frames.tree, frames.view.function_names

    def path(node):
        out = []
        while tree.function[node] >= 0:
            out.append(names[tree.function[node]])
            node = tree.parent[node]
        return tuple(out[::-1])

    got_calls = [(int(c.records["tid"][i]), names[c.function[i]], path(int(c.node[i])))
                 for c in chunks for i in np.flatnonzero(c.records["kind"] == CALL).tolist()]
    assert got_calls == ref["calls"]
    return frames


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("slice_rows", [1 << 20, 97, 7, 1])
def test_matches_reference(seed, slice_rows):
    rows = random_program(seed)
    frames = check_against_reference(rows, end=int(rows["ts_ns"][-1]) - BASE + 100, slice_rows=slice_rows)
    assert frames.counts.resynced == 0 and frames.counts.ignored == 0


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("slice_rows", [1 << 20, 13])
def test_damaged_recordings_resynchronize_like_the_reference(seed, slice_rows):
    rows = random_program(100 + seed, damage=0.08)
    frames = check_against_reference(rows, end=int(rows["ts_ns"][-1]) - BASE + 100, slice_rows=slice_rows)
    assert frames.counts.resynced + frames.counts.ignored > 0  # the damage was seen


def test_leaves_across_chunks():
    """An entry whose exit is its thread's next record is a leaf, also when a chunk
    boundary falls between them (the pass looks one chunk ahead)."""
    rec = program()
    whole = [bool(x) for c in run_pass(rec)[1] for x in c.leaf]
    for bound in range(1, len(rec.records)):
        chunked = [bool(x) for c in run_pass(Chunked(rec, [bound]))[1] for x in c.leaf]
        assert chunked == whole, bound
    names = [FUNCTIONS[s] for s, leaf in zip(rec.records["site"], whole) if leaf]
    # in time order; deep2 and inner end unwound, so they are not leaves
    assert names == ["lex", "work", "lex", "idle", "fib"]


def test_unknown_kinds_and_stray_exits_are_counted_not_fatal():
    rows = [(0, 1, "E", "main"), (10, 1, "X", "lex"), (20, 1, "E", "parse"), (30, 1, "X", "main"),
            (40, 1, "X", "main")]
    made = records(rows)
    made["kind"][2] = 9  # a kind no tracer writes
    rec = recording(made, end=100)
    frames, chunks = run_pass(rec)
    kinds = [int(k) for c in chunks for k in c.records["kind"]]
    # lex's exit matches no open frame (ignored); the unknown record is ignored; main's
    # exit closes main; the last exit has nothing open: entered before the recording.
    assert kinds == [ENTER, IGNORED, IGNORED, EXIT, EXIT]
    assert (frames.counts.ignored, frames.counts.returned, frames.counts.cut_start) == (2, 1, 1)


def test_exit_of_a_deeper_frame_closes_the_ones_above():
    rows = [(0, 1, "E", "main"), (10, 1, "E", "parse"), (20, 1, "E", "lex"), (50, 1, "X", "main")]
    frames, chunks = run_pass(recording(rows, end=100))
    (c,) = chunks
    assert c.records["kind"].tolist() == [ENTER, ENTER, ENTER, RESYNC, RESYNC, EXIT]
    assert [FUNCTIONS[s] for s in c.records["site"][3:]] == ["lex", "parse", "main"]
    assert c.duration[3:].tolist() == [30, 40, 50]
    assert c.self_ns[3:].tolist() == [30, 10, 10]
    assert frames.counts.resynced == 2


def test_stable_order_matches_numpy():
    rng = np.random.default_rng(5)
    for top in (3, 1 << 15, 1 << 20, 1 << 40):
        keys = rng.integers(0, top, 50_000)
        assert np.array_equal(stable_order(keys), np.argsort(keys, kind="stable"))


def test_program_frames_exactly():
    frames, chunks = run_pass(program())
    got = {(f.function, f.start - BASE, f.end - BASE, f.self_ns, f.ended, f.path) for f in frames_of(frames, chunks)}
    assert got == {
        ("main", 0, END, 2_600, CUT, ("main",)),
        ("parse", 100, 1_500, 700, EXIT, ("main", "parse")),
        ("lex", 200, 500, 300, EXIT, ("main", "parse", "lex")),
        ("lex", 600, 1_000, 400, EXIT, ("main", "parse", "lex")),
        ("fib", 2_000, 3_000, 600, EXIT, ("main", "fib")),
        ("fib", 2_100, 2_500, 300, EXIT, ("main", "fib", "fib")),
        ("fib", 2_200, 2_300, 100, EXIT, ("main", "fib", "fib", "fib")),
        ("run", 4_000, 5_000, 600, EXIT, ("main", "run")),
        ("deep1", 4_100, 4_500, 100, UNWOUND, ("main", "run", "deep1")),
        ("deep2", 4_200, 4_500, 300, UNWOUND, ("main", "run", "deep1", "deep2")),
        ("emit", 6_000, END, 4_000, CUT, ("main", "emit")),
        ("thread_fn", 100, 700, 100, UNWOUND, ("thread_fn",)),
        ("inner", 200, 700, 500, UNWOUND, ("thread_fn", "inner")),
        ("work", 300, 800, 500, EXIT, ("work",)),
        ("idle", 1_000, 9_000, 8_000, EXIT, ("idle",)),
    }
    c = frames.counts
    assert (c.enters, c.returned, c.unwound, c.cut_end, c.cut_start, c.entry_only) == (15, 9, 4, 2, 1, 1)
