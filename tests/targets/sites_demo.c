/* sites_demo: a small target with a known set of sites (tests/sites).
 *
 * noinline+noclone keep every function a separate symbol with stable calls at
 * any -O level, so the tests can state exact site counts:
 *   leaf         no call
 *   middle       exactly two direct calls, both to leaf
 *   via_pointer  one indirect call through a function pointer: NOT a site
 *   probe        a nop5 in the middle of the body: never a fentry site
 * With "wait" as argument the program prints "ready" and pauses, for live tests.
 */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline, noclone))

NOINLINE int leaf(int x) { return x * 3 + 1; }

NOINLINE int middle(int x) { return leaf(x) + leaf(x + 1); }

/* volatile: the compiler cannot see which function is called, so it stays indirect. */
int (*volatile hook)(int) = leaf;

NOINLINE int via_pointer(int x) { return hook(x) + 1; }

NOINLINE int probe(int x) {
    x = x * 7;
    /* A USDT-style nop5 (nopl 0x0(%rax,%rax,1)) after real work. */
    __asm__ volatile(".byte 0x0f, 0x1f, 0x44, 0x00, 0x00" : "+r"(x));
    return x + 2;
}

int main(int argc, char **argv) {
    int value = middle(argc) + via_pointer(argc) + probe(argc);
    if (argc > 1 && strcmp(argv[1], "wait") == 0) {
        printf("ready %d\n", value);
        fflush(stdout);
        for (;;)
            pause();
    }
    printf("%d\n", value);
    return 0;
}
