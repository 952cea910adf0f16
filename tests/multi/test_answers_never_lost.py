"""No answer is left open or lost when a part fails: every `ai_start` a client saw gets exactly one
`ai_end`, the stored history is what the clients saw (text and status), and a replay after a
reconnect agrees. With real processes: a gateway killed with SIGKILL, a Redis server stopped and
started again empty, PostgreSQL cut off behind a TCP proxy."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from tests.databases import delete_redis_keys, redis_url
from tests.e2e.client import Client, Widget, assert_contiguous, joined_deltas, new_widget, sequenced
from tests.multi.conftest import Cluster
from tests.proxy import Outage
from tests.servers import GatewayProcess, start_gateway


def answer_view(frames: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """What a client saw of answers and messages, in seq order, to compare views."""
    return [
        (f["seq"], f["type"], f.get("response_id"), f.get("status"), f.get("text"))
        for f in sequenced(frames)
        if f["type"] != "typing"
    ]


def check_one_end_per_start(frames: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every ai_start is followed by exactly one ai_end of it before the next ai_start; return the
    ai_end frames by response id."""
    ends: dict[str, dict[str, Any]] = {}
    open_answer: str | None = None
    for frame in sequenced(frames):
        if frame["type"] == "ai_start":
            assert open_answer is None, f"ai_start {frame['response_id']} while {open_answer} is open"
            open_answer = frame["response_id"]
        elif frame["type"] == "delta":
            assert frame["response_id"] == open_answer, frame
        elif frame["type"] == "ai_end":
            assert frame["response_id"] == open_answer, f"ai_end of {frame['response_id']} not open"
            assert frame["response_id"] not in ends
            ends[frame["response_id"]] = frame
            open_answer = None
    assert open_answer is None, f"{open_answer} never ended"
    return ends


async def history(gw: GatewayProcess, widget: Widget) -> dict[str, Any] | None:
    """The conversation's history over HTTP, or None while the gateway answers 503."""
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.get(
            f"{gw.http}/v1/conversations/{widget.conversation_id}/messages",
            params={"limit": 500},
            headers={"Authorization": f"Bearer {widget.token}"},
        )
    if r.status_code == 503:
        return None
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def history_with(gw: GatewayProcess, widget: Widget, response_ids: set[str]) -> list[dict[str, Any]]:
    """The history once it holds these answers (stored just after their ai_end, or, after a store
    outage, once the store is back)."""
    for _ in range(600):
        body = await history(gw, widget)
        if body is not None and response_ids <= {m.get("response_id") for m in body["messages"]}:
            messages: list[dict[str, Any]] = body["messages"]
            return messages
        await asyncio.sleep(0.05)
    raise AssertionError(f"history never held {response_ids}")


def stored_answer(messages: list[dict[str, Any]], response_id: str) -> tuple[Any, ...]:
    row = next(m for m in messages if m.get("response_id") == response_id)
    assert row["message_id"] == response_id
    return (row["seq"], row["status"], row["text"])


async def replayed(gw: GatewayProcess, widget: Widget, epoch: str, after_seq: int, until_seq: int) -> Client:
    """A new socket resuming from `after_seq`, once it received every event up to `until_seq`."""
    client = await Client.open(gw)
    welcome = await client.hello(widget, resume={"epoch": epoch, "last_seq": after_seq})
    assert welcome["resumed"] is True, welcome
    while not sequenced(client.frames) or client.last_seq() < until_seq:
        await client.recv()
    return client


# -- an instance killed mid-answer, and the user writes again at once --------------------------


async def test_a_new_message_before_the_dead_owners_lease_expired_waits_for_its_end(cluster: Cluster) -> None:
    """kill -9 of the instance generating an answer; the user writes again on the surviving
    instance before the lease expired. The new answer waits: the dead one is ended `interrupted`
    (the lease sweep), stored so, and only then the new one starts; each has one ai_end."""
    a, b = cluster(
        2, {"CHATGW_SCRIPTED_TPS": "40", "CHATGW_SCRIPTED_TOKENS": "80", "CHATGW_ANSWER_LEASE_S": "3"}
    )
    widget = new_widget(a)
    on_a, on_b = await Client.open(a), await Client.open(b)
    welcome = await on_a.hello(widget)
    await on_b.hello(widget)
    await on_a.send({"type": "message", "client_msg_id": "k-1", "text": "this instance will die"})
    dead = await on_b.recv_type("ai_start")
    for _ in range(3):
        await on_b.recv_type("delta")
    os.kill(a.process.pid, signal.SIGKILL)
    await on_b.send({"type": "message", "client_msg_id": "k-2", "text": "are you still there?"})
    ack = await on_b.recv_type("ack")
    ends = [await on_b.recv_type("ai_end", timeout=30)]
    ends.append(await on_b.recv_type("ai_end", timeout=30))

    # The message came while the dead answer was still open: its ack is before that answer's end.
    assert on_b.frames.index(ack) < on_b.frames.index(ends[0])
    assert_contiguous(on_b.frames, 1)
    by_id = check_one_end_per_start(on_b.frames)
    assert list(by_id) == [dead["response_id"], ends[1]["response_id"]]
    first, second = by_id[dead["response_id"]], ends[1]
    assert first["status"] == "interrupted"
    assert first["text"] == joined_deltas(on_b.frames, dead["response_id"])
    assert first["text"]
    assert second["status"] == "complete"
    assert second["text"] == joined_deltas(on_b.frames, second["response_id"])

    messages = await history_with(b, widget, set(by_id))
    # In seq order: the second message was published before the dead answer was ended.
    assert [(m["role"], m.get("client_msg_id"), m.get("response_id")) for m in messages] == [
        ("user", "k-1", None),
        ("user", "k-2", None),
        ("assistant", None, first["response_id"]),
        ("assistant", None, second["response_id"]),
    ]
    for end in (first, second):
        assert stored_answer(messages, end["response_id"]) == (end["seq"], end["status"], end["text"])

    again = await replayed(b, widget, welcome["epoch"], 0, on_b.last_seq())
    assert answer_view(again.frames) == answer_view(on_b.frames)
    await again.close()
    await on_b.close()


# -- Redis restarted empty mid-answer ---------------------------------------------------------


async def test_an_answer_streaming_while_redis_restarts_empty_is_ended_and_stored(
    cluster: Cluster, own_redis: str, services: Any
) -> None:
    """Redis stops and starts again empty while an answer streams. The owner ends it
    (`interrupted`, with the text it had streamed) in the conversation's new log and stores it;
    every client gets `reset`, and sees the answer's end live or in the history it refetches,
    once; the next turn works, and a replay agrees with what the clients saw."""
    url = own_redis
    a, b = cluster(2, {"CHATGW_SCRIPTED_TPS": "40", "CHATGW_SCRIPTED_TOKENS": "400"}, redis=url)
    widget = new_widget(a)
    on_a, on_b = await Client.open(a), await Client.open(b)
    await on_a.hello(widget)
    await on_b.hello(widget)
    await on_a.send({"type": "message", "client_msg_id": "r-1", "text": "a long answer, please"})
    start = await on_b.recv_type("ai_start")
    for _ in range(3):
        await on_b.recv_type("delta")

    await asyncio.to_thread(services.stop_redis, url)
    await asyncio.to_thread(services.start_redis, services.find_redis_server(), urlsplit(url).port)

    rid = start["response_id"]
    for client in (on_a, on_b):
        reset = next((f for f in client.frames if f["type"] == "reset"), None)
        if reset is None:
            reset = await client.recv_type("reset", timeout=30)
        assert reset["reason"] == "epoch_changed"
    messages = await history_with(a, widget, {rid})
    stored = stored_answer(messages, rid)
    assert stored[1] == "interrupted"
    assert [(m["role"], m.get("client_msg_id")) for m in messages] == [("user", "r-1"), ("assistant", None)]

    # The next turn, on the new log: clients see it live after their reset.
    await on_b.send({"type": "message", "client_msg_id": "r-2", "text": "short one"})
    for client in (on_a, on_b):
        reset = next(f for f in client.frames if f["type"] == "reset")
        while not [f for f in client.frames if f["type"] == "ai_end" and f["response_id"] != rid]:
            await client.recv(timeout=30)
        before, after = (
            client.frames[: client.frames.index(reset)],
            client.frames[client.frames.index(reset) :],
        )
        # Before the reset: the answer started and streamed, and did not end (its log was lost).
        assert next(f["type"] for f in sequenced(before) if f.get("response_id") == rid) == "ai_start"
        assert not [f for f in before if f["type"] == "ai_end"]
        assert stored[2].startswith(joined_deltas(before, rid))
        # After it: its end once, live (when it came after the reset's seq) or in the refetched
        # history (when before), never both and never a delta of it.
        live_ends = [f for f in after if f["type"] == "ai_end" and f["response_id"] == rid]
        assert not [f for f in after if f["type"] == "delta" and f["response_id"] == rid]
        if live_ends:
            assert len(live_ends) == 1
            assert live_ends[0]["seq"] > reset["seq"]
            assert (live_ends[0]["seq"], live_ends[0]["status"], live_ends[0]["text"]) == stored
        else:
            assert stored[0] <= reset["seq"]
        live = [f for f in sequenced(after) if f.get("response_id") != rid]
        assert_contiguous(live, reset["seq"] + 1 + len(live_ends))
        check_one_end_per_start(live)

    final = await history_with(
        a, widget, {rid} | {f["response_id"] for f in on_b.frames if f["type"] == "ai_end"}
    )
    next_end = next(f for f in on_b.frames if f["type"] == "ai_end" and f["response_id"] != rid)
    assert stored_answer(final, next_end["response_id"]) == (next_end["seq"], "complete", next_end["text"])
    assert [(m["role"], m.get("client_msg_id"), m.get("response_id")) for m in final] == [
        ("user", "r-1", None),
        ("assistant", None, rid),
        ("user", "r-2", None),
        ("assistant", None, next_end["response_id"]),
    ]

    reset = next(f for f in on_b.frames if f["type"] == "reset")
    after = on_b.frames[on_b.frames.index(reset) :]
    again = await replayed(b, widget, reset["epoch"], reset["seq"], on_b.last_seq())
    assert answer_view(again.frames) == answer_view(after)
    await again.close()
    await on_a.close()
    await on_b.close()


# -- PostgreSQL cut off while an answer ends -------------------------------------------------


async def test_an_answer_ending_while_postgres_is_cut_off_is_stored_when_it_is_back(
    database_url: str, tmp_path: Path
) -> None:
    """The database connection is cut (a TCP proxy stops forwarding) while an answer streams; its
    `ai_end` (complete) goes out; the row is kept and written once the database is reachable
    again, with the ai_end's seq and text: history and replay agree, and no seq is skipped."""
    outage = Outage(database_url)
    await outage.start()
    prefix = f"chatgw-test-{uuid.uuid4().hex[:8]}:"
    env = {
        "DATABASE_URL": outage.url,
        "REDIS_URL": redis_url(),
        "CHATGW_REDIS_PREFIX": prefix,
        "CHATGW_SCRIPTED_TPS": "40",
        "CHATGW_SCRIPTED_TOKENS": "60",
    }
    # In a thread: the proxy runs on this event loop, which must keep turning meanwhile.
    gw = await asyncio.to_thread(start_gateway, tmp_path, env)
    try:
        widget = await asyncio.to_thread(new_widget, gw)  # sync: the proxy needs this loop
        client = await Client.open(gw)
        welcome = await client.hello(widget)
        await client.send({"type": "message", "client_msg_id": "p-1", "text": "answer while the db is away"})
        start = await client.recv_type("ai_start")
        await client.recv_type("delta")
        await outage.cut()
        end = await client.recv_type("ai_end", timeout=30)
        assert end["status"] == "complete"
        assert end["text"] == joined_deltas(client.frames, start["response_id"])
        # The database stays away until the gateway gave up writing the answer (its own retries
        # ran out): from then on only keeping it and writing it later can save it.
        while "storing an answer failed" not in gw.log():
            await asyncio.sleep(0.05)
        assert await history(gw, widget) is None  # the database is away: 503

        await outage.start()
        messages = await history_with(gw, widget, {start["response_id"]})
        assert [(m["role"], m.get("client_msg_id")) for m in messages] == [
            ("user", "p-1"),
            ("assistant", None),
        ]
        assert stored_answer(messages, start["response_id"]) == (end["seq"], "complete", end["text"])
        check_one_end_per_start(client.frames)
        assert_contiguous(client.frames, 1)

        # The conversation goes on after the stored seq: the next turn follows with no gap.
        await client.send({"type": "message", "client_msg_id": "p-2", "text": "and now?"})
        ack = await client.recv_type("ack")
        assert ack["seq"] == end["seq"] + 1
        second = await client.recv_type("ai_end")
        messages = await history_with(gw, widget, {start["response_id"], second["response_id"]})
        assert [m["seq"] for m in messages] == [1, end["seq"], ack["seq"], second["seq"]]

        again = await replayed(gw, widget, welcome["epoch"], 0, client.last_seq())
        assert answer_view(again.frames) == answer_view(client.frames)
        await again.close()
        await client.close()
    finally:
        gw.stop()
        await outage.cut()
        delete_redis_keys(prefix)
