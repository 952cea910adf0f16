"""Client sides of the reference servers, on the `websockets` client.

`plain` speaks the reference protocol of ref_websockets.py and ref_starlette.py (workload.py).
`socketio` speaks just enough Socket.IO v5 over Engine.IO v4 (WebSocket transport only) for
ref_socketio.py: the `40` namespace connect, `42["join", ...]`, `42["delta", ...]` events and
the ping/pong (`2` / `3`). It is written here rather than taken from python-socketio's own
client so that the socket.io clients do exactly the work the plain ones do per frame (one JSON
decode): the clients share the machine's two cores with the server being measured.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Literal, TypeVar

import orjson
from websockets.asyncio.client import ClientConnection, connect

Proto = Literal["plain", "socketio"]
T = TypeVar("T")
ATTEMPTS = 3


async def from_driver(pipe: Connection) -> Any:
    """The driver's next word, awaited without blocking the event loop (and without a thread that
    would keep the process alive if the driver went away)."""
    loop = asyncio.get_running_loop()
    readable: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(pipe.fileno(), wake)
    try:
        await readable
    finally:
        loop.remove_reader(pipe.fileno())
    return pipe.recv()


async def retried(attempt: Callable[[], Awaitable[T]]) -> T:
    """Open a socket, trying up to ATTEMPTS times: on a loaded machine a handshake can time out
    while the server's accept queue is long."""
    for n in range(1, ATTEMPTS + 1):
        try:
            return await attempt()
        except (OSError, TimeoutError):
            if n == ATTEMPTS:
                raise
            await asyncio.sleep(n)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class SocketSpec:
    port: int
    proto: Proto
    room: str
    role: str


def url_of(spec: SocketSpec) -> str:
    if spec.proto == "socketio":
        return f"ws://127.0.0.1:{spec.port}/socket.io/?EIO=4&transport=websocket"
    return f"ws://127.0.0.1:{spec.port}/ws"


async def open_joined(spec: SocketSpec) -> ClientConnection:
    """Connect and join the room; returns once the server has the join."""
    ws = await connect(url_of(spec), compression=None, ping_interval=None, open_timeout=60, max_size=2**20)
    join = {"room": spec.room, "role": spec.role}
    if spec.proto == "plain":
        await ws.send(orjson.dumps({"type": "join", **join}).decode())
        return ws
    opened = await ws.recv()
    if not str(opened).startswith("0"):
        raise RuntimeError(f"expected an Engine.IO open packet, got {opened!r}")
    await ws.send("40")
    while not str(await ws.recv()).startswith("40"):
        pass
    await ws.send("42" + orjson.dumps(["join", join]).decode())
    return ws


async def read_pieces(ws: ClientConnection, proto: Proto, on_piece: Callable[[float, float], None]) -> None:
    """Read until the socket closes; call on_piece(arrival time, send time) for each piece."""
    async for raw in ws:
        now = time.time()
        if proto == "plain":
            on_piece(now, orjson.loads(raw)["t"])
        elif raw == "2":
            await ws.send("3")
        elif isinstance(raw, str) and raw.startswith("42"):
            on_piece(now, orjson.loads(raw[2:])[1]["t"])


async def keep_open(ws: ClientConnection, proto: Proto) -> None:
    """Hold an idle socket open: answer Engine.IO pings (websockets answers WebSocket pings itself)."""
    async for raw in ws:
        if proto == "socketio" and raw == "2":
            await ws.send("3")
