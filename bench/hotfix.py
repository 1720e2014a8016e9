"""What a live hot-fix costs: time to apply a fix of N functions, threads stopped, calls/s.

    python bench/hotfix.py [--runs K] [--threads T]

Builds a program (gcc -O2, the fentry recipe) whose T threads call 100
functions f0..f99 round-robin as fast as they can, each thread counting its
calls in a global the bench reads through /proc/PID/mem. Then, for N = 1 and
100, K times each: a fix replacing f0..f(N-1) is prepared (gcc, read, linked and
checked against the process: nothing written), then applied in one session
(load, record, one batch, commit) and reverted. Prints per N the median (and
range) of the prepare time and the apply time, the threads stopped (the first
attach borrows one thread to install textpoke's resident part; batches hold
only threads that block SIGTRAP: 0 here), and the program's calls/s over the
apply against the 0.3 s before it.
"""

from __future__ import annotations

import argparse
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FUNCTIONS = 100

PROGRAM = r"""
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#define MAXT 16
struct slot { volatile long calls; char pad[56]; };
struct slot counts[MAXT];
%(functions)s
typedef long (*fn)(long);
static fn table[%(n)d] = { %(names)s };
static void *worker(void *arg) {
    long i = (long)arg, x = 0;
    for (;;) {
        for (int k = 0; k < %(n)d; k++) x += table[k](x) & 1;
        counts[i].calls += %(n)d;
    }
    return NULL;
}
int main(int argc, char **argv) {
    int t = argc > 1 ? atoi(argv[1]) : 2;
    pthread_t id;
    for (long i = 0; i < t; i++) pthread_create(&id, NULL, worker, (void *)i);
    printf("ready\n");
    fflush(stdout);
    char line[16];
    while (fgets(line, sizeof line, stdin)) {}
    return 0;
}
"""


def _program(workdir: Path) -> Path:
    functions = "\n".join(f"__attribute__((noinline)) long f{k}(long x) {{ return x + {k}; }}"
                          for k in range(FUNCTIONS))
    names = ", ".join(f"f{k}" for k in range(FUNCTIONS))
    source = workdir / "calls.c"
    source.write_text(PROGRAM % {"functions": functions, "names": names, "n": FUNCTIONS})
    binary = workdir / "calls"
    subprocess.run(["gcc", "-O2", "-pthread", "-fno-pie", "-no-pie", "-pg", "-mfentry", "-mnop-mcount",
                    "-mrecord-mcount", "-c", str(source), "-o", str(workdir / "calls.o")], check=True)
    subprocess.run(["gcc", str(workdir / "calls.o"), "-o", str(binary), "-pthread", "-no-pie"], check=True)
    return binary


def _fix(workdir: Path, n: int) -> Path:
    source = workdir / f"fix{n}.c"
    source.write_text("\n".join(f"long f{k}(long x) {{ return x + {k}; }}" for k in range(n)) + "\n")
    return source


def _counter(binary: Path) -> int:
    from elftools.elf.elffile import ELFFile

    with open(binary, "rb") as f:
        symbol = ELFFile(f).get_section_by_name(".symtab").get_symbol_by_name("counts")[0]
    return symbol["st_value"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from textpoke.hotfix import hotfix, prepare_fix, revert_fix
    from textpoke.poke import attach
    from textpoke.target.process import Process

    with tempfile.TemporaryDirectory(prefix="textpoke-bench-") as tmp:
        workdir = Path(tmp)
        binary = _program(workdir)
        proc = subprocess.Popen([str(binary), str(args.threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert proc.stdout is not None and proc.stdout.readline().startswith(b"ready")
            address = _counter(binary)
            process = Process(proc.pid)

            def calls() -> int:
                raw = process.read(address, 64 * args.threads)
                return sum(struct.unpack_from("<q", raw, 64 * i)[0] for i in range(args.threads))

            began = time.monotonic()
            session = attach(proc.pid)
            installed = session.resident.created
            first_attach = time.monotonic() - began
            print(f"program: {args.threads} threads calling {FUNCTIONS} functions; first attach {first_attach * 1e3:.0f} ms "
                  f"({'installed the resident part: 1 thread borrowed' if installed else 'adopted: no thread stopped'})")
            try:
                for n in (1, FUNCTIONS):
                    source = _fix(workdir, n)
                    prepares, applies, reverts, before_rates, during_rates = [], [], [], [], []
                    held = session.held_threads
                    for run in range(args.runs):
                        name = f"fix{n}-{run}"  # a new fix each time: loaded, not reused
                        t0 = time.monotonic()
                        prepared = prepare_fix(proc.pid, source, name=name)
                        prepares.append(time.monotonic() - t0)
                        c0, t0 = calls(), time.monotonic()
                        time.sleep(0.3)
                        c1, t1 = calls(), time.monotonic()
                        applied = hotfix(session, prepared)
                        c2, t2 = calls(), time.monotonic()
                        assert len(applied.redirects) == n
                        applies.append(t2 - t1)
                        before_rates.append((c1 - c0) / (t1 - t0))
                        during_rates.append((c2 - c1) / (t2 - t1))
                        t3 = time.monotonic()
                        revert_fix(session, name)
                        reverts.append(time.monotonic() - t3)
                    held = session.held_threads - held
                    print(f"N = {n:3d} functions: prepare (gcc, link, checks) {_ms(prepares)}; apply (load, record, "
                          f"1 batch, commit) {_ms(applies)}; revert {_ms(reverts)}")
                    print(f"    threads stopped during the {2 * args.runs} batches: {held}; calls/s before "
                          f"{_rate(before_rates)}, during the apply {_rate(during_rates)} "
                          f"({statistics.median(during_rates) / statistics.median(before_rates):.0%})")
            finally:
                session.close(revert=False)
                process.close()
        finally:
            proc.kill()
            proc.wait()


def _ms(values: list[float]) -> str:
    return (f"median {statistics.median(values) * 1e3:.1f} ms "
            f"({min(values) * 1e3:.1f}-{max(values) * 1e3:.1f})")


def _rate(values: list[float]) -> str:
    return f"{statistics.median(values) / 1e6:.1f} M"


if __name__ == "__main__":
    sys.exit(main())
