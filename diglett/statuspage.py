"""The status page at / of the HTTP listener: one self-contained HTML document.

Rendered on the server from the same objects as /api/tunnels, so it is complete without
JavaScript; a small inline script then fetches api/tunnels every REFRESH_MS and redraws the
table with textContent (never innerHTML). No external assets, no build step. Every value
from the server is escaped, although names are validated before they get here.
"""

import datetime
import html
import time

from diglett import __version__

REFRESH_MS = 2000  # how often the page fetches api/tunnels

COLUMNS = ("Host", "Port", "Agent key", "Agent address", "Connected", "In", "Out", "Streams")

_STYLE = """
:root { color-scheme: light; --ink: #1d2330; --muted: #667085; --line: #e4e7ec; --accent: #2f6fde; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: var(--ink); background: #f6f7f9; }
header { background: #fff; border-bottom: 1px solid var(--line); padding: 18px 32px; }
header h1 { margin: 0; font-size: 20px; font-weight: 600; }
header h1 span { color: var(--accent); }
header p { margin: 4px 0 0; color: var(--muted); font-size: 13px; }
main { padding: 24px 32px; }
.cards { display: flex; gap: 16px; margin-bottom: 20px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 12px 18px;
        min-width: 150px; }
.card b { display: block; font-size: 22px; font-weight: 600; }
.card small { color: var(--muted); }
table { width: 100%; border-collapse: collapse; background: #fff; border: 1px solid var(--line);
        border-radius: 8px; overflow: hidden; }
th, td { padding: 9px 14px; text-align: left; border-bottom: 1px solid var(--line);
         white-space: nowrap; }
th { background: #fafbfc; color: var(--muted); font-size: 12px; font-weight: 600;
     text-transform: uppercase; letter-spacing: .04em; }
tbody tr:last-child td { border-bottom: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th.num { text-align: right; }
code { font: 13px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
td.empty { color: var(--muted); text-align: center; padding: 28px; }
footer { color: var(--muted); font-size: 12px; margin-top: 12px; }
.live { display: inline-block; width: 8px; height: 8px; border-radius: 50%; background: #12b76a;
        margin-right: 6px; vertical-align: middle; }
.stale .live { background: #f79009; }
"""

# Redraws the table from api/tunnels; values go in with textContent only.
_SCRIPT = """
(function () {
  var refreshes = 0;
  function size(n) {
    var units = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : String(n)) + " " + units[i];
  }
  function age(seconds) {
    seconds = Math.max(0, Math.floor(seconds));
    var d = Math.floor(seconds / 86400), h = Math.floor(seconds % 86400 / 3600),
        m = Math.floor(seconds % 3600 / 60), s = seconds % 60;
    if (d) return d + "d " + h + "h";
    if (h) return h + "h " + m + "m";
    if (m) return m + "m " + s + "s";
    return s + "s";
  }
  function cell(row, text, cls, mono) {
    var td = document.createElement("td");
    if (cls) td.className = cls;
    if (mono) { var c = document.createElement("code"); c.textContent = text; td.appendChild(c); }
    else td.textContent = text;
    row.appendChild(td);
  }
  function draw(tunnels) {
    var body = document.getElementById("tunnels"), now = Date.now() / 1000;
    var rows = [], open = 0, bytesIn = 0, bytesOut = 0;
    tunnels.forEach(function (t) {
      var tr = document.createElement("tr");
      tr.dataset.subdomain = t.subdomain;
      var since = Date.parse(t.started) / 1000;
      cell(tr, t.public_host, "", true);
      cell(tr, String(t.port), "num");
      cell(tr, t.fingerprint, "", true);
      cell(tr, t.remote, "", true);
      cell(tr, age(now - since), "");
      tr.lastChild.title = t.started;
      cell(tr, size(t.bytes_in), "num");
      cell(tr, size(t.bytes_out), "num");
      cell(tr, t.streams_open + " open / " + t.streams_opened, "num");
      open += t.streams_open; bytesIn += t.bytes_in; bytesOut += t.bytes_out;
      rows.push(tr);
    });
    if (!rows.length) {
      var tr = document.createElement("tr");
      var td = document.createElement("td");
      td.colSpan = COLUMN_COUNT; td.className = "empty"; td.textContent = "No tunnel connected.";
      tr.appendChild(td); rows.push(tr);
    }
    body.replaceChildren.apply(body, rows);
    document.getElementById("count").textContent = String(tunnels.length);
    document.getElementById("streams").textContent = String(open);
    document.getElementById("traffic").textContent = size(bytesIn) + " / " + size(bytesOut);
  }
  function refresh() {
    fetch("api/tunnels", {cache: "no-store", credentials: "same-origin"})
      .then(function (r) { if (!r.ok) throw new Error(r.status); return r.json(); })
      .then(function (tunnels) {
        draw(tunnels);
        refreshes++;
        var footer = document.getElementById("updated");
        footer.className = "";
        footer.dataset.refreshes = String(refreshes);
        document.getElementById("stamp").textContent =
          "live, updated " + new Date().toLocaleTimeString();
      })
      .catch(function (e) {
        document.getElementById("updated").className = "stale";
        document.getElementById("stamp").textContent = "cannot refresh (" + e.message + ")";
      });
  }
  setInterval(refresh, REFRESH_MS);
})();
"""


def render(server, tunnels, now=None, extra=""):
    """The whole page for ``tunnels`` (the objects of /api/tunnels); ``extra`` is more HTML
    for the end of the page, already escaped (the grants panel of diglett.statusgrants)."""
    now = time.time() if now is None else now
    esc = html.escape
    config = server.config
    rows = "".join(_row(t, now) for t in tunnels) or (
        '<tr><td class="empty" colspan="%d">No tunnel connected.</td></tr>' % len(COLUMNS))
    heads = "".join('<th%s>%s</th>' % (' class="num"' if name in ("Port", "In", "Out", "Streams")
                                       else "", esc(name)) for name in COLUMNS)
    bytes_in = sum(t["bytes_in"] for t in tunnels)
    bytes_out = sum(t["bytes_out"] for t in tunnels)
    script = (_SCRIPT.replace("REFRESH_MS", str(REFRESH_MS))
              .replace("COLUMN_COUNT", str(len(COLUMNS))))
    return _PAGE.format(
        domain=esc(config.domain), version=esc(__version__),
        agent_port=esc(str(server.agent_port)), style=_STYLE, heads=heads, rows=rows,
        count=len(tunnels), streams=sum(t["streams_open"] for t in tunnels),
        traffic=esc("%s / %s" % (_size(bytes_in), _size(bytes_out))),
        rendered=esc(time.strftime("%H:%M:%S", time.localtime(now))), script=script,
        extra=extra)


def _row(tunnel, now):
    esc = html.escape
    started = tunnel["started"]
    cells = (
        "<td><code>%s</code></td>" % esc(tunnel["public_host"]),
        '<td class="num">%s</td>' % esc(str(tunnel["port"])),
        "<td><code>%s</code></td>" % esc(tunnel["fingerprint"]),
        "<td><code>%s</code></td>" % esc(tunnel["remote"]),
        '<td title="%s">%s</td>' % (esc(started), esc(_age(now - _epoch(started)))),
        '<td class="num">%s</td>' % esc(_size(tunnel["bytes_in"])),
        '<td class="num">%s</td>' % esc(_size(tunnel["bytes_out"])),
        '<td class="num">%d open / %d</td>' % (tunnel["streams_open"], tunnel["streams_opened"]),
    )
    return '<tr data-subdomain="%s">%s</tr>' % (esc(tunnel["subdomain"]), "".join(cells))


def _epoch(iso):
    return datetime.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _size(count):
    value, unit = float(count), 0
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    while value >= 1024 and unit < len(units) - 1:
        value /= 1024
        unit += 1
    return "%d B" % count if unit == 0 else "%.1f %s" % (value, units[unit])


def _age(seconds):
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return "%dd %dh" % (days, hours)
    if hours:
        return "%dh %dm" % (hours, minutes)
    if minutes:
        return "%dm %ds" % (minutes, secs)
    return "%ds" % secs


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>diglett: {domain}</title>
<style>{style}</style>
</head>
<body>
<header>
<h1><span>diglett</span> gateway for {domain}</h1>
<p>version {version} &middot; agents dial port {agent_port}</p>
</header>
<main>
<div class="cards">
<div class="card"><small>Tunnels</small><b id="count">{count}</b></div>
<div class="card"><small>Open streams</small><b id="streams">{streams}</b></div>
<div class="card"><small>Traffic in / out (these sessions)</small><b id="traffic">{traffic}</b></div>
</div>
<table>
<thead><tr>{heads}</tr></thead>
<tbody id="tunnels">{rows}</tbody>
</table>
<footer id="updated" data-refreshes="0"><span class="live"></span><span id="stamp">rendered at {rendered}</span></footer>
{extra}
</main>
<script>{script}</script>
</body>
</html>
"""
