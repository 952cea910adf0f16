"""AnswerRunner: the AI answers this instance generates, from `ai_start` to a stored `ai_end`.

One answer at a time per conversation; a message that arrives while an answer streams is answered
after it, together with any other message that arrived meanwhile. Across instances the broker
enforces it: an `ai_start` while another answer is active (streaming elsewhere, or left open by an
instance that died) is refused, and the new answer waits until that one has ended (the lease
sweep ends a dead owner's answer). The lease is taken before the `ai_start` goes out.

An answer ends in one of two ways, both normal:

- **here**: its model stream finished (`complete`), failed (`failed`), or this instance ended it
  (a local stop, a shutdown). The owner ends it through the broker (`end_answer`, the one atomic
  claim) and stores it.
- **elsewhere**: someone else claimed its end first through the broker: a user's stop on another
  instance, an agent's takeover, the lease sweep of another instance. The owner learns it from a
  control message or from its next delta being refused, closes the model stream at once (no tokens
  billed after it) and stores nothing: the winner stores what its `ai_end` said.

When the broker fails, the owner still ends its answer: while the broker is unavailable it tries
again (renewing the lease meanwhile), and when the conversation's log was lost (Redis restarted
empty) it ends the answer `interrupted` in the new log with the text it had sent
(`end_lost_answer`).

Either way the stored answer is an `EndedAnswer`, written as one shielded step (the row, the seq
that makes it visible in history, and the conversation's active answer cleared), and kept to be
written again while the store is unavailable (core.ended_answers).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from dataclasses import dataclass, field

from core.admission import Admission
from core.broker import AnswerBusy, AnswerEnded, AnswerLease, HumanMode, StreamMissing
from core.delta_pump import DeltaPump
from core.ended_answers import AnswerWriter, EndedAnswer
from core.errors import CoreError, Unavailable
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
    busy_retry_seconds: float = 0.2
    """How often an answer waiting for the conversation's previous answer to end tries again."""
    max_active_answers: int = 0
    """Conversations this instance answers at once (0: no limit). A user message that would start
    one more is refused with `Overloaded`, before it is stored."""
    overload_retry_ms: int = 1000
    """The least `retry_after_ms` of such a refusal (`core.admission` estimates the wait)."""
    overload_lag_seconds: float = 0.0
    """Below `max_active_answers`, the limit shrinks while the event loop lags more than this
    (0: the limit is `max_active_answers` alone)."""
    overload_arrivals_lag_seconds: float = 0.0
    """New conversations and sockets are refused while the event loop's lag, averaged over the
    last second, is over this (0: never); see `core.admission`."""
    overload_arrivals_queue_wait_seconds: float = 0.0
    """...or while the database queries of the last second waited longer than this for a pooled
    connection, on average (0: never); see `core.admission`."""


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
    epoch: str | None = None  # of the log its ai_start went to
    queued: bool = False  # whether messages waited behind it when its deltas were refused

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
            arrivals_lag=settings.overload_arrivals_lag_seconds,
            arrivals_queue_wait=settings.overload_arrivals_queue_wait_seconds,
        )
        self._lag_watch: asyncio.Task[None] | None = None
        self._leases: dict[ResponseId, AnswerLease] = {}
        """The leases of the answers running here, all renewed together (`_renew_forever`): the
        sweep never ends these (see `_sweep_forever`)."""
        self._renewer: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.writer = AnswerWriter(events.store, observer)

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

    def started_here(self, conversation_id: ConversationId) -> bool:
        """Whether an answer of this conversation published its `ai_start` from here and has not
        finished (one still waiting for the previous answer to end has not)."""
        turns = self._turns.get(conversation_id)
        return turns is not None and turns.answer is not None and turns.answer.epoch is not None

    def start(self) -> None:
        """Start the background sweep that ends the answers of instances that died."""
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="answer-lease-sweeper")
        if self._lag_watch is None and self.admission.watching:
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
        await self.writer.aclose(grace=grace)

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
        settled = False  # never started, or ended (here or elsewhere): its lease may go
        started_at: float | None = None
        try:
            # The lease comes before the ai_start: an instance that dies right after publishing
            # it leaves an answer that the lease sweep of another instance ends. From here on it
            # is renewed with all the others (`_renew_forever`).
            self._leases[answer.response_id] = lease
            await self.broker.hold_lease(lease, self.settings.lease_seconds)
            self._start_renewer()
            started = await self._start(turns, answer, bid, cid)
            if started is None:
                settled = True
                return
            answer.epoch = started.epoch
            started_at = time.monotonic()
            settled = await self._run(turns, conversation, answer)
        finally:
            turns.answer = None
            if started_at is not None:
                self.admission.answer_ended(time.monotonic() - started_at)
            self._leases.pop(answer.response_id, None)
            # An answer not settled here (this task was cancelled while its end could not be
            # published) keeps its lease: when it expires, another instance ends the answer.
            if settled:
                with contextlib.suppress(CoreError):
                    await self.broker.drop_lease(lease)

    async def _start(
        self, turns: _Turns, answer: _Answer, bid: BusinessId, cid: ConversationId
    ) -> Event | None:
        """Publish the answer's `ai_start` and return it. While another answer of the conversation
        is active (streaming on another instance, or left by an instance that died, which the
        lease sweep ends), wait for it to end. None when the answer does not start: an agent
        holds the conversation, or it was stopped before it could start."""
        waiting = False
        while answer.state is AnswerState.PREPARING:
            try:
                event = await self.events.publish(
                    bid, cid, EventType.AI_START, {"response_id": answer.response_id}
                )
            except HumanMode:  # an agent holds the conversation: the AI does not answer
                turns.pending = False
                return None
            except AnswerBusy:
                if not waiting:
                    log.info("waiting for the previous answer to end", extra={"conversation_id": cid})
                    waiting = True
                await asyncio.sleep(self.settings.busy_retry_seconds)
                continue
            if answer.state is AnswerState.PREPARING:
                answer.state = AnswerState.STREAMING
            return event
        return None

    async def _run(self, turns: _Turns, conversation: Conversation, answer: _Answer) -> bool:
        """Generate a started answer and end it; True once it is ended (here or elsewhere)."""
        bid, cid = conversation.business_id, conversation.conversation_id
        pump = DeltaPump(
            lambda chunk: self._publish_delta(bid, cid, turns, answer, chunk),
            flush_after=self.settings.delta_flush_seconds,
            max_chars=self.settings.delta_max_chars,
        )
        try:
            status = await self._generate(turns, conversation, answer, pump)
        except Exception:  # whatever failed, the answer that started must end
            log.exception("generating an answer failed", extra={"conversation_id": cid})
            self.observer.error("internal")
            answer.end(AnswerStatus.FAILED)
            await pump.close(flush=False)
            status = AnswerStatus.FAILED
        return await self._finish(turns, bid, cid, answer, status, pump.text)

    async def _publish_delta(
        self, bid: BusinessId, cid: ConversationId, turns: _Turns, answer: _Answer, chunk: str
    ) -> None:
        try:
            await self.events.publish(
                bid, cid, EventType.DELTA, {"response_id": answer.response_id, "text": chunk}
            )
        except AnswerEnded:  # stopped or taken over elsewhere: nothing queued behind it is answered
            answer.queued, turns.pending = turns.pending, False  # (unless its log was lost)
            answer.ended_elsewhere()
            raise

    async def _generate(
        self, turns: _Turns, conversation: Conversation, answer: _Answer, pump: DeltaPump
    ) -> AnswerStatus | None:
        """Run the model into the pump; return how the answer ended here (None: elsewhere)."""
        try:
            prompt = await self._prompt(turns.business, conversation, answer.response_id)
        except CoreError as exc:
            log.warning(
                "prompt failed: %s", exc.message, extra={"conversation_id": conversation.conversation_id}
            )
            self.observer.error(type(exc).__name__)
            return AnswerStatus.FAILED
        except Exception:  # a bug or an unforeseen failure: the answer ends failed, never hangs
            log.exception("prompt failed", extra={"conversation_id": conversation.conversation_id})
            self.observer.error("internal")
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
        if isinstance(pump.error, CoreError):  # the broker failed, not the model: cut short
            status = AnswerStatus.INTERRUPTED
        elif pump.error is not None and status is AnswerStatus.COMPLETE:
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
                if "\x00" in piece:  # PostgreSQL cannot store NUL: no client sees what is not kept
                    piece = piece.replace("\x00", "")
                pump.push(piece)
        finally:
            self.observer.pieces(pieces)
            await stream.aclose()  # closes the provider's request: no tokens after a stop
            answer.usage = stream.usage

    async def _finish(
        self,
        turns: _Turns,
        bid: BusinessId,
        cid: ConversationId,
        answer: _Answer,
        status: AnswerStatus | None,
        text: str,
    ) -> bool:
        """End the answer through the broker, then store it; True once it is ended (here or
        elsewhere). `status` None: its end was claimed elsewhere, or its deltas were refused.

        Ending it is the one atomic claim (see `Broker`): if a stop, a takeover or a lease sweep
        ended it first, this instance stores nothing and the winner's end stands. While the
        broker is unavailable, the end is tried again (the lease is renewed meanwhile, so no sweep
        ends it underneath); if its log was lost (Redis restarted empty), it is ended in the new
        log with the text it had streamed."""
        delay = 0.1
        while True:
            try:
                event = await self._end(bid, cid, answer, status, text)
                break
            except Unavailable as exc:
                log.warning(
                    "ending answer %s failed, trying again: %s",
                    answer.response_id,
                    exc.message,
                    extra={"conversation_id": cid},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        if event is None:
            log.info("answer %s was ended elsewhere", answer.response_id, extra={"conversation_id": cid})
            return True
        if status is None:  # its log was lost, not its end: what was queued is still answered
            turns.pending = turns.pending or answer.queued
        final = AnswerStatus(event.payload["status"])
        self.observer.answer_ended(final)
        await self.store_ended(EndedAnswer.from_event(bid, event, answer.usage))
        if final is AnswerStatus.FAILED:
            await self._tell_failure(bid, cid, answer.response_id)
        return True

    async def _end(
        self,
        bid: BusinessId,
        cid: ConversationId,
        answer: _Answer,
        status: AnswerStatus | None,
        text: str,
    ) -> Event | None:
        """Publish the answer's `ai_end`; None when it was ended elsewhere."""
        rid = answer.response_id
        if status is not None:
            ended = status
            event = await self.events.opened(
                bid, cid, lambda: self.broker.end_answer(cid, ended, response_id=rid, feed=bid)
            )
            if event is not None:
                return event
        # Not the active answer of the conversation's log: either it was ended elsewhere (the
        # winner stores it), or the log it started in was lost and opened anew (then it is
        # ended here, in the new log, with what it streamed: clients that reset see it).
        assert answer.epoch is not None
        started_epoch, lost = answer.epoch, status or AnswerStatus.INTERRUPTED
        event = await self.events.opened(
            bid,
            cid,
            lambda: self.broker.end_lost_answer(
                cid, started_epoch=started_epoch, response_id=rid, status=lost, text=text, feed=bid
            ),
        )
        if event is not None:
            log.warning(
                "answer %s lost its event log: ended as %s",
                rid,
                lost.value,
                extra={"conversation_id": cid},
            )
        return event

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
        """Store an ended answer (see `AnswerWriter.store`)."""
        await self.writer.store(ended)

    # -- leases ---------------------------------------------------------------------------------

    async def _renew_forever(self) -> None:
        """Renew the leases of every answer running here three times per lease period, all in one
        broker call (one round trip, however many answers). Never dies of a failure: a missed
        renewal is retried at the next tick (a lease outlives two misses)."""
        reported: set[ResponseId] = set()  # leases found lost (each warned about once)
        while True:
            await asyncio.sleep(self.settings.lease_seconds / 3)
            leases = list(self._leases.values())
            reported &= self._leases.keys()
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
                # Still running here (not just ended): another instance's sweep took it, and its
                # next delta learns whether the answer was ended. It is not taken again.
                if self._leases.get(lease.response_id) == lease and lease.response_id not in reported:
                    reported.add(lease.response_id)
                    log.warning(
                        "the lease of answer %s expired while it ran here",
                        lease.response_id,
                        extra={"conversation_id": lease.conversation_id},
                    )
                    self.observer.error("lease_lost")

    async def _sweep_forever(self) -> None:
        """End, as interrupted, the answers whose owner stopped renewing their lease (it died).

        An answer running here is alive whatever its lease says: when this instance's loop was
        held up longer than a lease (a slow step somewhere), its heartbeats are late, and the
        sweep, woken late as well, must not end this instance's own answers. So after a late
        wake-up it renews the local leases before it claims any, and a claimed lease that turns
        out to be a local answer's is renewed, never interrupted. (Another instance's sweep still
        takes it: an instance held up longer than a lease cannot be told from a dead one.)"""
        period = self.settings.sweep_seconds
        while True:
            slept_from = time.monotonic()
            await asyncio.sleep(period)
            try:
                if time.monotonic() - slept_from > period + self.settings.lease_seconds / 3:
                    await self._renew_local_leases()
                for lease in await self.broker.claim_expired_leases(50):
                    if lease.response_id in self._leases:
                        log.warning("answer %s outlived its lease here: renewed", lease.response_id)
                        await self.broker.hold_lease(lease, self.settings.lease_seconds)
                        continue
                    try:
                        await self._interrupt(lease)
                    except CoreError:  # put it back (expired): the next sweep tries again
                        with contextlib.suppress(CoreError):
                            await self.broker.hold_lease(lease, 0)
                        raise
            except CoreError as exc:
                log.warning("sweeping answer leases failed: %s", exc.message)
            except Exception:
                log.exception("sweeping answer leases failed")

    async def _renew_local_leases(self) -> None:
        if self._leases:
            await self.broker.renew_leases(list(self._leases.values()), self.settings.lease_seconds)

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

    async def _prompt(
        self, business: Business, conversation: Conversation, response_id: ResponseId
    ) -> list[ChatMessage]:
        """Run the pipeline (stage selection, data extraction, the response prompt) for the latest
        user message; record the turn with the answer it starts (`response_id`, which agents'
        consoles show as streaming: one write for both) and publish a `stage` event when the stage
        or data changed."""
        bid, cid = business.business_id, conversation.conversation_id
        history = await self.store.recent_messages(bid, cid, limit=self.settings.history_limit)
        message = next((m for m in reversed(history) if m.role is Role.USER), None)
        flow = await self.flows.get(bid)
        prepared = await self.pipeline.prepare(business, conversation, flow, message, history)
        if flow.stages:
            await self.store.record_turn(
                bid, cid, stage=StageName(prepared.stage), data=prepared.data, answering=response_id
            )
            if prepared.stage_changed or prepared.data_changed:
                payload = {"stage": prepared.stage, "data": plain_values(prepared.data)}
                await self.events.publish(bid, cid, EventType.STAGE, payload)
        else:
            try:
                await self.store.set_active_response(bid, cid, response_id)
            except CoreError as exc:  # only what agents' consoles show: the answer goes on
                log.warning(
                    "recording the active answer failed: %s", exc.message, extra={"conversation_id": cid}
                )
        return prepared.prompt
