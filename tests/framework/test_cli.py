"""`python -m framework health`: an operator's view of a running server."""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

import jwt

from framework.auth.keyset import KeySet, StaticKeys, VerificationKey
from framework.auth.policy import AuthPolicy
from framework.auth.verifier import JwtConfig, JwtVerifier
from framework.health import Check, MemoryCheck
from framework.testing import serve
from framework.testing.echo import EchoServicer

ROOT = Path(__file__).resolve().parents[2]
SECRET = secrets.token_bytes(32)
AUTH = AuthPolicy(
    JwtVerifier(KeySet(StaticKeys([VerificationKey.hmac("k", SECRET)])), JwtConfig(None, None))
)


def _operator_token() -> str:
    claims = {"sub": "ops", "scope": "operator", "exp": int(time.time()) + 300}
    return jwt.encode(claims, SECRET, algorithm="HS256", headers={"kid": "k"})


async def _cli(*args: str, token: str = "") -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "MICROFRAMEWORK_TOKEN_FILE"}
    if token:
        with tempfile.NamedTemporaryFile("w", delete=False, suffix=".token") as file:
            file.write(token)
        env["MICROFRAMEWORK_TOKEN_FILE"] = file.name
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "framework",
        *args,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode or 0, out.decode()


async def test_health_command_prints_status_and_each_check() -> None:
    """Healthy server: exit 0, SERVING, each check with its latency."""

    async def ok() -> None:
        return None

    async with serve(EchoServicer(), policies=[AUTH], health_checks=[Check("store", ok)]) as t:
        code, out = await _cli("health", t.target, token=_operator_token())
    assert code == 0, out
    assert f"{t.target}: SERVING" in out
    assert "check store [required]: ok" in out
    assert "service echo.v1.EchoService: SERVING" in out


async def test_health_command_fails_while_a_required_check_fails() -> None:
    """A failing required check: exit 1 and the check's last error."""

    async def down() -> None:
        raise ConnectionError("connection refused by 127.0.0.1:5432")

    async with serve(EchoServicer(), policies=[AUTH], health_checks=[Check("postgres", down)]) as t:
        code, out = await _cli("health", t.target, token=_operator_token())
    assert code == 1, out
    assert "NOT_SERVING" in out and "connection refused" in out


async def test_health_command_without_an_operator_token_shows_no_check_detail() -> None:
    """Anonymous: the status and exit code, but the checks (and their errors) are withheld."""

    async def down() -> None:
        raise ConnectionError('role "shop_admin" does not exist')

    async with serve(EchoServicer(), policies=[AUTH], health_checks=[Check("postgres", down)]) as t:
        code, out = await _cli("health", t.target)
    assert code == 1, out
    assert "NOT_SERVING" in out and "checks: withheld" in out
    assert "shop_admin" not in out and "postgres" not in out


async def test_memory_check_reads_available_memory(tmp_path: Path) -> None:
    """MemoryCheck fails below its threshold and passes above it."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 1000 kB\nMemFree: 10 kB\nMemAvailable: 20 kB\n")
    low = MemoryCheck(min_available_fraction=0.05, meminfo_path=str(meminfo))
    try:
        await low.probe()
        raise AssertionError("2% available should fail a 5% threshold")
    except Exception as error:  # noqa: BLE001 - asserting on the probe's error
        assert "2.0%" in str(error)
    await MemoryCheck(min_available_fraction=0.01, meminfo_path=str(meminfo)).probe()
