"""What `textpoke record` does to the program it starts: a refused selection runs
nothing of it; a signal ends the tracing, never the program (the terminal's Ctrl-C
reaches the program itself; SIGTERM and SIGHUP are passed on to it)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from textpoke.ring import Recording

NOP5 = bytes.fromhex("0f1f440000")


@pytest.fixture(scope="module")
def job(build_target) -> Path:
    return build_target("job")


def textpoke(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "textpoke", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("selection", [["--calls-to", "no_such_callee"], ["-f", "no_such_function"], ["-f", "step"]],
                         ids=["calls-to typo", "function typo", "no fentry sites"])
def test_refused_selection_runs_nothing(tmp_path, selection):
    """The program is held at its entry point while the selection is resolved: a refusal
    kills it there, before it ran an instruction of its own (three tries, as the issue's)."""
    for attempt in range(3):
        side = tmp_path / f"side_effect{attempt}"
        out = tmp_path / f"x{attempt}.tpk"
        result = textpoke("record", *selection, "-o", str(out), "--", "sh", "-c", f"touch {side}")
        lines = result.stderr.splitlines()
        assert result.returncode == 12, result.stderr
        assert len(lines) == 2 and lines[0].startswith("textpoke: error: ") and lines[1].startswith("textpoke: hint: ")
        assert "textpoke sites sh" in lines[1]  # a command that works for a program record starts
        assert not side.exists(), "the refused program ran"
        assert not out.exists() and not Path(str(out) + ".partial").exists()


class Job:
    """`textpoke record -f step -- job ...` in a session of its own (its process group
    stands for the terminal's foreground job)."""

    def __init__(self, binary: Path, tmp: Path, *args: str) -> None:
        self.out = tmp / "job.tpk"
        self.tool = subprocess.Popen([sys.executable, "-m", "textpoke", "record", "-f", "step", "-o", str(self.out),
                                      "--", str(binary), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        line = self.tool.stdout.readline()
        m = re.match(r"job (\d+) child (\d+)", line)
        assert m, (line, self.tool.stderr.read() if self.tool.poll() is not None else "")
        self.pid, self.child = int(m.group(1)), int(m.group(2))
        self.step = self._function("step", binary)
        deadline = time.monotonic() + 30
        while self.code() == NOP5:  # until the batch is in place
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.2)

    @staticmethod
    def _function(name: str, binary: Path) -> int:
        from elftools.elf.elffile import ELFFile

        with open(binary, "rb") as f:
            return ELFFile(f).get_section_by_name(".symtab").get_symbol_by_name(name)[0]["st_value"]

    def code(self) -> bytes:
        with open(f"/proc/{self.pid}/mem", "rb") as mem:
            mem.seek(self.step)
            return mem.read(5)

    def ctrl_c(self) -> None:
        os.killpg(self.tool.pid, signal.SIGINT)  # what the terminal does: the whole foreground job

    def alive(self, pid: int) -> bool:
        try:
            return not Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
        except OSError:
            return False

    def wait_stderr(self, pattern: str) -> str:
        """stderr lines until one matches (the tool keeps running meanwhile)."""
        seen = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.tool.stderr.readline()
            seen.append(line)
            if re.search(pattern, line):
                return "".join(seen)
            assert line, "".join(seen)
        raise AssertionError("".join(seen))

    def close(self) -> None:
        for pid in (self.tool.pid, self.pid, self.child):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self.tool.wait()


def test_ctrl_c_stops_tracing_program_ignoring_it_runs_on(tmp_path, job):
    """Ctrl-C: every site restored and the recording saved at once; the program
    (which ignores SIGINT) and its child run on, untraced; textpoke waits for the
    program and passes on its exit status."""
    run = Job(job, tmp_path, "ignore-int")
    try:
        run.ctrl_c()
        said = run.wait_stderr(r"waiting for it to exit")
        assert "0 lost" in said and f"-> {run.out}" in said
        assert run.out.exists() and run.code() == NOP5
        assert run.alive(run.pid) and run.alive(run.child)
        with Recording.load(run.out) as recording:
            assert recording.cut is None and recording.lost == 0 and recording.record_count > 0
        time.sleep(0.3)
        assert run.tool.poll() is None and run.alive(run.pid)  # still waiting, nothing signalled
        run.tool.stdin.write("stop\n")
        run.tool.stdin.flush()
        assert run.tool.wait(timeout=30) == 5  # the program's own status
        assert "steps=" in run.tool.stdout.read()
    finally:
        run.close()


def test_second_ctrl_c_leaves_the_program_running(tmp_path, job):
    run = Job(job, tmp_path, "ignore-int")
    try:
        run.ctrl_c()
        run.wait_stderr(r"waiting for it to exit")
        run.ctrl_c()
        said = run.wait_stderr(r"keeps running")
        assert f"pid {run.pid}" in said
        assert run.tool.wait(timeout=30) == 0
        assert run.alive(run.pid) and run.alive(run.child) and run.code() == NOP5
    finally:
        run.close()


def test_sigterm_is_passed_on(tmp_path, job):
    """SIGTERM to textpoke (a supervisor stopping the job): tracing ends, the recording
    is saved, the program gets the SIGTERM as it would have, and its status comes back."""
    run = Job(job, tmp_path)
    try:
        os.kill(run.tool.pid, signal.SIGTERM)
        assert run.tool.wait(timeout=60) == 128 + signal.SIGTERM
        with Recording.load(run.out) as recording:
            assert recording.lost == 0 and recording.record_count > 0
    finally:
        run.close()


def test_record_a_program_whose_threads_block_sigtrap(build_target, tmp_path):
    """Threads that block every signal (an int3 would kill the process) are held through
    the restore batch while the others run: every call is recorded, none of their
    syscalls sees EINTR, the program ends as it would alone."""
    binary = build_target("blockers")
    out = tmp_path / "blockers.tpk"
    tool = subprocess.Popen([sys.executable, "-m", "textpoke", "record", "--calls-to", "A", "-o", str(out), "--",
                             str(binary), "2", "2"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert tool.stdout.readline().startswith("ready")
    time.sleep(1.0)
    tool.stdin.write("poke 5\nstop\n")
    tool.stdin.flush()
    stdout, stderr = tool.communicate(timeout=120)
    assert tool.returncode == 0, stderr
    assert "poked" in stdout
    counts = dict(kv.split("=") for kv in stdout.splitlines()[-1].split())
    assert int(counts["made"]) > 0 and counts["eintr"] == "0" and counts["bad"] == "0"
    assert counts["epolled"] == counts["read"] == "5"
    with Recording.load(out) as recording:
        assert recording.record_count == int(counts["a"]) == int(counts["made"])
        assert recording.lost == 0
