"""Overload, over real sockets: the instance-wide limit on answers at once
(CHATGW_MAX_ACTIVE_ANSWERS), and new conversations and sockets refused while the event loop lags
(CHATGW_OVERLOAD_ARRIVALS_LAG_MS) in a gateway whose loop a test holds up (`tests.stall_gateway`)."""

from __future__ import annotations

import asyncio
import math
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from tests.databases import delete_redis_keys
from tests.e2e.client import Client, new_widget
from tests.servers import GatewayProcess, start_gateway

# Requests to a lagging gateway wait for its loop between blocks: give them time (no assertion is
# timed; this only bounds a hang).
SLOW_S = 60.0


async def history(gw: GatewayProcess, token: str, conversation_id: str) -> list[dict[str, object]]:
    async with httpx.AsyncClient() as http:
        r = await http.get(
            f"{gw.http}/v1/conversations/{conversation_id}/messages",
            headers={"Authorization": f"Bearer {token}"},
        )
    assert r.status_code == 200, r.text
    messages: list[dict[str, object]] = r.json()["messages"]
    return messages


async def test_a_message_beyond_the_limit_is_refused_unstored_and_taken_when_retried(
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    gw = gateway_factory(
        {"CHATGW_MAX_ACTIVE_ANSWERS": "1", "CHATGW_SCRIPTED_TPS": "40", "CHATGW_SCRIPTED_TOKENS": "60"}
    )
    first, second = new_widget(gw), new_widget(gw)
    busy = await Client.open(gw)
    await busy.hello(first)
    await busy.ask_and_read("a-1", "Keep the assistant busy", deltas=1)  # the one answer allowed

    client = await Client.open(gw)
    await client.hello(second)
    await client.send({"type": "message", "client_msg_id": "b-1", "text": "Am I next?"})
    refused = await client.recv_type("error", "ack")
    assert refused["type"] == "error"
    assert refused["code"] == "unavailable"
    assert refused["client_msg_id"] == "b-1"
    assert isinstance(refused["retry_after_ms"], int)
    assert refused["retry_after_ms"] > 0
    assert await history(gw, second.token, second.conversation_id) == []  # not stored

    # The socket stays open and the refusal was the whole answer: nothing else came for it.
    ended = await busy.until_ai_end()
    assert ended[-1]["status"] == "complete"
    assert not [f for f in client.frames if f["type"] in ("ack", "message", "ai_start")]

    # Sent again after retry_after_ms, as a client must, until taken (the running answer's slot
    # frees once it is stored, just after its ai_end).
    for _attempt in range(20):
        await asyncio.sleep(refused["retry_after_ms"] / 1000)
        await client.send({"type": "message", "client_msg_id": "b-1", "text": "Am I next?"})
        reply = await client.recv_type("error", "ack")
        if reply["type"] == "ack":
            break
        assert reply["code"] == "unavailable", reply
        refused = reply
    assert reply["type"] == "ack", "the retried message was never taken"
    answer = await client.until_ai_end()
    assert answer[-1]["status"] == "complete"
    assert answer[-1]["text"].startswith("You said: Am I next?")
    stored = await history(gw, second.token, second.conversation_id)
    assert [(m["role"], m["client_msg_id"]) for m in stored][:1] == [("user", "b-1")]

    async with httpx.AsyncClient() as http:
        metrics = (await http.get(f"{gw.http}/metrics")).text
    assert 'chatgw_messages_processed_total{outcome="refused_overloaded"}' in metrics
    assert "chatgw_answers_active_limit 1.0" in metrics
    await client.close()
    await busy.close()


async def test_a_message_sent_again_after_an_overload_refusal_counts_against_the_limits_once(
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    """A user may ask for 2 answers a minute (CHATGW_LIMIT_USER_ANSWERS): a message refused for
    overload and sent again, as told, five times is counted once, so the user's second message
    still passes and only the third is over the limit."""
    gw = gateway_factory(
        {
            "CHATGW_MAX_ACTIVE_ANSWERS": "1",
            "CHATGW_LIMIT_USER_ANSWERS": "2/minute",
            "CHATGW_SCRIPTED_TPS": "40",
            "CHATGW_SCRIPTED_TOKENS": "2000",
        }
    )
    first, second = new_widget(gw), new_widget(gw)
    busy = await Client.open(gw)
    await busy.hello(first)
    await busy.ask_and_read("a-1", "Keep the assistant busy", deltas=1)  # held until stopped
    client = await Client.open(gw)
    await client.hello(second)
    for _attempt in range(5):
        await client.send({"type": "message", "client_msg_id": "b-1", "text": "Am I next?"})
        refused = await client.recv_type("error", "ack")
        assert (refused["type"], refused["code"]) == ("error", "unavailable"), refused
    await busy.send({"type": "stop"})
    assert (await busy.until_ai_end())[-1]["status"] == "stopped"
    for _attempt in range(20):
        await client.send({"type": "message", "client_msg_id": "b-1", "text": "Am I next?"})
        reply = await client.recv_type("error", "ack")
        if reply["type"] == "ack":
            break
        assert reply["code"] == "unavailable", reply
        await asyncio.sleep(reply["retry_after_ms"] / 1000)
    assert reply["type"] == "ack", "the retried message was never taken"
    await client.send({"type": "message", "client_msg_id": "b-2", "text": "And this?"})
    assert (await client.recv_type("error", "ack"))["type"] == "ack"  # the user's second of 2
    await client.send({"type": "message", "client_msg_id": "b-3", "text": "One more"})
    over = await client.recv_type("error", "ack")
    assert (over["type"], over["code"], over["limit"]) == ("error", "rate_limited", "user_answers"), over
    await client.close()
    await busy.close()


# --- new conversations and sockets while the loop lags -------------------------------------------


class Lagging:
    """A gateway whose event loop is held up while `flag` exists (tests.stall_gateway)."""

    def __init__(self, gw: GatewayProcess, flag: Path) -> None:
        self.gw = gw
        self.flag = flag

    def refused(self, kind: str) -> float:
        """chatgw_arrivals_refused_total{kind} as the gateway's /metrics says now."""
        text = httpx.get(f"{self.gw.http}/metrics", timeout=SLOW_S).text
        found = re.search(rf'^chatgw_arrivals_refused_total{{kind="{kind}"}} (\S+)$', text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0


def lagging_env(flag: Path) -> dict[str, str]:
    """The environment of a gateway that lags while `flag` exists, refusing arrivals once its
    loop's recent lag is over 100 ms (each of its lag samples then finds it at least 0.25 s late:
    tests.stall_gateway), on a Redis key prefix of its own."""
    return {
        "CHATGW_TEST_LAG_FILE": str(flag),
        "CHATGW_OVERLOAD_ARRIVALS_LAG_MS": "100",
        "CHATGW_REDIS_PREFIX": f"chatgw-lag-{uuid.uuid4().hex[:8]}:",
    }


@pytest.fixture
def lagging(gateway_factory: Callable[..., GatewayProcess], tmp_path: Path) -> Iterator[Lagging]:
    flag = tmp_path / "lag"
    gw = gateway_factory(
        {**lagging_env(flag), "CHATGW_OVERLOAD_RETRY_MS": "200"}, module="tests.stall_gateway"
    )
    yield Lagging(gw, flag)
    flag.unlink(missing_ok=True)
    gw.stop()
    if "REDIS_URL" in gw.env:
        delete_redis_keys(gw.env["CHATGW_REDIS_PREFIX"])


async def post_session(http: httpx.AsyncClient, gw: GatewayProcess) -> httpx.Response:
    return await http.post(f"{gw.http}/v1/widget/sessions", json={"business": "demo"})


async def until_refused(http: httpx.AsyncClient, gw: GatewayProcess) -> httpx.Response:
    """Create sessions until one is refused (the gateway's lag watch has seen the lag)."""
    for _attempt in range(50):
        r = await post_session(http, gw)
        if r.status_code == 503:
            return r
        assert r.status_code == 201, r.text
    raise AssertionError("no session creation was refused while the loop lagged")


def assert_refusal_body(r: httpx.Response, what: str) -> int:
    error = r.json()["error"]
    assert error["code"] == "unavailable", error
    assert f"{what} is not taken now" in error["message"], error
    assert "overloaded" in error["message"], error
    retry_ms = error["retry_after_ms"]
    assert isinstance(retry_ms, int)
    assert retry_ms >= 200  # CHATGW_OVERLOAD_RETRY_MS
    assert r.headers["Retry-After"] == str(math.ceil(retry_ms / 1000))
    assert r.headers["content-type"] == "application/json"
    return retry_ms


async def test_while_the_loop_lags_new_conversations_and_sockets_are_refused_with_a_retry_hint(
    lagging: Lagging,
) -> None:
    """New conversations get 503 `unavailable` with `retry_after_ms` and `Retry-After`, and a new
    socket's hello `unavailable` and close 1013, while the loop lags; a session continued and a
    socket resuming are still served; once the lag is gone both are taken again."""
    gw = lagging.gw
    known = new_widget(gw)
    first = await Client.open(gw)
    welcome = await first.hello(known)
    await first.close()
    lagging.flag.touch()
    try:
        async with httpx.AsyncClient(timeout=SLOW_S) as http:
            refused = await until_refused(http, gw)
            assert_refusal_body(refused, "a new conversation")
            # Cross-origin, the widget can read the refusal and its hint.
            from_page = await http.post(
                f"{gw.http}/v1/widget/sessions", json={"business": "demo"}, headers={"Origin": gw.http}
            )
            assert from_page.status_code == 503, from_page.text
            assert from_page.headers["Access-Control-Allow-Origin"] == gw.http
            assert "Retry-After" in from_page.headers["Access-Control-Expose-Headers"]
            # An existing conversation goes on: its session is continued...
            continued = await http.post(
                f"{gw.http}/v1/widget/sessions",
                json={"business": "demo", "conversation_id": known.conversation_id},
                headers={"Authorization": f"Bearer {known.token}"},
            )
            assert continued.status_code == 200, continued.text

        # ...and its socket resumes.
        resuming = await Client.open(gw)
        await resuming.send(
            {
                "type": "hello",
                "token": known.token,
                "resume": {"epoch": welcome["epoch"], "last_seq": welcome["seq"]},
            }
        )
        resumed = await resuming.recv(timeout=SLOW_S)
        assert resumed["type"] == "welcome", resumed
        assert resumed["resumed"] is True
        await resuming.close()

        # A new socket is refused at hello, and closed with 1013 (try again later).
        fresh = await Client.open(gw)
        await fresh.send({"type": "hello", "token": known.token})
        error = await fresh.recv(timeout=SLOW_S)
        assert error["type"] == "error", error
        assert error["code"] == "unavailable"
        assert "a new socket is not taken now" in error["message"]
        assert isinstance(error["retry_after_ms"], int)
        assert error["retry_after_ms"] >= 200
        with pytest.raises(ConnectionClosed) as closed:
            await fresh.recv(timeout=SLOW_S)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1013
    finally:
        lagging.flag.unlink()

    # The lag is gone: sessions are created and sockets open again (the recent lag falls below the
    # threshold within a second of ticks; until then a try is still refused, with its hint).
    async with httpx.AsyncClient(timeout=SLOW_S) as http:
        for _attempt in range(50):
            r = await post_session(http, gw)
            if r.status_code == 201:
                break
            await asyncio.sleep(assert_refusal_body(r, "a new conversation") / 1000)
        assert r.status_code == 201, r.text
    body = r.json()
    client = await Client.open(gw)
    await client.send({"type": "hello", "token": body["token"]})
    welcome = await client.recv()
    assert welcome["type"] == "welcome", welcome
    assert welcome["conversation_id"] == body["conversation_id"]
    await client.close()
    assert lagging.refused("session") >= 2
    assert lagging.refused("socket") >= 1


async def test_while_database_queries_wait_for_a_connection_new_conversations_are_refused(
    database_url: str, tmp_path: Path
) -> None:
    """The loop keeps up but the one pooled PostgreSQL connection is held by turns
    (`tests.stall_gateway`): queries wait about 0.5 s for it, over
    CHATGW_OVERLOAD_ARRIVALS_DB_WAIT_MS, so a new conversation gets 503 naming the database;
    once the connection is free again, it is created."""
    flag = tmp_path / "hold"
    env = {
        "DATABASE_URL": database_url,
        "CHATGW_DB_POOL_SIZE": "1",
        "CHATGW_TEST_DB_HOLD_FILE": str(flag),
        "CHATGW_OVERLOAD_ARRIVALS_DB_WAIT_MS": "100",
        "CHATGW_OVERLOAD_RETRY_MS": "200",
    }
    gw = start_gateway(tmp_path, env, module="tests.stall_gateway")
    try:
        flag.touch()
        async with httpx.AsyncClient(timeout=SLOW_S) as http:
            refused = await until_refused(http, gw)
            assert_refusal_body(refused, "a new conversation")
            assert "its database queries waited" in refused.json()["error"]["message"]
            flag.unlink()
            for _attempt in range(50):
                r = await post_session(http, gw)
                if r.status_code == 201:
                    break
                await asyncio.sleep(assert_refusal_body(r, "a new conversation") / 1000)
            assert r.status_code == 201, r.text
        assert Lagging(gw, flag).refused("session") >= 1
    finally:
        flag.unlink(missing_ok=True)
        gw.stop()
