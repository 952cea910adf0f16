"""Reference server (c): a minimal python-socketio app (ASGI on uvicorn) with its Redis manager.

`socketio.AsyncServer` with `AsyncRedisManager`, WebSocket transport only (no long-polling),
mounted as `socketio.ASGIApp` on uvicorn with the gateway's socket settings (sans-I/O websockets,
per-message deflate off, 64 KiB frames). The Engine.IO ping (25 s) is socket.io's own keepalive.
Per socket: the `join` event puts it in its room (a user's join starts the room's publisher).
Per piece: the publisher calls `sio.emit("delta", piece, room=room)`; the Redis manager delivers
it to this instance's members of the room (one socket.io packet encoded per emit, an Engine.IO
send per member) and PUBLISHes it (as JSON) on its Redis channel, where every instance, this one
included, decodes it, and every other one delivers it to its own members. Run two instances on
one channel for cross-instance fan-out.

    python bench/ref_socketio.py --port 8103 --redis redis://127.0.0.1:6379/0 --channel bench-x
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import socketio  # type: ignore[import-untyped,unused-ignore]
import uvicorn
from workload import publish_answers, raise_file_limit


def build(redis_url: str, channel: str) -> tuple[socketio.AsyncServer, socketio.ASGIApp]:
    manager = socketio.AsyncRedisManager(redis_url, channel=channel)
    sio = socketio.AsyncServer(async_mode="asgi", client_manager=manager, transports=["websocket"])
    publishers: dict[str, asyncio.Task[None]] = {}

    async def emit(room: str, piece: dict[str, object]) -> None:
        await sio.emit("delta", piece, room=room)

    @sio.event  # type: ignore[untyped-decorator,unused-ignore]
    async def join(sid: str, data: dict[str, Any]) -> None:
        room = str(data["room"])
        await sio.enter_room(sid, room)
        if data.get("role") == "user":
            publishers[sid] = asyncio.create_task(publish_answers(room, emit))

    @sio.event  # type: ignore[untyped-decorator,unused-ignore]
    async def disconnect(sid: str, reason: object = None) -> None:
        task = publishers.pop(sid, None)
        if task:
            task.cancel()

    return sio, socketio.ASGIApp(sio, socketio_path="socket.io")


def main(port: int, redis_url: str, channel: str) -> None:
    raise_file_limit()
    _, app = build(redis_url, channel)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        ws="websockets-sansio",
        ws_max_size=65536,
        ws_per_message_deflate=False,
        lifespan="off",
        log_level="warning",
        access_log=False,
        server_header=False,
        backlog=4096,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="python-socketio fan-out over Redis (benchmark reference)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--channel", default="chatgw-bench-socketio")
    args = parser.parse_args()
    main(args.port, args.redis, args.channel)
