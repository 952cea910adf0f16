"""One Redis subscription per conversation and per business feed on an instance, however many
local sessions watch it: the first subscribes, the last unsubscribes (seen from Redis itself)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import orjson
import pytest
import redis.asyncio

from core.models import Event
from core.types import BusinessId, ConversationId, EventType
from gateway.backends.redis_broker import RedisBroker
from gateway.hub import Hub, View
from tests.databases import delete_redis_keys, redis_url


class Watcher:
    """A local member that records what the hub hands it (as a session would queue it)."""

    def __init__(self, name: str) -> None:
        self.session_id = name
        self.view = View.AGENT
        self.frames: list[str] = []

    def deliver(self, event: Event, frame: str) -> None:
        self.frames.append(frame)

    def resync(self) -> None:
        pass


@pytest.fixture
async def setup() -> AsyncIterator[tuple[Hub, RedisBroker, redis.asyncio.Redis, str]]:
    prefix = f"chatgw-test-{uuid.uuid4().hex[:8]}:"
    broker = RedisBroker(redis_url(), prefix=prefix)
    await broker.connect()
    client = redis.asyncio.Redis.from_url(redis_url())
    yield Hub(broker), broker, client, prefix
    await client.aclose()
    await broker.close()
    delete_redis_keys(prefix)


async def subscribers(client: redis.asyncio.Redis, channel: str) -> int:
    counts = await client.pubsub_numsub(channel)
    return int(counts[0][1])


async def test_subscriptions_are_reference_counted(
    setup: tuple[Hub, RedisBroker, redis.asyncio.Redis, str],
) -> None:
    hub, broker, client, prefix = setup
    conversation, business = ConversationId(str(uuid.uuid4())), BusinessId(str(uuid.uuid4()))
    channel, feed = f"{prefix}conv:{conversation}", f"{prefix}feed:{business}"
    one, two = Watcher("one"), Watcher("two")

    await hub.join(conversation, one)
    await hub.join(conversation, two)
    await hub.join_feed(business, one)
    await hub.join_feed(business, two)
    assert await subscribers(client, channel) == 1
    assert await subscribers(client, feed) == 1

    # An event published to the feed reaches both local feed members, with its conversation.
    await broker.open(conversation, floor_seq=0)
    await broker.publish(conversation, EventType.MESSAGE, {"text": "hi"}, feed=business)
    async with asyncio.timeout(5):
        while len(one.frames) < 2 or len(two.frames) < 2:  # the conversation's event, the feed's
            await asyncio.sleep(0.01)
    frames = [orjson.loads(f) for f in one.frames]
    assert [f for f in frames if f["type"] == "feed"] == [
        {
            "type": "feed",
            "conversation_id": conversation,
            "event": {"type": "message", "seq": 1, "text": "hi"},
        }
    ]
    assert [f for f in frames if f["type"] != "feed"] == [
        {"type": "message", "seq": 1, "text": "hi", "conversation_id": conversation}
    ]

    await hub.leave(conversation, one)
    await hub.leave_feed(business, one)
    assert await subscribers(client, channel) == 1
    assert await subscribers(client, feed) == 1

    await hub.leave(conversation, two)
    await hub.leave_feed(business, two)
    assert await subscribers(client, channel) == 0
    assert await subscribers(client, feed) == 0
