"""The one pass that pairs every ENTER with the EXIT or UNWOUND that closes it, with numpy.

Every timed output that prints rows or call paths (graph, ftrace, chrome, folded,
flame graph) reads a function-graph recording through :class:`FramePass` (the tables
of times, ``report``, read the leaner ``_closes.ClosePass``), which walks the records a
chunk at a time and hands each chunk back annotated: per close its duration and
self time, per row its indentation, call-path node and, for the ftrace layout,
whether an entry and its exit print as one leaf line.  Nothing holds the
recording whole; what is carried from one chunk to the next is each thread's
stack of open frames (bounded by the traced program's stack depth).

How a chunk is paired, without a Python loop per record:

1. The thread's open frames from earlier chunks are put in front of its records
   as ENTER rows, so every thread starts the chunk at depth 0.
2. Rows are ordered by thread (a stable radix sort: each thread keeps its order).
   ENTER counts +1, a close -1: a running sum per thread gives each row's depth.
   An ENTER's *level* is the depth before it, a close's the depth after it.
3. Per (thread, level), ENTERs and closes strictly alternate, so sorting the
   events by (thread, level) and keeping each thread's order puts every close
   right after its ENTER.  A close that takes a thread below every depth it had
   reached closes a frame entered before the recording began (no ENTER: its
   start is unknown).
4. A frame's parent is the last ENTER one level lower in the same thread before
   it (the events of level l - 1 are the group just before level l's): children's
   durations are added to it (self time), and call-path nodes are interned level
   after level from the root down.
5. ENTERs still open at the end of the chunk are the thread's new carried stack.

An EXIT names its site; if it does not match the frame it closes (a damaged
file), the threads concerned are replayed one record at a time to resynchronize
(the frames above a matching one are closed as RESYNC, an exit that matches no
open frame is IGNORED), counted, and the chunk is paired again.  Frames still
open when the recording ends are closed at its end as CUT.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from ..ring.format import RECORD_DTYPE, RecordKind
from ._view import CALL, ENTER, RecordingLike, RecordingView, group

EXIT = int(RecordKind.EXIT)
UNWOUND = int(RecordKind.UNWOUND)
# Rows the pass makes itself (never in a file: the ring's kinds are small numbers).
CUT = 0x80  # a frame still open when the recording ended, closed at its end
RESYNC = 0x81  # a frame a damaged stretch left open, closed where a later exit proved it gone
IGNORED = 0x82  # a record that opens and closes nothing: an exit matching no open frame, an unknown kind
CLOSES = (EXIT, UNWOUND, CUT, RESYNC)

#: Rows per slice the pass works on (a bigger chunk is cut into slices): its
#: temporaries take a few hundred bytes per row, so this bounds the pass's memory.
SLICE = 1 << 18

#: A thread's open frame, carried from one chunk to the next.
OPEN_DTYPE = np.dtype([
    ("tid", "<u4"), ("site", "<u4"), ("ts_ns", "<i8"), ("caller", "<u8"), ("arg0", "<u8"), ("cpu", "<u2"),
    ("node", "<i8"),  # call-path node (-1 without paths)
    ("child_ns", "<i8"),  # durations of its children closed so far
    ("nested", "?"),  # a call of the same function was running below it on the thread
    ("row", "<i8"),  # its row in the chunk not yet handed out, if it was its thread's last row there
])


def is_graph_recording(recording: RecordingLike) -> bool:
    """Whether a recording has function exits (ENTER/EXIT records): its metadata
    says so, or else its first records show it."""
    flag = recording.metadata.get("graph")
    if flag is not None:
        return bool(flag)
    if recording.counts is not None:
        return False
    for chunk in recording.chunks():
        if len(chunk):
            return bool((chunk["kind"] != CALL).any())
    return False


def stable_order(keys: np.ndarray) -> np.ndarray:
    """``np.argsort(keys, kind="stable")`` for non-negative integer keys, as one or two
    16-bit radix passes when they fit (several times faster than a merge sort)."""
    n = len(keys)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if n < 2 or bool((keys[1:] >= keys[:-1]).all()):
        return np.arange(n, dtype=np.int64)
    top = int(keys.max())
    if top < 1 << 16:
        return np.argsort(keys.astype(np.uint16), kind="stable")
    if top < 1 << 32:
        low = np.argsort((keys & 0xFFFF).astype(np.uint16), kind="stable")
        high = np.argsort((keys[low] >> 16).astype(np.uint16), kind="stable")
        return low[high]
    return np.argsort(keys, kind="stable")


@dataclass
class FrameCounts:
    """How the frames of a recording ended, counted over the whole pass."""

    enters: int = 0  # ENTER records
    returned: int = 0  # closed by an EXIT
    unwound: int = 0  # closed by an UNWOUND (longjmp, exception, thread exit)
    cut_end: int = 0  # still open when the recording ended
    cut_start: int = 0  # an exit without an entry: entered before the recording began
    resynced: int = 0  # closed to resynchronize with a later exit (damaged recording)
    ignored: int = 0  # records that matched no open frame or had an unknown kind (damaged)
    entry_only: int = 0  # CALL records: calls with no exit hooked

    @property
    def timed(self) -> int:
        return self.returned + self.unwound + self.cut_end + self.resynced


class CallTree:
    """Call-path nodes: node 0 is no one; each thread has a root node; every other node
    is (parent node, function id).  Grows as new paths appear."""

    def __init__(self) -> None:
        self.parent: list[int] = [-1]
        self.function: list[int] = [-1]
        self.thread: list[int] = [-1]  # tid of a thread's root node, -1 elsewhere
        self._index: dict[int, int] = {}
        self._roots: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.parent)

    def root(self, tid: int) -> int:
        node = self._roots.get(tid)
        if node is None:
            node = self._roots[tid] = self._new(0, -1, tid)
        return node

    def _new(self, parent: int, function: int, tid: int) -> int:
        self.parent.append(parent)
        self.function.append(function)
        self.thread.append(tid)
        return len(self.parent) - 1

    def children(self, parents: np.ndarray, functions: np.ndarray, width: int) -> np.ndarray:
        """The node of each (parent, function) pair, new ones added (Python per distinct pair)."""
        keys = parents.astype(np.int64) * width + functions
        distinct = group(keys)
        index = self._index
        ids = np.empty(len(distinct.values), dtype=np.int64)
        for i, key in enumerate(distinct.values.tolist()):
            node = index.get(key)
            if node is None:
                node = index[key] = self._new(key // width, key % width, -1)
            ids[i] = node
        return ids[distinct.inverse]


@dataclass
class PairedChunk:
    """One chunk's rows in time order (RECORD_DTYPE; kinds include CUT/RESYNC/IGNORED)
    with what the pairing found.  Per-row arrays; a column means nothing on rows of
    other kinds (see each)."""

    records: np.ndarray
    function: np.ndarray  # function id (RecordingView.function_names)
    indent: np.ndarray  # nesting depth shown (a frame's ENTER and close share it)
    close: np.ndarray  # bool: EXIT, UNWOUND, CUT or RESYNC
    orphan: np.ndarray  # bool, closes: no ENTER (entered before the recording began)
    start_ns: np.ndarray  # closes: the frame's ENTER time (orphans: the recording's start)
    duration: np.ndarray  # closes, and ENTERs printed as leaves: end - start
    self_ns: np.ndarray  # closes: duration less its children's
    nested: np.ndarray  # bool, ENTERs and closes: inside a running call of the same function (recursion)
    enter_caller: np.ndarray  # closes: the ENTER's caller (return address)
    enter_arg0: np.ndarray  # closes: the ENTER's first argument
    node: np.ndarray | None  # ENTER/CALL rows and closes: call-path node (with paths)
    leaf: np.ndarray | None  # bool, ENTERs: closed by the thread's very next row (with leaves)
    folded: np.ndarray | None  # bool, closes: the exit of a leaf (printed with its ENTER)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def timed(self) -> np.ndarray:
        """Closes of frames with a known start."""
        return self.close & ~self.orphan


@dataclass
class _Sorted:
    """One slice's rows (carried frames first) ordered by thread."""

    order: np.ndarray  # S-position -> combined row (carried frames first, then the slice's)
    thread: np.ndarray  # per S-position: thread index
    tids: np.ndarray  # thread index -> tid
    kind: np.ndarray
    site: np.ndarray
    ts: np.ndarray
    seg_start: np.ndarray  # S-position where each thread's rows begin
    seg_len: np.ndarray
    combined: dict[str, np.ndarray]  # tid, caller, arg0, cpu per combined row


@dataclass
class FramePass:
    """Walk a recording's records, pairing frames; see the module docstring.

    ``paths`` interns a call-path node for every frame (graph, folded, flame graph);
    ``leaves`` finds ENTERs closed by their thread's next row, also across chunks
    (the ftrace layout; one chunk is held back to look ahead)."""

    view: RecordingView
    paths: bool = False
    leaves: bool = False
    slice_rows: int = SLICE
    counts: FrameCounts = field(default_factory=FrameCounts)
    tree: CallTree = field(default_factory=CallTree)

    def __post_init__(self) -> None:
        self._open = np.zeros(0, dtype=OPEN_DTYPE)
        self._width = len(self.view.function_names) + 1
        self._last_ns = 0

    @property
    def recording(self) -> RecordingLike:
        return self.view.recording

    def chunks(self) -> Iterator[PairedChunk]:
        pending: PairedChunk | None = None
        for chunk in self.recording.chunks():
            for lo in range(0, len(chunk), self.slice_rows):
                part = chunk[lo: lo + self.slice_rows]
                if not len(part):
                    continue
                self._last_ns = max(self._last_ns, int(part["ts_ns"][-1]))
                paired = self._pair(part, pending)
                if pending is not None:
                    yield pending
                pending = paired
                if not self.leaves:  # only leaves look a slice ahead
                    yield pending
                    pending = None
        final = self._cut_at_end()
        if len(final):
            paired = self._pair(final, pending)
            if pending is not None:
                yield pending
            pending = paired
        if pending is not None:
            yield pending

    # -- the end of the recording ----------------------------------------------------------
    @property
    def end_ns(self) -> int:
        return max(int(self.recording.end_ns), self._last_ns)

    def _cut_at_end(self) -> np.ndarray:
        return cut_at_end(self._open, self.end_ns)

    # -- one slice ---------------------------------------------------------------------------
    def _sort(self, records: np.ndarray) -> _Sorted:
        carried = self._open
        tid = np.concatenate([carried["tid"], records["tid"]])
        kind = np.concatenate([np.full(len(carried), ENTER, np.uint8), records["kind"]])
        known = (kind <= ENTER) | (kind == CUT) | (kind == RESYNC)
        if not known.all():
            kind = np.where(known, kind, IGNORED).astype(np.uint8)
        threads = group(tid)
        order = stable_order(threads.inverse)
        thread = threads.inverse[order]
        n = len(order)
        seg_start = np.flatnonzero(np.concatenate([[True], thread[1:] != thread[:-1]])) if n else np.zeros(0, np.int64)
        seg_len = np.diff(np.append(seg_start, n))
        combined = {"tid": tid}
        for name in ("caller", "arg0", "cpu"):
            combined[name] = np.concatenate([carried[name], records[name]])
        return _Sorted(
            order=order, thread=thread, tids=threads.values, kind=kind[order], combined=combined,
            site=np.concatenate([carried["site"], records["site"]])[order],
            ts=np.concatenate([carried["ts_ns"], records["ts_ns"].astype(np.int64)])[order],
            seg_start=seg_start, seg_len=seg_len,
        )

    def _pair(self, records: np.ndarray, pending: PairedChunk | None) -> PairedChunk:
        result = self._try_pair(records, pending, strict=True)
        if isinstance(result, PairedChunk):
            return result
        # A repaired slice matches by construction; pairing it by depth alone is only a
        # guard against looping on a case the replay did not foresee.
        result = self._try_pair(self._repair(records, result), pending, strict=False)
        assert isinstance(result, PairedChunk)
        return result

    def _try_pair(self, records: np.ndarray, pending: PairedChunk | None, *,
                  strict: bool) -> PairedChunk | np.ndarray:
        """Pair one slice, or (strict) return the tids whose exits do not match, to repair."""
        carried = self._open
        nc, n = len(carried), len(records)
        s = self._sort(records)
        total = nc + n
        k = s.kind
        is_enter = k == ENTER
        is_close = (k == EXIT) | (k == UNWOUND) | (k == CUT) | (k == RESYNC)
        delta = is_enter.astype(np.int64) - is_close
        seg_id = np.repeat(np.arange(len(s.seg_start), dtype=np.int64), s.seg_len)
        csum = np.cumsum(delta)
        depth_after = csum - np.repeat((csum - delta)[s.seg_start], s.seg_len)
        depth_before = depth_after - delta
        level = np.where(is_close, depth_after, depth_before)
        # A segmented running minimum (each thread's lowest depth so far, at most 0):
        # later threads are shifted far below earlier ones so the minimum restarts.
        shift = seg_id * (2 * total + 2)
        floor_after = np.minimum(np.minimum.accumulate(depth_after - shift) + shift, 0)
        floor_before = np.empty_like(floor_after)
        floor_before[1:] = floor_after[:-1]
        floor_before[s.seg_start] = 0
        orphan = is_close & (floor_after < floor_before)
        indent = level - floor_after

        # Events grouped by (thread, level), each group in the thread's order.
        events = np.flatnonzero(is_enter | is_close)
        lmin = int(level[events].min()) if len(events) else 0
        width = (int(level[events].max()) - lmin + 1) if len(events) else 1
        key = s.thread[events].astype(np.int64) * width + (level[events] - lmin)
        by_group = stable_order(key)
        ge = events[by_group]  # S-positions in group order
        gk = key[by_group]
        new_group = np.ones(len(ge), dtype=bool)
        new_group[1:] = gk[1:] != gk[:-1]
        last_in_group = np.ones(len(ge), dtype=bool)
        last_in_group[:-1] = new_group[1:]

        closes_g = np.flatnonzero(is_close[ge] & ~orphan[ge])
        partner = np.full(total, -1, dtype=np.int64)  # close -> its ENTER (S-positions)
        if len(closes_g):
            assert not new_group[closes_g].any() and is_enter[ge[closes_g - 1]].all(), "pairing out of step"
            partner[ge[closes_g]] = ge[closes_g - 1]
        close_s = ge[closes_g]
        enter_s = partner[close_s]
        mismatch = (k[close_s] == EXIT) & (s.site[close_s] != s.site[enter_s])
        if strict and mismatch.any():
            return s.tids[np.unique(s.thread[close_s[mismatch]])]

        # Parents: the last event of the group one level down (same thread) before each ENTER.
        rank = np.cumsum(new_group) - 1
        composite = rank * (total + 1) + ge
        below = np.zeros(len(ge), dtype=bool)  # the group before is this thread's level - 1
        group_start = np.flatnonzero(new_group)
        below_group = np.zeros(len(group_start), dtype=bool)
        below_group[1:] = (gk[group_start[1:]] - 1 == gk[group_start[:-1]]) & (gk[group_start[1:]] % width != 0)
        below[:] = np.repeat(below_group, np.diff(np.append(group_start, len(ge))))
        enters_g = np.flatnonzero(is_enter[ge])
        parent = np.full(total, -1, dtype=np.int64)  # ENTER/CALL -> parent ENTER (S-positions)
        query = enters_g[below[enters_g]]
        if len(query):
            at = np.searchsorted(composite, (rank[query] - 1) * (total + 1) + ge[query]) - 1
            ok = (at >= 0) & (rank[np.maximum(at, 0)] == rank[query] - 1)
            ok &= is_enter[ge[np.maximum(at, 0)]]
            parent[ge[query[ok]]] = ge[at[ok]]
        calls_s = np.flatnonzero(k == CALL)
        if len(calls_s) and len(ge):
            self._call_parents(calls_s, s, level, lmin, width, gk, group_start, composite, rank, ge, is_enter,
                               total, parent)

        # Durations, children, self time.
        dur = np.zeros(total, dtype=np.int64)
        start = np.zeros(total, dtype=np.int64)
        start[close_s] = s.ts[enter_s]
        orphans = np.flatnonzero(orphan)
        start[orphans] = self.view.time_base_ns
        closes_all = np.flatnonzero(is_close)
        dur[closes_all] = s.ts[closes_all] - start[closes_all]
        child = np.zeros(total, dtype=np.int64)
        carried_s = np.flatnonzero(s.order < nc)
        child[carried_s] = carried["child_ns"][s.order[carried_s]]
        parent_of_close = parent[enter_s]
        has_parent = parent_of_close >= 0
        np.add.at(child, parent_of_close[has_parent], dur[close_s[has_parent]])
        self_ns = np.zeros(total, dtype=np.int64)
        self_ns[close_s] = dur[close_s] - child[enter_s]

        # Recursion: ENTERs made while a call of the same function runs on the thread.
        # A close is its frame's: an UNWOUND (or a damaged exit) may name another site.
        site = s.site.copy()
        site[close_s] = s.site[enter_s]
        function = self.view.function_of_site.take(self.view.site_position(site))
        nested = np.zeros(total, dtype=bool)
        paired_ev = np.concatenate([enter_s, close_s])
        open_enters = ge[enters_g[last_in_group[enters_g]]]
        rec_ev = np.sort(np.concatenate([paired_ev, open_enters]))
        if len(rec_ev):
            rkey = s.thread[rec_ev].astype(np.int64) * self._width + function[rec_ev]
            rorder = stable_order(rkey)
            rev = rec_ev[rorder]
            rk = rkey[rorder]
            step = np.where(is_enter[rev], 1, -1)
            rc = np.cumsum(step)
            rstart = np.flatnonzero(np.concatenate([[True], rk[1:] != rk[:-1]]))
            rlen = np.diff(np.append(rstart, len(rev)))
            running_before = rc - step - np.repeat((rc - step)[rstart], rlen)
            entering = is_enter[rev]
            nested[rev[entering]] = running_before[entering] > 0
        nested[carried_s] = carried["nested"][s.order[carried_s]]
        nested[close_s] = nested[enter_s]

        # Call-path nodes, level after level from the root down.
        node = None
        if self.paths:
            node = self._nodes(s, carried, carried_s, is_enter, k, level, parent, function)
            node[close_s] = node[enter_s]

        # Leaves: an ENTER whose close is its thread's very next row.
        leaf = folded = None
        if self.leaves:
            leaf = np.zeros(total, dtype=bool)
            folded = np.zeros(total, dtype=bool)
            adjacent = (enter_s == close_s - 1) & (k[close_s] == EXIT)
            fresh = adjacent & (s.order[enter_s] >= nc)
            leaf[enter_s[fresh]] = True
            folded[close_s[fresh]] = True
            dur[enter_s[fresh]] = dur[close_s[fresh]]
            late = adjacent & (s.order[enter_s] < nc)
            if late.any() and pending is not None:
                rows = carried["row"][s.order[enter_s[late]]]
                ok = rows >= 0
                assert pending.leaf is not None and pending.folded is not None
                pending.leaf[rows[ok]] = True
                pending.duration[rows[ok]] = dur[close_s[late][ok]]
                folded[close_s[late][ok]] = True

        self._carry(s, open_enters, child, nested, node, nc)
        self._count(k, is_enter, orphan, nc)

        # Back to time order, without the carried rows.
        rows = np.empty(n, dtype=np.int64)  # time row -> S-position
        mine = s.order >= nc
        rows[s.order[mine] - nc] = np.flatnonzero(mine)
        caller = s.combined["caller"][s.order]
        arg0 = s.combined["arg0"][s.order]
        enter_caller = np.zeros(total, dtype=np.uint64)
        enter_arg0 = np.zeros(total, dtype=np.uint64)
        enter_caller[close_s] = caller[enter_s]
        enter_arg0[close_s] = arg0[enter_s]
        out = records.copy()
        out["kind"] = k[rows]
        out["site"] = site[rows]
        return PairedChunk(
            records=out, function=function[rows], indent=indent[rows], close=is_close[rows], orphan=orphan[rows],
            start_ns=start[rows], duration=dur[rows], self_ns=self_ns[rows], nested=nested[rows],
            enter_caller=enter_caller[rows], enter_arg0=enter_arg0[rows],
            node=None if node is None else node[rows],
            leaf=None if leaf is None else leaf[rows], folded=None if folded is None else folded[rows],
        )

    def _call_parents(self, calls_s: np.ndarray, s: _Sorted, level: np.ndarray, lmin: int, width: int,
                      gk: np.ndarray, group_start: np.ndarray, composite: np.ndarray, rank: np.ndarray,
                      ge: np.ndarray, is_enter: np.ndarray, total: int, parent: np.ndarray) -> None:
        """Parents of CALL rows (entry-only calls): the last ENTER one level down."""
        want = level[calls_s] - 1
        inside = want >= lmin
        target = s.thread[calls_s].astype(np.int64) * width + (want - lmin)
        group_keys = gk[group_start]
        g = np.searchsorted(group_keys, target)
        inside &= g < len(group_keys)
        g = np.minimum(g, len(group_keys) - 1)
        inside &= group_keys[g] == target
        at = np.searchsorted(composite, rank[group_start[g]] * (total + 1) + calls_s) - 1
        at_c = np.maximum(at, 0)
        inside &= (at >= 0) & (rank[at_c] == rank[group_start[g]]) & is_enter[ge[at_c]]
        parent[calls_s[inside]] = ge[at[inside]]

    def _nodes(self, s: _Sorted, carried: np.ndarray, carried_s: np.ndarray, is_enter: np.ndarray, k: np.ndarray,
               level: np.ndarray, parent: np.ndarray, function: np.ndarray) -> np.ndarray:
        node = np.full(len(k), -1, dtype=np.int64)
        node[carried_s] = carried["node"][s.order[carried_s]]
        fresh = np.flatnonzero((is_enter | (k == CALL)) & (node < 0))
        if not len(fresh):
            return node
        # Each thread's root node (frames whose parent is not in the recording hang there).
        roots = np.array([self.tree.root(t) for t in s.tids.tolist()], dtype=np.int64)
        lv = level[fresh]
        by_level = fresh[stable_order(lv - lv.min())]
        lv = level[by_level]
        bounds = np.flatnonzero(np.concatenate([[True], lv[1:] != lv[:-1], [True]]))
        for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            rows = by_level[lo:hi]
            up = parent[rows]
            parents = np.where(up >= 0, node[np.maximum(up, 0)], roots[s.thread[rows]])
            node[rows] = self.tree.children(parents, function[rows], self._width)
        return node

    def _carry(self, s: _Sorted, open_enters: np.ndarray, child: np.ndarray, nested: np.ndarray,
               node: np.ndarray | None, nc: int) -> None:
        """The frames still open become the carried stacks (thread order, outermost first)."""
        opened = np.sort(open_enters)  # S-order: by thread, then entry order (outermost first)
        new = np.zeros(len(opened), dtype=OPEN_DTYPE)
        src = s.order[opened]
        from_carried = src < nc
        for name in ("tid", "caller", "arg0", "cpu"):
            new[name] = s.combined[name][src]
        new["site"] = s.site[opened]
        new["ts_ns"] = s.ts[opened]
        new["node"] = -1 if node is None else node[opened]
        new["child_ns"] = child[opened]
        new["nested"] = nested[opened]
        seg_end = np.repeat(s.seg_start + s.seg_len - 1, s.seg_len)
        last = (opened == seg_end[opened]) & ~from_carried
        new["row"] = np.where(last, src - nc, -1)
        self._open = new

    def _count(self, k: np.ndarray, is_enter: np.ndarray, orphan: np.ndarray, nc: int) -> None:
        c = self.counts
        c.enters += int(is_enter.sum()) - nc
        c.returned += int((k == EXIT).sum() - (orphan & (k == EXIT)).sum())
        c.unwound += int((k == UNWOUND).sum() - (orphan & (k == UNWOUND)).sum())
        c.cut_end += int((k == CUT).sum())
        c.resynced += int((k == RESYNC).sum())
        c.cut_start += int(orphan.sum())
        c.ignored += int((k == IGNORED).sum())
        c.entry_only += int((k == CALL).sum())

    # -- damaged recordings ------------------------------------------------------------------
    def _repair(self, records: np.ndarray, tids: np.ndarray) -> np.ndarray:
        return repair(records, tids, self._open)


def cut_at_end(frames: np.ndarray, end_ns: int) -> np.ndarray:
    """A CUT close for every frame still open (``frames``: a pass's carried frames, by
    thread, outermost first), innermost first in each thread."""
    out = np.zeros(len(frames), dtype=RECORD_DTYPE)
    if not len(frames):
        return out
    # Carried frames are ordered by thread, outermost first: reverse within each thread.
    order = np.lexsort((-np.arange(len(frames)), frames["tid"]))
    frames = frames[order]
    out["ts_ns"] = np.maximum(end_ns, frames["ts_ns"]).astype(np.uint64)
    out["tid"] = frames["tid"]
    out["site"] = frames["site"]
    out["cpu"] = frames["cpu"]
    out["kind"] = CUT
    return out


def repair(records: np.ndarray, tids: np.ndarray, carried: np.ndarray) -> np.ndarray:
    """Replay the threads whose exits did not match, one record at a time: an exit of
    a frame deeper in the stack closes the frames above it (RESYNC rows inserted before
    it); an exit of no open frame is IGNORED.  ``carried``: the frames open before
    ``records`` (``tid`` and ``site`` fields; by thread, outermost first)."""
    kinds = records["kind"].copy()
    inserts: list[tuple[int, np.ndarray]] = []
    for tid in tids.tolist():
        stack = carried["site"][carried["tid"] == tid].tolist()
        for i in np.flatnonzero(records["tid"] == tid).tolist():
            kind, site = int(kinds[i]), int(records["site"][i])
            if kind == ENTER:
                stack.append(site)
            elif kind in (UNWOUND, CUT, RESYNC):
                if stack:
                    stack.pop()
            elif kind == EXIT:
                if not stack:
                    continue  # entered before the recording began: a legitimate orphan
                if stack[-1] == site:
                    stack.pop()
                elif site in stack:
                    depth = len(stack) - 1 - stack[::-1].index(site)
                    rows = np.repeat(records[i: i + 1], len(stack) - 1 - depth)
                    rows["kind"] = RESYNC
                    rows["site"] = stack[depth + 1:][::-1]
                    rows["caller"] = 0
                    rows["arg0"] = 0
                    inserts.append((i, rows))
                    del stack[depth:]
                else:
                    kinds[i] = IGNORED
    out = records.copy()
    out["kind"] = kinds
    if inserts:
        inserts.sort(key=lambda item: item[0])
        at = np.concatenate([np.full(len(rows), i) for i, rows in inserts])
        out = np.insert(out, at, np.concatenate([rows for _, rows in inserts]))
    return out
