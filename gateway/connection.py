"""One WebSocket connection: hello, then frames in and events out.

Each connection runs one reader task (the only caller of `receive`) and one writer task (the only
caller of `send`), joined by a bounded outbox. Everything for the client, events from the hub
included, goes through the outbox, so frames leave in the order they were queued. A client that
lets the outbox fill up is closed with 4008 and recovers by resuming; it never holds anyone up.

After `hello` the connection takes a role from its token: a widget user (one `Subscription`, its
conversation: gateway.widget) or an agent (a live view of the business and any number of
subscriptions: gateway.agent). The role handles the client's frames; the connection owns the
socket, the outbox and the subscriptions' lifetime.

States: AWAITING_HELLO -> OPEN -> CLOSING.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import deque
from typing import Any, Protocol

from starlette.websockets import WebSocket

from core.errors import CoreError, InvalidInput, TooLarge, Unavailable
from core.models import Business
from core.types import ConversationId, new_id
from gateway.auth import Principal
from gateway.context import Gateway
from gateway.errors import Unauthorized
from gateway.origins import origin_problem
from gateway.protocol import (
    AgentAction,
    ClientFrame,
    CloseCode,
    ErrorCode,
    FrameError,
    Hello,
    SendMessage,
    Stop,
    Typing,
    encode,
    error_frame,
    parse_frame,
)
from gateway.subscription import Subscription

log = logging.getLogger(__name__)


class State(enum.Enum):
    AWAITING_HELLO = "awaiting_hello"
    OPEN = "open"
    CLOSING = "closing"


class _Close:
    __slots__ = ("code", "reason")

    def __init__(self, code: CloseCode, reason: str) -> None:
        self.code = code
        self.reason = reason


class Refused(Exception):
    """Ends the connection at hello (or later) with an error frame and a close code."""

    def __init__(
        self, code: CloseCode, error: ErrorCode, message: str, *, retry_after_ms: int | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.error = error
        self.message = message
        self.retry_after_ms = retry_after_ms


class Role(Protocol):
    """What a connection does after hello, by the token's role."""

    kind: str

    async def handle(self, frame: ClientFrame) -> None:
        """Handle one client frame (after hello). Raise FrameError or CoreError to answer with an
        error frame; the connection stays open."""

    async def close(self) -> None:
        """The connection is closing: leave what the role joined."""


_Item = tuple[str, str] | _Close


class Connection:
    def __init__(self, websocket: WebSocket, gateway: Gateway) -> None:
        self.ws = websocket
        self.gw = gateway
        self.session_id = new_id()
        self.state = State.AWAITING_HELLO
        self.principal: Principal | None = None
        self.role: Role | None = None
        self.subscriptions: dict[ConversationId, Subscription] = {}
        self._outbox: deque[_Item] = deque()
        self._limit = gateway.settings.outbox_frames
        self._wake = asyncio.Event()
        self.closed = asyncio.Event()
        self.close_code: int | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> None:
        await self.ws.accept()
        if self.gw.draining:
            await self.ws.close(CloseCode.DRAINING, "this instance is draining: reconnect")
            return
        self.gw.sessions.add(self)
        self.gw.metrics.sockets.inc()
        reader = asyncio.create_task(self._read(), name=f"ws-read-{self.session_id}")
        writer = asyncio.create_task(self._write(), name=f"ws-write-{self.session_id}")
        try:
            await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
            if reader.done() and not reader.cancelled() and reader.exception() is not None:
                log.error("socket reader failed", exc_info=reader.exception(), extra=self.log_extra())
            if reader.done() and self.state is State.CLOSING and not writer.done():
                # The reader asked for a close: let the writer send what is queued, then the close.
                await asyncio.wait({writer}, timeout=5.0)
        finally:
            self.state = State.CLOSING
            for task in (reader, writer):
                if not task.done():
                    task.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)
            await self._leave()
            self.gw.metrics.sockets.dec()
            self.gw.sessions.discard(self)
            self.closed.set()
            log.info("socket closed", extra={**self.log_extra(), "close_code": self.close_code})

    async def _leave(self) -> None:
        for subscription in list(self.subscriptions.values()):
            await subscription.close()
        self.subscriptions.clear()
        if self.role is not None:
            await self.role.close()

    def reconnect(self, after_ms: int) -> None:
        """The instance is draining: tell the client when to come back (elsewhere), and close."""
        self.send({"type": "reconnect", "after_ms": after_ms})
        self.close(CloseCode.DRAINING, "this instance is draining: reconnect")

    def close(self, code: CloseCode, reason: str) -> None:
        """Queue a close after what is already queued; nothing is queued after it."""
        if self.state is State.CLOSING:
            return
        self.state = State.CLOSING
        self._outbox.append(_Close(code, reason))
        self._wake.set()

    # -- out ------------------------------------------------------------------------------------

    def send(self, frame: dict[str, Any]) -> None:
        self.enqueue(frame["type"], encode(frame))

    def enqueue(self, frame_type: str, text: str) -> None:
        if self.state is State.CLOSING:
            return
        if len(self._outbox) >= self._limit:
            self.overflow()
            return
        self._outbox.append((frame_type, text))
        self._wake.set()

    def overflow(self) -> None:
        """The client does not keep up: drop what is queued and close it as a slow consumer."""
        if self.state is State.CLOSING:
            return
        log.warning("slow consumer closed", extra=self.log_extra())
        self.gw.metrics.error("slow_consumer")
        self._outbox.clear()
        self.close(CloseCode.SLOW_CONSUMER, "too slow: resume from your last seq")

    async def _write(self) -> None:
        try:
            while True:
                while not self._outbox:
                    self._wake.clear()
                    await self._wake.wait()
                item = self._outbox.popleft()
                if isinstance(item, _Close):
                    self.close_code = item.code
                    await self.ws.close(item.code, item.reason)
                    return
                frame_type, text = item
                await self.ws.send({"type": "websocket.send", "text": text})
                self.gw.metrics.frames_out.labels(frame_type).inc()
        except Exception as exc:  # the client went away mid-send
            log.debug("send failed: %r", exc, extra=self.log_extra())

    # -- in -------------------------------------------------------------------------------------

    async def _read(self) -> None:
        try:
            hello = await self._receive_hello()
            if hello is None:
                return
            await self._start(hello)
        except Refused as refused:
            self.refuse(refused)
            return
        while self.state is not State.CLOSING:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                self.close_code = self.close_code or message.get("code")
                return
            text = message.get("text")
            if text is None:
                self.frame_error(
                    FrameError(ErrorCode.BAD_FRAME, "binary frames are not accepted: send JSON text")
                )
                self.gw.metrics.frame_in("binary")
                continue
            try:
                frame = parse_frame(text)
            except FrameError as exc:
                self.gw.metrics.frame_in("invalid")
                self.frame_error(exc)
                continue
            self.gw.metrics.frame_in(frame_type(frame))
            await self._handle(frame)

    def refuse(self, refused: Refused) -> None:
        self.gw.metrics.error(refused.error.value)
        self.send(error_frame(refused.error, refused.message, retry_after_ms=refused.retry_after_ms))
        self.close(refused.code, refused.message[:120])

    async def _receive_hello(self) -> Hello | None:
        timeout = self.gw.settings.hello_timeout
        try:
            message = await asyncio.wait_for(self.ws.receive(), timeout)
        except TimeoutError:
            raise Refused(
                CloseCode.UNAUTHORIZED, ErrorCode.UNAUTHORIZED, f"no hello within {timeout:g} s"
            ) from None
        if message["type"] == "websocket.disconnect":
            return None
        text = message.get("text")
        try:
            frame = parse_frame(text) if text is not None else None
        except FrameError as exc:
            raise Refused(
                CloseCode.UNAUTHORIZED, ErrorCode.UNAUTHORIZED, f"first frame must be hello: {exc.message}"
            ) from None
        if not isinstance(frame, Hello):
            raise Refused(CloseCode.UNAUTHORIZED, ErrorCode.UNAUTHORIZED, "first frame must be hello")
        self.gw.metrics.frame_in("hello")
        return frame

    async def _start(self, hello: Hello) -> None:
        try:
            principal = self.gw.tokens.verify(hello.token)
        except Unauthorized as exc:
            raise Refused(CloseCode.UNAUTHORIZED, ErrorCode.UNAUTHORIZED, exc.message) from None
        self.principal = principal
        try:
            if principal.role == "agent":
                from gateway.agent import AgentRole

                self.role = await AgentRole.start(self, principal, hello)
            else:
                from gateway.widget import WidgetRole

                self.role = await WidgetRole.start(self, principal, hello)
        except Unavailable as exc:
            raise Refused(
                CloseCode.TRY_AGAIN_LATER,
                ErrorCode.UNAVAILABLE,
                exc.message,
                retry_after_ms=exc.retry_after_ms,
            ) from None
        log.info("socket opened", extra=self.log_extra())

    def check_origin(self, business: Business, *, agent: bool = False) -> None:
        """Refuse the connection (`forbidden`, close 4403) unless the page that opened it may use
        the business's chat: its `Origin` header checked at hello, when the token names the
        business (the rules are gateway.origins')."""
        problem = origin_problem(
            business, self.ws.headers.get("origin"), self.ws.headers.get("host"), agent=agent
        )
        if problem is not None:
            raise Refused(CloseCode.FORBIDDEN, ErrorCode.FORBIDDEN, problem)

    async def _handle(self, frame: ClientFrame) -> None:
        assert self.role is not None
        client_msg_id = frame.client_msg_id if isinstance(frame, SendMessage) else None
        conversation_id = getattr(frame, "conversation_id", None)
        try:
            if isinstance(frame, Hello):
                raise FrameError(ErrorCode.BAD_FRAME, "hello: already said hello on this socket")
            await self.role.handle(frame)
        except Refused as refused:
            self.refuse(refused)
        except FrameError as exc:
            exc.client_msg_id = exc.client_msg_id or client_msg_id
            self.frame_error(exc, conversation_id)
        except CoreError as exc:
            self.core_error(exc, client_msg_id, conversation_id)
        except Exception:
            log.exception("frame handling failed", extra=self.log_extra())
            self.gw.metrics.error(ErrorCode.INTERNAL.value)
            self.send(error_frame(ErrorCode.INTERNAL, "internal error", client_msg_id=client_msg_id))

    def frame_error(self, exc: FrameError, conversation_id: str | None = None) -> None:
        self.gw.metrics.error(exc.code.value)
        frame = error_frame(exc.code, exc.message, client_msg_id=exc.client_msg_id)
        self.send(self._tagged(frame, conversation_id))

    def core_error(
        self, exc: CoreError, client_msg_id: str | None, conversation_id: str | None = None
    ) -> None:
        if isinstance(exc, TooLarge):
            code = ErrorCode.TOO_LARGE
        elif isinstance(exc, InvalidInput):
            code = ErrorCode.BAD_FRAME
        else:
            try:
                code = ErrorCode(exc.code)
            except ValueError:
                code = ErrorCode.INTERNAL
        retry = exc.retry_after_ms if isinstance(exc, Unavailable) else None
        self.gw.metrics.error(code.value)
        frame = error_frame(code, exc.message, client_msg_id=client_msg_id, retry_after_ms=retry)
        self.send(self._tagged(frame, conversation_id))

    def _tagged(self, frame: dict[str, Any], conversation_id: str | None) -> dict[str, Any]:
        """Errors on an agent connection name the conversation they are about."""
        if conversation_id is not None and self.role is not None and self.role.kind == "agent":
            frame["conversation_id"] = conversation_id
        return frame

    def log_extra(self) -> dict[str, Any]:
        principal = self.principal
        conversation_id = principal.conversation_id if principal is not None else None
        return {
            "session_id": self.session_id,
            "conversation_id": conversation_id,
            "business_id": principal.business_id if principal is not None else None,
            "role": principal.role if principal is not None else None,
        }


def frame_type(frame: ClientFrame) -> str:
    if isinstance(frame, AgentAction):
        return frame.type
    return {Hello: "hello", SendMessage: "message", Typing: "typing", Stop: "stop"}[type(frame)]


async def serve_socket(websocket: WebSocket) -> None:
    """The `/ws` endpoint."""
    gateway: Gateway = websocket.app.state.gateway
    await Connection(websocket, gateway).run()
