"""Recording files, the symbolizer, capture_command and the capture API's refusals."""

from __future__ import annotations

import os
import struct
import subprocess
import threading
import time

import numpy as np
import pytest

from textpoke import SymbolNotFound, UsageError
from textpoke.capture import CaptureOptions, capture_command, capture_pid
from textpoke.ring import Recording, SiteInfo, Symbols
from textpoke.ring.file import CHUNK_RECORDS, FILE_MAGIC, FILE_VERSION, Codec, RecordingFile, RecordingWriter
from textpoke.ring.format import RECORD_DTYPE, read_ring_header

from textpoke.trampolines.tracer import RingGeometry

from .conftest import capturing


def _synthetic(n: int = 1000, **changes) -> Recording:
    records = np.zeros(n, dtype=RECORD_DTYPE)
    records["ts_ns"] = np.arange(n) * 10 + 5_000
    records["tid"] = 42
    records["site"] = np.arange(n) % 2
    records["caller"] = 0x401234
    records["arg0"] = np.arange(n)
    records["cpu"] = np.arange(n) % 3
    fields = dict(
        records=records,
        sites=(SiteInfo(0, 0x401000, "fentry", "f", None), SiteInfo(1, 0x401200, "call", "main", "g", 0x401100)),
        lost=3, pid=1234, command="./prog --x 'a b'", start_ns=4_000, end_ns=20_000,
        symbols=Symbols.from_ranges([(0x401100, 0x401180, "g"), (0x401000, 0x401100, "f"),
                                     (0x401200, 0x401300, "main")]),
        metadata={"rseq": True},
    )
    fields.update(changes)
    return Recording(**fields)


def test_save_load_round_trip(tmp_path, target):
    """A real capture streamed to a file and loaded: the same records, sites, metadata and symbols."""
    path = tmp_path / "trace.tpk"
    with capturing(target.pid, CaptureOptions(functions=("f", "tick")), output=path) as capture:
        target.ask("calls 1000")
    original = capture.recording
    assert not os.path.exists(str(path) + ".partial")  # renamed once whole
    loaded = Recording.load(path)
    assert loaded.records.dtype == RECORD_DTYPE and len(loaded.records) == 2 * 4000  # entries and exits
    assert np.array_equal(loaded.records, original.records)
    assert loaded.sites == original.sites
    for name in ("lost", "pid", "command", "start_ns", "end_ns", "mode", "counts", "cut"):
        assert getattr(loaded, name) == getattr(original, name)
    assert loaded.cut is None
    assert loaded.metadata == original.metadata
    assert np.array_equal(loaded.symbols.starts, original.symbols.starts)
    assert loaded.symbolize(original.records["caller"][:10]) == original.symbolize(original.records["caller"][:10])
    # The threads were named while tracing (the target's own threads).
    assert set(loaded.threads) == set(np.unique(loaded.records["tid"]).tolist())
    assert all(t.pid == target.pid for t in loaded.threads.values())


@pytest.mark.parametrize("codec", [Codec.ZSTD, Codec.NONE])
def test_synthetic_round_trip_across_chunks(tmp_path, codec):
    """More records than one chunk holds: written in chunks, read back chunk by chunk, equal."""
    n = CHUNK_RECORDS + 12_345
    original = _synthetic(n)
    path = tmp_path / "big.tpk"
    original.save(path, codec=codec)
    with Recording.load(path) as loaded:
        sizes = [len(c) for c in loaded.chunks()]
        assert sizes == [CHUNK_RECORDS, 12_345]
        assert loaded.record_count == n
        assert np.array_equal(loaded.records, original.records)
        assert loaded.sites == original.sites and loaded.lost == 3
    raw = RecordingFile.open(path)
    stored = sum(c.stored_size for c in raw.chunks)
    if codec is Codec.ZSTD:
        assert stored < n * RECORD_DTYPE.itemsize / 4  # regular synthetic records compress well
    else:
        assert stored > n * RECORD_DTYPE.itemsize
    raw.close()


@pytest.mark.parametrize("n", [5_000, CHUNK_RECORDS + 5_000], ids=["one chunk", "split"])
def test_runs_are_read_in_time_order(tmp_path, n):
    """The write thread stores a drain as runs (one per CPU buffer, each in order);
    reading merges them: time order, a run's own order kept among equal times
    (each thread's records in the order it made them), chunks never overlapping,
    also when an array longer than a chunk had to be split."""
    original = _synthetic(n)
    records = original.records
    records["ts_ns"] = np.arange(n) // 2 * 10 + 5_000  # pairs of equal times, one per run
    runs = np.concatenate((records[0::2], records[1::2]))  # run A then run B, interleaved in time
    assert not np.array_equal(runs, records)
    with RecordingWriter(tmp_path / "w.tpk").open() as writer:
        writer.write_records(runs)
        writer.finish({})
    file = RecordingFile.open(tmp_path / "w.tpk")
    chunks = [c.copy() for c in file.record_chunks()]
    file.close()
    assert sum(map(len, chunks)) == n
    assert np.array_equal(np.concatenate(chunks), records)
    assert all(a["ts_ns"][-1] <= b["ts_ns"][0] for a, b in zip(chunks, chunks[1:]))


def test_version_2_files_are_read(tmp_path):
    """Files of version 2 (chunks each in order) read as before."""
    path = tmp_path / "v2.tpk"
    original = _synthetic(2_000)
    original.save(path)
    data = bytearray(path.read_bytes())
    assert struct.unpack_from("<I", data, 8)[0] == FILE_VERSION == 3
    struct.pack_into("<I", data, 8, 2)
    path.write_bytes(bytes(data))
    with Recording.load(path) as loaded:
        assert np.array_equal(loaded.records, original.records)


def test_round_trip_count_mode_and_empty(tmp_path):
    counted = _synthetic(0, counts=np.array([7, 0], dtype=np.uint64), mode="count", lost=0)
    counted.save(tmp_path / "c.tpk")
    loaded = Recording.load(tmp_path / "c.tpk")
    assert loaded.counts.tolist() == [7, 0] and loaded.mode == "count" and len(loaded.records) == 0


def test_wrong_magic_and_version_refused(tmp_path):
    good = tmp_path / "good.tpk"
    _synthetic().save(good)
    data = good.read_bytes()

    bad = tmp_path / "magic.tpk"
    bad.write_bytes(b"NOTATPK!" + data[8:])
    with pytest.raises(UsageError, match="not a textpoke recording") as info:
        Recording.load(bad)
    assert info.value.hint

    newer = tmp_path / "version.tpk"
    newer.write_bytes(FILE_MAGIC + struct.pack("<I", FILE_VERSION + 1) + data[12:])
    with pytest.raises(UsageError, match="version"):
        Recording.load(newer)

    for content in (b"", data[:5], data[:40]):
        short = tmp_path / "short.tpk"
        short.write_bytes(content)
        with pytest.raises(UsageError):
            Recording.load(short)


def test_cut_file_reads_up_to_its_last_whole_chunk(tmp_path):
    """A file cut anywhere (a killed textpoke, a full disk) reads as far as it is whole,
    and says it was cut; one with every chunk but the end says so too."""
    n = CHUNK_RECORDS + 10
    path = tmp_path / "whole.tpk"
    _synthetic(n).save(path, codec=Codec.NONE)
    data = path.read_bytes()
    raw = RecordingFile.open(path)
    first, second = [c for c in raw.chunks if c.records]
    end = raw.chunks[-1]
    raw.close()
    for keep, records in ((end.offset + 2, n), (second.offset + 100, CHUNK_RECORDS), (first.offset - 30, 0)):
        cut = tmp_path / f"cut{keep}.tpk"
        cut.write_bytes(data[:keep])
        with Recording.load(cut) as loaded:
            assert loaded.cut is not None, keep
            assert loaded.record_count == records
            assert len(loaded.records) == records
            assert (loaded.records["arg0"] == np.arange(records)).all()
    # Cut inside the header chunk: nothing says what was traced; refused in one line.
    (tmp_path / "nohead.tpk").write_bytes(data[:first.offset // 2])
    with pytest.raises(UsageError, match="no readable header"):
        Recording.load(tmp_path / "nohead.tpk")


def test_damaged_bytes_are_caught_not_allocated(tmp_path):
    """Corrupt sizes never make a reader allocate what the file cannot hold, and a
    flipped payload byte fails its checksum with one clear line."""
    path = tmp_path / "ok.tpk"
    _synthetic(5000).save(path, codec=Codec.NONE)
    data = bytearray(path.read_bytes())
    raw = RecordingFile.open(path)
    records_chunk = next(c for c in raw.chunks if c.records)
    raw.close()
    header = records_chunk.offset - 64
    huge = bytearray(data)
    struct.pack_into("<Q", huge, header + 8, 10**12)  # claims a trillion records
    (tmp_path / "huge.tpk").write_bytes(huge)
    with Recording.load(tmp_path / "huge.tpk") as loaded:  # the header checksum fails: cut there
        assert loaded.cut is not None and "damaged" in loaded.cut and loaded.record_count == 0
    flipped = bytearray(data)
    flipped[records_chunk.offset + 77] ^= 0xFF
    (tmp_path / "flipped.tpk").write_bytes(flipped)
    with Recording.load(tmp_path / "flipped.tpk") as loaded:
        with pytest.raises(UsageError, match="checksum"):
            loaded.records


def test_symbolize_in_bulk():
    recording = _synthetic()
    assert recording.symbolize(np.array([0x401000, 0x4010FF, 0x401100, 0x401250, 0x401300, 0x10],
                                        dtype=np.uint64)) == ["f", "f", "g", "main", "0x401300", "0x10"]
    assert Symbols.empty().symbolize([0x401000]) == ["0x401000"]


def test_capture_command_returns_exit_status(exact_calls):
    """capture_command: resident part before main, traced until the program exits, its status back."""
    read_fd, write_fd = os.pipe()
    armed = threading.Event()
    result: dict[str, tuple[Recording, int]] = {}

    def run() -> None:
        result["value"] = capture_command([str(exact_calls)], CaptureOptions(functions=("tick",)),
                                          on_progress=lambda progress: armed.set(),
                                          stdin=read_fd, stdout=subprocess.DEVNULL)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert armed.wait(30), "tracing did not start"
        os.write(write_fd, b"tick 3\nexit 7\n")  # the program waits in read() until now
        thread.join(30)
    finally:
        os.close(write_fd)
        os.close(read_fd)
    recording, status = result["value"]
    assert status == 7
    assert len(recording.records) == 2 * 3 and recording.lost == 0  # tick 3: entries and exits
    assert "exact_calls" in recording.command
    assert recording.metadata["stopped"] == "exited"


def test_glob_matching_nothing_is_refused(target):
    with pytest.raises(SymbolNotFound, match="no function of .* matches 'no_such_function_\\*'") as info:
        capture_pid(target.pid, CaptureOptions(functions=("no_such_function_*",)))
    assert f"textpoke sites {target.pid}" in info.value.hint
    with pytest.raises(SymbolNotFound, match="no call sites to 'no_such_callee'"):
        capture_pid(target.pid, CaptureOptions(calls_to=("no_such_callee",)))
    with pytest.raises(UsageError, match="mode"):
        capture_pid(target.pid, CaptureOptions(functions=("f",), mode="sample"))
    # The target is untouched and still works.
    assert target.ask("calls 10")["tids"]


def test_duration_and_progress(target):
    progress = []
    called = time.monotonic_ns()
    recording = capture_pid(target.pid, CaptureOptions(functions=("f",), duration=0.6), on_progress=progress.append)
    returned = time.monotonic_ns()
    assert recording.metadata["stopped"] == "duration"
    # The traced interval itself, from before the batch to after the restore: inside the
    # call, and ended before the drain-out and the file's end (what the old end included).
    assert called < recording.start_ns and recording.end_ns < recording.metadata["finished_ns"] < returned
    assert recording.end_ns - recording.start_ns >= 0.6e9
    assert len(progress) >= 2 and all(p.sites == 1 for p in progress)
    assert progress[-1].seconds >= 0.5


def test_ring_is_private_and_versioned(target):
    """The ring's memfd is mode 0600, and its header names the format (magic, version,
    record size) and geometry; a region of another format is refused."""
    with capturing(target.pid, CaptureOptions(functions=("f",), ring_records=3 * 1024)):
        ring = [line.split()[0] for line in open(f"/proc/{target.pid}/maps")
                if "textpoke-trace" in line and line.split()[1].startswith("rw")][-1]
        start, end = (int(x, 16) for x in ring.split("-"))
        path = f"/proc/{target.pid}/map_files/{start:x}-{end:x}"
        assert os.stat(path).st_mode & 0o777 == 0o600
        with open(f"/proc/{target.pid}/mem", "rb") as mem:
            mem.seek(start)
            header = bytearray(mem.read(4096))
    geometry = read_ring_header(memoryview(header))
    assert geometry.cpus >= 1
    assert geometry == RingGeometry.for_records(3 * 1024, cpus=geometry.cpus)
    header[0] ^= 0xFF
    with pytest.raises(UsageError, match="not a textpoke ring"):
        read_ring_header(memoryview(header))
