"""`buf lint` passes on the contracts, and `buf breaking` catches client-breaking changes.

The breaking-change cases run in a temporary git repository holding a copy of
protos/ (committed on `main`), edited the way a careless change would, and
checked with the same command `make lint` runs; the real tree is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
AGAINST = ".git#branch=main,subdir=protos"


def _buf() -> str:
    """The buf CLI: $BUF, the virtualenv's (buf-bin, a dev extra), or PATH."""
    candidates = [os.environ.get("BUF", ""), str(Path(sys.executable).parent / "buf")]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return candidate
    found = shutil.which("buf")
    if found:
        return found
    pytest.fail("buf is not installed: `make venv` installs it (buf-bin, in the dev extras)")


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def _git(repo: Path, *args: str) -> None:
    identity = ["-c", "user.name=contract-test", "-c", "user.email=contract-test@localhost"]
    result = _run("git", *identity, *args, cwd=repo)
    assert result.returncode == 0, result.stderr


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repository whose `main` holds a copy of today's protos/."""
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    _git(tmp_path, "init", "-q", "-b", "main")
    _git(tmp_path, "add", "protos")
    _git(tmp_path, "commit", "-q", "-m", "baseline")
    return tmp_path


def _edit(repo: Path, path: str, old: str, new: str) -> None:
    file = repo / "protos" / path
    text = file.read_text()
    assert text.count(old) == 1, f"{old!r} should occur once in {path}"
    file.write_text(text.replace(old, new))


def test_lint_passes_on_the_contracts() -> None:
    """`buf lint protos` with protos/buf.yaml reports nothing."""
    result = _run(_buf(), "lint", "protos", cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_lint_rejects_a_misnamed_request(repo: Path) -> None:
    """A domain RPC whose request is not <Method>Request fails lint (STANDARD applies)."""
    _edit(
        repo,
        "payment/v1/payment.proto",
        "rpc GetPayment(GetPaymentRequest)",
        "rpc GetPayment(RefundPaymentRequest)",
    )
    result = _run(_buf(), "lint", "protos", "--error-format=json", cwd=repo)
    rules = {json.loads(line)["type"] for line in result.stdout.splitlines() if line.strip()}
    assert result.returncode != 0
    assert "RPC_REQUEST_STANDARD_NAME" in rules


def test_lint_rejects_a_validation_rule_that_does_not_fit_its_field(repo: Path) -> None:
    """buf reads the printed buf/validate/validate.proto: a string rule on a number fails lint."""
    _edit(
        repo,
        "payment/v1/payment.proto",
        "{int64: {gt: 0, lte: 100000000}}",
        "{string: {max_len: 3}}",
    )
    result = _run(_buf(), "lint", "protos", "--error-format=json", cwd=repo)
    rules = {json.loads(line)["type"] for line in result.stdout.splitlines() if line.strip()}
    assert result.returncode != 0
    assert "PROTOVALIDATE" in rules


def test_unchanged_and_compatible_contracts_pass(repo: Path) -> None:
    """Adding a field is not breaking: the same check `make lint` runs passes."""
    _edit(
        repo,
        "payment/v1/payment.proto",
        "  google.protobuf.Timestamp updated_at = 9;\n}",
        "  google.protobuf.Timestamp updated_at = 9;\n  // Card brand.\n  string brand = 10;\n}",
    )
    result = _run(_buf(), "breaking", "protos", "--against", AGAINST, cwd=repo)
    assert result.returncode == 0, result.stdout + result.stderr


# (edit in payment/v1/payment.proto, rule buf must report, words its message must contain)
BREAKING_EDITS = [
    (  # a removed field
        "  // Why the charge failed or was refunded (empty otherwise).\n  string reason = 7;\n",
        "",
        "FIELD_NO_DELETE",
        '"7" with name "reason"',
    ),
    (  # a renumbered tag
        "bool refunded = 2;",
        "bool refunded = 3;",
        "FIELD_NO_DELETE",
        '"2" with name "refunded"',
    ),
    (  # a changed type
        "  int64 amount_minor = 4;\n  // ISO 4217 currency code, e.g.",
        "  int32 amount_minor = 4;\n  // ISO 4217 currency code, e.g.",
        "FIELD_SAME_TYPE",
        "amount_minor",
    ),
    (  # a renumbered enum value
        "PAYMENT_STATUS_REFUNDED = 2;",
        "PAYMENT_STATUS_REFUNDED = 4;",
        "ENUM_VALUE_NO_DELETE",
        '"2" on enum "PaymentStatus"',
    ),
    (  # a removed RPC
        "  rpc GetPayment(GetPaymentRequest) returns (GetPaymentResponse) {\n"
        "    option (framework.v1.method_policy) = {\n"
        '      scopes: "payments:read"\n'
        "      idempotent: true\n"
        "      timeout_s: 2\n"
        "    };\n"
        "    option (google.api.http) = {\n"
        '      get: "/v1/payments/{payment_id}"\n'
        "    };\n"
        "  }\n",
        "",
        "RPC_NO_DELETE",
        "GetPayment",
    ),
]


def test_breaking_changes_fail_the_check(repo: Path) -> None:
    """Removed field, renumbered tag, changed type, renumbered enum, removed RPC: each reported."""
    for old, new, _, _ in BREAKING_EDITS:
        _edit(repo, "payment/v1/payment.proto", old, new)
    result = _run(
        _buf(), "breaking", "protos", "--against", AGAINST, "--error-format=json", cwd=repo
    )
    assert result.returncode != 0
    found = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    for _, _, rule, words in BREAKING_EDITS:
        assert any(f["type"] == rule and words in f["message"] for f in found), (rule, found)
