"""Validation rules from the contracts, enforced by ValidationPolicy through real gRPC."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message

from framework.errors import FieldViolation, InvalidArgumentError
from framework.policies.validation import ValidationPolicy, Validators
from framework.testing import TestServer, serve
from gen.inventory.v1 import inventory_pb2 as inv
from gen.inventory.v1 import inventory_pb2_grpc as inv_grpc
from gen.notification.v1 import notification_pb2 as note
from gen.notification.v1 import notification_pb2_grpc as note_grpc
from gen.order.v1 import order_pb2 as order
from gen.order.v1 import order_pb2_grpc as order_grpc
from gen.payment.v1 import payment_pb2 as pay
from gen.payment.v1 import payment_pb2_grpc as pay_grpc
from gen.user.v1 import user_pb2 as user
from gen.user.v1 import user_pb2_grpc as user_grpc

ID = str(uuid.uuid4())
ID2 = str(uuid.uuid4())
SERVICERS = (
    user_grpc.UserServiceServicer,
    order_grpc.OrderServiceServicer,
    inv_grpc.InventoryServiceServicer,
    pay_grpc.PaymentServiceServicer,
    note_grpc.NotificationServiceServicer,
)
STUBS: dict[str, Callable[[grpc.aio.Channel], Any]] = {
    "user.v1.UserService": user_grpc.UserServiceStub,
    "order.v1.OrderService": order_grpc.OrderServiceStub,
    "inventory.v1.InventoryService": inv_grpc.InventoryServiceStub,
    "payment.v1.PaymentService": pay_grpc.PaymentServiceStub,
    "notification.v1.NotificationService": note_grpc.NotificationServiceStub,
}


def _answering(base: type) -> object:
    """A servicer of `base` whose every method answers an empty response."""
    service = base.__name__.removesuffix("Servicer")
    descriptor = next(
        s
        for f in (user, order, inv, pay, note)
        for s in f.DESCRIPTOR.services_by_name.values()
        if s.name == service
    )
    handlers: dict[str, Any] = {}
    for method in descriptor.methods:
        response_class = _message_class(method.output_type.full_name)

        async def handle(
            self: object, request: Message, context: Any, _cls: Any = response_class
        ) -> Message:
            return _cls()  # type: ignore[no-any-return]

        handlers[method.name] = handle
    return type(f"Answering{service}", (base,), handlers)()


def _message_class(full_name: str) -> Any:
    package, _, name = full_name.rpartition(".")
    module = {
        "user.v1": user,
        "order.v1": order,
        "inventory.v1": inv,
        "payment.v1": pay,
        "notification.v1": note,
    }[package]
    return getattr(module, name)


@pytest.fixture
async def system() -> AsyncIterator[TestServer]:
    """Every example service, answering empty responses, behind ValidationPolicy."""
    servicers = [_answering(base) for base in SERVICERS]
    async with serve(*servicers, policies=[ValidationPolicy()]) as t:
        yield t


async def _call(t: TestServer, request: Message) -> Message:
    method = request.DESCRIPTOR.name.removesuffix("Request")
    service = next(
        s for s in request.DESCRIPTOR.file.services_by_name.values() if method in s.methods_by_name
    )
    stub = STUBS[service.full_name](t.channel)
    return await getattr(stub, method)(request)  # type: ignore[no-any-return]


GOOD: list[Message] = [
    user.RegisterUserRequest(email="ada@example.com", display_name="Ada", password="s3cret-pass"),
    user.GetUserRequest(user_id=ID),
    user.LogInRequest(email="ada@example.com", password="s3cret-pass"),
    user.UpdateProfileRequest(user_id=ID, display_name="Ada L."),
    user.DeactivateUserRequest(user_id=ID, reason="moving away"),
    order.CreateOrderRequest(user_id=ID, currency="EUR"),
    order.AddOrderItemRequest(order_id=ID, sku="SKU-1", quantity=2, unit_price_minor=0),
    order.ConfirmOrderRequest(order_id=ID),
    order.CancelOrderRequest(order_id=ID, reason="changed my mind"),
    order.GetOrderRequest(order_id=ID),
    order.ListOrdersRequest(user_id=ID, page_size=10),
    inv.AddStockRequest(sku="SKU-1", quantity=5),
    inv.ReserveStockRequest(
        reservation_id=ID, order_id=ID2, lines=[inv.StockLine(sku="SKU-1", quantity=1)]
    ),
    inv.ReleaseStockRequest(reservation_id=ID),
    inv.GetStockRequest(sku="A1"),
    pay.ChargePaymentRequest(
        payment_id=ID, order_id=ID2, user_id=ID, amount_minor=1, currency="USD"
    ),
    pay.RefundPaymentRequest(payment_id=ID, reason=""),
    pay.GetPaymentRequest(payment_id=ID.upper()),
    note.SendNotificationRequest(
        user_id=ID, channel=note.CHANNEL_EMAIL, subject="Hi", body="Your order shipped."
    ),
    note.ListNotificationsRequest(user_id=ID, page_size=100),
]

# (bad request, [(field, rule)] the BadRequest detail must list, in order)
BAD: list[tuple[Message, list[tuple[str, str]]]] = [
    (
        user.RegisterUserRequest(display_name="Ada", password="s3cret-pass"),
        [("email", "required")],
    ),
    (
        user.RegisterUserRequest(email="ada@", display_name="A", password="short"),
        [
            ("email", "string.email"),
            ("display_name", "string.min_len"),
            ("password", "string.min_len"),
        ],
    ),
    (
        user.RegisterUserRequest(
            email="ada@example.com", display_name="x" * 101, password="s3cret-pass"
        ),
        [("display_name", "string.max_len")],
    ),
    (
        user.RegisterUserRequest(
            email="ada@example.com", display_name="Ada", password="ada@example.com"
        ),
        [("", "password.not_email")],
    ),
    (user.LogInRequest(email="ada@example.com"), [("password", "required")]),
    (user.GetUserRequest(user_id="not-a-uuid"), [("user_id", "string.uuid")]),
    (
        order.CreateOrderRequest(user_id=ID, currency="eur"),
        [("currency", "string.pattern")],
    ),
    (
        order.AddOrderItemRequest(order_id=ID, sku="sku 1", quantity=0, unit_price_minor=-1),
        [
            ("sku", "string.pattern"),
            ("quantity", "uint32.gte_lte"),
            ("unit_price_minor", "int64.gte_lte"),
        ],
    ),
    (
        order.AddOrderItemRequest(order_id=ID, sku="S" * 65, quantity=1001),
        [("sku", "string.max_len"), ("quantity", "uint32.gte_lte")],
    ),
    (order.ConfirmOrderRequest(), [("order_id", "required")]),
    (
        order.CancelOrderRequest(order_id=ID, reason="r" * 501),
        [("reason", "string.max_len")],
    ),
    (inv.ReserveStockRequest(reservation_id=ID, order_id=ID2), [("lines", "repeated.min_items")]),
    (
        inv.ReserveStockRequest(
            reservation_id=ID,
            order_id=ID2,
            lines=[inv.StockLine(sku="A", quantity=1), inv.StockLine(sku="", quantity=0)],
        ),
        [("lines[1].sku", "required"), ("lines[1].quantity", "uint32.gte_lte")],
    ),
    (
        inv.ReserveStockRequest(
            reservation_id=ID,
            order_id=ID2,
            lines=[inv.StockLine(sku="A", quantity=1)] * 101,
        ),
        [("lines", "repeated.max_items")],
    ),
    (
        pay.ChargePaymentRequest(
            payment_id=ID, order_id=ID2, user_id=ID, amount_minor=0, currency="EUR"
        ),
        [("amount_minor", "int64.gt_lte")],
    ),
    (
        note.SendNotificationRequest(user_id=ID, channel=7, subject="Hi", body="b"),  # type: ignore[arg-type]
        [("channel", "enum.defined_only")],
    ),
    (
        note.SendNotificationRequest(user_id=ID, subject="Hi", body="b"),
        [("channel", "required")],
    ),
    (
        note.ListNotificationsRequest(user_id=ID, page_size=101),
        [("page_size", "uint32.lte")],
    ),
]


@pytest.mark.parametrize("request_", GOOD, ids=lambda r: r.DESCRIPTOR.name)
async def test_a_valid_request_reaches_the_handler(system: TestServer, request_: Message) -> None:
    """A request that meets every rule is answered by the servicer."""
    response = await _call(system, request_)
    assert response.DESCRIPTOR.name == request_.DESCRIPTOR.name.replace("Request", "Response")


@pytest.mark.parametrize(
    ("request_", "expected"), BAD, ids=lambda v: getattr(getattr(v, "DESCRIPTOR", None), "name", "")
)
async def test_a_bad_request_is_rejected_with_each_field_violation(
    system: TestServer, request_: Message, expected: list[tuple[str, str]]
) -> None:
    """INVALID_ARGUMENT with a BadRequest listing exactly the broken (field, rule) pairs."""
    with pytest.raises(InvalidArgumentError) as caught:
        await _call(system, request_)
    error = caught.value
    assert [(v.field, v.rule) for v in error.violations] == expected
    assert error.message.startswith(f"invalid {request_.DESCRIPTOR.name}: ")
    for v in error.violations:
        assert (f"{v.field}: " if v.field else "") + v.description in error.message
    assert isinstance(error.__cause__, grpc.aio.AioRpcError)
    assert error.__cause__.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_the_violation_text_reads_as_a_sentence(system: TestServer) -> None:
    """Descriptions say what is allowed, so a person can fix the request."""
    with pytest.raises(InvalidArgumentError) as caught:
        await _call(system, user.GetUserRequest(user_id="42"))
    assert caught.value.violations == (
        FieldViolation("user_id", "must be a valid UUID", "string.uuid"),
    )
    assert caught.value.message == "invalid GetUserRequest: user_id: must be a valid UUID"


def test_every_example_request_declares_rules() -> None:
    """Each request message of the five services declares rules, and they compile."""
    validators = Validators()
    for module in (user, order, inv, pay, note):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                assert validators.has_rules(method.input_type), method.input_type.full_name
                validators.prepare(method.input_type)


async def test_a_client_side_policy_rejects_before_sending() -> None:
    """In a client chain the same rules fail fast: the server never sees the call."""
    seen: list[str] = []

    class Recording(user_grpc.UserServiceServicer):
        async def GetUser(self, request: user.GetUserRequest, context: Any) -> user.GetUserResponse:
            seen.append(request.user_id)
            return user.GetUserResponse()

    async with serve(Recording(), client_policies=[ValidationPolicy()]) as t:
        stub = t.stub(user_grpc.UserServiceStub)
        with pytest.raises(InvalidArgumentError) as caught:
            await stub.GetUser(user.GetUserRequest(user_id="nope"))
        await stub.GetUser(user.GetUserRequest(user_id=ID))
    assert [(v.field, v.rule) for v in caught.value.violations] == [("user_id", "string.uuid")]
    assert seen == [ID]
