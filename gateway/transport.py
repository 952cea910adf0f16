"""uvicorn's HTTP and WebSocket protocols with the deadlines uvicorn leaves out.

- **Request headers in time.** uvicorn times out an idle keep-alive connection, but not one that
  never finishes its request line and headers: a client can open thousands of TCP connections
  and send nothing (or a byte now and then). Here every request's headers must be complete within
  CHATGW_HTTP_HEADER_TIMEOUT_S of the connection (or of the request's first byte), else the
  connection is closed.
- **A closed socket is closed.** uvicorn closes a WebSocket by writing the close frame and then
  `transport.close()`, which waits for the write buffer to drain: a client that reads nothing
  keeps the connection (and its buffered frames) for as long as it likes. Here each close is
  followed by `transport.abort()` when the connection is still there CHATGW_WS_CLOSE_TIMEOUT_S
  later, and the close frame itself never waits for room in a full buffer.

Both subclass uvicorn's own protocols (httptools, websockets-sansio) and change only that, and
what an idle WebSocket holds:

- **Less held per socket.** uvicorn's WebSocket protocol keeps the handshake's request and
  response (headers parsed into websockets' `Headers`) for the connection's life, though it reads
  neither after the handshake, and websockets' parser keeps the request too; here both are let go
  once the socket is accepted, and the request's headers are emptied (the ASGI scope has its own
  copy). uvicorn's queue of received events is an `asyncio.Queue` and its "writable" flag an
  `asyncio.Event`: four and one `deque`s of some 600 bytes each, allocated per socket whether
  anyone waits or not. Here they are `_Inbox` and `_Flag`, which do what uvicorn asks of them and
  hold a waiter only while one waits. About 8 KiB of RSS less per idle socket (bench/README.md,
  "A fourth pass").

`write_text_now` is the gateway's per-frame send: the WebSocket frame of a text written straight
to the socket's transport, when uvicorn's own `send` would do the same and not wait.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request
from websockets.protocol import OPEN

from gateway.settings import LimitSettings


class _GuardedHttp(HttpToolsProtocol):
    header_timeout = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_header_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._start_header_timer()  # the next request on a kept-alive connection

    def on_headers_complete(self) -> None:
        self._stop_header_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def _start_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()


class _AbortingTransport:
    """The socket's transport, whose `close()` becomes an `abort()` when the peer has not let the
    connection go `timeout` seconds later."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self._transport = transport
        self._loop = loop
        self._timeout = timeout
        self.abort_timer: asyncio.TimerHandle | None = None
        self.write = transport.write  # once per frame: not through __getattr__

    def close(self) -> None:
        self._transport.close()
        if self.abort_timer is None:
            self.abort_timer = self._loop.call_later(self._timeout, self._transport.abort)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _Inbox:
    """What uvicorn's WebSocket protocol asks of its queue of received ASGI events (`put_nowait`,
    `get`, `empty`, `qsize`), without `asyncio.Queue`'s four deques per socket. Unbounded, like
    uvicorn's: it pauses reading after each message until the queue is empty. Waiters are served
    in order; one cancelled after being woken passes the wake-up on."""

    __slots__ = ("_items", "_waiters")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiters: list[asyncio.Future[None]] = []

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        self._wake_one()

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)

    async def get(self) -> Any:
        while not self._items:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif self._items:
                    self._wake_one()  # it was woken, then cancelled: the item is someone else's
                raise
        return self._items.pop(0)

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                return


class _Flag:
    """What uvicorn's WebSocket protocol asks of its "writable" `asyncio.Event` (`set`, `clear`,
    `is_set`, `wait`), without the Event's deque per socket: a future exists only while someone
    waits for the flag to be set."""

    __slots__ = ("_set", "_waiter")

    def __init__(self, value: bool) -> None:
        self._set = value
        self._waiter: asyncio.Future[None] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        while not self._set:
            waiter = self._waiter
            if waiter is None or waiter.done():
                waiter = self._waiter = asyncio.get_running_loop().create_future()
            await asyncio.shield(waiter)  # several may wait on one future; one cancelled leaves it


class _GuardedWebSocket(WebSocketsSansIOProtocol):
    close_timeout_s = 5.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = _Inbox()  # type: ignore[assignment]
        self.writable = _Flag(self.writable.is_set())  # type: ignore[assignment]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guarded = _AbortingTransport(transport, self.loop, self.close_timeout_s)  # type: ignore[arg-type]
        super().connection_made(guarded)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        guarded = self.transport
        if isinstance(guarded, _AbortingTransport) and guarded.abort_timer is not None:
            guarded.abort_timer.cancel()
        super().connection_lost(exc)

    async def send(self, message: Any) -> None:
        if message["type"] == "websocket.close" and self.handshake_complete and not self.writable.is_set():
            # The client reads nothing: the close frame goes behind what is buffered, at once,
            # and the connection is aborted if the client has not taken it by the close timeout.
            self.writable.set()
        await super().send(message)
        if message["type"] == "websocket.accept" and self.handshake_complete:
            # Neither is read again once the handshake's response is written. websockets' parser
            # (a generator) keeps the request as a local for the connection's life: its headers
            # are emptied in place.
            request = getattr(self, "request", None)
            if isinstance(request, Request):
                request.headers.clear()
            self.request = self.response = None  # type: ignore[assignment]
        if message["type"] == "websocket.close" and self.close_timer is not None:
            self.close_timer.cancel()
            self.close_timer = self.loop.call_later(self.close_timeout_s, self.transport.abort)


def text_frame(text: str) -> bytes:
    """One unmasked, unfragmented WebSocket text frame carrying `text` (RFC 6455 5.2), as a server
    sends it without extensions: what websockets' `send_text` serializes."""
    data = text.encode()
    size = len(data)
    if size < 126:
        return bytes((0x81, size)) + data
    if size < 1 << 16:
        return b"\x81\x7e" + size.to_bytes(2, "big") + data
    return b"\x81\x7f" + size.to_bytes(8, "big") + data


def write_text_now(protocol: WebSocketsSansIOProtocol, text: str) -> bool:
    """Write `text` as a text frame to the socket at once, as uvicorn's `send` of a
    `websocket.send` message would when it does not wait, and return True; False, having done
    nothing, whenever that `send` would do anything else: wait for a full buffer to drain, raise
    for a socket gone or closing, or frame with an extension (per-message deflate). The caller
    then sends through `send`.

    uvicorn's `send` costs a coroutine, websockets' framing and a join per frame (about a tenth of
    the gateway's CPU while it streams; bench/README.md, "Frames straight to the transport"). The
    frame goes out in one write, so it never interleaves with the pings and the close uvicorn
    writes for the same socket."""
    conn = protocol.conn
    if (
        protocol.disconnected
        or protocol.close_sent
        or not protocol.handshake_complete
        or protocol.initial_response is not None
        or not protocol.writable.is_set()
        or conn.state is not OPEN
        or conn.extensions
        or conn.expect_continuation_frame
    ):
        return False
    protocol.transport.write(text_frame(text))
    return True


def protocols(settings: LimitSettings) -> tuple[type[HttpToolsProtocol], type[WebSocketsSansIOProtocol]]:
    """The HTTP and WebSocket protocol classes for uvicorn's config, with these settings' deadlines."""
    http = type("GuardedHttpProtocol", (_GuardedHttp,), {"header_timeout": settings.header_timeout})
    ws = type("GuardedWebSocketProtocol", (_GuardedWebSocket,), {"close_timeout_s": settings.close_timeout})
    return http, ws
