"""Access policy per grant: one JSON column holding diglett.policy.Policy.to_json().

Rows written before this migration (or by hand, without it) hold NULL or "{}": the empty
policy (the hook's own settings).
Frozen: the column is added with playhouse.migrate; never import diglett.registry here.
"""

import peewee
from playhouse import migrate


def up(db):
    migrator = migrate.SchemaMigrator.from_database(db)
    migrate.migrate(
        migrator.add_column("grants", "policy", peewee.TextField(null=True, default="{}")),
    )
