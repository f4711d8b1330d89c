"""Runs registry calls on one OS thread, so the database never blocks the gevent hub.

A lock held by diglett-admin, a slow fsync or a full disk stalls only this thread. Reads
are calls that wait for their answer; session writes are queued, applied in order and
retried until they succeed, and their follow-up (sending a signal) runs only after the
commit. Writes queued together go in one transaction (a restart storm's thousands of
session rows), and one by one again if that fails. Nothing here knows what the calls do.

The same thread serves PostgreSQL: psycopg2 is a C extension that blocks the thread calling
it (a query waiting for a lock, a slow network), which is why it must never run on the hub.
Here it runs on this thread, which holds its own connection and releases the GIL while libpq
waits, so the hub and every tunnel carry on; psycogreen's patch (making psycopg2 yield to the
hub) is therefore not needed, and not used. The price is that registry calls are serialized:
a stuck query delays the other registry calls (grant polls, session records), never the data.
"""

import logging

import gevent
import gevent.event
import gevent.queue
from gevent.threadpool import ThreadPool

from diglett.registry import RegistryError

log = logging.getLogger(__name__)

RETRY_FIRST = 0.1  # seconds before the first retry of a failed write
RETRY_MAX = 5.0  # cap of the doubling retry delay
BATCH_WRITES = 200  # queued writes applied in one transaction at most


class DatabaseWorker:
    def __init__(self, transaction=None):
        """``transaction``: () -> a context manager holding one write transaction, in which
        several queued writes are applied together (a burst of thousands of session starts
        then costs one commit and one thread handoff per batch); None: one at a time."""
        self._transaction = transaction
        self._pool = ThreadPool(1)
        self._writes = gevent.queue.Queue()
        self._idle = gevent.event.Event()
        self._idle.set()
        self.failing = None  # the last write error while writes are failing, for /healthz
        self._writer = gevent.spawn(self._write_loop)

    def call(self, function, *args):
        """Run ``function(*args)`` on the database thread and return its result."""
        ok, value = self._pool.apply(_capture, (function, args))
        if not ok:
            raise value
        return value

    def submit(self, function, args, after=None):
        """Queue a write; ``after()`` runs once it is committed."""
        self._idle.clear()
        self._writes.put((function, args, after))

    def drain(self, timeout):
        """Wait up to ``timeout`` seconds for queued writes; True when all are done."""
        return self._idle.wait(timeout)

    def _write_loop(self):
        while True:
            batch = [self._writes.get()]
            while len(batch) < BATCH_WRITES and not self._writes.empty():
                batch.append(self._writes.get_nowait())
            if not (len(batch) > 1 and self._apply_together(batch)):
                for function, args, _ in batch:  # in order, each retried until it works
                    self._apply(function, args)
            for function, _, after in batch:  # only once the writes are committed
                if after is not None:
                    try:
                        after()
                    except Exception:  # a receiver's bug must not stop the writes
                        log.exception("after-commit action of %s failed", function.__name__)
            if self._writes.empty():
                self._idle.set()

    def _apply_together(self, batch):
        """The writes of ``batch`` in one transaction; False (none applied: it rolled back)
        when there is no transaction to use or one write failed, so each goes alone."""
        if self._transaction is None:
            return False
        try:
            self.call(_together, self._transaction, batch)
        except RegistryError as exc:
            log.debug("%d writes together failed, applying them one by one: %s", len(batch), exc)
            return False
        if self.failing is not None:
            log.warning("registry writes work again")
            self.failing = None
        return True

    def _apply(self, function, args):
        delay = RETRY_FIRST
        while True:
            try:
                self.call(function, *args)
            except RegistryError as exc:
                if self.failing is None:
                    log.error("registry write failed, retrying until it works: %s", exc)
                self.failing = str(exc)
                gevent.sleep(delay)
                delay = min(RETRY_MAX, delay * 2)
                continue
            if self.failing is not None:
                log.warning("registry writes work again")
                self.failing = None
            return


def _together(transaction, batch):
    """Runs on the database thread: every write of ``batch`` in one transaction (each
    write's own becomes a savepoint in it); any failure rolls all of them back."""
    with transaction():
        for function, args, _ in batch:
            function(*args)


def _capture(function, args):
    """Runs on the database thread; an exception comes back as a value, because gevent's
    pool prints a full traceback to stderr for every exception a task raises (a locked
    registry retried every few seconds would fill the log)."""
    try:
        return True, function(*args)
    except Exception as exc:
        return False, exc
