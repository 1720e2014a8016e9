"""A thread that has finished exiting is refused by ptrace with EPERM, as a thread
of another user is: textpoke takes it for gone (held: skipped; borrowed: another
thread is chosen), never for a lack of permission."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from textpoke.target.hold import HeldThread
from textpoke.target.inject import BorrowedThread
from textpoke.target.process import Process, thread_exiting
from textpoke._errors import NotAUserProcess, TargetExited


@pytest.fixture
def zombie_leader(build_target):
    proc = subprocess.Popen([str(build_target("zombie_leader"))], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    yield proc
    proc.kill()
    proc.wait()


def _worker(pid: int) -> int:
    workers = [int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid]
    assert len(workers) == 1
    return workers[0]


def test_a_process_whose_main_thread_exited_is_refused_in_one_line(zombie_leader):
    with pytest.raises(NotAUserProcess, match=r"main thread of process \d+ has exited \(pthread_exit\) while 1 thread runs on"):
        Process(zombie_leader.pid)


def test_a_zombie_leader_is_exiting_and_its_worker_is_not(zombie_leader):
    pid = zombie_leader.pid
    assert thread_exiting(pid, pid) is True
    assert thread_exiting(pid, _worker(pid)) is False
    assert thread_exiting(pid, 1 << 22) is True  # no such thread


def test_holding_a_zombie_leader_finds_it_gone(zombie_leader):
    pid = zombie_leader.pid
    with Process(_worker(pid)) as process:  # (the process seen through its live thread)
        held = HeldThread(process, pid)
        held.hold()
        assert (held.gone, held.held) == (True, False)
    assert zombie_leader.poll() is None


def test_borrowing_chooses_another_thread_than_the_zombie_leader(zombie_leader):
    pid = zombie_leader.pid
    worker = _worker(pid)
    with Process(worker) as process:
        with pytest.raises(TargetExited):  # that thread, given: it is gone
            with BorrowedThread(process, pid):
                pass
        borrowed = BorrowedThread(process)
        borrowed.tid = pid  # as if the leader had been chosen, then exited before the seize
        with borrowed as thread:
            assert thread.tid == worker
    assert zombie_leader.poll() is None


def test_the_cli_refuses_a_process_whose_main_thread_exited_in_one_line(zombie_leader):
    pid = zombie_leader.pid
    maps_before = open(f"/proc/{_worker(pid)}/maps").read()
    done = subprocess.run([sys.executable, "-m", "textpoke", "trace", "-p", str(pid), "-f", "work", "--count",
                           "--duration", "0.1"], capture_output=True, text=True, timeout=60)
    lines = done.stderr.splitlines()
    assert (done.returncode, len(lines), done.stdout) == (10, 2, ""), done.stderr
    assert lines[0] == (f"textpoke: error: the main thread of process {pid} has exited (pthread_exit) while "
                        "1 thread runs on: textpoke cannot trace such a process")
    assert lines[1].startswith("textpoke: hint: ")
    assert open(f"/proc/{_worker(pid)}/maps").read() == maps_before  # nothing mapped into it
    assert zombie_leader.poll() is None
