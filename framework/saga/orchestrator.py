"""The durable saga orchestrator: drives each saga forward, or back, and survives restarts.

    orchestrator = SagaOrchestrator(store, [confirm_order], Participants({...}))
    await orchestrator.start()                    # resumes every unfinished saga
    saga, created = await orchestrator.start_saga("order.confirm", order_input, saga_id=oid)
    final = await orchestrator.wait(saga.saga_id, timeout_s=30)
    await orchestrator.close()

A saga is an event-sourced aggregate (`framework.saga.run.SagaRun`) in the
framework's own event store (SQLite or PostgreSQL).  **Every transition is
appended before the next participant call**: `StepStarted` (with the
serialized request) before an action is sent, `StepSucceeded`/`StepFailed`
after; a step's success and the next step's start share one append, so a
3-step saga costs 4 durable writes.  A crash at any point leaves a log from
which the saga resumes: a step whose outcome is not recorded is sent again
with the same idempotency key (the participant's barrier answers the first
result), a compensating saga goes on compensating.

Forward: groups of steps in order (a `Parallel` group at once).  Each call's
deadline is the smaller of the step's timeout and what remains of the saga's
deadline; retryable failures (UNAVAILABLE, DEADLINE_EXCEEDED, ...) are
retried with jittered exponential backoff within the step's `Retry` and the
deadline; any other code is the participant's refusal.  A failed step, or
the deadline passing, turns the saga back.

Backward: every started compensable step is compensated, in reverse order of
starting (the failed step too: if its outcome is unknown it may have been
applied, and if not, the barrier makes it a no-op and refuses a late
duplicate of the action).  Compensations are retried with backoff up to the
configured limit; past it the saga **needs attention** (`ListSagas` shows it;
`retry()` resumes it after an operator fixed the cause).

After a pivot (a step with `compensable=False`) succeeded, the saga cannot
turn back: later steps are retried forward and, past their limit, the saga
needs attention.

Several orchestrator processes may share one store: appends carry the
expected version, so if two ever drive the same saga the loser gets a
conflict and leaves it to the winner (and the barrier absorbs the duplicate
calls).  Run one orchestrator per store for throughput; resuming is per
process (`start()` resumes every unfinished saga it finds).

Tracing: `start_saga` records the start inside a `saga start <definition>`
span (a child of the caller's span, e.g. the StartSaga RPC); every step and
compensation runs in a `saga step <name>` / `saga compensate <name>` span
that is a child of it, also after a restart (the start's trace context is
stored with the `SagaStarted` event), so the participant calls made through
a traced channel all land in the caller's one trace.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import re
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message
from opentelemetry import context as context_api
from opentelemetry import propagate
from opentelemetry import trace as trace_api
from opentelemetry.trace import SpanKind

from framework.clock import Clock, SystemClock
from framework.errors import (
    AlreadyExistsError,
    ConflictError,
    DeadlineExceededError,
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from framework.events.aggregate import Repository
from framework.events.projection import ProjectionConfig, ProjectionRunner
from framework.events.store import EventStore
from framework.policy import set_current_call
from framework.saga.calls import Participants
from framework.saga.definition import Retry, SagaDefinition
from framework.saga.driver import SagaDriver
from framework.saga.index import IndexHost, SagaIndex
from framework.saga.run import SagaRun, SagaStatus, saga_types
from framework.saga.view import saga_message, summary_message, transition_message
from gen.saga.v1 import saga_pb2 as pb

__all__ = ["OrchestratorConfig", "SagaOrchestrator"]

logger = logging.getLogger(__name__)

SAGA_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
MAX_DEADLINE_S = 86_400.0
TYPE_URL_PREFIX = "type.googleapis.com/"
DOMAIN = "framework.saga"
FINAL_KEPT = 4096  # finished sagas kept in memory for waiters


@dataclass(frozen=True, slots=True)
class OrchestratorConfig:
    """Limits and timings of one orchestrator.

    `compensation_retry`: how often a compensation is tried before the saga
    needs attention (a step's own `compensation_retry` wins).
    `max_active`: sagas driven at once; StartSaga beyond it is RESOURCE_EXHAUSTED.
    `recovery_backoff_s`: wait before re-reading a saga after its store failed.
    `watch_poll_s`: how often a watcher re-reads a saga another process drives.
    `index_delay_s`: how long the saga index lets new transitions gather before it
    records them (one transaction per batch; ListSagas trails the log by about this).
    """

    compensation_retry: Retry = field(
        default_factory=lambda: Retry(max_attempts=10, initial_backoff_s=0.1, max_backoff_s=10.0)
    )
    max_active: int = 10_000
    recovery_backoff_s: float = 0.5
    watch_poll_s: float = 1.0
    index_batch_size: int = 500
    index_delay_s: float = 0.1

    def __post_init__(self) -> None:
        if self.max_active < 1:
            raise ValueError(f"max_active must be >= 1, got {self.max_active}")
        if self.recovery_backoff_s <= 0:
            raise ValueError(f"recovery_backoff_s must be > 0, got {self.recovery_backoff_s}")
        if self.watch_poll_s <= 0:
            raise ValueError(f"watch_poll_s must be > 0, got {self.watch_poll_s}")
        if self.index_delay_s < 0:
            raise ValueError(f"index_delay_s must be >= 0, got {self.index_delay_s}")
        if self.index_batch_size < 1:
            raise ValueError(f"index_batch_size must be >= 1, got {self.index_batch_size}")


class _Changes:
    """Per-saga wake-ups (in-process): one channel for every transition, one for the end."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}

    def waiter(self, saga_id: str) -> asyncio.Event:
        event = self._events.get(saga_id)
        if event is None:
            event = self._events[saga_id] = asyncio.Event()
        return event

    def notify(self, saga_id: str) -> None:
        event = self._events.pop(saga_id, None)
        if event is not None:
            event.set()


async def _wait(event: asyncio.Event, timeout_s: float) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        pass


def check_saga_id(saga_id: str) -> None:
    if not SAGA_ID.match(saga_id):
        raise InvalidArgumentError(
            f"saga_id {saga_id[:120]!r} must be 1-100 of [A-Za-z0-9._-], starting with a letter"
            " or digit (a UUID works)",
            violations=[FieldViolation("saga_id", "1-100 of [A-Za-z0-9._-]")],
            reason="BAD_SAGA_ID",
            domain=DOMAIN,
        )


class SagaOrchestrator:
    """Runs sagas of the given definitions against `participants`, logged in `store`."""

    def __init__(
        self,
        store: EventStore,
        definitions: Sequence[SagaDefinition],
        participants: Participants,
        *,
        config: OrchestratorConfig | None = None,
        clock: Clock | None = None,
        tracer_provider: trace_api.TracerProvider | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.config = config or OrchestratorConfig()
        self.clock = clock or SystemClock()
        self.participants = participants
        self.definitions: dict[str, SagaDefinition] = {}
        for definition in definitions:
            if definition.name in self.definitions:
                raise ValueError(f"two saga definitions are named {definition.name!r}")
            self.definitions[definition.name] = definition
        missing = participants.missing({s for d in definitions for s in d.services})
        if missing:
            raise ValueError(f"Participants has no channel for {', '.join(missing)}")
        self.repository = Repository(store, SagaRun)
        self.index = SagaIndex(store)
        self._types = saga_types()
        self._tracer = (tracer_provider or trace_api.get_tracer_provider()).get_tracer(
            "framework.saga"
        )
        self._rng = rng or random.Random()
        self._driver = SagaDriver(
            participants,
            self._save,
            clock=self.clock,
            tracer=self._tracer,
            compensation_retry=self.config.compensation_retry,
            rng=self._rng,
        )
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._final: OrderedDict[str, SagaRun] = OrderedDict()  # recently finished, recorded
        self._changes = _Changes()  # every recorded transition (watchers)
        self._endings = _Changes()  # a saga finished (waiters)
        self._runner = ProjectionRunner(
            IndexHost(store, self.index),
            self.index,
            ProjectionConfig(batch_size=self.config.index_batch_size, idle_wait_s=0.5),
            trace=False,
        )
        self._stop = asyncio.Event()
        self._index_task: asyncio.Task[None] | None = None
        self._started = False

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> int:
        """Catch the index up and resume every unfinished saga; returns how many resumed."""
        if self._started:
            return 0
        self._started = True
        await self.index.setup()
        await self._runner.catch_up()
        resumed = 0
        for saga_id in await self.index.active_ids():
            run = await self.repository.get(saga_id)
            if run is not None and run.status.active:
                parent = await self._stored_trace(saga_id)
                self._spawn(run, parent)
                resumed += 1
        self._index_task = asyncio.create_task(self._follow_index(), name="saga-index")
        if resumed:
            logger.info("resumed %s unfinished saga(s)", resumed)
        return resumed

    async def close(self) -> None:
        """Stop driving sagas (they resume on the next start) and stop the index."""
        self._stop.set()
        tasks = [*self._tasks.values()]
        if self._index_task is not None:
            tasks.append(self._index_task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._index_task = None

    async def on_started(self, server: object) -> None:
        """Server hook: start with the server."""
        await self.start()

    async def on_stopped(self, server: object) -> None:
        """Server hook: stop once the server has drained."""
        await self.close()

    async def _follow_index(self) -> None:
        """Keep the saga index up to the log, a batch per transaction (never dies)."""
        runner, delay = self._runner, self.config.index_delay_s
        while not self._stop.is_set():
            try:
                await runner.catch_up()
                while not self._stop.is_set():
                    if await self.store.wait_for_events(runner.position, 1.0):
                        await self.clock.sleep(delay)  # let appends gather into one batch
                        while await runner.step():
                            pass
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("saga index projection failed; retrying")
                await self.clock.sleep(self.config.recovery_backoff_s)

    async def refresh_index(self) -> int:
        """Bring the saga index up to the log now (it follows on its own within moments)."""
        return await self._runner.catch_up()

    @property
    def active(self) -> int:
        """Sagas being driven by this orchestrator now."""
        return len(self._tasks)

    # ------------------------------------------------------------ use cases

    def definition(self, name: str) -> SagaDefinition:
        found = self.definitions.get(name)
        if found is None:
            known = ", ".join(sorted(self.definitions)) or "none"
            raise InvalidArgumentError(
                f"unknown saga definition {name[:100]!r}; this orchestrator runs: {known}",
                violations=[FieldViolation("definition", "not a known saga definition")],
                reason="UNKNOWN_SAGA_DEFINITION",
                domain=DOMAIN,
            )
        return found

    def _packed(self, definition: SagaDefinition, data: Message | any_pb2.Any) -> any_pb2.Any:
        expected = definition.input_type.DESCRIPTOR.full_name
        if isinstance(data, any_pb2.Any):
            got = data.type_url.rpartition("/")[2]
            if got != expected:
                raise InvalidArgumentError(
                    f"saga {definition.name} takes input of type {expected}, got "
                    f"{got[:120] or 'an empty Any'}",
                    violations=[FieldViolation("input", f"must be a packed {expected}")],
                    reason="WRONG_SAGA_INPUT",
                    domain=DOMAIN,
                )
            try:
                message = definition.input_type.FromString(data.value)
            except DecodeError as error:
                raise InvalidArgumentError(
                    f"input does not parse as {expected}: {error}",
                    violations=[FieldViolation("input", f"does not parse as {expected}")],
                    reason="BAD_SAGA_INPUT",
                    domain=DOMAIN,
                ) from error
        else:
            if data.DESCRIPTOR.full_name != expected:
                raise InvalidArgumentError(
                    f"saga {definition.name} takes input of type {expected}, got "
                    f"{data.DESCRIPTOR.full_name}",
                    violations=[FieldViolation("input", f"must be a {expected}")],
                    reason="WRONG_SAGA_INPUT",
                    domain=DOMAIN,
                )
            message = data
        return any_pb2.Any(
            type_url=TYPE_URL_PREFIX + expected,
            value=message.SerializeToString(deterministic=True),
        )

    async def start_saga(
        self,
        definition: str,
        input: Message | any_pb2.Any,
        *,
        saga_id: str | None = None,
        deadline_s: float | None = None,
    ) -> tuple[pb.Saga, bool]:
        """Record a new saga and start driving it; (the saga, whether it was created).

        Idempotent by `saga_id`: the same id with the same definition and input
        returns the existing saga (created False); with another one it is
        ALREADY_EXISTS.  Returns once the start is durably recorded.
        """
        run, found, created = await self._start(definition, input, saga_id, deadline_s)
        return saga_message(run, found), created

    async def _start(
        self,
        definition: str,
        input: Message | any_pb2.Any,
        saga_id: str | None,
        deadline_s: float | None,
    ) -> tuple[SagaRun, SagaDefinition, bool]:
        found = self.definition(definition)
        packed = self._packed(found, input)
        saga_id = saga_id or str(uuid.uuid4())
        check_saga_id(saga_id)
        seconds = deadline_s or found.deadline_s
        if not 0 < seconds <= MAX_DEADLINE_S:
            raise InvalidArgumentError(
                f"deadline_s must be in (0, {MAX_DEADLINE_S:.0f}], got {deadline_s}",
                violations=[FieldViolation("deadline_s", "out of range")],
                domain=DOMAIN,
            )
        if len(self._tasks) >= self.config.max_active:
            existing = await self.repository.get(saga_id)
            if existing is not None:
                return self._same_start(existing, found, packed), found, False
            raise ResourceExhaustedError(
                f"{len(self._tasks)} sagas are running, the limit is {self.config.max_active};"
                " retry later",
                retry_after_s=1.0,
                reason="TOO_MANY_SAGAS",
                domain=DOMAIN,
            )
        run = SagaRun(saga_id)
        now = self.clock.now()
        with self._tracer.start_as_current_span(
            f"saga start {found.name}",
            kind=SpanKind.INTERNAL,
            attributes={"saga.id": saga_id, "saga.definition": found.name},
        ):
            run.start(found.name, packed, now + timedelta(seconds=seconds), now)
            self._driver.advance(run, found)  # the first steps start in the same append
            try:  # expects a new stream: an existing saga is a conflict, not a second start
                await self._save(run)
            except ConflictError:
                existing = await self.repository.load(saga_id)
                return self._same_start(existing, found, packed), found, False
            parent = context_api.get_current()
        self._spawn(run, parent)
        return run, found, True

    def _same_start(self, run: SagaRun, definition: SagaDefinition, packed: any_pb2.Any) -> SagaRun:
        stored = run.input
        same = run.definition == definition.name and stored.type_url == packed.type_url
        if same:
            same = definition.input_type.FromString(
                stored.value
            ) == definition.input_type.FromString(packed.value)
        if not same:
            raise AlreadyExistsError(
                f"saga {run.id} already exists with another definition or input; "
                "choose a new saga_id for a new saga",
                reason="SAGA_ID_REUSED",
                metadata={"saga_id": run.id},
                domain=DOMAIN,
            )
        return run

    async def get(self, saga_id: str) -> pb.Saga:
        """The saga and its step log; NotFoundError when unknown."""
        run = await self._load(saga_id)
        return saga_message(run, self.definitions.get(run.definition))

    async def reply(self, saga_id: str, step: str) -> Message | None:
        """The reply of a succeeded step (parsed), or None."""
        run = await self._load(saga_id)
        definition = self.definitions.get(run.definition)
        state = run.steps.get(step)
        if definition is None or state is None or state.response is None:
            return None
        return definition.by_name[step].response_type.FromString(state.response)

    async def _load(self, saga_id: str) -> SagaRun:
        check_saga_id(saga_id)
        run = await self.repository.get(saga_id)
        if run is None:
            raise NotFoundError(
                f"no saga {saga_id!r}: check the id (ListSagas shows the known ones)",
                reason="SAGA_NOT_FOUND",
                metadata={"saga_id": saga_id},
                domain=DOMAIN,
            )
        return run

    async def wait(self, saga_id: str, timeout_s: float) -> pb.Saga:
        """The saga once finished (or needing attention); DeadlineExceededError after timeout_s.

        A saga driven by this orchestrator is answered from memory once its final
        transition is recorded; any other is re-read from the store.
        """
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while True:
            waiter = self._endings.waiter(saga_id)
            final = self._final.get(saga_id)
            if final is not None:
                return saga_message(final, self.definitions.get(final.definition))
            status = SagaStatus.UNSPECIFIED
            if saga_id not in self._tasks:
                saga = await self.get(saga_id)
                status = SagaStatus(saga.status)
                if status.finished:
                    return saga
            remaining = end - loop.time()
            if remaining <= 0:
                raise DeadlineExceededError(
                    f"saga {saga_id} has not finished after {timeout_s}s", domain=DOMAIN
                )
            await _wait(waiter, min(remaining, self.config.watch_poll_s))

    async def run_saga(
        self,
        definition: str,
        input: Message | any_pb2.Any,
        *,
        saga_id: str | None = None,
        deadline_s: float | None = None,
        wait_s: float | None = None,
    ) -> pb.Saga:
        """Start (or find) a saga and wait for it to finish; the final saga."""
        run, found, _ = await self._start(definition, input, saga_id, deadline_s)
        limit = wait_s if wait_s is not None else (deadline_s or found.deadline_s)
        return await self.wait(run.id, limit + self.config.watch_poll_s)

    async def list(
        self,
        *,
        status: SagaStatus = SagaStatus.UNSPECIFIED,
        definition: str = "",
        page_size: int = 50,
        page_token: str = "",
    ) -> tuple[list[pb.SagaSummary], str]:
        """A page of sagas, newest first, and the token of the next page ("" on the last)."""
        before = 0
        if page_token:
            try:
                before = int(page_token)
            except ValueError:
                before = -1
            if before <= 0:
                raise InvalidArgumentError(
                    "page_token is not one this service handed out: send next_page_token as is",
                    violations=[FieldViolation("page_token", "not a token from ListSagas")],
                    domain=DOMAIN,
                )
        size = page_size or 50
        rows = await self.index.page(
            status=status, definition=definition, limit=size + 1, before_position=before
        )
        more = len(rows) > size
        rows = rows[:size]
        token = str(rows[-1].position) if more and rows else ""
        return [summary_message(r) for r in rows], token

    async def watch(self, saga_id: str, after_version: int = 0) -> AsyncIterator[pb.SagaTransition]:
        """The saga's transitions after `after_version`, then live ones, until it finishes."""
        await self._load(saga_id)  # NotFoundError before the stream starts
        shadow = SagaRun(saga_id)
        while True:
            waiter = self._changes.waiter(saga_id)
            events = await self.store.read_stream(saga_id, shadow.version + 1)
            for event in events:
                shadow.replay(event)
                if event.version > after_version:
                    message = self._types.decode(event.type, event.payload)
                    yield transition_message(
                        saga_id, event.version, message, shadow, event.recorded_at
                    )
            if shadow.status.finished:
                return
            await _wait(waiter, self.config.watch_poll_s)

    async def retry(self, saga_id: str, requested_by: str = "") -> pb.Saga:
        """Resume a saga that needs attention; FailedPreconditionError otherwise."""
        run = await self._load(saga_id)
        run.retried(requested_by, self.clock.now())
        await self._save(run)
        self._spawn(run, await self._stored_trace(saga_id))
        return saga_message(run, self.definitions.get(run.definition))

    # ------------------------------------------------------------ driving

    async def _save(self, run: SagaRun) -> None:
        await self.repository.save(run)
        if run.status.finished:  # everything is recorded: waiters may read it from memory
            self._final[run.id] = run
            while len(self._final) > FINAL_KEPT:
                self._final.popitem(last=False)
            self._endings.notify(run.id)
        self._changes.notify(run.id)

    async def _stored_trace(self, saga_id: str) -> context_api.Context:
        first = await self.store.read_stream(saga_id, 1, 1)
        if not first or not first[0].metadata.traceparent:
            return context_api.Context()
        meta = first[0].metadata
        carrier = {"traceparent": meta.traceparent}
        if meta.tracestate:
            carrier["tracestate"] = meta.tracestate
        return propagate.extract(carrier)

    def _spawn(self, run: SagaRun, parent: context_api.Context) -> None:
        if run.id in self._tasks or self._stop.is_set():
            return
        self._final.pop(run.id, None)
        # A fresh context: the saga outlives the RPC that started it, so its
        # calls must not inherit that RPC's deadline (framework.policy's current call).
        context = contextvars.copy_context()
        context.run(set_current_call, None)
        task = asyncio.create_task(self._drive(run, parent), name=f"saga:{run.id}", context=context)
        self._tasks[run.id] = task
        task.add_done_callback(lambda _: self._tasks.pop(run.id, None))

    async def _drive(self, run: SagaRun, parent: context_api.Context) -> None:
        definition = self.definitions.get(run.definition)
        if definition is None:
            logger.error(
                "saga %s: definition %r is unknown to this orchestrator; leaving it %s",
                run.id,
                run.definition,
                run.status.name,
            )
            return
        lock = asyncio.Lock()
        while run.status.active:
            try:
                if self._driver.definition_changed(run, definition):
                    await self._save(run)
                elif run.status is SagaStatus.RUNNING:
                    await self._driver.forward(run, definition, parent, lock)
                else:
                    await self._driver.backward(run, definition, parent, lock)
            except ConflictError:
                logger.warning("saga %s was moved by another orchestrator; leaving it", run.id)
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("saga %s: recording a transition failed; retrying", run.id)
                await self.clock.sleep(self.config.recovery_backoff_s)
                reloaded = await self._reload(run.id)
                if reloaded is None:
                    return
                run = reloaded
        self._changes.notify(run.id)
        self._endings.notify(run.id)
        logger.info("saga %s %s", run.id, run.status.name.lower())

    async def _reload(self, saga_id: str) -> SagaRun | None:
        while not self._stop.is_set():
            try:
                return await self.repository.get(saga_id)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("saga %s: reloading failed; retrying", saga_id)
                await self.clock.sleep(self.config.recovery_backoff_s)
        return None
