"""Benchmark only: pick diglett's AEAD backend from outside the process.

bench/run.py puts this folder on PYTHONPATH of the diglett processes it starts. With
DIGLETT_AEAD=pycryptodome the `cryptography` package is hidden from the process, so diglett
runs exactly as on a machine where only pycryptodome is installed (crypto.available_backends()
then names pycryptodome alone). Any other value changes nothing: diglett picks its default.
"""

import os
import sys

if os.environ.get("DIGLETT_AEAD") == "pycryptodome":
    sys.modules["cryptography"] = None  # a None entry makes every `import cryptography...` fail

if os.environ.get("DIGLETT_COUNT_SWITCHES"):  # bench/rtt.py --switches
    import greenlet
    import json
    import signal

    _counts = {"switch": 0, "throw": 0}

    def _trace(event, args):
        _counts[event] = _counts.get(event, 0) + 1

    def _dump(signum, frame):
        # Installed before gevent patches signal, so it runs in the main thread as soon as
        # the hub checks for signals (gevent does every 300 ms even while idle).
        path = "switches.%d" % os.getpid()
        with open(path + ".tmp", "w") as handle:
            json.dump(_counts, handle)
        os.replace(path + ".tmp", path)

    greenlet.settrace(_trace)
    signal.signal(signal.SIGUSR2, _dump)
