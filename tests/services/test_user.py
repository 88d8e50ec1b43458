"""The identity service through real gRPC with its real chain, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from framework.auth.policy import BearerToken
from framework.client import connect
from framework.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from framework.system.runtime import ServiceRuntime
from gen.user.v1 import user_pb2 as pb
from gen.user.v1.user_pb2_grpc import UserServiceStub
from services.user.main import UserConfig, UserService, build
from services.user.passwords import Argon2Config
from tests.services.kit import Backend, Keys, runtime_config

CHEAP_ARGON2 = Argon2Config(time_cost=1, memory_cost_kib=1024, parallelism=1)


def _key() -> tuple[tuple[str, str]]:
    return (("idempotency-key", str(uuid.uuid4())),)


def _register(email: str, password: str = "correct horse") -> pb.RegisterUserRequest:
    return pb.RegisterUserRequest(email=email, display_name="Ada", password=password)


@pytest.fixture
async def service(keys: Keys, backend: Backend) -> AsyncIterator[UserService]:
    config = UserConfig(
        runtime_config("user", keys, backend),
        signing_key_path=str(keys.files.user_signing),
        argon2=CHEAP_ARGON2,
    )
    built = await build(config)
    await built.server.start()
    try:
        yield built
    finally:
        await built.server.stop(0)


@pytest.fixture
async def stub(service: UserService) -> AsyncIterator[UserServiceStub]:
    channel = connect(service.server.address)
    try:
        yield UserServiceStub(channel)
    finally:
        await channel.close()


def _as(service: UserService, token: str) -> UserServiceStub:
    return UserServiceStub(connect(service.server.address, policies=[BearerToken(token)]))


async def test_register_then_log_in_gives_a_token_the_system_accepts(
    service: UserService, stub: UserServiceStub, keys: Keys, tmp_path: Path
) -> None:
    """A registered user logs in; the token verifies with the system's keys and reads them."""
    user = (await stub.RegisterUser(_register("Ada@Example.com"), metadata=_key())).user
    assert user.email == "ada@example.com" and not user.HasField("deactivated_at")
    logged = await stub.LogIn(pb.LogInRequest(email="ADA@example.com", password="correct horse"))
    assert logged.token_type == "Bearer" and "orders:write" in logged.scopes
    verifier = ServiceRuntime(runtime_config("other", keys)).verifier()
    principal = verifier.verify(logged.access_token)
    assert principal.subject == user.user_id
    me = await _as(service, logged.access_token).GetUser(pb.GetUserRequest(user_id=user.user_id))
    assert me.user == user


async def test_a_customer_reads_and_changes_only_their_own_user(
    service: UserService, stub: UserServiceStub, keys: Keys
) -> None:
    """Another customer's user is PERMISSION_DENIED (NOT_YOUR_USER); users:admin may."""
    ada = (await stub.RegisterUser(_register("ada@example.com"), metadata=_key())).user
    bob = (await stub.RegisterUser(_register("bob@example.com"), metadata=_key())).user
    as_bob = _as(service, keys.customer(bob.user_id, ["users:read", "users:write"]))
    with pytest.raises(PermissionDeniedError) as denied:
        await as_bob.GetUser(pb.GetUserRequest(user_id=ada.user_id))
    assert denied.value.reason == "NOT_YOUR_USER"
    with pytest.raises(PermissionDeniedError):
        await as_bob.UpdateProfile(pb.UpdateProfileRequest(user_id=ada.user_id, display_name="Xy"))
    admin = _as(service, keys.token("service:order", ["users:read", "users:admin"]))
    assert (await admin.GetUser(pb.GetUserRequest(user_id=ada.user_id))).user == ada


async def test_anonymous_and_unscoped_callers_are_refused(
    service: UserService, stub: UserServiceStub, keys: Keys
) -> None:
    """No token: UNAUTHENTICATED; a token without users:read: PERMISSION_DENIED."""
    ada = (await stub.RegisterUser(_register("ada@example.com"), metadata=_key())).user
    with pytest.raises(UnauthenticatedError):
        await stub.GetUser(pb.GetUserRequest(user_id=ada.user_id))
    narrow = _as(service, keys.customer(ada.user_id, ["orders:read"]))
    with pytest.raises(PermissionDeniedError) as denied:
        await narrow.GetUser(pb.GetUserRequest(user_id=ada.user_id))
    assert denied.value.reason == "SCOPE_MISSING"


async def test_registration_is_idempotent_by_key_and_emails_are_unique(
    stub: UserServiceStub,
) -> None:
    """Same key: the same user; same email with a new key: EMAIL_TAKEN; key reused: refused."""
    key = _key()
    first = (await stub.RegisterUser(_register("ada@example.com"), metadata=key)).user
    again = (await stub.RegisterUser(_register("ada@example.com"), metadata=key)).user
    assert again == first
    with pytest.raises(AlreadyExistsError) as taken:
        await stub.RegisterUser(_register("ADA@example.com"), metadata=_key())
    assert taken.value.reason == "EMAIL_TAKEN"
    with pytest.raises(AlreadyExistsError) as reused:
        await stub.RegisterUser(_register("bob@example.com"), metadata=key)
    assert reused.value.reason == "IDEMPOTENCY_KEY_REUSED"
    with pytest.raises(InvalidArgumentError):
        await stub.RegisterUser(_register("carol@example.com"))  # no idempotency key


async def test_concurrent_registrations_of_one_email_create_one_user(
    stub: UserServiceStub,
) -> None:
    """Ten racing registrations of one email (different keys): one user, nine EMAIL_TAKEN."""
    results = await asyncio.gather(
        *(stub.RegisterUser(_register("race@example.com"), metadata=_key()) for _ in range(10)),
        return_exceptions=True,
    )
    created = [r for r in results if isinstance(r, pb.RegisterUserResponse)]
    refused = [r for r in results if isinstance(r, AlreadyExistsError)]
    assert len(created) == 1 and len(refused) == 9
    assert {r.reason for r in refused} == {"EMAIL_TAKEN"}


async def test_wrong_password_and_unknown_email_look_the_same(stub: UserServiceStub) -> None:
    """Both are UNAUTHENTICATED BAD_CREDENTIALS with one message (no account enumeration)."""
    await stub.RegisterUser(_register("ada@example.com"), metadata=_key())
    errors = []
    for email, password in (("ada@example.com", "wrong pass"), ("nobody@example.com", "x" * 9)):
        with pytest.raises(UnauthenticatedError) as refused:
            await stub.LogIn(pb.LogInRequest(email=email, password=password))
        errors.append((refused.value.reason, refused.value.message))
    assert errors[0] == errors[1] and errors[0][0] == "BAD_CREDENTIALS"


async def test_deactivated_users_cannot_log_in_or_change_their_profile(
    service: UserService, stub: UserServiceStub, keys: Keys
) -> None:
    """Deactivate (twice is a no-op): log-in refused, profile changes FAILED_PRECONDITION."""
    ada = (await stub.RegisterUser(_register("ada@example.com"), metadata=_key())).user
    as_ada = _as(service, keys.customer(ada.user_id, ["users:read", "users:write"]))
    renamed = await as_ada.UpdateProfile(
        pb.UpdateProfileRequest(user_id=ada.user_id, display_name="Ada Lovelace")
    )
    assert renamed.user.display_name == "Ada Lovelace"
    gone = await as_ada.DeactivateUser(pb.DeactivateUserRequest(user_id=ada.user_id, reason="bye"))
    assert gone.user.HasField("deactivated_at")
    again = await as_ada.DeactivateUser(pb.DeactivateUserRequest(user_id=ada.user_id))
    assert again.user.deactivated_at == gone.user.deactivated_at
    with pytest.raises(UnauthenticatedError):
        await stub.LogIn(pb.LogInRequest(email="ada@example.com", password="correct horse"))
    with pytest.raises(FailedPreconditionError) as refused:
        await as_ada.UpdateProfile(pb.UpdateProfileRequest(user_id=ada.user_id, display_name="X Y"))
    assert refused.value.reason == "USER_DEACTIVATED"


async def test_users_survive_a_restart(keys: Keys, backend: Backend) -> None:
    """A user registered before a restart logs in after it (the data is in the database)."""
    config = UserConfig(
        runtime_config("user", keys, backend),
        signing_key_path=str(keys.files.user_signing),
        argon2=CHEAP_ARGON2,
    )
    for attempt in range(2):
        built = await build(config)
        await built.server.start()
        channel = connect(built.server.address)
        try:
            stub = UserServiceStub(channel)
            if attempt == 0:
                await stub.RegisterUser(_register("ada@example.com"), metadata=_key())
            else:
                logged = await stub.LogIn(
                    pb.LogInRequest(email="ada@example.com", password="correct horse")
                )
                assert logged.user.email == "ada@example.com"
        finally:
            await channel.close()
            await built.server.stop(0)
