/* The fix for hotfix_target's twice(): 2x for every x (a function redirected at its call sites). */
long twice_fixed(long x) { return 2 * x; }
