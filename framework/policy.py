"""The one abstraction for cross-cutting behaviour: a policy in a chain.

A policy *decides and observes*; it never re-invokes the call.  For each method
it is bound once (`bind(method)`), which returns an `enter` hook or None when it
does not apply.  Per call the chain runs every bound `enter(call)` in declared
order (first listed = outermost); an enter rejects the call by raising a
`FrameworkError` and may return an `exit(error)` that observes the outcome.
Exits run in reverse order, always, and never swallow the error.

Enters are synchronous and free of I/O.  A policy that must await (a waiting
bulkhead, injected delay) returns an `async def` enter, or, when it waits only
sometimes, a sync enter marked with `may_await(...)` that returns an awaitable
only when it must wait (no coroutine per call otherwise); chains that contain
either kind are run on the async path.  Both adapters (`server_adapter`, `client`) are asyncio
and run either kind; `Chain(..., allow_async=False)` is for an adapter that cannot
await: it refuses an async enter when the chain is bound, not on the first call.

The same `Call` shape serves both sides: on the server it reads the inbound
metadata, peer and deadline; on the client it may add outbound metadata and set
the timeout before the RPC starts.
"""

from __future__ import annotations

import enum
import fnmatch
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from google.protobuf import descriptor_pool
from google.protobuf.descriptor import MethodDescriptor

from framework.errors import RpcStatus
from gen.framework.v1 import options_pb2

if TYPE_CHECKING:
    import asyncio

    import grpc.aio

logger = logging.getLogger(__name__)

Exit = Callable[[BaseException | None], None]
Enter = Callable[["Call"], Exit | None]
AsyncEnter = Callable[["Call"], Awaitable[Exit | None]]
# A sync enter that returns an awaitable (resolving to the exit) only when it must wait
MaybeAsyncEnter = Callable[["Call"], "Exit | Awaitable[Exit | None] | None"]
Metadata = tuple[tuple[str, str | bytes], ...]


class Side(enum.Enum):
    SERVER = "server"
    CLIENT = "client"


BOTH_SIDES = frozenset(Side)


class Arity(enum.Enum):
    UNARY_UNARY = "unary_unary"
    UNARY_STREAM = "unary_stream"
    STREAM_UNARY = "stream_unary"
    STREAM_STREAM = "stream_stream"

    @classmethod
    def of(cls, request_streaming: bool, response_streaming: bool) -> Arity:
        if request_streaming:
            return cls.STREAM_STREAM if response_streaming else cls.STREAM_UNARY
        return cls.UNARY_STREAM if response_streaming else cls.UNARY_UNARY

    @property
    def request_streaming(self) -> bool:
        return self in (Arity.STREAM_UNARY, Arity.STREAM_STREAM)

    @property
    def response_streaming(self) -> bool:
        return self in (Arity.UNARY_STREAM, Arity.STREAM_STREAM)


_EMPTY_METHOD_POLICY = options_pb2.MethodPolicy()
_EMPTY_SERVICE_POLICY = options_pb2.ServicePolicy()


@dataclass(frozen=True, slots=True, eq=False)
class Method:
    """Everything known about a method before any call: names, arity, contract options."""

    full_name: str  # "/echo.v1.EchoService/Echo"
    service: str  # "echo.v1.EchoService"
    name: str  # "Echo"
    arity: Arity
    policy: options_pb2.MethodPolicy = field(default_factory=lambda: _EMPTY_METHOD_POLICY)
    service_policy: options_pb2.ServicePolicy = field(default_factory=lambda: _EMPTY_SERVICE_POLICY)
    descriptor: MethodDescriptor | None = None

    @classmethod
    def resolve(cls, full_name: str | bytes, arity: Arity | None = None) -> Method:
        """Describe a method from its wire name, reading its options from the descriptor pool.

        Methods whose contract is not imported (a foreign service) get empty options.
        """
        if isinstance(full_name, bytes):
            full_name = full_name.decode()
        service, _, name = full_name.lstrip("/").partition("/")
        if not service or not name:
            raise ValueError(f"method name must look like '/pkg.Service/Method', got {full_name!r}")
        descriptor: MethodDescriptor | None = None
        try:
            service_desc = descriptor_pool.Default().FindServiceByName(service)
        except KeyError:
            service_desc = None
        method_policy, service_policy = _EMPTY_METHOD_POLICY, _EMPTY_SERVICE_POLICY
        if service_desc is not None:
            descriptor = service_desc.methods_by_name.get(name)
            sopts = service_desc.GetOptions()
            if sopts.HasExtension(options_pb2.service_policy):
                service_policy = sopts.Extensions[options_pb2.service_policy]
        if descriptor is not None:
            mopts = descriptor.GetOptions()
            if mopts.HasExtension(options_pb2.method_policy):
                method_policy = mopts.Extensions[options_pb2.method_policy]
            if arity is None:
                arity = Arity.of(descriptor.client_streaming, descriptor.server_streaming)
        return cls(
            full_name=f"/{service}/{name}",
            service=service,
            name=name,
            arity=arity or Arity.UNARY_UNARY,
            policy=method_policy,
            service_policy=service_policy,
            descriptor=descriptor,
        )

    def matches(self, pattern: str) -> bool:
        """Shell-style match on the full name, the service or the bare method name.

        `"echo.v1.EchoService"`, `"echo.v1.*"`, `"/echo.v1.EchoService/Echo"`, `"*/Echo"`.
        """
        bare = self.full_name[1:]
        return (
            fnmatch.fnmatchcase(bare, pattern.lstrip("/"))
            or fnmatch.fnmatchcase(self.service, pattern)
            or pattern == self.name
        )


class Call:
    """One RPC as policies see it. Built per call; everything costly is lazy."""

    __slots__ = (
        "_decode",
        "_inbound",
        "_outbound",
        "_request",
        "context",
        "drain",
        "finished",
        "method",
        "principal",
        "side",
        "started",
        "status",
        "target",
        "timeout",
    )

    def __init__(
        self,
        method: Method,
        side: Side,
        *,
        context: grpc.aio.ServicerContext[Any, Any] | None = None,
        request: object | None = None,
        metadata: Metadata | None = None,
        timeout: float | None = None,
        target: str = "",
        raw_request: bytes | None = None,
        decode: Callable[[bytes], object] | None = None,
    ) -> None:
        self.method = method
        self.side = side
        self.context = context
        # the request message for unary-request methods; the server passes the raw bytes
        # and their parser, so the message is parsed on first use, inside the chain
        self._request: Any = request if decode is None else raw_request
        self._decode = decode
        self.started = time.perf_counter()
        self.timeout = timeout  # client: seconds the RPC may take; policies may lower it
        self.target = target  # client: the channel target
        self.status: RpcStatus | None = None  # server: the status the error mapping chose
        self.finished = False  # server: the handler has returned
        # server: the verified caller, set by the auth policy (a framework.auth Principal
        # with `.subject`, `.scopes`); None when anonymous or without authentication
        self.principal: Any = None
        # server: set when the server starts draining (see framework.server.drain_signal)
        self.drain: asyncio.Event | None = None
        self._inbound: dict[str, str | bytes] | None = None
        self._outbound: list[tuple[str, str | bytes]] | None = None
        if side is Side.CLIENT:
            self._outbound = list(metadata) if metadata else None
        elif metadata is not None:
            self._inbound = dict(metadata)

    @property
    def request(self) -> Any:
        """The request message (unary-request methods); malformed bytes raise DecodeError."""
        decode = self._decode
        if decode is not None:
            self._request = decode(self._request)  # kept raw (and raising) until it parses
            self._decode = None
        return self._request

    @request.setter
    def request(self, value: Any) -> None:
        self._request = value
        self._decode = None

    # ----- metadata
    def header(self, key: str) -> str | bytes | None:
        """One metadata value: inbound on the server, outbound on the client."""
        if self.side is Side.CLIENT:
            for k, v in self._outbound or ():
                if k == key:
                    return v
            return None
        if self._inbound is None:
            self._inbound = self._read_inbound()
        return self._inbound.get(key)

    def inbound(self) -> dict[str, str | bytes]:
        """Server: the inbound metadata as a dict, read once (the last value of a repeated
        key, as `header` answers); do not modify it. Several reads cost one call."""
        inbound = self._inbound
        if inbound is None:
            inbound = self._inbound = self._read_inbound()
        return inbound

    def _read_inbound(self) -> dict[str, str | bytes]:
        if self.context is None:
            return {}
        return dict(self.context.invocation_metadata() or ())  # (key, value) pairs

    @property
    def metadata(self) -> Metadata:
        if self.side is Side.CLIENT:
            return tuple(self._outbound or ())
        if self._inbound is None:
            self._inbound = self._read_inbound()
        return tuple(self._inbound.items())

    def add_metadata(self, key: str, value: str | bytes) -> None:
        """Client only: send an extra metadata entry with this call."""
        if self.side is not Side.CLIENT:
            raise TypeError("add_metadata is for client calls; servers send trailing metadata")
        if self._outbound is None:
            self._outbound = []
        self._outbound.append((key, value))

    def outbound_metadata(self) -> Metadata | None:
        return tuple(self._outbound) if self._outbound is not None else None

    # ----- peer and deadline
    @property
    def peer(self) -> str:
        if self.context is not None:
            return str(self.context.peer())
        return self.target

    def time_remaining(self) -> float | None:
        """Seconds left before the deadline, or None when the call has none."""
        if self.context is not None:
            remaining = self.context.time_remaining()
            return None if remaining is None else max(0.0, float(remaining))
        if self.timeout is None:
            return None
        return max(0.0, self.timeout - (time.perf_counter() - self.started))


@runtime_checkable
class Policy(Protocol):
    """What goes in a chain. `bind` runs once per method, never per call."""

    def bind(self, method: Method) -> Enter | AsyncEnter | None: ...


class BasePolicy:
    """Convenience base: override `enter` (and `applies` to select methods)."""

    sides: frozenset[Side] = BOTH_SIDES

    def applies(self, method: Method) -> bool:
        return True

    def enter(self, call: Call) -> Exit | None:
        raise NotImplementedError

    def bind(self, method: Method) -> Enter | AsyncEnter | None:
        return self.enter if self.applies(method) else None


class _Selected:
    """`only(...)` / `skip(...)`: a policy limited to some methods, decided at bind time."""

    def __init__(self, policy: Policy, patterns: Sequence[str], keep: bool) -> None:
        if not patterns:
            raise ValueError("give at least one method pattern, e.g. 'echo.v1.EchoService/*'")
        self.policy = policy
        self.patterns = tuple(patterns)
        self.keep = keep
        self.sides: frozenset[Side] = getattr(policy, "sides", BOTH_SIDES)

    def bind(self, method: Method) -> Enter | AsyncEnter | None:
        hit = any(method.matches(p) for p in self.patterns)
        return self.policy.bind(method) if hit == self.keep else None

    def authenticates(self, method: Method) -> bool:
        """The wrapped policy's answer (see `authenticates`) for the methods it applies to."""
        hit = any(method.matches(p) for p in self.patterns)
        return hit == self.keep and authenticates(self.policy, method)

    def __repr__(self) -> str:
        kind = "only" if self.keep else "skip"
        return f"{kind}({self.policy!r}, {', '.join(self.patterns)})"


def authenticates(policy: object, method: Method) -> bool:
    """Whether `policy` requires a verified caller for `method`.

    Authentication policies answer through an `authenticates(method)` method
    (`framework.auth.policy.AuthPolicy` does); the server asks it before serving a
    method whose contract declares scopes or `auth_required: true`.
    """
    check = getattr(policy, "authenticates", None)
    return bool(check(method)) if callable(check) else False


def requires_authentication(method: Method) -> bool:
    """Whether the contract says `method` needs a verified caller (scopes, auth_required)."""
    options = method.policy
    return bool(options.scopes) or (options.HasField("auth_required") and options.auth_required)


def only(policy: Policy, *patterns: str) -> Policy:
    """Apply `policy` only to methods matching one of `patterns`."""
    return _Selected(policy, patterns, keep=True)


def skip(policy: Policy, *patterns: str) -> Policy:
    """Apply `policy` to every method except those matching one of `patterns`."""
    return _Selected(policy, patterns, keep=False)


def run_exits(exits: Sequence[Exit], error: BaseException | None) -> None:
    """Run exits innermost first. A failing exit is a policy bug: log it, run the rest."""
    for exit_ in reversed(exits):
        try:
            exit_(error)
        except Exception:  # a broken observer must not change the call's outcome
            logger.exception("policy exit %r failed; the call's outcome is unchanged", exit_)


MessageCheck = Callable[[Any], None]
# Maps an outcome to what the caller sees (the server's error mapping); None is OK.
Outcome = Callable[[Call, BaseException | None], BaseException | None]


class BoundChain:
    """A chain resolved for one method: the enters that apply, in order.

    `message_checks` run on every message of a streamed request (server side),
    from policies that offer `bind_messages(method)`; a check rejects a message by
    raising a framework error, which ends the call with that status.
    """

    __slots__ = ("_steps", "enters", "is_async", "message_checks", "method")

    def __init__(
        self,
        method: Method,
        enters: Sequence[Enter | AsyncEnter],
        message_checks: Sequence[MessageCheck] = (),
    ) -> None:
        self.method = method
        self.enters = tuple(enters)
        # (enter, whether it may return an awaitable): only those are checked per call
        self._steps = tuple((e, _is_async(e)) for e in self.enters)
        self.is_async = any(awaits for _, awaits in self._steps)
        self.message_checks = tuple(message_checks)

    def enter(self, call: Call, outcome: Outcome | None = None) -> list[Exit]:
        """Run every enter; if one rejects, the exits collected so far see its error
        (as `outcome(call, error)` maps it, when given: what the caller will see)."""
        exits: list[Exit] = []
        try:
            for enter in self.enters:
                exit_ = enter(call)
                if exit_ is not None:
                    exits.append(exit_)  # type: ignore[arg-type]
        except BaseException as error:
            run_exits(exits, error if outcome is None else outcome(call, error))
            raise
        return exits

    async def aenter(self, call: Call, outcome: Outcome | None = None) -> list[Exit]:
        exits: list[Exit] = []
        try:
            for enter, awaits in self._steps:
                result = enter(call)
                if awaits and result is not None and inspect.isawaitable(result):
                    result = await result
                if result is not None:
                    exits.append(result)  # type: ignore[arg-type]
        except BaseException as error:
            run_exits(exits, error if outcome is None else outcome(call, error))
            raise
        return exits


_MAY_AWAIT = "_framework_may_await"


def may_await(enter: MaybeAsyncEnter) -> AsyncEnter:
    """Mark a sync enter that returns an awaitable (resolving to its exit or None) only
    when it must wait, e.g. fault injection with a delay rule active.  Its chain runs on
    the async path and a sync adapter refuses it, as for an `async def` enter, but a
    call that does not wait costs no coroutine."""
    setattr(enter, _MAY_AWAIT, True)
    return enter  # type: ignore[return-value]


def _is_async(enter: Callable[..., Any]) -> bool:
    return (
        getattr(enter, _MAY_AWAIT, False) is True
        or inspect.iscoroutinefunction(enter)
        or inspect.iscoroutinefunction(
            getattr(enter, "__call__", None)  # noqa: B004 - callable objects with async __call__
        )
    )


def as_policies(policies: Iterable[Policy], where: str) -> tuple[Policy, ...]:
    """`policies` as a tuple; a single policy or a non-list fails here, saying what to pass."""
    single = isinstance(policies, Policy)
    if single or isinstance(policies, str | bytes):
        raise TypeError(
            f"{where} must be a list of policies, e.g. [{type(policies).__name__}()], "
            f"got one {type(policies).__name__}"
        )
    try:
        return tuple(policies)
    except TypeError:
        raise TypeError(
            f"{where} must be a list of policies, got {type(policies).__name__}"
        ) from None


class Chain:
    """Policies in declared order (first = outermost), bound per method and cached."""

    def __init__(self, policies: Iterable[Policy], side: Side, *, allow_async: bool = True) -> None:
        self.policies: tuple[Policy, ...] = as_policies(policies, "policies")
        self.side = side
        self.allow_async = allow_async
        for policy in self.policies:
            if not isinstance(policy, Policy):
                raise TypeError(f"{policy!r} is not a policy: it needs a bind(method) method")
            sides = getattr(policy, "sides", BOTH_SIDES)
            if side not in sides:
                raise TypeError(f"{type(policy).__name__} cannot run on the {side.value} side")
        self._bound: dict[str | bytes, BoundChain] = {}

    def bind(self, method: Method) -> BoundChain:
        enters = [e for e in (p.bind(method) for p in self.policies) if e is not None]
        checks: list[MessageCheck] = []
        if method.arity.request_streaming:
            for policy in self.policies:
                bind_messages = getattr(policy, "bind_messages", None)
                check = bind_messages(method) if bind_messages is not None else None
                if check is not None:
                    checks.append(check)
        bound = BoundChain(method, enters, checks)
        if bound.is_async and not self.allow_async:
            names = [type(p).__name__ for p in self.policies]
            raise TypeError(
                f"the chain {names} has an async policy for {method.full_name}, "
                "but this adapter runs synchronously; use the grpc.aio adapter"
            )
        return bound

    def for_method(self, name: str | bytes, arity: Arity | None = None) -> BoundChain:
        """The bound chain for a wire method name; resolved on first use, then cached."""
        bound = self._bound.get(name)
        if bound is None:
            bound = self.bind(Method.resolve(name, arity))
            self._bound[name] = bound
        return bound


# ------------------------------------------------------------- request scope

_current_call: ContextVar[Call | None] = ContextVar("framework_current_call", default=None)


def current_call() -> Call | None:
    """The inbound call being handled by this task (server side), if any."""
    return _current_call.get()


def set_current_call(call: Call | None) -> object:
    """Adapters only: mark `call` as the inbound call of this task; returns a reset token."""
    return _current_call.set(call)


def reset_current_call(token: object) -> None:
    _current_call.reset(token)  # type: ignore[arg-type]
