"""Forged numeric claims and token types, through real gRPC: UNAUTHENTICATED, never served."""

from __future__ import annotations

import time

import pytest

from framework.auth.policy import AuthPolicy, BearerToken
from framework.config import ServerConfig
from framework.errors import UnauthenticatedError
from framework.testing import serve
from framework.testing.echo import EchoServicer
from gen.echo.v1.echo_pb2 import EchoRequest
from gen.echo.v1.echo_pb2_grpc import EchoServiceStub
from tests.security.kit import AUDIENCE, ISSUER, Issuer

SECURE = ServerConfig(name="secure", host="127.0.0.1", port=0, grace_s=0)


def _claims(**times: str) -> str:
    """A claims object as JSON text, with the time claims spelled exactly as given."""
    now = int(time.time())
    fields = {
        "sub": '"eve"',
        "iss": f'"{ISSUER}"',
        "aud": f'"{AUDIENCE}"',
        "scope": '"echo:read"',
        "exp": str(now + 300),
        **times,
    }
    return "{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}"


@pytest.mark.parametrize(
    "times",
    [
        {"exp": "NaN"},
        {"exp": "Infinity"},
        {"exp": "-Infinity"},
        {"exp": "1e400"},
        {"exp": "1e20"},
        {"exp": "-5"},
        {"exp": "true"},
        {"exp": '"2999-01-01"'},
        {"nbf": "1e20"},
        {"nbf": "NaN"},
        {"nbf": "10" + "0" * 400},
        {"iat": "Infinity"},
    ],
    ids=lambda t: "-".join(f"{k}={v[:12]}" for k, v in t.items()),
)
async def test_non_finite_or_overflowing_time_claims_are_unauthenticated(
    times: dict[str, str],
) -> None:
    """exp/nbf/iat of NaN, Infinity, 1e400 or 1e20 are UNAUTHENTICATED (not INTERNAL, not
    a token that never expires), and the handler never runs."""
    issuer = Issuer()
    token = issuer.raw({}, _claims(**times))
    servicer = EchoServicer()
    async with serve(servicer, policies=[AuthPolicy(issuer.verifier())], config=SECURE) as t:
        channel = t.connect(policies=[BearerToken(token)])
        with pytest.raises(UnauthenticatedError) as caught:
            await EchoServiceStub(channel).Echo(EchoRequest(text="x"))
    assert caught.value.reason == "TOKEN_MALFORMED"
    assert servicer.calls == {}


async def test_a_sane_raw_token_is_accepted() -> None:
    """The same hand-built token with ordinary numbers is served (the attack cases above
    fail for their numbers, not for how they were built)."""
    issuer = Issuer()
    now = int(time.time())
    token = issuer.raw({}, _claims(nbf=str(now - 5), iat=f"{now}.25"))
    async with serve(EchoServicer(), policies=[AuthPolicy(issuer.verifier())], config=SECURE) as t:
        channel = t.connect(policies=[BearerToken(token)])
        assert (await EchoServiceStub(channel).Echo(EchoRequest(text="ok"))).text == "ok"


@pytest.mark.parametrize("typ", [None, "JWT", "id_token+jwt", "logout+jwt"])
async def test_wrong_token_type_is_refused_when_the_issuer_marks_access_tokens(
    typ: str | None,
) -> None:
    """With token_type="at+jwt", an ID token or an untyped JWT is UNAUTHENTICATED."""
    issuer = Issuer()
    headers = {} if typ is None else {"typ": typ}
    token = issuer.token("eve", ["echo:read"], headers=headers)
    servicer = EchoServicer()
    auth = AuthPolicy(issuer.verifier(token_type="at+jwt"))
    async with serve(servicer, policies=[auth], config=SECURE) as t:
        channel = t.connect(policies=[BearerToken(token)])
        with pytest.raises(UnauthenticatedError) as caught:
            await EchoServiceStub(channel).Echo(EchoRequest(text="x"))
    assert caught.value.reason == "TOKEN_WRONG_TYPE"
    assert servicer.calls == {}


@pytest.mark.parametrize("typ", ["at+jwt", "application/AT+JWT"])
async def test_access_token_type_is_accepted(typ: str) -> None:
    """typ 'at+jwt' (any case, with or without 'application/') passes the type check."""
    issuer = Issuer()
    token = issuer.token("ann", ["echo:read"], headers={"typ": typ})
    auth = AuthPolicy(issuer.verifier(token_type="at+jwt"))
    async with serve(EchoServicer(), policies=[auth], config=SECURE) as t:
        channel = t.connect(policies=[BearerToken(token)])
        assert (await EchoServiceStub(channel).Echo(EchoRequest(text="ok"))).text == "ok"
