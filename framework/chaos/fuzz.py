"""Hypothesis strategies for fuzzing gRPC services and HTTP routes (tests; needs hypothesis).

* `messages(descriptor)`: valid protobuf messages of a type, fields drawn at random
  (nested messages to a small depth), serialized: what a sloppy client might send;
* `mutated(data)`: bytes derived from valid bytes (flipped, cut, repeated, spliced);
* `payloads(descriptor)`: either of those, or random bytes;
* `odd_metadata()`: headers a client could send: strange keys, long and empty values,
  binary `-bin` headers, bad idempotency keys;
* `malformed_jwts()`: Authorization values that are not valid tokens of the system:
  garbage, wrong segment counts, bad base64, `alg: none`, forged signatures, absurd claims;
* `json_values()`: any JSON document (for HTTP bodies).

Every call they feed must end with a gRPC status (or an HTTP status) and leave the
server serving; `framework.chaos.invariants` then checks the state.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from google.protobuf import descriptor as _descriptor
from google.protobuf import message_factory
from hypothesis import strategies as st

__all__ = [
    "json_values",
    "malformed_jwts",
    "messages",
    "mutated",
    "odd_metadata",
    "payloads",
]

FD = _descriptor.FieldDescriptor
_INT_RANGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
}
_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "0", "-1", "WIDGET-1", "../../etc/passwd", "\x00", "a" * 300]),
    st.uuids().map(str),
)


def _scalar(field: _descriptor.FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in _INT_RANGES:
        low, high = _INT_RANGES[kind]
        return st.one_of(
            st.integers(low, high), st.sampled_from([0, 1, -1 if low < 0 else 2, high])
        )
    if kind in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return st.floats(
            allow_nan=True, allow_infinity=True, width=32 if kind == FD.TYPE_FLOAT else 64
        )
    if kind == FD.TYPE_BOOL:
        return st.booleans()
    if kind == FD.TYPE_STRING:
        return _TEXT
    if kind == FD.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == FD.TYPE_ENUM:
        enum = field.enum_type
        numbers = [v.number for v in enum.values] if enum is not None else [0]
        return st.one_of(st.sampled_from(numbers), st.integers(-5, 1000))
    raise ValueError(f"not a scalar field: {field.full_name}")


def _fill(message: Any, draw: Any, depth: int) -> None:
    for field in message.DESCRIPTOR.fields:
        if not draw(st.booleans()):
            continue
        repeated = field.is_repeated
        if field.type == FD.TYPE_MESSAGE:
            if depth <= 0:
                continue
            if field.message_type.GetOptions().map_entry:
                key_field = field.message_type.fields_by_name["key"]
                value_field = field.message_type.fields_by_name["value"]
                if value_field.type == FD.TYPE_MESSAGE:
                    continue
                for _ in range(draw(st.integers(0, 3))):
                    getattr(message, field.name)[draw(_scalar(key_field))] = draw(
                        _scalar(value_field)
                    )
                continue
            if field.message_type.full_name.startswith("google.protobuf."):
                continue  # well-known types: leave them to their own checks
            targets = (
                [getattr(message, field.name).add() for _ in range(draw(st.integers(0, 3)))]
                if repeated
                else [getattr(message, field.name)]
            )
            for target in targets:
                _fill(target, draw, depth - 1)
                if not repeated:
                    target.SetInParent()
            continue
        if repeated:
            getattr(message, field.name).extend(draw(st.lists(_scalar(field), max_size=4)))
        else:
            try:
                setattr(message, field.name, draw(_scalar(field)))
            except ValueError:  # e.g. a string with surrogates: protobuf refuses it
                continue


def messages(descriptor: _descriptor.Descriptor, depth: int = 2) -> st.SearchStrategy[bytes]:
    """Serialized messages of `descriptor`'s type with random field values."""
    cls = message_factory.GetMessageClass(descriptor)

    @st.composite
    def build(draw: Any) -> bytes:
        message = cls()
        _fill(message, draw, depth)
        data: bytes = message.SerializeToString()
        return data

    return build()


def mutated(valid: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Bytes of `valid` flipped, cut, doubled, spliced with noise."""

    @st.composite
    def mutate(draw: Any) -> bytes:
        data = bytearray(draw(valid))
        for _ in range(draw(st.integers(1, 4))):
            how = draw(st.sampled_from(["flip", "cut", "insert", "double", "varint"]))
            at = draw(st.integers(0, len(data))) if data else 0
            if how == "flip" and data:
                index = min(at, len(data) - 1)
                data[index] ^= draw(st.integers(1, 255))
            elif how == "cut":
                data = data[:at]
            elif how == "insert":
                data[at:at] = draw(st.binary(min_size=1, max_size=8))
            elif how == "double":
                data = data + data
            else:  # an overlong varint: a length or tag that never ends
                data[at:at] = b"\xff" * draw(st.integers(5, 12))
        return bytes(data)

    return mutate()


def payloads(descriptor: _descriptor.Descriptor) -> st.SearchStrategy[bytes]:
    """Random bytes, valid messages, or mutated ones."""
    valid = messages(descriptor)
    return st.one_of(st.binary(max_size=300), valid, mutated(valid))


_KEY_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-_."
_VALUE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=64)


def odd_metadata() -> st.SearchStrategy[list[tuple[str, Any]]]:
    """Metadata a client could send (keys the grpc library accepts)."""
    key = st.text(alphabet=_KEY_CHARS, min_size=1, max_size=24).filter(
        lambda k: not k.startswith(("grpc-", ":")) and not k.endswith("-bin") and k[0] not in "-_."
    )
    plain = st.tuples(key, st.one_of(_VALUE, st.just(""), st.just("x" * 4000)))
    binary = st.tuples(key.map(lambda k: f"{k}-bin"), st.binary(max_size=64))
    special = st.tuples(
        st.sampled_from(
            [
                "idempotency-key",
                "traceparent",
                "tracestate",
                "x-request-id",
                "grpc-timeout-ish",
                "user-agent",
            ]
        ),
        st.one_of(_VALUE, st.just("00-" + "0" * 32 + "-" + "0" * 16 + "-01")),
    )
    return st.lists(st.one_of(plain, binary, special), max_size=6)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def malformed_jwts() -> st.SearchStrategy[str]:
    """`authorization` values no verifier of the system may accept."""
    headers = st.sampled_from(
        [
            {"alg": "none", "typ": "JWT"},
            {"alg": "HS256", "typ": "JWT", "kid": "platform-signing"},
            {"alg": "ES256", "kid": "../../keys"},
            {"alg": "RS256"},
            {},
        ]
    )
    claims = st.fixed_dictionaries(
        {},
        optional={
            "sub": _TEXT,
            "exp": st.one_of(st.integers(-(2**63), 2**63), st.just(1e400), st.text(max_size=5)),
            "nbf": st.integers(-(2**40), 2**40),
            "scope": st.one_of(_TEXT, st.lists(_TEXT, max_size=3)),
            "aud": _TEXT,
            "iss": _TEXT,
        },
    )

    @st.composite
    def forged(draw: Any) -> str:
        header = _b64(json.dumps(draw(headers)).encode())
        body = _b64(json.dumps(draw(claims), default=str).encode())
        signature = _b64(draw(st.binary(max_size=72)))
        return f"Bearer {header}.{body}.{signature}"

    garbage = st.one_of(
        _VALUE.map(lambda v: f"Bearer {v}"),
        st.sampled_from(
            ["Bearer", "Bearer ", "bearer x.y.z", "Basic dXNlcjpwYXNz", "Bearer a.b", "Bearer ...."]
        ),
        st.lists(st.text(alphabet=_KEY_CHARS + "+/=", max_size=20), min_size=1, max_size=5).map(
            lambda parts: "Bearer " + ".".join(parts)
        ),
    )
    return st.one_of(forged(), garbage)


def json_values(max_leaves: int = 20) -> st.SearchStrategy[Any]:
    """Any JSON document."""
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        _TEXT,
    )
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.dictionaries(
                st.one_of(
                    _TEXT,
                    st.sampled_from(
                        [
                            "sku",
                            "quantity",
                            "userId",
                            "email",
                            "password",
                            "currency",
                            "unitPriceMinor",
                            "displayName",
                        ]
                    ),
                ),
                inner,
                max_size=5,
            ),
        ),
        max_leaves=max_leaves,
    )
