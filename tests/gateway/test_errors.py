"""Errors over HTTP: the standard status mapping with google.rpc.Status bodies; bad input."""

from __future__ import annotations

import pytest

from framework.policies.ratelimit import Limit, RateLimitConfig, RateLimitPolicy
from tests.gateway.conftest import Harness, bearer, harness

BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"
ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"

# (framework error raised by the backend, HTTP status, gRPC code number)
MAPPING = [
    ("InvalidArgumentError", 400, 3),
    ("FailedPreconditionError", 400, 9),
    ("OutOfRangeError", 400, 11),
    ("UnauthenticatedError", 401, 16),
    ("PermissionDeniedError", 403, 7),
    ("NotFoundError", 404, 5),
    ("AlreadyExistsError", 409, 6),
    ("ConflictError", 409, 10),
    ("ResourceExhaustedError", 429, 8),
    ("CallCancelledError", 499, 1),
    ("InternalError", 500, 13),
    ("DataLossError", 500, 15),
    ("UnimplementedError", 501, 12),
    ("UnavailableError", 503, 14),
    ("DeadlineExceededError", 504, 4),
]


def _info(body: dict[str, object]) -> dict[str, object]:
    details = body["details"]
    assert isinstance(details, list)
    return next(d for d in details if d["@type"] == ERROR_INFO)


@pytest.mark.parametrize(("error", "http", "code"), MAPPING)
async def test_backend_errors_map_to_http(gw: Harness, error: str, http: int, code: int) -> None:
    """Each gRPC status the backend answers becomes its HTTP status and a Status body."""
    reply = await gw.client.post("/v1/echo:fail", json={"error": error, "message": "said so"})
    assert reply.status_code == http
    body = reply.json()
    assert (body["code"], body["message"]) == (code, "said so")
    assert _info(body)["domain"] == "framework"


async def test_unexpected_backend_error_is_internal_without_details(gw: Harness) -> None:
    """A servicer crash answers 500 with the generic message, never the internal detail."""
    reply = await gw.client.post("/v1/echo:fail", json={"error": "unexpected"})
    assert reply.status_code == 500
    assert "secret" not in reply.text
    assert reply.json()["code"] == 13


async def test_backend_validation_violations_are_readable(gw: Harness) -> None:
    """INVALID_ARGUMENT from validation keeps the BadRequest field violations as JSON."""
    reply = await gw.client.post("/v1/echo", json={"text": "x" * 1001}, headers=bearer("echo:read"))
    assert reply.status_code == 400
    bad = next(d for d in reply.json()["details"] if d["@type"] == BAD_REQUEST)
    assert bad["fieldViolations"][0]["field"] == "text"
    assert "1000" in bad["fieldViolations"][0]["description"]


async def test_malformed_json_names_the_problem(gw: Harness) -> None:
    """A body that is not JSON is 400 saying where it broke; nothing reaches the backend."""
    reply = await gw.client.post(
        "/v1/echo",
        content=b'{"text": "x",}',
        headers={**bearer("echo:read"), "content-type": "application/json"},
    )
    assert reply.status_code == 400
    body = reply.json()
    assert body["code"] == 3
    assert "not valid JSON" in body["message"] and "line 1 column" in body["message"]
    assert gw.echo.calls.get("Echo", 0) == 0


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"txt": "x"}, 'no field named "txt"'),
        ({"text": 5}, "text"),
        ({"repeat": "many"}, "repeat"),
        ([1, 2], "expected a JSON object"),
    ],
)
async def test_json_that_does_not_fit_the_message(gw: Harness, body: object, words: str) -> None:
    """Unknown fields, wrong types and non-objects are 400 naming the field."""
    reply = await gw.client.post("/v1/echo", json=body, headers=bearer("echo:read"))
    assert reply.status_code == 400, reply.text
    assert words in reply.json()["message"]


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("pageSize=ten", "page_size"),
        ("availableOnly=maybe", "expected true or false"),
        ("colour=red", "unknown query parameter 'colour'"),
        ("genre=GENRE_POETRY", "genre"),
        ("filter.published_after=yesterday", "published_after"),
    ],
)
async def test_bad_query_parameters(gw: Harness, query: str, words: str) -> None:
    """A query value that does not fit its field, or an unknown parameter, is 400."""
    reply = await gw.client.get(f"/v1/shelves/s1/books?{query}")
    assert reply.status_code == 400, reply.text
    assert words in reply.json()["message"]


async def test_unknown_route_is_404(gw: Harness) -> None:
    """No binding for the path: 404 with a Status body (NOT_FOUND, ROUTE_NOT_FOUND)."""
    reply = await gw.client.get("/v1/nothing/here")
    assert reply.status_code == 404
    assert reply.json()["code"] == 5
    assert _info(reply.json())["reason"] == "ROUTE_NOT_FOUND"


async def test_wrong_method_is_405_with_allow(gw: Harness) -> None:
    """A path bound only to other methods: 405 and the Allow header lists them."""
    reply = await gw.client.put("/v1/shelves/s1/books/b1", json={})
    assert reply.status_code == 405
    assert reply.headers["allow"] == "DELETE, GET, PATCH"


async def test_oversized_body_is_413_before_the_backend() -> None:
    """A body over max_body_bytes is 413, declared (Content-Length) or streamed (chunked)."""
    async with harness(max_body_bytes=1024) as gw:
        big = b'{"text": "' + b"x" * 2000 + b'"}'
        declared = await gw.client.post(
            "/v1/echo",
            content=big,
            headers={**bearer("echo:read"), "content-type": "application/json"},
        )

        async def chunks() -> object:
            for _ in range(4):
                yield b"x" * 400

        streamed = await gw.client.post("/v1/echo", content=chunks(), headers=bearer("echo:read"))
        assert declared.status_code == streamed.status_code == 413
        assert _info(declared.json())["reason"] == "BODY_TOO_LARGE"
        assert gw.echo.calls.get("Echo", 0) == 0


async def test_grpc_timeout_header_sets_the_deadline(gw: Harness) -> None:
    """grpc-timeout bounds the backend call: a slower handler answers 504, and the
    handler sees the header's deadline rather than the contract's 10 s."""
    headers = {**bearer("echo:read"), "grpc-timeout": "100m"}
    slow = await gw.client.post("/v1/echo", json={"text": "x", "delayS": 60}, headers=headers)
    assert slow.status_code == 504
    assert slow.json()["code"] == 4
    headers = {**bearer("echo:read"), "grpc-timeout": "4S"}
    fast = await gw.client.post("/v1/echo", json={"text": "x"}, headers=headers)
    assert fast.status_code == 200
    # The remaining time cannot exceed 4 s (plus grpc's rounding of the timeout up to its
    # wire unit, well under 1 s), whatever the load; the contract's 10 s would.
    assert 0 < fast.json()["deadlineRemainingS"] < 5


async def test_contract_timeout_is_the_default_deadline(gw: Harness) -> None:
    """Without grpc-timeout the contract's timeout_s (10 s for Echo) is the deadline."""
    reply = await gw.client.post("/v1/echo", json={"text": "x"}, headers=bearer("echo:read"))
    assert reply.status_code == 200
    assert 0 < reply.json()["deadlineRemainingS"] <= 10


async def test_malformed_grpc_timeout_is_400(gw: Harness) -> None:
    """A grpc-timeout that is not digits and a unit is refused before any call."""
    reply = await gw.client.post(
        "/v1/echo", json={}, headers={**bearer("echo:read"), "grpc-timeout": "soon"}
    )
    assert reply.status_code == 400
    assert "grpc-timeout" in reply.json()["message"]


async def test_backend_rate_limit_is_429_with_retry_after() -> None:
    """RESOURCE_EXHAUSTED with RetryInfo from the backend: 429 and Retry-After in seconds."""
    limited = RateLimitPolicy(RateLimitConfig(per_method={"*/Echo": Limit(0.5, 1)}))
    async with harness(backend_policies=[limited]) as gw:
        headers = bearer("echo:read")
        first = await gw.client.post("/v1/echo", json={}, headers=headers)
        second = await gw.client.post("/v1/echo", json={}, headers=headers)
        assert first.status_code == 200
        assert second.status_code == 429
        assert second.headers["retry-after"] in ("1", "2")
        retry = next(
            d for d in second.json()["details"] if d["@type"].endswith("google.rpc.RetryInfo")
        )
        assert retry["retryDelay"].endswith("s")
