"""Fuzzing the example system (hypothesis): random and mutated protobuf bytes, oversized
messages, odd metadata and malformed JWTs to every public RPC of every service, random
JSON to every gateway route.  Every call must end with a status (never INTERNAL or
UNKNOWN, which mean a handler crashed; a unary call never hangs to its deadline), every
server keeps serving, and the stores' invariants still hold afterwards.

Bounded for the default suite (`FUZZ_EXAMPLES`, default 60 per property); `make fuzz`
runs it longer.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from framework.chaos.fuzz import json_values, malformed_jwts, odd_metadata, payloads
from framework.chaos.invariants import check_invariants
from services.chaos.invariants import PaymentBalances, StockBalances
from tests.chaos.shop import Shop, ShopThread

pytest.importorskip("framework.gateway", reason="the gateway is not in this checkout")
httpx = pytest.importorskip("httpx")

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("FUZZ_RANDOM") != "1",
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
CRASHES = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
CALL_TIMEOUT_S = 10.0
OVERSIZED = 5 * 1024 * 1024
# methods any caller may use (no token needed): health, the health report, sign-up, log-in
PUBLIC = (
    "/grpc.health.v1.Health/",
    "/framework.v1.HealthReportService/",
    "/user.v1.UserService/RegisterUser",
    "/user.v1.UserService/LogIn",
)  # above grpc's default 4 MiB receive limit


@dataclass(frozen=True)
class Rpc:
    server: str
    address: str
    path: str
    input: Any  # the request's message descriptor
    client_streaming: bool
    server_streaming: bool


def _rpcs(shop: Shop) -> list[Rpc]:
    """Every method of every service each server of the shop serves."""
    pool = descriptor_pool.Default()
    found = []
    for name, server in shop.servers.items():
        for service in server.services:
            if service.startswith("grpc.reflection"):
                continue
            descriptor = pool.FindServiceByName(service)
            for method in descriptor.methods:
                found.append(
                    Rpc(
                        name,
                        server.address,
                        f"/{service}/{method.name}",
                        method.input_type,
                        method.client_streaming,
                        method.server_streaming,
                    )
                )
    return found


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    """The example system in-process (SQLite), shared by this module's fuzzers."""
    runner = ShopThread(tmp_path_factory.mktemp("fuzz-shop"))
    try:
        yield runner.start()
    finally:
        runner.stop()


@pytest.fixture(scope="module")
def rpcs(shop: Shop) -> list[Rpc]:
    return _rpcs(shop)


@pytest.fixture(scope="module")
def channels(shop: Shop) -> Iterator[dict[str, grpc.Channel]]:
    opened = {
        server.address: grpc.insecure_channel(server.address) for server in shop.servers.values()
    }
    try:
        yield opened
    finally:
        for channel in opened.values():
            channel.close()


def _call(
    channel: grpc.Channel, rpc: Rpc, payload: bytes, metadata: list[tuple[str, Any]]
) -> Outcome:
    """Send `payload` as the request (each message, for a stream); the status it ended with."""
    try:
        if rpc.client_streaming and rpc.server_streaming:
            replies = channel.stream_stream(rpc.path)(
                iter([payload, payload]), metadata=metadata, timeout=3
            )
            for _ in zip(range(3), replies, strict=False):
                pass
            replies.cancel()
        elif rpc.client_streaming:
            channel.stream_unary(rpc.path)(
                iter([payload]), metadata=metadata, timeout=CALL_TIMEOUT_S
            )
        elif rpc.server_streaming:
            replies = channel.unary_stream(rpc.path)(payload, metadata=metadata, timeout=3)
            for _ in zip(range(3), replies, strict=False):
                pass
            replies.cancel()
        else:
            channel.unary_unary(rpc.path)(payload, metadata=metadata, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as error:
        return Outcome(error.code(), error.details() or "")
    return Outcome(grpc.StatusCode.OK, "")


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    details: str

    @property
    def undecodable(self) -> bool:
        """grpc's own deserializer refused the bytes before any handler ran (UNKNOWN on main
        until the core's malformed-bytes work, #12 item 9, answers INVALID_ARGUMENT)."""
        return self.code is grpc.StatusCode.UNKNOWN and "DecodeError" in self.details


def _judge(rpc: Rpc, outcome: Outcome, what: str) -> None:
    code = outcome.code
    if not outcome.undecodable:
        assert code not in CRASHES, f"{rpc.path} crashed on {what}: {code.name} {outcome.details}"
    streaming = rpc.server_streaming or rpc.client_streaming
    if not streaming:
        assert code is not grpc.StatusCode.DEADLINE_EXCEEDED, f"{rpc.path} hung on {what}"


def _auth(token: str) -> list[tuple[str, Any]]:
    return [("authorization", f"Bearer {token}"), ("idempotency-key", str(uuid.uuid4()))]


@st.composite
def _rpc_and_payload(draw: Any, rpcs: list[Rpc]) -> tuple[Rpc, bytes]:
    rpc = draw(st.sampled_from(rpcs))
    return rpc, draw(payloads(rpc.input))


def test_every_rpc_answers_empty_garbage_and_oversized_requests(
    shop: Shop, rpcs: list[Rpc], channels: dict[str, grpc.Channel]
) -> None:
    """Each public RPC, authenticated: empty, garbage and 5 MiB requests get a status, no crash."""
    assert len(rpcs) > 40, [r.path for r in rpcs]
    metadata = _auth(shop.operator_token)
    problems: list[str] = []
    for rpc in rpcs:
        channel = channels[rpc.address]
        for what, payload in (
            ("empty", b""),
            ("garbage", b"\xff\xfe\x00garbage"),
            ("overlong varint", b"\x0a" + b"\xff" * 11),
        ):
            try:
                _judge(rpc, _call(channel, rpc, payload, metadata), what)
            except AssertionError as error:
                problems.append(str(error))
        code = _call(channel, rpc, b"\x00" * OVERSIZED, metadata).code
        if code is not grpc.StatusCode.RESOURCE_EXHAUSTED:
            problems.append(f"{rpc.path} oversized: {code.name}")
    assert not problems, "\n".join(problems)


def test_random_and_mutated_messages_never_crash_a_handler(
    shop: Shop, rpcs: list[Rpc], channels: dict[str, grpc.Channel]
) -> None:
    """Authenticated calls with random, valid-shaped and mutated protobuf bytes: always a status."""
    token = shop.operator_token

    @FUZZ
    @given(_rpc_and_payload(rpcs))
    def fuzz(drawn: tuple[Rpc, bytes]) -> None:
        rpc, payload = drawn
        _judge(
            rpc,
            _call(channels[rpc.address], rpc, payload, _auth(token)),
            f"payload {payload[:40]!r}",
        )

    fuzz()


def test_odd_metadata_and_malformed_tokens_are_refused_cleanly(
    shop: Shop, rpcs: list[Rpc], channels: dict[str, grpc.Channel]
) -> None:
    """Malformed JWTs are UNAUTHENTICATED on every scoped RPC; odd metadata never crashes one."""
    token = shop.operator_token

    @FUZZ
    @given(st.sampled_from(rpcs), malformed_jwts(), odd_metadata(), st.booleans())
    def fuzz(rpc: Rpc, jwt: str, extra: list[tuple[str, Any]], with_valid_token: bool) -> None:
        auth = f"Bearer {token}" if with_valid_token else jwt
        metadata = [("authorization", auth), *extra]
        outcome = _call(channels[rpc.address], rpc, b"", metadata)
        _judge(rpc, outcome, f"metadata {metadata!r}")
        code = outcome.code
        public = rpc.path.startswith(PUBLIC)
        if not with_valid_token and not public and rpc.server != "registry":
            size = sum(len(k) + len(v) for k, v in metadata)
            allowed = {grpc.StatusCode.UNAUTHENTICATED}
            if size > 4000:  # grpc refuses headers past its limit before any handler
                allowed.add(grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert code in allowed, f"{rpc.path} with {jwt!r}: {code.name}"

    fuzz()


def _routes(shop: Shop) -> list[tuple[str, str]]:
    document = httpx.get(f"{shop.gateway_url}/openapi.json", timeout=30).json()
    return [
        (method.upper(), path)
        for path, operations in document["paths"].items()
        for method in operations
        if method in ("get", "post", "put", "patch", "delete")
    ]


def test_random_json_to_every_gateway_route_gets_an_http_status(shop: Shop) -> None:
    """Random JSON bodies and path values on every route: a 2xx/4xx answer, never a 5xx."""
    routes = _routes(shop)
    assert len(routes) > 15, routes
    headers = {"Authorization": f"Bearer {shop.operator_token}"}
    segment = st.one_of(
        st.uuids().map(str), st.text(alphabet="abcXYZ019-_.~%", min_size=1, max_size=20)
    )
    with httpx.Client(base_url=shop.gateway_url, timeout=30) as client:

        @FUZZ
        @given(st.sampled_from(routes), json_values(), segment, st.booleans(), st.booleans())
        def fuzz(route: tuple[str, str], body: Any, value: str, authed: bool, keyed: bool) -> None:
            method, template = route
            path = template
            while "{" in path:
                start = path.index("{")
                path = path[:start] + value + path[path.index("}", start) + 1 :]
            sent = dict(headers) if authed else {}
            if keyed:
                sent["Idempotency-Key"] = str(uuid.uuid4())
            reply = client.request(
                method, path, json=body if method != "GET" else None, headers=sent
            )
            assert reply.status_code < 500, (
                f"{method} {path} {body!r}: {reply.status_code} {reply.text[:300]}"
            )

        fuzz()
        assert client.get("/readyz").status_code == 200


def test_after_fuzzing_every_server_serves_and_the_state_is_valid(
    shop: Shop, rpcs: list[Rpc], channels: dict[str, grpc.Channel]
) -> None:
    """Every server still answers health SERVING, a real order flows, the balances add up."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for server in shop.servers.values():
        reply = health_pb2_grpc.HealthStub(channels[server.address]).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with httpx.Client(base_url=shop.gateway_url, timeout=30) as client:
        email = f"f-{uuid.uuid4().hex[:8]}@example.com"
        key = {"Idempotency-Key": str(uuid.uuid4())}
        user = client.post(
            "/v1/users",
            json={"email": email, "displayName": "Fuzzer", "password": "fuzz pass 1"},
            headers=key,
        )
        assert user.status_code == 200, user.text
        login = client.post(
            "/v1/users:login", json={"email": email, "password": "fuzz pass 1"}
        ).json()
        auth = {"Authorization": f"Bearer {login['accessToken']}"}
        user_id = user.json()["user"]["userId"]
        order = client.post(
            "/v1/orders", json={"userId": user_id, "currency": "EUR"}, headers={**auth, **key}
        )
        order_id = order.json()["order"]["orderId"]
        line = {"sku": "WIDGET-1", "quantity": 1, "unitPriceMinor": "500"}
        added = client.post(
            f"/v1/orders/{order_id}/items",
            json=line,
            headers={**auth, "Idempotency-Key": str(uuid.uuid4())},
        )
        assert added.status_code == 200, added.text
        confirmed = client.post(
            f"/v1/orders/{order_id}:confirm",
            json={},
            headers={**auth, "Idempotency-Key": str(uuid.uuid4())},
        )
        assert confirmed.status_code == 200, confirmed.text
        assert confirmed.json()["order"]["status"] == "ORDER_STATUS_CONFIRMED"
    results, _ = shop.run(
        check_invariants([StockBalances(), PaymentBalances()], shop.view(), settle_timeout_s=30)
    )
    assert all(r.held for r in results), results
    assert all(r.checked > 0 for r in results), results
