long compute_that_does_not_exist(long x) { return 3 * x + 1; }
