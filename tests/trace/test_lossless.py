"""Lossless, unbounded recordings: `textpoke record` of threads calling flat out loses
nothing, whatever the thread count; a stalled or killed textpoke never hangs the
program, and its file stays readable."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from textpoke import UsageError
from textpoke.ring import Recording, RecordKind
from textpoke.ring.file import ChunkKind, RecordingFile

N = 200_000


@pytest.fixture(scope="module")
def hot(build_target) -> Path:
    return build_target("hot")


def textpoke(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "textpoke", *args], capture_output=True, text=True,
                          timeout=300, **kwargs)


def program_counts(stdout: str) -> dict[int, int]:
    """{tid: calls} as the hot program printed them."""
    return {int(tid): int(calls) for tid, calls in re.findall(r"thread (\d+) calls (\d+)", stdout)}


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_record_flat_out_loses_nothing(tmp_path, hot, threads):
    """The issue's command, with no option: N calls per thread, every one recorded (its
    entry and its exit), in each thread's own order, counts equal to the program's own."""
    out = tmp_path / "run.tpk"
    result = textpoke("record", "-f", "work", "-o", str(out), "--", str(hot), str(N), str(threads))
    assert result.returncode == 0, result.stderr
    assert f"{N * threads:,} calls ({2 * N * threads:,} records), 0 lost" in result.stderr
    counts = program_counts(result.stdout)
    assert len(counts) == threads and sum(counts.values()) == N * threads
    with Recording.load(out) as recording:
        assert recording.lost == 0 and recording.cut is None
        records = recording.records
        assert len(records) == 2 * N * threads
        entries = records[records["kind"] == RecordKind.ENTER]
        tids, per_tid = np.unique(entries["tid"], return_counts=True)
        assert dict(zip(tids.tolist(), per_tid.tolist())) == counts
        for tid in counts:
            mine = records[records["tid"] == tid]
            assert (mine["arg0"][0::2] == np.arange(N)).all()  # enter work(i)
            assert (mine["arg0"][1::2] == np.arange(N) ^ 0x5A).all()  # its exit: work's result
        assert (np.diff(records["ts_ns"].astype(np.int64)) >= 0).all()


def _record(hot: Path, out: Path, seconds: float, threads: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "textpoke", "record", "-f", "work", "-o", str(out), *extra,
                             "--", str(hot), f"s{seconds}", str(threads)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_records(out: Path, proc: subprocess.Popen) -> None:
    """Until the recording has a chunk of records on disk (tracing is under way)."""
    partial = Path(str(out) + ".partial")
    deadline = time.monotonic() + 180  # generous: a loaded machine is slow, never wrong
    while time.monotonic() < deadline:
        if partial.exists() and partial.stat().st_size > 64:
            try:
                file = RecordingFile.open(partial)
            except UsageError:
                file = None
            if file is not None:
                found = any(c.kind is ChunkKind.RECORDS for c in file.chunks)
                file.close()
                if found:
                    return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("no records were written")


def _program_of(tool: int) -> int:
    children = Path(f"/proc/{tool}/task/{tool}/children").read_text().split()
    assert len(children) == 1
    return int(children[0])


def test_killed_textpoke_never_hangs_the_program(tmp_path, hot):
    """kill -9 of a lossless textpoke while 4 threads wait on it: their waits end at
    once (they drop and count from then on), the program runs to its end and exits 0,
    and the file is readable up to its last whole chunk."""
    out = tmp_path / "run.tpk"
    tool = _record(hot, out, 2.0, 4, "--wait-limit", "30")
    _wait_for_records(out, tool)
    program = _program_of(tool.pid)
    os.kill(tool.pid, signal.SIGKILL)
    tool.wait()
    # The program's output goes to the pipe the tool gave it; it ends on its own.
    deadline = time.monotonic() + 20  # far below the 30 s wait limit: the waits saw the tool die
    while Path(f"/proc/{program}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    stdout = tool.stdout.read()
    assert not Path(f"/proc/{program}").exists(), "the program hangs on a dead textpoke"
    assert re.search(r"total (\d+)", stdout), stdout
    assert not out.exists()
    with Recording.load(str(out) + ".partial") as recording:
        assert recording.cut is not None and "no end marker" in recording.cut
        assert 0 < recording.record_count <= int(re.search(r"total (\d+)", stdout).group(1))
        assert recording.sites[0].function == "work"


def test_stalled_textpoke_program_drops_after_the_limit(tmp_path, hot):
    """textpoke stopped (SIGSTOP) past --wait-limit: the program's threads stop waiting
    and count drops; continued, textpoke finishes the file, and records + lost is
    exactly the program's own count."""
    out = tmp_path / "run.tpk"
    tool = _record(hot, out, 2.0, 2, "--wait-limit", "0.3")
    _wait_for_records(out, tool)
    os.kill(tool.pid, signal.SIGSTOP)
    time.sleep(1.0)
    os.kill(tool.pid, signal.SIGCONT)
    stdout, stderr = tool.communicate(timeout=120)
    assert tool.returncode == 0, stderr
    total = int(re.search(r"total (\d+)", stdout).group(1))
    with Recording.load(out) as recording:
        assert recording.lost > 0 and recording.metadata["lost_full"] == recording.lost
        assert recording.record_count + recording.lost == 2 * total  # an entry and an exit a call
    report = textpoke("report", str(out))
    assert "found the buffer full" in report.stdout and "LOST" in report.stdout


def test_memory_stays_bounded(tmp_path, hot):
    """Several seconds of 4 threads flat out: tens of millions of records stream to the
    file while textpoke's resident memory stays under 300 MB, and none is lost."""
    out = tmp_path / "long.tpk"
    script = (
        "import resource, subprocess, sys\n"
        f"r = subprocess.run([sys.executable, '-m', 'textpoke', 'record', '-f', 'work', '-o', {str(out)!r},"
        f" '--', {str(hot)!r}, 's3', '4'], capture_output=True, text=True)\n"
        "print(r.returncode); print(r.stdout); print(r.stderr, file=sys.stderr)\n"
        "print('maxrss_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.stdout.startswith("0\n"), result.stdout + result.stderr
    total = int(re.search(r"total (\d+)", result.stdout).group(1))
    maxrss_mb = int(re.search(r"maxrss_kb (\d+)", result.stdout).group(1)) / 1024
    print(f"{total:,} calls recorded; textpoke's peak RSS {maxrss_mb:.0f} MB; file {out.stat().st_size >> 20} MiB")
    assert maxrss_mb < 300
    with Recording.load(out) as recording:
        assert recording.lost == 0 and recording.record_count == 2 * total
        entries = 0
        for chunk in recording.chunks():
            entries += int(np.count_nonzero(chunk["kind"] == RecordKind.ENTER))
            assert (chunk["site"] == 0).all()
        assert entries == total
