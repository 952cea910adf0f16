"""Counts of sockets held open, shared through real Redis (gateway.held, and the limiter on it):
holders stand for gateway instances on one Redis; each test has a key prefix of its own."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio
from prometheus_client import CollectorRegistry

from gateway.held import SharedHeld
from gateway.limits import Limit, Limiter, RateLimited
from gateway.settings import LimitSettings
from tests.databases import delete_redis_keys, redis_url


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    name = f"chatgw-test-held-{uuid.uuid4().hex[:8]}:"
    yield name
    await asyncio.to_thread(delete_redis_keys, name)


@pytest.fixture
async def pool() -> AsyncIterator[redis.asyncio.BlockingConnectionPool]:
    made = redis.asyncio.BlockingConnectionPool.from_url(redis_url(), max_connections=4, timeout=5)
    yield made
    await made.aclose()


async def test_a_count_is_one_across_holders_and_a_place_let_go_is_free_again(
    pool: redis.asyncio.BlockingConnectionPool, prefix: str
) -> None:
    a = SharedHeld(pool, prefix=prefix)
    b = SharedHeld(pool, prefix=prefix)
    first = await a.take("conversation:c1", 2)
    assert first is not None
    assert await b.take("conversation:c1", 2) is not None
    assert await b.take("conversation:c1", 2) is None
    assert await a.take("conversation:c1", 2) is None
    assert await a.take("conversation:c2", 2) is not None  # another key has its own count
    await a.let_go(first)
    assert await b.take("conversation:c1", 2) is not None
    assert await a.take("conversation:c1", 2) is None


async def test_a_dead_holders_places_expire(pool: redis.asyncio.BlockingConnectionPool, prefix: str) -> None:
    """A holder that stops renewing (its instance died) loses its places within its expiry."""
    dead = SharedHeld(pool, prefix=prefix, expiry_s=2)
    live = SharedHeld(pool, prefix=prefix)
    assert [await dead.take("ip:203.0.113.1", 2) is not None for _ in range(2)] == [True, True]
    assert await live.take("ip:203.0.113.1", 2) is None
    for _ in range(200):
        place = await live.take("ip:203.0.113.1", 2)
        if place is not None:
            break
        await asyncio.sleep(0.1)
    assert place is not None
    client = redis.asyncio.Redis(connection_pool=pool)
    assert await client.zcard(place.key) == 1  # the dead holder's members are gone, not just skipped
    assert 0 < await client.pttl(place.key) <= 60_000


async def test_renewal_pushes_expiry_back_and_does_not_bring_back_a_place_gone(
    pool: redis.asyncio.BlockingConnectionPool, prefix: str
) -> None:
    held = SharedHeld(pool, prefix=prefix)
    kept = await held.take("ip:a", 5)
    gone = await held.take("ip:b", 5)
    assert kept is not None
    assert gone is not None
    assert kept.member
    assert gone.member
    client = redis.asyncio.Redis(connection_pool=pool)
    before = await client.zscore(kept.key, kept.member)
    assert before is not None
    await client.zrem(gone.key, gone.member)  # as if it had expired
    await asyncio.sleep(0.2)
    await held.renew()
    after = await client.zscore(kept.key, kept.member)
    assert after is not None
    assert after >= before + 200
    assert await client.zscore(gone.key, gone.member) is None


async def test_a_live_holder_renews_on_its_timer(
    pool: redis.asyncio.BlockingConnectionPool, prefix: str
) -> None:
    """Places of a running holder outlive their expiry: its timer renews them."""
    live = SharedHeld(pool, prefix=prefix, expiry_s=3, renew_s=0.3)
    live.start()
    other = SharedHeld(pool, prefix=prefix)
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
