"""Benchmark: the function-graph outputs over one big synthetic recording.

    python bench/reports.py [--records N] [--outputs report,graph,folded,ftrace,chrome,html] [--keep FILE]

Writes a function-graph recording of N records (default 100 M) chunk by chunk,
as ``textpoke record`` would (8 threads, each in ``main`` running
``a() { b() { d(); } c(); }`` over and over; ``main`` is cut off by the end),
then runs each output as the CLI does (``python -m textpoke ...`` to
/dev/null) and prints, per output, its wall time, records per second and peak
RSS (``wait4``'s ru_maxrss of that process).  A bounded-memory reader shows
the same RSS at any N.  Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from textpoke.ring import RECORD_DTYPE, Recording, SiteInfo, Symbols  # noqa: E402
from textpoke.ring.file import ChunkKind, RecordingWriter  # noqa: E402

FUNCTIONS = ("main", "a", "b", "c", "d")
THREADS = 8
PER_ITERATION = 8  # a E, b E, d E, d X, b X, c E, c X, a X
ENTER, EXIT = 3, 1
BASE = 1_000_000_000

COMMANDS = {
    "report": ["report", "{file}"],
    "graph": ["graph", "{file}"],
    "folded": ["dump", "{file}", "--format", "folded"],
    "ftrace": ["dump", "{file}", "--format", "ftrace"],
    "chrome": ["dump", "{file}", "--format", "chrome"],
    "html": ["report", "{file}", "--html", "{out}"],
}


def iterations_chunk(first: int, count: int) -> np.ndarray:
    """The records of iterations [first, first + count) of every thread, in time order."""
    t = np.arange(THREADS, dtype=np.int64)[:, None]
    i = np.arange(first, first + count, dtype=np.int64)[None, :]
    start = BASE + 1_000 + 200 * i + t
    d = 3 + i % 5
    times = np.stack([start, start + 10, start + 20, start + 20 + d, start + 40, start + 60, start + 60 + 20 + t,
                      start + 150], axis=-1)
    out = np.zeros(times.size, dtype=RECORD_DTYPE)
    out["ts_ns"] = times.reshape(-1)
    out["tid"] = np.repeat(1000 + np.arange(THREADS), count * PER_ITERATION)
    out["site"] = np.tile(np.array([1, 2, 4, 4, 2, 3, 3, 1], dtype=np.uint32), THREADS * count)
    out["kind"] = np.tile(np.array([ENTER, ENTER, ENTER, EXIT, EXIT, ENTER, EXIT, EXIT], dtype=np.uint8),
                          THREADS * count)
    out["cpu"] = out["tid"] - 1000
    out["caller"] = 0x401010
    return out[np.argsort(out["ts_ns"], kind="stable")]


def write_recording(path: Path, records: int) -> int:
    iterations = max(1, (records - THREADS) // (THREADS * PER_ITERATION))
    sites = tuple(SiteInfo(k, 0x401000 + 0x100 * k, "fentry", name, None) for k, name in enumerate(FUNCTIONS))
    symbols = Symbols.from_ranges((0x401000 + 0x100 * k, 0x401100 + 0x100 * k, n) for k, n in enumerate(FUNCTIONS))
    end = BASE + 1_000 + 200 * iterations + 100
    head = Recording(sites=sites, symbols=symbols, lost=0, pid=1000, command="./bench", start_ns=BASE, end_ns=end,
                     metadata={"graph": True})
    written = 0
    with RecordingWriter(path) as writer:
        writer.write_json(ChunkKind.META, head.head_json())
        mains = np.zeros(THREADS, dtype=RECORD_DTYPE)
        mains["ts_ns"] = BASE + np.arange(THREADS)
        mains["tid"] = 1000 + np.arange(THREADS)
        mains["kind"] = ENTER
        writer.write_records(mains)
        written += THREADS
        step = (1 << 20) // (THREADS * PER_ITERATION)
        for first in range(0, iterations, step):
            chunk = iterations_chunk(first, min(step, iterations - first))
            writer.write_records(chunk)
            written += len(chunk)
        tail = head.tail_json()
        tail["records"] = written
        writer.finish(tail)
    return written


def measure(name: str, path: Path, records: int, scratch: Path) -> None:
    args = [a.format(file=path, out=scratch / "flame.html") for a in COMMANDS[name]]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    started = time.perf_counter()
    with open(os.devnull, "w") as null:
        proc = subprocess.Popen([sys.executable, "-m", "textpoke", *args], stdout=null, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    ok = "" if proc.returncode == 0 else f"  (exit {proc.returncode})"
    print(f"{name:>7}: {wall:8.1f} s  {records / wall / 1e6:6.2f} M records/s  peak RSS "
          f"{usage.ru_maxrss / 1024:7.0f} MiB{ok}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--records", type=float, default=100e6, help="records in the recording (default 100e6)")
    parser.add_argument("--outputs", default="report,graph,folded,ftrace,chrome,html")
    parser.add_argument("--keep", type=Path, help="write the recording here and keep it (reused if it exists)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="textpoke-bench-") as tmp:
        scratch = Path(tmp)
        path = args.keep or scratch / "big.tpk"
        if args.keep and path.exists():
            with Recording.load(path) as rec:
                records = rec.record_count
            print(f"reusing {path}: {records:,} records")
        else:
            started = time.perf_counter()
            records = write_recording(path, int(args.records))
            print(f"wrote {records:,} records ({path.stat().st_size / 2**20:,.0f} MiB on disk) in "
                  f"{time.perf_counter() - started:.1f} s", flush=True)
        for name in args.outputs.split(","):
            measure(name.strip(), path, records, scratch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
