"""Starting a program under textpoke when a tracer already follows textpoke's children."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_record_under_strace_f_is_one_clear_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", sys.executable, "-m", "textpoke", "record",
                           "-o", str(tmp_path / "r.tpk"), "--calls-to", "malloc", "--", "/bin/true"],
                          capture_output=True, text=True, timeout=120, env=env)
    lines = done.stderr.splitlines()
    assert done.returncode == 4, done.stderr
    assert "Traceback" not in done.stderr and "preexec_fn" not in done.stderr
    assert lines[0].startswith("textpoke: error: cannot trace /bin/true: it is already traced by strace (pid ")
    assert lines[0].endswith("which traces textpoke and the programs it starts; a process has only one tracer")
    assert len(lines) == 2 and lines[1].startswith("textpoke: hint: run textpoke outside strace -f or gdb")
    assert not (tmp_path / "r.tpk").exists()
