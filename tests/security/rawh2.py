"""A minimal HTTP/2 client for attack tests: one gRPC call whose header bytes are sent
exactly as given (grpc's own client refuses to send invalid metadata).

HPACK literal fields without Huffman coding, one stream; the answer is read only as
far as the frames that end the stream (headers are not decoded).
"""

from __future__ import annotations

import asyncio
import struct

HEADERS, DATA, RST_STREAM, SETTINGS, PING, GOAWAY = 1, 0, 3, 4, 6, 7
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1


def _integer(value: int, prefix_bits: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([value])
    out = [limit]
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    """Literal header field, never indexed, new name, no Huffman coding (RFC 7541 6.2.3)."""
    return b"\x10" + _integer(len(name), 7) + name + _integer(len(value), 7) + value


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    header = struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream)
    return header + payload


async def grpc_call(
    host: str,
    port: int,
    path: str,
    metadata: list[tuple[bytes, bytes]],
    message: bytes,
    timeout_s: float = 10.0,
) -> list[tuple[int, int]]:
    """Send one unary gRPC request; return the (frame type, flags) seen on its stream."""
    reader, writer = await asyncio.open_connection(host, port)
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path.encode()),
        (b":authority", f"{host}:{port}".encode()),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        *metadata,
    ]
    block = b"".join(_literal(k, v) for k, v in headers)
    body = b"\x00" + struct.pack(">I", len(message)) + message
    writer.write(
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        + _frame(SETTINGS, 0, 0)
        + _frame(HEADERS, END_HEADERS, 1, block)
        + _frame(DATA, END_STREAM, 1, body)
    )
    await writer.drain()
    seen: list[tuple[int, int]] = []

    async def read() -> None:
        while True:
            head = await reader.readexactly(9)
            length = int.from_bytes(head[:3], "big")
            kind, flags = head[3], head[4]
            stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
            payload = await reader.readexactly(length)
            if kind == SETTINGS and not flags & ACK:
                writer.write(_frame(SETTINGS, ACK, 0))
            elif kind == PING and not flags & ACK:
                writer.write(_frame(PING, ACK, 0, payload))
            if stream == 1:
                seen.append((kind, flags))
                if kind == RST_STREAM or (kind == HEADERS and flags & END_STREAM):
                    return
            if kind == GOAWAY:
                return

    try:
        await asyncio.wait_for(read(), timeout_s)
    finally:
        writer.close()
    return seen
