"""bench/results.json -> docs/benchmarks.md and docs/benchmarks.png.

Only formatting lives here: every figure comes from the results, every verdict from TARGETS.

Why ~590 lines: the whole page is rendered here, the tables, the verdicts against each target
and the chart, from one results file, so that the page and the figures cannot drift apart.
"""

from pathlib import Path

TIE = 0.10  # the noise allowance: within 10% of a target counts as meeting it
SSH = "ssh -R"
DIRECT = "direct"
SOCAT = "socat"
MiB = 1 << 20
PYTHON_CATEGORIES = (  # (category, substrings of a py-spy leaf frame), first match wins
    ("AEAD: diglett/crypto.py and the cipher library", ("diglett/crypto.py", "Crypto/",
                                                        "cryptography/")),
    ("socket calls (send, sendmsg, recv)", ("_socketcommon.py", "_socket3.py", "/socket.py")),
    ("gevent hub (event loop, waits, switches)", ("gevent/",)),
    ("framing and stream state (wire.py, protocol.py)", ("diglett/wire.py", "diglett/protocol.py")),
    ("relay loops (tunnel.py, pump.py)",
     ("diglett/tunnel.py", "diglett/pump.py", "diglett/sockets.py")),
)
NATIVE_CATEGORIES = (  # (category, substrings of a perf shared-object name), first match wins
    ("kernel: syscalls, TCP over loopback, copies, scheduling", ("[kernel",)),
    ("cipher library (OpenSSL via cryptography, or pycryptodome)",
     ("_rust", "libcrypto", "_raw_", "_poly1305", "_chacha20", "Crypto")),
    ("Python interpreter (diglett's and gevent's Python code)", ("libpython", "python3")),
    ("libc: memcpy, malloc", ("libc.so", "libc-")),
    ("gevent, libev and greenlet C code", ("gevent", "greenlet", "libev", "corecext")),
)


def categorize(shares, rules):
    """{name: share} -> {category: share}; names no rule matches are "other"."""
    out = {}
    for name, share in shares.items():
        category = next((c for c, marks in rules if any(m in name for m in marks)), "other")
        out[category] = out.get(category, 0) + share
    return out


# ----- small formatting helpers -------------------------------------------------------------
def ratio(value, reference):
    if value is None or not reference:
        return "—"
    return "%.2f×" % (value / reference)


def ms(value):
    if value is None:
        return "—"
    return "%.3f" % value if value < 1 else "%.2f" % value if value < 10 else "%.1f" % value


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def digletts(results):
    return [name for name in results["setups"] if name.startswith("diglett")]


# ----- targets ------------------------------------------------------------------------------
def verdict(value, limit, higher_is_better):
    """met / met (tie) / not met, with the tie band of TIE around ``limit``."""
    if value is None or limit is None:
        return "—"
    if (value >= limit) if higher_is_better else (value <= limit):
        return "**met**"
    if (value >= limit * (1 - TIE)) if higher_is_better else (value <= limit * (1 + TIE)):
        return "**met** (tie)"
    return "not met"


def target_rows(results, name):
    """(metric, target, diglett's figure, ratio, verdict) for one diglett setup."""
    bulk, lat, fair = results["bulk"], results["latency"], results["fairness"]
    conc, mem = results["concurrent"], results["concurrent"]
    fast = "pycryptodome" not in name
    bulk_goal = 1.0 if fast else 0.5
    rows = []
    for direction in ("download", "upload"):
        mine, ssh = bulk[name][direction]["gbps"], bulk[SSH][direction]["gbps"]
        rows.append(("bulk %s" % direction, "≥ %.1f× ssh -R" % bulk_goal,
                     "%.3f GB/s" % mine, ratio(mine, ssh), verdict(mine / ssh, bulk_goal, True)))
    for direction in ("download", "upload"):
        mine, ssh = bulk[name][direction]["cpu_s_per_gb"], bulk[SSH][direction]["cpu_s_per_gb"]
        rows.append(("tunnel CPU per GB, %s" % direction,
                     "≤ 1.0× ssh -R" if fast else "(none; ssh -R for scale)",
                     "%.2f CPU-s/GB" % mine, ratio(mine, ssh),
                     verdict(mine / ssh, 1.0, False) if fast else "—"))
    mine, ssh = lat[name]["kept"]["p50_ms"], lat[SSH]["kept"]["p50_ms"]
    rows.append(("kept-connection round trip p50", "≤ 1.0× ssh -R", "%s ms" % ms(mine),
                 ratio(mine, ssh), verdict(mine / ssh, 1.0, False)))
    mine = lat[name]["fresh"]["p50_ms"]
    socat = lat[SOCAT]["fresh"]["p50_ms"]
    rows.append(("fresh connection + round trip p50", "≤ 2 ms", "%s ms" % ms(mine),
                 "—", verdict(mine, 2.0, False)))
    rows.append(("", "≤ 3× socat", "", ratio(mine, socat), verdict(mine / socat, 3.0, False)))
    mine = lat[name]["fresh_gapped"]["p50_ms"]
    socat = lat[SOCAT]["fresh_gapped"]["p50_ms"]
    rows.append(("… with 20 ms gaps between connections", "≤ 2 ms", "%s ms" % ms(mine), "—",
                 verdict(mine, 2.0, False)))
    rows.append(("", "≤ 3× socat", "", ratio(mine, socat), verdict(mine / socat, 3.0, False)))
    failures, total = conc[name]["failures"], conc[name]["total_s"]
    ssh_total = conc[SSH]["total_s"]
    rows.append(("1000 concurrent: failures", "0", str(failures), "—",
                 "**met**" if failures == 0 else "not met"))
    rows.append(("1000 concurrent: total time", "≤ 1.0× ssh -R", "%.2f s" % total,
                 ratio(total, ssh_total), verdict(total / ssh_total, 1.0, False)))
    raised = results.get("concurrent_raised", {}).get(name)
    if raised:
        rows.append(("… with open_rate raised", "(for scale)", "%.2f s" % raised["total_s"],
                     ratio(raised["total_s"], ssh_total), "—"))
    mine, ssh = fair[name]["bulk"]["p99_ms"], fair[SSH]["bulk"]["p99_ms"]
    rows.append(("neighbour p99 during a bulk download", "≤ 1.0× ssh -R", "%s ms" % ms(mine),
                 ratio(mine, ssh), verdict(mine / ssh, 1.0, False)))
    stall, calm = fair[name]["stall"]["p50_ms"], fair[name]["no_stall"]["p50_ms"]
    rows.append(("neighbour p50, stalled reader vs none", "≤ 1.2×",
                 "%s vs %s ms" % (ms(stall), ms(calm)), ratio(stall, calm),
                 verdict(stall / calm, 1.2, False)))
    mine, ssh = mem[name]["held"]["pss"], mem[SSH]["held"]["pss"]
    rows.append(("PSS with 1000 connections open", "≤ 1.0× ssh -R", "%.1f MiB" % (mine / MiB),
                 ratio(mine, ssh), verdict(mine / ssh, 1.0, False)))
    streams = results.get("streams", {}).get(name)
    if streams:
        count = streams["ok"] + streams["failures"]
        rows.append(("%d streams on one agent" % count, "0 failures, memory stated",
                     "%d failures, PSS %.0f MiB (%.1f KiB/stream)" % (
                         streams["failures"], streams["held"]["pss"] / MiB,
                         streams["pss_per_stream"] / 1024), "—",
                     "**met**" if streams["failures"] == 0 else "not met"))
    return rows


# ----- sections -----------------------------------------------------------------------------
TRANSPORTS_HEADING = "## Transports: tcp, tls, ws and wss (issue 11)"
TRANSPORT_TLS_TARGET = 0.8  # TLS throughput within 0.8x of plain TCP
TRANSPORTS_NOTE = """\
`python bench/run.py --transports` (results in `bench/transports.json`, %(date)s, %(mib)d MiB
per transfer, median of %(reps)d): the same agent and server over raw TCP, `tls://` and `ws://`
straight to the server's listeners, and `wss://` through a Traefik on its own port that
terminates TLS and forwards the upgrade (Traefik's CPU is charged to that setup). The tunnel
code drives `tls://` itself (diglett/reach/tls_socket.py: TLS on memory BIOs, 64 KiB of records
per syscall); `ws://` and `wss://` run in a relay beside it (diglett/reach/splice.py), and
wsproto's pure-Python framing and masking are most of their cost. The machine is shared, so
throughput drifts between rounds; "× tcp" compares the medians, the target uses the median of
the per-round ratios (each round runs tcp and tls back to back), and CPU-s/GB is the steadier
figure. Where TLS's extra CPU goes (py-spy on the sending process during a bulk transfer): the
TLS record encryption (`SSLObject.write`, 17 %% of its samples) beside the Noise AEAD (23 %%),
i.e. a second AEAD pass over every byte; the TLS socket code itself is under 3 %%. On this
2-core machine, where both ends, the client and the backend share the cores, that second pass
is what stands between TLS and the plain TCP figure.

"""


def transports_section(results):
    """The transports table and the TLS target, from bench/transports.json."""
    bulk, latency = results["bulk"], results["latency"]
    tcp = next(name for name in results["setups"] if name.startswith("diglett ("))
    rows = []
    for name in results["setups"]:
        down, up = bulk[name]["download"], bulk[name]["upload"]
        kept = latency[name]["kept"]
        reference = bulk[tcp]
        rows.append([name, "%.3f" % down["gbps"],
                     ratio(down["gbps"], reference["download"]["gbps"]),
                     "%.3f" % up["gbps"], ratio(up["gbps"], reference["upload"]["gbps"]),
                     "%.2f / %.2f" % (down["cpu_s_per_gb"], up["cpu_s_per_gb"]),
                     "%s / %s" % (ms(kept["p50_ms"]), ms(kept["p99_ms"]))])
    out = [TRANSPORTS_NOTE % {"date": results["date"][:10], "reps": results["plan"]["reps"],
                              "mib": results["bulk_bytes"] // MiB},
           table(["setup", "download GB/s", "× tcp", "upload GB/s", "× tcp",
                  "CPU-s/GB down / up", "kept round trip p50 / p99 ms"], rows)]
    tls = next((n for n in results["setups"] if n.startswith("diglett tls")), None)
    if tls is not None:
        paired = {d: median_of([a / b for a, b in zip(bulk[tls][d]["gbps_all"],
                                                      bulk[tcp][d]["gbps_all"])])
                  for d in ("download", "upload")}
        worst = min(paired.values())
        out.append("\nTarget: TLS throughput within %.1f× of plain TCP. Per-round ratios, "
                   "median: download %.2f×, upload %.2f×; the slower direction %.2f×: %s.\n"
                   % (TRANSPORT_TLS_TARGET, paired["download"], paired["upload"], worst,
                      verdict(worst, TRANSPORT_TLS_TARGET, True)))
    return "".join(out)


def median_of(values):
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def write_section(docs, heading, body):
    """Put one section into docs/benchmarks.md (replacing an older one of that heading),
    before "How it is measured", leaving the rest of the page as the last full run wrote it:
    how the benches that run on their own (transports, aggregate, swarm, rtt) update it."""
    path = Path(docs) / "benchmarks.md"
    text = path.read_text()
    block = "\n%s\n\n%s" % (heading, body)
    if heading in text:
        before, rest = text.split("\n" + heading, 1)
        after = rest.split("\n## ", 1)[1] if "\n## " in rest else ""
        text = before + block + ("\n## " + after if after else "")
    else:
        before, after = text.split("\n## How it is measured", 1)
        text = before + block + "\n## How it is measured" + after
    path.write_text(text)


def write_transports(results, docs):
    write_section(docs, TRANSPORTS_HEADING, transports_section(results))


def machine_section(results):
    m = results["machine"]
    plan = results["plan"]
    lines = [
        "- **date**: %s%s" % (results["date"], " (`--quick` run)" if results["quick"] else ""),
        "- **CPU**: %s, %d cores; %.1f GiB RAM; kernel %s" % (
            m["cpu"], m["cores"], m["memory_gib"], m["kernel"]),
        "- **Python** %s, gevent %s; **diglett** %s, commit `%s`%s%s" % (
            m["python"], m["gevent"], m["diglett"], m.get("commit", "?").split(" ")[0],
            " (last change to diglett/: `%s`)" % m["diglett_commit"]
            if m.get("diglett_commit") else "",
            " with uncommitted changes in diglett/" if m.get("dirty") else
            " as committed (`--rev %s`)" % m["rev"] if m.get("rev") else ""),
        "- **AEAD backends**: `cryptography` %s (OpenSSL's ChaCha20-Poly1305), pycryptodome %s"
        % (m["cryptography"], m["pycryptodome"]),
        "- **OpenSSH** %s (%s), cipher `%s`, compression off; **socat** %s" % (
            m["openssh"], m["openssl"], m.get("ssh -R cipher", "?"), m["socat"]),
        "- **plan**: bulk %d MiB × %d repetitions per direction (median); %d kept round trips; "
        "%d fresh connections back to back, %d with %d ms gaps; %d neighbour round trips per "
        "fairness phase; %d concurrent connections; %d streams; the run took %.0f s" % (
            plan["bulk_mib"], plan["reps"], plan["kept"], plan["fresh"], plan["gapped"],
            plan["gap"] * 1000, plan["neighbour"], plan["concurrent"], plan["streams"],
            results["elapsed_s"]),
    ]
    if "foreign_cpu_share" in results:
        lines.append("- **other load**: processes outside the benchmark used %.0f%% of one core "
                     "on average during the run" % (100 * results["foreign_cpu_share"]))
    return "\n".join(lines) + "\n"


def bulk_section(results):
    rows = []
    for name in results["setups"]:
        row = [name]
        for direction in ("download", "upload"):
            entry = results["bulk"][name][direction]
            spread = "%.2f–%.2f" % (min(entry["gbps_all"]), max(entry["gbps_all"]))
            row += ["**%.3f** (%s)" % (entry["gbps"], spread),
                    ratio(entry["gbps"], results["bulk"][SSH][direction]["gbps"]),
                    ratio(entry["gbps"], results["bulk"][DIRECT][direction]["gbps"])]
        rows.append(row)
    throughput = table(["setup", "download GB/s (min–max)", "× ssh -R", "× direct",
                        "upload GB/s (min–max)", "× ssh -R", "× direct"], rows)
    rows = []
    for name in results["setups"]:
        if name == DIRECT:
            continue
        row = [name]
        for direction in ("download", "upload"):
            mine = results["bulk"][name][direction]["cpu_s_per_gb"]
            row += ["%.2f" % mine, ratio(mine, results["bulk"][SSH][direction]["cpu_s_per_gb"])]
        rows.append(row)
    cpu = table(["setup", "download CPU-s/GB", "× ssh -R", "upload CPU-s/GB", "× ssh -R"], rows)
    return throughput, cpu


def latency_section(results):
    rows = []
    for name in results["setups"]:
        lat = results["latency"][name]
        row = [name]
        for kind in ("kept", "fresh", "fresh_gapped"):
            row += ["%s / %s" % (ms(lat[kind]["p50_ms"]), ms(lat[kind]["p99_ms"])),
                    ratio(lat[kind]["p50_ms"], results["latency"][SSH][kind]["p50_ms"]),
                    ratio(lat[kind]["p50_ms"], results["latency"][DIRECT][kind]["p50_ms"])]
        rows.append(row)
    return table(["setup", "kept p50 / p99 ms", "× ssh", "× direct",
                  "fresh p50 / p99 ms", "× ssh", "× direct",
                  "fresh, gaps p50 / p99 ms", "× ssh", "× direct"], rows)


def fairness_section(results):
    rows = []
    for name in results["setups"]:
        f = results["fairness"][name]
        rows.append([name, "%s / %s" % (ms(f["quiet"]["p50_ms"]), ms(f["quiet"]["p99_ms"])),
                     "%s / %s" % (ms(f["bulk"]["p50_ms"]), ms(f["bulk"]["p99_ms"])),
                     ratio(f["bulk"]["p99_ms"], results["fairness"][SSH]["bulk"]["p99_ms"]),
                     "%s / %s" % (ms(f["no_stall"]["p50_ms"]), ms(f["no_stall"]["p99_ms"])),
                     "%s / %s" % (ms(f["stall"]["p50_ms"]), ms(f["stall"]["p99_ms"])),
                     ratio(f["stall"]["p50_ms"], f["no_stall"]["p50_ms"])])
    return table(["setup", "quiet p50 / p99 ms", "beside bulk p50 / p99 ms", "p99 × ssh",
                  "no stall p50 / p99 ms", "stalled reader p50 / p99 ms", "p50 stall / none"],
                 rows)


def concurrency_section(results):
    rows = []
    ssh = results["concurrent"][SSH]
    for name in results["setups"]:
        c = results["concurrent"][name]
        raised = results.get("concurrent_raised", {}).get(name)
        for label, entry in ((name, c), ("%s, open_rate raised" % name, raised)):
            if entry is None:
                continue
            answer = entry.get("answer_s") or {}
            rows.append([label, "%d" % entry["failures"], "%.2f" % entry["open_s"],
                         "%.2f" % entry["total_s"], ratio(entry["total_s"], ssh["total_s"]),
                         "%.3f / %.3f" % (answer.get("p50", 0), answer.get("max", 0)),
                         "%d" % answer.get("over_1s", 0)])
    return table(["setup", "failures", "all answered (s)", "total with close (s)", "× ssh -R",
                  "one connection p50 / max (s)", "over 1 s"], rows)


def memory_section(results):
    rows = []
    ssh = results["concurrent"][SSH]
    for name in results["setups"]:
        if name == DIRECT:
            continue
        c = results["concurrent"][name]
        rows.append([name, "%.1f" % (c["idle"]["pss"] / MiB), "%.1f" % (c["held"]["rss"] / MiB),
                     "%.1f" % (c["held"]["pss"] / MiB), ratio(c["held"]["pss"], ssh["held"]["pss"]),
                     "%.1f" % (c["pss_per_stream"] / 1024),
                     ratio(c["pss_per_stream"], ssh["pss_per_stream"])])
    return table(["setup", "idle PSS MiB", "RSS MiB, 1000 open", "PSS MiB, 1000 open",
                  "× ssh -R", "PSS KiB per idle stream", "× ssh -R"], rows) + (
        "\nRSS is summed over the processes, so pages they share count once per process (socat "
        "forks one per connection); PSS divides shared pages among their processes and is the "
        "figure to compare.\n")


def streams_section(results):
    rows = []
    for name, s in results.get("streams", {}).items():
        count = s["ok"] + s["failures"]
        rows.append([name, "%d" % count, "%d %s" % (s["failures"], s["errors"] or ""),
                     "%.2f" % s["open_s"], "%.1f" % (s["idle"]["pss"] / MiB),
                     "%.1f" % (s["held"]["rss"] / MiB), "%.1f" % (s["held"]["pss"] / MiB),
                     "%.1f" % (s["pss_per_stream"] / 1024), "%.1f" % (s["after"]["pss"] / MiB)])
    return table(["setup", "streams", "failures", "all answered (s)", "PSS before MiB",
                  "RSS MiB, all open", "PSS MiB, all open", "PSS KiB per stream",
                  "PSS MiB after close"], rows)


def targets_section(results):
    out = []
    for name in digletts(results):
        out.append("**%s**\n\n" % name)
        out.append(table(["metric", "target", "diglett", "ratio", "verdict"],
                         target_rows(results, name)))
        out.append("\n")
    return "".join(out)


def records_section(results):
    rows = []
    for entry in results.get("records", []):
        rows.append([entry["case"], "%.2f" % entry["seal_gbps"], "%.2f" % entry["open_gbps"],
                     "%.1f" % entry["small_seal_us"],
                     "%.2f" % (1 / entry["seal_gbps"] + 1 / entry["open_gbps"])])
    return table(["AEAD backend", "seal GB/s", "open GB/s", "µs per 64-byte record (seal)",
                  "CPU-s/GB, seal + open"], rows)


def profile_section(results, native=False):
    """Shares of the samples (server + agent, weighted by their samples) per category, and the
    tunnel CPU per GB they stand for; py-spy's Python view, or perf's native one."""
    def view(entry):
        if native:
            entry = entry.get("native", {"samples": 0, "objects": {}})
            return dict(entry, categories=categorize(entry["objects"], NATIVE_CATEGORIES))
        return dict(entry, categories=categorize(entry["frames"], PYTHON_CATEGORIES))

    profiles = results.get("profile") or {}
    if not any(view(entry)["samples"] for per_setup in profiles.values()
               for entry in per_setup.values()):
        return ""
    header, columns = ["category"], []
    for name, per_setup in profiles.items():
        for direction in ("download", "upload"):
            parts = [view(entry) for key, entry in per_setup.items() if key.endswith(direction)]
            total = sum(entry["samples"] for entry in parts)
            if not total:
                continue
            shares = {}
            for entry in parts:
                for category, share in entry["categories"].items():
                    shares[category] = shares.get(category, 0) + share * entry["samples"] / total
            cpu = results["bulk"][name][direction]["cpu_s_per_gb"]
            header.append("%s, %s" % (name.replace("diglett (", "").rstrip(")"), direction))
            columns.append((shares, cpu))
    categories = {category for shares, _ in columns for category in shares}
    order = sorted(categories, key=lambda c: -sum(shares.get(c, 0) for shares, _ in columns))
    rows = [[category] + ["%.0f%% (%.2f)" % (100 * shares.get(category, 0),
                                             shares.get(category, 0) * cpu)
                          for shares, cpu in columns] for category in order]
    return table(header, rows)


# ----- the chart ----------------------------------------------------------------------------
def chart(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = results["setups"]
    labels = [name.replace("diglett (", "diglett\n(") for name in names]
    x = range(len(names))
    colors = ["#999999", "#6baed6", "#fd8d3c", "#31a354", "#a1d99b"][:len(names)]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))

    def bars(ax, series, title, ylabel, log=False):
        width = 0.8 / len(series)
        for index, (label, values, hatch) in enumerate(series):
            offsets = [i + (index - (len(series) - 1) / 2) * width for i in x]
            drawn = ax.bar(offsets, values, width, label=label, color=colors, hatch=hatch,
                           edgecolor="black", linewidth=0.5)
            for rect, value in zip(drawn, values):
                text = "%.2f" % value if value < 10 else "%.0f" % value
                ax.annotate(text, (rect.get_x() + rect.get_width() / 2, rect.get_height()),
                            ha="center", va="bottom", fontsize=7)
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel, fontsize=9)
        if log:
            ax.set_yscale("log")
        if len(series) > 1:  # the colours name the setups; the legend names the hatches
            from matplotlib.patches import Patch

            ax.legend(handles=[Patch(facecolor="white", edgecolor="black", hatch=hatch,
                                     label=label) for label, _values, hatch in series],
                      fontsize=8)

    bulk = results["bulk"]
    bars(axes[0][0], [("download", [bulk[n]["download"]["gbps"] for n in names], ""),
                      ("upload", [bulk[n]["upload"]["gbps"] for n in names], "//")],
         "bulk throughput, one stream (median of %d)" % results["plan"]["reps"],
         "GB/s (higher is better)")
    bars(axes[0][1], [("download", [bulk[n]["download"]["cpu_s_per_gb"] for n in names], ""),
                      ("upload", [bulk[n]["upload"]["cpu_s_per_gb"] for n in names], "//")],
         "tunnel CPU per GB (all tunnel processes)", "CPU-s/GB (lower is better)")
    lat = results["latency"]
    bars(axes[1][0], [("kept p50", [lat[n]["kept"]["p50_ms"] for n in names], ""),
                      ("fresh p50", [lat[n]["fresh"]["p50_ms"] for n in names], "//"),
                      ("fresh, 20 ms gaps p50", [lat[n]["fresh_gapped"]["p50_ms"] for n in names],
                       "..")],
         "round trip of 64 bytes", "ms, log scale (lower is better)", log=True)
    fair = results["fairness"]
    bars(axes[1][1], [("quiet p99", [fair[n]["quiet"]["p99_ms"] for n in names], ""),
                      ("beside bulk p99", [fair[n]["bulk"]["p99_ms"] for n in names], "//"),
                      ("beside stalled reader p50", [fair[n]["stall"]["p50_ms"] for n in names],
                       "..")],
         "a neighbour's round trip on the same tunnel", "ms, log scale (lower is better)",
         log=True)
    fig.suptitle("diglett vs ssh -R, socat and direct on loopback (%s, %d cores), %s" % (
        results["machine"]["cpu"], results["machine"]["cores"], results["date"][:10]),
        fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----- the document -------------------------------------------------------------------------
INTRO = """\
# Benchmarks

diglett against OpenSSH's remote forwarding (`ssh -R`), a bare relay hop (`socat`) and no relay
at all (`direct`), measured on loopback in one run against the same backend and load
generator. Rerun it with one command (it installs socat, openssh-server, matplotlib and py-spy
if missing, and rewrites this page, `docs/benchmarks.png` and `bench/results.json`):

    bench/run            # full run, ~5 minutes on 2 cores
    bench/run --quick    # 128 MiB transfers, fewer samples, ~2.5 minutes
    bench/run --report   # only redraw this page and the chart from bench/results.json
    bench/run --only rtt --baseline HEAD --syscalls --switches --perf
                         # the kept round trip alone, ~1.5 minutes: its own section below
    bench/run --only bulk --baseline HEAD --reps 5   # bulk alone, beside a commit

Ratios are of medians measured in the same run; this machine is noisy, so a figure within
10% of its target counts as a tie (met). GB is 10^9 bytes.
"""

METHOD = """\
## How it is measured

- **Setups.** `direct`: the client talks to the backend. `socat`: `socat
  TCP-LISTEN:P,bind=127.0.0.1,reuseaddr,fork,backlog=1024 TCP:127.0.0.1:B`. `ssh -R`: a
  throwaway sshd (`-D -f config`, its own ed25519 host key and authorized_keys) on a loopback
  port, and `ssh -F /dev/null -N -o Compression=no -R 0:127.0.0.1:B` with OpenSSH's default
  cipher. diglett: `diglett-server` with a fresh config (every key at its default but the
  addresses and paths) and one `diglett` agent, from the CLIs, granted with `diglett-admin
  grant`; twice, once with the `cryptography` AEAD backend and once with pycryptodome only.
  The pycryptodome run hides the `cryptography` package from both processes through
  `bench/aead/sitecustomize.py` (`DIGLETT_AEAD=pycryptodome` on `PYTHONPATH`), so diglett
  behaves as if it were not installed; the benchmark checks each process's memory map to
  confirm which backend it runs.
- **Backend** (`bench/backend.py`): a thread per connection; a 9-byte header selects download
  (send N bytes), upload (count N bytes, answer one byte) or echo. **Load generator**
  (`bench/load.py`): blocking sockets with `TCP_NODELAY`, 1 MiB reads and writes, one selector
  for the concurrent connections. `direct` shows what backend and load generator reach alone.
- **Bulk**: one stream per transfer, a fresh connection each time, download then upload for
  every setup in turn, repeated; the median is shown with the spread. **CPU per GB**: utime +
  stime (and that of reaped children) of every process of the tunnel, from `/proc/PID/stat`,
  before and after each transfer: diglett-server + agent; sshd and all its session processes
  + the ssh client; socat and its forked children. The backend and the client are not charged.
- **Latency**: 64-byte echoes. Kept: one connection, 50 warm-up round trips, then the count
  shown. Fresh: connect, send the header and the request in one write, read the echo, close;
  back to back, and again with 20 ms between connections (an idle tunnel in between). Measured
  in 5 rounds across the setups and pooled, so a slow minute of the machine hits all alike.
  On this virtual machine a process woken from idle answers later than a busy one, which is
  why every setup is slower with gaps than back to back.
- **Fairness** (also in 5 pooled rounds): a neighbour's kept-connection round trips, quiet;
  while another process downloads without end through the same tunnel; and while another
  client has asked for an endless download and reads nothing (after 1 s, when its window and
  socket buffers are full), against a no-stall run just before.
- **Concurrency and memory**: N connections opened at once (10,000 in batches of 1000),
  one round trip on each while all stay open, then closed; failures are connects refused,
  resets, wrong echoes or no answer within 120 s. A connection answered after more than 1 s
  almost always had its SYN dropped by a full accept queue (the kernel resends it after 1 s).
  RSS and PSS (`/proc/PID/smaps_rollup`,
  summed over the tunnel's processes) are read 1 s after the last answer; per idle stream is
  (PSS with N open − PSS before) / N. diglett's default `open_rate` (1000 new streams/s,
  burst 2000) lets a burst of 1000 through unpaced; the runs marked *open_rate raised* (and the
  10,000 streams) set `open_rate = open_burst = 100000` by a reload (SIGHUP) for scale.
"""


RECORDS_NOTE = """\
`bench/records.py` seals 65,535-byte records (two AEAD calls each, as on the wire) with
diglett's `TransportCipher`, opens them again, and seals 64-byte records for the fixed cost,
in a fresh process per backend. *pycryptodome-after-openssl* runs pycryptodome after OpenSSL's
ChaCha20-Poly1305 has run in the same process; the last row does the same with OpenSSL's AVX-512
code paths switched off (`OPENSSL_ia32cap=:~0x10000`), which tells whether those paths cause the
slowdown. The last column is what the record layer alone adds to the tunnel's CPU per GB (each
byte is sealed once and opened once).

"""

PROFILE_NOTE = """\
diglett-server and the agent sampled for %d s each during an endless download and an endless
upload: with perf (499 Hz, when `perf` is installed), grouped by the shared object the CPU was
in, and with py-spy (200 Hz, `--nonblocking`), grouped by the Python frame on top of the stack.
Shares are of the samples of both processes together (a sample is a moment a process was not
idle); the figure in brackets is that share of the tunnel CPU-s/GB measured above. In the
Python view, a frame that waits in C shows up as itself: "gevent hub" holds the kernel's
epoll and scheduling work under the event loop, and "socket calls" hold the kernel's copies
and TCP stack, which the native view names as kernel time. Skip both with `--no-profile`.

"""


def write(results, docs):
    docs = Path(docs)
    chart(results, docs / "benchmarks.png")
    throughput, cpu = bulk_section(results)
    parts = [
        INTRO,
        "\n## Machine\n\n", machine_section(results),
        "\n![throughput, CPU, latency and fairness](benchmarks.png)\n",
        "\n## Targets (issue 5)\n\n", targets_section(results),
        "## Bulk throughput, one stream\n\n", throughput,
        "\n## Tunnel CPU per GB\n\n", cpu,
        "\n## Round-trip latency, 64 bytes (ms)\n\n", latency_section(results),
        "\n## Fairness: a neighbour's round trips on the same tunnel (ms)\n\n",
        fairness_section(results),
        "\n## %d concurrent connections\n\n" % results["plan"]["concurrent"],
        concurrency_section(results),
        "\n## Memory of the tunnel processes, %d connections open\n\n"
        % results["plan"]["concurrent"], memory_section(results),
        "\n## %d streams on one agent\n\n" % results["plan"]["streams"], streams_section(results),
        "\n## The record layer alone (one process, no I/O)\n\n", RECORDS_NOTE,
        records_section(results),
    ]
    native, python = profile_section(results, native=True), profile_section(results)
    if native or python:
        parts += ["\n## Where diglett's time goes during bulk\n\n",
                  PROFILE_NOTE % results["plan"].get("profile_s", 4)]
    if native:
        parts += ["**Native view** (perf: which code the CPU ran)\n\n", native, "\n"]
    if python:
        parts += ["**Python view** (py-spy: the Python frame on top of the stack)\n\n", python]
    transports = Path(__file__).resolve().parent / "transports.json"
    if transports.exists():
        import json

        parts += ["\n%s\n\n" % TRANSPORTS_HEADING,
                  transports_section(json.loads(transports.read_text()))]
    all_cores = Path(__file__).resolve().parent / "aggregate.json"
    if all_cores.exists():  # bench/aggregate.py's section, kept across full runs
        import json

        import aggregate

        parts += ["\n%s\n\n" % aggregate.HEADING,
                  aggregate.section(json.loads(all_cores.read_text()))]
    swarm = Path(__file__).resolve().parent / "swarm.json"
    if swarm.exists():  # bench/swarm.py's section, kept across full runs
        import json

        import swarm_report

        before = Path(__file__).resolve().parent / "swarm-before.json"
        parts += ["\n%s\n\n" % swarm_report.HEADING, swarm_report.section(
            json.loads(swarm.read_text()),
            json.loads(before.read_text()) if before.exists() else None)]
    import rtt_report  # the kept round trip's own run (bench/rtt.py), kept across full runs

    parts += [rtt_report.saved_section(), "\n", METHOD]
    (docs / "benchmarks.md").write_text("".join(parts))
