"""Opening the registry's database and calling it safely: retries, reconnects, messages.

This module owns the choice of SQLite or PostgreSQL from a path or URL, their pragmas and
timeouts, the write transaction, the loop every registry call goes through (``_call``: retry
while locked, reconnect once after PostgreSQL restarted, then fail) and the operator-facing
explanation of each database error. It must not know any table: the table modules bring their
queries, this one runs them. Like the rest of the registry it must not import gevent.
"""

import contextlib
import logging
import sqlite3
import time
import urllib.parse
from pathlib import Path

import peewee
from playhouse import db_url

from diglett.registry.records import RegistryError, default_actor

log = logging.getLogger(__name__)

BUSY_TIMEOUT = 0.05  # seconds SQLite waits for another connection's lock before giving up
RETRY_DELAYS = (0.02, 0.05, 0.1)  # seconds slept between attempts while the database is locked
SQLITE_PRAGMAS = (
    ("journal_mode", "wal"),  # readers never wait for the writer
    ("synchronous", "normal"),  # safe with WAL; a power cut loses at most the last commits
    ("foreign_keys", 1),
)
PG_CONNECT_TIMEOUT = 5  # seconds to reach PostgreSQL before the attempt is reported
PG_STATEMENT_TIMEOUT = "30s"  # a statement stuck on a lock longer than this fails (and is retried)
PG_FIELD_TYPES = {"FLOAT": "DOUBLE PRECISION"}  # peewee's default REAL would round timestamps


class Connection:
    """The registry's database, and how every query reaches it: the base of ``Registry``.

    Each thread gets its own connection (peewee ``thread_safe``). A locked SQLite database is
    retried a few times with short sleeps (never longer than about 0.4 s in total) and then
    reported, so a stuck writer elsewhere cannot freeze the caller.
    """

    def __init__(self, database, *, create_dirs=False):
        self.location = _display(database)
        self.db, self.path = _open(database)
        if self.path is not None and create_dirs:
            self._make_parent()
        self._is_sqlite = isinstance(self.db, peewee.SqliteDatabase)

    def close(self):
        """Close the calling thread's connection."""
        if not self.db.is_closed():
            self.db.close()

    def _call(self, function, *args):
        """``function(*args)``, retried while the database is busy and once more after a
        lost PostgreSQL connection; any other failure leaves as a RegistryError saying what
        to do."""
        delays = iter(RETRY_DELAYS)
        reconnected = False
        while True:
            try:
                return function(*args)
            except RegistryError:
                raise
            except (peewee.PeeweeException, sqlite3.Error, OSError) as exc:
                if not reconnected and self._forget_broken_connection():
                    reconnected = True  # PostgreSQL restarted: one fresh connection, at once
                    log.info("lost the connection to %s; reconnecting", self.location)
                    continue
                delay = next(delays, None) if _is_busy(exc) else None
                if delay is None:
                    raise RegistryError(self._explain(exc)) from exc
                log.debug("%s is locked, retrying in %.2f s", self.location, delay)
                time.sleep(delay)

    def _forget_broken_connection(self):
        """Drop this thread's PostgreSQL connection if the server closed it; True if so.

        peewee would otherwise keep handing out the dead connection.
        """
        if self._is_sqlite:
            return False
        connection = self.db._state.conn
        if connection is None or not getattr(connection, "closed", 0):
            return False
        self.db._state.reset()
        return True

    def _explain(self, exc):
        """An operator's message for a SQLite (or OS) failure: what is wrong, what to do."""
        if not self._is_sqlite and not isinstance(exc, OSError):
            return _explain_postgres(exc, self.location)
        text = str(exc)
        lower = text.lower()
        where = self.location
        user = default_actor()
        if _is_busy(exc):
            return (
                "%s is locked by another process (gave up after %.1f s); try again, and look "
                "for a stuck diglett-admin or sqlite3 shell holding a transaction"
                % (where, BUSY_TIMEOUT * (len(RETRY_DELAYS) + 1) + sum(RETRY_DELAYS))
            )
        if "readonly" in lower or "read-only" in lower:
            return (
                "%s is read-only for user %s; the database file, its -wal/-shm files and "
                "its directory must be writable by the user running diglett (check `ls -l`; "
                "run diglett-admin as the service user)" % (where, user)
            )
        if "unable to open" in lower and self.path is not None:
            parent = self.path.parent
            if not parent.is_dir():
                return (
                    "cannot open %s: directory %s does not exist; create it (diglett-admin "
                    "creates it on first use) or fix `database` in the config" % (where, parent)
                )
            return (
                "cannot open %s as user %s: check the owner and permissions of the file, "
                "its -wal/-shm files and directory %s" % (where, user, parent)
            )
        if "disk" in lower and "full" in lower:
            return "the disk holding %s is full; free some space and try again" % where
        if "not a database" in lower or "malformed" in lower:
            return "%s is not a usable SQLite database (%s); restore it from a backup" % (
                where, text)
        if "no such table" in lower:
            return "%s has no diglett schema (%s); run: diglett-admin migrate" % (where, text)
        if isinstance(exc, OSError):
            return "cannot use %s: %s" % (where, exc.strerror or exc)
        return "database error on %s: %s" % (where, text)

    @contextlib.contextmanager
    def _write(self):
        """A write transaction; SQLite takes the write lock up front (no upgrade deadlock).

        On a full disk (and some I/O errors) SQLite rolls the transaction back by itself, so
        the rollback that follows fails with "no transaction is active"; that second error
        must not hide the first, which is the one that says what is wrong.
        """
        transaction = self.db.atomic("IMMEDIATE") if self._is_sqlite else self.db.atomic()
        transaction.__enter__()
        try:
            yield
        except BaseException as exc:
            with _first_error_wins():
                transaction.__exit__(type(exc), exc, exc.__traceback__)
            raise
        with _first_error_wins():  # a failed COMMIT is rolled back too
            transaction.__exit__(None, None, None)

    def write_batch(self):
        """One write transaction around several registry writes (each one's own becomes a
        savepoint in it): diglett.dbworker applies a burst of queued writes this way. Only on
        the thread that runs the writes."""
        return self._write()

    def _insert_rows(self, model, rows):
        """INSERT ``rows`` (dicts with the same keys) into ``model``'s table with one
        prepared statement (executemany): thousands of rows without building SQL for each,
        inside the caller's transaction."""
        if not rows:
            return
        fields = model._meta.fields
        defaults = {name: field.default() if callable(field.default) else field.default
                    for name, field in fields.items()
                    if name not in rows[0] and field.default is not None}  # as peewee would
        columns = list(rows[0]) + list(defaults)
        sql = 'INSERT INTO "%s" (%s) VALUES (%s)' % (
            model._meta.table_name, ", ".join('"%s"' % fields[c].column_name for c in columns),
            ", ".join([self.db.param] * len(columns)))
        self.db.cursor().executemany(sql, [tuple({**defaults, **row}[c] for c in columns)
                                           for row in rows])

    def _write_query(self, query):
        with self._write():
            return query.execute()

    def _make_parent(self):
        parent = self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        except OSError as exc:
            raise RegistryError(
                "cannot create directory %s for %s: %s" % (parent, self.location, exc.strerror)
            ) from exc


@contextlib.contextmanager
def _first_error_wins():
    """A rollback that fails because SQLite already rolled back gives way to the error that
    made it roll back (its context): "database or disk is full", not "no transaction"."""
    try:
        yield
    except (peewee.PeeweeException, sqlite3.Error) as exc:
        cause = exc
        while cause is not None and "no transaction is active" in str(cause):
            cause = cause.__context__  # peewee wraps sqlite3's error: look past both
        if cause is None or cause is exc:
            raise
        raise cause from None


def _open(database):
    """peewee database for a path or URL, and the SQLite file path if there is one."""
    text = str(database)
    sqlite_options = {"pragmas": SQLITE_PRAGMAS, "timeout": BUSY_TIMEOUT, "thread_safe": True}
    if "://" not in text:
        # ":memory:" is one database per connection, so per thread: only good for tests.
        path = None if text == ":memory:" else Path(text)
        return peewee.SqliteDatabase(text, **sqlite_options), path
    parts = urllib.parse.urlsplit(text)
    if parts.scheme.startswith("postgres"):
        options = _postgres_options(parts)
    else:
        options = sqlite_options if parts.scheme == "sqlite" else {"thread_safe": True}
    try:
        db = db_url.connect(text, **options)
    except (RuntimeError, ValueError) as exc:
        raise RegistryError("cannot use database %s: %s" % (_display(text), exc)) from exc
    path = None
    if isinstance(db, peewee.SqliteDatabase) and db.database not in ("", ":memory:"):
        path = Path(db.database)
    return db, path


def _postgres_options(parts):
    """Connection options for a postgresql:// URL; what the URL's query sets wins."""
    try:
        import psycopg2  # noqa: F401  (peewee's driver; only a fleet needs it)
    except ImportError:
        raise RegistryError(
            "database %s is PostgreSQL, which needs psycopg2: pip install 'diglett[fleet]'"
            % _display(urllib.parse.urlunsplit(parts))) from None
    given = urllib.parse.parse_qs(parts.query)
    options = {"thread_safe": True, "field_types": PG_FIELD_TYPES}
    if "connect_timeout" not in given:
        options["connect_timeout"] = PG_CONNECT_TIMEOUT
    if "options" not in given:
        options["options"] = "-c statement_timeout=%s" % PG_STATEMENT_TIMEOUT
    return options


def _explain_postgres(exc, where):
    """An operator's message for a PostgreSQL failure: which server, and what to do."""
    text = " ".join(str(exc).split())  # libpq's messages span lines
    lower = text.lower()
    parts = urllib.parse.urlsplit(where)
    server = "%s:%s" % (parts.hostname or "localhost", parts.port or 5432)
    user = parts.username or default_actor()
    database = parts.path.lstrip("/")
    if "connection refused" in lower:
        return ("cannot connect to PostgreSQL at %s for %s: connection refused; start "
                "PostgreSQL there (listen_addresses and port in postgresql.conf) or fix "
                "`database` in the config" % (server, where))
    if "timeout expired" in lower:
        return ("no answer from PostgreSQL at %s within %d s (%s): check the host name, the "
                "network and the firewall" % (server, PG_CONNECT_TIMEOUT, where))
    if "could not translate host name" in lower:
        return "cannot resolve the host of %s (%s); fix `database` in the config" % (where, text)
    if "authentication failed" in lower or "no password supplied" in lower:
        return ("PostgreSQL at %s refused user %s (%s): check the user and password in "
                "`database` and the server's pg_hba.conf" % (server, user, text))
    if "does not exist" in lower and "database" in lower:
        return ("PostgreSQL at %s has no database %s: create it, e.g. as user postgres: "
                "createdb -O %s %s" % (server, database, user, database))
    if "does not exist" in lower and "role" in lower:
        return ("PostgreSQL at %s has no user %s: create it, e.g. as user postgres: "
                "createuser %s" % (server, user, user))
    if "permission denied" in lower:
        return ("user %s may not do this on %s (%s): make it the owner of database %s"
                % (user, where, text, database))
    if "statement timeout" in lower:
        return ("a statement on %s waited more than %s, probably for a lock: look for a long "
                "transaction in pg_stat_activity" % (where, PG_STATEMENT_TIMEOUT))
    if "closed the connection" in lower or "connection already closed" in lower \
            or "terminating connection" in lower:
        return ("lost the connection to PostgreSQL at %s (%s); diglett reconnects on the next "
                "call: check that PostgreSQL is running" % (server, text))
    if "does not exist" in lower and "relation" in lower:
        return "%s has no diglett schema (%s); run: diglett-admin migrate" % (where, text)
    return "database error on %s: %s" % (where, text)


def _display(database):
    """The database for messages: a path, or a URL without its password."""
    text = str(database)
    if "://" not in text:
        return text
    parts = urllib.parse.urlsplit(text)
    if parts.password is None:
        return text
    netloc = parts.netloc.replace(":%s@" % parts.password, ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _is_busy(exc):
    """Worth a retry in a moment: a SQLite lock, a PostgreSQL deadlock or serialization
    conflict (PostgreSQL waits for locks by itself, up to PG_STATEMENT_TIMEOUT)."""
    lower = str(exc).lower()
    return any(word in lower for word in ("locked", "busy", "deadlock detected",
                                          "could not serialize"))
