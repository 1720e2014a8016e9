/* sites_cpp: C++ names for the sites tests (demangling, globs over demangled names).
 *
 * Built with the fentry flags (g++ -O2 -fno-pie -pg -mfentry -mnop-mcount
 * -mrecord-mcount -c, linked -no-pie without -pg), so every function below has
 * exactly one fentry site; noinline/noipa keep each one a function of its own:
 *   ns::Foo::Foo(int)            constructor
 *   ns::Foo::bar(int) const      method, overloaded by
 *   ns::Foo::bar(double) const
 *   ns::Foo::get() const
 *   ns::add<int>(int, int)       template, two instances
 *   ns::add<long>(long, long)
 *   plain_c                      extern "C": not mangled
 * With "wait" as argument it prints "ready" and pauses (live tests).
 */
#include <cstdio>
#include <cstring>
#include <unistd.h>

#define KEEP __attribute__((noinline, noipa))

namespace ns {

class Foo {
  public:
    KEEP explicit Foo(int v) : value_(v) {}
    KEEP int bar(int x) const { return value_ + x; }
    KEEP int bar(double x) const { return value_ + static_cast<int>(x * 2); }
    KEEP int get() const { return value_; }

  private:
    int value_;
};

template <typename T> KEEP T add(T a, T b) { return a + b; }

}  // namespace ns

extern "C" KEEP int plain_c(int x) { return x * 3; }

int main(int argc, char **argv) {
    ns::Foo foo(argc);
    long total = foo.bar(1) + foo.bar(2.5) + foo.get() + ns::add<int>(argc, 2) + ns::add<long>(argc, 3L) +
                 plain_c(argc);
    if (argc > 1 && std::strcmp(argv[1], "wait") == 0) {
        std::printf("ready %ld\n", total);
        std::fflush(stdout);
        for (;;)
            pause();
    }
    std::printf("%ld\n", total);
    return 0;
}
