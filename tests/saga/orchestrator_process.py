"""An orchestrator in its own process, for crash tests: SagaService on 127.0.0.1:0.

    python -m tests.saga.orchestrator_process --store sagas.db --port-file port \\
        --inventory HOST:PORT --payment HOST:PORT --notification HOST:PORT \\
        [--kill-after-appends N]

Writes the bound port to `--port-file` (atomically) once serving; resumes every
unfinished saga at start.  `--kill-after-appends N` SIGKILLs the process right
after its N-th append committed (a crash between recording a transition and
the next call); the tests also SIGKILL it from outside at random moments.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import Any

from framework.auth.policy import AuthPolicy, BearerToken
from framework.client import connect
from framework.config import ServerConfig
from framework.events.sqlite import SqliteConfig, SqliteEventStore
from framework.saga import OrchestratorConfig, Participants, Retry, SagaOrchestrator, saga_types
from framework.saga.service import SagaServicer
from framework.server import Server
from tests.saga.participants import order_saga
from tests.saga.world import TOKENS, WRITER


def _kill_after(store: SqliteEventStore, appends: int) -> None:
    original = store.append
    count = 0

    async def append(*args: Any, **kwargs: Any) -> Any:
        nonlocal count
        result = await original(*args, **kwargs)
        count += 1
        if count >= appends:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    store.append = append  # type: ignore[method-assign]


async def serve(args: argparse.Namespace) -> None:
    store = await SqliteEventStore.open(SqliteConfig(path=args.store), saga_types())
    if args.kill_after_appends:
        _kill_after(store, args.kill_after_appends)
    participants = Participants(
        {
            "inventory.v1.InventoryService": connect(
                args.inventory, policies=[BearerToken(WRITER)]
            ),
            "payment.v1.PaymentService": connect(args.payment),
            "notification.v1.NotificationService": connect(args.notification),
        }
    )
    fast = Retry(max_attempts=20, initial_backoff_s=0.01, max_backoff_s=0.1)
    orchestrator = SagaOrchestrator(
        store,
        [order_saga(retry=fast)],
        participants,
        config=OrchestratorConfig(compensation_retry=Retry(max_attempts=100, max_backoff_s=0.2)),
    )
    server = Server(
        ServerConfig(name="sagas", host="127.0.0.1", port=0, grace_s=0.5),
        policies=[AuthPolicy(TOKENS.verifier())],
    )
    server.add(SagaServicer(orchestrator))
    server.add_hook(orchestrator)
    await server.start()
    port_file = Path(args.port_file)
    partial = port_file.with_suffix(".tmp")
    partial.write_text(str(server.port))
    partial.replace(port_file)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop()
    await store.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--store", "--port-file", "--inventory", "--payment", "--notification"):
        parser.add_argument(name, required=True)
    parser.add_argument("--kill-after-appends", type=int, default=0)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("framework.saga").setLevel(logging.INFO)
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
