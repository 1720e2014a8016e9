"""Stock redis-server (Debian's package, default config) traced live.

Its jemalloc background thread (``jemalloc_bg_thd``) blocks nearly every
signal, SIGTRAP included, for good: such a process used to be refused. Each
batch now holds that thread while its int3s are in place. The test traces
every call site of ``zmalloc`` while redis-benchmark runs against it: every
request must succeed, every record be kept, and redis must be healthy after.
Skipped, with the reason, where the package cannot be installed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from textpoke.poke import attach
from textpoke.capture import CaptureOptions, capture_pid

from .harness import read_mem


def _installed() -> str | None:
    """Why redis cannot be used here, or None (installs the package when root may)."""
    if shutil.which("redis-server") and shutil.which("redis-benchmark"):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "redis-server is not installed and apt-get cannot be run here"
    try:
        subprocess.run(["apt-get", "install", "-y", "-qq", "redis-server", "redis-tools"], check=True,
                       capture_output=True, timeout=600)
    except (subprocess.SubprocessError, OSError) as exc:
        return f"apt-get install redis-server redis-tools failed: {exc}"
    return None if shutil.which("redis-server") else "apt-get installed no redis-server"


@pytest.fixture
def redis(tmp_path: Path):
    reason = _installed()
    if reason:
        pytest.skip(reason)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1"], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while _cli(port, "ping") != "PONG":
            assert time.monotonic() < deadline and server.poll() is None, "redis-server did not start"
            time.sleep(0.05)
        yield server.pid, port
    finally:
        server.kill()
        server.wait()


def _cli(port: int, *args: str) -> str:
    done = subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=30)
    return done.stdout.strip()


def _thread_names(pid: int) -> dict[int, str]:
    return {int(t): Path(f"/proc/{pid}/task/{t}/comm").read_text().strip() for t in os.listdir(f"/proc/{pid}/task")}


def test_stock_redis_traced_live_under_benchmark(redis):
    pid, port = redis
    names = _thread_names(pid)
    (bg,) = [tid for tid, name in names.items() if name == "jemalloc_bg_thd"]
    blocked = int(next(line for line in Path(f"/proc/{pid}/task/{bg}/status").read_text().splitlines()
                       if line.startswith("SigBlk:")).split()[1], 16)
    assert blocked & (1 << 4)  # SIGTRAP (5) blocked: refused before textpoke held such threads

    stop = threading.Event()
    box: dict[str, object] = {}

    def trace() -> None:
        try:
            box["recording"] = capture_pid(pid, CaptureOptions(calls_to=("zmalloc",)), stop_event=stop)
        except BaseException as exc:  # reported by the test thread
            box["error"] = exc

    tracer = threading.Thread(target=trace)
    tracer.start()
    try:
        deadline = time.monotonic() + 30
        while not any(name == "textpoke-agent" for name in _thread_names(pid).values()):
            assert tracer.is_alive() and time.monotonic() < deadline, box.get("error")
            time.sleep(0.01)
        time.sleep(0.3)  # the tracing batch is in place
        bench = subprocess.run(["redis-benchmark", "-p", str(port), "-n", "20000", "-c", "8", "-t",
                                "set,get,lpush,lpop,incr", "-d", "64", "--csv"],
                               capture_output=True, text=True, timeout=300)
    finally:
        stop.set()
        tracer.join(120)
    assert "error" not in box, box.get("error")
    recording = box["recording"]
    assert bench.returncode == 0, bench.stderr
    assert "error" not in (bench.stdout + bench.stderr).lower()
    rows = [line for line in bench.stdout.splitlines()[1:] if line]
    assert len(rows) == 5  # one row per test: every one of its 20,000 requests answered
    assert len(recording.records) > 20000 and recording.lost == 0
    assert {recording.sites[i].target_name for i in set(recording.records["site"].tolist())} <= {"zmalloc"}
    # Healthy afterwards: answers, keeps data, nothing of ours left patched.
    assert _cli(port, "ping") == "PONG"
    assert _cli(port, "set", "after", "ok") == "OK" and _cli(port, "get", "after") == "ok"
    assert _thread_names(pid)[bg] == "jemalloc_bg_thd"
    with attach(pid) as session:
        assert session.recovery.written == () and session.recovery.in_flight == ()
        for site in recording.sites:
            assert read_mem(pid, site.address, 1)[0] == 0xE8  # the call to zmalloc again
    print(f"redis-server {pid} with jemalloc_bg_thd (SigBlk {blocked:#x}): {len(recording.sites)} zmalloc call "
          f"sites traced during redis-benchmark ({len(rows)} tests x 20000 requests, all OK): "
          f"{len(recording.records)} records, 0 lost")
