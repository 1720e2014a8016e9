"""Benchmark: textpoke on large, real programs, every site at once.

    python bench/large.py [--seconds 3] [--only python,lua,select] [--keep DIR]

1. python: Debian's /usr/bin/python3 (stripped, unmodified) running a script that
   does real work (json, regular expressions, zlib, sha256, sorting), traced with
   ``textpoke trace -p PID --calls-to '*'``: every call site of the main executable
   at once, for a few seconds, then restored.
2. lua: Lua 5.2, whose source Debian ships in the package librust-lua52-sys-dev
   (fetched with ``apt-get download`` into tests/_build/large/, extracted there,
   never committed), built with the README's fentry recipe, running a script that
   does real work (string formatting, sorting, pattern matching, hashing), traced
   with ``textpoke trace -p PID -f '*'`` (entries and exits of every function).
3. select: what choosing the sites costs end to end on a program of 20,000 fentry
   functions that 2 threads call in turn (generated here, built with the tests'
   fentry flags): ``textpoke sites PROG --kind fentry``, and ``textpoke trace -p PID
   -f f1`` / ``-f '*'`` with ``--count --duration 0.5``, each a new process (wall
   time minus the duration), first attach (installs the resident part) and later ones.

For 1 and 2, each program runs twice, traced once with ``--count`` (calls counted
per site) and once recording (``-o FILE``, zstd); the CLI runs in this process (its
``main``), with Session.apply and Session.revert timed. The program prints one line
per unit of work; the bench timestamps the lines as they arrive, so the rate before,
while and after tracing is measured in the program's own output, and that output is
then compared, line for line, with an untraced run of the same units: it must be the
same. Lines: sites, apply ms, revert ms, the program's rate (units/s) before, while
traced and after (slowdown = before/while), calls or records and their rate, the
recording's size, and ``textpoke report``'s time over it (a new process).

Nothing is asserted but the program's output (exit status 1 if it changed); the
machine is shared and the figures are for reading.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "tests" / "_build" / "large"
sys.path.insert(0, str(ROOT / "tests"))  # conftest.compile_c: the tests' fentry build

FENTRY = ("-O2", "-g", "-fno-pie", "-pg", "-mfentry", "-mnop-mcount", "-mrecord-mcount")  # the README's recipe
PYTHON = Path("/usr/bin/python3")
LUA_PACKAGE = "librust-lua52-sys-dev"

PY_WORK = r'''
import hashlib, json, os, re, sys, zlib

def work(i):
    data = [{"id": k, "name": f"item{k * 7919 % 1000}", "tags": [str(k % 13), str(k % 7)]}
            for k in range(i % 50, i % 50 + 200)]
    text = json.dumps(data, sort_keys=True)
    total = sum(int(w) for w in re.findall(r"item(\d+)", text))
    packed = zlib.compress(text.encode())
    digest = hashlib.sha256(packed).hexdigest()[:16]
    first = sorted(data, key=lambda d: (d["name"], -d["id"]))[0]["id"]
    return f"{i} {total} {len(packed)} {digest} {first}"

stop, count = sys.argv[1], int(sys.argv[2])
i = 0
while count < 0 or i < count:
    print(work(i), flush=True)
    i += 1
    if count < 0 and i % 20 == 0 and os.path.exists(stop):
        break
'''

LUA_WORK = r'''
local stop, count = arg[1], tonumber(arg[2])
io.stdout:setvbuf("line")
local function work(i)
  local t = {}
  for k = 1, 300 do t[k] = string.format("item%05d", (k * 7919 + i) % 100000) end
  table.sort(t)
  local s = table.concat(t, ",")
  local n = 0
  for w in s:gmatch("item(%d+)") do n = n + tonumber(w) end
  local h = 0
  for c = 1, #s, 7 do h = (h * 31 + s:byte(c)) % 4294967296 end
  local up = s:sub(1, 40):upper():gsub("ITEM", "i")
  return string.format("%d %d %d %s %s", i, n, h, t[1], up)
end
local i = 0
while count < 0 or i < count do
  print(work(i))
  i = i + 1
  if count < 0 and i % 20 == 0 then
    local f = io.open(stop, "r")
    if f then f:close(); break end
  end
end
'''


def _env() -> dict[str, str]:
    """A new Python process as an installed textpoke runs: this checkout first, byte code cached."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(BUILD / "pycache")
    return env


# ---------------------------------------------------------------------------
# The programs
# ---------------------------------------------------------------------------


def lua_binary() -> Path | None:
    """Lua 5.2 built with the README's fentry recipe from the source Debian ships (cached)."""
    binary = BUILD / "lua52-fentry"
    if binary.exists():
        return binary
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        print(f"lua: apt-get/dpkg-deb missing: cannot fetch {LUA_PACKAGE}; skipped")
        return None
    BUILD.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=BUILD) as tmp:
        got = subprocess.run(["apt-get", "download", LUA_PACKAGE], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("*.deb"))
        if not debs:
            print(f"lua: `apt-get download {LUA_PACKAGE}` failed ({got.stderr.strip()[-200:]}); skipped")
            return None
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), tmp], check=True)
        src = next(Path(tmp).glob("usr/share/cargo/registry/lua52-sys-*/lua/src"))
        sources = sorted(str(p) for p in src.glob("*.c") if p.name != "luac.c")
        subprocess.run(["gcc", *FENTRY, "-DLUA_COMPAT_ALL", "-DLUA_USE_POSIX", "-DLUA_USE_DLOPEN", *sources,
                        "-o", str(binary) + ".tmp", "-no-pie", "-lm", "-ldl"], check=True)
        os.rename(str(binary) + ".tmp", binary)
    return binary


def busy_program(n: int) -> Path:
    """``n`` fentry functions that 2 threads call in turn, forever (the issue's selection program)."""
    from conftest import compile_c

    lines = ["#include <pthread.h>", "#include <stdio.h>", "#include <unistd.h>",
             "#define KEEP __attribute__((noinline, noipa))"]
    lines += [f"KEEP long f{i}(long x) {{ return x + {i % 7}; }}" for i in range(n)]
    lines.append("static long (*const table[])(long) = {" + ",".join(f"f{i}" for i in range(n)) + "};")
    lines.append(r"""
static volatile long sink;
static void *worker(void *arg) {
    for (;;) { long s = 0; for (int i = 0; i < (int)(sizeof table / sizeof *table); i++) s += table[i](i); sink = s; }
    return arg;
}
int main(void) {
    pthread_t t[2];
    for (int i = 0; i < 2; i++) pthread_create(&t[i], 0, worker, 0);
    printf("ready %d\n", getpid());
    fflush(stdout);
    for (;;) pause();
}""")
    BUILD.mkdir(parents=True, exist_ok=True)
    source = BUILD / f"busy_{n}.c"
    text = "\n".join(lines) + "\n"
    if not source.exists() or source.read_text() != text:
        source.write_text(text)
    return compile_c(source, opt="-O1", name=f"busy_{n}")


# ---------------------------------------------------------------------------
# A traced program
# ---------------------------------------------------------------------------


class Worker:
    """A program printing one line per unit of work until a stop file appears; its lines timestamped."""

    def __init__(self, argv: list[str], stop: Path) -> None:
        self.stop = stop
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def finish(self) -> list[str]:
        self.stop.touch()
        self.proc.wait(timeout=60)
        self._reader.join(timeout=60)
        if self.proc.returncode != 0:
            raise RuntimeError(f"the program failed ({self.proc.returncode}): {self.proc.stderr.read()[-500:]}")
        return [line for _, line in self.lines]

    def rate(self, start: float, end: float) -> float:
        """Units per second between two CLOCK_MONOTONIC times."""
        done = sum(1 for at, _ in self.lines if start <= at < end)
        return done / max(end - start, 1e-9)


@dataclass
class Timed:
    applies: list[tuple[int, float]] = field(default_factory=list)  # (sites, seconds)
    reverts: list[tuple[int, float]] = field(default_factory=list)


def _timing() -> tuple[Timed, callable]:
    """Time every Session.apply and Session.revert made meanwhile (the CLI runs in this process)."""
    from textpoke.poke.session import Session

    timed = Timed()
    apply, revert = Session.apply, Session.revert

    def timed_apply(self, patches, **kwargs):
        began = time.perf_counter()
        result = apply(self, patches, **kwargs)
        timed.applies.append((len(result.patched), time.perf_counter() - began))
        return result

    def timed_revert(self, **kwargs):
        began = time.perf_counter()
        result = revert(self, **kwargs)
        timed.reverts.append((len(result.patched), time.perf_counter() - began))
        return result

    Session.apply, Session.revert = timed_apply, timed_revert

    def undo() -> None:
        Session.apply, Session.revert = apply, revert

    return timed, undo


def run_cli(args: list[str]) -> int:
    from textpoke.cli import main

    devnull = os.open(os.devnull, os.O_WRONLY)
    saved = os.dup(1)
    os.dup2(devnull, 1)
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)
    return code


def mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def rate(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e3 else f"{n:.0f}"


def traced(name: str, argv: list[str], selection: list[str], seconds: float, tmp: Path, *,
           reference: list[str]) -> bool:
    """Run the program twice (count, then record), tracing it with ``selection``; print the lines."""
    from textpoke.ring.recording import Recording

    ok = True
    for mode in ("count", "record"):
        stop = tmp / f"stop-{name}-{mode}"
        out = tmp / f"{name}.tpk"
        worker = Worker([*argv, str(stop), "-1"], stop)
        time.sleep(2.0)  # warm up, then one second of rate before
        began = time.monotonic()
        timed, undo = _timing()
        try:
            args = ["trace", "-p", str(worker.proc.pid), *selection, "--duration", str(seconds)]
            args += ["--count"] if mode == "count" else ["-o", str(out)]
            code = run_cli(args)
        finally:
            undo()
        ended = time.monotonic()
        time.sleep(1.5)
        lines = worker.finish()
        before = worker.rate(began - 1.0, began)
        after_rate = worker.rate(ended + 0.2, ended + 1.2)
        if code != 0 or not timed.applies:
            print(f"{name} {mode}: textpoke exited {code}")
            return False
        recording = Recording.load(out) if mode == "record" else None
        sites, apply_s = max(timed.applies)
        revert_s = max((s for _, s in timed.reverts), default=0.0)
        # The traced interval: from the batch's end to the revert's start, as the program saw it.
        during = worker.rate(began + 0.5, ended - 0.5) if ended - began > 1.5 else worker.rate(began, ended)
        expected = reference_lines(argv, len(lines), reference)
        same = lines == expected
        ok &= same
        line = (f"{name:<6} {mode:<6} sites {sites:>6,}  apply {apply_s * 1e3:7.1f} ms  revert {revert_s * 1e3:7.1f} ms"
                f"  rate before {before:7.1f}/s while {during:7.1f}/s after {after_rate:7.1f}/s"
                f"  slowdown {before / max(during, 1e-9):5.2f}x  output {'unchanged' if same else 'CHANGED'}"
                f" ({len(lines)} lines)")
        if recording is not None:
            secs = max(recording.end_ns - recording.start_ns, 1) / 1e9
            size = out.stat().st_size
            records, lost = recording.record_count, recording.lost
            recording.close()
            began_report = time.perf_counter()
            with open(tmp / f"{name}.txt", "w") as report:
                subprocess.run([sys.executable, "-m", "textpoke", "report", str(out)], env=_env(), check=True,
                               stdout=report)
            report_s = time.perf_counter() - began_report
            line += (f"\n{'':<13} records {records:,} in {secs:.1f} s ({rate(records / secs)}/s, lost "
                     f"{lost}), file {mib(size)} ({size / max(records, 1):.1f} B/record), "
                     f"report {report_s:.1f} s ({rate(records / report_s)} records/s)")
            out.unlink()
        print(line, flush=True)
    return ok


_REFERENCES: dict[str, list[str]] = {}


def reference_lines(argv: list[str], count: int, _: list[str]) -> list[str]:
    """The program's first ``count`` lines, untraced."""
    key = " ".join(argv)
    have = _REFERENCES.get(key, [])
    if len(have) < count:
        done = subprocess.run([*argv, "/nonexistent", str(count)], capture_output=True, text=True, check=True)
        have = done.stdout.splitlines()
        _REFERENCES[key] = have
    return have[:count]


# ---------------------------------------------------------------------------
# Selection, end to end
# ---------------------------------------------------------------------------


def wall(argv: list[str]) -> float:
    began = time.perf_counter()
    subprocess.run(argv, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - began


def select(runs: int) -> None:
    program = busy_program(20_000)
    cli = [sys.executable, "-m", "textpoke"]
    wall([*cli, "--help"])  # byte code cached, as an installed textpoke has it
    sites = statistics.median(wall([*cli, "sites", str(program), "--kind", "fentry"]) for _ in range(runs))
    print(f"select: textpoke sites PROG --kind fentry (20,000 functions): {sites * 1e3:.0f} ms (median of {runs})")
    goals = [("sites PROG < 0.5 s", sites, 0.5)]
    for glob, limit in (("f1", 0.3), ("*", 1.0)):
        proc = subprocess.Popen([str(program)], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdout.readline().startswith("ready")
            trace = [*cli, "trace", "-p", str(proc.pid), "-f", glob, "--count", "--duration", "0.5"]
            first = wall(trace)  # installs the resident part
            later = statistics.median(wall(trace) for _ in range(runs))
        finally:
            proc.kill()
            proc.wait()
        print(f"select: trace -f {glob!r:<5} --count --duration 0.5: first attach {first * 1e3:.0f} ms "
              f"(adds {(first - 0.5) * 1e3:.0f} ms), later ones {later * 1e3:.0f} ms (adds {(later - 0.5) * 1e3:.0f} ms, "
              f"median of {runs})", flush=True)
        goals.append((f"trace -f {glob!r} adds < {limit:g} s (a later attach)", later - 0.5, limit))
    for what, took, limit in goals:
        print(f"goal: {what:<40} {'MET' if took < limit else 'NOT MET':<8} {took * 1e3:.0f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="how long each trace runs")
    parser.add_argument("--only", default="python,lua,select", help="comma-separated parts to run")
    parser.add_argument("--runs", type=int, default=3, help="repetitions of each selection measurement")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    ok = True
    BUILD.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=BUILD) as tmpdir:
        tmp = Path(tmpdir)
        if "python" in parts:
            script = tmp / "work.py"
            script.write_text(PY_WORK)
            from textpoke.sites import SiteKind, scan_sites
            from textpoke.sites.elf import open_elf

            calls = len(scan_sites(open_elf(PYTHON.resolve()), kinds={SiteKind.CALL}).columns)
            print(f"python: {PYTHON.resolve()} (Debian's, stripped): {calls:,} call sites in the main executable")
            ok &= traced("python", [str(PYTHON), str(script)], ["--calls-to", "*"], args.seconds, tmp, reference=[])
        if "lua" in parts:
            lua = lua_binary()
            if lua is not None:
                script = tmp / "work.lua"
                script.write_text(LUA_WORK)
                print(f"lua: {lua} (Lua 5.2 from Debian's {LUA_PACKAGE}, fentry build)")
                ok &= traced("lua", [str(lua), str(script)], ["-f", "*"], args.seconds, tmp, reference=[])
        if "select" in parts:
            select(args.runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
