"""Command-line entry points: diglett (agent), diglett-server and diglett-admin."""
