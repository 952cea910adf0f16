"""The widget role: an end user's connection to their one conversation."""

from __future__ import annotations

from typing import Any

from core.errors import CoreError, Unavailable
from core.models import Business, Conversation, StreamPosition
from core.types import ConversationId, Role
from gateway.auth import Principal
from gateway.connection import Connection, Refused, State
from gateway.hub import View
from gateway.protocol import (
    PROTOCOL_VERSION,
    AgentAction,
    ClientFrame,
    CloseCode,
    ErrorCode,
    FrameError,
    Hello,
    SendMessage,
    Stop,
    Typing,
)
from gateway.subscription import Subscription


class WidgetRole:
    kind = "user"

    def __init__(self, connection: Connection, business: Business, conversation_id: ConversationId) -> None:
        self.connection = connection
        self.business = business
        self.conversation_id = conversation_id

    @classmethod
    async def start(cls, connection: Connection, principal: Principal, hello: Hello) -> WidgetRole:
        """Check the token against its conversation, send `welcome`, replay, go live."""
        gw = connection.gw
        cid = principal.conversation_id
        if cid is None:
            raise Refused(
                CloseCode.UNAUTHORIZED, ErrorCode.UNAUTHORIZED, "a user token must name its conversation"
            )
        if hello.conversation_id is not None and hello.conversation_id != cid:
            raise Refused(CloseCode.FORBIDDEN, ErrorCode.FORBIDDEN, "the token is for another conversation")
        try:
            business = await gw.store.get_business(principal.business_id)
            conversation = await gw.store.get_conversation(principal.business_id, cid)
        except Unavailable:
            raise
        except CoreError as exc:
            raise Refused(
                CloseCode.UNAUTHORIZED, ErrorCode.UNAUTHORIZED, f"{exc.message}: request a new session"
            ) from None
        connection.check_origin(business)
        role = cls(connection, business, cid)
        connection.role = role
        subscription = Subscription(
            connection, gw, business.business_id, cid, view=View.USER, hold_limit=gw.settings.outbox_frames
        )
        connection.subscriptions[cid] = subscription
        connection.state = State.OPEN
        await subscription.open(conversation, hello.resume, role._welcome)
        await gw.presence.came(business.business_id, cid, connection.session_id)
        return role

    def _welcome(self, conversation: Conversation, position: StreamPosition, resumed: bool) -> dict[str, Any]:
        return {
            "type": "welcome",
            "session_id": self.connection.session_id,
            "conversation_id": self.conversation_id,
            "epoch": position.epoch,
            "seq": position.seq,
            "mode": conversation.mode.value,
            "stage": conversation.stage,
            "resumed": resumed,
            "protocol": PROTOCOL_VERSION,
        }

    async def handle(self, frame: ClientFrame) -> None:
        cid = self.conversation_id
        conversations = self.connection.gw.conversations
        if isinstance(frame, AgentAction):
            raise FrameError(ErrorCode.FORBIDDEN, f"{frame.type}: agents only")
        if isinstance(frame, Hello):
            raise FrameError(ErrorCode.BAD_FRAME, "hello: already said hello on this socket")
        if frame.conversation_id is not None and frame.conversation_id != cid:
            raise FrameError(ErrorCode.FORBIDDEN, "this socket belongs to another conversation")
        if isinstance(frame, SendMessage):
            ack = await conversations.post_user_message(self.business, cid, frame.client_msg_id, frame.text)
            self.connection.send(
                {
                    "type": "ack",
                    "client_msg_id": ack.client_msg_id,
                    "message_id": ack.message_id,
                    "seq": ack.seq,
                }
            )
        elif isinstance(frame, Typing):
            await conversations.set_typing(cid, Role.USER, frame.state, origin=self.connection.session_id)
        elif isinstance(frame, Stop):
            await conversations.stop(self.business, cid)

    async def close(self) -> None:
        gw = self.connection.gw
        await gw.presence.left(self.business.business_id, self.conversation_id, self.connection.session_id)
