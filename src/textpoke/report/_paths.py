"""Time per call path: the tree ``graph``, ``folded`` and the flame graph are drawn from.

:class:`PathTimes` adds up, per call-path node of the pass (see ``_frames``),
calls, timed frames, total and self time, chunk after chunk.  Its nodes are
per thread (each thread has a root); :meth:`PathTimes.tree` merges them into
the tree an output shows: threads merged or kept apart, optionally rooted at
one function (every path through it merged at it, as ``uftrace graph FUNC``).
Trees are small (one node per distinct call path), so merging is plain Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._frames import CALL, CUT, ENTER, UNWOUND, FrameCounts, FramePass, PairedChunk
from ._view import RecordingLike, RecordingView

_COLUMNS = ("calls", "frames", "total", "self", "entry_only", "unwound", "cut_end")


@dataclass
class Tree:
    """A tree to show: node 0 is the root (no function); ``label`` names each node."""

    label: list[str]
    parent: list[int]
    stats: np.ndarray  # (len(_COLUMNS), nodes) int64
    threads: frozenset[int] = frozenset()  # nodes that stand for a thread (trees kept apart)
    children: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.children = [[] for _ in self.label]
        for node, up in enumerate(self.parent):
            if up >= 0:
                self.children[up].append(node)

    def value(self, name: str, node: int) -> int:
        return int(self.stats[_COLUMNS.index(name), node])

    def ordered_children(self, node: int) -> list[int]:
        """Most total time first, then most calls, then by name."""
        total, calls = self.stats[2], self.stats[0]
        return sorted(self.children[node], key=lambda c: (-int(total[c]), -int(calls[c]), self.label[c]))

    def path(self, node: int) -> list[str]:
        names = []
        while node > 0:
            names.append(self.label[node])
            node = self.parent[node]
        return names[::-1]

    def walk(self, *, depth: int | None = None) -> list[tuple[int, int]]:
        """(node, depth) in depth-first order below the root, children most time first."""
        out: list[tuple[int, int]] = []
        stack = [(c, 1) for c in reversed(self.ordered_children(0))]
        while stack:
            node, d = stack.pop()
            out.append((node, d))
            if depth is None or d < depth:
                stack.extend((c, d + 1) for c in reversed(self.ordered_children(node)))
        return out


@dataclass(frozen=True)
class Backtrace:
    """One distinct path from a thread's root to a call of the rooting function."""

    path: tuple[str, ...]  # outermost first, the function itself last
    calls: int
    frames: int  # calls with a time
    total_ns: int


class PathTimes:
    """Per call-path node of one pass: calls, timed frames, total and self time."""

    def __init__(self, recording: RecordingLike) -> None:
        self.view = RecordingView(recording)
        self.frames = FramePass(self.view, paths=True)
        self.stats = np.zeros((len(_COLUMNS), 0), dtype=np.int64)
        self.records = 0

    @property
    def counts(self) -> FrameCounts:
        return self.frames.counts

    def collect(self) -> PathTimes:
        for chunk in self.frames.chunks():
            self.add(chunk)
        return self

    def add(self, chunk: PairedChunk) -> None:
        nodes = len(self.frames.tree)
        if self.stats.shape[1] < nodes:
            grown = np.zeros((len(_COLUMNS), max(nodes, 2 * self.stats.shape[1])), dtype=np.int64)
            grown[:, : self.stats.shape[1]] = self.stats
            self.stats = grown
        s = self.stats
        kind = chunk.records["kind"]
        node = chunk.node
        assert node is not None  # a pass with paths
        timed = chunk.timed
        np.add.at(s[0], node[(kind == ENTER) | (kind == CALL)], 1)
        np.add.at(s[1], node[timed], 1)
        np.add.at(s[2], node[timed], chunk.duration[timed])
        np.add.at(s[3], node[timed], chunk.self_ns[timed])
        np.add.at(s[4], node[kind == CALL], 1)
        np.add.at(s[5], node[timed & (kind == UNWOUND)], 1)
        np.add.at(s[6], node[timed & (kind == CUT)], 1)

    # -- trees to show -------------------------------------------------------------------
    def tree(self, *, threads: bool = False, function: str | None = None) -> tuple[Tree, list[Backtrace]]:
        """The tree an output shows (see the module docstring) and, rooted at a
        function, the distinct paths that lead to it (most time first)."""
        source = self.frames.tree
        names = self.view.function_names
        n = len(source)
        stats = self.stats[:, :n] if self.stats.shape[1] >= n else np.pad(
            self.stats, ((0, 0), (0, n - self.stats.shape[1])))
        target = None
        if function is not None:
            target = names.index(function) if function in names else -2
        label: list[str] = [""]
        parent: list[int] = [-1]
        index: dict[tuple[int, object], int] = {}

        def intern(up: int, key: object, text: str) -> int:
            got = index.get((up, key))
            if got is None:
                got = index[(up, key)] = len(label)
                label.append(text)
                parent.append(up)
            return got

        mapped = [-1] * n  # source node -> shown node (-1: not shown)
        inside = [False] * n  # below a call of the rooting function
        thread_of = [0] * n  # source node -> its thread's tid
        paths: dict[tuple[str, ...], list[int]] = {}

        def top(tid: int) -> int:
            """Where a tree starts: the root, or with threads the thread's own node."""
            return intern(0, ("thread", tid), self.view.thread_label(tid)) if threads else 0

        for node in range(1, n):
            up = source.parent[node]
            fn = source.function[node]
            if fn < 0:  # a thread's root
                thread_of[node] = source.thread[node]
                if target is None:
                    mapped[node] = top(thread_of[node])
                continue
            thread_of[node] = thread_of[up]
            if target is None or inside[up]:
                inside[node] = target is not None
                mapped[node] = intern(mapped[up], fn, names[fn])
            elif fn == target:
                inside[node] = True
                mapped[node] = intern(top(thread_of[node]), fn, names[fn])
                acc = paths.setdefault(self._trail(node), [0, 0, 0])
                acc[0] += int(stats[0, node])
                acc[1] += int(stats[1, node])
                acc[2] += int(stats[2, node])
        out = np.zeros((len(_COLUMNS), len(label)), dtype=np.int64)
        keep = np.array([m >= 0 for m in mapped], dtype=bool)
        keep[0] = False
        idx = np.array(mapped, dtype=np.int64)
        for row in range(len(_COLUMNS)):
            np.add.at(out[row], idx[keep], stats[row, keep])
        out[:, 0] = 0
        thread_nodes = frozenset(node for key, node in index.items() if isinstance(key[1], tuple))
        if thread_nodes:  # a thread's time: its outermost frames'
            ups = np.array(parent, dtype=np.int64)
            below = np.isin(ups, np.fromiter(thread_nodes, dtype=np.int64))
            np.add.at(out[2], ups[below], out[2][below])
        backtraces = sorted((Backtrace(path=p, calls=c, frames=f, total_ns=t) for p, (c, f, t) in paths.items()),
                            key=lambda b: (-b.total_ns, -b.calls, b.path))
        return Tree(label=label, parent=parent, stats=out, threads=thread_nodes), backtraces

    def _trail(self, node: int) -> tuple[str, ...]:
        source = self.frames.tree
        names = self.view.function_names
        out = []
        while node > 0 and source.function[node] >= 0:
            out.append(names[source.function[node]])
            node = source.parent[node]
        return tuple(out[::-1])
