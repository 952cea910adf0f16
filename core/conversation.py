"""ConversationService: what users and agents do to a conversation.

The gateway calls it; it calls the Store, the Broker (through the `EventLog`) and, for the AI's
answers, the `AnswerRunner`. A user's message is stored, published and answered when the AI is in
charge; an agent takes over (the answer streaming now ends `taken_over`, wherever it runs), writes
to the user, and hands back. Every agent action is audited.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from core.answers import FAILED_NOTICE, AnswerRunner, CoreSettings
from core.broker import Broker, NotHuman, StreamMissing
from core.ended_answers import EndedAnswer
from core.errors import Conflict, CoreError, Overloaded
from core.event_log import EventLog, message_payload
from core.flow_cache import FlowCache
from core.keyed_lock import KeyedLock
from core.llm import LLMProvider
from core.models import Agent, AuditEntry, Business, Conversation
from core.observer import NullObserver, Observer
from core.pipeline import Pipeline
from core.rules import check_client_msg_id, check_message_text, should_answer
from core.store import Store
from core.types import (
    AgentId,
    AnswerStatus,
    BusinessId,
    ConversationId,
    EventType,
    MessageId,
    Mode,
    ResponseId,
    Role,
)

__all__ = [
    "FAILED_NOTICE",
    "Ack",
    "ConversationService",
    "CoreSettings",
    "TakeoverOutcome",
    "message_payload",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Ack:
    client_msg_id: str
    message_id: MessageId
    seq: int
    duplicate: bool


@dataclass(frozen=True, slots=True)
class TakeoverOutcome:
    """What a takeover did: the answer it ended (None when none streamed) and whether the mode
    changed (False: this agent held the conversation already)."""

    ended: EndedAnswer | None
    changed: bool
    published_at: float = 0.0
    """time.monotonic() when the broker step (the ai_end and mode publish) returned."""


class ConversationService:
    def __init__(
        self,
        *,
        store: Store,
        broker: Broker,
        llm: LLMProvider,
        observer: Observer | None = None,
        settings: CoreSettings | None = None,
        flows: FlowCache | None = None,
    ) -> None:
        self.store = store
        self.broker = broker
        self.llm = llm
        self.observer: Observer = observer or NullObserver()
        self.settings = settings or CoreSettings()
        self.flows = flows or FlowCache(store, self.observer)
        self.pipeline = Pipeline(llm, self.observer)
        self.events = EventLog(store, broker)
        self.answers = AnswerRunner(
            events=self.events,
            llm=llm,
            observer=self.observer,
            settings=self.settings,
            flows=self.flows,
            pipeline=self.pipeline,
        )
        self._locks: KeyedLock[ConversationId] = KeyedLock()
        self.open_stream = self.events.open_stream

    # -- users ----------------------------------------------------------------------------------

    async def post_user_message(
        self, business: Business, conversation_id: ConversationId, client_msg_id: str, text: str
    ) -> Ack:
        """Store the message (idempotently), publish it, and start an answer if one is due.

        Returns once the message is durable and published: the caller may acknowledge it.
        A resend with the same `client_msg_id` returns the same ack and starts nothing.

        Raises `Overloaded` (nothing stored) when the AI answers the conversation and this
        instance already answers as many conversations as it may (`max_active_answers`): the
        client sends it again after the error's `retry_after_ms`.
        """
        reserved = False

        def admit(conversation: Conversation) -> None:
            nonlocal reserved
            if should_answer(conversation.mode):
                try:
                    self.answers.reserve(conversation_id)
                except Overloaded:
                    self.observer.message_processed("refused_overloaded")
                    raise
                reserved = True

        try:
            conversation, ack = await self._post(
                business, conversation_id, client_msg_id, text, Role.USER, admit=admit
            )
            if ack.duplicate:
                self.observer.message_processed("duplicate")
                return ack
            # The broker, not the store, decides whether an answer may start (it refuses
            # `ai_start` while an agent holds the conversation): the store's mode can lag a
            # takeover or handback made a moment ago on another instance. So an answer is always
            # tried.
            self.answers.schedule(business, conversation_id)
        finally:
            if reserved:
                self.answers.release(conversation_id)
        self.observer.message_processed("answered" if should_answer(conversation.mode) else "stored")
        return ack

    async def stop(self, business: Business, conversation_id: ConversationId) -> bool:
        """The user's stop: end the conversation's answer with status `stopped`, wherever it is
        being generated. Returns False when no answer was streaming.

        Here, the model is cancelled at once and the answer ends itself. Elsewhere, the answer is
        ended through the broker and its owner told to close its model stream (see `Broker`: an
        answer ends once)."""
        stopped_here = self.answers.stop_local(conversation_id, AnswerStatus.STOPPED)
        if stopped_here and self.answers.started_here(conversation_id):
            return True
        # Not started here (or still waiting for the answer streaming now to end: that one is
        # what the user sees and stops).
        bid = business.business_id
        try:
            event = await self.broker.end_answer(conversation_id, AnswerStatus.STOPPED, feed=bid)
        except StreamMissing:
            return stopped_here
        if event is None:
            return stopped_here
        ended = EndedAnswer.from_event(bid, event)
        await self._ended_elsewhere(ended)
        return True

    def stop_answer(self, conversation_id: ConversationId) -> bool:
        """End the answer streaming for this conversation on this instance with status `stopped`;
        messages queued behind it are not answered. False when no answer runs here."""
        return self.answers.stop_local(conversation_id, AnswerStatus.STOPPED)

    async def set_typing(
        self, conversation_id: ConversationId, role: Role, state: bool, *, origin: str | None
    ) -> None:
        await self.broker.publish_ephemeral(
            conversation_id, EventType.TYPING, {"role": role.value, "state": state}, origin=origin
        )

    # -- agents ---------------------------------------------------------------------------------

    async def take_over(
        self, business: Business, conversation_id: ConversationId, agent_id: AgentId
    ) -> TakeoverOutcome:
        """The agent takes the conversation: the answer streaming now (on any instance) ends as
        `taken_over` with the text streamed so far, and no AI answer starts until a handback.
        Idempotent for the agent holding it; `HeldByAgent` (conflict) when another agent does."""
        bid = business.business_id
        await self.store.get_conversation(bid, conversation_id)  # NotFound for another business
        done = await self.events.opened(
            bid, conversation_id, lambda: self.broker.take_over(conversation_id, agent_id, feed=bid)
        )
        published_at = time.monotonic()
        if done.mode is None:
            return TakeoverOutcome(None, changed=False, published_at=published_at)
        ended = EndedAnswer.from_event(bid, done.ended) if done.ended is not None else None
        if ended is not None:
            await self._ended_elsewhere(ended)
        await self.store.set_mode(bid, conversation_id, Mode.HUMAN, agent_id)
        data: dict[str, object] = {"response_id": None, "chars_streamed": 0}
        if ended is not None:
            data = {"response_id": ended.response_id, "chars_streamed": len(ended.text)}
        await self._audit(bid, agent_id, "conversation.takeover", conversation_id, data)
        return TakeoverOutcome(ended, changed=True, published_at=published_at)

    async def hand_back(self, business: Business, conversation_id: ConversationId, agent_id: AgentId) -> bool:
        """Give the conversation back to the AI. If the user's last message is still unanswered,
        an answer starts at once (its prompt holds the agent's messages as what was said to the
        user). `NotHuman` (conflict) when the AI already answers. Returns whether an answer started."""
        bid = business.business_id
        await self.store.get_conversation(bid, conversation_id)
        event, holder = await self.events.opened(
            bid, conversation_id, lambda: self.broker.hand_back(conversation_id, feed=bid)
        )
        await self.store.set_mode(bid, conversation_id, Mode.AI, None)
        await self._audit(bid, agent_id, "conversation.handback", conversation_id, {"held_by": holder})
        # Only what was said before the handback counts: a message published after it is answered
        # by whoever took it (answering it here too would answer it twice).
        recent = await self.store.recent_messages(bid, conversation_id, limit=10)
        before = [m for m in recent if m.seq is not None and event.seq is not None and m.seq < event.seq]
        if before and max(before, key=lambda m: m.seq or 0).role is Role.USER:
            self.answers.schedule(business, conversation_id)
            return True
        return False

    async def post_agent_message(
        self,
        business: Business,
        conversation_id: ConversationId,
        agent_id: AgentId,
        client_msg_id: str,
        text: str,
    ) -> Ack:
        """The holding agent's message to the user: stored idempotently, published with role
        `agent`, audited. `Conflict` unless this agent holds the conversation."""
        bid = business.business_id
        conversation = await self.store.get_conversation(bid, conversation_id)
        if conversation.mode is not Mode.HUMAN:
            raise NotHuman("the AI answers in this conversation: take it over before writing")
        if conversation.agent_id != agent_id:
            raise Conflict(f"agent {conversation.agent_id} holds this conversation")
        author = await self.store.get_agent(bid, agent_id)
        _, ack = await self._post(business, conversation_id, client_msg_id, text, Role.AGENT, author)
        if not ack.duplicate:
            data = {"message_id": ack.message_id, "chars": len(text)}
            await self._audit(bid, agent_id, "agent.message", conversation_id, data)
        return ack

    # -- lifecycle ------------------------------------------------------------------------------

    def on_answer_ended(self, conversation_id: ConversationId, response_id: ResponseId) -> None:
        """Another instance ended an answer (a control message): stop it here if it runs here."""
        self.answers.ended_elsewhere(conversation_id, response_id)

    def start(self) -> None:
        self.answers.start()

    async def drain(self, *, grace: float) -> None:
        await self.answers.drain(grace=grace)

    async def aclose(self, *, grace: float = 5.0) -> None:
        await self.answers.aclose(grace=grace)

    def answering(self, conversation_id: ConversationId) -> bool:
        return self.answers.answering(conversation_id)

    # -- internals ------------------------------------------------------------------------------

    async def _post(
        self,
        business: Business,
        conversation_id: ConversationId,
        client_msg_id: str,
        text: str,
        role: Role,
        author: Agent | None = None,
        *,
        admit: Callable[[Conversation], None] | None = None,
    ) -> tuple[Conversation, Ack]:
        """Store and publish the message; `admit` (which may raise) sees the conversation first,
        before anything is stored."""
        check_client_msg_id(client_msg_id)
        check_message_text(text, max_chars=self.settings.max_message_chars)
        bid = business.business_id
        async with self._locks.hold(conversation_id):
            conversation = await self.store.get_conversation(bid, conversation_id)
            if admit is not None:
                admit(conversation)
            message, created = await self.store.add_user_message(
                bid, conversation_id, client_msg_id, text, role=role, author=author
            )
            seq = message.seq
            if seq is None:  # new, or stored by an earlier attempt whose publish failed
                seq = await self.events.publish_message(bid, message)
        # A row that existed but had no seq was stored by an attempt that never got to publish it
        # (the store failed, or its answer to that attempt was lost): it is new to everyone else.
        duplicate = not created and message.seq is not None
        return conversation, Ack(client_msg_id, message.message_id, seq, duplicate=duplicate)

    async def _ended_elsewhere(self, ended: EndedAnswer) -> None:
        """This instance ended an answer through the broker that may run on another instance:
        stop it here if it runs here, tell every instance (its owner closes the model stream at
        once), and store it."""
        self.answers.ended_elsewhere(ended.conversation_id, ended.response_id)
        try:
            await self.broker.publish_control(
                {
                    "type": "answer_ended",
                    "conversation_id": ended.conversation_id,
                    "response_id": ended.response_id,
                }
            )
        except CoreError as exc:  # the owner still finds its next delta refused
            log.warning("telling the owner of an ended answer failed: %s", exc.message)
        self.observer.answer_ended(ended.status)
        await self.answers.store_ended(ended)

    async def _audit(
        self, bid: BusinessId, agent_id: AgentId, action: str, cid: ConversationId, data: dict[str, object]
    ) -> None:
        entry = AuditEntry("agent", action, data, actor_id=agent_id, conversation_id=cid)
        try:
            await self.store.add_audit(bid, entry)
        except CoreError as exc:  # the action happened; a lost audit row is logged, not undone
            log.error("audit of %s failed: %s", action, exc.message, extra={"conversation_id": cid})
            self.observer.error(exc.code)
