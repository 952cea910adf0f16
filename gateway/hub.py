"""Hub: this instance's local fan-out of conversation events to its sessions.

The broker delivers each event once to the hub; the hub encodes it once and hands the same text
to every local session of the conversation. Broker subscriptions are reference-counted: the
first local session of a conversation subscribes, the last one to leave unsubscribes. The same
holds for business feeds (the view of a whole business that agent sessions watch).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from core.broker import Broker
from core.keyed_lock import KeyedLock
from core.models import Event
from core.types import BusinessId, ConversationId, ResponseId
from gateway.protocol import encode, event_frame

# Event fields only agents receive: a stage event's extracted data (personal data of the user).
_PRIVATE = frozenset({"data"})


class View(enum.Enum):
    """How a member sees a conversation's events. Users: without the private fields. Agents: with
    them, and every frame names its conversation (one agent socket follows many)."""

    USER = "user"
    AGENT = "agent"


class Member(Protocol):
    session_id: str
    view: View

    def deliver(self, event: Event, frame: str) -> None:
        """Take one event; must not block (queue it)."""

    def resync(self) -> None:
        """Events may have been missed: check against the log. Must not block."""


class Hub:
    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._members: dict[ConversationId, set[Member]] = {}
        self._subscribed: set[ConversationId] = set()
        self._locks: KeyedLock[ConversationId] = KeyedLock()
        self._feed_members: dict[BusinessId, set[Member]] = {}
        self._feeds: set[BusinessId] = set()
        self._feed_locks: KeyedLock[BusinessId] = KeyedLock()
        self.on_flow_changed: Callable[[BusinessId], None] | None = None
        self.on_answer_ended: Callable[[ConversationId, ResponseId], None] | None = None
        broker.set_listener(self)

    async def join(self, conversation_id: ConversationId, member: Member) -> None:
        """Add a member; returns once the broker delivers the conversation's events here."""
        self._members.setdefault(conversation_id, set()).add(member)
        async with self._locks.hold(conversation_id):
            if conversation_id not in self._subscribed:
                await self._broker.subscribe(conversation_id)
                self._subscribed.add(conversation_id)

    async def join_feed(self, business_id: BusinessId, member: Member) -> None:
        """Add a member to the business feed; the first one subscribes this instance to it."""
        self._feed_members.setdefault(business_id, set()).add(member)
        async with self._feed_locks.hold(business_id):
            if business_id not in self._feeds:
                await self._broker.subscribe_feed(business_id)
                self._feeds.add(business_id)

    async def leave_feed(self, business_id: BusinessId, member: Member) -> None:
        """Remove a member from the business feed; the last one unsubscribes this instance."""
        members = self._feed_members.get(business_id)
        if members is None:
            return
        members.discard(member)
        async with self._feed_locks.hold(business_id):
            if self._feed_members.get(business_id):
                return
            self._feed_members.pop(business_id, None)
            if business_id in self._feeds:
                self._feeds.discard(business_id)
                await self._broker.unsubscribe_feed(business_id)

    def on_feed(self, business_id: BusinessId, event: Event) -> None:
        members = self._feed_members.get(business_id)
        if not members:
            return
        frame = encode(
            {"type": "feed", "conversation_id": event.conversation_id, "event": event_frame(event)}
        )
        for member in tuple(members):
            member.deliver(event, frame)

    async def leave(self, conversation_id: ConversationId, member: Member) -> None:
        members = self._members.get(conversation_id)
        if members is None:
            return
        members.discard(member)
        async with self._locks.hold(conversation_id):
            if self._members.get(conversation_id):
                return  # someone joined meanwhile
            self._members.pop(conversation_id, None)
            if conversation_id in self._subscribed:
                self._subscribed.discard(conversation_id)
                await self._broker.unsubscribe(conversation_id)

    def on_event(self, event: Event) -> None:
        members = self._members.get(event.conversation_id)
        if not members:
            return
        frames: dict[View, str] = {}  # each view encoded once, when a member needs it
        for member in tuple(members):
            if event.origin is not None and member.session_id == event.origin:
                continue
            frame = frames.get(member.view)
            if frame is None:
                frame = frames[member.view] = encode(view_frame(event, member.view))
            member.deliver(event, frame)

    def on_control(self, message: Mapping[str, Any]) -> None:
        kind = message.get("type")
        if kind == "flow_changed" and self.on_flow_changed is not None:
            self.on_flow_changed(BusinessId(str(message.get("business_id"))))
        elif kind == "answer_ended" and self.on_answer_ended is not None:
            cid, rid = message.get("conversation_id"), message.get("response_id")
            if isinstance(cid, str) and isinstance(rid, str):
                self.on_answer_ended(ConversationId(cid), ResponseId(rid))

    def on_gap(self, conversation_id: ConversationId) -> None:
        for member in tuple(self._members.get(conversation_id, ())):
            member.resync()


def view_frame(event: Event, view: View) -> dict[str, Any]:
    """The wire frame of a conversation event as a member with this view sees it."""
    frame = event_frame(event)
    if view is View.AGENT:
        frame["conversation_id"] = event.conversation_id
        return frame
    if _PRIVATE & frame.keys():
        return {k: v for k, v in frame.items() if k not in _PRIVATE}
    return frame
