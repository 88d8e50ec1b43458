"""The example system's load for chaos experiments: customers ordering through the gateway.

Set-up (before the clock starts): a SKU of its own stocked with the operator token
(so the seeded SKUs keep their balance), and `customers` registered and logged in.
Each iteration is one customer's order: create it, add a line, confirm it (the saga
reserves, charges, notifies).  `declined_percent` of the orders are above the card
limit, so their sagas compensate.  A failed request is retried with the same
Idempotency-Key (`retries` times, after `retry_delay_s`), as a careful client does:
every attempt is a sample, and the retries exercise the idempotency paths under faults.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from typing import Any

from framework.chaos.load import LoadContext, ScenarioError

__all__ = ["Orders"]

PASSWORD = "chaos horse battery"


class Orders:
    def __init__(
        self,
        customers: int = 4,
        declined_percent: float = 10.0,
        retries: int = 2,
        retry_delay_s: float = 0.5,
        unit_price_minor: int = 12_50,
        seed: int = 18,
        setup_timeout_s: float = 120.0,
    ) -> None:
        if customers < 1 or not 0 <= declined_percent <= 100 or retries < 0:
            raise ValueError("need customers >= 1, declined_percent in 0..100, retries >= 0")
        if setup_timeout_s <= 0:
            raise ValueError("need setup_timeout_s > 0")
        self.customers = customers
        self.declined_percent = declined_percent
        self.retries = retries
        self.retry_delay_s = retry_delay_s
        self.unit_price_minor = unit_price_minor
        self.rng = random.Random(seed)
        self.setup_timeout_s = setup_timeout_s
        self.sku = ""
        self.accounts: list[tuple[str, str]] = []  # (user id, token)

    async def setup(self, ctx: LoadContext) -> None:
        self.sku = f"CHAOS-{uuid.uuid4().hex[:8].upper()}"
        operator = {"Authorization": f"Bearer {ctx.operator_token}"}
        stocked = await self._must(
            ctx,
            "POST",
            f"/v1/stocks/{self.sku}:add",
            {"quantity": 1_000_000},
            {**operator, "Idempotency-Key": f"stock-{self.sku}"},
        )
        del stocked
        for index in range(self.customers):
            email = f"chaos-{uuid.uuid4().hex[:10]}@example.com"
            registered = await self._must(
                ctx,
                "POST",
                "/v1/users",
                {"email": email, "displayName": f"Chaos {index}", "password": PASSWORD},
                {"Idempotency-Key": str(uuid.uuid4())},
            )
            login = await self._must(
                ctx, "POST", "/v1/users:login", {"email": email, "password": PASSWORD}, {}
            )
            self.accounts.append((registered["user"]["userId"], login["accessToken"]))

    async def _must(
        self, ctx: LoadContext, method: str, path: str, body: Any, headers: dict[str, str]
    ) -> Any:
        """A set-up request; retried while the system settles (backing off, for at most
        `setup_timeout_s`: on a loaded machine the user service's password hashing made
        its health checks and breakers fail for a while), ScenarioError if it fails."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.setup_timeout_s
        delay = 0.5
        while True:
            reply = await ctx.request("setup", method, path, json=body, headers=headers)
            if reply is not None and reply.status_code == 200:
                return reply.json()
            last = "no answer" if reply is None else f"{reply.status_code} {reply.text[:200]}"
            if reply is not None and 400 <= reply.status_code < 500 and reply.status_code != 429:
                break
            if loop.time() + delay >= deadline:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 4.0)
        raise ScenarioError(f"set-up {method} {path} failed: {last}")

    async def _call(
        self, ctx: LoadContext, name: str, path: str, body: Any, token: str
    ) -> Any | None:
        headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": str(uuid.uuid4())}
        for attempt in range(self.retries + 1):
            reply = await ctx.request(name, "POST", path, json=body, headers=headers)
            if reply is not None and reply.status_code == 200:
                return reply.json()
            if reply is not None and 400 <= reply.status_code < 500 and reply.status_code != 429:
                return None  # refused: retrying the same request cannot help
            if attempt < self.retries:
                await asyncio.sleep(self.retry_delay_s)
        return None

    async def iteration(self, ctx: LoadContext, index: int) -> None:
        user_id, token = self.accounts[index % len(self.accounts)]
        created = await self._call(
            ctx, "create", "/v1/orders", {"userId": user_id, "currency": "EUR"}, token
        )
        if created is None:
            return
        order_id = created["order"]["orderId"]
        declined = self.rng.random() * 100 < self.declined_percent
        line = {
            "sku": self.sku,
            "quantity": 1 + index % 3,
            # above the card limit of the example system (1000.00): the saga compensates
            "unitPriceMinor": str(150_000 if declined else self.unit_price_minor),
        }
        if await self._call(ctx, "add-item", f"/v1/orders/{order_id}/items", line, token) is None:
            return
        await self._call(ctx, "confirm", f"/v1/orders/{order_id}:confirm", {}, token)
