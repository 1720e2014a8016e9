"""``textpoke report FILE --html OUT.html``: the report as one self-contained page.

The page holds a flame graph of the call paths (threads merged: each bar is one
call path, its width that path's total time, its children below it, the
outermost frames at the top) above the same per-function table as the text
report.  Hovering a bar shows its times and calls; clicking one zooms in on it
(its width becomes the page's), clicking the top bar zooms out.  Everything is
in the file: the data as JSON, the drawing code and the styles inline, no
network request of any kind, so it opens anywhere, offline, and can be mailed.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from typing import TextIO

from ._paths import PathTimes, Tree
from ._text import duration_text
from ._view import RecordingLike
from .graph import check_graph_recording
from .timed import TimedSummary, TimeKey, summarize_times

_STYLE = """
body { font: 13px/1.4 system-ui, sans-serif; margin: 16px; color: #222; }
h1 { font-size: 17px; margin: 0 0 6px; }
pre.notes { margin: 0 0 10px; color: #555; white-space: pre-wrap; }
#details { min-height: 1.4em; margin: 6px 0; font-family: ui-monospace, monospace; }
#flame { position: relative; width: 100%; overflow: hidden; border-top: 1px solid #ddd; }
#flame .frame { position: absolute; box-sizing: border-box; height: 17px; overflow: hidden;
  white-space: nowrap; text-overflow: ellipsis; font: 11px/17px ui-monospace, monospace; padding: 0 3px;
  border-right: 1px solid #fff; border-bottom: 1px solid #fff; cursor: pointer; }
#flame .frame:hover { outline: 1px solid #000; z-index: 1; }
table { border-collapse: collapse; margin-top: 14px; font-family: ui-monospace, monospace; font-size: 12px; }
th, td { padding: 1px 8px; text-align: right; }
th { border-bottom: 1px solid #999; }
td.name, th.name, td.notes, th.notes { text-align: left; }
"""

# The drawing code (plain DOM, no library).  data.nodes: [parent, name, total, self,
# calls, notes] in depth-first order; node 0 is the root ("all").
_SCRIPT = r"""
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("flame-data").textContent);
  var nodes = data.nodes, names = data.names, ROW = 18;
  var kids = nodes.map(function () { return []; });
  for (var i = 1; i < nodes.length; i++) kids[nodes[i][0]].push(i);
  var flame = document.getElementById("flame"), details = document.getElementById("details");

  function time(ns) {
    if (ns < 1000) return ns + " ns";
    if (ns < 1e6) return (ns / 1e3).toFixed(3) + " us";
    if (ns < 1e9) return (ns / 1e6).toFixed(3) + " ms";
    return (ns / 1e9).toFixed(3) + " s";
  }
  function color(name) {
    var h = 0;
    for (var i = 0; i < name.length; i++) h = (h * 31 + name.charCodeAt(i)) >>> 0;
    return "hsl(" + (10 + h % 40) + ", " + (70 + h % 20) + "%, " + (58 + (h >> 8) % 12) + "%)";
  }
  function describe(n, top) {
    var node = nodes[n], share = nodes[top][2] ? (100 * node[2] / nodes[top][2]).toFixed(1) + "%" : "-";
    if (!n) return "all threads: total " + time(node[2]) + " (" + share + ")";
    var text = names[node[1]] + ": total " + time(node[2]) + " (" + share + "), self " +
      time(node[3]) + ", " + node[4] + (node[4] === 1 ? " call" : " calls");
    return node[5] ? text + " (" + node[5] + ")" : text;
  }
  function draw(top) {
    flame.textContent = "";
    var width = flame.clientWidth, scale = nodes[top][2] ? width / nodes[top][2] : 0, depth = 0;
    var stack = [[top, 0, 0]];
    while (stack.length) {
      var item = stack.pop(), n = item[0], x = item[1], d = item[2], node = nodes[n];
      var w = node[2] * scale;
      if (w < 0.5 && n !== top) continue;
      var div = document.createElement("div");
      div.className = "frame";
      div.dataset.node = n;
      div.style.left = x + "px";
      div.style.width = (n === top ? width : w) + "px";
      if (w < 8) div.style.padding = "0";  // so a narrow bar is as narrow as its time
      if (w < 3) div.style.borderRight = "0";
      div.style.top = d * ROW + "px";
      div.style.background = n ? color(names[node[1]]) : "#e6e6e6";
      div.textContent = n ? names[node[1]] : "all (" + time(node[2]) + ")";
      div.title = describe(n, top);
      flame.appendChild(div);
      depth = Math.max(depth, d + 1);
      var cx = x, children = kids[n], push = [];
      for (var c = 0; c < children.length; c++) {
        push.push([children[c], cx, d + 1]);
        cx += nodes[children[c]][2] * scale;
      }
      for (var p = push.length - 1; p >= 0; p--) stack.push(push[p]);
    }
    flame.style.height = depth * ROW + "px";
    flame.dataset.top = top;
  }
  flame.addEventListener("mouseover", function (e) {
    var t = e.target.closest(".frame");
    if (t) details.textContent = describe(+t.dataset.node, +flame.dataset.top);
  });
  flame.addEventListener("click", function (e) {
    var t = e.target.closest(".frame");
    if (!t) return;
    var n = +t.dataset.node, top = +flame.dataset.top;
    draw(n === top ? (top ? nodes[top][0] : 0) : n);
  });
  window.addEventListener("resize", function () { draw(+flame.dataset.top || 0); });
  draw(0);
})();
"""


def _script_json(value: object) -> str:
    """JSON that can sit inside a <script> element (no ``</script>`` can end it early)."""
    return json.dumps(value, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e")


def flame_data(tree: Tree) -> dict[str, object]:
    """The tree as the page's script reads it (depth-first, most time first)."""
    names: list[str] = []
    name_id: dict[str, int] = {}
    order = [0] + [node for node, _ in tree.walk()]
    position = {node: i for i, node in enumerate(order)}
    rows: list[list[object]] = []
    for node in order:
        label = tree.label[node]
        if label not in name_id:
            name_id[label] = len(names)
            names.append(label)
        notes = [(tree.value("unwound", node), "unwound"), (tree.value("cut_end", node), "cut off by the end"),
                 (tree.value("entry_only", node), "entry-only")]
        up = tree.parent[node]
        rows.append([position[up] if up >= 0 else -1, name_id[label], tree.value("total", node),
                     tree.value("self", node), tree.value("calls", node),
                     ", ".join(f"{n} {what}" for n, what in notes if n)])
    rows[0][2] = sum(int(tree.stats[2, c]) for c in tree.children[0])
    return {"names": names, "nodes": rows}


def _table(summary: TimedSummary) -> str:
    head = ("total", "self", "avg", "min", "max", "calls")
    out = ["<table id=\"functions\"><thead><tr>", *(f"<th>{h}</th>" for h in head),
           "<th class=\"name\">function</th><th class=\"notes\">notes</th></tr></thead><tbody>"]
    for r in summary.rows:
        cells = [r.total_ns if r.frames else None, r.self_ns if r.frames else None, r.avg_ns, r.min_ns, r.max_ns]
        out.append("<tr>" + "".join(f"<td>{'-' if v is None else duration_text(v)}</td>" for v in cells)
                   + f"<td>{r.calls:,}</td><td class=\"name\">{html.escape(r.name)}</td>"
                   f"<td class=\"notes\">{html.escape(r.notes())}</td></tr>")
    out.append("</tbody></table>")
    return "".join(out)


@dataclass(frozen=True)
class FlameReporter:
    """The self-contained HTML page (see the module docstring)."""

    sort: TimeKey = TimeKey.TOTAL

    def render(self, recording: RecordingLike, out: TextIO) -> None:
        check_graph_recording(recording, "flame graph")
        paths = PathTimes(recording)
        summary = summarize_times(recording, sort=self.sort, paths=paths)
        tree, _ = paths.tree()
        title = f"textpoke: {recording.command} (pid {recording.pid})"
        notes = "\n".join((*summary.head, *summary.metadata_lines))
        out.write(
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>\n"
            f"<h1>{html.escape(title)}</h1>\n<pre class=\"notes\">{html.escape(notes)}</pre>\n"
            "<div id=\"details\">hover a bar for its times; click to zoom in, click the top bar to zoom out</div>\n"
            "<div id=\"flame\"></div>\n"
            f"{_table(summary)}\n"
            f"<script id=\"flame-data\" type=\"application/json\">{_script_json(flame_data(tree))}</script>\n"
            f"<script>{_SCRIPT}</script>\n</body></html>\n"
        )
