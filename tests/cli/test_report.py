"""Reporters over synthetic recordings: golden text for a tiny one, exact numbers
for a large one."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest

from textpoke._errors import UsageError
from textpoke.report import (
    ChromeReporter,
    FtraceReporter,
    JsonLinesReporter,
    SummaryReporter,
    make_reporter,
    summarize,
)

from textpoke.ring import RECORD_DTYPE, Recording, SiteInfo, Symbols, ThreadInfo

from .conftest import count_recording, records, tiny_recording


def render(reporter, recording) -> str:
    out = io.StringIO()
    reporter.render(recording, out)
    return out.getvalue()


SUMMARY = """\
pid 4242  command ./target 3
duration 2.000 s, 5 records, 0 lost, 4 sites (3 fentry, 1 call)

  calls  calls/s  share  function  top callers           threads
      3      1.5  60.0%  work_a    main (2), helper (1)  4242 (2), 4243 (1)
      1      0.5  20.0%  work_b    helper (1)            4243 (1)
      1      0.5  20.0%  work_c    main (1)              4242 (1)

  1 traced function never called

  calls  share  thread
      3  60.0%  4242
      2  40.0%  4243
"""


def test_summary_golden(tiny):
    assert render(SummaryReporter(), tiny) == SUMMARY


def test_summary_sort_by_name_and_limit(tiny):
    text = render(SummaryReporter(sort="name", limit=2), tiny)
    rows = [line.split()[3] for line in text.splitlines() if line.startswith("      ") and "%" in line and "(" in line]
    assert rows == ["work_a", "work_b"]
    assert "1 more function not shown (--limit); 1 traced function never called" in text


def test_summary_lost_is_prominent():
    text = render(SummaryReporter(), tiny_recording(lost=15, metadata={
        "overflow": "drop", "lost_full": 12, "lost_late": 3}))
    lines = text.splitlines()
    assert lines[1] == "duration 2.000 s, 5 records, 15 lost, 4 sites (3 fentry, 1 call)"
    assert lines[2].startswith("LOST 15 records (75.0% of all calls): ")
    assert lines[3].startswith("drop mode (--drop): traced threads never waited")
    assert lines[4] == "lost: 12 found the buffer full, 3 were written after the end"
    # With records lost, a function without records may have been called all the same.
    assert "1 traced function with no record kept" in text and "never called" not in text


def test_lossless_mode_and_cut_file_are_said():
    text = render(SummaryReporter(), tiny_recording(cut="it ends inside the chunk at byte 900", metadata={
        "overflow": "wait", "wait_s": 2.0, "writer_wakes": 7}))
    lines = text.splitlines()
    assert lines[2].startswith("CUT SHORT: it ends inside the chunk at byte 900")
    assert lines[3] == ("lossless: a traced thread whose buffer was full waited for textpoke (at most 2 s); "
                        "threads were woken from such waits 7 times")


def test_thread_names_forked_children_and_opaque_ids():
    """Threads the capture named show by name; a forked child's records belong to its
    own process in Chrome output; opaque thread ids (no glibc tid) show as t1, t2."""
    threads = {4242: ThreadInfo(4242, "main-loop"), 4243: ThreadInfo(5151, "kid")}
    recording = tiny_recording(threads=threads)
    assert "main-loop-4242  [000]" in render(FtraceReporter(), recording)
    events = json.loads(render(ChromeReporter(), recording))["traceEvents"]
    assert {e["pid"] for e in events if e["ph"] == "i" and e["tid"] == 4243} == {5151}
    assert {"name": "process_name", "ph": "M", "pid": 5151, "tid": 5151, "args": {"name": "kid-4243"}} in events
    opaque = render(FtraceReporter(), tiny_recording(metadata={"thread_ids": "thread pointer (opaque)"}))
    assert [line.split()[0] for line in opaque.splitlines() if "[" in line and ":" in line] == [
        "target-t1", "target-t1", "target-t2", "target-t2", "target-t1"]


def test_summary_count_mode():
    assert render(SummaryReporter(), count_recording([5, 0, 7, 0])) == """\
pid 4242  command ./target 3
duration 2.000 s, 12 calls counted, 0 lost, 4 sites (3 fentry, 1 call)
count mode: exact calls per function; no callers, threads or times were recorded

  calls  calls/s  share  function
      7      3.5  58.3%  work_c
      5      2.5  41.7%  work_a

  2 traced functions never called
"""


def test_callers_beyond_top_three_and_unknown_sites():
    # work_a called from five distinct functions; one record names a site id
    # that is not in the site table: it is counted, not dropped.
    functions = Symbols.from_ranges((0x500000 + 0x100 * i, 0x500100 + 0x100 * i, f"c{i}") for i in range(5))
    rows = [(10 + i, 7, 0, 0x500000 + 0x100 * c + 4) for i, c in enumerate([0, 0, 0, 1, 1, 2, 3, 4])]
    rows.append((30, 7, 99, 0x500004))
    recording = tiny_recording(records=records(rows), symbols=functions, start_ns=0, end_ns=10**9)
    summary = summarize(recording)
    (work_a,) = [row for row in summary.functions if row.name == "work_a"]
    assert work_a.calls == 8
    assert work_a.callers == (("c0", 3), ("c1", 2), ("c2", 1))
    assert work_a.caller_count == 5
    assert summary.calls_of("<unknown site>") == 1
    assert "c0 (3), c1 (2), c2 (1), +2 more" in render(SummaryReporter(), recording)


FTRACE = """\
# tracer: function (textpoke)
# pid 4242, command ./target 3
#
# entries-in-buffer/entries-written: 5/5
#
#           TASK-PID     CPU#   TIMESTAMP  FUNCTION
#              | |         |       |         |
     target-4242  [000]     0.000000: work_a <-main
     target-4242  [000]     0.000100: work_a <-main
     target-4243  [001]     0.000200: work_b <-helper
     target-4243  [001]     0.500000: work_a <-helper
     target-4242  [???]     1.000000: work_c <-main
"""


def test_ftrace_golden(tiny):
    assert render(FtraceReporter(), tiny) == FTRACE
    assert "entries-written: 5/9" in render(FtraceReporter(), tiny_recording(lost=4))


def test_json_lines(tiny):
    lines = [json.loads(line) for line in render(JsonLinesReporter(), tiny).splitlines()]
    header, calls = lines[0], lines[1:]
    assert header["type"] == "recording" and header["records"] == 5 and header["lost"] == 0
    assert [s["traces"] for s in header["sites"]] == ["work_a", "work_b", "work_c", "never"]
    assert calls[0] == {"type": "call", "t_ns": 100, "ts_ns": 1_000_000_100, "tid": 4242, "cpu": 0, "site": 0,
                        "function": "work_a", "caller": "main", "caller_address": "0x401020",
                        "callee_address": "0x401200", "arg0": "0x0"}
    assert calls[4]["cpu"] is None and calls[4]["callee_address"] == "0x401400"
    assert [c["function"] for c in calls] == ["work_a", "work_a", "work_b", "work_a", "work_c"]
    assert [c["t_ns"] for c in calls] == [100, 100_000, 200_500, 500_000_000, 1_000_000_999]


def test_json_lines_count_mode():
    lines = [json.loads(line) for line in render(JsonLinesReporter(), count_recording([5, 0, 7, 0])).splitlines()]
    assert lines[0]["mode"] == "count"
    assert [(c["function"], c["calls"]) for c in lines[1:]] == [("work_a", 5), ("work_b", 0), ("work_c", 7), ("never", 0)]


def test_chrome_trace(tiny):
    trace = json.loads(render(ChromeReporter(), tiny))
    assert trace["displayTimeUnit"] == "ns"
    events = trace["traceEvents"]
    instants = [e for e in events if e["ph"] == "i"]
    assert len(instants) == 5
    assert instants[2] == {"name": "work_b", "cat": "call", "ph": "i", "s": "t", "ts": 200.5,
                           "pid": 4242, "tid": 4243, "args": {"caller": "helper"}}
    assert [e["ts"] for e in instants] == [0.1, 100.0, 200.5, 500000.0, 1000000.999]
    names = {(e["name"], e["tid"]): e["args"]["name"] for e in events if e["ph"] == "M"}
    assert names == {("process_name", 4242): "./target 3", ("thread_name", 4242): "target-4242",
                     ("thread_name", 4243): "target-4243"}


def test_names_are_escaped_in_json():
    sites = (SiteInfo(0, 0x401200, "fentry", 'operator"quoted"\\', None),)
    recording = tiny_recording(records=records([(1_000_000_000, 1, 0, 0x1)]), sites=sites)
    for reporter in (ChromeReporter(), JsonLinesReporter()):
        text = render(reporter, recording)
        assert 'operator"quoted"\\' in text.replace('\\"', '"').replace("\\\\", "\\")
        # and it is valid JSON throughout
        if isinstance(reporter, ChromeReporter):
            json.loads(text)
        else:
            [json.loads(line) for line in text.splitlines()]


@pytest.mark.parametrize("reporter", [FtraceReporter(), ChromeReporter()])
def test_per_call_dumps_refuse_count_mode(reporter):
    with pytest.raises(UsageError, match="--count"):
        render(reporter, count_recording([1, 2, 3, 4]))


def test_unknown_format():
    with pytest.raises(UsageError, match="unknown report format"):
        make_reporter("xml")


def big_recording(n: int) -> Recording:
    """``n`` records over 50 fentry sites, 8 threads, callers in 150 functions,
    built so every count is known in closed form."""
    i = np.arange(n, dtype=np.int64)
    rec = np.zeros(n, dtype=RECORD_DTYPE)
    rec["ts_ns"] = 5_000_000_000 + i * 100
    rec["tid"] = 1000 + i % 8
    rec["site"] = i % 50
    # caller function 50 + (i % 150); distinct return addresses within it
    rec["caller"] = 0x400000 + 0x100 * (50 + i % 150) + (i % 7) * 4
    rec["cpu"] = i % 2
    sites = tuple(SiteInfo(k, 0x400000 + 0x100 * k, "fentry", f"f{k:02d}", None) for k in range(50))
    symbols = Symbols.from_ranges((0x400000 + 0x100 * k, 0x400100 + 0x100 * k, f"f{k:02d}" if k < 50 else f"g{k:03d}")
                                  for k in range(200))
    return Recording(records=rec, sites=sites, lost=0, pid=99, command="/usr/bin/big", start_ns=5_000_000_000,
                     end_ns=5_000_000_000 + n * 100, symbols=symbols)


def test_million_records_in_bulk():
    n = 1_000_000
    recording = big_recording(n)
    started = time.perf_counter()
    summary = summarize(recording)
    text = render(SummaryReporter(limit=5), recording)
    elapsed = time.perf_counter() - started  # printed, not asserted: machines differ
    print(f"summary of {n:,} records: {elapsed:.2f} s")
    # site k gets every 50th record starting at k: 20,000 each
    assert [row.calls for row in summary.functions] == [n // 50] * 50
    assert summary.total_calls == n and summary.records == n
    assert [row.name for row in summary.functions[:3]] == ["f00", "f01", "f02"]
    # i % 50 == 0 and i % 150 in {0, 50, 100}: three callers, 1/3 each
    f00 = summary.functions[0]
    assert f00.callers == (("g050", 6667), ("g100", 6667), ("g150", 6666))
    assert f00.caller_count == 3
    # i % 50 == 0 -> even i: threads 1000, 1002, 1004, 1006 equally
    assert f00.threads == ((1000, 5000), (1002, 5000), (1004, 5000))
    assert f00.thread_count == 4
    assert [(t.tid, t.calls) for t in summary.threads] == [(1000 + k, n // 8) for k in range(8)]
    assert "45 more functions not shown (--limit)" in text
    assert summary.seconds == pytest.approx(0.1)
    # the dumps stream it whole
    started = time.perf_counter()
    lines = render(FtraceReporter(), recording).splitlines()
    print(f"ftrace dump of {n:,} records: {time.perf_counter() - started:.2f} s")
    assert len(lines) == n + 7
    # the last record, i = 999,999: thread 1007, site 49, caller function 50 + 99
    assert lines[-1] == "        big-1007  [001]     0.099999: f49 <-g149"
    chrome = render(ChromeReporter(), recording)
    assert chrome.count('"ph":"i"') == n


@pytest.mark.parametrize("span", [1, 100, 1 << 20, 1 << 40])
def test_grouping_matches_np_unique(span):
    # dense table (narrow spans) and sort (wide ones) must agree with np.unique exactly
    from textpoke.report._view import group

    rng = np.random.default_rng(span)
    column = (0x7F00_0000_0000 + rng.integers(0, span, 200_000)).astype(np.uint64)
    grouped = group(column)
    values, inverse = np.unique(column, return_inverse=True)
    assert np.array_equal(grouped.values, values) and grouped.values.dtype == column.dtype
    assert np.array_equal(grouped.inverse, inverse.reshape(-1))
