"""The live engine on real processes: exact counts while sites change under load."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from textpoke import NoSuchProcess, PermissionDenied, SiteMismatch
from textpoke.poke import Patch, Step, attach
from textpoke.trampolines.counter import Counters
from textpoke.x86.insn import INT3_BYTE, NOP5, encode_call

from .harness import start, symbols, text_section

TOGGLES = 1000


def test_toggle_fentry_site_to_counter_and_back(hammer):
    """(a) nop5 <-> call counter, 1,000 times each way, under 4 hammering threads."""
    running, syms, _ = hammer
    site = syms["traced"]
    with attach(running.pid) as session:
        counters = Counters(session.resident, n=1, near=site)
        on, off = encode_call(site, counters.entry(0)), NOP5
        for _ in range(TOGGLES):
            session.apply([Patch(site=site, old=off, new=on)])
            session.apply([Patch(site=site, old=on, new=off)])
        assert session.read_insn(site) == NOP5
        counted = int(counters.counts()[0])
    result = running.stop()
    assert result["bad"] == 0
    assert result["a"] + result["b"] == result["made"]
    assert 0 < counted <= result["made"]


def test_retarget_call_exact(hammer):
    """(b) call A <-> call B 1,000 times: A + B == calls made, to the unit."""
    running, syms, _ = hammer
    site = syms["site_caller"] + 9  # nop5 fentry, push rbp, mov rbp,rsp, then the call
    with attach(running.pid) as session:
        to_a, to_b = encode_call(site, syms["A"]), encode_call(site, syms["B"])
        assert session.read_insn(site) == to_a
        _toggle(session, site, syms, TOGGLES)
        session.apply([Patch(site=site, old=to_a, new=to_b)])
        time.sleep(0.05)
    result = running.stop()
    assert result["bad"] == 0
    assert result["b"] > 0 and result["a"] > 0
    assert result["a"] + result["b"] == result["made"]


def test_emulation_path_is_exercised(hammer):
    """(c) hold each batch between steps: traps are emulated, counts stay exact."""
    running, syms, _ = hammer
    site = syms["site_caller"] + 9
    to_a, to_b = encode_call(site, syms["A"]), encode_call(site, syms["B"])

    def hold(step: Step) -> None:
        if step in (Step.INT3, Step.TAIL):
            time.sleep(0.01)

    with attach(running.pid) as session:
        before = session.stats().emulated
        for _ in range(20):
            session.apply([Patch(site=site, old=to_a, new=to_b)], on_step=hold)
            session.apply([Patch(site=site, old=to_b, new=to_a)], on_step=hold)
        emulated = session.stats().emulated - before
    result = running.stop()
    assert emulated > 0
    assert result["a"] + result["b"] == result["made"]
    assert result["bad"] == 0


def test_unknown_pid_is_refused():
    """(g) an unknown pid: one clear error."""
    with pytest.raises(NoSuchProcess, match="no process with pid"):
        attach(2**22 + 12345)


def test_bytes_mismatch_changes_nothing(hammer):
    """(g) a batch whose old bytes do not match is refused whole, nothing written."""
    running, syms, _ = hammer
    site = syms["site_caller"] + 9
    good = syms["traced"]
    with attach(running.pid) as session:
        before = (session.read_insn(site), session.read_insn(good))
        syncs = session.stats().syncs
        wrong_old = encode_call(site, syms["B"])  # the site really calls A
        with pytest.raises(SiteMismatch):
            session.apply([
                Patch(site=good, old=NOP5, new=encode_call(good, syms["B"])),
                Patch(site=site, old=wrong_old, new=encode_call(site, syms["A"])),
            ])
        assert (session.read_insn(site), session.read_insn(good)) == before
        assert session.stats().syncs == syncs
        assert session.resident.table.lookup(good) is None
    assert running.stop()["bad"] == 0


_KILLED_TOOL = r"""
import sys, time
from textpoke.poke import attach, Patch, Step
pid, site, a, b = (int(x) for x in sys.argv[1:5])
from textpoke.x86.insn import encode_call
s = attach(pid)
def hold(step):
    if step is Step.INT3:
        print("int3", flush=True)
        time.sleep(3600)
s.apply([Patch(site=site, old=encode_call(site, a), new=encode_call(site, b))], on_step=hold)
"""


def test_tool_killed_with_int3_in_place(hammer):
    """(e) SIGKILL the tool while the site holds int3: the target runs on, exact,
    and its agent finishes the batch by itself (the site ends as call B, whole)."""
    running, syms, _ = hammer
    site = syms["site_caller"] + 9
    tool = subprocess.Popen(
        [sys.executable, "-c", _KILLED_TOOL, str(running.pid), str(site), str(syms["A"]), str(syms["B"])],
        stdout=subprocess.PIPE, text=True,
    )
    assert tool.stdout.readline().strip() == "int3"
    tool.send_signal(signal.SIGKILL)
    tool.wait()
    deadline = time.monotonic() + 5
    while True:
        with open(f"/proc/{running.pid}/mem", "rb") as mem:
            mem.seek(site)
            now = mem.read(5)
        if now[0] != INT3_BYTE or time.monotonic() > deadline:
            break
        time.sleep(0.001)
    assert now == encode_call(site, syms["B"])  # finished by the agent, no recover run
    time.sleep(0.2)
    result = running.stop()
    assert result["bad"] == 0
    assert result["b"] > 0  # the in-flight entry says call B: emulated
    assert result["a"] + result["b"] == result["made"]


def _many_source(n: int) -> str:
    lines = ["#include <stdio.h>", "#include <string.h>", "#include <unistd.h>"]
    lines += [f"__attribute__((noinline)) long f{i}(long x) {{ return x + {i}; }}" for i in range(n)]
    lines.append("typedef long (*fn)(long);")
    lines.append("static fn table[] = {" + ",".join(f"f{i}" for i in range(n)) + "};")
    lines.append(
        "int main(void) { long acc = 0; char line[64];\n"
        f"  for (int i = 0; i < {n}; i++) acc += table[i](1);\n"
        '  printf("ready %d\\n", getpid()); fflush(stdout);\n'
        "  while (fgets(line, sizeof line, stdin) && strncmp(line, \"stop\", 4)) {}\n"
        f"  for (int i = 0; i < {n}; i++) acc += table[i](1);\n"
        '  printf("acc=%ld\\n", acc); return 0; }'
    )
    return "\n".join(lines)


def test_big_batch_three_syncs_and_exact_revert(tmp_path):
    """(d) one batch of 5,000 fentry sites: 3 syncs; revert: text == the ELF file."""
    from conftest import compile_c

    n = 5000
    source = tmp_path / "many.c"
    source.write_text(_many_source(n))
    binary = compile_c(source, opt="-O1", name="many")
    syms = symbols(binary)
    sites = [syms[f"f{i}"] for i in range(n)]
    text_addr, text_bytes = text_section(binary)
    running = start(binary)
    try:
        with attach(running.pid) as session:
            counters = Counters(session.resident, n=1, near=sites[0])
            batch = [Patch(site=s, old=NOP5, new=encode_call(s, counters.entry(0))) for s in sites]
            syncs = session.stats().syncs
            started = time.perf_counter()
            result = session.apply(batch)
            elapsed = time.perf_counter() - started
            assert result.syncs == 3 and len(result.patched) == n
            assert session.stats().syncs - syncs == 3
            assert all(session.read_insn(s) == batch[i].new for i, s in enumerate(sites[:50]))
            syncs = session.stats().syncs
            session.revert()
            assert session.stats().syncs - syncs == 3
            assert session.process.read(text_addr, len(text_bytes)) == text_bytes
        print(f"5000-site batch: {elapsed * 1e3:.1f} ms")
        out = running.stop()
        assert out["acc"] == 2 * sum(1 + i for i in range(n))
    finally:
        running.kill()


def _call_site(syms: dict[str, int]) -> int:
    return syms["site_caller"] + 9


def _toggle(session, site: int, syms: dict[str, int], times: int) -> None:
    to_a, to_b = encode_call(site, syms["A"]), encode_call(site, syms["B"])
    for _ in range(times):
        session.apply([Patch(site=site, old=to_a, new=to_b)])
        session.apply([Patch(site=site, old=to_b, new=to_a)])


def test_blocked_threads_see_no_eintr(build_target):
    """(f) epoll_wait/read/nanosleep threads: no EINTR from attach, batches, detach."""
    binary = build_target("sleepers")
    syms = symbols(binary)
    running = start(binary)
    try:
        with attach(running.pid) as session:
            _toggle(session, _call_site(syms), syms, 100)
        with attach(running.pid) as session:  # a second session adopts, stops nothing
            assert not session.resident.created
            _toggle(session, _call_site(syms), syms, 10)
        result = running.stop()
    finally:
        running.kill()
    assert result["eintr"] == 0
    assert result["bad"] == 0
    assert result["a"] + result["b"] == result["made"]


def test_threads_born_and_dying_during_batches(build_target):
    """(h) short-lived threads while batches are in flight: exact counts."""
    binary = build_target("churn")
    syms = symbols(binary)
    running = start(binary)
    try:
        with attach(running.pid) as session:
            _toggle(session, _call_site(syms), syms, 300)
        result = running.stop()
    finally:
        running.kill()
    assert result["threads"] > 8
    assert result["bad"] == 0
    assert result["made"] == result["threads"] * 2000
    assert result["a"] + result["b"] == result["made"]


_OTHER_TRACER = r"""
import sys, time
from textpoke.target import _ptrace
_ptrace.seize(int(sys.argv[1]))  # PTRACE_SEIZE stops nothing
print("tracing", flush=True)
time.sleep(3600)
"""


def test_pid_that_may_not_be_traced_is_refused(hammer):
    """(g) a process another tracer holds: one line naming the reason, nothing written."""
    running, syms, _ = hammer
    site = _call_site(syms)
    tracer = subprocess.Popen([sys.executable, "-c", _OTHER_TRACER, str(running.pid)], stdout=subprocess.PIPE, text=True)
    try:
        assert tracer.stdout.readline().strip() == "tracing"
        before = open(f"/proc/{running.pid}/maps").read()
        with pytest.raises(PermissionDenied, match=f"already traced by pid {tracer.pid}"):
            attach(running.pid)
        with open(f"/proc/{running.pid}/mem", "rb") as mem:
            mem.seek(site)
            assert mem.read(5) == encode_call(site, syms["A"])
        assert open(f"/proc/{running.pid}/maps").read() == before  # nothing mapped either
    finally:
        tracer.kill()
        tracer.wait()
    assert running.stop()["bad"] == 0


def test_spawn_installs_before_main(build_target):
    """spawn(argv): the resident part is there before main; the program then runs."""
    from textpoke.poke import spawn

    binary = build_target("hammer")
    syms = symbols(binary)
    proc, session = spawn([str(binary), "2"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    with session:
        assert session.resident.created
        assert proc.stdout.readline().startswith("ready")
        _toggle(session, _call_site(syms), syms, 50)
    out, _ = proc.communicate("stop\n", timeout=30)
    values = dict(kv.split("=") for kv in out.split())
    assert int(values["bad"]) == 0
    assert int(values["a"]) + int(values["b"]) == int(values["made"])
