"""The agent role: a human agent's connection to their business.

After `welcome` the agent gets a `snapshot` of the business's open conversations, then the live
business feed (`feed` frames: messages, answer starts and ends, mode and stage changes of every
conversation). `subscribe` follows one conversation with replay exactly as a widget does (every
frame names its conversation); `takeover`, `message`, `typing` and `handback` act on one.

Every conversation id an agent names is looked up within the agent's own business (from its
token, never from the frame): another business's conversation is `not_found`, exactly like one
that does not exist. A disabled agent's token stops working at its next hello or subscribe.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from core.broker import HeldByAgent
from core.errors import Forbidden, NotFound
from core.extraction import plain_values
from core.models import Agent, Business, Conversation, ConversationSummary, Event, StreamPosition
from core.types import ConversationId, Role
from gateway.auth import Principal, active_agent
from gateway.connection import Connection, Refused, State
from gateway.errors import Unauthorized
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
)
from gateway.subscription import Subscription

log = logging.getLogger(__name__)


class AgentRole:
    kind = "agent"

    def __init__(self, connection: Connection, business: Business, agent: Agent) -> None:
        self.connection = connection
        self.gw = connection.gw
        self.business = business
        self.agent_id = agent.agent_id
        self.session_id = connection.session_id
        self.view = View.AGENT
        self._feed_held: list[str] | None = []  # feed frames held back until the snapshot is out
        self._known: set[ConversationId] = set()  # conversations checked to be the business's

    @classmethod
    async def start(cls, connection: Connection, principal: Principal, hello: Hello) -> AgentRole:
        """Check the agent, send `welcome`, join the business feed, send the snapshot, go live."""
        gw = connection.gw
        if hello.conversation_id is not None or hello.resume is not None:
            raise Refused(
                CloseCode.UNAUTHORIZED,
                ErrorCode.BAD_FRAME,
                "an agent's hello names no conversation: subscribe to conversations after welcome",
            )
        agent = await _enabled_agent(connection, principal)
        business = await gw.store.get_business(principal.business_id)
        connection.check_origin(business, agent=True)
        role = cls(connection, business, agent)
        connection.role = role
        connection.state = State.OPEN
        gw.metrics.agent_connections.inc()
        connection.send(
            {
                "type": "welcome",
                "session_id": connection.session_id,
                "agent_id": agent.agent_id,
                "agent_name": agent.name,
                "business": business.public_id,
                "max_subscriptions": gw.settings.agent_max_subscriptions,
                "protocol": PROTOCOL_VERSION,
            }
        )
        await gw.hub.join_feed(business.business_id, role)
        summaries = await gw.store.list_open_conversations(
            business.business_id,
            active_within_s=gw.settings.snapshot_window_s,
            limit=gw.settings.snapshot_limit,
        )
        online = await gw.presence.online([s.conversation_id for s in summaries])
        items = [snapshot_item(s, s.conversation_id in online) for s in summaries]
        connection.send({"type": "snapshot", "conversations": items})
        held, role._feed_held = role._feed_held or [], None
        for frame in held:
            connection.enqueue("feed", frame)
        return role

    # -- the business feed (the hub calls these) -------------------------------------------------

    def deliver(self, event: Event, frame: str) -> None:
        if self._feed_held is not None:
            self._feed_held.append(frame)
            if len(self._feed_held) > self.gw.settings.outbox_frames:
                self.connection.overflow()
            return
        self.connection.enqueue("feed", frame)

    def resync(self) -> None:
        """The feed is a live view: nothing to fill (subscriptions fill their own gaps)."""

    async def close(self) -> None:
        self.gw.metrics.agent_connections.dec()
        await self.gw.hub.leave_feed(self.business.business_id, self)

    # -- frames ---------------------------------------------------------------------------------

    async def handle(self, frame: ClientFrame) -> None:
        if isinstance(frame, Hello):
            raise FrameError(ErrorCode.BAD_FRAME, "hello: already said hello on this socket")
        if isinstance(frame, Stop):
            raise FrameError(ErrorCode.FORBIDDEN, "stop: users only (an agent takes over instead)")
        if frame.conversation_id is None:
            kind = "message" if isinstance(frame, SendMessage) else "typing"
            raise FrameError(ErrorCode.BAD_FRAME, f"{kind}: an agent must name the conversation_id")
        cid = ConversationId(frame.conversation_id)
        if isinstance(frame, AgentAction):
            await self._action(frame, cid)
        elif isinstance(frame, SendMessage):
            await self._conversation(cid)
            ack = await self.gw.conversations.post_agent_message(
                self.business, cid, self.agent_id, frame.client_msg_id, frame.text
            )
            self.connection.send(
                {
                    "type": "ack",
                    "conversation_id": cid,
                    "client_msg_id": ack.client_msg_id,
                    "message_id": ack.message_id,
                    "seq": ack.seq,
                }
            )
        else:
            if cid not in self._known:
                await self._conversation(cid)
            await self.gw.conversations.set_typing(cid, Role.AGENT, frame.state, origin=self.session_id)

    async def _action(self, frame: AgentAction, cid: ConversationId) -> None:
        if frame.type == "subscribe":
            await self._subscribe(cid, frame)
        elif frame.type == "unsubscribe":
            subscription = self.connection.subscriptions.pop(cid, None)
            if subscription is not None:
                await subscription.close()
            self.connection.send({"type": "unsubscribed", "conversation_id": cid})
        elif frame.type == "takeover":
            await self._take_over(cid)
        elif frame.type == "handback":
            await self._conversation(cid)
            await self.gw.conversations.hand_back(self.business, cid, self.agent_id)
            self.gw.metrics.handbacks.labels(self.business.public_id).inc()

    async def _subscribe(self, cid: ConversationId, frame: AgentAction) -> None:
        await _enabled_agent(self.connection, self.connection.principal)
        subscriptions = self.connection.subscriptions
        limit = self.gw.settings.agent_max_subscriptions
        if cid not in subscriptions and len(subscriptions) >= limit:
            raise FrameError(
                ErrorCode.CONFLICT,
                f"subscribe: already following {limit} conversations (the most): unsubscribe first",
            )
        conversation = await self._conversation(cid)
        previous = subscriptions.pop(cid, None)
        if previous is not None:  # subscribing again (to resume after a reset, say) starts afresh
            await previous.close()
        subscription = Subscription(
            self.connection,
            self.gw,
            self.business.business_id,
            cid,
            view=View.AGENT,
            hold_limit=self.gw.settings.outbox_frames,
        )
        subscriptions[cid] = subscription
        await subscription.open(conversation, frame.resume, _subscribed)

    async def _take_over(self, cid: ConversationId) -> None:
        received = time.monotonic()
        await self._conversation(cid)
        try:
            outcome = await self.gw.conversations.take_over(self.business, cid, self.agent_id)
        except HeldByAgent as exc:
            raise FrameError(
                ErrorCode.CONFLICT, f"takeover: agent {exc.holder} holds this conversation"
            ) from None
        if outcome.changed:
            self.gw.metrics.takeovers.labels(self.business.public_id).inc()
        if outcome.ended is not None:
            self.gw.metrics.takeover_seconds.observe(outcome.published_at - received)

    async def _conversation(self, cid: ConversationId) -> Conversation:
        """The conversation, if it is the agent's business's (`not_found` otherwise, the same
        answer as for one that does not exist)."""
        try:
            conversation = await self.gw.store.get_conversation(self.business.business_id, cid)
        except NotFound:
            raise FrameError(ErrorCode.NOT_FOUND, f"conversation {cid} not found") from None
        self._known.add(cid)
        return conversation


async def _enabled_agent(connection: Connection, principal: Principal | None) -> Agent:
    """The token's agent, if it exists and is enabled; else the connection ends with 4401."""
    assert principal is not None
    try:
        return await active_agent(connection.gw.store, principal)
    except (Unauthorized, Forbidden) as exc:
        raise Refused(CloseCode.UNAUTHORIZED, ErrorCode.UNAUTHORIZED, exc.message) from None


def _subscribed(conversation: Conversation, position: StreamPosition, resumed: bool) -> dict[str, Any]:
    return {
        "type": "subscribed",
        "epoch": position.epoch,
        "seq": position.seq,
        "mode": conversation.mode.value,
        "agent_id": conversation.agent_id,
        "stage": conversation.stage,
        "data": plain_values(conversation.data),
        "extracted": dict(conversation.data),
        "resumed": resumed,
    }


def snapshot_item(summary: ConversationSummary, user_online: bool) -> dict[str, Any]:
    """One conversation in an agent's snapshot."""
    last = None
    if summary.last_message_role is not None:
        at = summary.last_message_at.isoformat() if summary.last_message_at is not None else None
        last = {"role": summary.last_message_role.value, "text": summary.last_message_text, "created_at": at}
    return {
        "conversation_id": summary.conversation_id,
        "mode": summary.mode.value,
        "agent_id": summary.agent_id,
        "stage": summary.stage,
        "streaming": summary.active_response_id is not None,
        "response_id": summary.active_response_id,
        "last_message": last,
        "user_online": user_online,
        "updated_at": summary.updated_at.isoformat(),
    }
