/* The fix for hotfix_target's compute(): 3x + 1 for every x.  It uses the
 * program's static scale(), its globals fixed_calls and last_msg, and libc's
 * snprintf (every 65,536th call). */
#include <stdio.h>

long scale(long x);           /* static in the program: textpoke resolves it from .symtab */
extern long fixed_calls;
extern char last_msg[64];

long compute(long x) {
    long n = __atomic_add_fetch(&fixed_calls, 1, __ATOMIC_RELAXED);
    if ((n & 0xFFFF) == 1)
        snprintf(last_msg, sizeof last_msg, "fixed call %ld", n);
    return scale(x) + 1;
}
