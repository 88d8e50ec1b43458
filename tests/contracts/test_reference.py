"""docs/reference.md is generated from the contracts and kept current."""

from __future__ import annotations

from pathlib import Path

import pytest

from framework.reference import compile_contracts, render

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fresh() -> str:
    """The reference regenerated from today's protos/."""
    return render(compile_contracts(ROOT / "protos"))


def test_committed_reference_is_current(fresh: str) -> None:
    """Regenerating gives exactly docs/reference.md (run `make docs` when this fails)."""
    committed = (ROOT / "docs/reference.md").read_text()
    assert committed == fresh, "docs/reference.md is stale: run `make docs` and commit it"


def test_generation_is_deterministic(fresh: str) -> None:
    """Two runs over the same contracts give the same bytes."""
    assert render(compile_contracts(ROOT / "protos")) == fresh


def test_every_domain_method_is_documented_with_its_policy_and_rules(fresh: str) -> None:
    """Each method shows scopes, deadline, idempotency, saga role and field rules."""
    for section in ("#### ReserveStock", "#### ChargePayment", "#### RegisterUser"):
        assert section in fresh
    charge = fresh[fresh.index("#### ChargePayment") : fresh.index("#### RefundPayment")]
    assert "scopes: `payments:write`" in charge
    assert "- Default deadline: 10 s" in charge
    assert "- Rate limit: 20 calls/s per caller, burst 40" in charge
    assert "callers must send an `idempotency-key`" in charge
    assert "- Saga step: action, undone by `RefundPayment`" in charge
    assert "> 0 (`int64.gt`)" in charge
    assert "| `currency` | 5 | `string` | required (`required`)" in charge
    assert "### Events in `order/v1/events.proto`" in fresh
    assert "#### `order.v1.OrderConfirmed`" in fresh
    assert "#### Enum `payment.v1.PaymentStatus`" in fresh
