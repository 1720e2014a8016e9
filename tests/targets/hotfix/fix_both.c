/* Two functions in one fix: compute (fentry site) and twice (call sites), switched as one. */
#include <stdio.h>

long scale(long x);
extern long fixed_calls;
extern char last_msg[64];

long compute(long x) {
    long n = __atomic_add_fetch(&fixed_calls, 1, __ATOMIC_RELAXED);
    if ((n & 0xFFFF) == 1)
        snprintf(last_msg, sizeof last_msg, "fixed call %ld", n);
    return scale(x) + 1;
}

long twice_fixed(long x) { return 2 * x; }
