"""A private etcd for the tests: the real server from Debian's etcd-server, on loopback.

Each test gets its own member, data folder and free ports; it is stopped by its PID. A
restart keeps the data folder and the ports, as an operator's restart would. Tests are
skipped only when no etcd binary is installed (scripts/bootstrap --test installs it).
"""

import datetime
import ipaddress
import json
import shutil
import ssl
import urllib.request

import pytest

from tests.support import harness

START_TIMEOUT = 20  # seconds for etcd to answer its health check


class Etcd:
    """``tls``: serve clients over https with a certificate of a test CA and demand client
    certificates (``client_files()``), as a production etcd should."""

    def __init__(self, workdir, tls=False):
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.client_port = harness.free_port()
        self.peer_port = harness.free_port()
        self.proc = None
        self.starts = 0
        self.tls = make_certificates(workdir / "pki") if tls else None

    @property
    def url(self):
        return "%s://127.0.0.1:%d" % ("https" if self.tls else "http", self.client_port)

    def client_files(self):
        """(ca_file, cert_file, key_file) of a client the TLS etcd accepts."""
        return self.tls["ca"], self.tls["client"], self.tls["client_key"]

    def start(self):
        self.starts += 1
        client, peer = self.url, "http://127.0.0.1:%d" % self.peer_port
        argv = [shutil.which("etcd"), "--name", "test", "--data-dir", str(self.workdir / "data"),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", "test=" + peer, "--log-level", "warn"]
        if self.tls:
            argv += ["--cert-file", str(self.tls["server"]), "--key-file",
                     str(self.tls["server_key"]), "--trusted-ca-file", str(self.tls["ca"]),
                     "--client-cert-auth"]
        self.proc = harness.Proc(argv, self.workdir, "etcd-%d" % self.starts)
        harness.wait_until(self._healthy, START_TIMEOUT, interval=0.1, what="etcd health")
        return self

    def _healthy(self):
        if self.proc.popen.poll() is not None:
            raise AssertionError("etcd exited with %s:\n%s" % (self.proc.popen.returncode,
                                                               self.proc.stderr()[-3000:]))
        context = None
        if self.tls:
            context = ssl.create_default_context(cafile=str(self.tls["ca"]))
            context.load_cert_chain(str(self.tls["client"]), str(self.tls["client_key"]))
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2,
                                        context=context) as answer:
                return json.loads(answer.read()).get("health") == "true"
        except OSError:
            return False

    def kill(self):
        self.proc.kill()

    def restart(self):
        self.kill()
        return self.start()


def make_certificates(folder):
    """A test CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def issue(name, key, issuer, issuer_key, ca=False, usage=None, ip=None):
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(issuer).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), True))
        if usage:
            builder = builder.add_extension(x509.ExtendedKeyUsage(usage), False)
        if ip:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(ip))]), False)
        return builder.sign(issuer_key, hashes.SHA256())

    def write(label, cert, key):
        cert_path, key_path = folder / (label + ".pem"), folder / (label + "-key.pem")
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_path, key_path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "diglett test CA")])
    ca = issue("diglett test CA", ca_key, ca_name, ca_key, ca=True)
    files = {}
    files["ca"], _ = write("ca", ca, ca_key)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    files["server"], files["server_key"] = write("server", issue(
        # clientAuth too: etcd's JSON gateway dials etcd's own gRPC with this certificate
        "etcd", server_key, ca_name, ca_key,
        usage=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        ip="127.0.0.1"), server_key)
    files["client"], files["client_key"] = write("client", issue(
        "gateway", client_key, ca_name, ca_key, usage=[ExtendedKeyUsageOID.CLIENT_AUTH]),
        client_key)
    return files


@pytest.fixture
def etcd_server(tmp_path):
    if shutil.which("etcd") is None:
        pytest.skip("no etcd binary (scripts/bootstrap --test installs Debian's etcd-server)")
    return Etcd(tmp_path / "etcd").start()
