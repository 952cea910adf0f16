"""ConversationService on the in-memory backends: turns, queueing, failures, stop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import pytest

from core.conversation import FAILED_NOTICE, ConversationService, CoreSettings
from core.errors import LLMError, NotFound, TooLarge
from core.llm import ChatMessage, Completion, LLMProvider, Usage
from core.models import Business, Event
from core.scripted_llm import ScriptedLLM
from core.types import BusinessId, ConversationId, EventType, Role, StageName
from gateway.backends.memory_broker import MemoryBroker
from gateway.backends.memory_store import MemoryStore

BUSINESS = Business(
    business_id=BusinessId("b-1"),
    public_id="shop",
    name="Shop",
    system_prompt="You help {{ business_name }}.",
    response_template="Customer says: {{ message }}",
)


class FailingStream:
    """A provider stream that yields `good` pieces and then breaks, like a dropped connection."""

    def __init__(self, good: int) -> None:
        self.good = good
        self.usage: Usage | None = None

    async def __aiter__(self) -> AsyncIterator[str]:
        for n in range(self.good):
            await asyncio.sleep(0)
            yield f"p{n} "
        raise ConnectionResetError("provider went away")

    async def aclose(self) -> None:
        pass


class FailingLLM:
    name = "failing"

    def __init__(self, good: int) -> None:
        self.good = good
        self.prompts: list[Sequence[ChatMessage]] = []

    async def stream(
        self, messages: Sequence[ChatMessage], *, business_id: str | None = None
    ) -> FailingStream:
        self.prompts.append(messages)
        return FailingStream(self.good)

    async def complete(
        self,
        messages: Sequence[ChatMessage],
        *,
        json_schema: Mapping[str, Any] | None = None,
        business_id: str | None = None,
    ) -> Completion:
        raise LLMError("this provider only streams")

    async def close(self) -> None:
        pass


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.ended = asyncio.Event()

    def on_event(self, event: Event) -> None:
        self.events.append(event)
        if event.type is EventType.AI_END:
            self.ended.set()

    def on_gap(self, conversation_id: ConversationId) -> None:
        raise AssertionError("the memory broker never loses events")

    def on_control(self, message: Mapping[str, Any]) -> None:
        pass

    def on_feed(self, business_id: BusinessId, event: Event) -> None:
        pass

    def of(self, kind: EventType) -> list[Event]:
        return [e for e in self.events if e.type is kind]


async def setup(llm: LLMProvider) -> tuple[ConversationService, ConversationId, Recorder, MemoryStore]:
    store, broker = MemoryStore(), MemoryBroker()
    await store.ensure_business(BUSINESS)
    user = await store.create_end_user(BUSINESS.business_id, None)
    conv = await store.create_conversation(BUSINESS.business_id, user, StageName("default"))
    recorder = Recorder()
    broker.set_listener(recorder)
    await broker.subscribe(conv.conversation_id)
    service = ConversationService(
        store=store,
        broker=broker,
        llm=llm,
        settings=CoreSettings(delta_flush_seconds=0.001),
    )
    return service, conv.conversation_id, recorder, store


async def wait_answers(recorder: Recorder, count: int) -> None:
    async with asyncio.timeout(10):
        while len(recorder.of(EventType.AI_END)) < count:
            recorder.ended.clear()
            await recorder.ended.wait()


async def test_the_prompt_renders_the_business_templates() -> None:
    llm = FailingLLM(good=0)
    service, cid, recorder, _ = await setup(llm)
    await service.post_user_message(BUSINESS, cid, "m1", "hello")
    await wait_answers(recorder, 1)
    prompt = llm.prompts[0]
    assert prompt[0] == ChatMessage("system", "You help Shop.")
    assert prompt[-1] == ChatMessage("user", "Customer says: hello")


async def test_a_provider_failure_ends_the_answer_failed_with_the_partial_text() -> None:
    service, cid, recorder, store = await setup(FailingLLM(good=3))
    await service.post_user_message(BUSINESS, cid, "m1", "hello")
    await wait_answers(recorder, 1)
    end = recorder.of(EventType.AI_END)[0]
    assert end.payload["status"] == "failed"
    assert end.payload["text"] == "p0 p1 p2 "
    assert "".join(e.payload["text"] for e in recorder.of(EventType.DELTA)) == "p0 p1 p2 "
    async with asyncio.timeout(5):  # the answer is stored right after its ai_end went out
        while service.answering(cid):
            await asyncio.sleep(0.005)
    stored = await store.list_messages(BUSINESS.business_id, cid, after_seq=0, limit=10)
    answer = next(m for m in stored if m.role is Role.ASSISTANT)
    assert answer.text == "p0 p1 p2 "
    assert answer.seq == end.seq
    # The user is told, by a system message after the failed answer.
    notice = recorder.of(EventType.MESSAGE)[-1]
    assert (notice.payload["role"], notice.payload["text"]) == ("system", FAILED_NOTICE)
    assert (notice.seq or 0) > (end.seq or 0)


async def test_messages_during_an_answer_are_answered_after_it_together() -> None:
    """One answer at a time: messages that arrive while one streams get one answer after it."""
    llm = ScriptedLLM(tokens_per_second=200, tokens=20)
    service, cid, recorder, _ = await setup(llm)
    await service.post_user_message(BUSINESS, cid, "m1", "first")
    async with asyncio.timeout(5):
        while not recorder.of(EventType.DELTA):
            await asyncio.sleep(0.005)
    await service.post_user_message(BUSINESS, cid, "m2", "second")
    await service.post_user_message(BUSINESS, cid, "m3", "third")
    await wait_answers(recorder, 2)
    async with asyncio.timeout(5):
        while service.answering(cid):
            await asyncio.sleep(0.005)
    starts, ends = recorder.of(EventType.AI_START), recorder.of(EventType.AI_END)
    assert len(starts) == len(ends) == 2
    assert ends[0].payload["text"].startswith("You said: Customer says: first.")
    assert ends[1].payload["text"].startswith("You said: Customer says: third.")
    assert (starts[1].seq or 0) > (ends[0].seq or 0)


async def test_stop_ends_the_answer_and_drops_queued_ones() -> None:
    service, cid, recorder, _ = await setup(ScriptedLLM(tokens_per_second=100, tokens=500))
    await service.post_user_message(BUSINESS, cid, "m1", "long")
    await service.post_user_message(BUSINESS, cid, "m2", "queued")
    async with asyncio.timeout(5):
        while not recorder.of(EventType.DELTA):
            await asyncio.sleep(0.01)
    assert service.stop_answer(cid) is True
    await wait_answers(recorder, 1)
    await asyncio.sleep(0.05)
    assert [e.payload["status"] for e in recorder.of(EventType.AI_END)] == ["stopped"]
    assert service.stop_answer(cid) is False


async def test_shutdown_ends_running_answers_as_interrupted() -> None:
    service, cid, recorder, _ = await setup(ScriptedLLM(tokens_per_second=100, tokens=500))
    await service.post_user_message(BUSINESS, cid, "m1", "long")
    async with asyncio.timeout(5):
        while not recorder.of(EventType.DELTA):
            await asyncio.sleep(0.01)
    await service.aclose(grace=5)
    assert [e.payload["status"] for e in recorder.of(EventType.AI_END)] == ["interrupted"]


async def test_bad_messages_are_refused_before_storing() -> None:
    service, cid, recorder, store = await setup(ScriptedLLM(tokens_per_second=0, tokens=3))
    with pytest.raises(TooLarge):
        await service.post_user_message(BUSINESS, cid, "m1", "x" * 5000)
    with pytest.raises(NotFound):
        await service.post_user_message(BUSINESS, ConversationId("nope"), "m1", "hi")
    assert await store.recent_messages(BUSINESS.business_id, cid, limit=10) == []
    assert recorder.events == []


async def test_a_stop_before_the_answer_began_cancels_it() -> None:
    """The user stops right after sending: no answer is generated at all."""
    service, cid, recorder, _ = await setup(ScriptedLLM(tokens_per_second=100, tokens=50))
    await service.post_user_message(BUSINESS, cid, "m1", "never mind")
    assert service.stop_answer(cid) is True
    async with asyncio.timeout(5):
        while service.answering(cid):
            await asyncio.sleep(0.005)
    assert recorder.of(EventType.AI_START) == []
    assert recorder.of(EventType.AI_END) == []


async def test_a_takeover_mid_answer_ends_it_and_no_answer_starts_while_human() -> None:
    """The answer ends taken_over with the text streamed so far (stored so); the user's next
    message is stored and published but not answered; the agent's message goes out as role agent."""
    service, cid, recorder, store = await setup(ScriptedLLM(tokens_per_second=200, tokens=500))
    agent = await store.create_agent(BUSINESS.business_id, "Sam")
    await service.post_user_message(BUSINESS, cid, "m1", "long")
    async with asyncio.timeout(5):
        while len(recorder.of(EventType.DELTA)) < 3:
            await asyncio.sleep(0.005)
    outcome = await service.take_over(BUSINESS, cid, agent.agent_id)
    assert outcome.changed is True
    assert outcome.ended is not None
    end = recorder.of(EventType.AI_END)[0]
    assert end.payload["status"] == "taken_over"
    assert end.payload["text"] == "".join(e.payload["text"] for e in recorder.of(EventType.DELTA))
    assert recorder.events[-1].type is EventType.MODE
    async with asyncio.timeout(5):
        while service.answering(cid):
            await asyncio.sleep(0.005)
    deltas = len(recorder.of(EventType.DELTA))
    stored = await store.list_messages(BUSINESS.business_id, cid, after_seq=0, limit=10)
    answer = next(m for m in stored if m.role is Role.ASSISTANT)
    assert (answer.status, answer.text, answer.seq) == ("taken_over", end.payload["text"], end.seq)
    conversation = await store.get_conversation(BUSINESS.business_id, cid)
    assert (conversation.mode, conversation.agent_id) == ("human", agent.agent_id)

    await service.post_user_message(BUSINESS, cid, "m2", "hello?")
    ack = await service.post_agent_message(BUSINESS, cid, agent.agent_id, "a1", "Sam here.")
    await asyncio.sleep(0.05)
    assert len(recorder.of(EventType.AI_START)) == 1
    assert len(recorder.of(EventType.DELTA)) == deltas
    said = recorder.of(EventType.MESSAGE)[-1]
    assert (said.payload["role"], said.payload["text"], said.seq) == ("agent", "Sam here.", ack.seq)
    audit = await store.list_audit(BUSINESS.business_id, limit=10)
    actions = {record.entry.action_type for record in audit}
    assert {"conversation.takeover", "agent.message"} <= actions


async def test_a_handback_answers_a_waiting_user_with_the_agents_words_in_the_prompt() -> None:
    llm = FailingLLM(good=1)
    service, cid, recorder, store = await setup(llm)
    agent = await store.create_agent(BUSINESS.business_id, "Sam")
    await service.take_over(BUSINESS, cid, agent.agent_id)
    await service.post_user_message(BUSINESS, cid, "m1", "do you ship to Norway?")
    await service.post_agent_message(BUSINESS, cid, agent.agent_id, "a1", "Yes, in three days.")
    assert await service.hand_back(BUSINESS, cid, agent.agent_id) is False  # the agent spoke last
    await service.take_over(BUSINESS, cid, agent.agent_id)
    await service.post_user_message(BUSINESS, cid, "m2", "and to Sweden?")
    assert await service.hand_back(BUSINESS, cid, agent.agent_id) is True  # the user waits
    await wait_answers(recorder, 1)
    prompt = llm.prompts[-1]
    assert ChatMessage("assistant", "Yes, in three days.") in prompt
    assert prompt[-1] == ChatMessage("user", "Customer says: and to Sweden?")
