"""The ring's formats: the shared-memory header, the record dtypes, the file's constants.

The shared memory a tracer writes (see :mod:`textpoke.trampolines.tracer` for the
buffers, control blocks and slots its generated code addresses) starts with a
versioned header written here, so a reader never decodes a region of another
layout: magic, version, record size, kind (records or counters) and geometry.

Two record layouts:

- :data:`RAW_DTYPE`, one 32-byte slot as the trampolines write it
  (``ts`` in TSC ticks, ``tid``, ``site`` word: the site id and the record's
  kind in its top bits, ``caller`` word, ``arg0``);
- :data:`RECORD_DTYPE`, a decoded record as a recording file holds it and a
  :class:`~textpoke.ring.recording.Recording` hands it out (``ts_ns``
  CLOCK_MONOTONIC, ``tid``, ``site`` id, ``caller``, ``arg0``, ``cpu``,
  ``kind``): its first 32 bytes are a slot's layout, so decoding starts with one
  block copy per record.
"""

from __future__ import annotations

import enum
import struct

import numpy as np

from .._errors import UsageError
from ..trampolines.layout import KIND_SHIFT, SITE_MASK, RecordKind
from ..trampolines.tracer import (
    HEADER_SIZE,
    SLOT_ARG0,
    SLOT_CALLER,
    SLOT_SITE,
    SLOT_SIZE,
    SLOT_TID,
    SLOT_TS,
    CounterGeometry,
    RingGeometry,
)

# -- shared-memory header ---------------------------------------------------------------
RING_MAGIC = int.from_bytes(b"TPKRING\x01", "little")
#: 2: writers wait for the reader (deadline, bell and waiter words; trampolines.tracer).
RING_VERSION = 2
#: magic u64, version u32, record size u32, kind u32, cpus u32, capacity u64
#: (records per buffer, or sites for counters).
_RING_HEADER = struct.Struct("<QIIIIQ")
assert _RING_HEADER.size <= HEADER_SIZE


class RingKind(enum.IntEnum):
    RECORDS = 1
    COUNTERS = 2


RAW_DTYPE = np.dtype(
    {
        "names": ["ts", "tid", "site", "caller", "arg0"],
        "formats": ["<u8", "<u4", "<u4", "<u8", "<u8"],
        "offsets": [SLOT_TS, SLOT_TID, SLOT_SITE, SLOT_CALLER, SLOT_ARG0],
        "itemsize": SLOT_SIZE,
    }
)

#: ``cpu`` of a record whose CPU is not known (written to the shared fallback buffer).
UNKNOWN_CPU = 0xFFFF

RECORD_DTYPE = np.dtype(
    [
        ("ts_ns", "<u8"),  # CLOCK_MONOTONIC nanoseconds
        ("tid", "<u4"),  # kernel thread id (or an opaque thread id, see the tracer)
        ("site", "<u4"),  # index into Recording.sites
        ("caller", "<u8"),  # entry: return address into the caller; call site: the site
        ("arg0", "<u8"),  # rdi at the call: the first integer argument
        ("cpu", "<u2"),  # the CPU whose buffer took the record (UNKNOWN_CPU: the fallback buffer)
        ("kind", "u1"),  # RecordKind
        ("_pad", "V5"),
    ]
)
#: A record's first 32 bytes are laid out as a slot's (ts, tid, site, caller word,
#: arg0), so decoding starts with one block copy per record.
RECORD_SIZE = RECORD_DTYPE.itemsize
assert RECORD_SIZE == 40 and all(
    RECORD_DTYPE.fields[name][1] == RAW_DTYPE.fields[n][1]
    for name, n in (("ts_ns", "ts"), ("tid", "tid"), ("site", "site"), ("caller", "caller"), ("arg0", "arg0")))


def in_time_order(records: np.ndarray) -> np.ndarray:
    """``records`` (RECORD_DTYPE) in time order: as they are if they already are, else
    a stable sort's copy. A drain's records are a few runs, each in order (one per
    buffer: a CPU's records are committed in time order); the sort is put off until
    a recording is read, so that the reader that must keep up with the traced
    program never pays it (a stable sort finds the runs and merges them)."""
    ts = records["ts_ns"]
    if len(ts) < 2 or bool((ts[1:] >= ts[:-1]).all()):
        return records
    return records.take(np.argsort(ts, kind="stable"))


def write_ring_header(data: memoryview, geometry: RingGeometry | CounterGeometry) -> None:
    """Header of a tracer's data region (written by the tool before any site is patched)."""
    if isinstance(geometry, RingGeometry):
        fields = (RingKind.RECORDS, geometry.cpus, geometry.capacity)
    else:
        fields = (RingKind.COUNTERS, geometry.cpus, geometry.sites)
    _RING_HEADER.pack_into(data, 0, RING_MAGIC, RING_VERSION, SLOT_SIZE, *fields)


def read_ring_header(data: memoryview) -> RingGeometry | CounterGeometry:
    """The geometry the header describes; refuses a region of another format."""
    magic, version, record_size, kind, cpus, capacity = _RING_HEADER.unpack_from(data, 0)
    if magic != RING_MAGIC:
        raise UsageError("shared memory is not a textpoke ring", hint="map the region a Tracer created")
    if version != RING_VERSION or record_size != SLOT_SIZE:
        raise UsageError(
            f"textpoke ring version {version} with {record_size}-byte records; this textpoke reads "
            f"version {RING_VERSION} with {SLOT_SIZE}-byte records",
            hint="read it with the textpoke version that made it",
        )
    if kind == RingKind.RECORDS:
        return RingGeometry(cpus=cpus, capacity=capacity)
    if kind == RingKind.COUNTERS:
        return CounterGeometry(cpus=cpus, sites=capacity)
    raise UsageError(f"textpoke ring of unknown kind {kind}")


__all__ = [
    "in_time_order",
    "KIND_SHIFT",
    "RAW_DTYPE",
    "RECORD_DTYPE",
    "RECORD_SIZE",
    "RecordKind",
    "SITE_MASK",
    "UNKNOWN_CPU",
    "RING_MAGIC",
    "RING_VERSION",
    "RingKind",
    "read_ring_header",
    "write_ring_header",
]
