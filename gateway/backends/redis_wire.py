"""The Redis wire for the broker's two hot paths: the pub/sub connection's replies split out of its
byte stream a chunk at a time (`SubscribedConnection`), and the publish script's calls written once per
event-loop turn on a connection of their own (`Commands`).

The broker's subscription connection carries one reply per published event (`message`, channel,
data), thousands a second while answers stream. redis-py's `PubSub` reads them one at a time,
each through its timeout, retry and observability layers and into a dict of its own;
`bench/pubsub_read.py` measured that at 43 µs of CPU per message against 16 for splitting them
out of what arrived in one read. The connection itself (address, TLS, AUTH, SELECT, the protocol
version) is made by redis-py, which also packs and writes the commands; the replies are read here,
by `Messages`, for the shapes these connections get: arrays (RESP2) or pushes (RESP3, which
redis-py negotiates by default) of bulk strings, integers and nulls (`message`, `pmessage`,
`subscribe`, `unsubscribe`, `pong`), and top-level errors, simple and bulk strings, integers and
nulls.

Written here rather than taken from a library: redis-py reads one reply per call of its own
layers whichever parser it uses (its optional C parser, `hiredis`, moved the gateway's CPU per
frame by a few percent when tried: bench/README.md); what cost was that chain per reply, not the
parse. The parse is some sixty lines, for the few reply shapes these two connections get.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from redis._parsers import BaseParser
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import ConnectionError, DataError, InvalidResponse, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

Reply = list[bytes | int | None] | bytes | int | ResponseError | None


class Messages:
    """Feed it the bytes as they arrive; it returns every reply they complete, in order, and keeps
    the incomplete rest for the next feed. An array or a push is a list of its elements (bytes, int, None
    for a null bulk string); a top-level simple string is bytes, an integer an int, an error a
    `ResponseError` (returned, not raised). Malformed input raises `InvalidResponse`: the
    connection is then out of step and must be dropped."""

    __slots__ = ("_rest",)

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, data: bytes) -> list[Reply]:
        buffer = self._rest + data if self._rest else data
        size = len(buffer)
        replies: list[Reply] = []
        position = 0
        find = buffer.find
        try:
            while position < size:
                end = find(b"\r\n", position)
                if end < 0:
                    break
                kind = buffer[position]
                if kind == 36:  # "$": a bulk string, or null, at the top level
                    length = int(buffer[position + 1 : end])
                    if length < 0:
                        replies.append(None)
                        position = end + 2
                        continue
                    if end + 4 + length > size:
                        break
                    replies.append(buffer[end + 2 : end + 2 + length])
                    position = end + 4 + length
                    continue
                if kind != 42 and kind != 62:  # not an array ("*") or a push (">", RESP3)
                    replies.append(_line(kind, buffer[position + 1 : end]))
                    position = end + 2
                    continue
                count = int(buffer[position + 1 : end])
                at = end + 2
                items: list[bytes | int | None] = []
                for _ in range(count):
                    end = find(b"\r\n", at)
                    if end < 0:
                        break
                    kind = buffer[at]
                    # Parsed inline, like the top-level bulk string above: a helper called per
                    # element took this parse from 1.5 to 3.6 µs a message.
                    if kind == 36:  # "$": a bulk string, or null
                        length = int(buffer[at + 1 : end])
                        if length < 0:
                            items.append(None)
                            at = end + 2
                            continue
                        start = end + 2
                        at = start + length + 2
                        if at > size:
                            break
                        items.append(buffer[start : start + length])
                    elif kind == 58:  # ":": an integer
                        items.append(int(buffer[at + 1 : end]))
                        at = end + 2
                    else:
                        raise InvalidResponse(
                            f"unexpected reply element {chr(kind)!r} on a pub/sub connection"
                        )
                else:
                    replies.append(items)
                    position = at
                    continue
                break  # the array is not complete yet
        except ValueError as exc:
            raise InvalidResponse(f"malformed reply on a pub/sub connection: {exc}") from exc
        self._rest = buffer[position:]
        return replies


def _line(kind: int, text: bytes) -> bytes | int | ResponseError | None:
    if kind == 43:  # "+"
        return text
    if kind == 45:  # "-": the exception redis-py's own parsers make of it (READONLY: ReadOnlyError, ...)
        error: ResponseError = BaseParser.parse_error(text.decode(errors="replace"))  # type: ignore[no-untyped-call]
        return error
    if kind == 58:  # ":"
        return int(text)
    if kind == 95:  # "_": RESP3's null
        return None
    raise InvalidResponse(f"unexpected reply {chr(kind)!r} on a pub/sub connection")


class SubscribedConnection:
    """A connection in subscribed mode, read here a chunk at a time.

    redis-py makes the connection (address, TLS, AUTH, SELECT: the pool's settings) and writes the
    commands; the replies are read here from its stream and split by `Messages`, never by redis-py's
    parser, which therefore must not have read anything: the connection is a fresh one, made for
    this and used for nothing else. One timer, started by the first read, checks every `idle_s`
    whether anything arrived since its last check: when nothing did (for between `idle_s` and
    twice that) it sends a PING, and when nothing arrives within `timeout_s` of the PING the
    connection is taken as dead (the read waiting, or the next one, raises `ConnectionError`). A
    read costs no timer of its own (an `asyncio.timeout` per read was 2.6 % of a busy gateway's
    samples: bench/README.md, "A fifth pass").
    """

    def __init__(
        self,
        connection: AbstractConnection,
        stream: asyncio.StreamReader,
        *,
        idle_s: float = 15.0,
        timeout_s: float = 5.0,
    ) -> None:
        self._connection = connection
        self._idle_s = idle_s
        self._timeout_s = timeout_s
        self._messages = Messages()
        self._stream: asyncio.StreamReader | None = stream
        self._heard = False  # something arrived since the timer last looked
        self._pinged = False  # the timer sent a PING that nothing has answered yet
        self._timer: asyncio.TimerHandle | None = None
        self._pinging: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls, pool: ConnectionPool, *, idle_s: float = 15.0, timeout_s: float = 5.0
    ) -> SubscribedConnection:
        connection, stream, _ = await _connect(pool, timeout_s)
        return cls(connection, stream, idle_s=idle_s, timeout_s=timeout_s)

    async def send(self, *args: str) -> None:
        connection = self._connection
        await connection.send_packed_command(connection.pack_command(*args), check_health=False)

    async def read(self) -> list[Reply]:
        """The replies completed by the next bytes to arrive (possibly none, for a partial one)."""
        stream = self._stream
        if stream is None:
            raise ConnectionError("the subscription is closed")
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._idle_s, self._watch)
        chunk = await stream.read(_CHUNK)
        self._heard = True
        if not chunk:
            raise ConnectionError("Redis closed the subscription's connection")
        return self._messages.feed(chunk)

    async def close(self) -> None:
        self._stream = None
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        pinging, self._pinging = self._pinging, None
        if pinging is not None:
            pinging.cancel()
            await asyncio.gather(pinging, return_exceptions=True)
        await _disconnect(self._connection)

    def _watch(self) -> None:
        stream = self._stream
        if stream is None:
            self._timer = None
            return
        loop = asyncio.get_running_loop()
        if self._heard:
            self._heard = self._pinged = False
            self._timer = loop.call_later(self._idle_s, self._watch)
        elif not self._pinged:
            self._pinged = True
            self._pinging = loop.create_task(self._ping(stream))
            self._timer = loop.call_later(self._timeout_s, self._watch)
        else:
            self._timer = None
            stream.set_exception(
                ConnectionError(f"no reply from Redis within {self._timeout_s:g} s of a PING")
            )

    async def _ping(self, stream: asyncio.StreamReader) -> None:
        try:
            await self.send("PING")
        except (RedisError, OSError) as exc:
            stream.set_exception(ConnectionError(f"cannot send a PING to Redis: {exc!r}"))


_CHUNK = 1 << 18


class Commands:
    """Commands written to one connection as they are made, their replies matched in order.

    For the broker's call made once per streamed piece (the publish script): through redis-py's
    `execute_command` each call takes a pooled connection, goes through its retry and
    observability layers and writes and reads under a timeout each. Here a call is its command,
    packed here (`pack`), queued for the next write, and a future; one task reads the replies a
    chunk at a time and hands them out in order.

    - One write is in flight at a time: calls made while the replies to the last write are still
      due are queued, and leave together in one write once those replies are in (at once when
      nothing is due, at the end of the event-loop turn). Under load a write carries many calls;
      alone, a call waits for nothing.
    - Only commands with flat replies may be sent: a scalar, or an array of bulk strings,
      integers and nulls (`Messages`); anything else drops the connection (`InvalidResponse`).
    - An error reply fails its own call only (`ResponseError`, returned by `call`'s raise).
    - A call waits at most `timeout_s` for its reply (one timer watches the oldest call, not one
      per call); then the connection is dropped, and every call waiting on it fails with
      redis-py's `TimeoutError`: their outcome is unknown, none is sent again. The next call makes
      a new connection (redis-py makes it: address, TLS, AUTH, SELECT).
    """

    def __init__(self, pool: ConnectionPool, *, timeout_s: float) -> None:
        self._pool = pool
        self._timeout_s = timeout_s
        self._connection: AbstractConnection | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiting: deque[asyncio.Future[Reply]] = deque()
        self._deadlines: deque[float] = deque()  # one per waiting call, in the same order
        self._outgoing: list[bytes] = []  # the last calls of `_waiting`, not written yet
        self._write_scheduled = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._connecting: asyncio.Task[AbstractConnection] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self.calls = 0
        """Calls made so far (for metrics)."""
        self.writes = 0
        """Writes they took (calls made while a write's replies are due share the next one)."""

    async def call(self, *args: str | bytes | int) -> Reply:
        """Send one command; its reply (bytes, int, None or a list of them). Raises
        `ResponseError` for an error reply, `ConnectionError` or `TimeoutError` (redis-py's) when
        the connection fails or the reply is late."""
        connection = self._connection
        if connection is None:
            connection = await self._connect()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply] = loop.create_future()
        self._outgoing.append(pack(args))
        self._waiting.append(future)
        self._deadlines.append(loop.time() + self._timeout_s)
        self.calls += 1
        if not self._due() and not self._write_scheduled:
            self._write_scheduled = True
            loop.call_soon(self._write, connection)
        if self._watchdog is None:
            self._watchdog = loop.call_at(self._deadlines[0], self._watch, connection)
        reply = await future
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    async def close(self) -> None:
        connecting = self._connecting
        if connecting is not None:
            connecting.cancel()
            await asyncio.gather(connecting, return_exceptions=True)
        connection = self._connection
        if connection is not None:
            self._drop(connection, ConnectionError("the client was closed"))
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    def _write(self, connection: AbstractConnection) -> None:
        if connection is not self._connection or self._writer is None:
            # Dropped meanwhile: its calls have failed already; anything queued now is for a newer
            # connection, whose first call scheduled a write of its own.
            return
        self._write_scheduled = False
        outgoing, self._outgoing = self._outgoing, []
        if not outgoing:
            return
        self.writes += 1
        try:
            self._writer.write(b"".join(outgoing))
        except (OSError, RuntimeError) as exc:
            self._drop(connection, ConnectionError(f"cannot write to Redis: {exc!r}"))

    def _due(self) -> int:
        """Calls written whose replies have not come yet."""
        return len(self._waiting) - len(self._outgoing)

    def _watch(self, connection: AbstractConnection) -> None:
        """The timer on the oldest waiting call: past its deadline, the connection is dropped;
        otherwise the timer moves on to the oldest call now waiting (if any)."""
        self._watchdog = None
        if connection is not self._connection or not self._deadlines:
            return
        loop = asyncio.get_running_loop()
        if self._deadlines[0] <= loop.time():
            self._drop(connection, RedisTimeoutError(f"no reply from Redis within {self._timeout_s:g} s"))
        else:
            self._watchdog = loop.call_at(self._deadlines[0], self._watch, connection)

    async def _connect(self) -> AbstractConnection:
        """The connection, made by one task that every caller meanwhile waits for (so that they
        all go on in the same event-loop turn, and their calls share a write)."""
        pending = self._connecting
        if pending is None:
            pending = self._connecting = asyncio.get_running_loop().create_task(self._make_connection())
            pending.add_done_callback(self._connected)
        return await asyncio.shield(pending)

    def _connected(self, task: asyncio.Task[AbstractConnection]) -> None:
        self._connecting = None
        if not task.cancelled():
            task.exception()  # retrieved here; every caller gets it from the shield

    async def _make_connection(self) -> AbstractConnection:
        connection, stream, writer = await _connect(self._pool, self._timeout_s)
        self._connection, self._writer = connection, writer
        self._reader = asyncio.create_task(self._read(connection, stream), name="redis-commands-reader")
        return connection

    async def _read(self, connection: AbstractConnection, stream: asyncio.StreamReader) -> None:
        messages = Messages()
        waiting = self._waiting
        deadlines = self._deadlines
        try:
            while True:
                chunk = await stream.read(_CHUNK)
                if not chunk:
                    raise ConnectionError("Redis closed the connection")
                replies = messages.feed(chunk)
                if len(replies) > self._due():
                    raise InvalidResponse("a reply no call was waiting for")
                for reply in replies:
                    deadlines.popleft()
                    future = waiting.popleft()
                    if not future.done():
                        future.set_result(reply)
                if self._outgoing and not self._due() and not self._write_scheduled:
                    self._write(connection)  # what queued while the replies were due
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failure = (
                exc
                if isinstance(exc, ConnectionError)
                else ConnectionError(f"Redis connection failed: {exc!r}")
            )
            self._drop(connection, failure)

    def _drop(self, connection: AbstractConnection, failure: Exception) -> None:
        """Fail every call waiting on `connection` and close it (once; a later one is untouched)."""
        if connection is not self._connection:
            return
        self._connection = self._writer = None
        self._outgoing = []
        self._write_scheduled = False
        self._deadlines = deque()
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            watchdog.cancel()
        waiting, self._waiting = self._waiting, deque()
        for future in waiting:
            if not future.done():
                future.set_exception(failure)
        reader = self._reader
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        self._reader = None
        closing = asyncio.get_running_loop().create_task(_disconnect(connection))
        self._closing.add(closing)  # held until done: the loop keeps only a weak reference
        closing.add_done_callback(self._closing.discard)


def pack(args: tuple[str | bytes | int, ...]) -> bytes:
    """One command in RESP, as redis-py's `pack_command` makes it for these argument types (str as
    UTF-8, int in decimal), in a third of its time: 3.4 µs against 9.9 for the publish script's
    sixteen arguments (bench/README.md). Anything else, bool included, is refused as redis-py does."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if type(arg) is str:
            data = arg.encode()
        elif type(arg) is bytes:
            data = arg
        elif type(arg) is int:
            data = b"%d" % arg
        else:
            raise DataError(f"a command argument must be str, bytes or int, not {type(arg).__name__}")
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


async def _connect(
    pool: ConnectionPool, timeout_s: float
) -> tuple[AbstractConnection, asyncio.StreamReader, asyncio.StreamWriter]:
    """A new connection with `pool`'s settings, made by redis-py within `timeout_s`, and its
    stream's two ends, which redis-py keeps on the connection (pyproject pins redis below 9 for
    that); redis-py's own parser never reads from it."""
    connection: AbstractConnection = pool.make_connection()  # type: ignore[no-untyped-call]
    try:
        async with asyncio.timeout(timeout_s):
            await connection.connect()  # type: ignore[no-untyped-call]
        stream = getattr(connection, "_reader", None)
        writer = getattr(connection, "_writer", None)
        if not isinstance(stream, asyncio.StreamReader) or not isinstance(writer, asyncio.StreamWriter):
            raise RuntimeError("this redis-py version keeps no stream reader and writer on its connections")
    except TimeoutError:
        await _disconnect(connection)
        raise RedisTimeoutError(f"cannot connect to Redis within {timeout_s:g} s") from None
    except BaseException:
        await _disconnect(connection)
        raise
    return connection, stream, writer


async def _disconnect(connection: AbstractConnection) -> None:
    with contextlib.suppress(RedisError, OSError):
        await connection.disconnect(nowait=True)
