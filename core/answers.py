"""AnswerRunner: the AI answers this instance generates, from `ai_start` to a stored `ai_end`.

One answer at a time per conversation; a message that arrives while an answer streams is answered
after it, together with any other message that arrived meanwhile.

An answer ends in one of two ways, both normal:

- **here**: its model stream finished (`complete`), failed (`failed`), or this instance ended it
  (a local stop, a shutdown). The owner ends it through the broker (`end_answer`, the one atomic
  claim) and stores it.
- **elsewhere**: someone else claimed its end first through the broker: a user's stop on another
  instance, an agent's takeover, the lease sweep of another instance. The owner learns it from a
  control message or from its next delta being refused, closes the model stream at once (no tokens
  billed after it) and stores nothing: the winner stores what its `ai_end` said.

Either way the stored answer is an `EndedAnswer`, written as one shielded step (the row, the seq
that makes it visible in history, and the conversation's active answer cleared).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from dataclasses import dataclass, field

from core.admission import Admission
from core.broker import AnswerEnded, AnswerLease, HumanMode, StreamMissing
from core.delta_pump import DeltaPump
from core.errors import CoreError
from core.event_log import EventLog
from core.extraction import plain_values
from core.flow_cache import FlowCache
from core.llm import ChatMessage, LLMProvider, Usage
from core.models import Business, Conversation, Event
from core.observer import Observer
from core.pipeline import Pipeline
from core.types import (
    AnswerStatus,
    BusinessId,
    ConversationId,
    EventType,
    ResponseId,
    Role,
    StageName,
    new_id,
)

log = logging.getLogger(__name__)

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
    max_active_answers: int = 0
    """Conversations this instance answers at once (0: no limit). A user message that would start
    one more is refused with `Overloaded`, before it is stored."""
    overload_retry_ms: int = 1000
    """The least `retry_after_ms` of such a refusal (`core.admission` estimates the wait)."""
    overload_lag_seconds: float = 0.0
    """Below `max_active_answers`, the limit shrinks while the event loop lags more than this
    (0: the limit is `max_active_answers` alone)."""


@dataclass(frozen=True, slots=True)
class EndedAnswer:
    """An answer as its `ai_end` ended it: what is stored."""

    business_id: BusinessId
    conversation_id: ConversationId
    response_id: ResponseId
    text: str
    status: AnswerStatus
    seq: int | None
    """The seq of its `ai_end` (None when the event log was lost before it could be published)."""
    usage: Usage | None = None

    @classmethod
    def from_event(cls, business_id: BusinessId, event: Event, usage: Usage | None = None) -> EndedAnswer:
        payload = event.payload
        return cls(
            business_id,
            event.conversation_id,
            ResponseId(payload["response_id"]),
            payload["text"],
            AnswerStatus(payload["status"]),
            event.seq,
            usage,
        )


class AnswerState(enum.Enum):
    PREPARING = "preparing"  # the pipeline runs; nothing published yet
    STREAMING = "streaming"  # ai_start is out; the model streams into the pump
    ENDING = "ending"  # ended here (finished, failed, or a local stop or shutdown)
    ENDED_ELSEWHERE = "ended_elsewhere"  # a stop, takeover or sweep claimed its end first


@dataclass(slots=True)
class _Answer:
    response_id: ResponseId
    state: AnswerState = AnswerState.PREPARING
    end_status: AnswerStatus | None = None  # set when this instance ends it early
    producer: asyncio.Task[None] | None = None
    usage: Usage | None = None  # what the model reported, once its stream ended

    def end(self, status: AnswerStatus) -> None:
        """End it here with `status` (the first reason wins): cancel the model stream."""
        if self.state in (AnswerState.PREPARING, AnswerState.STREAMING):
            self.state = AnswerState.ENDING
            self.end_status = status
        self._cancel()

    @property
    def lost(self) -> bool:
        """Whether someone else claimed its end."""
        return self.state is AnswerState.ENDED_ELSEWHERE

    def ended_elsewhere(self) -> None:
        """Someone else claimed its end: stop the model at once; store nothing here."""
        self.state = AnswerState.ENDED_ELSEWHERE
        self._cancel()

    def _cancel(self) -> None:
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


class AnswerRunner:
    def __init__(
        self,
        *,
        events: EventLog,
        llm: LLMProvider,
        observer: Observer,
        settings: CoreSettings,
        flows: FlowCache,
        pipeline: Pipeline,
    ) -> None:
        self.events = events
        self.store = events.store
        self.broker = events.broker
        self.llm = llm
        self.observer = observer
        self.settings = settings
        self.flows = flows
        self.pipeline = pipeline
        self._turns: dict[ConversationId, _Turns] = {}
        self.admission = Admission(
            limit=settings.max_active_answers,
            retry_ms=settings.overload_retry_ms,
            lag_target=settings.overload_lag_seconds,
        )
        self._lag_watch: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._leases: set[AnswerLease] = set()  # the leases of the answers streaming here
        self._renewer: asyncio.Task[None] | None = None

    # -- admission ------------------------------------------------------------------------------

    @property
    def active(self) -> int:
        """Conversations with an answer running (or about to) on this instance."""
        return len(self._turns)

    def reserve(self, conversation_id: ConversationId) -> None:
        """Admit a user message that may start an answer here, or raise `Overloaded` when this
        instance answers `max_active_answers` conversations already (see `core.admission`). Call
        `release` once the answer is scheduled (or the message came to nothing)."""
        self.admission.reserve(conversation_id, self._turns.keys())

    def release(self, conversation_id: ConversationId) -> None:
        self.admission.release(conversation_id)

    # -- control --------------------------------------------------------------------------------

    def schedule(self, business: Business, conversation_id: ConversationId) -> None:
        """Answer the conversation's latest messages (after the answer running now, if any)."""
        turns = self._turns.get(conversation_id)
        if turns is None:
            turns = _Turns(business=business)
            self._turns[conversation_id] = turns
            turns.task = asyncio.create_task(
                self._loop(conversation_id, turns), name=f"answers-{conversation_id}"
            )
        turns.pending = True
        turns.message_stored_at = time.monotonic()

    def stop_local(self, conversation_id: ConversationId, status: AnswerStatus) -> bool:
        """End the answer running here for this conversation with `status`, and drop the ones
        queued behind it. Returns False when no answer runs here."""
        turns = self._turns.get(conversation_id)
        if turns is None:
            return False
        turns.pending = False
        if turns.answer is None:  # about to start: it ends as soon as it does
            turns.stop_requested = True
        else:
            turns.answer.end(status)
        return True

    def ended_elsewhere(self, conversation_id: ConversationId, response_id: ResponseId) -> None:
        """Another instance ended this answer through the broker: if it runs here, close its model
        stream now rather than at its next delta, and answer nothing queued behind it."""
        turns = self._turns.get(conversation_id)
        if turns is not None and turns.answer is not None and turns.answer.response_id == response_id:
            turns.pending = False
            turns.answer.ended_elsewhere()

    def answering(self, conversation_id: ConversationId) -> bool:
        return conversation_id in self._turns

    def start(self) -> None:
        """Start the background sweep that ends the answers of instances that died."""
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="answer-lease-sweeper")
        if self._lag_watch is None and self.admission.cap and self.admission.lag_target:
            self._lag_watch = asyncio.create_task(self.admission.watch(), name="admission-lag-watch")
        self._start_renewer()

    def _start_renewer(self) -> None:
        if self._renewer is None:
            self._renewer = asyncio.create_task(self._renew_forever(), name="answer-lease-renewer")

    async def drain(self, *, grace: float) -> None:
        """Let running answers (and the ones queued behind them) finish for up to `grace`
        seconds, then end what is left as `interrupted`."""
        tasks = [turns.task for turns in self._turns.values() if turns.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        await self.aclose(grace=min(grace, 5.0) or 1.0)

    async def aclose(self, *, grace: float = 5.0) -> None:
        """End every running answer as `interrupted` and wait for them to be stored."""
        for task in (self._sweeper, self._renewer, self._lag_watch):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._sweeper = self._renewer = self._lag_watch = None
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

    # -- one answer -----------------------------------------------------------------------------

    async def _loop(self, conversation_id: ConversationId, turns: _Turns) -> None:
        try:
            while turns.pending:
                turns.pending = False
                bid = turns.business.business_id
                conversation = await self.store.get_conversation(bid, conversation_id)
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
        leased = False
        started_at: float | None = None
        try:
            try:
                await self.events.publish(bid, cid, EventType.AI_START, {"response_id": answer.response_id})
            except HumanMode:  # an agent holds the conversation: the AI does not answer
                turns.pending = False
                return
            started_at = time.monotonic()
            await self.store.set_active_response(bid, cid, answer.response_id)
            if answer.state is AnswerState.PREPARING:
                answer.state = AnswerState.STREAMING
            await self.broker.hold_lease(lease, self.settings.lease_seconds)
            leased = True
            self._leases.add(lease)  # renewed from now on with all the others (`_renew_forever`)
            self._start_renewer()
            pump = DeltaPump(
                lambda chunk: self._publish_delta(bid, cid, turns, answer, chunk),
                flush_after=self.settings.delta_flush_seconds,
                max_chars=self.settings.delta_max_chars,
            )
            status = await self._generate(turns, conversation, answer, pump)
            if answer.lost or status is None:
                # Messages queued behind it were dropped when the end was learned (not now: one
                # that came since, after a handback say, must still be answered).
                log.info("answer %s was ended elsewhere", answer.response_id, extra={"conversation_id": cid})
                return
            await self._finish(bid, cid, answer, status, pump.text)
        finally:
            turns.answer = None
            if started_at is not None:
                self.admission.answer_ended(time.monotonic() - started_at)
            self._leases.discard(lease)
            if leased:
                with contextlib.suppress(CoreError):
                    await self.broker.drop_lease(lease)

    async def _publish_delta(
        self, bid: BusinessId, cid: ConversationId, turns: _Turns, answer: _Answer, chunk: str
    ) -> None:
        try:
            await self.events.publish(
                bid, cid, EventType.DELTA, {"response_id": answer.response_id, "text": chunk}
            )
        except AnswerEnded:  # stopped or taken over elsewhere: nothing queued behind it is answered
            turns.pending = False
            answer.ended_elsewhere()
            raise

    async def _generate(
        self, turns: _Turns, conversation: Conversation, answer: _Answer, pump: DeltaPump
    ) -> AnswerStatus | None:
        """Run the model into the pump; return how the answer ended here (None: elsewhere)."""
        try:
            prompt = await self._prompt(turns.business, conversation)
        except CoreError as exc:
            log.warning(
                "prompt failed: %s", exc.message, extra={"conversation_id": conversation.conversation_id}
            )
            self.observer.error(type(exc).__name__)
            return AnswerStatus.FAILED
        if answer.state is not AnswerState.STREAMING:  # ended before the model was even asked
            return answer.end_status
        pump.start()
        answer.producer = asyncio.create_task(
            self._produce(prompt, pump, turns.message_stored_at, answer, turns.business.business_id)
        )
        await asyncio.wait({answer.producer})
        if answer.lost:
            status = None
        elif answer.producer.cancelled():
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
        if isinstance(pump.error, AnswerEnded):
            return None
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
        self, bid: BusinessId, cid: ConversationId, answer: _Answer, status: AnswerStatus, text: str
    ) -> None:
        """End the answer through the broker, then store it. Ending it is the one atomic claim
        (see `Broker`): if a stop, a takeover or a lease sweep ended it first, this instance stores
        nothing and the winner's end stands."""
        try:
            event = await self.broker.end_answer(cid, status, response_id=answer.response_id, feed=bid)
        except StreamMissing:  # the log was lost mid-answer: clients reset; the store keeps it
            await self.store_ended(
                EndedAnswer(bid, cid, answer.response_id, text, status, None, answer.usage)
            )
            return
        if event is None:
            log.info("answer %s was ended elsewhere", answer.response_id, extra={"conversation_id": cid})
            return
        self.observer.answer_ended(status)
        await self.store_ended(EndedAnswer.from_event(bid, event, answer.usage))
        if status is AnswerStatus.FAILED:
            await self._tell_failure(bid, cid, answer.response_id)

    async def _tell_failure(
        self, business_id: BusinessId, cid: ConversationId, response_id: ResponseId
    ) -> None:
        """A system message, after an answer that failed, so that the user knows to ask again."""
        try:
            message, _ = await self.store.add_user_message(
                business_id, cid, f"system:failed:{response_id}", FAILED_NOTICE, role=Role.SYSTEM
            )
            if message.seq is None:
                await self.events.publish_message(business_id, message)
        except CoreError as exc:
            log.warning("telling the user about a failed answer failed: %s", exc.message)

    async def store_ended(self, ended: EndedAnswer) -> None:
        """Store an ended answer: its row, the seq of its ai_end, the active answer cleared (one
        atomic step of the store).
        Failures are logged and counted: the ai_end is out already, and the store retried."""
        # Shielded as a whole: a cancelled caller (a shutdown, a closing socket) must not leave
        # the row stored but invisible in history (no seq), or the active answer set.
        try:
            await asyncio.shield(self._write_ended(ended))
        except CoreError as exc:
            log.error(
                "storing an answer failed: %s", exc.message, extra={"conversation_id": ended.conversation_id}
            )
            self.observer.error(exc.code)

    async def _write_ended(self, ended: EndedAnswer) -> None:
        await self.store.finish_answer(
            ended.business_id,
            ended.conversation_id,
            ended.response_id,
            ended.text,
            ended.status,
            seq=ended.seq,
            usage=ended.usage,
        )

    # -- leases ---------------------------------------------------------------------------------

    async def _renew_forever(self) -> None:
        """Renew the leases of every answer streaming here three times per lease period, all in
        one broker call (one round trip, however many answers). Never dies of a failure: a missed
        renewal is retried at the next tick (a lease outlives two misses)."""
        while True:
            await asyncio.sleep(self.settings.lease_seconds / 3)
            leases = list(self._leases)
            if not leases:
                continue
            try:
                lost = await self.broker.renew_leases(leases, self.settings.lease_seconds)
            except CoreError as exc:
                log.warning("renewing %d answer leases failed: %s", len(leases), exc.message)
                self.observer.error("lease_renewal_failed")
                continue
            except Exception:
                log.exception("renewing answer leases failed")
                self.observer.error("lease_renewal_failed")
                continue
            for lease in lost:
                if lease in self._leases:  # not just ended here: another instance's sweep took it
                    log.warning(
                        "the lease of answer %s expired while it streamed here",
                        lease.response_id,
                        extra={"conversation_id": lease.conversation_id},
                    )
                    self.observer.error("lease_lost")
                    self._leases.discard(lease)  # not taken again: its next delta learns the rest

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
        self.observer.error("lease_expired")
        log.warning(
            "answer %s lost its owner: ended as interrupted",
            lease.response_id,
            extra={"conversation_id": lease.conversation_id},
        )
        self.observer.answer_ended(AnswerStatus.INTERRUPTED)
        await self.store_ended(EndedAnswer.from_event(lease.business_id, event))

    # -- the pipeline ---------------------------------------------------------------------------

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
                await self.events.publish(bid, cid, EventType.STAGE, payload)
        return prepared.prompt
