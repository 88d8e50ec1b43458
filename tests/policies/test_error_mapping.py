"""Typed errors cross the wire: status code, reason, message and details."""

from __future__ import annotations

import logging

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2, status_pb2

from framework import errors
from framework.testing import serve
from framework.testing.echo import EchoServicer
from gen.echo.v1 import echo_pb2, echo_pb2_grpc

TYPED = [
    (errors.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFoundError, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (errors.ConflictError, grpc.StatusCode.ABORTED),
    (errors.FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.OutOfRangeError, grpc.StatusCode.OUT_OF_RANGE),
    (errors.UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (errors.ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.RateLimitedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.BulkheadFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (errors.CircuitOpenError, grpc.StatusCode.UNAVAILABLE),
    (errors.DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.UnimplementedError, grpc.StatusCode.UNIMPLEMENTED),
    (errors.InternalError, grpc.StatusCode.INTERNAL),
    (errors.DataLossError, grpc.StatusCode.DATA_LOSS),
]


@pytest.mark.parametrize(("cls", "code"), TYPED, ids=[c.__name__ for c, _ in TYPED])
async def test_each_typed_error_maps_to_its_status_and_comes_back_typed(
    cls: type[errors.FrameworkError], code: grpc.StatusCode
) -> None:
    """The client rebuilds the very class the servicer raised, with its message."""
    async with serve(EchoServicer()) as t:
        stub = t.stub(echo_pb2_grpc.EchoServiceStub)
        with pytest.raises(cls) as caught:
            await stub.Fail(echo_pb2.FailRequest(error=cls.__name__, message="do X then retry"))
    assert type(caught.value) is cls
    assert caught.value.code() == code
    assert caught.value.reason == cls.default_reason
    assert caught.value.message == "do X then retry"
    assert isinstance(caught.value.__cause__, grpc.aio.AioRpcError)


async def test_a_plain_grpc_client_sees_the_status_and_error_info() -> None:
    """Foreign clients get the standard status and google.rpc.ErrorInfo details."""
    async with serve(EchoServicer()) as t, grpc.aio.insecure_channel(t.target) as channel:
        stub = echo_pb2_grpc.EchoServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Fail(echo_pb2.FailRequest(error="ConflictError", message="stale version"))
    assert caught.value.code() == grpc.StatusCode.ABORTED
    assert caught.value.details() == "stale version"
    raw = dict(caught.value.trailing_metadata())[errors.DETAILS_KEY]
    status = status_pb2.Status.FromString(raw)
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.reason == "CONFLICT"


async def test_unexpected_exceptions_become_internal_without_leaking_and_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """INTERNAL with a generic message; the traceback goes to the server log."""
    caplog.set_level(logging.ERROR, logger="framework.policies.error_mapping")
    async with serve(EchoServicer()) as t:
        with pytest.raises(errors.InternalError) as caught:
            await t.stub(echo_pb2_grpc.EchoServiceStub).Fail(
                echo_pb2.FailRequest(error="unexpected", message="password=hunter2")
            )
    assert "hunter2" not in caught.value.message and "RuntimeError" not in caught.value.message
    assert caught.value.message == errors.INTERNAL_MESSAGE
    logged = [r for r in caplog.records if r.name == "framework.policies.error_mapping"]
    assert logged and "hunter2" in (logged[0].exc_text or "")
    assert "/echo.v1.EchoService/Fail" in logged[0].getMessage()


def test_field_violations_and_retry_hints_survive_the_round_trip() -> None:
    """BadRequest and RetryInfo details are packed and unpacked faithfully."""
    bad = errors.InvalidArgumentError(
        "2 fields are invalid",
        violations=[
            errors.FieldViolation("email", "must be an email address", "email"),
            errors.FieldViolation("items[0].quantity", "must be > 0", "gt"),
        ],
    )
    status = errors.to_status(bad)
    back = errors.from_status(status.code, status.message, status.trailing_metadata)
    assert isinstance(back, errors.InvalidArgumentError)
    assert back.violations == bad.violations

    limited = errors.RateLimitedError("slow down", retry_after_s=1.5)
    status = errors.to_status(limited)
    assert ("retry-after", "1.500") in status.trailing_metadata
    back = errors.from_status(status.code, status.message, status.trailing_metadata)
    assert isinstance(back, errors.RateLimitedError) and back.retry_after_s == 1.5


def test_a_foreign_status_without_details_maps_by_code() -> None:
    """Statuses from servers that send no ErrorInfo map to the general class for the code."""
    error = errors.from_status(grpc.StatusCode.NOT_FOUND, "no such user", None)
    assert type(error) is errors.NotFoundError
    unknown = errors.from_status(grpc.StatusCode.UNKNOWN, "?", None)
    assert isinstance(unknown, errors.FrameworkError)
    assert unknown.code() == grpc.StatusCode.UNKNOWN


async def test_unimplemented_methods_answer_unimplemented() -> None:
    """A servicer that leaves a method to the generated base gets UNIMPLEMENTED."""

    class Partial(echo_pb2_grpc.EchoServiceServicer):
        pass

    async with serve(Partial()) as t:
        with pytest.raises(errors.UnimplementedError):
            await t.stub(echo_pb2_grpc.EchoServiceStub).Echo(echo_pb2.EchoRequest(text="x"))


async def test_bad_input_to_the_test_service_names_the_field() -> None:
    """An InvalidArgumentError raised by a servicer arrives with its field violations."""
    async with serve(EchoServicer()) as t:
        with pytest.raises(errors.InvalidArgumentError) as caught:
            await t.stub(echo_pb2_grpc.EchoServiceStub).Fail(echo_pb2.FailRequest(error="Nope"))
    assert [v.field for v in caught.value.violations] == ["error"]
    assert "Nope" in caught.value.message


async def test_unknown_reasons_never_rebuild_the_class_table_and_new_classes_are_found() -> None:
    """An answer with a reason no class has costs a lookup, not a walk of the class tree;
    an error class defined later (a service's own) is still rebuilt typed across a hop."""
    unknown = errors.error_class("NO_SUCH_REASON", grpc.StatusCode.INTERNAL)
    table = errors._classes_by_reason()
    for _ in range(100):
        assert errors.error_class("NO_SUCH_REASON", grpc.StatusCode.INTERNAL) is unknown
    assert errors._classes_by_reason() is table  # the same table: never rebuilt

    class StockShortError(errors.FailedPreconditionError):
        default_reason = "STOCK_SHORT"

    class Short(echo_pb2_grpc.EchoServiceServicer):
        async def Echo(self, request: echo_pb2.EchoRequest, context: object) -> object:
            raise StockShortError("only 2 left; order fewer")

    async with serve(Short()) as t:
        with pytest.raises(StockShortError, match="only 2 left"):
            await t.stub(echo_pb2_grpc.EchoServiceStub).Echo(echo_pb2.EchoRequest())
