"""``textpoke report / graph / dump`` on function-graph recording files (the synthetic
program of tests/report/synth.py, written in chunks that cut frames in two)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from textpoke.ring.file import ChunkKind, RecordingWriter

from report.synth import program
from report.test_outputs import FOLDED, FTRACE, GRAPH, GRAPH_FIB, REPORT, table
from .conftest import tiny_recording
from .test_commands import assert_one_error, run


def save_in_chunks(recording, path, bounds) -> None:
    """What Recording.save writes, with the records cut at ``bounds`` into chunks."""
    with RecordingWriter(path) as writer:
        writer.write_json(ChunkKind.META, recording.head_json())
        for part in np.split(recording.records, bounds):
            writer.write_records(part)
        writer.finish(recording.tail_json())


def recording_file(tmp_path):
    path = tmp_path / "graph.tpk"
    save_in_chunks(program(), path, [3, 7, 17])  # inside main, parse, lex, idle, fib
    return path


def test_report_of_a_function_graph(tmp_path, capsys):
    path = recording_file(tmp_path)
    assert run(capsys, "report", str(path)) == (0, REPORT, "")
    code, out, _ = run(capsys, "report", str(path), "--sort", "self", "--threads", "--limit", "1")
    assert code == 0
    assert [row[6:8] for row in table(out)] == [["prog-100", "emit"], ["worker-200", "idle"], ["short-300", "inner"]]


def test_graph_and_dumps(tmp_path, capsys):
    path = recording_file(tmp_path)
    assert run(capsys, "graph", str(path)) == (0, GRAPH, "")
    assert run(capsys, "graph", str(path), "-F", "fib") == (0, GRAPH_FIB, "")
    assert run(capsys, "dump", str(path)) == (0, FTRACE, "")
    assert run(capsys, "dump", str(path), "--format", "text") == (0, FTRACE, "")
    assert run(capsys, "dump", str(path), "--format", "folded") == (0, FOLDED, "")
    out = tmp_path / "trace.json"
    assert run(capsys, "dump", str(path), "--format", "chrome", "-o", str(out)) == (0, "", "")
    events = json.loads(out.read_text())["traceEvents"]
    assert sum(e["ph"] == "X" for e in events) == 16
    graph_out = tmp_path / "graph.txt"
    assert run(capsys, "graph", str(path), "-o", str(graph_out)) == (0, "", "")
    assert graph_out.read_text() == GRAPH


def test_html_report(tmp_path, capsys):
    path = recording_file(tmp_path)
    page = tmp_path / "run.html"
    assert run(capsys, "report", str(path), "--html", str(page)) == (0, "", "")
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and '"names":["' in text and "main" in text
    assert not (tmp_path / "run.html.partial").exists()


def test_refusals(tmp_path, capsys):
    path = recording_file(tmp_path)
    code, out, err = run(capsys, "graph", str(path), "-F", "lexx")
    assert code == 2 and out == ""
    assert_one_error(err, "no traced function named 'lexx'")
    assert "did you mean" not in err and "--sort name" in err
    code, _, err = run(capsys, "graph", str(path), "-F", "fi")
    assert_one_error(err, "no traced function named 'fi'")
    assert err.splitlines()[1] == "textpoke: hint: did you mean: fib?"
    entry_only = tmp_path / "calls.tpk"
    tiny_recording().save(entry_only)
    for args in (["graph", str(entry_only)], ["dump", str(entry_only), "--format", "folded"],
                 ["report", str(entry_only), "--html", str(tmp_path / "x.html")]):
        code, out, err = run(capsys, *args)
        assert code == 2 and out == ""
        assert_one_error(err, "no function exits (entry-only)")
    assert not (tmp_path / "x.html").exists()
    code, out, err = run(capsys, "report", str(entry_only), "--sort", "total")
    assert code == 2 and out == ""
    assert_one_error(err, "--sort total needs times")


def test_entry_only_rows_per_thread(tmp_path, capsys):
    path = tmp_path / "calls.tpk"
    tiny_recording().save(path)
    code, out, _ = run(capsys, "report", str(path), "--threads")
    assert code == 0
    tail = out[out.index("  calls  thread"):].splitlines()
    assert [line.split() for line in tail] == [["calls", "thread", "function"], ["2", "target-4242", "work_a"],
                                               ["1", "target-4242", "work_c"], ["1", "target-4243", "work_a"],
                                               ["1", "target-4243", "work_b"]]


def test_graph_command_is_listed():
    result = subprocess.run([sys.executable, "-m", "textpoke", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "  graph " in result.stdout
