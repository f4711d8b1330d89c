"""The hook outbox: one row per (hook, event), queued with the session change that caused it.

Frozen copy of the model as it was when this migration was written; never import
diglett.registry here.
"""

import peewee


def up(db):
    class Outbox(peewee.Model):
        hook = peewee.CharField(max_length=64)
        event_id = peewee.CharField(max_length=32)
        subdomain = peewee.CharField(max_length=63)
        session = peewee.CharField(max_length=32)
        kind = peewee.CharField(max_length=16)
        payload = peewee.TextField()
        state = peewee.CharField(max_length=16)
        attempts = peewee.IntegerField(default=0)
        next_attempt = peewee.FloatField()
        last_error = peewee.TextField(null=True)
        created = peewee.FloatField()

        class Meta:
            database = db
            table_name = "outbox"
            indexes = ((("hook", "state", "id"), False),)

    Outbox.create_table()
