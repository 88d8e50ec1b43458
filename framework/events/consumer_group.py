"""The embedded event bus: a consumer group is a durable cursor over the store.

`StoreBus` needs no broker.  Each group reads `store.read_all(after=cursor)`
(catch-up, then live through `store.wait_for_events`), so a group sees events
exactly in the store's global order.  In-process members of a group share the
events; every delivery waits for `ack()`; a `nack()`, a member that leaves, or
no answer within `ack_wait_s` puts the event back for redelivery.  The group's
checkpoint (`store.save_checkpoint("group:<name>", position)`) only moves past
a position once it and every earlier event of the group are acknowledged, so a
restarted process resumes at the first unacknowledged event (at-least-once).
Checkpoints are written by a background task right after acks move them; acks
arriving during a write share the next one (a crash in between only means
redelivery), and `close()` / `flush()` write the last one.

Members in other processes each read the store themselves: use
`framework.events.nats.JetStreamBus` to share a group across processes.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from framework.errors import FailedPreconditionError, FrameworkError, UnavailableError
from framework.events.backoff import Backoff
from framework.events.bus import Delivery, SubscriptionBase, check_event_types, check_group
from framework.events.envelope import to_envelope
from framework.events.store import EventStore
from gen.events.v1.envelope_pb2 import EventEnvelope

logger = logging.getLogger(__name__)


class CheckpointStore(Protocol):
    """Durable named positions (the event stores implement it in their own database)."""

    async def load_checkpoint(self, name: str) -> int: ...

    async def save_checkpoint(self, name: str, position: int) -> None: ...


class CheckpointedStore(EventStore, CheckpointStore, Protocol):
    """An event store that also keeps checkpoints."""


@dataclass(frozen=True, slots=True)
class StoreBusConfig:
    """How groups read the store and wait for acknowledgements."""

    ack_wait_s: float = 30.0
    batch_size: int = 256
    max_in_flight: int = 1024
    poll_interval_s: float = 0.5
    # a failing store is retried after retry_delay_s, doubling (jittered) up to the max
    retry_delay_s: float = 0.1
    max_retry_delay_s: float = 5.0

    def __post_init__(self) -> None:
        for name in ("ack_wait_s", "poll_interval_s", "retry_delay_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_retry_delay_s < self.retry_delay_s:
            raise ValueError(
                f"max_retry_delay_s must be >= retry_delay_s ({self.retry_delay_s}), "
                f"got {self.max_retry_delay_s}"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_in_flight < self.batch_size:
            raise ValueError(
                f"max_in_flight ({self.max_in_flight}) must be >= batch_size ({self.batch_size})"
            )


@dataclass(slots=True)
class _Entry:
    envelope: EventEnvelope
    attempt: int = 0
    due: float = 0.0  # monotonic time the current delivery expires
    member: object = None
    acked: bool = False
    queued: bool = False  # waiting in the ready queue (never in it twice)
    hold: asyncio.TimerHandle | None = field(default=None, repr=False)


class StoreDelivery:
    """One delivery of a group entry; acknowledging a stale delivery still counts."""

    __slots__ = ("_attempt", "_entry", "_group")

    def __init__(self, group: _Group, entry: _Entry) -> None:
        self._group = group
        self._entry = entry
        self._attempt = entry.attempt

    @property
    def envelope(self) -> EventEnvelope:
        return self._entry.envelope

    @property
    def attempt(self) -> int:
        return self._attempt

    async def ack(self) -> None:
        await self._group.ack(self._entry)

    async def nack(self, delay_s: float = 0.0) -> None:
        self._group.nack(self._entry, self._attempt, delay_s)


class _Group:
    """A group's cursor, its outstanding events and the members sharing them."""

    def __init__(
        self,
        name: str,
        types: frozenset[str],
        store: CheckpointedStore,
        config: StoreBusConfig,
        start_after: int,
    ) -> None:
        self.name = name
        self.types = types
        self._store = store
        self._config = config
        self._start_after = start_after
        self._checkpoint_name = f"group:{name}"
        self._read_upto = 0
        self._saved = 0
        self._outstanding: dict[int, _Entry] = {}  # position order
        self._in_flight: dict[int, _Entry] = {}  # delivery order, so expiry order
        self._ready: deque[_Entry] = deque()
        self._changed = asyncio.Event()
        self._room = asyncio.Event()
        self._save_lock = asyncio.Lock()
        self._failure: BaseException | None = None
        self._feeder: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._dirty = asyncio.Event()
        self.members = 0
        self._stopped = False

    async def start(self) -> None:
        saved = await self._store.load_checkpoint(self._checkpoint_name)
        self._read_upto = self._saved = saved if saved > 0 else self._start_after
        self._feeder = asyncio.create_task(self._feed(), name=f"store-bus-group-{self.name}")
        self._flusher = asyncio.create_task(self._flush(), name=f"store-bus-flush-{self.name}")

    async def stop(self) -> None:
        self._stopped = True
        self._changed.set()
        for task in (self._feeder, self._flusher):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        for entry in self._outstanding.values():
            if entry.hold is not None:
                entry.hold.cancel()
        try:
            await self.save()
        except (FrameworkError, OSError) as error:
            logger.warning(
                "group %s: last checkpoint not saved (%s); events after %s will come again",
                self.name,
                error,
                self._saved,
            )

    # ------------------------------------------------------------ reading

    async def _feed(self) -> None:
        config = self._config
        backoff = self._backoff()
        try:
            while True:
                while len(self._outstanding) + config.batch_size > config.max_in_flight:
                    self._room.clear()
                    await self._room.wait()
                try:
                    events = await self._store.read_all(self._read_upto, config.batch_size)
                    backoff.reset()
                    if not events:
                        await self._store.wait_for_events(self._read_upto, config.poll_interval_s)
                        continue
                except (UnavailableError, OSError) as error:
                    delay = backoff.next_delay()
                    logger.warning(
                        "group %s: store unavailable (%s); retrying in %.2fs",
                        self.name,
                        error,
                        delay,
                    )
                    await asyncio.sleep(delay)
                    continue
                for event in events:
                    self._read_upto = event.position
                    if self.types and event.type not in self.types:
                        continue
                    entry = _Entry(to_envelope(event), queued=True)
                    self._outstanding[event.position] = entry
                    self._ready.append(entry)
                self._changed.set()
                if not self._outstanding:
                    self._dirty.set()  # only filtered-out events: move the cursor on
        except asyncio.CancelledError:
            raise
        except Exception as error:
            logger.exception("group %s stopped reading the store", self.name)
            self._failure = error
            self._changed.set()

    # ------------------------------------------------------------ delivering

    def _requeue_expired(self, now: float) -> float | None:
        """Put expired deliveries back; return when the next one expires."""
        expired: list[_Entry] = []
        next_due: float | None = None
        while self._in_flight:
            position, entry = next(iter(self._in_flight.items()))
            if entry.due > now:
                next_due = entry.due
                break
            del self._in_flight[position]
            logger.info(
                "group %s: position %s not acked in time, redelivering", self.name, position
            )
            expired.append(entry)
        self._requeue(expired)
        return next_due

    def _requeue(self, entries: list[_Entry]) -> None:
        """Put entries back at the front, in order; never one that is queued or acked already."""
        for entry in reversed(entries):
            if not (entry.queued or entry.acked):
                entry.queued = True
                self._ready.appendleft(entry)

    async def fetch(self, member: object, max_count: int, timeout_s: float) -> list[Delivery]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            if self._stopped:
                raise FailedPreconditionError(f"the bus of group {self.name!r} is closed")
            now = loop.time()
            next_due = self._requeue_expired(now)
            if self._ready:
                return self._take(member, max_count, now)
            if self._failure is not None:
                raise UnavailableError(
                    f"group {self.name!r} cannot read the event store: {self._failure}"
                ) from self._failure
            wake = deadline if next_due is None else min(deadline, next_due)
            if wake <= now:
                return []
            self._changed.clear()
            try:
                async with asyncio.timeout(wake - now):
                    await self._changed.wait()
            except TimeoutError:
                pass

    def _take(self, member: object, max_count: int, now: float) -> list[Delivery]:
        out: list[Delivery] = []
        while self._ready and len(out) < max_count:
            entry = self._ready.popleft()
            entry.queued = False
            if entry.acked:
                continue
            entry.attempt += 1
            entry.due = now + self._config.ack_wait_s
            entry.member = member
            self._in_flight.pop(entry.envelope.position, None)
            self._in_flight[entry.envelope.position] = entry
            out.append(StoreDelivery(self, entry))
        return out

    async def ack(self, entry: _Entry) -> None:
        if entry.acked:
            return
        entry.acked = True
        position = entry.envelope.position
        self._in_flight.pop(position, None)
        first = next(iter(self._outstanding))
        del self._outstanding[position]
        self._room.set()
        if position == first:
            self._dirty.set()

    def nack(self, entry: _Entry, attempt: int, delay_s: float) -> None:
        position = entry.envelope.position
        if entry.acked or entry.attempt != attempt or self._in_flight.get(position) is not entry:
            # already handled, redelivered, or its ack wait ran out (it is queued
            # again already): a late nack must not add a second redelivery
            return
        del self._in_flight[position]
        if delay_s > 0:
            loop = asyncio.get_running_loop()
            entry.hold = loop.call_later(delay_s, self._release, entry)
        else:
            self._release(entry)

    def _release(self, entry: _Entry) -> None:
        entry.hold = None
        if not entry.acked:
            self._requeue([entry])
            self._changed.set()

    def leave(self, member: object) -> None:
        """A member left: its unacknowledged deliveries go back to the group."""
        self.members -= 1
        mine = [e for e in self._in_flight.values() if e.member is member]
        for entry in mine:
            del self._in_flight[entry.envelope.position]
        self._requeue(mine)
        if mine:
            self._changed.set()

    def position(self) -> int:
        """Everything up to here is acknowledged (or not for this group)."""
        if self._outstanding:
            return next(iter(self._outstanding)) - 1
        return self._read_upto

    def _backoff(self) -> Backoff:
        return Backoff(self._config.retry_delay_s, self._config.max_retry_delay_s)

    async def _flush(self) -> None:
        """Save the checkpoint whenever it moved; acks arriving meanwhile share the next write."""
        backoff = self._backoff()
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self.save()
                backoff.reset()
            except (FrameworkError, OSError) as error:
                delay = backoff.next_delay()
                logger.warning(
                    "group %s: checkpoint not saved (%s); retrying in %.2fs",
                    self.name,
                    error,
                    delay,
                )
                await asyncio.sleep(delay)
                self._dirty.set()

    async def save(self) -> None:
        """Write the group's position now if it moved since the last write."""
        async with self._save_lock:
            position = self.position()
            if position > self._saved:
                await self._store.save_checkpoint(self._checkpoint_name, position)
                self._saved = position


class StoreSubscription(SubscriptionBase):
    """A member of a `StoreBus` group."""

    def __init__(self, bus: StoreBus, group: _Group) -> None:
        self._bus = bus
        self._group = group
        self._closed = False

    @property
    def group(self) -> str:
        return self._group.name

    async def fetch(self, max_count: int = 64, timeout_s: float = 1.0) -> list[Delivery]:
        if self._closed:
            raise FailedPreconditionError("the subscription is closed; subscribe again")
        return await self._group.fetch(self, max_count, timeout_s)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._group.leave(self)


class StoreBus:
    """`EventBus` over the event store itself (embedded default, one process)."""

    def __init__(self, store: CheckpointedStore, config: StoreBusConfig | None = None) -> None:
        self._store = store
        self._config = config or StoreBusConfig()
        self._groups: dict[str, _Group] = {}
        self._lock = asyncio.Lock()

    async def publish(self, envelopes: Sequence[EventEnvelope]) -> None:
        """Nothing to send: the events are already in the store, which groups read."""

    async def subscribe(
        self, group: str, *, event_types: Collection[str] = (), start_after: int = 0
    ) -> StoreSubscription:
        """Join `group`; `start_after` is where a group with no checkpoint yet begins."""
        check_group(group)
        types = check_event_types(event_types)
        async with self._lock:
            state = self._groups.get(group)
            if state is None:
                state = _Group(group, types, self._store, self._config, start_after)
                await state.start()
                self._groups[group] = state
            elif state.types != types:
                raise FailedPreconditionError(
                    f"group {group!r} already consumes types {sorted(state.types)}; "
                    f"use another group name for another filter"
                )
            state.members += 1
        return StoreSubscription(self, state)

    async def flush(self) -> None:
        """Write every group's position now (they are otherwise written just after acks)."""
        for state in list(self._groups.values()):
            await state.save()

    def position(self, group: str) -> int:
        """The group's acknowledged position (0 if it never ran here)."""
        state = self._groups.get(group)
        return state.position() if state is not None else 0

    async def close(self) -> None:
        groups, self._groups = list(self._groups.values()), {}
        for state in groups:
            await state.stop()
