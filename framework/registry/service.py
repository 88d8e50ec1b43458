"""registry.v1.RegistryService: protos in, `Registry` use cases, protos out.

No rules here; validation and errors come from the registry (framework errors,
mapped to status codes by the server's error mapping).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from framework.registry.registry import Registry
from framework.registry.wire import selector_from_proto, view_to_proto
from gen.registry.v1 import registry_pb2 as pb
from gen.registry.v1 import registry_pb2_grpc

Context = Any  # grpc.aio.ServicerContext


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    """The gRPC face of a `Registry`."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def _now(self) -> float:
        return self.registry.clock.now().timestamp()

    async def Register(  # noqa: N802
        self, request: pb.RegisterRequest, context: Context
    ) -> pb.RegisterResponse:
        lease = await self.registry.register(
            request.service,
            request.address,
            version=request.version,
            zone=request.zone,
            weight=request.weight if request.HasField("weight") else None,
            metadata=dict(request.metadata),
            ttl_s=request.ttl_s,
        )
        return pb.RegisterResponse(lease_id=lease.lease_id, ttl_s=lease.ttl_s)

    async def Renew(self, request: pb.RenewRequest, context: Context) -> pb.RenewResponse:  # noqa: N802
        lease = await self.registry.renew(request.lease_id)
        return pb.RenewResponse(ttl_s=lease.ttl_s)

    async def Deregister(  # noqa: N802
        self, request: pb.DeregisterRequest, context: Context
    ) -> pb.DeregisterResponse:
        await self.registry.deregister(request.lease_id)
        return pb.DeregisterResponse()

    async def Discover(  # noqa: N802
        self, request: pb.DiscoverRequest, context: Context
    ) -> pb.ServiceView:
        view = await self.registry.discover(
            request.service,
            selector_from_proto(request.selector),
            include_unhealthy=request.include_unhealthy,
        )
        return view_to_proto(view, self._now())

    async def Watch(  # noqa: N802
        self, request: pb.WatchRequest, context: Context
    ) -> AsyncIterator[pb.ServiceView]:
        views = self.registry.watch(
            request.service,
            selector_from_proto(request.selector),
            after_revision=request.after_revision,
            include_unhealthy=request.include_unhealthy,
        )
        async for view in views:
            yield view_to_proto(view, self._now())

    async def SetWeights(  # noqa: N802
        self, request: pb.SetWeightsRequest, context: Context
    ) -> pb.SetWeightsResponse:
        revision = await self.registry.set_weights(request.service, dict(request.version_weights))
        return pb.SetWeightsResponse(revision=revision)

    async def ListServices(  # noqa: N802
        self, request: pb.ListServicesRequest, context: Context
    ) -> pb.ListServicesResponse:
        views = await self.registry.list_services()
        revision = max((v.revision for v in views), default=0)
        return pb.ListServicesResponse(
            revision=revision,
            services=[
                pb.ServiceSummary(
                    service=v.service,
                    instances=len(v.instances),
                    healthy=sum(1 for i in v.instances if i.health.eligible),
                    version_weights=dict(v.version_weights),
                )
                for v in views
            ],
        )
