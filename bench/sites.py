"""Benchmark: how long finding sites takes, on a 20,000-function program and on Debian's binaries.

    python bench/sites.py [--functions N] [--runs R]

Prints one line per measurement (median of R runs, wall clock):

- ``textpoke sites PROG --kind fentry`` end to end (a new Python process, the
  table printed to /dev/null), and the same with only the ``sites`` command
  imported (what the command costs apart from the CLI's start-up);
- the steps in this process: reading the ELF (cold cache), the fentry scan,
  formatting the table;
- ``sites_in_process(pid, functions=("f1",))`` on the running program;
- ``.eh_frame``: textpoke's parser against pyelftools on /usr/bin/python3.11;
- demangling every C++ symbol of libstdc++: ``__cxa_demangle`` (ctypes) against
  one bulk ``c++filt``;
- ``symbol_ranges`` of a python3 process (every mapped object), cold and warm;
- ``--calls-to malloc`` and all call sites of /usr/bin/python3.11 (stripped).

The program comes from tests/targets/many_functions.py, built like the tests'
fentry targets (gcc -O1 -fno-pie -pg -mfentry -mnop-mcount -mrecord-mcount,
linked -no-pie) and cached in tests/_build.  Nothing is asserted: the machine
is shared; the figures are for reading.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import redirect_stdout
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tests' helpers build the program

import numpy as np  # noqa: E402
from sites.conftest import many_functions  # noqa: E402

from textpoke.sites import SiteKind, scan_sites, sites_in_process, symbol_ranges  # noqa: E402
from textpoke.sites.elf import clear_cache, open_elf  # noqa: E402

FENTRY = ("-O1", "-fno-pie", "-pg", "-mfentry", "-mnop-mcount", "-mrecord-mcount")
PYTHON311 = Path("/usr/bin/python3.11")


def median(runs: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def show(label: str, seconds: float, note: str = "") -> None:
    print(f"{label:<64} {seconds * 1000:9.1f} ms  {note}".rstrip(), flush=True)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}


def cli(args: list[str]) -> Callable[[], object]:
    argv = [sys.executable, "-m", "textpoke", "sites", *args]
    return lambda: subprocess.run(argv, env=_env(), stdout=subprocess.DEVNULL, check=True)


def python(code: str) -> Callable[[], object]:
    return lambda: subprocess.run([sys.executable, "-c", code], env=_env(), check=True)


def bench_program(n: int, runs: int) -> None:
    began = time.perf_counter()
    program = many_functions(n, cflags=FENTRY, ldflags=("-no-pie",))
    print(f"program: {program} ({n} functions; built or found in {time.perf_counter() - began:.1f} s)")
    args = [str(program), "--kind", "fentry"]
    show("textpoke sites PROG --kind fentry (end to end)", median(runs, cli(args)))
    show("  of which: import textpoke.cli (every command, today)", median(runs, python("import textpoke.cli")))
    show("  what the sites command itself imports", median(runs, python("import click, textpoke.sites")))
    show("  python3 -c pass (interpreter start)", median(runs, python("pass")))

    def cold_open() -> None:
        clear_cache()
        open_elf(program)

    show("open_elf (cold: symbols, .eh_frame, __mcount_loc, PLT)", median(runs, cold_open))
    image = open_elf(program)
    show("scan_sites(kinds={fentry})", median(runs, lambda: scan_sites(image, kinds={SiteKind.FENTRY})),
         f"{len(scan_sites(image, kinds={SiteKind.FENTRY}).columns)} sites")
    from textpoke.cli import sites as sites_cli

    scan = scan_sites(image, kinds={SiteKind.FENTRY})

    def table() -> None:
        with redirect_stdout(io.StringIO()):
            sites_cli._print_table(sites_cli._Rows(scan, np.arange(len(scan.columns)), None))

    show("format the table of every site", median(runs, table))
    show("scan_sites(kinds={call}, calls_to=['malloc'])",
         median(runs, lambda: scan_sites(image, kinds={SiteKind.CALL}, calls_to=["malloc"])))
    proc = subprocess.Popen([str(program), "wait"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("ready")

        def one_function() -> None:
            sites_in_process(proc.pid, functions=("f1",))

        def one_function_cold() -> None:
            clear_cache()
            one_function()

        show("sites_in_process(pid, functions=('f1',)) (cold ELF cache)", median(runs, one_function_cold))
        show("sites_in_process(pid, functions=('f1',)) (warm)", median(runs, one_function))
        show("sites_in_process(pid, kinds={fentry}) (every site, warm)",
             median(runs, lambda: sites_in_process(proc.pid, kinds={SiteKind.FENTRY})))
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def bench_eh_frame(runs: int) -> None:
    if not PYTHON311.exists():
        print(f"{PYTHON311} is not installed: .eh_frame comparison skipped")
        return
    from textpoke.sites.ehframe import fde_ranges
    from textpoke.sites.elffile import open_file

    with open_file(str(PYTHON311)) as elf:
        eh = elf.section(".eh_frame")
        hdr = elf.section(".eh_frame_hdr")
        assert eh is not None
        data = elf.data(eh)
        header = elf.data(hdr) if hdr is not None else b""
    count = len(fde_ranges(data, eh.addr)[0])
    show(f"textpoke .eh_frame, walking the records ({count} FDEs of python3.11)",
         median(runs, lambda: fde_ranges(data, eh.addr)))
    if header:
        assert hdr is not None
        show("textpoke .eh_frame, through .eh_frame_hdr's table",
             median(runs, lambda: fde_ranges(data, eh.addr, header=header, header_address=hdr.addr)))
    try:
        from elftools.elf.elffile import ELFFile
    except ImportError:
        return

    def pyelftools() -> int:
        with open(PYTHON311, "rb") as f:
            return sum(1 for e in ELFFile(f).get_dwarf_info().EH_CFI_entries() if type(e).__name__ == "FDE")

    show("pyelftools EH_CFI_entries()", median(1, pyelftools), "(1 run)")


def bench_demangle(runs: int) -> None:
    from textpoke.target._ptrace import demangle_many

    library = "/usr/lib/x86_64-linux-gnu/libstdc++.so.6"
    if not Path(library).exists() or shutil.which("nm") is None:
        print("libstdc++ or nm missing: demangling comparison skipped")
        return
    out = subprocess.run(["nm", "-D", "--defined-only", library], capture_output=True, text=True).stdout
    names = [line.split()[-1].split("@")[0] for line in out.splitlines() if line.split()[-1].startswith("_Z")]
    show(f"__cxa_demangle through ctypes ({len(names)} libstdc++ symbols)", median(runs, lambda: demangle_many(names)))
    if shutil.which("c++filt"):
        text = "\n".join(names)
        show("one bulk c++filt",
             median(runs, lambda: subprocess.run(["c++filt"], input=text, capture_output=True, text=True)))


def bench_process(runs: int) -> None:
    python = shutil.which("python3") or sys.executable
    proc = subprocess.Popen([python, "-c", "import ssl, sqlite3, json, sys; print('ready', flush=True); "
                             "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("ready")

        def cold() -> None:
            clear_cache()
            symbol_ranges(proc.pid)

        ranges = symbol_ranges(proc.pid)
        objects = len({m.split("/")[-1] for m in open(f"/proc/{proc.pid}/maps").read().split() if m.startswith("/")})
        show(f"symbol_ranges(python3 pid): {len(ranges.names)} ranges, ~{objects} files (cold)", median(runs, cold))
        show("symbol_ranges(python3 pid) (warm)", median(runs, lambda: symbol_ranges(proc.pid)))
    finally:
        proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()
    if PYTHON311.exists():
        image = open_elf(PYTHON311)
        malloc = scan_sites(image, kinds={SiteKind.CALL}, calls_to=["malloc"])
        show(f"python3.11 --calls-to malloc ({len(malloc.columns)} sites)",
             median(runs, lambda: scan_sites(image, kinds={SiteKind.CALL}, calls_to=["malloc"])))
        every = scan_sites(image, kinds={SiteKind.CALL})
        show(f"python3.11 every call site ({len(every.columns)} in {len(image.table)} functions)",
             median(runs, lambda: scan_sites(image, kinds={SiteKind.CALL})))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--functions", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    bench_program(args.functions, args.runs)
    bench_eh_frame(args.runs)
    bench_demangle(args.runs)
    bench_process(args.runs)


if __name__ == "__main__":
    main()
