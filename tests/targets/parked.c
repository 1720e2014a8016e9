/* Test target: a traced function that stays entered for seconds while others run.
 *
 * One thread loops: park() sleeps 6 s and returns its argument plus one, which
 * the loop checks; 2 threads call tick(i) flat out and check its result. A
 * return to a wrong place or a wrong value counts as bad (a crash is a crash).
 * Prints "ready PID"; "parked N" lines as park() is entered (N: how many times so
 * far). On "stop" (a line on stdin) it prints "parks=P ticks=T bad=K", exits 0.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

#define NOIPA __attribute__((noinline, noipa))

static atomic_long parks, ticks, bad;

NOIPA long park(long i) {
    printf("parked %ld\n", atomic_fetch_add(&parks, 1) + 1);
    fflush(stdout);
    struct timespec d = {6, 0};
    while (nanosleep(&d, &d) != 0) {}
    return i + 1;
}

NOIPA long tick(long i) { return i * 3 + 1; }

static void *parker(void *arg) {
    (void)arg;
    for (long i = 0;; i++)
        if (park(i) != i + 1) atomic_fetch_add(&bad, 1);
    return NULL;
}

static void *ticker(void *arg) {
    (void)arg;
    for (long i = 0;; i++) {
        if (tick(i) != i * 3 + 1) atomic_fetch_add(&bad, 1);
        atomic_fetch_add_explicit(&ticks, 1, memory_order_relaxed);
    }
    return NULL;
}

int main(void) {
    pthread_t t;
    for (int i = 0; i < 2; i++) pthread_create(&t, NULL, ticker, NULL);
    printf("ready %d\n", (int)getpid());
    fflush(stdout);
    pthread_create(&t, NULL, parker, NULL);
    char line[16];
    (void)!fgets(line, sizeof line, stdin);
    printf("parks=%ld ticks=%ld bad=%ld\n", atomic_load(&parks), atomic_load(&ticks), atomic_load(&bad));
    fflush(stdout);
    _exit(0);
}
