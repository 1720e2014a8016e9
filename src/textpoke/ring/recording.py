"""A finished capture: decoded records, the sites they refer to, and a symbolizer.

File format (one file, little-endian)::

    b"TPKREC\\0\\0"   magic
    u32              version (FILE_VERSION)
    u32              record size (RECORD_DTYPE.itemsize)
    u32              length of the JSON header in bytes
    JSON             {"metadata": {...}, "sites": [...], "symbols": {...}, "counts": [...] | null}
    records          raw RECORD_DTYPE array (np.tofile / np.fromfile)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._errors import UsageError
from .format import FILE_HEADER, FILE_MAGIC, FILE_VERSION, RECORD_DTYPE

_NOT_A_RECORDING_HINT = "give a file written by `textpoke record` or `textpoke trace -o`"


@dataclass(frozen=True)
class SiteInfo:
    """One traced site; records refer to it by ``id`` (its index in ``Recording.sites``)."""

    id: int
    address: int
    kind: str  # "fentry" | "call"
    function: str  # the function holding the site
    target_name: str | None  # call sites: the callee's name


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


@dataclass(frozen=True, eq=False)
class Recording:
    """What one capture saw. ``records`` is sorted by ``ts_ns`` (RECORD_DTYPE).

    In count mode ``records`` is empty and ``counts[site id]`` holds the calls."""

    records: np.ndarray
    sites: tuple[SiteInfo, ...]
    lost: int
    pid: int
    command: str
    start_ns: int
    end_ns: int
    symbols: Symbols = field(default_factory=Symbols.empty)
    counts: np.ndarray | None = None
    mode: str = "trace"
    metadata: dict[str, Any] = field(default_factory=dict)  # anything else worth keeping (JSON)

    def symbolize(self, addresses: np.ndarray | Sequence[int]) -> list[str]:
        return self.symbols.symbolize(addresses)

    @property
    def duration_ns(self) -> int:
        return max(0, self.end_ns - self.start_ns)

    def per_site(self) -> np.ndarray:
        """Calls per site id: the counts, or the records tallied."""
        if self.counts is not None:
            return self.counts
        return np.bincount(self.records["site"], minlength=len(self.sites)).astype(np.uint64)

    # -- file -----------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the recording to ``path`` (see the module docstring for the layout)."""
        header = {
            "metadata": {
                "pid": self.pid, "command": self.command, "start_ns": self.start_ns,
                "end_ns": self.end_ns, "lost": self.lost, "mode": self.mode, "extra": self.metadata,
            },
            "sites": [[s.id, s.address, s.kind, s.function, s.target_name] for s in self.sites],
            "symbols": self.symbols.to_json(),
            "counts": None if self.counts is None else [int(c) for c in self.counts],
        }
        blob = json.dumps(header, separators=(",", ":")).encode()
        records = np.ascontiguousarray(self.records, dtype=RECORD_DTYPE)
        with open(path, "wb") as f:
            f.write(FILE_HEADER.pack(FILE_MAGIC, FILE_VERSION, RECORD_DTYPE.itemsize, len(blob)))
            f.write(blob)
            records.tofile(f)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Recording:
        """Read a file :meth:`save` wrote; anything else is refused with a UsageError."""
        name = os.fspath(path)
        with open(path, "rb") as f:
            head = f.read(FILE_HEADER.size)
            if len(head) < FILE_HEADER.size or head[: len(FILE_MAGIC)] != FILE_MAGIC:
                raise UsageError(f"{name} is not a textpoke recording", hint=_NOT_A_RECORDING_HINT)
            _, version, record_size, json_length = FILE_HEADER.unpack(head)
            if version != FILE_VERSION or record_size != RECORD_DTYPE.itemsize:
                raise UsageError(
                    f"{name} is a textpoke recording of version {version} ({record_size}-byte records); "
                    f"this textpoke reads version {FILE_VERSION} ({RECORD_DTYPE.itemsize}-byte records)",
                    hint="read it with the textpoke version that wrote it",
                )
            blob = f.read(json_length)
            if len(blob) != json_length:
                raise UsageError(f"{name} is a truncated textpoke recording", hint=_NOT_A_RECORDING_HINT)
            try:
                header = json.loads(blob)
                meta = header["metadata"]
                sites = tuple(SiteInfo(int(i), int(a), str(k), str(fn), t) for i, a, k, fn, t in header["sites"])
                symbols = Symbols.from_json(header["symbols"])
            except (ValueError, KeyError, TypeError) as exc:
                raise UsageError(f"{name} is a damaged textpoke recording (bad header)",
                                 hint=_NOT_A_RECORDING_HINT) from exc
            remaining = os.fstat(f.fileno()).st_size - f.tell()
            if remaining % RECORD_DTYPE.itemsize:
                raise UsageError(f"{name} is a truncated or damaged textpoke recording",
                                 hint=_NOT_A_RECORDING_HINT)
            records = np.fromfile(f, dtype=RECORD_DTYPE, count=remaining // RECORD_DTYPE.itemsize)
        counts = header.get("counts")
        return cls(
            records=records, sites=sites, lost=int(meta["lost"]), pid=int(meta["pid"]),
            command=str(meta["command"]), start_ns=int(meta["start_ns"]), end_ns=int(meta["end_ns"]),
            symbols=symbols, counts=None if counts is None else np.array(counts, dtype=np.uint64),
            mode=str(meta.get("mode", "trace")), metadata=dict(meta.get("extra") or {}),
        )


__all__ = ["RECORD_DTYPE", "Recording", "SiteInfo", "Symbols"]
