"""Fault injection for chaos experiments: delay and/or abort some calls, switchable live.

`FaultInjectionPolicy` (server side) holds named `FaultRule`s; with none (the
default) it injects nothing and costs one attribute check per call.  A rule
matches calls by method pattern and/or a metadata header, affects `percent` of
them (drawn from an injectable random source, so tests are deterministic), and
delays them by `delay_s` (through the injected clock) and/or aborts them with
`abort_code`.  Rules are changed at runtime in code (`set_rules`, `clear`) or
through the `framework.v1.FaultInjectionService` admin RPC
(`FaultInjectionServicer`), whose methods require the "operator" scope in the
contract (so a server refuses to add it without an authentication policy).
The admin service and health checks are never faulted, so an experiment can
always be switched off.

A delay must await, so a chain with this policy runs on the grpc.aio path; the
enter itself is sync (`framework.policy.may_await`) and returns a coroutine only
for a call it delays, so while no rule is active a call costs no coroutine.
Which rules apply to a method is recomputed only when the rules change (a version
counter), never matched per call.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

import grpc
import grpc.aio

from framework.clock import Clock, SystemClock
from framework.config import expect
from framework.errors import FrameworkError, InvalidArgumentError, error_class
from framework.policy import AsyncEnter, Call, Method, Side, may_await
from gen.framework.v1 import faults_pb2, faults_pb2_grpc

logger = logging.getLogger(__name__)

FAULT_REASON = "FAULT_INJECTED"
ADMIN_SERVICE = faults_pb2.DESCRIPTOR.services_by_name["FaultInjectionService"].full_name
NEVER_FAULTED = (
    ADMIN_SERVICE,
    "grpc.health.v1.Health",
    "grpc.reflection.*",
    "framework.v1.HealthReportService",
)
_CODES = {code.value[0]: code for code in grpc.StatusCode}
MAX_DELAY_S = 3600.0


@dataclass(frozen=True, slots=True)
class FaultRule:
    """Which calls (method pattern, header) and what to do (delay, abort) for `percent` of them."""

    name: str
    method: str = ""
    header: str = ""
    header_value: str = ""
    percent: float = 100.0
    delay_s: float = 0.0
    abort_code: grpc.StatusCode | None = None
    abort_message: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name must not be empty: rules are replaced and cleared by name")
        if not 0.0 <= self.percent <= 100.0:
            raise ValueError(f"percent must be between 0 and 100, got {self.percent!r}")
        if not 0 <= self.delay_s <= MAX_DELAY_S:  # also refuses NaN and infinity
            raise ValueError(
                f"delay_s must be a number of seconds from 0 to {MAX_DELAY_S:g}, "
                f"got {self.delay_s!r}"
            )
        if self.abort_code is grpc.StatusCode.OK:
            raise ValueError("abort_code must be an error code, not OK (use None for no abort)")
        if self.header_value and not self.header:
            raise ValueError("header_value needs header: name the metadata key to compare")
        if self.header and self.header != self.header.lower():
            raise ValueError(f"header must be lower case (gRPC metadata keys), got {self.header!r}")
        if not self.delay_s and self.abort_code is None:
            raise ValueError(f"rule {self.name!r} does nothing: set delay_s and/or abort_code")

    def applies_to(self, method: Method) -> bool:
        return not self.method or method.matches(self.method)

    def error(self) -> FrameworkError:
        code = self.abort_code or grpc.StatusCode.UNAVAILABLE
        cls = error_class(FAULT_REASON, code)
        message = self.abort_message or f"fault injected by rule {self.name!r}"
        error = cls(message, reason=FAULT_REASON, metadata={"rule": self.name})
        if error.code() is not code:
            error.override_code(code)  # a code with no class of its own
        return error

    @classmethod
    def from_proto(cls, rule: faults_pb2.FaultRule) -> FaultRule:
        code = None
        if rule.abort_code:
            code = _CODES.get(rule.abort_code)
            if code is None:
                raise ValueError(
                    f"abort_code must be a gRPC status code 1..16, got {rule.abort_code}"
                )
        return cls(
            name=rule.name,
            method=rule.method,
            header=rule.header,
            header_value=rule.header_value,
            percent=rule.percent if rule.HasField("percent") else 100.0,
            delay_s=rule.delay_s,
            abort_code=code,
            abort_message=rule.abort_message,
        )

    def to_proto(self) -> faults_pb2.FaultRule:
        return faults_pb2.FaultRule(
            name=self.name,
            method=self.method,
            header=self.header,
            header_value=self.header_value,
            percent=self.percent,
            delay_s=self.delay_s,
            abort_code=self.abort_code.value[0] if self.abort_code else 0,
            abort_message=self.abort_message,
        )


class FaultInjectionPolicy:
    """Server policy: applies the active fault rules; inert while there are none."""

    sides = frozenset({Side.SERVER})

    def __init__(
        self,
        rules: Iterable[FaultRule] = (),
        *,
        random_source: Callable[[], float] | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._rules: dict[str, FaultRule] = {}
        self._version = 0
        self._random = random_source or random.random
        self._clock = clock or SystemClock()
        self.set_rules(rules)

    def __repr__(self) -> str:
        return f"FaultInjectionPolicy(rules={sorted(self._rules)})"

    @property
    def rules(self) -> list[FaultRule]:
        return list(self._rules.values())

    def set_rules(self, rules: Iterable[FaultRule]) -> None:
        """Add rules, replacing those with the same name."""
        if isinstance(rules, FaultRule | str):
            raise TypeError(f"rules must be a list of FaultRule, got one {type(rules).__name__}")
        rules = list(rules)
        for rule in rules:
            expect(rule, FaultRule, "fault rules", 'FaultRule(name="...", ...)')
        for rule in rules:
            self._rules[rule.name] = rule
            logger.warning("fault injection ON: %s", rule)
        self._version += 1

    def clear(self, names: Iterable[str] = ()) -> None:
        """Remove the named rules, or every rule when no name is given."""
        wanted = list(names)
        for name in wanted or list(self._rules):
            if self._rules.pop(name, None) is not None:
                logger.warning("fault injection rule %r removed", name)
        self._version += 1

    def bind(self, method: Method) -> AsyncEnter | None:
        if any(method.matches(p) for p in NEVER_FAULTED):
            return None
        cached: list[object] = [-1, ()]  # [version, rules for this method]

        def enter(call: Call) -> Awaitable[None] | None:
            if not self._rules:
                return None
            if cached[0] != self._version:
                cached[:] = [self._version, tuple(r for r in self.rules if r.applies_to(method))]
            rules: tuple[FaultRule, ...] = cached[1]  # type: ignore[assignment]
            return self._apply(call, rules, 0)

        return may_await(enter)

    def _apply(self, call: Call, rules: Sequence[FaultRule], start: int) -> Awaitable[None] | None:
        """Apply `rules[start:]` in order: abort here, or hand over to a coroutine at the
        first rule that delays the call (the rest are applied after the delay)."""
        for index in range(start, len(rules)):
            rule = rules[index]
            if rule.header:
                value = call.header(rule.header)
                if value is None or (rule.header_value and value != rule.header_value):
                    continue
            if rule.percent < 100.0 and self._random() * 100.0 >= rule.percent:
                continue
            if rule.delay_s:
                return self._delay(call, rules, index)
            if rule.abort_code is not None:
                raise rule.error()
        return None

    async def _delay(self, call: Call, rules: Sequence[FaultRule], index: int) -> None:
        rule = rules[index]
        remaining = call.time_remaining()  # never hold a call past its deadline
        await self._clock.sleep(rule.delay_s if remaining is None else min(rule.delay_s, remaining))
        if rule.abort_code is not None:
            raise rule.error()
        rest = self._apply(call, rules, index + 1)
        if rest is not None:
            await rest


class FaultInjectionServicer(faults_pb2_grpc.FaultInjectionServiceServicer):
    """The admin RPC: switches a policy's rules at runtime (requires scope "operator")."""

    def __init__(self, policy: FaultInjectionPolicy) -> None:
        self.policy = policy

    def _snapshot(self) -> faults_pb2.FaultRules:
        return faults_pb2.FaultRules(rules=[r.to_proto() for r in self.policy.rules])

    async def SetFaults(  # noqa: N802 - generated name
        self,
        request: faults_pb2.SetFaultsRequest,
        context: grpc.aio.ServicerContext[faults_pb2.SetFaultsRequest, faults_pb2.FaultRules],
    ) -> faults_pb2.FaultRules:
        try:
            rules = [FaultRule.from_proto(r) for r in request.rules]
        except ValueError as error:
            raise InvalidArgumentError(f"invalid fault rule: {error}") from None
        self.policy.set_rules(rules)
        return self._snapshot()

    async def ClearFaults(  # noqa: N802 - generated name
        self,
        request: faults_pb2.ClearFaultsRequest,
        context: grpc.aio.ServicerContext[faults_pb2.ClearFaultsRequest, faults_pb2.FaultRules],
    ) -> faults_pb2.FaultRules:
        self.policy.clear(request.names)
        return self._snapshot()

    async def ListFaults(  # noqa: N802 - generated name
        self,
        request: faults_pb2.ListFaultsRequest,
        context: grpc.aio.ServicerContext[faults_pb2.ListFaultsRequest, faults_pb2.FaultRules],
    ) -> faults_pb2.FaultRules:
        return self._snapshot()
