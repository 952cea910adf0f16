"""EventLog: publishing a conversation's sequenced events, opening its log when needed.

A conversation's log in the broker exists from its first event until it expires or is lost (Redis
restarted empty). Every publisher goes through here, so a missing log is opened again after the
seqs the store recorded, in the mode the store recorded, and the publish is tried once more.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from core.broker import Broker, StreamMissing
from core.models import Conversation, Event, Message, StreamPosition
from core.store import Store
from core.types import BusinessId, ConversationId, EventType

T = TypeVar("T")

# What the business feed carries: enough for an agent console to follow every conversation (the
# deltas of answers are not in it: an agent watching one conversation subscribes to it).
FEED_EVENTS = frozenset(
    {EventType.MESSAGE, EventType.AI_START, EventType.AI_END, EventType.MODE, EventType.STAGE}
)


class EventLog:
    def __init__(self, store: Store, broker: Broker) -> None:
        self.store = store
        self.broker = broker

    async def publish(
        self,
        business_id: BusinessId,
        conversation_id: ConversationId,
        type: EventType,
        payload: dict[str, Any],
    ) -> Event:
        """Publish a sequenced event (feed-worthy ones also to the business feed)."""
        feed = business_id if type in FEED_EVENTS else None
        return await self.opened(
            business_id,
            conversation_id,
            lambda: self.broker.publish(conversation_id, type, payload, feed=feed),
        )

    async def opened(
        self, business_id: BusinessId, conversation_id: ConversationId, step: Callable[[], Awaitable[T]]
    ) -> T:
        """Run a broker step on the conversation's log; if the log does not exist, open it (after
        the store's last seq, in the store's mode) and run the step once more."""
        try:
            return await step()
        except StreamMissing:
            await self.open_stream(business_id, conversation_id)
            return await step()

    async def open_stream(
        self,
        business_id: BusinessId,
        conversation_id: ConversationId,
        conversation: Conversation | None = None,
    ) -> StreamPosition:
        """Make sure the conversation's event log exists (starting after the store's last seq, in
        its mode); return its position, recording a new epoch in the store."""
        if conversation is None:
            conversation = await self.store.get_conversation(business_id, conversation_id)
        position = await self.broker.open(
            conversation_id,
            floor_seq=conversation.last_seq,
            mode=conversation.mode,
            agent_id=conversation.agent_id,
        )
        if position.epoch != conversation.epoch:
            await self.store.set_epoch(business_id, conversation_id, position.epoch)
        return position

    async def publish_message(self, business_id: BusinessId, message: Message) -> int:
        """Publish a stored message's `message` event and record its seq on the row."""
        event = await self.publish(
            business_id, message.conversation_id, EventType.MESSAGE, message_payload(message)
        )
        assert event.seq is not None
        await self.store.set_message_seq(business_id, message.conversation_id, message.message_id, event.seq)
        return event.seq


def message_payload(message: Message) -> dict[str, Any]:
    """The fields of a `message` event (and of a message in history) for a stored message; an
    agent's message also names its author."""
    payload = {
        "message_id": message.message_id,
        "role": message.role.value,
        "text": message.text,
        "client_msg_id": message.client_msg_id,
        "created_at": message.created_at.isoformat(),
    }
    if message.author_id is not None:
        payload |= {"agent_id": message.author_id, "agent_name": message.author_name}
    return payload
