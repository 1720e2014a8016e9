"""Function-graph tracing: every traced call's exit, in every way a C program leaves a
function. Each case runs untraced and under `textpoke record`; the program's output
must be the same, and the recording's entries and exits must nest exactly as the
program made its calls."""

from __future__ import annotations

import collections
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from textpoke.ring import Recording, RecordKind

ENTER, EXIT, UNWOUND, CALL = (int(k) for k in (RecordKind.ENTER, RecordKind.EXIT, RecordKind.UNWOUND,
                                                RecordKind.CALL))


@dataclass
class Frame:
    function: str
    depth: int
    enter_ns: int
    end_ns: int | None = None
    how: str = "open"  # exit | unwound | open (cut off by the end)
    value: int | None = None  # the return value (arg0 of the exit)
    caller: int = 0
    children: list[Frame] = field(default_factory=list)

    @property
    def duration_ns(self) -> int:
        assert self.end_ns is not None
        return self.end_ns - self.enter_ns


def frames_of(recording: Recording) -> tuple[dict[int, list[Frame]], collections.Counter]:
    """Per thread, the top-level frames (each with its children), rebuilt record by
    record (the tests' own pairing: the reporters' must agree with it), and the
    entry-only calls per function."""
    names = {s.id: s.function for s in recording.sites}
    roots: dict[int, list[Frame]] = collections.defaultdict(list)
    stacks: dict[int, list[Frame]] = collections.defaultdict(list)
    calls: collections.Counter = collections.Counter()
    for record in recording.records.tolist():
        ts, tid, site, caller, arg0, _cpu, kind = record[:7]
        stack = stacks[tid]
        if kind == ENTER:
            frame = Frame(names[site], len(stack), ts, caller=caller)
            (stack[-1].children if stack else roots[tid]).append(frame)
            stack.append(frame)
        elif kind in (EXIT, UNWOUND):
            assert stack, f"an exit with no entry open in thread {tid}"
            frame = stack.pop()
            assert frame.function == names[site], (frame.function, names[site])
            frame.end_ns, frame.how = ts, "exit" if kind == EXIT else "unwound"
            frame.value = arg0 if kind == EXIT else None
        else:
            calls[names[site]] += 1
    return roots, calls


def walk(frames: list[Frame]):
    """Every frame and its descendants, depth first (without recursion: stacks 20,000 deep)."""
    todo = list(reversed(frames))
    while todo:
        frame = todo.pop()
        yield frame
        todo.extend(reversed(frame.children))


def shape(frame: Frame) -> tuple:
    """A frame and its children as nested (name, how) tuples (for shallow trees)."""
    return (frame.function, frame.how, tuple(shape(c) for c in frame.children))


@pytest.fixture(scope="module")
def cases(build_target) -> Path:
    return build_target("graph_cases")


def run_both(binary: Path, tmp_path: Path, *args: str, status: int = 0, functions: tuple[str, ...] = ()):
    """(the program's output untraced, the recording of the same run traced): the
    outputs must be equal, and both exit ``status``."""
    plain = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=120)
    assert plain.returncode == status, plain.stderr
    out = tmp_path / f"{args[0]}.tpk"
    selection = [arg for f in functions for arg in ("-f", f)]
    traced = subprocess.run([sys.executable, "-m", "textpoke", "record", *selection, "-o", str(out), "--",
                             str(binary), *args], capture_output=True, text=True, timeout=300)
    assert traced.returncode == (128 + 6 if status == -6 else status) or traced.returncode == status, traced.stderr
    assert traced.stdout == plain.stdout
    assert "Traceback" not in traced.stderr
    recording = Recording.load(out)
    assert recording.metadata["graph"] is True and recording.lost == 0
    return plain.stdout, recording


def main_frame(roots: dict[int, list[Frame]], recording: Recording) -> Frame:
    (main,) = [f for f in roots[recording.pid] if f.function == "main"]
    return main


def test_nesting_and_return_values(cases, tmp_path):
    out, recording = run_both(cases, tmp_path, "nest")
    roots, calls = frames_of(recording)
    assert not calls
    main = main_frame(roots, recording)
    assert main.how == "exit" and main.value == 0
    outers = [c for c in main.children if c.function == "outer"]
    assert [shape(o) for o in outers] == [("outer", "exit", (("middle", "exit", (
        ("inner", "exit", ()), ("inner", "exit", ()))),))] * 2
    # Exits carry the return values: outer(1) = middle(1) + 1 = inner(1) + inner(2) + 1 = 3 + 5 + 1
    # (gcc evaluates printf's arguments right to left: outer(2) first).
    assert [o.value for o in outers] == [13, 9] and out == "nest 9 13\n"
    assert sorted(i.value for i in walk(outers) if i.function == "inner") == [3, 5, 5, 7]
    # The entry's caller word is the real return address (into the caller), not a trampoline.
    symbols = recording.symbolize(np.array([f.caller for f in walk(outers)], dtype=np.uint64))
    assert symbols == ["main", "outer", "middle", "middle"] * 2
    for frame in walk([main]):
        assert frame.enter_ns <= frame.end_ns
        assert all(frame.enter_ns <= c.enter_ns and c.end_ns <= frame.end_ns for c in frame.children)


def test_durations_are_measured(cases, tmp_path):
    _, recording = run_both(cases, tmp_path, "sleep")
    roots, _ = frames_of(recording)
    sleeps = [f for f in walk(roots[recording.pid]) if f.function == "sleeper"]
    assert len(sleeps) == 5
    # nanosleep(10 ms) sleeps at least 10 ms; the shortest of five shows the scale.
    assert 10_000_000 <= min(f.duration_ns for f in sleeps) < 11_000_000, [f.duration_ns for f in sleeps]


def test_recursion_ten_thousand_deep(cases, tmp_path):
    out, recording = run_both(cases, tmp_path, "recurse", "10000")
    assert out == "rec 10000\n"
    roots, calls = frames_of(recording)
    frame = next(f for f in main_frame(roots, recording).children if f.function == "rec")
    depth = 0
    while True:
        assert frame.how == "exit" and frame.value == 10000 - depth
        depth += 1
        if not frame.children:
            break
        (frame,) = frame.children
    assert depth == 10001 and not calls


def test_shadow_stack_overflow_is_entry_only_and_counted(cases, tmp_path):
    """Deeper than the shadow stack: the calls beyond it are traced entry-only, counted,
    and the program runs as without textpoke."""
    out, recording = run_both(cases, tmp_path, "recurse", "20000")
    assert out == "rec 20000\n"
    roots, calls = frames_of(recording)
    depth = recording.metadata.get("shadow_depth", 16384)
    hooked = [f for f in walk(roots[recording.pid]) if f.function == "rec"]
    # main takes one frame of the stack, rec the rest; every rec beyond is a CALL record.
    assert len(hooked) == depth - 1 and all(f.how == "exit" for f in hooked)
    assert calls["rec"] == 20001 - (depth - 1)
    assert recording.metadata["shadow_full"] == calls["rec"]


def test_longjmp_and_siglongjmp_unwind_frames(cases, tmp_path):
    out, recording = run_both(cases, tmp_path, "longjmp")
    assert out == "jumped 15\n"  # 1 + 2 + 3 from longjmp, 9 from siglongjmp
    roots, _ = frames_of(recording)
    (jumper,) = [f for f in main_frame(roots, recording).children if f.function == "jumper"]
    assert jumper.how == "exit" and jumper.value == 15
    downs = [c for c in jumper.children if c.function == "down1"]
    assert [shape(d) for d in downs] == [("down1", "unwound", (("down2", "unwound", (
        ("down3", "unwound", ()),)),))] * 3
    (sig,) = [c for c in jumper.children if c.function == "sig_down1"]
    assert shape(sig) == ("sig_down1", "unwound", (("sig_down2", "unwound", (
        ("on_usr1_jump", "unwound", ()),)),))  # the handler siglongjmp'd out of itself too
    # Unwound frames are closed when the tracer learns of it: by the next return.
    assert all(d.end_ns <= jumper.end_ns for d in walk(downs))


def test_signal_handler_calls_traced_functions(cases, tmp_path):
    out, recording = run_both(cases, tmp_path, "signal")
    assert out == "signal 7 handled 12\n"
    roots, _ = frames_of(recording)
    (sig_middle,) = [f for f in main_frame(roots, recording).children if f.function == "sig_middle"]
    # The handler ran on the interrupted thread, inside sig_middle (raise): its calls nest there.
    assert shape(sig_middle) == ("sig_middle", "exit", (
        ("on_usr1", "exit", (("in_handler", "exit", (("inner", "exit", ()),)),)), ("inner", "exit", ())))
    assert sig_middle.value == 7


def test_tail_calls(cases, tmp_path):
    out, recording = run_both(cases, tmp_path, "tail")
    roots, _ = frames_of(recording)
    tails = [f for f in main_frame(roots, recording).children if f.function == "tail_a"]
    assert [shape(t) for t in tails] == [("tail_a", "exit", (("tail_b", "exit", (("inner", "exit", ()),)),))] * 3
    # tail_b was reached by a jmp: its caller is tail_a's caller, and both return the same value.
    for t in tails:
        (b,) = t.children
        assert b.caller == t.caller and b.value == t.value
    assert out == f"tail {sum(t.value for t in tails)}\n"


def test_threads_exit_and_cancellation(cases, tmp_path):
    out, recording = run_both(cases, tmp_path, "threads")
    assert out.startswith("threads ") and out.endswith(" exit 42 cancelled 1\n")
    roots, _ = frames_of(recording)
    everything = [f for tid in roots for f in walk(roots[tid])]
    bodies = [f for f in everything if f.function == "t_body"]
    assert len(bodies) == 4 and all(f.how == "exit" and len(f.children) == 1000 for f in bodies)
    exited = [f for f in everything if f.function == "t_exit_outer"]
    cancelled = [f for f in everything if f.function == "t_cancel_outer"]
    # Frames a thread left by pthread_exit or cancellation never return: open at the end
    # of the recording (the thread is gone), never closed wrongly.
    assert [shape(f) for f in exited] == [("t_exit_outer", "open", (("t_exit_inner", "open", ()),))]
    assert [shape(f) for f in cancelled] == [("t_cancel_outer", "open", (("t_cancel_inner", "open", ()),))]


def test_fork_inside_traced_frames(cases, tmp_path):
    out, recording = run_both(cases, tmp_path, "fork")
    assert sorted(out.splitlines()) == ["child 202", "parent 1008"]
    roots, _ = frames_of(recording)
    assert set(roots) == {recording.pid}  # the child wrote nothing into the parent's recording
    (forker,) = [f for f in main_frame(roots, recording).children if f.function == "forker"]
    assert shape(forker) == ("forker", "exit", (("fork_inner", "exit", ()),)) and forker.value == 1008


@pytest.mark.parametrize(("case", "status", "said"), [("exit", 3, "leaving\n"), ("abort", -6, "aborting\n")])
def test_functions_that_never_return(cases, tmp_path, case, status, said):
    out, recording = run_both(cases, tmp_path, case, status=status)
    assert out == said
    roots, _ = frames_of(recording)
    main = main_frame(roots, recording)
    assert main.how == "open"
    names = ["leaver", "leave_inner"] if case == "exit" else ["aborter", "abort_inner"]
    assert [f.function for f in walk(main.children)] == names
    assert all(f.how == "open" for f in walk(main.children))


def test_exec_from_traced_frames(cases, tmp_path):
    out, recording = run_both(cases, tmp_path, "exec")
    assert out == "nest 9 13\n"  # the new image ran, untraced
    roots, _ = frames_of(recording)
    main = main_frame(roots, recording)
    assert shape(main) == ("main", "open", (("execer", "open", (("exec_inner", "open", ()),)),))


def test_backtrace_inside_traced_frames(cases, tmp_path):
    """backtrace() from inside hooked frames sees the frames up to the innermost hooked
    one's return (the trampoline, where the unwinder stops), as the README says; the
    program runs on as without textpoke."""
    plain = subprocess.run([str(cases), "backtrace"], capture_output=True, text=True, timeout=60)
    assert "libc=1" in plain.stdout
    out = tmp_path / "bt.tpk"
    traced = subprocess.run([sys.executable, "-m", "textpoke", "record", "-o", str(out), "--", str(cases),
                             "backtrace"], capture_output=True, text=True, timeout=120)
    assert traced.returncode == 0, traced.stderr
    frames = int(traced.stdout.split("frames=")[1].split()[0])
    assert "libc=0" in traced.stdout and 1 <= frames < int(plain.stdout.split("frames=")[1].split()[0])
    assert traced.stdout.endswith("bt 1\n")


def _gdb_backtrace(argv: list[str]) -> tuple[str, str]:
    """Run ``argv`` (graph_cases gdb, maybe under textpoke record), take gdb's backtrace
    of the program while it waits inside gdb_outer -> gdb_inner, let it finish:
    (the backtrace's frame lines, the program's output)."""
    program = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        waiting = program.stdout.readline()
        assert waiting.startswith("waiting "), (waiting, program.stderr.read() if program.poll() else "")
        pid = int(waiting.split()[1])
        gdb = subprocess.run(["gdb", "-nx", "-batch", "-p", str(pid), "-ex", "bt"], capture_output=True,
                             text=True, timeout=120)
        frames = "\n".join(line for line in gdb.stdout.splitlines() if line.startswith("#"))
        out, err = program.communicate("four\n", timeout=120)
    finally:
        if program.poll() is None:
            program.kill()
    assert program.returncode == 0, err
    return frames, waiting + out


def test_gdb_backtrace_inside_traced_frames(cases, tmp_path):
    """What the README says gdb's `bt` shows inside graph-traced frames: the innermost
    traced function by name, then `?? ()` where a traced caller's return address is
    hooked (the return hook has no unwind information); untraced, the same stack shows
    every caller. The program goes on as without textpoke either way, and each traced
    call is recorded with its exit."""
    import shutil

    if shutil.which("gdb") is None:
        pytest.skip("gdb is not installed (apt-get install gdb)")
    plain_bt, plain_out = _gdb_backtrace([str(cases), "gdb"])
    assert "gdb_inner" in plain_bt and "gdb_outer" in plain_bt and " main " in plain_bt
    out = tmp_path / "gdb.tpk"
    traced_bt, traced_out = _gdb_backtrace([sys.executable, "-m", "textpoke", "record", "-f", "gdb_*", "-o",
                                            str(out), "--", str(cases), "gdb"])
    assert traced_out.split("\n")[1:] == plain_out.split("\n")[1:] == ["gdb 6", ""]
    lines = traced_bt.splitlines()
    inner = next(i for i, line in enumerate(lines) if "gdb_inner" in line)
    assert "?? ()" in lines[inner + 1] and "gdb_outer" not in traced_bt
    roots, calls = frames_of(Recording.load(out))
    (top,) = roots[next(iter(roots))]
    assert shape(top) == ("gdb_outer", "exit", (("gdb_inner", "exit", ()),)) and not calls


@pytest.fixture(scope="module")
def cpp(build_target) -> Path:
    return build_target("graph_cpp")


@pytest.mark.parametrize("case", ["throw", "rethrow", "nested", "library", "many"])
def test_cxx_exceptions_through_traced_frames(cpp, tmp_path, case):
    """Exceptions thrown through hooked frames: the unwinder never sees a trampoline
    (the throw hook puts the real return addresses back), every destructor runs, the
    output is the untraced one to the byte; the frames the exception left are closed
    UNWOUND, and the catching function returns through its hook again."""
    out, recording = run_both(cpp, tmp_path, case)
    roots, calls = frames_of(recording)
    assert not calls
    everything = [f for tid in roots for f in walk(roots[tid])]
    if case == "throw":
        assert out.count("caught boom") == 3
        catchers = [f for f in everything if f.function == "catcher(int)"]
        assert len(catchers) == 3 and all(c.how == "exit" for c in catchers)
        assert [c.value for c in catchers] == [11, 21, 31]
        for c in catchers:
            (mid,) = [f for f in c.children if f.function == "middle(int)"]
            assert mid.how == "unwound"
            assert [f.how for f in mid.children if f.function == "thrower(int)"] == ["unwound"]
            assert c.children[-1].function == "leaf(long)" and c.children[-1].how == "exit"
    if case == "many":
        thrown = sum((base + i) % 3 == 0 for base in (0, 10000, 20000, 30000) for i in range(2000))
        assert out == f"many caught {thrown}\n"
        workers = [f for f in everything if f.function == "many_worker(long)"]
        assert len(workers) == 4 and all(w.how == "exit" for w in workers)
        middles = [f for f in everything if f.function == "quiet_middle(long)"]
        assert len(middles) == 8000
        assert sum(f.how == "unwound" for f in middles) == thrown
        assert sum(f.how == "exit" for f in middles) == 8000 - thrown


def test_cxx_uncaught_exception_terminates_as_untraced(cpp, tmp_path):
    out, recording = run_both(cpp, tmp_path, "uncaught", status=-6)
    assert out == "throwing for nobody\n"


@pytest.fixture
def live(build_target):
    from chaos.harness import Target

    target = Target([str(build_target("graph_live"))])
    yield target
    target.kill()


def check_pairs(recording: Recording) -> dict[str, collections.Counter]:
    """Per function: frames closed by an exit, left open at the end. An exit never comes
    without its entry, nothing unwinds in this program, and every batch has its 64 steps,
    but the first and last of each thread, which may straddle the batch that switched
    tracing on or off (a site switches a moment before or after its neighbours)."""
    roots, calls = frames_of(recording)
    assert not calls
    how: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for tid in roots:
        batches = [f for f in roots[tid] if f.function == "batch"]
        for frame in walk(roots[tid]):
            how[frame.function][frame.how] += 1
        for frame in batches[1:-1]:
            assert frame.how == "exit" and len(frame.children) == 64 and all(c.how == "exit" for c in frame.children)
    return how


def trace_live(live, seconds: float) -> Recording:
    import threading
    import time

    from textpoke.capture import CaptureOptions, capture_pid

    stop, armed, result = threading.Event(), threading.Event(), {}

    def run() -> None:
        result["recording"] = capture_pid(live.pid, CaptureOptions(functions=("batch", "step", "forever")),
                                          stop_event=stop, on_progress=lambda _: armed.set())

    tracer = threading.Thread(target=run)
    tracer.start()
    assert armed.wait(60)
    time.sleep(seconds)
    stop.set()
    tracer.join(120)
    return result["recording"]


def test_attach_and_detach_with_frames_in_flight(live):
    """trace -p on 4 busy threads, twice: forever() was running at attach: no entry, no
    exit. Every batch/step entered gets its exit, but those cut off by the detach (at
    most one batch and one step per thread, open at the end); the frames hooked at the
    detach return to exactly the right place afterwards (the program checks every
    batch), and a second session in the same process finds the runtime again."""
    import time

    for _ in range(2):
        recording = trace_live(live, 0.05)
        assert recording.lost == 0
        how = check_pairs(recording)
        assert "forever" not in how  # running at attach: never entered while traced
        assert how["batch"]["exit"] > 10 and how["batch"]["unwound"] == how["step"]["unwound"] == 0
        assert how["batch"]["open"] <= 4 and how["step"]["open"] <= 4
        time.sleep(0.3)  # the hooked frames return after the detach
    done = live.stop()
    assert done["bad"] == 0 and done["batches"] > how["batch"]["exit"]


def test_kill_9_with_frames_hooked(live, tmp_path):
    """textpoke killed while frames are hooked: the program runs on and every hooked frame
    returns where it should (the runtime and the frames stay in the process); the next
    textpoke traces it again, exactly."""
    import signal
    import time

    tool = subprocess.Popen([sys.executable, "-m", "textpoke", "trace", "-p", str(live.pid), "-f", "batch",
                             "-f", "step", "-o", str(tmp_path / "killed.tpk")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    partial = tmp_path / "killed.tpk.partial"
    while not (partial.exists() and partial.stat().st_size > 1 << 16):
        assert time.monotonic() < deadline and tool.poll() is None
        time.sleep(0.05)
    tool.send_signal(signal.SIGKILL)
    tool.wait()
    time.sleep(0.5)
    recording = trace_live(live, 0.05)  # recovery puts the killed session's sites back first
    how = check_pairs(recording)
    assert how["batch"]["exit"] > 10 and how["batch"]["open"] <= 4
    done = live.stop()
    assert done["bad"] == 0
