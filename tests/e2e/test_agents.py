"""Agents over real sockets against a real gateway process (memory, then PostgreSQL + Redis): the
snapshot and feed, following a conversation, taking over mid-answer, writing to the user, handing
back, and every defined outcome of the agent frames."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx

from tests.e2e.agents import AgentClient, new_agent
from tests.e2e.client import Client, assert_contiguous, joined_deltas, new_widget, stored_history
from tests.servers import DEMO_API_KEY, GatewayProcess


def cmid() -> str:
    return uuid.uuid4().hex


async def no_frame(client: Client, seconds: float, *types: str) -> None:
    """Nothing of `types` arrives for `seconds` (other frames are kept)."""
    try:
        async with asyncio.timeout(seconds):
            while True:
                frame = await client.recv()
                assert frame["type"] not in types, frame
    except TimeoutError:
        pass


async def test_an_agent_gets_welcome_a_snapshot_and_the_live_feed(gateway: GatewayProcess) -> None:
    """An agent sees the business's open conversations, then every new message as a feed frame."""
    widget = new_widget(gateway)
    user = await Client.open(gateway)
    await user.hello(widget)
    await user.send({"type": "message", "client_msg_id": cmid(), "text": "hello there"})
    await user.recv_type("ai_end")
    agent = new_agent(gateway)
    console = await AgentClient.open(gateway)
    welcome, snapshot = await console.agent_hello(agent)
    assert welcome["agent_id"] == agent.agent_id
    assert "conversation_id" not in welcome
    listed = {c["conversation_id"]: c for c in snapshot["conversations"]}
    mine = listed[widget.conversation_id]
    assert mine["mode"] == "ai"
    assert mine["streaming"] is False
    assert mine["last_message"]["role"] == "assistant"
    await user.send({"type": "message", "client_msg_id": cmid(), "text": "second question"})
    while True:
        feed = await console.recv_type("feed")
        if feed["conversation_id"] == widget.conversation_id and feed["event"]["type"] == "message":
            break
    assert feed["event"]["text"] == "second question"
    assert feed["event"]["role"] == "user"
    assert mine["user_online"] is True
    # The user leaves: the feed says so. A new conversation: the feed says so too.
    await user.close()
    while True:
        feed = await console.recv_type("feed")
        if feed["conversation_id"] == widget.conversation_id and feed["event"]["type"] == "presence":
            break
    assert feed["event"] == {"type": "presence", "online": False}
    other = new_widget(gateway)
    while True:
        feed = await console.recv_type("feed")
        if feed["conversation_id"] == other.conversation_id:
            break
    assert (feed["event"]["type"], feed["event"]["mode"]) == ("conversation", "ai")
    await console.close()


async def test_an_agent_follows_a_conversation_with_replay(gateway: GatewayProcess) -> None:
    """subscribe replays what the agent missed and goes on live; every frame names the conversation."""
    widget = new_widget(gateway)
    user = await Client.open(gateway)
    welcome = await user.hello(widget)
    await user.send({"type": "message", "client_msg_id": cmid(), "text": "first"})
    await user.recv_type("ai_end")
    console = await AgentClient.open(gateway)
    await console.agent_hello(new_agent(gateway))
    subscribed = await console.subscribe(
        widget.conversation_id, resume={"epoch": welcome["epoch"], "last_seq": welcome["seq"]}
    )
    assert subscribed["type"] == "subscribed", subscribed
    assert subscribed["resumed"] is True
    assert subscribed["mode"] == "ai"
    await user.send({"type": "message", "client_msg_id": cmid(), "text": "second"})
    user_frames = await user.until_ai_end()
    while not any(f["type"] == "ai_end" and f["seq"] == user_frames[-1]["seq"] for f in console.frames):
        await console.recv()
    followed = console.of(widget.conversation_id)
    assert followed[0]["type"] == "subscribed"
    assert_contiguous(followed[1:], welcome["seq"] + 1)
    # The agent saw everything the user saw, in the same order and with the same seqs.
    user_seqs = [
        (f["type"], f["seq"]) for f in user.frames if "seq" in f and f["type"] not in ("welcome", "ack")
    ]
    agent_seqs = [(f["type"], f["seq"]) for f in followed if f["type"] not in ("subscribed",)]
    assert agent_seqs == user_seqs
    await console.act("unsubscribe", widget.conversation_id)
    assert (await console.recv_type("unsubscribed"))["conversation_id"] == widget.conversation_id
    await user.close()
    await console.close()


async def test_takeover_mid_answer_stops_the_ai_for_everyone(slow_gateway: GatewayProcess) -> None:
    """The answer ends taken_over with the text streamed so far, then mode human; no delta follows;
    the stored answer is that text; no AI answer starts while human; the agent's message reaches
    the user; after a handback the AI answers again."""
    gw = slow_gateway
    widget = new_widget(gw)
    user = await Client.open(gw)
    await user.hello(widget)
    agent = new_agent(gw, name="Sam Rivera")
    console = await AgentClient.open(gw)
    await console.agent_hello(agent)
    await console.subscribe(widget.conversation_id)
    start = await user.ask_and_read(cmid(), "tell me a long story", deltas=3)
    await console.act("takeover", widget.conversation_id)
    ended = await user.recv_type("ai_end")
    assert ended["status"] == "taken_over"
    assert ended["response_id"] == start["response_id"]
    mode = await user.recv_type("mode", "delta")
    assert mode["type"] == "mode", mode
    assert mode == {"type": "mode", "seq": ended["seq"] + 1, "mode": "human", "agent_id": agent.agent_id}
    text = joined_deltas(user.frames, start["response_id"])
    assert ended["text"] == text
    assert len(text) > 0
    # Nothing of the answer after its end, for the user or the agent.
    await no_frame(user, 0.5, "delta", "ai_start")
    agent_end = next(f for f in await _until(console, "mode") if f["type"] == "ai_end")
    assert agent_end["text"] == text
    assert joined_deltas(console.of(widget.conversation_id), start["response_id"]) == text
    history = await stored_history(gw, widget, 2)
    stored = next(m for m in history if m.get("response_id") == start["response_id"])
    assert (stored["status"], stored["text"]) == ("taken_over", text)

    # While human: the user's message is stored and fanned out, and no answer starts.
    await user.send({"type": "message", "client_msg_id": cmid(), "text": "are you there?"})
    await user.recv_type("ack")
    seen = await console.recv_type("message")
    assert (seen["role"], seen["text"]) == ("user", "are you there?")
    await no_frame(user, 0.7, "ai_start")

    # The agent writes; the user gets it with role agent and the agent's name; a resend is acked
    # again, not repeated.
    reply_id = cmid()
    await console.send(
        {
            "type": "message",
            "conversation_id": widget.conversation_id,
            "client_msg_id": reply_id,
            "text": "Hi, Sam here.",
        }
    )
    ack = await console.recv_type("ack")
    assert (ack["conversation_id"], ack["client_msg_id"]) == (widget.conversation_id, reply_id)
    said = await user.recv_type("message")
    assert (said["role"], said["text"], said["seq"]) == ("agent", "Hi, Sam here.", ack["seq"])
    assert (said["agent_id"], said["agent_name"]) == (agent.agent_id, "Sam Rivera")
    history = await stored_history(gw, widget, 4)
    stored_reply = next(m for m in history if m["message_id"] == ack["message_id"])
    assert (stored_reply["role"], stored_reply["agent_name"]) == ("agent", "Sam Rivera")
    assert all("agent_name" not in m for m in history if m["role"] != "agent")
    await console.send(
        {
            "type": "message",
            "conversation_id": widget.conversation_id,
            "client_msg_id": reply_id,
            "text": "Hi, Sam here.",
        }
    )
    again = await console.recv_type("ack")
    assert (again["message_id"], again["seq"]) == (ack["message_id"], ack["seq"])
    # The agent's typing reaches the user.
    await console.send({"type": "typing", "conversation_id": widget.conversation_id, "state": True})
    typing = await user.recv_type("typing")
    assert (typing["role"], typing["state"]) == ("agent", True)

    # Handback: mode ai; the last message was the agent's, so nothing starts until the user writes.
    await console.act("handback", widget.conversation_id)
    back = await user.recv_type("mode")
    assert (back["mode"], back["agent_id"]) == ("ai", None)
    await user.send({"type": "message", "client_msg_id": cmid(), "text": "thanks, one more thing"})
    assert (await user.recv_type("ai_start"))["type"] == "ai_start"
    await user.send({"type": "stop"})
    await user.recv_type("ai_end")
    await user.close()
    await console.close()


async def _until(client: Client, kind: str) -> list[dict[str, Any]]:
    frames = []
    while True:
        frame = await client.recv()
        frames.append(frame)
        if frame["type"] == kind:
            return frames


async def test_defined_outcomes_of_agent_frames(slow_gateway: GatewayProcess) -> None:
    """Racing takeovers (one wins; the other is told who holds it), a repeated takeover
    (idempotent), a handback in ai mode (conflict), a widget sending agent frames (forbidden)."""
    gw = slow_gateway
    widget = new_widget(gw)
    user = await Client.open(gw)
    await user.hello(widget)
    one, two = new_agent(gw), new_agent(gw)
    first, second = await AgentClient.open(gw), await AgentClient.open(gw)
    await first.agent_hello(one)
    await second.agent_hello(two)
    cid = widget.conversation_id

    await first.act("handback", cid)
    refused = await first.recv_type("error")
    assert (refused["code"], refused["conversation_id"]) == ("conflict", cid)

    await user.ask_and_read(cmid(), "go on", deltas=2)
    await asyncio.gather(first.act("takeover", cid), second.act("takeover", cid))
    mode = await user.recv_type("mode")
    winner = mode["agent_id"]
    assert winner in (one.agent_id, two.agent_id)
    loser = second if winner == one.agent_id else first
    conflict = await loser.recv_type("error")
    assert conflict["code"] == "conflict"
    assert winner in conflict["message"]
    assert [f["status"] for f in user.frames if f["type"] == "ai_end"] == ["taken_over"]

    holder = first if winner == one.agent_id else second
    await holder.act("takeover", cid)  # idempotent: no error, no event
    await no_frame(holder, 0.5, "error")
    await no_frame(user, 0.2, "mode", "ai_end")

    for kind in ("takeover", "handback", "subscribe", "unsubscribe"):
        await user.send({"type": kind, "conversation_id": cid})
        error = await user.recv_type("error")
        assert error["code"] == "forbidden", (kind, error)
    await loser.send({"type": "message", "conversation_id": cid, "client_msg_id": cmid(), "text": "me too"})
    assert (await loser.recv_type("error"))["code"] == "conflict"
    await holder.act("handback", cid)
    await user.recv_type("mode")
    for client in (user, first, second):
        await client.close()


async def test_a_stop_and_a_takeover_end_an_answer_once(slow_gateway: GatewayProcess) -> None:
    """A user's stop and an agent's takeover at once: one ai_end, stopped or taken_over."""
    gw = slow_gateway
    for _ in range(3):
        widget = new_widget(gw)
        user = await Client.open(gw)
        await user.hello(widget)
        console = await AgentClient.open(gw)
        await console.agent_hello(new_agent(gw))
        start = await user.ask_and_read(cmid(), "race", deltas=1)
        await asyncio.gather(user.send({"type": "stop"}), console.act("takeover", widget.conversation_id))
        await user.recv_type("mode")
        await no_frame(user, 0.3, "ai_end", "delta")
        ends = [f for f in user.frames if f["type"] == "ai_end"]
        assert len(ends) == 1
        assert ends[0]["response_id"] == start["response_id"]
        assert ends[0]["status"] in ("stopped", "taken_over")
        await user.close()
        await console.close()


async def test_unknown_conversations_and_disabled_agents(gateway: GatewayProcess) -> None:
    """A conversation that does not exist is not_found for every agent frame; a disabled agent's
    token stops working at its next subscribe (4401) and at hello."""
    agent = new_agent(gateway)
    console = await AgentClient.open(gateway)
    await console.agent_hello(agent)
    missing = str(uuid.uuid4())
    for kind in ("subscribe", "takeover", "handback"):
        await console.act(kind, missing)
        error = await console.recv_type("error")
        assert (error["code"], error["conversation_id"]) == ("not_found", missing), kind
    await console.send({"type": "message", "conversation_id": missing, "client_msg_id": cmid(), "text": "x"})
    assert (await console.recv_type("error"))["code"] == "not_found"
    await console.send({"type": "stop"})
    assert (await console.recv_type("error"))["code"] == "forbidden"

    r = httpx.patch(
        f"{gateway.http}/v1/agents/{agent.agent_id}",
        json={"disabled": True},
        headers={"Authorization": f"Bearer {DEMO_API_KEY}"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    widget = new_widget(gateway)
    await console.subscribe(widget.conversation_id)
    assert console.frames[-1]["code"] == "unauthorized"
    await console.ws.wait_closed()
    assert console.ws.close_code == 4401
    again = await AgentClient.open(gateway)
    await again.send({"type": "hello", "token": agent.token})
    assert (await again.recv())["code"] == "unauthorized"
    await again.ws.wait_closed()
    assert again.ws.close_code == 4401


async def test_a_cap_on_subscriptions_per_agent_connection(gateway_factory: Any) -> None:
    gw: GatewayProcess = gateway_factory({"CHATGW_AGENT_MAX_SUBSCRIPTIONS": "2"})
    console = await AgentClient.open(gw)
    welcome, _ = await console.agent_hello(new_agent(gw))
    assert welcome["max_subscriptions"] == 2
    widgets = [new_widget(gw) for _ in range(3)]
    for widget in widgets[:2]:
        assert (await console.subscribe(widget.conversation_id))["type"] == "subscribed"
    refused = await console.subscribe(widgets[2].conversation_id)
    assert (refused["type"], refused["code"]) == ("error", "conflict")
    await console.act("unsubscribe", widgets[0].conversation_id)
    await console.recv_type("unsubscribed")
    assert (await console.subscribe(widgets[2].conversation_id))["type"] == "subscribed"
    await console.close()


async def test_an_agent_that_drops_mid_answer_resumes_where_it_was(slow_gateway: GatewayProcess) -> None:
    """The agent's socket dies mid-answer; a new one subscribes with resume and gets the rest: every
    seq once, in order, the deltas joined equal to the ai_end's text."""
    gw = slow_gateway
    widget = new_widget(gw)
    user = await Client.open(gw)
    await user.hello(widget)
    agent = new_agent(gw)
    first = await AgentClient.open(gw)
    await first.agent_hello(agent)
    subscribed = await first.subscribe(widget.conversation_id)
    start = await user.ask_and_read(cmid(), "a long answer, please", deltas=2)
    while len([f for f in first.of(widget.conversation_id) if f["type"] == "delta"]) < 2:
        await first.recv()
    seen = [f for f in first.of(widget.conversation_id) if f["type"] != "subscribed"]
    last_seq = seen[-1]["seq"]
    first.ws.transport.abort()

    second = await AgentClient.open(gw)
    await second.agent_hello(agent)
    resumed = await second.subscribe(
        widget.conversation_id, resume={"epoch": subscribed["epoch"], "last_seq": last_seq}
    )
    assert resumed["resumed"] is True
    while not any(f["type"] == "ai_end" for f in second.of(widget.conversation_id)):
        await second.recv()
    rest = [f for f in second.of(widget.conversation_id) if f["type"] != "subscribed"]
    assert_contiguous(seen + rest, subscribed["seq"] + 1)
    end = rest[-1]
    assert end["text"] == joined_deltas(seen + rest, start["response_id"])
    await user.close()
    await second.close()


async def test_metrics_count_takeovers_agents_and_conversations_by_mode(gateway_factory: Any) -> None:
    gw: GatewayProcess = gateway_factory()

    def metric(name: str) -> float:
        text = httpx.get(f"{gw.http}/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))

    widget = new_widget(gw)
    await user_message(gw, widget)  # an active conversation, in ai mode
    ai, human = metric('chatgw_conversations{mode="ai"}'), metric('chatgw_conversations{mode="human"}')
    assert ai >= 1
    console = await AgentClient.open(gw)
    await console.agent_hello(new_agent(gw))
    await console.act("takeover", widget.conversation_id)
    async with asyncio.timeout(20):  # the gauge is counted at most every 5 s, when read
        while metric('chatgw_conversations{mode="human"}') < human + 1:
            await asyncio.sleep(0.5)
    assert metric('chatgw_conversations{mode="ai"}') == ai - 1
    assert metric('chatgw_takeovers_total{business="demo"}') == 1
    assert metric("chatgw_agent_connections") == 1
    await console.close()


async def user_message(gw: GatewayProcess, widget: Any) -> None:
    user = await Client.open(gw)
    await user.hello(widget)
    await user.send({"type": "message", "client_msg_id": cmid(), "text": "hello"})
    await user.recv_type("ai_end")
    await user.close()
