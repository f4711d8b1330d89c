"""Change counters: ``changes`` holds one row per watched table (``grants``, ``sessions``) whose
``version`` goes up with every insert, update or delete of that table, by triggers, so a write
from anywhere (diglett-admin, another gateway, a hand-edited row) counts. A running server
reads two integers each second and reloads the grants, or looks for takeovers, only when
theirs changed, instead of reading every row.

SQLite's triggers run per row, PostgreSQL's per statement (a bulk update bumps once). Frozen:
plain SQL and a frozen model; never import diglett.registry here.
"""

import peewee

WATCHED = ("grants", "sessions")


def up(db):
    class Change(peewee.Model):
        name = peewee.CharField(max_length=32, primary_key=True)
        version = peewee.BigIntegerField(default=0)

        class Meta:
            database = db
            table_name = "changes"

    Change.create_table()
    for table in WATCHED:
        Change.insert(name=table, version=0).execute()
    if isinstance(db, peewee.SqliteDatabase):
        for table in WATCHED:
            for event in ("INSERT", "UPDATE", "DELETE"):
                db.execute_sql(
                    "CREATE TRIGGER %s_changed_%s AFTER %s ON %s BEGIN "
                    "UPDATE changes SET version = version + 1 WHERE name = '%s'; END"
                    % (table, event.lower(), event, table, table))
        return
    db.execute_sql(
        "CREATE OR REPLACE FUNCTION diglett_count_change() RETURNS trigger AS $$ BEGIN "
        "UPDATE changes SET version = version + 1 WHERE name = TG_ARGV[0]; RETURN NULL; "
        "END $$ LANGUAGE plpgsql")
    for table in WATCHED:
        db.execute_sql(
            "CREATE TRIGGER %s_changed AFTER INSERT OR UPDATE OR DELETE ON %s "
            "FOR EACH STATEMENT EXECUTE PROCEDURE diglett_count_change('%s')"
            % (table, table, table))
