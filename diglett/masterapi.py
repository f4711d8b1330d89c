"""What a master's HTTP API serves (diglett.workers): its workers' answers, put together.

Each worker serves the usual API on a unix socket only the master reaches. The master asks
every ready worker at request time (a scrape, a status page) and answers once for all:
/metrics sums the workers' samples of each name and label set (counters, gauges and histogram
buckets all add up; build_info is the same everywhere) and adds the master's own families
(hook deliveries: only the master runs hooks; one ``diglett_worker_*`` row per worker);
/api/tunnels and the status page list the sessions of every worker. ``MasterView`` is what
httpapi.make_app reads from a server, with these answers behind it.

A worker's counters start again from 0 when it is restarted after a crash, so a sum can go
down once; Prometheus' rate() takes that for the counter reset it is.
"""

import http.client
import json
import logging

from gevent import socket
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from diglett import metrics

log = logging.getLogger(__name__)

WORKER_TIMEOUT = 5  # seconds a worker has to answer the master's request
SAME_EVERYWHERE = frozenset({"diglett_build_info"})  # not summed: the largest value is kept
MASTER_PREFIX = "diglett_hook_"  # families the master has itself (workers run no hooks)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost", timeout=WORKER_TIMEOUT)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(WORKER_TIMEOUT)
        self.sock.connect(self.path)


def ask(worker, path):
    """The body of ``worker``'s answer to GET ``path``, or None (logged) if it has none."""
    if not worker.ready.is_set():
        return None
    connection = _UnixConnection(worker.http_socket)
    try:
        connection.request("GET", path)
        answer = connection.getresponse()
        body = answer.read()
    except (OSError, http.client.HTTPException) as exc:
        log.warning("worker %d did not answer %s: %s", worker.index, path, exc)
        return None
    finally:
        connection.close()
    return body if answer.status == 200 else None


def ask_json(worker, path):
    body = ask(worker, path)
    try:
        return None if body is None else json.loads(body)
    except ValueError:
        return None


class _Snapshot:
    """A worker's session as /api/tunnels gave it, for code that calls ``to_json()``."""

    def __init__(self, data):
        self.data = data

    def to_json(self):
        return self.data


class MasterView:
    """The attributes of a Server that httpapi.make_app reads, for a master of workers."""

    def __init__(self, cfg, public_key, agent_port, address, db, registry, pool):
        self.config = cfg
        self.public_key = public_key
        self.agent_port = agent_port
        self.address = address
        self.db = db
        self.registry = registry
        self.pool = pool

    def snapshots(self):
        found = {}
        for worker in self.pool.workers:
            for tunnel in ask_json(worker, "/api/tunnels") or ():
                tunnel["worker"] = worker.index
                found[tunnel.get("subdomain")] = _Snapshot(tunnel)
        return found

    @property
    def sessions(self):
        return self.snapshots()  # /healthz counts them

    def stats(self):
        total = {"workers": []}
        for worker in self.pool.workers:
            stats = ask_json(worker, "/debug/stats") or {}
            total["workers"].append({"worker": worker.index, "up": worker.ready.is_set(),
                                     "pid": worker.pid, "gateway": worker.gateway_id,
                                     "restarts": worker.restarts, **stats})
            for key, value in stats.items():
                if isinstance(value, int):
                    total[key] = total.get(key, 0) + value
        return total


class WorkerSums:
    """Every worker's /metrics, summed per sample; and one row per worker."""

    def __init__(self, pool):
        self.pool = pool

    def describe(self):
        return []

    def collect(self):
        families, sums = {}, {}
        up = GaugeMetricFamily("diglett_worker_up", "1 while the worker process serves",
                               labels=["worker"])
        agents = GaugeMetricFamily("diglett_worker_agents", "agents a worker serves",
                                   labels=["worker"])
        restarts = CounterMetricFamily("diglett_worker_restarts", "times the master restarted "
                                       "a worker that exited", labels=["worker"])
        for worker in self.pool.workers:
            body = ask(worker, "/metrics")
            label = [str(worker.index)]
            up.add_metric(label, 1 if body is not None else 0)
            restarts.add_metric(label, worker.restarts)
            for family in _parse(body, worker):
                if family.name.startswith(MASTER_PREFIX):
                    continue
                families.setdefault(family.name, family)
                for sample in family.samples:
                    key = (family.name, sample.name, tuple(sorted(sample.labels.items())))
                    if sample.name == "diglett_agents_connected":
                        agents.add_metric(label, sample.value)
                    before = sums.get(key, 0)
                    sums[key] = (max(before, sample.value) if family.name in SAME_EVERYWHERE
                                 else before + sample.value)
        for name, family in families.items():
            merged = Metric(name, family.documentation, family.type)
            for (owner, sample, labels), value in sums.items():
                if owner == name:
                    merged.add_sample(sample, dict(labels), value)
            yield merged
        yield GaugeMetricFamily("diglett_workers", "worker processes configured",
                                value=len(self.pool.workers))
        yield up
        yield agents
        yield restarts


def _parse(body, worker):
    if body is None:
        return []
    try:
        return list(text_string_to_metric_families(body.decode()))
    except ValueError as exc:
        log.warning("worker %d /metrics unreadable: %s", worker.index, exc)
        return []


def make_registry(pool, hooks):
    registry = CollectorRegistry(auto_describe=False)
    registry.register(WorkerSums(pool))
    registry.register(metrics.HookFamilies(hooks))
    return registry
