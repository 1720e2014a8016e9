"""Generator of a C program with N functions (the sites speed measurements and tests).

    python tests/targets/many_functions.py N OUT.c

``f0 .. f{N-1}`` are noinline and each calls the one before it (so every
function has one call site and, in a fentry build, one fentry site); every
tenth one also calls ``malloc``.  ``main`` calls ``f{N-1}``.  The program
prints a sum that the tests can check: with "wait" as argument it prints
"ready SUM" and pauses.
"""

from __future__ import annotations

import sys
from pathlib import Path

#: Functions 0, 10, 20... call malloc (besides the previous function).
MALLOC_EVERY = 10


def source(n: int) -> str:
    lines = [
        "#include <stdio.h>",
        "#include <stdlib.h>",
        "#include <string.h>",
        "#include <unistd.h>",
        "#define KEEP __attribute__((noinline, noipa))",
        "static void *volatile kept;  /* keeps gcc from removing malloc+free */",
        "KEEP long f0(long x) { kept = malloc(1); free(kept); return x + 1; }",
    ]
    for i in range(1, n):
        extra = " kept = malloc(1); free(kept);" if i % MALLOC_EVERY == 0 else ""
        lines.append(f"KEEP long f{i}(long x) {{{extra} return f{i - 1}(x) + {i % 7}; }}")
    lines += [
        "int main(int argc, char **argv) {",
        f"    long sum = f{n - 1}(argc);",
        '    if (argc > 1 && strcmp(argv[1], "wait") == 0) {',
        '        printf("ready %ld\\n", sum);',
        "        fflush(stdout);",
        "        for (;;) pause();",
        "    }",
        '    printf("%ld\\n", sum);',
        "    return 0;",
        "}",
    ]
    return "\n".join(lines) + "\n"


def malloc_callers(n: int) -> int:
    """How many functions call malloc (each through one call site)."""
    return len(range(0, n, MALLOC_EVERY))


def write(n: int, path: Path) -> Path:
    text = source(n)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


if __name__ == "__main__":
    write(int(sys.argv[1]), Path(sys.argv[2]))
