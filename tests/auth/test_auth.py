"""JWT authentication and authorization: verifier, cache, key rotation, policy through gRPC."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from framework.auth.keyset import JwksFile, KeySet, PemFiles, StaticKeys, VerificationKey
from framework.auth.policy import (
    AuthPolicy,
    BearerToken,
    IssuedToken,
    JwtConfig,
    JwtVerifier,
    Principal,
    current_principal,
)
from framework.clock import ManualClock
from framework.errors import PermissionDeniedError, UnauthenticatedError
from framework.policy import Call, Method, Side
from framework.testing import serve
from gen.echo.v1 import echo_pb2, echo_pb2_grpc

ISSUER = "https://id.test"
AUDIENCE = "echo"
HS_SECRET = secrets.token_bytes(32)
OTHER_SECRET = secrets.token_bytes(32)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _claims(now: float | None = None, **overrides: Any) -> dict[str, Any]:
    now = time.time() if now is None else now
    claims: dict[str, Any] = {
        "sub": "alice",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": int(now),
        "exp": int(now) + 300,
        "scope": "echo:read profile",
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _hs(claims: dict[str, Any], kid: str = "hs1", secret: bytes = HS_SECRET) -> str:
    return jwt.encode(claims, secret, algorithm="HS256", headers={"kid": kid})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forged_hs(claims: dict[str, Any], kid: str, secret: bytes) -> str:
    """An HS256 token built by hand (pyjwt refuses PEM secrets): the confusion attack."""
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    payload = _b64(json.dumps(claims).encode())
    signing_input = f"{header}.{payload}".encode()
    signature = hmac.new(secret, signing_input, hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64(signature)}"


def _static_keys(rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> StaticKeys:
    return StaticKeys(
        [
            VerificationKey.hmac("hs1", HS_SECRET),
            VerificationKey.public("rs1", _pem(rsa_key)),
            VerificationKey.public("es1", _pem(ec_key)),
        ]
    )


def _verifier(
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
    clock: ManualClock | None = None,
    **config: Any,
) -> JwtVerifier:
    keys = KeySet(_static_keys(rsa_key, ec_key), clock=clock)
    return JwtVerifier(keys, JwtConfig(issuer=ISSUER, audience=AUDIENCE, **config), clock=clock)


def _reason(error: pytest.ExceptionInfo[Any]) -> str:
    return str(error.value.reason)


# ------------------------------------------------------------ verifier units


def test_verifier_accepts_hs_rs_and_es_tokens(rsa_key: Any, ec_key: Any) -> None:
    """Each supported algorithm verifies with the key its kid names."""
    verifier = _verifier(rsa_key, ec_key)
    rs = jwt.encode(_claims(), rsa_key, algorithm="RS256", headers={"kid": "rs1"})
    es = jwt.encode(_claims(), ec_key, algorithm="ES256", headers={"kid": "es1"})
    for token in (_hs(_claims()), rs, es):
        principal = verifier.verify(token)
        assert principal.subject == "alice"
        assert principal.scopes == {"echo:read", "profile"}


def test_cache_serves_repeated_tokens_without_reverifying(rsa_key: Any, ec_key: Any) -> None:
    """A repeated token is verified once; later hits come from the cache."""
    verifier = _verifier(rsa_key, ec_key)
    token = _hs(_claims())
    first = verifier.verify(token)
    for _ in range(5):
        assert verifier.verify(token) is first
    assert verifier.misses == 1


def test_cached_token_expires_with_the_clock(rsa_key: Any, ec_key: Any) -> None:
    """A cached token stops being accepted once exp (+ leeway) passes on the clock."""
    clock = ManualClock()
    now = clock.now().timestamp()
    verifier = _verifier(rsa_key, ec_key, clock=clock, leeway_s=5)
    token = _hs(_claims(now=now, exp=int(now) + 60))
    verifier.verify(token)
    clock.advance(64)
    assert verifier.verify(token).subject == "alice"  # inside the leeway
    clock.advance(2)
    with pytest.raises(UnauthenticatedError) as error:
        verifier.verify(token)
    assert _reason(error) == "TOKEN_EXPIRED"
    assert "expired" in error.value.message


def test_cache_is_bounded(rsa_key: Any, ec_key: Any) -> None:
    """The cache never holds more than cache_size tokens (least recently used go first)."""
    verifier = _verifier(rsa_key, ec_key, cache_size=2)
    tokens = [_hs(_claims(sub=f"user{i}")) for i in range(3)]
    for token in tokens:
        verifier.verify(token)
    verifier.verify(tokens[0])  # evicted: verified again
    assert verifier.misses == 4


def _write_jwks(path: Path, keys: dict[str, bytes]) -> None:
    document = {
        "keys": [
            {"kty": "oct", "kid": kid, "alg": "HS256", "k": _b64(secret)}
            for kid, secret in keys.items()
        ]
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(document))
    tmp.replace(path)


def test_key_removed_from_jwks_invalidates_cached_tokens(tmp_path: Path) -> None:
    """A key-set change drops cached verdicts: a token of a retired key is refused."""
    path = tmp_path / "jwks.json"
    _write_jwks(path, {"old": HS_SECRET})
    verifier = JwtVerifier(KeySet(JwksFile(path)), JwtConfig(issuer=ISSUER, audience=AUDIENCE))
    token = _hs(_claims(), kid="old")
    verifier.verify(token)
    _write_jwks(path, {"new": OTHER_SECRET})
    assert verifier.reload() is True
    with pytest.raises(UnauthenticatedError) as error:
        verifier.verify(token)
    assert _reason(error) == "TOKEN_UNKNOWN_KEY"
    assert verifier.verify(_hs(_claims(), kid="new", secret=OTHER_SECRET)).subject == "alice"


async def test_watcher_picks_up_rotated_jwks(tmp_path: Path) -> None:
    """With the verifier started, a replaced JWKS file is loaded on the next check."""
    clock = ManualClock()
    path = tmp_path / "jwks.json"
    _write_jwks(path, {"k1": HS_SECRET})
    keys = KeySet(JwksFile(path), check_interval_s=10, clock=clock)
    verifier = JwtVerifier(keys, JwtConfig(issuer=None, audience=None), clock=clock)
    await verifier.start()
    try:
        _write_jwks(path, {"k1": HS_SECRET, "k2": OTHER_SECRET})
        await asyncio.sleep(0)
        clock.advance(10)
        for _ in range(100):
            if keys.version == 2:
                break
            await asyncio.sleep(0)
        assert keys.kids == ("k1", "k2")
        now = clock.now().timestamp()
        token = _hs(_claims(now=now), kid="k2", secret=OTHER_SECRET)
        assert verifier.verify(token).subject == "alice"
    finally:
        await verifier.close()


def test_unknown_kid_triggers_a_rate_limited_reload(tmp_path: Path) -> None:
    """An unknown kid re-reads the key source, at most once per check interval."""
    clock = ManualClock()
    path = tmp_path / "jwks.json"
    _write_jwks(path, {"k1": HS_SECRET})
    keys = KeySet(JwksFile(path), check_interval_s=30, clock=clock)
    verifier = JwtVerifier(keys, JwtConfig(issuer=None, audience=None), clock=clock)
    _write_jwks(path, {"k2": OTHER_SECRET})
    token = _hs(_claims(now=clock.now().timestamp()), kid="k2", secret=OTHER_SECRET)
    with pytest.raises(UnauthenticatedError):
        verifier.verify(token)  # not due yet: no file read on this path
    clock.advance(30)
    assert verifier.verify(token).subject == "alice"


def test_pem_files_pin_the_algorithm_from_the_key_type(
    tmp_path: Path, rsa_key: Any, ec_key: Any
) -> None:
    """PEM keys get RS256/ES256 from their type, and a certificate file works too."""
    (tmp_path / "rs.pem").write_bytes(_pem(rsa_key))
    (tmp_path / "es.pem").write_bytes(_pem(ec_key))
    keys = KeySet(PemFiles({"rs": str(tmp_path / "rs.pem"), "es": str(tmp_path / "es.pem")}))
    rs, es = keys.get("rs"), keys.get("es")
    assert rs is not None and rs.algorithm == "RS256"
    assert es is not None and es.algorithm == "ES256"


def test_jwks_public_keys_are_pinned_by_type(tmp_path: Path, rsa_key: Any, ec_key: Any) -> None:
    """JWKs without 'alg' get RS256/ES256 from their key type; private members are dropped."""
    rs_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key))  # a private JWK
    es_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key()))
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [{**rs_jwk, "kid": "rs"}, {**es_jwk, "kid": "es"}]}))
    keys = KeySet(JwksFile(path))
    rs, es = keys.get("rs"), keys.get("es")
    assert rs is not None and rs.algorithm == "RS256" and isinstance(rs.key, rsa.RSAPublicKey)
    assert es is not None and es.algorithm == "ES256"
    verifier = JwtVerifier(keys, JwtConfig(issuer=ISSUER, audience=AUDIENCE))
    token = jwt.encode(_claims(), ec_key, algorithm="ES256", headers={"kid": "es"})
    assert verifier.verify(token).subject == "alice"
    with pytest.raises(UnauthenticatedError) as error:  # an RS256 token under the EC kid
        verifier.verify(jwt.encode(_claims(), rsa_key, algorithm="RS256", headers={"kid": "es"}))
    assert _reason(error) == "TOKEN_ALGORITHM_REJECTED"


def test_hmac_keys_refuse_pem_material_and_short_secrets(rsa_key: Any) -> None:
    """An asymmetric key can never become an HMAC secret, and short secrets are refused."""
    with pytest.raises(ValueError, match="algorithm confusion"):
        VerificationKey.hmac("bad", _pem(rsa_key))
    with pytest.raises(ValueError, match="at least 32"):
        VerificationKey.hmac("short", b"secret")


def test_token_without_exp_is_refused(rsa_key: Any, ec_key: Any) -> None:
    """Tokens must expire unless the config says otherwise."""
    verifier = _verifier(rsa_key, ec_key)
    with pytest.raises(UnauthenticatedError) as error:
        verifier.verify(_hs(_claims(exp=None)))
    assert "exp" in error.value.message


# ------------------------------------------------------------ through gRPC


class PrincipalEcho(echo_pb2_grpc.EchoServiceServicer):
    """Answers with what the servicer sees of the caller."""

    async def Echo(self, request: echo_pb2.EchoRequest, context: Any) -> echo_pb2.EchoResponse:
        principal = current_principal()
        if principal is None:
            return echo_pb2.EchoResponse(text="anonymous")
        scopes = ",".join(sorted(principal.scopes))
        return echo_pb2.EchoResponse(text=f"{principal.subject}|{scopes}|{principal.identity}")

    async def EchoStream(self, request: echo_pb2.EchoRequest, context: Any) -> AsyncIterator[Any]:
        principal = current_principal()
        yield echo_pb2.EchoResponse(text=principal.subject if principal else "anonymous")

    async def Fail(self, request: echo_pb2.FailRequest, context: Any) -> echo_pb2.FailResponse:
        if current_principal() is not None:
            raise PermissionDeniedError("expected no principal on a public call")
        return echo_pb2.FailResponse()


@pytest.fixture
async def server(rsa_key: Any, ec_key: Any) -> AsyncIterator[Any]:
    verifier = _verifier(rsa_key, ec_key)
    async with serve(PrincipalEcho(), policies=[AuthPolicy(verifier)]) as t:
        yield t


async def _echo(t: Any, token: str | None = None, header: str | None = None) -> str:
    stub = echo_pb2_grpc.EchoServiceStub(t.channel)
    metadata = []
    if token is not None:
        metadata.append(("authorization", f"Bearer {token}"))
    if header is not None:
        metadata.append(("authorization", header))
    reply = await stub.Echo(echo_pb2.EchoRequest(text="x"), metadata=metadata)
    return str(reply.text)


async def test_valid_token_reaches_servicer_with_principal(server: Any) -> None:
    """The servicer sees the verified subject and scopes through current_principal()."""
    assert await _echo(server, _hs(_claims())) == "alice|echo:read,profile|None"


def _attacks(rsa_key: Any, ec_key: Any) -> dict[str, tuple[str | None, str | None, str]]:
    now = time.time()
    return {
        "no token": (None, None, "TOKEN_MISSING"),
        "malformed header": (None, "Basic YWxpY2U6c2VjcmV0", "TOKEN_MALFORMED"),
        "not a jwt": ("abc.def", None, "TOKEN_MALFORMED"),
        "bad signature": (_hs(_claims(), secret=OTHER_SECRET), None, "TOKEN_BAD_SIGNATURE"),
        "alg none": (
            jwt.encode(_claims(), None, algorithm="none", headers={"kid": "hs1"}),
            None,
            "TOKEN_ALGORITHM_REJECTED",
        ),
        "hs/rs confusion": (
            _forged_hs(_claims(), "rs1", _pem(rsa_key)),
            None,
            "TOKEN_ALGORITHM_REJECTED",
        ),
        "expired": (_hs(_claims(exp=int(now) - 120)), None, "TOKEN_EXPIRED"),
        "not yet valid": (_hs(_claims(nbf=int(now) + 120)), None, "TOKEN_NOT_YET_VALID"),
        "wrong iss": (_hs(_claims(iss="https://evil.test")), None, "TOKEN_WRONG_ISSUER"),
        "wrong aud": (_hs(_claims(aud="other")), None, "TOKEN_WRONG_AUDIENCE"),
        "unknown kid": (_hs(_claims(), kid="nope"), None, "TOKEN_UNKNOWN_KEY"),
        "crit header": (
            jwt.encode(
                _claims(), HS_SECRET, algorithm="HS256", headers={"kid": "hs1", "crit": ["x"]}
            ),
            None,
            "TOKEN_MALFORMED",
        ),
    }


async def test_attack_set_is_refused_unauthenticated(
    server: Any, rsa_key: Any, ec_key: Any
) -> None:
    """Each attack gets UNAUTHENTICATED with its own reason, and the token is never echoed."""
    for name, (token, header, reason) in _attacks(rsa_key, ec_key).items():
        with pytest.raises(UnauthenticatedError) as error:
            await _echo(server, token, header)
        assert (name, _reason(error)) == (name, reason)
        assert error.value.code() is grpc.StatusCode.UNAUTHENTICATED
        if token and token.split(".")[-1]:
            assert token.split(".")[-1] not in error.value.message  # never the signature


async def test_messages_say_what_is_wrong(server: Any) -> None:
    """Rejections name the problem: expiry, audience, unknown kid."""
    now = time.time()
    cases = {
        _hs(_claims(exp=int(now) - 120)): "expired",
        _hs(_claims(aud="other")): "audience",
        _hs(_claims(), kid="k9"): "'k9' is not in the trusted key set",
    }
    for token, words in cases.items():
        with pytest.raises(UnauthenticatedError) as error:
            await _echo(server, token)
        assert words in error.value.message


async def test_missing_scope_is_permission_denied(server: Any) -> None:
    """A valid token without the method's scope gets PERMISSION_DENIED naming the scope."""
    with pytest.raises(PermissionDeniedError) as error:
        await _echo(server, _hs(_claims(scope="profile")))
    assert _reason(error) == "SCOPE_MISSING"
    assert "echo:read" in error.value.message


async def test_default_required_and_public_methods(server: Any) -> None:
    """Unset auth_required means required; auth_required=false is public; health is open."""
    stub = echo_pb2_grpc.EchoServiceStub(server.channel)
    with pytest.raises(UnauthenticatedError):
        async for _ in stub.EchoStream(echo_pb2.EchoRequest(text="x")):
            pass
    token = _hs(_claims(scope=""))
    replies = [
        r.text
        async for r in stub.EchoStream(
            echo_pb2.EchoRequest(text="x"), metadata=[("authorization", f"Bearer {token}")]
        )
    ]
    assert replies == ["alice"]
    await stub.Fail(echo_pb2.FailRequest())  # public: no token, no principal
    health = health_pb2_grpc.HealthStub(server.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_rotated_key_accepted_after_reload(tmp_path: Path) -> None:
    """A token signed with a newly published key is accepted once the key set reloads."""
    path = tmp_path / "jwks.json"
    _write_jwks(path, {"k1": HS_SECRET})
    verifier = JwtVerifier(KeySet(JwksFile(path)), JwtConfig(issuer=ISSUER, audience=AUDIENCE))
    async with serve(PrincipalEcho(), policies=[AuthPolicy(verifier)]) as t:
        new_token = _hs(_claims(), kid="k2", secret=OTHER_SECRET)
        with pytest.raises(UnauthenticatedError):
            await _echo(t, new_token)
        _write_jwks(path, {"k1": HS_SECRET, "k2": OTHER_SECRET})
        verifier.reload()
        assert (await _echo(t, new_token)).startswith("alice|")


async def test_server_started_watcher_rotates_keys_without_reload_call(tmp_path: Path) -> None:
    """The server starts the key watcher: a replaced JWKS is served after one check interval."""
    clock = ManualClock()
    path = tmp_path / "jwks.json"
    _write_jwks(path, {"k1": HS_SECRET})
    keys = KeySet(JwksFile(path), check_interval_s=5, clock=clock)
    verifier = JwtVerifier(keys, JwtConfig(issuer=None, audience=None), clock=clock)
    now = clock.now().timestamp()
    token = _hs(_claims(now=now, exp=int(now) + 600), kid="k2", secret=OTHER_SECRET)
    async with serve(PrincipalEcho(), policies=[AuthPolicy(verifier)]) as t:
        _write_jwks(path, {"k2": OTHER_SECRET})
        clock.advance(5)
        for _ in range(100):  # bounded: the watcher runs on the next loop turns
            if keys.version == 2:
                break
            await asyncio.sleep(0)
        assert keys.version == 2  # reloaded by the watcher, before any call asked
        assert (await _echo(t, token)).startswith("alice|")


async def test_bearer_token_policy_attaches_static_token(rsa_key: Any, ec_key: Any) -> None:
    """The client policy sends the token; the principal reaches the servicer."""
    token = jwt.encode(_claims(sub="bob"), ec_key, algorithm="ES256", headers={"kid": "es1"})
    async with serve(
        PrincipalEcho(),
        policies=[AuthPolicy(_verifier(rsa_key, ec_key))],
        client_policies=[BearerToken(token)],
    ) as t:
        assert (await _echo(t)).startswith("bob|")


async def test_provider_token_through_grpc_refreshes_after_rejection(
    rsa_key: Any, ec_key: Any
) -> None:
    """A provider's token is attached; an UNAUTHENTICATED answer fetches a new one for later."""
    issued = iter([_hs(_claims(), secret=OTHER_SECRET), _hs(_claims(sub="dave"))])

    async def provider() -> IssuedToken:
        return IssuedToken(next(issued))

    bearer = BearerToken(provider=provider)
    async with serve(
        PrincipalEcho(),
        policies=[AuthPolicy(_verifier(rsa_key, ec_key))],
        client_policies=[bearer],
    ) as t:
        with pytest.raises(UnauthenticatedError) as error:
            await _echo(t)
        assert _reason(error) == "TOKEN_BAD_SIGNATURE"
        rejected = bearer.current
        for _ in range(100):  # bounded: the background refresh lands within a few loop turns
            if bearer.current is not rejected:
                break
            await asyncio.sleep(0)
        assert (await _echo(t)).startswith("dave|")
        assert bearer.fetches == 2
    await bearer.close()


# ------------------------------------------------------------ client provider

_METHOD = Method.resolve("/echo.v1.EchoService/Echo")


async def _attach(policy: BearerToken) -> str | bytes | None:
    call = Call(_METHOD, Side.CLIENT)
    enter = policy.bind(_METHOD)
    assert enter is not None
    result = enter(call)
    if asyncio.iscoroutine(result):
        await result
    return call.header("authorization")


async def test_provider_token_refreshes_in_background_before_expiry() -> None:
    """Calls keep the valid token while a refresh runs; the next calls get the new one."""
    clock = ManualClock()
    gate = asyncio.Event()
    issued = iter(["t1", "t2"])

    async def provider() -> IssuedToken:
        token = next(issued)
        if token == "t2":
            await gate.wait()
        return IssuedToken(token, clock.now() + timedelta(seconds=300))

    policy = BearerToken(provider=provider, refresh_before_s=60, clock=clock)
    assert await _attach(policy) == "Bearer t1"  # first call waits: no token yet
    clock.advance(250)  # inside the refresh window
    assert await _attach(policy) == "Bearer t1"  # not blocked by the pending refresh
    assert await _attach(policy) == "Bearer t1"
    assert policy.fetches == 2  # one background refresh, shared
    gate.set()
    for _ in range(100):
        if await _attach(policy) == "Bearer t2":
            break
        await asyncio.sleep(0)
    assert await _attach(policy) == "Bearer t2"
    await policy.close()


async def test_provider_failure_without_valid_token_is_unauthenticated() -> None:
    """Without a valid token a provider failure fails the call, then fails fast until retry."""

    async def provider() -> IssuedToken:
        raise OSError("identity provider unreachable")

    clock = ManualClock()
    policy = BearerToken(provider=provider, retry_after_s=5, clock=clock)
    with pytest.raises(UnauthenticatedError) as error:
        await _attach(policy)
    assert _reason(error) == "TOKEN_UNAVAILABLE"
    assert repr(policy) == "BearerToken(provider)"
    with pytest.raises(UnauthenticatedError, match=r"next attempt in 5\.0 s"):
        await _attach(policy)  # fails fast: the provider is not asked again yet
    assert policy.fetches == 1
    clock.advance(5)
    with pytest.raises(UnauthenticatedError):
        await _attach(policy)
    assert policy.fetches == 2


async def test_rejections_refresh_at_most_once_per_retry_interval() -> None:
    """A server rejecting every token gets one provider fetch per retry interval, not per call."""
    clock = ManualClock()
    counter = iter(range(1000))

    async def provider() -> IssuedToken:
        return IssuedToken(f"t{next(counter)}")

    policy = BearerToken(provider=provider, retry_after_s=5, clock=clock)
    rejected = UnauthenticatedError("nope", reason="TOKEN_BAD_SIGNATURE")
    for _ in range(10):
        call = Call(_METHOD, Side.CLIENT)
        exit_ = await policy._enter_provided(call)
        assert exit_ is not None
        exit_(rejected)
        await asyncio.sleep(0)
    assert policy.fetches == 2  # the first token, and one refresh after the first rejection
    clock.advance(5)
    exit_ = await policy._enter_provided(Call(_METHOD, Side.CLIENT))
    assert exit_ is not None
    exit_(rejected)
    assert policy.fetches == 3
    await policy.close()


def test_code_overrides_add_scopes_and_public_methods(rsa_key: Any, ec_key: Any) -> None:
    """Rules from code add scopes to the contract's and can make a method public."""
    policy = AuthPolicy(
        _verifier(rsa_key, ec_key),
        public_methods=["*/EchoStream"],
        method_scopes={"echo.v1.EchoService/Echo": ["admin"]},
    )
    echo = policy.rule(Method.resolve("/echo.v1.EchoService/Echo"))
    stream = policy.rule(Method.resolve("/echo.v1.EchoService/EchoStream"))
    assert echo is not None and echo.scopes == {"echo:read", "admin"} and echo.required
    assert stream is not None and not stream.required
    assert policy.rule(Method.resolve("/grpc.health.v1.Health/Check")) is None
    assert policy.rule(Method.resolve("/grpc.reflection.v1alpha.ServerReflection/X")) is None


def test_principal_is_none_outside_calls() -> None:
    """Outside a call there is no principal."""
    assert current_principal() is None
    assert Principal("x").has_token is False
