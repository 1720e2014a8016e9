/* Test target for lossless recording: T threads call work(i) flat out.
 *
 *   hot N T        each of T threads calls work(i) for i = 0..N-1, as fast as it can
 *   hot sS T       each of T threads calls work(i) for S seconds (i = 0, 1, ...)
 *
 * When every thread is done it prints, per thread, "thread TID calls C sum S"
 * (S: the sum of work's results, so the calls cannot be optimized away), then
 * "total C" and "elapsed NS" (from the threads' common start to the last one's
 * end), and exits 0.  Built with the fentry flags: work has a nop5.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MAX_THREADS 64
#define NOIPA __attribute__((noinline, noipa))

NOIPA long work(long i) { return i ^ 0x5a; }

static long n_calls;
static double seconds;
static pthread_barrier_t start;
static double started;

struct result { long tid, calls, sum; };

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void *worker(void *arg) {
    struct result *r = arg;
    r->tid = syscall(SYS_gettid);
    if (pthread_barrier_wait(&start) == PTHREAD_BARRIER_SERIAL_THREAD) started = now();
    long sum = 0, i = 0;
    if (seconds > 0) {
        double end = now() + seconds;
        for (;;) {
            for (long j = 0; j < 4096; j++, i++) sum += work(i);
            if (now() >= end) break;
        }
    } else {
        for (; i < n_calls; i++) sum += work(i);
    }
    r->calls = i;
    r->sum = sum;
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: hot N THREADS | hot sSECONDS THREADS\n");
        return 2;
    }
    if (argv[1][0] == 's') seconds = atof(argv[1] + 1); else n_calls = atol(argv[1]);
    int threads = atoi(argv[2]);
    if (threads < 1 || threads > MAX_THREADS) return 2;
    pthread_t t[MAX_THREADS];
    struct result r[MAX_THREADS];
    pthread_barrier_init(&start, NULL, threads);
    for (int k = 0; k < threads; k++) pthread_create(&t[k], NULL, worker, &r[k]);
    long total = 0;
    for (int k = 0; k < threads; k++) pthread_join(t[k], NULL);
    double elapsed = now() - started;
    for (int k = 0; k < threads; k++) {
        printf("thread %ld calls %ld sum %ld\n", r[k].tid, r[k].calls, r[k].sum);
        total += r[k].calls;
    }
    printf("total %ld\nelapsed %.0f\n", total, elapsed * 1e9);
    return 0;
}
