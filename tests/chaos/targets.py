"""The chaos target: worker threads calling through thousands of call sites.

``caller_i(x)`` is ``A(x) + i + 1`` (never a tail call), so each has one ``call A`` site; tests
retarget them to ``B``, which computes the same. Every worker checks every
result and sums them (its checksum), counting passes over all callers. On
"stop" it prints ``made= a= b= bad=`` and ``pK= sK=`` (passes and checksum of
worker K), so a test can check ``a + b == made`` and each checksum exactly.
"""

from __future__ import annotations

from pathlib import Path


def chaos_source(sites: int) -> str:
    lines = [
        "#include <pthread.h>",
        "#include <stdatomic.h>",
        "#include <stdio.h>",
        "#include <stdlib.h>",
        "#include <string.h>",
        "#include <unistd.h>",
        "static atomic_long a_calls, b_calls, made, bad;",
        "static atomic_int stop, started;",
        "static long passes[64], sums[64];",
        "__attribute__((noinline)) long A(long x) { atomic_fetch_add_explicit(&a_calls, 1, memory_order_relaxed); return x + 1; }",
        "__attribute__((noinline)) long B(long x) { atomic_fetch_add_explicit(&b_calls, 1, memory_order_relaxed); return x + 1; }",
    ]
    lines += [f"__attribute__((noinline)) long caller_{i}(long x) {{ return A(x) + {i + 1}; }}" for i in range(sites)]
    lines.append("typedef long (*fn)(long);")
    lines.append("static fn callers[] = {" + ",".join(f"caller_{i}" for i in range(sites)) + "};")
    lines.append(f"#define SITES {sites}")
    lines.append(r"""
static void *worker(void *arg) {
    long id = (long)arg, p = 0, wrong = 0;
    unsigned long sum = 0;
    atomic_fetch_add(&started, 1);
    while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
        for (long i = 0; i < SITES; i++) {
            long r = callers[i](p);
            if (r != p + 2 + i) wrong++;
            sum += (unsigned long)r;
        }
        p++;
    }
    passes[id] = p;
    sums[id] = (long)sum;
    atomic_fetch_add(&made, p * SITES);
    atomic_fetch_add(&bad, wrong);
    return NULL;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 4;
    pthread_t tids[64];
    char line[64];
    for (long i = 0; i < threads; i++) pthread_create(&tids[i], NULL, worker, (void *)i);
    while (atomic_load(&started) < threads) usleep(1000);
    printf("ready %d\n", getpid());
    fflush(stdout);
    while (fgets(line, sizeof line, stdin) && strncmp(line, "stop", 4)) {}
    atomic_store(&stop, 1);
    for (int i = 0; i < threads; i++) pthread_join(tids[i], NULL);
    printf("made=%ld a=%ld b=%ld bad=%ld threads=%d", atomic_load(&made), atomic_load(&a_calls),
           atomic_load(&b_calls), atomic_load(&bad), threads);
    for (int i = 0; i < threads; i++) printf(" p%d=%ld s%d=%ld", i, passes[i], i, sums[i]);
    printf("\n");
    return 0;
}
""")
    return "\n".join(lines)


def expected_checksum(sites: int, passes: int) -> int:
    """What a worker that made ``passes`` passes summed (mod 2**64, as C does)."""
    total = sites * passes * (passes - 1) // 2 + 2 * passes * sites + passes * sites * (sites - 1) // 2
    return total % 2**64


def check_result(result: dict[str, int], sites: int) -> None:
    """The target's own work was right: every result, every count, every checksum."""
    assert result["bad"] == 0
    assert result["a"] + result["b"] == result["made"]
    threads = result["threads"]
    assert sum(result[f"p{k}"] for k in range(threads)) * sites == result["made"]
    for k in range(threads):
        assert result[f"s{k}"] % 2**64 == expected_checksum(sites, result[f"p{k}"]), f"worker {k}"


def build_chaos(tmp_path: Path, sites: int) -> Path:
    from conftest import compile_c

    source = tmp_path / f"chaos{sites}.c"
    source.write_text(chaos_source(sites))
    return compile_c(source, fentry=False, name=f"chaos{sites}")
