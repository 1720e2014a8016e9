/* Test target for process life while textpoke patches it (tests/chaos).
 *
 * Worker threads (argv[1], default 2) call site_caller() ("call A", the site
 * tests retarget to B) and traced() (fentry nop5) in a loop, counting calls
 * and wrong results. Commands, one per line on stdin (replies on stdout):
 *
 *   fork       fork(); the child starts 2 workers of its own (counters from
 *              zero) and waits for SIGTERM, then prints
 *              "child made=N a=NA b=NB bad=K"; the parent prints "forked PID",
 *              the child "child ready PID"
 *   exec       execv(/proc/self/exe, "execd"): the new image calls site_caller
 *              1000 times, prints "execd ready PID bad=K", waits for a line and
 *              prints "execd done" before exiting 0
 *   handler    install its own SIGTRAP handler now; prints "handler installed"
 *   chain      install a handler that counts and calls the one it replaced
 *              (a chaining handler; twice at most); prints "chained K"
 *   traps N    execute N int3 instructions and N raise(SIGTRAP); prints
 *              "trapped handled=H chain1=C1 chain2=C2" (calls of each handler so far)
 *   block      start a thread that blocks SIGTRAP and sleeps; "blocked TID"
 *   unblock    that thread unblocks SIGTRAP; "unblocked"
 *   stop       "made=N a=NA b=NB bad=K handled=H", exit 0
 * argv[2] == "handler": install the SIGTRAP handler before "ready".
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static atomic_long a_calls, b_calls, made, bad;
static atomic_int stop, started, handled;
static atomic_int blocker_tid, unblock_now;
static volatile sig_atomic_t child_stop;
static struct sigaction chained_from[3];
static atomic_int chain_calls[3];
static int chains;

__attribute__((noinline)) long A(long x) { atomic_fetch_add_explicit(&a_calls, 1, memory_order_relaxed); return x + 1; }
__attribute__((noinline)) long B(long x) { atomic_fetch_add_explicit(&b_calls, 1, memory_order_relaxed); return x + 1; }
__attribute__((noinline)) long traced(long x) { return x * 3 + 1; }
__attribute__((noinline)) long site_caller(long x) { return A(x) * 2; }

static void *worker(void *arg) {
    (void)arg;
    long n = 0, wrong = 0;
    atomic_fetch_add(&started, 1);
    while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
        if (site_caller(n) != (n + 1) * 2) wrong++;
        if (traced(n) != n * 3 + 1) wrong++;
        n++;
    }
    atomic_fetch_add(&made, n);
    atomic_fetch_add(&bad, wrong);
    return NULL;
}

static void on_trap(int sig, siginfo_t *info, void *uc) {
    (void)sig; (void)info; (void)uc;
    atomic_fetch_add(&handled, 1);
}

static void chain_call(int k, int sig, siginfo_t *info, void *uc) {
    struct sigaction *prev = &chained_from[k];
    atomic_fetch_add(&chain_calls[k], 1);
    if (prev->sa_flags & SA_SIGINFO) {
        if (prev->sa_sigaction) prev->sa_sigaction(sig, info, uc);
    } else if (prev->sa_handler != SIG_DFL && prev->sa_handler != SIG_IGN) {
        prev->sa_handler(sig);
    }
}

static void chain1(int sig, siginfo_t *info, void *uc) { chain_call(1, sig, info, uc); }
static void chain2(int sig, siginfo_t *info, void *uc) { chain_call(2, sig, info, uc); }

static void install_chain(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    chains++;
    sa.sa_sigaction = chains == 1 ? chain1 : chain2;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigaction(SIGTRAP, &sa, &chained_from[chains]);
}

static void install_handler(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_trap;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigaction(SIGTRAP, &sa, NULL);
}

static void *blocker(void *arg) {
    (void)arg;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTRAP);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    atomic_store(&blocker_tid, (int)syscall(SYS_gettid));
    while (!atomic_load(&unblock_now)) {
        struct timespec ts = {0, 2 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    pthread_sigmask(SIG_UNBLOCK, &set, NULL);
    atomic_store(&blocker_tid, -1);
    while (!atomic_load(&stop)) {
        struct timespec ts = {0, 20 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    return NULL;
}

static void on_child_term(int sig) { (void)sig; child_stop = 1; }

static void run_child(void) {
    pthread_t t[2];
    atomic_store(&a_calls, 0);
    atomic_store(&b_calls, 0);
    atomic_store(&made, 0);
    atomic_store(&bad, 0);
    atomic_store(&stop, 0);
    signal(SIGTERM, on_child_term);
    for (int i = 0; i < 2; i++) pthread_create(&t[i], NULL, worker, NULL);
    printf("child ready %d\n", getpid());
    fflush(stdout);
    while (!child_stop) pause();
    atomic_store(&stop, 1);
    for (int i = 0; i < 2; i++) pthread_join(t[i], NULL);
    printf("child made=%ld a=%ld b=%ld bad=%ld\n", atomic_load(&made), atomic_load(&a_calls),
           atomic_load(&b_calls), atomic_load(&bad));
    fflush(stdout);
    _exit(0);
}

static int execd(void) {
    long wrong = 0;
    char line[64];
    for (long n = 0; n < 1000; n++)
        if (site_caller(n) != (n + 1) * 2) wrong++;
    printf("execd ready %d bad=%ld\n", getpid(), wrong);
    fflush(stdout);
    if (fgets(line, sizeof line, stdin)) {}
    printf("execd done\n");
    return 0;
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "execd") == 0) return execd();
    int threads = argc > 1 ? atoi(argv[1]) : 2;
    pthread_t tids[64], block_thread;
    if (argc > 2 && strcmp(argv[2], "handler") == 0) install_handler();
    for (int i = 0; i < threads; i++) pthread_create(&tids[i], NULL, worker, NULL);
    while (atomic_load(&started) < threads) usleep(1000);
    printf("ready %d\n", getpid());
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "fork", 4) == 0) {
            pid_t child = fork();
            if (child == 0) run_child();
            printf("forked %d\n", child);
        } else if (strncmp(line, "exec", 4) == 0) {
            char *args[] = {"life", "execd", NULL};
            fflush(stdout);
            execv("/proc/self/exe", args);
            printf("exec failed\n");
        } else if (strncmp(line, "handler", 7) == 0) {
            install_handler();
            printf("handler installed\n");
        } else if (strncmp(line, "chain", 5) == 0) {
            install_chain();
            printf("chained %d\n", chains);
        } else if (strncmp(line, "traps ", 6) == 0) {
            long n = atol(line + 6);
            for (long i = 0; i < n; i++) __asm__ volatile("int3");
            for (long i = 0; i < n; i++) raise(SIGTRAP);
            printf("trapped handled=%d chain1=%d chain2=%d\n", atomic_load(&handled),
                   atomic_load(&chain_calls[1]), atomic_load(&chain_calls[2]));
        } else if (strncmp(line, "block", 5) == 0) {
            atomic_store(&unblock_now, 0);
            atomic_store(&blocker_tid, 0);
            pthread_create(&block_thread, NULL, blocker, NULL);
            while (atomic_load(&blocker_tid) == 0) usleep(1000);
            printf("blocked %d\n", atomic_load(&blocker_tid));
        } else if (strncmp(line, "unblock", 7) == 0) {
            atomic_store(&unblock_now, 1);
            while (atomic_load(&blocker_tid) != -1) usleep(1000);
            printf("unblocked\n");
        } else {
            break;
        }
        fflush(stdout);
    }
    atomic_store(&stop, 1);
    for (int i = 0; i < threads; i++) pthread_join(tids[i], NULL);
    printf("made=%ld a=%ld b=%ld bad=%ld handled=%d\n", atomic_load(&made), atomic_load(&a_calls),
           atomic_load(&b_calls), atomic_load(&bad), atomic_load(&handled));
    return 0;
}
