"""Redis goes away and comes back empty during a conversation: publishes are refused clearly while
it is down, and afterwards every client is told to reset; none is shown a silent gap."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from core.llm import ChatMessage
from core.scripted_llm import scripted_reply
from tests.databases import redis_url
from tests.e2e.client import Client, assert_contiguous, joined_deltas, new_widget, sequenced, stored_history
from tests.integration.test_postgres_faults import send_until_acked
from tests.multi.conftest import Cluster
from tests.proxy import Outage
from tests.servers import start_gateway


async def received_or_next(client: Client, frame_type: str) -> dict[str, Any]:
    """The first frame of that type the client has received, or the next one to come."""
    seen = next((f for f in client.frames if f["type"] == frame_type), None)
    return seen if seen is not None else await client.recv_type(frame_type)


async def wait_ready(url: str, ready: bool) -> dict[str, Any]:
    async with httpx.AsyncClient() as http:
        for _ in range(300):
            r = await http.get(f"{url}/readyz")
            if (r.status_code == 200) == ready:
                body: dict[str, Any] = r.json()
                return body
            await asyncio.sleep(0.1)
    raise AssertionError(f"{url}/readyz never became {'ready' if ready else 'unready'}")


async def test_redis_restarted_empty_gives_reset_and_no_silent_gap(
    cluster: Cluster, own_redis: str, services: Any
) -> None:
    redis_url = own_redis
    a, b = cluster(2, {"CHATGW_SCRIPTED_TOKENS": "5"}, redis=redis_url)
    widget = new_widget(a)
    on_a, on_b = await Client.open(a), await Client.open(b)
    await on_a.hello(widget)
    await on_b.hello(widget)
    await on_a.send({"type": "message", "client_msg_id": "before", "text": "before the restart"})
    before = (await on_b.until_ai_end())[-1]
    await on_a.until_ai_end()

    await asyncio.to_thread(services.stop_redis, redis_url)
    unready = await wait_ready(a.http, ready=False)
    assert unready["checks"]["broker"]["ok"] is False
    await on_a.send({"type": "message", "client_msg_id": "during", "text": "while redis is down"})
    refused = await on_a.recv_type("error")
    assert refused["code"] == "unavailable"
    assert refused["client_msg_id"] == "during"
    assert refused["retry_after_ms"] > 0

    port = urlsplit(redis_url).port
    await asyncio.to_thread(services.start_redis, services.find_redis_server(), port)
    await wait_ready(a.http, ready=True)
    await wait_ready(b.http, ready=True)
    ack, _ = await send_until_acked(on_a, "during", "while redis is down")
    assert ack["seq"] > before["seq"]  # the new log continues after what PostgreSQL holds

    # The reset may have come before the ack (the instances noticed the restart first).
    resets = [await received_or_next(client, "reset") for client in (on_a, on_b)]
    for reset in resets:
        assert reset["reason"] == "epoch_changed"
        assert reset["epoch"] == resets[0]["epoch"]
    # The client refetches history: the message sent during the outage is there, answered.
    history = await stored_history(a, widget, 4)
    assert [(m["role"], m["client_msg_id"]) for m in history] == [
        ("user", "before"),
        ("assistant", None),
        ("user", "during"),
        ("assistant", None),
    ]
    assert history[2]["message_id"] == ack["message_id"]
    # And live events continue right after the reset's seq, with no gap, on both instances.
    await on_b.send({"type": "message", "client_msg_id": "after", "text": "all good again"})
    for client, reset in zip((on_a, on_b), resets, strict=True):
        frames = await client.until_ai_end()
        while frames[-1]["text"] != "".join(scripted_reply([ChatMessage("user", "all good again")], 5)):
            frames += await client.until_ai_end()
        live = [
            f for f in client.frames[client.frames.index(reset) + 1 :] if "seq" in f and f["type"] != "ack"
        ]
        seqs = [f["seq"] for f in live]
        assert seqs == list(range(reset["seq"] + 1, reset["seq"] + 1 + len(seqs))), seqs
    await on_a.close()
    await on_b.close()


async def test_an_instance_cut_off_from_redis_fills_what_it_missed(cluster: Cluster) -> None:
    """Instance A loses its Redis connections while B streams an answer; when A is back, its client
    receives every event it missed from the stream, in order, then live: no gap, no reset."""
    outage = Outage(redis_url())
    await outage.start()
    try:
        (b,) = cluster(1, {"CHATGW_SCRIPTED_TPS": "40", "CHATGW_SCRIPTED_TOKENS": "120"})
        prefix = b.env["CHATGW_REDIS_PREFIX"]
        # In a thread: the proxy runs on this event loop, which must keep turning meanwhile.
        env = {**b.env, "REDIS_URL": outage.url, "CHATGW_REDIS_PREFIX": prefix}
        a = await asyncio.to_thread(start_gateway, Path(b.log_path).parent, env)
        try:
            widget = new_widget(b)
            on_a, on_b = await Client.open(a), await Client.open(b)
            await on_a.hello(widget)
            await on_b.hello(widget)
            await on_b.send({"type": "message", "client_msg_id": "cut", "text": "keep talking"})
            start = await on_a.recv_type("ai_start")
            await on_a.recv_type("delta")
            await outage.cut()
            await asyncio.sleep(1.0)  # B keeps streaming; A hears nothing
            await outage.start()
            frames_a = await on_a.until_ai_end()
            frames_b = await on_b.until_ai_end()
            assert not [f for f in on_a.frames if f["type"] == "reset"]
            assert_contiguous(on_a.frames, 1)
            assert [f["seq"] for f in sequenced(on_a.frames)] == [f["seq"] for f in sequenced(on_b.frames)]
            assert frames_a[-1] == frames_b[-1]
            assert joined_deltas(on_a.frames, start["response_id"]) == frames_a[-1]["text"]
            await on_a.close()
            await on_b.close()
        finally:
            a.stop()
    finally:
        await outage.cut()
