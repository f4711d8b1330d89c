"""Several servers on one registry: the gateway of each session, delivery and kick, and the
``gateways`` table where each server says it is alive.

Rows written before this migration get the gateway "" (one server per database then). Frozen
copy of the models as they were when this migration was written; never import
diglett.registry here.
"""

import peewee
from playhouse import migrate


def up(db):
    migrator = migrate.SchemaMigrator.from_database(db)
    migrate.migrate(
        migrator.add_column("sessions", "gateway", peewee.CharField(max_length=63, default="")),
        migrator.add_index("sessions", ("gateway",), False),
        migrator.add_column("outbox", "gateway", peewee.CharField(max_length=63, default="")),
        migrator.add_column("kicks", "gateway", peewee.CharField(max_length=63, null=True)),
    )

    class Gateway(peewee.Model):
        gateway_id = peewee.CharField(max_length=63, primary_key=True)
        instance = peewee.TextField()
        address = peewee.TextField()
        started = peewee.FloatField()
        last_seen = peewee.FloatField()

        class Meta:
            database = db
            table_name = "gateways"

    Gateway.create_table()
