"""A saga run as an event-sourced aggregate: the orchestrator's durable log.

Stream id = saga id, aggregate type "Saga", events from `protos/saga/v1/events.proto`.
Commands check the transition is legal and emit; handlers rebuild the state,
the same way when the orchestrator runs and when it reloads after a restart.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from google.protobuf import any_pb2, timestamp_pb2

from framework.errors import FrameworkError
from framework.events.aggregate import Aggregate, applies
from framework.events.typeregistry import EventTypeRegistry
from gen.saga.v1 import events_pb2 as ev

__all__ = ["SagaRun", "SagaStatus", "StepState", "StepStatus", "describe_error", "saga_types"]

AGGREGATE_TYPE = "Saga"


class SagaStatus(enum.IntEnum):
    """Mirrors `saga.v1.SagaStatus`."""

    UNSPECIFIED = 0
    RUNNING = 1
    COMPENSATING = 2
    COMPLETED = 3
    COMPENSATED = 4
    NEEDS_ATTENTION = 5

    @property
    def finished(self) -> bool:
        """No further transition will happen on its own (NEEDS_ATTENTION waits for a retry)."""
        return self in (SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.NEEDS_ATTENTION)

    @property
    def active(self) -> bool:
        return self in (SagaStatus.RUNNING, SagaStatus.COMPENSATING)


class StepStatus(enum.IntEnum):
    """Mirrors `saga.v1.StepStatus`."""

    UNSPECIFIED = 0
    PENDING = 1
    RUNNING = 2
    SUCCEEDED = 3
    FAILED = 4
    COMPENSATED = 5
    COMPENSATION_FAILED = 6


@dataclass(slots=True)
class StepState:
    """One step as the log tells it."""

    status: StepStatus = StepStatus.PENDING
    request: bytes = b""
    response: bytes | None = None
    attempts: int = 0
    compensation_attempts: int = 0
    error: str = ""
    outcome_unknown: bool = False
    # the status a failed compensation replaced (restored when the saga is retried)
    held_status: StepStatus = StepStatus.UNSPECIFIED


def saga_types() -> EventTypeRegistry:
    """The event types a store holding sagas must know."""
    return EventTypeRegistry.from_modules(ev)


def describe_error(error: ev.StepError) -> str:
    reason = f" {error.reason}" if error.reason and error.reason != error.code else ""
    return f"{error.code}{reason}: {error.message}"


def step_error(error: BaseException) -> ev.StepError:
    """The log's record of an exception (typed framework errors keep code and reason)."""
    if isinstance(error, FrameworkError):
        return ev.StepError(code=error.code().name, reason=error.reason, message=error.message)
    return ev.StepError(code="INTERNAL", reason=type(error).__name__, message=str(error))


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _ts(moment: datetime) -> timestamp_pb2.Timestamp:
    """A Timestamp from an aware datetime (integer arithmetic: FromDatetime is slow)."""
    delta = moment - _EPOCH
    return timestamp_pb2.Timestamp(
        seconds=delta.days * 86_400 + delta.seconds, nanos=delta.microseconds * 1000
    )


def _dt(stamp: timestamp_pb2.Timestamp) -> datetime:
    return _EPOCH + timedelta(seconds=stamp.seconds, microseconds=stamp.nanos // 1000)


class SagaRun(Aggregate):
    """The state of one saga, rebuilt from its events."""

    aggregate_type = AGGREGATE_TYPE

    def __init__(self, aggregate_id: str) -> None:
        super().__init__(aggregate_id)
        self.definition = ""
        self.input = any_pb2.Any()
        self.deadline: datetime | None = None
        self.started_at: datetime | None = None
        self._updated: timestamp_pb2.Timestamp | None = None
        self.status = SagaStatus.UNSPECIFIED
        self.steps: dict[str, StepState] = {}
        self.started_order: list[str] = []
        self.error = ""
        self.attention_from = SagaStatus.UNSPECIFIED
        self.attention_step = ""

    def step(self, name: str) -> StepState:
        state = self.steps.get(name)
        if state is None:
            state = self.steps[name] = StepState()
        return state

    # ------------------------------------------------------------ commands

    def start(self, definition: str, input: any_pb2.Any, deadline: datetime, now: datetime) -> None:
        self.require(self.status is SagaStatus.UNSPECIFIED, "the saga was already started")
        self.emit(
            ev.SagaStarted(
                definition=definition, input=input, deadline=_ts(deadline), started_at=_ts(now)
            )
        )

    def step_started(self, step: str, method: str, request: bytes, now: datetime) -> None:
        self.require(self.status is SagaStatus.RUNNING, f"cannot start {step}: not running")
        self.emit(ev.StepStarted(step=step, method=method, request=request, at=_ts(now)))

    def step_succeeded(self, step: str, response: bytes, attempts: int, now: datetime) -> None:
        self.emit(ev.StepSucceeded(step=step, response=response, attempts=attempts, at=_ts(now)))

    def step_failed(
        self, step: str, error: ev.StepError, attempts: int, unknown: bool, now: datetime
    ) -> None:
        self.emit(
            ev.StepFailed(
                step=step, error=error, attempts=attempts, outcome_unknown=unknown, at=_ts(now)
            )
        )

    def attempt_failed(
        self,
        step: str,
        compensation: bool,
        attempt: int,
        error: ev.StepError,
        retry_in_s: float,
        now: datetime,
    ) -> None:
        self.emit(
            ev.StepAttemptFailed(
                step=step,
                compensation=compensation,
                attempt=attempt,
                error=error,
                retry_in_s=retry_in_s,
                at=_ts(now),
            )
        )

    def begin_compensation(self, reason: str, step: str, now: datetime) -> None:
        self.require(self.status is SagaStatus.RUNNING, "only a running saga turns back")
        self.emit(ev.CompensationStarted(reason=reason, step=step, at=_ts(now)))

    def step_compensated(self, step: str, response: bytes, attempts: int, now: datetime) -> None:
        self.emit(ev.StepCompensated(step=step, response=response, attempts=attempts, at=_ts(now)))

    def complete(self, now: datetime) -> None:
        self.require(self.status is SagaStatus.RUNNING, "only a running saga completes")
        self.emit(ev.SagaCompleted(at=_ts(now)))

    def compensated(self, now: datetime) -> None:
        self.require(self.status is SagaStatus.COMPENSATING, "only a compensating saga ends so")
        self.emit(ev.SagaCompensated(at=_ts(now)))

    def needs_attention(self, step: str, reason: str, error: ev.StepError, now: datetime) -> None:
        self.require(self.status.active, "only an active saga can need attention")
        self.emit(ev.SagaNeedsAttention(step=step, reason=reason, error=error, at=_ts(now)))

    def retried(self, requested_by: str, now: datetime) -> None:
        self.require(
            self.status is SagaStatus.NEEDS_ATTENTION,
            f"only a saga that needs attention can be retried; this one is {self.status.name}",
        )
        self.emit(ev.SagaRetried(requested_by=requested_by, at=_ts(now)))

    # ------------------------------------------------------------ handlers

    def _touch(self, at: timestamp_pb2.Timestamp) -> None:
        self._updated = at

    @property
    def updated_at(self) -> datetime | None:
        return _dt(self._updated) if self._updated is not None else None

    @applies(ev.SagaStarted)
    def _started(self, event: ev.SagaStarted) -> None:
        self.definition = event.definition
        self.input.CopyFrom(event.input)
        self.deadline = _dt(event.deadline)
        self.started_at = _dt(event.started_at)
        self.status = SagaStatus.RUNNING
        self._touch(event.started_at)

    @applies(ev.StepStarted)
    def _step_started(self, event: ev.StepStarted) -> None:
        state = self.step(event.step)
        state.status = StepStatus.RUNNING
        state.request = event.request
        if event.step not in self.started_order:
            self.started_order.append(event.step)
        self._touch(event.at)

    @applies(ev.StepSucceeded)
    def _step_succeeded(self, event: ev.StepSucceeded) -> None:
        state = self.step(event.step)
        state.status = StepStatus.SUCCEEDED
        state.response = event.response
        state.attempts = event.attempts
        state.error = ""
        self._touch(event.at)

    @applies(ev.StepFailed)
    def _step_failed(self, event: ev.StepFailed) -> None:
        state = self.step(event.step)
        state.status = StepStatus.FAILED
        state.attempts = event.attempts
        state.error = describe_error(event.error)
        state.outcome_unknown = event.outcome_unknown
        self._touch(event.at)

    @applies(ev.StepAttemptFailed)
    def _attempt_failed(self, event: ev.StepAttemptFailed) -> None:
        state = self.step(event.step)
        if event.compensation:
            state.compensation_attempts = event.attempt
        else:
            state.attempts = event.attempt
        state.error = describe_error(event.error)
        self._touch(event.at)

    @applies(ev.CompensationStarted)
    def _compensation_started(self, event: ev.CompensationStarted) -> None:
        self.status = SagaStatus.COMPENSATING
        self.error = event.reason
        self._touch(event.at)

    @applies(ev.StepCompensated)
    def _step_compensated(self, event: ev.StepCompensated) -> None:
        state = self.step(event.step)
        state.status = StepStatus.COMPENSATED
        state.compensation_attempts = event.attempts
        self._touch(event.at)

    @applies(ev.SagaCompleted)
    def _completed(self, event: ev.SagaCompleted) -> None:
        self.status = SagaStatus.COMPLETED
        self._touch(event.at)

    @applies(ev.SagaCompensated)
    def _compensated(self, event: ev.SagaCompensated) -> None:
        self.status = SagaStatus.COMPENSATED
        self._touch(event.at)

    @applies(ev.SagaNeedsAttention)
    def _needs_attention(self, event: ev.SagaNeedsAttention) -> None:
        self.attention_from = self.status
        self.attention_step = event.step
        if self.status is SagaStatus.COMPENSATING:
            state = self.step(event.step)
            state.held_status, state.status = state.status, StepStatus.COMPENSATION_FAILED
        self.status = SagaStatus.NEEDS_ATTENTION
        self.error = event.reason
        self._touch(event.at)

    @applies(ev.SagaRetried)
    def _retried(self, event: ev.SagaRetried) -> None:
        self.status = self.attention_from or SagaStatus.RUNNING
        state = self.step(self.attention_step)
        if self.status is SagaStatus.COMPENSATING:
            state.compensation_attempts = 0
            if state.status is StepStatus.COMPENSATION_FAILED:
                state.status = state.held_status
        else:  # forward again: failed steps are sent again, with a fresh count
            state.attempts = 0
            for other in self.steps.values():
                if other.status is StepStatus.FAILED:
                    other.status, other.attempts = StepStatus.RUNNING, 0
        self._touch(event.at)
