"""How the SQLite store talks to its database: a connection on its own thread, group commit.

`ThreadConnection` is a sqlite3 connection used only from one dedicated
thread, so the event loop never blocks on disk.

`GroupCommit` batches appends: while one commit is in flight on the thread,
the appends that arrive queue up and then go to the database together, in one
`BEGIN IMMEDIATE ... COMMIT` (one WAL sync for all of them).  Each append in
a group runs inside its own SAVEPOINT, so a stale expected version rolls back
that append alone and the others commit.  One append alone takes the short
path (no savepoint).  Order is kept: appends commit in the order they were
called, and positions follow that order.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import TypeVar

from framework.errors import ConflictError, UnavailableError
from framework.events.dedicated_thread import DedicatedThread
from framework.events.envelope import EventRow, to_micros
from framework.events.store import AppendResult, StoredId, conflict, retried_append

T = TypeVar("T")

logger = logging.getLogger(__name__)

_INSERT = (
    "INSERT INTO events (stream_id, version, aggregate_type, event_id, type,"
    " schema_version, metadata, payload, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
VERSION_SQL = "SELECT COALESCE(MAX(version), 0) FROM events WHERE stream_id = ?"
_FIND_ONE = "SELECT event_id, stream_id, version, position FROM events WHERE event_id = ?"

Outcome = AppendResult | ConflictError


class ThreadConnection:
    """A sqlite3 connection opened, used and closed on its own thread."""

    def __init__(self, name: str) -> None:
        self.thread = DedicatedThread(name)
        self._conn: sqlite3.Connection | None = None

    async def open(self, connect: Callable[[], sqlite3.Connection]) -> None:
        self._conn = await self.thread.run(connect)

    def get(self) -> sqlite3.Connection:
        if self._conn is None:
            raise UnavailableError("the SQLite event store is closed (or was never opened)")
        return self._conn

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(connection)` on the thread, after everything submitted before it."""
        return await self.schedule(fn)

    def schedule(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Queue `fn(connection)` now; the future of its result (see `DedicatedThread.schedule`)."""

        def run() -> T:
            try:
                return fn(self.get())
            except sqlite3.OperationalError as exc:
                raise _unavailable(exc) from exc

        return self.thread.schedule(run)

    def end_transaction(self) -> None:
        """Queue a rollback of whatever transaction is open when the queued calls have run.

        Queued at once (no await), so it runs after every statement already
        submitted (a `BEGIN` a cancelled caller left behind included) and before
        anything submitted later; nobody waits for it, so a cancelled caller
        returns at once even while that `BEGIN` still waits for another writer.
        """
        try:
            future = self.schedule(_rollback_open)
        except RuntimeError:  # the thread is stopped: the connection is closed, nothing is open
            return
        future.add_done_callback(_log_failed_rollback)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await self.thread.run(conn.close)
        await self.thread.stop()


def _rollback_open(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def _log_failed_rollback(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and (error := future.exception()) is not None:
        logger.error("SQLite event store: rollback of an abandoned transaction failed: %s", error)


@dataclass(slots=True)
class PendingAppend:
    stream_id: str
    aggregate_type: str
    rows: list[EventRow]
    expected: int | None
    future: asyncio.Future[AppendResult]


class GroupCommit:
    """Appends queued while a commit is in flight share the next transaction."""

    def __init__(self, connection: ThreadConnection, on_committed: Callable[[], None]) -> None:
        self._connection = connection
        self._on_committed = on_committed
        self._queue: list[PendingAppend] = []
        self._in_flight = False
        self._idle = asyncio.Event()
        self._idle.set()

    async def append(
        self, stream_id: str, aggregate_type: str, rows: list[EventRow], expected: int | None
    ) -> AppendResult:
        """Store one validated batch; its positions and the new version, or ConflictError."""
        future: asyncio.Future[AppendResult] = asyncio.get_running_loop().create_future()
        self._queue.append(PendingAppend(stream_id, aggregate_type, rows, expected, future))
        if not self._in_flight:
            self._launch()
        return await future

    async def drain(self) -> None:
        """Wait until no append is queued or in flight."""
        await self._idle.wait()

    def _launch(self) -> None:
        group, self._queue = self._queue, []
        self._in_flight = True
        self._idle.clear()
        now_us = to_micros(datetime.now(UTC))
        connection = self._connection
        try:
            connection.thread.submit(
                lambda: commit_group(connection.get(), group, now_us), partial(self._done, group)
            )
        except RuntimeError:  # the thread is stopped: the store was closed
            self._done(group, None, UnavailableError("the SQLite event store is closed"))

    def _done(
        self,
        group: list[PendingAppend],
        outcomes: list[Outcome] | None,
        error: BaseException | None,
    ) -> None:
        self._in_flight = False
        for index, pending in enumerate(group):
            if pending.future.done():  # the caller was cancelled; the append stands or not
                continue
            if error is not None:
                pending.future.set_exception(_per_caller(error))
                continue
            assert outcomes is not None
            outcome = outcomes[index]
            if isinstance(outcome, ConflictError):
                pending.future.set_exception(outcome)
            else:
                pending.future.set_result(outcome)
        if outcomes and any(not isinstance(o, ConflictError) for o in outcomes):
            self._on_committed()
        if self._queue:
            self._launch()
        else:
            self._idle.set()


def _unavailable(error: sqlite3.OperationalError) -> UnavailableError:
    # the database's text (file paths) goes to the log, not to callers
    logger.warning("SQLite event store: %s", error)
    return UnavailableError("the SQLite event store is busy or failing; retry later")


def _per_caller(error: BaseException) -> BaseException:
    if isinstance(error, sqlite3.OperationalError):
        return _unavailable(error)
    return error


def commit_group(
    conn: sqlite3.Connection, group: Sequence[PendingAppend], now_us: int
) -> list[Outcome]:
    """One transaction for the whole group; each append all-or-nothing on its own."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        if len(group) == 1:
            outcomes: list[Outcome] = [_insert(conn, group[0], now_us)]
            if isinstance(outcomes[0], ConflictError):
                conn.execute("ROLLBACK")
                return outcomes
        else:
            outcomes = []
            for pending in group:
                conn.execute("SAVEPOINT append_one")
                outcome = _insert(conn, pending, now_us)
                if isinstance(outcome, ConflictError):
                    conn.execute("ROLLBACK TO append_one")
                conn.execute("RELEASE append_one")
                outcomes.append(outcome)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return outcomes


def _stored_ids(conn: sqlite3.Connection, event_ids: list[str]) -> list[StoredId]:
    if len(event_ids) == 1:
        return conn.execute(_FIND_ONE, event_ids).fetchall()
    marks = ",".join("?" * len(event_ids))
    sql = f"SELECT event_id, stream_id, version, position FROM events WHERE event_id IN ({marks})"
    return conn.execute(sql, event_ids).fetchall()


def _insert(conn: sqlite3.Connection, pending: PendingAppend, now_us: int) -> Outcome:
    """Check ids and the expected version, insert the batch (inside the caller's transaction)."""
    stream_id, expected = pending.stream_id, pending.expected
    event_ids = [row[0] for row in pending.rows]
    found = _stored_ids(conn, event_ids)
    if found:  # a retry of an append that happened, or ids reused elsewhere
        return retried_append(stream_id, expected, event_ids, found)
    if expected == 0:
        actual = 0  # a new stream: UNIQUE(stream_id, version) alone refuses an old one
    else:
        actual = conn.execute(VERSION_SQL, (stream_id,)).fetchone()[0]
        if expected is not None and actual != expected:
            return conflict(stream_id, expected, actual)
    values = [
        (stream_id, actual + i, pending.aggregate_type, *row, now_us)
        for i, row in enumerate(pending.rows, start=1)
    ]
    try:
        if len(values) == 1:
            last = conn.execute(_INSERT, values[0]).lastrowid
        else:
            conn.executemany(_INSERT, values)
            last = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
    except sqlite3.IntegrityError:
        # Only UNIQUE(stream_id, version) can fail, and only for a "new" stream
        # (expected 0) that exists: its version 1 collides on the first row.
        # The caller rolls this append back (transaction or savepoint).
        return conflict(stream_id, expected, conn.execute(VERSION_SQL, (stream_id,)).fetchone()[0])
    assert last is not None
    return AppendResult(tuple(range(last - len(values) + 1, last + 1)), actual + len(values))
