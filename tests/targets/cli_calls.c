/* Test target for the record/trace/report CLI: known functions called a known
 * number of times, from known callers.
 *
 *   cli_calls once   one pass, then exit 3 (textpoke record must pass it on):
 *                    work_alpha 1000x (600 from one_pass, 400 from helper),
 *                    work_beta 250x (from driver), work_gamma 3x (from one_pass),
 *                    never_called 0x,
 *                    prints "alpha=1000 beta=250 gamma=3 sum=S"
 *   cli_calls once wait
 *                    the same, after waiting (10 s at most) until the entries of
 *                    work_alpha/beta/gamma are `call`s: textpoke record starts the
 *                    program before its batch is applied (a few ms in which calls
 *                    are not seen), so a test that wants exact counts waits for it.
 *   cli_calls loop   prints "ready PID", repeats the pass (minus the exit) until
 *                    "stop" on stdin, then prints "passes=N bad=K" and exits 0
 *                    (every pass checks its own sum: K counts wrong ones).
 * noipa keeps gcc from inlining, cloning or constant-folding the calls away.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static atomic_int stop;

__attribute__((noipa)) long work_alpha(long x) { return x * 3 + 1; }
__attribute__((noipa)) long work_beta(long x) { return x ^ 0x5a; }
__attribute__((noipa)) long work_gamma(long x) { return x + 7; }
__attribute__((noipa)) long never_called(long x) { return x - 1; }

__attribute__((noipa)) long helper(long n) {
    long s = 0;
    for (long i = 0; i < n; i++) s += work_alpha(i);
    return s;
}

__attribute__((noipa)) long driver(long n) {
    long s = 0;
    for (long i = 0; i < n; i++) s += work_beta(i);
    return s;
}

__attribute__((noipa)) long one_pass(void) {
    long s = 0;
    for (long i = 0; i < 600; i++) s += work_alpha(i);
    s += helper(400);
    s += driver(250);
    for (long i = 0; i < 3; i++) s += work_gamma(i);
    return s;
}

static long expected(void) {
    long s = 0;
    for (long i = 0; i < 600; i++) s += i * 3 + 1;
    for (long i = 0; i < 400; i++) s += i * 3 + 1;
    for (long i = 0; i < 250; i++) s += i ^ 0x5a;
    for (long i = 0; i < 3; i++) s += i + 7;
    return s;
}

static void *looper(void *arg) {
    long *result = arg, passes = 0, bad = 0, want = expected();
    while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
        if (one_pass() != want) bad++;
        passes++;
        usleep(200);
    }
    result[0] = passes;
    result[1] = bad;
    return NULL;
}

/* The first byte of a function's fentry site: 0x0f (nop5) until patched, then
 * 0xcc (int3, in flight) and finally 0xe8 (call). */
static int entry_byte(long (*fn)(long)) { return *(volatile unsigned char *)(void *)fn; }

static void wait_until_traced(void) {
    for (int i = 0; i < 10000; i++) {
        if (entry_byte(work_alpha) == 0xe8 && entry_byte(work_beta) == 0xe8 && entry_byte(work_gamma) == 0xe8)
            return;
        usleep(1000);
    }
    fprintf(stderr, "cli_calls: not traced after 10 s\n");
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "loop") == 0) {
        long result[2];
        pthread_t t;
        pthread_create(&t, NULL, looper, result);
        printf("ready %d\n", getpid());
        fflush(stdout);
        char line[64];
        while (fgets(line, sizeof line, stdin) && strncmp(line, "stop", 4)) {}
        atomic_store(&stop, 1);
        pthread_join(t, NULL);
        printf("passes=%ld bad=%ld\n", result[0], result[1]);
        return 0;
    }
    if (argc > 2 && strcmp(argv[2], "wait") == 0) wait_until_traced();
    long s = one_pass();
    printf("alpha=1000 beta=250 gamma=3 sum=%ld %s\n", s, s == expected() ? "ok" : "BAD");
    return 3;
}
