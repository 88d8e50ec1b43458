"""EventStoreService over real gRPC: Append, ReadStream, ReadAll and the error mapping."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from framework.errors import ConflictError, InvalidArgumentError, UnimplementedError
from framework.events.service import EventStoreServicer
from framework.testing import serve
from gen.events.v1 import envelope_pb2, store_pb2
from gen.events.v1.store_pb2_grpc import EventStoreServiceStub
from gen.events.v1.testing_pb2 import AccountOpened, AmountDeposited

OPENED = "events.v1.testing.AccountOpened"
DEPOSITED = "events.v1.testing.AmountDeposited"


def proposed(type_: str, payload: bytes, **meta: Any) -> store_pb2.ProposedEvent:
    return store_pb2.ProposedEvent(
        type=type_, payload=payload, metadata=envelope_pb2.EventMetadata(**meta)
    )


async def test_append_and_read_through_grpc(store: Any) -> None:
    """Append over gRPC returns positions; ReadStream/ReadAll return the envelopes."""
    async with serve(EventStoreServicer(store)) as t:
        stub = t.stub(EventStoreServiceStub)
        reply = await stub.Append(
            store_pb2.AppendRequest(
                stream_id="acc-1",
                aggregate_type="Account",
                expected_version=0,
                events=[
                    proposed(
                        OPENED,
                        AccountOpened(owner="ann").SerializeToString(),
                        correlation_id="corr-1",
                    ),
                    proposed(DEPOSITED, AmountDeposited(amount=7).SerializeToString()),
                ],
            )
        )
        assert reply.version == 2 and len(reply.positions) == 2
        stream = await stub.ReadStream(store_pb2.ReadStreamRequest(stream_id="acc-1"))
        assert [e.version for e in stream.events] == [1, 2]
        first = stream.events[0]
        assert first.type == OPENED and first.aggregate_type == "Account"
        assert first.metadata.correlation_id == "corr-1" and first.metadata.schema_version == 1
        assert first.recorded_at.seconds > 0 and len(first.event_id) == 36
        everything = await stub.ReadAll(store_pb2.ReadAllRequest(after_position=0, limit=1))
        assert len(everything.events) == 1 and everything.head_position == reply.positions[-1]


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        (store_pb2.AppendRequest(stream_id="", events=[proposed(DEPOSITED, b"")]), "stream_id"),
        (
            store_pb2.AppendRequest(
                stream_id="a", expected_version=-3, events=[proposed(DEPOSITED, b"")]
            ),
            "expected_version must be >= 0",
        ),
        (
            store_pb2.AppendRequest(stream_id="a", events=[proposed("x.v1.Nope", b"")]),
            "unknown event type 'x.v1.Nope'",
        ),
        (
            store_pb2.AppendRequest(
                stream_id="a",
                events=[proposed(DEPOSITED, b""), proposed(DEPOSITED, b"\x0a\xff\xff\xff")],
            ),
            "events\\[1\\]: payload of 4 bytes does not parse",
        ),
    ],
    ids=["empty-stream", "negative-version", "unknown-type", "bad-payload"],
)
async def test_bad_input_is_invalid_argument_over_grpc(
    store: Any, request_: store_pb2.AppendRequest, needle: str
) -> None:
    """Bad appends come back INVALID_ARGUMENT with a clear message; the store is unchanged."""
    async with serve(EventStoreServicer(store)) as t:
        stub = t.stub(EventStoreServiceStub)
        with pytest.raises(InvalidArgumentError, match=needle) as caught:
            await stub.Append(request_)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (await stub.ReadAll(store_pb2.ReadAllRequest())).head_position == 0
    assert await store.head_position() == 0


async def test_conflict_is_aborted_over_grpc(store: Any) -> None:
    """A stale expected version over gRPC is ABORTED (ConflictError) naming the versions."""
    async with serve(EventStoreServicer(store)) as t:
        stub = t.stub(EventStoreServiceStub)
        event = proposed(DEPOSITED, AmountDeposited(amount=1).SerializeToString())
        await stub.Append(
            store_pb2.AppendRequest(stream_id="a", expected_version=0, events=[event])
        )
        with pytest.raises(ConflictError) as caught:
            await stub.Append(
                store_pb2.AppendRequest(stream_id="a", expected_version=0, events=[event])
            )
        assert caught.value.code() == grpc.StatusCode.ABORTED
        assert caught.value.metadata["actual_version"] == "1"
    assert await store.stream_version("a") == 1


async def test_subscribe_without_bus_is_unimplemented(store: Any) -> None:
    """Subscribe on a servicer built without a bus answers UNIMPLEMENTED."""
    async with serve(EventStoreServicer(store)) as t:
        stub = t.stub(EventStoreServiceStub)
        # Nothing sent: the servicer refuses before reading, and a message sent meanwhile
        # can fail to go out, after which grpc.aio reports its own INTERNAL ("Internal error
        # from Core") instead of the server's status (seen under load).
        call = stub.Subscribe()
        with pytest.raises(UnimplementedError):
            async for _ in call:
                pass


async def test_negative_read_positions_are_invalid_over_grpc(store: Any) -> None:
    """ReadStream/ReadAll with negative positions come back INVALID_ARGUMENT."""
    async with serve(EventStoreServicer(store)) as t:
        stub = t.stub(EventStoreServiceStub)
        with pytest.raises(InvalidArgumentError, match="from_version must be >= 0"):
            await stub.ReadStream(store_pb2.ReadStreamRequest(stream_id="a", from_version=-2))
        with pytest.raises(InvalidArgumentError, match="after_position must be >= 0"):
            await stub.ReadAll(store_pb2.ReadAllRequest(after_position=-1))
