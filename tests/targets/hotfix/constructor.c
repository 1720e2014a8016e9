long seed;
__attribute__((constructor)) static void init_seed(void) { seed = 42; }
long compute(long x) { return 3 * x + 1 + seed - 42; }
