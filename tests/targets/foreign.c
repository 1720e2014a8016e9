/* Test target: one of its own call sites holds an int3 it wrote there itself,
 * as a debugger's breakpoint would (textpoke must not take it for its own).
 *
 *   site_caller()  "call A", called by the workers in a loop
 *   cold_caller()  "call A" too, never called; argv[1] (hex) is the address of
 *                  its call, where main writes 0xcc (mprotect RW, write, RX)
 *
 * "count": "b=NB" (calls of B so far); "stop": "made=N a=NA b=NB bad=K", exit 0.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static atomic_long a_calls, b_calls, made, bad;
static atomic_int stop, started;

__attribute__((noinline)) long A(long x) { atomic_fetch_add_explicit(&a_calls, 1, memory_order_relaxed); return x + 1; }
__attribute__((noinline)) long B(long x) { atomic_fetch_add_explicit(&b_calls, 1, memory_order_relaxed); return x + 1; }
__attribute__((noinline)) long site_caller(long x) { return A(x) * 2; }
__attribute__((noinline)) long cold_caller(long x) { return A(x) * 3; }

static void *worker(void *arg) {
    (void)arg;
    long n = 0;
    atomic_fetch_add(&started, 1);
    for (; !atomic_load_explicit(&stop, memory_order_relaxed); n++)
        if (site_caller(n) != (n + 1) * 2) atomic_fetch_add(&bad, 1);
    atomic_fetch_add(&made, n);
    return NULL;
}

int main(int argc, char **argv) {
    pthread_t tids[2];
    char line[64];
    if (argc > 1) {
        uintptr_t at = strtoull(argv[1], NULL, 16);
        uintptr_t page = at & ~(uintptr_t)4095;
        if (mprotect((void *)page, 8192, PROT_READ | PROT_WRITE | PROT_EXEC)) return 2;
        *(volatile unsigned char *)at = 0xcc;
        if (mprotect((void *)page, 8192, PROT_READ | PROT_EXEC)) return 2;
    }
    for (int i = 0; i < 2; i++) pthread_create(&tids[i], NULL, worker, NULL);
    while (atomic_load(&started) < 2) usleep(1000);
    printf("ready %d\n", getpid());
    fflush(stdout);
    while (fgets(line, sizeof line, stdin) && strncmp(line, "stop", 4)) {
        printf("b=%ld\n", atomic_load(&b_calls));
        fflush(stdout);
    }
    atomic_store(&stop, 1);
    for (int i = 0; i < 2; i++) pthread_join(tids[i], NULL);
    printf("made=%ld a=%ld b=%ld bad=%ld\n", atomic_load(&made), atomic_load(&a_calls), atomic_load(&b_calls),
           atomic_load(&bad));
    return 0;
}
