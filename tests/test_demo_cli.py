"""`textpoke demo` end to end, as the README runs it."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_end_to_end():
    result = subprocess.run([sys.executable, "-m", "textpoke", "demo", "--duration", "1"],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"patched (\d+) fentry sites in one batch", out)
    # Lossless, with the demo's threads unpinned at normal priority on every CPU.
    assert re.search(r"traced pid \d+ for [\d.]+ s: [\d,]+ calls \([\d,]+ records\), 0 lost", out), out
    assert "lossless" in out
    # summary rows: total, self, avg, min, max (each "N unit"), calls, function
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["total", "self"])
    counts = {}
    for line in lines[start + 1:]:
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) < 7:
            break
        counts[cells[6]] = int(cells[5].replace(",", ""))
    # Every order goes through parse_order -> validate -> price -> compute_tax,
    # so the four counts agree up to the batch edges: a batch switches its
    # sites one pwrite after another (as the kernel's does), and orders run
    # while the first sites already trap and the last do not yet. That is a
    # few orders per worker per edge, never a share of the calls: a lost or
    # doubled record anywhere would break the bound.
    assert counts["price"] > 10_000
    edge = 64 + counts["price"] // 10_000
    for name in ("parse_order", "validate", "process_order"):
        assert abs(counts[name] - counts["compute_tax"]) <= edge, (name, counts)
    # apply_discount runs for every third order id, ship for every tenth.
    assert abs(3 * counts["apply_discount"] - counts["price"]) <= 3 * edge + counts["price"] // 1000
    assert abs(10 * counts["ship"] - counts["price"]) <= 10 * edge + counts["price"] // 1000
    assert "checks=ok" in out
