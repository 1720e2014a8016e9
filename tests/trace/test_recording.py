"""Recording files, the symbolizer, capture_command and the capture API's refusals."""

from __future__ import annotations

import os
import struct
import subprocess
import threading

import numpy as np
import pytest

from textpoke import UsageError
from textpoke.ring import CaptureOptions, Recording, SiteInfo, Symbols, capture_command, capture_pid
from textpoke.ring.format import FILE_HEADER, FILE_MAGIC, FILE_VERSION, RECORD_DTYPE, read_ring_header

from textpoke.trampolines.tracer import RingGeometry

from .conftest import capturing


def _synthetic(n: int = 1000) -> Recording:
    records = np.zeros(n, dtype=RECORD_DTYPE)
    records["ts_ns"] = np.arange(n) * 10 + 5_000
    records["tid"] = 42
    records["site"] = np.arange(n) % 2
    records["caller"] = 0x401234
    records["callee"] = np.where(records["site"] == 0, 0x401000, 0x401100)
    records["arg0"] = np.arange(n)
    return Recording(
        records=records,
        sites=(SiteInfo(0, 0x401000, "fentry", "f", None), SiteInfo(1, 0x401200, "call", "main", "g")),
        lost=3, pid=1234, command="./prog --x 'a b'", start_ns=4_000, end_ns=20_000,
        symbols=Symbols.from_ranges([(0x401100, 0x401180, "g"), (0x401000, 0x401100, "f"),
                                     (0x401200, 0x401300, "main")]),
        metadata={"rseq": True},
    )


def test_save_load_round_trip(tmp_path, target):
    """A real capture, saved and loaded: identical records, sites, metadata and symbols."""
    with capturing(target.pid, CaptureOptions(functions=("f", "tick"))) as capture:
        target.ask("calls 1000")
    original = capture.recording
    path = tmp_path / "trace.tpk"
    original.save(path)
    loaded = Recording.load(path)
    assert loaded.records.dtype == RECORD_DTYPE
    assert np.array_equal(loaded.records, original.records)
    assert loaded.sites == original.sites
    for name in ("lost", "pid", "command", "start_ns", "end_ns", "mode", "counts"):
        assert getattr(loaded, name) == getattr(original, name)
    assert loaded.metadata == original.metadata
    assert np.array_equal(loaded.symbols.starts, original.symbols.starts)
    assert loaded.symbolize(original.records["caller"][:10]) == original.symbolize(original.records["caller"][:10])


def test_round_trip_count_mode_and_empty(tmp_path):
    counted = Recording(records=np.zeros(0, RECORD_DTYPE), sites=(SiteInfo(0, 1, "fentry", "f", None),), lost=0,
                        pid=1, command="x", start_ns=0, end_ns=1, counts=np.array([7], dtype=np.uint64),
                        mode="count")
    counted.save(tmp_path / "c.tpk")
    loaded = Recording.load(tmp_path / "c.tpk")
    assert loaded.counts.tolist() == [7] and loaded.mode == "count" and len(loaded.records) == 0


def test_wrong_magic_version_and_truncation_refused(tmp_path):
    good = tmp_path / "good.tpk"
    _synthetic().save(good)
    data = good.read_bytes()

    bad = tmp_path / "magic.tpk"
    bad.write_bytes(b"NOTATPK!" + data[8:])
    with pytest.raises(UsageError, match="not a textpoke recording") as info:
        Recording.load(bad)
    assert info.value.hint

    newer = tmp_path / "version.tpk"
    newer.write_bytes(FILE_HEADER.pack(FILE_MAGIC, FILE_VERSION + 1, RECORD_DTYPE.itemsize,
                                       struct.unpack_from("<I", data, 16)[0]) + data[FILE_HEADER.size:])
    with pytest.raises(UsageError, match="version"):
        Recording.load(newer)

    cut = tmp_path / "cut.tpk"
    cut.write_bytes(data[:-7])
    with pytest.raises(UsageError, match="truncated|damaged"):
        Recording.load(cut)

    empty = tmp_path / "empty.tpk"
    empty.write_bytes(b"")
    with pytest.raises(UsageError):
        Recording.load(empty)


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
    assert len(recording.records) == 3 and recording.lost == 0
    assert "exact_calls" in recording.command
    assert recording.metadata["stopped"] == "exited"


def test_glob_matching_nothing_is_a_usage_error(target):
    with pytest.raises(UsageError, match="glob matched nothing") as info:
        capture_pid(target.pid, CaptureOptions(functions=("no_such_function_*",)))
    assert info.value.hint
    with pytest.raises(UsageError, match="glob matched nothing"):
        capture_pid(target.pid, CaptureOptions(calls_to=("no_such_callee",)))
    with pytest.raises(UsageError, match="mode"):
        capture_pid(target.pid, CaptureOptions(functions=("f",), mode="sample"))
    # The target is untouched and still works.
    assert target.ask("calls 10")["tids"]


def test_duration_and_progress(target):
    progress = []
    recording = capture_pid(target.pid, CaptureOptions(functions=("f",), duration=0.6), on_progress=progress.append)
    assert recording.metadata["stopped"] == "duration"
    assert 0.6e9 <= recording.end_ns - recording.start_ns < 5e9
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
