"""Every output of a function-graph recording, over the synthetic program whose
every number is known (tests/report/synth.py): exact rows, golden text, and the
same output whatever the chunking."""

from __future__ import annotations

import io
import json
import re
import time

import numpy as np
import pytest

from textpoke.report import (
    ChromeReporter,
    FoldedReporter,
    FtraceReporter,
    GraphReporter,
    JsonLinesReporter,
    TimedReporter,
    TimeKey,
    is_graph_recording,
    summarize_times,
)
from textpoke.report._text import duration_text
from textpoke.report.funcgraph import duration_cell

from .synth import END, EXPECTED, PROGRAM, Chunked, big_program, program, recording


def table(text: str) -> list[list[str]]:
    """The rows of the last table in ``text``, cells split on two or more spaces."""
    lines = text.splitlines()
    start = max(i for i, line in enumerate(lines) if line.split()[:2] == ["total", "self"])
    rows = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
    return rows


def render(reporter, recording) -> str:
    out = io.StringIO()
    reporter.render(recording, out)
    return out.getvalue()


REPORT = '''\
pid 100  command ./prog -v
duration 0.000 s, 30 records, 0 lost, 14 sites (14 fentry)
frames: 16 (9 returned, 4 unwound, 2 cut off by the end, 1 cut off by the start); 1 call entry-only
  unwound: left without a return (longjmp, exception, thread exit); timed to when the tracer saw it: an upper bound
  cut off by the end: still running when the recording ended; timed to its end: a lower bound
  cut off by the start: running when the recording began (an exit, no entry); not timed
  entry-only: calls recorded without their exit (a shadow stack was full 1 time, or call sites): counted, not timed

      total      self        avg        min        max  calls  function     notes
  10.000 us  2.600 us  10.000 us  10.000 us  10.000 us      1  main         1 cut off by the end
   8.000 us  8.000 us   8.000 us   8.000 us   8.000 us      1  idle
   4.000 us  4.000 us   4.000 us   4.000 us   4.000 us      1  emit         1 cut off by the end
   1.400 us    700 ns   1.400 us   1.400 us   1.400 us      1  parse
   1.000 us  1.000 us     500 ns     100 ns   1.000 us      3  fib
   1.000 us    600 ns   1.000 us   1.000 us   1.000 us      1  run
     700 ns    700 ns     350 ns     300 ns     400 ns      3  lex          1 entry-only
     600 ns    100 ns     600 ns     600 ns     600 ns      1  thread_fn    1 unwound
     500 ns    500 ns     500 ns     500 ns     500 ns      1  inner        1 unwound
     500 ns    500 ns     500 ns     500 ns     500 ns      1  work
     400 ns    100 ns     400 ns     400 ns     400 ns      1  deep1        1 unwound
     300 ns    300 ns     300 ns     300 ns     300 ns      1  deep2        1 unwound
          -         -          -          -          -      0  worker_loop  1 cut off by the start

  1 traced function never called
'''

GRAPH = '''\
pid 100  command ./prog -v
duration 0.000 s, 30 records, 0 lost, 14 sites (14 fentry)
frames: 16 (9 returned, 4 unwound, 2 cut off by the end, 1 cut off by the start); 1 call entry-only
  unwound: left without a return (longjmp, exception, thread exit); timed to when the tracer saw it: an upper bound
  cut off by the end: still running when the recording ended; timed to its end: a lower bound
  cut off by the start: running when the recording began (an exit, no entry); not timed
  entry-only: calls recorded without their exit (a shadow stack was full 1 time, or call sites): counted, not timed

call graph: time per call path (threads merged)
      total      self  calls  call path
  10.000 us  2.600 us      1  main  (1 cut off by the end)
   4.000 us  4.000 us      1  +- emit  (1 cut off by the end)
          -         -      1  |  `- lex  (1 entry-only)
   1.400 us    700 ns      1  +- parse
     700 ns    700 ns      2  |  `- lex
   1.000 us    600 ns      1  +- fib
     400 ns    300 ns      1  |  `- fib
     100 ns    100 ns      1  |     `- fib
   1.000 us    600 ns      1  `- run
     400 ns    100 ns      1     `- deep1  (1 unwound)
     300 ns    300 ns      1        `- deep2  (1 unwound)
   8.000 us  8.000 us      1  idle
     600 ns    100 ns      1  thread_fn  (1 unwound)
     500 ns    500 ns      1  `- inner  (1 unwound)
     500 ns    500 ns      1  work
'''

GRAPH_FIB = '''\
pid 100  command ./prog -v
duration 0.000 s, 30 records, 0 lost, 14 sites (14 fentry)
frames: 16 (9 returned, 4 unwound, 2 cut off by the end, 1 cut off by the start); 1 call entry-only
  unwound: left without a return (longjmp, exception, thread exit); timed to when the tracer saw it: an upper bound
  cut off by the end: still running when the recording ended; timed to its end: a lower bound
  cut off by the start: running when the recording began (an exit, no entry); not timed
  entry-only: calls recorded without their exit (a shadow stack was full 1 time, or call sites): counted, not timed

call graph of fib: every call path through it, merged at it (threads merged)
1 call path leads to fib:
     total  calls  path
  1.000 us      1  main > fib

     total    self  calls  call path
  1.000 us  600 ns      1  fib
    400 ns  300 ns      1  `- fib
    100 ns  100 ns      1     `- fib
'''

FOLDED = '''\
main 2600
main;emit 4000
main;parse 700
main;parse;lex 700
main;fib 600
main;fib;fib 300
main;fib;fib;fib 100
main;run 600
main;run;deep1 100
main;run;deep1;deep2 300
idle 8000
thread_fn 100
thread_fn;inner 500
work 500
'''

FTRACE = '''\
# tracer: function_graph (textpoke)
# pid 100, command ./prog -v
#
#     TIME        CPU  TASK/PID         DURATION                  FUNCTION CALLS
#      |          |     |    |           |   |                     |   |   |   |
    0.000000 |    2)     prog-100    |               |  main() {
    0.000000 |    2)     prog-100    |               |    parse() {
    0.000000 |    6)    short-300    |               |  thread_fn() {
    0.000000 |    2)     prog-100    |   0.300 us    |      lex();
    0.000000 |    6)    short-300    |               |    inner() {
    0.000000 |    4)    worker-200   |   0.500 us    |  work();
    0.000000 |    2)     prog-100    |   0.400 us    |      lex();
    0.000000 |    6)    short-300    |   0.500 us    |    } /* inner: unwound, no return */
    0.000000 |    6)    short-300    |   0.600 us    |  } /* thread_fn: unwound, no return */
    0.000000 |    4)    worker-200   |               |  } /* worker_loop: entered before the recording */
    0.000001 |    4)    worker-200   |   8.000 us    |  idle();
    0.000001 |    2)     prog-100    |   1.400 us    |    } /* parse */
    0.000002 |    2)     prog-100    |               |    fib() {
    0.000002 |    2)     prog-100    |               |      fib() {
    0.000002 |    2)     prog-100    |   0.100 us    |        fib();
    0.000002 |    2)     prog-100    |   0.400 us    |      } /* fib */
    0.000003 |    2)     prog-100    |   1.000 us    |    } /* fib */
    0.000004 |    2)     prog-100    |               |    run() {
    0.000004 |    2)     prog-100    |               |      deep1() {
    0.000004 |    2)     prog-100    |               |        deep2() {
    0.000004 |    2)     prog-100    |   0.300 us    |        } /* deep2: unwound, no return */
    0.000004 |    2)     prog-100    |   0.400 us    |      } /* deep1: unwound, no return */
    0.000005 |    2)     prog-100    |   1.000 us    |    } /* run */
    0.000006 |    2)     prog-100    |               |    emit() {
    0.000006 |    2)     prog-100    |               |      lex(); /* entry only */
    0.000010 |    2)     prog-100    |   4.000 us    |    } /* emit: cut off by the end of the recording */
    0.000010 |    2)     prog-100    |   10.000 us   |  } /* main: cut off by the end of the recording */
#
# frames: 16 (9 returned, 4 unwound, 2 cut off by the end, 1 cut off by the start); 1 call entry-only
#   unwound: left without a return (longjmp, exception, thread exit); timed to when the tracer saw it: an upper bound
#   cut off by the end: still running when the recording ended; timed to its end: a lower bound
#   cut off by the start: running when the recording began (an exit, no entry); not timed
#   entry-only: calls recorded without their exit (a shadow stack was full 1 time, or call sites): counted, not timed
'''



def test_rows_exactly():
    summary = summarize_times(program())
    got = {r.name: (r.calls, r.frames, r.total_ns if r.frames else 0, r.self_ns if r.frames else 0, r.avg_ns,
                    r.min_ns, r.max_ns, r.notes()) for r in summary.rows}
    assert got == {name: (e.calls, e.frames, e.total, e.self, e.avg, e.min, e.max, e.notes)
                   for name, e in EXPECTED.items()}
    assert [r.name for r in summary.rows] == list(EXPECTED)
    assert summary.not_called == 1  # "never"
    c = summary.counts
    assert (c.enters, c.returned, c.unwound, c.cut_end, c.cut_start, c.entry_only, c.resynced, c.ignored) == (
        15, 9, 4, 2, 1, 1, 0, 0)


def test_a_parents_self_time_excludes_its_children():
    rows = {r.name: r for r in summarize_times(program()).rows}
    # main's children: parse 1,400 + fib 1,000 + run 1,000 + emit 4,000 (cut off by the end)
    assert rows["main"].self_ns == END - 1_400 - 1_000 - 1_000 - 4_000
    # fib recursing: total counts the outer call once, self and avg every call
    assert (rows["fib"].total_ns, rows["fib"].self_ns, rows["fib"].duration_sum_ns) == (1_000, 1_000, 1_500)


@pytest.mark.parametrize("key,order", [
    ("total", list(EXPECTED)),
    ("self", ["idle", "emit", "main", "fib", "lex", "parse", "run", "inner", "work", "deep2", "deep1", "thread_fn",
              "worker_loop"]),
    ("calls", ["fib", "lex", "deep1", "deep2", "emit", "idle", "inner", "main", "parse", "run", "thread_fn", "work",
               "worker_loop"]),
    ("avg", ["main", "idle", "emit", "parse", "run", "thread_fn", "fib", "inner", "work", "deep1", "lex", "deep2",
             "worker_loop"]),
    ("min", ["main", "idle", "emit", "parse", "run", "thread_fn", "inner", "work", "deep1", "deep2", "lex", "fib",
             "worker_loop"]),
    ("max", ["main", "idle", "emit", "parse", "fib", "run", "thread_fn", "inner", "work", "deep1", "lex", "deep2",
             "worker_loop"]),
    ("name", sorted(EXPECTED)),
])
def test_sort_by_each_column(key, order):
    assert [r.name for r in summarize_times(program(), sort=key).rows] == order


def test_rows_per_thread():
    summary = summarize_times(program(), threads=True, sort=TimeKey.SELF)
    assert [(r.tid, r.name) for r in summary.rows] == [
        (100, "emit"), (100, "main"), (100, "fib"), (100, "lex"), (100, "parse"), (100, "run"), (100, "deep2"),
        (100, "deep1"), (200, "idle"), (200, "work"), (200, "worker_loop"), (300, "inner"), (300, "thread_fn")]
    assert summary.row("lex", 100).calls == 3 and summary.row("worker_loop", 200).cut_start == 1
    text = render(TimedReporter(threads=True, limit=1), program())  # --limit counts per thread
    assert [row[6:8] for row in table(text)] == [["prog-100", "main"], ["worker-200", "idle"],
                                                 ["short-300", "thread_fn"]]


def test_report_golden():
    assert render(TimedReporter(), program()) == REPORT


def test_graph_golden():
    text = render(GraphReporter(), program())
    assert text == GRAPH
    assert render(GraphReporter(function="fib"), program()) == GRAPH_FIB


def test_graph_rooted_at_a_function_merges_every_path_through_it():
    text = render(GraphReporter(function="lex"), program())
    assert "2 call paths lead to lex:" in text
    lines = text.splitlines()
    start = lines.index("2 call paths lead to lex:")
    assert [line.split() for line in lines[start + 1: start + 4]] == [
        ["total", "calls", "path"], ["700", "ns", "2", "main", ">", "parse", ">", "lex"],
        ["-", "1", "main", ">", "emit", ">", "lex"]]
    assert lines[-1].split() == ["700", "ns", "700", "ns", "3", "lex", "(1", "entry-only)"]


def test_graph_threads_apart_and_depth():
    text = render(GraphReporter(threads=True), program())
    assert "  10.000 us                   thread prog-100" in text
    assert "   8.500 us                   thread worker-200" in text  # idle 8,000 + work 500
    shallow = render(GraphReporter(depth=1), program())
    assert [row[3:] for row in table(shallow)] == [["main", "(1 cut off by the end)"], ["idle"],
                                                   ["thread_fn", "(1 unwound)"], ["work"]]


def test_folded_golden_and_weights():
    text = render(FoldedReporter(), program())
    assert text == FOLDED
    # self times add up to the outermost frames' totals
    assert sum(int(line.rsplit(" ", 1)[1]) for line in text.splitlines()) == 10_000 + 8_000 + 600 + 500


def test_ftrace_golden():
    assert render(FtraceReporter(), program()) == FTRACE


@pytest.mark.parametrize("ns,cell", [
    (300, "  0.300 us    |  "), (10_000, "  10.000 us   |  "), (10_001, "+ 10.001 us   |  "),
    (123_456, "! 123.456 us  |  "), (1_234_567, "# 1234.567 us |  "), (12_345_678, "* 12345.67 us |  "),
    (123_456_789, "@ 123456.7 us |  "), (1_234_567_890, "$ 1234567 us  |  "),
])
def test_ftrace_duration_column(ns, cell):
    assert duration_cell(ns) == cell


@pytest.mark.parametrize("ns,text", [(0, "0 ns"), (999, "999 ns"), (1_000, "1.000 us"), (12_345_678, "12.346 ms"),
                                     (3_000_000_000, "3.000 s")])
def test_durations_as_text(ns, text):
    assert duration_text(ns) == text


def test_chrome_nested_slices():
    trace = json.loads(render(ChromeReporter(), program()))
    slices = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    got = {(e["name"], e["tid"], round(e["ts"] * 1000), round(e["dur"] * 1000), e["args"].get("ended"))
           for e in slices}
    assert got == {
        ("main", 100, 0, END, "cut off by the end of the recording"), ("parse", 100, 100, 1_400, None),
        ("lex", 100, 200, 300, None), ("lex", 100, 600, 400, None), ("fib", 100, 2_000, 1_000, None),
        ("fib", 100, 2_100, 400, None), ("fib", 100, 2_200, 100, None), ("run", 100, 4_000, 1_000, None),
        ("deep1", 100, 4_100, 400, "unwound"), ("deep2", 100, 4_200, 300, "unwound"),
        ("emit", 100, 6_000, 4_000, "cut off by the end of the recording"),
        ("work", 200, 300, 500, None), ("worker_loop", 200, 0, 900, "entered before the recording"),
        ("idle", 200, 1_000, 8_000, None),
        ("thread_fn", 300, 100, 600, "unwound"), ("inner", 300, 200, 500, "unwound")}
    # slices of one thread nest (Perfetto draws them as a flame chart): never a partial overlap
    for tid in (100, 200, 300):
        spans = sorted((e["ts"], -(e["ts"] + e["dur"])) for e in slices if e["tid"] == tid)
        for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
            assert b0 >= -a1 or -b1 <= -a1
    parse = next(e for e in slices if e["name"] == "parse")
    assert parse["args"] == {"caller": "main", "arg0": "0x1", "ret": "0xe"}
    (instant,) = [e for e in trace["traceEvents"] if e["ph"] == "i"]
    assert (instant["name"], instant["ts"], instant["args"]["ended"]) == ("lex", 6.5, "entry only")
    assert trace["otherData"]["textpoke"]["graph"] is True


def test_json_lines_name_each_kind():
    lines = [json.loads(line) for line in render(JsonLinesReporter(), program()).splitlines()[1:]]
    assert [line["type"] for line in lines] == [{"E": "enter", "X": "exit", "U": "unwound", "C": "call"}[k]
                                                for _, _, k, _ in PROGRAM]


def test_graph_recordings_are_recognized_without_metadata():
    plain = recording(PROGRAM, end=END, metadata={})
    plain.metadata.pop("graph")
    assert is_graph_recording(plain)
    assert render(FtraceReporter(), plain).startswith("# tracer: function_graph")


def test_shadow_stack_full_is_said():
    assert "a shadow stack was full 1 time" in render(TimedReporter(), program())
    text = render(TimedReporter(), program(lost=3, metadata={"overflow": "drop", "lost_full": 3}))
    assert "LOST 3 records (9.1% of all records)" in text and "lost: 3 found the buffer full" in text
    assert "shadow stack" not in text


@pytest.mark.parametrize("reporter", [TimedReporter(), TimedReporter(threads=True), GraphReporter(),
                                      GraphReporter(function="lex"), FoldedReporter(), ChromeReporter(),
                                      FtraceReporter()], ids=lambda r: type(r).__name__)
def test_a_chunk_boundary_anywhere_changes_nothing(reporter):
    def output(recording) -> object:
        text = render(reporter, recording)
        if isinstance(reporter, ChromeReporter):  # a thread is named where it first shows: any order
            return sorted(json.dumps(e) for e in json.loads(text)["traceEvents"])
        return text

    whole = output(program())
    for bound in range(1, len(PROGRAM)):
        assert output(Chunked(program(), [bound])) == whole, bound
    if not isinstance(reporter, FtraceReporter):  # leaves need the next chunk to hold the exit
        assert output(Chunked(program(), range(1, len(PROGRAM)))) == whole


def test_million_records_exactly():
    threads, iterations = 8, 25_000
    rec, end = big_program(threads, iterations)
    n = len(rec.records)
    assert n == threads * (6 * iterations + 1) > 1_000_000
    chunked = Chunked(rec, range(65_537, n, 65_537))  # frames straddle every boundary
    started = time.perf_counter()
    summary = summarize_times(chunked)
    print(f"report of {n:,} records: {time.perf_counter() - started:.2f} s")  # printed, never asserted
    i = np.arange(iterations)
    t = np.arange(threads)
    b_total = threads * int((5 + i % 7).sum())
    c_total = iterations * int((20 + t % 3).sum())
    rows = {r.name: r for r in summary.rows}
    assert (rows["a"].calls, rows["a"].total_ns, rows["a"].min_ns, rows["a"].max_ns) == (
        threads * iterations, 90 * threads * iterations, 90, 90)
    assert rows["a"].self_ns == 90 * threads * iterations - b_total - c_total
    assert (rows["b"].total_ns, rows["b"].min_ns, rows["b"].max_ns) == (b_total, 5, 11)
    assert (rows["c"].total_ns, rows["c"].min_ns, rows["c"].max_ns) == (c_total, 20, 22)
    assert (rows["main"].frames, rows["main"].cut_end) == (threads, threads)
    assert rows["main"].total_ns == sum(end - k for k in range(threads))
    assert rows["main"].self_ns == rows["main"].total_ns - 90 * threads * iterations
    c = summary.counts
    assert (c.enters, c.returned, c.cut_end) == (threads * (3 * iterations + 1), 3 * threads * iterations, threads)
    folded = dict(line.rsplit(" ", 1) for line in render(FoldedReporter(), chunked).splitlines())
    assert {k: int(v) for k, v in folded.items()} == {
        "main": rows["main"].self_ns, "main;a": rows["a"].self_ns, "main;a;b": b_total, "main;a;c": c_total}
    lines = render(FtraceReporter(), chunked).splitlines()
    body = [line for line in lines if not line.startswith("#")]
    # per thread: main() {, per iteration a() { b(); c(); }, and main's cut-off close
    assert len(body) == threads * (4 * iterations + 2)
    assert sum(line.endswith("|      b();") for line in body) == threads * iterations


def test_recursion_ten_thousand_deep():
    """fib calls itself 10,000 deep: frame j (0 outermost) enters at 10 j and returns at
    200,000 - 10 j, so each frame's self time is 20 ns but the innermost's (10 ns)."""
    depth = 10_000
    rows = [(10 * j, 7, "E", "fib") for j in range(depth)]
    rows += [(200_000 - 10 * j, 7, "X", "fib") for j in reversed(range(depth))]
    rec = Chunked(recording(rows, end=300_000), range(2_999, 2 * depth, 3_001))
    (row,) = summarize_times(rec).rows
    assert (row.calls, row.frames, row.total_ns, row.self_ns) == (depth, depth, 200_000, 200_000)
    assert (row.min_ns, row.max_ns) == (200_000 - 20 * (depth - 1), 200_000)
    folded = render(FoldedReporter(), rec).splitlines()
    assert len(folded) == depth
    assert folded[0] == "fib 20" and folded[-1] == ";".join(["fib"] * depth) + f" {200_000 - 20 * (depth - 1)}"
    graph = table(render(GraphReporter(depth=3), rec))
    assert [r[:3] for r in graph] == [["200.000 us", "20 ns", "1"], ["199.980 us", "20 ns", "1"],
                                      ["199.960 us", "20 ns", "1"]]
    lines = render(FtraceReporter(), rec).splitlines()
    assert lines[5 + depth - 1].endswith("  " * (depth - 1) + "fib();")  # the innermost: a leaf
