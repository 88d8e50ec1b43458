"""The registry command line: no unauthenticated server by accident, no token in argv."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from framework.auth.policy import BearerToken
from framework.client import connect
from framework.errors import UnauthenticatedError
from framework.registry.cli import run
from gen.registry.v1 import registry_pb2 as pb
from gen.registry.v1.registry_pb2_grpc import RegistryServiceStub
from tests.security.kit import ISSUER, KID, Issuer

ROOT = Path(__file__).resolve().parents[2]
SERVING = re.compile(r"serving on (\S+)")


@asynccontextmanager
async def registry_process(tmp_path: Path, *flags: str) -> AsyncIterator[tuple[str, list[str]]]:
    """`python -m framework.registry serve` in a subprocess; yields its address and log."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "framework.registry",
        "serve",
        "--port",
        "0",
        "--db",
        str(tmp_path / "registry.sqlite"),
        "--probe-interval-s",
        "0",
        *flags,
        cwd=ROOT,
        stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
    )
    assert process.stderr is not None
    lines: list[str] = []
    address = ""
    try:
        async with asyncio.timeout(60):
            while not address:
                line = (await process.stderr.readline()).decode()
                if not line:
                    raise AssertionError("the registry exited:\n" + "".join(lines))
                lines.append(line)
                found = SERVING.search(line)
                address = found.group(1) if found else ""
        yield address, lines
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            await process.wait()


async def test_serve_without_authentication_refuses_to_start(tmp_path: Path) -> None:
    """`serve` with no --jwks / mTLS identities and no --insecure-dev exits with the reason."""
    with pytest.raises(SystemExit) as caught:
        await run(["serve", "--port", "0", "--db", str(tmp_path / "r.sqlite")])
    assert "refusing to serve a registry without authentication" in str(caught.value)
    assert not (tmp_path / "r.sqlite").exists()  # nothing was opened


async def test_insecure_dev_registry_says_so_loudly(tmp_path: Path) -> None:
    """--insecure-dev serves, with a WARNING naming what anyone can now do."""
    async with registry_process(tmp_path, "--insecure-dev") as (address, lines):
        assert address.startswith("127.0.0.1:")
    warning = [line for line in lines if "INSECURE DEVELOPMENT REGISTRY" in line]
    assert warning and warning[0].startswith("WARNING")


async def test_jwks_registry_process_rejects_anonymous_callers(tmp_path: Path) -> None:
    """A registry started with --jwks answers UNAUTHENTICATED without a token, serves with one."""
    issuer = Issuer()
    jwks = tmp_path / "jwks.json"
    secret = base64.urlsafe_b64encode(issuer.secret).rstrip(b"=").decode()
    jwks.write_text(json.dumps({"keys": [{"kty": "oct", "kid": KID, "alg": "HS256", "k": secret}]}))
    flags = ("--jwks", str(jwks), "--issuer", ISSUER, "--audience", "shop")
    async with registry_process(tmp_path, *flags) as (address, _):
        anonymous = connect(address)
        reader = connect(address, policies=[BearerToken(issuer.token("ops", ["registry:read"]))])
        try:
            with pytest.raises(UnauthenticatedError):
                await RegistryServiceStub(anonymous).ListServices(pb.ListServicesRequest())
            listed = await RegistryServiceStub(reader).ListServices(pb.ListServicesRequest())
            assert list(listed.services) == []
        finally:
            await anonymous.close()
            await reader.close()


async def test_token_on_the_command_line_is_refused() -> None:
    """`--token` (visible in `ps`) is refused with where to put the token instead."""
    with pytest.raises(SystemExit) as caught:
        await run(["list", "--registry", "127.0.0.1:1", "--token", "secret-token"], io.StringIO())
    assert "REGISTRY_TOKEN" in str(caught.value) and "secret-token" not in str(caught.value)


async def test_token_comes_from_the_environment_or_a_file(tmp_path: Path) -> None:
    """The CLI sends the token from $REGISTRY_TOKEN, or from --token-file."""
    issuer = Issuer()
    jwks = tmp_path / "jwks.json"
    secret = base64.urlsafe_b64encode(issuer.secret).rstrip(b"=").decode()
    jwks.write_text(json.dumps({"keys": [{"kty": "oct", "kid": KID, "alg": "HS256", "k": secret}]}))
    async with registry_process(
        tmp_path, "--jwks", str(jwks), "--issuer", ISSUER, "--audience", "shop"
    ) as (address, _):
        token = issuer.token("ops", ["registry:read"])
        out = io.StringIO()
        assert await run(["list", "--registry", address], out, {"REGISTRY_TOKEN": token}) == 0
        assert "revision" in out.getvalue()
        token_file = tmp_path / "token"
        token_file.write_text(token + "\n")
        token_file.chmod(0o600)
        out = io.StringIO()
        argv = ["list", "--registry", address, "--token-file", str(token_file)]
        assert await run(argv, out, {}) == 0
        out = io.StringIO()
        assert await run(["list", "--registry", address], out, {}) == 1
        assert "TOKEN_MISSING" in out.getvalue()
