"""`python -m framework new service catalog` in a copy of the repository: lint and tests pass.

The copy holds the repository's committed files (a git repository of its own, so
`buf breaking` has a `main` to compare with); the scaffold runs there as a user would
run it, then the same checks `make lint` runs and the tests the new files touch
(the new service's, the reference and system map being current). The real tree is
never written to.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _run(*args: str | Path, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """The committed files of the repository in a fresh git repository (branch main)."""
    listed = _ok(_run("git", "ls-files", "-z", cwd=ROOT)).split("\0")
    target = tmp_path / "repo"
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    if (ROOT / ".mypy_cache").is_dir():  # `make lint` ran: mypy checks only what changed
        shutil.copytree(ROOT / ".mypy_cache", target / ".mypy_cache")
    identity = ["-c", "user.name=scaffold-test", "-c", "user.email=scaffold-test@localhost"]
    _ok(_run("git", "init", "-q", "-b", "main", cwd=target))
    _ok(_run("git", *identity, "add", "-A", cwd=target))
    _ok(_run("git", *identity, "commit", "-q", "-m", "baseline", cwd=target))
    return target


@pytest.mark.slow
def test_a_new_service_passes_lint_and_its_tests(copy: Path) -> None:
    """new service catalog writes contract, layers, main, test, manifest entry; all pass."""
    python = sys.executable
    out = _ok(_run(python, "-m", "framework", "new", "service", "catalog", cwd=copy))
    for written in (
        "protos/catalog/v1/catalog.proto",
        "services/catalog/domain.py",
        "services/catalog/application.py",
        "services/catalog/servicer.py",
        "services/catalog/main.py",
        "tests/services/test_catalog.py",
        "system.toml",
    ):
        assert f"wrote {written}" in out
    assert (copy / "gen/catalog/v1/catalog_pb2.py").is_file()
    assert "[services.catalog]" in (copy / "system.toml").read_text()
    assert "catalog.v1.CatalogService" in (copy / "docs/reference.md").read_text()

    # make lint, step by step (its own virtualenv is this one)
    _ok(_run(BIN / "ruff", "check", "framework", "services", "tests", cwd=copy))
    _ok(_run(BIN / "ruff", "format", "--check", "framework", "services", "tests", cwd=copy))
    _ok(_run(BIN / "mypy", cwd=copy, timeout=900))
    _ok(_run(BIN / "buf", "lint", "protos", cwd=copy))
    against = ".git#branch=main,subdir=protos"
    _ok(_run(BIN / "buf", "breaking", "protos", "--against", against, cwd=copy))

    # the tests the new files touch, in the copy
    result = _run(
        python,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "tests/services/test_catalog.py",
        "tests/contracts/test_reference.py",
        "tests/analysis/test_system_map.py",
        "tests/contracts/test_protosource.py",
        cwd=copy,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


def test_a_taken_or_bad_name_writes_nothing(copy: Path) -> None:
    """An existing service or an invalid name is refused with a reason; no file appears."""
    python = sys.executable
    before = _ok(_run("git", "status", "--porcelain", cwd=copy))
    taken = _run(python, "-m", "framework", "new", "service", "payment", cwd=copy)
    assert taken.returncode == 2 and "payment exists already" in taken.stderr
    bad = _run(python, "-m", "framework", "new", "service", "Catalog-2", cwd=copy)
    assert bad.returncode == 2 and "is not a service name" in bad.stderr
    assert _ok(_run("git", "status", "--porcelain", cwd=copy)) == before
