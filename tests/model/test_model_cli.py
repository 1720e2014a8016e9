"""``textpoke model``: exit status, summary, first violation, usage errors."""

from __future__ import annotations

import re

import pytest

from textpoke.cli import main


def _run(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(["model", *args])
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_proposed_passes_with_exit_status_0(capsys):
    code, out, _ = _run(capsys, "--arch", "i386", "--variant", "proposed", "--seed", "3", "--runs", "2",
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


def test_variants_are_named_for_what_they_are(capsys):
    """No output speaks of "the seed": the variant that passes is `proposed` (the
    2019 design as posted), the one Linux runs is `merged`; `seed` is no name."""
    for arch in ("x86_64", "i386"):
        code, out, err = _run(capsys, "--arch", arch, "--variant", "proposed", "--runs", "1", "--steps", "2000")
        first = " ".join(out.split("\n\n")[0].split())
        assert code == 0 and err == ""  # not a terminal: no progress bar, nothing but the report
        assert first.startswith(f"textpoke model {arch} / proposed: as proposed in 2019")
        assert ("not merged" in first) == (arch == "i386")
        code, out, _ = _run(capsys, "--arch", arch, "--variant", "merged", "--runs", "1", "--steps", "2000")
        assert code == 0 and ("Linux 5.2" if arch == "x86_64" else "Linux 5.4") in out
        for text in (out, *[_run(capsys, "--arch", arch, "--variant", v, "--runs", "1", "--steps", "500")[1]
                            for v in ("no-gap", "skip", "notifier", "no-int3")]):
            assert "seed" not in text.replace("random seed", "")
    code, _, err = _run(capsys, "--variant", "seed")
    assert code == 2 and "'seed' is not one of 'proposed', 'no-gap'" in err


def test_help_names_the_kernel_path_not_a_seed():
    from click.testing import CliRunner

    from textpoke.cli import cli

    for args in (["--help"], ["model", "--help"]):
        done = CliRunner().invoke(cli, args, terminal_width=200)
        assert done.exit_code == 0
        assert "seed" not in done.output.lower().replace("random seed", "").replace("--seed", "")
    assert "Run the kernel's int3 patching path on emulated CPUs and check it." in CliRunner().invoke(
        cli, ["--help"], terminal_width=200).output


def _run_with_terminal_stderr(*args: str) -> tuple[int, str, str]:
    """`textpoke model ARGS` in a subprocess whose stderr is a terminal (a pty)."""
    import os
    import pty
    import subprocess
    import sys

    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "textpoke", "model", *args], stdout=subprocess.PIPE,
                                stderr=slave, env={**os.environ, "TERM": "xterm", "COLUMNS": "120"})
        os.close(slave)
        seen = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        out = proc.stdout.read().decode()
        return proc.wait(), out, seen.decode(errors="replace")
    finally:
        os.close(master)


def test_progress_on_a_terminal_only():
    code, out, err = _run_with_terminal_stderr("--runs", "3", "--steps", "2000")
    assert code == 0 and "no violation" in out
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", err)  # without the terminal's colour codes
    assert "textpoke model x86_64 / proposed" in shown and re.search(r" [0-3]/3 ", shown)  # counts interleavings
    assert out.startswith("textpoke model x86_64 / proposed: ")  # the report itself is unchanged
