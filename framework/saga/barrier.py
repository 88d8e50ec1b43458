"""The participant barrier: what makes a saga step safe to call again, late or never.

Every call the orchestrator makes carries an `idempotency-key` metadata entry
naming the saga, the step and the direction:

    saga:<saga_id>/<step>/action          the step's action
    saga:<saga_id>/<step>/compensation    its compensation

`<saga_id>/<step>` is the *branch*: the action and its compensation share it.
A participant records the key in **its own database transaction, together with
the business change** (`SqliteBarrier`, `PostgresBarrier`), and gets three
guarantees for free:

* **duplicate**: a repeated call (same key) answers the first call's stored
  result and does no work; the same key with a different request is refused
  (`ALREADY_EXISTS`, reason `IDEMPOTENCY_KEY_REUSED`);
* **null compensation**: a compensation whose action never ran (or failed and
  rolled back) succeeds as a no-op, answering `null_result()`;
* **hanging action**: an action arriving after its compensation is refused
  (`FAILED_PRECONDITION`, reason `ACTION_AFTER_COMPENSATION`) and does nothing.

How (the same on both databases): a table with primary key `(branch, op)`.
An action inserts `(branch, action)`; a compensation first inserts
`(branch, action)` itself - if that insert succeeds the action never ran (null
compensation), and the row it leaves makes a later action fail its own insert
(hanging) - then inserts `(branch, compensation)`.  Action and compensation
contend on the same unique key, so the database serializes them even when
they race: a compensation waits for an in-flight action's transaction and
then undoes it.  A plain (non-saga) key is deduplicated the same way as op
`call`.

Every row also names its *saga* (the saga id; a plain key is its own saga)
and when it was written (`created_us`, from the participant's clock).  Rows
are never deleted by a call; `prune_finished(cutoff_us)` deletes the rows of
sagas whose **newest** row is older than the cutoff, so a saga still in flight
(any step recorded within the horizon) keeps all its rows, and
`BarrierPruner` (`framework.saga.retention`) runs it periodically.  The horizon
must exceed the longest time a saga can still call this participant after
its first call here: the orchestrator's saga deadline plus its compensation
retry budget (and the time an operator may take to retry a saga that needs
attention).  A call arriving after its saga's rows were pruned is not
recognised: a late duplicate action would run again, and a late compensation
would be taken for a null one.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Generic, Protocol, TypeVar

from google.protobuf.message import Message

from framework.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
)
from framework.policies.idempotency import KEY as IDEMPOTENCY_KEY
from framework.policies.idempotency import MAX_KEY_LEN
from framework.policy import current_call

__all__ = [
    "IDEMPOTENCY_KEY",
    "BarrierCall",
    "Decision",
    "Entry",
    "Op",
    "ProtoCodec",
    "ResultCodec",
    "RowAccess",
    "current_key",
    "decide",
    "guard_rows",
    "saga_key",
]

T = TypeVar("T")
M = TypeVar("M", bound=Message)

SAGA_KEY_PREFIX = "saga:"
DOMAIN = "framework.saga"
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Op(enum.Enum):
    """Which side of a branch a call is."""

    ACTION = "action"
    COMPENSATION = "compensation"
    CALL = "call"  # a plain idempotency key: deduplicated, nothing else


class Decision(enum.Enum):
    """What the barrier tells the participant to do with a call."""

    PROCEED = "proceed"  # first call: do the work, then `record` its result
    REPLAY = "replay"  # repeated call: answer `entry.result`, do nothing
    NULL_COMPENSATION = "null_compensation"  # the action never ran: do nothing, record a no-op


def saga_key(saga_id: str, step: str, op: Op) -> str:
    """The idempotency key the orchestrator sends for one direction of one step."""
    if op is Op.CALL:
        raise ValueError("a saga key is for an action or a compensation")
    return f"{SAGA_KEY_PREFIX}{saga_id}/{step}/{op.value}"


def fingerprint(request: Message | bytes) -> bytes:
    """A digest of the request (deterministic serialization), to refuse a reused key."""
    data = request if isinstance(request, bytes) else request.SerializeToString(deterministic=True)
    return hashlib.sha256(data).digest()


@dataclass(frozen=True, slots=True)
class BarrierCall:
    """One inbound call as the barrier sees it: its branch, direction and request digest.

    `saga` groups the rows pruned together: the saga id of a saga key, the key
    itself for a plain one.
    """

    key: str
    branch: str
    op: Op
    fingerprint: bytes

    @property
    def saga(self) -> str:
        return self.branch.partition("/")[0] if self.op is not Op.CALL else self.branch

    @classmethod
    def of(cls, key: str, request: Message | bytes) -> BarrierCall:
        """Parse an idempotency key (saga or plain) for `request`."""
        if not key:
            raise _missing_key()
        if len(key) > MAX_KEY_LEN:
            raise InvalidArgumentError(
                f"the {IDEMPOTENCY_KEY} metadata entry is longer than {MAX_KEY_LEN} characters",
                reason="IDEMPOTENCY_KEY_TOO_LONG",
                violations=[FieldViolation(IDEMPOTENCY_KEY, f"at most {MAX_KEY_LEN} characters")],
                domain=DOMAIN,
            )
        digest = fingerprint(request)
        if key.startswith(SAGA_KEY_PREFIX):
            branch, sep, op = key[len(SAGA_KEY_PREFIX) :].rpartition("/")
            if sep and branch and op in (Op.ACTION.value, Op.COMPENSATION.value):
                return cls(key, branch, Op(op), digest)
            raise InvalidArgumentError(
                f"saga idempotency key {key!r} must look like "
                "saga:<saga_id>/<step>/action or saga:<saga_id>/<step>/compensation",
                reason="BAD_SAGA_KEY",
                violations=[FieldViolation(IDEMPOTENCY_KEY, "malformed saga key")],
                domain=DOMAIN,
            )
        return cls(key, key, Op.CALL, digest)

    @classmethod
    def current(cls, request: Message) -> BarrierCall:
        """The barrier call for the inbound RPC being handled (its `idempotency-key` entry).

        Raises InvalidArgumentError (IDEMPOTENCY_KEY_MISSING) when the call carries none.
        """
        return cls.of(current_key(), request)


def current_key() -> str:
    """The `idempotency-key` metadata entry of the inbound RPC being handled ("" if none)."""
    call = current_call()
    value = call.header(IDEMPOTENCY_KEY) if call is not None else None
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    return value or ""


def _missing_key() -> InvalidArgumentError:
    return InvalidArgumentError(
        f"send an '{IDEMPOTENCY_KEY}' metadata entry (e.g. a UUID) so a repeated call is "
        "applied once",
        reason="IDEMPOTENCY_KEY_MISSING",
        violations=[FieldViolation(IDEMPOTENCY_KEY, "required metadata entry", "required")],
        domain=DOMAIN,
    )


@dataclass(frozen=True, slots=True)
class Entry:
    """The barrier's decision for one call; `result` is the stored answer on REPLAY."""

    call: BarrierCall
    decision: Decision
    result: bytes = b""


@dataclass(frozen=True, slots=True)
class StoredRow:
    """A barrier row as read back: who wrote it, the request digest, the result."""

    written_by: str
    fingerprint: bytes
    result: bytes | None


def replayed(call: BarrierCall, op: Op, row: StoredRow | None) -> Entry:
    """The entry for a call whose (branch, op) row already existed."""
    if row is None:  # cannot happen inside one transaction; say so rather than guess
        raise FailedPreconditionError(
            f"barrier row {call.branch}/{op.value} vanished inside the transaction",
            reason="BARRIER_ROW_MISSING",
            domain=DOMAIN,
        )
    if op is Op.ACTION and row.written_by == Op.COMPENSATION.value:
        raise FailedPreconditionError(
            f"{call.key}: the step was already compensated (or compensated before it ran); "
            "this late action is refused and did nothing",
            reason="ACTION_AFTER_COMPENSATION",
            metadata={"branch": call.branch},
            domain=DOMAIN,
        )
    if row.fingerprint != call.fingerprint:
        raise AlreadyExistsError(
            f"idempotency key {call.key!r} was already used for a different request; "
            "send a new key for a new request",
            reason="IDEMPOTENCY_KEY_REUSED",
            metadata={"key": call.key},
            domain=DOMAIN,
        )
    return Entry(call, Decision.REPLAY, row.result or b"")


def prune_statement(table: str, cutoff: str, limit: str) -> str:
    """DELETE of the rows of sagas whose newest row is older than `cutoff` (placeholders)."""
    return (
        f"DELETE FROM {table} WHERE saga IN (SELECT saga FROM {table} GROUP BY saga"
        f" HAVING MAX(created_us) < {cutoff} LIMIT {limit})"
    )


def check_identifier(name: str, what: str) -> None:
    if not _IDENTIFIER.match(name):
        raise ValueError(f"{what} must be a lower-case SQL identifier, got {name!r}")


class ResultCodec(Protocol[T]):
    """How a participant's result is stored for replays."""

    def encode(self, value: T) -> bytes: ...

    def decode(self, data: bytes) -> T: ...


class ProtoCodec(Generic[M]):
    """Stores a protobuf response as its serialized bytes."""

    __slots__ = ("message_type",)

    def __init__(self, message_type: type[M]) -> None:
        self.message_type = message_type

    def encode(self, value: M) -> bytes:
        return value.SerializeToString()

    def decode(self, data: bytes) -> M:
        return self.message_type.FromString(data)


NullResult = Callable[[], T]


class RowAccess(Protocol):
    """The barrier's row operations inside one open transaction (async backends)."""

    async def insert(self, call: BarrierCall, op: Op, written_by: Op, fingerprint: bytes) -> bool:
        """Insert row (call.branch, op) unless it exists; whether it was inserted."""
        ...

    async def read(self, branch: str, op: Op) -> StoredRow | None: ...

    async def record(self, entry: Entry, result: bytes) -> None:
        """Store the result of the entry's row."""
        ...


async def decide(rows: RowAccess, call: BarrierCall) -> Entry:
    """Record `call` through `rows` and decide (the rules in the module docstring).

    Raises FailedPreconditionError for a hanging action and AlreadyExistsError
    for a key reused with another request; roll the transaction back then.
    """
    if call.op is Op.COMPENSATION:
        # Claim the action's row first: success means the action never ran.
        null = await rows.insert(call, Op.ACTION, Op.COMPENSATION, b"")
        if not await rows.insert(call, Op.COMPENSATION, Op.COMPENSATION, call.fingerprint):
            return replayed(call, Op.COMPENSATION, await rows.read(call.branch, Op.COMPENSATION))
        return Entry(call, Decision.NULL_COMPENSATION if null else Decision.PROCEED)
    if await rows.insert(call, call.op, call.op, call.fingerprint):
        return Entry(call, Decision.PROCEED)
    return replayed(call, call.op, await rows.read(call.branch, call.op))


async def guard_rows(
    rows: RowAccess,
    call: BarrierCall,
    work: Callable[[], Awaitable[T]],
    codec: ResultCodec[T],
    null_result: Callable[[], T] | None,
) -> T:
    """`decide`, then run `await work()` on PROCEED, `null_result()` on a null
    compensation (required for compensations), or decode the stored answer on REPLAY."""
    entry = await decide(rows, call)
    if entry.decision is Decision.REPLAY:
        return codec.decode(entry.result)
    if entry.decision is Decision.NULL_COMPENSATION:
        if null_result is None:
            raise TypeError("guard() of a compensation needs null_result=")
        value = null_result()
    else:
        value = await work()
    await rows.record(entry, codec.encode(value))
    return value


def micros(clock_now: datetime) -> int:
    """Microseconds since the epoch of an aware datetime (the rows' `created_us`)."""
    return (clock_now - _EPOCH) // timedelta(microseconds=1)
