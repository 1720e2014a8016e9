long no_such_global_anywhere;
extern long textpoke_missing_symbol(long);
long compute(long x) { return textpoke_missing_symbol(x) + 1; }
