// Test target for function-graph tracing of C++: exceptions through traced frames.
//
//   graph_cpp CASE
//
//   throw      catcher() -> middle() -> thrower() throws; RAII guards in every frame
//              print as they are destroyed; catcher catches and prints; 3 rounds
//   rethrow    rethrower() catches and rethrows (`throw;`) to an outer catcher; and
//              std::rethrow_exception of a captured exception_ptr
//   nested     a destructor run by the unwinding throws and catches an exception of
//              its own (inside traced frames), then unwinding goes on
//   library    std::vector::at out of range (thrown inside libstdc++) through a traced
//              frame
//   many       4 threads each throw and catch through traced frames 2000 times; prints
//              the total caught
//   uncaught   an exception nobody catches: std::terminate, abort (exit 134)
//
// Every function of interest is noipa: one call in the source is one call.
#include <cstdio>
#include <exception>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#define NOIPA __attribute__((noinline, noipa))

struct Guard {
    const char *name;
    explicit Guard(const char *n) : name(n) {}
    ~Guard() { std::printf("~%s\n", name); }
};

NOIPA long leaf(long x) { return x + 1; }

NOIPA void thrower(int round) {
    Guard g("thrower");
    leaf(round);
    throw std::runtime_error("boom " + std::to_string(round));
}

NOIPA long middle(int round) {
    Guard g("middle");
    thrower(round);
    return leaf(-1);  // never reached
}

NOIPA long catcher(int round) {
    Guard g("catcher");
    try {
        middle(round);
    } catch (const std::exception &e) {
        std::printf("caught %s\n", e.what());
        return leaf(round * 10);
    }
    return -1;
}

NOIPA void rethrower() {
    try {
        thrower(7);
    } catch (...) {
        std::printf("rethrowing\n");
        throw;
    }
}

NOIPA long outer_catcher() {
    try {
        rethrower();
    } catch (const std::exception &e) {
        std::printf("outer caught %s\n", e.what());
    }
    std::exception_ptr saved;
    try {
        thrower(8);
    } catch (...) {
        saved = std::current_exception();
    }
    try {
        std::rethrow_exception(saved);
    } catch (const std::exception &e) {
        std::printf("rethrown caught %s\n", e.what());
    }
    return leaf(1);
}

struct Nested {
    ~Nested() {
        try {
            thrower(99);
        } catch (const std::exception &e) {
            std::printf("destructor caught %s\n", e.what());
        }
    }
};

NOIPA void nested_inner() {
    Nested n;
    thrower(5);
}

NOIPA long nested_outer() {
    try {
        nested_inner();
    } catch (const std::exception &e) {
        std::printf("nested outer caught %s\n", e.what());
    }
    return leaf(2);
}

NOIPA long at_past_end(const std::vector<int> &v) { return v.at(v.size() + 1); }

NOIPA long library() {
    std::vector<int> v(3, 1);
    try {
        return at_past_end(v);
    } catch (const std::out_of_range &) {
        std::printf("library threw out_of_range\n");
    }
    return leaf(3);
}

NOIPA long quiet_thrower(long i) {
    if (i % 3 == 0) throw i;
    return leaf(i);
}

NOIPA long quiet_middle(long i) { return quiet_thrower(i) + 1; }

NOIPA long many_worker(long base) {
    long caught = 0;
    for (long i = 0; i < 2000; i++) {
        try {
            quiet_middle(base + i);
        } catch (long) {
            caught++;
        }
    }
    return caught;
}

int main(int argc, char **argv) {
    setvbuf(stdout, nullptr, _IOLBF, 0);
    std::string what = argc > 1 ? argv[1] : "throw";
    if (what == "throw") {
        for (int round = 1; round <= 3; round++) std::printf("catcher %ld\n", catcher(round));
    } else if (what == "rethrow") {
        std::printf("outer %ld\n", outer_catcher());
    } else if (what == "nested") {
        std::printf("nested %ld\n", nested_outer());
    } else if (what == "library") {
        std::printf("library %ld\n", library());
    } else if (what == "many") {
        long total[4] = {0, 0, 0, 0};
        std::vector<std::thread> threads;
        for (long t = 0; t < 4; t++) threads.emplace_back([t, &total] { total[t] = many_worker(t * 10000); });
        for (auto &t : threads) t.join();
        std::printf("many caught %ld\n", total[0] + total[1] + total[2] + total[3]);
    } else if (what == "uncaught") {
        std::printf("throwing for nobody\n");
        middle(0);
    } else {
        std::fprintf(stderr, "unknown case %s\n", what.c_str());
        return 2;
    }
    return 0;
}
