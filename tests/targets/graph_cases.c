/* Test target for function-graph tracing: every way a C program leaves a function.
 *
 *   graph_cases CASE [N]     runs one case, prints what it did, exits 0 (unless the
 *                            case is about the exit status)
 *
 * Cases (every traced function is noipa: one call in the source is one call):
 *   nest        outer() -> middle() -> inner() twice; prints the sum
 *   sleep       sleeper(10): nanosleep 10 ms in a traced function, 5 times; inner()
 *               calls around it
 *   recurse N   rec(N): N+1 nested calls, prints rec's result
 *   longjmp     jumper(): setjmp, then down1 -> down2 -> down3 -> longjmp back,
 *               3 times; then siglongjmp out of down1 -> down2 -> a SIGUSR1 handler
 *   signal      in_handler() called from a SIGUSR1 handler raised inside middle()
 *   tail        tail_a(x) tail-calls tail_b(x) (a jmp at -O2), 3 times
 *   threads     4 threads, each t_body() -> inner() 1000 times; then a thread that
 *               ends with pthread_exit() inside t_exit_outer() -> t_exit_inner(),
 *               and one cancelled inside t_cancel_outer() -> t_cancel_inner()
 *               (blocked in a cancellation point)
 *   fork        forker(): fork() inside traced frames; the child calls inner() and
 *               returns through every frame before it exits 7; the parent waits
 *   exec        execer(): execs itself as "graph_cases nest" from traced frames
 *   exit        leaver(): exit(3) from traced frames
 *   abort       aborter(): abort() from traced frames
 *   backtrace   bt_outer() -> bt_inner(): prints how many frames backtrace() saw and
 *               whether it got as far as libc (__libc_start_main, below main)
 *   gdb         gdb_outer() -> gdb_inner(): prints "waiting PID", reads a line from
 *               stdin (time for a debugger to look at the stack), prints its length
 */
#define _GNU_SOURCE
#include <execinfo.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define NOIPA __attribute__((noinline, noipa))

NOIPA long inner(long x) { return x * 2 + 1; }
NOIPA long middle(long x) { return inner(x) + inner(x + 1); }
NOIPA long outer(long x) { return middle(x) + 1; }

NOIPA void sleeper(long ms) {
    struct timespec t = {0, ms * 1000000};
    nanosleep(&t, NULL);
}

NOIPA long rec(long n) {
    if (n == 0) return 0;
    long r = rec(n - 1);
    __asm__ volatile("" : "+r"(r));  /* keeps gcc from turning the recursion into a loop */
    return r + 1;
}

static jmp_buf jump;
static sigjmp_buf sigjump;
NOIPA void down3(long x) { if (x >= 0) longjmp(jump, (int)x + 1); }
NOIPA void down2(long x) { down3(x); inner(x); }
NOIPA void down1(long x) { down2(x); inner(x); }

static void on_usr1_jump(int sig) { (void)sig; siglongjmp(sigjump, 9); }
NOIPA void sig_down2(void) { raise(SIGUSR1); inner(99); }
NOIPA void sig_down1(void) { sig_down2(); inner(98); }

NOIPA long jumper(void) {
    long got = 0;
    for (long i = 0; i < 3; i++) {
        int r = setjmp(jump);
        if (r == 0) down1(i);
        else got += r;
    }
    signal(SIGUSR1, on_usr1_jump);
    int r = sigsetjmp(sigjump, 1);
    if (r == 0) sig_down1();
    else got += r;
    return got;
}

NOIPA long in_handler(long x) { return inner(x) + 1; }
static volatile long handled;
static void on_usr1(int sig) { (void)sig; handled = in_handler(5); }
NOIPA long sig_middle(long x) { raise(SIGUSR1); return inner(x); }

NOIPA long tail_b(long x) { return x * 3 + inner(x); }
NOIPA long tail_a(long x) { return tail_b(x + 1); }

NOIPA long t_body(long x) { long s = 0; for (long i = 0; i < 1000; i++) s += inner(x + i); return s; }
static void *t_main(void *arg) { return (void *)t_body((long)arg); }
NOIPA void t_exit_inner(void) { pthread_exit((void *)42); }
NOIPA void t_exit_outer(void) { t_exit_inner(); inner(1); }
static void *t_exit_main(void *arg) { (void)arg; t_exit_outer(); return NULL; }
NOIPA void t_cancel_inner(int fd) { char c; (void)!read(fd, &c, 1); }
NOIPA void t_cancel_outer(int fd) { t_cancel_inner(fd); inner(2); }
static void *t_cancel_main(void *arg) { t_cancel_outer((int)(long)arg); return NULL; }

NOIPA long fork_inner(void) {
    pid_t child = fork();
    if (child == 0) return inner(100);
    int status;
    waitpid(child, &status, 0);
    return 1000 + WEXITSTATUS(status);
}
NOIPA long forker(void) { return fork_inner() + 1; }

static char *self;
NOIPA void exec_inner(void) { execl(self, self, "nest", (char *)NULL); }
NOIPA void execer(void) { exec_inner(); inner(1); }

NOIPA void leave_inner(void) { fflush(stdout); exit(3); }
NOIPA void leaver(void) { leave_inner(); inner(1); }
NOIPA void abort_inner(void) { fflush(stdout); abort(); }
NOIPA void aborter(void) { abort_inner(); inner(1); }

NOIPA int bt_inner(void) {
    void *frames[64];
    int n = backtrace(frames, 64);
    char **names = backtrace_symbols(frames, n);
    int libc_seen = 0;
    for (int i = 0; i < n; i++)
        if (names && strstr(names[i], "libc.so")) libc_seen = 1;
    printf("backtrace frames=%d libc=%d\n", n, libc_seen);
    free(names);
    return n;
}
NOIPA int bt_outer(void) { return bt_inner() + 0; }

NOIPA long gdb_inner(void) {
    char line[64];
    printf("waiting %d\n", (int)getpid());
    if (!fgets(line, sizeof line, stdin)) return -1;
    return (long)strlen(line);
}
NOIPA long gdb_outer(void) { return gdb_inner() + 1; }

int main(int argc, char **argv) {
    self = argv[0];
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *what = argc > 1 ? argv[1] : "nest";
    long n = argc > 2 ? atol(argv[2]) : 10000;
    if (!strcmp(what, "nest")) {
        printf("nest %ld %ld\n", outer(1), outer(2));
    } else if (!strcmp(what, "sleep")) {
        for (int i = 0; i < 5; i++) { inner(i); sleeper(10); }
        printf("slept\n");
    } else if (!strcmp(what, "recurse")) {
        printf("rec %ld\n", rec(n));
    } else if (!strcmp(what, "longjmp")) {
        printf("jumped %ld\n", jumper());
    } else if (!strcmp(what, "signal")) {
        signal(SIGUSR1, on_usr1);
        long r = sig_middle(3);
        printf("signal %ld handled %ld\n", r, handled);
    } else if (!strcmp(what, "tail")) {
        long s = 0;
        for (int i = 0; i < 3; i++) s += tail_a(i);
        printf("tail %ld\n", s);
    } else if (!strcmp(what, "threads")) {
        pthread_t t[4];
        long sum = 0;
        for (long i = 0; i < 4; i++) pthread_create(&t[i], NULL, t_main, (void *)i);
        for (int i = 0; i < 4; i++) { void *r; pthread_join(t[i], &r); sum += (long)r; }
        pthread_t e;
        void *ret;
        pthread_create(&e, NULL, t_exit_main, NULL);
        pthread_join(e, &ret);
        int fds[2];
        (void)!pipe(fds);
        pthread_t c;
        pthread_create(&c, NULL, t_cancel_main, (void *)(long)fds[0]);
        struct timespec w = {0, 50 * 1000000};
        nanosleep(&w, NULL);
        pthread_cancel(c);
        void *cret;
        pthread_join(c, &cret);
        printf("threads %ld exit %ld cancelled %d\n", sum, (long)ret, cret == PTHREAD_CANCELED);
    } else if (!strcmp(what, "fork")) {
        long r = forker();
        if (r < 1000) { printf("child %ld\n", r); fflush(stdout); _exit(7); }
        printf("parent %ld\n", r);
    } else if (!strcmp(what, "exec")) {
        execer();
        printf("exec failed\n");
    } else if (!strcmp(what, "exit")) {
        printf("leaving\n");
        leaver();
    } else if (!strcmp(what, "abort")) {
        printf("aborting\n");
        aborter();
    } else if (!strcmp(what, "backtrace")) {
        printf("bt %d\n", bt_outer() > 0);
    } else if (!strcmp(what, "gdb")) {
        printf("gdb %ld\n", gdb_outer());
    } else {
        fprintf(stderr, "unknown case %s\n", what);
        return 2;
    }
    return 0;
}
