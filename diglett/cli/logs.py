"""Logging setup shared by the command-line entry points (the only place logging is configured)."""

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup(level="info"):
    logging.basicConfig(stream=sys.stderr, format=FORMAT, level=getattr(logging, level.upper()))


def set_level(level):
    logging.getLogger().setLevel(getattr(logging, level.upper()))
