"""A small TCP fault proxy on 127.0.0.1, put between services and PostgreSQL or NATS.

    proxy = FaultProxy("postgres", upstream=("127.0.0.1", 5432))
    await proxy.start()                       # proxy.port: point the system's store URL at it
    proxy.set(ProxyMode.LATENCY, latency_s=0.2)   # every chunk each way arrives 200 ms later
    proxy.set(ProxyMode.RESET)                # every connection reset (RST), new ones too
    proxy.set(ProxyMode.BLACKHOLE)            # nothing flows either way; connections hang
    proxy.set(ProxyMode.PASS)                 # healed: hung connections go on where they were
    await proxy.close()

A blackhole is a partition that heals: bytes are neither read nor forwarded while it
lasts (TCP backpressure holds them), and new connections are accepted but not
connected upstream until it ends.  A reset is a cut: every open connection is closed
with RST (SO_LINGER 0) and new ones are reset at once until the mode changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["FaultProxy", "ProxyMode"]

logger = logging.getLogger(__name__)

_CHUNK = 65536
_LINGER_RST = struct.pack("ii", 1, 0)


class ProxyMode(enum.Enum):
    PASS = "pass"
    LATENCY = "latency"
    RESET = "reset"
    BLACKHOLE = "blackhole"


@dataclass(eq=False)
class _Link:
    """One client connection and its upstream connection."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def reset(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                _reset(writer)
        for task in self.tasks:
            task.cancel()


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    writer.transport.abort()


class FaultProxy:
    """Forwards 127.0.0.1:`port` to `upstream`, adding latency, resets or a blackhole."""

    def __init__(
        self,
        name: str,
        upstream: tuple[str, int],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"the fault proxy listens on loopback only, got {host!r}")
        self.name = name
        self.upstream = upstream
        self.host = host
        self._port = port
        self.mode = ProxyMode.PASS
        self.latency_s = 0.0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._links: set[_Link] = set()
        self._server: asyncio.Server | None = None
        self.connections = 0  # accepted so far
        self.resets = 0  # connections reset by the proxy so far
        self._now = clock or (lambda: asyncio.get_running_loop().time())

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError(f"proxy {self.name} is not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, self.host, self._port)
        logger.info("fault proxy %s: %s -> %s:%s", self.name, self.address, *self.upstream)
        return self

    def set(self, mode: ProxyMode, *, latency_s: float = 0.0) -> None:
        """Switch the mode now; RESET also cuts every open connection."""
        if not 0 <= latency_s <= 60:
            raise ValueError(f"latency_s must be within 0..60, got {latency_s!r}")
        if mode is ProxyMode.LATENCY and latency_s <= 0:
            raise ValueError("latency mode needs latency_s > 0")
        self.mode, self.latency_s = mode, latency_s
        if mode is ProxyMode.BLACKHOLE:
            self._flowing.clear()
        else:
            self._flowing.set()
        if mode is ProxyMode.RESET:
            for link in list(self._links):
                self._drop(link)
        logger.warning("fault proxy %s: %s", self.name, mode.value)

    def _drop(self, link: _Link) -> None:
        self._links.discard(link)
        self.resets += 1
        link.reset()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        link = _Link(writer)
        if self.mode is ProxyMode.RESET:
            self.resets += 1
            _reset(writer)
            return
        self._links.add(link)
        try:
            await self._flowing.wait()  # a blackhole: accepted, but nothing answers
            if link not in self._links:
                return
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError as error:
            logger.info("fault proxy %s: upstream refused (%s)", self.name, error)
            self._links.discard(link)
            _reset(writer)
            return
        link.upstream = up_writer
        if link not in self._links:  # reset while connecting
            link.reset()
            return
        link.tasks = [
            asyncio.create_task(self._pump(reader, up_writer, link)),
            asyncio.create_task(self._pump(up_reader, writer, link)),
        ]
        await asyncio.gather(*link.tasks, return_exceptions=True)
        if link in self._links:
            self._links.discard(link)
            for w in (writer, up_writer):
                w.close()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link
    ) -> None:
        """Copy one direction; chunks keep their order, each delayed by the latency."""
        pending: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        sender = asyncio.create_task(self._send(pending, writer))
        sender.add_done_callback(
            lambda task: link.reset() if not task.cancelled() and task.exception() else None
        )
        try:
            while True:
                await self._flowing.wait()
                data = await reader.read(_CHUNK)
                if not data:
                    break
                await pending.put((self._now() + self.latency_s, data))
            await pending.put((0.0, b""))
            await sender
        except (ConnectionError, OSError):
            link.reset()
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender

    async def _send(
        self, pending: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter
    ) -> None:
        while True:
            due, data = await pending.get()
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            wait = due - self._now()
            if wait > 0:
                await asyncio.sleep(wait)
            await self._flowing.wait()
            writer.write(data)
            await writer.drain()

    async def close(self) -> None:
        """Stop listening and cut every connection."""
        server, self._server = self._server, None
        for link in list(self._links):
            self._links.discard(link)
            link.reset()
        if server is not None:
            server.close()
            await server.wait_closed()
