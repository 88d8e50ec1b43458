"""Process supervision: start a set of processes in tiers, restart crashes, stop cleanly.

    supervisor = Supervisor([ProcessSpec("registry", argv, env, tier=0), ...], out=sys.stdout)
    await supervisor.start()          # tier by tier; a tier's readiness checks pass first
    ...
    await supervisor.stop()           # reverse tiers: SIGTERM, wait, SIGKILL the stragglers

Each process runs in its own session (process group), so a Ctrl-C in the terminal
reaches only the supervisor, which then stops the others in order (the gateway before
the services it calls, the registry last), each draining as it does on SIGTERM.  On
Linux each child also gets SIGTERM if the supervisor itself dies (`PR_SET_PDEATHSIG`),
so not even a SIGKILL of the supervisor leaves children behind.

A process that exits while the supervisor is not stopping is restarted after a
backoff that doubles per crash (`RestartPolicy`) and resets once a run lasted
`reset_after_s`.  Every line a child writes (stdout and stderr merged) is written to
`out` prefixed with the process name, one whole line at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import enum
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TextIO

from framework.clock import Clock, SystemClock

__all__ = [
    "ProcessSpec",
    "ProcessState",
    "ProcessStatus",
    "RestartPolicy",
    "StartupError",
    "Supervisor",
]

logger = logging.getLogger(__name__)

ReadyCheck = Callable[[], Awaitable[bool]]

_PR_SET_PDEATHSIG = 1
_COLORS = ("36", "33", "35", "32", "34", "31", "96", "93", "95", "92", "94", "91")


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """Backoff between restarts of a crashed process (seconds)."""

    initial_backoff_s: float = 0.5
    max_backoff_s: float = 15.0
    multiplier: float = 2.0
    # A run at least this long counts as healthy: the next crash starts from the initial backoff.
    reset_after_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 < self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError(
                "need 0 < initial_backoff_s <= max_backoff_s, got "
                f"{self.initial_backoff_s} and {self.max_backoff_s}"
            )
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier}")
        if self.reset_after_s <= 0:
            raise ValueError(f"reset_after_s must be > 0, got {self.reset_after_s}")


@dataclass(frozen=True, slots=True)
class ProcessSpec:
    """One supervised process: what to run, in which tier, and how to know it is ready."""

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    # Started after every process of lower tiers is ready; stopped before them.
    tier: int = 0
    # Polled after (re)starts until it answers True; None: ready once started.
    ready: ReadyCheck | None = None
    # After SIGTERM, wait this long before SIGKILL.
    stop_timeout_s: float = 20.0

    def __post_init__(self) -> None:
        if not self.name or any(c.isspace() for c in self.name):
            raise ValueError(f"process name must be non-empty without spaces, got {self.name!r}")
        if not self.argv:
            raise ValueError(f"process {self.name}: argv must not be empty")
        if self.stop_timeout_s <= 0:
            raise ValueError(f"process {self.name}: stop_timeout_s must be > 0")


class ProcessState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"  # crashed; waiting to restart
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class ProcessStatus:
    """What the supervisor knows of one process right now."""

    name: str
    state: ProcessState
    pid: int | None
    restarts: int
    last_exit: int | None
    ready: bool


class StartupError(RuntimeError):
    """A tier did not become ready in time (names the processes that were not)."""


def _death_signal() -> Callable[[], None] | None:
    """A preexec function asking Linux to SIGTERM the child when its parent dies."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    prctl = ctypes.CDLL(name, use_errno=True).prctl

    def set_death_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return set_death_signal


class _Managed:
    """One process and its restart loop."""

    def __init__(self, spec: ProcessSpec, supervisor: Supervisor) -> None:
        self.spec = spec
        self.sup = supervisor
        self.state = ProcessState.STOPPED
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.last_exit: int | None = None
        self.ready = False
        self.started = asyncio.Event()  # set on every spawn
        self.stopping = asyncio.Event()
        self.released = asyncio.Event()  # cleared while held down (chaos: "stop for N s")
        self.released.set()
        self.task: asyncio.Task[None] | None = None
        self._pump: asyncio.Task[None] | None = None

    def status(self) -> ProcessStatus:
        pid = self.process.pid if self.process and self.process.returncode is None else None
        return ProcessStatus(
            self.spec.name, self.state, pid, self.restarts, self.last_exit, self.ready
        )

    async def spawn(self) -> None:
        spec = self.spec
        self.state = ProcessState.STARTING
        self.ready = False
        self.process = await asyncio.create_subprocess_exec(
            *spec.argv,
            env=dict(spec.env),
            cwd=spec.cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=self.sup.preexec,
        )
        self._pump = asyncio.create_task(self._forward(self.process), name=f"log-{spec.name}")
        self.state = ProcessState.RUNNING
        self.started.set()
        logger.info("%s started (pid %s)", spec.name, self.process.pid)

    async def _forward(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while True:
            try:
                line = await process.stdout.readline()
            except ValueError:  # a line longer than the stream limit: pass it in pieces
                line = await process.stdout.read(65536)
            if not line:
                return
            self.sup.write_line(self.spec.name, line.decode(errors="replace").rstrip("\n"))

    async def run(self) -> None:
        """Keep the process running until `stopping` is set."""
        policy, clock = self.sup.policy, self.sup.clock
        backoff = policy.initial_backoff_s
        while not self.stopping.is_set():
            began = clock.monotonic()
            try:
                await self.spawn()
            except OSError as error:  # e.g. the executable is missing: retried like a crash
                self.sup.write_line(self.spec.name, f"could not start: {error}")
                self.started.set()
                code: int | None = None
            else:
                assert self.process is not None
                if self.stopping.is_set():  # stop() came while spawning
                    await self._end_process()
                code = await self.process.wait()
                if self._pump is not None:
                    await self._pump
            self.last_exit = code
            self.ready = False
            if self.stopping.is_set():
                break
            if not self.released.is_set():  # held down on purpose: no restart until released
                self.state = ProcessState.STOPPED
                self.sup.write_line(self.spec.name, f"exited with {_describe(code or 0)}; held")
                await _first(self.released.wait(), self.stopping.wait())
                backoff = policy.initial_backoff_s
                if self.stopping.is_set():
                    break
                self.restarts += 1
                continue
            if clock.monotonic() - began >= policy.reset_after_s:
                backoff = policy.initial_backoff_s
            self.state = ProcessState.BACKOFF
            shown = "no process" if code is None else _describe(code)
            self.sup.write_line(
                self.spec.name, f"exited with {shown}; restarting in {backoff:.1f}s"
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), backoff)
            if self.stopping.is_set():
                break
            backoff = min(backoff * policy.multiplier, policy.max_backoff_s)
            self.restarts += 1
        self.state = ProcessState.STOPPED

    async def _end_process(self) -> None:
        """SIGTERM the process group, wait `stop_timeout_s`, then SIGKILL it."""
        process = self.process
        if process is None:
            return
        if process.returncode is None:
            self.state = ProcessState.STOPPING
            _signal_group(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), self.spec.stop_timeout_s)
            except TimeoutError:
                self.sup.write_line(
                    self.spec.name,
                    f"did not stop within {self.spec.stop_timeout_s:.0f}s of SIGTERM; killing it",
                )
                _signal_group(process.pid, signal.SIGKILL)
                await process.wait()
        # anything the process left behind in its group goes too
        _signal_group(process.pid, signal.SIGKILL)

    async def terminate(self) -> int | None:
        """Stop restarting and end the process; its last exit code."""
        self.stopping.set()
        await self._end_process()
        if self.task is not None:
            await self.task
        return self.last_exit


async def _first(*waits: Awaitable[object]) -> None:
    """Wait until the first of `waits` is done; cancel the others."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"code {code}"


class Supervisor:
    """Starts, watches, restarts and stops a set of processes (see the module docstring)."""

    def __init__(
        self,
        specs: Sequence[ProcessSpec],
        *,
        policy: RestartPolicy | None = None,
        out: TextIO | None = None,
        color: bool | None = None,
        ready_timeout_s: float = 120.0,
        ready_poll_s: float = 0.2,
        clock: Clock | None = None,
    ) -> None:
        names = [s.name for s in specs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"process names must be unique; repeated: {', '.join(duplicates)}")
        if ready_timeout_s <= 0 or ready_poll_s <= 0:
            raise ValueError("ready_timeout_s and ready_poll_s must be > 0")
        self.policy = policy or RestartPolicy()
        self.clock = clock or SystemClock()
        self.out = out if out is not None else sys.stdout
        self.color = self.out.isatty() if color is None else color
        self.ready_timeout_s = ready_timeout_s
        self.ready_poll_s = ready_poll_s
        self.preexec = _death_signal()
        self._managed = {s.name: _Managed(s, self) for s in specs}
        self._width = max((len(n) for n in names), default=0)
        self._stopped = False

    # ------------------------------------------------------------ output
    def write_line(self, name: str, text: str) -> None:
        """Write one line prefixed with the process name (whole lines only)."""
        prefix = f"{name:<{self._width}} |"
        if self.color:
            index = list(self._managed).index(name) if name in self._managed else 0
            prefix = f"\x1b[{_COLORS[index % len(_COLORS)]}m{prefix}\x1b[0m"
        self.out.write(f"{prefix} {text}\n")
        self.out.flush()

    # ------------------------------------------------------------ queries
    def status(self) -> list[ProcessStatus]:
        return [m.status() for m in self._managed.values()]

    def pid(self, name: str) -> int | None:
        return self._get(name).status().pid

    def _get(self, name: str) -> _Managed:
        try:
            return self._managed[name]
        except KeyError:
            known = ", ".join(self._managed)
            raise KeyError(f"no process named {name!r}; known: {known}") from None

    @property
    def tiers(self) -> list[int]:
        return sorted({m.spec.tier for m in self._managed.values()})

    # ------------------------------------------------------------ lifecycle
    async def start(self, *, progress: Callable[[str], None] | None = None) -> None:
        """Start tier by tier; each tier must be ready before the next starts.

        Raises `StartupError` (after stopping what was started) when a tier is not
        ready within `ready_timeout_s`.
        """
        for tier in self.tiers:
            members = [m for m in self._managed.values() if m.spec.tier == tier]
            for managed in members:
                managed.started.clear()
                managed.task = asyncio.create_task(managed.run(), name=f"run-{managed.spec.name}")
            await asyncio.gather(*(m.started.wait() for m in members))
            try:
                await self._wait_ready(members, progress)
            except StartupError:
                await self.stop()
                raise

    async def _wait_ready(
        self, members: Sequence[_Managed], progress: Callable[[str], None] | None
    ) -> None:
        deadline = self.clock.monotonic() + self.ready_timeout_s
        pending = list(members)
        while True:
            still: list[_Managed] = []
            for managed in pending:
                check = managed.spec.ready
                if managed.state is ProcessState.RUNNING and (check is None or await check()):
                    managed.ready = True
                else:
                    still.append(managed)
            if progress is not None and len(still) != len(pending):
                done = len(members) - len(still)
                progress(f"{done}/{len(members)} ready: {', '.join(m.spec.name for m in members)}")
            pending = still
            if not pending:
                return
            if self.clock.monotonic() >= deadline:
                names = ", ".join(m.spec.name for m in pending)
                raise StartupError(f"not ready within {self.ready_timeout_s:.0f}s: {names}")
            await self.clock.sleep(self.ready_poll_s)

    async def wait_ready(self, name: str, timeout_s: float | None = None) -> None:
        """Wait until `name` is running and its readiness check passes (e.g. after a restart)."""
        managed = self._get(name)
        deadline = self.clock.monotonic() + (timeout_s or self.ready_timeout_s)
        check = managed.spec.ready
        while True:
            if managed.state is ProcessState.RUNNING and (check is None or await check()):
                managed.ready = True
                return
            if self.clock.monotonic() >= deadline:
                raise StartupError(f"{name} not ready within {timeout_s}s")
            await self.clock.sleep(self.ready_poll_s)

    def signal(self, name: str, sig: signal.Signals) -> int:
        """Send `sig` to one process (chaos, tests); the supervisor restarts it if it dies."""
        managed = self._get(name)
        process = managed.process
        if process is None or process.returncode is not None:
            raise ProcessLookupError(f"{name} is not running")
        process.send_signal(sig)
        return process.pid

    async def hold(self, name: str) -> int | None:
        """Stop one process (SIGTERM, then SIGKILL after its timeout) and keep it down until
        `release(name)`: e.g. the registry down for longer than a lease.  Its exit code."""
        managed = self._get(name)
        managed.released.clear()
        process = managed.process
        if process is None or process.returncode is not None:
            return managed.last_exit
        await managed._end_process()
        return process.returncode

    def release(self, name: str) -> None:
        """Let a held process start again (at once, without backoff)."""
        self._get(name).released.set()

    async def stop(self) -> dict[str, int | None]:
        """Stop every process, highest tier first; returns each one's last exit code."""
        codes: dict[str, int | None] = {}
        if self._stopped:
            return {m.spec.name: m.last_exit for m in self._managed.values()}
        self._stopped = True
        for tier in reversed(self.tiers):
            members = [m for m in self._managed.values() if m.spec.tier == tier]
            results = await asyncio.gather(*(m.terminate() for m in members))
            for managed, code in zip(members, results, strict=True):
                codes[managed.spec.name] = code
        return codes

    async def run_until(self, stop: asyncio.Event) -> dict[str, int | None]:
        """Wait for `stop`, then stop everything."""
        await stop.wait()
        return await self.stop()
