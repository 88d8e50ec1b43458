"""What callers see of a saga: the `saga.v1` messages built from the aggregate and its events."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from framework.saga.definition import SagaDefinition
from framework.saga.index import IndexRow
from framework.saga.run import SagaRun, StepStatus, describe_error
from gen.saga.v1 import events_pb2 as ev
from gen.saga.v1 import saga_pb2 as pb

__all__ = ["saga_message", "summary_message", "transition_message"]


def _ts(moment: datetime | None) -> timestamp_pb2.Timestamp | None:
    if moment is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _micros_ts(micros: int) -> timestamp_pb2.Timestamp:
    return _ts(datetime.fromtimestamp(micros / 1e6, tz=UTC)) or timestamp_pb2.Timestamp()


def saga_message(run: SagaRun, definition: SagaDefinition | None) -> pb.Saga:
    """The saga with its step log: every step of the definition (or of the log), in order."""
    steps: list[pb.SagaStep] = []
    if definition is not None:
        for step in definition.steps:
            state = run.steps.get(step.name)
            comp = step.compensation.method.lstrip("/") if step.compensation else ""
            steps.append(
                pb.SagaStep(
                    name=step.name,
                    method=step.method.lstrip("/"),
                    compensation=comp,
                    status=int(state.status if state else StepStatus.PENDING),  # type: ignore[arg-type]
                    attempts=state.attempts if state else 0,
                    compensation_attempts=state.compensation_attempts if state else 0,
                    error=state.error if state else "",
                    group=step.group,
                )
            )
    else:  # a definition this orchestrator does not know: what the log says
        for name, state in run.steps.items():
            steps.append(
                pb.SagaStep(
                    name=name,
                    status=int(state.status),  # type: ignore[arg-type]
                    attempts=state.attempts,
                    compensation_attempts=state.compensation_attempts,
                    error=state.error,
                )
            )
    return pb.Saga(
        saga_id=run.id,
        definition=run.definition,
        status=int(run.status),  # type: ignore[arg-type]
        steps=steps,
        input=run.input,
        error=run.error,
        created_at=_ts(run.started_at),
        updated_at=_ts(run.updated_at),
        deadline=_ts(run.deadline),
        version=run.version,
    )


def summary_message(row: IndexRow) -> pb.SagaSummary:
    return pb.SagaSummary(
        saga_id=row.saga_id,
        definition=row.definition,
        status=int(row.status),  # type: ignore[arg-type]
        error=row.error,
        created_at=_micros_ts(row.created_us),
        updated_at=_micros_ts(row.updated_us),
    )


def _detail(message: Message) -> tuple[str, str]:
    """(step, detail) of one saga event, for a person following the saga."""
    if isinstance(message, ev.SagaStarted):
        return "", f"definition {message.definition}"
    if isinstance(message, ev.StepStarted):
        return message.step, message.method
    if isinstance(message, ev.StepSucceeded):
        return message.step, f"after {message.attempts} attempt(s)"
    if isinstance(message, ev.StepFailed):
        unknown = " (outcome unknown)" if message.outcome_unknown else ""
        return message.step, f"{describe_error(message.error)}{unknown}"
    if isinstance(message, ev.StepAttemptFailed):
        side = "compensation" if message.compensation else "action"
        return message.step, (
            f"{side} attempt {message.attempt}: {describe_error(message.error)};"
            f" retry in {message.retry_in_s:.2f}s"
        )
    if isinstance(message, ev.CompensationStarted):
        return message.step, message.reason
    if isinstance(message, ev.StepCompensated):
        return message.step, f"after {message.attempts} attempt(s)"
    if isinstance(message, ev.SagaNeedsAttention):
        return message.step, message.reason
    if isinstance(message, ev.SagaRetried):
        return "", f"requested by {message.requested_by or 'an operator'}"
    return "", ""


def transition_message(
    saga_id: str, version: int, message: Message, run_after: SagaRun, at: datetime
) -> pb.SagaTransition:
    step, detail = _detail(message)
    return pb.SagaTransition(
        saga_id=saga_id,
        version=version,
        event=message.DESCRIPTOR.name,
        step=step,
        status=int(run_after.status),  # type: ignore[arg-type]
        detail=detail,
        at=_ts(at),
    )
