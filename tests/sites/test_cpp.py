"""C++: demangled names in every output, globs over demangled and mangled names."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from textpoke.sites import SiteKind, find_sites, open_elf
from textpoke.sites.names import short_name, short_names

from .conftest import CXX_FENTRY_FLAGS, TARGETS, build

EXPECTED = {
    "main",
    "plain_c",
    "ns::Foo::Foo(int)",
    "ns::Foo::bar(int) const",
    "ns::Foo::bar(double) const",
    "ns::Foo::get() const",
    "int ns::add<int>(int, int)",
    "long ns::add<long>(long, long)",
}


@pytest.fixture(scope="module")
def cpp() -> Path:
    return build(TARGETS / "sites_cpp.cpp", cflags=CXX_FENTRY_FLAGS, ldflags=("-no-pie",), compiler="g++",
                 name="sites_cpp")


def _functions(binary: Path, *globs: str) -> set[str]:
    return {s.function for s in find_sites(binary, kinds={SiteKind.FENTRY}, functions=list(globs))}


def test_fentry_sites_have_demangled_names(cpp: Path) -> None:
    assert _functions(cpp) == EXPECTED


def test_names_match_nm_demangled(cpp: Path) -> None:
    """Oracle: binutils' demangler (nm -C) names the same functions (up to spacing)."""
    if shutil.which("nm") is None:
        pytest.skip("nm is needed")
    out = subprocess.run(["nm", "-C", "--defined-only", str(cpp)], check=True, capture_output=True,
                         text=True).stdout
    theirs = {line.split(" ", 2)[2] for line in out.splitlines() if line.split(" ", 2)[1] in "tTwW"}
    assert EXPECTED <= theirs


@pytest.mark.parametrize(
    ("globs", "expected"),
    [
        (("ns::Foo::*",), {"ns::Foo::Foo(int)", "ns::Foo::bar(int) const", "ns::Foo::bar(double) const",
                           "ns::Foo::get() const"}),
        (("ns::Foo::bar",), {"ns::Foo::bar(int) const", "ns::Foo::bar(double) const"}),
        (("ns::Foo::bar(double) const",), {"ns::Foo::bar(double) const"}),
        (("ns::add",), {"int ns::add<int>(int, int)", "long ns::add<long>(long, long)"}),
        (("ns::add<long>",), {"long ns::add<long>(long, long)"}),
        (("*add<int>*",), {"int ns::add<int>(int, int)"}),
        (("_ZNK2ns3Foo3getEv",), {"ns::Foo::get() const"}),
        (("_ZN2ns3Foo*",), {"ns::Foo::Foo(int)"}),
        (("plain_c", "main"), {"plain_c", "main"}),
    ],
)
def test_globs_match_demangled_short_and_mangled_names(cpp: Path, globs: tuple[str, ...], expected: set[str]) -> None:
    assert _functions(cpp, *globs) == expected


def test_call_sites_name_their_callees_demangled(cpp: Path) -> None:
    calls = find_sites(cpp, kinds={SiteKind.CALL}, functions=["main"])
    assert EXPECTED - {"main"} <= {s.target_name for s in calls}
    to_bar = find_sites(cpp, kinds={SiteKind.CALL}, calls_to=["ns::Foo::bar"])
    assert sorted(s.target_name for s in to_bar) == ["ns::Foo::bar(double) const", "ns::Foo::bar(int) const"]
    assert open_elf(cpp).name_of(to_bar[0].target) in {"ns::Foo::bar(double) const", "ns::Foo::bar(int) const"}  # type: ignore[arg-type]


def test_cli_table_and_json_are_demangled(cpp: Path) -> None:
    run = [sys.executable, "-m", "textpoke", "sites", str(cpp), "-f", "ns::Foo::*"]
    table = subprocess.run(run, capture_output=True, text=True, check=True).stdout
    assert "ns::Foo::bar(double) const+0x0" in table and "_ZN" not in table
    entries = json.loads(subprocess.run([*run, "--json"], capture_output=True, text=True, check=True).stdout)
    assert {e["function"] for e in entries} == {"ns::Foo::Foo(int)", "ns::Foo::bar(int) const",
                                               "ns::Foo::bar(double) const", "ns::Foo::get() const"}
    calls = json.loads(subprocess.run([sys.executable, "-m", "textpoke", "sites", str(cpp), "--kind", "call",
                                       "-f", "main", "--json"], capture_output=True, text=True, check=True).stdout)
    assert "long ns::add<long>(long, long)" in {e["target_name"] for e in calls}


def test_functions_keep_the_mangled_name_as_an_alias(cpp: Path) -> None:
    image = open_elf(cpp)
    (get,) = [f for f in image.functions if f.name == "ns::Foo::get() const"]
    assert "_ZNK2ns3Foo3getEv" in get.aliases and "ns::Foo::get" in get.aliases


@pytest.mark.parametrize(
    ("name", "short", "others"),
    [
        ("int ns::add<int>(int, int)", "ns::add<int>", ("ns::add<int>", "ns::add")),
        ("ns::Foo::bar(int) const", "ns::Foo::bar", ("ns::Foo::bar",)),
        ("ns::Foo::operator()(int) const", "ns::Foo::operator()", ("ns::Foo::operator()",)),
        ("ns::Foo::operator bool() const", "ns::Foo::operator bool", ("ns::Foo::operator bool",)),
        ("std::vector<int, std::allocator<int> > ns::make<int>()", "ns::make<int>", ("ns::make<int>", "ns::make")),
        ("(anonymous namespace)::helper(int)", "(anonymous namespace)::helper", ("(anonymous namespace)::helper",)),
        ("ns::Foo::bar(double) const [clone .cold]", "ns::Foo::bar", ("ns::Foo::bar",)),
        ("ns::X<int>::operator>(int)", "ns::X<int>::operator>", ("ns::X<int>::operator>",)),
        ("plain_c", "plain_c", ()),
    ],
)
def test_short_names(name: str, short: str, others: tuple[str, ...]) -> None:
    assert short_name(name) == short
    assert short_names(name) == others
