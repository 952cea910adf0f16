"""Reference server (a), the floor: a raw `websockets` broadcast server, nothing else.

Per socket: the first frame is `join` (see workload.py); the socket is added to its room, and a
user's join starts the room's publisher. Per piece: the publisher encodes it once (json) and
hands the text to `websockets.broadcast()` for the room's sockets, which writes it to each
socket's transport without waiting (a socket whose buffer is above the high-water mark is
skipped). No authentication, no sequence numbers, no storage, no replay, no backpressure policy.

Same socket settings as the gateway: no per-message deflate, frames capped at 64 KiB, a ping
every 20 s.

    python bench/ref_websockets.py --port 8101
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable

from websockets.asyncio.server import ServerConnection, broadcast, serve
from workload import encode, publish_answers, raise_file_limit

rooms: dict[str, set[ServerConnection]] = {}


async def emit(room: str, piece: dict[str, object]) -> None:
    broadcast(rooms.get(room, ()), encode(piece))


async def handler(ws: ServerConnection) -> None:
    join = json.loads(await ws.recv())
    room, role = str(join["room"]), join.get("role")
    members = rooms.setdefault(room, set())
    members.add(ws)
    publisher = asyncio.create_task(publish_answers(room, emit)) if role == "user" else None
    try:
        async for _ in ws:  # clients send nothing more; this notices the close
            pass
    finally:
        members.discard(ws)
        if not members:
            rooms.pop(room, None)
        if publisher:
            publisher.cancel()


async def serve_forever(on_socket: Callable[[ServerConnection], Awaitable[None]], port: int) -> None:
    """Serve `on_socket` on 127.0.0.1:`port` with the gateway's socket settings, for ever (also
    ref_floor.py's server)."""
    raise_file_limit()
    async with serve(
        on_socket,
        "127.0.0.1",
        port,
        compression=None,
        max_size=65536,
        ping_interval=20,
        ping_timeout=20,
        backlog=4096,
    ) as server:
        await server.serve_forever()


async def main(port: int) -> None:
    await serve_forever(handler, port)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="raw websockets broadcast server (benchmark reference)")
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(main(parser.parse_args().port))
