"""Benchmark: nanoseconds added per traced call, every textpoke mode side by side.

    python bench/overhead.py [--calls N] [--rounds R] [--runs K] [--budget S]

One target (compiled here with fentry nop5 sites) runs T threads (T = 1, 2,
pinned to CPUs 0..T-1). Per run, each thread makes N calls of a noinline
function in batches of 8192, alternating a batch of the traced loop (``loop``
calling ``f``) with a batch of its never-traced twin (``loop_plain`` calling
``f_plain``, the same code), every batch started on a barrier so all threads
call at once, each timed with CLOCK_MONOTONIC: ns per call = batch wall time /
8192, and "added" = traced - untraced. Per run the median batch of each; per
row the median over the runs during which the untraced twin ran within 15% of
the best speed seen (this shared VM slows down by up to 2x for seconds at a
time, which slows both alike); rounds over all modes continue, within a
time budget, until every row has 3 such runs. Modes:

- entry tracer: fentry ``nop5`` of f -> stub -> record_entry, one record;
- entry+exit tracer (function graph): fentry -> graph_entry (ENTER record, return
  address hooked on the shadow stack) ... f returns to the graph runtime's trampoline
  -> graph_exit (EXIT record) -> the real return address: two records per call;
- call-site tracer: the ``call f`` in the loop -> stub -> record_call -> f;
- counter (rseq per-CPU): fentry -> stub -> plain ``inc`` on this CPU's row;
- counter (shared lock inc): trampolines.counter's ``lock inc`` per site;
- the entry tracer and the counter with rseq disabled: what threads without
  rseq do (``lock cmpxchg`` reservation; a shared ``lock inc`` row).

The ring holds a whole run (nothing may be lost: checked) and is filled once
before timing (its pages are mapped up front anyway). Reader throughput, for a
full 1M-record ring of one buffer and of two (two CPUs' runs to merge): the
drain (slots copied out of the ring, the space given back: what traced threads
wait on), the decode (ns timestamps, site and kind split, one run per buffer:
what the write thread does before compressing), each into buffers in use, and
the merge of the runs into time order that readers of the recording do
(``in_time_order``: off the path that must keep up with the traced program).
``uftrace record`` runs on the same workload when uftrace is installed. The
goals of issue 4 are printed MET / NOT MET; the target's results and the
number of records/counts of every run are checked (the bench stops if wrong).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # conftest.compile_c: the tests' fentry build

from conftest import compile_c  # noqa: E402

from textpoke.poke import Patch, Session, attach  # noqa: E402
from textpoke.ring.format import RAW_DTYPE, RECORD_DTYPE, in_time_order, write_ring_header  # noqa: E402
from textpoke.ring.reader import Decoder, RingReader, SiteTable  # noqa: E402
from textpoke.sites import SiteKind, sites_in_process  # noqa: E402
from textpoke.trampolines.counter import Counters  # noqa: E402
from textpoke.trampolines.graph import GraphRuntime  # noqa: E402
from textpoke.trampolines.tracer import Mode, StubKind, ThreadAbi, TracedSite, Tracer, probe_thread_abi  # noqa: E402
from textpoke.x86.insn import NOP5, encode_call  # noqa: E402

SOURCE = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define NOIPA __attribute__((noinline, noipa))
NOIPA long f(long i) { return i + 1; }
NOIPA long loop(long from, long n) { long acc = 0; for (long i = from; i < from + n; i++) acc += f(i); return acc; }
/* The same code under other names: never traced, each batch's baseline. */
NOIPA long f_plain(long i) { return i + 1; }
NOIPA long loop_plain(long from, long n) { long acc = 0; for (long i = from; i < from + n; i++) acc += f_plain(i); return acc; }

struct job { long n, batch, acc, *plain_ns, *traced_ns; int cpu; pthread_barrier_t *start; };

static long now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1000000000L + t.tv_nsec; }

/* Batches of the untraced twin and of the traced loop, alternating: both see
 * the same machine (a shared VM's speed drifts over seconds). Every batch
 * starts on a barrier, so with T threads they all call at once. */
static void *worker(void *arg) {
    struct job *j = arg;
    cpu_set_t set; CPU_ZERO(&set); CPU_SET(j->cpu, &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
    long acc = 0;
    for (long b = 0; b < j->n / j->batch; b++) {
        pthread_barrier_wait(j->start);
        long t0 = now();
        acc += loop_plain(b * j->batch, j->batch);
        j->plain_ns[b] = now() - t0;
        pthread_barrier_wait(j->start);
        long t1 = now();
        acc -= loop(b * j->batch, j->batch);
        j->traced_ns[b] = now() - t1;
    }
    j->acc = acc;
    return NULL;
}

int main(void) {
    char line[64];
    long threads, n, batch;
    int cpus = sysconf(_SC_NPROCESSORS_ONLN);
    setvbuf(stdout, NULL, _IOFBF, 1 << 20);
    printf("ready\n");
    fflush(stdout);
    while (fgets(line, sizeof line, stdin) && sscanf(line, "run %ld %ld %ld", &threads, &n, &batch) == 3) {
        pthread_t t[64]; struct job jobs[64]; pthread_barrier_t start;
        long batches = n / batch;
        pthread_barrier_init(&start, NULL, threads);
        for (int i = 0; i < threads; i++) {
            jobs[i] = (struct job){n, batch, 0, calloc(batches, 8), calloc(batches, 8), i % cpus, &start};
            pthread_create(&t[i], NULL, worker, &jobs[i]);
        }
        long ok = 1;
        for (int i = 0; i < threads; i++) {
            pthread_join(t[i], NULL);
            if (jobs[i].acc != 0) ok = 0;
        }
        printf("ok=%ld plain=", ok);
        for (int i = 0; i < threads; i++)
            for (long b = 0; b < batches; b++) printf(i + b ? ",%ld" : "%ld", jobs[i].plain_ns[b]);
        printf(" traced=");
        for (int i = 0; i < threads; i++)
            for (long b = 0; b < batches; b++) printf(i + b ? ",%ld" : "%ld", jobs[i].traced_ns[b]);
        printf("\n");
        fflush(stdout);
        for (int i = 0; i < threads; i++) { free(jobs[i].plain_ns); free(jobs[i].traced_ns); }
        pthread_barrier_destroy(&start);
    }
    return 0;
}
"""

BATCH = 8192  # calls per timed batch
PERCENTILE = 50
CLEAN_MARGIN = 1.15  # a run is clean if its untraced batches ran within 15% of the best seen
GOALS = {"entry tracer": 12.0, "entry+exit tracer": 25.0, "call-site tracer": 15.0,
         "counter": 3.0}  # ns added per call, T=1
READER_GOAL = 80.0  # M records/s
READER_TRIES = 8  # best of: the VM's speed drifts


class Target:
    """The workload process: ``run(threads, calls, batch)`` -> per-batch ns (untraced, traced)."""

    def __init__(self, binary: Path) -> None:
        self.proc = subprocess.Popen([str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().startswith("ready")
        self.pid = self.proc.pid

    def run(self, threads: int, calls: int, batch: int = BATCH) -> tuple[np.ndarray, np.ndarray]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"run {threads} {calls} {batch}\n")
        self.proc.stdin.flush()
        fields = dict(kv.split("=") for kv in self.proc.stdout.readline().split())
        if fields.get("ok") != "1":
            raise SystemExit(f"the target computed a wrong result under tracing: {fields.get('ok')}")
        plain, traced = (np.array(fields[k].split(","), dtype=np.float64) / batch for k in ("plain", "traced"))
        return plain, traced

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@dataclass
class Samples:
    """Per run, ns per call of its batches: the untraced twin's and the traced loop's."""

    runs: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    def per_run(self) -> np.ndarray:
        """(untraced, traced) low percentile of each run, one row per run."""
        return np.array([[np.percentile(p, PERCENTILE), np.percentile(t, PERCENTILE)] for p, t in self.runs])

    def clean(self, best_plain: float) -> np.ndarray:
        """The runs during which the untraced twin ran at the machine's full speed.

        This VM's speed drops by up to 2x for seconds at a time (neighbours on
        the host): such a run slows both loops alike, and is left out."""
        rows = self.per_run()
        clean = rows[rows[:, 0] <= best_plain * CLEAN_MARGIN]
        return clean if len(clean) else rows

    def summary(self, best_plain: float) -> tuple[float, float, float, int]:
        """(untraced, traced, added, clean runs): medians over the clean runs."""
        rows = self.clean(best_plain)
        return (float(np.median(rows[:, 0])), float(np.median(rows[:, 1])),
                float(np.median(rows[:, 1] - rows[:, 0])), len(rows))


@dataclass(frozen=True)
class Instrument:
    """One way of instrumenting ``f``: what to patch, a check after each run, cleanup."""

    name: str
    goal_key: str | None
    install: Callable[[Session], tuple[list[Patch], Callable[[], int], Callable[[], None]]]


def measure(target: Target, samples: Samples, *, threads: int, calls: int, runs: int,
            after_run: Callable[[], int]) -> None:
    """``runs`` runs of alternating batches (after a warm-up run, which also fills the
    ring once so its pages are mapped), each checked for the records/counts it made."""
    for run in range(runs + 1):
        plain, traced = target.run(threads, calls)
        seen = after_run()
        if seen != threads * calls:
            raise SystemExit(f"expected {threads * calls} records/counts, saw {seen}")
        if run:
            samples.runs.append((plain, traced))


def _sites(target: Target) -> dict[StubKind, TracedSite]:
    found = sites_in_process(target.pid, kinds={SiteKind.FENTRY, SiteKind.CALL}, functions=("f", "loop"))
    entry = next(s for s in found if s.kind is SiteKind.FENTRY and s.function == "f")
    call = next(s for s in found if s.kind is SiteKind.CALL and s.function == "loop" and s.target_name == "f")
    return {StubKind.ENTRY: TracedSite(entry.address, StubKind.ENTRY, entry.insn),
            StubKind.CALL: TracedSite(call.address, StubKind.CALL, call.insn)}


def tracer_instrument(name: str, goal: str | None, *, mode: Mode, site: TracedSite, abi: ThreadAbi,
                      ring_records: int, graph: bool = False) -> Instrument:
    records_per_call = 2 if graph else 1

    def install(session: Session):
        runtime = None
        if graph:
            runtime = GraphRuntime.find(session.process) or GraphRuntime.install(session.resident)
        tracer = Tracer(session.resident, [site], mode=mode, abi=abi, ring_records=ring_records * records_per_call,
                        runtime=runtime)
        state: dict[str, object] = {"previous": 0}
        if tracer.ring is not None:
            write_ring_header(tracer.data, tracer.ring)
            state["reader"] = RingReader(tracer.data)
            state["staging"] = np.empty(tracer.ring.buffers * tracer.ring.capacity, dtype=RAW_DTYPE)

        def after() -> int:
            reader = state.get("reader")
            if isinstance(reader, RingReader):
                got = reader.drain(state["staging"]).count // records_per_call  # type: ignore[arg-type]
                if reader.lost():
                    raise SystemExit(f"{name}: {reader.lost()} records lost; the ring is too small")
                return got
            total = int(tracer.counts().sum())
            got, state["previous"] = total - int(state["previous"]), total  # type: ignore[arg-type]
            return got

        def close() -> None:
            state.clear()  # drop the reader's views before the tracer closes the mapping
            tracer.close(discard=True)

        return list(tracer.patches), after, close

    return Instrument(name, goal, install)


def shared_counter_instrument(site: TracedSite) -> Instrument:
    def install(session: Session):
        counters = Counters(session.resident, n=1, near=site.address)
        previous = [0]

        def after() -> int:
            total = int(counters.counts()[0])
            got, previous[0] = total - previous[0], total
            return got

        return [Patch(site=site.address, old=NOP5, new=encode_call(site.address, counters.entry(0)))], after, \
            lambda: None

    return Instrument("counter (shared lock inc)", None, install)


def _table(site: TracedSite) -> SiteTable:
    return SiteTable.build(is_call=[site.kind is StubKind.CALL], address=[site.address])


def reader_throughput(session: Session, abi: ThreadAbi, target: Target, site: TracedSite,
                      calls: int) -> dict[int, tuple[float, float, float]]:
    """Per number of buffers filled (1, and 2 when there are 2 CPUs): M records/s of
    the drain, of the decode of ``calls`` records and of their merge into time order,
    best of READER_TRIES, into buffers in use (see the module docstring)."""
    most = min(2, max(abi.cpus, 1), os.cpu_count() or 1)
    tracer = Tracer(session.resident, [site], mode=Mode.TRACE, abi=abi, ring_records=calls * (abi.cpus + 1))
    assert tracer.ring is not None
    write_ring_header(tracer.data, tracer.ring)
    reader = RingReader(tracer.data)
    table = _table(site)
    staging = np.empty(tracer.ring.buffers * tracer.ring.capacity, dtype=RAW_DTYPE)
    decoded = np.empty(len(staging), dtype=RECORD_DTYPE)
    decoder = Decoder(table, cpus=abi.cpus)
    session.apply(tracer.patches)
    rates: dict[int, tuple[float, float, float]] = {}
    try:
        target.run(1, calls)  # fill the ring once: its pages mapped, as in a running trace
        reader.drain(staging)
        for buffers in range(1, most + 1):
            best = (0.0, 0.0, 0.0)
            for _ in range(READER_TRIES):
                target.run(buffers, calls // buffers)  # thread k pinned to CPU k: one buffer each
                started = time.perf_counter()
                drained = reader.drain(staging)
                middle = time.perf_counter()
                records = decoder.decode(staging, drained, decoded)
                done = time.perf_counter()
                ordered = in_time_order(records)
                merged = time.perf_counter()
                got = calls // buffers * buffers
                if drained.count != got or reader.lost() or len(records) != got:
                    raise SystemExit(f"reader: expected {got} records, got {drained.count} ({reader.lost()} lost)")
                if (np.count_nonzero(drained.per_buffer) != buffers
                        or (np.diff(ordered["ts_ns"].astype(np.int64)) < 0).any()):
                    raise SystemExit("reader: records not in time order")
                best = (max(best[0], got / (middle - started) / 1e6), max(best[1], got / (done - middle) / 1e6),
                        max(best[2], got / (merged - done) / 1e6))
            rates[buffers] = best
    finally:
        session.revert()
        del reader
        tracer.close(discard=True)
    return rates


def uftrace_lines(binary: Path, calls: int, added: dict[str, float]) -> list[str]:
    """``uftrace record`` on the same workload (same binary, the fentry nop5 of f patched by
    -P): entries only (-e), beside textpoke's entry tracer, and entries and exits (its
    default), beside textpoke's entry+exit tracer."""
    uftrace = shutil.which("uftrace")
    if uftrace is None:
        return ["uftrace: not installed here, skipped"]
    lines = []
    for flags, label, ours in ((["-e"], "uftrace record -e -P f (entries)", "entry tracer"),
                               ([], "uftrace record -P f (entries and exits)", "entry+exit tracer")):
        with tempfile.TemporaryDirectory() as tmp:
            try:
                proc = subprocess.run([uftrace, "record", *flags, "-d", tmp, "-P", "^f$", "--", str(binary)],
                                      input=f"run 1 {calls} {BATCH}\n", capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.TimeoutExpired) as exc:
                lines.append(f"{label}: failed ({exc})")
                continue
        fields = dict(kv.split("=", 1) for kv in proc.stdout.split() if "=" in kv)
        if fields.get("ok") != "1":
            lines.append(f"{label}: failed ({proc.stderr.strip()[:100]})")
            continue
        plain, traced = (np.array(fields[k].split(","), dtype=np.float64) / BATCH for k in ("plain", "traced"))
        cost = float(np.percentile(traced, PERCENTILE) - np.percentile(plain, PERCENTILE))
        lines.append(f"{label}: {cost:.1f} ns/call added, {cost / max(added[ours], 0.01):.1f}x the textpoke {ours}")
    return lines


def _enough_clean(samples: dict[tuple[str, int], Samples], thread_counts: list[int], *, wanted: int = 3) -> bool:
    for t in thread_counts:
        best = min(s.per_run()[:, 0].min() for (_, threads), s in samples.items() if threads == t)
        for (_, threads), s in samples.items():
            rows = s.per_run()
            if threads == t and (rows[:, 0] <= best * CLEAN_MARGIN).sum() < wanted:
                return False
    return True


#: What one read of the time stamp counter costs on this CPU: every record the tracers
#: write reads it once (an entry and its exit: twice), so it is their floor.
RDTSC_SOURCE = r"""
#include <stdio.h>
#include <time.h>
#include <x86intrin.h>
int main(void) {
    struct timespec a, b;
    unsigned long long sum = 0, best = ~0ULL;
    for (int round = 0; round < 5; round++) {
        clock_gettime(CLOCK_MONOTONIC, &a);
        for (int i = 0; i < 2000000; i++) sum += __rdtsc();
        clock_gettime(CLOCK_MONOTONIC, &b);
        unsigned long long ns = (b.tv_sec - a.tv_sec) * 1000000000ULL + (b.tv_nsec - a.tv_nsec);
        if (ns < best) best = ns;
    }
    printf("%.2f %llu\n", best / 2e6, sum & 1);
    return 0;
}
"""


def rdtsc_ns(tmp: Path) -> float:
    """ns per ``rdtsc`` on this CPU (the fastest of 5 rounds of 2 M reads)."""
    source = tmp / "rdtsc.c"
    source.write_text(RDTSC_SOURCE)
    done = subprocess.run([str(compile_c(source, fentry=False, name="rdtsc"))], capture_output=True, text=True,
                          check=True)
    return float(done.stdout.split()[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--calls", type=int, default=1 << 19,
                        help="calls per thread per run (a power of two, a multiple of the batch)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over every mode, at least")
    parser.add_argument("--budget", type=float, default=35.0,
                        help="seconds to keep adding rounds while some row has too few clean runs")
    parser.add_argument("--runs", type=int, default=3, help="runs per mode per round (after a warm-up run)")
    args = parser.parse_args(argv)
    calls = args.calls
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "overheadbench.c"
        source.write_text(SOURCE)
        binary = compile_c(source, opt="-O2", name="overheadbench")
        rdtsc = rdtsc_ns(Path(tmp))
    thread_counts = [t for t in (1, 2) if t <= (os.cpu_count() or 1)]
    target = Target(binary)
    try:
        sites = _sites(target)
        with attach(target.pid) as session:
            abi = probe_thread_abi(session.process, exclude=frozenset({session.resident.agent_tid}))
            no_rseq = replace(abi, cpus=0, rseq_offset=None, note="rseq disabled for the comparison")
            ring = calls * (abi.cpus + 1)  # T threads pinned to T CPUs: each buffer holds a run
            entry, call = sites[StubKind.ENTRY], sites[StubKind.CALL]
            instruments = [
                tracer_instrument("entry tracer", "entry tracer", mode=Mode.TRACE, site=entry, abi=abi,
                                  ring_records=ring),
                tracer_instrument("entry+exit tracer", "entry+exit tracer", mode=Mode.TRACE, site=entry, abi=abi,
                                  ring_records=ring, graph=True),
                tracer_instrument("call-site tracer", "call-site tracer", mode=Mode.TRACE, site=call, abi=abi,
                                  ring_records=ring),
                tracer_instrument("counter (rseq per-CPU)", "counter", mode=Mode.COUNT, site=entry, abi=abi,
                                  ring_records=ring),
                shared_counter_instrument(entry),
                tracer_instrument("entry tracer, no rseq (cmpxchg)", None, mode=Mode.TRACE, site=entry,
                                  abi=no_rseq, ring_records=calls * max(thread_counts)),
                tracer_instrument("counter, no rseq (lock inc)", None, mode=Mode.COUNT, site=entry,
                                  abi=no_rseq, ring_records=ring),
            ]
            samples = {(i.name, t): Samples() for i in instruments for t in thread_counts}
            rounds = 0
            # Rounds until every row has clean runs (see Samples.clean), within the time budget.
            while rounds < args.rounds or (not _enough_clean(samples, thread_counts)
                                           and time.perf_counter() - started < args.budget):
                rounds += 1
                for instrument in instruments:
                    patches, after, close = instrument.install(session)
                    session.apply(patches)
                    try:
                        for t in thread_counts:
                            measure(target, samples[instrument.name, t], threads=t, calls=calls, runs=args.runs,
                                    after_run=after)
                    finally:
                        session.revert()
                        close()
            reader_rates = reader_throughput(session, abi, target, entry, 1 << 20)
    finally:
        target.close()

    best_plain = {t: min(samples[i.name, t].per_run()[:, 0].min() for i in instruments) for t in thread_counts}
    summary = {key: value.summary(best_plain[key[1]]) for key, value in samples.items()}
    print(f"textpoke: ns added per call. Each run: per thread, {calls // BATCH} batches of {BATCH:,} calls of "
          f"the traced loop alternating with its untraced twin, {PERCENTILE}th percentile of each; median over "
          f"the runs with the untraced twin at full speed (of {rounds * args.runs} per row); threads pinned")
    print(f"thread ids: {'kernel tid (fs:0x2d0)' if abi.tid_offset is not None else 'opaque'}; "
          f"rseq: {'yes' if abi.rseq_offset is not None else 'no'}, {abi.cpus} per-CPU buffers")
    header = f"{'mode':34}" + "".join(f"{f'T={t} untraced':>15}{'traced':>8}{'added':>8}{'runs':>5}"
                                      for t in thread_counts)
    print(header)
    print("-" * len(header))
    for instrument in instruments:
        cells = "".join(f"{plain:15.2f}{traced:8.2f}{added:8.2f}{runs:5d}"
                        for plain, traced, added, runs in (summary[instrument.name, t] for t in thread_counts))
        print(f"{instrument.name:34}{cells}")
    print("(ns per call per thread; at T=2 both threads call at once)")
    print(f"this CPU reads its time stamp counter (rdtsc) in {rdtsc:.1f} ns: once per record, the floor of "
          f"every tracer row (an entry and its exit read it twice: {2 * rdtsc:.1f} ns)")
    print()
    entry_added = summary["entry tracer", 1][2]
    for line in uftrace_lines(binary, calls, {"entry tracer": entry_added,
                                              "entry+exit tracer": summary["entry+exit tracer", 1][2]}):
        print(line)
    for buffers, (drain, decoding, merging) in reader_rates.items():
        print(f"reader, 1M records in {buffers} buffer{'s' if buffers > 1 else ''}: drain {drain:.0f} M records/s, "
              f"decode {decoding:.0f} M records/s; merged into time order when read: {merging:.0f} M records/s")
    slowest = min(min(rates[:2]) for rates in reader_rates.values())
    print()
    for instrument in instruments:
        if instrument.goal_key is not None:
            added, goal = summary[instrument.name, 1][2], GOALS[instrument.goal_key]
            print(f"goal {instrument.goal_key} <= {goal:g} ns/call at T=1: {added:.2f} -> "
                  f"{'MET' if added <= goal else 'NOT MET'}")
    print(f"goal reader (drain and decode) >= {READER_GOAL:g} M records/s: {slowest:.0f} -> "
          f"{'MET' if slowest >= READER_GOAL else 'NOT MET'}")
    load = os.getloadavg()[0]
    print(f"({time.perf_counter() - started:.1f} s; load average {load:.1f} on {os.cpu_count()} CPUs"
          f"{': other work was running' if load > 1.5 else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
