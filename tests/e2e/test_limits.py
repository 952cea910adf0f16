"""Rate and resource limits (docs/limits.md): a breach gets `rate_limited` with `retry_after_ms`
(HTTP: 429 with Retry-After), a repeat offender is closed with 4429, and a bystander keeps being
served. Each test starts its own gateway with the limit under test set low."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest

from tests.e2e.agents import AgentClient, new_agent
from tests.e2e.client import Client, new_widget, stalled_client, stored_history
from tests.e2e.limits_support import (
    ATTACKER,
    BYSTANDER,
    closed_with,
    from_address,
    hello_or_refusal,
    metric_until,
    open_from,
    rate_limited_count,
    refused,
    send_messages,
    served,
    widget_from,
)
from tests.servers import DEMO_API_KEY, GatewayProcess
from tests.tenant_gateway import OTHER_BUSINESS

Factory = Callable[..., GatewayProcess]
# Only the limit under test breaches; a breach does not close the socket unless the test says so.
# Rates are per day: a sliding window counter is approximate across a window's end (docs/limits.md),
# and a test's few seconds should not straddle one.
QUIET = {"CHATGW_LIMIT_VIOLATIONS": "off", "CHATGW_LIMIT_EXEMPT_IPS": "127.0.0.1,::1"}


async def test_messages_over_a_sockets_limit_are_refused_and_not_stored(gateway_factory: Factory) -> None:
    """Over its per-socket rate a message gets `rate_limited` naming it; it is not stored, the
    socket stays open, and another user is served."""
    gw = gateway_factory({**QUIET, "CHATGW_LIMIT_SOCKET_MESSAGES": "3/day"})
    widget = new_widget(gw)
    client = await open_from(gw, ATTACKER)
    await client.hello(widget)
    outcome = await send_messages(client, [f"m-{n}" for n in range(6)])
    assert refused(outcome, "socket_messages") == ["m-3", "m-4", "m-5"]
    assert "at most 3 per 1 day" in outcome["m-3"]["message"]
    await served(gw, new_widget(gw))
    history = await stored_history(gw, widget, 3)  # acked messages are stored before the ack
    assert sorted(m["client_msg_id"] for m in history if m["role"] == "user") == ["m-0", "m-1", "m-2"]
    assert rate_limited_count(gw, "socket_messages") == 3
    await client.close()


async def test_a_conversations_limit_counts_the_messages_of_all_its_sockets(gateway_factory: Factory) -> None:
    """Two sockets of one conversation share its rate; another conversation has its own."""
    gw = gateway_factory({**QUIET, "CHATGW_LIMIT_CONVERSATION_MESSAGES": "4/day"})
    widget = new_widget(gw)
    first, second = await open_from(gw, ATTACKER), await open_from(gw, ATTACKER)
    await first.hello(widget)
    await second.hello(widget)
    outcome = await send_messages(first, ["a-0", "a-1", "a-2"])
    outcome |= await send_messages(second, ["b-0", "b-1", "b-2"])
    assert refused(outcome, "conversation_messages") == ["b-1", "b-2"]
    await served(gw, new_widget(gw))
    await first.close()
    await second.close()


async def test_typing_spam_is_refused_per_socket(gateway_factory: Factory) -> None:
    """Typing frames over the per-socket rate get `rate_limited`; messages still go through."""
    gw = gateway_factory({**QUIET, "CHATGW_LIMIT_SOCKET_TYPING": "2/day"})
    client = await open_from(gw, ATTACKER)
    await client.hello(new_widget(gw))
    for n in range(5):
        await client.send({"type": "typing", "state": n % 2 == 0})
    errors = [await client.recv_type("error") for _ in range(3)]
    assert {(e["code"], e["limit"]) for e in errors} == {("rate_limited", "socket_typing")}
    outcome = await send_messages(client, ["after-typing"])
    assert outcome["after-typing"]["type"] == "ack"
    await served(gw, new_widget(gw))
    await client.close()


async def test_any_frame_counts_against_the_sockets_frame_rate(gateway_factory: Factory) -> None:
    """Frames of any kind, bad ones included, count per socket: past the rate each gets
    `rate_limited` instead of being handled."""
    gw = gateway_factory({**QUIET, "CHATGW_LIMIT_SOCKET_FRAMES": "4/day"})
    client = await open_from(gw, ATTACKER)
    await client.hello(new_widget(gw))  # hello is not counted
    for raw in ("{not json", '{"type": "shout"}', '{"type": "stop"}', '{"type": "typing", "state": true}'):
        await client.ws.send(raw)
    await client.ws.send("{not json")
    error = await client.recv_type("error")
    while error["code"] != "rate_limited":
        error = await client.recv_type("error")
    assert error["limit"] == "socket_frames"
    await served(gw, new_widget(gw))
    await client.close()


async def test_an_agents_socket_has_a_frame_rate_of_its_own(gateway_factory: Factory) -> None:
    """An agent's console sends more than a widget (it follows many conversations): its frames
    count against `agent_frames`, not the widget's `socket_frames`."""
    gw = gateway_factory(
        {**QUIET, "CHATGW_LIMIT_SOCKET_FRAMES": "2/day", "CHATGW_LIMIT_AGENT_FRAMES": "6/day"}
    )
    widget = new_widget(gw)
    agent = await AgentClient.open(gw)
    await agent.agent_hello(new_agent(gw))
    for _ in range(3):  # past the widget's rate, within the agent's
        assert (await agent.subscribe(widget.conversation_id))["type"] == "subscribed"
    for _ in range(4):
        await agent.send({"type": "subscribe", "conversation_id": widget.conversation_id})
    error = await agent.recv_type("error")
    assert (error["code"], error["limit"]) == ("rate_limited", "agent_frames")
    await served(gw, new_widget(gw))
    await agent.close()


async def test_a_socket_that_keeps_breaching_is_closed_with_4429(gateway_factory: Factory) -> None:
    """Every breach is answered; past CHATGW_LIMIT_VIOLATIONS breaches the socket is closed (4429)
    and the closes are counted on /metrics."""
    gw = gateway_factory(
        {
            "CHATGW_LIMIT_EXEMPT_IPS": "127.0.0.1,::1",
            "CHATGW_LIMIT_SOCKET_TYPING": "1/day",
            "CHATGW_LIMIT_VIOLATIONS": "3/day",
        }
    )
    client = await open_from(gw, ATTACKER)
    await client.hello(new_widget(gw))
    for n in range(10):
        await client.send({"type": "typing", "state": n % 2 == 0})
    assert await closed_with(client) == 4429
    assert len([f for f in client.frames if f.get("code") == "rate_limited"]) == 4
    assert rate_limited_count(gw, "violations") == 1
    await served(gw, new_widget(gw))


async def test_sockets_per_address_are_capped_and_freed_on_close(gateway_factory: Factory) -> None:
    """An address holds at most CHATGW_MAX_CONNECTIONS_PER_IP sockets: one more is refused with
    `rate_limited` and closed (1013, try again later); closing one makes room; others connect."""
    gw = gateway_factory({**QUIET, "CHATGW_MAX_CONNECTIONS_PER_IP": "3"})
    widget = new_widget(gw)
    held = [await open_from(gw, ATTACKER) for _ in range(3)]
    for client in held:
        await client.hello(widget)
    extra = await open_from(gw, ATTACKER)
    error = await extra.recv()
    assert (error["code"], error["limit"]) == ("rate_limited", "ip_connections")
    assert error["retry_after_ms"] > 0
    assert await closed_with(extra) == 1013
    await served(gw, new_widget(gw))

    await held.pop().close()
    for _ in range(50):  # the server counts the closed socket out once it has seen the close
        again = await open_from(gw, ATTACKER)
        first = await hello_or_refusal(again, widget)
        if first["type"] == "welcome":
            break
        assert first["limit"] == "ip_connections"
        await closed_with(again)
        await asyncio.sleep(0.1)
    assert first["type"] == "welcome"
    for client in [*held, again]:
        await client.close()


async def test_new_sockets_per_address_are_rate_limited(gateway_factory: Factory) -> None:
    """Opening sockets faster than CHATGW_LIMIT_IP_CONNECTS is refused, whatever they hold."""
    gw = gateway_factory({**QUIET, "CHATGW_LIMIT_IP_CONNECTS": "3/day"})
    widget = new_widget(gw)
    for _ in range(3):
        client = await open_from(gw, ATTACKER)
        await client.hello(widget)
        await client.close()
    refused_socket = await open_from(gw, ATTACKER)
    error = await refused_socket.recv()
    assert (error["code"], error["limit"]) == ("rate_limited", "ip_connects")
    assert await closed_with(refused_socket) == 1013
    await served(gw, widget)


async def test_sockets_per_conversation_are_capped(gateway_factory: Factory) -> None:
    """A conversation holds at most CHATGW_MAX_SOCKETS_PER_CONVERSATION sockets: the next hello
    is refused with `rate_limited` and closed (1013); another conversation is served."""
    gw = gateway_factory({**QUIET, "CHATGW_MAX_SOCKETS_PER_CONVERSATION": "2"})
    widget = new_widget(gw)
    held = [await Client.open(gw) for _ in range(2)]
    for client in held:
        await client.hello(widget)
    extra = await Client.open(gw)
    await extra.send({"type": "hello", "token": widget.token})
    error = await extra.recv()
    assert (error["code"], error["limit"]) == ("rate_limited", "conversation_sockets")
    assert error["retry_after_ms"] > 0
    assert await closed_with(extra) == 1013
    await served(gw, new_widget(gw))
    for client in held:
        await client.close()


async def test_widget_sessions_per_address(gateway_factory: Factory) -> None:
    """New conversations per address are limited (429, Retry-After, JSON body naming the limit);
    another address, and continuing a conversation, are not held up."""
    gw = gateway_factory({**QUIET, "CHATGW_LIMIT_IP_WIDGET_SESSIONS": "3/day"})
    made = [widget_from(gw, ATTACKER) for _ in range(3)]
    assert [r.status_code for r in made] == [201, 201, 201]
    over = widget_from(gw, ATTACKER)
    assert over.status_code == 429
    assert int(over.headers["Retry-After"]) >= 1
    error = over.json()["error"]
    assert error["code"] == "rate_limited"
    assert error["retry_after_ms"] > 0
    assert "new chat sessions from this address" in error["message"]
    assert widget_from(gw, BYSTANDER).status_code == 201
    first = made[0].json()
    continued = httpx.post(
        f"{gw.http}/v1/widget/sessions",
        json={"business": "demo", "conversation_id": first["conversation_id"]},
        headers={**from_address(ATTACKER), "Authorization": f"Bearer {first['token']}"},
        timeout=10,
    )
    assert continued.status_code == 200, continued.text
    assert rate_limited_count(gw, "ip_widget_sessions") == 1


def test_api_requests_per_address_and_per_key(gateway_factory: Factory) -> None:
    """API requests count per address and per credential (the admin API's 100 a minute by
    default); over either it is 429; /healthz is not counted."""
    gw = gateway_factory({**QUIET, "CHATGW_LIMIT_KEY_HTTP": "3/day", "CHATGW_LIMIT_IP_HTTP": "5/day"})
    admin = {"Authorization": f"Bearer {DEMO_API_KEY}"}
    with httpx.Client(base_url=gw.http, timeout=10) as http:
        codes = [
            http.get("/v1/agents", headers={**admin, **from_address(ATTACKER)}).status_code for _ in range(4)
        ]
        assert codes == [200, 200, 200, 429]
        # The key is limited from any address.
        elsewhere = http.get("/v1/agents", headers={**admin, **from_address(BYSTANDER)})
        assert elsewhere.status_code == 429
        assert "requests with this key" in elsewhere.json()["error"]["message"]
        # The address is limited whatever it sends (the key's refusal counted too).
        anonymous = [http.get("/v1/agents", headers=from_address(ATTACKER)).status_code for _ in range(2)]
        assert anonymous == [401, 429]
        # A refusal of an endpoint the widget calls is readable by the page that called it.
        page = {**from_address(ATTACKER), "Origin": "https://shop.example"}
        history = http.get("/v1/conversations/any/messages", headers=page)
        assert history.status_code == 429
        assert history.headers["Access-Control-Allow-Origin"] == "https://shop.example"
        assert history.headers["Access-Control-Expose-Headers"] == "Retry-After"
        assert http.get("/healthz", headers=from_address(ATTACKER)).status_code == 200
        other_key = http.get(
            "/v1/agents", headers={"Authorization": "Bearer not-the-key", **from_address(BYSTANDER)}
        )
        assert other_key.status_code == 401


async def test_answers_per_end_user(gateway_factory: Factory) -> None:
    """One end user cannot ask more answers than CHATGW_LIMIT_USER_ANSWERS; another user can."""
    gw = gateway_factory({**QUIET, "CHATGW_LIMIT_USER_ANSWERS": "2/day"})
    client = await open_from(gw, ATTACKER)
    await client.hello(new_widget(gw))
    outcome = await send_messages(client, ["u-0", "u-1", "u-2"])
    assert refused(outcome, "user_answers") == ["u-2"]
    await served(gw, new_widget(gw))
    await client.close()


async def test_answers_per_business(gateway_factory: Factory) -> None:
    """A business's users together cannot ask more answers than CHATGW_LIMIT_BUSINESS_ANSWERS;
    another business's users are served meanwhile."""
    gw = gateway_factory({**QUIET, "CHATGW_LIMIT_BUSINESS_ANSWERS": "3/day"}, module="tests.tenant_gateway")
    outcome: dict[str, dict[str, Any]] = {}
    for n in range(4):
        client = await open_from(gw, ATTACKER)
        await client.hello(new_widget(gw))
        outcome |= await send_messages(client, [f"user-{n}"])
        await client.close()
    assert refused(outcome, "business_answers") == ["user-3"]
    await served(gw, new_widget(gw, OTHER_BUSINESS.public_id))


def test_bodies_over_the_limit_are_refused_before_they_are_read(gateway_factory: Factory) -> None:
    """A declared Content-Length over CHATGW_MAX_BODY_BYTES is refused (413 JSON) without one
    byte of the body sent; a chunked body is refused as it grows past the limit."""
    gw = gateway_factory({**QUIET, "CHATGW_MAX_BODY_BYTES": "4096"})
    head = b"POST /v1/widget/sessions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as raw:
        raw.sendall(head + b"Content-Length: 104857600\r\n\r\n")
        status, body = read_response(raw)
    assert status == 413
    assert body["error"]["code"] == "too_large"

    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as raw:
        raw.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b'{"business": "demo", "pad": "' + b"x" * 1000
        for _ in range(8):  # 8 kB, and never the last chunk
            raw.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        status, body = read_response(raw)
    assert status == 413
    assert body["error"]["code"] == "too_large"
    assert httpx.get(f"{gw.http}/healthz", timeout=10).status_code == 200


async def test_an_idle_socket_is_closed(gateway_factory: Factory) -> None:
    """A widget socket that sends nothing for CHATGW_WS_IDLE_TIMEOUT_S is closed (1001, going
    away); an agent's socket, as quiet for as long, is not."""
    gw = gateway_factory({**QUIET, "CHATGW_WS_IDLE_TIMEOUT_S": "1"})
    agent = await AgentClient.open(gw)
    await agent.agent_hello(new_agent(gw))
    widget = new_widget(gw)
    client = await Client.open(gw)
    await client.hello(widget)
    assert await closed_with(client) == 1001
    assert client.ws.close_reason == "idle for 1 s"
    subscribed = await agent.subscribe(widget.conversation_id)
    assert subscribed["type"] == "subscribed"
    await agent.close()


def test_a_connection_that_never_finishes_its_request_is_closed(gateway_factory: Factory) -> None:
    """A TCP connection that sends half a request (or nothing) is closed after
    CHATGW_HTTP_HEADER_TIMEOUT_S; requests meanwhile are served."""
    gw = gateway_factory({**QUIET, "CHATGW_HTTP_HEADER_TIMEOUT_S": "1"})
    with (
        socket.create_connection(("127.0.0.1", gw.port), timeout=20) as silent,
        socket.create_connection(("127.0.0.1", gw.port), timeout=20) as partial,
    ):
        partial.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n")
        assert httpx.get(f"{gw.http}/healthz", timeout=10).status_code == 200
        assert silent.recv(1024) == b""  # the server closed it
        assert partial.recv(1024) == b""


@pytest.mark.timeout(180)  # 12 MB through PostgreSQL on a loaded machine
async def test_a_socket_closed_by_the_server_is_gone_even_if_the_client_reads_nothing(
    gateway_factory: Factory,
) -> None:
    """A slow consumer closed with 4008 that never reads (so never takes the close frame) is
    dropped after CHATGW_WS_CLOSE_TIMEOUT_S: the server holds no socket for it."""
    gw = gateway_factory(
        {
            **QUIET,
            "CHATGW_SCRIPTED_TOKENS": "3",
            "CHATGW_REPLAY_WINDOW": "16",
            "CHATGW_OUTBOX_FRAMES": "80",
            "CHATGW_MAX_MESSAGE_CHARS": "60000",
            "CHATGW_WS_CLOSE_TIMEOUT_S": "1",
            "CHATGW_LIMIT_SOCKET_FRAMES": "off",
            "CHATGW_LIMIT_SOCKET_MESSAGES": "off",
            "CHATGW_LIMIT_CONVERSATION_MESSAGES": "off",
            "CHATGW_LIMIT_USER_ANSWERS": "off",
        }
    )
    widget = new_widget(gw)
    stalled = await stalled_client(gw)
    await stalled.hello(widget)
    # From now on the stalled client's connection reads nothing at all.
    stalled.ws.transport.pause_reading()

    fast = await Client.open(gw)
    await fast.hello(widget)
    for n in range(200):  # 12 MB: more than the socket buffers between the two ends hold
        await fast.send({"type": "message", "client_msg_id": f"m-{n}", "text": "x" * 60000})
        await fast.recv_type("ack")
    assert await metric_until(gw, "chatgw_ws_connections", 1.0) == 1.0
    outcome = await send_messages(fast, ["after"])
    assert outcome["after"]["type"] == "ack"
    await fast.close()
    stalled.ws.transport.abort()


def read_response(raw: socket.socket) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of one HTTP/1.1 response read from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += raw.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(
            line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
        )
    )
    while len(body) < length:
        body += raw.recv(65536)
    return int(head.split(b" ")[1]), orjson.loads(body)
