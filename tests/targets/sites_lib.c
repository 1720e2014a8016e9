/* sites_lib: a shared library with fentry nop5 sites (tests/sites).
 *
 * gcc refuses -mnop-mcount with -fPIC, so this is compiled -fno-pic and linked
 * -shared; with no data references the only absolute relocations are the
 * __mcount_loc entries, which become R_X86_64_RELATIVE: the path a PIE or a
 * shared object takes for its recorded fentry sites.  lib_leaf is exported, so
 * lib_twice calls it through the PLT (two `call lib_leaf@plt`).
 */
#define NOINLINE __attribute__((noinline, noclone))

NOINLINE int lib_leaf(int x) { return x ^ 0x5a; }

NOINLINE int lib_twice(int x) { return lib_leaf(x) + lib_leaf(x + 1); }
