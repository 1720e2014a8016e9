"""Outputs that cannot be written: a full disk, /dev/full. One clear line, no
traceback, no destroyed file, and what could be kept is kept and named."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from textpoke.ring import Recording

from .conftest import tiny_recording


def textpoke(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "textpoke", *args], capture_output=True, text=True, timeout=300,
                          **kwargs)


def assert_one_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.startswith("textpoke: error:")]
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], result.stderr


@contextlib.contextmanager
def small_disk(tmp_path: Path, size: str = "3m") -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("needs to mount a small tmpfs (root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_record_on_a_full_disk(tmp_path, build_target):
    """The disk fills while tracing: tracing stops, every site is restored, the program
    runs to its end (and textpoke waits for it), the whole chunks written are in
    FILE.partial, readable, and an existing FILE is left as it was."""
    hot = build_target("hot")
    with small_disk(tmp_path) as disk:
        out = disk / "run.tpk"
        out.write_text("an older recording\n")
        result = textpoke("record", "-f", "work", "-o", str(out), "--", str(hot), "s2", "2")
        assert result.returncode == 15, result.stderr
        assert_one_error(result, "No space left on device", "every site was restored")
        assert f"{out}.partial" in result.stderr and "textpoke report" in result.stderr
        assert re.search(r"^total \d+", result.stdout, re.M)  # the program ran to its end
        assert out.read_text() == "an older recording\n"
        with Recording.load(f"{out}.partial") as recording:
            assert recording.cut is not None and recording.record_count > 0
            assert recording.sites[0].function == "work"
        report = textpoke("report", f"{out}.partial")
        assert report.returncode == 0 and "CUT SHORT" in report.stdout


def test_dump_to_dev_full_and_a_full_disk(tmp_path):
    path = tmp_path / "run.tpk"
    tiny_recording().save(path)
    assert_one_error(textpoke("dump", str(path), "-o", "/dev/full"), "cannot write /dev/full")
    assert not Path("/dev/full.partial").exists()
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "textpoke", "report", str(path)], stdout=full,
                                stderr=subprocess.PIPE, text=True, timeout=60)
    assert_one_error(result, "cannot write the output")
    with small_disk(tmp_path, "64k") as disk:
        big = tmp_path / "big.tpk"
        from .test_report import big_recording

        big_recording(20_000).save(big)
        out = disk / "dump.txt"
        out.write_text("kept\n")
        assert_one_error(textpoke("dump", str(big), "-o", str(out)), "No space left on device", "nothing was written")
        assert out.read_text() == "kept\n"
        assert not Path(f"{out}.partial").exists()
