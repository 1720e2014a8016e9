/* Test target: short-lived threads are born and die continuously, each making
 * exactly CALLS calls through site_caller's "call A" site before exiting.
 * On "stop": made=N a=NA b=NB bad=K threads=T
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define CALLS 2000
static atomic_long a_calls, b_calls, made, bad, born;
static atomic_int stop;

__attribute__((noinline)) long A(long x) { atomic_fetch_add_explicit(&a_calls, 1, memory_order_relaxed); return x + 1; }
__attribute__((noinline)) long B(long x) { atomic_fetch_add_explicit(&b_calls, 1, memory_order_relaxed); return x + 1; }
__attribute__((noinline)) long site_caller(long x) { return A(x) * 2; }

static void *short_lived(void *arg) {
    (void)arg;
    for (long n = 0; n < CALLS; n++)
        if (site_caller(n) != (n + 1) * 2) atomic_fetch_add(&bad, 1);
    atomic_fetch_add(&made, CALLS);
    return NULL;
}

static void *spawner(void *arg) {
    (void)arg;
    while (!atomic_load(&stop)) {
        pthread_t t[4];
        for (int i = 0; i < 4; i++) pthread_create(&t[i], NULL, short_lived, NULL);
        for (int i = 0; i < 4; i++) pthread_join(t[i], NULL);
        atomic_fetch_add(&born, 4);
    }
    return NULL;
}

int main(void) {
    pthread_t s;
    pthread_create(&s, NULL, spawner, NULL);
    while (atomic_load(&born) < 8) usleep(1000);
    printf("ready %d\n", getpid());
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin) && strncmp(line, "stop", 4)) {}
    atomic_store(&stop, 1);
    pthread_join(s, NULL);
    printf("made=%ld a=%ld b=%ld bad=%ld threads=%ld\n", atomic_load(&made), atomic_load(&a_calls),
           atomic_load(&b_calls), atomic_load(&bad), atomic_load(&born));
    return 0;
}
