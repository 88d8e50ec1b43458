"""A process killed with SIGKILL in the middle of a big append leaves no partial batch."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from pathlib import Path
from typing import Any

from framework.events.store import NewEvent
from gen.events.v1.testing_pb2 import AmountDeposited
from tests.events.conftest import Backend

ROOT = Path(__file__).resolve().parents[2]
BATCH = 1500

# Appends batches of BATCH events to streams <tag>-0, <tag>-1, ... and announces each
# one on stdout ("begin i") just before it starts, until it is killed.
CHILD = """
import asyncio, sys
from framework.events.store import NewEvent
from tests.events.account import account_types
from gen.events.v1.testing_pb2 import AmountDeposited

backend, where, schema, batch, tag = sys.argv[1:4] + [int(sys.argv[4]), sys.argv[5]]

async def main():
    if backend == "sqlite":
        from framework.events.sqlite import SqliteConfig, SqliteEventStore
        store = await SqliteEventStore.open(SqliteConfig(path=where), account_types())
    else:
        from framework.events.postgres import PostgresConfig, PostgresEventStore
        store = await PostgresEventStore.open(PostgresConfig(where, schema), account_types())
    for i in range(1000):
        events = [NewEvent.of(AmountDeposited(amount=n)) for n in range(batch)]
        print(f"begin {i}", flush=True)
        await store.append(f"{tag}-{i}", events, 0)

asyncio.run(main())
"""


async def _run_and_kill(backend: Backend, tag: str, batches_before_kill: int) -> None:
    where = str(backend.path) if backend.name == "sqlite" else backend.dsn
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        backend.name,
        where,
        backend.schema or "-",
        str(BATCH),
        tag,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdout is not None
    try:
        while True:
            line = await asyncio.wait_for(child.stdout.readline(), 30)
            assert line, "the child exited before it was killed"
            if line.strip() == f"begin {batches_before_kill}".encode():
                break
        # Land somewhere inside the batch: validation, insert or commit.
        await asyncio.sleep(random.uniform(0.0, 0.03))
        child.send_signal(signal.SIGKILL)
    finally:
        if child.returncode is None:
            child.kill()
        await child.wait()


async def test_sigkill_mid_append_leaves_all_or_nothing(backend: Backend) -> None:
    """After kill -9 during appends every stream holds its whole batch or nothing."""
    first: Any = await backend.open()  # create the schema before the child races for it
    await first.close()
    backend.opened.remove(first)
    await _run_and_kill(backend, "r0", batches_before_kill=1)
    store = await backend.open()
    counts: dict[str, int] = {}
    cursor = 0
    while page := await store.read_all(cursor, 5000):
        for event in page:
            counts[event.stream_id] = counts.get(event.stream_id, 0) + 1
        cursor = page[-1].position
    assert counts.get("r0-0") == BATCH  # finished before the kill
    assert all(n == BATCH for n in counts.values()), counts
    # The store is usable after recovery: a new append lands after the survivors.
    result = await store.append("after", [NewEvent.of(AmountDeposited(amount=1))], 0)
    assert result.positions[0] > cursor
