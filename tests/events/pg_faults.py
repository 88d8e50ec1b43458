"""Cutting a PostgreSQL event store's connection in the middle of a query, for fault tests.

`cut_mid_query` holds an ACCESS EXCLUSIVE lock on one table, runs `trigger()`
beside it to make the store under test run a statement on that table (which
then waits for the lock), finds that backend by its `application_name` waiting in
`pg_stat_activity`, and ends it with `pg_terminate_backend` while the
statement is still running; then it releases the lock.  The store sees what
a database restart or a network cut does to a running query.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import asyncpg

_WAITING = (
    "SELECT pid FROM pg_stat_activity WHERE application_name = $1"
    " AND wait_event_type = 'Lock' AND state = 'active'"
)


async def cut_mid_query(
    dsn: str,
    schema: str,
    table: str,
    application_name: str,
    trigger: Callable[[], Awaitable[object]] | None = None,
) -> int:
    """Terminate the backends of `application_name` blocked on `schema.table`; how many."""
    admin = await asyncpg.connect(dsn)
    blocker = await asyncpg.connect(dsn)
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute(f'LOCK TABLE "{schema}".{table} IN ACCESS EXCLUSIVE MODE')
        # The trigger runs beside the lock (it may itself wait for it, e.g. an append).
        triggered = asyncio.ensure_future(trigger()) if trigger is not None else None
        try:
            pids: list[int] = []
            for _ in range(1000):  # bounded: ~20 s
                pids = [r["pid"] for r in await admin.fetch(_WAITING, application_name)]
                if pids:
                    break
                await asyncio.sleep(0.02)
            ended = 0
            for pid in pids:
                ended += bool(await admin.fetchval("SELECT pg_terminate_backend($1)", pid))
            return ended
        finally:
            await tx.rollback()
            if triggered is not None:
                await triggered
    finally:
        await blocker.close()
        await admin.close()


async def wait_until(predicate: Callable[[], Awaitable[bool]], *, tries: int = 1500) -> bool:
    """Poll `predicate` every 20 ms, at most `tries` times; whether it came true."""
    for _ in range(tries):
        if await predicate():
            return True
        await asyncio.sleep(0.02)
    return False
