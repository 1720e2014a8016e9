"""A long-running process traced again and again, sometimes with textpoke killed
mid-trace, does not grow: the regions of ended sessions are reused, a killed one's
region is reclaimed by the next attach, the flag bytes share one page."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from textpoke.capture import CaptureOptions, capture_pid

from .harness import Target, env_count

SESSIONS = env_count("TEXTPOKE_CHAOS_SESSIONS", 20)


def status(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmSize", "VmRSS"):
            fields[name] = int(value.split()[0])
    fields["mappings"] = len(Path(f"/proc/{pid}/maps").read_text().splitlines())
    return fields


def killed_session(pid: int, tmp: Path, k: int) -> None:
    """`textpoke trace` killed with SIGKILL while it records."""
    out = tmp / f"killed{k}.tpk"
    tool = subprocess.Popen([sys.executable, "-m", "textpoke", "trace", "-p", str(pid), "-f", "traced", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = Path(f"{out}.partial")
    deadline = time.monotonic() + 60
    while not (partial.exists() and partial.stat().st_size > 4096) and time.monotonic() < deadline:
        assert tool.poll() is None
        time.sleep(0.02)
    tool.send_signal(signal.SIGKILL)
    tool.wait()


def test_sessions_leave_the_process_as_they_found_it(build_target, tmp_path):
    target = Target([str(build_target("life")), "2"])
    try:
        seen = []
        for k in range(SESSIONS + 1 + SESSIONS % 2):  # the first and the last clean (a killed one keeps its ring)
            if k % 2:
                killed_session(target.pid, tmp_path, k)
            else:
                recording = capture_pid(target.pid, CaptureOptions(functions=("traced",), duration=0.05))
                assert recording.lost == 0 and recording.record_count > 0
                recording.close()
            seen.append(status(target.pid))
        first, last = seen[0], seen[-1]  # after the first session: the resident part and runtime exist
        print(f"{len(seen)} sessions ({len(seen) // 2} killed): VmSize {first['VmSize']} -> {last['VmSize']} kB, VmRSS "
              f"{first['VmRSS']} -> {last['VmRSS']} kB, mappings {first['mappings']} -> {last['mappings']}")
        assert last["mappings"] == first["mappings"]
        assert last["VmSize"] == first["VmSize"]
        assert last["VmRSS"] - first["VmRSS"] < 8 * 1024  # a few MB at most
        result = target.stop()
    finally:
        target.kill()
    assert result["bad"] == 0
