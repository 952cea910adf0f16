"""ConversationService: one user turn, from a stored message to a streamed, stored answer.

The gateway calls it; it calls the Store, the Broker and the LLM provider. It owns the answer
tasks of the conversations whose messages reached this instance: one answer at a time per
conversation; a message that arrives while an answer streams is answered after it, together
with any other message that arrived meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from core.broker import AnswerEnded, AnswerLease, Broker, StreamMissing
from core.delta_pump import DeltaPump
from core.errors import CoreError
from core.extraction import plain_values
from core.flow_cache import FlowCache
from core.keyed_lock import KeyedLock
from core.llm import ChatMessage, LLMProvider, Usage
from core.models import Business, Conversation, Event, Message, StreamPosition
from core.observer import NullObserver, Observer
from core.pipeline import Pipeline
from core.rules import check_client_msg_id, check_message_text, should_answer
from core.store import Store
from core.types import (
    AnswerStatus,
    BusinessId,
    ConversationId,
    EventType,
    MessageId,
    ResponseId,
    Role,
    StageName,
    new_id,
)

log = logging.getLogger(__name__)


# What the business feed carries: enough for an agent console to follow every conversation (the
# deltas of answers are not in it: an agent watching one conversation subscribes to it).
FEED_EVENTS = frozenset(
    {EventType.MESSAGE, EventType.AI_START, EventType.AI_END, EventType.MODE, EventType.STAGE}
)

FAILED_NOTICE = "Sorry, the assistant could not finish that answer. Please try again."


@dataclass(frozen=True, slots=True)
class CoreSettings:
    max_message_chars: int = 4000
    delta_flush_seconds: float = 0.015
    delta_max_chars: int = 512
    history_limit: int = 20
    lease_seconds: float = 5.0
    """An answer whose owner stops renewing its lease for this long is ended as interrupted."""
    sweep_seconds: float = 1.0


@dataclass(frozen=True, slots=True)
class Ack:
    client_msg_id: str
    message_id: MessageId
    seq: int
    duplicate: bool


@dataclass(slots=True)
class _Answer:
    response_id: ResponseId
    end_status: AnswerStatus | None = None  # set by whoever ends it early
    producer: asyncio.Task[None] | None = None
    usage: Usage | None = None  # what the model reported, once its stream ended

    def end(self, status: AnswerStatus) -> None:
        if self.end_status is None:
            self.end_status = status
        if self.producer is not None:
            self.producer.cancel()


@dataclass(slots=True)
class _Turns:
    """The answer loop of one conversation on this instance."""

    business: Business
    pending: bool = True
    stop_requested: bool = False  # a stop that came before the answer it meant had started
    message_stored_at: float = 0.0
    answer: _Answer | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)


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
        self._turns: dict[ConversationId, _Turns] = {}
        self._locks: KeyedLock[ConversationId] = KeyedLock()
        self._sweeper: asyncio.Task[None] | None = None

    # -- user actions -------------------------------------------------------------------------

    async def post_user_message(
        self, business: Business, conversation_id: ConversationId, client_msg_id: str, text: str
    ) -> Ack:
        """Store the message (idempotently), publish it, and start an answer if one is due.

        Returns once the message is durable and published: the caller may acknowledge it.
        A resend with the same `client_msg_id` returns the same ack and starts nothing.
        """
        check_client_msg_id(client_msg_id)
        check_message_text(text, max_chars=self.settings.max_message_chars)
        bid = business.business_id
        async with self._locks.hold(conversation_id):
            conversation = await self.store.get_conversation(bid, conversation_id)
            message, created = await self.store.add_user_message(bid, conversation_id, client_msg_id, text)
            seq = message.seq
            if seq is None:  # new, or stored by an earlier attempt whose publish failed
                seq = await self._publish_message(bid, message)
        # A row that existed but had no seq was stored by an attempt that never got to publish it
        # (the store failed, or its answer to that attempt was lost): it is new to everyone else.
        if not created and message.seq is not None:
            self.observer.message_processed("duplicate")
            return Ack(client_msg_id, message.message_id, seq, duplicate=True)
        if should_answer(conversation.mode):
            self._schedule_answer(business, conversation)
            self.observer.message_processed("answered")
        else:
            self.observer.message_processed("stored")
        return Ack(client_msg_id, message.message_id, seq, duplicate=False)

    async def stop(self, business: Business, conversation_id: ConversationId) -> bool:
        """The user's stop: end the conversation's answer with status `stopped`, wherever it is
        being generated. Returns False when no answer was streaming.

        Here, the model is cancelled at once and the answer ends itself. Elsewhere, the answer is
        ended through the broker; its owner finds its next delta refused and closes its model
        stream (see `Broker`: an answer ends once)."""
        if self.stop_answer(conversation_id):
            return True
        try:
            event = await self.broker.end_answer(
                conversation_id, AnswerStatus.STOPPED, feed=business.business_id
            )
        except StreamMissing:
            return False
        if event is None:
            return False
        self.observer.answer_ended(AnswerStatus.STOPPED)
        await self._store_ended(business.business_id, event)
        return True

    def stop_answer(self, conversation_id: ConversationId) -> bool:
        """End the answer streaming for this conversation on this instance with status `stopped`.

        Messages queued behind it are not answered. Returns False when no answer was running here.
        """
        turns = self._turns.get(conversation_id)
        if turns is None:
            return False
        turns.pending = False
        if turns.answer is None:  # about to start: it ends as soon as it does
            turns.stop_requested = True
        else:
            turns.answer.end(AnswerStatus.STOPPED)
        return True

    async def set_typing(
        self, conversation_id: ConversationId, role: Role, state: bool, *, origin: str | None
    ) -> None:
        await self.broker.publish_ephemeral(
            conversation_id, EventType.TYPING, {"role": role.value, "state": state}, origin=origin
        )

    def start(self) -> None:
        """Start the background sweep that ends the answers of instances that died."""
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="answer-lease-sweeper")

    async def drain(self, *, grace: float) -> None:
        """Let running answers (and the ones queued behind them) finish for up to `grace`
        seconds, then end what is left as `interrupted`."""
        tasks = [turns.task for turns in self._turns.values() if turns.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        await self.aclose(grace=min(grace, 5.0) or 1.0)

    async def aclose(self, *, grace: float = 5.0) -> None:
        """End every running answer as `interrupted` and wait for them to be stored."""
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            await asyncio.gather(sweeper, return_exceptions=True)
        tasks = []
        for turns in list(self._turns.values()):
            turns.pending = False
            if turns.answer is not None:
                turns.answer.end(AnswerStatus.INTERRUPTED)
            if turns.task is not None:
                tasks.append(turns.task)
        if tasks:
            _done, still = await asyncio.wait(tasks, timeout=grace)
            for task in still:
                task.cancel()

    def answering(self, conversation_id: ConversationId) -> bool:
        return conversation_id in self._turns

    # -- internals ----------------------------------------------------------------------------

    async def publish(
        self,
        business_id: BusinessId,
        conversation_id: ConversationId,
        type: EventType,
        payload: dict[str, Any],
    ) -> Event:
        """Publish a sequenced event, opening the conversation's log first if it does not exist
        (a new conversation, or a log that was lost): seqs continue after what the store recorded."""
        feed = business_id if type in FEED_EVENTS else None
        try:
            return await self.broker.publish(conversation_id, type, payload, feed=feed)
        except StreamMissing:
            await self.open_stream(business_id, conversation_id)
            return await self.broker.publish(conversation_id, type, payload, feed=feed)

    async def open_stream(
        self,
        business_id: BusinessId,
        conversation_id: ConversationId,
        conversation: Conversation | None = None,
    ) -> StreamPosition:
        """Make sure the conversation's event log exists (starting after the store's last seq);
        return its position, recording a new epoch in the store."""
        if conversation is None:
            conversation = await self.store.get_conversation(business_id, conversation_id)
        position = await self.broker.open(conversation_id, floor_seq=conversation.last_seq)
        if position.epoch != conversation.epoch:
            await self.store.set_epoch(business_id, conversation_id, position.epoch)
        return position

    async def _publish_message(self, business_id: BusinessId, message: Message) -> int:
        event = await self.publish(
            business_id, message.conversation_id, EventType.MESSAGE, message_payload(message)
        )
        assert event.seq is not None
        await self.store.set_message_seq(business_id, message.conversation_id, message.message_id, event.seq)
        return event.seq

    def _schedule_answer(self, business: Business, conversation: Conversation) -> None:
        cid = conversation.conversation_id
        turns = self._turns.get(cid)
        if turns is None:
            turns = _Turns(business=business)
            self._turns[cid] = turns
            turns.task = asyncio.create_task(self._answer_loop(cid, turns), name=f"answers-{cid}")
        turns.pending = True
        turns.message_stored_at = time.monotonic()

    async def _answer_loop(self, conversation_id: ConversationId, turns: _Turns) -> None:
        try:
            while turns.pending:
                turns.pending = False
                bid = turns.business.business_id
                conversation = await self.store.get_conversation(bid, conversation_id)
                if should_answer(conversation.mode):
                    await self._answer(turns, conversation)
        except Exception:
            log.exception("answer loop failed", extra={"conversation_id": conversation_id})
            self.observer.error("internal")
        finally:
            self._turns.pop(conversation_id, None)

    async def _answer(self, turns: _Turns, conversation: Conversation) -> None:
        cid = conversation.conversation_id
        bid = conversation.business_id
        answer = _Answer(ResponseId(new_id()))
        lease = AnswerLease(bid, cid, answer.response_id)
        turns.answer = answer
        if turns.stop_requested:
            turns.stop_requested = False
            answer.end(AnswerStatus.STOPPED)
        heartbeat: asyncio.Task[None] | None = None
        try:
            await self.store.set_active_response(bid, cid, answer.response_id)
            await self.publish(bid, cid, EventType.AI_START, {"response_id": answer.response_id})
            await self.broker.hold_lease(lease, self.settings.lease_seconds)
            heartbeat = asyncio.create_task(self._renew_lease(lease), name=f"lease-{answer.response_id}")
            pump = DeltaPump(
                lambda chunk: self.publish(
                    bid, cid, EventType.DELTA, {"response_id": answer.response_id, "text": chunk}
                ),
                flush_after=self.settings.delta_flush_seconds,
                max_chars=self.settings.delta_max_chars,
            )
            status = await self._generate(turns, conversation, answer, pump)
            if isinstance(pump.error, AnswerEnded):
                turns.pending = False  # stopped or taken over elsewhere: nothing more to answer
            await self._finish(bid, cid, answer.response_id, pump.text, status, answer.usage)
        finally:
            turns.answer = None
            if heartbeat is not None:
                heartbeat.cancel()
                with contextlib.suppress(CoreError):
                    await self.broker.drop_lease(lease)

    async def _generate(
        self, turns: _Turns, conversation: Conversation, answer: _Answer, pump: DeltaPump
    ) -> AnswerStatus:
        """Run the model into the pump; return how the answer ended."""
        try:
            prompt = await self._prompt(turns.business, conversation)
        except CoreError as exc:
            log.warning(
                "prompt failed: %s", exc.message, extra={"conversation_id": conversation.conversation_id}
            )
            self.observer.error(type(exc).__name__)
            return AnswerStatus.FAILED
        if answer.end_status is not None:  # ended before the model was even asked
            return answer.end_status
        pump.start()
        answer.producer = asyncio.create_task(
            self._produce(prompt, pump, turns.message_stored_at, answer, turns.business.business_id)
        )
        await asyncio.wait({answer.producer})
        if answer.producer.cancelled():
            status = answer.end_status or AnswerStatus.INTERRUPTED
        elif (failure := answer.producer.exception()) is not None:
            log.warning(
                "model stream failed: %r", failure, extra={"conversation_id": conversation.conversation_id}
            )
            self.observer.error(type(failure).__name__)
            status = AnswerStatus.FAILED
        else:
            status = AnswerStatus.COMPLETE
        # A stopped or taken-over answer ends where the user saw it end: drop what was not sent.
        await pump.close(flush=status in (AnswerStatus.COMPLETE, AnswerStatus.FAILED))
        if pump.error is not None and status is AnswerStatus.COMPLETE:
            status = AnswerStatus.FAILED
        return status

    async def _produce(
        self, prompt: list[ChatMessage], pump: DeltaPump, started_at: float, answer: _Answer, business_id: str
    ) -> None:
        stream = await self.llm.stream(prompt, business_id=business_id)
        pieces = 0
        try:
            async for piece in stream:
                if not pieces:
                    self.observer.first_token(time.monotonic() - started_at)
                pieces += 1
                pump.push(piece)
        finally:
            self.observer.pieces(pieces)
            await stream.aclose()  # closes the provider's request: no tokens after a stop
            answer.usage = stream.usage

    async def _finish(
        self,
        business_id: BusinessId,
        cid: ConversationId,
        response_id: ResponseId,
        text: str,
        status: AnswerStatus,
        usage: Usage | None = None,
    ) -> None:
        """End the answer through the broker, then store it. Ending it is the one atomic claim
        (see `Broker`): if a stop, a takeover or a lease sweep ended it first, this instance stores
        nothing and the winner's end stands."""
        try:
            event = await self.broker.end_answer(cid, status, response_id=response_id, feed=business_id)
        except StreamMissing:  # the log was lost mid-answer: clients reset; the store keeps it
            await self.store_answer(business_id, cid, response_id, text, status, None, usage)
            return
        if event is None:
            log.info("answer %s was ended elsewhere", response_id, extra={"conversation_id": cid})
            return
        self.observer.answer_ended(status)
        await self._store_ended(business_id, event, usage)
        if status is AnswerStatus.FAILED:
            await self._tell_failure(business_id, cid, response_id)

    async def _tell_failure(
        self, business_id: BusinessId, cid: ConversationId, response_id: ResponseId
    ) -> None:
        """A system message, after an answer that failed, so that the user knows to ask again."""
        try:
            message, _ = await self.store.add_user_message(
                business_id, cid, f"system:failed:{response_id}", FAILED_NOTICE, role=Role.SYSTEM
            )
            if message.seq is None:
                await self._publish_message(business_id, message)
        except CoreError as exc:
            log.warning("telling the user about a failed answer failed: %s", exc.message)

    async def _store_ended(self, business_id: BusinessId, event: Event, usage: Usage | None = None) -> None:
        """Store the answer an ai_end event ended, as that event says."""
        payload = event.payload
        await self.store_answer(
            business_id,
            event.conversation_id,
            ResponseId(payload["response_id"]),
            payload["text"],
            AnswerStatus(payload["status"]),
            event.seq,
            usage,
        )

    async def _renew_lease(self, lease: AnswerLease) -> None:
        """Renew the answer's lease three times per lease period until cancelled."""
        while True:
            await asyncio.sleep(self.settings.lease_seconds / 3)
            try:
                await self.broker.hold_lease(lease, self.settings.lease_seconds)
            except CoreError as exc:
                log.warning("renewing an answer lease failed: %s", exc.message)

    async def _sweep_forever(self) -> None:
        """End, as interrupted, the answers whose owner stopped renewing their lease (it died)."""
        while True:
            await asyncio.sleep(self.settings.sweep_seconds)
            try:
                for lease in await self.broker.claim_expired_leases(50):
                    await self._interrupt(lease)
            except CoreError as exc:
                log.warning("sweeping answer leases failed: %s", exc.message)
            except Exception:
                log.exception("sweeping answer leases failed")

    async def _interrupt(self, lease: AnswerLease) -> None:
        try:
            event = await self.broker.end_answer(
                lease.conversation_id,
                AnswerStatus.INTERRUPTED,
                response_id=lease.response_id,
                feed=lease.business_id,
            )
        except StreamMissing:
            event = None
        if event is None:
            return
        log.warning(
            "answer %s lost its owner: ended as interrupted",
            lease.response_id,
            extra={"conversation_id": lease.conversation_id},
        )
        self.observer.answer_ended(AnswerStatus.INTERRUPTED)
        await self._store_ended(lease.business_id, event)

    async def store_answer(
        self,
        business_id: BusinessId,
        cid: ConversationId,
        response_id: ResponseId,
        text: str,
        status: AnswerStatus,
        seq: int | None,
        usage: Usage | None = None,
    ) -> None:
        """Store an ended answer with the seq of its ai_end and clear the active answer. Failures
        are logged and counted: the ai_end is out already, and the store retried on its own."""
        try:
            # Shielded: the answer must be stored even when this task is being cancelled.
            message = await asyncio.shield(
                self.store.add_assistant_message(business_id, cid, response_id, text, status, usage=usage)
            )
            if seq is not None:
                await self.store.set_message_seq(business_id, cid, message.message_id, seq)
            await self.store.set_active_response(business_id, cid, None)
        except CoreError as exc:
            log.error("storing an answer failed: %s", exc.message, extra={"conversation_id": cid})
            self.observer.error(exc.code)

    async def _prompt(self, business: Business, conversation: Conversation) -> list[ChatMessage]:
        """Run the pipeline (stage selection, data extraction, the response prompt) for the latest
        user message; record the turn and publish a `stage` event when the stage or data changed."""
        bid, cid = business.business_id, conversation.conversation_id
        history = await self.store.recent_messages(bid, cid, limit=self.settings.history_limit)
        message = next((m for m in reversed(history) if m.role is Role.USER), None)
        flow = await self.flows.get(bid)
        prepared = await self.pipeline.prepare(business, conversation, flow, message, history)
        if flow.stages:
            await self.store.record_turn(bid, cid, stage=StageName(prepared.stage), data=prepared.data)
            if prepared.stage_changed or prepared.data_changed:
                payload = {"stage": prepared.stage, "data": plain_values(prepared.data)}
                await self.publish(bid, cid, EventType.STAGE, payload)
        return prepared.prompt


def answer_message_id(response_id: ResponseId) -> MessageId:
    """An answer's stored message has its response's id: known before the answer is stored."""
    return MessageId(response_id)


def message_payload(message: Message) -> dict[str, Any]:
    """The fields of a `message` event (and of a message in history) for a stored message."""
    return {
        "message_id": message.message_id,
        "role": message.role.value,
        "text": message.text,
        "client_msg_id": message.client_msg_id,
        "created_at": message.created_at.isoformat(),
    }
