"""Sagas as compensable RPCs: definitions, the durable orchestrator, the participant barrier.

See README.md.  Database drivers are imported only by the modules that need
them (`barrier_postgres` takes asyncpg connections; the orchestrator runs on
any `framework.events` store), so `import framework.saga` loads none.
"""

from framework.saga.barrier import BarrierCall, Decision, Entry, Op, ProtoCodec, saga_key
from framework.saga.barrier_sqlite import SqliteBarrier
from framework.saga.calls import Participants
from framework.saga.definition import (
    DefinitionError,
    Parallel,
    Retry,
    SagaDefinition,
    Step,
    StepContext,
    copy_fields,
)
from framework.saga.orchestrator import OrchestratorConfig, SagaOrchestrator
from framework.saga.run import SagaRun, SagaStatus, StepStatus, saga_types

__all__ = [
    "BarrierCall",
    "Decision",
    "DefinitionError",
    "Entry",
    "Op",
    "OrchestratorConfig",
    "Parallel",
    "Participants",
    "ProtoCodec",
    "Retry",
    "SagaDefinition",
    "SagaOrchestrator",
    "SagaRun",
    "SagaStatus",
    "SqliteBarrier",
    "Step",
    "StepContext",
    "StepStatus",
    "copy_fields",
    "saga_key",
    "saga_types",
]
