"""Starting the CLI: `--version` and `--help` load no command's machinery, bare
`textpoke` is the help (exit 0), and the exit statuses are in `--help` and the README."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from textpoke import _errors
from textpoke.cli import COMMANDS, EXIT_CODES

ROOT = Path(__file__).resolve().parents[2]
#: What a command may load when it runs, never when the CLI merely starts.
HEAVY = ("numpy", "unicorn", "iced_x86", "elftools", "rich")


def _textpoke(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-X", "importtime", "-m", "textpoke", *args],
                          capture_output=True, text=True, timeout=60)


def _imported(stderr: str) -> set[str]:
    """Top-level packages a `python -X importtime` run imported."""
    names = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", stderr, re.MULTILINE)
    assert names, stderr
    return {name.split(".")[0] for name in names}


@pytest.mark.parametrize("args", [["--version"], ["--help"], [], ["model", "--help"], ["patch", "--help"],
                                  ["recover", "--help"], ["selftest", "--help"]])
def test_starting_loads_no_heavy_module(args):
    done = _textpoke(*args)
    assert done.returncode == 0, done.stderr
    assert _imported(done.stderr).isdisjoint(HEAVY), sorted(_imported(done.stderr) & set(HEAVY))


def test_version():
    done = _textpoke("--version")
    assert done.stdout == "textpoke, version 0.1.0\n"


def test_bare_textpoke_prints_the_help_and_succeeds():
    bare, helped = _textpoke(), _textpoke("--help")
    assert (bare.returncode, bare.stdout) == (0, helped.stdout)
    assert bare.stdout.startswith("Usage: textpoke [OPTIONS] COMMAND [ARGS]...")


def test_help_lists_every_command_with_its_line():
    listed = _textpoke("--help").stdout
    commands = listed[listed.index("Commands:"):listed.index("Exit status")]
    names = re.findall(r"^  (\S+)\s", commands, re.MULTILINE)
    assert names == list(COMMANDS)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_listed_command_is_its_module(name):
    """Adding a command is one line of COMMANDS: the module of that name defines it."""
    command = importlib.import_module(f"textpoke.cli.{name}").command
    assert command.name == name and COMMANDS[name].endswith(".")


def _error_classes() -> list[type[_errors.TextpokeError]]:
    found, todo = [], [_errors.TextpokeError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return found


def test_help_names_every_exit_status():
    codes = {cls.exit_code for cls in _error_classes()}
    assert codes <= set(EXIT_CODES), sorted(codes - set(EXIT_CODES))
    helped = _textpoke("--help").stdout
    shown = dict(re.findall(r"^    (\d+)\s+(.+)$", helped[helped.index("Exit status"):], re.MULTILINE))
    assert {int(code): text for code, text in shown.items()} == EXIT_CODES


def test_readme_has_the_same_exit_statuses():
    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| (\d+) \| (.+?) \|$", readme, re.MULTILINE))
    assert {int(code): text for code, text in rows.items()} == EXIT_CODES


def test_an_unknown_command_is_a_usage_error():
    done = _textpoke("nosuch")
    assert done.returncode == 2 and "No such command 'nosuch'" in done.stderr
    assert "Traceback" not in done.stderr


#: Modules a capture in a pipe has no use for (rich draws only on a terminal; numpy.ma
#: comes with a plain np.unique; the reporters other than the summary): ~80 ms of start-up. (difflib stays: click's parser
#: imports it for every short option, to suggest names.)
NOT_FOR_A_PIPE = ("rich", "numpy.ma", "textpoke.report.flame", "textpoke.report.chrome", "textpoke.report.graph")


def test_a_capture_in_a_pipe_loads_no_terminal_or_suggestion_module(build_target, tmp_path):
    program = build_target("hot")
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "textpoke", "record", "--count", "-f", "work",
                           "-o", str(tmp_path / "r.tpk"), "--", str(program), "1000", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "1,000 calls counted, 0 lost" in done.stderr
    names = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", done.stderr, re.MULTILINE))
    assert "numpy" in names and "textpoke.capture.run" in names  # it did load the engine
    unwanted = {n for n in names if n.split(".")[0] in NOT_FOR_A_PIPE or n in NOT_FOR_A_PIPE or n.startswith("numpy.ma.")}
    assert not unwanted, sorted(unwanted)
