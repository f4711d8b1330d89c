"""The TLS certificate of the gateway's tls:// listener: the configured one, or a self-signed
one made once next to the server key and kept (agents pin the server's Noise key, not this
certificate, so nothing trusts it and nothing needs to).

Making one needs the ``cryptography`` package (diglett[fast]); configuring tls_cert does not.
"""

import datetime
import logging
import os

log = logging.getLogger(__name__)

SELF_SIGNED_NAME = "tls-selfsigned.pem"  # certificate and key in one file, mode 0600
SELF_SIGNED_DAYS = 3650  # nobody checks it, so it may as well outlive the host
COMMON_NAME = "diglett"


class CertificateError(Exception):
    pass


def files(config):
    """(certificate path, key path) for the TLS listener, making a self-signed pair if none
    is configured and none was made before."""
    if config.tls_cert is not None:
        return config.tls_cert, config.tls_key
    path = config.key.parent / SELF_SIGNED_NAME
    if not path.exists():
        _make_self_signed(path)
        log.info("made a self-signed TLS certificate %s (agents pin the server key, "
                 "not this certificate)", path)
    return path, path


def _make_self_signed(path):
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        raise CertificateError("listen_tls without tls_cert needs the cryptography package to "
                               "make a self-signed certificate (pip install 'diglett[fast]'), "
                               "or set tls_cert and tls_key") from None
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, COMMON_NAME)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
                   .sign(key, hashes.SHA256()))
    pem = (certificate.public_bytes(serialization.Encoding.PEM)
           + key.private_bytes(serialization.Encoding.PEM,
                               serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption()))
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as out:
        out.write(pem)
