"""The supervisor with real child processes: tiers, prefixed logs, restarts, clean stop."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import sys
from pathlib import Path

import pytest

from framework.system.supervisor import (
    ProcessSpec,
    ProcessState,
    RestartPolicy,
    StartupError,
    Supervisor,
)

SLEEPER = "import sys, time; print('hello from', sys.argv[1], flush=True); time.sleep(120)"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _spec(name: str, tier: int = 0, **kwargs: object) -> ProcessSpec:
    return ProcessSpec(name, (sys.executable, "-c", SLEEPER, name), tier=tier, **kwargs)  # type: ignore[arg-type]


async def _until(check: object, timeout_s: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not check():  # type: ignore[operator]
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_tiers_start_in_order_and_lines_are_prefixed(tmp_path: Path) -> None:
    """Tier 1 starts only once tier 0 is ready; every child line carries its name."""
    marker = tmp_path / "first-ready"
    started: list[str] = []

    async def first_ready() -> bool:
        started.append("checked")
        return marker.exists()

    out = io.StringIO()
    supervisor = Supervisor(
        [_spec("first", 0, ready=first_ready), _spec("second", 1)], out=out, ready_poll_s=0.05
    )
    starting = asyncio.create_task(supervisor.start())
    await _until(lambda: started)
    assert supervisor.pid("second") is None  # tier 1 waits for tier 0
    marker.touch()
    await starting
    await _until(lambda: "second | hello from second" in out.getvalue())
    await _until(lambda: "first  | hello from first" in out.getvalue())
    await supervisor.stop()


async def test_a_killed_process_is_restarted_and_stop_leaves_nothing(tmp_path: Path) -> None:
    """SIGKILL a child: it comes back with a new pid; stop() ends every child."""
    out = io.StringIO()
    supervisor = Supervisor(
        [_spec("a"), _spec("b")],
        out=out,
        policy=RestartPolicy(initial_backoff_s=0.1, max_backoff_s=0.2),
    )
    await supervisor.start()
    first = supervisor.pid("a")
    assert first is not None
    supervisor.signal("a", signal.SIGKILL)
    await _until(lambda: supervisor.pid("a") not in (None, first))
    assert "a | exited with signal SIGKILL; restarting in 0.1s" in out.getvalue()
    status = {s.name: s for s in supervisor.status()}
    assert status["a"].restarts == 1 and status["b"].restarts == 0
    pids = [supervisor.pid("a"), supervisor.pid("b")]
    codes = await supervisor.stop()
    assert codes == {"a": -signal.SIGTERM, "b": -signal.SIGTERM}
    assert not any(_alive(pid) for pid in pids if pid)
    assert all(s.state is ProcessState.STOPPED for s in supervisor.status())


async def test_a_process_ignoring_sigterm_is_killed_after_its_timeout() -> None:
    """A child that ignores SIGTERM is SIGKILLed once stop_timeout_s passed."""
    stubborn = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(120)"
    )
    out = io.StringIO()
    supervisor = Supervisor(
        [ProcessSpec("stubborn", (sys.executable, "-c", stubborn), stop_timeout_s=0.5)], out=out
    )
    await supervisor.start()
    await _until(lambda: "ready" in out.getvalue())
    pid = supervisor.pid("stubborn")
    codes = await supervisor.stop()
    assert codes == {"stubborn": -signal.SIGKILL}
    assert pid is not None and not _alive(pid)
    assert "did not stop within" in out.getvalue()


async def test_crash_loops_back_off_more_each_time() -> None:
    """A process that exits at once is restarted with a growing delay (0.1, 0.2, 0.4 ...)."""
    out = io.StringIO()
    supervisor = Supervisor(
        [ProcessSpec("crashy", (sys.executable, "-c", "raise SystemExit(3)"))],
        out=out,
        policy=RestartPolicy(initial_backoff_s=0.1, max_backoff_s=0.4),
    )
    await supervisor.start()
    await _until(lambda: out.getvalue().count("exited with code 3") >= 4)
    await supervisor.stop()
    delays = [
        line.rsplit(" ", 1)[-1] for line in out.getvalue().splitlines() if "restarting in" in line
    ]
    assert delays[:4] == ["0.1s", "0.2s", "0.4s", "0.4s"]


async def test_a_tier_that_never_gets_ready_fails_the_start_and_stops_everything() -> None:
    """StartupError names the process; what was started is stopped."""

    async def never() -> bool:
        return False

    supervisor = Supervisor(
        [_spec("base"), _spec("late", 1, ready=never)],
        out=io.StringIO(),
        ready_timeout_s=0.5,
        ready_poll_s=0.05,
    )
    with pytest.raises(StartupError, match="late"):
        await supervisor.start()
    assert all(s.pid is None for s in supervisor.status())


def test_names_must_be_unique() -> None:
    """Two processes with one name are refused when the supervisor is built."""
    with pytest.raises(ValueError, match="repeated: x"):
        Supervisor([_spec("x"), _spec("x")])


async def test_a_held_process_stays_down_until_released() -> None:
    """hold() stops a process and keeps it down (no restart); release() starts it again."""
    out = io.StringIO()
    supervisor = Supervisor(
        [_spec("held")],
        out=out,
        color=False,
        policy=RestartPolicy(initial_backoff_s=0.05, max_backoff_s=0.1),
    )
    await supervisor.start()
    try:
        first = supervisor.pid("held")
        assert first is not None
        await supervisor.hold("held")
        assert not _alive(first)
        status = {s.name: s for s in supervisor.status()}["held"]
        await _until(
            lambda: {s.name: s for s in supervisor.status()}["held"].state is ProcessState.STOPPED
        )
        assert supervisor.pid("held") is None and status.restarts == 0
        supervisor.release("held")
        await _until(lambda: supervisor.pid("held") not in (None, first))
        await supervisor.wait_ready("held", timeout_s=30)
        assert {s.name: s for s in supervisor.status()}["held"].restarts == 1
        assert "held |" in out.getvalue() and "; held" in out.getvalue()
    finally:
        await supervisor.stop()
