"""The repository itself: no build artefacts committed, and its checker (the `dev`
extra's pyflakes) finds nothing in the code it is run on."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Kept clean by pyflakes, the whole tree.
CHECKED = ("src", "tests", "bench")


def test_no_wheel_or_archive_is_committed():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    artefacts = [name for name in tracked.stdout.splitlines()
                 if name.endswith((".whl", ".tar.gz", ".zip", ".egg"))]
    assert artefacts == []


def test_the_dev_extra_brings_the_checker():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(requirement.startswith("pyflakes") for requirement in extras["dev"])
    assert set(extras["test"]) <= set(extras["dev"])


def test_pyflakes_finds_nothing():
    pytest.importorskip("pyflakes", reason="install the dev extra: pip install -e '.[dev]'")
    done = subprocess.run([sys.executable, "-m", "pyflakes", *CHECKED], cwd=ROOT, capture_output=True, text=True)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_the_docs_are_in_the_repository():
    """README and DEVELOPERS point to docs/design.md, not to a file outside the checkout."""
    design = ROOT / "docs" / "design.md"
    assert design.is_file() and "## 4. Where the emulated push goes" in design.read_text()
    for name in ("README.md", "DEVELOPERS.md"):
        text = (ROOT / name).read_text()
        assert "../shared" not in text and "docs/design.md" in text


def test_the_public_surface():
    """`import textpoke` gives the error tree at once and the library on first use,
    without loading numpy (the CLI's start-up imports it)."""
    done = subprocess.run([sys.executable, "-c", (
        "import sys, textpoke\n"
        "assert 'numpy' not in sys.modules and 'elftools' not in sys.modules\n"
        "names = [getattr(textpoke, n) for n in textpoke.__all__]\n"
        "assert issubclass(textpoke.RecordingFailed, textpoke.TextpokeError)\n"
        "assert textpoke.encode_call(0x1000, 0x2000) == bytes.fromhex('e8fb0f0000')\n"
        "print(len(names), 'numpy' in sys.modules)\n")], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(22 + 16), "True"]
