"""Worker processes through real processes: one port shared by supervised workers; a killed
worker is restarted while calls keep succeeding; SIGTERM drains every worker without failing
an in-flight call; one scrape shows every worker's metrics; one registration per server."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import urllib.request
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from framework.client import connect
from framework.config import ServerConfig
from framework.policies.retry import RetryConfig, RetryPolicy
from framework.server import Server
from framework.workers.slot import ENV_INDEX
from gen.echo.v1 import echo_pb2, echo_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
START_S = 240.0  # a loaded 2-core machine starts three Python processes slowly
ECHO = "echo.v1.EchoService"


class Supervised:
    """A `python -m framework serve ... --workers N` process and its log lines."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read())
        self.address = ""
        self.metrics_url = ""

    async def _read(self) -> None:
        assert self.process.stderr is not None
        while line := await self.process.stderr.readline():
            self.lines.append(line.decode(errors="replace").rstrip())
            self._changed.set()
        self._changed.set()

    async def wait_for(
        self, pattern: str, *, after: int = 0, timeout_s: float = START_S
    ) -> re.Match[str]:
        """The first log line from index `after` on matching `pattern` (bounded wait)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            for line in self.lines[after:]:
                if match := re.search(pattern, line):
                    return match
            if self._reader.done():
                pytest.fail(f"process ended before {pattern!r}:\n" + "\n".join(self.lines[-40:]))
            remaining = deadline - loop.time()
            if remaining <= 0:
                pytest.fail(f"no {pattern!r} within {timeout_s} s:\n" + "\n".join(self.lines[-40:]))
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=remaining)
            except TimeoutError:
                pass

    def count(self, pattern: str) -> int:
        return sum(1 for line in self.lines if re.search(pattern, line))


@asynccontextmanager
async def supervised(
    workers: int, env: Mapping[str, str] = {}, *, command: list[str] | None = None
) -> AsyncIterator[Supervised]:
    environ = {
        **os.environ,
        "SERVICE_HOST": "127.0.0.1",
        "SERVICE_PORT": "0",
        "SERVICE_INSECURE_DEV": "1",
        "SERVICE_GRACE_S": "30",
        **env,
    }
    environ.pop(ENV_INDEX, None)
    argv = command or [
        sys.executable, "-m", "framework", "serve", "tests.framework.workers_app",
        "--workers", str(workers),
    ]  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        *argv, cwd=ROOT, env=environ, stderr=asyncio.subprocess.PIPE
    )
    running = Supervised(process)
    try:
        match = await running.wait_for(r"serving on (\S+) with (\d+) workers")
        running.address = match.group(1)
        assert int(match.group(2)) == workers
        yield running
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout=120)
            except TimeoutError:
                process.kill()
                await process.wait()
        await running._reader


async def call(address: str, text: str = "hi", *, delay_s: float = 0.0) -> tuple[int, str]:
    """One Echo on a new connection (so the kernel picks a worker): (worker pid, text)."""
    local = [("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.insecure_channel(address, options=local) as channel:
        reply = await echo_pb2_grpc.EchoServiceStub(channel).Echo(
            echo_pb2.EchoRequest(text=text, delay_s=delay_s), timeout=60, wait_for_ready=True
        )
    pid, _, echoed = reply.text.partition(":")
    return int(pid), echoed


async def pids_seen(address: str, want: int, *, exclude: frozenset[int] = frozenset()) -> set[int]:
    """Calls on new connections until `want` distinct worker pids answered (bounded)."""
    seen: set[int] = set()
    for _ in range(400):
        pid, _ = await call(address)
        if pid not in exclude:
            seen.add(pid)
        if len(seen) >= want:
            return seen
    pytest.fail(f"only {sorted(seen)} of {want} workers answered 400 calls")


async def channel_per_worker(address: str, workers: int) -> dict[int, grpc.aio.Channel]:
    """One open connection to each worker, by pid (own subchannel pools: not shared)."""
    channels: dict[int, grpc.aio.Channel] = {}
    for _ in range(400):
        channel = grpc.aio.insecure_channel(
            address, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        reply = await echo_pb2_grpc.EchoServiceStub(channel).Echo(
            echo_pb2.EchoRequest(text="which"), timeout=60, wait_for_ready=True
        )
        pid = int(reply.text.split(":")[0])
        if pid in channels:
            await channel.close()
        else:
            channels[pid] = channel
        if len(channels) == workers:
            return channels
    pytest.fail(f"only {len(channels)} of {workers} workers answered 400 connections")


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return True
    return state in ("Z", "X")


async def test_killed_worker_is_restarted_and_calls_keep_succeeding() -> None:
    """SIGKILL one of two workers: every call (with the client's retry policy) succeeds, and
    the supervisor starts a new worker that serves on the same port."""
    async with supervised(2) as server:
        first = await pids_seen(server.address, 2)
        victim = min(first)
        retrying = connect(server.address, policies=[RetryPolicy(RetryConfig(services=(ECHO,)))])
        stub = echo_pb2_grpc.EchoServiceStub(retrying)
        failures: list[grpc.StatusCode] = []
        done = 0
        stop = asyncio.Event()

        async def load() -> None:
            nonlocal done
            while not stop.is_set():
                try:
                    await stub.Echo(
                        echo_pb2.EchoRequest(text="load"), timeout=60, wait_for_ready=True
                    )
                    done += 1
                except grpc.aio.AioRpcError as error:
                    failures.append(error.code())

        loaders = [asyncio.create_task(load()) for _ in range(4)]
        try:
            mark = len(server.lines)
            os.kill(victim, signal.SIGKILL)
            for _ in range(1000):
                if _gone(victim):
                    break
                await asyncio.sleep(0.05)
            assert _gone(victim)
            # new connections reach the surviving worker at once
            for _ in range(10):
                pid, text = await call(server.address)
                assert pid != victim and text == "hi"
            restarted = await server.wait_for(r"worker \d+ serving \(pid (\d+)\)", after=mark)
            new_pid = int(restarted.group(1))
            assert new_pid not in first
            assert await pids_seen(server.address, 1, exclude=frozenset(first)) == {new_pid}
        finally:
            stop.set()
            await asyncio.gather(*loaders)
            await retrying.close()
        assert failures == []
        assert done > 0
        assert server.count(r"exited with code -9 .* restarting") == 1


async def test_sigterm_drains_every_worker_without_failing_in_flight_calls() -> None:
    """SIGTERM to the supervisor: every worker finishes its in-flight streams, then all exit."""
    async with supervised(2) as server:
        channels = await channel_per_worker(server.address, 2)
        try:
            streams = []
            for channel in channels.values():
                for _ in range(3):
                    stream = echo_pb2_grpc.EchoServiceStub(channel).EchoStream(
                        echo_pb2.EchoRequest(text="drain", repeat=2, delay_s=1.5), timeout=120
                    )
                    first = await stream.read()  # the call is in flight in that worker
                    assert isinstance(first, echo_pb2.EchoResponse)
                    streams.append((stream, first))
            assert server.process.pid is not None
            os.kill(server.process.pid, signal.SIGTERM)
            for stream, first in streams:
                second = await stream.read()
                assert isinstance(second, echo_pb2.EchoResponse)
                assert await stream.read() is grpc.aio.EOF
                texts = [reply.text.split(":", 1)[1] for reply in (first, second)]
                assert texts == ["drain#0", "drain#1"]
                assert await stream.code() == grpc.StatusCode.OK
        finally:
            for channel in channels.values():
                await channel.close()
        assert await asyncio.wait_for(server.process.wait(), timeout=120) == 0
        await server.wait_for(r"stopped \(2 workers\)")
        assert server.count(r"workers-app stopped$") == 2
        for pid in channels:
            assert _gone(pid)


async def test_log_lines_say_which_worker_wrote_them() -> None:
    """Two workers write to one stderr: each worker's plain log lines start with
    `[worker-<index>]` and its access-log lines carry `"process":"worker-<index>"`; the
    supervisor's own lines have no prefix."""
    async with supervised(2, {"WORKERS_APP_ACCESS_LOG": "1"}) as server:
        await pids_seen(server.address, 2)
        for index in (0, 1):
            # (the access log's constant fields are json.dumps'ed: ", " and ": ")
            await server.wait_for(
                rf'"process": ?"worker-{index}", ?"rpc": ?"/echo.v1.EchoService/Echo"'
            )
    workers = [line for line in server.lines if line.startswith("[worker-")]
    assert {line[:10] for line in workers} == {"[worker-0]", "[worker-1]"}, server.lines[-40:]
    assert server.count(r"^\[worker-[01]\] INFO framework.server: workers-app stopped$") == 2
    assert server.count(r"^INFO framework.workers.supervisor: .*stopped \(2 workers\)") == 1


async def test_metrics_of_every_worker_in_one_scrape() -> None:
    """The supervisor's /metrics has each worker's RPC series (label worker) and the count."""
    command = [sys.executable, "-m", "tests.framework.workers_app", "2"]  # Server(workers=2)
    async with supervised(2, {"WORKERS_APP_METRICS_PORT": "0"}, command=command) as server:
        url = (await server.wait_for(r"metrics of every worker on (\S+)")).group(1)
        await pids_seen(server.address, 2)

        def scrape() -> str:
            with urllib.request.urlopen(url, timeout=30) as reply:
                return str(reply.read().decode())

        text = await asyncio.to_thread(scrape)
        for worker in ("0", "1"):
            assert re.search(
                r'rpc_server_call_duration_seconds_count\{[^}]*rpc_method="echo.v1.EchoService/Echo"'
                rf'[^}}]*worker="{worker}"[^}}]*\}} [1-9]',
                text,
            ), text
        assert "\nframework_workers 2.0" in text
        assert "\nframework_worker_restarts_total 0.0" in text


async def test_supervisor_registers_the_address_once_and_deregisters_at_drain(
    tmp_path: Path,
) -> None:
    """With a registration agent, the supervisor (not each worker) registers the shared
    address once when every worker serves, and deregisters it when SIGTERM drains them."""
    from framework.registry.sqlite import SqliteStore
    from tests.registry.fleet import registry_node

    store = SqliteStore(tmp_path / "registry.sqlite")
    await store.open()
    try:
        async with registry_node(store) as node:
            env = {"WORKERS_APP_REGISTRY": node.address, "WORKERS_APP_DEREGISTER_WAIT_S": "20"}
            async with supervised(2, env) as server:
                await server.wait_for(rf"registered {ECHO} at {re.escape(server.address)}")
                view = await node.registry.discover(ECHO)
                assert [i.address for i in view.instances] == [server.address]
                assert server.count(rf"registered {ECHO} at") == 1
                await pids_seen(server.address, 2)
                assert server.process.pid is not None
                os.kill(server.process.pid, signal.SIGTERM)
                # while the agent waits for clients to see the instance leave, every worker
                # answers health NOT_SERVING and still serves calls
                await server.wait_for(rf"deregistered {ECHO}")
                assert (await node.registry.discover(ECHO)).instances == ()
                channels = await channel_per_worker(server.address, 2)
                try:
                    for pid, channel in channels.items():
                        check = health_pb2_grpc.HealthStub(channel).Check
                        for _ in range(600):  # bounded: the worker reads "drain" from its link
                            reply = await check(health_pb2.HealthCheckRequest(), timeout=60)
                            if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                                break
                            await asyncio.sleep(0.05)
                        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
                        echo = await echo_pb2_grpc.EchoServiceStub(channel).Echo(
                            echo_pb2.EchoRequest(text="still"), timeout=60
                        )
                        assert echo.text == f"{pid}:still"
                finally:
                    for channel in channels.values():
                        await channel.close()
                assert await asyncio.wait_for(server.process.wait(), timeout=120) == 0
                await server.wait_for(rf"deregistered {ECHO} at {re.escape(server.address)}")
                assert server.count(r"deregistered") == 1
                assert (await node.registry.discover(ECHO)).instances == ()
    finally:
        await store.close()


async def test_restart_backs_off_and_workers_drain_when_the_supervisor_dies() -> None:
    """A worker killed again soon after its restart waits twice as long to come back; when
    the supervisor itself is SIGKILLed, its workers see their socket close and drain."""
    async with supervised(2) as server:
        first = await pids_seen(server.address, 2)
        victim = min(first)
        mark = len(server.lines)
        os.kill(victim, signal.SIGKILL)
        again = int(
            (await server.wait_for(r"worker \d+ serving \(pid (\d+)\)", after=mark)).group(1)
        )
        mark = len(server.lines)
        os.kill(again, signal.SIGKILL)
        await server.wait_for(r"worker \d+ serving \(pid (\d+)\)", after=mark)
        delays = [
            float(m) for line in server.lines for m in re.findall(r"restarting in ([\d.]+) s", line)
        ]
        assert delays == [0.2, 0.4]
        workers = await pids_seen(server.address, 2)
        assert server.process.pid is not None
        os.kill(server.process.pid, signal.SIGKILL)
        for _ in range(2400):  # bounded: 120 s
            if all(_gone(pid) for pid in workers):
                break
            await asyncio.sleep(0.05)
        assert all(_gone(pid) for pid in workers)
        assert server.count(r"the supervisor is gone; draining") == 2


async def test_two_workers_append_to_one_sqlite_event_store(tmp_path: Path) -> None:
    """Writers on both workers append to one stream of one SQLite file with expected
    versions: stale ones are ABORTED and retried, versions stay 1..N without a gap or a
    duplicate (the database decides, whichever process wrote)."""
    from gen.events.v1 import store_pb2, store_pb2_grpc
    from gen.events.v1.testing_pb2 import AmountDeposited

    env = {"WORKERS_APP_EVENTS_DB": str(tmp_path / "events.sqlite3")}
    target = "tests.framework.workers_app:build_events_server"
    command = [sys.executable, "-m", "framework", "serve", target, "--workers", "2"]
    writers, appends = 4, 6
    async with supervised(2, env, command=command) as server:
        channels = await channel_per_worker(server.address, 2)
        try:
            stubs = [store_pb2_grpc.EventStoreServiceStub(c) for c in channels.values()]

            async def writer(n: int) -> None:
                stub = stubs[n % len(stubs)]
                for i in range(appends):
                    for _ in range(500):  # bounded retries on a stale version
                        read = await stub.ReadStream(
                            store_pb2.ReadStreamRequest(stream_id="acct-1", from_version=1),
                            timeout=60,
                        )
                        version = read.events[-1].version if read.events else 0
                        event = store_pb2.ProposedEvent(
                            type=AmountDeposited.DESCRIPTOR.full_name,
                            payload=AmountDeposited(amount=n * 100 + i).SerializeToString(),
                        )
                        try:
                            await stub.Append(
                                store_pb2.AppendRequest(
                                    stream_id="acct-1",
                                    aggregate_type="Account",
                                    expected_version=version,
                                    events=[event],
                                ),
                                timeout=60,
                            )
                            break
                        except grpc.aio.AioRpcError as error:
                            assert error.code() == grpc.StatusCode.ABORTED, error
                    else:
                        pytest.fail("an append never got through 500 conflicts")

            await asyncio.gather(*(writer(n) for n in range(writers)))
            read = await stubs[0].ReadStream(
                store_pb2.ReadStreamRequest(stream_id="acct-1", from_version=1), timeout=60
            )
        finally:
            for channel in channels.values():
                await channel.close()
    amounts = sorted(AmountDeposited.FromString(e.payload).amount for e in read.events)
    assert [e.version for e in read.events] == list(range(1, writers * appends + 1))
    assert amounts == sorted(n * 100 + i for n in range(writers) for i in range(appends))


async def test_serve_command_says_what_it_expected() -> None:
    """`serve MODULE:FACTORY` naming no callable, or one returning no Server, exits saying so."""
    from framework.workers.target import load_server

    with pytest.raises(SystemExit, match="has no callable 'nope'"):
        await load_server("tests.framework.workers_app:nope")
    with pytest.raises(SystemExit, match="cannot import"):
        await load_server("tests.framework.no_such_module")
    with pytest.raises(SystemExit, match="not a framework Server"):
        await load_server("os:getcwd")


async def test_server_with_workers_refuses_a_bad_count() -> None:
    """Server(workers=0) is refused at construction, saying what to pass."""
    with pytest.raises(ValueError, match="workers"):
        Server(ServerConfig(), workers=0)
