"""diglett: a self-hosted reverse tunnel.

This module holds the version only and imports nothing, so the CLI entry points can
monkey-patch gevent before anything else is imported.
"""

__version__ = "0.1.0"
