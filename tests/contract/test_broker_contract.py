"""The Broker contract (core.broker), run against every Broker implementation."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest

from core.broker import (
    AnswerBusy,
    AnswerEnded,
    AnswerLease,
    Broker,
    HeldByAgent,
    HumanMode,
    NotHuman,
    StreamMissing,
)
from core.models import Event
from core.types import AgentId, AnswerStatus, BusinessId, ConversationId, EventType, Mode, ResponseId, new_id
from tests.contract.conftest import REPLAY_WINDOW


def conv() -> ConversationId:
    return ConversationId(new_id())


async def opened(broker: Broker, floor_seq: int = 0) -> ConversationId:
    c = conv()
    await broker.open(c, floor_seq=floor_seq)
    return c


class Inbox:
    """A listener that records what it is handed, in order."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.gaps: list[ConversationId] = []
        self.controls: list[dict[str, Any]] = []
        self.feed: list[tuple[BusinessId, Event]] = []
        self.arrived = asyncio.Event()

    def on_event(self, event: Event) -> None:
        self.events.append(event)
        self.arrived.set()

    def on_gap(self, conversation_id: ConversationId) -> None:
        self.gaps.append(conversation_id)

    def on_control(self, message: Mapping[str, Any]) -> None:
        self.controls.append(dict(message))
        self.arrived.set()

    def on_feed(self, business_id: BusinessId, event: Event) -> None:
        self.feed.append((business_id, event))
        self.arrived.set()

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[Event]:
        async with asyncio.timeout(timeout):
            while len(self.events) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return self.events


async def test_seq_counts_up_by_one_per_conversation(broker: Broker) -> None:
    a, b = await opened(broker), await opened(broker)
    seqs_a = [(await broker.publish(a, EventType.MESSAGE, {"text": str(n)})).seq for n in range(3)]
    seqs_b = [(await broker.publish(b, EventType.MESSAGE, {"text": "x"})).seq for _ in range(2)]
    assert seqs_a == [1, 2, 3]
    assert seqs_b == [1, 2]
    position = await broker.open(a, floor_seq=0)
    assert position.seq == 3
    assert (await broker.open(a, floor_seq=100)) == position  # an existing log is left as it is


async def test_concurrent_publishes_get_distinct_consecutive_seqs(broker: Broker) -> None:
    c = await opened(broker)
    events = await asyncio.gather(*(broker.publish(c, EventType.MESSAGE, {"n": n}) for n in range(50)))
    assert sorted(e.seq or 0 for e in events) == list(range(1, 51))


async def test_subscribers_get_their_conversations_in_order(broker: Broker) -> None:
    inbox = Inbox()
    broker.set_listener(inbox)
    mine, other = await opened(broker), await opened(broker)
    await broker.subscribe(mine)
    for n in range(5):
        await broker.publish(mine, EventType.MESSAGE, {"n": n})
        await broker.publish(other, EventType.MESSAGE, {"n": n})
    got = await inbox.wait_for(5)
    assert [e.conversation_id for e in got] == [mine] * 5
    assert [e.seq for e in got] == [1, 2, 3, 4, 5]
    assert [e.payload["n"] for e in got] == [0, 1, 2, 3, 4]


async def test_unsubscribe_stops_delivery(broker: Broker) -> None:
    inbox = Inbox()
    broker.set_listener(inbox)
    c = await opened(broker)
    await broker.subscribe(c)
    await broker.publish(c, EventType.MESSAGE, {"n": 1})
    await inbox.wait_for(1)
    await broker.unsubscribe(c)
    await broker.publish(c, EventType.MESSAGE, {"n": 2})
    marker = await opened(broker)
    await broker.subscribe(marker)
    await broker.publish(marker, EventType.MESSAGE, {"n": 3})
    got = await inbox.wait_for(2)
    assert [e.payload["n"] for e in got] == [1, 3]


async def test_replay_returns_what_followed_a_seq(broker: Broker) -> None:
    c = await opened(broker)
    for n in range(5):
        await broker.publish(c, EventType.MESSAGE, {"n": n})
    replay = await broker.replay(c, 2)
    assert replay.events is not None
    assert [e.seq for e in replay.events] == [3, 4, 5]
    assert [e.payload["n"] for e in replay.events] == [2, 3, 4]
    assert replay.position.seq == 5
    empty = await broker.replay(c, 5)
    assert empty.events == ()


async def test_replay_outside_the_window_says_reset(broker: Broker) -> None:
    c = await opened(broker)
    for n in range(REPLAY_WINDOW + 3):
        await broker.publish(c, EventType.MESSAGE, {"n": n})
    assert (await broker.replay(c, 0)).events is None
    assert (await broker.replay(c, 2)).events is None
    reachable = await broker.replay(c, 3)
    assert reachable.events is not None
    assert [e.seq for e in reachable.events] == list(range(4, REPLAY_WINDOW + 4))
    assert (await broker.replay(c, REPLAY_WINDOW + 10)).events is None


async def test_ephemeral_events_have_no_seq_and_are_not_replayed(broker: Broker) -> None:
    inbox = Inbox()
    broker.set_listener(inbox)
    c = await opened(broker)
    await broker.subscribe(c)
    await broker.publish_ephemeral(c, EventType.TYPING, {"role": "user", "state": True}, origin="s-1")
    got = await inbox.wait_for(1)
    assert got[0].seq is None
    assert got[0].origin == "s-1"
    assert (await broker.open(c, floor_seq=0)).seq == 0
    assert (await broker.replay(c, 0)).events == ()


async def test_each_conversation_has_an_epoch(broker: Broker) -> None:
    a, b = await opened(broker), await opened(broker)
    await broker.publish(a, EventType.MESSAGE, {})
    epoch_a = (await broker.open(a, floor_seq=0)).epoch
    assert epoch_a
    assert (await broker.replay(a, 0)).position.epoch == epoch_a
    assert (await broker.open(b, floor_seq=0)).epoch != epoch_a


async def test_a_log_must_be_opened_and_starts_after_the_floor(broker: Broker) -> None:
    """publish and replay refuse a conversation without a log; open starts it after floor_seq."""
    c = conv()
    with pytest.raises(StreamMissing):
        await broker.publish(c, EventType.MESSAGE, {})
    with pytest.raises(StreamMissing):
        await broker.replay(c, 0)
    position = await broker.open(c, floor_seq=41)
    assert position.seq == 41
    assert (await broker.publish(c, EventType.MESSAGE, {})).seq == 42
    replay = await broker.replay(c, 41)
    assert replay.events is not None
    assert [e.seq for e in replay.events] == [42]
    assert (await broker.replay(c, 40)).events is None


async def test_an_answer_ends_once_and_nothing_of_it_follows_its_end(broker: Broker) -> None:
    """ai_start makes the answer active; deltas and ai_end of another or an ended answer are refused."""
    c = await opened(broker)
    await broker.publish(c, EventType.AI_START, {"response_id": "r1"})
    await broker.publish(c, EventType.DELTA, {"response_id": "r1", "text": "a"})
    with pytest.raises(AnswerEnded):
        await broker.publish(c, EventType.DELTA, {"response_id": "other", "text": "x"})
    await broker.publish(c, EventType.AI_END, {"response_id": "r1", "text": "a"})
    with pytest.raises(AnswerEnded):
        await broker.publish(c, EventType.DELTA, {"response_id": "r1", "text": "late"})
    with pytest.raises(AnswerEnded):
        await broker.publish(c, EventType.AI_END, {"response_id": "r1", "text": "again"})
    await broker.publish(c, EventType.AI_START, {"response_id": "r2"})
    with pytest.raises(AnswerEnded):
        await broker.publish(c, EventType.DELTA, {"response_id": "r1", "text": "zombie"})
    replay = await broker.replay(c, 0)
    assert replay.events is not None
    assert [(e.type.value, e.payload.get("text")) for e in replay.events] == [
        ("ai_start", None),
        ("delta", "a"),
        ("ai_end", "a"),
        ("ai_start", None),
    ]
    assert [e.seq for e in replay.events] == [1, 2, 3, 4]


async def test_end_answer_publishes_the_text_streamed_so_far_once(broker: Broker) -> None:
    """Anyone may end the active answer; its ai_end carries the deltas joined; a second end gets None."""
    c = await opened(broker)
    await broker.publish(c, EventType.AI_START, {"response_id": "r1"})
    await broker.publish(c, EventType.DELTA, {"response_id": "r1", "text": "Hel"})
    await broker.publish(c, EventType.DELTA, {"response_id": "r1", "text": "lo"})
    assert await broker.end_answer(c, AnswerStatus.STOPPED, response_id=ResponseId("other")) is None
    event = await broker.end_answer(c, AnswerStatus.STOPPED)
    assert event is not None
    assert event.type is EventType.AI_END
    assert event.seq == 4
    assert event.payload == {"response_id": "r1", "message_id": "r1", "status": "stopped", "text": "Hello"}
    assert await broker.end_answer(c, AnswerStatus.INTERRUPTED) is None
    with pytest.raises(AnswerEnded):
        await broker.publish(c, EventType.DELTA, {"response_id": "r1", "text": "late"})
    replay = await broker.replay(c, 3)
    assert replay.events is not None
    assert [e.payload for e in replay.events] == [event.payload]
    # The next answer starts with an empty text.
    await broker.publish(c, EventType.AI_START, {"response_id": "r2"})
    second = await broker.end_answer(c, AnswerStatus.COMPLETE, response_id=ResponseId("r2"))
    assert second is not None
    assert second.payload["text"] == ""


async def test_no_second_answer_starts_while_one_is_active(broker: Broker) -> None:
    """An ai_start while another answer is active is refused (no seq taken), also when many race;
    once the active answer ended, by whoever, the next one starts."""
    c = await opened(broker)
    await broker.publish(c, EventType.AI_START, {"response_id": "r1"})
    await broker.publish(c, EventType.DELTA, {"response_id": "r1", "text": "kept"})
    with pytest.raises(AnswerBusy):
        await broker.publish(c, EventType.AI_START, {"response_id": "r2"})
    assert (await broker.open(c, floor_seq=0)).seq == 2
    # The refused start did not touch the active answer: it ends with its own text.
    await broker.publish(c, EventType.DELTA, {"response_id": "r1", "text": " all"})
    ended = await broker.end_answer(c, AnswerStatus.INTERRUPTED, response_id=ResponseId("r1"))
    assert ended is not None
    assert (ended.seq, ended.payload["text"]) == (4, "kept all")

    async def start(rid: str) -> str | None:
        try:
            await broker.publish(c, EventType.AI_START, {"response_id": rid})
        except AnswerBusy:
            return None
        return rid

    started = [rid for rid in await asyncio.gather(*(start(f"s{n}") for n in range(5))) if rid]
    assert len(started) == 1
    replay = await broker.replay(c, 4)
    assert replay.events is not None
    assert [(e.type, e.payload["response_id"]) for e in replay.events] == [(EventType.AI_START, started[0])]


async def test_an_answer_whose_log_was_lost_is_ended_in_the_new_log(broker: Broker) -> None:
    """end_lost_answer publishes the ai_end of an answer of another (lost) epoch once, whatever
    answer is active now; in the answer's own epoch it publishes nothing."""
    c = await opened(broker)
    epoch = (await broker.open(c, floor_seq=0)).epoch
    started = await broker.publish(c, EventType.AI_START, {"response_id": "r1"})
    assert started.epoch == epoch
    same = await broker.end_lost_answer(
        c, started_epoch=epoch, response_id=ResponseId("r1"), status=AnswerStatus.INTERRUPTED, text="x"
    )
    assert same is None  # its log is still there: it is ended through end_answer
    await broker.publish(c, EventType.DELTA, {"response_id": "r1", "text": "still on"})
    lost = await broker.end_lost_answer(
        c,
        started_epoch="an-epoch-that-is-gone",
        response_id=ResponseId("r0"),
        status=AnswerStatus.INTERRUPTED,
        text="what the owner streamed",
    )
    assert lost is not None
    assert (lost.type, lost.seq, lost.epoch) == (EventType.AI_END, 3, epoch)
    assert lost.payload == {
        "response_id": "r0",
        "message_id": "r0",
        "status": "interrupted",
        "text": "what the owner streamed",
    }
    # The active answer of this log goes on untouched.
    await broker.publish(c, EventType.DELTA, {"response_id": "r1", "text": "!"})
    ended = await broker.end_answer(c, AnswerStatus.COMPLETE, response_id=ResponseId("r1"))
    assert ended is not None
    assert ended.payload["text"] == "still on!"
    replay = await broker.replay(c, 0)
    assert replay.events is not None
    assert [(e.seq, e.type, e.payload["response_id"]) for e in replay.events] == [
        (1, EventType.AI_START, "r1"),
        (2, EventType.DELTA, "r1"),
        (3, EventType.AI_END, "r0"),
        (4, EventType.DELTA, "r1"),
        (5, EventType.AI_END, "r1"),
    ]
    with pytest.raises(StreamMissing):
        await broker.end_lost_answer(
            conv(), started_epoch=epoch, response_id=ResponseId("r9"), status=AnswerStatus.FAILED, text=""
        )


async def test_takeover_ends_the_answer_and_switches_the_mode_in_one_step(broker: Broker) -> None:
    """A takeover publishes the answer's ai_end (taken_over, the text so far) then mode, with
    consecutive seqs; the answer's later deltas and ai_end are refused."""
    c = await opened(broker)
    await broker.publish(c, EventType.AI_START, {"response_id": "r1"})
    await broker.publish(c, EventType.DELTA, {"response_id": "r1", "text": "Hal"})
    await broker.publish(c, EventType.DELTA, {"response_id": "r1", "text": "f é"})
    done = await broker.take_over(c, AgentId("agent-1"))
    assert done.ended is not None
    assert done.mode is not None
    assert done.ended.payload == {
        "response_id": "r1",
        "message_id": "r1",
        "status": "taken_over",
        "text": "Half é",
    }
    assert done.mode.payload == {"mode": "human", "agent_id": "agent-1"}
    assert (done.ended.seq, done.mode.seq) == (4, 5)
    with pytest.raises(AnswerEnded):
        await broker.publish(c, EventType.DELTA, {"response_id": "r1", "text": "late"})
    with pytest.raises(AnswerEnded):
        await broker.publish(c, EventType.AI_END, {"response_id": "r1", "text": "late"})
    assert await broker.end_answer(c, AnswerStatus.COMPLETE, response_id=ResponseId("r1")) is None
    replay = await broker.replay(c, 3)
    assert replay.events is not None
    assert [e.type for e in replay.events] == [EventType.AI_END, EventType.MODE]


async def test_no_answer_starts_while_an_agent_holds_the_conversation(broker: Broker) -> None:
    """ai_start is refused while human (nothing is published); after a handback it is accepted."""
    c = await opened(broker)
    done = await broker.take_over(c, AgentId("a1"))
    assert done.ended is None  # nothing streamed: the mode just switches
    assert done.mode is not None
    assert done.mode.seq == 1
    with pytest.raises(HumanMode):
        await broker.publish(c, EventType.AI_START, {"response_id": "r1"})
    assert (await broker.open(c, floor_seq=0)).seq == 1  # the refused start took no seq
    # Other events go on while human.
    await broker.publish(c, EventType.MESSAGE, {"text": "hi"})
    event, holder = await broker.hand_back(c)
    assert holder == "a1"
    assert event.payload == {"mode": "ai", "agent_id": None}
    assert event.seq == 3
    with pytest.raises(NotHuman):
        await broker.hand_back(c)
    assert (await broker.publish(c, EventType.AI_START, {"response_id": "r2"})).seq == 4


async def test_takeover_is_idempotent_for_the_holder_and_refused_for_others(broker: Broker) -> None:
    c = await opened(broker)
    await broker.take_over(c, AgentId("a1"))
    again = await broker.take_over(c, AgentId("a1"))
    assert (again.ended, again.mode) == (None, None)
    with pytest.raises(HeldByAgent) as refused:
        await broker.take_over(c, AgentId("a2"))
    assert refused.value.holder == "a1"
    assert (await broker.open(c, floor_seq=0)).seq == 1


async def test_racing_takeovers_and_stops_end_an_answer_once(broker: Broker) -> None:
    """Of many concurrent takeovers and stops, exactly one ends the answer; one agent gets the
    conversation and every other agent is refused naming it."""
    c = await opened(broker)
    await broker.publish(c, EventType.AI_START, {"response_id": "r1"})
    await broker.publish(c, EventType.DELTA, {"response_id": "r1", "text": "x"})
    agents = [AgentId(f"a{n}") for n in range(6)]

    async def take(agent: AgentId) -> AgentId | None:
        try:
            await broker.take_over(c, agent)
        except HeldByAgent as exc:
            return exc.holder
        return agent

    results = await asyncio.gather(
        *(take(a) for a in agents), *(broker.end_answer(c, AnswerStatus.STOPPED) for _ in range(3))
    )
    holders = set(results[:6])
    assert len(holders) == 1
    replay = await broker.replay(c, 2)
    assert replay.events is not None
    ends = [e for e in replay.events if e.type is EventType.AI_END]
    modes = [e for e in replay.events if e.type is EventType.MODE]
    assert len(ends) == 1
    assert ends[0].payload["status"] in ("stopped", "taken_over")
    assert [m.payload["agent_id"] for m in modes] == list(holders)


async def test_a_log_opened_again_keeps_the_mode_it_is_given(broker: Broker) -> None:
    c = conv()
    await broker.open(c, floor_seq=7, mode=Mode.HUMAN, agent_id=AgentId("a9"))
    with pytest.raises(HumanMode):
        await broker.publish(c, EventType.AI_START, {"response_id": "r1"})
    with pytest.raises(HeldByAgent):
        await broker.take_over(c, AgentId("a1"))
    event, holder = await broker.hand_back(c)
    assert (event.seq, holder) == (8, "a9")


async def test_mode_changes_and_takeovers_reach_the_feed(broker: Broker) -> None:
    inbox = Inbox()
    broker.set_listener(inbox)
    business = BusinessId(new_id())
    await broker.subscribe_feed(business)
    c = await opened(broker)
    await broker.publish(c, EventType.AI_START, {"response_id": "r1"}, feed=business)
    await broker.take_over(c, AgentId("a1"), feed=business)
    await broker.hand_back(c, feed=business)
    async with asyncio.timeout(5):
        while len(inbox.feed) < 4:
            inbox.arrived.clear()
            await inbox.arrived.wait()
    assert [(e.type, e.seq) for _, e in inbox.feed] == [
        (EventType.AI_START, 1),
        (EventType.AI_END, 2),
        (EventType.MODE, 3),
        (EventType.MODE, 4),
    ]


async def test_leases_expire_and_go_to_one_claimer(broker: Broker) -> None:
    """A lease not renewed expires; concurrent claimers get each expired lease exactly once."""
    c = await opened(broker)
    short = AnswerLease(BusinessId("b"), c, ResponseId("r-short"))
    held = AnswerLease(BusinessId("b"), c, ResponseId("r-held"))
    dropped = AnswerLease(BusinessId("b"), c, ResponseId("r-dropped"))
    await broker.hold_lease(short, 0.05)
    await broker.hold_lease(held, 30)
    await broker.hold_lease(dropped, 0.05)
    await broker.drop_lease(dropped)
    assert await broker.claim_expired_leases(10) == []
    await asyncio.sleep(0.15)
    claims = await asyncio.gather(*(broker.claim_expired_leases(10) for _ in range(5)))
    assert [lease for claim in claims for lease in claim] == [short]
    await broker.hold_lease(held, 0.01)  # renewing moves the deadline, either way
    await asyncio.sleep(0.1)
    assert await broker.claim_expired_leases(10) == [held]


async def test_renew_leases_renews_all_held_leases_in_one_call(broker: Broker) -> None:
    """One call renews every lease still held; a dropped or claimed lease is not taken again and
    comes back as lost, in the order given."""
    c = await opened(broker)
    leases = [AnswerLease(BusinessId("b"), c, ResponseId(f"r-{n}")) for n in range(300)]
    for lease in leases:
        await broker.hold_lease(lease, 0.05)
    dropped = leases[7]
    await broker.drop_lease(dropped)
    await asyncio.sleep(0.15)  # every lease expired: one claimer takes one of them
    claims = await broker.claim_expired_leases(1)
    assert len(claims) == 1
    claimed = claims[0]
    lost = await broker.renew_leases(leases, 30)
    assert lost == sorted([dropped, claimed], key=leases.index)
    assert await broker.claim_expired_leases(1000) == []  # the rest are held again, for 30 s
    assert await broker.renew_leases([], 30) == []
    # Renewed for a short time, they expire again; the lost ones stay gone.
    assert await broker.renew_leases(leases, 0.01) == sorted([dropped, claimed], key=leases.index)
    await asyncio.sleep(0.1)
    expired = await broker.claim_expired_leases(1000)
    assert sorted(expired, key=leases.index) == [x for x in leases if x not in (dropped, claimed)]


async def test_control_messages_reach_the_listener(broker: Broker) -> None:
    inbox = Inbox()
    broker.set_listener(inbox)
    await broker.publish_control({"type": "flow_changed", "business_id": "b-1"})
    async with asyncio.timeout(5):
        while not inbox.controls:
            inbox.arrived.clear()
            await inbox.arrived.wait()
    assert inbox.controls == [{"type": "flow_changed", "business_id": "b-1"}]


async def test_the_business_feed_carries_what_is_published_to_it(broker: Broker) -> None:
    """Events published with feed=B reach B's feed subscribers, with their conversation; others do not."""
    inbox = Inbox()
    broker.set_listener(inbox)
    mine, theirs = BusinessId("biz-mine"), BusinessId("biz-theirs")
    await broker.subscribe_feed(mine)
    c = await opened(broker)
    await broker.publish(c, EventType.MESSAGE, {"n": 1}, feed=mine)
    await broker.publish(c, EventType.MESSAGE, {"n": 2}, feed=theirs)
    await broker.publish(c, EventType.MESSAGE, {"n": 3})
    await broker.publish(c, EventType.AI_START, {"response_id": "r"}, feed=mine)
    ended = await broker.end_answer(c, AnswerStatus.COMPLETE, feed=mine)
    assert ended is not None
    async with asyncio.timeout(5):
        while len(inbox.feed) < 3:
            inbox.arrived.clear()
            await inbox.arrived.wait()
    assert [(b, e.conversation_id, e.type.value, e.seq) for b, e in inbox.feed] == [
        (mine, c, "message", 1),
        (mine, c, "ai_start", 4),
        (mine, c, "ai_end", 5),
    ]
    await broker.unsubscribe_feed(mine)
    await broker.publish(c, EventType.MESSAGE, {"n": 6}, feed=mine)
    marker = await opened(broker)
    await broker.subscribe(marker)
    await broker.publish(marker, EventType.MESSAGE, {"n": "marker"})
    async with asyncio.timeout(5):
        while not any(e.conversation_id == marker for e in inbox.events):
            inbox.arrived.clear()
            await inbox.arrived.wait()
    assert len(inbox.feed) == 3


async def test_presence_says_when_the_first_member_comes_and_the_last_leaves(broker: Broker) -> None:
    c, other = conv(), conv()
    assert await broker.set_presence(c, "s1", True) is True
    assert await broker.set_presence(c, "s2", True) is False
    await broker.renew_presence({"s1": c, "s2": c})
    assert await broker.present([c, other]) == {c}
    assert await broker.set_presence(c, "s1", False) is False
    assert await broker.set_presence(c, "s1", False) is False  # leaving twice changes nothing
    assert await broker.set_presence(c, "s2", False) is True
    assert await broker.present([c, other]) == set()


async def test_feed_only_events_reach_the_feed_without_a_seq(broker: Broker) -> None:
    inbox = Inbox()
    broker.set_listener(inbox)
    business = BusinessId(new_id())
    await broker.subscribe_feed(business)
    c = conv()
    await broker.publish_feed(business, c, EventType.PRESENCE, {"online": True})
    async with asyncio.timeout(5):
        while not inbox.feed:
            inbox.arrived.clear()
            await inbox.arrived.wait()
    (bid, event), *_ = inbox.feed
    assert (bid, event.conversation_id, event.type, event.seq) == (business, c, EventType.PRESENCE, None)
    assert event.payload == {"online": True}
    assert inbox.events == []  # not an event of the conversation's own channel
