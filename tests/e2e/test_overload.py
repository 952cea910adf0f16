"""The instance-wide limit on answers at once (CHATGW_MAX_ACTIVE_ANSWERS), over real sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx

from tests.e2e.client import Client, new_widget
from tests.servers import GatewayProcess


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
