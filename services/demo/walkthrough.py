"""`make demo`: the example system's story, told over HTTP through the gateway.

    python -m services.demo.walkthrough                  # starts a throwaway system, then stops it
    python -m services.demo.walkthrough --gateway URL --data DIR   # against a running `make run`

Register and log in, create an order, add items, confirm it (the order saga reserves
stock, charges the payment, sends a notification) and read the notification; then an
order the card limit declines: the saga compensates (stock released) and the order is
cancelled.  Every HTTP exchange is printed, and each saga's step log (read from the
orchestrator with the operator token).  Exit 0 when both outcomes are as expected.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 180.0
PASSWORD = "correct horse battery"


class Story:
    """Prints each exchange; fails loudly when an answer is not what the story needs."""

    def __init__(self, client: httpx.AsyncClient, out: Any) -> None:
        self.client = client
        self.out = out
        self.failures: list[str] = []

    def say(self, text: str) -> None:
        self.out.write(f"\n== {text}\n")
        self.out.flush()

    async def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        token: str = "",
        key: bool = False,
        quiet: bool = False,
    ) -> tuple[int, dict[str, Any]]:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if key:
            headers["Idempotency-Key"] = str(uuid.uuid4())
        response = await self.client.request(
            method, path, content=json.dumps(body) if body is not None else None, headers=headers
        )
        try:
            answer: dict[str, Any] = response.json()
        except ValueError:
            answer = {"text": response.text}
        if not quiet:
            shown_headers = " ".join(
                f"{k}: {v if k != 'Authorization' else 'Bearer ' + v[7:19] + '...'}"
                for k, v in headers.items()
                if k != "Content-Type"
            )
            self.out.write(f"-> {method} {path}  {shown_headers}\n")
            if body is not None:
                self.out.write(_indent(json.dumps(body, indent=2)) + "\n")
            self.out.write(f"<- {response.status_code} {response.reason_phrase}\n")
            self.out.write(_indent(json.dumps(_shorten(answer), indent=2)) + "\n")
            self.out.flush()
        return response.status_code, answer

    def expect(self, condition: bool, what: str) -> None:
        if not condition:
            self.failures.append(what)
            self.out.write(f"!! unexpected: {what}\n")


def _indent(text: str) -> str:
    return "\n".join(f"   {line}" for line in text.splitlines())


def _shorten(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _shorten(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shorten(v) for v in value]
    if isinstance(value, str) and value.startswith("eyJ") and value.count(".") == 2:
        return value[:24] + "...(JWT)"
    return value


def _operator(data: Path) -> tuple[dict[str, str], str]:
    """The running system's endpoints and the operator token `up` wrote."""
    endpoints: dict[str, str] = json.loads((data / "endpoints.json").read_text())
    return endpoints, Path(endpoints["operator_token"]).read_text().strip()


async def saga_log(data: Path, saga_id: str, out: Any) -> str:
    """Print the saga's steps as the orchestrator recorded them; returns its status."""
    from framework.auth.policy import BearerToken
    from framework.registry.channel import balanced_channel
    from gen.saga.v1 import saga_pb2
    from gen.saga.v1.saga_pb2_grpc import SagaServiceStub

    endpoints, token = _operator(data)
    channel = await balanced_channel(
        endpoints["registry"],
        "saga.v1.SagaService",
        policies=[BearerToken(token)],
        registry_policies=[BearerToken(token)],
    )
    try:
        saga = (
            await SagaServiceStub(channel).GetSaga(saga_pb2.GetSagaRequest(saga_id=saga_id))
        ).saga
    finally:
        await channel.close()
    status = saga_pb2.SagaStatus.Name(saga.status).removeprefix("SAGA_STATUS_")
    out.write(f"   saga {saga.saga_id} ({saga.definition}): {status}\n")
    for step in saga.steps:
        step_status = saga_pb2.StepStatus.Name(step.status).removeprefix("STEP_STATUS_")
        line = f"     {step.name:<8} {step.method:<55} {step_status}"
        if step.attempts > 1:
            line += f" after {step.attempts} attempts"
        if step.error:
            line += f"  ({step.error})"
        out.write(line + "\n")
    if saga.error:
        out.write(f"   reason: {saga.error}\n")
    out.flush()
    return status


async def tell(gateway: str, data: Path, out: Any) -> int:
    async with httpx.AsyncClient(base_url=gateway, timeout=30.0) as client:
        story = Story(client, out)
        email = f"ada-{uuid.uuid4().hex[:6]}@example.com"

        story.say("1. Ada registers (public: no token) and logs in")
        status, body = await story.call(
            "POST",
            "/v1/users",
            {"email": email, "displayName": "Ada", "password": PASSWORD},
            key=True,
        )
        story.expect(status == 200, "registration answered 200")
        user_id = body.get("user", {}).get("userId", "")
        status, body = await story.call(
            "POST", "/v1/users:login", {"email": email, "password": PASSWORD}
        )
        token = body.get("accessToken", "")
        story.expect(status == 200 and bool(token), "log-in gave a token")

        story.say("2. She opens an order and adds two items")
        status, body = await story.call(
            "POST", "/v1/orders", {"userId": user_id, "currency": "EUR"}, token=token, key=True
        )
        order_id = body.get("order", {}).get("orderId", "")
        for sku, quantity, price in (("WIDGET-1", 2, 1250), ("GADGET-2", 1, 4999)):
            await story.call(
                "POST",
                f"/v1/orders/{order_id}/items",
                {"sku": sku, "quantity": quantity, "unitPriceMinor": str(price)},
                token=token,
                key=True,
            )
        _, before = await story.call("GET", "/v1/stocks/WIDGET-1", token=token)

        story.say("3. She confirms: the order saga reserves stock, charges 74.99 EUR, notifies")
        status, body = await story.call(
            "POST", f"/v1/orders/{order_id}:confirm", {}, token=token, key=True
        )
        order = body.get("order", {})
        story.expect(order.get("status") == "ORDER_STATUS_CONFIRMED", "the order is CONFIRMED")
        saga_status = await saga_log(data, order.get("sagaId", f"order-{order_id}"), out)
        story.expect(saga_status == "COMPLETED", "the saga COMPLETED")
        _, after = await story.call("GET", "/v1/stocks/WIDGET-1", token=token)
        reserved = int(after.get("stock", {}).get("reserved", 0)) - int(
            before.get("stock", {}).get("reserved", 0)
        )
        story.expect(reserved == 2, "2 units of WIDGET-1 are reserved for the order")

        story.say(
            "4. The notifications arrive (the saga's last step, and the OrderConfirmed event)"
        )
        notifications: list[Any] = []
        for _ in range(60):
            _, body = await story.call(
                "GET", f"/v1/users/{user_id}/notifications", token=token, quiet=True
            )
            notifications = body.get("notifications", [])
            if len(notifications) >= 2:
                break
            await asyncio.sleep(0.25)
        await story.call("GET", f"/v1/users/{user_id}/notifications", token=token)
        story.expect(
            len(notifications) >= 2, "two notifications (payment received, order confirmed)"
        )

        story.say("5. A second order above the card limit (1000.00 EUR): the payment is declined")
        _, body = await story.call(
            "POST", "/v1/orders", {"userId": user_id, "currency": "EUR"}, token=token, key=True
        )
        big = body.get("order", {}).get("orderId", "")
        await story.call(
            "POST",
            f"/v1/orders/{big}/items",
            {"sku": "WIDGET-1", "quantity": 3, "unitPriceMinor": "50000"},
            token=token,
            key=True,
        )
        status, body = await story.call(
            "POST", f"/v1/orders/{big}:confirm", {}, token=token, key=True
        )
        order = body.get("order", {})
        story.expect(order.get("status") == "ORDER_STATUS_CANCELLED", "the order is CANCELLED")
        saga_status = await saga_log(data, order.get("sagaId", f"order-{big}"), out)
        story.expect(saga_status == "COMPENSATED", "the saga COMPENSATED")
        _, released = await story.call("GET", "/v1/stocks/WIDGET-1", token=token)
        story.expect(
            released.get("stock", {}).get("reserved") == after.get("stock", {}).get("reserved"),
            "the declined order's 3 units were released",
        )

        story.say("6. What a customer may not do")
        await story.call("GET", f"/v1/orders/{order_id}")  # no token: 401
        await story.call(
            "POST", "/v1/stocks/WIDGET-1:add", {"quantity": 5}, token=token, key=True
        )  # 403

        if story.failures:
            out.write(f"\nthe demo did not go as expected: {'; '.join(story.failures)}\n")
            return 1
        out.write(
            "\nBoth saga outcomes shown: order 1 CONFIRMED (saga COMPLETED), "
            "order 2 CANCELLED (saga COMPENSATED, stock released, nothing charged).\n"
        )
        return 0


@contextlib.asynccontextmanager
async def _system(out: Any) -> AsyncIterator[tuple[str, Path]]:
    """A throwaway system (temporary data dir, free ports), stopped with SIGINT afterwards."""
    with tempfile.TemporaryDirectory(prefix="demo-") as tmp:
        data = Path(tmp) / "data"
        env = {
            **os.environ,
            "SYSTEM_DATA_DIR": str(data),
            "SYSTEM_REGISTRY_PORT": "0",
            "SYSTEM_GATEWAY_PORT": "0",
        }
        log = (Path(tmp) / "system.log").open("wb")
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "framework",
            "up",
            str(ROOT / "system.toml"),
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
        )
        try:
            out.write("starting the system (registry, services, saga orchestrator, gateway) ...\n")
            out.flush()
            gateway = await _wait_for_gateway(process, Path(tmp) / "system.log")
            yield gateway, data
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGINT)
                try:
                    await asyncio.wait_for(process.wait(), 60)
                except TimeoutError:
                    process.kill()
                    await process.wait()
            log.close()


async def _wait_for_gateway(process: asyncio.subprocess.Process, log: Path) -> str:
    assert process.stdout is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT_S
    pattern = re.compile(r"^gateway: (http://\S+)$")
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise SystemExit(f"the system did not start within {START_TIMEOUT_S:.0f}s; see {log}")
        line = await asyncio.wait_for(process.stdout.readline(), remaining)
        if not line:
            raise SystemExit(f"the system exited early ({await process.wait()}); see {log}")
        found = pattern.match(line.decode().strip())
        if found:
            asyncio.get_running_loop().create_task(_drain(process))
            return found.group(1)


async def _drain(process: asyncio.subprocess.Process) -> None:
    assert process.stdout is not None
    while await process.stdout.readline():
        pass


async def main_async(args: argparse.Namespace) -> int:
    out = sys.stdout
    if args.gateway:
        return await tell(args.gateway, Path(args.data), out)
    async with _system(out) as (gateway, data):
        out.write(f"gateway: {gateway}\n")
        return await tell(gateway, data, out)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m services.demo.walkthrough")
    parser.add_argument("--gateway", default="", help="a running system's gateway URL")
    parser.add_argument("--data", default=str(ROOT / "data"), help="its data directory")
    raise SystemExit(asyncio.run(main_async(parser.parse_args())))


if __name__ == "__main__":
    main()
