"""``textpoke record / trace / report / dump`` on real processes (tests/targets/cli_calls.c)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

NOP5 = bytes.fromhex("0f1f440000")


def textpoke(*args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "textpoke", *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


def timed_rows(report: str) -> dict[str, int]:
    """function -> calls from a report with times (total self avg min max calls function)."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["total", "self"])
    found = {}
    for line in lines[start + 1:]:
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) < 7:
            break
        found[cells[6]] = int(cells[5].replace(",", ""))
    return found


def rows(report: str) -> dict[str, tuple[int, str]]:
    """function -> (calls, rest of the row) from the summary table."""
    found = {}
    for m in re.finditer(r"^\s+([\d,]+)\s+\S+\s+\S+%\s+(\S+)(.*)$", report, re.M):
        found[m.group(2)] = (int(m.group(1).replace(",", "")), m.group(3).strip())
    return found


def assert_one_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    lines = result.stderr.splitlines()
    assert result.returncode != 0
    assert len(lines) == 2 and lines[0].startswith("textpoke: error: ") and lines[1].startswith("textpoke: hint: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def target(build_target) -> Path:
    return build_target("cli_calls")


def function_address(binary: Path, name: str) -> int:
    with open(binary, "rb") as f:
        return ELFFile(f).get_section_by_name(".symtab").get_symbol_by_name(name)[0]["st_value"]


def test_record_then_report_durations(target, tmp_path):
    """The default: every call's entry and exit; the report gives times per function."""
    path = tmp_path / "once.tpk"
    result = textpoke("record", "-f", "work*", "-f", "never_called", "-o", str(path), "--", str(target), "once")
    # The program's own output and exit status come through untouched.
    assert result.returncode == 3, result.stderr
    assert re.fullmatch(r"alpha=1000 beta=250 gamma=3 sum=\d+ ok\n", result.stdout)
    (line,) = result.stderr.splitlines()
    assert re.fullmatch(rf"textpoke: recorded pid \d+ for [\d.]+ s: 1,253 calls \(2,506 records\), 0 lost, "
                        rf"4 sites -> {path}", line)
    report = textpoke("report", str(path))
    assert report.returncode == 0, report.stderr
    assert timed_rows(report.stdout) == {"work_alpha": 1000, "work_beta": 250, "work_gamma": 3}
    assert "frames: 1,253 (1,253 returned)" in report.stdout


def test_record_then_report(target, tmp_path):
    # No "wait" argument: record holds the program at its entry point until
    # the batch is in place, so even its first calls are counted exactly.
    path = tmp_path / "once.tpk"
    result = textpoke("record", "--entry-only", "-f", "work*", "-f", "never_called", "-o", str(path), "--",
                      str(target), "once")
    # The program's own output and exit status come through untouched.
    assert result.returncode == 3, result.stderr
    assert re.fullmatch(r"alpha=1000 beta=250 gamma=3 sum=\d+ ok\n", result.stdout)
    (line,) = result.stderr.splitlines()
    assert re.fullmatch(rf"textpoke: recorded pid \d+ for [\d.]+ s: 1,253 records, 0 lost, 4 sites -> {path}",
                        line)

    report = textpoke("report", str(path))
    assert report.returncode == 0, report.stderr
    found = rows(report.stdout)
    assert {name: calls for name, (calls, _) in found.items()} == {"work_alpha": 1000, "work_beta": 250, "work_gamma": 3}
    assert found["work_alpha"][1].startswith("one_pass (600), helper (400)")
    assert found["work_beta"][1].startswith("driver (250)")
    assert found["work_gamma"][1].startswith("one_pass (3)")
    assert "1 traced function never called" in report.stdout

    text = textpoke("dump", str(path))
    calls = [ln for ln in text.stdout.splitlines() if not ln.startswith("#")]
    assert len(calls) == 1253
    assert sum(ln.endswith(": work_beta <-driver") for ln in calls) == 250
    chrome = textpoke("dump", str(path), "--format", "chrome")
    events = json.loads(chrome.stdout)["traceEvents"]
    assert sum(e["ph"] == "i" for e in events) == 1253


def test_record_count_mode(target, tmp_path):
    path = tmp_path / "count.tpk"
    result = textpoke("record", "--count", "-f", "work_*", "-o", str(path), "--", str(target), "once")
    assert result.returncode == 3, result.stderr
    report = textpoke("report", str(path))
    assert {n: c for n, (c, _) in rows(report.stdout).items()} == {"work_alpha": 1000, "work_beta": 250, "work_gamma": 3}


class Looping:
    """cli_calls in loop mode: runs passes until told to stop, checking each one."""

    def __init__(self, binary: Path) -> None:
        self.proc = subprocess.Popen([str(binary), "loop"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().startswith("ready")

    def code(self, address: int) -> bytes:
        with open(f"/proc/{self.proc.pid}/mem", "rb") as mem:
            mem.seek(address)
            return mem.read(5)

    def stop(self) -> dict[str, int]:
        out, _ = self.proc.communicate("stop\n", timeout=30)
        assert self.proc.returncode == 0
        return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", out)}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def looping(target):
    running = Looping(target)
    yield running
    running.kill()


def check_trace_summary(stdout: str) -> None:
    found = timed_rows(stdout)
    alpha, beta, gamma = (found[f"work_{n}"] for n in ("alpha", "beta", "gamma"))
    # Per pass: 1000 alpha, 250 beta, 3 gamma; a window cuts at most one pass at each edge.
    assert beta > 0
    assert abs(alpha - 4 * beta) <= 2 * 1000
    assert abs(gamma - 3 * beta / 250) <= 2 * 3


def test_trace_duration(target, looping):
    sites = [function_address(target, f"work_{n}") for n in ("alpha", "beta", "gamma")]
    result = textpoke("trace", "-p", str(looping.proc.pid), "-f", "work_*", "--duration", "1")
    assert result.returncode == 0, result.stderr
    check_trace_summary(result.stdout)
    assert re.fullmatch(rf"textpoke: traced pid {looping.proc.pid} for [\d.]+ s: [\d,]+ calls \([\d,]+ records\), "
                        rf"0 lost, 3 sites\n", result.stderr)
    # detached: every byte back, the target still running and still right
    assert looping.proc.poll() is None
    assert all(looping.code(site) == NOP5 for site in sites)
    time.sleep(0.2)
    result = looping.stop()
    assert result["passes"] > 0 and result["bad"] == 0


def wait_patched(looping: Looping, address: int, timeout: float = 30) -> None:
    """Until the fentry site at ``address`` is a call: the trace is running."""
    deadline = time.monotonic() + timeout
    while looping.code(address)[0] != 0xE8:
        assert time.monotonic() < deadline, "the trace never started"
        time.sleep(0.01)


def test_trace_stops_on_first_sigint(target, looping, tmp_path):
    path = tmp_path / "live.tpk"
    alpha = function_address(target, "work_alpha")
    tracer = subprocess.Popen([sys.executable, "-m", "textpoke", "trace", "-p", str(looping.proc.pid), "-f", "work_*",
                               "-o", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_patched(looping, alpha)
    time.sleep(0.3)
    tracer.send_signal(signal.SIGINT)
    out, err = tracer.communicate(timeout=30)
    assert tracer.returncode == 0, err
    assert err.rstrip().endswith(f"-> {path}")
    report = textpoke("report", str(path))
    check_trace_summary(report.stdout)
    assert looping.proc.poll() is None
    assert looping.code(alpha) == NOP5
    assert looping.stop()["bad"] == 0


def test_glob_matching_nothing(looping):
    result = textpoke("trace", "-p", str(looping.proc.pid), "-f", "no_such_function_*", "--duration", "1")
    assert_one_error(result)
    assert looping.stop()["bad"] == 0


def test_record_missing_program(tmp_path):
    result = textpoke("record", "-o", str(tmp_path / "x.tpk"), "--", str(tmp_path / "no-such-program"))
    assert_one_error(result, "no-such-program")


def test_real_file_errors(tmp_path):
    assert_one_error(textpoke("report", str(tmp_path / "missing.tpk")), "no such recording")
    junk = tmp_path / "junk.tpk"
    junk.write_bytes(b"\x7fELF not a recording at all" * 10)
    assert_one_error(textpoke("report", str(junk)))
    assert_one_error(textpoke("dump", str(junk)))
    assert_one_error(textpoke("trace", "-p", str(1 << 23)), "no process with pid")


def test_dump_into_closed_pipe_is_quiet(target, tmp_path):
    path = tmp_path / "once.tpk"
    assert textpoke("record", "-f", "work*", "-o", str(path), "--", str(target), "once").returncode == 3
    result = subprocess.run(f"{sys.executable} -m textpoke dump {path} | head -3", shell=True,
                            capture_output=True, text=True, timeout=60)
    assert len(result.stdout.splitlines()) == 3 and result.stderr == ""
