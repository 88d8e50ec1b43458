"""Attacks on the gRPC event store: forged appends, reading without a scope, group theft,
database error text sent to callers."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from framework.auth.policy import AuthPolicy, BearerToken
from framework.config import ServerConfig
from framework.errors import (
    InvalidArgumentError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
)
from framework.events.consumer_group import StoreBus, StoreBusConfig
from framework.events.consumer_grpc import RemoteSubscription
from framework.events.service import EventStoreServicer
from framework.events.sqlite import SqliteConfig, SqliteEventStore
from framework.events.store import NewEvent
from framework.testing import TestServer, serve
from gen.events.v1 import store_pb2
from gen.events.v1.store_pb2_grpc import EventStoreServiceStub
from gen.events.v1.testing_pb2 import AccountOpened
from tests.events.account import account_types
from tests.security.kit import Issuer

SECURE = ServerConfig(name="events", host="127.0.0.1", port=0, grace_s=0)
OPENED = AccountOpened.DESCRIPTOR.full_name


def _append_request(stream: str = "acc-1", aggregate_type: str = "Account") -> Any:
    return store_pb2.AppendRequest(
        stream_id=stream,
        aggregate_type=aggregate_type,
        events=[
            store_pb2.ProposedEvent(
                type=OPENED, payload=AccountOpened(owner="eve").SerializeToString()
            )
        ],
    )


@pytest.fixture
def issuer() -> Issuer:
    """The identity provider the event store trusts."""
    return Issuer()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteEventStore]:
    """The served event store (SQLite, this test's file)."""
    s = await SqliteEventStore.open(
        SqliteConfig(path=str(tmp_path / "events.db"), synchronous="NORMAL"), account_types()
    )
    yield s
    await s.close()


@pytest.fixture
async def served(store: SqliteEventStore, issuer: Issuer) -> AsyncIterator[TestServer]:
    """The store and its bus behind AuthPolicy."""
    bus = StoreBus(store, StoreBusConfig(poll_interval_s=0.05))
    async with serve(
        EventStoreServicer(store, bus=bus), policies=[AuthPolicy(issuer.verifier())], config=SECURE
    ) as t:
        yield t
    await bus.close()


def _stub(t: TestServer, issuer: Issuer, scopes: list[str], **claims: Any) -> Any:
    token = issuer.token("svc", scopes, **claims) if scopes or claims else None
    channel = t.connect(policies=[BearerToken(token)]) if token else t.channel
    return EventStoreServiceStub(channel)


async def test_forged_append_without_the_append_scope_stores_nothing(
    served: TestServer, store: SqliteEventStore, issuer: Issuer
) -> None:
    """Anonymous: UNAUTHENTICATED; a reader's token: PERMISSION_DENIED; nothing is appended."""
    with pytest.raises(UnauthenticatedError):
        await _stub(served, issuer, []).Append(_append_request())
    with pytest.raises(PermissionDeniedError) as caught:
        await _stub(served, issuer, ["events:read", "events:subscribe"]).Append(_append_request())
    assert "events:append" in caught.value.message
    assert await store.head_position() == 0
    reply = await _stub(served, issuer, ["events:append"]).Append(_append_request())
    assert list(reply.positions) == [1]


async def test_reading_every_stream_needs_the_read_scope(
    served: TestServer, store: SqliteEventStore, issuer: Issuer
) -> None:
    """ReadAll and ReadStream without events:read are refused; the events stay unread."""
    await store.append("acc-1", [NewEvent.of(AccountOpened(owner="ann"))], 0)
    writer = _stub(served, issuer, ["events:append"])
    with pytest.raises(PermissionDeniedError):
        await writer.ReadAll(store_pb2.ReadAllRequest())
    with pytest.raises(PermissionDeniedError):
        await writer.ReadStream(store_pb2.ReadStreamRequest(stream_id="acc-1"))
    reader = _stub(served, issuer, ["events:read"])
    assert len((await reader.ReadAll(store_pb2.ReadAllRequest())).events) == 1


async def test_joining_another_consumer_group_is_refused(
    served: TestServer, store: SqliteEventStore, issuer: Issuer
) -> None:
    """A subscriber granted its own groups cannot join "billing" and take its deliveries;
    the billing member then receives the event."""
    await store.append("acc-1", [NewEvent.of(AccountOpened(owner="ann"))], 0)
    token = issuer.token("analytics", ["events:subscribe"], groups=["analytics", "analytics-*"])
    refused = await _refusal(served.connect(policies=[BearerToken(token)]), "billing")
    assert refused.reason == "GROUP_NOT_GRANTED"
    owner_token = issuer.token("billing", ["events:subscribe"])  # own subject: its group
    owner = await RemoteSubscription.open(
        served.connect(policies=[BearerToken(owner_token)]), "billing"
    )
    deliveries = []
    for _ in range(60):  # bounded
        deliveries += await owner.fetch(timeout_s=1.0)
        if deliveries:
            break
    assert [d.envelope.position for d in deliveries] == [1]
    await deliveries[0].ack()
    await owner.close()


async def _refusal(channel: Any, group: str) -> PermissionDeniedError:
    """How joining `group` is refused: at open or at the first fetch, whichever the
    timing gives (UNAVAILABLE means "try again", and is retried, bounded)."""
    for _ in range(20):
        try:
            sub = await RemoteSubscription.open(channel, group)
        except PermissionDeniedError as refused:
            return refused
        except UnavailableError:
            continue
        try:
            for _ in range(60):  # bounded: the refusal ends the stream
                await sub.fetch(timeout_s=1.0)
        except PermissionDeniedError as refused:
            return refused
        except UnavailableError:
            continue
        finally:
            await sub.close()
        raise AssertionError("the subscription was never refused")
    raise AssertionError("the server stayed unavailable")


async def test_subscribe_without_the_scope_is_refused(served: TestServer, issuer: Issuer) -> None:
    """A token with events:read but not events:subscribe cannot open a subscription."""
    token = issuer.token("billing", ["events:read"])
    refused = await _refusal(served.connect(policies=[BearerToken(token)]), "billing")
    assert refused.reason == "SCOPE_MISSING"


async def test_a_refusal_is_typed_whenever_it_arrives(served: TestServer, issuer: Issuer) -> None:
    """The server refuses the stream before reading its first message; when that refusal
    beats the client's first write, open() raises it with its reason (SCOPE_MISSING), not
    a bare PERMISSION_DENIED or UNAVAILABLE. Repeated: the timing decides which side wins."""
    token = issuer.token("billing", ["events:read"])
    channel = served.connect(policies=[BearerToken(token)])
    reasons = {(await _refusal(channel, "billing")).reason for _ in range(300)}
    assert reasons == {"SCOPE_MISSING"}


@pytest.mark.postgres
async def test_postgresql_error_text_does_not_reach_the_caller(
    postgres_dsn: str, issuer: Issuer
) -> None:
    """An append PostgreSQL refuses (a NUL character) is INVALID_ARGUMENT with a message of
    ours, not the database's; nothing is stored."""
    from framework.events.postgres import PostgresConfig, PostgresEventStore

    schema = f"sec_{uuid.uuid4().hex[:12]}"
    store = await PostgresEventStore.open(
        PostgresConfig(dsn=postgres_dsn, schema=schema), account_types()
    )
    try:
        auth = AuthPolicy(issuer.verifier())
        async with serve(EventStoreServicer(store), policies=[auth], config=SECURE) as t:
            writer = _stub(t, issuer, ["events:append"])
            with pytest.raises(InvalidArgumentError) as caught:
                await writer.Append(_append_request(aggregate_type="Account\x00"))
        message = caught.value.message
        assert "UTF8" not in message and "0x00" not in message and "encoding" not in message
        assert "nothing was stored" in message
        assert await store.head_position() == 0
    finally:
        await store.close()
        import asyncpg

        conn = await asyncpg.connect(postgres_dsn)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()
