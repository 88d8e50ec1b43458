"""Property-based run of schemathesis against the running gateway and its own OpenAPI document.

Bounded to fit the default suite (`SCHEMATHESIS_EXAMPLES` per operation, a
fixed seed, a time budget); `make gateway-fuzz` runs it longer.  It must find no
5xx answer and no response that breaks the schema the gateway publishes.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
from pathlib import Path

from framework.gateway import GatewayConfig, build_gateway, running
from framework.policies.validation import ValidationPolicy
from framework.testing import serve
from services.inventory.application import Inventory
from services.inventory.devauth import DevTokens
from services.inventory.main import inventory_policies
from services.inventory.servicer import InventoryServicer
from services.inventory.store import SqliteInventoryStore
from tests.gateway.conftest import LIBRARY
from tests.gateway.library import LibraryServicer

DEV_SECRET = secrets.token_urlsafe(32)  # this test's own HS256 secret

INVENTORY = "inventory.v1.InventoryService"

EXAMPLES = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "25"))
# schemathesis 4 treats --max-time as a budget to spend (fuzzing and stateful testing
# repeat until it runs out), so the default run passes none and ends after
# SCHEMATHESIS_EXAMPLES per operation; `make gateway-fuzz` sets a budget.
MAX_TIME_S = int(os.environ.get("SCHEMATHESIS_MAX_TIME_S", "0"))
# The bound on the subprocess: a hang fails the test instead of stalling the suite.
BOUND_S = (MAX_TIME_S or 600) + 120
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


async def test_schemathesis_finds_no_server_error_and_no_schema_violation(tmp_path: Path) -> None:
    """Generated requests (valid and invalid) to every operation: no 5xx, responses conform."""
    tokens = DevTokens(DEV_SECRET)
    store = SqliteInventoryStore(str(tmp_path / "inventory.sqlite3"))
    library = LibraryServicer()
    try:
        async with (
            serve(InventoryServicer(Inventory(store)), policies=inventory_policies(tokens)) as inv,
            serve(library, policies=[ValidationPolicy()]) as lib,
        ):
            config = GatewayConfig(
                port=0,
                backends={INVENTORY: inv.target, LIBRARY: lib.target},
                jwt_secret=DEV_SECRET,
                rate_per_s=10_000,
                burst=10_000,
            )
            gateway = build_gateway(config, services=[INVENTORY, LIBRARY])
            token = tokens.mint("fuzzer", ["inventory:write", "inventory:read", "library:write"])
            async with running(gateway) as url:
                text, code = await _run(url, token, tmp_path)
    finally:
        await store.close()
    assert code == 0, text[-8000:]
    assert len(library.requests) >= 5  # the run reached the backends, not just the gateway


async def _run(url: str, token: str, cwd: Path) -> tuple[str, int]:
    process = await asyncio.create_subprocess_exec(
        str(SCHEMATHESIS),
        "run",
        f"{url}/openapi.json",
        "--checks",
        "not_a_server_error,response_schema_conformance,content_type_conformance",
        "--max-examples",
        str(EXAMPLES),
        "--seed",
        "15",
        "--workers",
        "1",
        "--request-timeout",
        "60",
        "--header",
        f"Authorization: Bearer {token}",
        # Watching a shelf waits for new books until the deadline: a 504 by design.
        "--exclude-operation-id",
        "LibraryService_WatchBooks",
        "--generation-database",
        ":memory:",
        "--no-color",
        *(["--max-time", str(MAX_TIME_S)] if MAX_TIME_S else []),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=cwd,
    )
    output, _ = await asyncio.wait_for(process.communicate(), BOUND_S)
    (cwd / "schemathesis.log").write_bytes(output)
    return output.decode(errors="replace"), process.returncode or 0
