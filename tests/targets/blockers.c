/* Test target: threads that block every signal, beside threads that don't.
 *
 * Every thread calls site_caller() ("call A", the site tests retarget to B and
 * back) and counts its calls; A and B count theirs, so a test checks
 * a + b == made exactly. Threads (argv[1] workers, argv[2] spinning blockers):
 *
 *   worker      no signal blocked; calls in a loop
 *   spinner     every signal blocked from its start, forever; calls in a loop
 *               (the kernel would kill the process if it ran into an int3)
 *   epoller     every signal blocked; epoll_wait(-1) on a pipe, one call per byte
 *   reader      every signal blocked; read() on a pipe, one call per byte
 *   sleeper     every signal blocked; nanosleep(1 ms) in a loop, one call each
 *
 * A blocked syscall that returns EINTR counts in eintr= (it must stay 0: a
 * thread held by textpoke must not see its syscall interrupted).
 * Commands on stdin:
 *   poke N    write N bytes to the epoller's and the reader's pipes; "poked"
 *   late MS   start a thread that blocks every signal, sleeps MS ms, then
 *             calls in a loop like a spinner; "late TID"
 *   mq        start a thread that blocks every signal and waits in mq_receive for good
 *             (a syscall a ptrace stop ends with EINTR); "mq"
 *   count     "made=N" (calls so far)
 *   stop      "made=N a=NA b=NB bad=K eintr=E epolled=P read=R slept=S"
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <mqueue.h>
#include <sys/epoll.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static atomic_long a_calls, b_calls, made, bad, eintr, epolled, readbytes, slept;
static atomic_int stop, started;
static int epoll_pipe[2], read_pipe[2];

__attribute__((noinline)) long A(long x) { atomic_fetch_add_explicit(&a_calls, 1, memory_order_relaxed); return x + 1; }
__attribute__((noinline)) long B(long x) { atomic_fetch_add_explicit(&b_calls, 1, memory_order_relaxed); return x + 1; }
__attribute__((noinline)) long site_caller(long x) { return A(x) * 2; }

static void one_call(long n) {
    if (site_caller(n) != (n + 1) * 2) atomic_fetch_add(&bad, 1);
    atomic_fetch_add_explicit(&made, 1, memory_order_relaxed);
}

static void block_all(void) {
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, NULL);
}

static void *worker(void *arg) {
    (void)arg;
    atomic_fetch_add(&started, 1);
    for (long n = 0; !atomic_load_explicit(&stop, memory_order_relaxed); n++) one_call(n);
    return NULL;
}

static void *spinner(void *arg) {
    long delay_ms = (long)arg;
    block_all();
    atomic_fetch_add(&started, 1);
    if (delay_ms) {
        struct timespec ts = {delay_ms / 1000, (delay_ms % 1000) * 1000000L};
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR) atomic_fetch_add(&eintr, 1);
    }
    for (long n = 0; !atomic_load_explicit(&stop, memory_order_relaxed); n++) one_call(n);
    return NULL;
}

static void *epoller(void *arg) {
    (void)arg;
    block_all();
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = epoll_pipe[0]};
    epoll_ctl(ep, EPOLL_CTL_ADD, epoll_pipe[0], &ev);
    atomic_fetch_add(&started, 1);
    for (long n = 0;; n++) {
        int got = epoll_wait(ep, &ev, 1, -1);
        if (got < 0) {
            if (errno == EINTR) atomic_fetch_add(&eintr, 1);
            continue;
        }
        char c;
        if (read(epoll_pipe[0], &c, 1) != 1 || c == 'q') break;
        one_call(n);
        atomic_fetch_add(&epolled, 1);
    }
    return NULL;
}

static void *reader(void *arg) {
    (void)arg;
    block_all();
    atomic_fetch_add(&started, 1);
    for (long n = 0;; n++) {
        char c;
        ssize_t got = read(read_pipe[0], &c, 1);
        if (got < 0) {
            if (errno == EINTR) atomic_fetch_add(&eintr, 1);
            continue;
        }
        if (got == 0 || c == 'q') break;
        one_call(n);
        atomic_fetch_add(&readbytes, 1);
    }
    return NULL;
}

static void *sleeper(void *arg) {
    (void)arg;
    block_all();
    atomic_fetch_add(&started, 1);
    for (long n = 0; !atomic_load_explicit(&stop, memory_order_relaxed); n++) {
        struct timespec ts = {0, 1000000L};
        if (nanosleep(&ts, NULL) != 0 && errno == EINTR) atomic_fetch_add(&eintr, 1);
        one_call(n);
        atomic_fetch_add(&slept, 1);
    }
    return NULL;
}

static atomic_int mq_started;

static void *mq_waiter(void *arg) {
    (void)arg;
    block_all();
    char name[64], buf[64];
    snprintf(name, sizeof name, "/textpoke-test-%d", getpid());
    struct mq_attr attr = {.mq_maxmsg = 1, .mq_msgsize = sizeof buf};
    mqd_t q = mq_open(name, O_RDONLY | O_CREAT, 0600, &attr);
    mq_unlink(name);
    atomic_store(&mq_started, 1);
    for (;;) {
        if (mq_receive(q, buf, sizeof buf, NULL) < 0 && errno == EINTR) atomic_fetch_add(&eintr, 1);
    }
    return NULL;
}

int main(int argc, char **argv) {
    int workers = argc > 1 ? atoi(argv[1]) : 2, spinners = argc > 2 ? atoi(argv[2]) : 1;
    pthread_t tids[128];
    int n = 0;
    char line[64];
    if (pipe(epoll_pipe) || pipe(read_pipe)) return 2;
    for (int i = 0; i < workers; i++) pthread_create(&tids[n++], NULL, worker, NULL);
    for (int i = 0; i < spinners; i++) pthread_create(&tids[n++], NULL, spinner, NULL);
    pthread_create(&tids[n++], NULL, epoller, NULL);
    pthread_create(&tids[n++], NULL, reader, NULL);
    pthread_create(&tids[n++], NULL, sleeper, NULL);
    while (atomic_load(&started) < n) usleep(1000);
    printf("ready %d\n", getpid());
    fflush(stdout);
    while (fgets(line, sizeof line, stdin) && strncmp(line, "stop", 4)) {
        if (strncmp(line, "poke ", 5) == 0) {
            int count = atoi(line + 5);
            for (int i = 0; i < count; i++) {
                if (write(epoll_pipe[1], "x", 1) != 1 || write(read_pipe[1], "x", 1) != 1) return 3;
            }
            printf("poked\n");
        } else if (strncmp(line, "mq", 2) == 0) {
            pthread_t t;
            pthread_create(&t, NULL, mq_waiter, NULL);
            pthread_detach(t);
            while (!atomic_load(&mq_started)) usleep(100);
            usleep(20000);
            printf("mq\n");
        } else if (strncmp(line, "count", 5) == 0) {
            printf("made=%ld\n", atomic_load(&made));
        } else if (strncmp(line, "late ", 5) == 0 && n < 128) {
            int before = atomic_load(&started);
            pthread_create(&tids[n++], NULL, spinner, (void *)atol(line + 5));
            while (atomic_load(&started) == before) usleep(100);
            printf("late\n");
        }
        fflush(stdout);
    }
    atomic_store(&stop, 1);
    if (write(epoll_pipe[1], "q", 1) != 1 || write(read_pipe[1], "q", 1) != 1) return 3;
    for (int i = 0; i < n; i++) pthread_join(tids[i], NULL);
    printf("made=%ld a=%ld b=%ld bad=%ld eintr=%ld epolled=%ld read=%ld slept=%ld\n", atomic_load(&made),
           atomic_load(&a_calls), atomic_load(&b_calls), atomic_load(&bad), atomic_load(&eintr),
           atomic_load(&epolled), atomic_load(&readbytes), atomic_load(&slept));
    return 0;
}
