"""gateway.backends.redis_wire on real Redis: the publishing connection (`Commands`) and the
subscription read a chunk at a time (`SubscribedConnection`). Each test has keys or a server of its own."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio
from redis.exceptions import ConnectionError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.backends.redis_wire import Commands, SubscribedConnection
from tests.databases import redis_url


@pytest.fixture
async def client() -> AsyncIterator[redis.asyncio.Redis]:
    made = redis.asyncio.Redis.from_url(redis_url())
    yield made
    await made.aclose()


@pytest.fixture
async def key(client: redis.asyncio.Redis) -> AsyncIterator[str]:
    made = f"chatgw-test-wire-{uuid.uuid4().hex[:8]}"
    yield made
    await client.delete(made, made + ":n")


@pytest.fixture
async def commands(client: redis.asyncio.Redis) -> AsyncIterator[Commands]:
    made = Commands(client.connection_pool, timeout_s=5)
    yield made
    await made.close()


async def test_calls_of_one_turn_share_a_write_and_each_gets_its_own_reply(
    client: redis.asyncio.Redis, key: str, commands: Commands
) -> None:
    replies = await asyncio.gather(*(commands.call("RPUSH", key, str(n)) for n in range(200)))
    # RPUSH answers the list's length: the calls ran in the order they were made.
    assert replies == list(range(1, 201))
    assert await client.lrange(key, 0, -1) == [str(n).encode() for n in range(200)]
    assert commands.calls == 200
    assert commands.writes < 10
    assert await commands.call("ECHO", "x" * 300_000) == b"x" * 300_000  # read over many chunks
    assert await commands.call("LRANGE", key, 0, 2) == [b"0", b"1", b"2"]
    assert await commands.call("GET", key + ":none") is None


async def test_calls_made_while_a_writes_replies_are_due_leave_together_once_they_are_in(
    client: redis.asyncio.Redis, key: str, commands: Commands
) -> None:
    assert await commands.call("PING") == b"PONG"
    slow = asyncio.create_task(commands.call("BLPOP", key + ":empty", "0.3"))
    await asyncio.sleep(0.05)
    assert commands.writes == 2  # the BLPOP went out at once: nothing was due
    later = []
    for n in range(20):
        later.append(asyncio.create_task(commands.call("RPUSH", key, str(n))))
        await asyncio.sleep(0)  # each made in an event-loop turn of its own
    await asyncio.sleep(0.05)
    assert commands.writes == 2  # all twenty wait for the BLPOP's reply
    assert await slow is None
    assert await asyncio.gather(*later) == list(range(1, 21))
    assert commands.writes == 3  # and then left in one write, in order
    assert await commands.call("LLEN", key) == 20
    assert commands.writes == 4


async def test_calls_answered_in_time_outlive_the_timeout_many_times_over(
    client: redis.asyncio.Redis, key: str
) -> None:
    """The one timer on the oldest call moves on as replies come: a connection used for longer
    than the timeout, every reply in time, is never dropped."""
    commands = Commands(client.connection_pool, timeout_s=0.2)
    try:
        first = await commands.call("CLIENT", "ID")
        for n in range(12):
            assert await commands.call("INCR", key) == n + 1
            await asyncio.sleep(0.05)
        assert await commands.call("BLPOP", key + ":empty", "0.1") is None  # half the timeout
        assert await commands.call("INCR", key) == 13
        assert await commands.call("CLIENT", "ID") == first  # the same connection all along
        assert await client.get(key) == b"13"
    finally:
        await commands.close()


async def test_an_error_reply_fails_its_call_only(
    client: redis.asyncio.Redis, key: str, commands: Commands
) -> None:
    await client.set(key, "text")
    outcomes = await asyncio.gather(
        commands.call("INCR", key + ":n"),
        commands.call("INCR", key),
        commands.call("INCR", key + ":n"),
        return_exceptions=True,
    )
    assert outcomes[0] == 1
    assert isinstance(outcomes[1], ResponseError)
    assert "not an integer" in str(outcomes[1])
    assert outcomes[2] == 2
    script = "return redis.error_reply('MISSING')"
    with pytest.raises(ResponseError, match=r"^MISSING$"):
        await commands.call("EVAL", script, 0)


async def test_a_killed_connection_fails_its_waiting_calls_and_the_next_call_reconnects(
    client: redis.asyncio.Redis, key: str, commands: Commands
) -> None:
    await commands.call("CLIENT", "SETNAME", key)
    waiting = asyncio.create_task(commands.call("BLPOP", key + ":empty", 10))
    await asyncio.sleep(0.2)
    killed = await client.execute_command(  # type: ignore[no-untyped-call]
        "CLIENT", "KILL", "SKIPME", "yes", "ID", await _client_id(client, key)
    )
    assert killed == 1
    with pytest.raises(ConnectionError):
        await waiting
    assert await commands.call("INCR", key) == 1  # on a new connection


async def test_a_call_whose_write_was_pending_when_the_connection_dropped_fails_at_once(
    client: redis.asyncio.Redis,
) -> None:
    """A connection dropped while a call's write is still queued: that call fails with the
    drop's error at once (not after its timeout), and the next call goes out on a new one."""
    commands = Commands(client.connection_pool, timeout_s=2)
    try:
        assert await commands.call("PING") == b"PONG"
        old = asyncio.create_task(commands.call("PING"))
        await asyncio.sleep(0)  # queued, its write scheduled for the next turn
        connection = commands._connection
        assert connection is not None
        commands._drop(connection, ConnectionError("dropped by the test"))
        new = asyncio.create_task(commands.call("ECHO", "after"))
        with pytest.raises(ConnectionError, match="dropped by the test"):
            await old
        assert await new == b"after"
    finally:
        await commands.close()


async def test_a_late_reply_fails_the_call_and_drops_the_connection(own_redis: str) -> None:
    url = own_redis
    other = redis.asyncio.Redis.from_url(url)
    commands = Commands(other.connection_pool, timeout_s=0.5)
    try:
        assert await commands.call("PING") == b"PONG"
        await other.execute_command("CLIENT", "PAUSE", 1500, "ALL")  # type: ignore[no-untyped-call]
        with pytest.raises(RedisTimeoutError):
            await commands.call("SET", "k", "v")
        await asyncio.sleep(1.2)  # the pause over
        assert await commands.call("GET", "k") in (b"v", None)  # its outcome was unknown
        assert await commands.call("PING") == b"PONG"
    finally:
        await commands.close()
        await other.aclose()


async def test_a_subscription_reads_every_message_in_order_and_its_confirmations(
    client: redis.asyncio.Redis, key: str
) -> None:
    subscription = await SubscribedConnection.open(client.connection_pool)
    try:
        await subscription.send("SUBSCRIBE", key + ":a", key + ":b")
        replies: list[Any] = []
        while len(replies) < 2:
            replies += await subscription.read()
        assert [r[:2] for r in replies] == [
            [b"subscribe", (key + ":a").encode()],
            [b"subscribe", (key + ":b").encode()],
        ]
        for n in range(500):
            await client.publish(key + (":a" if n % 2 else ":b"), f"{n}\n" + "p" * 200)
        received: list[Any] = []
        while len(received) < 500:
            received += await subscription.read()
        assert [r[0] for r in received] == [b"message"] * 500
        assert [int(r[2].split(b"\n")[0]) for r in received] == list(range(500))
    finally:
        await subscription.close()


async def test_a_quiet_subscription_pings_and_a_dead_one_fails(own_redis: str) -> None:
    url = own_redis
    other = redis.asyncio.Redis.from_url(url)
    subscription = await SubscribedConnection.open(other.connection_pool, idle_s=0.3, timeout_s=0.5)
    try:
        await subscription.send("SUBSCRIBE", "quiet")
        first: list[Any] = await subscription.read()
        assert first[0][0] == b"subscribe"
        second: list[Any] = await subscription.read()
        # Nothing for idle_s: a PING, answered (RESP3: a simple string; RESP2: a pub/sub array).
        assert second in ([b"PONG"], [[b"pong", b""]])
        await other.execute_command("CLIENT", "PAUSE", 2000, "ALL")  # type: ignore[no-untyped-call]
        with pytest.raises(ConnectionError, match="PING"):
            await _read_until_it_fails(subscription)
    finally:
        await subscription.close()
        await asyncio.sleep(1.6)  # let the pause end before the server is stopped
        await other.aclose()


async def _read_until_it_fails(subscription: SubscribedConnection) -> None:
    while True:
        await subscription.read()


async def _client_id(client: redis.asyncio.Redis, name: str) -> str:
    for entry in await client.client_list():
        if entry.get("name") == name:
            return str(entry["id"])
    raise AssertionError(f"no client named {name}")
