/* Test target for attaching a function-graph trace to a running program.
 *
 * Prints "ready PID", then 4 threads run forever() (entered before any attach), which
 * calls batch(i) over and over; batch calls step(j) 64 times and returns a checksum
 * that forever() checks against the one it computes itself (so a return to a wrong
 * place, or a wrong return value, counts as bad). On "stop" (a line on stdin) the
 * threads finish their batch and leave; the program prints
 * "batches=N steps=M bad=K" and exits 0.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define NOIPA __attribute__((noinline, noipa))

static atomic_int stop;
static atomic_long batches, steps, bad;

NOIPA long step(long j) { atomic_fetch_add_explicit(&steps, 1, memory_order_relaxed); return j * 7 + 3; }

NOIPA long batch(long i) {
    long sum = 0;
    for (long j = 0; j < 64; j++) sum += step(i + j);
    return sum;
}

NOIPA void *forever(void *arg) {
    long base = (long)arg * 1000003;
    for (long i = 0; !atomic_load_explicit(&stop, memory_order_relaxed); i++) {
        long expect = 0;
        for (long j = 0; j < 64; j++) expect += (base + i + j) * 7 + 3;
        if (batch(base + i) != expect) atomic_fetch_add(&bad, 1);
        atomic_fetch_add_explicit(&batches, 1, memory_order_relaxed);
    }
    return NULL;
}

int main(void) {
    pthread_t t[4];
    for (long i = 0; i < 4; i++) pthread_create(&t[i], NULL, forever, (void *)i);
    printf("ready %d\n", (int)getpid());
    fflush(stdout);
    char line[16];
    (void)!fgets(line, sizeof line, stdin);
    atomic_store(&stop, 1);
    for (int i = 0; i < 4; i++) pthread_join(t[i], NULL);
    printf("batches=%ld steps=%ld bad=%ld\n", atomic_load(&batches), atomic_load(&steps), atomic_load(&bad));
    return 0;
}
