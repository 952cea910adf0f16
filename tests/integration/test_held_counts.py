"""Counts of sockets held open, shared through real Redis (gateway.held, and the limiter on it):
holders stand for gateway instances on one Redis; each test has a key prefix of its own."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
import redis.asyncio
from prometheus_client import CollectorRegistry

from gateway.backends.redis_client import auto_pipelined
from gateway.held import SharedHeld
from gateway.limits import Limit, Limiter, PipelinedRedisStorage, RateLimited
from gateway.settings import LimitSettings
from tests.databases import delete_redis_keys, redis_url


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    name = f"chatgw-test-held-{uuid.uuid4().hex[:8]}:"
    yield name
    await asyncio.to_thread(delete_redis_keys, name)


@pytest.fixture
async def client() -> AsyncIterator[redis.asyncio.Redis]:
    """The kind of client the limiter gives its counts: automatic pipelining on a small pool."""
    made = auto_pipelined(redis_url(), pool_size=4, timeout=5, resend_after_timeout=False)
    yield made
    await made.aclose()


async def test_a_count_is_one_across_holders_and_a_place_let_go_is_free_again(
    client: redis.asyncio.Redis, prefix: str
) -> None:
    a = SharedHeld(client, prefix=prefix)
    b = SharedHeld(client, prefix=prefix)
    first = await a.take("conversation:c1", 2)
    assert first is not None
    assert await b.take("conversation:c1", 2) is not None
    assert await b.take("conversation:c1", 2) is None
    assert await a.take("conversation:c1", 2) is None
    assert await a.take("conversation:c2", 2) is not None  # another key has its own count
    await a.let_go(first)
    assert await b.take("conversation:c1", 2) is not None
    assert await a.take("conversation:c1", 2) is None


async def test_a_dead_holders_places_expire(client: redis.asyncio.Redis, prefix: str) -> None:
    """A holder that stops renewing (its instance died) loses its places within its expiry."""
    dead = SharedHeld(client, prefix=prefix, expiry_s=2)
    live = SharedHeld(client, prefix=prefix)
    assert [await dead.take("ip:203.0.113.1", 2) is not None for _ in range(2)] == [True, True]
    assert await live.take("ip:203.0.113.1", 2) is None
    for _ in range(200):
        place = await live.take("ip:203.0.113.1", 2)
        if place is not None:
            break
        await asyncio.sleep(0.1)
    assert place is not None
    assert await client.zcard(place.key) == 1  # the dead holder's members are gone, not just skipped
    assert 0 < await client.pttl(place.key) <= 60_000


async def test_renewal_pushes_expiry_back_and_does_not_bring_back_a_place_gone(
    client: redis.asyncio.Redis, prefix: str
) -> None:
    held = SharedHeld(client, prefix=prefix)
    kept = await held.take("ip:a", 5)
    gone = await held.take("ip:b", 5)
    assert kept is not None
    assert gone is not None
    assert kept.member
    assert gone.member
    before = await client.zscore(kept.key, kept.member)
    assert before is not None
    await client.zrem(gone.key, gone.member)  # as if it had expired
    await asyncio.sleep(0.2)
    await held.renew()
    after = await client.zscore(kept.key, kept.member)
    assert after is not None
    assert after >= before + 200
    assert await client.zscore(gone.key, gone.member) is None


async def test_a_live_holder_renews_on_its_timer(client: redis.asyncio.Redis, prefix: str) -> None:
    """Places of a running holder outlive their expiry: its timer renews them."""
    live = SharedHeld(client, prefix=prefix, expiry_s=3, renew_s=0.3)
    live.start()
    other = SharedHeld(client, prefix=prefix)
    try:
        assert await live.take("conversation:c", 1) is not None
        await asyncio.sleep(4)
        assert await other.take("conversation:c", 1) is None
    finally:
        await live.close()


def _limiter(prefix: str, **settings: object) -> Limiter:
    return Limiter(
        LimitSettings(**settings),  # type: ignore[arg-type]
        registry=CollectorRegistry(),
        redis_url=redis_url(),
        redis_prefix=prefix,
    )


async def test_two_limiters_on_one_redis_count_open_sockets_together(prefix: str) -> None:
    """Two instances' limiters: an address's and a conversation's open sockets are one count."""
    a = _limiter(prefix, connections_per_ip=2, sockets_per_conversation=1)
    b = _limiter(prefix, connections_per_ip=2, sockets_per_conversation=1)
    await a.connect()
    await b.connect()
    try:
        on_a = await a.open_connection("203.0.113.1")
        await b.open_connection("203.0.113.1")
        with pytest.raises(RateLimited) as refused:
            await b.open_connection("203.0.113.1")
        assert refused.value.limit is Limit.IP_CONNECTIONS
        await b.open_connection("203.0.113.2")
        await a.close_connection(on_a)
        await b.open_connection("203.0.113.1")

        socket = await a.open_conversation_socket("c1")
        with pytest.raises(RateLimited) as refused:
            await b.open_conversation_socket("c1")
        assert refused.value.limit is Limit.CONVERSATION_SOCKETS
        await a.close_conversation_socket(socket)
        await b.open_conversation_socket("c1")
    finally:
        await a.close()
        await b.close()


async def test_shared_rates_are_counted_exactly_through_the_pipelining_client(prefix: str) -> None:
    """Many calls counted at once against one shared rate: exactly the allowed number pass, the
    rest are refused with a wait, and the calls went out gathered in pipelines (fewer round trips
    than commands), through the client the limiter was given."""
    limiter = _limiter(prefix, conversation_messages="30/minute")
    await limiter.connect()
    try:
        outcomes = await asyncio.gather(
            *(limiter.hit(Limit.CONVERSATION_MESSAGES, "c1") for _ in range(50)), return_exceptions=True
        )
        refused = [o for o in outcomes if isinstance(o, RateLimited)]
        assert outcomes.count(None) == 30
        assert len(refused) == 20
        assert all(r.limit is Limit.CONVERSATION_MESSAGES and r.retry_after_ms > 0 for r in refused)
        stats = limiter.transport_stats()
        assert stats["commands"] >= 50
        assert stats["round_trips"] < stats["commands"]
        assert stats["pool_size"] == 16
    finally:
        await limiter.close()
    assert limiter.transport_stats() == {}


async def test_the_limiter_stores_its_counts_on_the_client_it_was_given(prefix: str) -> None:
    storage_client = auto_pipelined(redis_url(), pool_size=2, timeout=5, resend_after_timeout=False)
    try:
        storage = PipelinedRedisStorage(
            "async+" + redis_url(), storage_client, key_prefix=prefix + "limits", wrap_exceptions=True
        )
        assert cast(Any, storage.bridge).get_connection() is storage_client
        assert await storage.acquire_sliding_window_entry("a", 2, 60)
        assert storage_client.commands_sent >= 1
        assert await storage.check()
    finally:
        await storage_client.aclose()
