"""Faults applied to a running `ChaosSystem` at their time, always undone afterwards.

Each fault runs as its own task: it prepares what it needs from the registry (the
leases of a process it will kill or stop, the instances an RPC rule goes to) before its
`at_s` (on the load's clock), so a slow registry cannot delay the fault itself; then it
applies the fault, waits `duration_s` when it lasts, undoes it in a `finally` (so a
cancelled experiment leaves no process paused, no rule set, no proxy cut) and records
what happened (`FaultRecord`): the resolved target, when it started and ended, and, for
a killed or stopped process, when it was ready again (registered and healthy).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from framework.chaos.experiment import FaultSpec
from framework.chaos.proxy import ProxyMode
from framework.errors import FrameworkError

__all__ = ["FaultRecord", "resolve_process", "run_fault"]

logger = logging.getLogger(__name__)

RULE_PREFIX = "chaos-"


@dataclass(slots=True)
class FaultRecord:
    spec: FaultSpec
    target: str = ""
    started_s: float = 0.0
    ended_s: float = 0.0
    ready_s: float | None = None  # a killed/stopped process was ready again (load clock)
    detail: str = ""
    error: str = ""

    @property
    def restart_s(self) -> float | None:
        """How long the process took to be ready again after the fault ended."""
        return None if self.ready_s is None else max(0.0, self.ready_s - self.ended_s)


def resolve_process(name: str, processes: list[str], rng: random.Random) -> str:
    """`name`, or a random process ("random": any but the registry; "random:svc": a replica)."""
    if name == "random":
        choices = [p for p in processes if p != "registry"]
    elif name.startswith("random:"):
        service = name.partition(":")[2]
        choices = [p for p in processes if p == service or p.startswith(f"{service}-")]
    else:
        if name not in processes:
            raise ValueError(f"no process {name!r}; the system runs {', '.join(processes)}")
        return name
    if not choices:
        raise ValueError(f"{name!r} matches no process of {', '.join(processes)}")
    return rng.choice(sorted(choices))


async def _until(now: Callable[[], float], at_s: float) -> None:
    delay = at_s - now()
    if delay > 0:
        await asyncio.sleep(delay)


async def run_fault(
    spec: FaultSpec,
    system: Any,
    now: Callable[[], float],
    *,
    rng: random.Random | None = None,
    ready_timeout_s: float = 120.0,
) -> FaultRecord:
    """Apply `spec` to `system` at its time (see the module docstring)."""
    record = FaultRecord(spec)
    try:
        if spec.action in ("kill", "pause", "stop"):
            names = [p.name for p in system.processes()]
            record.target = resolve_process(spec.process, names, rng or random.Random())
            await _process_fault(spec, system, record, now, ready_timeout_s)
        elif spec.action == "rpc":
            record.target = spec.service
            await _rpc_fault(spec, system, record, now)
        else:
            record.target = spec.proxy
            await _proxy_fault(spec, system, record, now)
    except (ValueError, KeyError, ProcessLookupError, FrameworkError, grpc.RpcError) as error:
        record.error = str(error)
        logger.warning("fault %s could not be applied: %s", spec.describe(), error)
    if not record.started_s:
        record.started_s = now()
    if not record.ended_s:
        record.ended_s = now()
    return record


async def _begin(now: Callable[[], float], record: FaultRecord) -> None:
    """Wait for the fault's time; it starts now."""
    await _until(now, record.spec.at_s)
    record.started_s = now()


async def _process_fault(
    spec: FaultSpec, system: Any, record: FaultRecord, now: Callable[[], float], ready_s: float
) -> None:
    supervisor = system.supervisor
    name = record.target
    if spec.action == "pause":
        await _begin(now, record)
        pid = supervisor.signal(name, signal.SIGSTOP)
        record.detail = f"pid {pid} paused"
        try:
            await _until(now, spec.ends_s)
        finally:
            with contextlib.suppress(ProcessLookupError):
                supervisor.signal(name, signal.SIGCONT)
            record.ended_s = now()
        return
    # what `name` leases, read from the fault's preparation on but never waited for before
    # the fault (the registry may be slow under load); a killed process's leases stay
    # until their TTL, so a late answer still lists them
    leases = asyncio.create_task(_leases(system, name))
    try:
        await _begin(now, record)
        before = supervisor.pid(name)
        if spec.action == "kill":
            pid = supervisor.signal(name, signal.Signals[spec.signal])
            record.detail = f"pid {pid} {spec.signal}"
            record.ended_s = now()
        else:
            code = await supervisor.hold(name)
            record.detail = f"pid {before} stopped (exit {code})"
            try:
                await _until(now, spec.ends_s)
            finally:
                supervisor.release(name)
                record.ended_s = now()
        leased = await leases
    finally:
        leases.cancel()
        await asyncio.gather(leases, return_exceptions=True)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ready_s
    while supervisor.pid(name) in (None, before) and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    try:
        await supervisor.wait_ready(name, timeout_s=max(1.0, deadline - loop.time()))
        # the registry may still list the dead process as healthy: wait for the new one's leases
        while leased and not await _serving_again(system, name, leased):
            if loop.time() >= deadline:
                raise TimeoutError(f"{name} not registered again within {ready_s:g}s")
            await asyncio.sleep(0.1)
    except (RuntimeError, TimeoutError, FrameworkError, grpc.RpcError) as error:
        record.error = f"{name} was not ready again: {error}"
        return
    record.ready_s = now()
    record.detail += f"; back as pid {supervisor.pid(name)}"


async def _leases(system: Any, name: str) -> set[str]:
    """The services process `name` holds a lease of."""
    return {i.service for i in await system.snapshot().registered() if i.instance == name}


async def _serving_again(system: Any, name: str, services: set[str]) -> bool:
    """Every service `name` had leased is leased again, healthy, at a port its new pid
    listens on."""
    from framework.chaos.system import listening_ports

    pid = system.supervisor.pid(name)
    if pid is None:
        return False
    ports = listening_ports(pid)
    live = {
        i.service
        for i in await system.snapshot().registered()
        if i.instance == name
        and i.health != "NOT_SERVING"
        and int(i.address.rsplit(":", 1)[1]) in ports
    }
    return services <= live


async def _instances(system: Any, service: str) -> list[tuple[str, str]]:
    """(instance, address) of every registered instance of a manifest service."""
    spec = system.manifest.service(service)
    instances = set(spec.instance_names())
    found = await system.snapshot().registered()
    return sorted(
        {
            (i.instance, i.address)
            for i in found
            if i.instance in instances and i.service in spec.registers
        }
    )


async def _set_rules(
    system: Any, instances: list[tuple[str, str]], request: Any, clear: bool
) -> list[str]:
    from framework.client import connect
    from gen.framework.v1.faults_pb2_grpc import FaultInjectionServiceStub

    metadata = (("authorization", f"Bearer {system.operator_token()}"),)
    reached: list[str] = []
    for instance, address in instances:
        channel = connect(address)
        try:
            stub = FaultInjectionServiceStub(channel)
            call = stub.ClearFaults if clear else stub.SetFaults
            await call(request, metadata=metadata, timeout=5)
            reached.append(instance)
        except (FrameworkError, grpc.RpcError) as error:
            logger.warning("fault rule on %s (%s): %s", instance, address, error)
        finally:
            await channel.close()
    return reached


async def _rpc_fault(
    spec: FaultSpec, system: Any, record: FaultRecord, now: Callable[[], float]
) -> None:
    from gen.framework.v1 import faults_pb2

    name = f"{RULE_PREFIX}{spec.service}-{spec.at_s:g}"
    rule = faults_pb2.FaultRule(
        name=name, method=spec.method, delay_s=spec.delay_s, percent=spec.percent
    )
    if spec.abort:
        rule.abort_code = grpc.StatusCode[spec.abort].value[0]
    instances = await _instances(system, spec.service)  # before the fault's time
    await _begin(now, record)
    try:
        reached = await _set_rules(
            system, instances, faults_pb2.SetFaultsRequest(rules=[rule]), False
        )
        if not reached:
            raise ValueError(f"no instance of {spec.service} took the fault rule")
        record.detail = f"rule {name} on {', '.join(reached)}"
        await _until(now, spec.ends_s)
    finally:
        # every instance (also one that joined during the fault), so no rule is left behind
        try:
            current = await _instances(system, spec.service)
        except (FrameworkError, grpc.RpcError) as error:
            logger.warning("listing %s to clear rule %s: %s", spec.service, name, error)
            current = []
        await _set_rules(
            system,
            sorted({*instances, *current}),
            faults_pb2.ClearFaultsRequest(names=[name]),
            True,
        )
        record.ended_s = now()


async def _proxy_fault(
    spec: FaultSpec, system: Any, record: FaultRecord, now: Callable[[], float]
) -> None:
    proxy = system.proxies.get(spec.proxy)
    if proxy is None:
        raise ValueError(
            f"no {spec.proxy} proxy: this run does not use {spec.proxy} "
            "(give --store postgresql://... / --bus nats://...)"
        )
    resets = proxy.resets
    await _begin(now, record)
    proxy.set(ProxyMode(spec.mode), latency_s=spec.latency_ms / 1000.0)
    try:
        await _until(now, spec.ends_s)
    finally:
        proxy.set(ProxyMode.PASS)
        record.ended_s = now()
    record.detail = (
        f"{proxy.resets - resets} connections reset" if spec.mode == "reset" else spec.mode
    )
