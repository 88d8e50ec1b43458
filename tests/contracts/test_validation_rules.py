"""Compiled validators on contracts built for the test: every rule kind, and misfit rules."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from framework.errors import InvalidArgumentError
from framework.policies.validation import ValidationPolicy, Validators
from framework.policy import Arity, Method
from gen.framework.v1 import validate_pb2

FDP = descriptor_pb2.FieldDescriptorProto
_FILE = "tests/contracts/validation_cases.proto"


def _field(
    message: descriptor_pb2.DescriptorProto,
    name: str,
    number: int,
    type_: int,
    *,
    repeated: bool = False,
    type_name: str = "",
    **rules: Any,
) -> None:
    field = message.field.add(name=name, number=number, type=type_)  # type: ignore[arg-type]
    field.label = FDP.LABEL_REPEATED if repeated else FDP.LABEL_OPTIONAL
    if type_name:
        field.type_name = type_name
    if rules:
        field.options.Extensions[validate_pb2.rules].MergeFrom(validate_pb2.FieldRules(**rules))


def _build() -> descriptor_pb2.FileDescriptorProto:
    file = descriptor_pb2.FileDescriptorProto(
        name=_FILE, package="validation_cases.v1", syntax="proto3"
    )
    inner = file.message_type.add(name="Inner")
    _field(inner, "code", 1, FDP.TYPE_STRING, required=True)
    kinds = file.enum_type.add(name="Kind")
    kinds.value.add(name="KIND_UNSPECIFIED", number=0)
    kinds.value.add(name="KIND_A", number=1)
    cases = file.message_type.add(name="Cases")
    _field(cases, "ratio", 1, FDP.TYPE_DOUBLE, gt=0.5, lt=1.5)
    _field(
        cases, "inner", 2, FDP.TYPE_MESSAGE, type_name=".validation_cases.v1.Inner", required=True
    )
    _field(cases, "tags", 3, FDP.TYPE_STRING, repeated=True, max_len=3, required=True)
    _field(
        cases,
        "kinds",
        4,
        FDP.TYPE_ENUM,
        repeated=True,
        type_name=".validation_cases.v1.Kind",
        defined_only=True,
    )
    _field(cases, "count", 5, FDP.TYPE_SINT32, lte=-1)
    node = file.message_type.add(name="Node")
    _field(node, "name", 1, FDP.TYPE_STRING, required=True)
    _field(node, "child", 2, FDP.TYPE_MESSAGE, type_name=".validation_cases.v1.Node")
    optional = file.message_type.add(name="Optional")
    optional.oneof_decl.add(name="_level")
    _field(optional, "level", 1, FDP.TYPE_INT32, required=True)
    optional.field[0].proto3_optional = True
    optional.field[0].oneof_index = 0
    plain = file.message_type.add(name="Plain")
    _field(plain, "anything", 1, FDP.TYPE_STRING)
    for name, type_, rules in [
        ("UuidOnNumber", FDP.TYPE_INT64, {"uuid": True}),
        ("BoundOnString", FDP.TYPE_STRING, {"gt": 1}),
        ("ItemsOnSingular", FDP.TYPE_STRING, {"min_items": 1}),
        ("BadPattern", FDP.TYPE_STRING, {"pattern": "(unclosed"}),
        ("DefinedOnString", FDP.TYPE_STRING, {"defined_only": True}),
    ]:
        _field(file.message_type.add(name=name), "value", 1, type_, **rules)
    return file


def _pool() -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_FILE)
    except KeyError:
        pool.Add(_build())
    return pool


def _cls(name: str) -> Any:
    return message_factory.GetMessageClass(
        _pool().FindMessageTypeByName(f"validation_cases.v1.{name}")
    )


def _violations(message: Any) -> list[tuple[str, str]]:
    compiled = Validators().for_descriptor(message.DESCRIPTOR)
    return [(v.field, v.rule) for v in compiled.violations(message)]


def test_every_rule_kind_reports_its_field_and_rule() -> None:
    """Bounds on doubles and sint32, message presence, per-item string and enum rules."""
    cases, inner = _cls("Cases"), _cls("Inner")
    bad = cases(ratio=2.0, tags=["ok", "toolong"], kinds=[1, 9], count=0)
    assert _violations(bad) == [
        ("ratio", "double.lt"),
        ("inner", "required"),
        ("tags[1]", "string.max_len"),
        ("kinds[1]", "enum.defined_only"),
        ("count", "sint32.lte"),
    ]
    assert _violations(cases(ratio=0.5, inner=inner(), count=-1)) == [
        ("ratio", "double.gt"),
        ("inner.code", "required"),
        ("tags", "required"),
    ]
    good = cases(ratio=1.0, inner=inner(code="x"), tags=["a"], kinds=[1], count=-5)
    assert _violations(good) == []


def test_required_on_an_optional_scalar_means_set_not_non_zero() -> None:
    """A proto3 `optional` field with presence passes `required` when set, even to 0."""
    optional = _cls("Optional")
    assert _violations(optional()) == [("level", "required")]
    assert _violations(optional(level=0)) == []


def test_recursive_messages_are_checked_at_every_depth() -> None:
    """A self-referencing type compiles once and checks nested levels with dotted paths."""
    node = _cls("Node")
    tree = node(name="root", child=node(name="a", child=node(name="")))
    assert _violations(tree) == [("child.child.name", "required")]


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("UuidOnNumber", "string.uuid applies to string fields, not int64"),
        ("BoundOnString", "string.gt applies to number fields, not string"),
        ("ItemsOnSingular", "repeated.min_items applies to repeated fields"),
        ("BadPattern", "is not a regex"),
        ("DefinedOnString", "enum.defined_only applies to enum fields"),
    ],
)
def test_a_rule_that_does_not_fit_its_field_fails_when_compiled(name: str, words: str) -> None:
    """Misdeclared rules are rejected at bind time with the field's full name."""
    validators = Validators()
    for _ in range(2):  # a failed compile is not cached as "no rules"
        with pytest.raises(ValueError, match=f"validation_cases.v1.{name}.value") as caught:
            validators.for_descriptor(_cls(name).DESCRIPTOR)
        assert words in str(caught.value)


def test_validate_raises_invalid_argument_with_a_readable_message() -> None:
    """Validators.validate (for stream handlers) raises the same error the policy does."""
    with pytest.raises(InvalidArgumentError) as caught:
        Validators().validate(_cls("Inner")())
    assert caught.value.message == "invalid Inner: code is required"
    assert [v.rule for v in caught.value.violations] == ["required"]


def test_policy_binds_nothing_where_there_is_nothing_to_check() -> None:
    """No rules, no descriptor, or a client stream: the method gets no enter at all."""
    policy = ValidationPolicy()
    assert policy.bind(Method.resolve("/unknown.v1.Service/Call")) is None
    assert policy.bind(Method.resolve("/echo.v1.EchoService/Fail")) is None
    from gen.inventory.v1 import inventory_pb2  # noqa: F401 - registers the service

    bound = Method.resolve("/inventory.v1.InventoryService/GetStock")
    assert policy.bind(bound) is not None
    streaming = Method(
        full_name=bound.full_name,
        service=bound.service,
        name=bound.name,
        arity=Arity.STREAM_UNARY,
        descriptor=bound.descriptor,
    )
    assert policy.bind(streaming) is None
