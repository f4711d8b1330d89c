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
