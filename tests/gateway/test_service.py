"""The gateway as deployed: health, the registry, the inventory service, the CLI, imports."""

from __future__ import annotations

import secrets
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from framework.gateway import GatewayConfig, build_gateway, running
from framework.registry.health_probe import ProbeConfig
from framework.registry.registry import Registry, RegistryConfig
from framework.registry.service import RegistryServicer
from framework.registry.sqlite import SqliteStore
from framework.testing import serve
from services.inventory.application import Inventory
from services.inventory.devauth import DEV_AUDIENCE, DEV_ISSUER, DevTokens
from services.inventory.main import inventory_policies
from services.inventory.servicer import InventoryServicer
from services.inventory.store import SqliteInventoryStore
from tests.gateway.conftest import LIBRARY, Harness
from tests.gateway.library import LibraryServicer

DEV_SECRET = secrets.token_urlsafe(32)  # this test's own HS256 secret

ROOT = Path(__file__).resolve().parents[2]
INVENTORY = "inventory.v1.InventoryService"


async def test_healthz_and_readyz_mirror_backend_health(gw: Harness) -> None:
    """/healthz is up; /readyz is 200 while backends are SERVING and 503 once one is not."""
    assert (await gw.client.get("/healthz")).json() == {"status": "SERVING"}
    ready = await gw.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["services"] == {
        "echo.v1.EchoService": "SERVING",
        "gateway.v1.LibraryService": "SERVING",
    }
    await gw.backend.server.health.drain()
    draining = await gw.client.get("/readyz")
    assert draining.status_code == 503
    assert draining.json()["services"]["gateway.v1.LibraryService"] == "NOT_SERVING"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[tuple[Registry, str]]:
    node = Registry(
        SqliteStore(tmp_path / "registry.sqlite"), RegistryConfig(probe=ProbeConfig(interval_s=0))
    )
    await node.start()
    try:
        async with serve(RegistryServicer(node)) as server:
            yield node, server.target
    finally:
        await node.close()


async def test_instances_from_the_registry_with_retries_elsewhere(
    registry: tuple[Registry, str],
) -> None:
    """Services found in the registry; idempotent calls to a dead instance are retried elsewhere."""
    node, address = registry
    library = LibraryServicer()
    async with serve(library) as live:
        await node.register(LIBRARY, live.target, ttl_s=60)
        await node.register(LIBRARY, f"127.0.0.1:{_free_port()}", ttl_s=60)  # nobody there
        config = GatewayConfig(port=0, registry=address, auth="off")
        gateway = build_gateway(config, services=[LIBRARY])
        async with running(gateway) as url, httpx.AsyncClient(base_url=url) as client:
            codes = [(await client.get(f"/v1/shelves/s{i}")).status_code for i in range(6)]
    assert codes == [200] * 6
    assert len(library.requests["GetShelf"]) == 6


async def test_inventory_service_behind_the_gateway(tmp_path: Path) -> None:
    """The real inventory service: add stock, read it, reserve too much (400), bad SKU (400)."""
    tokens = DevTokens(DEV_SECRET)
    store = SqliteInventoryStore(str(tmp_path / "inventory.sqlite3"))
    try:
        async with serve(
            InventoryServicer(Inventory(store)), policies=inventory_policies(tokens)
        ) as t:
            config = GatewayConfig(
                port=0,
                backends={INVENTORY: t.target},
                jwt_secret=DEV_SECRET,
                jwt_issuer=(DEV_ISSUER,),
                jwt_audience=DEV_AUDIENCE,
            )
            gateway = build_gateway(config, services=[INVENTORY])
            token = tokens.mint("clerk", ["inventory:write", "inventory:read"])
            auth = {"authorization": f"Bearer {token}"}
            async with running(gateway) as url, httpx.AsyncClient(base_url=url) as client:
                added = await client.post(
                    "/v1/stocks/SKU-1:add",
                    json={"quantity": 5},
                    headers={**auth, "idempotency-key": str(uuid.uuid4())},
                )
                assert added.status_code == 200, added.text
                stock = await client.get("/v1/stocks/SKU-1", headers=auth)
                assert stock.json()["stock"]["available"] == "5"
                reservation = str(uuid.uuid4())
                short = await client.put(
                    f"/v1/reservations/{reservation}",
                    json={"orderId": str(uuid.uuid4()), "lines": [{"sku": "SKU-1", "quantity": 9}]},
                    headers={**auth, "idempotency-key": str(uuid.uuid4())},
                )
                assert short.status_code == 400
                assert short.json()["code"] == 9  # FAILED_PRECONDITION
                bad = await client.get("/v1/stocks/bad%20sku", headers=auth)
                assert bad.status_code == 400
                violation = next(d for d in bad.json()["details"] if "BadRequest" in d["@type"])
                assert violation["fieldViolations"][0]["field"] == "sku"
                unknown = await client.get("/v1/stocks/NOPE", headers=auth)
                assert unknown.status_code == 404
    finally:
        await store.close()


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "framework", "gateway", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        check=False,
    )


def test_cli_lists_the_routes() -> None:
    """`python -m framework gateway --routes` prints every binding of the annotated services."""
    result = _cli("--registry", "127.0.0.1:1", "--auth", "off", "--routes")
    assert result.returncode == 0, result.stderr
    assert "POST    /v1/stocks/{sku}:add" in result.stdout
    assert "/inventory.v1.InventoryService/AddStock" in result.stdout
    assert "/v1/users/{user_id}" in result.stdout
    assert "LibraryService" not in result.stdout  # the testing context is not exposed


def test_cli_refuses_a_config_without_keys_or_backends() -> None:
    """No token keys (auth on) or no registry/backends: exit 2 with what to set."""
    no_keys = _cli("--backend", f"{INVENTORY}=127.0.0.1:1")
    assert no_keys.returncode == 2
    assert "GATEWAY_JWT_SECRET" in no_keys.stderr
    nowhere = _cli("--auth", "off")
    assert nowhere.returncode == 2
    assert "registry" in nowhere.stderr


def test_import_framework_loads_no_http_stack() -> None:
    """`import framework` and `import framework.gateway` import neither Starlette nor uvicorn."""
    code = (
        "import sys, framework, framework.gateway; "
        "print(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('starlette', 'uvicorn', 'httpx')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert result.stdout.strip() == "[]"
