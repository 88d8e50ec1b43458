"""gRPC edge of the identity service: proto <-> application, nothing else."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from google.protobuf import timestamp_pb2

from framework.auth.policy import current_principal
from framework.policies.idempotency import current_idempotency_key
from gen.user.v1 import user_pb2, user_pb2_grpc
from services.user.application import Users
from services.user.domain import Caller, User

__all__ = ["UserServicer", "caller", "user_message"]


def _timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def user_message(user: User) -> user_pb2.User:
    message = user_pb2.User(
        user_id=user.user_id,
        email=user.email,
        display_name=user.display_name,
        registered_at=_timestamp(user.registered_at),
    )
    if user.deactivated_at is not None:
        message.deactivated_at.CopyFrom(_timestamp(user.deactivated_at))
    return message


def caller() -> Caller:
    """The verified caller of the current call (anonymous: empty subject)."""
    principal = current_principal()
    if principal is None:
        return Caller("")
    return Caller(principal.subject, principal.scopes)


class UserServicer(user_pb2_grpc.UserServiceServicer):
    """Implements `user.v1.UserService` on `Users`."""

    def __init__(self, users: Users) -> None:
        self.users = users

    async def RegisterUser(
        self, request: user_pb2.RegisterUserRequest, context: Any
    ) -> user_pb2.RegisterUserResponse:
        # the contract requires the key; the chain refused calls without one
        key = current_idempotency_key() or ""
        user = await self.users.register(request.email, request.display_name, request.password, key)
        return user_pb2.RegisterUserResponse(user=user_message(user))

    async def LogIn(self, request: user_pb2.LogInRequest, context: Any) -> user_pb2.LogInResponse:
        logged = await self.users.log_in(request.email, request.password)
        response = user_pb2.LogInResponse(
            access_token=logged.token.token,
            token_type="Bearer",
            scopes=logged.scopes,
            user=user_message(logged.user),
        )
        if logged.token.expires_at is not None:
            response.expires_at.CopyFrom(_timestamp(logged.token.expires_at))
        return response

    async def GetUser(
        self, request: user_pb2.GetUserRequest, context: Any
    ) -> user_pb2.GetUserResponse:
        user = await self.users.get(caller(), request.user_id)
        return user_pb2.GetUserResponse(user=user_message(user))

    async def UpdateProfile(
        self, request: user_pb2.UpdateProfileRequest, context: Any
    ) -> user_pb2.UpdateProfileResponse:
        user = await self.users.update_profile(caller(), request.user_id, request.display_name)
        return user_pb2.UpdateProfileResponse(user=user_message(user))

    async def DeactivateUser(
        self, request: user_pb2.DeactivateUserRequest, context: Any
    ) -> user_pb2.DeactivateUserResponse:
        user = await self.users.deactivate(caller(), request.user_id, request.reason)
        return user_pb2.DeactivateUserResponse(user=user_message(user))
