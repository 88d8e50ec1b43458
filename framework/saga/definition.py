"""Saga definitions: ordered steps, each a compensable RPC named by its full method name.

    confirm = SagaDefinition(
        "order.confirm",
        input_type=ConfirmOrderInput,
        steps=[
            Step("reserve", "inventory.v1.InventoryService/ReserveStock", request=reserve_req),
            Step("charge", "payment.v1.PaymentService/ChargePayment", request=charge_req),
            Step("notify", "notification.v1.NotificationService/SendNotification",
                 request=notify_req, compensable=False),          # the pivot
        ],
        deadline_s=30,
    )

The compensation is **not written again**: it is the method the contract names
in `method_policy.saga.compensated_by`.  Its request is built from the
action's request, overlaid with the action's reply when one came back, by
field name (or by the step's `compensation_request=` builder).  A step's own
request comes from its `request=` builder (`StepContext`: the saga input, the
replies of earlier steps, deterministic ids), or when none is given is copied
by field name from the saga input.  `Parallel(a, b)` runs steps at once.
`compensable=False` marks a pivot: once it succeeded the saga can no longer
turn back, and the steps after it are retried forward (past their limit the
saga needs attention instead of compensating).

**Checked when built**, against the descriptors (the generated `_pb2`
modules must be imported): the method exists and is unary; it is declared
`idempotent` (the orchestrator re-sends it after a crash); a compensable step
declares `compensated_by`, naming a method of the same service that is
declared `idempotent` (and, if it says what it `compensates`, says this
action); every field the compensation's request `required`s can be filled
from the action's request (the reply may never arrive: a timeout); a request
copied from the saga input can fill the action's required fields; a pivot is
not inside a parallel group; step names are unique.  A mistake raises
`DefinitionError` naming the step and the method.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message

from gen.buf.validate import validate_pb2
from gen.framework.v1 import options_pb2

__all__ = [
    "CompensationBuilder",
    "DefinitionError",
    "Parallel",
    "RequestBuilder",
    "Retry",
    "SagaDefinition",
    "Step",
    "StepContext",
    "copy_fields",
]

_STEP_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
_DEFINITION_NAME = re.compile(r"^[a-z][a-z0-9_.-]{0,99}$")
DEFAULT_STEP_TIMEOUT_S = 10.0


class DefinitionError(ValueError):
    """A saga definition that cannot run; the message names the step and the method."""


@dataclass(frozen=True, slots=True)
class Retry:
    """How often a call is tried and how long to wait between tries (exponential, jittered).

    Attempt n (1 = the first retry) waits `initial_backoff_s * multiplier**(n-1)`,
    capped at `max_backoff_s`, +/- `jitter` of itself.
    """

    max_attempts: int = 3
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"Retry.max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff_s < 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError(
                "Retry needs 0 <= initial_backoff_s <= max_backoff_s, got "
                f"{self.initial_backoff_s} and {self.max_backoff_s}"
            )
        if self.multiplier < 1:
            raise ValueError(f"Retry.multiplier must be >= 1, got {self.multiplier}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"Retry.jitter must be in [0, 1), got {self.jitter}")

    def delay_s(self, failed_attempts: int, unit_random: float) -> float:
        """Seconds to wait after `failed_attempts` failures; `unit_random` is in [0, 1)."""
        base = self.initial_backoff_s * self.multiplier ** max(0, failed_attempts - 1)
        base = min(base, self.max_backoff_s)
        return max(0.0, base * (1 + self.jitter * (2 * unit_random - 1)))


class StepContext:
    """What a step's request builder sees: the saga input, earlier replies, stable ids."""

    __slots__ = ("_replies", "input", "saga_id")

    def __init__(self, saga_id: str, input: Message, replies: Mapping[str, Message]) -> None:
        self.saga_id = saga_id
        self.input = input
        self._replies = replies

    def reply(self, step: str) -> Message:
        """The reply of an earlier step (LookupError when it has not succeeded)."""
        try:
            return self._replies[step]
        except KeyError:
            raise LookupError(
                f"step {step!r} has no reply yet: a request may use only steps before its own"
            ) from None

    def uuid(self, name: str) -> str:
        """A UUID derived from the saga id and `name`: the same on every retry and restart."""
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"saga:{self.saga_id}/{name}"))


RequestBuilder = Callable[[StepContext], Message]
# (the action's request, its reply or None when it never came back) -> compensation request
CompensationBuilder = Callable[[Message, Message | None], Message]


@dataclass(frozen=True, slots=True)
class Step:
    """One step: an action RPC (`"pkg.Service/Method"`) and how to call it."""

    name: str
    method: str
    request: RequestBuilder | None = None
    compensation_request: CompensationBuilder | None = None
    timeout_s: float | None = None  # None: the method's `timeout_s` option, else 10 s
    retry: Retry = field(default_factory=Retry)
    compensation_retry: Retry | None = None  # None: the orchestrator's default
    compensable: bool = True  # False: a pivot (see the module docstring)


@dataclass(frozen=True, slots=True, init=False)
class Parallel:
    """Steps run at the same time; the saga moves on once all succeeded."""

    steps: tuple[Step, ...]

    def __init__(self, *steps: Step) -> None:
        object.__setattr__(self, "steps", tuple(steps))


@dataclass(frozen=True, slots=True)
class Compensation:
    """A resolved compensation: its method and message classes."""

    method: str  # "/pkg.Service/Method"
    request_type: type[Message]
    response_type: type[Message]
    timeout_s: float


@dataclass(frozen=True, slots=True)
class ResolvedStep:
    """A step checked against the descriptors, ready to run."""

    step: Step
    index: int
    group: int
    method: str  # "/pkg.Service/Method"
    service: str
    request_type: type[Message]
    response_type: type[Message]
    timeout_s: float
    compensation: Compensation | None

    @property
    def name(self) -> str:
        return self.step.name

    @property
    def compensable(self) -> bool:
        return self.compensation is not None

    def build_request(self, context: StepContext) -> Message:
        builder = self.step.request
        request = builder(context) if builder is not None else None
        if request is None:
            request = self.request_type()
            copy_fields(request, context.input)
        if type(request).DESCRIPTOR.full_name != self.request_type.DESCRIPTOR.full_name:
            raise TypeError(
                f"step {self.name}: request builder returned {type(request).DESCRIPTOR.full_name},"
                f" {self.method} takes {self.request_type.DESCRIPTOR.full_name}"
            )
        return request

    def build_compensation(self, request: Message, reply: Message | None) -> Message:
        assert self.compensation is not None
        builder = self.step.compensation_request
        if builder is not None:
            built = builder(request, reply)
        else:
            built = self.compensation.request_type()
            copy_fields(built, request, *(() if reply is None else (reply,)))
        expected = self.compensation.request_type.DESCRIPTOR.full_name
        if type(built).DESCRIPTOR.full_name != expected:
            raise TypeError(
                f"step {self.name}: compensation_request returned "
                f"{type(built).DESCRIPTOR.full_name}, {self.compensation.method} takes {expected}"
            )
        return built


def copy_fields(target: Message, *sources: Message) -> Message:
    """Set each field of `target` from the same-named, same-typed set field of `sources`.

    Later sources win.  Returns `target`.
    """
    fields: Mapping[str, Any] = target.DESCRIPTOR.fields_by_name
    for source in sources:
        for source_field, value in source.ListFields():
            target_field = fields.get(source_field.name)
            if target_field is None or not _same_type(target_field, source_field):
                continue
            if target_field.is_repeated:
                target.ClearField(target_field.name)
                getattr(target, target_field.name).extend(value)
            elif target_field.message_type is not None:
                getattr(target, target_field.name).CopyFrom(value)
            else:
                setattr(target, target_field.name, value)
    return target


def _same_type(a: FieldDescriptor, b: FieldDescriptor) -> bool:
    if a.is_repeated != b.is_repeated or a.type != b.type:
        return False
    if a.message_type is not None:
        return b.message_type is not None and a.message_type.full_name == b.message_type.full_name
    if a.enum_type is not None:
        return b.enum_type is not None and a.enum_type.full_name == b.enum_type.full_name
    return True


def _required(descriptor: Descriptor) -> list[FieldDescriptor]:
    return [f for f in descriptor.fields if f.GetOptions().Extensions[validate_pb2.field].required]


def _fillable(target: FieldDescriptor, *sources: Descriptor) -> bool:
    for source in sources:
        candidate = source.fields_by_name.get(target.name)
        if candidate is not None and _same_type(target, candidate):
            return True
    return False


def _policy(method: MethodDescriptor) -> options_pb2.MethodPolicy:
    options = method.GetOptions()
    if options.HasExtension(options_pb2.method_policy):
        return options.Extensions[options_pb2.method_policy]
    return options_pb2.MethodPolicy()


class SagaDefinition:
    """A named saga: its input type, steps (checked when built) and overall deadline."""

    def __init__(
        self,
        name: str,
        *,
        input_type: type[Message],
        steps: Sequence[Step | Parallel],
        deadline_s: float = 60.0,
        pool: descriptor_pool.DescriptorPool | None = None,
    ) -> None:
        if not _DEFINITION_NAME.match(name):
            raise DefinitionError(
                f"saga name {name!r} must be 1-100 of [a-z0-9_.-], starting with a letter"
            )
        if deadline_s <= 0:
            raise DefinitionError(f"saga {name}: deadline_s must be > 0, got {deadline_s}")
        if not steps:
            raise DefinitionError(f"saga {name}: give at least one step")
        self.name = name
        self.input_type = input_type
        self.deadline_s = deadline_s
        self._pool = pool or descriptor_pool.Default()
        resolved: list[ResolvedStep] = []
        groups: list[tuple[ResolvedStep, ...]] = []
        seen: set[str] = set()
        for group_index, item in enumerate(steps):
            members = item.steps if isinstance(item, Parallel) else (item,)
            if not members:
                raise DefinitionError(f"saga {name}: Parallel() #{group_index} has no steps")
            group: list[ResolvedStep] = []
            for step in members:
                if step.name in seen:
                    raise DefinitionError(f"saga {name}: step name {step.name!r} is used twice")
                seen.add(step.name)
                if len(members) > 1 and not step.compensable:
                    raise DefinitionError(
                        f"saga {name}, step {step.name} ({step.method}): a pivot "
                        "(compensable=False) cannot run in a parallel group: if a sibling "
                        "failed it could not be undone"
                    )
                group.append(self._resolve(step, len(resolved), group_index))
                resolved.append(group[-1])
            groups.append(tuple(group))
        self.steps: tuple[ResolvedStep, ...] = tuple(resolved)
        self.groups: tuple[tuple[ResolvedStep, ...], ...] = tuple(groups)
        self.by_name: dict[str, ResolvedStep] = {s.name: s for s in resolved}

    @property
    def services(self) -> frozenset[str]:
        """Full names of the services the steps call."""
        return frozenset(s.service for s in self.steps)

    def _resolve(self, step: Step, index: int, group: int) -> ResolvedStep:
        where = f"saga {self.name}, step {step.name!r}"
        if not _STEP_NAME.match(step.name):
            raise DefinitionError(f"{where}: a step name is 1-64 of [a-z0-9_-], starting a-z")
        service_name, _, method_name = step.method.lstrip("/").partition("/")
        where = f"{where} ({service_name}/{method_name})"
        try:
            service = self._pool.FindServiceByName(service_name)
        except KeyError:
            raise DefinitionError(
                f"{where}: service {service_name!r} is not in the descriptor pool: "
                "import its generated *_pb2 module (or check the name)"
            ) from None
        method = service.methods_by_name.get(method_name)
        if method is None:
            raise DefinitionError(f"{where}: {service_name} has no method {method_name!r}")
        if method.client_streaming or method.server_streaming:
            raise DefinitionError(f"{where}: a saga step must be a unary RPC")
        policy = _policy(method)
        if not policy.idempotent:
            raise DefinitionError(
                f"{where}: the action is not declared idempotent in its contract "
                "(method_policy.idempotent): the orchestrator re-sends it after a crash"
            )
        request_type = message_factory.GetMessageClass(method.input_type)
        if step.request is None:
            missing = [
                f.name for f in _required(method.input_type) if not _fillable(f, self._input)
            ]
            if missing:
                raise DefinitionError(
                    f"{where}: no request= builder, and the saga input "
                    f"{self._input.full_name} has no field for required "
                    f"{', '.join(missing)} of {method.input_type.full_name}"
                )
        timeout_s = step.timeout_s or policy.timeout_s or DEFAULT_STEP_TIMEOUT_S
        if timeout_s <= 0:
            raise DefinitionError(f"{where}: timeout_s must be > 0, got {timeout_s}")
        compensation = None
        if step.compensable:
            compensation = self._compensation(where, service, method, policy, step, timeout_s)
        return ResolvedStep(
            step=step,
            index=index,
            group=group,
            method=f"/{service_name}/{method_name}",
            service=service_name,
            request_type=request_type,
            response_type=message_factory.GetMessageClass(method.output_type),
            timeout_s=timeout_s,
            compensation=compensation,
        )

    @property
    def _input(self) -> Descriptor:
        return self.input_type.DESCRIPTOR  # type: ignore[return-value]

    def _compensation(
        self,
        where: str,
        service: Any,
        method: MethodDescriptor,
        policy: options_pb2.MethodPolicy,
        step: Step,
        action_timeout_s: float,
    ) -> Compensation:
        undo_name = policy.saga.compensated_by
        if not undo_name:
            raise DefinitionError(
                f"{where}: the contract declares no compensation "
                "(method_policy.saga.compensated_by); declare one, or mark the step "
                "compensable=False (a pivot)"
            )
        undo = service.methods_by_name.get(undo_name)
        if undo is None:
            raise DefinitionError(
                f"{where}: its compensation {undo_name!r} does not exist on {service.full_name}"
            )
        undo_where = f"{where}: compensation {service.full_name}/{undo_name}"
        if undo.client_streaming or undo.server_streaming:
            raise DefinitionError(f"{undo_where} must be a unary RPC")
        undo_policy = _policy(undo)
        if not undo_policy.idempotent:
            raise DefinitionError(
                f"{undo_where} is not declared idempotent (method_policy.idempotent): "
                "compensations are retried until they succeed"
            )
        says = undo_policy.saga.compensates
        if says and says != method.name:
            raise DefinitionError(f"{undo_where} says it compensates {says!r}, not {method.name!r}")
        if step.compensation_request is None:
            required = _required(undo.input_type)
            missing = [f.name for f in required if not _fillable(f, method.input_type)]
            if missing:
                in_reply = [m for m in missing if m in method.output_type.fields_by_name]
                hint = (
                    f" ({', '.join(in_reply)} only in the reply, which a timed-out call never"
                    " gives: let the caller choose it in the request)"
                    if in_reply
                    else ""
                )
                raise DefinitionError(
                    f"{undo_where}: its request {undo.input_type.full_name} needs "
                    f"{', '.join(missing)}, which {method.input_type.full_name} does not carry"
                    f"{hint}; or give the step compensation_request="
                )
            if not any(
                _fillable(f, method.input_type, method.output_type) for f in undo.input_type.fields
            ):
                raise DefinitionError(
                    f"{undo_where}: no field of {undo.input_type.full_name} can be filled from "
                    f"{method.input_type.full_name} or its reply; give compensation_request="
                )
        return Compensation(
            method=f"/{service.full_name}/{undo_name}",
            request_type=message_factory.GetMessageClass(undo.input_type),
            response_type=message_factory.GetMessageClass(undo.output_type),
            timeout_s=undo_policy.timeout_s or action_timeout_s,
        )
