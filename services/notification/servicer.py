"""gRPC edge of the notification service: proto <-> application, nothing else."""

from __future__ import annotations

from typing import Any

from google.protobuf import timestamp_pb2

from framework.auth.policy import current_principal
from framework.policies.idempotency import current_idempotency_key
from gen.notification.v1 import notification_pb2 as pb
from gen.notification.v1 import notification_pb2_grpc
from services.notification.application import Notifications
from services.notification.domain import Caller, Channel, Draft, Notification

__all__ = ["NotificationServicer", "notification_message"]


def notification_message(n: Notification) -> pb.Notification:
    sent = timestamp_pb2.Timestamp()
    sent.FromDatetime(n.sent_at)
    return pb.Notification(
        notification_id=n.notification_id,
        user_id=n.user_id,
        channel=int(n.channel),  # type: ignore[arg-type]
        subject=n.subject,
        body=n.body,
        sent_at=sent,
    )


def _caller() -> Caller:
    principal = current_principal()
    return Caller(principal.subject, principal.scopes) if principal else Caller("")


class NotificationServicer(notification_pb2_grpc.NotificationServiceServicer):
    def __init__(self, notifications: Notifications) -> None:
        self.notifications = notifications

    async def SendNotification(
        self, request: pb.SendNotificationRequest, context: Any
    ) -> pb.SendNotificationResponse:
        draft = Draft(request.user_id, Channel(request.channel), request.subject, request.body)
        sent = await self.notifications.send(draft, current_idempotency_key() or "")
        return pb.SendNotificationResponse(notification=notification_message(sent))

    async def ListNotifications(
        self, request: pb.ListNotificationsRequest, context: Any
    ) -> pb.ListNotificationsResponse:
        found, following = await self.notifications.list(
            _caller(), request.user_id, request.page_size, request.page_token
        )
        return pb.ListNotificationsResponse(
            notifications=[notification_message(n) for n in found], next_page_token=following
        )
