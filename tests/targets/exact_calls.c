/* Test target for tracing: exact, known numbers of calls, on command.
 *
 * Prints "ready PID" and then runs one command per stdin line, answering each
 * with one line that starts with "done" (or "bye" for exit):
 *
 *   calls N   4 threads (started together) each call f(i) for i = 0..N-1
 *             -> "done tids=T1,T2,T3,T4"
 *   sites N   4 threads each: caller_a() N times, caller_b() 2N, caller_c() 3N;
 *             each caller calls g() once through its own call rel32 site
 *   args N    4 threads each call check6, check8 and vsum (varargs, doubles)
 *             N times with known arguments and check every result
 *             -> "done bad=K ret6=ADDR caller6=ADDR"
 *   tick K    tick(now_ns) then nanosleep(1 ms), K times
 *             -> "done t=T0,T1,..." (the CLOCK_MONOTONIC ns passed to tick)
 *   exit S    -> "bye", exit status S
 *
 * All functions the tests trace are noipa: no inlining, cloning or IPA changes,
 * so every call in the source is one call in the binary.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define THREADS 4
#define NOIPA __attribute__((noinline, noipa))

static atomic_long bad;
static atomic_long sink;
static void *volatile ret6;

NOIPA long f(long i) { return i + 1; }
NOIPA long g(long i) { return i * 2; }
NOIPA long caller_a(long i) { return g(i) + 1; }
NOIPA long caller_b(long i) { return g(i) + 2; }
NOIPA long caller_c(long i) { return g(i) + 3; }
NOIPA void tick(long now_ns) { atomic_fetch_add_explicit(&sink, now_ns & 1, memory_order_relaxed); }

NOIPA long check6(long a, long b, long c, long d, long e, long f6) {
    ret6 = __builtin_return_address(0);
    if (a != 1 || b != 2 || c != 3 || d != 4 || e != 5 || f6 != 6) atomic_fetch_add(&bad, 1);
    return a + 2 * b + 3 * c + 4 * d + 5 * e + 6 * f6;
}

NOIPA long check8(long a, long b, long c, long d, long e, long f6, long g7, long h8) {
    if (a != 11 || b != 12 || c != 13 || d != 14 || e != 15 || f6 != 16 || g7 != 17 || h8 != 18)
        atomic_fetch_add(&bad, 1);
    return a + b + c + d + e + f6 + g7 * h8;
}

NOIPA double vsum(int n, ...) {
    va_list ap;
    double total = 0;
    va_start(ap, n);
    for (int i = 0; i < n; i++) total += va_arg(ap, double);
    va_end(ap);
    return total;
}

NOIPA long args_caller(long n) {
    long wrong = 0;
    for (long i = 0; i < n; i++) {
        if (check6(1, 2, 3, 4, 5, 6) != 1 + 4 + 9 + 16 + 25 + 36) wrong++;
        if (check8(11, 12, 13, 14, 15, 16, 17, 18) != 11 + 12 + 13 + 14 + 15 + 16 + 17 * 18) wrong++;
        if (vsum(3, 1.5, 2.5, 3.0 + (double)(i & 1)) != 7.0 + (double)(i & 1)) wrong++;
    }
    return wrong;
}

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

struct job { char cmd[16]; long n; pthread_barrier_t *start; pid_t tid; };

static void *worker(void *arg) {
    struct job *job = arg;
    job->tid = (pid_t)syscall(SYS_gettid);
    pthread_barrier_wait(job->start);
    long acc = 0;
    if (strcmp(job->cmd, "calls") == 0) {
        for (long i = 0; i < job->n; i++) acc += f(i);
    } else if (strcmp(job->cmd, "sites") == 0) {
        for (long i = 0; i < job->n; i++) acc += caller_a(i);
        for (long i = 0; i < 2 * job->n; i++) acc += caller_b(i);
        for (long i = 0; i < 3 * job->n; i++) acc += caller_c(i);
    } else if (strcmp(job->cmd, "args") == 0) {
        atomic_fetch_add(&bad, args_caller(job->n));
    }
    atomic_fetch_add(&sink, acc);
    return NULL;
}

static void run_threads(const char *cmd, long n) {
    pthread_t threads[THREADS];
    struct job jobs[THREADS];
    pthread_barrier_t start;
    pthread_barrier_init(&start, NULL, THREADS);
    for (int i = 0; i < THREADS; i++) {
        snprintf(jobs[i].cmd, sizeof jobs[i].cmd, "%s", cmd);
        jobs[i].n = n;
        jobs[i].start = &start;
        pthread_create(&threads[i], NULL, worker, &jobs[i]);
    }
    for (int i = 0; i < THREADS; i++) pthread_join(threads[i], NULL);
    pthread_barrier_destroy(&start);
    if (strcmp(cmd, "args") == 0) {
        printf("done bad=%ld ret6=%lu caller6=%lu\n", atomic_load(&bad), (unsigned long)ret6,
               (unsigned long)(void *)args_caller);
    } else {
        printf("done tids=%d,%d,%d,%d\n", jobs[0].tid, jobs[1].tid, jobs[2].tid, jobs[3].tid);
    }
}

int main(void) {
    char line[128], cmd[16];
    long n;
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready %d\n", getpid());
    while (fgets(line, sizeof line, stdin)) {
        n = 0;
        if (sscanf(line, "%15s %ld", cmd, &n) < 1) continue;
        if (strcmp(cmd, "exit") == 0) {
            printf("bye\n");
            return (int)n;
        } else if (strcmp(cmd, "tick") == 0) {
            char out[4096];
            int used = snprintf(out, sizeof out, "done t=");
            for (long k = 0; k < n; k++) {
                long t = now_ns();
                tick(t);
                used += snprintf(out + used, sizeof out - used, k ? ",%ld" : "%ld", t);
                struct timespec ms = {0, 1000000};
                nanosleep(&ms, NULL);
            }
            printf("%s\n", out);
        } else {
            run_threads(cmd, n);
        }
    }
    return 0;
}
