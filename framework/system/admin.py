"""Operator RPCs every system process serves (besides health and fault injection)."""

from __future__ import annotations

from typing import Any

from framework.policies.breaker import CircuitBreakerPolicy
from gen.framework.v1 import breakers_pb2, breakers_pb2_grpc

__all__ = ["BreakerServicer"]


class BreakerServicer(breakers_pb2_grpc.BreakerServiceServicer):
    """`framework.v1.BreakerService`: the state of a process's client-side breakers."""

    def __init__(self, instance: str, *policies: CircuitBreakerPolicy) -> None:
        self.instance = instance
        self.policies = policies

    async def ListBreakers(  # noqa: N802
        self, request: breakers_pb2.ListBreakersRequest, context: Any
    ) -> breakers_pb2.ListBreakersResponse:
        found = [b for policy in self.policies for b in policy.breakers()]
        found.sort(key=lambda b: (b.method, b.target))
        return breakers_pb2.ListBreakersResponse(
            instance=self.instance,
            breakers=[
                breakers_pb2.Breaker(
                    target=b.target,
                    method=b.method,
                    state=b.state.name,
                    failure_rate=b.failure_rate,
                    recorded=b.recorded,
                )
                for b in found
            ],
        )
