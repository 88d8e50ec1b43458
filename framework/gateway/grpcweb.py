"""gRPC-Web framing (binary and text), for browsers calling services through the gateway.

A gRPC-Web body is a sequence of frames: one flag byte (0x00 data, 0x80
trailers; bit 0x01 compressed), a 4-byte big-endian length, the payload.  The
response ends with a trailers frame whose payload is `name: value\\r\\n` lines
(`grpc-status`, `grpc-message`, `grpc-status-details-bin`).  The text variant
(`application/grpc-web-text`) base64-encodes the body; requests may be several
base64 chunks, each padded, one after the other.

The gateway forwards the request message's bytes untouched and the response
messages' bytes untouched: no protobuf decoding on this path.
"""

from __future__ import annotations

import base64
import binascii
import struct

from framework.errors import InvalidArgumentError, UnimplementedError

__all__ = [
    "GRPC_WEB",
    "GRPC_WEB_TEXT",
    "data_frame",
    "decode_text",
    "is_grpc_web",
    "read_message",
    "trailer_frame",
]

GRPC_WEB = "application/grpc-web"
GRPC_WEB_TEXT = "application/grpc-web-text"
_HEADER = struct.Struct(">BI")
_TRAILERS = 0x80
_COMPRESSED = 0x01


def is_grpc_web(content_type: str) -> bool:
    return content_type.startswith(GRPC_WEB)


def is_text(content_type: str) -> bool:
    return content_type.startswith(GRPC_WEB_TEXT)


def decode_text(body: bytes) -> bytes:
    """The binary body of a grpc-web-text request (concatenated padded base64 chunks)."""
    compact = b"".join(body.split())
    out = bytearray()
    start = 0
    try:
        while start < len(compact):
            end = compact.find(b"=", start)
            if end < 0:
                out += base64.b64decode(compact[start:], validate=True)
                break
            while end < len(compact) and compact[end : end + 1] == b"=":
                end += 1
            out += base64.b64decode(compact[start:end], validate=True)
            start = end
    except (binascii.Error, ValueError) as error:
        raise InvalidArgumentError(f"the grpc-web-text body is not valid base64: {error}") from None
    return bytes(out)


def read_message(body: bytes) -> bytes:
    """The one request message of a unary or server-streaming call."""
    if len(body) < _HEADER.size:
        raise InvalidArgumentError(
            f"the gRPC-Web body has {len(body)} bytes; a message frame needs at least 5"
        )
    flags, length = _HEADER.unpack_from(body)
    if flags & _COMPRESSED:
        raise UnimplementedError("compressed gRPC-Web messages are not supported; send them plain")
    if flags & _TRAILERS:
        raise InvalidArgumentError("the gRPC-Web request starts with a trailers frame")
    end = _HEADER.size + length
    if len(body) < end:
        raise InvalidArgumentError(
            f"the gRPC-Web frame announces {length} bytes but the body holds {len(body) - 5}"
        )
    if len(body) > end:
        raise UnimplementedError(
            "more than one request message: client-streaming calls are not available over gRPC-Web"
        )
    return body[_HEADER.size : end]


def data_frame(message: bytes) -> bytes:
    return _HEADER.pack(0, len(message)) + message


def trailer_frame(trailers: list[tuple[str, str]]) -> bytes:
    payload = "".join(f"{name}: {value}\r\n" for name, value in trailers).encode()
    return _HEADER.pack(_TRAILERS, len(payload)) + payload
