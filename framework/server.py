"""Server builder.

`Server` builds a `grpc.aio` server from servicers and policies: it binds (port 0
gives back the real port), registers the standard `grpc.health.v1` service, the
operator health report and server reflection, and shuts down gracefully (health
NOT_SERVING, hooks' `on_draining` such as deregistration, new calls refused,
in-flight calls given `grace_s` to finish).

Every method is served through one generic handler, a table from full method
name to the handler wrapped with its bound chain (`framework.server_adapter`):
one dictionary lookup per call however many methods are served, and a call pays
only for the enters and exits that apply to it.  The grpc server is created in
`start()`, so a `Server` may be built outside the event loop that runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Protocol

import grpc
import grpc.aio
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from framework.config import ServerConfig, expect
from framework.health import HealthCheck, HealthMonitor
from framework.policies.error_mapping import ErrorMappingPolicy
from framework.policy import (
    Chain,
    Method,
    Policy,
    Side,
    as_policies,
    authenticates,
    current_call,
    requires_authentication,
)
from framework.server_adapter import MethodTable, Registrar, Serving
from framework.workers.slot import WorkerSlot

logger = logging.getLogger(__name__)

__all__ = ["Server", "ServerConfig", "ServerHook", "drain_signal"]

# After grace, the calls grpc cancelled still run their exits: how long stop() waits.
_EXITS_AFTER_GRACE_S = 2.0


class _WithholdInvalidMetadata(logging.Filter):
    """grpc logs a metadata value that is not UTF-8 at ERROR, with a traceback and the raw
    value (an `authorization` header's token, say): keep the fact, withhold the value."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith("Invalid encoding on"):
            record.msg = (
                "a request carried a metadata value that is not valid UTF-8 (value withheld; "
                "grpc passes it on decoded as Latin-1, so an authorization check refuses it)"
            )
            record.args = ()
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def _withhold_invalid_metadata() -> None:
    """Install the filter on grpc's logger once per process (idempotent)."""
    grpc_logger = logging.getLogger("grpc._cython.cygrpc")
    if not any(isinstance(f, _WithholdInvalidMetadata) for f in grpc_logger.filters):
        grpc_logger.addFilter(_WithholdInvalidMetadata())


def drain_signal() -> asyncio.Event | None:
    """In a handler: an event set when its server starts draining (None outside a call).

    A long-lived stream can end itself cleanly instead of being cut at the end of
    the grace period::

        drain = drain_signal()
        while not drain.is_set(): ...
    """
    call = current_call()
    return call.drain if call is not None else None


class ServerHook(Protocol):
    """Lifecycle callbacks; any subset may be defined (e.g. registry self-registration)."""

    async def on_started(self, server: Server) -> None: ...

    async def on_draining(self, server: Server) -> None: ...

    async def on_stopped(self, server: Server) -> None: ...


class Server:
    """A grpc.aio server with the framework's policy chain, health and reflection."""

    def __init__(
        self,
        config: ServerConfig | None = None,
        *,
        policies: Sequence[Policy] = (),
        health_checks: Sequence[HealthCheck] = (),
        credentials: grpc.ServerCredentials | None = None,
        hooks: Sequence[object] = (),
        workers: int = 1,
    ) -> None:
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"Server(workers=...) must be an int >= 1, got {workers!r}")
        if config is not None:
            expect(
                config,
                ServerConfig,
                "Server(config)",
                'a ServerConfig, e.g. ServerConfig.from_env("orders")',
            )
        self.config = config or ServerConfig()
        # processes serving this server (framework.workers); in a worker, the slot it fills
        self.workers = workers
        self._slot = WorkerSlot.take()
        if self._slot is not None:
            self.config = replace(self.config, port=self._slot.port, reuse_port=True)
            self._slot.name_process()  # log records (and access-log lines) name the worker
        self._mapping = ErrorMappingPolicy()
        self.chain = Chain(
            [self._mapping, *as_policies(policies, "Server(policies=...)")], Side.SERVER
        )
        self.credentials = credentials
        self._serving = Serving(self._mapping.outcome)
        self._table = MethodTable(self.chain, self._serving)
        # created in start(): a grpc.aio server belongs to the loop that makes it
        self._grpc: grpc.aio.Server | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._services: list[str] = []
        self._unguarded: list[str] = []  # methods served without authentication (insecure_dev)
        self._hooks: list[object] = list(hooks)
        if self._slot is not None:
            self._hooks = [*self._slot.adopt(hooks), self._slot.watcher()]
        self._port: int | None = None
        self._stopping: asyncio.Event | None = None
        self._stopped = False
        self.health = HealthMonitor(health_checks)
        if self.config.health:
            self.add(self.health.servicer)
            self.add(self.health.report_servicer)

    # ------------------------------------------------------------ registration
    def add(self, servicer: object, register: Callable[[Any, Any], None] | None = None) -> None:
        """Register a servicer; `register` defaults to its generated `add_..._to_server`."""
        register = register or _find_register(servicer)
        registrar = Registrar()
        register(servicer, registrar)
        self._register(registrar)

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        """As grpc.aio's server: generated `add_..._to_server(servicer, server)` works."""
        registrar = Registrar()
        registrar.add_registered_method_handlers(service, handlers)
        self._register(registrar)

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        """As grpc.aio's server; the methods they serve go through the chain too, and
        one for a service already added adds its methods to that service."""
        registrar = Registrar()
        registrar.add_generic_rpc_handlers(handlers)
        self._register(registrar)

    def _register(self, registrar: Registrar) -> None:
        if self._port is not None:
            raise RuntimeError("add servicers before start(): grpc cannot add them later")
        self._check_authentication(registrar.registered)
        self._table.add(registrar)
        for service in registrar.registered:
            if service not in self._services:
                self._services.append(service)

    @property
    def draining(self) -> asyncio.Event:
        """Set when the server starts draining; handlers see it as `drain_signal()`."""
        return self._serving.draining

    @property
    def in_flight(self) -> int:
        """Calls being served whose exits have not run yet."""
        return self._serving.in_flight

    @property
    def calls_started(self) -> int:
        """Calls started since the server started (a drain hook can watch traffic stop)."""
        return self._serving.started

    def _check_authentication(self, registered: dict[str, dict[str, Any]]) -> None:
        """Refuse methods whose contract requires a verified caller that no policy checks.

        A contract with scopes (or `auth_required: true`) on a server without an
        authentication policy for that method would serve everyone; that takes the
        explicit `ServerConfig.insecure_dev`.
        """
        unguarded = []
        for service, handlers in registered.items():
            for name in handlers:
                method = Method.resolve(f"/{service}/{name}")
                if requires_authentication(method) and not any(
                    authenticates(p, method) for p in self.chain.policies
                ):
                    unguarded.append(method.full_name[1:])
        if not unguarded:
            return
        if not self.config.insecure_dev:
            raise RuntimeError(
                f"refusing to serve {', '.join(unguarded)} without authentication: the "
                "contract declares scopes (or auth_required) but no policy of this server "
                "verifies callers. Add AuthPolicy(...) (framework.auth.policy) to the "
                "server's policies, or set ServerConfig(insecure_dev=True) "
                "(SERVICE_INSECURE_DEV=1) for local development only"
            )
        self._unguarded += unguarded

    def add_hook(self, hook: object) -> None:
        """Add an object with any of `on_started`, `on_draining`, `on_stopped` (async).

        With worker processes, `hook.for_worker(slot)` / `hook.for_supervisor(supervisor)`
        (when defined) say what runs in each worker and once for the whole server.
        """
        self._hooks += self._slot.adopt([hook]) if self._slot is not None else [hook]

    @property
    def hooks(self) -> tuple[object, ...]:
        return tuple(self._hooks)

    def _all_hooks(self) -> list[object]:
        """Hooks, then policies that define hook methods (e.g. tracing learns the address)."""
        seen: set[int] = set()
        ordered: list[object] = []
        for obj in [*self._hooks, *self.chain.policies]:
            if id(obj) not in seen:
                seen.add(id(obj))
                ordered.append(obj)
        return ordered

    @property
    def services(self) -> tuple[str, ...]:
        return tuple(self._services)

    # ---------------------------------------------------------------- running
    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the server is not started")
        return self._port

    @property
    def address(self) -> str:
        host = self.config.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    async def start(self) -> int:
        """Bind, start, mark every service SERVING; returns the bound port."""
        if self._port is not None:
            return self._port
        if self.config.reflection and f"/{reflection.SERVICE_NAME}/ServerReflectionInfo" not in (
            self._table
        ):
            names = [*self._services, reflection.SERVICE_NAME]
            registrar = Registrar()
            reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
                reflection.aio.ReflectionServicer(names), registrar
            )
            self._table.add(registrar)
        _withhold_invalid_metadata()
        self._executor = ThreadPoolExecutor(thread_name_prefix=f"{self.config.name}-handler")
        self._serving.executor = self._executor
        self._grpc = grpc.aio.server(
            migration_thread_pool=self._executor,
            options=self.config.channel_options,
            maximum_concurrent_rpcs=self.config.max_concurrent_rpcs,
        )
        # one generic handler for every method: one dictionary lookup per call
        self._grpc.add_generic_rpc_handlers((self._table,))
        bind = f"{self.config.host}:{self.config.port}"
        if self.config.insecure_dev:
            logger.warning(
                "INSECURE DEVELOPMENT MODE (insecure_dev) on %s: %s",
                bind,
                "anyone who can connect may call "
                + (", ".join(self._unguarded) or "any method")
                + " without authentication; never run this way outside local development",
                extra={"service": self.config.name},
            )
        if self.credentials is not None:
            port = self._grpc.add_secure_port(bind, self.credentials)
        else:
            if not _is_loopback(self.config.host):
                logger.warning(
                    "serving PLAINTEXT on %s: any host on the network can read and forge calls; "
                    "pass credentials= (framework.auth.tls) outside local development",
                    bind,
                )
            port = self._grpc.add_insecure_port(bind)
        if port == 0:
            raise OSError(f"could not bind {bind}: the address is in use or not available")
        for policy in self.chain.policies:
            start = getattr(policy, "start", None)
            if start is not None:
                await start()
        # dependency checks run once before the first call can be served, so health never
        # says SERVING for a service whose required dependency is down
        await self.health.start([s for s in self._services if not s.startswith("grpc.")])
        await self._grpc.start()
        self._port = port
        for hook in self._all_hooks():
            await _call_hook(hook, "on_started", self)
        if self._slot is not None:
            self._slot.ready()
        logger.info(
            "%s serving on %s (%s)",
            self.config.name,
            self.address,
            ", ".join(self._services),
            extra={"service": self.config.name},
        )
        return int(port)

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain and stop: NOT_SERVING and the drain signal, hooks' on_draining
        (deregister), `drain_delay_s` for load balancers to notice, refuse new calls,
        let in-flight ones finish within the grace period, wait for the exits of the
        calls cut at its end, then close policies.  `grace_s=0` stops at once (no
        drain delay).

        A failing hook or policy `close()` is logged and does not stop the shutdown.
        """
        if self._stopped or self._port is None or self._grpc is None:
            return
        self._stopped = True
        grace = self.config.grace_s if grace_s is None else grace_s
        try:
            self._serving.draining.set()
            await self.health.drain()
            for hook in self._all_hooks():
                await _call_hook(hook, "on_draining", self)
            if self.config.drain_delay_s > 0 and grace > 0:
                await asyncio.sleep(self.config.drain_delay_s)
        finally:
            try:
                await self._grpc.stop(grace)
                # calls cut at the end of grace run their exits (spans, metrics, slots)
                # once their tasks see the cancellation: wait for them, bounded
                if not await self._serving.wait_idle(_EXITS_AFTER_GRACE_S):
                    logger.warning(
                        "%s: %d call(s) still running %.1f s after the grace period; "
                        "closing policies anyway",
                        self.config.name,
                        self._serving.in_flight,
                        _EXITS_AFTER_GRACE_S,
                        extra={"service": self.config.name},
                    )
                await self.health.close()
                for policy in self.chain.policies:
                    await _call_hook(policy, "close")
                for hook in self._all_hooks():
                    await _call_hook(hook, "on_stopped", self)
            finally:
                if self._executor is not None:
                    # a sync handler still blocked in a thread cannot be interrupted
                    self._executor.shutdown(wait=False, cancel_futures=True)
                if self._stopping is not None:
                    self._stopping.set()
        logger.info("%s stopped", self.config.name, extra={"service": self.config.name})

    async def serve(self) -> None:
        """Start, then run until SIGTERM/SIGINT (or `stop()`), then drain and stop.

        With `workers > 1` this process supervises that many worker processes instead
        (`framework.workers.supervisor`), each running this program to serve.
        """
        if self.workers > 1 and self._slot is None:
            from framework.workers.supervisor import Supervisor

            await Supervisor(self, self.workers).run()
            return
        self._stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT)
        stop_task: asyncio.Task[None] | None = None
        signalled = asyncio.Event()

        def on_signal() -> None:
            nonlocal stop_task
            signalled.set()
            if stop_task is None and self._port is not None:
                logger.info("%s: signal received, draining", self.config.name)
                stop_task = loop.create_task(self.stop())

        # handlers first: a signal that arrives while starting still drains cleanly
        for sig in signals:
            with contextlib.suppress(NotImplementedError):  # not on Windows
                loop.add_signal_handler(sig, on_signal)
        try:
            await self.start()
            if signalled.is_set() and stop_task is None:
                stop_task = loop.create_task(self.stop())
            await self._stopping.wait()
            if stop_task is not None:
                await stop_task
        finally:
            for sig in signals:
                with contextlib.suppress(NotImplementedError):
                    loop.remove_signal_handler(sig)

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def _call_hook(hook: object, name: str, *args: object) -> None:
    """Call an optional async lifecycle method; during shutdown a failure is only logged."""
    method = getattr(hook, name, None)
    if method is None:
        return
    if name == "on_started":
        await method(*args)
        return
    try:
        await method(*args)
    except asyncio.CancelledError:
        raise
    except Exception:  # shutdown goes on; the failure is logged with its traceback
        logger.exception("%s.%s failed during shutdown", type(hook).__name__, name)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _find_register(servicer: object) -> Callable[[Any, Any], None]:
    for cls in type(servicer).__mro__:
        module = sys.modules.get(cls.__module__)
        if module is None or not cls.__module__.endswith("_pb2_grpc"):
            continue
        register = getattr(module, f"add_{cls.__name__}_to_server", None)
        if register is not None:
            return register  # type: ignore[no-any-return]
    raise TypeError(
        f"{type(servicer).__name__} does not derive from a generated *Servicer class; "
        "pass register=add_<Name>Servicer_to_server"
    )
