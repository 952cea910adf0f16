"""A client that stops reading is closed with 4008 and never holds up the others."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.e2e.client import Client, new_widget, stalled_client
from tests.servers import GatewayProcess

MESSAGES = 1500
TEXT = "x" * 3500  # 1500 frames of about 3.7 kB: more than the socket buffers between the two ends hold
BIG_MESSAGES, BIG = 200, "y" * 30_000  # 6 MB of message frames, fewer round trips


async def test_a_slow_consumer_is_closed_while_a_fast_one_keeps_going(
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    """Two sockets on one conversation; one stops reading. The other sends and receives every
    message; the stalled one is closed with 4008 once its outbox fills, and can resume afterwards."""
    gw = gateway_factory(
        {
            "CHATGW_SCRIPTED_TOKENS": "3",
            "CHATGW_REPLAY_WINDOW": "16",
            "CHATGW_OUTBOX_FRAMES": "80",
            # The fast client floods on purpose; the message limits are tested in test_limits.py.
            "CHATGW_LIMIT_SOCKET_FRAMES": "off",
            "CHATGW_LIMIT_SOCKET_MESSAGES": "off",
            "CHATGW_LIMIT_CONVERSATION_MESSAGES": "off",
            "CHATGW_LIMIT_USER_ANSWERS": "off",
            # The stalled client takes its close frame only once the fast one is done: give it
            # that long before the server drops the connection (test_limits.py tests the drop).
            "CHATGW_WS_CLOSE_TIMEOUT_S": "60",
        }
    )
    widget = new_widget(gw)

    # The stalled client: a tiny receive buffer, and it reads nothing after its welcome.
    stalled = await stalled_client(gw)
    await stalled.hello(widget)

    fast = Client(await connect(gw.ws, max_size=2**22))
    await fast.hello(widget)
    for n in range(MESSAGES):
        await fast.send({"type": "message", "client_msg_id": f"m-{n}", "text": TEXT})
        ack = await fast.recv_type("ack")
        assert ack["client_msg_id"] == f"m-{n}"
    seen = {f["client_msg_id"] for f in fast.frames if f["type"] == "message"}
    while len(seen) < MESSAGES:
        frame = await fast.recv_type("message")
        seen.add(frame["client_msg_id"])

    # Now drain the stalled socket: it ends with 4008, well before it saw every message.
    try:
        while True:
            await stalled.recv(timeout=30)
    except ConnectionClosed:
        pass
    assert stalled.ws.close_code == 4008
    assert len([f for f in stalled.frames if f["type"] == "message"]) < MESSAGES

    # It recovers by resuming: the window (16 events) is long gone, so it is told to reset.
    again = await Client.open(gw)
    last = max(f["seq"] for f in stalled.frames if "seq" in f and f["type"] not in ("welcome", "ack"))
    await again.hello(widget, resume={"epoch": stalled.frames[0]["epoch"], "last_seq": last})
    reset = await again.recv()
    assert reset["type"] == "reset"
    assert reset["reason"] == "window"
    await again.close()
    await fast.close()


async def test_a_reader_that_pauses_gets_every_frame_in_order_once_it_reads_again(
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    """The same stalled socket with room in its outbox: while its socket takes nothing, what is sent
    to it waits (the send in progress, then the outbox behind it); once it reads again it gets
    every event of the conversation exactly once and in order, and stays open."""
    gw = gateway_factory(
        {
            "CHATGW_SCRIPTED_TOKENS": "3",
            "CHATGW_REPLAY_WINDOW": "16",
            "CHATGW_OUTBOX_FRAMES": "4000",
            "CHATGW_MAX_MESSAGE_CHARS": str(len(BIG)),
            # The fast client floods on purpose (as above).
            "CHATGW_LIMIT_SOCKET_FRAMES": "off",
            "CHATGW_LIMIT_SOCKET_MESSAGES": "off",
            "CHATGW_LIMIT_CONVERSATION_MESSAGES": "off",
            "CHATGW_LIMIT_USER_ANSWERS": "off",
        }
    )
    widget = new_widget(gw)
    stalled = await stalled_client(gw)
    welcome = await stalled.hello(widget)

    fast = Client(await connect(gw.ws, max_size=2**22))
    await fast.hello(widget)
    for n in range(BIG_MESSAGES):
        await fast.send({"type": "message", "client_msg_id": f"m-{n}", "text": BIG})
        await fast.recv_type("ack")
    while not answered_all(fast.frames, BIG_MESSAGES):  # then every event has been sent
        await fast.recv()
    last_seq = max(f["seq"] for f in fast.frames if f["type"] != "ack" and "seq" in f)

    seqs: list[int] = []
    while not seqs or seqs[-1] < last_seq:
        frame = await stalled.recv(timeout=30)
        if "seq" in frame:  # typing frames carry none
            seqs.append(frame["seq"])
    assert seqs == list(range(welcome["seq"] + 1, last_seq + 1))
    messages = [f["client_msg_id"] for f in stalled.frames if f["type"] == "message"]
    assert messages == [f"m-{n}" for n in range(BIG_MESSAGES)]
    await stalled.send({"type": "typing", "state": True})  # still open
    await stalled.close()
    await fast.close()


def answered_all(frames: list[dict[str, Any]], messages: int) -> bool:
    """Every message arrived as an event, an answer started after the last one, and every answer
    ended (one answer may take several messages that arrived while another ran)."""
    kinds = [f["type"] for f in frames]
    if kinds.count("message") < messages:
        return False
    last_message = len(kinds) - 1 - kinds[::-1].index("message")
    return "ai_start" in kinds[last_message:] and kinds.count("ai_start") == kinds.count("ai_end")
