"""The "kept round trip" section of docs/benchmarks.md, from bench/rtt.json (bench/rtt.py).

``write(results, docs)`` puts the section into the page before "How it is measured",
replacing an older one; report.write (a full run) keeps it by calling ``section`` too.
"""

import json
from pathlib import Path

HEADING = "## The kept round trip against ssh -R (issue 14)"
RESULTS = Path(__file__).resolve().parent / "rtt.json"
SHORT = {  # perf categories (bench/rtt.py CATEGORIES) -> table columns
    "kernel": "kernel", "Python": "Python", "AEAD": "AEAD", "libc": "libc",
    "gevent": "gevent C", "ssh/sshd": "ssh's own code", "other": "other",
}

INTRO = """\
`python bench/run.py --only rtt --baseline REV --syscalls --switches --perf` (bench/rtt.py):
64-byte echoes on one kept connection, %(rounds)d rounds of %(per_round)d per setup, the setups
interleaved round by round; *× ssh* is the pooled p50's ratio and, steadier on this shared
machine, the median of the per-round ratios. *@%(baseline)s* is diglett before issue 14, run
beside the working tree. *python relay x2* (bench/pyrelay.py) is two bare gevent relays in a
row, no cipher and no framing: diglett's process hops with a free record layer, the floor of
any Python design. Tunnel CPU and page faults are of the tunnel's processes per round trip
(/proc); syscalls from `strace -c -f`, greenlet switches from `greenlet.settrace`, both over
2000 round trips. Run %(date)s.
"""

EXPLANATION = """\
**Where the time goes.** A kept round trip crosses the same process hops in diglett and in
ssh -R (client → server/sshd → agent/ssh → backend and back: two wakeups per tunnel process),
and diglett already does the least per hop: one `epoll_wait`, one read, one write per hop
(16 syscalls per round trip against ssh's 26), no greenlet switch (0.01 per round trip: the
readers are watcher callbacks the hub calls, and they write directly when the socket takes
it), header and body in one `sendmsg`, `TCP_NODELAY` on every socket, and no WINDOW frame on a
small round trip (credit returns at half a window). The kernel's share per process is of
ssh's order (60-90 µs here, most of it this VM's context switch and wakeup, in
`finish_task_switch` and the IRQ restore after a wakeup, as for ssh). The difference is
user-space CPU: per round trip each diglett process spends about 60 µs in the interpreter and
12-16 µs in the AEAD, where sshd spends 7-12 µs in its own code and 3-5 µs in libcrypto, and each
bare gevent relay 16-21 µs in Python. So gevent and the hops are not the cost (the relay comes
within 0.9-1.2× of ssh, per-round medians); the record layer and the multiplexer in Python
are: ~31k interpreted instructions per hop (123k per round trip, 175k before; callgrind,
`bench/hops.py`), four AEAD calls per round trip per process at ~5.4k instructions each (OpenSSL's per-call context setup dominates 64-byte
records; the header and the body are separate AEAD calls by the wire format).

**Repeats.** Five same-run comparisons on 2026-12-07 (the machine shared with other test
runs, so ssh's own p50 ranged 0.11-0.25 ms), kept p50 × ssh -R pooled / per-round median,
before → after: 2.64 / 2.29 → 2.26 / 2.10; 1.89 / 2.10 → 1.73 / 1.84; 2.07 / 2.04 → 1.94 / 1.91;
1.66 / 1.64 → 1.49 / 1.55; and, with the last change, 2.19 / 2.31 → 1.68 / 1.61 (the table
above): 6-30% closer to ssh each time, never at it. Tunnel CPU per round trip fell 265 → 230,
300 → 272, 280 → 250, 339 → 294 and 313 → 250 µs; bulk (`--only bulk --baseline`, 5 ×
128 MiB each way, two runs) did not move beyond the noise: download 0.29 / 0.32 GB/s at 3.05
CPU-s/GB against 0.24 / 0.29 GB/s at 3.20 / 2.98 before, upload 0.25 / 0.29 GB/s at 3.35 against
0.25 / 0.30 GB/s at 3.28 / 3.13; at the last commit (bench/rtt-bulk.json, a busier minute)
download 0.33 GB/s at 4.40 against 0.27 at 4.40, upload 0.35 at 4.25 against 0.26 at 4.17.

**What changed** (instructions per round trip, both processes, repeatable where wall time is
not: `valgrind --tool=callgrind python bench/hops.py --count N` for N = 300 and 1300, the
difference over 1000, minus the same with `--direct`, which is the harness alone): 241k before
→ 186k (the interpreter's share 175k → 123k, the AEAD's 45k → 43k).
(1) No 256 KiB allocation per read: `recv(256 KiB)` made glibc map fresh pages for the buffer
and remap or unmap them after a short read (mmap + mremap + munmap and two page faults per
read, ~20 µs more per read than a heap buffer on this VM); the tunnel now reads into one buffer shared by all tunnels of the
process and a pump reads at most one DATA frame (64 KiB, below the mmap threshold). Whether the
old code hit it depended on the heap's history: the agent did in the tests (4 faults per round
trip), the benchmark's baseline in some runs (the page-fault column). (2) The record cipher
calls the AEAD's per-key C functions directly (no backend method, no key-cache lookup).
(3) One-DATA-frame fast paths for sealing and for decoding a record. (4) Pumps and the tunnel
call the kernel socket under gevent's for the calls that never wait (no gevent Python frame per
syscall). Evaluated and left: batching a pump's reads into one write (bulk download CPU rose
from ~3.2 to ~4.1 CPU-s/GB, probably as the bigger writes were taken in part and finished
by the writer greenlet). Not tried: busy-polling before `epoll_wait` (it would burn a core of a shared
machine to skip the wakeup) and TCP_QUICKACK (by reasoning, no delayed ACK is on the path: with
Nagle off nothing waits for an ACK, and each request's ACK rides on its answer).

**What would reach 1.0×.** Python cannot get there: the bare relay already costs what ssh
costs, so diglett ties ssh only if its record layer and multiplexer cost nothing. What would:
a compiled record path (recv → open two AEADs → frame → deliver, and its mirror, in C, a few
thousand instructions instead of ~46k), i.e. a C extension, outside the design card's packages;
and, as a wire change (version 3, not made), an OpenSSH-style length encryption with a bare
ChaCha20 keystream and one AEAD per record, which would save one of the two AEAD calls per
record (4 of the 8 per round trip, ~11% of the instructions). Within the card's packages the changes above are the best
found; what remains is spread over ~25 small Python calls per hop, none above ~10% of it.
"""


def section(results):
    """Markdown for ``results`` (bench/rtt.json), without the heading."""
    kept = results["kept"]
    parts = [INTRO % {k: results.get(k) for k in ("rounds", "per_round", "baseline", "date")}]
    parts.append("\n| setup | p50 ms | p99 ms | × ssh p50 | × ssh, per round | tunnel CPU µs | "
                 "page faults | syscalls | greenlet switches |\n"
                 "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    for name, entry in kept.items():
        calls = results.get("syscalls", {}).get(name)
        switches = results.get("switches", {}).get(name)
        parts.append("| %s | %.3f | %.3f | %.2f× | %.2f× | %.0f | %.2f | %s | %s |\n" % (
            name, entry["p50_ms"], entry["p99_ms"], entry.get("x_ssh_p50", 0),
            entry.get("x_ssh_rounds", 0), entry["tunnel_cpu_us"],
            entry.get("page_faults_per_rtt", 0),
            "%.1f" % calls["total_per_rtt"] if calls else "—",
            "%.3f" % sum(v["switch"] for v in switches.values()) if switches else "—"))
    parts.append("\nAll per round trip. ")
    perf = results.get("perf")
    if perf:
        parts.append(hop_table(perf))
    parts.append("\n" + EXPLANATION)
    return "".join(parts)


def hop_table(perf):
    columns = list(dict.fromkeys(SHORT.values()))
    lines = ["CPU per round trip of each tunnel process, by where it ran (perf, cpu-clock at "
             "4 kHz over 2000 round trips; perf's own cost inflates all rows alike), µs:\n\n",
             "| setup | hop (process) | %s | total |\n" % " | ".join(columns),
             "|---|---|%s---:|\n" % ("---:|" * len(columns))]
    for name, processes in perf.items():
        for process, costs in (processes or {}).items():
            row = dict.fromkeys(columns, 0.0)
            for what, value in costs.items():
                key = next((col for word, col in SHORT.items() if what.startswith(word)),
                           "other")
                row[key] += value
            lines.append("| %s | %s | %s | %.0f |\n" % (
                name, process, " | ".join("%.0f" % row[c] for c in columns),
                sum(row.values())))
    return "".join(lines)


def write(results, docs):
    import report

    report.write_section(docs, HEADING, section(results))


def saved_section():
    """The section from bench/rtt.json for a full run's page, or "" when there is none."""
    if not RESULTS.exists():
        return ""
    return "\n%s\n\n%s" % (HEADING, section(json.loads(RESULTS.read_text())))
