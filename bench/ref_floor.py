"""Reference server (d), the floor of the gateway's two-instance path: the same I/O per piece, and
nothing else.

Run two instances on one Redis. Per socket: the first frame is `join` (see workload.py); the
socket is added to its room, the instance SUBSCRIBEs to the room's channel when it is the room's
first socket here, and a user's join starts the room's publisher on that instance. Per piece, the
publisher PUBLISHes it (the piece's JSON, encoded once) on the room's channel, and every instance
with sockets in the room, the publisher's included, reads it from its subscription and writes it,
as one text frame built once (the gateway's `text_frame`), straight to the transport of each of
its sockets in the room (as the gateway's `write_text_now` does; a socket whose write buffer is
above 64 KiB is skipped). That is the gateway's path with the watcher on the other instance, stripped to its I/O: a
publish, one pub/sub read on each instance, one frame written per socket.

The pieces come from one of two places:

- by default from a timer, as for the other reference servers (`workload.publish_answers`);
- with `--model URL`, from an OpenAI-compatible server's stream, as the gateway's do: every 3 s
  (the first at a random offset) the publisher POSTs a streamed chat completion on its own
  kept-alive connection and publishes one piece per token, the piece's send time `t` being the
  one the token carries (`chatgw model-server`'s marker, so that lag is measured from the model,
  as for the gateway). HTTP/1.1, chunked transfer encoding and Server-Sent Events are read here by
  hand from an asyncio stream, and each event is parsed with orjson: no client library.

Redis is spoken by hand too (RESP over asyncio streams, no client library): the publishes of one
event-loop turn go out in one write on the instance's publishing connection, whose replies are
read and dropped; the subscription's messages are split out of each chunk read.

With `--local`, the publishing instance writes the frames of its own sockets in the room itself
and does not subscribe to the rooms it publishes for, so it never reads its own publishes back;
only the other instance reads them from Redis. That is what the gateway would save by not reading
back its own events (bench/README.md, "A seventh look").

No authentication, sequence numbers, storage, replay, leases, answer guard, rate limits or
backpressure policy: what the gateway adds to this is what it costs beyond this floor. On uvloop
when it is installed, as the gateway.

    python bench/ref_floor.py --port 8104 --redis redis://127.0.0.1:6379/0 --channel bench-x \\
        [--model http://127.0.0.1:8200]
"""

from __future__ import annotations

import argparse
import asyncio
import random
from collections.abc import Callable
from urllib.parse import urlsplit

import orjson
from ref_websockets import serve_forever
from websockets.asyncio.server import ServerConnection
from workload import ANSWER_EVERY_S, Emit, publish_answers

from gateway.transport import text_frame


def _command(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


async def _open(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    address = urlsplit(url)
    reader, writer = await asyncio.open_connection(address.hostname, address.port or 6379)
    database = address.path.strip("/") or "0"
    writer.write(_command(b"SELECT", database.encode()))
    if await reader.readline() != b"+OK\r\n":
        raise RuntimeError(f"SELECT {database} failed on {url}")
    return reader, writer


class Publisher:
    """PUBLISH on one connection: the commands of one loop turn in one write; replies dropped."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._pending: list[bytes] = []
        self._drain = asyncio.create_task(self._discard(reader))

    def publish(self, channel: bytes, data: bytes) -> None:
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(_command(b"PUBLISH", channel, data))

    def _flush(self) -> None:
        self._writer.write(b"".join(self._pending))
        self._pending.clear()

    @staticmethod
    async def _discard(reader: asyncio.StreamReader) -> None:
        while await reader.read(65536):
            pass
        raise RuntimeError("the publishing connection to Redis closed")


class Subscriber:
    """One subscribed connection; each `message` push is handed to `on_message(channel, data)`."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_message: Callable[[bytes, bytes], None],
    ) -> None:
        self._writer = writer
        self._on_message = on_message
        self._read = asyncio.create_task(self._loop(reader))

    def subscribe(self, channel: bytes) -> None:
        self._writer.write(_command(b"SUBSCRIBE", channel))

    def unsubscribe(self, channel: bytes) -> None:
        self._writer.write(_command(b"UNSUBSCRIBE", channel))

    async def _loop(self, reader: asyncio.StreamReader) -> None:
        buffer = b""
        while chunk := await reader.read(65536):
            buffer = self._split(buffer + chunk if buffer else chunk)
        raise RuntimeError("the subscribed connection to Redis closed")

    def _split(self, buffer: bytes) -> bytes:
        """Hand on every whole reply in `buffer`; returns what is left (an incomplete reply)."""
        pos, size = 0, len(buffer)
        while pos < size:
            items: list[bytes] = []
            end = buffer.find(b"\r\n", pos)
            if end < 0:
                break
            count, at = int(buffer[pos + 1 : end]), end + 2  # a push: *<count>
            for _ in range(count):
                end = buffer.find(b"\r\n", at)
                if end < 0:
                    return buffer[pos:]
                if buffer[at] == 0x24:  # $<length> then the bytes
                    start = end + 2
                    stop = start + int(buffer[at + 1 : end])
                    if stop + 2 > size:
                        return buffer[pos:]
                    items.append(buffer[start:stop])
                    at = stop + 2
                else:  # :<integer> (subscribe and unsubscribe confirmations)
                    items.append(buffer[at + 1 : end])
                    at = end + 2
            pos = at
            if items[0] == b"message":
                self._on_message(items[1], items[2])
        return buffer[pos:]


def _marker_time(text: str) -> float:
    """The send time a `chatgw model-server` token carries: " ⟦<µs>⟧" -> seconds."""
    return int(text[text.index("\u27e6") + 1 : text.index("\u27e7")]) / 1e6


async def model_answers(room: str, emit: Emit, model_url: str) -> None:
    """A room's publisher reading its pieces from the model: a streamed answer every 3 s (the
    first at a random offset; at once after a late one), one piece per token, for ever."""
    address = urlsplit(model_url)
    host = address.hostname or "127.0.0.1"
    reader, writer = await asyncio.open_connection(host, address.port or 80)
    body = orjson.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hello"}]})
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (host.encode(), len(body), body)
    )
    loop = asyncio.get_running_loop()
    start = loop.time() + random.uniform(0, ANSWER_EVERY_S)
    seq = 0
    try:
        while True:
            delay = start - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            start = max(start + ANSWER_EVERY_S, loop.time())
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200") or b"chunked" not in head.lower():
                raise RuntimeError(f"unexpected model response: {head[:200]!r}")
            while size := int((await reader.readuntil(b"\r\n"))[:-2], 16):
                chunk = await reader.readexactly(size + 2)
                for event in chunk[:-2].split(b"\n\n"):
                    if not event.startswith(b"data: {"):
                        continue  # blank, or data: [DONE]
                    choices = orjson.loads(event[6:])["choices"]
                    text = choices[0]["delta"].get("content") if choices else None
                    if text:
                        seq += 1
                        await emit(
                            room,
                            {
                                "type": "delta",
                                "room": room,
                                "seq": seq,
                                "text": text,
                                "t": _marker_time(text),
                            },
                        )
            await reader.readexactly(2)  # the last chunk's CRLF
    finally:
        writer.close()


async def main(port: int, redis_url: str, channel: str, model_url: str | None, local: bool) -> None:
    rooms: dict[str, set[ServerConnection]] = {}
    publishing: set[str] = set()  # rooms whose publisher runs here
    prefix = f"{channel}:".encode()

    def write(members: set[ServerConnection], data: bytes) -> None:
        frame = text_frame(data.decode())
        for ws in members:
            transport = ws.transport
            if transport.get_write_buffer_size() < 65536 and not transport.is_closing():
                transport.write(frame)

    def deliver(room_channel: bytes, data: bytes) -> None:
        room = room_channel[len(prefix) :].decode()
        members = rooms.get(room)
        if members and not (local and room in publishing):
            write(members, data)

    publisher = Publisher(*await _open(redis_url))
    subscriber = Subscriber(*await _open(redis_url), deliver)

    async def emit(room: str, piece: dict[str, object]) -> None:
        data = orjson.dumps(piece)
        publisher.publish(prefix + room.encode(), data)
        if local and (members := rooms.get(room)):
            write(members, data)

    async def handler(ws: ServerConnection) -> None:
        join = orjson.loads(await ws.recv())
        room, role = str(join["room"]), join.get("role")
        members = rooms.setdefault(room, set())
        if not members and not (local and role == "user"):
            subscriber.subscribe(prefix + room.encode())
        members.add(ws)
        task = None
        if role == "user":
            publishing.add(room)
            answers = model_answers(room, emit, model_url) if model_url else publish_answers(room, emit)
            task = asyncio.create_task(answers)
        try:
            async for _ in ws:  # clients send nothing more; this notices the close
                pass
        finally:
            members.discard(ws)
            if not members:
                rooms.pop(room, None)
                subscriber.unsubscribe(prefix + room.encode())
            if task:
                publishing.discard(room)
                task.cancel()

    await serve_forever(handler, port)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the two-instance path's floor (benchmark reference)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--channel", default="chatgw-bench-floor")
    parser.add_argument("--model", default=None, help="an OpenAI-compatible server's base URL")
    parser.add_argument(
        "--local",
        action="store_true",
        help="the publishing instance writes its own sockets' frames itself and does not read its publishes back",
    )
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(main(args.port, args.redis, args.channel, args.model, args.local))
    else:
        uvloop.run(main(args.port, args.redis, args.channel, args.model, args.local))
