"""The Redis transport of both Redis backends (gateway.backends.redis_client) against real Redis:
automatic pipelining with per-call results, the bounded blocking pool, and redis-py exceptions
translated into the core's, with the failures provoked for real on throwaway servers (a replica
during a failover, a server busy with a slow script, out of memory, an emptied script cache, a
paused server). Nothing here is mocked."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis.asyncio
from redis.exceptions import (
    BusyLoadingError,
    MasterDownError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from core.broker import AnswerEnded, AnswerLease, StreamMissing
from core.errors import CoreError, Unavailable
from core.models import Business
from core.types import AnswerStatus, BusinessId, ConversationId, EventType, ResponseId, StageName, new_id
from gateway.backends.memory_store import MemoryStore
from gateway.backends.redis_broker import RedisBroker
from gateway.backends.redis_client import AutoPipelineRedis, auto_pipelined, translate
from gateway.backends.redis_state import CachedStore, RedisStateCache
from tests.databases import redis_url


@pytest.fixture
async def admin(own_redis: str) -> AsyncIterator[redis.asyncio.Redis]:
    """A plain client of the test's own on the throwaway server, to change its state."""
    client = redis.asyncio.Redis.from_url(own_redis, socket_timeout=10)
    yield client
    await client.aclose()


@pytest.fixture
async def client() -> AsyncIterator[AutoPipelineRedis]:
    pipelined = auto_pipelined(redis_url(), pool_size=4, timeout=5, resend_after_timeout=False)
    yield pipelined
    await pipelined.aclose()


async def broker_on(url: str, pool_size: int = 4) -> RedisBroker:
    broker = RedisBroker(url, prefix=f"chatgw-test-{uuid.uuid4().hex[:8]}:", pool_size=pool_size)
    await broker.connect()
    return broker


async def opened(broker: RedisBroker) -> ConversationId:
    cid = ConversationId(new_id())
    await broker.open(cid, floor_seq=0)
    return cid


def key() -> str:
    return f"chatgw-test-{uuid.uuid4().hex}"


# -- automatic pipelining -------------------------------------------------------------------------


async def test_calls_of_one_tick_go_out_as_one_pipeline_each_with_its_own_reply(
    client: AutoPipelineRedis,
) -> None:
    """The first call of a quiet client goes at once; the 49 made with it, as one pipeline."""
    keys = [key() for _ in range(50)]
    before = (client.commands_sent, client.pipelines_sent)
    assert await asyncio.gather(*(client.set(k, n) for n, k in enumerate(keys)))
    assert await asyncio.gather(*(client.get(k) for k in keys)) == [str(n).encode() for n in range(50)]
    assert (client.commands_sent - before[0], client.pipelines_sent - before[1]) == (100, 4)
    await client.delete(*keys)


async def test_an_error_reply_fails_its_own_call_only(client: AutoPipelineRedis) -> None:
    text, counter = key(), key()
    await client.set(text, "not a number")
    before = client.pipelines_sent
    results = await asyncio.gather(
        client.incr(counter),  # goes at once; the others, together
        client.incr(text),  # ERR value is not an integer
        client.evalsha("0" * 40, 0),  # NOSCRIPT
        client.incr(counter),
        return_exceptions=True,
    )
    assert client.pipelines_sent - before == 2
    assert results[0] == 1
    assert type(results[1]) is ResponseError
    assert isinstance(results[2], NoScriptError)
    assert results[3] == 2
    await client.delete(text, counter)


async def test_a_call_cancelled_before_its_pipeline_left_is_not_sent(client: AutoPipelineRedis) -> None:
    counter = key()
    busy = asyncio.ensure_future(client.ping())  # goes at once: the next call queues behind it
    call = asyncio.ensure_future(client.incr(counter))
    await asyncio.sleep(0)  # the call is queued; its pipeline leaves on the next turn of the loop
    call.cancel()
    assert await busy is True
    await asyncio.gather(call, return_exceptions=True)
    assert call.cancelled()
    assert await client.get(counter) is None


async def test_concurrent_publishes_keep_their_order_and_their_own_refusals() -> None:
    """Publishes of many answers issued together: each conversation's events get the seqs in the
    order they were issued; a refused one (an ended answer, a log never opened) fails alone."""
    broker = await broker_on(redis_url())
    try:
        conversations = [await opened(broker) for _ in range(20)]
        for cid in conversations:
            await broker.publish(cid, EventType.AI_START, {"response_id": f"r-{cid}"})
        ended = await opened(broker)
        missing = ConversationId(new_id())
        calls = [
            broker.publish(cid, EventType.DELTA, {"response_id": f"r-{cid}", "text": f"{n}"})
            for n in range(10)
            for cid in conversations
        ]
        calls.insert(55, broker.publish(ended, EventType.DELTA, {"response_id": "gone", "text": "x"}))
        calls.insert(130, broker.publish(missing, EventType.MESSAGE, {"text": "x"}))
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert isinstance(results.pop(130), StreamMissing)
        assert isinstance(results.pop(55), AnswerEnded)
        for cid in conversations:
            mine = [r for r in results if not isinstance(r, BaseException) and r.conversation_id == cid]
            assert [e.seq for e in mine] == list(range(2, 12))
            assert [e.payload["text"] for e in mine] == [str(n) for n in range(10)]
    finally:
        await broker.close()


# -- the pool -------------------------------------------------------------------------------------


async def test_a_small_pool_carries_many_concurrent_calls() -> None:
    """A thousand concurrent publishes on one pooled connection: they wait their turn, none fails
    (redis-py's default pool fails a call at once when its connections are all in use)."""
    broker = await broker_on(redis_url(), pool_size=1)
    try:
        cid = await opened(broker)
        events = await asyncio.gather(
            *(broker.publish(cid, EventType.MESSAGE, {"n": n}) for n in range(1000))
        )
        assert [e.seq for e in events] == list(range(1, 1001))
    finally:
        await broker.close()


async def test_a_call_waits_for_a_pooled_connection_and_fails_unavailable_past_the_timeout() -> None:
    pipelined = auto_pipelined(redis_url(), pool_size=1, timeout=0.5, resend_after_timeout=False)
    try:
        holder = pipelined.pubsub()
        await holder.subscribe(key())  # holds the pool's only connection
        waiting = asyncio.ensure_future(pipelined.ping())
        await asyncio.sleep(0.1)
        assert not waiting.done()  # waiting for the connection, not failed
        await holder.aclose()  # type: ignore[no-untyped-call]  # gives it back
        assert await waiting is True

        holder = pipelined.pubsub()
        await holder.subscribe(key())
        with pytest.raises(RedisConnectionError) as raised:
            await pipelined.ping()
        failure = translate(raised.value, "the test")
        assert isinstance(failure, Unavailable)
        assert failure.retry_after_ms > 0
        await holder.aclose()  # type: ignore[no-untyped-call]
    finally:
        await pipelined.aclose()


# -- failures provoked for real -------------------------------------------------------------------


async def wait_for_replication(replica: redis.asyncio.Redis) -> None:
    for _ in range(200):
        if (await replica.info("replication")).get("master_link_status") == "up":
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the replica never caught up with its primary")


async def test_a_replica_during_a_failover_is_unavailable_for_writes_and_readable(
    own_redis: str, admin: redis.asyncio.Redis, services: Any
) -> None:
    """The broker and the state cache on a server that became a replica (READONLY): every write
    is `Unavailable` with a retry hint, caused by a real ReadOnlyError; reads still work; the
    store serves alone; once the replica is promoted, writes work again."""
    primary_url = services.start_redis(services.find_redis_server())
    primary = RedisBroker(primary_url, prefix="chatgw-test-ro:")
    await primary.connect()
    broker = RedisBroker(own_redis, prefix="chatgw-test-ro:")
    await broker.connect()
    store = CachedStore(MemoryStore(), RedisStateCache(own_redis, prefix="chatgw-test-ro:", ttl=60))
    await store.connect()
    try:
        cid = await opened(primary)
        await primary.publish(cid, EventType.AI_START, {"response_id": "r-1"})
        await admin.replicaof("127.0.0.1", str(urlsplit(primary_url).port))
        await wait_for_replication(admin)

        lease = AnswerLease(BusinessId("b"), cid, ResponseId("r-1"))
        writes: list[Callable[[], Awaitable[object]]] = [
            lambda: broker.publish(cid, EventType.DELTA, {"response_id": "r-1", "text": "x"}),
            lambda: broker.open(ConversationId(new_id()), floor_seq=0),
            lambda: broker.hold_lease(lease, 5),
            lambda: broker.drop_lease(lease),
            lambda: broker.end_answer(cid, AnswerStatus.STOPPED),
        ]
        for write in writes:
            with pytest.raises(Unavailable) as refused:
                await write()
            assert isinstance(refused.value.__cause__, ReadOnlyError)
            assert refused.value.retry_after_ms > 0
        replay = await broker.replay(cid, 0)  # reads are served by the replica
        assert [e.type for e in replay.events or ()] == [EventType.AI_START]

        business = await store.ensure_business(
            Business(business_id=BusinessId(new_id()), public_id=f"b-{new_id()[:8]}", name="b")
        )
        user = await store.create_end_user(business.business_id, None)
        conversation = await store.create_conversation(business.business_id, user, StageName("s"))
        written = await store.set_epoch(business.business_id, conversation.conversation_id, "e-1")
        assert written.epoch == "e-1"
        read = await store.get_conversation(business.business_id, conversation.conversation_id)
        assert read.epoch == "e-1"  # the store served it: the cache could not be written

        await admin.replicaof("NO", "ONE")
        event = await broker.publish(cid, EventType.DELTA, {"response_id": "r-1", "text": "back"})
        assert event.seq == 2
    finally:
        await store.close()
        await broker.close()
        await primary.close()
        services.stop_redis(primary_url)


async def test_a_server_busy_with_a_slow_script_is_unavailable_until_it_is_killed(
    own_redis: str, admin: redis.asyncio.Redis
) -> None:
    broker = await broker_on(own_redis)
    cache = RedisStateCache(own_redis, prefix="chatgw-test-busy:", ttl=60)
    await cache.connect()
    try:
        cid = await opened(broker)
        await admin.config_set("busy-reply-threshold", 50)
        blocker = redis.asyncio.Redis.from_url(own_redis, socket_timeout=10)
        slow = asyncio.ensure_future(blocker.eval("while true do end", 0))
        await asyncio.sleep(0.3)  # past the threshold: the server answers BUSY
        with pytest.raises(Unavailable) as refused:
            await broker.publish(cid, EventType.MESSAGE, {"text": "x"})
        assert str(refused.value.__cause__).startswith("BUSY")
        with pytest.raises(Unavailable):
            await cache.get(cid)
        await admin.script_kill()
        with pytest.raises(ResponseError):
            await slow
        await blocker.aclose()
        assert (await broker.publish(cid, EventType.MESSAGE, {"text": "x"})).seq == 1
    finally:
        await cache.close()
        await broker.close()


async def test_a_server_out_of_memory_is_unavailable(own_redis: str, admin: redis.asyncio.Redis) -> None:
    broker = await broker_on(own_redis)
    try:
        cid = await opened(broker)
        await admin.config_set("maxmemory-policy", "noeviction")
        await admin.config_set("maxmemory", 1)
        with pytest.raises(Unavailable) as refused:
            await broker.publish(cid, EventType.MESSAGE, {"text": "x"})
        assert isinstance(refused.value.__cause__, OutOfMemoryError)
        await admin.config_set("maxmemory", 0)
        assert (await broker.publish(cid, EventType.MESSAGE, {"text": "x"})).seq == 1
    finally:
        await broker.close()


async def test_an_emptied_script_cache_is_refilled_without_a_failure(
    own_redis: str, admin: redis.asyncio.Redis
) -> None:
    """SCRIPT FLUSH (as after a restart or a failover to a fresh server): the next publishes, all
    in one pipeline, get NOSCRIPT, load the script and run: nobody sees an error."""
    broker = await broker_on(own_redis)
    try:
        cid = await opened(broker)
        await admin.script_flush()
        events = await asyncio.gather(*(broker.publish(cid, EventType.MESSAGE, {"n": n}) for n in range(30)))
        assert [e.seq for e in events] == list(range(1, 31))
    finally:
        await broker.close()


async def test_a_paused_server_times_out_as_unavailable(own_redis: str, admin: redis.asyncio.Redis) -> None:
    pipelined = auto_pipelined(own_redis, pool_size=2, timeout=0.3, resend_after_timeout=False)
    try:
        assert await pipelined.ping() is True
        await admin.client_pause(1500, all=True)
        with pytest.raises(RedisTimeoutError) as raised:
            await pipelined.get(key())
        failure = translate(raised.value, "the test")
        assert isinstance(failure, Unavailable)
        await admin.client_unpause()
        assert await pipelined.ping() is True  # a new connection, once the server answers again
    finally:
        await pipelined.aclose()


@pytest.mark.parametrize(
    ("failure", "transient"),
    [
        (BusyLoadingError("Redis is loading the dataset in memory"), True),
        (TryAgainError("Multiple keys request during rehashing of slot"), True),
        (MasterDownError("Link with MASTER is down and replica-serve-stale-data is set to 'no'."), True),
        (ResponseError("MISCONF Redis is configured to save RDB snapshots, but it's currently unable"), True),
        (ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"), False),
        (ResponseError("ERR Error running script (call to f_1234): @user_script:1: bad"), False),
    ],
)
def test_failures_that_pass_are_unavailable_and_others_are_internal(
    failure: Exception, transient: bool
) -> None:
    """The conditions above that are not provoked here (a server loading its data, a cluster
    re-sharding) are classified like the ones that are."""
    translated = translate(failure, "the test")
    assert isinstance(translated, Unavailable) is transient
    assert isinstance(translated, CoreError)
    assert translated.__class__.__module__ == "core.errors"
