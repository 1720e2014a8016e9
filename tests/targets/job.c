/* Test target for what `textpoke record` does with the program's life (signals).
 *
 *   job [ignore-int]   prints "job PID child CPID" once its child (a forked
 *                      process that only sleeps) runs; then calls step() in a
 *                      loop until a line on stdin; then prints "steps=N", tells
 *                      its child to exit, waits for it and exits 5.
 *                      "ignore-int": SIGINT is ignored (job and child), as a
 *                      program that shields itself from the terminal's Ctrl-C.
 * Without "ignore-int" SIGINT and SIGTERM have their default actions.
 * step() has a fentry nop5 (fentry build).
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <pthread.h>
#include <unistd.h>

#define NOIPA __attribute__((noinline, noipa))

static atomic_int done;
static atomic_long steps;

NOIPA void step(void) { atomic_fetch_add_explicit(&steps, 1, memory_order_relaxed); }

static void *stepper(void *arg) {
    (void)arg;
    while (!atomic_load_explicit(&done, memory_order_relaxed)) {
        step();
        usleep(100);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "ignore-int") == 0) signal(SIGINT, SIG_IGN);
    int pipefd[2];
    if (pipe(pipefd) != 0) return 1;
    pid_t child = fork();
    if (child == 0) {
        close(pipefd[1]);
        char c;
        while (read(pipefd[0], &c, 1) < 0) {}  /* until the parent closes its end */
        _exit(0);
    }
    close(pipefd[0]);
    printf("job %d child %d\n", getpid(), child);
    fflush(stdout);
    pthread_t t;
    pthread_create(&t, NULL, stepper, NULL);
    char line[64];
    (void)!fgets(line, sizeof line, stdin);
    atomic_store(&done, 1);
    pthread_join(t, NULL);
    printf("steps=%ld\n", atomic_load(&steps));
    fflush(stdout);
    close(pipefd[1]);
    waitpid(child, NULL, 0);
    return 5;
}
