/* Test target: three threads that notice if a ptrace borrow changes anything.
 *
 * - "spinner" runs check_registers(): every general register but rsp, ymm0-13
 *   and MXCSR hold known values, checked over and over; a changed one counts
 *   in bad (it would show a restore that lost the vector state, say);
 * - "sleeper" loops in clock_nanosleep(20 ms): a non-zero return (EINTR, or a
 *   -ERESTART value leaking out) counts in errs, and so does a sleep that
 *   ended early;
 * - main reads commands with read(2) on stdin: a failed read counts in errs.
 *
 * It prints "ready pid spinner=T sleeper=T main=T", then answers "check" with
 * "spins=N bad=B errs=E sleeps=S" and exits on "stop" or end of input.
 * No signal handler is installed: no syscall may ever return EINTR here.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static atomic_long spins, bad, errs, sleeps;
static atomic_int spinner_tid, sleeper_tid;

/* Returns 0 if every register kept its value for `rounds` rounds (rdi), else 1. */
long check_registers(long rounds);
__asm__(
    ".intel_syntax noprefix\n"
    ".text\n"
    ".globl check_registers\n"
    "check_registers:\n"
    "  push rbx\n push rbp\n push r12\n push r13\n push r14\n push r15\n"
    "  sub rsp, 8\n"
    "  stmxcsr [rsp]\n"
    "  mov dword ptr [rsp + 4], 0x7f80 | 0x6000\n" /* round toward zero, exceptions masked */
    "  ldmxcsr [rsp + 4]\n"
    "  mov rax, 0x1111111111111111\n mov rbx, 0x2222222222222222\n mov rdx, 0x3333333333333333\n"
    "  mov rsi, 0x4444444444444444\n mov rbp, 0x5555555555555555\n mov r8, 0x6666666666666666\n"
    "  mov r9, 0x7777777777777777\n mov r10, 0x0888888888888888\n mov r11, 0x0999999999999999\n"
    "  mov r12, 0x0aaaaaaaaaaaaaaa\n mov r13, 0x0bbbbbbbbbbbbbbb\n mov r14, 0x0ccccccccccccccc\n"
    "  mov r15, 0x0ddddddddddddddd\n"
    "  vmovdqu ymm0, [rip + k_ymm + 0*32]\n vmovdqu ymm1, [rip + k_ymm + 1*32]\n"
    "  vmovdqu ymm2, [rip + k_ymm + 2*32]\n vmovdqu ymm3, [rip + k_ymm + 3*32]\n"
    "  vmovdqu ymm4, [rip + k_ymm + 4*32]\n vmovdqu ymm5, [rip + k_ymm + 5*32]\n"
    "  vmovdqu ymm6, [rip + k_ymm + 6*32]\n vmovdqu ymm7, [rip + k_ymm + 7*32]\n"
    "  vmovdqu ymm8, [rip + k_ymm + 8*32]\n vmovdqu ymm9, [rip + k_ymm + 9*32]\n"
    "  vmovdqu ymm10, [rip + k_ymm + 10*32]\n vmovdqu ymm11, [rip + k_ymm + 11*32]\n"
    "  vmovdqu ymm12, [rip + k_ymm + 12*32]\n vmovdqu ymm13, [rip + k_ymm + 13*32]\n"
    "  mov rcx, rdi\n"
    "1:\n"
    "  cmp rax, [rip + k_gpr + 0*8]\n jne 8f\n cmp rbx, [rip + k_gpr + 1*8]\n jne 8f\n"
    "  cmp rdx, [rip + k_gpr + 2*8]\n jne 8f\n cmp rsi, [rip + k_gpr + 3*8]\n jne 8f\n"
    "  cmp rbp, [rip + k_gpr + 4*8]\n jne 8f\n cmp r8, [rip + k_gpr + 5*8]\n jne 8f\n"
    "  cmp r9, [rip + k_gpr + 6*8]\n jne 8f\n cmp r10, [rip + k_gpr + 7*8]\n jne 8f\n"
    "  cmp r11, [rip + k_gpr + 8*8]\n jne 8f\n cmp r12, [rip + k_gpr + 9*8]\n jne 8f\n"
    "  cmp r13, [rip + k_gpr + 10*8]\n jne 8f\n cmp r14, [rip + k_gpr + 11*8]\n jne 8f\n"
    "  cmp r15, [rip + k_gpr + 12*8]\n jne 8f\n"
    "  .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13\n"
    "  vpxor ymm14, ymm\\n, [rip + k_ymm + \\n*32]\n vptest ymm14, ymm14\n jnz 8f\n"
    "  .endr\n"
    "  stmxcsr [rsp]\n cmp dword ptr [rsp], 0x7f80 | 0x6000\n jne 8f\n"
    "  dec rcx\n jnz 1b\n"
    "  xor eax, eax\n jmp 9f\n"
    "8:\n  mov eax, 1\n"
    "9:\n"
    "  ldmxcsr [rsp + 4]\n" /* back to what the caller had: stmxcsr above saved it at [rsp] first */
    "  vzeroupper\n"
    "  add rsp, 8\n pop r15\n pop r14\n pop r13\n pop r12\n pop rbp\n pop rbx\n ret\n"
    ".section .rodata\n"
    ".balign 32\n"
    "k_gpr: .quad 0x1111111111111111, 0x2222222222222222, 0x3333333333333333, 0x4444444444444444,"
    " 0x5555555555555555, 0x6666666666666666, 0x7777777777777777, 0x0888888888888888,"
    " 0x0999999999999999, 0x0aaaaaaaaaaaaaaa, 0x0bbbbbbbbbbbbbbb, 0x0ccccccccccccccc, 0x0ddddddddddddddd\n"
    ".balign 32\n"
    "k_ymm:\n"
    "  .irp n, 1,2,3,4,5,6,7,8,9,10,11,12,13,14\n"
    "  .quad 0x0101010101010101*\\n, 0x0202020202020202*\\n, 0x0303030303030303*\\n, 0x0404040404040404*\\n\n"
    "  .endr\n"
    ".text\n"
    ".att_syntax prefix\n");

static void *spinner(void *arg) {
    (void)arg;
    atomic_store(&spinner_tid, (int)syscall(SYS_gettid));
    for (;;) {
        if (check_registers(1 << 16)) atomic_fetch_add(&bad, 1);
        atomic_fetch_add(&spins, 1);
    }
    return NULL;
}

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

static void *sleeper(void *arg) {
    (void)arg;
    atomic_store(&sleeper_tid, (int)syscall(SYS_gettid));
    for (;;) {
        struct timespec d = {0, 20 * 1000 * 1000};
        long start = now_ns();
        int rc = clock_nanosleep(CLOCK_MONOTONIC, 0, &d, NULL);
        if (rc != 0 || now_ns() - start < 20 * 1000 * 1000) atomic_fetch_add(&errs, 1);
        atomic_fetch_add(&sleeps, 1);
    }
    return NULL;
}

int main(void) {
    pthread_t a, b;
    char line[256];
    pthread_create(&a, NULL, spinner, NULL);
    pthread_create(&b, NULL, sleeper, NULL);
    while (!atomic_load(&spinner_tid) || !atomic_load(&sleeper_tid) || !atomic_load(&spins)) usleep(1000);
    printf("ready %d spinner=%d sleeper=%d main=%d\n", getpid(), spinner_tid, sleeper_tid, getpid());
    fflush(stdout);
    size_t have = 0;
    for (;;) {
        ssize_t n = read(0, line + have, sizeof line - 1 - have);
        if (n < 0) {
            atomic_fetch_add(&errs, 1);
            continue;
        }
        if (n == 0) return 0;
        have += (size_t)n;
        line[have] = 0;
        char *nl;
        while ((nl = strchr(line, '\n'))) {
            *nl = 0;
            if (!strcmp(line, "stop")) return 0;
            if (!strcmp(line, "check")) {
                printf("spins=%ld bad=%ld errs=%ld sleeps=%ld\n", atomic_load(&spins), atomic_load(&bad),
                       atomic_load(&errs), atomic_load(&sleeps));
                fflush(stdout);
            }
            have -= (size_t)(nl + 1 - line);
            memmove(line, nl + 1, have + 1);
        }
    }
}
