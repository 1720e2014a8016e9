"""The commands in-process over a stand-in capture engine: output, exit codes,
signals, and every error as one line plus a hint."""

from __future__ import annotations

import json
import os
import signal
import threading
from types import SimpleNamespace

import pytest

from textpoke.cli import _capture, main

from textpoke.capture import CaptureOptions, Overflow
from textpoke.ring import Recording

from .conftest import count_recording, tiny_recording
from .test_report import FTRACE, SUMMARY




def run(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``textpoke ARGS`` the way the console script does: (exit code, stdout, stderr)."""
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error(err: str, *fragments: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 2, err
    assert lines[0].startswith("textpoke: error: ") and lines[1].startswith("textpoke: hint: ")
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture
def fake_engine(monkeypatch):
    """Route the CLI to a scripted capture engine (real recordings, no process)."""
    calls: dict[str, object] = {}

    def capture_pid(pid, options, *, output=None, stop_event=None, on_progress=None):
        calls["pid"] = (pid, options)
        on_progress(SimpleNamespace(seconds=0.5, records=5, lost=0, sites=4))
        behaviour = calls.get("behaviour")
        if behaviour is not None:
            behaviour(stop_event)
        recording = tiny_recording(pid=pid)
        if output is not None:  # the real engine streams the file while tracing
            recording.save(output)
        return recording

    def capture_command(argv, options, *, output=None, stop_event=None, abandon_event=None, on_start=None,
                        on_progress=None, on_traced=None, **popen):
        calls["argv"] = (argv, options)
        recording = tiny_recording()
        recording.save(output)
        on_traced(recording)
        return recording, calls.get("returncode", 0)

    engine = SimpleNamespace(
        capture_pid=capture_pid,
        capture_command=capture_command,
        CaptureOptions=CaptureOptions,  # the real ones: the CLI's keywords must fit them
        Overflow=Overflow,
    )
    monkeypatch.setattr(_capture, "capture_module", lambda: engine)
    return calls


def test_report_and_dump(tmp_path, capsys, fake_engine):
    path = tmp_path / "run.tpk"
    tiny_recording().save(path)
    assert run(capsys, "report", str(path)) == (0, SUMMARY, "")
    assert run(capsys, "dump", str(path)) == (0, FTRACE, "")
    code, out, _ = run(capsys, "report", str(path), "--sort", "name", "--limit", "1")
    assert code == 0 and "work_b" not in out and "2 more functions not shown" in out
    out_file = tmp_path / "run.json"
    assert run(capsys, "dump", str(path), "--format", "chrome", "-o", str(out_file)) == (0, "", "")
    trace = json.loads(out_file.read_text())
    assert sum(1 for e in trace["traceEvents"] if e["ph"] == "i") == 5
    code, out, _ = run(capsys, "dump", str(path), "--format", "json")
    assert code == 0 and len(out.splitlines()) == 6


def test_report_count_mode_and_dump_refusal(tmp_path, capsys, fake_engine):
    path = tmp_path / "count.tpk"
    count_recording([5, 0, 7, 0]).save(path)
    code, out, _ = run(capsys, "report", str(path))
    assert code == 0 and "12 calls counted" in out
    code, out, err = run(capsys, "dump", str(path))
    assert code == 2 and out == ""
    assert_one_error(err, "--count")


def test_missing_file(tmp_path, capsys, fake_engine):
    for cmd in ("report", "dump"):
        code, out, err = run(capsys, cmd, str(tmp_path / "nope.tpk"))
        assert code != 0 and out == ""
        assert_one_error(err, "no such recording", "nope.tpk")


def test_directory_and_unreadable(tmp_path, capsys, fake_engine):
    code, _, err = run(capsys, "report", str(tmp_path))
    assert code != 0
    assert_one_error(err, "is a directory")
    if os.geteuid() != 0:  # root reads anything
        path = tmp_path / "locked.tpk"
        tiny_recording().save(path)
        path.chmod(0)
        code, _, err = run(capsys, "report", str(path))
        assert code != 0
        assert_one_error(err, "cannot read", "Permission denied")


def test_bad_magic(tmp_path, capsys, fake_engine):
    path = tmp_path / "junk.tpk"
    path.write_bytes(b"this is not a recording\n")
    code, out, err = run(capsys, "report", str(path))
    assert code != 0 and out == ""
    assert_one_error(err, "not a textpoke recording")


def test_dump_to_unwritable_output(tmp_path, capsys, fake_engine):
    path = tmp_path / "run.tpk"
    tiny_recording().save(path)
    code, _, err = run(capsys, "dump", str(path), "-o", str(tmp_path / "no" / "such" / "dir.json"))
    assert code != 0
    assert_one_error(err, "cannot write", "No such file or directory")


def test_unknown_pid(capsys, fake_engine):
    code, out, err = run(capsys, "trace", "-p", str(1 << 23), "--duration", "1")  # above any pid_max
    assert code != 0 and out == ""
    assert_one_error(err, "no process with pid")
    assert "pid" not in fake_engine  # never reached the engine


def test_trace_prints_summary(capsys, fake_engine):
    code, out, err = run(capsys, "trace", "-p", str(os.getpid()), "-f", "work*", "--count", "--ring", "64k",
                         "--duration", "2", "--lib", "libc.so")
    assert code == 0
    assert out == SUMMARY.replace("pid 4242", f"pid {os.getpid()}")
    assert err.splitlines() == [f"textpoke: traced pid {os.getpid()} for 2.0 s: 5 records, 0 lost, 4 sites"]
    pid, options = fake_engine["pid"]
    assert pid == os.getpid()
    assert (options.functions, options.calls_to, options.mode, options.ring_records, options.duration,
            options.library) == (("work*",), (), "count", 65536, 2.0, "libc.so")


def test_trace_saves_with_output(tmp_path, capsys, fake_engine):
    path = tmp_path / "t.tpk"
    code, out, err = run(capsys, "trace", "-p", str(os.getpid()), "-o", str(path))
    assert code == 0 and out == ""
    assert err.rstrip().endswith(f"-> {path}")
    assert len(Recording.load(path).records) == 5


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_one_signal_stops_trace_cleanly(capsys, fake_engine, sig):
    """The first Ctrl-C (or SIGTERM) only sets the stop event: the engine returns
    normally (restoring and detaching), and the summary is still printed."""

    def interrupted(stop_event: threading.Event) -> None:
        os.kill(os.getpid(), sig)
        assert stop_event.wait(5), "the signal did not set the stop event"

    fake_engine["behaviour"] = interrupted
    previous = signal.getsignal(sig)
    code, out, err = run(capsys, "trace", "-p", str(os.getpid()))
    assert code == 0 and "work_a" in out
    assert signal.getsignal(sig) is previous  # handlers restored


@pytest.mark.parametrize(("returncode", "status"), [(0, 0), (3, 3), (-signal.SIGKILL, 128 + 9)])
def test_record_exits_with_program_status(tmp_path, capsys, fake_engine, returncode, status):
    fake_engine["returncode"] = returncode
    path = tmp_path / "r.tpk"
    code, out, err = run(capsys, "record", "-f", "work*", "--calls-to", "malloc", "-o", str(path), "--",
                         "./prog", "-x", "--flag")
    assert code == status and out == ""
    assert err.splitlines() == [f"textpoke: recorded pid 4242 for 2.0 s: 5 records, 0 lost, 4 sites -> {path}"]
    argv, options = fake_engine["argv"]
    assert argv == ["./prog", "-x", "--flag"]
    assert (options.functions, options.calls_to, options.mode) == (("work*",), ("malloc",), "trace")
    assert path.exists()


def test_record_refuses_unwritable_output_before_starting(tmp_path, capsys, fake_engine):
    code, _, err = run(capsys, "record", "-o", str(tmp_path / "missing" / "x.tpk"), "--", "true")
    assert code != 0
    assert_one_error(err, "does not exist")
    assert "argv" not in fake_engine


def test_bad_ring_size(capsys, fake_engine):
    code, _, err = run(capsys, "record", "--ring", "lots", "--", "true")
    assert code == 2 and "not a record count" in err


def test_os_errors_from_the_engine_are_one_line(capsys, fake_engine):
    """An OSError the engine lets through (e.g. /proc/PID/maps unreadable) is translated at the CLI boundary."""

    def denied(stop_event: threading.Event) -> None:
        raise PermissionError(13, "Permission denied", "/proc/1/maps")

    fake_engine["behaviour"] = denied
    code, out, err = run(capsys, "trace", "-p", str(os.getpid()))
    assert code == 4 and out == ""
    assert_one_error(err, "permission denied (/proc/1/maps)")
