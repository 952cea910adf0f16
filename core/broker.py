"""The Broker interface: ordered fan-out of conversation events across instances, with replay.

Guarantees every implementation gives (the contract suite in tests/contract checks them):

- `publish` assigns the event's `seq` (the conversation's previous seq + 1), appends the event to
  the conversation's replay log and delivers it to every subscribed instance, as one atomic step:
  every instance sees one order, and seq has no gaps and no duplicates within an epoch.
- Delivery to the listener is at most once and in seq order per conversation, for conversations
  this instance subscribed to. A subscriber that needs every event (resume) subscribes first and
  then calls `replay`, dropping what it already has by seq.
- The replay log keeps a bounded window of the most recent events. `replay` returns None for the
  events when the window no longer reaches the asked seq: the client must reset.
- `epoch` names one unbroken life of a conversation's log. It changes when the log was lost, so
  that a client holding seqs from an older epoch is told to reset instead of seeing a gap.
- Seqs never go backwards across epochs: a log is created only by `open`, which starts it after
  the highest seq the store has durably recorded (`floor_seq`). `publish`, `replay` and
  `position` on a conversation whose log does not exist raise `StreamMissing`; the caller opens
  it (with the store's floor) and tries again.
- An answer ends once, and nothing of it follows its end. `ai_start` makes its `response_id` the
  conversation's active answer; a `delta` or `ai_end` whose `response_id` is not the active answer
  is refused with `AnswerEnded`, in the same atomic step that would assign its seq; `ai_end` clears
  it. Whoever ends an answer first (its owner, a stop, a takeover, a lease sweep) wins; every later
  delta or ai_end of it is refused, on every instance.
- One answer at a time: an `ai_start` while another answer is active is refused with `AnswerBusy`
  (no seq taken), so that no answer is left open by a second one. The caller waits until the
  active answer ends (its owner ends it, or the lease sweep does when its owner died) and tries
  again.
- An answer whose log was lost (Redis restarted empty) is still ended by its owner:
  `end_lost_answer` publishes its `ai_end` in the conversation's new log, atomically with the
  check that the log is not the one the answer started in.
- The broker keeps the text of the active answer (its deltas joined), so that anyone can end it:
  `end_answer` publishes the answer's `ai_end` with that text, atomically with the claim. The
  owner ends its answers this way too, so `ai_end.text` is always exactly the deltas joined.
- Answer leases: the instance generating an answer holds a lease on it and renews it; a lease not
  renewed in time expires, and `claim_expired_leases` hands each expired lease to exactly one
  caller (across instances), who ends the answer as `interrupted`. `renew_leases` renews all of
  an instance's leases in one step (one round trip), and never takes back a lease that was
  dropped or claimed: it returns those, so the owner knows its answer was ended elsewhere.
- The broker holds the conversation's mode (`ai`, or `human` with the agent holding it), so that
  a takeover is one atomic step with the answer guard: `take_over` ends the active answer with
  status `taken_over` (its `ai_end`, with the text streamed so far), sets the mode to `human` and
  publishes `mode`, all at once. While the mode is `human`, every `ai_start` is refused with
  `HumanMode` in the step that would assign its seq, so no queued answer starts after a takeover;
  the deltas and `ai_end` of the answer it ended are refused like those of any ended answer.
  `hand_back` sets the mode back to `ai` and publishes `mode`, atomically too. A log is opened
  with the mode the store recorded, so a log that was lost comes back in the right mode.
- Ephemeral events (`publish_ephemeral`, and `publish_feed` for the business feed alone) have no
  seq, are not logged and may be dropped.
- Presence: which conversations have their end user connected, across instances. A member (one
  user socket) is present from `set_presence(..., True)` until `set_presence(..., False)` or until
  its instance stops renewing it (`renew_presence`) for `presence_ttl` seconds.
- The listener is called from the broker's own task and must not block: hand events on at once.
  After a loss of connection, the listener is told (`on_gap`) for every subscribed conversation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from core.errors import CoreError
from core.models import Event, Replay, StreamPosition
from core.types import AgentId, AnswerStatus, BusinessId, ConversationId, EventType, Mode, ResponseId


class Listener(Protocol):
    """Receives the events of the conversations this instance subscribed to. Called from the
    broker's own task: must not block (hand events on at once)."""

    def on_event(self, event: Event) -> None: ...

    def on_gap(self, conversation_id: ConversationId) -> None:
        """Events of this conversation may have been missed (this instance was cut off from the
        broker and is back): whoever delivers them must check against the log (`replay`)."""

    def on_control(self, message: Mapping[str, Any]) -> None:
        """A control message for every instance (for example: a business's flow changed)."""

    def on_feed(self, business_id: BusinessId, event: Event) -> None:
        """An event of one of the business's conversations, on the business feed (agents watch
        a whole business through it)."""


@dataclass(frozen=True, slots=True)
class AnswerLease:
    """Which answer a lease is on, and whose (the business, for storing it when it is swept)."""

    business_id: BusinessId
    conversation_id: ConversationId
    response_id: ResponseId


class AnswerEnded(CoreError):
    """The answer this event belongs to is not (any more) the conversation's active answer."""

    code = "conflict"


class AnswerBusy(CoreError):
    """An `ai_start` was refused: another answer of the conversation has not ended yet."""

    code = "conflict"


class HumanMode(CoreError):
    """An `ai_start` was refused: a human agent holds the conversation."""

    code = "conflict"


class HeldByAgent(CoreError):
    """A takeover was refused: another agent holds the conversation."""

    code = "conflict"

    def __init__(self, message: str, *, holder: AgentId | None) -> None:
        super().__init__(message)
        self.holder = holder


class NotHuman(CoreError):
    """A handback was refused: the AI already answers in this conversation."""

    code = "conflict"


@dataclass(frozen=True, slots=True)
class Takeover:
    """What a takeover did: the `ai_end` of the answer it ended (None when none streamed) and the
    `mode` event (None when the agent already held the conversation: nothing changed)."""

    ended: Event | None
    mode: Event | None


class StreamMissing(CoreError):
    """The conversation's event log does not exist (never opened, or lost): `open` it first."""

    code = "unavailable"


class Broker(Protocol):
    async def connect(self) -> None:
        """Open connections and start background loops. Call once, from the lifespan."""

    async def close(self) -> None:
        """Stop background loops and release connections. Safe to call twice."""

    async def ping(self) -> None:
        """Return when the broker answers; raise `Unavailable` otherwise."""

    def set_listener(self, listener: Listener) -> None:
        """Set the one listener that receives events of subscribed conversations."""

    async def subscribe(self, conversation_id: ConversationId) -> None:
        """Start receiving the conversation's events. Returns once delivery is in force."""

    async def unsubscribe(self, conversation_id: ConversationId) -> None:
        """Stop receiving the conversation's events."""

    async def subscribe_feed(self, business_id: BusinessId) -> None:
        """Start receiving the business feed: the events published with `feed=` that business
        (messages, answer starts and ends, mode and stage changes of all its conversations)."""

    async def unsubscribe_feed(self, business_id: BusinessId) -> None:
        """Stop receiving the business feed."""

    async def publish(
        self,
        conversation_id: ConversationId,
        type: EventType,
        payload: Mapping[str, Any],
        *,
        feed: BusinessId | None = None,
    ) -> Event:
        """Assign seq, log and deliver the event atomically; return it with its seq. With `feed`,
        the event also goes to that business's feed."""

    async def publish_control(self, message: Mapping[str, Any]) -> None:
        """Deliver a small JSON message to every instance's listener (this one included), at most
        once, unordered with conversation events."""

    async def publish_ephemeral(
        self,
        conversation_id: ConversationId,
        type: EventType,
        payload: Mapping[str, Any],
        *,
        origin: str | None = None,
    ) -> None:
        """Deliver an event without seq or log (typing indicators)."""

    async def publish_feed(
        self,
        business_id: BusinessId,
        conversation_id: ConversationId,
        type: EventType,
        payload: Mapping[str, Any],
    ) -> None:
        """Deliver an ephemeral event to the business feed only (no seq, not logged)."""

    async def set_presence(self, conversation_id: ConversationId, member: str, present: bool) -> bool:
        """Add or remove one present member of the conversation (a user socket). True when this
        changed whether the conversation has anyone present (the first came, the last left)."""

    async def renew_presence(self, members: Mapping[str, ConversationId]) -> None:
        """Keep these members (member -> conversation) present for another `presence_ttl`."""

    async def present(self, conversation_ids: list[ConversationId]) -> set[ConversationId]:
        """Which of these conversations have a present member."""

    async def open(
        self,
        conversation_id: ConversationId,
        *,
        floor_seq: int,
        mode: Mode = Mode.AI,
        agent_id: AgentId | None = None,
    ) -> StreamPosition:
        """Make sure the conversation's log exists, creating it (new epoch, seq = floor_seq, the
        given mode) if it does not; return its position. Idempotent: an existing log is left as
        it is."""

    async def take_over(
        self, conversation_id: ConversationId, agent_id: AgentId, *, feed: BusinessId | None = None
    ) -> Takeover:
        """Atomically: end the active answer (if any) as `taken_over` and publish its `ai_end`, set
        the mode to `human` held by `agent_id` and publish `mode`. Idempotent for the agent that
        already holds it (nothing published); `HeldByAgent` when another agent holds it."""

    async def hand_back(
        self, conversation_id: ConversationId, *, feed: BusinessId | None = None
    ) -> tuple[Event, AgentId | None]:
        """Atomically set the mode back to `ai` and publish `mode`; return the event and the agent
        that held it. `NotHuman` when the mode is `ai` already."""

    async def end_answer(
        self,
        conversation_id: ConversationId,
        status: AnswerStatus,
        *,
        response_id: ResponseId | None = None,
        feed: BusinessId | None = None,
    ) -> Event | None:
        """End the active answer (`response_id`, or whichever is active): publish its `ai_end`
        (`response_id`, `message_id` = the response id, `status`, `text` = its deltas joined) as
        one atomic step with the claim. None when there is no such active answer any more."""

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
        """End an answer that started in the log of epoch `started_epoch` and was not ended there.
        If the conversation's log is now another one (the old one was lost), publish the answer's
        `ai_end` (`response_id`, `message_id` = the response id, `status`, `text`) in it and return
        it; the new log's active answer, if any, is left as it is. None when the log is still the
        one the answer started in (there it is ended through `end_answer`, or was ended already).
        `StreamMissing` when the conversation has no log."""

    async def hold_lease(self, lease: AnswerLease, ttl: float) -> None:
        """Take or renew the lease on an answer for `ttl` seconds from now."""

    async def renew_leases(self, leases: Sequence[AnswerLease], ttl: float) -> list[AnswerLease]:
        """Renew every lease in `leases` that is still held for `ttl` seconds from now, as one
        step (one round trip); return the ones not held any more (dropped, or expired and
        claimed), which are not taken again."""

    async def drop_lease(self, lease: AnswerLease) -> None:
        """Give the lease up (the answer ended)."""

    async def claim_expired_leases(self, limit: int) -> list[AnswerLease]:
        """Remove and return up to `limit` expired leases; each goes to exactly one caller."""

    async def replay(self, conversation_id: ConversationId, after_seq: int) -> Replay:
        """The events after `after_seq` still in the window, in order (see `Replay`).

        `after_seq` beyond the latest seq also gives `events` None."""
