"""The Redis conversation-state cache (gateway.backends.redis_state) against the real Redis.

Redis comes from TEST_REDIS_URL (default: the standard local port); a Redis that does not answer
fails these tests. Each test works under a key prefix of its own and deletes its keys at the end.
The inner store is the MemoryStore, a real Store implementation.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any

import orjson
import pytest
import redis.asyncio

from core.errors import NotFound, Unavailable
from core.models import Business, Conversation
from core.store import Store
from core.types import AnswerStatus, BusinessId, ConversationId, ResponseId, StageName, new_id
from gateway.backends.memory_store import MemoryStore
from gateway.backends.redis_state import CachedStore, RedisStateCache
from tests.contract import test_store_contract as contract
from tests.databases import redis_url
from tests.proxy import Outage

TTL = 600
LOGGER = "gateway.backends.redis_state"


def state_key(prefix: str, conversation_id: ConversationId) -> str:
    return f"{prefix}conv:{conversation_id}:state"


async def delete_keys(client: redis.asyncio.Redis, prefix: str) -> None:
    keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
    if keys:
        await client.delete(*keys)


async def raw_state(
    client: redis.asyncio.Redis, prefix: str, conversation_id: ConversationId
) -> dict[str, Any]:
    """The cached value as Redis holds it, decoded here independently of the module under test."""
    raw = await client.get(state_key(prefix, conversation_id))
    assert raw is not None, "the conversation state is not in Redis"
    value = orjson.loads(raw)
    assert isinstance(value, dict)
    return value


@pytest.fixture
async def client() -> AsyncIterator[redis.asyncio.Redis]:
    """A Redis client of the test's own, separate from the cache's."""
    connection = redis.asyncio.Redis.from_url(redis_url(), socket_timeout=5, socket_connect_timeout=5)
    try:
        await connection.ping()  # no Redis: the test fails here, saying so
        yield connection
    finally:
        await connection.aclose()


@pytest.fixture
async def prefix(client: redis.asyncio.Redis) -> AsyncIterator[str]:
    name = f"chatgw-test-{uuid.uuid4().hex[:8]}:"
    yield name
    await delete_keys(client, name)


@pytest.fixture
async def memory() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
async def store(memory: MemoryStore, prefix: str) -> AsyncIterator[CachedStore]:
    cached = CachedStore(memory, RedisStateCache(redis_url(), prefix=prefix, ttl=TTL))
    await cached.connect()
    try:
        yield cached
    finally:
        await cached.close()


async def new_conversation(store: Store, public_id: str | None = None) -> Conversation:
    public_id = public_id or f"biz-{new_id()[:8]}"
    business = await store.ensure_business(
        Business(business_id=BusinessId(new_id()), public_id=public_id, name=public_id)
    )
    user = await store.create_end_user(business.business_id, None)
    return await store.create_conversation(business.business_id, user, StageName("default"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- the Store contract ---------------------------------------------------------------------------

CONTRACT = [
    check
    for name, check in vars(contract).items()
    if name.startswith("test_") and list(inspect.signature(check).parameters) == ["store"]
]


@pytest.mark.parametrize("check", CONTRACT, ids=lambda check: check.__name__)
async def test_the_store_contract_holds_through_the_cache(
    check: Callable[[Store], Awaitable[None]], store: CachedStore
) -> None:
    assert CONTRACT, "no contract tests found"
    await check(store)


# -- read-through and write-through -------------------------------------------------------------


async def test_a_new_conversation_is_cached_with_the_ttl_and_read_back_equal(
    store: CachedStore, client: redis.asyncio.Redis, prefix: str
) -> None:
    conv = await new_conversation(store)
    key = state_key(prefix, conv.conversation_id)
    assert await client.exists(key) == 1
    assert 0 < await client.pttl(key) <= TTL * 1000
    assert await store.get_conversation(conv.business_id, conv.conversation_id) == conv
    value = await raw_state(client, prefix, conv.conversation_id)
    assert value["conversation_id"] == conv.conversation_id
    assert value["business_id"] == conv.business_id
    assert value["end_user_id"] == conv.end_user_id
    assert value["mode"] == "ai"
    assert value["stage"] == "default"
    assert datetime.fromisoformat(value["created_at"]) == conv.created_at
    assert value["data"] == {}
    assert value["last_seq"] == 0


async def test_a_hit_is_answered_from_redis(
    store: CachedStore, client: redis.asyncio.Redis, prefix: str
) -> None:
    """Proof that reads use the cache: a value changed in Redis (only) is what the read returns."""
    conv = await new_conversation(store)
    key = state_key(prefix, conv.conversation_id)
    value = await raw_state(client, prefix, conv.conversation_id)
    value["stage"] = "only-in-redis"
    await client.set(key, orjson.dumps(value), ex=TTL)
    read = await store.get_conversation(conv.business_id, conv.conversation_id)
    assert read.stage == "only-in-redis"


async def test_every_state_write_is_in_redis_and_read_from_it(
    store: CachedStore, memory: MemoryStore, client: redis.asyncio.Redis, prefix: str
) -> None:
    conv = await new_conversation(store)
    bid, cid = conv.business_id, conv.conversation_id
    rid = ResponseId(new_id())

    await store.set_active_response(bid, cid, rid)
    assert (await raw_state(client, prefix, cid))["active_response_id"] == rid
    assert (await store.get_conversation(bid, cid)).active_response_id == rid

    await store.set_epoch(bid, cid, "e-7")
    assert (await raw_state(client, prefix, cid))["epoch"] == "e-7"
    assert (await store.get_conversation(bid, cid)).epoch == "e-7"

    message, _ = await store.add_user_message(bid, cid, "m-1", "hello")
    await store.set_message_seq(bid, message.conversation_id, message.message_id, 12)
    assert (await raw_state(client, prefix, cid))["last_seq"] == 12
    assert (await store.get_conversation(bid, cid)).last_seq == 12

    await store.set_active_response(bid, cid, None)
    assert (await raw_state(client, prefix, cid))["active_response_id"] is None

    # The cached state is the store's, field for field.
    expected = await memory.get_conversation(bid, cid)
    assert await store.get_conversation(bid, cid) == expected
    assert expected.active_response_id is None
    assert expected.epoch == "e-7"
    assert expected.last_seq == 12


async def test_a_failed_write_leaves_the_cached_state_alone(
    store: CachedStore, client: redis.asyncio.Redis, prefix: str
) -> None:
    conv = await new_conversation(store)
    bid, cid = conv.business_id, conv.conversation_id
    message, _ = await store.add_user_message(bid, cid, "m-1", "hello")
    await store.set_message_seq(bid, message.conversation_id, message.message_id, 4)
    with pytest.raises(NotFound):
        await store.set_epoch(BusinessId(new_id()), cid, "hijack")
    assert (await raw_state(client, prefix, cid))["epoch"] is None
    assert (await store.get_conversation(bid, cid)).last_seq == 4


async def test_concurrent_writes_leave_the_latest_state_cached(
    store: CachedStore, memory: MemoryStore, client: redis.asyncio.Redis, prefix: str
) -> None:
    for _ in range(5):
        conv = await new_conversation(store)
        bid, cid = conv.business_id, conv.conversation_id
        messages = [(await store.add_user_message(bid, cid, f"m-{n}", "x"))[0] for n in range(20)]
        await asyncio.gather(
            *(
                store.set_message_seq(bid, m.conversation_id, m.message_id, n + 1)
                for n, m in enumerate(messages)
            ),
            *(store.set_epoch(bid, cid, f"e-{n}") for n in range(5)),
            *(store.get_conversation(bid, cid) for _ in range(10)),
        )
        truth = await memory.get_conversation(bid, cid)
        assert truth.last_seq == 20
        assert await store.get_conversation(bid, cid) == truth
        assert (await raw_state(client, prefix, cid))["last_seq"] == 20


class HeldStore(MemoryStore):
    """A MemoryStore that can hold one read after it was made: a slow query, on demand."""

    def __init__(self) -> None:
        super().__init__()
        self.hold_next: asyncio.Event | None = None
        self.holding = asyncio.Event()

    async def get_conversation(
        self, business_id: BusinessId, conversation_id: ConversationId
    ) -> Conversation:
        conversation = await super().get_conversation(business_id, conversation_id)
        release, self.hold_next = self.hold_next, None
        if release is not None:
            self.holding.set()
            await release.wait()
        return conversation


class HeldWriteStore(MemoryStore):
    """A MemoryStore that can hold one `set_epoch` after it was written, before it answers: a
    database whose reply is slow, on demand."""

    def __init__(self) -> None:
        super().__init__()
        self.hold_next: asyncio.Event | None = None
        self.holding = asyncio.Event()

    async def set_epoch(
        self, business_id: BusinessId, conversation_id: ConversationId, epoch: str
    ) -> Conversation:
        conversation = await super().set_epoch(business_id, conversation_id, epoch)
        release, self.hold_next = self.hold_next, None
        if release is not None:
            self.holding.set()
            await release.wait()
        return conversation


async def test_a_slow_write_never_overwrites_a_later_write(client: redis.asyncio.Redis, prefix: str) -> None:
    """Two writes of one conversation overlap in a process: the first one's reply, slow to come,
    names a state older than the second's; the newer state is what stays cached."""
    database = HeldWriteStore()
    store = CachedStore(database, RedisStateCache(redis_url(), prefix=prefix, ttl=TTL))
    await store.connect()
    try:
        conv = await new_conversation(store)
        bid, cid = conv.business_id, conv.conversation_id
        release = asyncio.Event()
        database.hold_next = release
        first = asyncio.create_task(store.set_epoch(bid, cid, "e-1"))
        await database.holding.wait()  # "e-1" is written; its reply is slow to come
        assert (await store.set_epoch(bid, cid, "e-2")).epoch == "e-2"
        assert (await raw_state(client, prefix, cid))["epoch"] == "e-2"
        release.set()
        assert (await first).epoch == "e-1"  # what the first write left, as it returned it
        assert (await raw_state(client, prefix, cid))["epoch"] == "e-2"
        assert (await store.get_conversation(bid, cid)).epoch == "e-2"
    finally:
        await store.close()


class UnreadableStore(MemoryStore):
    """A MemoryStore whose reads of conversations fail once `unreadable` is set (a database that
    takes writes but whose reads time out), to tell a cache refreshed from a write's own result
    from one that reads the state again."""

    unreadable = False

    async def get_conversation(
        self, business_id: BusinessId, conversation_id: ConversationId
    ) -> Conversation:
        if self.unreadable:
            raise Unavailable("reads time out")
        return await super().get_conversation(business_id, conversation_id)


async def test_a_write_refreshes_the_cache_from_its_own_result(
    client: redis.asyncio.Redis, prefix: str
) -> None:
    """Each state write stores the state it returned: no read of the store after a write."""
    database = UnreadableStore()
    store = CachedStore(database, RedisStateCache(redis_url(), prefix=prefix, ttl=TTL))
    await store.connect()
    try:
        conv = await new_conversation(store)
        bid, cid = conv.business_id, conv.conversation_id
        message, _ = await store.add_user_message(bid, cid, "m-1", "hello")
        rid = ResponseId(new_id())
        database.unreadable = True
        await store.set_epoch(bid, cid, "e-1")
        await store.set_message_seq(bid, cid, message.message_id, 1)
        await store.set_active_response(bid, cid, rid)
        await store.record_turn(bid, cid, stage=StageName("next"), data={"k": {"value": 1}})
        cached = await raw_state(client, prefix, cid)
        assert (cached["epoch"], cached["last_seq"], cached["active_response_id"]) == ("e-1", 1, rid)
        assert (cached["stage"], cached["turns"]) == ("next", 1)
        await store.finish_answer(bid, cid, rid, "done", AnswerStatus.COMPLETE, seq=2)
        cached = await raw_state(client, prefix, cid)
        assert (cached["last_seq"], cached["active_response_id"]) == (2, None)
        # And the reads are answered from the cache although the store cannot be read.
        state = await store.get_conversation(bid, cid)
        assert (state.epoch, state.last_seq, state.stage, state.active_response_id) == (
            "e-1",
            2,
            "next",
            None,
        )
        database.unreadable = False
        assert state == await database.get_conversation(bid, cid)
    finally:
        await store.close()


async def test_a_slow_miss_never_overwrites_a_later_write_of_another_process(
    client: redis.asyncio.Redis, prefix: str
) -> None:
    """Two gateways on one database and one Redis: one fills a miss with a state it read before the
    other wrote; the other's fresher state stays cached."""
    database = HeldStore()
    first = CachedStore(database, RedisStateCache(redis_url(), prefix=prefix, ttl=TTL))
    second = CachedStore(database, RedisStateCache(redis_url(), prefix=prefix, ttl=TTL))
    await first.connect()
    await second.connect()
    try:
        conv = await new_conversation(second)
        bid, cid = conv.business_id, conv.conversation_id
        await client.delete(state_key(prefix, cid))  # cold

        release = asyncio.Event()
        database.hold_next = release
        slow_read = asyncio.create_task(first.get_conversation(bid, cid))
        await database.holding.wait()  # it has read the state without the epoch
        await second.set_epoch(bid, cid, "e-new")
        release.set()
        assert (await slow_read).epoch is None  # it began before the write: fine to return
        assert (await raw_state(client, prefix, cid))["epoch"] == "e-new"
        assert (await first.get_conversation(bid, cid)).epoch == "e-new"
    finally:
        await first.close()
        await second.close()


class LostAnswerStore(MemoryStore):
    """Simulates a database whose answer to a committed write is lost: `set_epoch` commits, then
    reports `Unavailable` (as a connection dropped between the commit and its reply would)."""

    async def set_epoch(
        self, business_id: BusinessId, conversation_id: ConversationId, epoch: str
    ) -> Conversation:
        await super().set_epoch(business_id, conversation_id, epoch)
        raise Unavailable("connection lost after the commit")


async def test_a_write_with_an_unknown_outcome_is_never_read_stale(
    prefix: str, client: redis.asyncio.Redis
) -> None:
    """A write that may have committed although it failed makes the cache untrusted: the next read
    flushes it and answers from the store, not from the state cached before the write."""
    store = CachedStore(LostAnswerStore(), RedisStateCache(redis_url(), prefix=prefix, ttl=TTL))
    await store.connect()
    try:
        conv = await new_conversation(store)
        bid, cid = conv.business_id, conv.conversation_id
        assert (await raw_state(client, prefix, cid))["epoch"] is None
        with pytest.raises(Unavailable):
            await store.set_epoch(bid, cid, "e-committed")
        assert (await store.get_conversation(bid, cid)).epoch == "e-committed"
        assert (await raw_state(client, prefix, cid))["epoch"] == "e-committed"
    finally:
        await store.close()


# -- rebuilding ---------------------------------------------------------------------------------


async def test_state_is_rebuilt_from_the_store_after_a_flush(
    store: CachedStore, client: redis.asyncio.Redis, prefix: str
) -> None:
    conv = await new_conversation(store)
    bid, cid = conv.business_id, conv.conversation_id
    await store.set_epoch(bid, cid, "e-1")
    message, _ = await store.add_user_message(bid, cid, "m-1", "hello")
    await store.set_message_seq(bid, message.conversation_id, message.message_id, 3)
    before = await store.get_conversation(bid, cid)

    await delete_keys(client, prefix)
    assert await client.exists(state_key(prefix, cid)) == 0

    assert await store.get_conversation(bid, cid) == before
    assert before.epoch == "e-1"
    assert before.last_seq == 3
    key = state_key(prefix, cid)
    assert await client.exists(key) == 1
    assert 0 < await client.pttl(key) <= TTL * 1000
    assert (await raw_state(client, prefix, cid))["last_seq"] == 3


@pytest.mark.parametrize(
    "garbage",
    [b"not json {", b"[1, 2]", b'{"v": 1}', b'{"v": 99, "conversation_id": "x"}', b"\xff\xfe"],
    ids=["not-json", "not-an-object", "fields-missing", "other-format", "not-utf8"],
)
async def test_a_corrupted_value_is_a_miss(
    store: CachedStore, client: redis.asyncio.Redis, prefix: str, garbage: bytes
) -> None:
    conv = await new_conversation(store)
    key = state_key(prefix, conv.conversation_id)
    await client.set(key, garbage, ex=TTL)
    assert await store.get_conversation(conv.business_id, conv.conversation_id) == conv
    assert await client.get(key) != garbage  # dropped and filled again
    assert (await raw_state(client, prefix, conv.conversation_id))["conversation_id"] == conv.conversation_id


# -- tenancy ------------------------------------------------------------------------------------


async def test_another_business_gets_not_found_even_with_a_warm_cache(
    store: CachedStore, client: redis.asyncio.Redis, prefix: str
) -> None:
    conv = await new_conversation(store)
    other = await new_conversation(store)
    assert await store.get_conversation(conv.business_id, conv.conversation_id) == conv
    assert await client.exists(state_key(prefix, conv.conversation_id)) == 1  # warm
    with pytest.raises(NotFound):
        await store.get_conversation(other.business_id, conv.conversation_id)
    with pytest.raises(NotFound):
        await store.get_conversation(BusinessId(new_id()), conv.conversation_id)
    assert await store.get_conversation(conv.business_id, conv.conversation_id) == conv


# -- Redis down -----------------------------------------------------------------------------------


async def test_with_redis_down_the_store_serves_alone(
    memory: MemoryStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    down = RedisStateCache(f"redis://127.0.0.1:{free_port()}/0", prefix="chatgw-test-down:", ttl=TTL)
    store = CachedStore(memory, down)
    await store.connect()
    try:
        with pytest.raises(Unavailable):
            await store.cache_ping()
        await store.ping()  # the store itself is fine

        conv = await new_conversation(store)
        bid, cid = conv.business_id, conv.conversation_id
        assert await store.get_conversation(bid, cid) == conv
        await store.set_active_response(bid, cid, ResponseId("r-1"))
        await store.set_epoch(bid, cid, "e-1")
        message, created = await store.add_user_message(bid, cid, "m-1", "hello")
        assert created
        await store.set_message_seq(bid, message.conversation_id, message.message_id, 5)
        read = await store.get_conversation(bid, cid)
        assert (read.active_response_id, read.epoch, read.last_seq) == ("r-1", "e-1", 5)
        assert read == await memory.get_conversation(bid, cid)
        with pytest.raises(NotFound):
            await store.get_conversation(BusinessId(new_id()), cid)
    finally:
        await store.close()
        await store.close()  # safe twice
    warnings = [r for r in caplog.records if r.name == LOGGER and "unavailable" in r.getMessage()]
    assert len(warnings) == 1, "one warning per outage"


async def test_a_write_during_an_outage_is_never_read_stale_afterwards(
    memory: MemoryStore, client: redis.asyncio.Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The cached state predates a write that could not reach Redis: after Redis is back, the cache
    is flushed before it is trusted again, and the read puts the right state back."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    outage = Outage(redis_url())
    await outage.start()
    store = CachedStore(memory, RedisStateCache(outage.url, prefix=prefix, ttl=TTL), retry_after=0)
    await store.connect()
    try:
        conv = await new_conversation(store)
        bid, cid = conv.business_id, conv.conversation_id
        assert (await raw_state(client, prefix, cid))["epoch"] is None  # cached before the outage

        await outage.cut()
        await store.set_epoch(bid, cid, "e-during")  # the store has it; Redis still says None
        assert (await store.get_conversation(bid, cid)).epoch == "e-during"
        with pytest.raises(Unavailable):
            await store.cache_ping()
        assert (await raw_state(client, prefix, cid))["epoch"] is None  # stale in Redis

        await outage.start()
        await store.cache_ping()
        assert (await store.get_conversation(bid, cid)).epoch == "e-during"
        assert (await raw_state(client, prefix, cid))["epoch"] == "e-during"  # put back right
        assert (await store.get_conversation(bid, cid)).epoch == "e-during"
    finally:
        await store.close()
        await outage.cut()
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert sum("unavailable" in m for m in messages) == 1
    assert sum("recovered" in m for m in messages) == 1


# -- construction -------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "ttl"), [("", 60), ("redis://127.0.0.1:6379/0", 0)])
def test_a_bad_url_or_ttl_is_refused_at_once(url: str, ttl: int) -> None:
    with pytest.raises(ValueError, match=r"URL|TTL"):
        RedisStateCache(url, prefix="p:", ttl=ttl)


async def test_a_cache_used_before_connect_is_unavailable(prefix: str) -> None:
    cache = RedisStateCache(redis_url(), prefix=prefix)
    assert cache.ttl == 3600
    with pytest.raises(Unavailable):
        await cache.get(ConversationId(new_id()))
