"""The worker side of worker processes: which slot this process fills, and its reports.

The supervisor (`framework.workers.supervisor`) starts each worker as the same program
with three environment variables: the worker's index, the port every worker binds
(with SO_REUSEPORT) and the descriptor of a pipe back to the supervisor. The first
`Server` built in the worker takes them (and removes them from the environment, so a
process the worker starts is not a worker too); the server then binds that port, runs
the hooks meant for workers and reports one JSON line on the pipe when it serves.

These variables are a hand-shake between the supervisor and its workers, not user
configuration: nothing else should set them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing
import os
import signal
import socket
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ENV_FD", "ENV_INDEX", "ENV_PORT", "ParentWatch", "WorkerSlot"]

logger = logging.getLogger(__name__)

ENV_INDEX = "FRAMEWORK_WORKER_INDEX"
ENV_PORT = "FRAMEWORK_WORKER_PORT"
ENV_FD = "FRAMEWORK_WORKER_FD"


@dataclass(slots=True)
class WorkerSlot:
    """Worker `index` of a server whose workers share `port`; `report_fd` reaches the parent."""

    index: int
    port: int
    report_fd: int
    notes: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def take(cls, environ: MutableMapping[str, str] | None = None) -> WorkerSlot | None:
        """The slot the supervisor gave this process, or None (not a worker).

        Removes the variables, so only the first server of the process is the worker.
        """
        env = os.environ if environ is None else environ
        if ENV_INDEX not in env:
            return None
        index, port, fd = env.pop(ENV_INDEX), env.pop(ENV_PORT, ""), env.pop(ENV_FD, "")
        try:
            return cls(index=int(index), port=int(port), report_fd=int(fd))
        except ValueError as error:
            raise RuntimeError(
                f"{ENV_INDEX}/{ENV_PORT}/{ENV_FD} are set by the worker supervisor; got "
                f"{index!r}/{port!r}/{fd!r}"
            ) from error

    @property
    def process_name(self) -> str:
        return f"worker-{self.index}"

    def name_process(self) -> None:
        """Name this process `worker-<index>`: multiprocessing's process name, which every
        `logging.LogRecord` carries as `processName`, so the log lines of N workers on one
        stderr say which worker wrote them (`JsonFormatter` and the access log write it as
        `process`, the CLI's plain lines start with `[worker-<index>]`)."""
        multiprocessing.current_process().name = self.process_name

    def adopt(self, hooks: Iterable[object]) -> list[object]:
        """The hooks this worker runs: `hook.for_worker(slot)` where defined (None: none)."""
        adopted: list[object] = []
        for hook in hooks:
            for_worker = getattr(hook, "for_worker", None)
            replacement = for_worker(self) if for_worker is not None else hook
            if replacement is not None:
                adopted.append(replacement)
        return adopted

    def report(self, event: str, **fields: Any) -> None:
        """One JSON line to the supervisor (`ready` with the pid and notes, ...)."""
        line = json.dumps({"event": event, "index": self.index, "pid": os.getpid(), **fields})
        try:
            os.write(self.report_fd, line.encode() + b"\n")
        except OSError as error:  # the supervisor is gone: the worker still drains normally
            logger.warning("worker %d could not report %s: %s", self.index, event, error)

    def ready(self) -> None:
        self.report("ready", **self.notes)

    def watcher(self) -> ParentWatch:
        """A hook that drains this worker (SIGTERM to itself) when the supervisor is gone."""
        return ParentWatch(self)


class ParentWatch:
    """Server hook of a worker: reads its socket to the supervisor. `drain` (the whole
    server starts draining) turns health NOT_SERVING while calls are still served, as one
    process does before its `on_draining` hooks; EOF means the supervisor is gone, so the
    worker drains as on SIGTERM instead of living on orphaned with the port."""

    def __init__(self, slot: WorkerSlot) -> None:
        self.slot = slot
        self._task: asyncio.Task[None] | None = None

    async def on_started(self, server: object) -> None:
        sock = socket.socket(fileno=os.dup(self.slot.report_fd))
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        self._task = asyncio.get_running_loop().create_task(self._watch(server, reader, writer))

    async def _watch(
        self, server: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while line := await reader.readline():
                if line.strip() == b"drain":
                    health = getattr(server, "health", None)
                    if health is not None:
                        await health.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
        logger.warning("worker %d: the supervisor is gone; draining", self.slot.index)
        os.kill(os.getpid(), signal.SIGTERM)

    async def on_stopped(self, server: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
