"""What a killed tool leaves is found and put right: on the next attach, and by `textpoke recover`."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time

from textpoke.poke import Patch, attach
from textpoke.poke.recover import Restore, inspect
from textpoke.poke.resident import MBX_DONE, MBX_NR, MBX_REQUEST, SCRATCH
from textpoke.poke.safety import sigtrap_action
from textpoke.target import syscalls as sc
from textpoke.target.process import Process
from textpoke.x86.insn import INT3_BYTE, encode_call

from .harness import read_mem, run_cli, symbols, text_section

_KILLED_TOOL = r"""
import sys, time
from textpoke.poke import attach, Patch, Step
from textpoke.x86.insn import encode_call
pid, site, a, b, stop_at, watch = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]),
                                   sys.argv[5], sys.argv[6] == "watch")
if not watch:  # as if the agent could not tell this tool died: the batch stays in flight
    from textpoke.poke.resident import Resident
    Resident.open_watch = lambda self: False
session = attach(pid)
def hold(step):
    if step.value == stop_at:
        print(step.value, flush=True)
        time.sleep(3600)
session.apply([Patch(site=site, old=encode_call(site, a), new=encode_call(site, b))], on_step=hold)
"""


def _killed_at(pid: int, site: int, syms: dict[str, int], step: str, *, watch: bool = False) -> None:
    """A tool that applies call A -> call B and is SIGKILLed right after ``step``
    (``watch``: with the agent watching it, as every tool does; else unwatched)."""
    tool = subprocess.Popen([sys.executable, "-c", _KILLED_TOOL, str(pid), str(site), str(syms["A"]),
                             str(syms["B"]), step, "watch" if watch else "-"], stdout=subprocess.PIPE, text=True)
    assert tool.stdout.readline().strip() == step
    tool.send_signal(signal.SIGKILL)
    tool.wait()


def _exact(result: dict[str, int]) -> None:
    assert result["bad"] == 0 and result["a"] + result["b"] == result["made"]


def test_agent_finishes_the_batch_of_a_killed_tool_by_itself(life):
    """A tool killed right after its int3 sync: the agent notices through its
    pidfd and finishes the batch (the table's entry, call B), no recover run;
    the next attach finds the text whole and reports who finished what."""
    target = life("4")
    syms = symbols(life.binary)
    site = syms["site_caller"] + 9
    _killed_at(target.pid, site, syms, "int3", watch=True)
    deadline = time.monotonic() + 5
    while read_mem(target.pid, site, 1)[0] == INT3_BYTE and time.monotonic() < deadline:
        time.sleep(0.001)
    assert read_mem(target.pid, site, 5) == encode_call(site, syms["B"])
    with attach(target.pid) as session:
        found = session.recovery
        assert found.agent_heal is not None
        assert (found.agent_heal.sites, found.agent_heal.batches, found.agent_heal.failed_writes) == (1, 1, 0)
        assert found.in_flight == () and found.written == (site,)  # back to A, its baseline
    with attach(target.pid) as session:
        assert session.recovery.agent_heal is None  # reported once
    assert read_mem(target.pid, site, 5) == encode_call(site, syms["A"])
    _exact(target.stop())


def test_recover_cli_finishes_a_batch_left_in_flight(life):
    target = life("4")
    syms = symbols(life.binary)
    site = syms["site_caller"] + 9
    _killed_at(target.pid, site, syms, "int3")
    assert read_mem(target.pid, site, 1)[0] == INT3_BYTE
    time.sleep(0.2)  # meanwhile every call through the site is emulated as call B
    done = run_cli("recover", "-p", str(target.pid), "--dry-run")
    assert done.returncode == 0, done.stderr
    entry = encode_call(site, syms["B"])
    assert done.stdout.splitlines() == [
        f"{site:#x} (site_caller+0x9): {(bytes([INT3_BYTE]) + encode_call(site, syms['A'])[1:]).hex(' ')} in flight (int3, entry "
        f"{entry.hex(' ')}) -> {encode_call(site, syms['A']).hex(' ')}",
        f"process {target.pid}: 1 site known to textpoke, 1 would be rewritten to its original bytes",
    ]
    assert read_mem(target.pid, site, 1)[0] == INT3_BYTE  # the dry run wrote nothing
    done = run_cli("recover", "-p", str(target.pid))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"process {target.pid}: 1 site known to textpoke, 1 left in flight by an interrupted batch, "
        "1 rewritten to its original bytes (3 syncs)",
        "textpoke's handler and agent stay in the process, idle; 0 trampoline regions stay mapped, unused",
    ]
    address, text = text_section(life.binary)
    assert read_mem(target.pid, address, len(text)) == text
    result = target.stop()
    _exact(result)
    assert result["b"] > 0  # the calls made while the site was in flight went to B, emulated


def test_next_attach_undoes_a_dead_session(life):
    """Killed after its batch completed (call B in place, owned by a session
    that will never revert it): the next attach puts call A back by itself."""
    target = life("4")
    syms = symbols(life.binary)
    site = syms["site_caller"] + 9
    _killed_at(target.pid, site, syms, "head")
    assert read_mem(target.pid, site, 5) == encode_call(site, syms["B"])
    with attach(target.pid) as session:
        found = session.recovery
        assert (found.restore, found.sites, found.in_flight, found.written, found.syncs) == (
            Restore.BASELINE, 1, (), (site,), 3)
        assert session.read_insn(site) == encode_call(site, syms["A"])
        assert session.resident.ledger.baseline(site) == encode_call(site, syms["A"])
    _exact(target.stop())


def test_attach_keeps_committed_changes_and_recover_reverts_them(life):
    target = life("2")
    syms = symbols(life.binary)
    site = syms["site_caller"] + 9
    to_a, to_b = encode_call(site, syms["A"]), encode_call(site, syms["B"])
    assert run_cli("patch", "-p", str(target.pid), "--site", f"{site:#x}", "--call", "B").returncode == 0
    with attach(target.pid) as session:
        assert not session.recovery.written and session.read_insn(site) == to_b
    done = run_cli("recover", "-p", str(target.pid), "--to", "baseline")
    assert done.returncode == 0 and "0 rewritten to their baseline bytes (0 syncs)" in done.stdout
    assert read_mem(target.pid, site, 5) == to_b
    done = run_cli("recover", "-p", str(target.pid))
    assert done.returncode == 0 and "1 rewritten to its original bytes (3 syncs)" in done.stdout
    assert read_mem(target.pid, site, 5) == to_a
    with attach(target.pid) as session:  # the originals are the baselines now
        assert not session.recovery.written and session.resident.ledger.baseline(site) == to_a
    _exact(target.stop())


def test_attach_finishes_what_an_install_left_undone(life):
    """A leaked memfd descriptor and a SIGTRAP disposition that is not ours
    (what an install killed before its last step leaves): attach fixes both."""
    target = life("2")
    with attach(target.pid) as session:
        resident = session.resident
        name = b"textpoke-leak\0"
        resident.ctl[SCRATCH : SCRATCH + len(name)] = name
        leaked = resident.syscall(sc.SYS_memfd_create, resident.ctl_address + SCRATCH, sc.MFD_CLOEXEC)
        struct.pack_into("<4Q", resident.ctl, SCRATCH, 0, 0, 0, 0)  # SIG_DFL
        resident.syscall(sc.SYS_rt_sigaction, sc.SIGTRAP, resident.ctl_address + SCRATCH, 0, 8)
        assert sigtrap_action(resident)[0] == 0
    assert os.readlink(f"/proc/{target.pid}/fd/{leaked}") == "/memfd:textpoke-leak (deleted)"
    with attach(target.pid) as session:
        assert (session.recovery.fds_closed, session.recovery.handler_reinstalled) == (1, True)
        assert sigtrap_action(session.resident)[0] == session.resident.labels["handler_1"]  # the next copy
    assert not os.path.exists(f"/proc/{target.pid}/fd/{leaked}")
    result = target.stop()
    _exact(result)


def test_recover_with_nothing_of_ours(life):
    target = life("2")
    maps = open(f"/proc/{target.pid}/maps").read()
    done = run_cli("recover", "-p", str(target.pid))
    assert (done.returncode, done.stdout) == (0, f"process {target.pid} holds nothing of textpoke; nothing to recover\n")
    with Process(target.pid) as process:
        assert inspect(process) == (None, [])
    assert open(f"/proc/{target.pid}/maps").read() == maps  # nothing installed to find that out
    _exact(target.stop())


def _agent_asleep(pid: int, tid: int, timeout_s: float = 5.0) -> None:
    """Wait until the agent thread sleeps on its futex (state S, wchan futex_*)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stat = open(f"/proc/{pid}/task/{tid}/stat").read()
        wchan = open(f"/proc/{pid}/task/{tid}/wchan").read()
        if stat[stat.rindex(")") + 2] == "S" and wchan.startswith("futex"):
            return
        time.sleep(0.001)
    raise AssertionError(f"agent {tid} never went to sleep on its futex")


def test_request_posted_by_a_killed_tool_is_served(life):
    """A tool killed after posting an agent request but before waking the agent
    leaves it asleep on a request it never saw: the next tool wakes it, waits
    for that request, then goes on (quickly, not after a timeout)."""
    target = life("2")
    syms = symbols(life.binary)
    site = syms["site_caller"] + 9
    with attach(target.pid) as session:
        ctl = session.resident.ctl
        requests = session.stats().requests
        # The agent goes back to its futex after the last request it served (attach's
        # own): posting before it got there, it would see the request unwoken.
        _agent_asleep(target.pid, session.resident.agent_tid)
        struct.pack_into("<Q6Q", ctl, MBX_NR, sc.SYS_getpid, 0, 0, 0, 0, 0, 0)
        request = struct.unpack_from("<I", ctl, MBX_REQUEST)[0] + 1
        struct.pack_into("<I", ctl, MBX_REQUEST, request)  # posted, never woken: the tool "died" here
        time.sleep(0.1)
        assert struct.unpack_from("<I", ctl, MBX_DONE)[0] == request - 1
    started = time.monotonic()
    with attach(target.pid, timeout_s=5.0) as session:
        assert time.monotonic() - started < 2
        # served: the orphan getpid, then attach's own SIGTRAP query (membarrier is
        # registered once per process image: the first attach did it)
        assert session.stats().requests == requests + 2
        session.apply([Patch(site=site, old=encode_call(site, syms["A"]), new=encode_call(site, syms["B"]))])
    assert read_mem(target.pid, site, 5) == encode_call(site, syms["A"])
    _exact(target.stop())


def test_an_armed_agent_is_always_found_where_it_lives(life):
    """An armed agent (a batch in flight: it wakes every millisecond to look at its tool)
    is found by every look of the next attach. Its /proc/.../syscall was read twice, and
    an agent that woke between the reads looked blocked, then had no address: its region
    went unseen, and the next attach of a killed tool's batch installed a second resident
    part and left the batch's int3 in place (tests/chaos/test_heal.py, about 1 run in 50)."""
    from textpoke.poke.resident import WATCH_IDLE, WATCH_STATE, find_regions

    target = life("2")
    with attach(target.pid) as session:
        resident = session.resident
        assert resident.open_watch()
        resident.arm()
        try:
            with Process(target.pid) as process:
                looks = [tuple(r.owned for r in find_regions(process)) for _ in range(2000)]
        finally:
            assert resident.disarm()
        assert struct.unpack_from("<I", resident.ctl, WATCH_STATE)[0] == WATCH_IDLE
    assert looks.count((True,)) == 2000, {look: looks.count(look) for look in set(looks)}
    _exact(target.stop())
