"""The example system's contracts follow the framework's rules, read from the descriptors."""

from __future__ import annotations

import re

import pytest
from google.protobuf.descriptor import (
    FieldDescriptor,
    FileDescriptor,
    MethodDescriptor,
    ServiceDescriptor,
)

from gen.framework.v1 import options_pb2
from gen.inventory.v1 import events_pb2 as inventory_events
from gen.inventory.v1 import inventory_pb2
from gen.notification.v1 import events_pb2 as notification_events
from gen.notification.v1 import notification_pb2
from gen.order.v1 import events_pb2 as order_events
from gen.order.v1 import order_pb2
from gen.payment.v1 import events_pb2 as payment_events
from gen.payment.v1 import payment_pb2
from gen.user.v1 import events_pb2 as user_events
from gen.user.v1 import user_pb2

SERVICE_FILES: tuple[FileDescriptor, ...] = (
    user_pb2.DESCRIPTOR,
    order_pb2.DESCRIPTOR,
    inventory_pb2.DESCRIPTOR,
    payment_pb2.DESCRIPTOR,
    notification_pb2.DESCRIPTOR,
)
EVENT_FILES: tuple[FileDescriptor, ...] = (
    user_events.DESCRIPTOR,
    order_events.DESCRIPTOR,
    inventory_events.DESCRIPTOR,
    payment_events.DESCRIPTOR,
    notification_events.DESCRIPTOR,
)
SERVICES: tuple[ServiceDescriptor, ...] = tuple(
    s for f in SERVICE_FILES for s in f.services_by_name.values()
)
# Past participles that do not end in "-ed".
IRREGULAR_PAST = frozenset({"Sent", "Paid", "Made", "Held", "Sold", "Built", "Taken", "Given"})
READ_PREFIXES = ("Get", "List")
# Services of the platform the example services may call.
PLATFORM = frozenset({"saga.v1.SagaService"})
# Methods anyone may call without a token: signing up and logging in.
PUBLIC_METHODS = frozenset({"user.v1.UserService.RegisterUser", "user.v1.UserService.LogIn"})


def _service_policy(service: ServiceDescriptor) -> options_pb2.ServicePolicy:
    return service.GetOptions().Extensions[options_pb2.service_policy]


def _events() -> list[str]:
    """Top-level messages of events.proto files that no other message embeds."""
    names: list[str] = []
    for file in EVENT_FILES:
        embedded = {
            f.message_type.full_name
            for m in file.message_types_by_name.values()
            for f in m.fields
            if f.message_type is not None
        }
        messages = file.message_types_by_name.values()
        names += [m.name for m in messages if m.full_name not in embedded]
    return names


def test_the_five_services_are_present() -> None:
    """Each example context publishes exactly its one service."""
    assert sorted(s.full_name for s in SERVICES) == [
        "inventory.v1.InventoryService",
        "notification.v1.NotificationService",
        "order.v1.OrderService",
        "payment.v1.PaymentService",
        "user.v1.UserService",
    ]


@pytest.mark.parametrize("service", SERVICES, ids=lambda s: s.name)
def test_every_service_names_its_context_and_owned_entities(service: ServiceDescriptor) -> None:
    """A service declares its bounded context and at least one entity it owns."""
    policy = _service_policy(service)
    assert policy.bounded_context, f"{service.full_name} has no bounded_context"
    assert list(policy.owns), f"{service.full_name} owns no entity"


def test_dependencies_are_known_services_without_cycles() -> None:
    """depends_on names full service names of the system (or the platform's saga
    orchestrator), and the graph is acyclic."""
    known = {s.full_name for s in SERVICES} | PLATFORM
    graph = {s.full_name: list(_service_policy(s).depends_on) for s in SERVICES}
    graph.update({name: [] for name in PLATFORM})
    for name, deps in graph.items():
        assert set(deps) <= known, f"{name} depends on unknown {set(deps) - known}"
        assert name not in deps
    visiting: set[str] = set()
    done: set[str] = set()

    def visit(node: str) -> None:
        assert node not in visiting, f"dependency cycle through {node}"
        if node in done:
            return
        visiting.add(node)
        for dep in graph[node]:
            visit(dep)
        visiting.discard(node)
        done.add(node)

    for node in graph:
        visit(node)


def test_no_entity_has_two_owners() -> None:
    """Each entity has a single writer across the system."""
    owners: dict[str, str] = {}
    for service in SERVICES:
        for entity in _service_policy(service).owns:
            assert entity not in owners, f"{entity} owned by {owners[entity]} and {service.name}"
            owners[entity] = service.full_name


@pytest.mark.parametrize(
    "method",
    [m for s in SERVICES for m in s.methods],
    ids=lambda m: m.full_name,
)
def test_every_method_declares_scopes_timeout_and_standard_names(method: MethodDescriptor) -> None:
    """Methods carry scopes (or are explicitly public) and a default deadline; messages are
    named <Method>Request/Response."""
    policy = method.GetOptions().Extensions[options_pb2.method_policy]
    if method.full_name in PUBLIC_METHODS:
        assert policy.HasField("auth_required") and not policy.auth_required
        assert not list(policy.scopes), f"public {method.full_name} must not declare scopes"
        assert policy.HasField("rate_limit"), f"public {method.full_name} needs a rate limit"
    else:
        assert not policy.HasField("auth_required") or policy.auth_required
        assert list(policy.scopes), f"{method.full_name} requires no scope"
    assert all(re.fullmatch(r"[a-z]+:(read|write)", s) for s in policy.scopes)
    assert policy.timeout_s > 0
    assert method.input_type.name == f"{method.name}Request"
    assert method.output_type.name == f"{method.name}Response"
    if method.name.startswith(READ_PREFIXES):
        assert policy.idempotent, f"read {method.full_name} should be idempotent"
        assert all(s.endswith(":read") for s in policy.scopes)
    if policy.idempotency_key_required:
        assert policy.idempotent, f"{method.full_name} is keyed, so retrying it is safe"


@pytest.mark.parametrize("service", SERVICES, ids=lambda s: s.name)
def test_saga_actions_and_compensations_pair_up_within_the_service(
    service: ServiceDescriptor,
) -> None:
    """compensated_by names a method of the same service whose compensates points back."""
    for method in service.methods:
        saga = method.GetOptions().Extensions[options_pb2.method_policy].saga
        if saga.compensated_by:
            undo = service.methods_by_name.get(saga.compensated_by)
            assert undo is not None, f"{method.full_name}: no {saga.compensated_by} in service"
            undo_policy = undo.GetOptions().Extensions[options_pb2.method_policy]
            assert undo_policy.saga.compensates == method.name
            assert undo_policy.idempotency_key_required and undo_policy.idempotent
            policy = method.GetOptions().Extensions[options_pb2.method_policy]
            assert policy.idempotency_key_required, f"{method.full_name} needs a key"
        if saga.compensates:
            action = service.methods_by_name.get(saga.compensates)
            assert action is not None, f"{method.full_name}: no {saga.compensates} in service"
            action_saga = action.GetOptions().Extensions[options_pb2.method_policy].saga
            assert action_saga.compensated_by == method.name


def test_saga_steps_exist_where_the_order_saga_needs_them() -> None:
    """ReserveStock/ReleaseStock and ChargePayment/RefundPayment are declared pairs."""
    pairs = {
        (m.name, m.GetOptions().Extensions[options_pb2.method_policy].saga.compensated_by)
        for s in SERVICES
        for m in s.methods
        if m.GetOptions().Extensions[options_pb2.method_policy].saga.compensated_by
    }
    assert pairs == {("ReserveStock", "ReleaseStock"), ("ChargePayment", "RefundPayment")}


def test_event_names_are_past_tense() -> None:
    """Every domain event is named for something that happened (OrderCreated, NotificationSent)."""
    events = _events()
    assert len(events) >= 12
    for name in events:
        last_word = re.findall(r"[A-Z][a-z0-9]*", name)[-1]
        assert last_word.endswith("ed") or last_word in IRREGULAR_PAST, name


def test_money_and_time_fields_use_the_agreed_types() -> None:
    """Amounts (*_minor) are int64 minor units and times (*_at) are Timestamps."""
    for file in SERVICE_FILES + EVENT_FILES:
        for message in file.message_types_by_name.values():
            for f in message.fields:
                if f.name.endswith("_minor"):
                    assert f.type == FieldDescriptor.TYPE_INT64, f.full_name
                if f.name.endswith("_at"):
                    assert f.message_type is not None, f.full_name
                    assert f.message_type.full_name == "google.protobuf.Timestamp"
