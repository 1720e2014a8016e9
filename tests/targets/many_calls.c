/* 100,000 call sites in one function, for batches of that size (tests/poke/test_batch_100k.py).
 *
 * calls_all is SITES consecutive `call tick` instructions (5 bytes each: site i at
 * calls_all + 5 i), then ret; tick counts every call it receives. A batch sends
 * site i to counter i instead: every call goes to tick or to counter i, exactly one.
 *
 * stdin commands, one "done ..." line each:
 *   run K     calls_all K times on this thread
 *   spin      a worker thread calls calls_all in a loop until "stop"
 *   stop      stops it; prints the runs it made
 *   count     prints tick's count and every run so far
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define SITES 100000

volatile unsigned long tick_count __attribute__((used));
__asm__(".text\n"
        ".globl tick\n.type tick,@function\ntick:\n\tlock incq tick_count(%rip)\n\tret\n.size tick, .-tick\n"
        ".p2align 4\n.globl calls_all\n.type calls_all,@function\ncalls_all:\n"
        "\t.rept 100000\n\tcall tick\n\t.endr\n\tret\n.size calls_all, .-calls_all\n");
void calls_all(void);

static atomic_int spinning;
static atomic_long runs;
static pthread_t spinner;

static void *spin(void *arg) {
    while (atomic_load(&spinning)) {
        calls_all();
        atomic_fetch_add(&runs, 1);
    }
    return arg;
}

int main(void) {
    char line[64];
    printf("ready %d %d\n", getpid(), SITES);
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "run ", 4) == 0) {
            long k = atol(line + 4);
            for (long i = 0; i < k; i++) calls_all();
            atomic_fetch_add(&runs, k);
            printf("done\n");
        } else if (strncmp(line, "spin", 4) == 0) {
            atomic_store(&spinning, 1);
            pthread_create(&spinner, NULL, spin, NULL);
            printf("done\n");
        } else if (strncmp(line, "stop", 4) == 0) {
            atomic_store(&spinning, 0);
            pthread_join(spinner, NULL);
            printf("done\n");
        } else if (strncmp(line, "count", 5) == 0) {
            printf("done %lu %ld\n", tick_count, atomic_load(&runs));
        }
        fflush(stdout);
    }
    return 0;
}
