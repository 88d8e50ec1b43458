"""A NATS JetStream server of the test's own: a subprocess on a free 127.0.0.1 port.

For fault tests that kill and restart the broker (never the shared server on
4222): `NatsServer(tmp_path).start()` runs `nats-server -js` with its store in
a directory of the test; `kill()` is a SIGKILL; `start(fresh_store=True)`
brings it back on the same port with an empty store (a wiped data directory).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

BINARY = shutil.which("nats-server") or "/usr/sbin/nats-server"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class NatsServer:
    """One nats-server subprocess with JetStream, restartable on the same port."""

    def __init__(self, root: Path) -> None:
        if not os.access(BINARY, os.X_OK):
            message = f"nats-server is not installed ({BINARY})"
            if os.environ.get("REQUIRE_SERVICES") == "1":
                pytest.fail(message)
            pytest.skip(message)
        self.root = root
        self.port = _free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.generation = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def store_dir(self) -> Path:
        return self.root / f"js-{self.generation}"

    def start(self, *, fresh_store: bool = False) -> None:
        """Run the server (on an empty store with `fresh_store`); wait until it answers."""
        if fresh_store:
            self.generation += 1
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self._process = subprocess.Popen(
            [BINARY, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.store_dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(500):  # bounded: ~10 s
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError as error:
                if self._process.poll() is not None:
                    code = self._process.returncode
                    raise RuntimeError(f"nats-server exited with {code}") from error
                time.sleep(0.02)
        raise RuntimeError(f"nats-server does not answer on 127.0.0.1:{self.port}")

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, as in a crash."""
        if self._process is not None:
            self._process.kill()
            self._process.wait(timeout=10)
            self._process = None

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
            self._process = None
