/* Test target for `textpoke hotfix`: worker threads call compute(x), which has a bug.
 *
 *   compute(x)   should be 3x + 1 (fentry nop5 at its entry: -mfentry -mnop-mcount);
 *                the shipped version returns 3x + 2 for x divisible by 4 (the bug)
 *   twice(x)     called only directly (the fixtures build it without fentry sites
 *                in hotfix_nofentry): the "call site" redirect
 *   scale(x)     a static function the fix calls
 *   fixed_calls, last_msg   globals the fix reads and writes
 *
 * Every worker checks each result: the old code's (3x + 2 when x % 4 == 0) or
 * the right one (3x + 1 when x % 4 == 0); for other x both agree and the call
 * counts as "same".  The fix also counts its own calls in fixed_calls, so
 * old + new + same == made, and new == the fix's calls with x % 4 == 0.
 * Commands on stdin: "count" prints the counts so far, "stop" ends with:
 *   made=N old=O new=W same=S bad=K fixed_calls=F twice7=14|15 msglen=L threads=T msg=...
 * (strlen is an IFUNC of glibc the program imports: a fix may use it.)
 */
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAXT 64
struct counts { long made, old, new_, same, bad; char pad[24]; };
static struct counts per[MAXT];
static atomic_int stop, started;

long fixed_calls;          /* the fix increments it (atomically) */
char last_msg[64] = "none";  /* the fix writes it with snprintf */

__attribute__((noinline, used)) static long scale(long x) { return 3 * x; }

__attribute__((noinline)) long compute(long x) {
    long r = scale(x) + 1;
    if (x % 4 == 0) r += 1;  /* the bug */
    return r;
}

__attribute__((noinline, no_instrument_function)) long twice(long x) { return 2 * x + (x == 7); /* bug: 7 -> 15 */ }

static void *worker(void *arg) {
    struct counts *c = &per[(long)arg];
    atomic_fetch_add(&started, 1);
    long x = (long)arg;
    while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
        long r = compute(x);
        long good = 3 * x + 1;
        if (x % 4 != 0) {
            if (r == good) __atomic_store_n(&c->same, c->same + 1, __ATOMIC_RELAXED);
            else __atomic_store_n(&c->bad, c->bad + 1, __ATOMIC_RELAXED);
        } else if (r == good + 1) __atomic_store_n(&c->old, c->old + 1, __ATOMIC_RELAXED);
        else if (r == good) __atomic_store_n(&c->new_, c->new_ + 1, __ATOMIC_RELAXED);
        else __atomic_store_n(&c->bad, c->bad + 1, __ATOMIC_RELAXED);
        __atomic_store_n(&c->made, c->made + 1, __ATOMIC_RELEASE);
        x = (x + 1) & 0xFFFF;
    }
    return NULL;
}

static void print_counts(const char *extra) {
    long made = 0, old = 0, new_ = 0, same = 0, bad = 0;
    for (int i = 0; i < MAXT; i++) {
        made += __atomic_load_n(&per[i].made, __ATOMIC_ACQUIRE);
        old += __atomic_load_n(&per[i].old, __ATOMIC_RELAXED);
        new_ += __atomic_load_n(&per[i].new_, __ATOMIC_RELAXED);
        same += __atomic_load_n(&per[i].same, __ATOMIC_RELAXED);
        bad += __atomic_load_n(&per[i].bad, __ATOMIC_RELAXED);
    }
    printf("made=%ld old=%ld new=%ld same=%ld bad=%ld fixed_calls=%ld twice7=%ld msglen=%zu%s\n", made, old, new_,
           same, bad, __atomic_load_n(&fixed_calls, __ATOMIC_RELAXED), twice(7), strlen(last_msg), extra);
    fflush(stdout);
}

static void on_term(int sig) { (void)sig; atomic_store(&stop, 1); }

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 4;
    if (threads > MAXT) threads = MAXT;
    pthread_t tids[MAXT];
    signal(SIGTERM, on_term);
    for (long i = 0; i < threads; i++) pthread_create(&tids[i], NULL, worker, (void *)i);
    while (atomic_load(&started) < threads) usleep(1000);
    printf("ready %d\n", getpid());
    fflush(stdout);
    char line[64];
    while (!atomic_load(&stop)) {
        if (!fgets(line, sizeof line, stdin)) break;
        if (strncmp(line, "stop", 4) == 0) break;
        if (strncmp(line, "count", 5) == 0) print_counts("");
    }
    atomic_store(&stop, 1);
    for (int i = 0; i < threads; i++) pthread_join(tids[i], NULL);
    char extra[100];
    snprintf(extra, sizeof extra, " threads=%d msg=%s", threads, last_msg);
    print_counts(extra);
    return 0;
}
