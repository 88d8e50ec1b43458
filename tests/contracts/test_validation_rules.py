"""buf.validate rules on contracts built for the test: rule kinds, CEL, paths, misfit rules."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from framework.errors import InvalidArgumentError
from framework.policies.validation import ValidationPolicy, Validators, describe_rules
from framework.policy import Arity, Method
from gen.buf.validate import validate_pb2 as bv

FDP = descriptor_pb2.FieldDescriptorProto
_FILE = "tests/contracts/validation_cases.proto"
_PACKAGE = "validation_cases.v1"


def _field(
    message: descriptor_pb2.DescriptorProto,
    name: str,
    number: int,
    type_: int,
    *,
    repeated: bool = False,
    type_name: str = "",
    rules: bv.FieldRules | None = None,
) -> descriptor_pb2.FieldDescriptorProto:
    field = message.field.add(name=name, number=number, type=type_)  # type: ignore[arg-type]
    field.label = FDP.LABEL_REPEATED if repeated else FDP.LABEL_OPTIONAL
    if type_name:
        field.type_name = f".{_PACKAGE}.{type_name}"
    if rules is not None:
        field.options.Extensions[bv.field].MergeFrom(rules)
    return field


def _build() -> descriptor_pb2.FileDescriptorProto:
    file = descriptor_pb2.FileDescriptorProto(
        name=_FILE,
        package=_PACKAGE,
        syntax="proto3",
        dependency=["buf/validate/validate.proto"],
    )
    inner = file.message_type.add(name="Inner")
    _field(inner, "code", 1, FDP.TYPE_STRING, rules=bv.FieldRules(required=True))
    kinds = file.enum_type.add(name="Kind")
    kinds.value.add(name="KIND_UNSPECIFIED", number=0)
    kinds.value.add(name="KIND_A", number=1)
    cases = file.message_type.add(name="Cases")
    _field(cases, "ratio", 1, FDP.TYPE_DOUBLE, rules=bv.FieldRules(double=bv.DoubleRules(lt=1.5)))
    _field(
        cases, "inner", 2, FDP.TYPE_MESSAGE, type_name="Inner", rules=bv.FieldRules(required=True)
    )
    items = bv.FieldRules(string=bv.StringRules(max_len=3))
    _field(
        cases,
        "tags",
        3,
        FDP.TYPE_STRING,
        repeated=True,
        rules=bv.FieldRules(required=True, repeated=bv.RepeatedRules(items=items)),
    )
    defined = bv.FieldRules(enum=bv.EnumRules(defined_only=True))
    _field(
        cases,
        "kinds",
        4,
        FDP.TYPE_ENUM,
        repeated=True,
        type_name="Kind",
        rules=bv.FieldRules(repeated=bv.RepeatedRules(items=defined)),
    )
    _field(cases, "count", 5, FDP.TYPE_SINT32, rules=bv.FieldRules(sint32=bv.SInt32Rules(lte=-1)))
    # A CEL rule on one field, with its own id and message.
    odd = bv.Rule(id="count.odd", message="must be odd", expression="this % 2 != 0")
    _field(cases, "odd", 6, FDP.TYPE_INT32, rules=bv.FieldRules(cel=[odd]))
    # A CEL rule across fields, on the message.
    window = file.message_type.add(name="Window")
    _field(window, "start", 1, FDP.TYPE_INT64)
    _field(window, "end", 2, FDP.TYPE_INT64)
    window.options.Extensions[bv.message].cel.add(
        id="window.order", message="end must be after start", expression="this.end > this.start"
    )
    # Maps: a rule on keys and one on values, reported with the key as subscript.
    labels = file.message_type.add(name="Labels")
    entry = labels.nested_type.add(name="ValuesEntry")
    entry.options.map_entry = True
    _field(entry, "key", 1, FDP.TYPE_STRING)
    _field(entry, "value", 2, FDP.TYPE_STRING)
    _field(
        labels,
        "values",
        1,
        FDP.TYPE_MESSAGE,
        repeated=True,
        type_name="Labels.ValuesEntry",
        rules=bv.FieldRules(
            map=bv.MapRules(
                keys=bv.FieldRules(string=bv.StringRules(min_len=2)),
                values=bv.FieldRules(string=bv.StringRules(max_len=1)),
            )
        ),
    )
    node = file.message_type.add(name="Node")
    _field(node, "name", 1, FDP.TYPE_STRING, rules=bv.FieldRules(required=True))
    _field(node, "child", 2, FDP.TYPE_MESSAGE, type_name="Node")
    holder = file.message_type.add(name="Holder")
    _field(holder, "node", 1, FDP.TYPE_MESSAGE, type_name="Node")
    optional = file.message_type.add(name="Optional")
    optional.oneof_decl.add(name="_level")
    level = _field(optional, "level", 1, FDP.TYPE_INT32, rules=bv.FieldRules(required=True))
    level.proto3_optional = True
    level.oneof_index = 0
    plain = file.message_type.add(name="Plain")
    _field(plain, "anything", 1, FDP.TYPE_STRING)
    _field(plain, "node_free", 2, FDP.TYPE_MESSAGE, type_name="Plain")
    uuid_on_number = bv.FieldRules(string=bv.StringRules(uuid=True))
    _field(
        file.message_type.add(name="UuidOnNumber"), "value", 1, FDP.TYPE_INT64, rules=uuid_on_number
    )
    broken = bv.FieldRules(cel=[bv.Rule(id="broken", expression="this +")])
    _field(file.message_type.add(name="BrokenCel"), "value", 1, FDP.TYPE_STRING, rules=broken)
    return file


def _pool() -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_FILE)
    except KeyError:
        pool.Add(_build())
    return pool


def _cls(name: str) -> Any:
    return message_factory.GetMessageClass(_pool().FindMessageTypeByName(f"{_PACKAGE}.{name}"))


def _violations(message: Any) -> list[tuple[str, str]]:
    return [(v.field, v.rule) for v in Validators().violations(message)]


def test_every_rule_kind_reports_its_field_and_rule() -> None:
    """Bounds, message presence, per-item string and enum rules, a CEL field rule."""
    cases, inner = _cls("Cases"), _cls("Inner")
    bad = cases(ratio=2.0, tags=["ok", "toolong"], kinds=[1, 9], count=0, odd=2)
    assert _violations(bad) == [
        ("ratio", "double.lt"),
        ("inner", "required"),
        ("tags[1]", "string.max_len"),
        ("kinds[1]", "enum.defined_only"),
        ("count", "sint32.lte"),
        ("odd", "count.odd"),
    ]
    assert _violations(cases(ratio=0.5, inner=inner(), count=-1, odd=1)) == [
        ("inner.code", "required"),
        ("tags", "required"),
    ]
    good = cases(ratio=1.0, inner=inner(code="x"), tags=["a"], kinds=[1], count=-5, odd=3)
    assert _violations(good) == []


def test_a_cel_rule_across_fields_reports_its_id_and_message() -> None:
    """A message-level CEL rule names no field; its id and message come through as written."""
    window = _cls("Window")
    found = Validators().violations(window(start=5, end=1))
    assert [(v.field, v.rule, v.description) for v in found] == [
        ("", "window.order", "end must be after start")
    ]
    assert Validators().violations(window(start=1, end=5)) == []


def test_map_keys_and_values_are_named_by_their_key() -> None:
    """A bad map value is reported as values["k"], a bad key as its key path."""
    labels = _cls("Labels")
    found = _violations(labels(values={"ok": "too long", "x": "y"}))
    assert ("values['ok']", "string.max_len") in found
    assert ("values['x'] (key)", "string.min_len") in found
    assert len(found) == 2


def test_required_on_an_optional_scalar_means_set_not_non_zero() -> None:
    """A proto3 `optional` field with presence passes `required` when set, even to 0."""
    optional = _cls("Optional")
    assert _violations(optional()) == [("level", "required")]
    assert _violations(optional(level=0)) == []


def test_recursive_messages_are_checked_at_every_depth() -> None:
    """A self-referencing type checks nested levels with dotted paths."""
    node = _cls("Node")
    tree = node(name="root", child=node(name="a", child=node(name="")))
    assert _violations(tree) == [("child.child.name", "required")]


def test_rules_are_found_through_nested_messages_only_where_declared() -> None:
    """A type is checked when it or a message it holds declares a rule, recursion included."""
    validators = Validators()
    assert validators.has_rules(_cls("Holder").DESCRIPTOR)
    assert validators.has_rules(_cls("Window").DESCRIPTOR)
    assert not validators.has_rules(_cls("Plain").DESCRIPTOR)


@pytest.mark.parametrize("name", ["UuidOnNumber", "BrokenCel"])
def test_a_rule_that_does_not_fit_its_field_fails_when_bound(name: str) -> None:
    """Misdeclared rules (a string rule on a number, CEL that does not compile) fail at bind."""
    validators = Validators()
    for _ in range(2):  # a failed compile is not cached as "no rules"
        with pytest.raises(ValueError, match=f"{_PACKAGE}.{name}: its buf.validate rules"):
            validators.prepare(_cls(name).DESCRIPTOR)


def test_validate_raises_invalid_argument_with_a_readable_message() -> None:
    """Validators.validate (for stream handlers) raises the same error the policy does."""
    with pytest.raises(InvalidArgumentError) as caught:
        Validators().validate(_cls("Inner")())
    assert caught.value.message == "invalid Inner: code: value is required"
    assert [v.rule for v in caught.value.violations] == ["required"]


def test_rules_are_said_in_words_for_the_docs() -> None:
    """describe_rules gives each rule's id and what it asks, nested item rules included."""
    rules = bv.FieldRules(
        required=True,
        repeated=bv.RepeatedRules(
            max_items=3, items=bv.FieldRules(string=bv.StringRules(max_len=5, uuid=True))
        ),
    )
    assert describe_rules(rules) == [
        ("required", "required"),
        ("repeated.max_items", "at most 3 items"),
        ("string.max_len", "items: at most 5 characters"),
        ("string.uuid", "items: a UUID"),
    ]


def test_constructors_refuse_the_wrong_kind_of_argument() -> None:
    """Passing something else than a Validators/protovalidate.Validator fails at once, named."""
    with pytest.raises(TypeError, match="validators must be a"):
        ValidationPolicy(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"protovalidate\.Validator"):
        Validators("strict")  # type: ignore[arg-type]


def test_policy_binds_nothing_where_there_is_nothing_to_check() -> None:
    """No rules, no descriptor, or a client stream: the method gets no enter at all."""
    policy = ValidationPolicy()
    assert policy.bind(Method.resolve("/unknown.v1.Service/Call")) is None
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
    assert policy.bind_messages(streaming) is not None
