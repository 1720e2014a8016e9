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
    # summary rows: calls, calls/s, share, function, ...
    counts = {m.group(2): int(m.group(1).replace(",", ""))
              for m in re.finditer(r"^\s+([\d,]+)\s+\S+\s+\S+%\s+(\w+)", out, re.M)}
    # Every order goes through parse_order -> validate -> price -> compute_tax;
    # within one tracing window the four counts agree up to the orders in flight
    # at the two batch edges (3 workers).
    assert counts["price"] > 0
    assert abs(counts["parse_order"] - counts["compute_tax"]) <= 6
    assert counts["apply_discount"] < counts["price"]
    assert "checks=ok" in out
