"""The example service has no secret in its source: it refuses to start without one, and a
token forged with the old published secret is refused."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
from pathlib import Path

import pytest

from framework.auth.policy import BearerToken
from framework.client import connect
from framework.errors import NotFoundError, UnauthenticatedError
from gen.inventory.v1 import inventory_pb2 as pb
from gen.inventory.v1.inventory_pb2_grpc import InventoryServiceStub
from services.inventory.devauth import DevTokens
from services.inventory.main import InventoryConfig, build

ROOT = Path(__file__).resolve().parents[2]
# the secret the service used to fall back to (it was in services/inventory/main.py)
OLD_PUBLIC_SECRET = "inventory-dev-secret-not-for-production-use"


async def test_service_without_a_secret_refuses_to_start(tmp_path: Path) -> None:
    """`python -m services.inventory.main` with no secret and no dev flag exits 1 saying what
    to set; it never binds."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("INVENTORY_JWT_SECRET", "INVENTORY_DEV", "SERVICE_JWKS")
    }
    env.update(SERVICE_PORT="0", INVENTORY_DB_PATH=str(tmp_path / "inv.db"))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.inventory.main",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 1, out.decode()
    assert "INVENTORY_JWT_SECRET is not set" in out.decode()
    assert "INVENTORY_DEV=1" in out.decode()
    assert not (tmp_path / "inv.db").exists()


def test_no_secret_in_the_configuration_defaults() -> None:
    """InventoryConfig has no default secret; from_env without one raises, with the flag it
    makes a fresh random one per run."""
    with pytest.raises(ValueError, match="INVENTORY_JWT_SECRET"):
        InventoryConfig.from_env({})
    first = InventoryConfig.from_env({"INVENTORY_DEV": "1"})
    second = InventoryConfig.from_env({"INVENTORY_DEV": "1"})
    assert first.jwt_secret != second.jwt_secret
    assert OLD_PUBLIC_SECRET not in (first.jwt_secret, second.jwt_secret)
    source = (ROOT / "services" / "inventory" / "main.py").read_text()
    assert OLD_PUBLIC_SECRET not in source


async def test_token_forged_with_the_old_public_secret_is_refused(tmp_path: Path) -> None:
    """In development mode, a token signed with the once-published secret is UNAUTHENTICATED
    and adds no stock; the run's own token works."""
    config = InventoryConfig.from_env(
        {"INVENTORY_DEV": "1", "INVENTORY_DB_PATH": str(tmp_path / "inv.db")}
    )
    config = dataclasses.replace(
        config, server=dataclasses.replace(config.server, host="127.0.0.1", port=0, grace_s=0)
    )
    service = await build(config)
    await service.server.start()
    forged = DevTokens(OLD_PUBLIC_SECRET).mint("mallory", ["inventory:read", "inventory:write"])
    attacker = connect(service.server.address, policies=[BearerToken(forged)])
    real = connect(
        service.server.address,
        policies=[BearerToken(service.tokens.mint("ann", ["inventory:read", "inventory:write"]))],
    )
    try:
        request = pb.AddStockRequest(sku="WIDGET-1", quantity=5)
        with pytest.raises(UnauthenticatedError) as caught:
            await InventoryServiceStub(attacker).AddStock(
                request, metadata=(("idempotency-key", "k1"),)
            )
        assert caught.value.reason == "TOKEN_BAD_SIGNATURE"
        with pytest.raises(NotFoundError):  # nothing was added
            await service.inventory.get_stock("WIDGET-1")
        await InventoryServiceStub(real).AddStock(request, metadata=(("idempotency-key", "k2"),))
        assert (await service.inventory.get_stock("WIDGET-1")).on_hand == 5
    finally:
        await attacker.close()
        await real.close()
        await service.server.stop(0)
