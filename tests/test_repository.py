"""The repository itself: no build artefacts committed, and its checker (the `dev`
extra's pyflakes) finds nothing in the code it is run on."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Kept clean by pyflakes (`python3 -m pyflakes src tests bench` over the whole tree).
CHECKED = ("src/textpoke/cli", "src/textpoke/model", "src/textpoke/selftest", "src/textpoke/__main__.py",
           "bench/model.py", "tests/cli", "tests/model", "tests/live", "tests/chaos/test_bad_input.py",
           "tests/chaos/test_selftest.py", "tests/test_repository.py")


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
