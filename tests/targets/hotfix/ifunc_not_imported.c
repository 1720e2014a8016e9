/* memrchr is an IFUNC of glibc that the program does not import: refused. */
#define _GNU_SOURCE
#include <string.h>

extern char last_msg[64];

long compute(long x) { return 3 * x + 1 + (memrchr(last_msg, 'x', 8) == last_msg + 100); }
