"""diglett against direct, socat and ssh -R on loopback: one command, one run, one report.

    python bench/run.py            # the full run (~5 minutes on 2 cores)
    python bench/run.py --quick    # 128 MiB transfers, fewer round trips (~2.5 minutes)
    python bench/run.py --report   # rewrite docs/benchmarks.md and the chart from results.json
    python bench/run.py --transports  # diglett over tcp, tls, ws and wss (Traefik): bulk and
                                      # kept round trips only, into bench/transports.json

It installs what it lacks (socat and openssh-server with apt-get; matplotlib, cryptography
and py-spy with pip),
starts one backend (bench/backend.py) and every setup at once, measures them in rounds so a
drift of the machine hits all setups alike, then writes bench/results.json (raw),
docs/benchmarks.md and docs/benchmarks.png. See docs/benchmarks.md for what is measured.

Why ~560 lines: one run is one script, so that every figure of the report comes from the same
processes on the same machine minutes apart; the phases (bulk, round trips, concurrency,
fairness, memory) share the setups and the load generator.
"""

import argparse
import datetime
import importlib
import importlib.metadata
import json
import math
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import load  # noqa: E402
import setups  # noqa: E402

RESULTS = BENCH / "results.json"
TRANSPORTS = BENCH / "transports.json"  # --transports: written apart, shown in its own section
TRANSPORT_AEAD = "cryptography"  # the transports are compared on the fast record layer
NOFILE = 65536  # descriptors for this process and every process it starts (10,000 streams)
MiB = 1 << 20
SETTLE = 1.0  # seconds for a stalled stream to fill its buffers, and before memory readings
QUIET_CPU = 0.02  # CPU seconds per QUIET_STEP below which a tunnel counts as idle again
QUIET_STEP = 0.25  # seconds between CPU readings while waiting for a tunnel to go idle
QUIET_TIMEOUT = 30  # seconds to wait for it (10,000 streams take a while to close)
FULL = {"bulk_mib": 512, "reps": 5, "kept": 2000, "fresh": 300, "gapped": 100, "gap": 0.02,
        "neighbour": 1000, "concurrent": 1000, "streams": 10000, "batch": 1000,
        "rounds": 5, "profile_s": 4}
QUICK = dict(FULL, bulk_mib=128, reps=3, kept=1000, fresh=150, gapped=50, neighbour=500,
             profile_s=2)
RAISED_OPEN_RATE = 100000  # open_rate/open_burst for the runs that measure more than the limiter


def log(message, *args):
    print("[%s] %s" % (time.strftime("%H:%M:%S"), message % args), flush=True)


# ----- prerequisites ------------------------------------------------------------------------
def ensure_tools():
    missing = [package for tool, package in (("socat", "socat"), ("ssh", "openssh-client"),
                                             ("/usr/sbin/sshd", "openssh-server"))
               if not shutil.which(tool)]
    if missing:
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        log("installing %s with apt-get", " ".join(missing))
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(sudo + ["apt-get", "update", "-q"], check=True, env=env)
        subprocess.run(sudo + ["apt-get", "install", "-y", "-q", "--no-install-recommends",
                               *missing], check=True, env=env)
    for module, requirement in (("matplotlib", "matplotlib"), ("cryptography", "cryptography>=42")):
        try:
            importlib.import_module(module)
        except ImportError:
            log("installing %s into %s", requirement, sys.prefix)
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", requirement],
                           check=True)


def raise_nofile():
    """Children inherit the limit: the backend, socat, sshd and diglett all need it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, max(NOFILE, hard)))
    except (ValueError, OSError):  # not root: as far as the hard limit allows
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def checkout(rev, folder):
    """diglett as committed at ``rev``, in a folder to put first on PYTHONPATH (it wins over the
    venv's editable install, whose finder Python asks last), so a run measures a known commit
    while the working tree changes."""
    source = Path(folder) / "source"
    source.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "diglett", "hooks",
                              "migrations"], capture_output=True, check=True, timeout=60).stdout
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True, timeout=60)
    for name in ("hooks", "migrations"):  # setup.py installs them as diglett.hooks, .migrations
        (source / "diglett" / name).symlink_to(source / name)
    return source


# ----- statistics ---------------------------------------------------------------------------
def percentile(values, fraction):
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = min(len(ordered), max(1, math.ceil(fraction * len(ordered))))
    return ordered[rank - 1]


def median(values):
    return statistics.median(values)


def latency_summary(seconds):
    return {"count": len(seconds), "p50_ms": percentile(seconds, 0.5) * 1e3,
            "p99_ms": percentile(seconds, 0.99) * 1e3, "max_ms": max(seconds) * 1e3}


BACKEND_PIDS = []  # the backend's PID once started: wait_quiet watches it too


def wait_quiet(setup):
    """Wait until the tunnel's processes and the backend stop burning CPU (streams closed,
    threads ended, buffers freed), so one test's aftermath is not charged to the next."""
    roots = setup.roots() + BACKEND_PIDS
    deadline = time.monotonic() + QUIET_TIMEOUT
    before = setups.cpu_seconds(roots)
    while time.monotonic() < deadline:
        time.sleep(QUIET_STEP)
        now = setups.cpu_seconds(roots)
        if now - before < QUIET_CPU:
            return
        before = now
    log("%s still busy after %d s", setup.name, QUIET_TIMEOUT)


# ----- measurements -------------------------------------------------------------------------
def bulk(all_setups, plan):
    """Rounds of one download and one upload per setup; throughput and tunnel CPU per rep."""
    size = plan["bulk_mib"] * MiB
    raw = {setup.name: {"download": [], "upload": []} for setup in all_setups}
    for rep in range(plan["reps"]):
        for setup in all_setups:
            for direction, transfer in (("download", load.download), ("upload", load.upload)):
                roots = setup.roots()
                cpu_before = setups.cpu_seconds(roots)
                seconds = transfer(setup.port, size)
                cpu = setups.cpu_seconds(roots) - cpu_before
                raw[setup.name][direction].append({"seconds": seconds, "cpu_s": cpu})
                log("bulk %d/%d %-26s %-8s %6.3f GB/s  %5.2f CPU-s/GB", rep + 1, plan["reps"],
                    setup.name, direction, size / seconds / 1e9, cpu / (size / 1e9))
            setup.check()
    out = {}
    for name, directions in raw.items():
        out[name] = {}
        for direction, reps in directions.items():
            rates = [size / rep["seconds"] / 1e9 for rep in reps]
            cpus = [rep["cpu_s"] / (size / 1e9) for rep in reps]
            out[name][direction] = {"gbps": median(rates), "gbps_all": rates,
                                    "cpu_s_per_gb": median(cpus), "cpu_s_per_gb_all": cpus}
    return out, size


def latency(all_setups, plan):
    """Kept and fresh round trips, in rounds across the setups (the samples are pooled)."""
    rounds = plan["rounds"]
    samples = {setup.name: {"kept": [], "fresh": [], "fresh_gapped": []} for setup in all_setups}
    for _ in range(rounds):
        for setup in all_setups:
            mine = samples[setup.name]
            mine["kept"] += load.kept_round_trips(setup.port, plan["kept"] // rounds)
            mine["fresh"] += load.fresh_round_trips(setup.port, plan["fresh"] // rounds)
            mine["fresh_gapped"] += load.fresh_round_trips(setup.port, plan["gapped"] // rounds,
                                                           gap=plan["gap"])
            setup.check()
    results = {}
    for setup in all_setups:
        result = results[setup.name] = {kind: latency_summary(values)
                                        for kind, values in samples[setup.name].items()}
        log("latency %-26s kept p50 %.3f ms p99 %.3f | fresh p50 %.3f p99 %.3f | gapped p50 "
            "%.3f", setup.name, result["kept"]["p50_ms"], result["kept"]["p99_ms"],
            result["fresh"]["p50_ms"], result["fresh"]["p99_ms"],
            result["fresh_gapped"]["p50_ms"])
    return results


def fairness(all_setups, plan, folder):
    """A neighbour's round trips: quiet, beside a bulk download, and beside a stalled reader
    against no stall just before; in rounds across the setups, samples pooled."""
    rounds = plan["rounds"]
    count = plan["neighbour"] // rounds
    phases = ("quiet", "bulk", "no_stall", "stall")
    samples = {setup.name: {phase: [] for phase in phases} for setup in all_setups}
    for _ in range(rounds):
        for setup in all_setups:
            mine = samples[setup.name]
            mine["quiet"] += load.kept_round_trips(setup.port, count)
            hog = setups.Proc([sys.executable, str(BENCH / "load.py"), "hog", str(setup.port),
                               "60"], folder, "hog-%s" % setup.name.replace(" ", "_"))
            try:
                hog.wait_for("started", timeout=30)
                mine["bulk"] += load.kept_round_trips(setup.port, count)
            finally:
                hog.popen.send_signal(signal.SIGTERM)
                hog.popen.wait(10)
            wait_quiet(setup)
            mine["no_stall"] += load.kept_round_trips(setup.port, count)
            stalled = load.stalled_reader(setup.port)
            try:
                time.sleep(SETTLE)  # let the stalled stream fill its window and socket buffers
                mine["stall"] += load.kept_round_trips(setup.port, count)
            finally:
                stalled.close()
            wait_quiet(setup)
            setup.check()
    results = {}
    for setup in all_setups:
        result = results[setup.name] = {phase: latency_summary(samples[setup.name][phase])
                                        for phase in phases}
        log("fairness %-26s p99 quiet %.3f beside bulk %.3f ms | p50 no stall %.3f stall %.3f "
            "ms", setup.name, result["quiet"]["p99_ms"], result["bulk"]["p99_ms"],
            result["no_stall"]["p50_ms"], result["stall"]["p50_ms"])
    return results


def concurrency(setup, count, batch):
    """``count`` connections open at once, one round trip each; the tunnel's memory with all of
    them open, idle before and after."""
    roots = setup.roots()
    wait_quiet(setup)
    idle = setups.memory(roots)
    held = {}

    def probe(open_count):
        time.sleep(SETTLE)
        held.update(setups.memory(roots), open=open_count)

    result = load.concurrent(setup.port, count, batch=batch, hold=probe)
    wait_quiet(setup)
    after = setups.memory(roots)
    setup.check()
    result.update(idle=idle, held=held, after=after,
                  pss_per_stream=(held["pss"] - idle["pss"]) / max(1, held["open"]),
                  rss_per_stream=(held["rss"] - idle["rss"]) / max(1, held["open"]))
    log("concurrent %-26s %d: %d failures %s, open %.2f s, total %.2f s (per connection p50 "
        "%.3f max %.3f s, %d over 1 s), PSS %.1f MiB (idle %.1f), %.1f KiB per stream",
        setup.name, count, result["failures"], result["errors"] or "", result["open_s"],
        result["total_s"], result["answer_s"].get("p50", 0), result["answer_s"].get("max", 0),
        result["answer_s"].get("over_1s", 0), held["pss"] / MiB,
        idle["pss"] / MiB, result["pss_per_stream"] / 1024)
    return result


NO_AVX512 = ":~0x10000"  # OPENSSL_ia32cap: hide AVX-512F (CPUID 7 EBX bit 16) from OpenSSL
RECORD_CASES = (  # (label, records.py case, DIGLETT_AEAD, OPENSSL_ia32cap)
    ("cryptography", "cryptography", "", None),
    ("pycryptodome", "pycryptodome", "pycryptodome", None),
    ("pycryptodome-after-openssl", "pycryptodome-after-openssl", "", None),
    ("pycryptodome-after-openssl, AVX-512 hidden from OpenSSL", "pycryptodome-after-openssl",
     "", NO_AVX512),
)


def records(source=None):
    """bench/records.py in a fresh process per case: the record layer without any I/O."""
    out = []
    for label, case, aead, ia32cap in RECORD_CASES:
        path = [str(BENCH / "aead")] + ([str(source)] if source else [])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), DIGLETT_AEAD=aead)
        env.pop("OPENSSL_ia32cap", None)
        if ia32cap:
            env["OPENSSL_ia32cap"] = ia32cap
        done = subprocess.run([sys.executable, str(BENCH / "records.py"), case], env=env,
                              capture_output=True, text=True, timeout=300, check=True)
        out.append(dict(json.loads(done.stdout), case=label))
        log("records %s: seal %.2f GB/s, open %.2f GB/s, %.1f us per 64-byte record",
            label, out[-1]["seal_gbps"], out[-1]["open_gbps"], out[-1]["small_seal_us"])
    return out


PROFILE_RATE = 200  # py-spy samples per second
PERF_RATE = 499  # perf samples per second


def py_spy():
    found = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if found is None:
        log("installing py-spy into %s (--no-profile skips it)", sys.prefix)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True)
        found = shutil.which("py-spy", path=str(Path(sys.executable).parent))
    return found


def profile(setup, folder, tool, seconds):
    """Where a diglett process spends a bulk transfer: py-spy samples of its Python frames and,
    where `perf` is installed, perf samples of the native code (kernel, interpreter, cipher)."""
    perf = shutil.which("perf")
    result = {}
    for direction, mode in (("download", "hog"), ("upload", "push")):
        mover = setups.Proc([sys.executable, str(BENCH / "load.py"), mode, str(setup.port),
                             str(seconds + 2)], folder, "%s-%s" % (mode, setup.aead))
        mover.wait_for("started", timeout=30)
        samplers = []
        for proc in setup.procs:
            stem = Path(folder) / ("profile-%s-%s-%s" % (setup.aead, direction, proc.label))
            samplers.append((proc.label, stem, subprocess.Popen(
                [tool, "record", "-p", str(proc.pid), "-d", str(seconds), "-r",
                 str(PROFILE_RATE), "--nonblocking", "--format", "raw", "-o",
                 str(stem) + ".pyspy"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
            if perf:
                samplers.append((proc.label, stem, subprocess.Popen(
                    [perf, "record", "-q", "-F", str(PERF_RATE), "-p", str(proc.pid), "-o",
                     str(stem) + ".perf", "--", "sleep", str(seconds)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
        for _label, _stem, sampler in samplers:
            sampler.wait(seconds + 60)
        for label, stem, _sampler in samplers[::2 if perf else 1]:
            entry = result["%s %s" % (label, direction)] = summarize(Path(str(stem) + ".pyspy"))
            if perf:
                entry["native"] = native_summary(perf, Path(str(stem) + ".perf"))
        mover.popen.wait(60)
        wait_quiet(setup)
    return result


def native_summary(perf, path):
    """{"samples", "objects": {shared object: share}, "top": [[share, "dso symbol"], ...]}."""
    def report(sort):
        done = subprocess.run([perf, "report", "-i", str(path), "--stdio", "-n", "--sort", sort],
                              capture_output=True, text=True, timeout=120)
        rows = []
        for line in done.stdout.splitlines():
            parts = line.split(None, 2)
            if len(parts) == 3 and parts[0].endswith("%") and parts[1].isdigit():
                rows.append((int(parts[1]), parts[2].strip()))
        return rows

    if not path.exists():
        return {"samples": 0, "objects": {}, "top": []}
    by_dso = report("dso")
    total = sum(count for count, _ in by_dso) or 1
    top = [[count / total, " ".join(symbol.split())] for count, symbol in report("dso,sym")[:8]]
    return {"samples": total, "objects": {dso: count / total for count, dso in by_dso},
            "top": top}


def summarize(path):
    """{"samples", "frames": {leaf frame: share}} of a py-spy raw profile (report.py groups the
    frames into categories)."""
    frames, total = {}, 0
    if not path.exists():
        return {"samples": 0, "frames": {}}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        leaf = stack.split(";")[-1]
        frames[leaf] = frames.get(leaf, 0) + int(count)
        total += int(count)
    return {"samples": total, "frames": {leaf: count / total for leaf, count in frames.items()}}


def machine_busy():
    """(CPU seconds the whole machine was busy, CPU seconds of this process and its children)."""
    with open("/proc/stat") as handle:
        fields = [int(value) for value in handle.readline().split()[1:]]
    busy = sum(fields[:3]) / setups.CLOCK_TICKS  # user, nice, system (not irq, softirq, steal)
    return busy, setups.cpu_seconds([os.getpid()])


# ----- the machine --------------------------------------------------------------------------
def machine(all_setups, nofile, rev=None):
    def version(command, pattern):
        import re

        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=10)
        except OSError:
            return "?"
        match = re.search(pattern, done.stdout + done.stderr)
        return match.group(1) if match else "?"

    cpu = "?"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import diglett

    info = {
        "cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(), "diglett": diglett.__version__,
        "openssh": version(["ssh", "-V"], r"(OpenSSH_\S+)"),
        "openssl": version(["ssh", "-V"], r"(OpenSSL [\d.a-z]+)"),
        "socat": version(["socat", "-V"], r"socat version (\S+)"),
        "nofile": nofile,
        "rev": rev,
        "commit": version(["git", "-C", str(ROOT), "rev-parse", "--short", rev or "HEAD"],
                          r"(\w+)"),
        "diglett_commit": version(["git", "-C", str(ROOT), "log", "-1", "--format=%h %cs",
                                   rev or "HEAD", "--", "diglett"], r"(\w+ [\d-]+)"),
        "dirty": False if rev else bool(subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "diglett", "hooks", "migrations"],
            capture_output=True, text=True, timeout=10).stdout.strip()),
    }
    for package in ("gevent", "pycryptodome", "cryptography"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    for setup in all_setups:
        info.update({"%s %s" % (setup.name, key): value
                     for key, value in setup.describe().items()})
    return info


# ----- the run ------------------------------------------------------------------------------
def run(plan, quick, folder, profiling=False, rev=None):
    nofile = raise_nofile()
    backend = setups.Proc([sys.executable, str(BENCH / "backend.py")], folder, "backend")
    port = int(backend.wait_for(r"listening (\d+)").group(1))
    BACKEND_PIDS[:] = [backend.pid]
    machine_before = machine_busy()
    source = checkout(rev, folder) if rev else None
    all_setups = [setups.Direct(folder, port), setups.Socat(folder, port),
                  setups.Ssh(folder, port), setups.Diglett(folder, port, "cryptography", source),
                  setups.Diglett(folder, port, "pycryptodome", source)]
    started = time.monotonic()
    try:
        for setup in all_setups:
            setup.start()
            log("started %-26s port %d, processes %s", setup.name, setup.port, setup.roots())
        results = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                   "quick": quick, "plan": plan, "machine": machine(all_setups, nofile, rev),
                   "setups": [setup.name for setup in all_setups]}
        results["idle_start"] = {s.name: setups.memory(s.roots()) for s in all_setups}
        results["bulk"], results["bulk_bytes"] = bulk(all_setups, plan)
        results["latency"] = latency(all_setups, plan)
        results["fairness"] = fairness(all_setups, plan, folder)
        results["concurrent"] = {s.name: concurrency(s, plan["concurrent"], plan["batch"])
                                 for s in all_setups}
        results["concurrent_raised"], results["streams"] = {}, {}
        for setup in all_setups:
            if isinstance(setup, setups.Diglett):
                setup.reconfigure(open_rate=RAISED_OPEN_RATE, open_burst=RAISED_OPEN_RATE)
                results["concurrent_raised"][setup.name] = concurrency(
                    setup, plan["concurrent"], plan["batch"])
                results["streams"][setup.name] = concurrency(setup, plan["streams"],
                                                             plan["batch"])
        results["records"] = records(source)
        if profiling:
            tool = py_spy()
            results["profile"] = {s.name: profile(s, folder, tool, plan["profile_s"])
                                  for s in all_setups
                                  if isinstance(s, setups.Diglett)}
        results["elapsed_s"] = time.monotonic() - started
        busy, ours = (after - before for after, before in zip(machine_busy(), machine_before))
        results["foreign_cpu_share"] = max(0.0, busy - ours) / results["elapsed_s"]
        log("other processes on this machine used %.0f%% of a core during the run",
            100 * results["foreign_cpu_share"])
        return results
    finally:
        for setup in reversed(all_setups):
            setup.stop()
        backend.stop()


def run_transports(plan, folder):
    """Bulk and round trips of diglett over each transport, beside direct and raw tcp."""
    nofile = raise_nofile()
    backend = setups.Proc([sys.executable, str(BENCH / "backend.py")], folder, "backend")
    port = int(backend.wait_for(r"listening (\d+)").group(1))
    BACKEND_PIDS[:] = [backend.pid]
    all_setups = [setups.Direct(folder, port), setups.Diglett(folder, port, TRANSPORT_AEAD)]
    all_setups += [setups.DiglettTransport(folder, port, TRANSPORT_AEAD, transport)
                   for transport in ("tls", "ws", "wss")]
    started = time.monotonic()
    try:
        for setup in all_setups:
            setup.start()
            log("started %-26s port %d, processes %s", setup.name, setup.port, setup.roots())
        results = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                   "plan": plan, "machine": machine(all_setups, nofile),
                   "setups": [setup.name for setup in all_setups]}
        results["bulk"], results["bulk_bytes"] = bulk(all_setups, plan)
        results["latency"] = latency(all_setups, plan)
        results["elapsed_s"] = time.monotonic() - started
        return results
    finally:
        for setup in reversed(all_setups):
            setup.stop()
        backend.stop()


def transports_main(args):
    import report

    plan = dict(QUICK, reps=args.reps or QUICK["reps"])
    folder = Path(tempfile.mkdtemp(prefix="diglett-bench-"))
    log("working in %s", folder)
    try:
        results = run_transports(plan, folder)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    TRANSPORTS.write_text(json.dumps(results, indent=1) + "\n")
    log("raw results in %s (%.0f s)", TRANSPORTS.relative_to(ROOT), results["elapsed_s"])
    report.write_transports(results, ROOT / "docs")
    log("wrote the transports section of docs/benchmarks.md")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="128 MiB transfers, fewer samples")
    parser.add_argument("--reps", type=int, help="bulk repetitions (default 5, 3 with --quick)")
    parser.add_argument("--report", action="store_true",
                        help="only rewrite docs/benchmarks.md and the chart from results.json")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--rev", metavar="REV",
                        help="measure diglett as committed at REV (e.g. HEAD), not the working "
                        "tree, which may hold unfinished changes")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="skip sampling diglett's processes with py-spy during bulk "
                        "transfers (otherwise py-spy is installed into the venv if missing)")
    parser.add_argument("--transports", action="store_true",
                        help="only compare diglett's transports (tcp, tls, ws, wss through "
                        "Traefik): bulk and round trips, into bench/transports.json")
    parser.add_argument("--only", choices=["rtt", "bulk"],
                        help="rtt: only the kept round trip of direct, socat, ssh -R and diglett "
                        "(bench/rtt.py, into bench/rtt.json); bulk: only their bulk transfers "
                        "(128 MiB, --reps times), e.g. beside a --baseline")
    parser.add_argument("--baseline", metavar="REV",
                        help="with --only rtt: diglett as committed at REV beside the working tree")
    parser.add_argument("--syscalls", action="store_true",
                        help="with --only rtt: strace -c -f each tunnel over 2000 round trips")
    parser.add_argument("--switches", action="store_true",
                        help="with --only rtt: count greenlet switches per round trip")
    parser.add_argument("--perf", action="store_true",
                        help="with --only rtt: perf-sample each tunnel over 2000 round trips")
    parser.add_argument("--pycryptodome", action="store_true",
                        help="with --only rtt: diglett on pycryptodome as well")
    parser.add_argument("--rounds", type=int, default=10, help="with --only rtt: rounds")
    parser.add_argument("--per-round", type=int, default=400,
                        help="with --only rtt: round trips per setup per round")
    args = parser.parse_args(argv)
    if args.only:
        import rtt

        raise_nofile()
        return rtt.main(args, checkout, bulk=lambda setups_, reps: bulk(
            setups_, dict(QUICK, reps=reps))[0])
    if args.transports:  # needs none of the other setups' tools, nor matplotlib
        return transports_main(args)
    ensure_tools()
    import report

    if not args.report:
        plan = dict(QUICK if args.quick else FULL)
        if args.reps:
            plan["reps"] = max(1, args.reps)
        folder = Path(tempfile.mkdtemp(prefix="diglett-bench-"))
        log("working in %s", folder)
        try:
            results = run(plan, args.quick, folder, args.profile, args.rev)
        finally:
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
        log("raw results in %s (%.0f s)", RESULTS.relative_to(ROOT), results["elapsed_s"])
    report.write(json.loads(RESULTS.read_text()), ROOT / "docs")
    log("wrote docs/benchmarks.md and docs/benchmarks.png")


if __name__ == "__main__":
    main()
