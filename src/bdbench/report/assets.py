"""The page's inline CSS and JavaScript: kept here so the HTML builder reads as structure only."""

CSS = """
:root { --ink: #1b1f24; --muted: #57606a; --line: #d0d7de; --band: #f6f8fa; --accent: #0b5cad; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: var(--ink); margin: 0 auto; max-width: 1250px; padding: 18px 28px 60px; }
h1 { font-size: 26px; margin: 8px 0 4px; }
h2 { font-size: 20px; margin: 34px 0 8px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
h3 { font-size: 16px; margin: 18px 0 6px; }
p.note, .meta { color: var(--muted); font-size: 13.5px; margin: 4px 0 10px; }
nav { font-size: 14px; margin: 8px 0 4px; }
nav a { color: var(--accent); margin-right: 14px; text-decoration: none; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0 12px; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 9px; text-align: left; vertical-align: top; }
th { background: var(--band); font-weight: 600; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.rank1 td { background: #eaf4ea; }
.figure { max-width: 100%; height: auto; display: block; margin: 6px 0 14px; }
.figrow { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
.figrow > div { flex: 1 1 480px; min-width: 0; }
.empty { color: var(--muted); font-style: italic; margin: 6px 0; }
.status-error { color: #b3261e; font-weight: 600; }
.status-not_applicable { color: #8a5a00; font-weight: 600; }
.scroll { max-height: 620px; overflow: auto; border: 1px solid var(--line); }
.scroll table { margin: 0; }
.scroll td { white-space: nowrap; }
.scroll th { position: sticky; top: 0; cursor: pointer; user-select: none; }
.scroll th[data-dir="asc"]::after { content: " \\25B2"; }
.scroll th[data-dir="desc"]::after { content: " \\25BC"; }
#filter { font: inherit; padding: 5px 8px; width: 340px; margin: 4px 12px 8px 0; }
td.reason { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12px; white-space: pre-wrap;
            max-width: 640px; word-break: break-word; }
@media print {
  body { max-width: none; padding: 0; font-size: 11px; }
  nav, #filter, #filter-count { display: none; }
  .scroll { max-height: none; overflow: visible; border: 0; }
  h2 { break-after: avoid; }
  .figure, tr { break-inside: avoid; }
}
"""

# Runs first, in <head>: counts uncaught errors and failed resource loads so a headless test can read them
# from the DOM (document.body.dataset.jsErrors) without a DevTools connection.
ERROR_TRAP = """
window.__bdbenchErrors = [];
window.addEventListener("error", function (event) {
  var where = event.lineno ? " (line " + event.lineno + ")" : "";
  window.__bdbenchErrors.push(String(event.message || (event.target && event.target.src) || "error") + where);
  if (document.body) {
    document.body.dataset.jsErrors = String(window.__bdbenchErrors.length);
    document.body.dataset.jsErrorLog = window.__bdbenchErrors.join(" | ");
  }
}, true);
"""

TABLE_SCRIPT = """
(function () {
  var table = document.getElementById("experiment-table");
  var body = table.tBodies[0];
  var rows = Array.prototype.slice.call(body.rows);
  var filter = document.getElementById("filter");
  var count = document.getElementById("filter-count");
  function cellValue(row, index) {
    var cell = row.cells[index];
    var raw = cell.getAttribute("data-value");
    if (raw !== null && raw !== "" && !isNaN(Number(raw))) { return Number(raw); }
    return cell.textContent.toLowerCase();
  }
  Array.prototype.forEach.call(table.tHead.rows[0].cells, function (header, index) {
    header.title = "click to sort";
    header.addEventListener("click", function () {
      var dir = header.dataset.dir === "asc" ? "desc" : "asc";
      Array.prototype.forEach.call(table.tHead.rows[0].cells, function (h) { delete h.dataset.dir; });
      header.dataset.dir = dir;
      var sign = dir === "asc" ? 1 : -1;
      rows.sort(function (a, b) {
        var x = cellValue(a, index), y = cellValue(b, index);
        if (typeof x !== typeof y) { return typeof x === "number" ? -1 : 1; }
        return x < y ? -sign : x > y ? sign : 0;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
  function applyFilter() {
    var words = filter.value.toLowerCase().split(/\\s+/).filter(Boolean);
    var shown = 0;
    rows.forEach(function (row) {
      var text = row.textContent.toLowerCase();
      var keep = words.every(function (w) { return text.indexOf(w) !== -1; });
      row.style.display = keep ? "" : "none";
      if (keep) { shown += 1; }
    });
    count.textContent = shown + " of " + rows.length + " experiments shown";
  }
  filter.addEventListener("input", applyFilter);
  applyFilter();
  table.dataset.ready = String(rows.length);
  document.body.dataset.jsErrors = String(window.__bdbenchErrors.length);
})();
"""
