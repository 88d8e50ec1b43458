"""A small event-sourced bank account used by the event store's tests and benchmarks."""

from __future__ import annotations

from google.protobuf.message import Message

from framework.events.aggregate import Aggregate, applies
from framework.events.typeregistry import EventTypeRegistry
from gen.events.v1 import testing_pb2
from gen.events.v1.testing_pb2 import AccountOpened, AccountState, AmountDeposited, AmountWithdrawn


def account_types() -> EventTypeRegistry:
    """The registry holding the test events."""
    return EventTypeRegistry.from_modules(testing_pb2)


class Account(Aggregate):
    """Opened once; deposits and withdrawals; the balance never goes negative."""

    state_type = AccountState

    def __init__(self, aggregate_id: str) -> None:
        super().__init__(aggregate_id)
        self.owner = ""
        self.balance = 0
        self.opened = False

    def open(self, owner: str) -> None:
        self.require(not self.opened, "account is already open")
        self.emit(AccountOpened(owner=owner))

    def deposit(self, amount: int) -> None:
        self.require(self.opened, "open the account first")
        self.require(amount > 0, f"deposit must be positive, got {amount}")
        self.emit(AmountDeposited(amount=amount))

    def withdraw(self, amount: int) -> None:
        self.require(self.opened, "open the account first")
        self.require(amount <= self.balance, f"balance {self.balance} is below {amount}")
        self.emit(AmountWithdrawn(amount=amount))

    @applies(AccountOpened)
    def _opened(self, event: AccountOpened) -> None:
        self.owner, self.opened = event.owner, True

    @applies(AmountDeposited)
    def _deposited(self, event: AmountDeposited) -> None:
        self.balance += event.amount

    @applies(AmountWithdrawn)
    def _withdrawn(self, event: AmountWithdrawn) -> None:
        self.balance -= event.amount

    def snapshot_state(self) -> Message:
        return AccountState(owner=self.owner, balance=self.balance, open=self.opened)

    def restore_state(self, state: Message) -> None:
        assert isinstance(state, AccountState)
        self.owner, self.balance, self.opened = state.owner, state.balance, state.open
