"""Kick requests from diglett-admin to the running server.

Frozen copy of the model as it was when this migration was written; never import
diglett.registry here.
"""

import peewee


def up(db):
    class Kick(peewee.Model):
        subdomain = peewee.CharField(max_length=63)
        delay = peewee.IntegerField()
        actor = peewee.TextField()
        requested = peewee.FloatField()
        handled = peewee.FloatField(null=True)
        result = peewee.TextField(null=True)

        class Meta:
            database = db
            table_name = "kicks"

    Kick.create_table()
