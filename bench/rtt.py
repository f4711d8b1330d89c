"""The kept-connection round trip alone: diglett against ssh -R (and direct, socat) in one run.

    python bench/run.py --only rtt                  # the setups, 10 rounds of 400 round trips
    python bench/run.py --only rtt --baseline HEAD  # and diglett as committed at HEAD beside it
    python bench/run.py --only rtt --syscalls       # and strace -c -f per tunnel, 2000 RTTs
    python bench/run.py --only rtt --switches       # and greenlet switches per round trip
    python bench/run.py --only rtt --perf           # and perf: CPU per round trip by hop

A kept round trip is 64 bytes echoed on one open client connection: client -> tunnel port ->
(diglett: server -> agent connection -> agent; ssh: sshd -> ssh) -> backend and back. The
rounds alternate over the setups, so a slow minute of this shared machine hits all alike;
ratios are of the pooled medians and, steadier, the median of the per-round ratios. The
results go to bench/rtt.json and their section of docs/benchmarks.md (bench/rtt_report.py);
--only bulk writes bench/rtt-bulk.json only.
"""

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import load  # noqa: E402
import setups  # noqa: E402

RESULTS = BENCH / "rtt.json"
ROUNDS = 10  # rounds over all setups
PER_ROUND = 400  # kept round trips per setup per round
COUNTED = 2000  # round trips under strace or the switch counter (one connection)
STRACE_SETTLE = 1.0  # seconds for strace to attach before the counted run, and to detach
SWITCH_DUMP = 1.0  # seconds for a SIGUSR2 dump of the switch counter (bench/aead/sitecustomize.py)
SYSCALL_LINE = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$")


def log(message, *args):
    print("[%s] %s" % (time.strftime("%H:%M:%S"), message % args), flush=True)


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, int(fraction * len(ordered) + 0.999999))) - 1]


class PyRelay(setups.Setup):
    """Two bare gevent relays in a row (bench/pyrelay.py): diglett's process hops with no
    record layer and no multiplexer, the floor of a Python tunnel."""

    name = "python relay x2"

    def start(self):
        target = self.backend_port
        for label in ("relay-agent", "relay-server"):
            port = setups.free_port()
            proc = setups.Proc([sys.executable, str(BENCH / "pyrelay.py"), str(port),
                                str(target)], self.folder, label)
            self.procs.append(proc)
            proc.wait_for(r"listening \d+")
            target = port
        self.port = target


def measure(all_setups, rounds, per_round):
    """{name: [per-round lists of seconds]}, the setups interleaved round by round."""
    samples = {setup.name: [] for setup in all_setups}
    cpu = dict.fromkeys(samples, 0.0)
    faults = dict.fromkeys(samples, 0)
    for index in range(rounds):
        for setup in all_setups:
            before, faults_before = setups.cpu_seconds(setup.roots()), minor_faults(setup)
            samples[setup.name].append(load.kept_round_trips(setup.port, per_round))
            cpu[setup.name] += setups.cpu_seconds(setup.roots()) - before
            faults[setup.name] += minor_faults(setup) - faults_before
            setup.check()
        log("round %d/%d: %s", index + 1, rounds, "  ".join(
            "%s %.3f" % (name, 1e3 * statistics.median(runs[-1]))
            for name, runs in samples.items()))
    # CPU of the tunnel's processes per round trip (warm-ups included: 50 per round)
    trips = rounds * (per_round + 50)
    cpu_us = {name: (1e6 * cpu[name] / trips, faults[name] / trips) for name in samples}
    return samples, cpu_us


def minor_faults(setup):
    """Minor page faults so far of the tunnel's processes (field 10 of /proc/PID/stat)."""
    total = 0
    for pid in tunnel_pids(setup):
        try:
            with open("/proc/%d/stat" % pid) as handle:
                total += int(handle.read().rsplit(")", 1)[1].split()[7])
        except OSError:
            pass
    return total


def summarize(samples, cpu_us, reference="ssh -R"):
    out = {}
    ref_rounds = samples.get(reference)
    for name, runs in samples.items():
        pooled = [value for run in runs for value in run]
        entry = {"count": len(pooled), "p50_ms": 1e3 * percentile(pooled, 0.5),
                 "p99_ms": 1e3 * percentile(pooled, 0.99), "tunnel_cpu_us": cpu_us[name][0],
                 "page_faults_per_rtt": cpu_us[name][1]}
        if ref_rounds:
            ref_pooled = [value for run in ref_rounds for value in run]
            entry["x_ssh_p50"] = percentile(pooled, 0.5) / percentile(ref_pooled, 0.5)
            entry["x_ssh_p99"] = percentile(pooled, 0.99) / percentile(ref_pooled, 0.99)
            entry["x_ssh_rounds"] = statistics.median(
                statistics.median(mine) / statistics.median(ref)
                for mine, ref in zip(runs, ref_rounds))
        out[name] = entry
    return out


def tunnel_pids(setup):
    """The processes that carry the round trip: diglett's server and agent, ssh's client and
    the sshd session processes (the listener's children)."""
    return [pid for pid in setups.descendants(setup.roots())]


def strace_counts(setup, count):
    """Syscalls per round trip of each tunnel process, from strace -c -f over ``count``."""
    pids = tunnel_pids(setup)
    out_file = setup.folder / "strace.txt"
    argv = ["strace", "-c", "-f", "-qq", "-o", str(out_file)]
    for pid in pids:
        argv += ["-p", str(pid)]
    tracer = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(STRACE_SETTLE)
        load.kept_round_trips(setup.port, count, warmup=0, deadline=120)
        time.sleep(STRACE_SETTLE)
    finally:
        tracer.send_signal(2)  # SIGINT: strace detaches and writes its summary
        tracer.wait(30)
    calls = {}
    for line in out_file.read_text().splitlines():
        match = SYSCALL_LINE.match(line)
        if match:
            calls[match.group(2)] = int(match.group(1)) / count
    calls.pop("total", None)
    return {"per_rtt": calls, "total_per_rtt": sum(calls.values()), "pids": len(pids)}


PERF_HZ = 4000  # perf's sampling rate (cpu-clock, a software event: no PMU needed)
CATEGORIES = (  # shared object -> what it is, for the hop table in docs/benchmarks.md
    ("kallsyms", "kernel: syscalls, TCP over loopback, wakeups, scheduling"),
    ("libpython", "Python interpreter (diglett's and gevent's Python code)"),
    ("_rust", "AEAD (OpenSSL through cryptography, or OpenSSH's libcrypto)"),
    ("libcrypto", "AEAD (OpenSSL through cryptography, or OpenSSH's libcrypto)"),
    ("libc", "libc: malloc, memcpy, syscall stubs"),
    ("corecext", "gevent, libev and greenlet C code"),
    ("greenlet", "gevent, libev and greenlet C code"),
    ("gevent", "gevent, libev and greenlet C code"),
    ("sshd", "ssh/sshd's own code"),
    ("ssh", "ssh/sshd's own code"),
)


def perf_profile(setup, count):
    """CPU microseconds per round trip of each tunnel process, by category, sampled by perf
    over ``count`` round trips (None when perf cannot record here)."""
    if not shutil.which("perf"):
        return None
    data = setup.folder / "perf.data"
    pids = ",".join(str(pid) for pid in tunnel_pids(setup))
    recorder = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", str(PERF_HZ),
                                 "-p", pids, "-o", str(data)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(STRACE_SETTLE)
        load.kept_round_trips(setup.port, count, warmup=0, deadline=120)
    finally:
        recorder.send_signal(signal.SIGINT)
        recorder.wait(30)
    report = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "-n",
                             "--sort", "pid,dso", "-g", "none", "--stdio"],
                            capture_output=True, text=True, timeout=120).stdout
    labels = thread_labels(setup)
    out = {}
    for line in report.splitlines():
        parts = line.split()
        if len(parts) < 4 or not parts[0].endswith("%"):
            continue
        samples, (pid, comm), dso = int(parts[1]), parts[2].split(":", 1), parts[3]
        what = next((label for key, label in CATEGORIES if key in dso), "other")
        process = out.setdefault(labels.get(int(pid), comm), {})  # a thread gone: its name
        process[what] = process.get(what, 0.0) + 1e6 * samples / PERF_HZ / count
    return out


def thread_labels(setup):
    """{tid: label} for every thread of the tunnel's processes: perf samples name threads."""
    names = {proc.pid: proc.label for proc in setup.procs}
    labels = {}
    for pid in tunnel_pids(setup):
        try:
            base = names.get(pid) or Path("/proc/%d/comm" % pid).read_text().strip()
            tids = [int(tid) for tid in os.listdir("/proc/%d/task" % pid)]
        except OSError:
            continue
        for tid in tids:
            labels[tid] = base if tid == pid else base + " (other threads)"
    return labels


def switch_counts(setup, count):
    """Greenlet switches per round trip in each of diglett's processes (counted by
    bench/aead/sitecustomize.py, which DIGLETT_COUNT_SWITCHES turns on)."""
    def read():
        values = {}
        for path in setup.folder.glob("switches.*"):
            try:
                values[path.name] = json.loads(path.read_text())
            except ValueError:
                pass  # being rewritten: read again
        return values

    def dump():
        for proc in setup.procs:
            os.kill(proc.pid, signal.SIGUSR2)
        time.sleep(SWITCH_DUMP)
        return read()

    before = dump()
    load.kept_round_trips(setup.port, count, warmup=0, deadline=120)
    after = dump()
    return {name: {key: (after[name][key] - before.get(name, {}).get(key, 0)) / count
                   for key in after[name]} for name in after}


def main(args, checkout, bulk=None):
    """``args`` from run.py's parser; ``checkout(rev, folder)`` and ``bulk(setups, reps)``
    are run.py's (--only bulk runs that instead of the round trips)."""
    folder = Path(tempfile.mkdtemp(prefix="diglett-rtt-"))
    log("working in %s", folder)
    backend = setups.Proc([sys.executable, str(BENCH / "backend.py")], folder, "backend")
    port = int(backend.wait_for(r"listening (\d+)").group(1))
    env_extra = {}
    if args.switches:
        env_extra["DIGLETT_COUNT_SWITCHES"] = "1"
    all_setups = [setups.Direct(folder, port), setups.Socat(folder, port),
                  setups.Ssh(folder, port), PyRelay(folder, port)]
    mine = setups.Diglett(folder, port, "cryptography", extra_env=env_extra)
    all_setups.append(mine)
    if args.baseline:
        source = checkout(args.baseline, folder)
        all_setups.append(setups.Diglett(folder, port, "cryptography", source,
                                         label="@" + args.baseline, extra_env=env_extra))
    if args.pycryptodome:
        all_setups.append(setups.Diglett(folder, port, "pycryptodome", extra_env=env_extra))
    results = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rounds": args.rounds,
               "per_round": args.per_round, "baseline": args.baseline}
    try:
        for setup in all_setups:
            setup.start()
            log("started %-30s port %d", setup.name, setup.port)
        if args.only == "bulk":
            results["bulk"] = bulk([s for s in all_setups  # the relay is for round trips
                                    if not isinstance(s, (setups.Direct, PyRelay))],
                                   args.reps or 3)
            for name, directions in results["bulk"].items():
                log("%-32s %s", name, "  ".join(
                    "%s %.3f GB/s %.2f CPU-s/GB" % (d, v["gbps"], v["cpu_s_per_gb"])
                    for d, v in directions.items()))
            return _save(results)
        samples, cpu_us = measure(all_setups, args.rounds, args.per_round)
        results["kept"] = summarize(samples, cpu_us)
        for name, entry in results["kept"].items():
            log("%-32s p50 %.3f ms p99 %.3f ms  x ssh p50 %.2f (rounds %.2f) p99 %.2f  "
                "tunnel CPU %.0f us/RTT, %.2f page faults/RTT", name, entry["p50_ms"],
                entry["p99_ms"], entry.get("x_ssh_p50", 0), entry.get("x_ssh_rounds", 0),
                entry.get("x_ssh_p99", 0), entry["tunnel_cpu_us"], entry["page_faults_per_rtt"])
        traced = [s for s in all_setups if s.name not in ("direct",)]
        if args.syscalls:
            results["syscalls"] = {s.name: strace_counts(s, COUNTED) for s in traced}
            for name, entry in results["syscalls"].items():
                top = sorted(entry["per_rtt"].items(), key=lambda item: -item[1])[:8]
                log("%-32s %.1f syscalls/RTT: %s", name, entry["total_per_rtt"],
                    ", ".join("%s %.2f" % item for item in top))
        if args.perf:
            results["perf"] = {s.name: perf_profile(s, COUNTED) for s in traced}
            for name, entry in results["perf"].items():
                for process, costs in (entry or {}).items():
                    log("%-32s %-16s %.0f us/RTT: %s", name, process, sum(costs.values()),
                        ", ".join("%s %.0f" % (k.split(":")[0], v) for k, v in
                                  sorted(costs.items(), key=lambda item: -item[1])))
        if args.switches:
            results["switches"] = {s.name: switch_counts(s, COUNTED)
                                   for s in all_setups if isinstance(s, setups.Diglett)}
            for name, entry in results["switches"].items():
                log("%-32s %s", name, entry)
    finally:
        for setup in reversed(all_setups):
            setup.stop()
        backend.stop()
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    return _save(results)


def _save(results):
    path = RESULTS.with_name("rtt-bulk.json") if "bulk" in results else RESULTS
    path.write_text(json.dumps(results, indent=1) + "\n")
    log("raw results in %s", path)
    if "kept" in results:
        import rtt_report

        rtt_report.write(results, BENCH.parent / "docs")
        log("wrote the kept round trip section of docs/benchmarks.md")
    return results


if __name__ == "__main__":
    sys.exit("run it as: python bench/run.py --only rtt [--baseline REV] [--syscalls]")
