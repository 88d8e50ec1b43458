"""Client-side discovery: follow a service's Watch stream and keep its last view.

If the registry is unreachable or the stream breaks, the last view stays in
force (clients keep calling the instances they know) while `Discovery`
reconnects with capped exponential backoff (the channel's own reconnect backoff
is capped the same way, and the Watch call waits for the channel to be ready),
resuming from the last revision it saw.  Listeners are
called synchronously with every new view.

A client can also start while the registry is down: with
`DiscoveryConfig.cache_dir` every view from the registry is written to disk
(atomically, off the event loop) and the last one is loaded at start; failing
that, `bootstrap` addresses stand in until the registry answers.  Either is
replaced by the registry's view as soon as it arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from framework.clock import Clock, SystemClock
from framework.errors import FrameworkError, UnavailableError
from framework.policy import Policy
from framework.registry.model import (
    MATCH_ALL,
    Health,
    Instance,
    Selector,
    ServiceView,
    check_address,
    check_service_name,
)
from framework.registry.wire import selector_to_proto, view_from_delta, view_from_proto
from gen.registry.v1 import registry_pb2 as pb
from gen.registry.v1 import registry_pb2_grpc

logger = logging.getLogger(__name__)

Listener = Callable[[ServiceView], None]

CACHE_FORMAT = 1


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    """Reconnect backoff after the registry stream fails (seconds); the view cache."""

    reconnect_min_s: float = 0.05
    reconnect_max_s: float = 1.0
    # Directory where the last view of each service is kept ("" = no cache).
    cache_dir: str = ""

    def __post_init__(self) -> None:
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise ValueError(
                "need 0 < reconnect_min_s <= reconnect_max_s, got "
                f"reconnect_min_s={self.reconnect_min_s} reconnect_max_s={self.reconnect_max_s}"
            )

    def channel_options(self) -> tuple[tuple[str, int], ...]:
        """gRPC reconnect backoff capped like the stream's (grpc's own default grows to
        120 s, which would keep a restarted registry unused for minutes)."""
        low = max(1, int(self.reconnect_min_s * 1000))
        high = max(low, int(self.reconnect_max_s * 1000))
        return (
            ("grpc.initial_reconnect_backoff_ms", low),
            ("grpc.min_reconnect_backoff_ms", low),
            ("grpc.max_reconnect_backoff_ms", high),
        )


class Discovery:
    """The live view of one service, from a registry's Watch stream."""

    def __init__(
        self,
        registry: str | grpc.aio.Channel,
        service: str,
        *,
        selector: Selector = MATCH_ALL,
        config: DiscoveryConfig | None = None,
        policies: Sequence[Policy] = (),
        credentials: grpc.ChannelCredentials | None = None,
        clock: Clock | None = None,
        bootstrap: Sequence[str] = (),
    ) -> None:
        """`bootstrap`: "host:port" addresses to use until the registry or the cache has a view."""
        self.service = check_service_name(service)
        self.selector = selector
        self.config = config or DiscoveryConfig()
        self.clock = clock or SystemClock()
        self.bootstrap = tuple(check_address(a) for a in bootstrap)
        self._registry = registry
        self._policies = tuple(policies)
        self._credentials = credentials
        self._channel: grpc.aio.Channel | None = None
        self._owns_channel = False
        self._listeners: list[Listener] = []
        self._task: asyncio.Task[None] | None = None
        self._saver: asyncio.Task[None] | None = None
        self._unsaved: ServiceView | None = None
        self._ready = asyncio.Event()
        self.view: ServiceView | None = None
        # Where the current view came from: "registry", "cache", "bootstrap" or "".
        self.source = ""
        self.connected = False

    @property
    def cache_file(self) -> Path | None:
        if not self.config.cache_dir:
            return None
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", self.service)
        digest = hashlib.sha256(self.service.encode()).hexdigest()[:8]
        return Path(self.config.cache_dir) / f"{safe}-{digest}.view.json"

    def subscribe(self, listener: Listener) -> None:
        """Call `listener(view)` on every new view (and now, if one is known)."""
        self._listeners.append(listener)
        if self.view is not None:
            listener(self.view)

    async def start(self) -> None:
        if self._task is not None:
            return
        if isinstance(self._registry, str):
            from framework.client import ClientConfig, connect

            self._channel = connect(
                self._registry,
                policies=self._policies,
                credentials=self._credentials,
                config=ClientConfig(
                    default_timeout_s=None,  # the watch stream is long-lived
                    grpc_options=self.config.channel_options(),
                ),
            )
            self._owns_channel = True
        else:
            self._channel = self._registry
        if self.view is None:
            await self._load_fallback()
        self._task = asyncio.create_task(self._follow(), name=f"discovery-{self.service}")

    async def wait_ready(self, timeout_s: float) -> ServiceView:
        """The first view; UnavailableError if none arrives within `timeout_s`."""
        if self.view is None:
            try:
                await asyncio.wait_for(self._ready.wait(), timeout_s)
            except TimeoutError:
                raise UnavailableError(
                    f"no view of {self.service!r} from the registry within {timeout_s:.1f}s; "
                    "check that the registry is running and reachable",
                    reason="REGISTRY_UNREACHABLE",
                ) from None
        assert self.view is not None
        return self.view

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        saver = self._saver
        if saver is not None:  # the last view reaches the disk before we go
            await asyncio.gather(saver, return_exceptions=True)
        if self._owns_channel and self._channel is not None:
            await self._channel.close()
        self._channel = None

    def _apply(self, view: ServiceView, source: str) -> None:
        self.view = view
        self.source = source
        self._ready.set()
        for listener in self._listeners:
            listener(view)
        if source == "registry" and self.cache_file is not None:
            self._unsaved = view
            if self._saver is None or self._saver.done():
                self._saver = asyncio.create_task(self._save(), name=f"view-cache-{self.service}")

    # ------------------------------------------------------------ the cache
    async def _load_fallback(self) -> None:
        path = self.cache_file
        if path is not None:
            view = await asyncio.to_thread(_read_cache, path, self.service)
            if view is not None:
                logger.info(
                    "starting %s from its cached view (revision %d, %d instances)",
                    self.service,
                    view.revision,
                    len(view.instances),
                )
                self._apply(view, "cache")
                return
        if self.bootstrap:
            logger.info("starting %s from bootstrap addresses %s", self.service, self.bootstrap)
            instances = tuple(
                Instance(self.service, a, f"bootstrap:{a}", 0.0, 0.0) for a in self.bootstrap
            )
            self._apply(ServiceView(self.service, 0, instances), "bootstrap")

    async def _save(self) -> None:
        path = self.cache_file
        while self._unsaved is not None and path is not None:
            view, self._unsaved = self._unsaved, None
            try:
                await asyncio.to_thread(_write_cache, path, view)
            except OSError as error:
                logger.warning("could not write the view cache %s: %s", path, error)

    # ----------------------------------------------------------- the stream
    def _received(self, message: pb.ServiceView) -> ServiceView | None:
        """The view a Watch message gives: a full view, or a delta applied to ours."""
        now = self.clock.now().timestamp()
        if not message.delta:
            return view_from_proto(message, now)
        base = self.view
        if base is None or self.source != "registry" or base.revision != message.base_revision:
            logger.warning(
                "registry sent a delta of %s against revision %d, we hold %s; asking for a "
                "full view",
                self.service,
                message.base_revision,
                base.revision if base is not None else "none",
            )
            return None
        return view_from_delta(base, message, now)

    async def _follow(self) -> None:
        assert self._channel is not None
        stub = registry_pb2_grpc.RegistryServiceStub(self._channel)
        delay = self.config.reconnect_min_s
        while True:
            # A cached or bootstrap view is not the registry's: ask for the full view.
            after = self.view.revision if self.view is not None and self.source == "registry" else 0
            request = pb.WatchRequest(
                service=self.service,
                selector=selector_to_proto(self.selector),
                after_revision=after,
                deltas=True,
            )
            try:
                # wait_for_ready: while the registry is away the call waits for the
                # channel (reconnecting every reconnect_max_s at most) instead of failing
                # fast, so the stream resumes as soon as the registry is back.
                async for message in stub.Watch(request, timeout=None, wait_for_ready=True):
                    if not self.connected:
                        logger.info("following %s in the registry", self.service)
                    self.connected = True
                    delay = self.config.reconnect_min_s
                    view = self._received(message)
                    if view is None:  # a delta we cannot apply: start over with a full view
                        self.source = ""
                        break
                    self._apply(view, "registry")
            except (grpc.aio.AioRpcError, FrameworkError) as error:
                if self.connected:
                    logger.warning(
                        "registry watch of %s failed (%s); serving the last known view",
                        self.service,
                        error,
                    )
            self.connected = False
            await self.clock.sleep(delay)
            delay = min(delay * 2, self.config.reconnect_max_s)


def _write_cache(path: Path, view: ServiceView) -> None:
    """Write atomically: a reader sees the old file or the new one, never half of one."""
    document = {
        "format": CACHE_FORMAT,
        "service": view.service,
        "revision": view.revision,
        "saved_at": datetime.now(UTC).isoformat(),
        "version_weights": dict(view.version_weights),
        "instances": [
            {
                "address": i.address,
                "version": i.version,
                "zone": i.zone,
                "weight": i.weight,
                "metadata": dict(i.metadata),
                "health": i.health.name,
                "lease_id": i.lease_id,
            }
            for i in view.instances
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(document, out, sort_keys=True)
            out.flush()
            os.fsync(out.fileno())
        Path(tmp).replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            Path(tmp).unlink()
        raise


def _read_cache(path: Path, service: str) -> ServiceView | None:
    """The cached view, or None (logged) when the file is missing or not usable."""
    try:
        document: Any = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        logger.warning("ignoring the view cache %s: %s", path, error)
        return None
    try:
        if document.get("format") != CACHE_FORMAT or document.get("service") != service:
            raise ValueError("written for another format or service")
        instances = tuple(
            Instance(
                service=service,
                address=check_address(str(i["address"])),
                lease_id=str(i.get("lease_id", "")),
                expires_at=0.0,
                ttl_s=0.0,
                version=str(i.get("version", "")),
                zone=str(i.get("zone", "")),
                weight=int(i.get("weight", 100)),
                metadata={str(k): str(v) for k, v in dict(i.get("metadata", {})).items()},
                health=Health[str(i.get("health", "UNKNOWN"))],
            )
            for i in document["instances"]
        )
        weights = {str(k): int(v) for k, v in dict(document.get("version_weights", {})).items()}
        return ServiceView(service, int(document["revision"]), instances, weights)
    except (AttributeError, KeyError, TypeError, ValueError, FrameworkError) as error:
        logger.warning("ignoring the view cache %s: %s", path, error)
        return None
