"""The order service's view of the services it calls (each through the registry)."""

from __future__ import annotations

from typing import Any

from framework.errors import FailedPreconditionError
from gen.user.v1 import user_pb2
from gen.user.v1.user_pb2_grpc import UserServiceStub
from services.order.domain import DOMAIN

__all__ = ["UserDirectory"]


class UserDirectory:
    """`Customers` on the user service: is the customer there and active?"""

    def __init__(self, channel: Any) -> None:
        self.stub = UserServiceStub(channel)

    async def require_active(self, user_id: str) -> None:
        reply = await self.stub.GetUser(user_pb2.GetUserRequest(user_id=user_id))
        if reply.user.HasField("deactivated_at"):
            raise FailedPreconditionError(
                f"customer {user_id} is deactivated and cannot order",
                reason="CUSTOMER_DEACTIVATED",
                domain=DOMAIN,
            )
