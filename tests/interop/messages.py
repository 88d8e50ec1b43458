"""The interop suite's contract, built here as a descriptor (no generated code).

The shapes follow the messages gRPC's interoperability test cases describe
(doc/interop-test-descriptions.md in grpc/grpc): a payload of zero bytes, a
requested response size, an echoed status, response parameters for streams.
The service is `interop.v1.TestService`; its unary methods are marked
idempotent in the framework's contract options, so the client's retry policy
compiles a retryPolicy for them as it would for a real service.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from gen.framework.v1 import options_pb2

PACKAGE = "interop.v1"
SERVICE = f"{PACKAGE}.TestService"
UNIMPLEMENTED_SERVICE = f"{PACKAGE}.UnimplementedService"
_FILE = "tests/interop/v1/test.proto"

_I32 = descriptor_pb2.FieldDescriptorProto.TYPE_INT32
_BYTES = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
_STRING = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
_MESSAGE = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE
_OPTIONAL = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
_REPEATED = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED

# message -> [(field, number, type, message type or "", repeated)]
_MESSAGES: dict[str, list[tuple[str, int, int, str, bool]]] = {
    "Empty": [],
    "Payload": [("body", 1, _BYTES, "", False)],
    "EchoStatus": [("code", 1, _I32, "", False), ("message", 2, _STRING, "", False)],
    "SimpleRequest": [
        ("response_size", 1, _I32, "", False),
        ("payload", 2, _MESSAGE, "Payload", False),
        ("response_status", 3, _MESSAGE, "EchoStatus", False),
    ],
    "SimpleResponse": [("payload", 1, _MESSAGE, "Payload", False)],
    "StreamingInputCallRequest": [("payload", 1, _MESSAGE, "Payload", False)],
    "StreamingInputCallResponse": [("aggregated_payload_size", 1, _I32, "", False)],
    "ResponseParameters": [("size", 1, _I32, "", False), ("interval_us", 2, _I32, "", False)],
    "StreamingOutputCallRequest": [
        ("response_parameters", 1, _MESSAGE, "ResponseParameters", True),
        ("payload", 2, _MESSAGE, "Payload", False),
        ("response_status", 3, _MESSAGE, "EchoStatus", False),
    ],
    "StreamingOutputCallResponse": [("payload", 1, _MESSAGE, "Payload", False)],
}

# method -> (request, response, client streaming, server streaming, idempotent)
METHODS: dict[str, tuple[str, str, bool, bool, bool]] = {
    "EmptyCall": ("Empty", "Empty", False, False, True),
    "UnaryCall": ("SimpleRequest", "SimpleResponse", False, False, True),
    "StreamingOutputCall": (
        "StreamingOutputCallRequest",
        "StreamingOutputCallResponse",
        False,
        True,
        True,
    ),
    "StreamingInputCall": (
        "StreamingInputCallRequest",
        "StreamingInputCallResponse",
        True,
        False,
        False,
    ),
    "FullDuplexCall": (
        "StreamingOutputCallRequest",
        "StreamingOutputCallResponse",
        True,
        True,
        False,
    ),
    # declared in the contract, implemented by no server: UNIMPLEMENTED
    "UnimplementedCall": ("Empty", "Empty", False, False, False),
}


def _file() -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto(
        name=_FILE,
        package=PACKAGE,
        syntax="proto3",
        dependency=[options_pb2.DESCRIPTOR.name],
    )
    for name, fields in _MESSAGES.items():
        message = proto.message_type.add(name=name)
        for field, number, kind, type_name, repeated in fields:
            added = message.field.add(
                name=field,
                number=number,
                type=kind,  # type: ignore[arg-type]
                label=_REPEATED if repeated else _OPTIONAL,  # type: ignore[arg-type]
            )
            if type_name:
                added.type_name = f".{PACKAGE}.{type_name}"
    service = proto.service.add(name="TestService")
    for name, (request, response, streams_in, streams_out, idempotent) in METHODS.items():
        method = service.method.add(
            name=name,
            input_type=f".{PACKAGE}.{request}",
            output_type=f".{PACKAGE}.{response}",
            client_streaming=streams_in,
            server_streaming=streams_out,
        )
        if idempotent:
            method.options.Extensions[options_pb2.method_policy].idempotent = True
    unimplemented = proto.service.add(name="UnimplementedService")
    unimplemented.method.add(
        name="UnimplementedCall", input_type=f".{PACKAGE}.Empty", output_type=f".{PACKAGE}.Empty"
    )
    return proto


def _classes() -> dict[str, Any]:
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_FILE)
    except KeyError:
        pool.Add(_file())
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))
        for name in _MESSAGES
    }


_CLASSES = _classes()
Empty: Any = _CLASSES["Empty"]
Payload: Any = _CLASSES["Payload"]
EchoStatus: Any = _CLASSES["EchoStatus"]
SimpleRequest: Any = _CLASSES["SimpleRequest"]
SimpleResponse: Any = _CLASSES["SimpleResponse"]
StreamingInputCallRequest: Any = _CLASSES["StreamingInputCallRequest"]
StreamingInputCallResponse: Any = _CLASSES["StreamingInputCallResponse"]
ResponseParameters: Any = _CLASSES["ResponseParameters"]
StreamingOutputCallRequest: Any = _CLASSES["StreamingOutputCallRequest"]
StreamingOutputCallResponse: Any = _CLASSES["StreamingOutputCallResponse"]


def message_class(name: str) -> Any:
    return _CLASSES[name]


def zeros(size: int) -> Any:
    """A payload of `size` zero bytes."""
    return Payload(body=b"\0" * size)


class TestServiceStub:
    """The four multicallable shapes for the suite's methods, on any channel-shaped object
    (a plain `grpc.aio.Channel` or the framework's `connect()` channel)."""

    __test__ = False

    def __init__(self, channel: Any, service: str = SERVICE) -> None:
        self.channel = channel
        for name, (request, response, streams_in, streams_out, _) in METHODS.items():
            kind = f"{'stream' if streams_in else 'unary'}_{'stream' if streams_out else 'unary'}"
            factory = getattr(channel, kind)
            setattr(
                self,
                name,
                factory(
                    f"/{service}/{name}",
                    request_serializer=message_class(request).SerializeToString,
                    response_deserializer=message_class(response).FromString,
                ),
            )
