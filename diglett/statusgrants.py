"""The grants panel of the status page: every grant, its policy, and a revoke button.

Rendered on the server (complete without JavaScript, every value escaped), then kept fresh by
a small inline script that fetches api/grants and redraws with textContent only. A revoke is
two clicks on the same button ("Revoke", then "Really revoke?" within CONFIRM_MS; no modal
dialog) and one ``DELETE api/grants/NAME?key=KEY`` to the write API (diglett.httpwrite), under
the page's own origin. It must hold no other logic: the API decides and audits.
"""

import html

from diglett.policy import Policy

REFRESH_MS = 2000  # how often the panel fetches api/grants
CONFIRM_MS = 5000  # how long a first click on Revoke waits for the second

_STYLE = """
h2 { font-size: 16px; font-weight: 600; margin: 28px 0 10px; }
button.revoke { font: inherit; font-size: 13px; padding: 3px 10px; border-radius: 6px;
                border: 1px solid #d0d5dd; background: #fff; color: #b42318; cursor: pointer; }
button.revoke.armed { background: #b42318; color: #fff; border-color: #b42318; }
#grant-status { color: #667085; font-size: 12px; margin-top: 8px; min-height: 1em; }
"""

_SCRIPT = """
(function () {
  var armed = null;
  function cell(row, text, mono) {
    var td = document.createElement("td");
    if (mono) { var c = document.createElement("code"); c.textContent = text; td.appendChild(c); }
    else td.textContent = text;
    row.appendChild(td);
  }
  function summary(p) {
    var parts = [];
    if (p.mode) parts.push("mode=" + p.mode);
    (p.aliases || []).forEach(function (a) { parts.push("alias=" + a); });
    (p.basic_auth || []).forEach(function (u) { parts.push("auth=" + u.split(":")[0]); });
    (p.allow || []).forEach(function (n) { parts.push("allow=" + n); });
    if (p.forward_auth) parts.push("forward-auth=" + p.forward_auth);
    (p.middlewares || []).forEach(function (m) { parts.push("middleware=" + m); });
    return parts.join(" ") || "-";
  }
  function say(text) { document.getElementById("grant-status").textContent = text; }
  function revoke(button) {
    if (armed !== button) {
      if (armed) { armed.textContent = "Revoke"; armed.className = "revoke"; }
      armed = button; button.textContent = "Really revoke?"; button.className = "revoke armed";
      setTimeout(function () { if (armed === button) { armed = null;
        button.textContent = "Revoke"; button.className = "revoke"; } }, CONFIRM_MS);
      return;
    }
    armed = null; button.disabled = true;
    var url = "api/grants/" + encodeURIComponent(button.dataset.name) + "?key=" +
              encodeURIComponent(button.dataset.key);
    fetch(url, {method: "DELETE", cache: "no-store", credentials: "same-origin"})
      .then(function (r) { return r.json().then(function (b) { return [r.ok, b]; }); })
      .then(function (answer) {
        say(answer[0] ? "revoked " + button.dataset.name : "cannot revoke: " + answer[1].error);
        refresh();
      })
      .catch(function (e) { say("cannot revoke: " + e.message); button.disabled = false; });
  }
  function draw(grants) {
    var body = document.getElementById("grants"), rows = [];
    grants.forEach(function (g) {
      var tr = document.createElement("tr");
      tr.dataset.subdomain = g.subdomain; tr.dataset.key = g.key;
      cell(tr, g.subdomain, true);
      cell(tr, g.fingerprint, true);
      cell(tr, g.port === null ? "-" : String(g.port), false);
      cell(tr, summary(g.policy || {}), true);
      cell(tr, g.comment || "", false);
      var td = document.createElement("td"), b = document.createElement("button");
      b.className = "revoke"; b.textContent = "Revoke";
      b.dataset.name = g.subdomain; b.dataset.key = g.key;
      td.appendChild(b); tr.appendChild(td); rows.push(tr);
    });
    if (!rows.length) {
      var tr = document.createElement("tr"), td = document.createElement("td");
      td.colSpan = 6; td.className = "empty"; td.textContent = "No grants.";
      tr.appendChild(td); rows.push(tr);
    }
    body.replaceChildren.apply(body, rows);
    body.dataset.refreshes = String(Number(body.dataset.refreshes || 0) + 1);
  }
  function refresh() {
    fetch("api/grants", {cache: "no-store", credentials: "same-origin"})
      .then(function (r) { if (!r.ok) throw new Error(r.status); return r.json(); })
      .then(draw)
      .catch(function (e) { say("cannot refresh the grants (" + e.message + ")"); });
  }
  document.getElementById("grants").addEventListener("click", function (e) {
    if (e.target.classList && e.target.classList.contains("revoke")) revoke(e.target);
  });
  refresh();
  setInterval(refresh, REFRESH_MS);
})();
"""


def render(grants):
    """The panel's HTML for ``grants`` (the objects of /api/grants), or a note when None."""
    esc = html.escape
    if grants is None:
        rows = '<tr><td class="empty" colspan="6">The registry cannot answer now.</td></tr>'
    else:
        rows = "".join(_row(g) for g in grants) or (
            '<tr><td class="empty" colspan="6">No grants.</td></tr>')
    heads = "".join("<th>%s</th>" % esc(name) for name in
                    ("Name", "Agent key", "Port", "Policy", "Comment", ""))
    script = (_SCRIPT.replace("REFRESH_MS", str(REFRESH_MS))
              .replace("CONFIRM_MS", str(CONFIRM_MS)))
    return ('<style>%s</style><h2>Grants</h2><table><thead><tr>%s</tr></thead>'
            '<tbody id="grants" data-refreshes="0">%s</tbody></table>'
            '<p id="grant-status"></p><script>%s</script>' % (_STYLE, heads, rows, script))


def _row(grant):
    esc = html.escape
    policy = grant.get("policy") or {}
    cells = (
        "<td><code>%s</code></td>" % esc(grant["subdomain"]),
        "<td><code>%s</code></td>" % esc(grant["fingerprint"]),
        "<td>%s</td>" % esc("-" if grant["port"] is None else str(grant["port"])),
        "<td><code>%s</code></td>" % esc(_summary(policy)),
        "<td>%s</td>" % esc(grant.get("comment") or ""),
        '<td><button class="revoke" data-name="%s" data-key="%s">Revoke</button></td>'
        % (esc(grant["subdomain"]), esc(grant["key"])),
    )
    return '<tr data-subdomain="%s" data-key="%s">%s</tr>' % (
        esc(grant["subdomain"]), esc(grant["key"]), "".join(cells))


def _summary(policy):
    """The JSON policy in the words of `diglett-admin grants` (hashes left out)."""
    return Policy.from_json(policy).summary()
