"""`make run`: start the inventory service locally and show how to call it.

    python -m services.demo

Serves on 127.0.0.1:$SERVICE_PORT (default 50051; a free port when that one is
taken), with standard health, reflection and the full policy chain, on a
throwaway SQLite file (or `INVENTORY_DB_PATH`).  Prints the address, a dev
bearer token and example calls, then runs until SIGINT/SIGTERM and drains (exit code 0).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from services.inventory.main import DEV_FLAG, InventoryConfig, InventoryService, build

logger = logging.getLogger("services.demo")

DEFAULT_PORT = 50051
DEMO_SKU = "WIDGET-1"
SCOPES = ("inventory:read", "inventory:write")


def _config(environ: Mapping[str, str], db_dir: str) -> InventoryConfig:
    env = dict(environ)
    env.setdefault("SERVICE_PORT", str(DEFAULT_PORT))
    env.setdefault("SERVICE_GRACE_S", "5")
    env["SERVICE_HOST"] = "127.0.0.1"
    env.setdefault("INVENTORY_DB_PATH", str(Path(db_dir) / "inventory.sqlite3"))
    if not env.get("INVENTORY_JWT_SECRET"):
        env[DEV_FLAG] = "1"  # a random secret for this run, said at start (no secret to type)
    config = InventoryConfig.from_env(env)
    # no SO_REUSEPORT: a port held by another server must fail, not be shared
    server = dataclasses.replace(config.server, grpc_options=(("grpc.so_reuseport", 0),))
    return dataclasses.replace(config, server=server)


async def _start(config: InventoryConfig) -> InventoryService:
    service = await build(config)
    try:
        await service.server.start()
    except (OSError, RuntimeError) as error:
        await service.store.close()
        if config.server.port == 0:
            raise
        logger.warning("port %s is taken (%s); using a free port", config.server.port, error)
        free = dataclasses.replace(config.server, port=0)
        service = await build(dataclasses.replace(config, server=free))
        await service.server.start()
    return service


def _python() -> str:
    exe = Path(sys.executable)
    try:
        return str(exe.relative_to(Path.cwd()))
    except ValueError:
        return str(exe)


def _announce(service: InventoryService, token: str) -> None:
    address = service.server.address
    python = _python()
    call = (
        "import grpc; from gen.inventory.v1 import inventory_pb2 as pb, inventory_pb2_grpc as g; "
        f"stub = g.InventoryServiceStub(grpc.insecure_channel('{address}')); "
        f"print(stub.GetStock(pb.GetStockRequest(sku='{DEMO_SKU}')"
        ", metadata=[('authorization', 'Bearer ' + __import__('os').environ['TOKEN'])]))"
    )
    lines = [
        f"address: {address}",
        f"token: {token}",
        "",
        "inventory.v1.InventoryService is serving, with grpc.health.v1 and reflection.",
        f"Development mode ({DEV_FLAG}=1): the token above is signed with a random secret "
        "made for this run; it stops working when this process stops.",
        f"Stock of {DEMO_SKU} was added for you. Try, in another terminal:",
        f"  {python} -m framework health {address}",
        f"  TOKEN={token} \\",
        f'  {python} -c "{call}"',
        "Stop with Ctrl-C (SIGINT) or SIGTERM: health turns NOT_SERVING, calls drain.",
    ]
    print("\n".join(lines), flush=True)  # this module is a CLI


async def run(environ: Mapping[str, str]) -> None:
    # signals are watched from the start, so one that arrives early still drains cleanly
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        with tempfile.TemporaryDirectory(prefix="inventory-demo-") as db_dir:
            service = await _start(_config(environ, db_dir))
            try:
                await service.inventory.add_stock(DEMO_SKU, 100, idempotency_key="demo-seed")
                token = service.tokens.mint("demo-user", SCOPES, ttl_s=8 * 3600)
                _announce(service, token)
                await stop.wait()
                logger.info("signal received: draining")
            finally:
                await service.server.stop()  # NOT_SERVING, refuse new calls, grace, close store
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def main() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    asyncio.run(run(os.environ))


if __name__ == "__main__":
    main()
