"""The first schema: grants, sessions and the audit log.

The models below are a frozen copy of what diglett.registry declared when this migration was
written. They must never import diglett.registry: a later change to the live models must not
change what this migration creates on a fresh database.
"""

import peewee


def up(db):
    class Base(peewee.Model):
        class Meta:
            database = db
            legacy_table_names = False

    class Grant(Base):
        subdomain = peewee.CharField(max_length=63)
        key = peewee.CharField(max_length=66)
        port = peewee.IntegerField(null=True, unique=True)
        comment = peewee.TextField(default="")
        created = peewee.FloatField()

        class Meta:
            table_name = "grants"
            indexes = ((("subdomain", "key"), True),)

    class Session(Base):
        id = peewee.CharField(max_length=32, primary_key=True)
        subdomain = peewee.CharField(max_length=63)
        key = peewee.CharField(max_length=66)
        host = peewee.TextField()
        port = peewee.IntegerField()
        remote = peewee.TextField()
        started = peewee.FloatField()
        ended = peewee.FloatField(null=True)
        state = peewee.CharField(max_length=16, index=True)
        reason = peewee.TextField(null=True)
        instance = peewee.TextField()

        class Meta:
            table_name = "sessions"
            indexes = ((("subdomain", "started"), False),)

    class AuditLog(Base):
        time = peewee.FloatField()
        actor = peewee.TextField()
        action = peewee.CharField(max_length=32)
        subdomain = peewee.CharField(max_length=63)
        key = peewee.CharField(max_length=66, null=True)
        detail = peewee.TextField(default="")

        class Meta:
            table_name = "audit_log"

    db.create_tables([Grant, Session, AuditLog])
