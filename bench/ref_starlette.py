"""Reference server (b): bare Starlette on uvicorn, run as the gateway runs it.

uvicorn with the sans-I/O websockets implementation, per-message deflate off, frames capped at
64 KiB, a ping every 20 s (gateway/cli.py's settings). Per socket: one endpoint coroutine that
accepts, reads the `join` frame, adds the socket to its room (a user's join starts the room's
publisher), then reads until the client goes away (Starlette only notices a close by reading).
Per piece: the publisher encodes it once (json) and awaits `send_text` on each socket of the room
in turn. No authentication, no sequence numbers, no storage, no replay, no outbox.

    python bench/ref_starlette.py --port 8102
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json

import uvicorn
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from workload import encode, publish_answers, raise_file_limit

rooms: dict[str, set[WebSocket]] = {}


async def emit(room: str, piece: dict[str, object]) -> None:
    text = encode(piece)
    for ws in list(rooms.get(room, ())):
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
            await ws.send_text(text)


async def endpoint(ws: WebSocket) -> None:
    await ws.accept()
    join = json.loads(await ws.receive_text())
    room, role = str(join["room"]), join.get("role")
    members = rooms.setdefault(room, set())
    members.add(ws)
    publisher = asyncio.create_task(publish_answers(room, emit)) if role == "user" else None
    try:
        while True:
            await ws.receive_text()
    except WebSocketDisconnect:
        pass
    finally:
        members.discard(ws)
        if not members:
            rooms.pop(room, None)
        if publisher:
            publisher.cancel()


app = Starlette(routes=[WebSocketRoute("/ws", endpoint)])


def main(port: int) -> None:
    raise_file_limit()
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        ws="websockets-sansio",
        ws_max_size=65536,
        ws_ping_interval=20,
        ws_ping_timeout=20,
        ws_per_message_deflate=False,
        lifespan="off",
        log_level="warning",
        access_log=False,
        server_header=False,
        backlog=4096,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="bare Starlette WebSocket fan-out (benchmark reference)")
    parser.add_argument("--port", type=int, required=True)
    main(parser.parse_args().port)
