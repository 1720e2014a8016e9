/* Test target: worker threads hammer two patchable sites until told to stop.
 *
 *   traced()       fentry nop5 at its entry (built with -mfentry -mnop-mcount)
 *   site_caller()  holds the site "call A" that tests retarget to B and back
 *
 * A and B count their own calls; every worker counts the calls it made, and
 * checks that every result was right (A and B compute the same value).  On
 * "stop" on stdin (or SIGTERM) it prints one line:
 *   made=N a=NA b=NB bad=K threads=T
 * so a test can assert NA + NB == N exactly and K == 0.
 */
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static atomic_long a_calls, b_calls, made, bad;
static atomic_int stop;
static atomic_int started;

__attribute__((noinline)) long A(long x) { atomic_fetch_add_explicit(&a_calls, 1, memory_order_relaxed); return x + 1; }
__attribute__((noinline)) long B(long x) { atomic_fetch_add_explicit(&b_calls, 1, memory_order_relaxed); return x + 1; }
__attribute__((noinline)) long traced(long x) { return x * 3 + 1; }
__attribute__((noinline)) long site_caller(long x) { return A(x) * 2; }

static void *worker(void *arg) {
    (void)arg;
    long n = 0, wrong = 0;
    atomic_fetch_add(&started, 1);
    while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
        if (site_caller(n) != (n + 1) * 2) wrong++;
        if (traced(n) != n * 3 + 1) wrong++;
        n++;
    }
    atomic_fetch_add(&made, n);
    atomic_fetch_add(&bad, wrong);
    return NULL;
}

static void on_term(int sig) { (void)sig; atomic_store(&stop, 1); }

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 4;
    pthread_t tids[256];
    signal(SIGTERM, on_term);
    for (int i = 0; i < threads; i++) pthread_create(&tids[i], NULL, worker, NULL);
    while (atomic_load(&started) < threads) usleep(1000);
    printf("ready %d\n", getpid());
    fflush(stdout);
    char line[64];
    while (!atomic_load(&stop)) {
        if (!fgets(line, sizeof line, stdin)) break;   /* blocked in read(): borrowable */
        if (strncmp(line, "stop", 4) == 0) break;
    }
    atomic_store(&stop, 1);
    for (int i = 0; i < threads; i++) pthread_join(tids[i], NULL);
    printf("made=%ld a=%ld b=%ld bad=%ld threads=%d\n", atomic_load(&made), atomic_load(&a_calls),
           atomic_load(&b_calls), atomic_load(&bad), threads);
    return 0;
}
