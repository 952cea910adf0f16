"""The Broker contract (core.broker), run against every Broker implementation."""

from __future__ import annotations

import asyncio

from core.broker import Broker
from core.models import Event
from core.types import ConversationId, EventType, new_id
from tests.contract.conftest import REPLAY_WINDOW


def conv() -> ConversationId:
    return ConversationId(new_id())


class Inbox:
    """A listener that records what it is handed, in order."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.arrived = asyncio.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        self.arrived.set()

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[Event]:
        async with asyncio.timeout(timeout):
            while len(self.events) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return self.events


async def test_seq_counts_up_by_one_per_conversation(broker: Broker) -> None:
    a, b = conv(), conv()
    seqs_a = [(await broker.publish(a, EventType.DELTA, {"text": str(n)})).seq for n in range(3)]
    seqs_b = [(await broker.publish(b, EventType.DELTA, {"text": "x"})).seq for _ in range(2)]
    assert seqs_a == [1, 2, 3]
    assert seqs_b == [1, 2]
    position = await broker.position(a)
    assert position.seq == 3
    assert (await broker.position(a)).epoch == position.epoch


async def test_concurrent_publishes_get_distinct_consecutive_seqs(broker: Broker) -> None:
    c = conv()
    events = await asyncio.gather(*(broker.publish(c, EventType.DELTA, {"n": n}) for n in range(50)))
    assert sorted(e.seq or 0 for e in events) == list(range(1, 51))


async def test_subscribers_get_their_conversations_in_order(broker: Broker) -> None:
    inbox = Inbox()
    broker.set_listener(inbox)
    mine, other = conv(), conv()
    await broker.subscribe(mine)
    for n in range(5):
        await broker.publish(mine, EventType.DELTA, {"n": n})
        await broker.publish(other, EventType.DELTA, {"n": n})
    got = await inbox.wait_for(5)
    assert [e.conversation_id for e in got] == [mine] * 5
    assert [e.seq for e in got] == [1, 2, 3, 4, 5]
    assert [e.payload["n"] for e in got] == [0, 1, 2, 3, 4]


async def test_unsubscribe_stops_delivery(broker: Broker) -> None:
    inbox = Inbox()
    broker.set_listener(inbox)
    c = conv()
    await broker.subscribe(c)
    await broker.publish(c, EventType.DELTA, {"n": 1})
    await inbox.wait_for(1)
    await broker.unsubscribe(c)
    await broker.publish(c, EventType.DELTA, {"n": 2})
    marker = conv()
    await broker.subscribe(marker)
    await broker.publish(marker, EventType.DELTA, {"n": 3})
    got = await inbox.wait_for(2)
    assert [e.payload["n"] for e in got] == [1, 3]


async def test_replay_returns_what_followed_a_seq(broker: Broker) -> None:
    c = conv()
    for n in range(5):
        await broker.publish(c, EventType.DELTA, {"n": n})
    replay = await broker.replay(c, 2)
    assert replay.events is not None
    assert [e.seq for e in replay.events] == [3, 4, 5]
    assert [e.payload["n"] for e in replay.events] == [2, 3, 4]
    assert replay.position.seq == 5
    empty = await broker.replay(c, 5)
    assert empty.events == ()


async def test_replay_outside_the_window_says_reset(broker: Broker) -> None:
    c = conv()
    for n in range(REPLAY_WINDOW + 3):
        await broker.publish(c, EventType.DELTA, {"n": n})
    assert (await broker.replay(c, 0)).events is None
    assert (await broker.replay(c, 2)).events is None
    reachable = await broker.replay(c, 3)
    assert reachable.events is not None
    assert [e.seq for e in reachable.events] == list(range(4, REPLAY_WINDOW + 4))
    assert (await broker.replay(c, REPLAY_WINDOW + 10)).events is None


async def test_ephemeral_events_have_no_seq_and_are_not_replayed(broker: Broker) -> None:
    inbox = Inbox()
    broker.set_listener(inbox)
    c = conv()
    await broker.subscribe(c)
    await broker.publish_ephemeral(c, EventType.TYPING, {"role": "user", "state": True}, origin="s-1")
    got = await inbox.wait_for(1)
    assert got[0].seq is None
    assert got[0].origin == "s-1"
    assert (await broker.position(c)).seq == 0
    assert (await broker.replay(c, 0)).events == ()


async def test_each_conversation_has_an_epoch(broker: Broker) -> None:
    a, b = conv(), conv()
    await broker.publish(a, EventType.DELTA, {})
    epoch_a = (await broker.position(a)).epoch
    assert epoch_a
    assert (await broker.replay(a, 0)).position.epoch == epoch_a
    assert (await broker.position(b)).epoch
