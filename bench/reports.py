"""Benchmark: the function-graph outputs over one big synthetic recording.

    python bench/reports.py [--records N] [--shape loop|nested] [--outputs report,threads,graph,...]
                            [--keep FILE] [--against SRC]

Writes a function-graph recording of N records (default 100 M) chunk by chunk,
as ``textpoke record`` would, in one of two shapes:

- ``loop`` (the default): 8 threads, each in ``main`` running
  ``a() { b() { d(); } c(); }`` over and over; ``main`` is cut off by the end;
- ``nested``: 4 threads running random call trees 1 to 20 deep (recursion,
  longjmps that unwind several frames, entry-only calls); two threads are in
  ``main`` (cut off by the end), two were already deep inside calls when the
  recording began (exits without entries); every thread is cut off mid-tree
  by the end; chunks are runs per thread, as drains write them.

Then it runs each output as the CLI does (``python -m textpoke ...``, its output
hashed, then deleted) and prints, per output, its wall time, records per second and peak
RSS (``wait4``'s ru_maxrss of that process, run under a small launcher: a process started
by the bench itself would inherit the bench's own high-water mark) and CPU time (user + system, all
its threads: on a machine others are busy on, the figure that does not depend
on them).  A bounded-memory reader shows the same RSS at any N.  ``--against
REV`` runs each output with the sources of a git revision too (or of a source
directory: ``--against /path/to/src``), side by side, and says whether both
printed the same, e.g. before/after a change to the reporters::

    python bench/reports.py --shape nested --records 10e6 --outputs report,graph --against main
    python bench/reports.py --shape nested --records 100e6 --outputs report --keep /tmp/n100.tpk

Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
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
    "threads": ["report", "{file}", "--threads"],
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


# -- the nested shape ----------------------------------------------------------------------
NESTED_FUNCTIONS = ("main", "fib", "longjmp_target", *(f"f{k}" for k in range(12)))
NESTED_THREADS = 4
CALL, UNWOUND = 0, 2
FIB, JMP = 1, 2
#: Records per thread per chunk (4 runs, one per thread, make a chunk of ~1 M records).
PER_THREAD_CHUNK = 240_000


def call_tree(rng: np.random.Generator, size: int) -> np.ndarray:
    """(gap ns, kind, site) rows of one random call tree of about ``size`` records,
    from depth 0 back to depth 0: up to 20 deep, ``fib`` recursing, longjmps out of
    ``longjmp_target``'s callees (1 to 4 frames UNWOUND at once), entry-only calls."""
    rows: list[tuple[int, int, int]] = []
    stack: list[int] = []
    while len(rows) < size or stack:
        gap = int(rng.integers(1, 40))
        if not stack or (len(stack) < 20 and len(rows) < size and rng.random() < 0.55 - 0.02 * len(stack)):
            site = FIB if stack and stack[-1] == FIB and rng.random() < 0.7 else int(rng.integers(1, len(NESTED_FUNCTIONS)))
            stack.append(site)
            rows.append((gap, ENTER, site))
        elif JMP in stack[:-1] and rng.random() < 0.01:
            k = len(stack) - 1 - stack[::-1].index(JMP)  # unwind down to longjmp_target
            for site in stack[:k:-1][:4]:
                rows.append((gap, UNWOUND, site))
                gap = 0
            del stack[max(k + 1, len(stack) - 4):]
        elif rng.random() < 0.01:
            rows.append((gap, CALL, int(rng.integers(3, len(NESTED_FUNCTIONS)))))
        else:
            rows.append((gap, EXIT, stack.pop()))
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


class Thread:
    """One thread's endless stream of call trees, handed out a time window at a time."""

    def __init__(self, tid: int, trees: list[np.ndarray], rng: np.random.Generator, *, in_main: bool) -> None:
        self.tid, self.trees, self.rng = tid, trees, rng
        self.clock = BASE + tid % 16
        self.pending = np.zeros((0, 3), dtype=np.int64)  # ts, kind, site
        if in_main:
            self.pending = np.array([[self.clock, ENTER, 0]], dtype=np.int64)
        else:  # already inside a tree when the recording began: its exits have no entries
            first = trees[0]
            self._extend(first[int(np.argmax(np.cumsum(np.where(first[:, 1] == ENTER, 1, -1)) > 5)) + 1:])

    def _extend(self, rows: np.ndarray) -> None:
        ts = self.clock + np.cumsum(rows[:, 0])
        self.clock = int(ts[-1])
        self.pending = np.concatenate([self.pending, np.stack([ts, rows[:, 1], rows[:, 2]], axis=1)])

    def until(self, end_ns: int) -> np.ndarray:
        """Its records before ``end_ns`` (RECORD_DTYPE), in time order."""
        while self.clock < end_ns:
            picks = self.rng.integers(0, len(self.trees), 16)
            self._extend(np.concatenate([self.trees[i] for i in picks.tolist()]))
        cut = int(np.searchsorted(self.pending[:, 0], end_ns))
        rows, self.pending = self.pending[:cut], self.pending[cut:]
        out = np.zeros(len(rows), dtype=RECORD_DTYPE)
        out["ts_ns"], out["kind"], out["site"] = rows[:, 0], rows[:, 1], rows[:, 2]
        out["tid"], out["cpu"], out["caller"] = self.tid, self.tid % 16, 0x401010
        return out


def write_nested(path: Path, records: int) -> int:
    rng = np.random.default_rng(10)
    trees = [call_tree(rng, int(rng.integers(200, 3000))) for _ in range(64)]
    threads = [Thread(2000 + t, trees, rng, in_main=t < 2) for t in range(NESTED_THREADS)]
    mean_gap = float(np.mean(np.concatenate([tree[:, 0] for tree in trees])))
    window = int(PER_THREAD_CHUNK * mean_gap)
    sites = tuple(SiteInfo(k, 0x401000 + 0x100 * k, "fentry", n, None) for k, n in enumerate(NESTED_FUNCTIONS))
    symbols = Symbols.from_ranges((0x401000 + 0x100 * k, 0x401100 + 0x100 * k, n)
                                  for k, n in enumerate(NESTED_FUNCTIONS))
    written, end = 0, BASE
    with RecordingWriter(path) as writer:
        head = Recording(sites=sites, symbols=symbols, lost=0, pid=2000, command="./nested", start_ns=BASE,
                         end_ns=BASE, metadata={"graph": True})
        writer.write_json(ChunkKind.META, head.head_json())
        while written < records:
            end += window
            runs = [thread.until(end) for thread in threads]  # a drain: one run per buffer
            chunk = np.concatenate(runs)[: records - written]
            writer.write_records(chunk)
            written += len(chunk)
        tail = head.tail_json()
        tail.update(records=written, end_ns=end)
        writer.finish(tail)
    return written


#: Runs argv (stdout to the file argv[1]) and writes its wait4 figures to argv[2]. The output
#: runs under this small process, not under the bench: a child's peak RSS starts at its
#: parent's RSS when it execs (the kernel carries the old image's high-water mark over), and
#: the bench holds the recording it wrote (pages of hundreds of MiB) when it starts one.
_LAUNCH = """
import json, os, sys
with open(sys.argv[1], "wb") as out:
    pid = os.fork()
    if pid == 0:
        os.dup2(out.fileno(), 1)
        os.execv(sys.argv[3], sys.argv[3:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[2], "w") as f:
    json.dump([os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime, usage.ru_maxrss], f)
"""


def measure(name: str, path: Path, records: int, scratch: Path, src: Path, label: str) -> str:
    """Run one output with the sources in ``src``; print its figures, return a digest of what it printed."""
    args = [a.format(file=path, out=scratch / "flame.html") for a in COMMANDS[name]]
    env = {**os.environ, "PYTHONPATH": str(src)}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", _LAUNCH, str(scratch / "out"), str(scratch / "usage"),
                    sys.executable, "-m", "textpoke", *args], env=env, check=True)
    wall = time.perf_counter() - started
    code, cpu, rss_kb = json.loads((scratch / "usage").read_text())
    ok = "" if code == 0 else f"  (exit {code})"
    print(f"{name:>7}: {wall:6.1f} s  {records / wall / 1e6:6.2f} M records/s  cpu {cpu:6.1f} s  peak RSS "
          f"{rss_kb / 1024:5.0f} MiB  ({label}){ok}", flush=True)
    digest = hashlib.sha256()
    for part in (scratch / "out", scratch / "flame.html"):
        if part.exists():
            with open(part, "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
            part.unlink()
    return digest.hexdigest()


def sources(against: str, scratch: Path) -> Path:
    """A source directory, or the src/ of a git revision of this repository (exported)."""
    if Path(against).is_dir():
        return Path(against)
    tree = scratch / "against"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", against, "src"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree / "src"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--records", type=float, default=100e6, help="records in the recording (default 100e6)")
    parser.add_argument("--shape", choices=("loop", "nested"), default="loop")
    parser.add_argument("--outputs", default="report,threads,graph,folded,ftrace,chrome,html")
    parser.add_argument("--keep", type=Path, help="write the recording here and keep it (reused if it exists)")
    parser.add_argument("--against", help="also run each output with this git revision's sources (or this src/)")
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
            write = write_nested if args.shape == "nested" else write_recording
            records = write(path, int(args.records))
            print(f"wrote {records:,} records ({path.stat().st_size / 2**20:,.0f} MiB on disk) in "
                  f"{time.perf_counter() - started:.1f} s", flush=True)
        other = sources(args.against, scratch) if args.against else None
        for name in args.outputs.split(","):
            mine = measure(name.strip(), path, records, scratch, ROOT / "src", "this tree")
            if other is not None:
                theirs = measure(name.strip(), path, records, scratch, other, args.against)
                print(f"{'':>9}{'same output' if mine == theirs else 'OUTPUTS DIFFER'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
