"""kill -9 of `textpoke hotfix` at random instants: the program runs on, fixed whole or not at all.

Two ways to kill: the CLI at a random instant of its run, and a forked tool
using the library, killed 0-2 ms after a chosen step of the apply or the revert
(image loaded, record written, each batch step, state word, baselines), so
every window of the crash order is hit.

The fix replaces two functions at once: compute (at its fentry site) and twice
(at its call site). After each kill the target must still compute right (no
bad result, calls still made), and `textpoke hotfix --list` (a later textpoke:
its attach finishes or undoes what the dead one left) must show a state the
text agrees with: in force -> both sites lead into the fix, reverted -> neither.
Trials: TEXTPOKE_CHAOS_TRIALS (default 14; 100+ at full size).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from textpoke.hotfix import build
from textpoke.x86.insn import NOP5, SITE_SIZE

from .harness import env_count, fields, fork_and_kill, read_mem, run_cli, symbols

FIXES = Path(__file__).resolve().parents[1] / "targets" / "hotfix"
TRIALS = env_count("TEXTPOKE_CHAOS_TRIALS", 14)


def _twice_call_site(binary: Path, pid: int) -> int:
    """The call site of twice() in print_counts (the only caller)."""
    from textpoke.sites import SiteKind, mapped_object, scan_sites

    obj, image = mapped_object(pid)
    scan = scan_sites(image, kinds={SiteKind.CALL, SiteKind.JMP}, calls_to=["twice"], base=obj.base)
    (site,) = [s.address for s in scan.sites]
    return site


def _state(pid: int, compute: int, call_site: int, original_call: bytes) -> str:
    head = read_mem(pid, compute, SITE_SIZE)
    call = read_mem(pid, call_site, SITE_SIZE)
    fixed = (head[0] == 0xE9, call != original_call)
    if fixed == (True, True):
        return "in force"
    if fixed == (False, False) and head == NOP5:
        return "reverted"
    return f"MIXED compute={head.hex()} call={call.hex()}"


def _listed(pid: int) -> str:
    done = run_cli("hotfix", "-p", str(pid), "--list")
    assert done.returncode == 0, done.stderr
    if "fix_both (id" not in done.stdout:
        return "reverted"  # no record yet: killed before the record was written
    line = next(line for line in done.stdout.splitlines() if line.startswith("fix_both (id"))
    return "in force" if ": in force;" in line else "reverted"


#: Where a library trial is killed: after this step of hotfix()/revert_fix() (+ 0-2 ms).
APPLY_STEPS = ("attached", "loaded", "recorded", "verified", "published", "int3", "tail", "head", "committed", "kept")
REVERT_STEPS = ("attached", "committed", "verified", "published", "int3", "tail", "head", "kept")


def _library_tool(pid: int, fix: Path, op: str, out: int) -> None:
    """The forked tool: hotfix or revert with the library, reporting each step on ``out``, then waiting."""
    from textpoke.hotfix import hotfix, revert_fix
    from textpoke.poke import attach

    def report(step: str) -> None:
        os.write(out, f"{step}\n".encode())

    try:
        session = attach(pid)
        report("attached")
        if op == "apply":
            hotfix(session, fix, name="fix_both", replace={"compute": "compute", "twice": "twice_fixed"},
                   on_step=report)
        else:
            revert_fix(session, "fix_both", on_step=report)
        session.close(revert=False)
        report("done")
    finally:
        time.sleep(3600)


def _wait_for(read_fd: int, step: str) -> list[str]:
    seen: list[str] = []
    buffer = b""
    deadline = time.monotonic() + 60
    while step not in seen and "done" not in seen and time.monotonic() < deadline:
        chunk = os.read(read_fd, 4096)
        if not chunk:
            break
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        seen += [line.decode() for line in lines]
    return seen


def _run_killed(args: list[str], delay: float) -> int | None:
    proc = subprocess.Popen([sys.executable, "-m", "textpoke", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    return proc.wait()


def test_kill9_during_hotfix_and_revert(hotfix_target, tmp_path):
    target = hotfix_target(4)
    pid = target.pid
    binary = hotfix_target.binary
    compute = symbols(binary)["compute"]
    fix = build(FIXES / "fix_both.c", workdir=str(tmp_path))
    call_site = _twice_call_site(binary, pid)
    original_call = read_mem(pid, call_site, SITE_SIZE)
    apply_args = ["hotfix", "-p", str(pid), str(fix), "--name", "fix_both", "--replace", "compute=compute",
                  "--replace", "twice=twice_fixed"]
    revert_args = ["hotfix", "-p", str(pid), "--revert", "fix_both"]
    # How long a whole run takes (the first one installs the resident part).
    timings = {}
    for name, args in (("apply", apply_args), ("revert", revert_args), ("apply", apply_args)):
        began = time.monotonic()
        done = run_cli(*args)
        assert done.returncode == 0, done.stderr
        timings[name] = time.monotonic() - began
    state = "in force"
    rng = random.Random(1234)
    outcomes: dict[str, int] = {}
    stalls: list[float] = []
    for trial in range(TRIALS):
        op = "revert" if state == "in force" else "apply"
        if trial % 2:  # the library, killed just after a chosen step
            step = rng.choice(APPLY_STEPS if op == "apply" else REVERT_STEPS)
            seen = fork_and_kill(lambda out: _library_tool(pid, fix, op, out),
                                 lambda read_fd: _wait_for(read_fd, step), rng.uniform(0, 0.002))
            code = 0 if "done" in seen else -9
            op = f"{op}@{step}"
        else:  # the CLI, killed at a random instant of its run
            delay = timings[op] * rng.uniform(0.3, 1.1)
            code = _run_killed(revert_args if op == "revert" else apply_args, delay)
        # The program runs on, right, whatever the instant (a loaded machine may not run it for a while).
        first = fields(target.ask("count"))
        waited = time.monotonic()
        while True:
            time.sleep(0.02)
            second = fields(target.ask("count"))
            if second["made"] > first["made"] or time.monotonic() - waited > 5:
                break
        stalls.append(time.monotonic() - waited)
        assert target.alive() and second["made"] > first["made"] and second["bad"] == 0, (trial, op, second)
        text_before = _state(pid, compute, call_site, original_call)
        listed = _listed(pid)  # a later textpoke: finishes or undoes the dead one's fix
        text_after = _state(pid, compute, call_site, original_call)
        assert text_after == listed, (trial, op, delay, text_before, listed, text_after)
        outcome = f"{op} {'completed' if code == 0 else 'killed'} -> {listed}"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        state = listed
        counts = fields(target.ask("count"))
        assert counts["twice7"] == (14 if listed == "in force" else 15), (trial, counts)
    recovered = run_cli("recover", "-p", str(pid))
    assert recovered.returncode == 0, recovered.stderr
    assert _state(pid, compute, call_site, original_call) == "reverted"
    assert _listed(pid) == "reverted"
    result = target.stop()
    print(f"{TRIALS} kill -9 trials (run times {timings}): {outcomes}; longest wait for the next call after a "
          f"kill {max(stalls) * 1e3:.0f} ms; target at the end {result}")
    assert result["bad"] == 0
    assert result["old"] + result["new"] + result["same"] == result["made"]
