"""Numbered schema migrations, installed as ``diglett.migrations``.

Each ``NNNN_name.py`` defines ``up(db)``; diglett.registry applies them in order and records
the applied version in the ``schema_version`` table.
"""
