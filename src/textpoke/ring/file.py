"""The recording file: written chunk by chunk while tracing, read chunk by chunk.

A recording can be longer than memory (a minute of a busy program is hundreds of
millions of records), so neither side ever holds it whole. Layout, little-endian::

    file header (64 bytes)  magic b"TPKREC\\0\\0", u32 version, u32 record size,
                            u32 chunk header size, reserved
    chunk*                  chunk header (64 bytes), payload, zero padding to 8 bytes

    chunk header            magic b"TPKC", u16 kind (ChunkKind), u16 codec (Codec),
                            u64 records, u64 raw bytes, u64 stored bytes,
                            u64 first ts_ns, u64 last ts_ns, u32 crc32 of the stored
                            payload, 4 reserved, u32 crc32 of the 56 bytes before it,
                            4 reserved

A file is a META chunk (JSON: what was traced, sites, symbols), RECORDS chunks
(RECORD_DTYPE arrays, compressed or not: each chunk's records follow the previous
chunk's; inside a chunk, one run per CPU buffer, each in time order, which the
reader merges), THREADS chunks
(JSON: names of the threads seen so far), SYMBOLS (JSON: the function ranges of
every object mapped in the process, read while tracing), COUNTS (count mode) and
one END chunk (JSON: how it ended, losses). Every chunk is whole or absent: a file cut short
(textpoke killed, disk full) reads up to its last whole chunk, and the reader
says it was cut and where. Header and payload checksums catch damage; sizes are
checked against the file before anything is allocated.

:class:`RecordingWriter` writes to ``FILE.partial`` and renames it to ``FILE``
only when the END chunk is on disk: an existing ``FILE`` is never lost to a
recording that fails, and a failed one stays readable under its ``.partial``
name.
"""

from __future__ import annotations

import enum
import fcntl
import json
import mmap
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._errors import TextpokeError, UsageError
from .format import RECORD_DTYPE, RECORD_SIZE, in_time_order

FILE_MAGIC = b"TPKREC\0\0"
#: 2: chunked, streamed (1 was one JSON header and one array); 3: a RECORDS chunk may
#: hold runs (one per CPU buffer) that the reader merges. Versions read: 2 and 3.
FILE_VERSION = 3
_READS = (2, 3)
FILE_HEADER = struct.Struct("<8sIII44x")
CHUNK_MAGIC = b"TPKC"
_CHUNK_BODY = struct.Struct("<4sHHQQQQQI4x")  # what the header checksum covers
CHUNK_HEADER = struct.Struct("<4sHHQQQQQI4xI4x")
assert FILE_HEADER.size == 64 and CHUNK_HEADER.size == 64
#: Records per RECORDS chunk at most (the writer splits larger arrays): 40 MiB raw.
CHUNK_RECORDS = 1 << 20
PARTIAL_SUFFIX = ".partial"
NOT_A_RECORDING_HINT = "give a file written by `textpoke record` or `textpoke trace -o`"


class ChunkKind(enum.IntEnum):
    META = 1
    RECORDS = 2
    THREADS = 3
    COUNTS = 4
    END = 5
    SYMBOLS = 6  # function ranges of every mapped object (JSON), once they are read


class Codec(enum.IntEnum):
    NONE = 0
    ZSTD = 1


def _zstd() -> Any:
    try:
        import zstandard
    except ImportError as exc:  # a dependency, but a stripped-down install may lack it
        raise TextpokeError("this recording is compressed with zstd and the zstandard module is missing",
                            hint="pip install zstandard") from exc
    return zstandard


def _pad(n: int) -> int:
    return -n % 8


@dataclass(frozen=True)
class ChunkInfo:
    kind: ChunkKind
    codec: Codec
    records: int
    raw_size: int
    stored_size: int
    first_ns: int
    last_ns: int
    offset: int  # of the payload in the file
    crc: int  # of the stored payload


class RecordingWriter:
    """Writes one recording file, chunk by chunk; a context manager.

    Steps: :meth:`open` creates ``FILE.partial`` (refusing one another live textpoke
    is writing: it holds a lock on it), writes the file header; ``write_*`` append
    chunks, each checksummed and flushed to the kernel when written (a killed
    textpoke leaves every chunk it wrote); :meth:`finish` appends END, flushes and
    renames ``FILE.partial`` to ``FILE``. If anything fails, the ``.partial``
    file stays with every whole chunk written so far. Counts what it wrote."""

    def __init__(self, path: str | os.PathLike[str], *, codec: Codec = Codec.ZSTD, level: int = 1) -> None:
        self.path = os.fspath(path)
        self.partial = self.path + PARTIAL_SUFFIX
        self.codec = codec
        self._compressor = _zstd().ZstdCompressor(level=level) if codec is Codec.ZSTD else None
        self._fd = -1
        self.records = 0
        self.raw_bytes = 0
        self.stored_bytes = 0
        self.chunks = 0
        self.finished = False
        self._lock = threading.Lock()

    def open(self) -> RecordingWriter:
        fd = os.open(self.partial, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(f"another textpoke is writing {self.partial}",
                             hint="wait for it to finish, or pick another -o") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            os.ftruncate(fd, 0)
            os.write(fd, FILE_HEADER.pack(FILE_MAGIC, FILE_VERSION, RECORD_SIZE, CHUNK_HEADER.size))
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.stored_bytes = FILE_HEADER.size
        return self

    # -- chunks ----------------------------------------------------------------------------
    def _write_chunk(self, kind: ChunkKind, payload: bytes | memoryview, *, records: int = 0,
                     first_ns: int = 0, last_ns: int = 0, compress: bool = False) -> None:
        with self._lock:  # the write thread and a capture's symbols thread both append
            self._write_locked(kind, payload, records=records, first_ns=first_ns, last_ns=last_ns,
                               compress=compress)

    def _write_locked(self, kind: ChunkKind, payload: bytes | memoryview, *, records: int,
                      first_ns: int, last_ns: int, compress: bool) -> None:
        raw_size = len(payload)
        codec = Codec.NONE
        if compress and self._compressor is not None and raw_size:
            payload = self._compressor.compress(payload)
            codec = Codec.ZSTD
        stored = len(payload)
        body = _CHUNK_BODY.pack(CHUNK_MAGIC, kind, codec, records, raw_size, stored, first_ns, last_ns,
                                zlib.crc32(payload))
        header = body + struct.pack("<I4x", zlib.crc32(body))
        pieces = [header, payload]
        if _pad(stored):
            pieces.append(bytes(_pad(stored)))
        total = sum(len(p) for p in pieces)
        written = os.writev(self._fd, pieces)
        while written < total:  # a short write (signal, nearly full disk): finish it or fail
            rest = b"".join(bytes(p) for p in pieces)[written:]
            more = os.write(self._fd, rest)
            if more <= 0:
                raise OSError(28, "No space left on device")
            written += more
        self.chunks += 1
        self.stored_bytes += total

    def write_json(self, kind: ChunkKind, obj: Any) -> None:
        self._write_chunk(kind, json.dumps(obj, separators=(",", ":")).encode())

    def write_records(self, records: np.ndarray) -> None:
        """Append records (RECORD_DTYPE) that all follow those written before: runs each
        in time order (readers merge them, ring.format.in_time_order), CHUNK_RECORDS per
        chunk at most (a longer array is put in order first, so chunks never overlap)."""
        if len(records) > CHUNK_RECORDS:
            records = in_time_order(records)
        for lo in range(0, len(records), CHUNK_RECORDS):
            part = np.ascontiguousarray(records[lo : lo + CHUNK_RECORDS], dtype=RECORD_DTYPE)
            ts = part["ts_ns"]
            self._write_chunk(ChunkKind.RECORDS, memoryview(part).cast("B"), records=len(part),
                              first_ns=int(ts.min()), last_ns=int(ts.max()), compress=True)
            self.records += len(part)
            self.raw_bytes += part.nbytes

    def write_counts(self, counts: np.ndarray) -> None:
        self._write_chunk(ChunkKind.COUNTS, np.ascontiguousarray(counts, dtype="<u8").tobytes())

    def finish(self, trailer: dict[str, Any]) -> None:
        """The END chunk, then ``FILE.partial`` becomes ``FILE``."""
        self.write_json(ChunkKind.END, trailer)
        os.fsync(self._fd)
        os.replace(self.partial, self.path)
        self.finished = True
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # releases the lock; an unfinished file stays as .partial
            self._fd = -1

    def __enter__(self) -> RecordingWriter:
        return self.open() if self._fd < 0 else self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RecordingFile:
    """A recording file opened for reading: its chunk index, memory-mapped.

    :meth:`open` reads the file header and walks the chunk headers (not the
    payloads) to build the index; a chunk that is not whole, or whose header
    checksum fails, ends the walk, and :attr:`cut` says why. Payload checksums
    are checked when a chunk is read. Uncompressed record chunks are handed out
    as views of the mapping, compressed ones decompressed one at a time: memory
    stays bounded by one chunk whatever the file's size."""

    def __init__(self, path: str, data: mmap.mmap | bytes, chunks: list[ChunkInfo], cut: str | None) -> None:
        self.path = path
        self._data = data
        self.chunks = chunks
        self.cut = cut
        self.records = sum(c.records for c in chunks if c.kind is ChunkKind.RECORDS)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> RecordingFile:
        name = os.fspath(path)
        with open(name, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            data: mmap.mmap | bytes = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        head = bytes(data[: FILE_HEADER.size])
        if len(head) < len(FILE_MAGIC) or head[: len(FILE_MAGIC)] != FILE_MAGIC:
            raise UsageError(f"{name} is not a textpoke recording", hint=NOT_A_RECORDING_HINT)
        if len(head) < FILE_HEADER.size:
            raise UsageError(f"{name} is a truncated textpoke recording (no whole header)",
                             hint=NOT_A_RECORDING_HINT)
        _, version, record_size, chunk_header = FILE_HEADER.unpack(head)
        if version not in _READS or record_size != RECORD_SIZE or chunk_header != CHUNK_HEADER.size:
            raise UsageError(
                f"{name} is a textpoke recording of version {version} ({record_size}-byte records); "
                f"this textpoke reads version {FILE_VERSION} ({RECORD_SIZE}-byte records)",
                hint="read it with the textpoke version that wrote it",
            )
        chunks, cut = _walk(data, size)
        return cls(name, data, chunks, cut)

    def payload(self, chunk: ChunkInfo) -> bytes | memoryview:
        """A chunk's payload, checked and decompressed."""
        stored = memoryview(self._data)[chunk.offset : chunk.offset + chunk.stored_size]
        if zlib.crc32(stored) != chunk.crc:
            raise UsageError(f"{self.path} is damaged: the chunk at byte {chunk.offset} fails its checksum",
                             hint="the chunks before it are intact; cut the file there to read them")
        if chunk.codec is Codec.NONE:
            return stored
        if chunk.codec is not Codec.ZSTD:
            raise UsageError(f"{self.path}: chunk at byte {chunk.offset} uses unknown compression {chunk.codec}")
        try:
            raw = _zstd().ZstdDecompressor().decompress(stored, max_output_size=chunk.raw_size)
        except Exception as exc:  # zstandard.ZstdError: damaged data behind a good checksum
            raise UsageError(f"{self.path} is damaged: the chunk at byte {chunk.offset} does not decompress",
                             hint=NOT_A_RECORDING_HINT) from exc
        if len(raw) != chunk.raw_size:
            raise UsageError(f"{self.path} is damaged: the chunk at byte {chunk.offset} has the wrong size",
                             hint=NOT_A_RECORDING_HINT)
        self._forget(chunk)
        return raw

    def _forget(self, chunk: ChunkInfo) -> None:
        """Drop the mapping's pages of a chunk already read (they stay in the page cache):
        a pass over a file bigger than memory would otherwise count it all in the reader's
        RSS. Safe even under a view still in use: a file-backed page is read again on
        its next touch."""
        if isinstance(self._data, mmap.mmap):
            start = chunk.offset & ~(mmap.PAGESIZE - 1)
            end = chunk.offset + chunk.stored_size
            if end - start >= mmap.PAGESIZE:
                self._data.madvise(mmap.MADV_DONTNEED, start, end - start)

    def json(self, chunk: ChunkInfo) -> Any:
        try:
            return json.loads(bytes(self.payload(chunk)))
        except ValueError as exc:
            raise UsageError(f"{self.path} is damaged (bad {chunk.kind.name.lower()} chunk)",
                             hint=NOT_A_RECORDING_HINT) from exc

    def _records(self, chunk: ChunkInfo) -> np.ndarray:
        return np.frombuffer(self.payload(chunk), dtype=RECORD_DTYPE, count=chunk.records)

    def record_chunks(self, *, merged: bool = True) -> Iterator[np.ndarray]:
        """Each RECORDS chunk's records, in time order (chunks follow each other in time);
        ``merged=False``: as stored, a few runs each in time order (see ``Recording.chunks``)."""
        for chunk in self.chunks:
            if chunk.kind is ChunkKind.RECORDS and chunk.records:
                # (No local name holds a chunk while the reader uses it, nor the runs a merge copied.)
                yield in_time_order(self._records(chunk)) if merged else self._records(chunk)
                if chunk.codec is Codec.NONE:
                    self._forget(chunk)  # a view: its pages are read again if still used

    def close(self) -> None:
        if isinstance(self._data, mmap.mmap):
            try:
                self._data.close()
            except BufferError:
                pass  # a caller still holds a view of an uncompressed chunk: it goes with the view


def _walk(data: mmap.mmap | bytes, size: int) -> tuple[list[ChunkInfo], str | None]:
    """Chunk headers from the first one on; stops at the first that is not whole."""
    chunks: list[ChunkInfo] = []
    at = FILE_HEADER.size
    while at < size:
        if size - at < CHUNK_HEADER.size:
            return chunks, f"it ends inside a chunk header at byte {at}"
        fields = CHUNK_HEADER.unpack_from(data, at)
        magic, kind, codec, records, raw, stored, first_ns, last_ns, crc, header_crc = fields
        if magic != CHUNK_MAGIC or zlib.crc32(data[at : at + _CHUNK_BODY.size]) != header_crc:
            return chunks, f"the chunk header at byte {at} is damaged"
        try:
            kind, codec = ChunkKind(kind), Codec(codec)
        except ValueError:
            return chunks, f"the chunk at byte {at} is of an unknown kind"
        if kind is ChunkKind.RECORDS and raw != records * RECORD_SIZE:
            return chunks, f"the chunk at byte {at} declares {records} records in {raw} bytes"
        payload = at + CHUNK_HEADER.size
        if stored > size - payload:
            return chunks, f"it ends inside the chunk at byte {at} ({size - payload} of {stored} bytes)"
        if codec is Codec.NONE and stored != raw:
            return chunks, f"the chunk at byte {at} has inconsistent sizes"
        chunks.append(ChunkInfo(kind, codec, records, raw, stored, first_ns, last_ns, payload, crc))
        at = payload + stored + _pad(stored)
    return chunks, None


__all__ = [
    "CHUNK_RECORDS",
    "ChunkInfo",
    "ChunkKind",
    "Codec",
    "FILE_MAGIC",
    "FILE_VERSION",
    "PARTIAL_SUFFIX",
    "RecordingFile",
    "RecordingWriter",
]
