/* Test target: threads blocked in epoll_wait, read and nanosleep count any EINTR
 * they see, beside 2 workers hammering the call site of site_caller (call A).
 * On "stop" on stdin: made=N a=NA b=NB eintr=E bad=K
 * A ptrace stop of a thread in epoll_wait makes it return EINTR; textpoke must
 * never stop such a thread, and nothing else it does may interrupt the others.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

static atomic_long a_calls, b_calls, made, eintr, bad;
static atomic_int stop, started;
static int efd, pipefd[2];

__attribute__((noinline)) long A(long x) { atomic_fetch_add_explicit(&a_calls, 1, memory_order_relaxed); return x + 1; }
__attribute__((noinline)) long B(long x) { atomic_fetch_add_explicit(&b_calls, 1, memory_order_relaxed); return x + 1; }
__attribute__((noinline)) long site_caller(long x) { return A(x) * 2; }

static void *worker(void *arg) {
    (void)arg;
    long n = 0;
    atomic_fetch_add(&started, 1);
    while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
        if (site_caller(n) != (n + 1) * 2) atomic_fetch_add(&bad, 1);
        n++;
    }
    atomic_fetch_add(&made, n);
    return NULL;
}

static void *in_epoll(void *arg) {
    (void)arg;
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = efd}, out;
    epoll_ctl(ep, EPOLL_CTL_ADD, efd, &ev);
    atomic_fetch_add(&started, 1);
    while (!atomic_load(&stop)) {
        int r = epoll_wait(ep, &out, 1, 60000);
        if (r < 0 && errno == EINTR) atomic_fetch_add(&eintr, 1);
    }
    return NULL;
}

static void *in_read(void *arg) {
    (void)arg;
    char c;
    atomic_fetch_add(&started, 1);
    while (!atomic_load(&stop)) {
        ssize_t r = read(pipefd[0], &c, 1);
        if (r < 0 && errno == EINTR) atomic_fetch_add(&eintr, 1);
    }
    return NULL;
}

static void *in_sleep(void *arg) {
    (void)arg;
    atomic_fetch_add(&started, 1);
    while (!atomic_load(&stop)) {
        struct timespec ts = {0, 200 * 1000 * 1000};
        if (nanosleep(&ts, NULL) < 0 && errno == EINTR) atomic_fetch_add(&eintr, 1);
    }
    return NULL;
}

int main(void) {
    pthread_t t[5];
    efd = eventfd(0, 0);
    if (pipe(pipefd)) return 1;
    pthread_create(&t[0], NULL, worker, NULL);
    pthread_create(&t[1], NULL, worker, NULL);
    pthread_create(&t[2], NULL, in_epoll, NULL);
    pthread_create(&t[3], NULL, in_read, NULL);
    pthread_create(&t[4], NULL, in_sleep, NULL);
    while (atomic_load(&started) < 5) usleep(1000);
    usleep(20000); /* let the sleepers block */
    printf("ready %d\n", getpid());
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin) && strncmp(line, "stop", 4)) {}
    atomic_store(&stop, 1);
    uint64_t one = 1;
    if (write(efd, &one, sizeof one) < 0 || write(pipefd[1], "x", 1) < 0) return 1;
    for (int i = 0; i < 5; i++) pthread_join(t[i], NULL);
    printf("made=%ld a=%ld b=%ld eintr=%ld bad=%ld\n", atomic_load(&made), atomic_load(&a_calls),
           atomic_load(&b_calls), atomic_load(&eintr), atomic_load(&bad));
    return 0;
}
