"""What building with the fentry flags costs a program textpoke does not trace.

    python bench/fentry_cost.py [--runs K]

Builds one C program three times with gcc -O2: ``pie`` (gcc's default on
Debian), ``plain`` (``-fno-pie``/``-no-pie`` only), and ``fentry`` (the README's
flags: ``-pg -mfentry -mnop-mcount -mrecord-mcount`` at compile time, linked
without ``-pg``), then runs the builds in turn K times each. Each run times two workloads inside the program (CLOCK_MONOTONIC):

- ``calls``: recursive fib(36) through a noinline function, ~48 million calls
  of a function with almost no body: the worst case for a nop5 per call;
- ``sort``: merge sort of 2M ints with a noinline comparison, a call per
  comparison inside real work.

Prints, per workload, the median time of each build and the ratios
fentry/plain (the cost of the fentry nops) and fentry/pie (the cost against
the default build), each also for the fastest runs, which a busy machine
disturbs least; and the size of each binary's .text.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
from pathlib import Path

SOURCE = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

__attribute__((noinline)) long fib(int n) { return n < 2 ? n : fib(n - 1) + fib(n - 2); }

__attribute__((noinline)) int less(int a, int b) { return a < b; }

__attribute__((noinline)) void merge_sort(int *a, int *tmp, long n) {
    if (n < 2) return;
    long h = n / 2;
    merge_sort(a, tmp, h);
    merge_sort(a + h, tmp, n - h);
    long i = 0, j = h, k = 0;
    while (i < h && j < n) tmp[k++] = less(a[j], a[i]) ? a[j++] : a[i++];
    while (i < h) tmp[k++] = a[i++];
    while (j < n) tmp[k++] = a[j++];
    for (k = 0; k < n; k++) a[k] = tmp[k];
}

static long ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

int main(void) {
    long t0 = ns();
    long f = fib(36);
    long t1 = ns();
    long n = 1L << 21;
    int *a = malloc(n * sizeof *a), *tmp = malloc(n * sizeof *tmp);
    unsigned x = 12345;
    for (long i = 0; i < n; i++) { x = x * 1103515245u + 12345u; a[i] = (int)(x >> 1); }
    long t2 = ns();
    merge_sort(a, tmp, n);
    long t3 = ns();
    for (long i = 1; i < n; i++) if (a[i - 1] > a[i]) return 1;
    printf("calls=%ld sort=%ld fib=%ld\n", t1 - t0, t3 - t2, f);
    return f == 14930352 ? 0 : 1;
}
"""

FENTRY = ("-pg", "-mfentry", "-mnop-mcount", "-mrecord-mcount")


def build(work: Path, name: str, extra: tuple[str, ...], *, pie: bool = False) -> Path:
    source = work / "bench.c"
    source.write_text(SOURCE)
    obj, binary = work / f"{name}.o", work / name
    subprocess.run(["gcc", "-O2", *(() if pie else ("-fno-pie",)), *extra, "-c", str(source), "-o", str(obj)],
                   check=True)
    subprocess.run(["gcc", *(() if pie else ("-no-pie",)), str(obj), "-o", str(binary)], check=True)  # never -pg
    return binary


def text_size(binary: Path) -> int:
    out = subprocess.run(["size", "-A", str(binary)], capture_output=True, text=True, check=True).stdout
    return next(int(line.split()[1]) for line in out.splitlines() if line.startswith(".text "))


def run(binary: Path) -> dict[str, int]:
    out = subprocess.run([str(binary)], capture_output=True, text=True, check=True, cwd=binary.parent).stdout
    return {key: int(value) for key, value in (field.split("=") for field in out.split())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="runs of each build (alternating)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        builds = {"pie": build(work, "pie", (), pie=True), "plain": build(work, "plain", ()),
                  "fentry": build(work, "fentry", FENTRY)}
        times: dict[str, dict[str, list[int]]] = {name: {"calls": [], "sort": []} for name in builds}
        for _ in range(args.runs):
            for name, binary in builds.items():
                result = run(binary)
                for workload in ("calls", "sort"):
                    times[name][workload].append(result[workload])
        assert not (work / "gmon.out").exists(), "a build wrote gmon.out: it was linked with -pg"
        print(f"{'workload':<8} {'pie ms':>7} {'plain ms':>9} {'fentry ms':>10} {'fentry/plain':>13} "
              f"{'(fastest)':>9} {'fentry/pie':>11} {'(fastest)':>9}")
        for workload in ("calls", "sort"):
            pie, plain, fentry = (times[name][workload] for name in ("pie", "plain", "fentry"))
            median = statistics.median
            print(f"{workload:<8} {median(pie) / 1e6:>7.1f} {median(plain) / 1e6:>9.1f} {median(fentry) / 1e6:>10.1f} "
                  f"{median(fentry) / median(plain):>13.3f} {min(fentry) / min(plain):>9.3f} "
                  f"{median(fentry) / median(pie):>11.3f} {min(fentry) / min(pie):>9.3f}")
        sizes = {name: text_size(binary) for name, binary in builds.items()}
        print(f".text bytes: pie {sizes['pie']}, plain {sizes['plain']}, fentry {sizes['fentry']} "
              f"(+{sizes['fentry'] - sizes['plain']} on plain: a 5-byte nop per function, and alignment)")


if __name__ == "__main__":
    main()
