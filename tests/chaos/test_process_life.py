"""Process life while textpoke patches: fork, exec, SIGSTOP, exit, blocked and own SIGTRAP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from textpoke import TargetExited, TargetReplaced, TargetStopped
from textpoke.poke import Patch, Step, attach
from textpoke.poke.resident import CODE_SIZE, find_regions, our_threads
from textpoke.poke.safety import sigtrap_action
from textpoke.target.process import Process
from textpoke.x86.insn import INT3_BYTE, encode_call

from .harness import fields, read_mem, run_cli, symbols

TOGGLES = 100


def _sites(binary) -> tuple[int, bytes, bytes]:
    syms = symbols(binary)
    site = syms["site_caller"] + 9  # nop5 fentry, push rbp, mov rbp,rsp, then the call
    return site, encode_call(site, syms["A"]), encode_call(site, syms["B"])


def _toggle(session, site: int, to_a: bytes, to_b: bytes, times: int, *, hold_s: float = 0.0) -> None:
    def hold(step: Step) -> None:
        if step is Step.INT3 and hold_s:
            time.sleep(hold_s)

    for _ in range(times):
        session.apply([Patch(site=site, old=to_a, new=to_b)], on_step=hold)
        session.apply([Patch(site=site, old=to_b, new=to_a)], on_step=hold)


def _exact(result: dict[str, int]) -> None:
    assert result["bad"] == 0
    assert result["a"] + result["b"] == result["made"]


def _fork_mid_batch(target, parent, site: int, to_a: bytes, to_b: bytes, *, settle_s: float) -> tuple[int, list[str]]:
    """``parent`` applies site A -> B; the target forks while the int3 is in place (the
    child inherits it in flight) and the child's threads run into it for ``settle_s``.
    The child's pid and the target's two lines about the fork."""
    forked: list[str] = []

    def fork_now(step: Step) -> None:
        if step is Step.INT3:
            target.send("fork")
            forked.extend(target.readline() for _ in range(2))
            time.sleep(settle_s)  # the child's threads run into the inherited int3

    parent.apply([Patch(site=site, old=to_a, new=to_b)], on_step=fork_now)
    return next(int(line.split()[-1]) for line in forked if line.startswith("child ready")), forked


def test_a_fork_child_installed_through_a_thread_that_just_trapped_runs_on(life, monkeypatch):
    """The child's first attach borrows one of its threads that keep running into the
    inherited int3 (chosen on purpose): stopped with that trap's SIGTRAP not yet
    received, the trap is taken back (the thread runs the int3 again), not held and
    sent again, which the handler took for someone else's SIGTRAP (si_code SI_TKILL)
    and the child died of (6 of 15 children before; the child must live every time)."""
    from textpoke.target import inject as inject_module

    real_choose = inject_module.choose_thread
    for _ in range(8):
        target = life("4")
        site, to_a, to_b = _sites(life.binary)
        with attach(target.pid) as parent:
            child_pid, _ = _fork_mid_batch(target, parent, site, to_a, to_b, settle_s=0.1)
            worker = min(int(t) for t in os.listdir(f"/proc/{child_pid}/task") if int(t) != child_pid)
            monkeypatch.setattr(inject_module, "choose_thread", lambda process, **_: worker)
            try:
                with attach(child_pid) as child:
                    assert child.resident.created
                    assert read_mem(child_pid, site, 5) == to_a
                time.sleep(0.05)
                assert Process(child_pid).alive()
            finally:
                monkeypatch.setattr(inject_module, "choose_thread", real_choose)
                os.kill(child_pid, signal.SIGKILL)
        target.kill()


def test_fork_child_inherits_and_gets_its_own_resident_part(life):
    """fork while a site holds int3: the child runs on (the inherited handler
    emulates through the shared table); attaching to the child, with the
    parent's session still open, gives it its own part and reverts its site."""
    target = life("4")
    site, to_a, to_b = _sites(life.binary)
    with attach(target.pid) as parent:
        parent_region = parent.resident.base
        child_pid, forked = _fork_mid_batch(target, parent, site, to_a, to_b, settle_s=0.2)
        assert f"forked {child_pid}" in forked
        assert read_mem(child_pid, site, 1)[0] == INT3_BYTE  # the child's copy is still in flight
        with attach(child_pid) as child:  # no BusyError: the parent's lock is not the child's
            assert child.resident.created and child.resident.base != parent_region
            assert child.recovery.inherited_from == parent_region
            assert (child.recovery.in_flight, child.recovery.written) == ((site,), (site,))
            assert read_mem(child_pid, site, 5) == to_a  # back to its baseline
            regions = find_regions(Process(child_pid))
            assert [r.owned for r in regions if r.base == parent_region] == [False]
            assert os.path.exists(f"/proc/{child_pid}/task/{child.resident.agent_tid}")
            emulated = child.stats().emulated
            _toggle(child, site, to_a, to_b, 20, hold_s=0.005)
            assert child.stats().emulated > emulated
            # the child's handler chains to the program's disposition, not the parent's handler
            assert not parent_region <= sigtrap_action(child.resident)[0] < parent_region + CODE_SIZE
        assert parent.resident.table.lookup(site) == to_b  # the child never wrote the parent's table
        _toggle(parent, site, to_b, to_a, TOGGLES)
        parent.apply([Patch(site=site, old=to_b, new=to_a)])
    assert read_mem(child_pid, site, 5) == to_a
    os.kill(child_pid, signal.SIGTERM)
    line = target.readline()
    assert line.startswith("child made=")
    child_result = fields(line)
    _exact(child_result)
    assert child_result["b"] > 0  # emulated through the inherited handler and its own
    _exact(target.stop())


def test_exec_mid_batch_leaves_nothing_and_breaks_nothing(life):
    """exec while a batch holds int3: the batch reports it (no write can reach
    the new program), the new image has nothing of ours and runs correctly."""
    target = life("2")
    site, to_a, to_b = _sites(life.binary)
    new_image: list[str] = []

    def exec_now(step: Step) -> None:
        if step is Step.INT3:
            target.send("exec")
            new_image.append(target.readline())

    with pytest.raises(TargetReplaced, match=f"process {target.pid} executed a new program"):
        with attach(target.pid) as session:
            session.apply([Patch(site=site, old=to_a, new=to_b)], on_step=exec_now)
    assert fields(new_image[0]) == {"bad": 0} and new_image[0].startswith(f"execd ready {target.pid}")
    assert not any("textpoke" in line for line in open(f"/proc/{target.pid}/maps"))
    status = dict(line.split(":", 1) for line in open(f"/proc/{target.pid}/status"))
    assert int(status["SigCgt"], 16) & (1 << (signal.SIGTRAP - 1)) == 0  # default disposition again
    assert read_mem(target.pid, site, 5) == to_a  # the new image's own, untouched bytes
    with attach(target.pid) as session:  # a fresh attach to the new program works
        assert session.resident.created
    assert target.ask("done") == "execd done"
    assert target.proc.wait(10) == 0


def test_sigstop_mid_batch_times_out_clearly_then_recovers(life):
    """SIGSTOP while a batch holds int3: the next sync cannot run (the agent is
    stopped): a clear TargetStopped after the timeout, not a hang; after
    SIGCONT the sites are emulated meanwhile and the session reverts exactly."""
    target = life("4")
    site, to_a, to_b = _sites(life.binary)

    def stop_now(step: Step) -> None:
        if step is Step.INT3:
            os.kill(target.pid, signal.SIGSTOP)
            while not Process(target.pid).stopped():
                time.sleep(0.001)

    session = attach(target.pid, timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(TargetStopped, match=f"process {target.pid} is stopped .* waited 1 s") as info:
        session.apply([Patch(site=site, old=to_a, new=to_b)], on_step=stop_now)
    assert time.monotonic() - started < 5
    assert info.value.exit_code == 14
    assert read_mem(target.pid, site, 5) == bytes([INT3_BYTE]) + to_b[1:]  # left in flight, handled
    os.kill(target.pid, signal.SIGCONT)
    time.sleep(0.2)
    session.close()  # reverts: completes the in-flight site back to call A
    assert read_mem(target.pid, site, 5) == to_a
    _exact(target.stop())


def test_sigstop_mid_batch_waits_for_sigcont(life):
    """SIGSTOP then SIGCONT 0.5 s later, within the timeout: the batch just completes."""
    target = life("4")
    site, to_a, to_b = _sites(life.binary)

    def stop_now(step: Step) -> None:
        if step is Step.INT3:
            os.kill(target.pid, signal.SIGSTOP)
            threading.Timer(0.5, os.kill, (target.pid, signal.SIGCONT)).start()

    with attach(target.pid, timeout_s=10.0) as session:
        started = time.monotonic()
        result = session.apply([Patch(site=site, old=to_a, new=to_b)], on_step=stop_now)
        assert time.monotonic() - started >= 0.4
        assert (result.patched, result.syncs) == ((site,), 3)
        assert read_mem(target.pid, site, 5) == to_b
    _exact(target.stop())


def test_attach_to_a_stopped_process_is_refused(life):
    target = life("2")
    before = open(f"/proc/{target.pid}/maps").read()
    os.kill(target.pid, signal.SIGSTOP)
    try:
        while not Process(target.pid).stopped():
            time.sleep(0.001)
        with pytest.raises(TargetStopped, match=f"process {target.pid} is stopped"):
            attach(target.pid)
        assert open(f"/proc/{target.pid}/maps").read() == before  # nothing installed
    finally:
        os.kill(target.pid, signal.SIGCONT)
    _exact(target.stop())


def test_target_exits_mid_batch(life):
    """The target dies while a batch holds int3: TargetExited, and leaving the
    session raises nothing more."""
    target = life("2")
    site, to_a, to_b = _sites(life.binary)

    def die_now(step: Step) -> None:
        if step is Step.INT3:
            target.proc.kill()
            while "State:\tZ" not in open(f"/proc/{target.pid}/status").read():
                time.sleep(0.001)

    with pytest.raises(TargetExited, match=f"process {target.pid} exited") as info:
        with attach(target.pid) as session:
            session.apply([Patch(site=site, old=to_a, new=to_b)], on_step=die_now)
    assert type(info.value) is TargetExited and not info.value.__context__


def test_thread_blocking_sigtrap_is_held_not_refused(life):
    """A thread that blocks SIGTRAP (before attach, or after) is held through
    each batch that writes int3s, and the program's counts stay exact."""
    target = life("2")
    site, to_a, to_b = _sites(life.binary)
    tid = int(target.ask("block").split()[1])
    done = run_cli("patch", "-p", str(target.pid), "--site", f"{site:#x}", "--call", "B")
    assert done.returncode == 0, done.stderr
    assert read_mem(target.pid, site, 5) == to_b
    with attach(target.pid) as session:  # patch committed B: A for this session
        session.apply([Patch(site=site, old=to_b, new=to_a)])
        assert session.held_threads >= 1
        assert target.ask("unblock") == "unblocked"
        target.ask("block")  # a thread starts blocking SIGTRAP after we attached
        held = session.held_threads
        _toggle(session, site, to_a, to_b, 10)
        assert session.held_threads - held >= 20  # at least the blocker, in each of the 20 batches
        assert target.ask("unblock") == "unblocked"
    assert read_mem(target.pid, site, 5) == to_b  # the committed baseline again
    assert tid > 0
    _exact(target.stop())


def test_own_sigtrap_handler_still_gets_its_traps(life):
    """A program with its own SIGTRAP handler: while our int3 is in flight, its
    own int3s and raise(SIGTRAP)s reach its handler, each exactly once."""
    target = life("4", "handler")
    site, to_a, to_b = _sites(life.binary)
    rounds, per = 10, 50
    replies: list[int] = []

    def trap_now(step: Step) -> None:
        if step is Step.INT3:
            replies.append(fields(target.ask(f"traps {per}"))["handled"])

    with attach(target.pid) as session:
        not_ours, emulated = session.stats().not_ours, session.stats().emulated
        for _ in range(rounds):
            session.apply([Patch(site=site, old=to_a, new=to_b)], on_step=trap_now)
            session.apply([Patch(site=site, old=to_b, new=to_a)], on_step=trap_now)
        assert session.stats().not_ours - not_ours == 2 * rounds * 2 * per
        assert session.stats().emulated > emulated
    assert replies == [2 * per * (i + 1) for i in range(2 * rounds)]
    result = target.stop()
    _exact(result)
    assert result["handled"] == 2 * rounds * 2 * per


def test_sigtrap_handler_installed_after_attach_is_chained(life):
    """The program installs its own SIGTRAP handler after we attached: the next
    batch notices, puts ours back in front, and the program still gets its traps."""
    target = life("4")
    site, to_a, to_b = _sites(life.binary)
    with attach(target.pid) as session:
        ours = session.resident.labels["handler"]
        _toggle(session, site, to_a, to_b, 5)
        assert target.ask("handler") == "handler installed"
        assert sigtrap_action(session.resident)[0] != ours
        assert session.handler_reinstalls == 0
        replies: list[int] = []

        def trap_now(step: Step) -> None:
            if step is Step.INT3:
                replies.append(fields(target.ask("traps 20"))["handled"])
                time.sleep(0.01)

        emulated = session.stats().emulated
        session.apply([Patch(site=site, old=to_a, new=to_b)], on_step=trap_now)
        assert session.handler_reinstalls == 1
        assert sigtrap_action(session.resident)[0] == session.resident.labels["handler_1"]  # a fresh copy
        assert replies == [40]
        assert session.stats().emulated > emulated
        session.apply([Patch(site=site, old=to_b, new=to_a)])
        assert session.handler_reinstalls == 1  # once is enough
    result = target.stop()
    _exact(result)
    assert result["handled"] == 40


def test_traps_of_a_batch_never_reach_a_handler_installed_right_after_it(life):
    """A thread that trapped on a batch's int3 gets its SIGTRAP when it next
    returns to user mode, with the handler installed *then*. A batch returns
    only once all its traps were delivered, so a program that installs its own
    (non-chaining) handler right after a batch never receives one of ours
    (it would return into the middle of the site)."""
    target = life("4")
    site, to_a, to_b = _sites(life.binary)
    with attach(target.pid) as session:
        for round_ in range(2):
            emulated = session.stats().emulated
            _toggle(session, site, to_a, to_b, 3, hold_s=0.01)
            assert session.stats().emulated > emulated
            assert target.ask("handler") == "handler installed"
            assert fields(target.ask("traps 0"))["handled"] == 0, f"round {round_}: a trap of ours reached it"
        assert session.handler_reinstalls == 1
    result = target.stop()
    _exact(result)
    assert result["handled"] == 0


def test_chaining_handlers_installed_after_attach_never_loop(life):
    """The program installs handlers that call the one they replaced, twice,
    after we attached. Each time the next batch puts a fresh copy of our handler
    in front (never one already in the chain, which would loop forever): every
    trap of the program's own goes through each handler exactly once."""
    target = life("4", "handler")
    site, to_a, to_b = _sites(life.binary)
    replies: list[dict[str, int]] = []

    def trap_now(step: Step) -> None:
        if step is Step.INT3:
            replies.append(fields(target.ask("traps 10")))

    with attach(target.pid) as session:
        labels = session.resident.labels
        not_ours = session.stats().not_ours
        for k in (1, 2):
            assert target.ask("chain") == f"chained {k}"
            session.apply([Patch(site=site, old=to_a, new=to_b)], on_step=trap_now)
            session.apply([Patch(site=site, old=to_b, new=to_a)])
            assert session.handler_reinstalls == k
            assert sigtrap_action(session.resident)[0] == labels[f"handler_{k}"]
        # round 1: copy 1 -> chain1 -> copy 0 -> handler; round 2: copy 2 -> chain2 -> copy 1 -> chain1 -> ...
        assert replies == [{"handled": 20, "chain1": 20, "chain2": 0}, {"handled": 40, "chain1": 40, "chain2": 20}]
        assert session.stats().not_ours - not_ours == 20 * 2 + 20 * 3
    result = target.stop()
    _exact(result)
    assert result["handled"] == 40


def test_second_session_is_refused_by_the_cli(life):
    target = life("2")
    site, to_a, _ = _sites(life.binary)
    with attach(target.pid):
        done = run_cli("patch", "-p", str(target.pid), "--site", f"{site:#x}", "--call", "B")
        lines = done.stderr.splitlines()
        assert done.returncode == 9
        assert lines[0] == f"textpoke: error: another textpoke session is attached to process {target.pid}"
        assert lines[1] == "textpoke: hint: wait for the other session to end, or end it"
        assert read_mem(target.pid, site, 5) == to_a
    _exact(target.stop())


_STOPPED_INSTALL = r"""
import sys
from textpoke import TextpokeError
from textpoke.poke.resident import Resident
from textpoke.target.process import Process
try:
    Resident.attach(Process(int(sys.argv[1])))
except TextpokeError as exc:
    print(type(exc).__name__, exc.message, flush=True)
"""


def test_install_into_a_process_stopped_meanwhile(life):
    """The process is stopped between attach's check and the install (here: the
    installer is run on a stopped process directly). The borrowed thread's
    injection works through the group stop, the process stays stopped (the new
    agent with it), the installer gives up after its timeout instead of hanging;
    after SIGCONT the next attach finishes what the install left undone."""
    target = life("2")
    site, to_a, to_b = _sites(life.binary)
    os.kill(target.pid, signal.SIGSTOP)
    while not Process(target.pid).stopped():
        time.sleep(0.001)
    done = subprocess.run([sys.executable, "-c", _STOPPED_INSTALL, str(target.pid)],
                          capture_output=True, text=True, timeout=60)
    assert done.stdout == f"TargetStopped process {target.pid} was stopped while textpoke started its agent\n"
    assert Process(target.pid).stopped()  # the injection did not continue the stopped process
    os.kill(target.pid, signal.SIGCONT)
    with attach(target.pid) as session:
        # The waiting install thread is adopted and the install finished, not doubled.
        assert session.resident.created
        assert session.resident.agent_tid in our_threads(Process(target.pid))
        ours = [fd for fd in os.listdir(f"/proc/{target.pid}/fd")
                if os.readlink(f"/proc/{target.pid}/fd/{fd}").startswith("/memfd:textpoke")]
        # One descriptor only: the one the resident part keeps for later sessions.
        assert [os.stat(f"/proc/{target.pid}/fd/{fd}").st_ino for fd in ours] == [session.resident.inode]
        emulated = session.stats().emulated
        _toggle(session, site, to_a, to_b, 10, hold_s=0.005)
        assert session.stats().emulated > emulated
    assert len(find_regions(Process(target.pid))) == 1
    _exact(target.stop())
