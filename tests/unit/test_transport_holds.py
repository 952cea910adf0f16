"""What an accepted WebSocket holds (gateway/transport.py): uvicorn's queue and "writable" flag
replaced by `_Inbox` and `_Flag`, and the handshake's request and response let go. The two
classes alone, then a real uvicorn server with the gateway's protocols and a real client."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import uvicorn
from websockets.asyncio.client import connect
from websockets.http11 import Request

from gateway.settings import LimitSettings
from gateway.transport import _Flag, _GuardedWebSocket, _Inbox, protocols
from tests.servers import free_port


async def test_the_inbox_hands_out_items_in_order_and_waits_when_empty() -> None:
    inbox = _Inbox()
    assert inbox.empty()
    assert inbox.qsize() == 0
    inbox.put_nowait(1)
    inbox.put_nowait(2)
    assert inbox.qsize() == 2
    assert [await inbox.get(), await inbox.get()] == [1, 2]
    waiting = asyncio.create_task(inbox.get())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    inbox.put_nowait(3)
    assert await waiting == 3
    assert inbox.empty()


async def test_the_inbox_serves_waiters_in_order_and_a_cancelled_one_loses_nothing() -> None:
    inbox = _Inbox()
    first = asyncio.create_task(inbox.get())
    second = asyncio.create_task(inbox.get())
    third = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    second.cancel()  # cancelled while waiting: never served
    await asyncio.sleep(0)
    inbox.put_nowait("a")
    first.cancel()  # woken for "a", then cancelled before it ran: "a" goes to the next waiter
    inbox.put_nowait("b")
    with pytest.raises(asyncio.CancelledError):
        await first
    with pytest.raises(asyncio.CancelledError):
        await second
    assert await third == "a"
    assert await inbox.get() == "b"
    assert inbox.empty()


async def test_the_flag_releases_every_waiter_when_set_and_holds_them_when_clear() -> None:
    flag = _Flag(True)
    assert flag.is_set()
    await flag.wait()  # set: returns at once
    flag.clear()
    assert not flag.is_set()
    waiters = [asyncio.create_task(flag.wait()) for _ in range(3)]
    await asyncio.sleep(0.01)
    assert not any(w.done() for w in waiters)
    waiters[0].cancel()  # one cancelled leaves the others waiting
    await asyncio.sleep(0)
    assert not waiters[1].done()
    flag.set()
    await asyncio.gather(*waiters[1:])
    assert waiters[0].cancelled()
    flag.clear()
    again = asyncio.create_task(flag.wait())
    await asyncio.sleep(0.01)
    assert not again.done()
    flag.set()
    await again


async def test_an_accepted_socket_holds_no_request_or_queue_and_still_talks() -> None:
    async def echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        while (message := await receive())["type"] == "websocket.receive":
            await send({"type": "websocket.send", "text": message["text"].upper()})

    http, ws = protocols(LimitSettings())
    port = free_port()
    config = uvicorn.Config(
        echo, host="127.0.0.1", port=port, http=http, ws=ws, lifespan="off", log_config=None
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        async with connect(f"ws://127.0.0.1:{port}/", additional_headers={"X-Big": "x" * 2000}) as client:
            await client.send("hello")
            assert await client.recv() == "HELLO"
            [protocol] = [c for c in server.server_state.connections if isinstance(c, _GuardedWebSocket)]
            held: dict[str, Any] = vars(protocol)  # uvicorn's attributes, as they are now
            assert isinstance(held["queue"], _Inbox)
            assert isinstance(held["writable"], _Flag)
            assert held["request"] is None
            assert held["response"] is None
            parser: Any = protocol.conn.parser  # a generator; the handshake's request is its local
            kept = parser.gi_frame.f_locals["request"]
            assert isinstance(kept, Request)
            assert len(kept.headers) == 0
            for n in range(50):  # many frames, each waited for through the inbox
                await client.send(f"m{n}")
            assert [await client.recv() for _ in range(50)] == [f"M{n}" for n in range(50)]
    finally:
        server.should_exit = True
        await serving
