"""Worker processes: N copies of one server sharing a port, supervised by a parent.

    server = Server(config, workers=4)   # or: python -m framework serve MODULE --workers 4
    ...add servicers and hooks as usual...
    await server.serve()

In the parent, `Server.serve()` with `workers > 1` does not serve: it runs a `Supervisor`,
which

* reserves the port (a bound, non-listening socket with SO_REUSEPORT; port 0 picks one),
  so it stays the server's while workers come and go;
* starts each worker as the same program (`sys.orig_argv`) with the slot's variables
  (`framework.workers.slot`); each worker builds the same server, binds the port with
  SO_REUSEPORT (the kernel spreads connections over the workers) on its own event loop,
  and reports `ready` on a socket pair;
* once every worker serves, runs the hooks meant for the whole server
  (`hook.for_supervisor(supervisor)`: the registry agent registers the address once; the
  metrics endpoint serves every worker's series, labelled `worker`, in one scrape);
* restarts a worker that exits, after a backoff (`restart_min_s` doubling up to
  `restart_max_s`; reset once a worker has run `stable_s`);
* on SIGTERM/SIGINT: tells every worker to answer health NOT_SERVING, runs the
  whole-server hooks' `on_draining` (deregistration, and its wait for clients to see the
  instance leave) while the workers still serve, then forwards SIGTERM to every worker at
  once, so all drain together (new calls refused, in-flight calls finish within
  `grace_s`), waits for them and runs `on_stopped`.

A worker whose supervisor dies sees its socket close and drains itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from framework.config import ServerConfig
from framework.workers.slot import ENV_FD, ENV_INDEX, ENV_PORT

if TYPE_CHECKING:
    from framework.server import Server

__all__ = ["Supervisor", "WorkerState"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class WorkerState:
    """What the supervisor knows of one worker slot."""

    index: int
    process: asyncio.subprocess.Process | None = None
    pid: int | None = None
    ready: bool = False
    started_at: float = 0.0
    restarts: int = 0
    failures_in_a_row: int = 0
    metrics_url: str | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # ready, or exited


class Supervisor:
    """Runs `server` as `workers` processes sharing its port (see the module docstring)."""

    def __init__(
        self,
        server: Server,
        workers: int,
        *,
        argv: Sequence[str] | None = None,
        environ: Mapping[str, str] | None = None,
        restart_min_s: float = 0.2,
        restart_max_s: float = 10.0,
        stable_s: float = 30.0,
        start_timeout_s: float = 120.0,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not 0 < restart_min_s <= restart_max_s:
            raise ValueError("restart_min_s must be > 0 and <= restart_max_s")
        self.server = server
        self.config: ServerConfig = server.config
        self.workers = [WorkerState(i) for i in range(workers)]
        self.argv = list(argv) if argv is not None else [sys.executable, *sys.orig_argv[1:]]
        self.environ = dict(os.environ if environ is None else environ)
        self.restart_min_s = restart_min_s
        self.restart_max_s = restart_max_s
        self.stable_s = stable_s
        self.start_timeout_s = start_timeout_s
        self._reservation: socket.socket | None = None
        self._port: int | None = None
        self._draining = asyncio.Event()
        self._links: dict[int, socket.socket] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._hooks: list[object] = []
        for hook in server.hooks:
            for_supervisor = getattr(hook, "for_supervisor", None)
            if for_supervisor is not None:
                replacement = for_supervisor(self)
                if replacement is not None:
                    self._hooks.append(replacement)

    # -------------------------------------------------- what hooks see of the server
    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the workers' port is not reserved yet")
        return self._port

    @property
    def address(self) -> str:
        host = self.config.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def services(self) -> tuple[str, ...]:
        return self.server.services

    def metrics_urls(self) -> list[tuple[int, str]]:
        """(worker index, its own /metrics URL) for every worker serving now."""
        return [(w.index, w.metrics_url) for w in self.workers if w.ready and w.metrics_url]

    def pids(self) -> list[int]:
        return [w.pid for w in self.workers if w.pid is not None and w.ready]

    @property
    def restarts(self) -> int:
        return sum(w.restarts for w in self.workers)

    # ------------------------------------------------------------------- running
    async def run(self) -> None:
        """Reserve the port, start the workers, supervise until SIGTERM/SIGINT, drain."""
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, self._on_signal)
        self._reserve()
        try:
            await self._start_all()
            if not self._draining.is_set():
                for hook in self._hooks:
                    await _call(hook, "on_started", self)
                logger.info(
                    "%s serving on %s with %d workers (pids %s)",
                    self.config.name,
                    self.address,
                    len(self.workers),
                    ", ".join(str(p) for p in self.pids()),
                    extra={"service": self.config.name},
                )
                await self._draining.wait()
            await self._drain()
        finally:
            for sig in signals:
                with contextlib.suppress(NotImplementedError):
                    loop.remove_signal_handler(sig)
            for task in list(self._tasks):
                task.cancel()
            for link in self._links.values():
                link.close()
            if self._reservation is not None:
                self._reservation.close()
        logger.info("%s stopped (%d workers)", self.config.name, len(self.workers))

    def stop(self) -> None:
        """Drain and stop, as on SIGTERM."""
        self._draining.set()

    def _on_signal(self) -> None:
        if not self._draining.is_set():
            logger.info(
                "%s: signal received, draining %d workers", self.config.name, len(self.workers)
            )
        self._draining.set()

    def _reserve(self) -> None:
        host = self.config.host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, self.config.port))
        except OSError as error:
            sock.close()
            raise OSError(
                f"could not reserve {host}:{self.config.port} for the workers: {error}"
            ) from error
        self._reservation = sock
        self._port = int(sock.getsockname()[1])

    async def _start_all(self) -> None:
        for worker in self.workers:
            await self._spawn(worker)
        deadline = time.monotonic() + self.start_timeout_s
        for worker in self.workers:
            while not worker.ready:
                if self._draining.is_set():
                    return
                if worker.exited.is_set():
                    await self._stop_workers()
                    code = worker.process.returncode if worker.process else None
                    raise RuntimeError(
                        f"worker {worker.index} exited (code {code}) before serving; "
                        "see its log above"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    await self._stop_workers()
                    raise RuntimeError(
                        f"worker {worker.index} did not serve within {self.start_timeout_s} s"
                    )
                waits = [
                    asyncio.ensure_future(worker.settled.wait()),
                    asyncio.ensure_future(self._draining.wait()),
                ]
                try:
                    await asyncio.wait(
                        waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    for waiting in waits:
                        waiting.cancel()

    async def _spawn(self, worker: WorkerState) -> None:
        parent_end, child_end = socket.socketpair()
        env = {
            **self.environ,
            ENV_INDEX: str(worker.index),
            ENV_PORT: str(self.port),
            ENV_FD: str(child_end.fileno()),
        }
        try:
            process = await asyncio.create_subprocess_exec(
                *self.argv, env=env, pass_fds=(child_end.fileno(),)
            )
        finally:
            child_end.close()
        old = self._links.pop(worker.index, None)
        if old is not None:
            old.close()
        self._links[worker.index] = parent_end
        worker.process, worker.pid = process, process.pid
        worker.ready, worker.metrics_url = False, None
        worker.started_at = time.monotonic()
        worker.exited, worker.settled = asyncio.Event(), asyncio.Event()
        task = asyncio.get_running_loop().create_task(self._follow(worker, process, parent_end))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _follow(
        self, worker: WorkerState, process: asyncio.subprocess.Process, link: socket.socket
    ) -> None:
        """Read the worker's reports until it exits; restart it unless draining."""
        reader, writer = await asyncio.open_unix_connection(
            sock=socket.socket(fileno=os.dup(link.fileno()))
        )
        try:
            while line := await reader.readline():
                self._on_report(worker, line)
        except (ConnectionError, ValueError) as error:
            logger.warning("worker %d: unreadable report: %s", worker.index, error)
        finally:
            writer.close()
        code = await process.wait()
        worker.ready = False
        worker.exited.set()
        worker.settled.set()
        if self._draining.is_set():
            return
        ran_s = time.monotonic() - worker.started_at
        worker.failures_in_a_row = 0 if ran_s >= self.stable_s else worker.failures_in_a_row + 1
        delay = min(
            self.restart_max_s, self.restart_min_s * 2 ** max(0, worker.failures_in_a_row - 1)
        )
        logger.warning(
            "worker %d (pid %s) exited with code %s after %.1f s; restarting in %.1f s",
            worker.index,
            process.pid,
            code,
            ran_s,
            delay,
            extra={"service": self.config.name},
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._draining.wait(), timeout=delay)
        if self._draining.is_set():
            return
        worker.restarts += 1
        await self._spawn(worker)

    def _on_report(self, worker: WorkerState, line: bytes) -> None:
        report = json.loads(line)
        if report.get("event") == "ready":
            worker.metrics_url = report.get("metrics_url")
            worker.ready = True
            worker.settled.set()
            logger.info(
                "worker %d serving (pid %s)",
                worker.index,
                report.get("pid"),
                extra={"service": self.config.name},
            )

    async def _drain(self) -> None:
        for worker in self.workers:  # health NOT_SERVING everywhere, calls still served
            link = self._links.get(worker.index)
            if link is not None and worker.ready:
                try:
                    link.send(b"drain\n")
                except OSError as error:  # that worker is gone; SIGTERM follows anyway
                    logger.warning("worker %d not told to drain: %s", worker.index, error)
        for hook in self._hooks:
            await _call(hook, "on_draining", self)
        await self._stop_workers()
        for hook in self._hooks:
            await _call(hook, "on_stopped", self)

    async def _stop_workers(self) -> None:
        """SIGTERM to every worker at once; SIGKILL those still running after the grace."""
        running = [
            w for w in self.workers if w.process is not None and w.process.returncode is None
        ]
        for worker in running:
            assert worker.process is not None
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)
        budget = self.config.grace_s + self.config.drain_delay_s + 30.0
        for worker in running:
            assert worker.process is not None
            try:
                await asyncio.wait_for(worker.process.wait(), timeout=budget)
            except TimeoutError:
                logger.error("worker %d did not stop within %.0f s: killed", worker.index, budget)
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
                await worker.process.wait()


async def _call(hook: object, name: str, supervisor: Supervisor) -> None:
    method = getattr(hook, name, None)
    if method is None:
        return
    if name == "on_started":
        await method(supervisor)
        return
    try:
        await method(supervisor)
    except asyncio.CancelledError:
        raise
    except Exception:  # shutdown goes on; the failure is logged with its traceback
        logger.exception("%s.%s failed during shutdown", type(hook).__name__, name)
