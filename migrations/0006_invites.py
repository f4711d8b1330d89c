"""Invites: one-time enrolment codes (`diglett-admin invite`), redeemed by `diglett enroll`.

Only the SHA-256 of each secret is stored. Frozen copy of the model as it was when this
migration was written; never import diglett.registry here.
"""

import peewee


def up(db):
    class Invite(peewee.Model):
        id = peewee.CharField(max_length=16, primary_key=True)
        subdomain = peewee.CharField(max_length=63)
        secret_hash = peewee.CharField(max_length=64)
        policy = peewee.TextField(default="{}")
        port = peewee.IntegerField(null=True)
        comment = peewee.TextField(default="")
        actor = peewee.TextField()
        created = peewee.FloatField()
        expires = peewee.FloatField()
        used = peewee.FloatField(null=True)
        used_by = peewee.CharField(max_length=66, null=True)

        class Meta:
            database = db
            table_name = "invites"

    Invite.create_table()
