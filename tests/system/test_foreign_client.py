"""A foreign gRPC client works unchanged: Node's @grpc/grpc-js finds a service through the
registry, checks its standard health and calls it (public methods, then with a token)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.user.main import UserConfig, build
from services.user.passwords import Argon2Config
from tests.services.kit import Backend, Keys, make_keys, runtime_config, start_registry

ROOT = Path(__file__).resolve().parents[2]
GRPCJS = ROOT / ".tools/grpcjs"
HEALTH_PROTO = """syntax = "proto3";
package grpc.health.v1;
message HealthCheckRequest { string service = 1; }
message HealthCheckResponse {
  enum ServingStatus { UNKNOWN = 0; SERVING = 1; NOT_SERVING = 2; SERVICE_UNKNOWN = 3; }
  ServingStatus status = 1;
}
service Health { rpc Check(HealthCheckRequest) returns (HealthCheckResponse); }
"""


@pytest.fixture
def grpcjs() -> Path:
    """The npm packages `make grpcjs` installs under .tools/grpcjs (skip if absent locally)."""
    if shutil.which("node") is None or not (GRPCJS / "node_modules/@grpc/grpc-js").is_dir():
        why = "node is not installed" if shutil.which("node") is None else "run `make grpcjs`"
        message = f"Node's grpc-js client unavailable: {why} (npm; .ci/run installs it)"
        if os.environ.get("REQUIRE_SERVICES") == "1":
            pytest.fail(message)
        pytest.skip(message + "; set REQUIRE_SERVICES=1 to make this a failure")
    return GRPCJS


@pytest.fixture
async def registry_and_user(tmp_path: Path) -> AsyncIterator[tuple[str, Keys]]:
    keys = make_keys(tmp_path / "keys")
    server, registry = await start_registry(tmp_path)
    token = keys.token_file(tmp_path, "service:user", ["registry:register"])
    user = await build(
        UserConfig(
            runtime_config(
                "user", keys, Backend("sqlite", tmp_path), registry=server.address, token_file=token
            ),
            signing_key_path=str(keys.files.user_signing),
            argon2=Argon2Config(time_cost=1, memory_cost_kib=1024, parallelism=1),
        )
    )
    await user.server.start()
    try:
        yield server.address, keys
    finally:
        await user.server.stop(0)
        await server.stop(0)
        await registry.close()


async def test_node_grpc_js_discovers_checks_and_calls_the_user_service(
    grpcjs: Path, registry_and_user: tuple[str, Keys], tmp_path: Path
) -> None:
    """grpc-js: Discover -> Health SERVING -> RegisterUser -> LogIn -> GetUser (401 then ok)."""
    registry, keys = registry_and_user
    health = tmp_path / "health.proto"
    health.write_text(HEALTH_PROTO)
    email = f"node-{uuid.uuid4().hex[:8]}@example.com"
    process = await asyncio.create_subprocess_exec(
        "node",
        str(ROOT / "tests/system/foreign_client.mjs"),
        registry,
        str(ROOT / "protos"),
        str(health),
        email,
        env={
            "GRPCJS_DIR": str(grpcjs),
            "REGISTRY_TOKEN": keys.token("operator", ["registry:read"]),
            "PATH": os.environ.get("PATH", ""),
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()
    seen = json.loads(out.decode().strip().splitlines()[-1])
    assert "error" not in seen, seen
    assert seen["health"] == "SERVING"
    assert seen["token_type"] == "Bearer" and "orders:write" in seen["scopes"]
    assert seen["anonymous_get"] == 16  # UNAUTHENTICATED
    assert seen["me"] == email
