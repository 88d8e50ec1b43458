"""Ordering use cases: create, add items, confirm (through the order saga), cancel, read.

Collaborators are passed in: the order `Repository` (event store), the read model,
`Customers` (is the user there and active?), `Confirmations` (the saga
orchestrator) and a clock.

Confirming: the order records `OrderConfirmationStarted` (status CONFIRMING) *before*
the saga is started, then starts the saga (idempotent by its id, derived from the
order), waits for it within the call's time, and records the outcome: CONFIRMED, or
CANCELLED when it compensated.  If anything stops half-way (the caller gives up, the
order service restarts, the orchestrator is slow), the order stays CONFIRMING and
`reconcile()` (run periodically) starts the saga again or records its outcome, so
no confirmation is forgotten.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import grpc

from framework.clock import Clock, SystemClock
from framework.errors import AlreadyExistsError, ConflictError, FrameworkError, NotFoundError
from framework.events.aggregate import Repository
from gen.order.v1 import saga_pb2
from services.order import confirmation, domain
from services.order.domain import Caller, Order, Status
from services.order.projections import OrderView, PageToken, SqlOrderReadModel

__all__ = [
    "Confirmations",
    "Customers",
    "Orders",
    "Reconciler",
    "SagaOutcome",
    "SagaState",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_PAGE_SIZE = 20
_CONFLICT_RETRIES = 5


class SagaState(enum.Enum):
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    COMPENSATED = "COMPENSATED"
    NEEDS_ATTENTION = "NEEDS_ATTENTION"
    MISSING = "MISSING"  # the orchestrator does not know the saga (never started)


@dataclass(frozen=True, slots=True)
class SagaOutcome:
    state: SagaState
    error: str = ""

    @property
    def final(self) -> bool:
        return self.state in (SagaState.COMPLETED, SagaState.COMPENSATED)


class Customers(Protocol):
    async def require_active(self, user_id: str) -> None:
        """NotFoundError for an unknown user, FailedPreconditionError for a deactivated one."""
        ...


class Confirmations(Protocol):
    """The order saga, as the orchestrator runs it."""

    async def start(self, saga_id: str, confirmation: saga_pb2.OrderConfirmation) -> None: ...

    async def wait(self, saga_id: str, timeout_s: float) -> SagaOutcome:
        """The outcome once final, or RUNNING / NEEDS_ATTENTION when `timeout_s` passed."""
        ...

    async def outcome(self, saga_id: str) -> SagaOutcome: ...


class Orders:
    """The ordering use cases (what the servicer calls)."""

    def __init__(
        self,
        repository: Repository[Order],
        read_model: SqlOrderReadModel,
        customers: Customers,
        confirmations: Confirmations,
        *,
        confirm_wait_s: float = 10.0,
        clock: Clock | None = None,
    ) -> None:
        self.repository = repository
        self.read_model = read_model
        self.customers = customers
        self.confirmations = confirmations
        self.confirm_wait_s = confirm_wait_s
        self.clock = clock or SystemClock()

    async def _change(self, order_id: str, command: Callable[[Order], object]) -> Order:
        """Load, run `command`, save; a concurrent writer makes it run again on fresh state."""
        for attempt in range(_CONFLICT_RETRIES):
            order = await self.repository.load(order_id)
            command(order)
            try:
                await self.repository.save(order)
            except ConflictError:
                if attempt == _CONFLICT_RETRIES - 1:
                    raise
                continue
            return order
        raise AssertionError("unreachable")

    async def create(self, caller: Caller, user_id: str, currency: str, key: str) -> Order:
        domain.authorize(caller, user_id)
        order_id = domain.order_id_for(user_id, key)
        existing = await self.repository.get(order_id)
        if existing is None:
            await self.customers.require_active(user_id)
            order = Order(order_id)
            order.create(user_id, currency, self.clock.now())
            try:
                await self.repository.save(order)
                logger.info("order created order_id=%s user_id=%s", order_id, user_id)
                return order
            except ConflictError:  # a concurrent retry with this key created it
                existing = await self.repository.load(order_id)
        if existing.currency != currency:
            raise AlreadyExistsError(
                f"idempotency key {key} already created order {order_id} in "
                f"{existing.currency}; send a new key for a new order",
                reason="IDEMPOTENCY_KEY_REUSED",
                domain=domain.DOMAIN,
            )
        return existing

    async def _owned(self, caller: Caller, order_id: str) -> Order:
        order = await self.repository.get(order_id)
        if order is None:
            raise NotFoundError(
                f"order {order_id} does not exist", reason="ORDER_NOT_FOUND", domain=domain.DOMAIN
            )
        domain.authorize(caller, order.user_id)
        return order

    async def add_item(
        self, caller: Caller, order_id: str, sku: str, quantity: int, price: int, key: str
    ) -> Order:
        await self._owned(caller, order_id)
        line = domain.line_id(order_id, key)
        now = self.clock.now()
        return await self._change(
            order_id, lambda order: order.add_item(line, sku, quantity, price, now)
        )

    async def cancel(self, caller: Caller, order_id: str, reason: str) -> Order:
        await self._owned(caller, order_id)
        now = self.clock.now()
        return await self._change(order_id, lambda order: order.cancel(reason, now))

    async def get(self, caller: Caller, order_id: str) -> Order:
        return await self._owned(caller, order_id)

    async def list(
        self, caller: Caller, user_id: str, page_size: int, page_token: str
    ) -> tuple[list[OrderView], str]:
        domain.authorize(caller, user_id)
        after = PageToken.decode(page_token) if page_token else None
        found, following = await self.read_model.page(
            user_id, page_size or DEFAULT_PAGE_SIZE, after
        )
        return found, following.encode() if following else ""

    async def confirm(self, caller: Caller, order_id: str, wait_s: float | None = None) -> Order:
        """Start (or join) the confirmation saga and record its outcome if it ends in time."""
        await self._owned(caller, order_id)
        saga = confirmation.saga_id(order_id)
        now = self.clock.now()
        order = await self._change(order_id, lambda o: o.start_confirmation(saga, now))
        if order.status != Status.CONFIRMING:
            return order  # already confirmed (a repeated call)
        await self._run_saga(order)
        wait = self.confirm_wait_s if wait_s is None else min(wait_s, self.confirm_wait_s)
        outcome = await self.confirmations.wait(saga, wait)
        return await self.record_outcome(order_id, outcome)

    async def _run_saga(self, order: Order) -> None:
        saga_input = confirmation.confirmation_input(
            order.id, order.user_id, order.lines, order.currency
        )
        await self.confirmations.start(order.saga_id, saga_input)

    async def record_outcome(self, order_id: str, outcome: SagaOutcome) -> Order:
        """Record a final saga outcome on the order (no change when not final)."""
        now = self.clock.now()

        def apply(order: Order) -> None:
            if order.status != Status.CONFIRMING:
                return
            if outcome.state is SagaState.COMPLETED:
                order.complete_confirmation(
                    confirmation.reservation_id(order.id), confirmation.payment_id(order.id), now
                )
            elif outcome.state is SagaState.COMPENSATED:
                order.fail_confirmation(outcome.error or "the confirmation was compensated", now)

        order = await self._change(order_id, apply)
        if outcome.final:
            logger.info(
                "order %s: saga %s -> order %s", order_id, outcome.state.value, order.status
            )
        return order

    async def reconcile(self, limit: int = 100) -> int:
        """Finish confirmations left half-way; the number of orders settled or restarted."""
        settled = 0
        for view in await self.read_model.confirming(limit):
            outcome = await self.confirmations.outcome(view.saga_id)
            if outcome.state is SagaState.MISSING:
                order = await self.repository.load(view.order_id)
                if order.status == Status.CONFIRMING:
                    logger.warning("order %s: saga never started; starting it now", order.id)
                    await self._run_saga(order)
                    settled += 1
            elif outcome.final:
                await self.record_outcome(view.order_id, outcome)
                settled += 1
        return settled


class Reconciler:
    """Server hook: `orders.reconcile()` every `interval_s` while the server runs."""

    def __init__(self, orders: Orders, interval_s: float = 5.0) -> None:
        self.orders = orders
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def on_started(self, server: object) -> None:
        self._task = asyncio.create_task(self._loop(), name="order-reconciler")

    async def on_draining(self, server: object) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await _logged(self.orders.reconcile, "reconciling confirmations")


async def _logged(work: Callable[[], Awaitable[T]], what: str) -> T | None:
    try:
        return await work()
    except asyncio.CancelledError:
        raise
    except (FrameworkError, grpc.RpcError, OSError) as error:
        logger.warning("%s failed (%s); trying again later", what, error)
        return None
