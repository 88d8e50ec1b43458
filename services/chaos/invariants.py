"""The example system's invariants, read from each service's own database after an experiment.

* `orders-match-sagas`: every order whose confirmation started has ended (none left
  CONFIRMING), CONFIRMED exactly when its saga COMPLETED and CANCELLED exactly when it
  COMPENSATED;
* `stock-balances`: per SKU, `reserved` is the sum of the HELD reservations and
  `on_hand` is still the seed (the load only reserves); every confirmed order holds its
  lines, no cancelled one holds anything;
* `payment-balances`: each payment's ledger adds up to what its status says (the
  amount while CHARGED, 0 otherwise); a confirmed order is charged its total exactly,
  a cancelled one nothing;
* the framework's generic ones: `no-saga-stuck`, `events-delivered-once:notification`
  (order events -> the notification service's consumer group), `no-dead-lease`.

`invariants()` is what the experiments name (`services.chaos.invariants:invariants`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from framework.chaos.invariants import (
    EventsDeliveredOnce,
    Invariant,
    InvariantResult,
    NoDeadLeases,
    SagasSettled,
    result,
)
from framework.chaos.system import Database, SystemView
from gen.order.v1 import events_pb2 as order_events
from services.inventory.main import parse_seed
from services.notification.application import ORDER_EVENT_TYPES
from services.order import confirmation

__all__ = ["OrdersMatchSagas", "PaymentBalances", "StockBalances", "invariants"]

_STARTED = order_events.OrderConfirmationStarted.DESCRIPTOR.full_name
_CONFIRMED = order_events.OrderConfirmed.DESCRIPTOR.full_name
_CANCELLED = order_events.OrderCancelled.DESCRIPTOR.full_name


@dataclass(slots=True)
class OrderFacts:
    """An order as its events tell it (only orders whose confirmation started)."""

    order_id: str
    status: str = "CONFIRMING"
    total_minor: int = 0
    lines: dict[str, int] = field(default_factory=dict)


async def confirmed_orders(view: SystemView) -> dict[str, OrderFacts]:
    """Orders whose confirmation started, folded from the order service's events."""
    rows = await view.query(
        "order",
        "SELECT stream_id, type, payload FROM {events} WHERE aggregate_type = 'order'"
        " ORDER BY position",
    )
    lines: dict[str, dict[str, int]] = defaultdict(dict)
    orders: dict[str, OrderFacts] = {}
    added = order_events.OrderItemAdded.DESCRIPTOR.full_name
    for stream, kind, payload in rows:
        if kind == added:
            item = order_events.OrderItemAdded.FromString(bytes(payload))
            lines[stream][item.sku] = lines[stream].get(item.sku, 0) + item.quantity
        elif kind == _STARTED:
            started = order_events.OrderConfirmationStarted.FromString(bytes(payload))
            orders[stream] = OrderFacts(stream, "CONFIRMING", started.total_minor, lines[stream])
        elif kind == _CONFIRMED and stream in orders:
            orders[stream].status = "CONFIRMED"
        elif kind == _CANCELLED and stream in orders:
            orders[stream].status = "CANCELLED"
    return orders


async def saga_outcomes(view: SystemView) -> dict[str, str]:
    """Saga id -> the type of its last event (e.g. `SagaCompleted`)."""
    rows = await view.query(
        "sagas",
        "SELECT e.stream_id, e.type FROM {events} e WHERE e.aggregate_type = 'Saga'"
        " AND e.version = (SELECT MAX(l.version) FROM {events} l WHERE l.stream_id = e.stream_id)",
    )
    return {str(s): str(t).rsplit(".", 1)[-1] for s, t in rows}


class OrdersMatchSagas:
    name = "orders-match-sagas"

    async def check(self, view: SystemView) -> InvariantResult:
        orders = await confirmed_orders(view)
        sagas = await saga_outcomes(view)
        expected = {"CONFIRMED": "SagaCompleted", "CANCELLED": "SagaCompensated"}
        problems: list[str] = []
        for order in orders.values():
            saga = sagas.get(confirmation.saga_id(order.order_id), "no saga")
            if order.status == "CONFIRMING":
                problems.append(f"order {order.order_id} still CONFIRMING (saga: {saga})")
            elif saga != expected[order.status]:
                problems.append(f"order {order.order_id} is {order.status} but its saga: {saga}")
        return result(
            self.name, len(orders), problems, f"{len(orders)} orders settled like their sagas"
        )


def _inventory_db(view: SystemView) -> Database:
    """The inventory's own database: the system's (its PostgreSQL schema on PostgreSQL,
    since 4f360da), else the SQLite file its process was given (a standalone inventory)."""
    if "inventory" in view.databases:
        return view.database("inventory")
    for process in view.processes():
        path = process.env.get("INVENTORY_DB_PATH")
        if path:
            return Database(sqlite_path=path)
    return view.database("inventory")


def _seed(view: SystemView) -> dict[str, int]:
    for process in view.processes():
        text = process.env.get("INVENTORY_SEED")
        if text:
            return dict(parse_seed(text))
    return {}


class StockBalances:
    name = "stock-balances"

    async def check(self, view: SystemView) -> InvariantResult:
        db = _inventory_db(view)
        stock = {
            str(sku): (int(on_hand), int(reserved))
            for sku, on_hand, reserved in await view.query_database(
                db, "SELECT sku, on_hand, reserved FROM {stock}"
            )
        }
        held: dict[str, int] = defaultdict(int)
        reservations: dict[str, tuple[str, dict[str, int]]] = {}
        import json

        for rid, state, lines in await view.query_database(
            db, "SELECT reservation_id, state, lines FROM {reservation}"
        ):
            quantities = {str(sku): int(q) for sku, q in json.loads(lines)}
            reservations[str(rid)] = (str(state), quantities)
            if state == "HELD":
                for sku, q in quantities.items():
                    held[sku] += q
        problems: list[str] = []
        for sku, (_on_hand, reserved) in sorted(stock.items()):
            if reserved != held.get(sku, 0):
                problems.append(
                    f"{sku}: reserved {reserved} but HELD reservations sum to {held.get(sku, 0)}"
                )
        for sku, seeded in sorted(_seed(view).items()):
            if sku in stock and stock[sku][0] != seeded:
                problems.append(f"{sku}: on_hand {stock[sku][0]}, seeded {seeded}")
        orders = await confirmed_orders(view)
        for order in orders.values():
            state, quantities = reservations.get(
                confirmation.reservation_id(order.order_id), ("none", {})
            )
            if order.status == "CONFIRMED" and (state != "HELD" or quantities != order.lines):
                problems.append(
                    f"confirmed order {order.order_id}: reservation {state} {quantities}"
                )
            if order.status == "CANCELLED" and state == "HELD":
                problems.append(f"cancelled order {order.order_id} still holds {quantities}")
        return result(
            self.name,
            len(stock) + len(orders),
            problems,
            f"{len(stock)} SKUs and {len(orders)} orders add up",
        )


class PaymentBalances:
    name = "payment-balances"

    async def check(self, view: SystemView) -> InvariantResult:
        payments = {
            str(pid): (str(oid), str(status), int(amount))
            for pid, oid, status, amount in await view.query(
                "payment", "SELECT payment_id, order_id, status, amount_minor FROM {payments}"
            )
        }
        ledger: dict[str, int] = defaultdict(int)
        for pid, amount in await view.query(
            "payment", "SELECT payment_id, amount_minor FROM {payment_ledger}"
        ):
            ledger[str(pid)] += int(amount)
        problems: list[str] = []
        for pid, (_, status, amount) in sorted(payments.items()):
            expected = amount if status == "CHARGED" else 0
            if ledger.get(pid, 0) != expected:
                problems.append(
                    f"payment {pid} {status}: ledger {ledger.get(pid, 0)}, expected {expected}"
                )
        for pid in sorted(set(ledger) - set(payments)):
            problems.append(f"ledger entries for unknown payment {pid}")
        orders = await confirmed_orders(view)
        for order in orders.values():
            pid = confirmation.payment_id(order.order_id)
            held = ledger.get(pid, 0)
            if order.status == "CONFIRMED" and held != order.total_minor:
                problems.append(
                    f"confirmed order {order.order_id}: charged {held} of {order.total_minor}"
                )
            if order.status == "CANCELLED" and held != 0:
                problems.append(f"cancelled order {order.order_id}: still holds {held}")
        return result(
            self.name,
            len(payments) + len(orders),
            problems,
            f"{len(payments)} payments and {len(orders)} orders add up",
        )


def invariants() -> list[Invariant]:
    """Every invariant of the example system."""
    return [
        OrdersMatchSagas(),
        StockBalances(),
        PaymentBalances(),
        SagasSettled("sagas"),
        EventsDeliveredOnce("order", "notification", "notification", ORDER_EVENT_TYPES),
        NoDeadLeases(),
    ]
