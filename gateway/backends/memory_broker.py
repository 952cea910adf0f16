"""MemoryBroker: the embedded default Broker, for one process.

A real implementation of the Broker contract (see core.broker), not a mock: per-conversation
seq, an epoch per log, a bounded replay window and an atomic publish. Atomicity comes from the
event loop: `publish` assigns the seq, appends and delivers without awaiting in between.

Memory is bounded twice: each log keeps at most `replay_window` events, and at most
`max_conversations` logs are kept, the least recently used dropped first (its conversation gets
a new epoch, starting from the store's floor, when it is opened again, so its clients are told to
reset rather than shown a gap).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from core.broker import (
    AnswerBusy,
    AnswerEnded,
    AnswerLease,
    HeldByAgent,
    HumanMode,
    Listener,
    NotHuman,
    StreamMissing,
    Takeover,
)
from core.models import Event, Replay, StreamPosition
from core.types import (
    AgentId,
    AnswerStatus,
    BusinessId,
    ConversationId,
    EventType,
    Mode,
    ResponseId,
    new_id,
)

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Log:
    epoch: str
    window: int
    seq: int = 0
    active: str | None = None  # response_id of the answer being streamed
    answer: list[str] = field(default_factory=list)  # its deltas' texts
    mode: Mode = Mode.AI
    agent_id: AgentId | None = None  # who holds it while the mode is human
    # Each event as one flat tuple (seq, type's value, key, value, key, value, ...): the garbage
    # collector stops tracking a tuple of strings and numbers, so its full collections do not walk
    # the replay window of every conversation (up to `replay_window` x `max_conversations`
    # events; bench/README.md, "Garbage collection").
    events: deque[tuple[Any, ...]] = field(init=False)

    def __post_init__(self) -> None:
        self.events = deque(maxlen=self.window)


class MemoryBroker:
    def __init__(self, *, replay_window: int = 1000, max_conversations: int = 10_000) -> None:
        if replay_window < 1 or max_conversations < 1:
            raise ValueError("replay_window and max_conversations must be >= 1")
        self._window = replay_window
        self._max_conversations = max_conversations
        self._logs: OrderedDict[ConversationId, _Log] = OrderedDict()
        self._subscribed: set[ConversationId] = set()
        self._listener: Listener | None = None
        self._leases: dict[AnswerLease, float] = {}
        self._feeds: set[BusinessId] = set()
        self._present: dict[ConversationId, set[str]] = {}

    async def connect(self) -> None:
        pass

    async def close(self) -> None:
        self._subscribed.clear()

    async def ping(self) -> None:
        pass

    def set_listener(self, listener: Listener) -> None:
        self._listener = listener

    async def subscribe(self, conversation_id: ConversationId) -> None:
        self._subscribed.add(conversation_id)

    async def unsubscribe(self, conversation_id: ConversationId) -> None:
        self._subscribed.discard(conversation_id)

    async def subscribe_feed(self, business_id: BusinessId) -> None:
        self._feeds.add(business_id)

    async def unsubscribe_feed(self, business_id: BusinessId) -> None:
        self._feeds.discard(business_id)

    async def publish(
        self,
        conversation_id: ConversationId,
        type: EventType,
        payload: Mapping[str, Any],
        *,
        feed: BusinessId | None = None,
    ) -> Event:
        stream = self._existing(conversation_id)
        if type is EventType.AI_START and stream.mode is Mode.HUMAN:
            raise HumanMode(f"agent {stream.agent_id} holds conversation {conversation_id}: no AI answer")
        stream.active = answer_guard(type, payload, stream.active)
        if type is EventType.AI_START:
            stream.answer = []
        elif type is EventType.DELTA:
            stream.answer.append(str(payload["text"]))
        return self._append(stream, conversation_id, type, payload, feed)

    async def end_answer(
        self,
        conversation_id: ConversationId,
        status: AnswerStatus,
        *,
        response_id: ResponseId | None = None,
        feed: BusinessId | None = None,
    ) -> Event | None:
        stream = self._existing(conversation_id)
        active = stream.active
        if active is None or (response_id is not None and response_id != active):
            return None
        return self._end(stream, conversation_id, status, feed)

    async def end_lost_answer(
        self,
        conversation_id: ConversationId,
        *,
        started_epoch: str,
        response_id: ResponseId,
        status: AnswerStatus,
        text: str,
        feed: BusinessId | None = None,
    ) -> Event | None:
        stream = self._existing(conversation_id)
        if stream.epoch == started_epoch:
            return None
        payload = {
            "response_id": response_id,
            "message_id": response_id,
            "status": status.value,
            "text": text,
        }
        return self._append(stream, conversation_id, EventType.AI_END, payload, feed)

    def _end(
        self, stream: _Log, conversation_id: ConversationId, status: AnswerStatus, feed: BusinessId | None
    ) -> Event:
        active = stream.active
        text, stream.active, stream.answer = "".join(stream.answer), None, []
        payload = {"response_id": active, "message_id": active, "status": status.value, "text": text}
        return self._append(stream, conversation_id, EventType.AI_END, payload, feed)

    async def take_over(
        self, conversation_id: ConversationId, agent_id: AgentId, *, feed: BusinessId | None = None
    ) -> Takeover:
        # One critical section: nothing below awaits, so no publish can come in between.
        stream = self._existing(conversation_id)
        if stream.mode is Mode.HUMAN:
            if stream.agent_id == agent_id:
                return Takeover(None, None)
            raise HeldByAgent(f"agent {stream.agent_id} holds this conversation", holder=stream.agent_id)
        ended = None
        if stream.active is not None:
            ended = self._end(stream, conversation_id, AnswerStatus.TAKEN_OVER, feed)
        stream.mode, stream.agent_id = Mode.HUMAN, agent_id
        payload = {"mode": Mode.HUMAN.value, "agent_id": agent_id}
        return Takeover(ended, self._append(stream, conversation_id, EventType.MODE, payload, feed))

    async def hand_back(
        self, conversation_id: ConversationId, *, feed: BusinessId | None = None
    ) -> tuple[Event, AgentId | None]:
        stream = self._existing(conversation_id)
        if stream.mode is not Mode.HUMAN:
            raise NotHuman("the AI already answers in this conversation")
        holder, stream.mode, stream.agent_id = stream.agent_id, Mode.AI, None
        payload = {"mode": Mode.AI.value, "agent_id": None}
        return self._append(stream, conversation_id, EventType.MODE, payload, feed), holder

    async def hold_lease(self, lease: AnswerLease, ttl: float) -> None:
        self._leases[lease] = time.monotonic() + ttl

    async def renew_leases(self, leases: Sequence[AnswerLease], ttl: float) -> list[AnswerLease]:
        deadline = time.monotonic() + ttl
        lost = []
        for lease in leases:
            if lease in self._leases:
                self._leases[lease] = deadline
            else:
                lost.append(lease)
        return lost

    async def drop_lease(self, lease: AnswerLease) -> None:
        self._leases.pop(lease, None)

    async def claim_expired_leases(self, limit: int) -> list[AnswerLease]:
        now = time.monotonic()
        expired = [lease for lease, deadline in self._leases.items() if deadline <= now][:limit]
        for lease in expired:
            del self._leases[lease]
        return expired

    def _append(
        self,
        stream: _Log,
        conversation_id: ConversationId,
        type: EventType,
        payload: Mapping[str, Any],
        feed: BusinessId | None,
    ) -> Event:
        stream.seq += 1
        kept = dict(payload)
        event = Event(conversation_id, type, stream.seq, kept, epoch=stream.epoch)
        stream.events.append((stream.seq, type.value, *itertools.chain.from_iterable(kept.items())))
        self._deliver(event)
        if feed is not None and feed in self._feeds and self._listener is not None:
            try:
                self._listener.on_feed(feed, event)
            except Exception:
                log.exception("feed listener failed")
        return event

    async def publish_control(self, message: Mapping[str, Any]) -> None:
        if self._listener is not None:
            self._listener.on_control(dict(message))

    async def publish_ephemeral(
        self,
        conversation_id: ConversationId,
        type: EventType,
        payload: Mapping[str, Any],
        *,
        origin: str | None = None,
    ) -> None:
        self._deliver(Event(conversation_id, type, None, dict(payload), origin))

    async def publish_feed(
        self,
        business_id: BusinessId,
        conversation_id: ConversationId,
        type: EventType,
        payload: Mapping[str, Any],
    ) -> None:
        if business_id in self._feeds and self._listener is not None:
            try:
                self._listener.on_feed(business_id, Event(conversation_id, type, None, dict(payload)))
            except Exception:
                log.exception("feed listener failed")

    async def set_presence(self, conversation_id: ConversationId, member: str, present: bool) -> bool:
        members = self._present.get(conversation_id)
        if present:
            if members is None:
                members = self._present[conversation_id] = set()
            members.add(member)
            return len(members) == 1
        if members is None or member not in members:
            return False
        members.discard(member)
        if members:
            return False
        del self._present[conversation_id]
        return True

    async def renew_presence(self, members: Mapping[str, ConversationId]) -> None:
        pass  # one process: members leave only through set_presence

    async def present(self, conversation_ids: list[ConversationId]) -> set[ConversationId]:
        return {cid for cid in conversation_ids if cid in self._present}

    async def open(
        self,
        conversation_id: ConversationId,
        *,
        floor_seq: int,
        mode: Mode = Mode.AI,
        agent_id: AgentId | None = None,
    ) -> StreamPosition:
        stream = self._logs.get(conversation_id)
        if stream is None:
            stream = _Log(epoch=new_id()[:8], window=self._window, seq=max(floor_seq, 0), mode=mode)
            stream.agent_id = agent_id if mode is Mode.HUMAN else None
            self._logs[conversation_id] = stream
            while len(self._logs) > self._max_conversations:
                self._logs.popitem(last=False)
        return StreamPosition(stream.epoch, stream.seq)

    async def replay(self, conversation_id: ConversationId, after_seq: int) -> Replay:
        stream = self._existing(conversation_id)
        position = StreamPosition(stream.epoch, stream.seq)
        oldest = stream.events[0][0] if stream.events else stream.seq + 1
        if after_seq + 1 < oldest or after_seq > stream.seq:
            return Replay(position, None)
        return Replay(
            position,
            tuple(
                Event(
                    conversation_id,
                    EventType(kept[1]),
                    kept[0],
                    dict(zip(kept[2::2], kept[3::2], strict=True)),
                    epoch=stream.epoch,
                )
                for kept in stream.events
                if kept[0] > after_seq
            ),
        )

    def _existing(self, conversation_id: ConversationId) -> _Log:
        stream = self._logs.get(conversation_id)
        if stream is None:
            raise StreamMissing(f"no event log for conversation {conversation_id}")
        self._logs.move_to_end(conversation_id)
        return stream

    def _deliver(self, event: Event) -> None:
        if self._listener is None or event.conversation_id not in self._subscribed:
            return
        try:
            self._listener.on_event(event)
        except Exception:  # a listener bug must not fail the publisher
            log.exception("event listener failed", extra={"conversation_id": event.conversation_id})


def answer_guard(type: EventType, payload: Mapping[str, Any], active: str | None) -> str | None:
    """The active answer after this event, or `AnswerEnded` if the event must be refused."""
    if type is EventType.AI_START:
        if active is not None:
            raise AnswerBusy(f"answer {active} has not ended yet")
        return str(payload["response_id"])
    if type in (EventType.DELTA, EventType.AI_END):
        if active is None or payload.get("response_id") != active:
            raise AnswerEnded(f"answer {payload.get('response_id')} has ended")
        return active if type is EventType.DELTA else None
    return active
