"""How one saga moves: forward through its groups of steps, or back through compensations.

`SagaDriver` holds what a transition needs (the participants, the clock, the
tracer, the retry policy of compensations) and a `save` that records the
aggregate's pending events; `SagaOrchestrator` owns the sagas and runs one
driver loop per saga (`forward` while RUNNING, `backward` while COMPENSATING).
Every method here emits events on the `SagaRun`; the caller's `save` makes
them durable before the next participant call (see `orchestrator.py`).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message
from opentelemetry import context as context_api
from opentelemetry import trace as trace_api
from opentelemetry.trace import SpanKind, Status, StatusCode

from framework.clock import Clock
from framework.errors import DeadlineExceededError, FrameworkError, InvalidArgumentError
from framework.saga.barrier import Op, saga_key
from framework.saga.calls import Participants, retryable
from framework.saga.definition import ResolvedStep, Retry, SagaDefinition, StepContext
from framework.saga.run import SagaRun, StepStatus, step_error

__all__ = ["SagaDriver"]

DOMAIN = "framework.saga"


@dataclass(frozen=True, slots=True)
class _Done:
    response: bytes
    attempts: int


@dataclass(frozen=True, slots=True)
class _Failed:
    error: FrameworkError
    attempts: int
    unknown: bool


async def _all(coroutines: Sequence[Coroutine[Any, Any, Any]]) -> list[Any]:
    """Run concurrently; if one raises, cancel the others (no orphan keeps calling) and raise."""
    if len(coroutines) == 1:
        return [await coroutines[0]]
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class SagaDriver:
    """Moves one saga at a time; see the module docstring."""

    def __init__(
        self,
        participants: Participants,
        save: Callable[[SagaRun], Awaitable[None]],
        *,
        clock: Clock,
        tracer: trace_api.Tracer,
        compensation_retry: Retry,
        rng: random.Random,
    ) -> None:
        self.participants = participants
        self._save = save
        self.clock = clock
        self._tracer = tracer
        self.compensation_retry = compensation_retry
        self._rng = rng

    def definition_changed(self, run: SagaRun, definition: SagaDefinition) -> bool:
        """A step in the log the definition no longer has: emit needs-attention, say True."""
        unknown = [name for name in run.steps if name not in definition.by_name]
        if not unknown:
            return False
        problem = InvalidArgumentError(
            f"definition {definition.name} has no step {', '.join(unknown)} of this saga's log;"
            " restore the step (or retry once an operator has undone it by hand)",
            reason="DEFINITION_CHANGED",
            domain=DOMAIN,
        )
        run.needs_attention(unknown[0], problem.message, step_error(problem), self.clock.now())
        return True

    @staticmethod
    def _pivot_passed(run: SagaRun, definition: SagaDefinition) -> bool:
        return any(
            not s.compensable and run.step(s.name).status is StepStatus.SUCCEEDED
            for s in definition.steps
        )

    def _context(self, run: SagaRun, definition: SagaDefinition) -> StepContext:
        replies: dict[str, Message] = {}
        for step in definition.steps:
            state = run.steps.get(step.name)
            if state is not None and state.status is StepStatus.SUCCEEDED:
                replies[step.name] = step.response_type.FromString(state.response or b"")
        data = definition.input_type.FromString(run.input.value)
        return StepContext(run.id, data, replies)

    def advance(self, run: SagaRun, definition: SagaDefinition) -> tuple[ResolvedStep, ...]:
        """Emit (not save) what comes next going forward; the group of steps to call now.

        Completes the saga when every step succeeded, turns it back when the
        deadline passed or a request cannot be built, else records StepStarted
        for the next group's steps not started yet (steps started before a
        restart are re-sent as recorded).  Returns () when nothing is to be called.
        """
        pivot = self._pivot_passed(run, definition)
        group = next(
            (
                g
                for g in definition.groups
                if any(run.step(s.name).status is not StepStatus.SUCCEEDED for s in g)
            ),
            None,
        )
        now = self.clock.now()
        if group is None:
            run.complete(now)
            return ()
        assert run.deadline is not None
        if not pivot and run.deadline <= now:
            run.begin_compensation(
                f"the saga's deadline passed before step {group[0].name} could run", "", now
            )
            return ()
        context: StepContext | None = None
        for step in group:
            if run.step(step.name).status is not StepStatus.PENDING:
                continue
            try:
                context = context or self._context(run, definition)
                request = step.build_request(context)
            except Exception as error:  # noqa: BLE001 - a definition bug: the step fails
                problem = InvalidArgumentError(
                    f"building the request of step {step.name} failed: {error}",
                    reason="BAD_STEP_REQUEST",
                    domain=DOMAIN,
                )
                self._fail_forward(run, step, _Failed(problem, 0, False), pivot)
                return ()
            run.step_started(step.name, step.method[1:], request.SerializeToString(), now)
        running = tuple(s for s in group if run.step(s.name).status is StepStatus.RUNNING)
        if not running:  # cannot happen with a consistent log; never spin on one
            problem = InvalidArgumentError(
                f"group of step {group[0].name} has no step to run", domain=DOMAIN
            )
            run.needs_attention(group[0].name, problem.message, step_error(problem), now)
        return running

    async def forward(
        self,
        run: SagaRun,
        definition: SagaDefinition,
        parent: context_api.Context,
        lock: asyncio.Lock,
    ) -> None:
        running = self.advance(run, definition)
        await self._save(run)  # a step's success, the next step's start: one append
        if not running:
            return
        pivot = self._pivot_passed(run, definition)
        outcomes = await _all([self._act(run, s, pivot, parent, lock) for s in running])
        failed: list[tuple[ResolvedStep, _Failed]] = []
        now = self.clock.now()
        for step, outcome in zip(running, outcomes, strict=True):
            if isinstance(outcome, _Done):
                run.step_succeeded(step.name, outcome.response, outcome.attempts, now)
            else:
                failed.append((step, outcome))
        if failed:
            first_step, first = failed[0]
            for step, outcome in failed[1:]:
                run.step_failed(
                    step.name, step_error(outcome.error), outcome.attempts, outcome.unknown, now
                )
            self._fail_forward(run, first_step, first, pivot)
            await self._save(run)
        # on success nothing is saved yet: the next StepStarted (or SagaCompleted) carries it

    def _fail_forward(
        self, run: SagaRun, step: ResolvedStep, failure: _Failed, pivot: bool
    ) -> None:
        now = self.clock.now()
        error = step_error(failure.error)
        if pivot:
            run.needs_attention(
                step.name,
                f"step {step.name} failed after the pivot ({failure.attempts} attempt(s)):"
                f" {error.code} {failure.error.message}; fix it and retry the saga",
                error,
                now,
            )
        else:
            run.step_failed(step.name, error, failure.attempts, failure.unknown, now)
            run.begin_compensation(
                f"step {step.name} failed: {error.code} {failure.error.message}", step.name, now
            )

    def _span(
        self, name: str, run: SagaRun, step: ResolvedStep, parent: context_api.Context
    ) -> Any:
        return self._tracer.start_as_current_span(
            name,
            context=parent,
            kind=SpanKind.INTERNAL,
            attributes={
                "saga.id": run.id,
                "saga.definition": run.definition,
                "saga.step": step.name,
                "rpc.method": step.method[1:],
            },
        )

    async def _act(
        self,
        run: SagaRun,
        step: ResolvedStep,
        pivot: bool,
        parent: context_api.Context,
        lock: asyncio.Lock,
    ) -> _Done | _Failed:
        state = run.step(step.name)
        key = saga_key(run.id, step.name, Op.ACTION)
        assert run.deadline is not None
        deadline = run.deadline
        with self._span(f"saga step {step.name}", run, step, parent) as span:
            attempt = state.attempts
            while True:
                attempt += 1
                timeout = step.timeout_s
                if not pivot:
                    remaining = (deadline - self.clock.now()).total_seconds()
                    if remaining <= 0:
                        return _Failed(
                            DeadlineExceededError(
                                f"the saga's deadline passed during step {step.name}",
                                domain=DOMAIN,
                            ),
                            attempt - 1,
                            unknown=True,
                        )
                    timeout = min(timeout, remaining)
                try:
                    reply = await self.participants.call(
                        step.service, step.method, state.request, key, timeout
                    )
                except FrameworkError as error:
                    span.add_event(
                        "attempt failed", {"attempt": attempt, "code": error.code().name}
                    )
                    delay = step.step.retry.delay_s(attempt, self._rng.random())
                    again = retryable(error) and attempt < step.step.retry.max_attempts
                    if again and not pivot:
                        left = (deadline - self.clock.now()).total_seconds()
                        again = delay < left
                    if not again:
                        span.set_status(Status(StatusCode.ERROR, f"{error.code().name}: {error}"))
                        return _Failed(error, attempt, unknown=retryable(error))
                    await self._record_attempt(run, step, False, attempt, error, delay, lock)
                    await self.clock.sleep(delay)
                    continue
                return _Done(reply, attempt)

    async def _record_attempt(
        self,
        run: SagaRun,
        step: ResolvedStep,
        compensation: bool,
        attempt: int,
        error: FrameworkError,
        delay: float,
        lock: asyncio.Lock,
    ) -> None:
        async with lock:
            run.attempt_failed(
                step.name, compensation, attempt, step_error(error), delay, self.clock.now()
            )
            await self._save(run)

    async def backward(
        self,
        run: SagaRun,
        definition: SagaDefinition,
        parent: context_api.Context,
        lock: asyncio.Lock,
    ) -> None:
        for name in reversed(run.started_order):
            step = definition.by_name.get(name)
            state = run.step(name)
            if step is None or not step.compensable or state.status is StepStatus.COMPENSATED:
                continue
            try:
                action = step.request_type.FromString(state.request)
                reply = (
                    step.response_type.FromString(state.response)
                    if state.response is not None
                    else None
                )
                request = step.build_compensation(action, reply).SerializeToString()
            except Exception as error:  # noqa: BLE001 - a definition bug: an operator must look
                problem = InvalidArgumentError(str(error), reason="BAD_COMPENSATION_REQUEST")
                run.needs_attention(
                    name,
                    f"cannot build the compensation request of step {name}: {error}",
                    step_error(problem),
                    self.clock.now(),
                )
                await self._save(run)
                return
            outcome = await self._undo(run, step, request, parent, lock)
            now = self.clock.now()
            if isinstance(outcome, _Done):
                run.step_compensated(name, outcome.response, outcome.attempts, now)
                await self._save(run)
                continue
            assert step.compensation is not None
            run.needs_attention(
                name,
                f"compensation {step.compensation.method[1:]} of step {name} failed"
                f" {outcome.attempts} time(s): {outcome.error.code().name}"
                f" {outcome.error.message}; fix it and retry the saga",
                step_error(outcome.error),
                now,
            )
            await self._save(run)
            return
        run.compensated(self.clock.now())
        await self._save(run)

    async def _undo(
        self,
        run: SagaRun,
        step: ResolvedStep,
        request: bytes,
        parent: context_api.Context,
        lock: asyncio.Lock,
    ) -> _Done | _Failed:
        compensation = step.compensation
        assert compensation is not None
        retry = step.step.compensation_retry or self.compensation_retry
        key = saga_key(run.id, step.name, Op.COMPENSATION)
        attempt = run.step(step.name).compensation_attempts
        with self._span(f"saga compensate {step.name}", run, step, parent) as span:
            while True:
                attempt += 1
                try:
                    reply = await self.participants.call(
                        step.service, compensation.method, request, key, compensation.timeout_s
                    )
                except FrameworkError as error:
                    span.add_event(
                        "attempt failed", {"attempt": attempt, "code": error.code().name}
                    )
                    if attempt >= retry.max_attempts:
                        span.set_status(Status(StatusCode.ERROR, f"{error.code().name}: {error}"))
                        return _Failed(error, attempt, unknown=True)
                    delay = retry.delay_s(attempt, self._rng.random())
                    await self._record_attempt(run, step, True, attempt, error, delay, lock)
                    await self.clock.sleep(delay)
                    continue
                return _Done(reply, attempt)
