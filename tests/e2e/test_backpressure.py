"""A client that stops reading is closed with 4008 and never holds up the others."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.e2e.client import Client, new_widget
from tests.servers import GatewayProcess


async def test_a_slow_consumer_is_closed_while_a_fast_one_keeps_going(
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    """Two sockets on one conversation; one stops reading. The reader gets the whole answer, the
    other is closed with 4008 once its outbox fills, and can resume afterwards."""
    gw = gateway_factory(
        {
            "CHATGW_SCRIPTED_TPS": "0",
            "CHATGW_SCRIPTED_TOKENS": "60000",
            "CHATGW_DELTA_MAX_CHARS": "1",
            "CHATGW_DELTA_FLUSH_MS": "0",
            "CHATGW_REPLAY_WINDOW": "16",
            "CHATGW_OUTBOX_FRAMES": "80",
        }
    )
    widget = new_widget(gw)

    # The stalled client: a tiny receive buffer, and it reads nothing after its welcome.
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.setblocking(False)
    await asyncio.get_running_loop().sock_connect(raw, ("127.0.0.1", gw.port))
    stalled = Client(await connect(gw.ws, sock=raw, max_size=2**22, max_queue=1))
    await stalled.hello(widget)

    fast = Client(await connect(gw.ws, max_size=2**22))
    await fast.hello(widget)
    await fast.send({"type": "message", "client_msg_id": "flood", "text": "flood"})
    frames = await fast.until_ai_end()
    end = frames[-1]
    assert end["status"] == "complete"
    assert len(end["text"].split()) >= 60000

    # Now drain the stalled socket: it ends with 4008 before the answer's end reached it.
    got_end = False
    try:
        while True:
            frame = await stalled.recv(timeout=30)
            got_end = got_end or frame["type"] == "ai_end"
    except ConnectionClosed:
        pass
    assert stalled.ws.close_code == 4008
    assert not got_end

    # It recovers by resuming: the window is long gone, so it is told to reset.
    again = await Client.open(gw)
    last = max(f["seq"] for f in stalled.frames if "seq" in f and f["type"] not in ("welcome", "ack"))
    epoch = stalled.frames[0]["epoch"]
    await again.hello(widget, resume={"epoch": epoch, "last_seq": last})
    reset = await again.recv()
    assert reset["type"] == "reset"
    assert reset["reason"] == "window"
    await again.close()
    await fast.close()
