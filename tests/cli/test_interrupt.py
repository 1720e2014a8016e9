"""Ctrl-C anywhere, from the first import on: one line, exit 130, no traceback."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

#: Runs `python -m textpoke ARGS` as the shell would, with a KeyboardInterrupt
#: raised exactly when module MODULE is first imported: Ctrl-C at that instant.
_INTERRUPTED_AT = """
import runpy, sys
module, args = sys.argv[1], sys.argv[2:]
class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name == module:
            raise KeyboardInterrupt
        return None
sys.meta_path.insert(0, CtrlC())
sys.argv = ["textpoke", *args]
runpy.run_module("textpoke", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize(("module", "args"), [
    ("click", ["--version"]),  # while the CLI itself loads
    ("textpoke.cli.model", ["model", "--runs", "1"]),  # while the command loads
    ("unicorn", ["model", "--runs", "1"]),  # inside the command, before any handler is installed
    ("rich", ["selftest"]),
    ("textpoke.poke.session", ["patch", "-p", "1", "--site", "main", "--nop"]),
    ("textpoke.poke.recover", ["recover", "-p", "1"]),
])
def test_ctrl_c_while_loading(module, args):
    done = subprocess.run([sys.executable, "-c", _INTERRUPTED_AT, module, *args], capture_output=True, text=True,
                          timeout=60)
    assert (done.returncode, done.stderr, done.stdout) == (130, "textpoke: interrupted\n", "")


def test_ctrl_c_while_the_model_runs():
    """A real SIGINT to a long model run (unicorn's hooks call back into Python)."""
    proc = subprocess.Popen([sys.executable, "-m", "textpoke", "model", "--runs", "10000"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2)  # whatever it is doing by then: loading, building the kernel, interleaving
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()  # (an unheard Ctrl-C must not leave the run going after the test)
        proc.wait()
    assert (proc.returncode, err, out) == (130, "textpoke: interrupted\n", "")
