"""SIGTERM: the instance stops accepting, sends its clients elsewhere with reconnect, lets answers
finish within the grace period (or ends them as interrupted), closes with 1012 and exits."""

from __future__ import annotations

import asyncio
import signal

from websockets.exceptions import ConnectionClosed

from core.llm import ChatMessage
from core.scripted_llm import scripted_reply
from tests.e2e.client import Client, assert_contiguous, joined_deltas, new_widget, sequenced
from tests.multi.conftest import Cluster
from tests.servers import GatewayProcess

SLOW = {"CHATGW_SCRIPTED_TPS": "40", "CHATGW_SCRIPTED_TOKENS": "160", "CHATGW_RECONNECT_SPREAD_MS": "400"}


async def drained(client: Client) -> dict[str, object]:
    """The reconnect frame, after the socket was closed with 1012."""
    reconnect = await client.recv_type("reconnect")
    try:
        while True:
            await client.recv(timeout=10)
    except ConnectionClosed:
        pass
    assert client.ws.close_code == 1012
    return reconnect


async def exited(gw: GatewayProcess) -> None:
    """The instance exits on its own, having drained (uvicorn re-raises the SIGTERM it handled,
    so the exit status is the conventional one for that signal)."""
    code = await asyncio.to_thread(gw.process.wait, 60)
    assert code == -signal.SIGTERM, gw.log()
    assert '"msg":"drained"' in gw.log()
    assert '"level":"error"' not in gw.log()


async def test_sigterm_sends_clients_elsewhere_and_they_lose_nothing(cluster: Cluster) -> None:
    a, b = cluster(2, SLOW)
    widget = new_widget(b)
    first = await Client.open(a)
    welcome = await first.hello(widget)
    start = await first.ask_and_read("d-1", "survive the drain")
    a.process.send_signal(signal.SIGTERM)

    reconnect = await drained(first)
    after_ms = reconnect["after_ms"]
    assert isinstance(after_ms, int)
    assert 0 <= after_ms <= 400
    await asyncio.sleep(after_ms / 1000)
    last_seq = first.last_seq()

    second = await Client.open(b)
    resumed = await second.hello(widget, resume={"epoch": welcome["epoch"], "last_seq": last_seq})
    assert resumed["resumed"] is True
    rest = await second.until_ai_end()
    everything = sequenced(first.frames) + sequenced(rest)
    assert_contiguous(everything, 1)
    end = rest[-1]
    assert end["status"] == "complete"  # finished by the draining instance within its grace period
    assert end["text"] == "".join(scripted_reply([ChatMessage("user", "survive the drain")], 160))
    assert joined_deltas(everything, start["response_id"]) == end["text"]
    await exited(a)
    await second.close()


async def test_an_answer_longer_than_the_grace_period_ends_interrupted(cluster: Cluster) -> None:
    a, b = cluster(2, {**SLOW, "CHATGW_SCRIPTED_TOKENS": "2000", "CHATGW_GRACEFUL_SHUTDOWN_S": "1"})
    widget = new_widget(b)
    on_a, on_b = await Client.open(a), await Client.open(b)
    await on_a.hello(widget)
    await on_b.hello(widget)
    await on_a.send({"type": "message", "client_msg_id": "d-2", "text": "never finishes in time"})
    start = await on_b.recv_type("ai_start")
    await on_b.recv_type("delta")
    a.process.send_signal(signal.SIGTERM)
    await drained(on_a)
    end = await on_b.recv_type("ai_end", timeout=30)
    assert end["status"] == "interrupted"
    assert end["text"] == joined_deltas(on_b.frames, start["response_id"])
    assert 0 < len(end["text"].split()) < 2000
    await exited(a)
    await on_b.close()
