"""The built wheel, installed as a user would: a fresh virtualenv outside the repository,
`pip install` of the wheel alone (no dev extras), then import, serve and answer health.

The wheel is built from a copy of the working tree (so no `build/` left in the repository
leaks into it) with the running interpreter's setuptools. Its dependencies are resolved by
pip with the lock (`requirements/dev.txt`) as constraints, so the test does not move when
an index publishes a release; the ranges themselves are tested by `make lowest-test`.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gen.echo.v1 import echo_pb2, echo_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements" / "dev.txt"
INSTALL_TIMEOUT_S = 600
START_TIMEOUT_S = 60
_SERVING = re.compile(r"serving on (?P<target>127\.0\.0\.1:\d+)")
# the optional adapters and the dev tools: none may come with a plain install
_NOT_INSTALLED = ("asyncpg", "nats", "redis", "starlette", "pytest", "hypothesis", "mypy")

SERVER = """
import asyncio
import logging
import sys

from framework import Server, ServerConfig
from framework.testing.echo import EchoServicer


async def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    server = Server(ServerConfig(name="echo", host="127.0.0.1", port=0, insecure_dev=True))
    server.add(EchoServicer())
    await server.serve()


asyncio.run(main())
"""

IMPORTS = """
import importlib.util
import json
import sys
from pathlib import Path

import framework
import gen.echo.v1.echo_pb2
import protos

names = {name: type(getattr(framework, name)).__name__ for name in framework.__all__}
print(json.dumps({
    "framework": framework.__file__,
    "gen": gen.echo.v1.echo_pb2.__file__,
    "protos": sorted(
        str(p.relative_to(root))
        for root in map(Path, protos.__path__)
        for p in root.rglob("*.proto")
    ),
    "names": len(names),
    "present": [m for m in sys.argv[1:] if importlib.util.find_spec(m) is not None],
}))
"""


def _run(args: list[str], cwd: Path, timeout_s: float = INSTALL_TIMEOUT_S) -> str:
    done = subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    assert done.returncode == 0, f"{args[:4]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _source_copy(target: Path) -> Path:
    """The working tree's tracked and new files (what git would commit), copied."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_bytes(source.read_bytes())
    return target


def _constraints(target: Path) -> Path:
    """The lock's pins without hashes (pip wants every requirement hashed otherwise)."""
    pins = [
        line.removesuffix("\\").strip()
        for line in LOCK.read_text().splitlines()
        if re.match(r"[a-z0-9]", line)
    ]
    target.write_text("\n".join(pins) + "\n")
    return target


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(wheel, python of a fresh virtualenv with only that wheel and its dependencies)."""
    work = tmp_path_factory.mktemp("wheel")
    source = _source_copy(work / "source")
    dist = work / "dist"
    build = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation"]
    _run([*build, "--wheel-dir", str(dist), str(source)], cwd=source)
    (wheel,) = dist.glob("grpc_microframework-*.whl")
    venv = work / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=work)
    python = venv / "bin" / "python"
    constraints = _constraints(work / "constraints.txt")
    install = [str(python), "-m", "pip", "install", "--quiet", "--no-input", "--constraint"]
    _run([*install, str(constraints), str(wheel)], cwd=work)
    yield wheel, python


def test_the_wheel_carries_the_generated_code_and_the_contracts(
    installed: tuple[Path, Path],
) -> None:
    """gen/ (stubs, comments.json, py.typed) and every contract's .proto are in the wheel."""
    wheel, _ = installed
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    tracked = subprocess.run(
        ["git", "ls-files", "gen", "protos"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    wanted = {
        name
        for name in tracked
        if name.endswith((".py", ".pyi", ".json", "py.typed"))
        or (name.endswith(".proto") and not name.startswith("protos/google/"))
    }
    assert "gen/echo/v1/echo_pb2.py" in wanted and "protos/framework/v1/options.proto" in wanted
    assert sorted(wanted - names) == []
    assert "framework/py.typed" in names
    # the declaration-only google/api stubs stay out (googleapis-common-protos ships the real)
    assert [n for n in names if n.startswith("protos/google/")] == []
    assert [n for n in names if n.startswith("tests/")] == []


def test_the_installed_wheel_imports_without_the_repository(
    installed: tuple[Path, Path], tmp_path: Path
) -> None:
    """Outside the repository: framework, gen and the .proto sources come from the venv; every
    public name resolves; no dev extra came along; pip check is clean."""
    _, python = installed
    site = python.parents[1] / "lib"
    script = tmp_path / "imports.py"
    script.write_text(IMPORTS)
    found = json.loads(_run([str(python), str(script), *_NOT_INSTALLED], tmp_path))
    assert Path(found["framework"]).is_relative_to(site), found["framework"]
    assert Path(found["gen"]).is_relative_to(site), found["gen"]
    assert "framework/v1/options.proto" in found["protos"]
    assert "buf/validate/validate.proto" in found["protos"]
    assert found["names"] > 50
    assert found["present"] == []
    assert "No broken requirements" in _run([str(python), "-m", "pip", "check"], tmp_path)


USER_PROTO = """
syntax = "proto3";
package shop.v1;
import "framework/v1/options.proto";
import "buf/validate/validate.proto";
message PingRequest { string name = 1 [(buf.validate.field).string.min_len = 1]; }
message PingResponse { string name = 1; }
service PingService {
  option (framework.v1.service_policy) = {bounded_context: "shop"};
  rpc Ping(PingRequest) returns (PingResponse) {
    option (framework.v1.method_policy) = {idempotent: true};
  }
}
"""

COMPILE = """
import sys
from pathlib import Path

import grpc_tools
import protos
from grpc_tools import protoc

roots = [f"-I{p}" for p in protos.__path__]
wkt = Path(grpc_tools.__file__).parent / "_proto"
sys.exit(protoc.main(["protoc", "-I.", *roots, f"-I{wkt}", "--python_out=out", "shop.proto"]))
"""


def test_a_user_contract_compiles_against_the_shipped_protos(
    installed: tuple[Path, Path], tmp_path: Path
) -> None:
    """A user's .proto importing framework/v1/options.proto and buf/validate compiles with
    only the venv's shipped contracts (and grpcio-tools' well-known types) on the path."""
    _, python = installed
    (tmp_path / "shop.proto").write_text(USER_PROTO)
    (tmp_path / "out").mkdir()
    (tmp_path / "compile.py").write_text(COMPILE)
    _run([str(python), "compile.py"], cwd=tmp_path)
    assert (tmp_path / "out" / "shop_pb2.py").is_file()


def test_the_installed_wheel_serves_echo_and_answers_health(
    installed: tuple[Path, Path], tmp_path: Path
) -> None:
    """A server run by the venv's python serves Echo, says SERVING, and drains on SIGTERM."""
    _, python = installed
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen([str(python), str(script)], cwd=tmp_path, stderr=out)
    try:
        target = _wait_serving(process, log)
        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
            echo = echo_pb2_grpc.EchoServiceStub(channel)
            assert echo.Echo(echo_pb2.EchoRequest(text="from the wheel"), timeout=30).text == (
                "from the wheel"
            )
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
            raise
    assert code == 0, log.read_text()[-3000:]


def _wait_serving(process: subprocess.Popen[bytes], log: Path) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        match = _SERVING.search(log.read_text(errors="replace"))
        if match:
            return match["target"]
        if process.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"the server did not log 'serving on HOST:PORT':\n{log.read_text()}")
