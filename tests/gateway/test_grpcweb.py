"""gRPC-Web through the gateway: real browser clients under Node, and the framing by hand.

The Node clients (`@connectrpc/connect-web` in binary mode, `grpc-web` in text
mode) are installed by `make grpcweb` into .tools/grpcweb (git-ignored); the
test skips when Node or the packages are missing, unless REQUIRE_SERVICES=1.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor

from gen.echo.v1 import echo_pb2
from tests.gateway.conftest import Harness, mint

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / ".tools" / "grpcweb"
CLIENT = Path(__file__).with_name("grpcweb_client.mjs")


def _node() -> str:
    node = shutil.which("node")
    installed = (TOOLS / "node_modules" / "@connectrpc" / "connect-web").is_dir()
    if node and installed:
        return node
    why = "node is not installed" if not node else "run `make grpcweb` (npm clients)"
    if os.environ.get("REQUIRE_SERVICES") == "1":
        pytest.fail(f"gRPC-Web clients unavailable: {why}")
    pytest.skip(f"gRPC-Web clients unavailable: {why}")


def _descriptor_set(file: FileDescriptor) -> bytes:
    ordered: list[FileDescriptor] = []

    def visit(current: FileDescriptor) -> None:
        if current in ordered:
            return
        for dependency in current.dependencies:
            visit(dependency)
        ordered.append(current)

    visit(file)
    out = descriptor_pb2.FileDescriptorSet()
    for current in ordered:
        current.CopyToProto(out.file.add())
    return out.SerializeToString()


async def test_grpc_web_clients_under_node(gw: Harness, tmp_path: Path) -> None:
    """connect-web (binary) and grpc-web (text): unary, server stream, errors, auth."""
    node = _node()
    descriptors = tmp_path / "echo.binpb"
    descriptors.write_bytes(_descriptor_set(echo_pb2.DESCRIPTOR))
    script = TOOLS / CLIENT.name  # next to its node_modules, so imports resolve
    script.write_text(CLIENT.read_text())
    process = await asyncio.create_subprocess_exec(
        node,
        str(script),
        gw.url,
        str(descriptors),
        mint(["echo:read"]),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 180)
    results = {r["case"]: r for r in map(json.loads, stdout.decode().splitlines())}
    assert process.returncode == 0, stdout.decode() + stderr.decode()
    assert results["binary-unary"]["text"] == "hello from connect-web"
    assert results["binary-stream"]["texts"] == ["s#0", "s#1", "s#2"]
    assert results["binary-error"] == {
        "case": "binary-error",
        "code": 5,
        "message": "no such thing",
    }
    assert results["binary-unauthenticated"]["code"] == 16
    assert results["text-unary"]["text"] == "hello from grpc-web"
    assert results["text-stream"]["texts"] == ["t#0", "t#1"]
    assert results["text-error"] == {"case": "text-error", "code": 10, "message": "try again"}


def _frame(message: bytes, flags: int = 0) -> bytes:
    return struct.pack(">BI", flags, len(message)) + message


def _frames(body: bytes) -> list[tuple[int, bytes]]:
    frames, offset = [], 0
    while offset < len(body):
        flags, length = struct.unpack_from(">BI", body, offset)
        frames.append((flags, body[offset + 5 : offset + 5 + length]))
        offset += 5 + length
    return frames


async def test_grpc_web_framing(gw: Harness) -> None:
    """Binary and text bodies: data frames then a trailers frame with grpc-status."""
    request = echo_pb2.EchoRequest(text="framed").SerializeToString()
    headers = {
        "authorization": f"Bearer {mint(['echo:read'])}",
        "content-type": "application/grpc-web+proto",
    }
    binary = await gw.client.post(
        "/echo.v1.EchoService/Echo", content=_frame(request), headers=headers
    )
    frames = _frames(binary.content)
    assert binary.headers["content-type"] == "application/grpc-web+proto"
    assert echo_pb2.EchoResponse.FromString(frames[0][1]).text == "framed"
    assert frames[-1][0] == 0x80 and b"grpc-status: 0" in frames[-1][1]
    text_headers = {**headers, "content-type": "application/grpc-web-text"}
    text = await gw.client.post(
        "/echo.v1.EchoService/Echo", content=base64.b64encode(_frame(request)), headers=text_headers
    )
    decoded = b"".join(base64.b64decode(c + b"=" * (-len(c) % 4)) for c in [text.content])
    assert echo_pb2.EchoResponse.FromString(_frames(decoded)[0][1]).text == "framed"


async def test_grpc_web_errors_are_trailers(gw: Harness) -> None:
    """Errors answer HTTP 200 with grpc-status, grpc-message and details in the trailers."""
    headers = {"content-type": "application/grpc-web+proto"}
    missing = await gw.client.post(
        "/echo.v1.EchoService/Echo", content=_frame(b""), headers=headers
    )
    assert missing.status_code == 200
    trailers = _frames(missing.content)[-1][1].decode()
    assert "grpc-status: 16" in trailers and "grpc-status-details-bin: " in trailers
    unknown = await gw.client.post("/nope.v1.Nope/Call", content=_frame(b""), headers=headers)
    assert "grpc-status: 12" in _frames(unknown.content)[-1][1].decode()
    streaming_requests = await gw.client.post(
        "/echo.v1.EchoService/Collect", content=_frame(b""), headers=headers
    )
    assert "grpc-status: 12" in _frames(streaming_requests.content)[-1][1].decode()
    truncated = await gw.client.post(
        "/echo.v1.EchoService/Fail", content=b"\x00\x00\x00\x00\x09ab", headers=headers
    )
    assert "grpc-status: 3" in _frames(truncated.content)[-1][1].decode()
