"""`saga.v1.SagaService` on an orchestrator: proto in, proto out.

    server.add(SagaServicer(orchestrator))
    server.add_hook(orchestrator)          # resumes unfinished sagas when the server starts

Serve it with `ValidationPolicy()` (the contract's field rules) and an auth
policy (`sagas:write` starts and retries, `sagas:read` reads); the servicer
also checks what a missing validation policy would let through (ids, enum
values, page sizes).  Errors map at the server edge: INVALID_ARGUMENT for an
unknown definition or a wrong input, NOT_FOUND for an unknown saga,
ALREADY_EXISTS for a saga id reused with another input, FAILED_PRECONDITION
for retrying a saga that does not need attention.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from framework.errors import FieldViolation, InvalidArgumentError
from framework.saga.orchestrator import SagaOrchestrator
from framework.saga.run import SagaStatus
from gen.saga.v1 import saga_pb2 as pb
from gen.saga.v1 import saga_pb2_grpc

__all__ = ["SagaServicer"]

MAX_PAGE = 500


def _requester() -> str:
    from framework.auth.policy import current_principal

    principal = current_principal()
    return principal.subject if principal is not None else ""


class SagaServicer(saga_pb2_grpc.SagaServiceServicer):
    """Implements `saga.v1.SagaService` on a `SagaOrchestrator`."""

    def __init__(self, orchestrator: SagaOrchestrator) -> None:
        self.orchestrator = orchestrator

    async def StartSaga(  # noqa: N802 - gRPC method name
        self, request: pb.StartSagaRequest, context: Any
    ) -> pb.StartSagaResponse:
        if not request.HasField("input"):
            raise InvalidArgumentError(
                "input is missing: pack the definition's input message in an Any",
                violations=[FieldViolation("input", "required", "required")],
            )
        if not request.saga_id:
            raise InvalidArgumentError(
                "saga_id is missing: choose one (a UUID) so a retried StartSaga starts one saga",
                violations=[FieldViolation("saga_id", "required", "required")],
            )
        saga, created = await self.orchestrator.start_saga(
            request.definition,
            request.input,
            saga_id=request.saga_id,
            deadline_s=request.deadline_s or None,
        )
        return pb.StartSagaResponse(saga=saga, created=created)

    async def GetSaga(  # noqa: N802
        self, request: pb.GetSagaRequest, context: Any
    ) -> pb.GetSagaResponse:
        return pb.GetSagaResponse(saga=await self.orchestrator.get(request.saga_id))

    async def ListSagas(  # noqa: N802
        self, request: pb.ListSagasRequest, context: Any
    ) -> pb.ListSagasResponse:
        try:
            status = SagaStatus(request.status)
        except ValueError:
            raise InvalidArgumentError(
                f"status {request.status} is not a SagaStatus",
                violations=[FieldViolation("status", "not a defined SagaStatus")],
            ) from None
        if request.page_size > MAX_PAGE:
            raise InvalidArgumentError(
                f"page_size is at most {MAX_PAGE}, got {request.page_size}",
                violations=[FieldViolation("page_size", f"at most {MAX_PAGE}")],
            )
        sagas, token = await self.orchestrator.list(
            status=status,
            definition=request.definition,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListSagasResponse(sagas=sagas, next_page_token=token)

    async def WatchSaga(  # noqa: N802
        self, request: pb.WatchSagaRequest, context: Any
    ) -> AsyncIterator[pb.WatchSagaResponse]:
        if request.after_version < 0:
            raise InvalidArgumentError(
                "after_version must be >= 0",
                violations=[FieldViolation("after_version", "must be >= 0")],
            )
        async for transition in self.orchestrator.watch(request.saga_id, request.after_version):
            yield pb.WatchSagaResponse(transition=transition)

    async def RetrySaga(  # noqa: N802
        self, request: pb.RetrySagaRequest, context: Any
    ) -> pb.RetrySagaResponse:
        saga = await self.orchestrator.retry(request.saga_id, _requester())
        return pb.RetrySagaResponse(saga=saga)
