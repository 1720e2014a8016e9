"""The HTML flame graph, rendered by headless Chromium: what the page shows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from textpoke.report import FlameReporter

from .chromium import Chromium, install_chromium
from .synth import EXPECTED, program

#: Outermost frames of the program: their totals add up to the top bar's.
TOP = {"main": 10_000, "idle": 8_000, "thread_fn": 600, "work": 500}
#: (call path, total ns) of every bar that is at least a pixel wide.
BARS = {("main",): 10_000, ("main", "emit"): 4_000, ("main", "parse"): 1_400, ("main", "parse", "lex"): 700,
        ("main", "fib"): 1_000, ("main", "fib", "fib"): 400, ("main", "fib", "fib", "fib"): 100,
        ("main", "run"): 1_000, ("main", "run", "deep1"): 400, ("main", "run", "deep1", "deep2"): 300,
        ("idle",): 8_000, ("thread_fn",): 600, ("thread_fn", "inner"): 500, ("work",): 500}

FRAMES_JS = """[...document.querySelectorAll('#flame .frame')].map(e => {
  const r = e.getBoundingClientRect(), f = document.getElementById('flame').getBoundingClientRect();
  return {text: e.textContent, node: +e.dataset.node, left: r.left - f.left, top: r.top - f.top,
          width: r.width, height: r.height};
})"""


@pytest.fixture(scope="module")
def browser():
    binary = install_chromium()
    if binary is None:
        pytest.skip("chromium is not installed and cannot be installed here (apt-get install chromium as root)")
    with Chromium(binary, width=1200, height=900) as chromium:
        yield chromium


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("flame") / "run.html"
    with open(path, "w") as out:
        FlameReporter().render(program(), out)
    return path


def bars(browser: Chromium) -> dict[tuple[str, ...], dict]:
    """Every bar keyed by its call path (read from the geometry: a bar's parent is the
    bar one row up whose span holds it)."""
    frames = browser.evaluate(FRAMES_JS)
    rows: dict[int, list[dict]] = {}
    for f in frames:
        rows.setdefault(round(f["top"] / 18), []).append(f)
    out: dict[tuple[str, ...], dict] = {}
    paths: dict[int, tuple[str, ...]] = {}
    for row in sorted(rows):
        for f in rows[row]:
            if row == 0:
                paths[id(f)] = ()
                continue
            parent = next(p for p in rows[row - 1] if p["left"] - 0.01 <= f["left"] < p["left"] + p["width"])
            paths[id(f)] = (*paths[id(parent)], f["text"])
            out[paths[id(f)]] = f
    return out


def test_the_page_needs_nothing_from_the_network(page):
    text = page.read_text()
    assert not re.search(r"(src|href)\s*=|https?://|@import|url\(", text.replace("http://www.w3.org", ""))


def test_names_and_widths_proportional_to_time(browser, page):
    browser.load(page)
    width = browser.evaluate("document.getElementById('flame').clientWidth")
    assert width > 1000
    shown = bars(browser)
    total = sum(TOP.values())
    assert set(shown) == set(BARS)  # every path with time, none other (lex under emit has no time)
    for path, ns in BARS.items():
        assert shown[path]["width"] == pytest.approx(ns / total * width, abs=1.0), path
    # siblings side by side from their parent's left edge, most time first
    assert shown[("main", "emit")]["left"] == pytest.approx(shown[("main",)]["left"], abs=0.5)
    assert shown[("main", "parse")]["left"] == pytest.approx(
        shown[("main", "emit")]["left"] + 4_000 / total * width, abs=1.0)
    rendered = browser.evaluate("document.body.innerText")
    for name in EXPECTED:
        if name != "worker_loop":  # an exit without an entry: in the table, no bar
            assert name in rendered
    assert "all (19.100 us)" in rendered
    # the table below holds the report's rows
    cells = browser.evaluate("[...document.querySelectorAll('#functions tbody tr')].map(r => "
                             "[...r.cells].map(c => c.textContent))")
    assert cells[0] == ["10.000 us", "2.600 us", "10.000 us", "10.000 us", "10.000 us", "1", "main",
                        "1 cut off by the end"]
    assert [row[6] for row in cells] == list(EXPECTED)


def test_hover_shows_times_and_click_zooms(browser, page):
    browser.load(page)
    width = browser.evaluate("document.getElementById('flame').clientWidth")
    origin = browser.evaluate("(() => { const r = document.getElementById('flame').getBoundingClientRect();"
                              " return [r.left, r.top]; })()")
    parse = bars(browser)[("main", "parse")]
    browser.mouse_move(origin[0] + parse["left"] + parse["width"] / 2, origin[1] + parse["top"] + 8)
    assert browser.evaluate("document.getElementById('details').textContent") == (
        "parse: total 1.400 us (7.3%), self 700 ns, 1 call")
    main = bars(browser)[("main",)]
    browser.mouse_move(origin[0] + main["left"] + 5, origin[1] + main["top"] + 8)
    assert browser.evaluate("document.getElementById('details').textContent") == (
        "main: total 10.000 us (52.4%), self 2.600 us, 1 call (1 cut off by the end)")
    browser.click(origin[0] + main["left"] + 5, origin[1] + main["top"] + 8)
    zoomed = browser.evaluate(FRAMES_JS)
    assert zoomed[0]["text"] == "main" and zoomed[0]["width"] == pytest.approx(width, abs=0.5)
    emit = next(f for f in zoomed if f["text"] == "emit")
    assert emit["width"] == pytest.approx(4_000 / 10_000 * width, abs=1.0)
    assert not any(f["text"] in ("idle", "work") for f in zoomed)
    browser.click(origin[0] + 5, origin[1] + 8)  # the top bar: back out
    assert browser.evaluate(FRAMES_JS)[0]["text"] == "all (19.100 us)"
