"""Bad input gets a clear error and the socket keeps working; what cannot go on gets a close code."""

from __future__ import annotations

import asyncio
import time

import jwt
from websockets.exceptions import ConnectionClosed

from tests.e2e.client import Client, new_widget
from tests.servers import GatewayProcess


async def closed_with(client: Client) -> tuple[int | None, str | None]:
    """Read until the server closes; return the close code and reason."""
    try:
        while True:
            await client.recv(timeout=10)
    except ConnectionClosed:
        return client.ws.close_code, client.ws.close_reason


BAD_FRAMES = [
    ("{not json", "bad_frame", "not valid JSON"),
    ("[1, 2]", "bad_frame", "must be a JSON object"),
    ('{"text": "no type"}', "bad_frame", "'type'"),
    ('{"type": 7}', "bad_frame", "'type'"),
    ('{"type": "shout"}', "bad_frame", "unknown frame type"),
    ('{"type": "message", "text": "x"}', "bad_frame", "missing field 'client_msg_id'"),
    ('{"type": "message", "client_msg_id": "a"}', "bad_frame", "missing field 'text'"),
    ('{"type": "message", "client_msg_id": 5, "text": "x"}', "bad_frame", "'client_msg_id' must be a string"),
    ('{"type": "message", "client_msg_id": "a", "text": "   "}', "bad_frame", "whitespace"),
    ('{"type": "typing", "state": "yes"}', "bad_frame", "'state' must be true or false"),
    ('{"type": "hello", "token": "again"}', "bad_frame", "already said hello"),
    ('{"type": "takeover", "conversation_id": "c"}', "forbidden", "agents only"),
    (
        '{"type": "message", "client_msg_id": "a", "text": "x", "conversation_id": "other"}',
        "forbidden",
        "another",
    ),
]


async def test_every_bad_frame_gets_its_error_and_the_socket_still_works(gateway: GatewayProcess) -> None:
    """Each malformed frame is answered with an error frame naming the problem; then a turn works."""
    widget = new_widget(gateway)
    client = await Client.open(gateway)
    await client.hello(widget)
    for raw, code, fragment in BAD_FRAMES:
        await client.ws.send(raw)
        error = await client.recv_type("error")
        assert error["code"] == code, (raw, error)
        assert fragment in error["message"], (raw, error)

    await client.ws.send(b"\x00binary")
    error = await client.recv_type("error")
    assert error["code"] == "bad_frame"
    assert "binary" in error["message"]

    too_long = "x" * 4001
    await client.send({"type": "message", "client_msg_id": "long", "text": too_long})
    error = await client.recv_type("error")
    assert error["code"] == "too_large"
    assert error["client_msg_id"] == "long"

    await client.send({"type": "message", "client_msg_id": "fine", "text": "still there?"})
    frames = await client.until_ai_end()
    assert any(f["type"] == "ack" and f["client_msg_id"] == "fine" for f in frames)
    assert frames[-1]["status"] == "complete"
    await client.close()


async def test_a_frame_over_the_limit_closes_with_1009(gateway: GatewayProcess) -> None:
    """A WebSocket message above the maximum frame size ends the connection with 1009."""
    widget = new_widget(gateway)
    client = await Client.open(gateway)
    await client.hello(widget)
    await client.ws.send("x" * (64 * 1024 + 1))
    code, _ = await closed_with(client)
    assert code == 1009


async def test_a_bad_frame_does_not_disturb_other_sockets(gateway: GatewayProcess) -> None:
    """While one socket is sent garbage and closed for size, another one's turn completes."""
    good_widget, bad_widget = new_widget(gateway), new_widget(gateway)
    good, bad = await Client.open(gateway), await Client.open(gateway)
    await good.hello(good_widget)
    await bad.hello(bad_widget)
    await good.send({"type": "message", "client_msg_id": "g", "text": "hello"})
    await bad.ws.send("{{{")
    await bad.ws.send("x" * (64 * 1024 + 1))
    frames, (code, _) = await asyncio.gather(good.until_ai_end(), closed_with(bad))
    assert code == 1009
    assert frames[-1]["status"] == "complete"
    await good.close()


async def test_forged_token_closes_with_4401(gateway: GatewayProcess) -> None:
    """A token signed with another key is refused: error frame, then close 4401."""
    widget = new_widget(gateway)
    claims = jwt.decode(widget.token, options={"verify_signature": False})
    forged = jwt.encode(claims, "some-other-secret-that-is-long-enough-0123", algorithm="HS256")
    client = await Client.open(gateway)
    await client.send({"type": "hello", "token": forged})
    code, reason = await closed_with(client)
    assert code == 4401
    assert "invalid token" in (reason or "")
    assert client.frames[0]["type"] == "error"
    assert client.frames[0]["code"] == "unauthorized"


async def test_expired_token_closes_with_4401(gateway: GatewayProcess) -> None:
    widget = new_widget(gateway)
    claims = jwt.decode(widget.token, options={"verify_signature": False})
    claims["exp"] = int(time.time()) - 10
    from tests.servers import TEST_SECRET

    expired = jwt.encode(claims, TEST_SECRET, algorithm="HS256")
    client = await Client.open(gateway)
    await client.send({"type": "hello", "token": expired})
    code, reason = await closed_with(client)
    assert code == 4401
    assert reason == "token expired"


async def test_first_frame_other_than_hello_closes_with_4401(gateway: GatewayProcess) -> None:
    client = await Client.open(gateway)
    await client.send({"type": "message", "client_msg_id": "a", "text": "hi"})
    code, reason = await closed_with(client)
    assert code == 4401
    assert "hello" in (reason or "")


async def test_no_hello_in_time_closes_with_4401(slow_gateway: GatewayProcess) -> None:
    """Saying nothing past the hello deadline (1 s on this gateway) ends the socket with 4401."""
    client = await Client.open(slow_gateway)
    code, reason = await closed_with(client)
    assert code == 4401
    assert "no hello" in (reason or "")


async def test_hello_for_another_conversation_closes_with_4403(gateway: GatewayProcess) -> None:
    widget, other = new_widget(gateway), new_widget(gateway)
    client = await Client.open(gateway)
    await client.send({"type": "hello", "token": widget.token, "conversation_id": other.conversation_id})
    code, _ = await closed_with(client)
    assert code == 4403


async def test_per_message_deflate_is_not_negotiated(gateway: GatewayProcess) -> None:
    """The client offers compression; the gateway declines it (memory and CPU per socket)."""
    client = await Client.open(gateway)
    assert client.ws.response is not None
    assert client.ws.response.headers.get("Sec-WebSocket-Extensions") is None
    await client.close()
