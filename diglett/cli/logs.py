"""Logging setup shared by the command-line entry points (the only place logging is configured).

Text lines carry ``key=value`` pairs (``subdomain=foo session=...``) so grep tells a story;
the JSON format puts the same pairs into fields, one object per line, for log shippers.
"""

import json
import logging
import re
import sys
import time

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FORMATS = ("text", "json")
_PAIR = re.compile(r"\b([a-z_]+)=([^\s,()]+)")


class JsonFormatter(logging.Formatter):
    def __init__(self, worker=None):
        super().__init__()
        self.worker = worker  # a worker process's index (diglett.workers), or None

    def format(self, record):
        message = record.getMessage()
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + ".%03dZ" % record.msecs,
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
        }
        if self.worker is not None:
            entry["worker"] = str(self.worker)
        for key, value in _PAIR.findall(message):
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, sort_keys=False)


def setup(level="info", fmt="text", worker=None):
    """``worker``: a worker process's index, put on each of its lines (``worker=N``)."""
    handler = logging.StreamHandler(sys.stderr)
    text = FORMAT if worker is None else FORMAT.replace(" %(name)s", " worker=%d %%(name)s"
                                                          % worker)
    handler.setFormatter(JsonFormatter(worker) if fmt == "json" else logging.Formatter(text))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_level(level)


def set_level(level):
    logging.getLogger().setLevel(getattr(logging, level.upper()))
