"""Benchmark: one batch of N fentry patches, textpoke vs stop-the-world, side by side.

    python bench/patch.py [--quick] [--sizes 1,1000,10000,100000] [--threads 1,4,16]

For every (N sites, T target threads) the same freshly started target is patched
twice, first by textpoke, then by a "stop-the-world" baseline:

- textpoke: ``attach`` (first attach installs the resident part, borrowing one
  thread: ``resident.attach_stop_ns``), then ``Session.apply`` of N patches
  fentry nop5 -> ``call`` counter trampoline (one PatchArray, as the tracer
  builds it), and ``Session.revert``; three syncs each (from
  ``session.stats().syncs``), no thread is ptrace-stopped (every ``_ptrace.seize``
  the tool makes during a batch is counted: must be 0). Then the session ends and
  a second one attaches (re-attach: the resident part is there) and checks the
  thread ABI as a capture does (``probe_thread_abi``): threads seized (must be 0)
  and wall time.
- stop-the-world: PTRACE_SEIZE + PTRACE_INTERRUPT every thread, wait for all
  of them, verify the old bytes (one read of the span of sites), ``process.write``
  each site (nop5 -> ``call bench_counter``, a counter compiled into the target),
  detach all; the revert the same way.

The application-thread stall is measured *in the target*: each of the T workers
loops "call the next function through a function-pointer table, read
CLOCK_MONOTONIC" and keeps the largest gap between consecutive iterations in a
window the tool opens ("begin") and closes ("end") over stdin.  Every batch
window is preceded by an idle window of the same length: on 2 cores with up to
16 busy threads the scheduler alone makes gaps of milliseconds, and the idle
column shows that noise floor.  Gaps are pooled over all threads and
repetitions: "med" is the median thread, "max" the worst one.  The run-queue
wait of each worker (schedstat) in both windows tells scheduling from stopping:
a ptrace-stopped thread is not runnable, a starved one waits in the run queue.
"bg%" is the CPU time other processes on the machine used during a row.

Exit status 0 unless a check failed (wrong results in the target, a patch
that never ran); the issue's goals are printed as MET / NOT MET.
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # conftest.compile_c: the tests' fentry build

from conftest import compile_c  # noqa: E402
from elftools.elf.elffile import ELFFile  # noqa: E402

import numpy as np  # noqa: E402

from textpoke.poke import attach  # noqa: E402
from textpoke.poke.bulk import PatchArray  # noqa: E402
from textpoke.poke.resident import HEAL_BATCHES  # noqa: E402
from textpoke.target import _ptrace  # noqa: E402
from textpoke.target.process import Process  # noqa: E402
from textpoke.trampolines.counter import Counters  # noqa: E402
from textpoke.trampolines.tracer import probe_thread_abi  # noqa: E402
from textpoke.x86.insn import NOP5, SITE_SIZE, encode_call, encode_calls  # noqa: E402

MAX_N = 100_000  # functions in the target; a run patches the first N of them

# ---------------------------------------------------------------------------
# The target
# ---------------------------------------------------------------------------

_PROLOGUE = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* The baseline's call target: a counter that, like textpoke's trampolines,
 * touches no register (flags are dead at a function entry). */
volatile unsigned long bench_count __attribute__((used));
__asm__(".text\n.globl bench_counter\n.type bench_counter,@function\n"
        "bench_counter:\n\tlock incq bench_count(%rip)\n\tret\n"
        ".size bench_counter, .-bench_counter\n");
"""

_MAIN = r"""
typedef long (*fn)(long);

struct slot {                       /* one per worker, own cache line */
    _Atomic uint64_t last;          /* time of the latest iteration */
    _Atomic uint64_t max;           /* largest gap in the current window */
    _Atomic unsigned epoch;         /* window the two above belong to */
    _Atomic int tid;
    long bad, iters;
} __attribute__((aligned(64)));

static struct slot slots[256];
static _Atomic unsigned g_epoch;    /* bumped by "begin" */
static _Atomic uint64_t g_start;    /* start of the current window */
static atomic_int g_stop, g_started;
static int nfn;

static inline uint64_t now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void *worker(void *arg) {
    struct slot *s = arg;
    unsigned ep = atomic_load(&g_epoch);
    uint64_t last = now(), mx = 0;
    long bad = 0, iters = 0;
    int i = 0;
    atomic_store(&s->tid, gettid());
    atomic_fetch_add(&g_started, 1);
    while (!atomic_load_explicit(&g_stop, memory_order_relaxed)) {
        if (table[i](1) != 1 + i) bad++;
        if (++i == nfn) i = 0;
        iters++;
        unsigned e = atomic_load_explicit(&g_epoch, memory_order_acquire);
        uint64_t t = now();
        if (e != ep) {              /* a new window: gaps count from its start */
            uint64_t start = atomic_load_explicit(&g_start, memory_order_relaxed);
            ep = e;
            mx = 0;
            if (last < start) last = start;
            atomic_store_explicit(&s->max, 0, memory_order_relaxed);
            atomic_store_explicit(&s->epoch, e, memory_order_release);
        }
        if (t > last && t - last > mx) {
            mx = t - last;
            atomic_store_explicit(&s->max, mx, memory_order_relaxed);
        }
        last = t;
        atomic_store_explicit(&s->last, t, memory_order_relaxed);
    }
    s->bad = bad;
    s->iters = iters;
    return NULL;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    nfn = argc > 2 ? atoi(argv[2]) : NFN;
    if (threads < 1 || threads > 256 || nfn < 1 || nfn > NFN) return 2;
    long acc = 0;
    for (int i = 0; i < NFN; i++) acc += table[i](1);   /* fault every page in */
    pthread_t tids[256];
    for (int i = 0; i < threads; i++) pthread_create(&tids[i], NULL, worker, &slots[i]);
    while (atomic_load(&g_started) < threads) usleep(1000);
    printf("ready %d\n", getpid());
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {    /* blocked in read(): borrowable */
        if (strncmp(line, "begin", 5) == 0) {
            atomic_store_explicit(&g_start, now(), memory_order_relaxed);
            atomic_fetch_add_explicit(&g_epoch, 1, memory_order_release);
            printf("ok\n");
        } else if (strncmp(line, "end", 3) == 0) {
            uint64_t end = now(), start = atomic_load(&g_start);
            unsigned e = atomic_load(&g_epoch);
            printf("window=%llu gaps=", (unsigned long long)(end - start));
            for (int i = 0; i < threads; i++) {
                struct slot *s = &slots[i];
                uint64_t gap;
                if (atomic_load_explicit(&s->epoch, memory_order_acquire) != e) {
                    gap = end - start;      /* never ran in the window */
                } else {
                    uint64_t mx = atomic_load(&s->max), last = atomic_load(&s->last);
                    uint64_t open = end > last ? end - last : 0;  /* gap still open */
                    gap = mx > open ? mx : open;
                }
                printf("%s%llu", i ? "," : "", (unsigned long long)gap);
            }
            printf("\n");
        } else if (strncmp(line, "tids", 4) == 0) {
            printf("tids=");
            for (int i = 0; i < threads; i++) printf("%s%d", i ? "," : "", atomic_load(&slots[i].tid));
            printf("\n");
        } else if (strncmp(line, "count", 5) == 0) {
            printf("count=%lu\n", bench_count);
        } else if (strncmp(line, "stop", 4) == 0) {
            break;
        }
        fflush(stdout);
    }
    atomic_store(&g_stop, 1);
    long bad = 0, iters = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(tids[i], NULL);
        bad += slots[i].bad;
        iters += slots[i].iters;
    }
    printf("bad=%ld iters=%ld acc=%ld\n", bad, iters, acc);
    return 0;
}
"""


def target_source(n: int) -> str:
    """``_many_source`` (tests/live) grown into a stall meter: n functions f_i(x) = x + i
    with a fentry nop5 each, called by the workers through a table."""
    lines = [_PROLOGUE, f"#define NFN {n}"]
    lines += [f"__attribute__((noinline)) long f{i}(long x) {{ return x + {i}; }}" for i in range(n)]
    lines.append("static long (*const table[])(long) = {" + ",".join(f"f{i}" for i in range(n)) + "};")
    lines.append(_MAIN)
    return "\n".join(lines)


def build_target() -> tuple[Path, list[int], int]:
    """The binary, the fentry site of every f_i (its entry), and bench_counter."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "patchbench.c"
        source.write_text(target_source(MAX_N))
        binary = compile_c(source, opt="-O1", name="patchbench")
    with open(binary, "rb") as f:
        table = ELFFile(f).get_section_by_name(".symtab")
        syms = {s.name: s["st_value"] for s in table.iter_symbols()
                if s["st_info"]["type"] == "STT_FUNC" and s["st_value"]}
    return binary, [syms[f"f{i}"] for i in range(MAX_N)], syms["bench_counter"]


class Target:
    """A running stall meter; a context manager that stops (or kills) it."""

    def __init__(self, binary: Path, threads: int, n: int) -> None:
        self.proc = subprocess.Popen([str(binary), str(threads), str(n)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        line = self._line()
        if not line.startswith("ready"):
            raise RuntimeError(f"target did not start: {line!r}")
        self.pid = self.proc.pid
        self.workers = [int(t) for t in self.ask("tids").split("=")[1].split(",")]

    def _line(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"target exited ({self.proc.poll()})")
        return line

    def ask(self, command: str) -> str:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._line().strip()

    def begin(self) -> None:
        if self.ask("begin") != "ok":
            raise RuntimeError("target did not open a window")

    def end(self) -> list[int]:
        """Per-worker largest iteration gap (ns) of the window just closed."""
        fields = dict(item.split("=") for item in self.ask("end").split())
        return [int(g) for g in fields["gaps"].split(",")]

    def run_delay(self) -> list[int]:
        """Per-worker total time spent runnable but waiting for a CPU (ns, schedstat)."""
        delays = []
        for tid in self.workers:
            with open(f"/proc/{self.pid}/task/{tid}/schedstat") as f:
                delays.append(int(f.read().split()[1]))
        return delays

    def stop(self) -> dict[str, int]:
        out, _ = self.proc.communicate("stop\n", timeout=30)
        if self.proc.returncode != 0:
            raise RuntimeError(f"target exited with {self.proc.returncode}: {out!r}")
        return {k: int(v) for k, v in (item.split("=") for item in out.split()[-3:])}

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------


class SeizeCounter:
    """Counts the threads the tool seizes while active: textpoke's batches must
    seize none, its first attach exactly one."""

    def __init__(self) -> None:
        self.seized: list[int] = []
        self._orig = _ptrace.seize

        def seize(tid: int, *, options: int = 0) -> None:
            self.seized.append(tid)
            self._orig(tid, options=options)

        _ptrace.seize = seize  # inject.py looks it up as _ptrace.seize(...) at each call

    def close(self) -> None:
        _ptrace.seize = self._orig


@dataclass
class Window:
    """What one measured action did, seen from the tool and from the target."""

    wall_s: float
    cpu_s: float  # the tool's own CPU time
    gaps: list[int]  # per worker, largest iteration gap in the window (ns)
    idle: list[int]  # the same, in an idle window just as long
    runq: list[int]  # per worker, time runnable but not running in the window (ns)
    runq_idle: list[int]  # the same, in the idle window


def windowed(target: Target, action) -> tuple[object, Window]:
    """Run ``action`` in a stall window, then an idle window just as long."""
    delay = target.run_delay()
    target.begin()
    cpu, wall = time.process_time(), time.perf_counter()
    result = action()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    gaps = target.end()
    runq = [after - before for before, after in zip(delay, target.run_delay())]
    delay = target.run_delay()
    target.begin()
    time.sleep(wall)
    idle = target.end()
    runq_idle = [after - before for before, after in zip(delay, target.run_delay())]
    return result, Window(wall, cpu, gaps, idle, runq, runq_idle)


@dataclass
class Method:
    applies: list[Window] = field(default_factory=list)
    reverts: list[Window] = field(default_factory=list)
    syncs: set[int] = field(default_factory=set)  # textpoke: per batch
    seized: int = 0  # threads seized during batches (textpoke: must be 0)
    stopped_ns: list[int] = field(default_factory=list)  # stw: world stopped, per batch
    threads_stopped: int = 0  # stw: threads in the target
    attach: Window | None = None  # textpoke: first attach
    attach_ns: int = 0  # textpoke: borrowed thread stopped at first attach
    attach_wait_ns: int = 0  # of attach_ns: until the thread reached its stop (woken, it needs a CPU)
    attach_seized: int = 0  # textpoke: threads seized by the first attach
    reattach_s: float = 0.0  # textpoke: attach() to a process holding the resident part
    probe_s: float = 0.0  # textpoke: probe_thread_abi after that
    reattach_seized: int = 0  # textpoke: threads seized by both
    healed: int = 0  # textpoke: batches the agent finished itself (it took the tool for dead: must be 0)
    counted: int = 0  # calls counted by the patched-in counters

    def med(self, what: str, batches: str = "applies") -> float:
        return statistics.median(getattr(w, what) for w in getattr(self, batches))

    def pooled(self, what: str) -> list[int]:
        return [g for w in self.applies + self.reverts for g in getattr(w, what)]


def run_textpoke(target: Target, sites: list[int], reps: int) -> Method:
    m = Method()
    counter = SeizeCounter()
    try:
        session, m.attach = windowed(target, lambda: attach(target.pid))
        m.attach_seized = len(counter.seized)
        m.attach_ns = session.resident.attach_stop_ns
        m.attach_wait_ns = session.resident.attach_wait_ns
        if not session.resident.created:
            raise RuntimeError("the first attach must install the resident part")
        with session:
            counters = Counters(session.resident, n=len(sites), near=sites[0])
            addresses = np.array(sites, dtype=np.uint64)
            targets = counters.region.address + np.arange(len(sites), dtype=np.uint64) * np.uint64(
                counters.entry(1) - counters.entry(0))
            batch = PatchArray.build(addresses, np.tile(np.frombuffer(NOP5, dtype=np.uint8), (len(sites), 1)),
                                     encode_calls(addresses, targets))
            counter.seized.clear()
            for _ in range(reps):
                for revert in (False, True):
                    before = session.stats().syncs
                    action = session.revert if revert else (lambda: session.apply(batch))
                    result, window = windowed(target, action)
                    m.syncs.add(session.stats().syncs - before)
                    if result.syncs != 3 or len(result.patched) != len(sites):
                        raise RuntimeError(f"unexpected batch result {result.syncs} syncs")
                    (m.reverts if revert else m.applies).append(window)
            m.seized = len(counter.seized)
            m.counted = int(counters.counts().sum())
            m.healed = struct.unpack_from("<Q", session.resident.ctl, HEAL_BATCHES)[0]
            if any(session.read_insn(s) != NOP5 for s in sites[:: max(1, len(sites) // 1000)]):
                raise RuntimeError("textpoke's revert left a site changed")
        counter.seized.clear()
        began = time.perf_counter()
        again = attach(target.pid)
        m.reattach_s = time.perf_counter() - began
        try:
            if again.resident.created:
                raise RuntimeError("the second attach installed a second resident part")
            began = time.perf_counter()
            probe_thread_abi(again.process, exclude=frozenset({again.resident.agent_tid}))
            m.probe_s = time.perf_counter() - began
        finally:
            again.close()
        m.reattach_seized = len(counter.seized)
    finally:
        counter.close()
    return m


def stop_the_world(process: Process, writes: list[tuple[int, bytes, bytes]]) -> tuple[int, int]:
    """Seize+interrupt every thread, verify and write every site, detach all.

    Returns how long the world was stopped (ns, first seize to last detach) and
    how many threads that was."""
    tids = process.threads()
    seized: list[int] = []
    start = time.perf_counter_ns()
    try:
        for tid in tids:
            _ptrace.seize(tid)
            seized.append(tid)
            _ptrace.interrupt(tid)
        for tid in tids:
            _, status = _ptrace.wait_thread(tid)
            if not os.WIFSTOPPED(status):
                raise RuntimeError(f"thread {tid} did not stop: status {status:#x}")
        # Verify like textpoke does (all old bytes before any write): one read of the span.
        lo = min(w[0] for w in writes)
        span = process.read(lo, max(w[0] for w in writes) + SITE_SIZE - lo)
        for site, old, _ in writes:
            if span[site - lo : site - lo + SITE_SIZE] != old:
                raise RuntimeError(f"site {site:#x} does not hold {old.hex()}")
        for site, _, new in writes:
            process.write(site, new)
    finally:
        for tid in seized:
            _ptrace.detach(tid)
    return time.perf_counter_ns() - start, len(tids)


def run_stw(target: Target, sites: list[int], counter_fn: int, reps: int) -> Method:
    m = Method()
    on = [(s, NOP5, encode_call(s, counter_fn)) for s in sites]
    off = [(s, new, old) for s, old, new in on]
    with Process(target.pid) as process:
        for _ in range(reps):
            for revert in (False, True):
                writes = off if revert else on
                (stopped, m.threads_stopped), window = windowed(
                    target, lambda: stop_the_world(process, writes))
                m.stopped_ns.append(stopped)
                (m.reverts if revert else m.applies).append(window)
        if any(process.read(s, SITE_SIZE) != NOP5 for s in sites):
            raise RuntimeError("the baseline's revert left a site changed")
    m.counted = int(target.ask("count").split("=")[1])
    return m


@dataclass
class Row:
    n: int
    threads: int
    tp: Method
    stw: Method
    bad: int
    foreign: float  # share of the machine's CPU time used by other processes meanwhile


def _busy_ticks() -> tuple[int, int]:
    """(non-idle, total) CPU time of the machine, in clock ticks (/proc/stat)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    return sum(values) - values[3] - values[4], sum(values)  # minus idle and iowait


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])  # utime + stime, all threads


def measure(binary: Path, all_sites: list[int], counter_fn: int, n: int, threads: int, reps: int) -> Row:
    sites = all_sites[:n]
    hz = os.sysconf("SC_CLK_TCK")
    busy0, total0 = _busy_ticks()
    tool0 = sum(os.times()[:2])
    with Target(binary, threads, n) as target:
        time.sleep(0.05)  # let the workers settle on the cores
        tp = run_textpoke(target, sites, reps)
        stw = run_stw(target, sites, counter_fn, reps)
        target_ticks = _cpu_ticks(target.pid)
        busy1, total1 = _busy_ticks()
        tool_ticks = (sum(os.times()[:2]) - tool0) * hz
        out = target.stop()
    foreign = max(0.0, busy1 - busy0 - target_ticks - tool_ticks) / max(1, total1 - total0)
    return Row(n, threads, tp, stw, out["bad"], foreign)


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def us(ns: float) -> str:
    v = ns / 1e3
    return f"{v:.0f}" if v >= 10 else f"{v:.1f}"


def ms(s: float) -> str:
    return f"{s * 1e3:.1f}" if s < 0.1 else f"{s * 1e3:.0f}"


def spread(values: list[int]) -> str:
    return f"{us(statistics.median(values))}/{us(max(values))}"


def runq(m: Method) -> str:
    return f"{us(statistics.median(m.pooled('runq')))}/{us(statistics.median(m.pooled('runq_idle')))}"


def rate(n: int, s: float) -> str:
    r = n / s
    return f"{r / 1e6:.1f}M" if r >= 1e6 else f"{r / 1e3:.0f}k" if r >= 1e3 else f"{r:.0f}"


def report(rows: list[Row], reps: int, elapsed: float) -> bool:
    print(f"textpoke vs stop-the-world (stw): one batch of N fentry nop5 -> call-counter patches "
          f"in a target with T busy threads; {os.cpu_count()} CPUs; medians of {reps} batches")
    print("stall/idle: largest gap between two iterations of a worker, measured in the target, "
          "median/max over workers x batches (us); idle = same-length window without a batch;")
    print("runq: time a worker waited for a CPU, batch/idle window, median (schedstat); stopped: "
          "textpoke batch/first attach (borrowed thread), stw whole world;")
    print("time x = textpoke/stw apply time, stall x = textpoke/stw median stall;")
    print("bg%: CPU time other processes of this machine used meanwhile (not the tool, not the target)")
    header = (f"{'N':>6} {'T':>2} {'method':<8} {'apply ms':>8} {'revert':>6} {'sites/s':>7} "
              f"{'cpu ms':>6} {'syncs':>5} {'stopped us':>12} {'stall us':>11} {'idle us':>11} "
              f"{'runq us b/i':>11} {'time x':>6} {'stall x':>7} {'bg%':>3}")
    print(header)
    print("-" * len(header))
    for row in rows:
        tp, stw = row.tp, row.stw
        time_x = tp.med("wall_s") / stw.med("wall_s")
        stall_x = statistics.median(tp.pooled("gaps")) / statistics.median(stw.pooled("gaps"))
        syncs = ",".join(str(s) for s in sorted(tp.syncs))
        stopped_tp = f"{us(tp.seized)}/{us(tp.attach_ns)}" if tp.seized else f"0/{us(tp.attach_ns)}"
        stopped_stw = f"{us(statistics.median(stw.stopped_ns))} {stw.threads_stopped}t"
        for label, m, stopped, extra in (
            ("textpoke", tp, stopped_tp, f" {time_x:>6.2f} {stall_x:>7.2f} {row.foreign * 100:>3.0f}"),
            ("stw", stw, stopped_stw, ""),
        ):
            first = f"{row.n:>6} {row.threads:>2}" if m is tp else f"{'':>6} {'':>2}"
            print(f"{first} {label:<8} {ms(m.med('wall_s')):>8} {ms(m.med('wall_s', 'reverts')):>6} "
                  f"{rate(row.n, m.med('wall_s')):>7} {ms(m.med('cpu_s')):>6} "
                  f"{syncs if m is tp else '-':>5} {stopped:>12} {spread(m.pooled('gaps')):>11} "
                  f"{spread(m.pooled('idle')):>11} {runq(m):>11}{extra}")
    print("-" * len(header))
    by_t: dict[int, list[int]] = {}
    for r in rows:
        by_t.setdefault(r.threads, []).append(r.tp.attach_ns)
    per_t = ", ".join(f"T={t}: {us(statistics.median(v))}" for t, v in by_t.items())
    att_gaps = [g for r in rows for g in r.tp.attach.gaps]
    att_idle = [g for r in rows for g in r.tp.attach.idle]
    waits = ", ".join(f"T={t}: {us(statistics.median([r.tp.attach_wait_ns for r in rows if r.threads == t]))}"
                      for t in by_t)
    print(f"first attach: borrowed thread stopped (median us) {per_t}; of which waiting for the thread to reach "
          f"its stop {waits}; threads seized per attach "
          f"{sorted({r.tp.attach_seized for r in rows})}; worker stall during attach {spread(att_gaps)} "
          f"us (idle {spread(att_idle)})")
    bad = sum(r.bad for r in rows)
    live = all(r.tp.counted > 0 and r.stw.counted > 0 for r in rows)
    print(f"checks: syncs per textpoke batch {sorted({s for r in rows for s in r.tp.syncs})} (batches the agent "
          f"finished itself: {sum(r.tp.healed for r in rows)}); "
          f"wrong results in the target {bad}; both methods' counters counted calls: {live}; "
          f"run took {elapsed:.0f} s")
    goals: list[tuple[str, bool | None, str]] = []
    big = [r for r in rows if r.n >= 10_000]
    if big:
        per_site = {(r.n, r.threads): r.tp.med("cpu_s") / r.n for r in big}
        worst = max(per_site.values())
        goals.append(("tool CPU <= 3 us per site (N >= 10,000)", worst <= 3e-6,
                      ", ".join(f"N={n} T={t}: {v * 1e6:.2f} us" for (n, t), v in per_site.items())))
    else:
        goals.append(("tool CPU <= 3 us per site (N >= 10,000)", None, "not measured"))

    def apply_goal(n: int, threads: int, limit_s: float) -> None:
        row = next((r for r in rows if r.n == n and r.threads == threads), None)
        name = f"{n:,} sites applied in < {limit_s * 1e3:.0f} ms at T={threads}"
        if row is None:
            goals.append((name, None, "not measured"))
            return
        wall = row.tp.med("wall_s")
        goals.append((name, wall < limit_s, f"{ms(wall)} ms (revert {ms(row.tp.med('wall_s', 'reverts'))} ms, "
                                             f"tool cpu {ms(row.tp.med('cpu_s'))} ms; stw {ms(row.stw.med('wall_s'))} ms)"))

    apply_goal(10_000, 1, 0.1)
    apply_goal(10_000, 16, 0.5)
    apply_goal(100_000, 1, 1.0)
    seized = sum(r.tp.seized for r in rows)
    goals.append(("application threads stopped 0 us during batches", seized == 0,
                  f"{seized} threads ptrace-stopped in textpoke batches; compare stall with idle/runq"))
    one = all(r.tp.attach_seized == 1 for r in rows)
    for threads, limit in ((1, 1e6), (16, 5e6)):
        values = by_t.get(threads)
        name = f"first attach: borrowed thread stopped < {limit / 1e6:.0f} ms at T={threads}"
        if not values:
            goals.append((name, None, "not measured"))
            continue
        med = statistics.median(values)
        goals.append((name, one and med < limit, f"median {us(med)} us, max {us(max(values))} us over "
                                                 f"{len(values)} attaches ({'one' if one else 'NOT one'} thread each)"))
    again = [r.tp.reattach_s + r.tp.probe_s for r in rows]
    reseized = sum(r.tp.reattach_seized for r in rows)
    goals.append(("re-attach: no thread stopped, < 20 ms", reseized == 0 and statistics.median(again) < 0.02,
                  f"{reseized} threads seized; attach median {ms(statistics.median([r.tp.reattach_s for r in rows]))} "
                  f"ms (max {ms(max(r.tp.reattach_s for r in rows))}; by T: " + ", ".join(
                      f"{t}: {ms(statistics.median([r.tp.reattach_s for r in rows if r.threads == t]))}" for t in by_t)
                  + f"), thread-ABI check median {ms(statistics.median([r.tp.probe_s for r in rows]))} ms"))
    for name, met, detail in goals:
        mark = "n/a" if met is None else "MET" if met else "NOT MET"
        print(f"goal: {name:<52} {mark:<7} {detail}")
    return bad == 0 and live  # goals inform; only a wrong result fails the run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only N in {1, 1000}, T in {1, 4}")
    parser.add_argument("--sizes", help="comma-separated N (default 1,1000,10000,100000)")
    parser.add_argument("--threads", help="comma-separated T (default 1,4,16)")
    parser.add_argument("--reps", type=int, default=None, help="batches per method and config")
    args = parser.parse_args(argv)
    ns = (1, 1000) if args.quick else (1, 1000, 10_000, 100_000)
    ts = (1, 4) if args.quick else (1, 4, 16)
    if args.sizes:
        ns = tuple(int(v) for v in args.sizes.split(","))
    if args.threads:
        ts = tuple(int(v) for v in args.threads.split(","))
    reps = args.reps or 3
    started = time.perf_counter()
    binary, sites, counter_fn = build_target()
    rows = []
    for n in ns:
        for t in ts:
            rows.append(measure(binary, sites, counter_fn, n, t, reps))
            print(f"  measured N={n} T={t} ({time.perf_counter() - started:.0f} s)",
                  file=sys.stderr, flush=True)
    return 0 if report(rows, reps, time.perf_counter() - started) else 1


if __name__ == "__main__":
    sys.exit(main())
