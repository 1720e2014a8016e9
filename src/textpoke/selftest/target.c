/* The private target of `textpoke selftest`: it does nothing until told to.
 *
 *   run N   two threads each call site_caller() N times (its "call A" site is
 *           the one the selftest patches); prints "ran a=NA b=NB bad=K"
 *           with the totals so far, after both threads finished;
 *   trap    raise(SIGTRAP): its own handler counts it; prints "trapped own=T";
 *   peek    prints "scratch=HEX", a variable the selftest writes through
 *           /proc/PID/mem;
 *   anything else (or EOF): exit 0.
 * The main thread waits in read() between commands: a thread textpoke may borrow.
 */
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static atomic_long a_calls, b_calls, bad;
static volatile sig_atomic_t own_traps;
static long per_thread;
volatile unsigned long scratch = 0x5eed;

__attribute__((noinline)) long A(long x) { atomic_fetch_add_explicit(&a_calls, 1, memory_order_relaxed); return x + 1; }
__attribute__((noinline)) long B(long x) { atomic_fetch_add_explicit(&b_calls, 1, memory_order_relaxed); return x + 1; }
__attribute__((noinline)) long site_caller(long x) { return A(x) * 2; }

static void *worker(void *arg) {
    (void)arg;
    for (long n = 0; n < per_thread; n++)
        if (site_caller(n) != (n + 1) * 2) atomic_fetch_add(&bad, 1);
    return NULL;
}

static void on_trap(int sig) { (void)sig; own_traps++; }

int main(void) {
    char line[64];
    signal(SIGTRAP, on_trap);
    printf("ready %d\n", getpid());
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "run ", 4) == 0) {
            pthread_t t[2];
            per_thread = atol(line + 4);
            for (int i = 0; i < 2; i++) pthread_create(&t[i], NULL, worker, NULL);
            for (int i = 0; i < 2; i++) pthread_join(t[i], NULL);
            printf("ran a=%ld b=%ld bad=%ld\n", atomic_load(&a_calls), atomic_load(&b_calls), atomic_load(&bad));
        } else if (strncmp(line, "trap", 4) == 0) {
            raise(SIGTRAP);
            printf("trapped own=%d\n", (int)own_traps);
        } else if (strncmp(line, "peek", 4) == 0) {
            printf("scratch=%lx\n", scratch);
        } else {
            break;
        }
        fflush(stdout);
    }
    return 0;
}
