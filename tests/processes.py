"""Run a Python module of this checkout in a child process, from the repository root."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


async def run_module(
    module: str, *args: str, timeout_s: float, merge_stderr: bool = False
) -> tuple[int, bytes, bytes]:
    """`python -m module args...` in ROOT: (exit code, stdout, stderr), waited at most
    `timeout_s` (TimeoutError after that). With `merge_stderr`, stderr goes to stdout."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT if merge_stderr else asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out, err or b""
