"""Saga definitions are checked against the contracts when built; mistakes name step and method."""

from __future__ import annotations

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool

from framework.saga import DefinitionError, Parallel, Retry, SagaDefinition, Step, copy_fields
from gen.buf.validate import validate_pb2
from gen.framework.v1 import options_pb2
from gen.inventory.v1 import inventory_pb2 as inv
from gen.order.v1 import order_pb2
from tests.saga.participants import CHARGE, NOTIFY, RESERVE, order_saga

# A contract with the mistakes a definition must refuse, added to the default pool once.
_FILE = "sagatest/v1/mistakes.proto"


def _contract() -> None:
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_FILE)
        return
    except KeyError:
        pass
    f = descriptor_pb2.FileDescriptorProto(
        name=_FILE,
        package="sagatest.v1",
        syntax="proto3",
        dependency=["framework/v1/options.proto", "buf/validate/validate.proto"],
    )
    for name, fields in {
        "Req": [("order_id", False)],
        "Rep": [("ticket", False)],
        "UndoByTicketReq": [("ticket", True)],
        "UndoReq": [("order_id", True)],
    }.items():
        message = f.message_type.add(name=name)
        for number, (field_name, required) in enumerate(fields, start=1):
            field = message.field.add(
                name=field_name,
                number=number,
                type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
            )
            if required:
                field.options.Extensions[validate_pb2.field].required = True
    service = f.service.add(name="Mistakes")

    def method(name: str, request: str, idempotent: bool, undo: str = "", undoes: str = "") -> None:
        m = service.method.add(
            name=name, input_type=f".sagatest.v1.{request}", output_type=".sagatest.v1.Rep"
        )
        policy = m.options.Extensions[options_pb2.method_policy]
        policy.idempotent = idempotent
        if undo:
            policy.saga.compensated_by = undo
        if undoes:
            policy.saga.compensates = undoes

    method("NoUndo", "Req", True)
    method("MissingUndo", "Req", True, undo="Gone")
    method("NotIdempotent", "Req", False, undo="Undo")
    method("Undo", "UndoReq", True)
    method("UndoIsNotIdempotent", "Req", True, undo="LooseUndo")
    method("LooseUndo", "UndoReq", False)
    method("UndoNeedsTheReply", "Req", True, undo="UndoByTicket")
    method("UndoByTicket", "UndoByTicketReq", True)
    method("UndoSaysOther", "Req", True, undo="UndoOfSomethingElse")
    method("UndoOfSomethingElse", "UndoReq", True, undoes="NoUndo")
    pool.Add(f)


_contract()


def _refused(step: Step, *more: Step) -> str:
    with pytest.raises(DefinitionError) as caught:
        SagaDefinition("bad", input_type=order_pb2.Order, steps=[step, *more])
    return str(caught.value)


def test_the_order_saga_is_accepted_with_compensations_from_the_contract() -> None:
    """A correct definition takes each compensation from the contract's option."""
    definition = order_saga()
    steps = {s.name: s for s in definition.steps}
    assert steps["reserve"].compensation is not None
    assert steps["reserve"].compensation.method == "/inventory.v1.InventoryService/ReleaseStock"
    assert steps["charge"].compensation is not None
    assert steps["charge"].compensation.method == "/payment.v1.PaymentService/RefundPayment"
    assert steps["notify"].compensation is None  # the pivot
    assert definition.services == {
        "inventory.v1.InventoryService",
        "payment.v1.PaymentService",
        "notification.v1.NotificationService",
    }


def test_action_without_declared_compensation_is_refused() -> None:
    """A compensable step whose contract declares no compensated_by is refused."""
    message = _refused(Step("ship", "sagatest.v1.Mistakes/NoUndo"))
    assert "step 'ship'" in message and "sagatest.v1.Mistakes/NoUndo" in message
    assert "compensated_by" in message and "compensable=False" in message


def test_compensation_that_does_not_exist_is_refused() -> None:
    """compensated_by naming a method the service lacks is refused, naming it."""
    message = _refused(Step("ship", "sagatest.v1.Mistakes/MissingUndo"))
    assert "'Gone' does not exist on sagatest.v1.Mistakes" in message
    assert "step 'ship'" in message


def test_action_that_is_not_idempotent_is_refused() -> None:
    """An action not declared idempotent is refused (it is re-sent after a crash)."""
    message = _refused(Step("ship", "sagatest.v1.Mistakes/NotIdempotent"))
    assert "not declared idempotent" in message and "NotIdempotent" in message


def test_compensation_that_is_not_idempotent_is_refused() -> None:
    """A compensation not declared idempotent is refused (it is retried until it succeeds)."""
    message = _refused(Step("ship", "sagatest.v1.Mistakes/UndoIsNotIdempotent"))
    assert "compensation sagatest.v1.Mistakes/LooseUndo is not declared idempotent" in message


def test_compensation_needing_what_only_the_reply_carries_is_refused() -> None:
    """A compensation whose required field only the reply has is refused, with the reason."""
    message = _refused(Step("ship", "sagatest.v1.Mistakes/UndoNeedsTheReply"))
    assert "needs ticket" in message and "only in the reply" in message


def test_compensation_request_builder_lifts_the_mapping_check() -> None:
    """With compensation_request= the author builds the request; the definition is accepted."""
    definition = SagaDefinition(
        "fine",
        input_type=order_pb2.Order,
        steps=[
            Step(
                "ship",
                "sagatest.v1.Mistakes/UndoNeedsTheReply",
                compensation_request=lambda req, rep: descriptor_pb2.FileDescriptorProto(),
            )
        ],
    )
    assert definition.steps[0].compensable


def test_compensation_naming_another_action_is_refused() -> None:
    """A compensation whose `compensates` names a different action is refused."""
    message = _refused(Step("ship", "sagatest.v1.Mistakes/UndoSaysOther"))
    assert "compensates 'NoUndo', not 'UndoSaysOther'" in message


def test_unknown_method_and_service_are_refused() -> None:
    """A method or service missing from the descriptor pool is refused, naming it."""
    assert "has no method 'Nope'" in _refused(Step("a", "inventory.v1.InventoryService/Nope"))
    assert "not in the descriptor pool" in _refused(Step("a", "nowhere.v1.Service/Call"))


def test_shape_mistakes_are_refused() -> None:
    """Duplicate step names, a pivot in a parallel group, bad names are refused."""
    reserve = Step("reserve", RESERVE, request=lambda c: inv.ReserveStockRequest())
    assert "used twice" in _refused(reserve, reserve)
    with pytest.raises(DefinitionError, match="cannot run in a parallel group"):
        SagaDefinition(
            "bad",
            input_type=order_pb2.Order,
            steps=[Parallel(reserve, Step("notify", NOTIFY, compensable=False))],
        )
    assert "step name" in _refused(Step("Bad Name", CHARGE))
    with pytest.raises(DefinitionError, match="saga name"):
        SagaDefinition("Bad Name", input_type=order_pb2.Order, steps=[reserve])


def test_request_copied_from_the_input_must_cover_required_fields() -> None:
    """Without request=, the saga input must carry the action's required fields."""
    message = _refused(Step("charge", CHARGE))
    assert "no request= builder" in message
    assert "payment_id" in message and "order.v1.Order" in message


def test_copy_fields_maps_by_name_and_type() -> None:
    """copy_fields sets same-named, same-typed fields; later sources win; others are left."""
    target = inv.ReleaseStockRequest()
    copy_fields(target, inv.ReserveStockRequest(reservation_id="r1", order_id="o1"))
    assert target.reservation_id == "r1" and target.reason == ""
    copy_fields(target, inv.ReserveStockResponse(reservation_id="r2"))
    assert target.reservation_id == "r2"


def test_retry_backoff_grows_and_is_capped() -> None:
    """Retry delays grow by the multiplier, stay within the jitter, and stop at the cap."""
    retry = Retry(max_attempts=5, initial_backoff_s=0.1, max_backoff_s=0.3, jitter=0.0)
    assert [retry.delay_s(n, 0.5) for n in (1, 2, 3, 4)] == pytest.approx([0.1, 0.2, 0.3, 0.3])
    jittered = Retry(initial_backoff_s=1.0, max_backoff_s=1.0, jitter=0.2)
    assert jittered.delay_s(1, 0.0) == pytest.approx(0.8)
    assert jittered.delay_s(1, 0.999) == pytest.approx(1.2, abs=0.001)
    with pytest.raises(ValueError, match="max_attempts"):
        Retry(max_attempts=0)
