/* A fix calling strlen, an IFUNC of glibc (its code chosen at run time): textpoke
 * resolves it to what the program's own GOT holds. */
#include <string.h>

long scale(long x);
extern char last_msg[];     /* size unknown here: gcc keeps the strlen call */

long compute(long x) {
    if (strlen(last_msg) > 1000)  /* never: the call is what the test needs */
        return -1;
    return scale(x) + 1;
}
