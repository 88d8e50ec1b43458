"""Every Python snippet of README.md and docs/*.md runs as shown, in a real Python process.

Each ```python block is written to a file unchanged and run with this interpreter
(PYTHONPATH: the repository; working directory: a temporary one per document, so
files a snippet writes are there for the next). The line before a block may say how:

    <!-- snippet: serve -->     a server: started, and running until the end of the
                                document, when it gets SIGTERM and must exit 0; the
                                address it logs ("... serving on HOST:PORT") is given
                                to later blocks as the environment variable TARGET
    <!-- snippet: test -->      a pytest module: run with pytest (asyncio mode auto)
    <!-- snippet: continue -->  the rest of the previous block's program

Without a note a block is a script that must exit 0. Every block gets in its
environment FRAMEWORK_TOKEN_SECRET (a fresh HMAC secret, as `python -m framework token
--secret-env FRAMEWORK_TOKEN_SECRET` would use), SERVICE_INSECURE_DEV=1 (for the
servers whose text says they run without an AuthPolicy) and
OTEL_EXPORTER_PROMETHEUS_PORT=0 (a free port for /metrics).
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```python[ \t]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S
)
_NOTE = re.compile(r"<!--\s*snippet:\s*(?P<mode>[a-z]+)\s*-->\s*$")
_SERVING = re.compile(r"serving on (?P<target>[0-9.:\[\]a-zA-Z-]+:\d+)")
START_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 120.0


@dataclass
class Snippet:
    document: Path
    line: int
    mode: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.document.relative_to(ROOT)}:{self.line}"


def snippets(document: Path) -> list[Snippet]:
    text = document.read_text()
    found: list[Snippet] = []
    for match in _FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        note = _NOTE.search(before)
        mode = note["mode"] if note else "script"
        code = textwrap.dedent(match["body"])
        if mode == "continue":
            assert found, f"{document}:{line}: nothing to continue"
            found[-1].code += "\n" + code
            continue
        assert mode in ("script", "serve", "test"), f"{document}:{line}: unknown mode {mode}"
        found.append(Snippet(document, line, mode, code))
    return found


def _environment(target: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SERVICE_", "OTEL_"))}
    env["PYTHONPATH"] = str(ROOT)
    env["FRAMEWORK_TOKEN_SECRET"] = _SECRET
    env["PYTHONUNBUFFERED"] = "1"
    env["SERVICE_INSECURE_DEV"] = "1"  # servers whose snippet shows no AuthPolicy (said there)
    env["OTEL_EXPORTER_PROMETHEUS_PORT"] = "0"  # any free port: several may run at once
    if target:
        env["TARGET"] = target
    return env


_SECRET = secrets.token_urlsafe(32)


def _run(snippet: Snippet, path: Path, cwd: Path, target: str) -> None:
    if snippet.mode == "test":
        args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        args += ["-o", "asyncio_mode=auto", "-o", "asyncio_default_fixture_loop_scope=function"]
        args += ["-W", "error", str(path)]
    else:
        args = [sys.executable, str(path)]
    done = subprocess.run(
        args,
        cwd=cwd,
        env=_environment(target),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, (
        f"{snippet.where} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )


def _start(path: Path, cwd: Path, log: Path, target: str) -> tuple[subprocess.Popen[bytes], str]:
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, str(path)], cwd=cwd, env=_environment(target), stdout=out, stderr=out
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        match = _SERVING.search(log.read_text(errors="replace"))
        if match:
            return process, match["target"]
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    process.wait(timeout=10)
    raise AssertionError(f"{path.name} did not log 'serving on HOST:PORT':\n{log.read_text()}")


def _stop(process: subprocess.Popen[bytes], where: str, log: Path) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
        raise AssertionError(f"{where}: still running 30 s after SIGTERM") from None
    assert code == 0, f"{where}: exit {code} after SIGTERM:\n{log.read_text()[-3000:]}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_snippet_runs_as_shown(document: Path, tmp_path: Path) -> None:
    """Each block of the document runs unchanged (servers serve, tests pass, scripts exit 0)."""
    blocks = snippets(document)
    servers: list[tuple[subprocess.Popen[bytes], str, Path]] = []
    target = ""
    try:
        for index, snippet in enumerate(blocks):
            path = tmp_path / f"snippet_{index}.py"
            if snippet.mode == "test":
                path = tmp_path / f"test_snippet_{index}.py"
            path.write_text(snippet.code)
            if snippet.mode == "serve":
                log = tmp_path / f"snippet_{index}.log"
                process, target = _start(path, tmp_path, log, target)
                servers.append((process, snippet.where, log))
            else:
                _run(snippet, path, tmp_path, target)
    finally:
        while servers:
            process, where, log = servers.pop()
            if process.poll() is None:
                _stop(process, where, log)
    if document.name != "reference.md":
        assert blocks or document.name not in {"README.md"}, "the README shows code"


def test_the_extractor_reads_indented_blocks_and_notes(tmp_path: Path) -> None:
    """Blocks in list items are dedented; notes set the mode; continue joins blocks."""
    doc = tmp_path / "doc.md"
    doc.write_text(
        "1. Step\n\n   <!-- snippet: serve -->\n   ```python\n   x = 1\n   ```\n\n"
        "<!-- snippet: continue -->\n```python\ny = 2\n```\n\n```python\nprint(3)\n```\n"
    )
    found = snippets(doc)
    assert [(s.mode, s.code) for s in found] == [
        ("serve", "x = 1\n\ny = 2\n"),
        ("script", "print(3)\n"),
    ]
