"""The tool may die while it borrows a thread: SIGKILL it at every ptrace request of an install.

The first attach to a process borrows one of its threads (target/inject.py)
to start the agent. Each trial starts tests/targets/borrowee.c fresh and
forks a tool whose install borrows a chosen thread: the one spinning with
known values in every general and vector register, the one in
clock_nanosleep (restarted through restart_syscall), or the one in read(2)
(restarted by rewinding to the syscall). The tool reports each ptrace request
and memory write it makes; the test kills it right after the n-th one, plus
a random delay of up to 300 us that lands inside or after the next one, for
every n of an install, for each kind of thread.

After each kill the target must run on unchanged: no register, vector
register or MXCSR changed, no syscall returned an error or woke up early,
all three threads progressing. A second attach must then finish or redo the
install: exactly one agent thread, one descriptor of ours (the one the
resident part keeps).

Trials: TEXTPOKE_CHAOS_INSTALL_ROUNDS (default 1) rounds of every kill point
for each of the three threads.
"""

from __future__ import annotations

import os
import random
import time

import pytest

from textpoke.poke import attach
from textpoke.poke import resident as resident_module
from textpoke.poke.resident import find_regions, our_threads
from textpoke.target import _ptrace
from textpoke.target.process import Process

from .harness import Target, env_count, fields, fork_and_kill, run_cli

KINDS = ("spinner", "sleeper", "main")
#: The one descriptor of ours a process keeps: the resident region's, for later sessions.
KEPT = "/memfd:textpoke (deleted)"
#: The binding's requests a borrow makes, reported after each returns.
_REPORTED = ("seize", "interrupt", "set_options", "set_regs", "syscall", "set_sigmask", "tgkill", "detach")


def _tool(pid: int, tid: int, out: int, *, hold: str | None = None) -> None:
    """The forked tool: attach (installing through thread ``tid``), reporting each
    ptrace request and memory write; then wait to be killed (or, with ``hold``,
    stop for good right after the first such request)."""
    try:
        resident_module.choose_thread = lambda process, exclude=frozenset(), wait_s=2.0: tid

        def reporting(name, call):
            def wrapper(*args, **kwargs):
                result = call(*args, **kwargs)
                os.write(out, f"{name}\n".encode())
                if name == hold:
                    time.sleep(3600)
                return result

            return wrapper

        for name in _REPORTED:
            setattr(_ptrace, name, reporting(name, getattr(_ptrace, name)))
        Process.write = reporting("write", Process.write)
        attach(pid).close()
        os.write(out, b"attached\n")
        time.sleep(3600)
    except BaseException as exc:  # the test reports it: the tool must only die by our SIGKILL
        os.write(out, f"error {type(exc).__name__}: {exc}\n".encode())
    finally:
        os._exit(0)


def _events_until(fd: int, count: int | None, timeout: float = 30.0, stop_at: str | None = None) -> list[str]:
    """Read the tool's events until the ``count``-th (None: until "attached" or ``stop_at``)."""
    seen: list[str] = []
    buffer = b""
    deadline = time.monotonic() + timeout
    while True:
        while b"\n" in buffer:
            line, _, buffer = buffer.partition(b"\n")
            seen.append(line.decode())
            assert not seen[-1].startswith("error"), seen[-1]
            if (count is not None and len(seen) == count) or seen[-1] in ("attached", stop_at):
                return seen
        assert time.monotonic() < deadline, f"tool stalled after {seen!r}"
        chunk = os.read(fd, 4096)
        assert chunk, f"tool ended after {seen!r}"
        buffer += chunk


def _run_tool(pid: int, tid: int, kill_after: int | None, delay: float, *, hold: str | None = None) -> list[str]:
    return fork_and_kill(lambda out: _tool(pid, tid, out, hold=hold), lambda events: _events_until(events, kill_after, stop_at=hold),
                         delay)


def _check_unchanged(target: Target, what: str) -> dict[str, int]:
    """The target's threads all progress and none saw anything change."""
    first = fields(target.ask("check"))
    deadline = time.monotonic() + 2.0  # a loaded machine may not run a thread for a while
    while True:
        time.sleep(0.06)
        second = fields(target.ask("check"))
        progressed = second["spins"] > first["spins"] and second["sleeps"] > first["sleeps"]
        if progressed or time.monotonic() > deadline:
            break
    assert (second["bad"], second["errs"]) == (0, 0), f"{what}: {second}"
    assert second["spins"] > first["spins"] and second["sleeps"] > first["sleeps"], f"{what}: {first} {second}"
    return second


def _our_fds(pid: int) -> list[str]:
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return [link for link in links if link.startswith("/memfd:textpoke")]


@pytest.fixture(scope="module")
def borrowee(build_target):
    return build_target("borrowee", fentry=False, extra=("-mavx2",))


@pytest.fixture
def start_borrowee(borrowee):
    started: list[Target] = []

    def start() -> tuple[Target, dict[str, int]]:
        target = _ReadyTarget([str(borrowee)])
        started.append(target)
        return target, target.tids

    yield start
    for target in started:
        target.kill()


class _ReadyTarget(Target):
    """borrowee.c, remembering the thread ids its ready line names."""

    def readline(self, timeout: float = 30.0) -> str:
        line = super().readline(timeout)
        if line.startswith("ready"):
            self.tids = fields(line)
        return line


def test_kill_at_every_ptrace_request_of_an_install(start_borrowee):
    rng = random.Random(20261126)
    # A clean install first: how many reported events it takes.
    target, tids = start_borrowee()
    events = _run_tool(target.pid, tids["main"], None, 0.0)
    assert events[-1] == "attached" and "syscall" in events
    points = events.index("attached")  # kill after event 1 .. points
    _check_unchanged(target, "after a clean install")
    target.kill()
    rounds = env_count("TEXTPOKE_CHAOS_INSTALL_ROUNDS", 1)
    survived = adopted = 0
    for round_ in range(rounds):
        for kind in KINDS:
            for n in range(1, points + 1):
                target, tids = start_borrowee()
                delay = rng.uniform(0.0, 0.0003)
                seen = _run_tool(target.pid, tids[kind], n, delay)
                what = f"{kind} thread, killed {delay * 1e6:.0f} us after {seen[-1]} (event {n}, round {round_})"
                assert target.alive(), what
                _check_unchanged(target, what)
                survived += 1
                process = Process(target.pid)
                waiting = our_threads(process)
                with attach(target.pid) as session:
                    adopted += bool(waiting)
                    assert our_threads(process) == {session.resident.agent_tid}, what
                assert len(find_regions(process)) == 1, what
                assert _our_fds(target.pid) == [KEPT], what
                _check_unchanged(target, what + ", then attached again")
                target.send("stop")
                assert target.proc.wait(10) == 0, what
    assert survived == rounds * len(KINDS) * points
    print(f"{survived} kills at {points} points, {adopted} adopted")
    assert adopted > 0  # some kills left a waiting agent thread, which the next attach adopted


def test_recover_finishes_an_install_a_killed_tool_left(start_borrowee):
    """Killed right after it gave the borrowed thread back: the new thread waits
    for a tool that is gone. `textpoke recover` says so, then finishes the install."""
    target, tids = start_borrowee()
    seen = _run_tool(target.pid, tids["main"], None, 0.0, hold="detach")
    assert seen.count("detach") == 1 and seen[-1] == "detach"
    process = Process(target.pid)
    dry = run_cli("recover", "-p", str(target.pid), "--dry-run")
    assert (dry.returncode, dry.stdout) == (0, f"process {target.pid}: a textpoke killed during its first attach "
                                               "left its agent thread waiting; recover would finish installing "
                                               "it (no site was changed)\n"), dry.stderr
    (waiting,) = our_threads(process)
    done = run_cli("recover", "-p", str(target.pid))
    assert (done.returncode, done.stdout) == (0, f"process {target.pid}: finished the install a killed textpoke "
                                                 "left (its agent thread was waiting); no site had been changed\n"), \
        done.stderr
    (region,) = find_regions(process)
    assert region.owned and region.agent_tid == waiting and our_threads(process) == {waiting}
    assert _our_fds(target.pid) == [KEPT]
    _check_unchanged(target, "after recover")
    again = run_cli("recover", "-p", str(target.pid))
    assert again.returncode == 0 and again.stdout.startswith(f"process {target.pid}: 0 sites known to textpoke")
