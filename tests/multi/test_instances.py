"""Many instances, one conversation: the same events in the same order everywhere, resume and
stop across instances, and a dead instance's answer ended by another."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from core.llm import ChatMessage
from core.scripted_llm import scripted_reply
from tests.e2e.client import Client, assert_contiguous, joined_deltas, new_widget, sequenced, stored_history
from tests.multi.conftest import Cluster

SLOW = {"CHATGW_SCRIPTED_TPS": "40", "CHATGW_SCRIPTED_TOKENS": "200"}


def view(frames: list[dict[str, object]]) -> list[tuple[object, ...]]:
    return [(f["seq"], f["type"], f.get("text")) for f in sequenced(frames)]


async def test_sockets_on_three_instances_see_the_same_events_in_the_same_order(cluster: Cluster) -> None:
    gateways = cluster(3)
    widget = new_widget(gateways[0])
    clients = [await Client.open(gw) for gw in gateways]
    for client in clients:
        await client.hello(widget)
    await clients[1].send({"type": "message", "client_msg_id": "m-1", "text": "hello from the middle"})
    await clients[2].send({"type": "typing", "state": True})
    frames = await asyncio.gather(*(client.until_ai_end() for client in clients))
    assert view(frames[0]) == view(frames[1]) == view(frames[2])
    assert_contiguous(frames[0], 1)
    assert frames[0][-1]["status"] == "complete"
    for client in clients:
        await client.close()


async def test_disconnect_from_one_instance_mid_answer_and_resume_on_another(cluster: Cluster) -> None:
    a, b = cluster(2, SLOW)
    widget = new_widget(a)
    first = await Client.open(a)
    welcome = await first.hello(widget)
    start = await first.ask_and_read("r-1", "resume elsewhere")
    last_seq = first.last_seq()
    first.ws.transport.abort()

    second = await Client.open(b)
    resumed = await second.hello(widget, resume={"epoch": welcome["epoch"], "last_seq": last_seq})
    assert resumed["resumed"] is True
    rest = await second.until_ai_end()
    assert_contiguous(rest, last_seq + 1)
    everything = sequenced(first.frames) + sequenced(rest)
    assert_contiguous(everything, 1)
    end = rest[-1]
    assert end["status"] == "complete"
    assert joined_deltas(everything, start["response_id"]) == end["text"]
    assert end["text"] == "".join(scripted_reply([ChatMessage("user", "resume elsewhere")], 200))
    await second.close()


async def test_stop_on_another_instance_ends_the_answer_where_it_is_generated(cluster: Cluster) -> None:
    """The answer runs on A; the user's stop arrives on B. Both see ai_end stopped, no delta after it,
    and the stored answer is the text streamed until then."""
    a, b = cluster(2, SLOW)
    widget = new_widget(a)
    on_a, on_b = await Client.open(a), await Client.open(b)
    await on_a.hello(widget)
    await on_b.hello(widget)
    await on_a.send({"type": "message", "client_msg_id": "s-1", "text": "talk for a while"})
    start = await on_b.recv_type("ai_start")
    await on_b.recv_type("delta")
    await on_b.recv_type("delta")
    await on_b.send({"type": "stop"})
    end_b = await on_b.recv_type("ai_end")
    end_a = await on_a.recv_type("ai_end")
    assert end_a == end_b
    assert end_b["status"] == "stopped"
    assert end_b["text"] == joined_deltas(on_b.frames, start["response_id"])
    assert 0 < len(end_b["text"].split()) < 200

    # Nothing of that answer follows its end, on either socket, while the next turn runs.
    await on_b.send({"type": "message", "client_msg_id": "s-2", "text": "short"})
    await on_a.recv_type("ai_start")
    await on_b.send({"type": "stop"})
    await on_a.recv_type("ai_end")
    await on_b.recv_type("ai_end")
    for client in (on_a, on_b):
        after = client.frames[[f.get("seq") for f in client.frames].index(end_b["seq"]) + 1 :]
        assert not [f for f in after if f.get("response_id") == start["response_id"]]
    history = await stored_history(a, widget, 4)
    stored = next(m for m in history if m.get("response_id") == start["response_id"])
    assert (stored["status"], stored["text"]) == ("stopped", end_b["text"])
    await on_a.close()
    await on_b.close()


async def test_an_instance_killed_mid_answer_has_its_answer_ended_by_another(cluster: Cluster) -> None:
    """kill -9 the generating instance: a client on another instance gets ai_end `interrupted`
    with the text streamed so far, and the answer is stored so."""
    a, b = cluster(2, {**SLOW, "CHATGW_ANSWER_LEASE_S": "2"})
    widget = new_widget(a)
    on_a, on_b = await Client.open(a), await Client.open(b)
    await on_a.hello(widget)
    await on_b.hello(widget)
    await on_a.send({"type": "message", "client_msg_id": "k-1", "text": "this instance will die"})
    start = await on_b.recv_type("ai_start")
    for _ in range(3):
        await on_b.recv_type("delta")
    os.kill(a.process.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    end = await on_b.recv_type("ai_end", timeout=30)
    took = time.monotonic() - killed_at
    assert end["status"] == "interrupted"
    assert end["response_id"] == start["response_id"]
    assert end["text"] == joined_deltas(on_b.frames, start["response_id"])
    assert end["text"]
    history = await stored_history(b, widget, 2)
    assert (history[-1]["status"], history[-1]["text"]) == ("interrupted", end["text"])
    print(f"interrupted {took:.2f} s after the kill (lease 2 s)")
    await on_b.close()
