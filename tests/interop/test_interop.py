"""gRPC's interoperability cases through the framework, compared with plain grpc.aio.

Every case of gRPC's interop suite (doc/interop-test-descriptions.md) is written
here as grpc.aio user code would be (`except grpc.aio.AioRpcError`, `call.code()`,
`read()`/`write()`), and run twice in the same test: against a plain grpc.aio
server through a plain channel, then against the framework's `Server` through
`connect()`, each with a realistic chain (telemetry, access log, rate limit,
bulkhead on the server; telemetry, access log, bulkhead, breaker, retries on the
client).  The outcome must be the one plain grpc.aio gives, every policy's exit
must run once per call with that call's status, and every bulkhead must count
0 calls in flight afterwards (issue #22).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from framework.client import connect
from framework.config import ServerConfig
from framework.errors import code_of
from framework.policies.accesslog import AccessLogPolicy
from framework.policies.breaker import CircuitBreakerPolicy
from framework.policies.bulkhead import BulkheadConfig, BulkheadPolicy
from framework.policies.ratelimit import Limit, RateLimitConfig, RateLimitPolicy
from framework.policies.retry import RetryConfig, RetryPolicy
from framework.policy import BOTH_SIDES, Call, Exit, Method, Policy
from framework.server import Server
from framework.telemetry.sdk import Telemetry, TelemetryConfig
from tests.interop import messages as m
from tests.interop.servicer import ECHO_INITIAL, ECHO_TRAILING, TestService, register

# ------------------------------------------------------------------ what a case returns


@dataclass(frozen=True)
class Outcome:
    """What the caller of one RPC saw: status, message, response sizes, echoed metadata."""

    code: grpc.StatusCode
    details: str | None = None
    sizes: tuple[int, ...] = ()
    initial: tuple[tuple[str, Any], ...] = ()
    trailing: tuple[tuple[str, Any], ...] = ()


OK = grpc.StatusCode.OK


def _echoed(metadata: Any) -> tuple[tuple[str, Any], ...]:
    return tuple((k, v) for k, v in (metadata or ()) if k in (ECHO_INITIAL, ECHO_TRAILING))


# --------------------------------------------------------------------- the cases


async def empty_unary(stub: m.TestServiceStub) -> list[Outcome]:
    response = await stub.EmptyCall(m.Empty())
    assert response == m.Empty() and response.ByteSize() == 0
    return [Outcome(OK)]


async def large_unary(stub: m.TestServiceStub) -> list[Outcome]:
    response = await stub.UnaryCall(m.SimpleRequest(response_size=314159, payload=m.zeros(271828)))
    assert response.payload.body == b"\0" * 314159
    return [Outcome(OK, sizes=(len(response.payload.body),))]


async def client_streaming(stub: m.TestServiceStub) -> list[Outcome]:
    async def requests() -> AsyncIterator[Any]:
        for size in (27182, 8, 1828, 45904):
            yield m.StreamingInputCallRequest(payload=m.zeros(size))

    response = await stub.StreamingInputCall(requests())
    assert response.aggregated_payload_size == 74922
    return [Outcome(OK, sizes=(response.aggregated_payload_size,))]


async def server_streaming(stub: m.TestServiceStub) -> list[Outcome]:
    request = m.StreamingOutputCallRequest(
        response_parameters=[m.ResponseParameters(size=s) for s in (31415, 9, 2653, 58979)]
    )
    sizes = tuple([len(r.payload.body) async for r in stub.StreamingOutputCall(request)])
    assert sizes == (31415, 9, 2653, 58979)
    return [Outcome(OK, sizes=sizes)]


async def ping_pong(stub: m.TestServiceStub) -> list[Outcome]:
    call = stub.FullDuplexCall()
    sizes = []
    for request_size, response_size in ((27182, 31415), (8, 9), (1828, 2653), (45904, 58979)):
        await call.write(
            m.StreamingOutputCallRequest(
                response_parameters=[m.ResponseParameters(size=response_size)],
                payload=m.zeros(request_size),
            )
        )
        sizes.append(len((await call.read()).payload.body))
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert sizes == [31415, 9, 2653, 58979]
    return [Outcome(await call.code(), sizes=tuple(sizes))]


async def empty_stream(stub: m.TestServiceStub) -> list[Outcome]:
    call = stub.FullDuplexCall()
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    return [Outcome(await call.code())]


async def cancel_after_begin(stub: m.TestServiceStub) -> list[Outcome]:
    call = stub.StreamingInputCall()
    assert call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    return [Outcome(await call.code(), await call.details())]


async def cancel_after_first_response(stub: m.TestServiceStub) -> list[Outcome]:
    call = stub.FullDuplexCall()
    await call.write(
        m.StreamingOutputCallRequest(
            response_parameters=[m.ResponseParameters(size=31415)], payload=m.zeros(27182)
        )
    )
    first = await call.read()
    assert call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call.read()
    return [Outcome(await call.code(), await call.details(), sizes=(len(first.payload.body),))]


async def timeout_on_sleeping_server(stub: m.TestServiceStub) -> list[Outcome]:
    # The description's timeout is 1 ms; with that, the write itself races the deadline
    # and grpc.aio (plain or not) may end the call INTERNAL "Internal error from Core"
    # (its write failing in the core first).  The server never answers this call (it
    # waits for more requests), so a longer timeout tests the same thing, reliably.
    call = stub.FullDuplexCall(timeout=0.5)
    try:
        await call.write(m.StreamingOutputCallRequest(payload=m.zeros(27182)))
        await call.read()
    except grpc.aio.AioRpcError as error:  # what the interop client catches
        assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    except asyncio.InvalidStateError:
        pass  # grpc.aio: the call had already ended when write() ran
    return [Outcome(await call.code(), await call.details())]


async def custom_metadata(stub: m.TestServiceStub) -> list[Outcome]:
    metadata = ((ECHO_INITIAL, "test_initial_metadata_value"), (ECHO_TRAILING, b"\xab\xab\xab"))
    unary = stub.UnaryCall(
        m.SimpleRequest(response_size=314159, payload=m.zeros(271828)), metadata=metadata
    )
    response = await unary
    outcomes = [
        Outcome(
            await unary.code(),
            sizes=(len(response.payload.body),),
            initial=_echoed(await unary.initial_metadata()),
            trailing=_echoed(await unary.trailing_metadata()),
        )
    ]
    duplex = stub.FullDuplexCall(metadata=metadata)
    await duplex.write(
        m.StreamingOutputCallRequest(
            response_parameters=[m.ResponseParameters(size=314159)], payload=m.zeros(271828)
        )
    )
    await duplex.done_writing()
    sizes = tuple([len(r.payload.body) async for r in duplex])
    outcomes.append(
        Outcome(
            await duplex.code(),
            sizes=sizes,
            initial=_echoed(await duplex.initial_metadata()),
            trailing=_echoed(await duplex.trailing_metadata()),
        )
    )
    for outcome in outcomes:
        assert outcome.initial == ((ECHO_INITIAL, "test_initial_metadata_value"),)
        assert outcome.trailing == ((ECHO_TRAILING, b"\xab\xab\xab"),)
    return outcomes


async def _echo_status(stub: m.TestServiceStub, message: str, duplex: bool) -> Outcome:
    status = m.EchoStatus(code=2, message=message)
    try:
        if duplex:
            call = stub.FullDuplexCall()
            await call.write(m.StreamingOutputCallRequest(response_status=status))
            await call.done_writing()
            await call.read()
        else:
            await stub.UnaryCall(m.SimpleRequest(response_status=status))
    except grpc.aio.AioRpcError as error:
        return Outcome(error.code(), error.details())
    raise AssertionError("the server should have closed the call with the echoed status")


async def status_code_and_message(stub: m.TestServiceStub) -> list[Outcome]:
    outcomes = [await _echo_status(stub, "test status message", duplex) for duplex in (False, True)]
    assert outcomes == [Outcome(grpc.StatusCode.UNKNOWN, "test status message")] * 2
    return outcomes


async def special_status_message(stub: m.TestServiceStub) -> list[Outcome]:
    message = "\t\ntest with whitespace\r\nand Unicode BMP \u263a and non-BMP \U0001f608\t\n"
    outcome = await _echo_status(stub, message, duplex=False)
    assert outcome == Outcome(grpc.StatusCode.UNKNOWN, message)
    return [outcome]


async def unimplemented_method(stub: m.TestServiceStub) -> list[Outcome]:
    try:
        await stub.UnimplementedCall(m.Empty())
    except grpc.aio.AioRpcError as error:
        assert error.code() is grpc.StatusCode.UNIMPLEMENTED
        return [Outcome(error.code())]
    raise AssertionError("UnimplementedCall should fail")


async def unimplemented_service(stub: m.TestServiceStub) -> list[Outcome]:
    other = m.TestServiceStub(stub.channel, m.UNIMPLEMENTED_SERVICE)
    try:
        await other.UnimplementedCall(m.Empty())
    except grpc.aio.AioRpcError as error:
        assert error.code() is grpc.StatusCode.UNIMPLEMENTED
        return [Outcome(error.code())]
    raise AssertionError("UnimplementedService should fail")


Case = Callable[[m.TestServiceStub], Awaitable[list[Outcome]]]
SAME = "same as the client"


@dataclass(frozen=True)
class Spec:
    run: Case
    # what the server's policies record: the client's codes (SAME), none (no handler
    # runs), or the client's codes or none (the call may end before the handler runs)
    server: str = SAME


# the RPC may end before the server's handler runs (nothing recorded), else as the client
CANCELLED_IF_STARTED = "cancelled, if the handler ran"
# A bidi stream cut by the client (cancel, deadline) while its handler waits for the next
# request: grpc.aio ends the handler's request iterator as if the client had half-closed,
# and the cancellation arrives as a separate event; when it arrives after the handler has
# returned, the server records the handler's own OK (docs/grpc-compatibility.md, "What the
# server cannot know").  The server's record is then the client's status, or that OK.
CUT_WHILE_READING = "the client's status, or OK if grpc reported the cut as end of stream"

CASES = [
    Spec(empty_unary),
    Spec(large_unary),
    Spec(client_streaming),
    Spec(server_streaming),
    Spec(ping_pong),
    Spec(empty_stream),
    Spec(cancel_after_begin, CANCELLED_IF_STARTED),
    Spec(cancel_after_first_response, CUT_WHILE_READING),
    Spec(timeout_on_sleeping_server, CUT_WHILE_READING),
    Spec(custom_metadata),
    Spec(status_code_and_message),
    Spec(special_status_message),
    Spec(unimplemented_method, "none"),
    Spec(unimplemented_service, "none"),
]


# ------------------------------------------------------------- the two set-ups


@dataclass
class Observed:
    """Wraps a policy; records (side, policy, method, status) for every exit it runs."""

    inner: Any
    log: list[tuple[str, str, str, grpc.StatusCode]]
    sides: frozenset[Any] = field(default=BOTH_SIDES)

    def __post_init__(self) -> None:
        self.sides = getattr(self.inner, "sides", BOTH_SIDES)

    @property
    def name(self) -> str:
        return type(self.inner).__name__

    def channel_options(self) -> list[tuple[str, object]]:
        contribute = getattr(self.inner, "channel_options", None)
        return list(contribute()) if contribute is not None else []

    def bind(self, method: Method) -> Any:
        enter = self.inner.bind(method)
        if enter is None:
            return None
        log, name = self.log, self.name

        def observed(call: Call, exit_: Exit | None) -> Exit:
            def record(error: BaseException | None) -> None:
                log.append((call.side.value, name, method.name, code_of(error)))
                if exit_ is not None:
                    exit_(error)

            return record

        if asyncio.iscoroutinefunction(enter):

            async def aenter(call: Call) -> Exit:
                return observed(call, await enter(call))

            return aenter

        def wrapped(call: Call) -> Exit:
            return observed(call, enter(call))

        return wrapped


@dataclass
class Setup:
    stub: m.TestServiceStub
    log: list[tuple[str, str, str, grpc.StatusCode]] = field(default_factory=list)
    bulkheads: list[BulkheadPolicy] = field(default_factory=list)
    client: list[Observed] = field(default_factory=list)  # policies with exits, per side
    server: list[Observed] = field(default_factory=list)

    def codes(self, side: str, policy: str) -> list[grpc.StatusCode]:
        return [code for s, p, _, code in self.log if s == side and p == policy]

    def in_flight(self) -> int:
        return sum(
            b.in_flight
            for policy in self.bulkheads
            for table in (policy._by_target, policy._by_method)
            for b in table.values()
        )


@contextlib.asynccontextmanager
async def plain_grpc() -> AsyncIterator[Setup]:
    server = grpc.aio.server()
    register(TestService(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Setup(m.TestServiceStub(channel))
    finally:
        await channel.close()
        await server.stop(0)


@contextlib.asynccontextmanager
async def through_the_framework() -> AsyncIterator[Setup]:
    log: list[tuple[str, str, str, grpc.StatusCode]] = []
    exporter = InMemorySpanExporter()
    server_telemetry = Telemetry.build(
        TelemetryConfig(service_name="interop-server", metrics_exporter="none"),
        span_exporter=exporter,
    )
    client_telemetry = Telemetry.build(
        TelemetryConfig(service_name="interop-client", metrics_exporter="none"),
        span_exporter=exporter,
    )
    server_bulkhead = BulkheadPolicy(BulkheadConfig(max_concurrency=64))
    client_bulkhead = BulkheadPolicy(BulkheadConfig(max_concurrency=64))
    access = logging.getLogger("tests.interop.access")
    server_policies: list[Policy] = [
        *server_telemetry.policies(),
        AccessLogPolicy(access),
        RateLimitPolicy(RateLimitConfig(default=Limit(rate_per_s=1e6, burst=1_000_000))),
        server_bulkhead,
    ]
    client_policies: list[Policy] = [
        *client_telemetry.policies(),
        AccessLogPolicy(access),
        client_bulkhead,
        CircuitBreakerPolicy(),
        RetryPolicy(RetryConfig(services=[m.SERVICE])),
    ]
    server_observed = [Observed(p, log) for p in server_policies]
    client_observed = [Observed(p, log) for p in client_policies]
    server = Server(
        ServerConfig(name="interop", host="127.0.0.1", port=0, grace_s=1.0, insecure_dev=True),
        policies=server_observed,
    )
    server.add(TestService(), register)
    await server.start()
    channel = connect(server.address, policies=client_observed)
    setup = Setup(
        m.TestServiceStub(channel),
        log,
        [server_bulkhead, client_bulkhead],
        [o for o in client_observed if o.name != "RetryPolicy"],  # retries: service config
        server_observed,
    )
    try:
        yield setup
    finally:
        await channel.close()
        await server.stop(grace_s=0)
        server_telemetry.shutdown()
        client_telemetry.shutdown()


async def _until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(1000):  # bounded polling: the server's exits run after the client's
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting until {what}")


@pytest.mark.parametrize("spec", CASES, ids=[spec.run.__name__ for spec in CASES])
async def test_interop_case(spec: Spec) -> None:
    """The framework gives plain grpc.aio's outcome; every exit runs once with its status."""
    async with plain_grpc() as plain:
        expected = await spec.run(plain.stub)
    async with through_the_framework() as framework:
        got = await spec.run(framework.stub)
        assert got == expected
        codes = [outcome.code for outcome in expected]
        for policy in framework.client:
            assert framework.codes("client", policy.name) == codes, policy.name
        server_codes = [] if spec.server == "none" else codes
        if spec.server == SAME:
            await _until(
                lambda: all(
                    len(framework.codes("server", p.name)) >= len(codes) for p in framework.server
                ),
                "the server's exits ran",
            )
        else:  # the handler may not have run: wait until the server has no call in flight
            await _until(lambda: framework.in_flight() == 0, "every bulkhead is empty")
        for policy in framework.server:
            recorded = framework.codes("server", policy.name)
            if spec.server in (CANCELLED_IF_STARTED, CUT_WHILE_READING) and not recorded:
                continue  # the call ended before the server's handler ran
            if spec.server == CUT_WHILE_READING and recorded == [OK]:
                continue
            assert recorded == server_codes, policy.name
        await _until(lambda: framework.in_flight() == 0, "every bulkhead is empty")
