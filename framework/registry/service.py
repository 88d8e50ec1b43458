"""registry.v1.RegistryService: protos in, `Registry` use cases, protos out.

Validation and errors come from the registry (framework errors, mapped to
status codes by the server's error mapping).  Authorization beyond the
contract's scopes happens here, from the verified caller
(`framework.auth.policy.current_principal()`):

* Register: the caller must be granted the service name (`grants`, a
  `framework.auth.grants.NameGrants`; default: its own token subject); the lease
  records the caller as its owner;
* Renew / Deregister: only the lease's owner;
* a caller holding `admin_scope` ("registry:admin") may do all three for any
  name and lease (operators cleaning up);
* discovery views never carry lease ids (they are their owner's secret).

On a server without authentication (the explicit insecure development mode)
there is no caller: nothing beyond the scopes is checked and leases have no owner.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from framework.auth.grants import NameGrants
from framework.auth.policy import current_principal
from framework.auth.verifier import Principal
from framework.errors import PermissionDeniedError
from framework.registry.model import check_service_name
from framework.registry.registry import Registry
from framework.registry.wire import delta_to_proto, selector_from_proto, view_to_proto
from gen.registry.v1 import registry_pb2 as pb
from gen.registry.v1 import registry_pb2_grpc

Context = Any  # grpc.aio.ServicerContext

ADMIN_SCOPE = "registry:admin"


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    """The gRPC face of a `Registry`."""

    def __init__(
        self,
        registry: Registry,
        *,
        grants: NameGrants | None = None,
        admin_scope: str = ADMIN_SCOPE,
    ) -> None:
        self.registry = registry
        self.grants = grants or NameGrants()
        self.admin_scope = admin_scope

    async def _now(self) -> float:
        return await self.registry.lease_now()

    def _caller(self) -> tuple[Principal | None, bool]:
        """The verified caller (None without authentication) and whether it is an admin."""
        principal = current_principal()
        return principal, principal is not None and self.admin_scope in principal.scopes

    def _owner(self) -> str | None:
        """Whose leases the caller may touch: its key; None means any (admin, no auth)."""
        principal, admin = self._caller()
        if principal is None or admin:
            return None
        return principal.key

    async def Register(  # noqa: N802
        self, request: pb.RegisterRequest, context: Context
    ) -> pb.RegisterResponse:
        principal, admin = self._caller()
        owner = ""
        if principal is not None:
            check_service_name(request.service)
            if not admin and not self.grants.allows(principal, request.service):
                granted = NameGrants.describe(self.grants.patterns(principal))
                raise PermissionDeniedError(
                    f"this caller may not register instances of {request.service!r} "
                    f"(granted: {granted}); ask the registry operator for a grant",
                    reason="SERVICE_NOT_GRANTED",
                    metadata={"service": request.service},
                )
            owner = principal.key
        lease = await self.registry.register(
            request.service,
            request.address,
            version=request.version,
            zone=request.zone,
            weight=request.weight if request.HasField("weight") else None,
            metadata=dict(request.metadata),
            ttl_s=request.ttl_s,
            owner=owner,
        )
        return pb.RegisterResponse(lease_id=lease.lease_id, ttl_s=lease.ttl_s)

    async def Renew(self, request: pb.RenewRequest, context: Context) -> pb.RenewResponse:  # noqa: N802
        lease = await self.registry.renew(request.lease_id, owner=self._owner())
        return pb.RenewResponse(ttl_s=lease.ttl_s)

    async def Deregister(  # noqa: N802
        self, request: pb.DeregisterRequest, context: Context
    ) -> pb.DeregisterResponse:
        await self.registry.deregister(request.lease_id, owner=self._owner())
        return pb.DeregisterResponse()

    async def Discover(  # noqa: N802
        self, request: pb.DiscoverRequest, context: Context
    ) -> pb.ServiceView:
        view = await self.registry.discover(
            request.service,
            selector_from_proto(request.selector),
            include_unhealthy=request.include_unhealthy,
        )
        return view_to_proto(view, await self._now())

    async def Watch(  # noqa: N802
        self, request: pb.WatchRequest, context: Context
    ) -> AsyncIterator[pb.ServiceView]:
        updates = self.registry.watch(
            request.service,
            selector_from_proto(request.selector),
            after_revision=request.after_revision,
            include_unhealthy=request.include_unhealthy,
        )
        deltas = request.deltas
        async for update in updates:
            # Built once per change and selector, shared by every such watcher.
            memo, base = update.memo, update.base
            key = ("delta", base.revision) if deltas and base is not None else ("full", 0)
            message = memo.get(key)
            if message is None:
                now = memo.get("now")
                if now is None:
                    now = memo["now"] = await self._now()
                if key[0] == "delta" and base is not None:
                    message = delta_to_proto(base, update.view, now)
                else:
                    message = view_to_proto(update.view, now)
                memo[key] = message
            yield message

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
