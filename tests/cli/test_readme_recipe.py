"""The README's "Trace your own program" recipes, run exactly as written: C and C++
with gcc/g++, make, CMake. Each build must give every function an fentry site
that `textpoke sites --kind fentry` lists, and no gmon.out when the program runs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

C_PROGRAM = """\
#include <stdio.h>
int work(int x);
int main(void) { long s = 0; for (int i = 0; i < 1000; i++) s += work(i); printf("%ld\\n", s); return 0; }
"""
C_UTIL = "__attribute__((noinline)) int work(int x) { return x * 3 + 1; }\n"
CXX_PROGRAM = """\
#include <cstdio>
namespace shop { struct Till { __attribute__((noinline)) long work(int x) const { return x * 3L + 1; } }; }
int main() { shop::Till till; long s = 0; for (int i = 0; i < 1000; i++) s += till.work(i); std::printf("%ld\\n", s); }
"""
EXPECTED_OUTPUT = "1499500\n"


def _blocks() -> list[list[str]]:
    """The ```sh blocks of the README's recipe section, as command lines."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Trace your own program"):]
    section = section[:section.index("\n## ", 1)]
    return [[line for line in block.splitlines() if line.strip()]
            for block in re.findall(r"```sh\n(.*?)```", section, re.DOTALL)]


def _run(line: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    if line.startswith("textpoke "):
        line = f"{sys.executable} -m {line}"
    done = subprocess.run(["bash", "-c", line], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
    return done


def _fentry_functions(binary: Path) -> list[str]:
    done = _run(f"textpoke sites {binary} --kind fentry --json", binary.parent)
    import json

    return [site["function"] for site in json.loads(done.stdout)]


def _runs_cleanly(binary: Path) -> None:
    """The program works, and nothing of gprof's runtime is in it (no gmon.out)."""
    done = subprocess.run([str(binary)], cwd=binary.parent, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, EXPECTED_OUTPUT)
    assert not (binary.parent / "gmon.out").exists()


def _needs(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")


def test_the_recipe_has_its_three_blocks():
    blocks = _blocks()
    assert len(blocks) == 3
    compile_c, link_c, compile_cxx, link_cxx, sites = blocks[0]
    assert compile_c.startswith("gcc ") and compile_cxx.startswith("g++ ")
    assert "-pg" in compile_c and "-pg" not in link_c and "-pg" not in link_cxx
    assert sites == "textpoke sites ./prog --kind fentry"


def test_c_and_cxx_lines(tmp_path):
    _needs("gcc", "g++")
    compile_c, link_c, compile_cxx, link_cxx, sites = _blocks()[0]
    c_dir, cxx_dir = tmp_path / "c", tmp_path / "cxx"
    c_dir.mkdir()
    cxx_dir.mkdir()
    (c_dir / "prog.c").write_text(C_PROGRAM + C_UTIL)
    (cxx_dir / "prog.cpp").write_text(CXX_PROGRAM)
    for directory, lines in ((c_dir, (compile_c, link_c)), (cxx_dir, (compile_cxx, link_cxx))):
        for line in lines:
            _run(line, directory)
        listed = _run(sites, directory).stdout
        assert "fentry  main+0x0" in listed, listed
        _runs_cleanly(directory / "prog")
    assert sorted(_fentry_functions(c_dir / "prog")) == ["main", "work"]
    cxx_functions = _fentry_functions(cxx_dir / "prog")
    assert "main" in cxx_functions and any("Till" in name and "work" in name for name in cxx_functions)


def test_make_line(tmp_path):
    _needs("gcc", "make")
    (make_line,) = _blocks()[1]
    (tmp_path / "prog.c").write_text(C_PROGRAM)
    (tmp_path / "util.c").write_text(C_UTIL)
    (tmp_path / "Makefile").write_text("prog: prog.o util.o\n")  # make's built-in rules do the rest
    _run(make_line, tmp_path)
    assert sorted(_fentry_functions(tmp_path / "prog")) == ["main", "work"]
    _runs_cleanly(tmp_path / "prog")
    # No Makefile at all: `make prog.o prog` with the same variables, as the README says.
    single = tmp_path / "single"
    single.mkdir()
    (single / "prog.c").write_text(C_PROGRAM + C_UTIL)
    _run(f"{make_line} prog.o prog", single)
    assert sorted(_fentry_functions(single / "prog")) == ["main", "work"]
    _runs_cleanly(single / "prog")


def test_cmake_lines(tmp_path):
    _needs("gcc", "g++", "cmake", "make")
    (tmp_path / "prog.c").write_text(C_PROGRAM + C_UTIL)
    (tmp_path / "prog.cpp").write_text(CXX_PROGRAM)
    (tmp_path / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.15)\nproject(prog C CXX)\n"
        "add_executable(prog prog.c)\nadd_executable(progxx prog.cpp)\n")
    for line in _blocks()[2]:
        _run(line, tmp_path)
    build = tmp_path / "build"
    assert sorted(_fentry_functions(build / "prog")) == ["main", "work"]
    assert "main" in _fentry_functions(build / "progxx")
    _runs_cleanly(build / "prog")
    _runs_cleanly(build / "progxx")
