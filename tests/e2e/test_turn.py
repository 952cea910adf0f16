"""A whole chat turn over a real socket against a real gateway process."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from tests.e2e.client import Client, assert_contiguous, joined_deltas, new_widget, stored_history
from tests.servers import GatewayProcess


async def test_full_turn_streams_deltas_that_join_to_the_final_text(gateway: GatewayProcess) -> None:
    """message -> ack, message event, ai_start, deltas, ai_end; deltas join to ai_end.text."""
    widget = new_widget(gateway)
    client = await Client.open(gateway)
    welcome = await client.hello(widget)
    assert welcome["conversation_id"] == widget.conversation_id
    assert welcome["seq"] == 0
    assert welcome["mode"] == "ai"
    assert welcome["resumed"] is False

    await client.send({"type": "message", "client_msg_id": "m-1", "text": "Where is my order?"})
    frames = await client.until_ai_end()
    types = [f["type"] for f in frames]
    ack = next(f for f in frames if f["type"] == "ack")
    message = next(f for f in frames if f["type"] == "message")
    start = next(f for f in frames if f["type"] == "ai_start")
    end = frames[-1]

    assert ack["client_msg_id"] == "m-1"
    assert ack["message_id"] == message["message_id"]
    assert ack["seq"] == message["seq"] == 1
    assert message["role"] == "user"
    assert message["text"] == "Where is my order?"
    assert types.count("delta") >= 1
    assert end["status"] == "complete"
    assert end["response_id"] == start["response_id"]
    assert end["text"].startswith("You said: Where is my order?")
    assert joined_deltas(frames, start["response_id"]) == end["text"]
    assert_contiguous(frames, 1)
    await client.close()


async def test_deltas_are_coalesced_by_size(gateway_factory: Callable[..., GatewayProcess]) -> None:
    """With a long flush interval, deltas leave once max_chars have gathered: all but the first
    (a piece after a pause leaves at once) and the last (what is left at the end)."""
    gw = gateway_factory(
        {"CHATGW_SCRIPTED_TPS": "200", "CHATGW_DELTA_FLUSH_MS": "1000", "CHATGW_DELTA_MAX_CHARS": "50"}
    )
    widget = new_widget(gw)
    client = await Client.open(gw)
    await client.hello(widget)
    await client.send({"type": "message", "client_msg_id": "c-1", "text": "hello"})
    frames = await client.until_ai_end()
    deltas = [f["text"] for f in frames if f["type"] == "delta"]
    assert len(deltas) >= 3
    assert all(len(d) >= 50 for d in deltas[1:-1]), deltas
    assert "".join(deltas) == frames[-1]["text"]
    await client.close()


async def test_resend_gets_the_same_ack_and_no_second_answer(gateway: GatewayProcess) -> None:
    """A resent client_msg_id is acked again with the same message and seq, and not answered again."""
    widget = new_widget(gateway)
    client = await Client.open(gateway)
    await client.hello(widget)
    await client.send({"type": "message", "client_msg_id": "dup", "text": "first"})
    first = await client.until_ai_end()
    first_ack = next(f for f in first if f["type"] == "ack")

    await client.send({"type": "message", "client_msg_id": "dup", "text": "first"})
    again = await client.recv_type("ack", "message", "ai_start")
    assert again == first_ack

    await client.send({"type": "message", "client_msg_id": "next", "text": "second"})
    second = await client.until_ai_end()
    # Nothing was published for the resend: the next event is the new message.
    assert second[0]["type"] in ("message", "ack")
    assert [f["type"] for f in second].count("ai_start") == 1
    assert second[-1]["text"].startswith("You said: second")

    history = await stored_history(gateway, widget, 4)
    assert [(m["role"], m["client_msg_id"]) for m in history] == [
        ("user", "dup"),
        ("assistant", None),
        ("user", "next"),
        ("assistant", None),
    ]
    await client.close()


async def test_concurrent_duplicates_store_one_message(gateway: GatewayProcess) -> None:
    """Five copies of one message sent back to back: five identical acks, one message event."""
    widget = new_widget(gateway)
    client = await Client.open(gateway)
    await client.hello(widget)
    for _ in range(5):
        await client.send({"type": "message", "client_msg_id": "burst", "text": "hi"})
    frames = await client.until_ai_end()
    acks = [f for f in frames if f["type"] == "ack"]
    while len(acks) < 5:
        acks.append(await client.recv_type("ack"))
    assert len({(a["message_id"], a["seq"]) for a in acks}) == 1
    assert [f["type"] for f in frames].count("message") == 1
    await client.close()


async def test_stop_mid_answer_keeps_the_partial_text(slow_gateway: GatewayProcess) -> None:
    """stop ends the answer with status stopped; ai_end.text is what was streamed; no delta after."""
    widget = new_widget(slow_gateway)
    client = await Client.open(slow_gateway)
    await client.hello(widget)
    await client.send({"type": "message", "client_msg_id": "s-1", "text": "tell me a long story"})
    start = await client.recv_type("ai_start")
    await client.recv_type("delta")
    await client.recv_type("delta")
    await client.send({"type": "stop"})
    frames = await client.until_ai_end()
    end = frames[-1]
    assert end["status"] == "stopped"
    streamed = joined_deltas(client.frames, start["response_id"])
    assert end["text"] == streamed
    assert 0 < len(end["text"].split()) < 240

    # The socket keeps working, and no delta of the stopped answer arrives after its ai_end.
    await client.send({"type": "message", "client_msg_id": "s-2", "text": "ok"})
    later = await client.recv_type("ack", "message")
    assert later["type"] in ("ack", "message")
    after_end = client.frames[client.frames.index(end) + 1 :]
    assert not [f for f in after_end if f.get("response_id") == start["response_id"]]
    await client.recv_type("ai_start")  # (a stop before it would cancel the answer before it began)
    await client.send({"type": "stop"})
    await client.until_ai_end()

    history = await stored_history(slow_gateway, widget, 4)
    stored = next(m for m in history if m.get("response_id") == start["response_id"])
    assert stored["status"] == "stopped"
    assert stored["text"] == end["text"]
    await client.close()


async def test_typing_reaches_other_sockets_of_the_conversation_only(gateway: GatewayProcess) -> None:
    """typing is relayed without seq to the conversation's other sockets, not back to the sender."""
    widget = new_widget(gateway)
    sender = await Client.open(gateway)
    watcher = await Client.open(gateway)
    await sender.hello(widget)
    await watcher.hello(widget)
    await sender.send({"type": "typing", "state": True})
    typing = await watcher.recv()
    assert typing == {"type": "typing", "role": "user", "state": True}
    # The sender sees its own message event next, not its typing.
    await sender.send({"type": "message", "client_msg_id": "t-1", "text": "x"})
    first = await sender.recv()
    assert first["type"] in ("message", "ack")
    await asyncio.gather(sender.until_ai_end(), watcher.until_ai_end())
    await sender.close()
    await watcher.close()


async def test_duplicates_sent_at_once_from_many_sockets_make_one_message(gateway: GatewayProcess) -> None:
    """Ten sockets of one conversation send the same client_msg_id at the same moment: every one
    gets the same ack, the conversation has one such message, and it is answered once."""
    widget = new_widget(gateway)
    clients = [await Client.open(gateway) for _ in range(10)]
    for client in clients:
        await client.hello(widget)
    frame = {"type": "message", "client_msg_id": "everyone", "text": "same words"}
    await asyncio.gather(*(client.send(frame) for client in clients))
    acks = await asyncio.gather(*(client.recv_type("ack") for client in clients))
    assert len({(a["message_id"], a["seq"]) for a in acks}) == 1
    ends = await asyncio.gather(*(client.recv_type("ai_end") for client in clients))
    assert len({e["response_id"] for e in ends}) == 1

    history = await stored_history(gateway, widget, 2)
    assert [(m["role"], m["client_msg_id"]) for m in history] == [("user", "everyone"), ("assistant", None)]
    for client in clients:
        await client.close()
