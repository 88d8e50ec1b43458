"""The whole example system as separate processes (`python -m framework up`), driven only
through the gateway over HTTP: once on SQLite + the in-process bus, once on PostgreSQL +
NATS JetStream.  Ctrl-C (SIGINT) must leave no process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sqlite3
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

httpx = pytest.importorskip("httpx")
pytest.importorskip("framework.gateway", reason="the gateway is not in this checkout")
pytest.importorskip("framework.saga.service", reason="the saga service is not in this checkout")

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 240.0  # ten Python processes importing grpc on a loaded 2-core machine
STOP_TIMEOUT_S = 90.0
PASSWORD = "correct horse battery"


@dataclass
class System:
    gateway: str
    data: Path
    process: asyncio.subprocess.Process
    log: Path
    name: str
    store: str = ""  # the PostgreSQL DSN when the system runs on PostgreSQL

    def client(self) -> Any:
        return httpx.AsyncClient(base_url=self.gateway, timeout=30.0)


def _processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose environment mentions `text` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if text.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _instance_pid(data: Path, instance: str) -> int:
    for pid in _processes_mentioning(str(data)):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"SERVICE_INSTANCE={instance}".encode() in environ:
            return pid
    raise AssertionError(f"no process for {instance}")


async def _start(tmp: Path, extra_env: dict[str, str], name: str) -> System:
    data = tmp / "data"
    log = tmp / "system.log"
    env = {
        **os.environ,
        "SYSTEM_DATA_DIR": str(data),
        "SYSTEM_REGISTRY_PORT": "0",
        "SYSTEM_GATEWAY_PORT": "0",
        "SYSTEM_NAME": name,
        **extra_env,
    }
    with log.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "framework",
            "up",
            str(ROOT / "system.toml"),
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=asyncio.subprocess.STDOUT,
        )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT_S
    while True:
        text = log.read_text(errors="replace")
        found = re.search(r"^gateway: (http://\S+)$", text, re.M)
        if found:
            return System(found.group(1), data, process, log, name, env.get("SYSTEM_STORE", ""))
        if process.returncode is not None:
            raise AssertionError(f"up exited with {process.returncode}:\n{text[-4000:]}")
        if loop.time() > deadline:
            process.send_signal(signal.SIGINT)
            raise AssertionError(f"the system did not start in {START_TIMEOUT_S}s:\n{text[-4000:]}")
        await asyncio.sleep(0.5)


async def _stop(system: System) -> None:
    system.process.send_signal(signal.SIGINT)
    try:
        code = await asyncio.wait_for(system.process.wait(), STOP_TIMEOUT_S)
    except TimeoutError:
        system.process.kill()
        raise
    left = _processes_mentioning(str(system.data))
    assert left == [], f"processes left behind after Ctrl-C: {left}"
    assert code == 0, system.log.read_text(errors="replace")[-3000:]


@pytest_asyncio.fixture(
    scope="module",
    loop_scope="module",
    params=[
        "sqlite",
        pytest.param("postgres+nats", marks=[pytest.mark.postgres, pytest.mark.nats]),
    ],
)
async def system(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[System]:
    """The whole system, started once per backend for this module, stopped with SIGINT."""
    name = f"e2e{uuid.uuid4().hex[:8]}"
    env: dict[str, str] = {}
    if request.param != "sqlite":
        from tests.conftest import NATS_URL, POSTGRES_DSN, _need

        _need("PostgreSQL", "127.0.0.1", 5432)
        _need("NATS", "127.0.0.1", 4222)

        env = {"SYSTEM_STORE": POSTGRES_DSN, "SYSTEM_BUS": NATS_URL}
    started = await _start(tmp_path_factory.mktemp(request.param), env, name)
    try:
        yield started
    finally:
        await _stop(started)
        if request.param != "sqlite":
            from tests.services.kit import drop_schemas

            await drop_schemas(env["SYSTEM_STORE"], name)


async def _customer(client: Any) -> tuple[str, str]:
    email = f"c-{uuid.uuid4().hex[:10]}@example.com"
    reply = await client.post(
        "/v1/users",
        json={"email": email, "displayName": "Customer", "password": PASSWORD},
        headers={"Idempotency-Key": str(uuid.uuid4())},
    )
    assert reply.status_code == 200, reply.text
    user_id = reply.json()["user"]["userId"]
    login = await client.post("/v1/users:login", json={"email": email, "password": PASSWORD})
    assert login.status_code == 200, login.text
    return user_id, login.json()["accessToken"]


def _auth(token: str, keyed: bool = True) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}"}
    if keyed:
        headers["Idempotency-Key"] = str(uuid.uuid4())
    return headers


async def _order(client: Any, user_id: str, token: str, lines: list[tuple[str, int, int]]) -> str:
    created = await client.post(
        "/v1/orders", json={"userId": user_id, "currency": "EUR"}, headers=_auth(token)
    )
    assert created.status_code == 200, created.text
    order_id: str = created.json()["order"]["orderId"]
    for sku, quantity, price in lines:
        added = await client.post(
            f"/v1/orders/{order_id}/items",
            json={"sku": sku, "quantity": quantity, "unitPriceMinor": str(price)},
            headers=_auth(token),
        )
        assert added.status_code == 200, added.text
    return order_id


async def _reserved(client: Any, token: str, sku: str) -> int:
    reply = await client.get(f"/v1/stocks/{sku}", headers=_auth(token, keyed=False))
    assert reply.status_code == 200, reply.text
    return int(reply.json()["stock"].get("reserved", 0))


async def test_an_order_is_confirmed_and_its_customer_notified(system: System) -> None:
    """Confirm: stock reserved, payment charged, order CONFIRMED, notifications listed."""
    async with system.client() as client:
        user_id, token = await _customer(client)
        before = await _reserved(client, token, "GADGET-2")
        order_id = await _order(client, user_id, token, [("GADGET-2", 2, 19_99)])
        confirmed = await client.post(
            f"/v1/orders/{order_id}:confirm", json={}, headers=_auth(token)
        )
        assert confirmed.status_code == 200, confirmed.text
        order = confirmed.json()["order"]
        assert order["status"] == "ORDER_STATUS_CONFIRMED" and order["totalMinor"] == "3998"
        assert await _reserved(client, token, "GADGET-2") == before + 2
        # notifications and the order list are read models fed by events: eventually there
        listed = await _eventually(
            client, f"/v1/users/{user_id}/notifications", token, "notifications", 2
        )
        subjects = sorted(n["subject"] for n in listed)
        assert len(subjects) == 2 and any("confirmed" in s for s in subjects), subjects
        orders = await _eventually(client, f"/v1/users/{user_id}/orders", token, "orders", 1)
        assert [o["orderId"] for o in orders] == [order_id]


async def _eventually(
    client: Any, path: str, token: str, field: str, count: int, timeout_s: float = 120.0
) -> list[Any]:
    """GET `path` until its `field` lists `count` items (bounded in time)."""
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + timeout_s
    while True:
        page = await client.get(path, headers=_auth(token, False))
        assert page.status_code == 200, page.text
        listed: list[Any] = page.json().get(field, [])
        if len(listed) >= count or loop.time() > give_up_at:
            return listed
        await asyncio.sleep(0.25)


async def _stored_stock(system: System, sku: str) -> tuple[int, int]:
    """(reserved, saga barrier rows) as the inventory's own database holds them."""
    if system.store:
        import asyncpg

        conn = await asyncpg.connect(system.store)
        try:
            schema = f'"{system.name}_inventory"'
            reserved = await conn.fetchval(f"SELECT reserved FROM {schema}.stock WHERE sku=$1", sku)
            rows = await conn.fetchval(f"SELECT COUNT(*) FROM {schema}.saga_barrier")
        finally:
            await conn.close()
        return int(reserved), int(rows)
    with contextlib.closing(sqlite3.connect(system.data / "inventory.sqlite3")) as db:
        found = db.execute("SELECT reserved FROM stock WHERE sku = ?", (sku,)).fetchone()
        count = db.execute("SELECT COUNT(*) FROM saga_barrier").fetchone()
    return int(found[0]), int(count[0])


async def test_the_inventory_lives_in_the_systems_store(system: System) -> None:
    """The inventory's stock and saga barrier are in the system's store for the service
    (its PostgreSQL schema on PostgreSQL), and agree with what the API says."""
    async with system.client() as client:
        _, token = await _customer(client)
        reserved, rows = await _stored_stock(system, "GADGET-2")
        assert reserved == await _reserved(client, token, "GADGET-2")
        assert rows >= 1  # at least the seed's AddStock went through the barrier


async def test_a_declined_payment_releases_the_stock_and_cancels_the_order(system: System) -> None:
    """Above the card limit: saga compensates (reservation released), order CANCELLED."""
    async with system.client() as client:
        user_id, token = await _customer(client)
        before = await _reserved(client, token, "WIDGET-1")
        order_id = await _order(client, user_id, token, [("WIDGET-1", 3, 500_00)])
        reply = await client.post(f"/v1/orders/{order_id}:confirm", json={}, headers=_auth(token))
        assert reply.status_code == 200, reply.text
        order = reply.json()["order"]
        assert order["status"] == "ORDER_STATUS_CANCELLED"
        assert "declined" in order["cancelReason"]
        assert await _reserved(client, token, "WIDGET-1") == before


async def test_http_errors_are_the_standard_ones(system: System) -> None:
    """401 without a token, 403 for another's order and a missing scope, 400 for bad JSON,
    404 for an unknown route, 429 with Retry-After past a rate limit."""
    async with system.client() as client:
        ada, ada_token = await _customer(client)
        _, bob_token = await _customer(client)
        order_id = await _order(client, ada, ada_token, [])
        assert (await client.get(f"/v1/orders/{order_id}")).status_code == 401
        assert (
            await client.get(f"/v1/orders/{order_id}", headers=_auth(bob_token, False))
        ).status_code == 403
        scope = await client.post(
            "/v1/stocks/WIDGET-1:add", json={"quantity": 5}, headers=_auth(ada_token)
        )
        assert scope.status_code == 403
        bad = await client.post(
            "/v1/users", content=b'{"email": ', headers={"Content-Type": "application/json"}
        )
        assert bad.status_code == 400 and bad.json().get("message")
        assert (await client.get("/v1/no-such-thing")).status_code == 404
        # UpdateProfile: 5/s, burst 10 per caller (the contract). A loaded machine may
        # answer each call in more than 200 ms, and then none is refused: what holds on any
        # machine is the bucket's bound, and a 429 carries Retry-After.
        loop = asyncio.get_running_loop()
        started = loop.time()
        admitted, limited = 0, []
        for i in range(30):
            reply = await client.patch(
                f"/v1/users/{ada}", json={"displayName": f"Ada {i}"}, headers=_auth(ada_token)
            )
            if reply.status_code == 429:
                limited.append(reply)
                break
            assert reply.status_code == 200, reply.text
            admitted += 1
        elapsed = loop.time() - started
        assert admitted <= 10 + 5 * elapsed
        assert all(float(r.headers["Retry-After"]) > 0 for r in limited)
        if elapsed < (30 - 10) / 5:  # faster than the limit: it must have refused one
            assert limited, (admitted, elapsed)


async def test_killing_a_payment_replica_fails_no_order(system: System) -> None:
    """SIGKILL payment-1 while orders confirm: every order ends CONFIRMED; it is restarted."""
    async with system.client() as client:
        user_id, token = await _customer(client)
        orders = [await _order(client, user_id, token, [("GIZMO-3", 1, 10_00)]) for _ in range(6)]

        async def confirm(order_id: str) -> str:
            reply = await client.post(
                f"/v1/orders/{order_id}:confirm", json={}, headers=_auth(token)
            )
            assert reply.status_code == 200, reply.text
            return str(reply.json()["order"]["status"])

        victim = _instance_pid(system.data, "payment-1")
        confirming = [asyncio.create_task(confirm(o)) for o in orders]
        await asyncio.sleep(0)  # let the first requests leave
        os.kill(victim, signal.SIGKILL)
        statuses = await asyncio.gather(*confirming)
        assert statuses == ["ORDER_STATUS_CONFIRMED"] * len(orders)
        for _ in range(240):
            try:
                if _instance_pid(system.data, "payment-1") != victim:
                    break
            except AssertionError:
                pass
            await asyncio.sleep(0.25)
        assert _instance_pid(system.data, "payment-1") != victim
        assert "payment-1" in system.log.read_text() and "signal SIGKILL" in system.log.read_text()


async def test_the_demo_tells_both_outcomes(system: System) -> None:
    """`make demo`'s walkthrough against this system exits 0 and prints both saga outcomes."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.demo.walkthrough",
        "--gateway",
        system.gateway,
        "--data",
        str(system.data),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 180)
    text = out.decode()
    assert process.returncode == 0, text[-3000:]
    assert ": COMPLETED" in text and ": COMPENSATED" in text


async def test_the_cli_lists_the_running_system(system: System) -> None:
    """`python -m framework services --json` lists every service with healthy instances."""
    endpoints = json.loads((system.data / "endpoints.json").read_text())
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "framework",
        "services",
        "--json",
        "--registry",
        endpoints["registry"],
        "--token-file",
        endpoints["operator_token"],
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    listed = {s["service"]: s for s in json.loads(out)["services"]}
    assert len(listed["payment.v1.PaymentService"]["instances"]) >= 2
    assert "saga.v1.SagaService" in listed and "order.v1.OrderService" in listed
