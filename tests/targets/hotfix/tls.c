static __thread long calls;
long compute(long x) { calls++; return 3 * x + 1; }
