"""Sessions reuse the address space an earlier one gave back, instead of growing it.

Each of 100 sessions maps a trampoline region the way the tracer does (code
near the site, a 32 MiB data part apart), sends the site through it (a
counter, then the original callee), counts exactly, reverts and gives the
region back (Resident.release_shared). The target's VmSize and mapping count
after 100 sessions must equal those after the first; without reuse they grow
by the region every session (measured and printed beside it).
"""

from __future__ import annotations

import struct
import time

from textpoke.poke import Patch, attach
from textpoke.poke.resident import PAGE, Resident, SharedRegion
from textpoke.x86.asm import Asm, Imm64, R, mem
from textpoke.x86.insn import encode_call

from .harness import Target, env_count, fields
from .test_blockers import _exact, _site

DATA = 32 << 20


def _status(pid: int) -> tuple[int, int]:
    """(VmSize in kB, number of mappings)."""
    vm = next(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith("VmSize:"))
    with open(f"/proc/{pid}/maps") as f:
        return vm, sum(1 for _ in f)


def _counter(region: SharedRegion, callee: int) -> bytes:
    """``mov r11, &count; lock inc [r11]; jmp callee`` (r11 is free at a call)."""
    a = Asm()
    a.op("MOV_R64_IMM64", R.R11, Imm64(region.data_address))
    a.op("INC_RM64", mem(R.R11), lock=True)
    a.branch_to("JMP_REL32_64", callee)
    return a.assemble(region.address)[0]


def _session(pid: int, site: int, old: bytes, callee: int, *, reuse: bool) -> tuple[int, bool]:
    """One session: map, patch, count a while, revert, give back; (calls counted, region reused)."""
    with attach(pid) as session:
        resident: Resident = session.resident
        region = resident.map_shared(code_size=PAGE, data_size=DATA, near=site, apart=True, reuse=reuse)
        Resident.write_code(region, _counter(region, callee))
        patch = Patch(site=site, old=old, new=encode_call(site, region.address))
        session.apply([patch])
        count = 0
        while count < 20:  # the workers and the waiters call through the site
            count = struct.unpack_from("<Q", region.local, PAGE)[0]
        session.apply([patch.reverted()])
        count = struct.unpack_from("<Q", region.local, PAGE)[0]
        resident.release_shared(region)
        region.local.close()
        return count, region.reused


def test_sessions_reuse_their_address_space(build_target):
    binary = build_target("blockers")
    site, to_a, _ = _site(binary)
    callee = int.from_bytes(to_a[1:], "little", signed=True) + site + 5
    sessions = env_count("TEXTPOKE_REUSE_SESSIONS", 100)
    # 2 workers spinning through the site (never blocking: out once they ran 0.2 ms of CPU),
    # and the epoller, reader and sleeper (blocking, calling, blocking)
    target = Target([str(binary), "2", "0"])
    try:
        counted, reused = _session(target.pid, site, to_a, callee, reuse=True)
        first = _status(target.pid)
        for _ in range(sessions - 1):
            n, again = _session(target.pid, site, to_a, callee, reuse=True)
            counted += n
            reused += again
        after = _status(target.pid)
        grown = []
        for _ in range(3):  # the same without reuse: what each session used to leave behind
            before = _status(target.pid)
            _session(target.pid, site, to_a, callee, reuse=False)
            grown.append(tuple(x - y for x, y in zip(_status(target.pid), before)))
        result = fields(target.ask("stop"))
    finally:
        target.kill()
    _exact(result)
    assert result["a"] == result["made"] and counted >= 20 * sessions  # every counted call also reached A
    assert after == first, f"VmSize/mappings {first} after 1 session, {after} after {sessions}"
    assert reused == sessions - 1
    print(f"{sessions} sessions with reuse: VmSize {first[0]} kB and {first[1]} mappings after the first, "
          f"{after[0]} kB and {after[1]} mappings after the last ({reused} reused their region); without reuse "
          f"each session added {grown[0][0]} kB and {grown[0][1]} mappings")


def test_a_region_a_site_still_leads_into_is_not_reused(build_target):
    """Given back while a site still calls into it (its session did not revert):
    a later session maps a new region instead; once the site is reverted, the
    region is taken again."""
    binary = build_target("blockers")
    site, to_a, _ = _site(binary)
    callee = int.from_bytes(to_a[1:], "little", signed=True) + site + 5
    target = Target([str(binary), "0", "0"])
    try:
        with attach(target.pid) as session:
            resident = session.resident
            region = resident.map_shared(code_size=PAGE, data_size=PAGE, near=site, apart=True, reuse=True)
            Resident.write_code(region, _counter(region, callee))
            patch = Patch(site=site, old=to_a, new=encode_call(site, region.address))
            session.apply([patch])
            resident.release_shared(region)  # too early: the site still calls it
            other = resident.map_shared(code_size=PAGE, data_size=PAGE, near=site, apart=True, reuse=True)
            assert not other.reused and other.address != region.address
            session.apply([patch.reverted()])
            resident.release_shared(other)
            again = resident.map_shared(code_size=PAGE, data_size=PAGE, near=site, apart=True, reuse=True)
            assert again.reused and again.address in (region.address, other.address)
            # Code readied as rseq needs it: every 32-byte block's post_commit_offset word
            # zero (any descriptor an old rseq_cs names matches nothing), the rest as it
            # was (a cleared descriptor kills the thread on some kernels); data zeros.
            blocks = struct.unpack(f"<{PAGE // 8}Q", bytes(again.local[:PAGE]))
            assert all(blocks[i + 2] == 0 for i in range(0, len(blocks), 4))
            assert blocks[0] != 0 and blocks[1] != 0  # the counter's code there before: kept
            assert bytes(again.local[PAGE:]) == bytes(PAGE)
            Resident.write_code(again, _counter(again, callee))
            assert bytes(again.local[:16]) == _counter(again, callee)[:16]
            for r in (region, other, again):
                r.local.close()
        result = fields(target.ask("stop"))
    finally:
        target.kill()
    _exact(result)


def test_a_killed_sessions_region_is_not_reused_while_a_hooked_frame_returns_through_it(build_target, tmp_path):
    """A graph trace killed while park() sleeps inside a hooked frame: that frame will
    return through the killed session's exit routine. The next session (entry-only: its
    code is laid out otherwise) must not take that region, though its tool never gave
    it back and no thread is inside it: park() returns 6 s later through the routine,
    to the right place with the right value (the program checks), and the program runs on."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from .harness import run_cli

    target = Target([str(build_target("parked"))])
    try:
        assert target.readline(10) == "parked 1"  # entered before any trace
        tool = subprocess.Popen([sys.executable, "-m", "textpoke", "trace", "-p", str(target.pid), "-f", "park",
                                 "-f", "tick", "-o", str(tmp_path / "killed.tpk")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        partial = Path(f"{tmp_path / 'killed.tpk'}.partial")
        deadline = time.monotonic() + 60
        while not (partial.exists() and partial.stat().st_size > 1 << 16):
            assert time.monotonic() < deadline and tool.poll() is None
            time.sleep(0.02)
        assert target.readline(10) == "parked 2"  # entered while traced: its frame is hooked
        tool.send_signal(signal.SIGKILL)
        tool.wait()
        began = time.monotonic()
        second = run_cli("trace", "-p", str(target.pid), "-f", "tick", "--entry-only", "--duration", "0.2",
                         "-o", str(tmp_path / "second.tpk"))
        assert second.returncode == 0, second.stderr
        assert time.monotonic() - began < 5.5, "the second session ended after park() returned: test too slow"
        assert target.readline(10) == "parked 3"  # park() returned (checked) and was entered again
        assert target.alive()
        assert target.stop()["bad"] == 0
    finally:
        target.kill()


def test_a_thread_in_code_that_calls_into_a_region_is_not_out_of_it(build_target):
    """A thread seen at an address of ``via`` (code that may call into the region: the
    graph runtime's return path, between popping a frame and calling its session's exit
    routine) is not out of the region, though its pc is elsewhere; one that runs enough
    CPU is, as before. Here: life.c's main thread, blocked reading stdin, stands for it."""
    from textpoke.poke.resident import thread_pc

    target = Target([str(build_target("life")), "2"])
    try:
        with attach(target.pid) as session:
            resident: Resident = session.resident
            deadline = time.monotonic() + 10
            while (pc := thread_pc(target.pid, target.pid)) is None:  # blocked in read(2)
                assert time.monotonic() < deadline
                time.sleep(0.01)
            region = range(0x10000, 0x20000)  # nothing of the program's: every thread is out of it
            assert resident._threads_outside(region.start, region.stop, 0.05)
            assert not resident._threads_outside(region.start, region.stop, 0.05, (range(pc - 1, pc + 1),))
        assert target.stop()["bad"] == 0
    finally:
        target.kill()
