"""`textpoke hotfix` on a live program: exact under load, cycles, what a fix may use, refusals.

The target (tests/targets/hotfix_target.c) runs 4 threads calling compute(x) as
fast as they can; compute is wrong for x % 4 == 0. Each call is counted as the
old result, the new one, or "same" (x where both agree); a call that is neither
is "bad". The fix (tests/targets/hotfix/fix_compute.c) uses the program's static
scale(), its globals fixed_calls and last_msg, and libc's snprintf.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import time
from pathlib import Path

from textpoke.hotfix import hotfix, list_fixes, revert_fix
from textpoke.poke import attach
from textpoke.x86.insn import NOP5, SITE_SIZE

from .harness import env_count, fields, read_mem, run_cli, symbols

FIXES = Path(__file__).resolve().parents[1] / "targets" / "hotfix"
FIX = FIXES / "fix_compute.c"
#: apply/revert cycles under load (1,000 at full size; the default runs in well under a minute).
CYCLES = env_count("TEXTPOKE_HOTFIX_CYCLES", 100)


def _count(target) -> dict[str, int]:
    return fields(target.ask("count"))


def _our_mappings(pid: int) -> list[str]:
    with open(f"/proc/{pid}/maps") as f:
        return [line for line in f if "textpoke" in line]


def test_hotfix_under_load_is_exact_and_switches_in_one_batch(hotfix_target):
    target = hotfix_target(4)
    compute = symbols(hotfix_target.binary)["compute"]
    time.sleep(0.1)
    before = _count(target)
    assert before["old"] > 0 and before["new"] == 0
    with attach(target.pid) as session:
        applied = hotfix(session, FIX)
        right_after = _count(target)
        assert read_mem(target.pid, compute, 1) == b"\xe9"  # jmp to the fix
    time.sleep(0.1)
    later = _count(target)
    result = target.stop()
    print(f"hotfix under load: batch {applied.result}, image {applied.image:#x}; counts before {before}, "
          f"right after the batch {right_after}, 0.1 s later {later}, at the end {result}")
    # Within one batch: once it returned, no thread starts the old code (one call in flight per thread at most).
    assert later["old"] - right_after["old"] <= 4
    assert later["new"] > right_after["new"]
    assert result["bad"] == 0
    assert result["old"] + result["new"] + result["same"] == result["made"]
    assert result["fixed_calls"] >= result["new"] > 0


def test_fix_uses_program_globals_static_function_libc_and_is_traceable(hotfix_target):
    target = hotfix_target(4)
    pid = target.pid
    with attach(pid) as session:
        applied = hotfix(session, FIX)
    assert applied.fentry_sites, "the fix was built with the fentry recipe: its functions have nop5 sites"
    assert all(read_mem(pid, site, SITE_SIZE) == NOP5 for site in applied.fentry_sites)
    # The fixed function is traced at its own fentry site (trace -f names the function it replaces).
    traced = run_cli("trace", "-p", str(pid), "-f", "compute", "--count", "--duration", "0.5")
    assert traced.returncode == 0, traced.stderr
    counted = next(line for line in traced.stdout.splitlines() if line.strip().endswith("compute [fix_compute]"))
    assert read_mem(pid, applied.fentry_sites[0], SITE_SIZE) == NOP5  # restored after the trace
    time.sleep(0.05)
    line = _stop_line(target)
    result = fields(line)
    print(f"fix in force: {line}; traced: {counted.strip()}")
    assert int(counted.split()[0].replace(",", "")) > 0
    assert result["bad"] == 0 and result["new"] > 0
    assert result["fixed_calls"] > 0  # the program's global, written by the fix
    assert "msg=fixed call " in line  # the program's buffer, written by libc's snprintf called from the fix


def _stop_line(target) -> str:
    """Stop the target; its last line as it printed it."""
    target.send("stop")
    target.proc.stdin.close()
    lines = target.read_to_end().splitlines()
    assert target.proc.wait(60) == 0, lines
    return lines[-1]


def test_apply_revert_cycles_under_load_exact(hotfix_target):
    target = hotfix_target(4)
    compute = symbols(hotfix_target.binary)["compute"]
    started = time.monotonic()
    with attach(target.pid) as session:
        first = hotfix(session, FIX)
        maps_after_first = len(_our_mappings(target.pid))
        revert_fix(session, first.name)
        for _ in range(CYCLES - 1):
            again = hotfix(session, FIX)
            assert again.reused and again.image == first.image
            assert read_mem(target.pid, compute, 1) == b"\xe9"
            revert_fix(session, first.name)
            assert read_mem(target.pid, compute, SITE_SIZE) == NOP5
        fixes = list_fixes(session)
        held = session.held_threads
    elapsed = time.monotonic() - started
    result = target.stop()
    print(f"{CYCLES} apply/revert cycles under load in {elapsed:.1f} s ({2 * CYCLES} batches, threads held: {held}); "
          f"{result}")
    assert len(fixes) == 1 and not fixes[0].in_force
    assert len(_our_mappings(target.pid)) == maps_after_first if target.alive() else True
    assert result["bad"] == 0
    assert result["old"] + result["new"] + result["same"] == result["made"]
    assert result["new"] > 0 and result["old"] > 0


def test_list_revert_recover_compose(hotfix_target):
    target = hotfix_target(2)
    pid = str(target.pid)
    compute = symbols(hotfix_target.binary)["compute"]
    done = run_cli("hotfix", "-p", pid, str(FIX))
    assert done.returncode == 0, done.stderr
    print(done.stdout)
    maps = len(_our_mappings(target.pid))
    again = run_cli("hotfix", "-p", pid, str(FIX))
    assert again.returncode == 0 and "in force already" in again.stdout
    listed = run_cli("hotfix", "-p", pid, "--list")
    print(listed.stdout)
    assert "fix_compute (id 1): in force" in listed.stdout
    reverted = run_cli("hotfix", "-p", pid, "--revert", "fix_compute")
    assert reverted.returncode == 0 and read_mem(target.pid, compute, SITE_SIZE) == NOP5
    assert run_cli("hotfix", "-p", pid, str(FIX)).returncode == 0
    assert read_mem(target.pid, compute, 1) == b"\xe9"
    recovered = run_cli("recover", "-p", pid)
    assert recovered.returncode == 0, recovered.stderr
    assert read_mem(target.pid, compute, SITE_SIZE) == NOP5
    listed = run_cli("hotfix", "-p", pid, "--list")
    assert "fix_compute (id 1): reverted" in listed.stdout, listed.stdout
    assert run_cli("hotfix", "-p", pid, str(FIX)).returncode == 0  # the same code again: no new mapping
    assert run_cli("hotfix", "-p", pid, "--all").returncode == 0
    assert read_mem(target.pid, compute, SITE_SIZE) == NOP5
    assert len(_our_mappings(target.pid)) == maps
    result = target.stop()
    assert result["bad"] == 0 and result["old"] + result["new"] + result["same"] == result["made"]


def test_ifunc_resolved_through_the_programs_got(hotfix_target):
    target = hotfix_target(2)
    done = run_cli("hotfix", "-p", str(target.pid), str(FIXES / "fix_ifunc.c"))
    assert done.returncode == 0, done.stderr
    assert "strlen (libc.so.6)" in done.stdout
    time.sleep(0.05)
    result = target.stop()
    print(done.stdout, result)
    assert result["bad"] == 0 and result["new"] > 0


def test_call_site_redirect_without_fentry_says_what_it_misses(hotfix_target):
    target = hotfix_target(1)
    done = run_cli("hotfix", "-p", str(target.pid), str(FIXES / "fix_twice.c"), "--replace", "twice=twice_fixed")
    assert done.returncode == 0, done.stderr
    assert "1 call site retargeted" in done.stdout
    assert "calls through function pointers" in done.stderr
    assert fields(target.ask("count"))["twice7"] == 14  # fixed: 2 * 7


def _refusal(target, *args: str) -> subprocess.CompletedProcess[str]:
    compute = symbols(target.binary)["compute"]
    before = read_mem(target.pid, compute, 64)
    done = run_cli("hotfix", "-p", str(target.pid), *args)
    print(f"{' '.join(args[-1:])}: exit {done.returncode}: {done.stderr.strip()}")
    assert done.returncode != 0 and done.stdout == "" and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[0].startswith("textpoke: error: ")
    assert len([line for line in done.stderr.splitlines() if line.startswith("textpoke: error")]) == 1
    assert read_mem(target.pid, compute, 64) == before  # nothing written
    assert _our_mappings(target.pid) == []  # not even attached
    return done


def test_refusals_write_nothing(hotfix_target, tmp_path):
    started = hotfix_target(1)
    started.binary = hotfix_target.binary
    dry = run_cli("hotfix", "-p", str(started.pid), str(FIX), "--dry-run")
    assert dry.returncode == 0 and "would replace compute" in dry.stdout, dry.stderr
    assert _our_mappings(started.pid) == []  # a dry run neither attaches nor writes
    unresolved = _refusal(started, str(FIXES / "unresolved.c"))
    assert unresolved.returncode == 12 and "textpoke_missing_symbol" in unresolved.stderr
    missing = _refusal(started, str(FIXES / "missing_function.c"))
    assert missing.returncode == 12 and "compute_that_does_not_exist" in missing.stderr
    ctor = _refusal(started, str(FIXES / "constructor.c"))
    assert ctor.returncode == 16 and "constructor" in ctor.stderr and "init_seed" in ctor.stderr
    tls = _refusal(started, str(FIXES / "tls.c"))
    assert tls.returncode == 16 and "TLS" in tls.stderr and "calls" in tls.stderr
    ifunc = _refusal(started, str(FIXES / "ifunc_not_imported.c"))
    assert ifunc.returncode == 16 and "memrchr is an IFUNC" in ifunc.stderr
    # A non-x86-64 object: the fix's object with another machine in its header (AArch64).
    obj = tmp_path / "fix_arm.o"
    subprocess.run([shutil.which("gcc") or "gcc", "-O2", "-fPIC", "-c", str(FIX), "-o", str(obj)], check=True)
    raw = bytearray(obj.read_bytes())
    struct.pack_into("<H", raw, 18, 183)
    obj.write_bytes(bytes(raw))
    arm = _refusal(started, str(obj))
    assert arm.returncode == 6 and "not an x86-64 object" in arm.stderr
    result = started.stop()
    assert result["bad"] == 0 and result["new"] == 0


def test_shared_library_fix(hotfix_target, tmp_path):
    target = hotfix_target(2)
    so = tmp_path / "fix.so"
    subprocess.run(["gcc", "-O2", "-fPIC", "-shared", str(FIX), "-o", str(so)], check=True)
    done = run_cli("hotfix", "-p", str(target.pid), str(so))
    assert done.returncode == 0, done.stderr
    print(done.stdout)
    time.sleep(0.05)
    result = target.stop()
    assert result["bad"] == 0 and result["new"] > 0
