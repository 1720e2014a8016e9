"""A capture's result: what was traced, and its records, one time-ordered chunk at a time.

A :class:`Recording` is either backed by a recording file (``Recording.load``;
what ``textpoke record`` writes while it traces, see :mod:`.file`) or holds
its records in memory (``Recording(records=...)``, for small synthetic ones
and tests). Either way readers walk :meth:`Recording.chunks`, which never
holds more than one chunk; :attr:`Recording.records` concatenates them all,
for recordings known to be small.

Chunks are each in time order and follow each other in time, so a reader that
walks them sees every thread's records in the order the thread made them (the
capture merges each drain with the tail of the previous one: see
``capture.drain``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._errors import UsageError
from .file import NOT_A_RECORDING_HINT, ChunkKind, Codec, RecordingFile, RecordingWriter
from .format import RECORD_DTYPE, RecordKind


@dataclass(frozen=True)
class SiteInfo:
    """One traced site; records refer to it by ``id`` (its index in ``Recording.sites``)."""

    id: int
    address: int
    kind: str  # "fentry" | "call"
    function: str  # the function holding the site
    target_name: str | None  # call sites: the callee's name
    target: int | None = None  # call sites: the callee's address


@dataclass(frozen=True)
class ThreadInfo:
    """A thread seen in the records: the process it belongs to and its name (comm)."""

    pid: int
    name: str


@dataclass(frozen=True, eq=False)
class Symbols:
    """Function ranges of the traced object(s), sorted by start: address -> name in bulk."""

    starts: np.ndarray  # u8, sorted
    ends: np.ndarray  # u8
    names: np.ndarray  # object (str)

    @classmethod
    def empty(cls) -> Symbols:
        return cls(np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, dtype=object))

    @classmethod
    def from_ranges(cls, ranges: Iterable[tuple[int, int, str]]) -> Symbols:
        """From ``(start, end, name)`` triples in any order (sorted here)."""
        ordered = sorted(ranges)
        names = np.empty(len(ordered), dtype=object)
        names[:] = [r[2] for r in ordered]
        return cls(
            starts=np.array([r[0] for r in ordered], dtype=np.uint64),
            ends=np.array([r[1] for r in ordered], dtype=np.uint64),
            names=names,
        )

    def __len__(self) -> int:
        return len(self.names)

    def lookup(self, addresses: np.ndarray) -> np.ndarray:
        """Index of the function holding each address, -1 where none does."""
        addresses = np.asarray(addresses, dtype=np.uint64)
        index = np.searchsorted(self.starts, addresses, side="right").astype(np.int64) - 1
        inside = index >= 0
        clipped = np.where(inside, index, 0)
        if len(self.ends):
            inside &= addresses < self.ends[clipped]
        else:
            inside[:] = False
        return np.where(inside, index, -1)

    def symbolize(self, addresses: np.ndarray | Sequence[int]) -> list[str]:
        """Function name for each address (``0x...`` where no function holds it)."""
        addresses = np.asarray(addresses, dtype=np.uint64)
        index = self.lookup(addresses)
        out = np.append(self.names, "")[index].tolist()  # -1 picks the "" sentinel
        for i in np.flatnonzero(index < 0).tolist():
            out[i] = f"{int(addresses[i]):#x}"
        return out

    def to_json(self) -> dict[str, Any]:
        return {"starts": self.starts.tolist(), "ends": self.ends.tolist(), "names": self.names.tolist()}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Symbols:
        names = np.empty(len(obj["names"]), dtype=object)
        names[:] = [str(n) for n in obj["names"]]
        return cls(np.array(obj["starts"], dtype=np.uint64), np.array(obj["ends"], dtype=np.uint64), names)


def sites_to_json(sites: Sequence[SiteInfo]) -> list[list[Any]]:
    return [[s.id, s.address, s.kind, s.function, s.target_name, s.target] for s in sites]


def sites_from_json(rows: Sequence[Sequence[Any]]) -> tuple[SiteInfo, ...]:
    return tuple(SiteInfo(int(r[0]), int(r[1]), str(r[2]), str(r[3]), r[4], None if r[5] is None else int(r[5]))
                 for r in rows)


def threads_to_json(threads: dict[int, ThreadInfo]) -> dict[str, list[Any]]:
    return {str(tid): [t.pid, t.name] for tid, t in threads.items()}


def threads_from_json(obj: dict[str, Sequence[Any]]) -> dict[int, ThreadInfo]:
    return {int(tid): ThreadInfo(int(v[0]), str(v[1])) for tid, v in obj.items()}


class Recording:
    """What one capture saw. In count mode there are no records and ``counts[site id]``
    holds the calls. ``start_ns``/``end_ns`` bound the traced interval (CLOCK_MONOTONIC):
    every record lies inside it. ``cut`` says why a file ends early (None: whole)."""

    def __init__(
        self,
        *,
        sites: Sequence[SiteInfo],
        lost: int,
        pid: int,
        command: str,
        start_ns: int,
        end_ns: int,
        records: np.ndarray | None = None,
        symbols: Symbols | None = None,
        counts: np.ndarray | None = None,
        mode: str = "trace",
        metadata: dict[str, Any] | None = None,
        threads: dict[int, ThreadInfo] | None = None,
        cut: str | None = None,
        file: RecordingFile | None = None,
    ) -> None:
        self.sites = tuple(sites)
        self.lost = int(lost)
        self.pid = int(pid)
        self.command = command
        self.start_ns = int(start_ns)
        self.end_ns = int(end_ns)
        self.symbols = symbols if symbols is not None else Symbols.empty()
        self.counts = counts
        self.mode = mode
        self.metadata = dict(metadata or {})
        self.threads = dict(threads or {})
        self.cut = cut
        self._file = file
        self._records = None if records is None else np.asarray(records, dtype=RECORD_DTYPE)

    # -- records ------------------------------------------------------------------------
    @property
    def record_count(self) -> int:
        if self._file is not None:
            return self._file.records
        return 0 if self._records is None else len(self._records)

    def __len__(self) -> int:
        return self.record_count

    def chunks(self, *, merged: bool = True) -> Iterator[np.ndarray]:
        """The records, chunk after chunk (RECORD_DTYPE, each in time order).

        ``merged=False`` hands each chunk out as the file holds it: a few runs, each in
        time order (one per buffer drained), not merged, which spares a sort and a copy
        of every record to a reader that puts them in another order anyway; chunks
        still follow each other in time."""
        if self._file is not None:
            yield from self._file.record_chunks(merged=merged)
        elif self._records is not None and len(self._records):
            yield self._records

    @property
    def records(self) -> np.ndarray:
        """Every record in one array: for recordings known to fit in memory."""
        if self._records is None:
            parts = list(self.chunks())
            self._records = np.concatenate(parts) if parts else np.empty(0, dtype=RECORD_DTYPE)
        return self._records

    def symbolize(self, addresses: np.ndarray | Sequence[int]) -> list[str]:
        return self.symbols.symbolize(addresses)

    @property
    def duration_ns(self) -> int:
        return max(0, self.end_ns - self.start_ns)

    def per_site(self) -> np.ndarray:
        """Calls per site id: the counts, or the records tallied (entries: CALL and ENTER)."""
        if self.counts is not None:
            return self.counts
        total = np.zeros(len(self.sites), dtype=np.uint64)
        for chunk in self.chunks():
            kind = chunk["kind"]
            calls = chunk["site"][(kind == RecordKind.CALL) | (kind == RecordKind.ENTER)]
            total += np.bincount(calls, minlength=len(self.sites))[: len(self.sites)].astype(np.uint64)
        return total

    # -- file ---------------------------------------------------------------------------
    def head_json(self) -> dict[str, Any]:
        """What a recording file's META chunk holds (known when tracing starts)."""
        return {"pid": self.pid, "command": self.command, "start_ns": self.start_ns, "mode": self.mode,
                "sites": sites_to_json(self.sites), "symbols": self.symbols.to_json(), "extra": self.metadata}

    def tail_json(self) -> dict[str, Any]:
        """What its END chunk holds (known when tracing ends)."""
        return {"start_ns": self.start_ns, "end_ns": self.end_ns, "lost": self.lost, "records": self.record_count,
                "threads": threads_to_json(self.threads), "extra": self.metadata}

    def save(self, path: str | os.PathLike[str], *, codec: Codec = Codec.ZSTD) -> None:
        """Write the recording to ``path`` (see :mod:`.file`; via ``path.partial``)."""
        with RecordingWriter(path, codec=codec) as writer:
            writer.write_json(ChunkKind.META, self.head_json())
            for chunk in self.chunks():
                writer.write_records(chunk)
            if self.counts is not None:
                writer.write_counts(self.counts)
            writer.finish(self.tail_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Recording:
        """Open a recording file; its records are read chunk by chunk when walked.
        Anything that is not one is refused with a UsageError."""
        file = RecordingFile.open(path)
        try:
            return cls._from_file(file)
        except BaseException:
            file.close()
            raise

    @classmethod
    def _from_file(cls, file: RecordingFile) -> Recording:
        name = file.path
        head: dict[str, Any] | None = None
        tail: dict[str, Any] | None = None
        threads: dict[int, ThreadInfo] = {}
        counts = None
        symbols: Any = None
        for chunk in file.chunks:
            if chunk.kind is ChunkKind.META and head is None:
                head = file.json(chunk)
            elif chunk.kind is ChunkKind.SYMBOLS:
                symbols = file.json(chunk)
            elif chunk.kind is ChunkKind.THREADS:
                threads.update(threads_from_json(file.json(chunk)))
            elif chunk.kind is ChunkKind.COUNTS:
                counts = np.frombuffer(bytes(file.payload(chunk)), dtype="<u8").copy()
            elif chunk.kind is ChunkKind.END:
                tail = file.json(chunk)
        if head is None:
            raise UsageError(f"{name} has no readable header chunk ({file.cut or 'none was written'})",
                             hint=NOT_A_RECORDING_HINT)
        cut = file.cut
        if tail is None and cut is None:
            cut = "it has no end marker (the textpoke that wrote it was stopped before it finished)"
        try:
            last = max((c.last_ns for c in file.chunks if c.kind is ChunkKind.RECORDS and c.records), default=0)
            extra = dict(head.get("extra") or {})
            if tail is not None:
                extra.update(tail.get("extra") or {})
                threads.update(threads_from_json(tail.get("threads") or {}))
            # The head's start is when the file was begun; the traced interval's, in the tail.
            start_ns = int((tail or head)["start_ns"])
            return cls(
                sites=sites_from_json(head["sites"]),
                symbols=Symbols.from_json(symbols if symbols is not None else head["symbols"]),
                pid=int(head["pid"]), command=str(head["command"]), mode=str(head.get("mode", "trace")),
                start_ns=start_ns, end_ns=int(tail["end_ns"]) if tail is not None else max(start_ns, last),
                lost=int(tail["lost"]) if tail is not None else 0, counts=counts, metadata=extra,
                threads=threads, cut=cut, file=file,
            )
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise UsageError(f"{name} is a damaged textpoke recording (bad header)",
                             hint=NOT_A_RECORDING_HINT) from exc

    def close(self) -> None:
        """Release a file-backed recording's mapping (records handed out stay valid
        only until then, unless copied)."""
        if self._file is not None:
            self._records = None
            self._file.close()

    def __enter__(self) -> Recording:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["RECORD_DTYPE", "Recording", "SiteInfo", "Symbols", "ThreadInfo"]
