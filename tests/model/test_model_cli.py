"""``textpoke model``: exit status, summary, first violation, usage errors."""

from __future__ import annotations

import pytest

from textpoke.cli import main


def _run(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(["model", *args])
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_seed_passes_with_exit_status_0(capsys):
    code, out, _ = _run(capsys, "--arch", "i386", "--variant", "seed", "--seed", "3", "--runs", "2",
                        "--steps", "4000")
    assert code == 0
    assert "interleavings" in out and "no violation (expected for this variant: no violation)" in out
    assert "first violation" not in out


def test_failing_variant_prints_the_first_violation_and_exits_1(capsys):
    code, out, _ = _run(capsys, "--arch", "x86_64", "--variant", "skip", "--runs", "2", "--steps", "6000",
                        "--trace-lines", "15")
    assert code == 1
    assert "first violation: lost call" in out
    assert "call through ftrace_call skipped: expected tracer_a / tracer_b" in out
    assert "VIOLATION lost call" in out
    assert "int3 trap" in out  # the annotated trace shows the trap the CPU took


def test_exhaustive_run(capsys):
    code, out, _ = _run(capsys, "--arch", "i386", "--variant", "notifier", "--exhaustive", "--cpus", "1",
                        "--steps", "40")
    assert code == 1
    assert "exhaustive, 40 instructions per CPU" in out
    assert "first violation: corrupted trap frame" in out
    assert "interleaving: exhaustive, patch 0" in out


def test_analogue_is_announced(capsys):
    code, out, _ = _run(capsys, "--arch", "x86_64", "--variant", "notifier", "--runs", "1", "--steps", "3000")
    assert code == 0
    assert "analogue of notifier" in out


@pytest.mark.parametrize("args", [["--exhaustive", "--seed", "2"], ["--exhaustive", "--runs", "3"]])
def test_conflicting_options_are_a_usage_error(capsys, args):
    code, _, err = _run(capsys, *args)
    assert code == 2
    assert "textpoke: error:" in err
