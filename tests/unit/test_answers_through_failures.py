"""Answers through failures, on the in-memory backends: an answer left open by a dead owner is
ended before the next one starts, an answer whose log was dropped is ended in the new log, and
writes refused while the store is unavailable are tried again until it takes them. (The same with
real processes, Redis and PostgreSQL: tests/multi/test_answers_never_lost.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from core.broker import AnswerLease
from core.conversation import ConversationService, CoreSettings
from core.errors import NotFound, Unavailable
from core.models import Event
from core.pending_writes import PendingWrites
from core.scripted_llm import ScriptedLLM
from core.types import ConversationId, EventType, ResponseId, Role, StageName
from gateway.backends.memory_broker import MemoryBroker
from gateway.backends.memory_store import MemoryStore
from tests.unit.test_conversation_service import BUSINESS, Recorder

FAST = CoreSettings(delta_flush_seconds=0.001, lease_seconds=0.3, sweep_seconds=0.05, busy_retry_seconds=0.02)


async def conversation(store: MemoryStore) -> ConversationId:
    await store.ensure_business(BUSINESS)
    user = await store.create_end_user(BUSINESS.business_id, None)
    return (await store.create_conversation(BUSINESS.business_id, user, StageName("default"))).conversation_id


async def until(condition: Callable[[], object]) -> None:
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.005)


def one_end_per_start(events: list[Event]) -> list[Event]:
    """Every ai_start is ended by its own ai_end before the next ai_start; return the ai_ends."""
    ends, open_answer = [], None
    for event in events:
        if event.type is EventType.AI_START:
            assert open_answer is None, f"{event.payload['response_id']} started while {open_answer} was open"
            open_answer = event.payload["response_id"]
        elif event.type is EventType.AI_END:
            assert event.payload["response_id"] == open_answer
            ends.append(event)
            open_answer = None
    return ends


async def test_an_answer_left_open_by_a_dead_owner_is_ended_before_the_next_starts() -> None:
    """An answer started by an instance that then died (its lease is never renewed) is open when
    the user writes again: the new answer waits; the sweep ends the old one as interrupted with
    its text and stores it; then the new one streams."""
    store, broker = MemoryStore(), MemoryBroker()
    cid = await conversation(store)
    recorder = Recorder()
    broker.set_listener(recorder)
    await broker.subscribe(cid)
    service = ConversationService(
        store=store, broker=broker, llm=ScriptedLLM(tokens_per_second=0, tokens=5), settings=FAST
    )
    service.start()
    try:
        # The dead instance: it took the lease, started its answer, streamed a little, and died.
        await broker.open(cid, floor_seq=0)
        dead = ResponseId("dead-answer")
        await broker.hold_lease(AnswerLease(BUSINESS.business_id, cid, dead), FAST.lease_seconds)
        await broker.publish(cid, EventType.AI_START, {"response_id": dead})
        await broker.publish(cid, EventType.DELTA, {"response_id": dead, "text": "half an ans"})

        await service.post_user_message(BUSINESS, cid, "m1", "still there?")
        await until(lambda: len(recorder.of(EventType.AI_END)) == 2)
        ends = one_end_per_start(recorder.events)
        assert [(e.payload["response_id"], e.payload["status"]) for e in ends] == [
            (dead, "interrupted"),
            (ends[1].payload["response_id"], "complete"),
        ]
        assert ends[0].payload["text"] == "half an ans"
        await until(lambda: not service.answering(cid))
        stored = await store.list_messages(BUSINESS.business_id, cid, after_seq=0, limit=10)
        answers = [(m.message_id, m.status, m.text, m.seq) for m in stored if m.role is Role.ASSISTANT]
        assert answers == [
            (e.payload["response_id"], e.payload["status"], e.payload["text"], e.seq) for e in ends
        ]
    finally:
        await service.aclose()


async def test_an_answer_whose_log_was_dropped_is_ended_in_the_new_log_and_stored() -> None:
    """The memory broker drops the least recently used log when it holds too many (as Redis
    loses them when restarted empty): the owner ends its answer in the log opened anew, as
    interrupted with what it had sent, and stores it with that seq."""
    store, broker = MemoryStore(), MemoryBroker(max_conversations=1)
    cid = await conversation(store)
    recorder = Recorder()
    broker.set_listener(recorder)
    await broker.subscribe(cid)
    service = ConversationService(
        store=store, broker=broker, llm=ScriptedLLM(tokens_per_second=100, tokens=300), settings=FAST
    )
    try:
        await service.post_user_message(BUSINESS, cid, "m1", "talk")
        await until(lambda: len(recorder.of(EventType.DELTA)) >= 3)
        start = recorder.of(EventType.AI_START)[0]
        await broker.open(ConversationId("another"), floor_seq=0)  # drops this conversation's log
        await until(lambda: recorder.of(EventType.AI_END))
        end = recorder.of(EventType.AI_END)[0]
        assert end.epoch != start.epoch
        sent = "".join(e.payload["text"] for e in recorder.of(EventType.DELTA) if e.epoch == start.epoch)
        assert (end.payload["response_id"], end.payload["status"], end.payload["text"]) == (
            start.payload["response_id"],
            "interrupted",
            sent,
        )
        await until(lambda: not service.answering(cid))
        stored = await store.list_messages(BUSINESS.business_id, cid, after_seq=0, limit=10)
        answer = next(m for m in stored if m.role is Role.ASSISTANT)
        assert (answer.message_id, answer.status, answer.text, answer.seq) == (
            end.payload["response_id"],
            "interrupted",
            sent,
            end.seq,
        )
        assert len(recorder.of(EventType.AI_END)) == 1
    finally:
        await service.aclose()


async def test_pending_writes_are_retried_until_the_store_takes_them() -> None:
    """A write refused as unavailable is tried again until it goes through; one that cannot
    succeed by waiting is dropped; a later write under the same key replaces a kept one."""
    down = True
    written: list[str] = []

    def write(value: str) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            if down:
                raise Unavailable("the database is away")
            written.append(value)

        return run

    async def never() -> None:
        raise NotFound("that conversation was deleted")

    pending = PendingWrites(what="test write", first_delay=0.01, max_delay=0.05)
    pending.add("a", write("a1"))
    pending.add("gone", never)
    pending.add("a", write("a2"))
    pending.add("b", write("b"))
    await asyncio.sleep(0.1)
    assert written == []
    assert len(pending) == 3
    down = False
    await until(lambda: len(pending) == 0)
    assert written == ["a2", "b"]
    await pending.aclose(grace=1)
