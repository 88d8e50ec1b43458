"""Deadlines that carry across hops.

`DeadlinePolicy` is pinned on every client channel and applied when a call is
created, before any other policy runs (as Go's context fixes a deadline): a
call made while handling an inbound RPC never outlives the caller's deadline
(its timeout is lowered to the inbound call's remaining time), and a call that
sets no timeout gets its method's `timeout_s` option, or the client's default.
Every policy then sees `call.time_remaining()`, time spent in async enters
counts against it, and the client turns what is left into the RPC's timeout
when the RPC starts.
"""

from __future__ import annotations

from framework.errors import DeadlineExceededError
from framework.policy import BasePolicy, Call, Enter, Exit, Method, Side, current_call


class DeadlinePolicy(BasePolicy):
    """Client side: default and propagated deadlines."""

    sides = frozenset({Side.CLIENT})

    def __init__(self, default_timeout_s: float | None = 30.0, propagate: bool = True) -> None:
        if default_timeout_s is not None and default_timeout_s <= 0:
            raise ValueError(f"default_timeout_s must be > 0 or None, got {default_timeout_s}")
        self.default_timeout_s = default_timeout_s
        self.propagate = propagate

    def bind(self, method: Method) -> Enter | None:
        default = method.policy.timeout_s or self.default_timeout_s
        propagate = self.propagate
        name = method.full_name

        def enter(call: Call) -> Exit | None:
            timeout = call.timeout
            if timeout is None:
                timeout = default
            if propagate:
                inbound = current_call()
                if inbound is not None and inbound.finished:
                    inbound = None  # a task that outlived the call that spawned it
                remaining = inbound.time_remaining() if inbound is not None else None
                if remaining is not None:
                    if remaining <= 0.0:
                        raise DeadlineExceededError(
                            f"not calling {name}: the deadline of the inbound call "
                            f"{inbound.method.full_name if inbound else ''} has already passed"
                        )
                    timeout = remaining if timeout is None else min(timeout, remaining)
            call.timeout = timeout
            return None

        return enter
