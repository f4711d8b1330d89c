"""A small etcd v3 client over etcd's JSON gateway (``/v3/...``): leases, transactions, ranges.

Only what the route publisher needs, on plain HTTP/1.1 through the standard library, so it is
cooperative under gevent's monkey-patching and adds no dependency. Keys and values are bytes
or str on the way in and bytes on the way out; the gateway wants them base64-encoded. Every
failure leaves as EtcdError naming the endpoint; with several endpoints, a call that cannot
reach one, or that one answers with a 5xx (a member without a leader), tries the next (etcd
forwards writes to its leader itself, and claims are compare-and-swap, so a retry is safe).
"""

import base64
import http.client
import json
import ssl
import urllib.error
import urllib.request

RESPONSE_LIMIT = 64 << 20  # bytes read from one answer (a range over every route key)


class EtcdError(Exception):
    """etcd cannot be reached or refused a request; the message says which and why."""


class LeaseLost(EtcdError):
    """The lease has expired or was revoked: every key written on it is gone."""


def _b64(value):
    if isinstance(value, str):
        value = value.encode()
    return base64.b64encode(value).decode("ascii")


def _unb64(text):
    return base64.b64decode(text) if text else b""


def prefix_end(prefix):
    """The range end that selects every key starting with ``prefix`` (etcd's convention)."""
    prefix = prefix.encode() if isinstance(prefix, str) else bytes(prefix)
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\x00"  # every key


# ----- transaction parts (plain dicts in the gateway's JSON form) -------------------------
def put(key, value, lease=0):
    request = {"key": _b64(key), "value": _b64(value)}
    if lease:
        request["lease"] = str(lease)
    return {"request_put": request}


def delete_prefix(prefix):
    return {"request_delete_range": {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))}}


def get(key):
    return {"request_range": {"key": _b64(key)}}


def compare_value(key, value):
    """The key exists and holds exactly ``value``."""
    return {"key": _b64(key), "target": "VALUE", "result": "EQUAL", "value": _b64(value)}


def compare_mod_revision(key, revision):
    """The key was last written at ``revision``; 0 means it does not exist."""
    return {"key": _b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(revision)}


class Client:
    def __init__(self, endpoints, timeout=5.0, ca_file=None, cert_file=None, key_file=None):
        """``ca_file`` checks https endpoints against that CA (default: the system's);
        ``cert_file`` and ``key_file`` are a client certificate, for etcd's
        --client-cert-auth."""
        self.endpoints = [e.rstrip("/") for e in endpoints]
        if not self.endpoints:
            raise ValueError("no etcd endpoint given")
        for endpoint in self.endpoints:
            if not endpoint.startswith(("http://", "https://")):
                raise ValueError("etcd endpoint must be an http:// or https:// URL, got %r"
                                 % endpoint)
        if bool(cert_file) != bool(key_file):
            raise ValueError("a client certificate needs both cert_file and key_file")
        self.timeout = timeout
        self._tls = None
        if ca_file or cert_file:
            try:
                self._tls = ssl.create_default_context(cafile=ca_file or None)
                if cert_file:
                    self._tls.load_cert_chain(cert_file, key_file)
            except (OSError, ssl.SSLError) as exc:
                files = ", ".join("%s=%s" % pair for pair in (
                    ("ca_file", ca_file), ("cert_file", cert_file), ("key_file", key_file))
                    if pair[1])
                raise ValueError("cannot load the etcd TLS files (%s): %s; check the paths and "
                                 "that the key matches the certificate" % (files, exc)) from None
        self._current = 0  # the endpoint that answered last: tried first

    # ----- leases -------------------------------------------------------------------------
    def grant(self, ttl):
        """A new lease of ``ttl`` seconds; returns its id."""
        answer = self._call("/v3/lease/grant", {"TTL": str(int(ttl))})
        return int(answer["ID"])

    def keepalive(self, lease):
        """Refresh a lease; raises LeaseLost when etcd no longer has it."""
        answer = self._call("/v3/lease/keepalive", {"ID": str(lease)})
        ttl = int(answer.get("result", {}).get("TTL", 0))
        if ttl <= 0:
            raise LeaseLost("lease %x has expired" % lease)
        return ttl

    def revoke(self, lease):
        """Revoke a lease (its keys go in one revision). etcd 3.4 serves this path, not the
        /v3/kv/lease/revoke some clients use."""
        try:
            self._call("/v3/lease/revoke", {"ID": str(lease)})
        except EtcdError as exc:
            if "not found" not in str(exc):
                raise

    # ----- keys -----------------------------------------------------------------------------
    def range(self, key, prefix=False):
        """[(key, value, mod_revision)] of ``key``, or of every key under it with ``prefix``."""
        request = {"key": _b64(key or b"\x00")}  # "\0" to "\0": every key
        if prefix:
            request["range_end"] = _b64(prefix_end(key))
        answer = self._call("/v3/kv/range", request)
        return [(_unb64(kv["key"]), _unb64(kv.get("value")), int(kv.get("mod_revision", 0)))
                for kv in answer.get("kvs", [])]

    def revision(self, key):
        """(whether ``key`` exists, etcd's current revision): one small read, e.g. to tell
        that etcd was restored from an older backup (the revision went back) or wiped."""
        answer = self._call("/v3/kv/range", {"key": _b64(key), "count_only": True})
        return (int(answer.get("count", 0)) > 0,
                int(answer.get("header", {}).get("revision", 0)))

    def put(self, key, value, lease=0):
        self._call("/v3/kv/put", put(key, value, lease)["request_put"])

    def txn(self, compare, success, failure=()):
        """Run a transaction; returns (succeeded, [ranges of the branch's range requests])."""
        answer = self._call("/v3/kv/txn", {"compare": list(compare), "success": list(success),
                                           "failure": list(failure)})
        ranges = []
        for response in answer.get("responses", []):
            found = response.get("response_range")
            if found is not None:
                ranges.append([(_unb64(kv["key"]), _unb64(kv.get("value")),
                                int(kv.get("mod_revision", 0))) for kv in found.get("kvs", [])])
        return bool(answer.get("succeeded")), ranges

    # ----- transport ------------------------------------------------------------------------
    def _call(self, path, body):
        errors = []
        count = len(self.endpoints)
        for step in range(count):
            index = (self._current + step) % count
            endpoint = self.endpoints[index]
            try:
                answer = self._post(endpoint, path, body)
            except _Unreachable as exc:
                errors.append("%s: %s" % (endpoint, exc))
                continue
            self._current = index
            return answer
        raise EtcdError("etcd unreachable (%s); check that etcd is up and the endpoints "
                        "are right" % "; ".join(errors))

    def _post(self, endpoint, path, body):
        request = urllib.request.Request(endpoint + path, data=json.dumps(body).encode(),
                                         method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout,
                                        context=self._tls) as answer:
                text = answer.read(RESPONSE_LIMIT)
        except urllib.error.HTTPError as exc:
            detail = exc.read(4096).decode("utf-8", "replace")
            if exc.code >= 500:  # e.g. "etcdserver: no leader": a member cut off from quorum
                raise _Unreachable("answered %d: %s" % (exc.code, detail[:200])) from None
            try:
                detail = json.loads(detail).get("error") or json.loads(detail).get("message")
            except (ValueError, AttributeError):
                pass
            if exc.code == 404 and "lease" in path:
                raise EtcdError("%s%s: lease not found" % (endpoint, path)) from None
            raise EtcdError("%s%s answered %d: %s" % (endpoint, path, exc.code,
                                                      str(detail)[:300])) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise _Unreachable(getattr(exc, "reason", exc)) from None
        try:
            answer = json.loads(text)
        except ValueError:
            raise EtcdError("%s%s answered something that is not JSON" % (endpoint, path)) from None
        if "error" in answer and "result" not in answer:
            raise EtcdError("%s%s: %s" % (endpoint, path, answer["error"]))
        return answer


class _Unreachable(Exception):
    """This endpoint did not answer; the next one may."""
