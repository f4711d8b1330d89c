"""The registry on a real PostgreSQL: every test of tests/unit/test_registry.py that takes
``reg`` or ``db_url``, run again against a fresh database of a private cluster, and the
errors, reconnects and concurrent migrations only PostgreSQL has."""

import inspect
import threading

import pytest

from diglett import registry
from diglett.registry import Registry, RegistryError
from tests.support import harness
from tests.support.records import K1
from tests.support.records import session as session_row
from tests.unit import test_registry as on_sqlite
from tests.unit.test_registry import reg  # noqa: F401  (a fixture, reading db_url below)

pytestmark = pytest.mark.timeout(30)

for _name, _test in vars(on_sqlite).items():  # the same tests, collected here a second time
    if _name.startswith("test_") and {"reg", "db_url"} & set(inspect.signature(_test).parameters):
        globals()[_name] = _test


@pytest.fixture
def db_url(pg_url):
    return pg_url


def test_postgresql_errors_say_where_and_what_to_do(postgres):
    port = harness.free_port()
    with pytest.raises(RegistryError, match=r"cannot connect to PostgreSQL at 127\.0\.0\.1:%d.*"
                       r"connection refused; start PostgreSQL there" % port):
        Registry("postgresql://postgres@127.0.0.1:%d/diglett" % port)
    with pytest.raises(RegistryError, match="has no database nosuchdb: create it.*createdb"):
        Registry(postgres.url("nosuchdb"))
    with pytest.raises(RegistryError, match="has no user nosuchuser: create it.*createuser"):
        Registry(postgres.url("postgres").replace("postgres@", "nosuchuser@"))


def test_postgresql_reconnects_after_its_connection_is_killed(postgres, pg_url):
    reg = Registry(pg_url)
    reg.grant("foo", K1)
    connection = postgres.connect()
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       "WHERE datname = %s AND pid <> pg_backend_pid()", (pg_url.rsplit("/")[-1],))
    connection.close()
    assert [g.subdomain for g in reg.grants()] == ["foo"]  # one silent reconnect
    reg.close()


def test_postgresql_gateways_migrating_at_once_take_turns(pg_url):
    errors, done = [], []

    def start():
        try:
            registry_ = Registry(pg_url)
            done.append(registry_.schema_version())
            registry_.close()
        except Exception as exc:  # collected: the assertion below shows it
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)
    assert errors == []
    assert done == [registry.migration_names()[-1][0]] * 4


def test_the_counters_work_on_postgresql(pg_url):
    registry = Registry(pg_url)
    try:
        before = registry.change_versions()
        registry.grant("pgfoo", K1)
        registry.revoke("pgfoo")
        registry.record_session_start(session_row("%016x" % 7, subdomain="pgfoo", key=K1))
        after = registry.change_versions()
        assert after["grants"] == before["grants"] + 2
        assert after["sessions"] == before["sessions"] + 1
        assert list(registry.grant_snapshot()) == []
    finally:
        registry.close()
