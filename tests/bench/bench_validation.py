"""Cost of contract validation: ChargePayment with ValidationPolicy vs the same call without.

Two in-process servers with the same servicer and the same (otherwise empty)
chain, one with `ValidationPolicy`; rounds alternate in ABBA order and the
reported ratio is the median of the per-pair ratios of CPU time per call (the
steadier measure on a shared machine; calls/s ratios are printed too). The request carries five
rules (three UUIDs, a bound, a pattern), a typical write. Client and server
share this process, so the CPU time per call covers both sides. Also prints
the bare cost of one `Validators.validate` call (protovalidate), for reference.
"""

from __future__ import annotations

import statistics
import time
import uuid
from typing import Any

from framework.policies.validation import ValidationPolicy, Validators
from framework.testing import serve
from gen.payment.v1 import payment_pb2 as pay
from gen.payment.v1 import payment_pb2_grpc as pay_grpc
from tests.bench.harness import (
    bench_line,
    closed_loop,
    latency_us,
    median_cpu_us,
    median_rate,
)

ROUNDS = 40
CALLS_PER_ROUND = 400
CONCURRENCY = 16


class PaymentServicer(pay_grpc.PaymentServiceServicer):
    """Answers every charge at once: the call's cost is the framework's."""

    async def ChargePayment(
        self, request: pay.ChargePaymentRequest, context: Any
    ) -> pay.ChargePaymentResponse:
        return pay.ChargePaymentResponse(
            payment=pay.Payment(payment_id=request.payment_id, status=pay.PAYMENT_STATUS_CHARGED)
        )


def _request() -> pay.ChargePaymentRequest:
    return pay.ChargePaymentRequest(
        payment_id=str(uuid.uuid4()),
        order_id=str(uuid.uuid4()),
        user_id=str(uuid.uuid4()),
        amount_minor=1999,
        currency="EUR",
    )


def _micro_us() -> float:
    validator = Validators()
    request = _request()
    n = 20000
    start = time.perf_counter()
    for _ in range(n):
        validator.validate(request)
    return (time.perf_counter() - start) / n * 1e6


async def main() -> None:
    request = _request()
    async with (
        serve(PaymentServicer(), policies=[ValidationPolicy()]) as validated,
        serve(PaymentServicer(), policies=[]) as plain,
    ):
        v_stub = validated.stub(pay_grpc.PaymentServiceStub)
        p_stub = plain.stub(pay_grpc.PaymentServiceStub)
        for stub in (v_stub, p_stub):  # warm up both channels and the bound chains
            for _ in range(200):
                await stub.ChargePayment(request)

        async def run_validated() -> Any:
            return await closed_loop(
                lambda: v_stub.ChargePayment(request),
                concurrency=CONCURRENCY,
                total=CALLS_PER_ROUND,
            )

        async def run_plain() -> Any:
            return await closed_loop(
                lambda: p_stub.ChargePayment(request),
                concurrency=CONCURRENCY,
                total=CALLS_PER_ROUND,
            )

        # ABBA order, so neither variant always runs first; each adjacent pair gives
        # one ratio, and the median of those cancels slow drifts in machine load.
        samples: dict[str, list[Any]] = {"validated": [], "plain": []}
        for i in range(ROUNDS):
            order = ("validated", "plain") if i % 2 == 0 else ("plain", "validated")
            for name in order:
                run = run_validated if name == "validated" else run_plain
                samples[name].append(await run())
    v_rate, p_rate = median_rate(samples["validated"]), median_rate(samples["plain"])
    v_cpu, p_cpu = median_cpu_us(samples["validated"]), median_cpu_us(samples["plain"])
    pairs = list(zip(samples["validated"], samples["plain"], strict=True))
    rate_ratio = statistics.median(v.rate / p.rate for v, p in pairs)
    # Capacity ratio: CPU time per call (client + server, both in this process),
    # steadier than calls/s on a shared 2-core machine (see CONVENTIONS.md).
    cpu_ratio = statistics.median(p.cpu_us_per_op / v.cpu_us_per_op for v, p in pairs)
    print(
        f"validated: {v_rate:.0f} calls/s, {v_cpu:.0f} us CPU/call,"
        f" p50 {latency_us(samples['validated'], 0.5):.0f} us"
    )
    print(
        f"plain:     {p_rate:.0f} calls/s, {p_cpu:.0f} us CPU/call,"
        f" p50 {latency_us(samples['plain'], 0.5):.0f} us"
    )
    print(
        f"median of {ROUNDS} paired ratios: calls/s {rate_ratio:.3f},"
        f" calls per CPU-second {cpu_ratio:.3f}"
    )
    print(f"one validate() of ChargePaymentRequest: {_micro_us():.2f} us")
    bench_line(
        "validation_unary",
        cpu_ratio,
        1e6 / v_cpu,
        "calls/cpu_s",
        "same ChargePayment call without ValidationPolicy (CPU per call, client+server)",
    )
