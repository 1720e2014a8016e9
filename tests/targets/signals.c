/* Test target: two threads blocked in read(2), one per kind of signal handler.
 *
 * - "norestart" reads a pipe; SIGUSR1's handler has no SA_RESTART, so a
 *   SIGUSR1 while it is blocked ends its read with EINTR (counted in e1);
 * - "restart" reads another pipe; SIGUSR2's handler has SA_RESTART, so its
 *   read goes on after the handler (a failed read counts in e2).
 * Handlers count in h1 and h2.  Prints "ready pid norestart=T restart=T" and
 * answers "check" with "h1= e1= h2= e2= in1= in2=" (in: the thread is back
 * in read, counted by each read call it starts).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static atomic_long h1, e1, h2, e2, in1, in2;
static atomic_int tid1, tid2;
static int p1[2], p2[2];

static void on_usr1(int sig) { (void)sig; atomic_fetch_add(&h1, 1); }
static void on_usr2(int sig) { (void)sig; atomic_fetch_add(&h2, 1); }

static void *norestart(void *arg) {
    (void)arg;
    char c;
    atomic_store(&tid1, (int)syscall(SYS_gettid));
    for (;;) {
        atomic_fetch_add(&in1, 1);
        if (read(p1[0], &c, 1) < 0 && errno == EINTR) atomic_fetch_add(&e1, 1);
    }
    return NULL;
}

static void *restart(void *arg) {
    (void)arg;
    char c;
    atomic_store(&tid2, (int)syscall(SYS_gettid));
    for (;;) {
        atomic_fetch_add(&in2, 1);
        if (read(p2[0], &c, 1) < 0) atomic_fetch_add(&e2, 1);
    }
    return NULL;
}

int main(void) {
    struct sigaction a;
    pthread_t t1, t2;
    char line[64];
    memset(&a, 0, sizeof a);
    a.sa_handler = on_usr1;
    sigaction(SIGUSR1, &a, NULL);
    a.sa_handler = on_usr2;
    a.sa_flags = SA_RESTART;
    sigaction(SIGUSR2, &a, NULL);
    if (pipe(p1) || pipe(p2)) return 1;
    pthread_create(&t1, NULL, norestart, NULL);
    pthread_create(&t2, NULL, restart, NULL);
    while (!atomic_load(&tid1) || !atomic_load(&tid2)) usleep(1000);
    usleep(20000);
    printf("ready %d norestart=%d restart=%d\n", getpid(), tid1, tid2);
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        if (!strncmp(line, "check", 5)) {
            printf("h1=%ld e1=%ld h2=%ld e2=%ld in1=%ld in2=%ld\n", atomic_load(&h1), atomic_load(&e1),
                   atomic_load(&h2), atomic_load(&e2), atomic_load(&in1), atomic_load(&in2));
            fflush(stdout);
        }
    }
    return 0;
}
