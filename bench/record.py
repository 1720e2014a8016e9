"""Benchmark: recording threads that call a traced function flat out, side by side.

    python bench/record.py [--seconds S] [--long S]

One program (tests/targets/hot.c, built here with the fentry flags) runs T
threads (T = 1, 2, 4) that call ``work(i)`` as fast as they can for S seconds
(default 2) and print their own counts and elapsed time. Per T, in one run:

- untraced: calls/s of the program alone;
- ``textpoke record -f work`` (lossless, entries and exits: the default): the
  program's calls/s while traced, records kept and lost (0 expected), textpoke's
  peak RSS, file bytes per record;
- ``textpoke record --entry-only``: the same with entry records only;
- ``textpoke record --drop``: calls/s and the share of records lost;
- ``textpoke record --no-compress``: the same as the default, records written raw;
- ``uftrace record -P ^work$`` (entries and exits) and ``uftrace record -e`` (entries
  only), dynamic patching of the same nop5, when uftrace is installed: calls/s,
  calls in its report.

Every textpoke row is checked: records + lost equals the program's own count of
calls (twice it with exits).
``--long S`` adds one S-second run of 4 threads (the issue asks for 60): RSS,
records, file size, and the time ``textpoke report`` takes to read it back.
Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import TARGETS, compile_c  # noqa: E402

from textpoke.ring import Recording  # noqa: E402


@dataclass
class Run:
    calls: int
    seconds: float
    records: int | None = None
    lost: int | None = None
    rss_mb: float | None = None
    per_call: int = 1
    file_bytes: int | None = None
    wall: float = 0.0

    @property
    def rate(self) -> float:
        return self.calls / self.seconds


def program_run(stdout: str) -> Run:
    total = int(re.search(r"^total (\d+)", stdout, re.M).group(1))
    elapsed = int(re.search(r"^elapsed (\d+)", stdout, re.M).group(1)) / 1e9
    return Run(calls=total, seconds=elapsed)


def measured(argv: list[str]) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run argv in a small wrapper that reports the peak RSS of its children (MB) and wall time."""
    script = (
        "import json, resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "wall = time.perf_counter() - t\n"
        "sys.stderr.write(r.stderr)\n"
        "print(json.dumps([r.returncode, r.stdout, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, wall]))\n"
    )
    import json

    proc = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=3600)
    code, stdout, rss_kb, wall = json.loads(proc.stdout.splitlines()[-1])
    return subprocess.CompletedProcess(argv, code, stdout, proc.stderr), rss_kb / 1024, wall


def textpoke_run(hot: Path, seconds: float, threads: int, out: Path, *extra: str) -> Run:
    per_call = 1 if "--entry-only" in extra else 2
    argv = [sys.executable, "-m", "textpoke", "record", "-f", "work", "-o", str(out), *extra, "--",
            str(hot), f"s{seconds}", str(threads)]
    result, rss, wall = measured(argv)
    if result.returncode != 0:
        raise SystemExit(f"textpoke record failed: {result.stderr.strip()}")
    run = program_run(result.stdout)
    with Recording.load(out) as recording:
        run.records, run.lost = recording.record_count, recording.lost
    run.per_call = per_call
    if run.records + run.lost != run.calls * per_call:
        raise SystemExit(f"records {run.records} + lost {run.lost} != {per_call} per call x {run.calls} calls")
    run.rss_mb, run.file_bytes, run.wall = rss, out.stat().st_size, wall
    return run


def uftrace_run(hot: Path, seconds: float, threads: int, tmp: Path, *extra: str) -> Run | str:
    uftrace = shutil.which("uftrace")
    if uftrace is None:
        return "not installed"
    data = tmp / "uftrace.data"
    shutil.rmtree(data, ignore_errors=True)
    result = subprocess.run([uftrace, "record", *extra, "-P", "^work$", "-d", str(data), "--", str(hot),
                             f"s{seconds}", str(threads)], capture_output=True, text=True, timeout=600)
    if result.returncode != 0 or "total" not in result.stdout:
        return f"failed: {result.stderr.strip()[:120]}"
    run = program_run(result.stdout)
    report = subprocess.run([uftrace, "report", "-d", str(data), "-f", "call", "--no-pager"],
                            capture_output=True, text=True, timeout=600)
    m = re.search(r"^\s*(\d+)\s+work\s*$", report.stdout, re.M)
    run.records = int(m.group(1)) if m else None  # calls, as its report counts them
    run.file_bytes = sum(f.stat().st_size for f in data.iterdir())
    return run


def line(label: str, run: Run | str, untraced: Run | None) -> str:
    if isinstance(run, str):
        return f"  {label:<22} {run}"
    parts = [f"{run.rate / 1e6:8.2f} M calls/s"]
    if untraced is not None:
        parts.append(f"{run.rate / untraced.rate:6.3f}x untraced")
    if run.records is not None and run.lost is not None:
        parts.append(f"{run.records:>12,} records, {run.lost:,} lost "
                     f"({100 * run.lost / max(run.calls * run.per_call, 1):.1f}%)")
    elif run.records is not None:
        parts.append(f"{run.records:>12,} calls reported, {run.calls - run.records:,} missing")
    if run.rss_mb is not None:
        parts.append(f"RSS {run.rss_mb:4.0f} MB")
    if run.file_bytes is not None and run.records:
        unit = "record" if run.lost is not None else "call"
        parts.append(f"{run.file_bytes / run.records:5.1f} bytes/{unit}")
    return f"  {label:<22} " + ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds each run calls flat out")
    parser.add_argument("--long", type=float, default=0.0, help="add one run this long (4 threads)")
    args = parser.parse_args()
    hot = compile_c(TARGETS / "hot.c")
    started = time.monotonic()
    print(f"textpoke record vs untraced vs uftrace: T threads call a traced function flat out for "
          f"{args.seconds:g} s; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp_name:
        tmp = Path(tmp_name)
        for threads in (1, 2, 4):
            plain = subprocess.run([str(hot), f"s{args.seconds}", str(threads)], capture_output=True, text=True)
            untraced = program_run(plain.stdout)
            print(f"T={threads}")
            print(line("untraced", untraced, None))
            print(line("textpoke (default)", textpoke_run(hot, args.seconds, threads, tmp / "l.tpk"), untraced))
            print(line("textpoke --entry-only", textpoke_run(hot, args.seconds, threads, tmp / "e.tpk",
                                                           "--entry-only"), untraced))
            print(line("textpoke --drop", textpoke_run(hot, args.seconds, threads, tmp / "d.tpk", "--drop"),
                       untraced))
            print(line("textpoke --no-compress", textpoke_run(hot, args.seconds, threads, tmp / "n.tpk",
                                                            "--no-compress"), untraced))
            print(line("uftrace record", uftrace_run(hot, args.seconds, threads, tmp), untraced))
            print(line("uftrace record -e", uftrace_run(hot, args.seconds, threads, tmp, "-e"), untraced))
            for f in tmp.iterdir():
                if f.is_file():
                    f.unlink()
        if args.long:
            out = tmp / "long.tpk"
            run = textpoke_run(hot, args.long, 4, out)
            print(f"long run, 4 threads, {args.long:g} s:")
            print(line("textpoke (default)", run, None))
            t = time.perf_counter()
            report = subprocess.run([sys.executable, "-m", "textpoke", "report", str(out)], capture_output=True,
                                    text=True)
            took = time.perf_counter() - t
            ok = f"{run.records:,} records" in report.stdout
            print(f"  textpoke report of {run.records:,} records ({run.file_bytes / 2**30:.2f} GiB): {took:.1f} s "
                  f"({run.records / took / 1e6:.1f} M records/s){'' if ok else ' (REPORT DISAGREES)'}")
    print(f"({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
