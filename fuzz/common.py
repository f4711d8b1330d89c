"""What every target in fuzz/ shares: the golden keys, and running under atheris or as a replay.

``run(target)`` hands sys.argv to atheris (libFuzzer flags, corpus directories) when atheris
is installed. Without it, every argument is a file or a directory of files, and the target is
called once on each: the corpora and any crash reproducer replay on a plain Python.
"""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `python fuzz/fuzz_x.py` from a checkout, without installing
GOLDEN = json.loads((REPO / "tests" / "vectors" / "golden.json").read_text())

try:
    import atheris
except ImportError:  # replay only
    atheris = None


def instrumented():
    """A context manager that instruments diglett's modules for coverage when atheris runs."""
    if atheris is not None:
        return atheris.instrument_imports(include=["diglett"])
    import contextlib

    return contextlib.nullcontext()


def golden_hex(*path):
    value = GOLDEN
    for key in path:
        value = value[key]
    return bytes.fromhex(value)


def replay(target, paths):
    files = []
    for name in paths:
        path = Path(name)
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for path in files:
        target(path.read_bytes())
    print("replayed %d inputs without a crash" % len(files))


def run(target):
    if atheris is None:
        args = [a for a in sys.argv[1:] if not a.startswith("-")]
        if not args:
            sys.exit("atheris is not installed: give corpus directories or files to replay")
        replay(target, args)
        return
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()
