"""Watch fan-out: one read per change, shared by every watcher of the changed service.

The store tells the hub which service changed (a local write, or on PostgreSQL
another replica's NOTIFY, which carries the service name).  The hub keeps one
`Topic` per watched service: the newest view, read once per change and only
for a service someone watches, then handed to all of that service's watchers
(nobody else wakes up).  Each publication carries a `memo` dict the layers
above fill once and share, e.g. the view filtered by a selector and its proto.
Nothing is polled while the store's change feed is reliable; when it may have
missed changes (PostgreSQL lost its LISTEN connection) the hub compares the
revisions of the watched services every `poll_s`, in one query, until the
store listens again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass, field
from typing import Any

from framework.registry.model import ServiceView
from framework.registry.store import RegistryStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Publication:
    """One view of a service as the hub published it, shared by all its watchers."""

    seq: int  # per topic: 1, 2, ... (a watcher that lags skips to the newest)
    view: ServiceView  # every instance, healthy or not
    memo: dict[Hashable, Any] = field(default_factory=dict, compare=False)


class Topic:
    """The watchers of one service and the newest publication."""

    __slots__ = ("_changed", "lock", "publication", "service", "wanted", "watchers")

    def __init__(self, service: str) -> None:
        self.service = service
        self.watchers = 0
        self.wanted = 0  # the newest revision announced for this service
        self.publication: Publication | None = None
        self.lock = asyncio.Lock()
        self._changed = asyncio.Event()

    def publish(self, view: ServiceView) -> bool:
        """Make `view` the newest unless it is the one already published (a lower revision
        means the store lost its state: published too); wake this service's watchers."""
        current = self.publication
        if current is not None and view.revision == current.view.revision:
            return False
        self.publication = Publication((current.seq if current else 0) + 1, view)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        return True

    async def next(self, after_seq: int) -> Publication:
        """The newest publication after `after_seq` (waits for one)."""
        while self.publication is None or self.publication.seq <= after_seq:
            await self._changed.wait()
        return self.publication


class WatchHub:
    """Per-service watch topics over a store's change feed."""

    def __init__(self, store: RegistryStore, *, poll_s: float) -> None:
        self.store = store
        self.poll_s = poll_s
        self.topics: dict[str, Topic] = {}
        self._dirty: set[str] = set()  # services announced as changed
        self._stale: set[str] = set()  # services a resync found changed (read regardless)
        self._resync = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.reads = 0  # views read (tests and benchmarks count them)

    async def start(self) -> None:
        self.store.on_change(self._on_change)
        self._task = asyncio.create_task(self._run(), name="registry-watch-hub")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _on_change(self, revision: int, service: str | None) -> None:
        """From the store: `service` changed at `revision` (None: any may have)."""
        if service is None:
            self._resync = True
        else:
            topic = self.topics.get(service)
            if topic is None:
                return  # nobody watches it: nothing to read
            current = topic.publication
            known = max(topic.wanted, current.view.revision if current is not None else 0)
            if revision <= known:
                return  # published or about to be (e.g. our own write back as a NOTIFY)
            topic.wanted = revision
            self._dirty.add(service)
        self._wake.set()

    async def follow(self, service: str) -> AsyncIterator[Publication]:
        """The service's current publication, then each newer one (the newest only, when
        the consumer is slower than the changes)."""
        topic = self.topics.get(service)
        if topic is None:
            topic = self.topics[service] = Topic(service)
        topic.watchers += 1
        try:
            if topic.publication is None:
                await self._refresh(topic, only_if_unread=True)
            seq = 0
            while True:
                publication = await topic.next(seq)
                seq = publication.seq
                yield publication
        finally:
            topic.watchers -= 1
            if topic.watchers == 0 and self.topics.get(service) is topic:
                del self.topics[service]

    async def _refresh(
        self, topic: Topic, *, only_if_unread: bool = False, force: bool = False
    ) -> None:
        async with topic.lock:  # one read at a time per service; first watchers share one
            current = topic.publication
            if only_if_unread and current is not None:
                return
            if not force and current is not None and current.view.revision >= topic.wanted:
                return  # a read for an earlier announcement already saw this change
            self.reads += 1
            topic.publish(await self.store.view(topic.service))

    async def _run(self) -> None:
        while True:
            reliable = self.store.listening
            try:
                await asyncio.wait_for(self._wake.wait(), None if reliable else self.poll_s)
            except TimeoutError:
                self._resync = True  # the feed may have missed changes: compare revisions
                await self.store.relisten()
            self._wake.clear()
            try:
                await self._publish_changes()
            except Exception:  # the store may be briefly unreachable; try on the next wake
                logger.exception("registry watch refresh failed; retrying")
                self._resync = True
                await asyncio.sleep(self.poll_s)

    async def _publish_changes(self) -> None:
        if self._resync:
            self._resync = False
            names = list(self.topics)
            revisions = await self.store.service_revisions(names) if names else {}
            for name in names:
                topic = self.topics.get(name)
                current = topic.publication if topic is not None else None
                if current is None or revisions.get(name, 0) != current.view.revision:
                    self._stale.add(name)
        dirty, self._dirty = self._dirty, set()
        stale, self._stale = self._stale, set()
        for name in dirty | stale:
            topic = self.topics.get(name)
            if topic is not None and topic.watchers:
                await self._refresh(topic, force=name in stale)
