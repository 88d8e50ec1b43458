"""NATS JetStream adapter of the event bus (nats-py), for many processes and machines.

* One stream per subject prefix; an event goes to
  `<prefix>.<aggregate_type>.<event_type>` (the event type is the message full
  name, so it spans several subject tokens; dots in the aggregate type become
  `_` so it stays one token).  The payload is the serialized protobuf envelope.
* `publish` sends every envelope with `Nats-Msg-Id = event id` and waits for
  each JetStream publish acknowledgement: a re-publish after a crash, inside the
  stream's duplicate window, is dropped by the server rather than stored twice.
* A consumer group is a durable pull consumer named after the group, with
  explicit acknowledgement: members bound to it share the messages, each group
  gets all of them, a `nack` or a missing ack within `ack_wait_s` redelivers.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import nats
import nats.errors
import nats.js.errors
from google.protobuf.message import DecodeError
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import api

from framework.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    UnavailableError,
)
from framework.events.bus import Delivery, SubscriptionBase, check_event_types, check_group
from gen.events.v1.envelope_pb2 import EventEnvelope

logger = logging.getLogger(__name__)

MSG_ID_HEADER = "Nats-Msg-Id"
_STREAM_NOT_FOUND = 10059  # JetStream API error code


class _Consumer(NamedTuple):
    """A group's durable consumer as this process defines it."""

    group: str
    filter_subject: str
    description: str


_TOKEN = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True, slots=True)
class JetStreamConfig:
    """Where events go on JetStream and how groups consume them."""

    stream: str = "EVENTS"
    subject_prefix: str = "events"
    duplicate_window_s: float = 120.0
    ack_wait_s: float = 30.0
    max_deliver: int = -1
    max_ack_pending: int = 1000
    publish_timeout_s: float = 5.0
    memory_storage: bool = False
    # an idle member checks this often that its consumer still exists (re-creating it
    # after JetStream lost its state); 0 turns the check off
    consumer_check_interval_s: float = 2.0

    def __post_init__(self) -> None:
        if not re.match(r"^[A-Za-z0-9_-]{1,64}$", self.stream):
            raise ValueError(f"stream must be 1-64 letters, digits, '_' or '-': {self.stream!r}")
        if not _TOKEN.match(self.subject_prefix):
            raise ValueError(
                f"subject_prefix must be dot-separated tokens without wildcards: "
                f"{self.subject_prefix!r}"
            )
        for name in ("duplicate_window_s", "ack_wait_s", "publish_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_deliver == 0 or self.max_deliver < -1:
            raise ValueError(f"max_deliver must be -1 (unlimited) or >= 1: {self.max_deliver}")
        if self.max_ack_pending < 1:
            raise ValueError(f"max_ack_pending must be >= 1, got {self.max_ack_pending}")
        if self.consumer_check_interval_s < 0:
            raise ValueError(
                f"consumer_check_interval_s must be >= 0 (0: off), "
                f"got {self.consumer_check_interval_s}"
            )


@contextmanager
def _reachable(what: str) -> Iterator[None]:
    """NATS client failures (connection closed, reconnecting, API errors) as UnavailableError."""
    try:
        yield
    except TimeoutError:
        raise  # callers decide what a timeout means (an empty fetch, a slow publish ack)
    except nats.errors.Error as error:
        raise UnavailableError(f"NATS {what} failed: {error!r}; retry when NATS is back") from error


def subject_for(prefix: str, envelope: EventEnvelope) -> str:
    """`<prefix>.<aggregate_type>.<event_type>` for one envelope."""
    aggregate = _UNSAFE.sub("_", envelope.aggregate_type) or "_"
    return f"{prefix}.{aggregate}.{envelope.type}"


class JetStreamDelivery:
    """One JetStream message carrying an envelope."""

    __slots__ = ("_envelope", "_expires", "_msg", "_pending")

    def __init__(
        self,
        msg: Msg,
        envelope: EventEnvelope,
        pending: dict[int, JetStreamDelivery],
        expires: float,
    ) -> None:
        self._msg = msg
        self._envelope = envelope
        self._pending = pending
        self._expires = expires  # loop time after which the server redelivers on its own
        pending[id(self)] = self

    @property
    def envelope(self) -> EventEnvelope:
        return self._envelope

    @property
    def attempt(self) -> int:
        return int(self._msg.metadata.num_delivered or 1)

    async def ack(self) -> None:
        if self._pending.pop(id(self), None) is not None:
            with _reachable("ack"):
                await self._msg.ack()

    async def nack(self, delay_s: float = 0.0) -> None:
        if self._pending.pop(id(self), None) is None:
            return
        if asyncio.get_running_loop().time() >= self._expires:
            # The ack wait ran out: the server redelivers (or did) already; a nak now
            # would add a second redelivery of the same message.
            logger.debug("late nack of %s ignored (ack wait over)", self._envelope.event_id)
            return
        with _reachable("nak"):
            await self._msg.nak(delay=delay_s if delay_s > 0 else None)


class JetStreamSubscription(SubscriptionBase):
    """A member of a group: a binding to the group's durable pull consumer."""

    def __init__(
        self,
        sub: nats.js.JetStreamContext.PullSubscription,
        event_types: frozenset[str],
        bus: JetStreamBus,
        consumer: _Consumer,
    ) -> None:
        self._sub = sub
        self._event_types = event_types
        self._bus = bus
        self._consumer = consumer
        self._closed = False
        self._pending: dict[int, JetStreamDelivery] = {}
        self._checked_at = asyncio.get_running_loop().time()
        self._reconnects = bus.reconnects  # a reconnect since: check at the next empty fetch

    async def fetch(self, max_count: int = 64, timeout_s: float = 1.0) -> list[Delivery]:
        if self._closed:
            raise FailedPreconditionError("the subscription is closed; subscribe again")
        try:
            with _reachable("fetch"):
                msgs = await self._sub.fetch(max_count, timeout=timeout_s)
        except TimeoutError:  # nats.errors.TimeoutError or asyncio's: nothing came
            await self._check_consumer()
            return []
        except UnavailableError:
            self._checked_at = 0.0  # check at the next empty fetch, once NATS answers
            raise
        loop_time = asyncio.get_running_loop().time()
        self._checked_at = loop_time
        # a little before the server's own ack wait runs out (clocks and the trip differ)
        expires = loop_time + self._bus.config.ack_wait_s * 0.9
        out: list[Delivery] = []
        for msg in msgs:
            try:
                envelope = EventEnvelope.FromString(msg.data)
            except DecodeError:
                logger.error("dropping undecodable message on %s (not an envelope)", msg.subject)
                await msg.term()
                continue
            if self._event_types and envelope.type not in self._event_types:
                await msg.ack()  # not for this group's filter
                continue
            out.append(JetStreamDelivery(msg, envelope, self._pending, expires))
        return out

    async def _check_consumer(self) -> None:
        """Nothing came for a while: make sure the stream and the group's consumer exist.

        A JetStream server restarted without its data (memory storage, a wiped
        store) has neither; fetches then just time out.  Re-creating them (the
        same durable name, so this binding works again) lets the group receive
        what the relay publishes again.
        """
        interval = self._bus.config.consumer_check_interval_s
        now = asyncio.get_running_loop().time()
        reconnected = self._bus.reconnects != self._reconnects
        if interval <= 0 or (now - self._checked_at < interval and not reconnected):
            return
        self._checked_at = now
        self._reconnects = self._bus.reconnects
        try:
            with _reachable("consumer check"):
                await self._bus.ensure_consumer(self._consumer)
        except UnavailableError as error:
            logger.warning("group %s: consumer check failed (%s)", self._consumer.group, error)

    async def close(self) -> None:
        """Leave the group: unacked deliveries are nak'ed so other members get them now."""
        if not self._closed:
            self._closed = True
            for delivery in list(self._pending.values()):
                await delivery.nack()
            await self._sub.unsubscribe()


class _ConnectionEvents:
    """nats-py connection callbacks, logged through this module's logger."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.bus: JetStreamBus | None = None

    async def error(self, error: Exception) -> None:
        logger.warning("NATS %s: %r", self.url, error)

    async def disconnected(self) -> None:
        logger.warning("NATS %s: disconnected; reconnecting", self.url)

    async def reconnected(self) -> None:
        logger.info("NATS %s: reconnected", self.url)
        if self.bus is not None:
            self.bus.reconnects += 1


class JetStreamBus:
    """`EventBus` on NATS JetStream; `await JetStreamBus.connect(url, config)`."""

    def __init__(self, nc: NatsClient, config: JetStreamConfig, *, owns: bool = False) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._config = config
        self._owns = owns
        self._stream_resets = 0
        self.reconnects = 0  # connections re-established since connect (members check then)

    @property
    def stream_resets(self) -> int:
        """How many times this bus found its stream missing and created it (see `OutboxRelay`)."""
        return self._stream_resets

    @classmethod
    async def connect(
        cls,
        url: str,
        config: JetStreamConfig | None = None,
        *,
        connect_timeout_s: float = 2.0,
        max_reconnect_attempts: int = -1,
        reconnect_wait_s: float = 2.0,
    ) -> JetStreamBus:
        """Connect to `url`, make sure the stream exists, and own the connection.

        The connection keeps reconnecting (forever by default, every
        `reconnect_wait_s`) after it is lost; publishes meanwhile fail with
        `UnavailableError` and the relay retries.  After a reconnect, members
        check their consumer at their next empty fetch.
        """
        events = _ConnectionEvents(url)
        try:
            nc = await nats.connect(
                url,
                connect_timeout=connect_timeout_s,
                max_reconnect_attempts=max_reconnect_attempts,
                reconnect_time_wait=reconnect_wait_s,
                allow_reconnect=True,
                error_cb=events.error,
                disconnected_cb=events.disconnected,
                reconnected_cb=events.reconnected,
            )
        except (OSError, nats.errors.NoServersError) as error:
            raise UnavailableError(f"cannot reach NATS at {url}: {error}") from error
        bus = cls(nc, config or JetStreamConfig(), owns=True)
        events.bus = bus
        try:
            await bus.ensure_stream()
        except BaseException:
            await nc.close()
            raise
        return bus

    @property
    def config(self) -> JetStreamConfig:
        return self._config

    async def ensure_stream(self) -> None:
        """Create the stream for `<prefix>.>` if it does not exist yet."""
        with _reachable("stream setup"):
            await self._ensure_stream()

    async def _ensure_stream(self) -> None:
        config = self._config
        wanted = f"{config.subject_prefix}.>"
        try:
            info = await self._js.stream_info(config.stream)
        except nats.js.errors.NotFoundError:
            info = None
        if info is not None:
            if wanted not in (info.config.subjects or []):
                raise FailedPreconditionError(
                    f"JetStream stream {config.stream!r} holds subjects "
                    f"{info.config.subjects}, not {wanted!r}: use another stream name "
                    f"or subject_prefix"
                )
            window = float(info.config.duplicate_window or 0)
            if window + 1e-3 < config.duplicate_window_s:
                raise FailedPreconditionError(
                    f"JetStream stream {config.stream!r} drops duplicate publishes for "
                    f"{window:g}s, less than duplicate_window_s={config.duplicate_window_s:g}"
                    f": a relay re-publishing after a crash could store events twice. Raise "
                    f"the stream's duplicate window (nats stream edit {config.stream} "
                    f"--dupe-window {config.duplicate_window_s:g}s) or lower duplicate_window_s"
                )
            return
        try:
            await self._js.add_stream(
                name=config.stream,
                subjects=[f"{config.subject_prefix}.>"],
                duplicate_window=config.duplicate_window_s,
                storage=api.StorageType.MEMORY if config.memory_storage else api.StorageType.FILE,
            )
        except nats.js.errors.BadRequestError:
            return  # another process created it first (a retry finds it)
        self._stream_resets += 1
        logger.info("JetStream stream %s created", config.stream)

    async def stream_messages(self) -> int:
        """How many messages the stream holds (de-duplicated publishes count once)."""
        with _reachable("stream info"):
            info = await self._js.stream_info(self._config.stream)
        return int(info.state.messages)

    async def delete_stream(self) -> None:
        """Remove the stream and its consumers (tests, teardown)."""
        try:
            await self._js.delete_stream(self._config.stream)
        except nats.js.errors.NotFoundError:
            pass
        except nats.errors.Error as error:
            raise UnavailableError(f"NATS stream delete failed: {error!r}") from error

    async def publish(self, envelopes: Sequence[EventEnvelope]) -> None:
        """Send in order, then wait for every publish acknowledgement."""
        if not envelopes:
            return
        futures: list[asyncio.Future[api.PubAck]] = []
        try:
            for envelope in envelopes:
                if not envelope.event_id or not envelope.type:
                    raise InvalidArgumentError(
                        "envelope.event_id and envelope.type must be set; publish stored events"
                    )
                futures.append(
                    await self._js.publish_async(
                        subject_for(self._config.subject_prefix, envelope),
                        envelope.SerializeToString(),
                        stream=self._config.stream,
                        headers={MSG_ID_HEADER: envelope.event_id},
                    )
                )
            async with asyncio.timeout(self._config.publish_timeout_s):
                await asyncio.gather(*futures)
        except TimeoutError as error:
            raise UnavailableError(
                f"JetStream did not acknowledge {len(envelopes)} publishes within "
                f"{self._config.publish_timeout_s}s; nothing is lost, publish again"
            ) from error
        except nats.js.errors.NoStreamResponseError as error:
            # No stream listens on the subject: JetStream lost it (restarted without
            # its data).  Create it again; the relay sees `stream_resets` move and
            # publishes its events again from the start (consumers de-duplicate).
            with _reachable("stream setup"):
                await self._ensure_stream()
            raise UnavailableError(
                f"JetStream stream {self._config.stream!r} was missing (the server lost "
                f"its data?); it was created again: publish again"
            ) from error
        except nats.errors.Error as error:
            raise UnavailableError(f"JetStream publish failed: {error!r}; publish again") from error
        finally:
            for future in futures:
                future.cancel()

    async def subscribe(
        self, group: str, *, event_types: Collection[str] = ()
    ) -> JetStreamSubscription:
        """Bind to the durable consumer `group`, creating it on first use."""
        check_group(group)
        types = check_event_types(event_types)
        prefix = self._config.subject_prefix
        # NATS < 2.10 has one filter per consumer: filter on the server for one type,
        # otherwise on the client (acknowledging what the group does not want).
        wanted = f"{prefix}.*.{next(iter(types))}" if len(types) == 1 else f"{prefix}.>"
        described = "event types: " + (",".join(sorted(types)) or "all")
        consumer = _Consumer(group, wanted, described)
        with _reachable("subscribe"):
            await self.ensure_consumer(consumer)
            sub = await self._js.pull_subscribe_bind(durable=group, stream=self._config.stream)
        return JetStreamSubscription(sub, types if len(types) > 1 else frozenset(), self, consumer)

    async def ensure_consumer(self, consumer: _Consumer) -> None:
        """Create the group's durable consumer (and the stream) unless they exist."""
        try:
            await self._ensure_consumer(consumer)
        except nats.js.errors.NotFoundError:  # the stream itself is gone
            await self._ensure_stream()
            await self._ensure_consumer(consumer)

    async def _ensure_consumer(self, consumer: _Consumer) -> None:
        stream = self._config.stream
        group, wanted, described = consumer
        try:
            info = await self._js.consumer_info(stream, group)
        except nats.js.errors.NotFoundError as error:
            if getattr(error, "err_code", None) == _STREAM_NOT_FOUND:
                raise
            info = None
        if info is not None and (info.config.filter_subject, info.config.description) != (
            wanted,
            described,
        ):
            raise FailedPreconditionError(
                f"group {group!r} already consumes {info.config.description!r}, not "
                f"{described!r}; use another group name for another event type filter"
            )
        if info is None:
            try:
                await self._js.add_consumer(
                    stream,
                    config=api.ConsumerConfig(
                        durable_name=group,
                        name=group,
                        description=described,
                        ack_policy=api.AckPolicy.EXPLICIT,
                        deliver_policy=api.DeliverPolicy.ALL,
                        ack_wait=self._config.ack_wait_s,
                        max_deliver=self._config.max_deliver,
                        max_ack_pending=self._config.max_ack_pending,
                        filter_subject=wanted,
                    ),
                )
            except nats.js.errors.BadRequestError:
                pass  # another member created it first
            else:
                logger.info("JetStream consumer %s created on stream %s", group, stream)

    async def close(self) -> None:
        if self._owns and not self._nc.is_closed:
            await self._nc.drain()
