"""diglett's record layer alone, in one process, no I/O: what each AEAD backend costs.

``python bench/records.py CASE`` prints one JSON line; run.py starts one fresh process per
case, with bench/aead on PYTHONPATH so DIGLETT_AEAD=pycryptodome hides `cryptography`:

    cryptography                  the fast backend
    pycryptodome                  pycryptodome, `cryptography` never imported
    pycryptodome-after-openssl    pycryptodome after OpenSSL's ChaCha20-Poly1305 has run in the
                                  process (issue 5 saw pycryptodome slow down after that once)

It seals full records (65,535-byte bodies: two AEAD calls each, as on the wire), opens them
again, and times small records (64-byte bodies) for the fixed cost per record.
"""

import json
import os
import sys
import time

from diglett import crypto

FULL_RECORDS = 1024  # 64 MiB of 65,535-byte records per measurement
SMALL_RECORDS = 20000  # 64-byte records for the fixed cost
SMALL_BODY = 64


def pair(aead_name):
    key, chaining_key = os.urandom(32), os.urandom(32)
    return (crypto.TransportCipher(key, chaining_key, crypto.get_backend(aead_name)),
            crypto.TransportCipher(key, chaining_key, crypto.get_backend(aead_name)))


def measure(aead_name):
    body = os.urandom(crypto.MAX_RECORD_PLAINTEXT)
    sender, _ = pair(aead_name)
    started = time.perf_counter()
    for _ in range(FULL_RECORDS):  # each record dropped at once, as a sent one is
        sender.seal(body)
    seal_s = time.perf_counter() - started
    sender, receiver = pair(aead_name)
    records = [sender.seal(body) for _ in range(FULL_RECORDS)]  # to open, in nonce order
    header = crypto.RECORD_HEADER_SIZE
    started = time.perf_counter()
    for record in records:
        receiver.open_length(record[:header])
        receiver.open_body(record[header:])
    open_s = time.perf_counter() - started
    small = os.urandom(SMALL_BODY)
    started = time.perf_counter()
    for _ in range(SMALL_RECORDS):
        sender.seal(small)
    small_s = time.perf_counter() - started
    size = FULL_RECORDS * len(body)
    return {"backend": aead_name, "seal_gbps": size / seal_s / 1e9,
            "open_gbps": size / open_s / 1e9, "small_seal_us": small_s / SMALL_RECORDS * 1e6}


def main():
    case = sys.argv[1]
    if case == "pycryptodome-after-openssl":
        warm_sender, warm_receiver = pair("cryptography")  # OpenSSL's ChaCha20 runs first
        for _ in range(64):
            record = warm_sender.seal(bytes(1024))
            warm_receiver.open_length(record[:crypto.RECORD_HEADER_SIZE])
            warm_receiver.open_body(record[crypto.RECORD_HEADER_SIZE:])
        result = measure("pycryptodome")
    else:
        result = measure(case)
    result["case"] = case
    result["available"] = crypto.available_backends()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
