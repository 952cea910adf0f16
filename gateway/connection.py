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
import contextlib
import enum
import logging
from collections import deque
from collections.abc import Mapping
from typing import Any, Protocol

from starlette.types import Message
from starlette.websockets import WebSocket

from core.errors import CoreError, InvalidInput, TooLarge, Unavailable
from core.models import Business
from core.types import ConversationId, new_id
from gateway.auth import Principal
from gateway.context import Gateway
from gateway.errors import Unauthorized
from gateway.limits import Limit, RateLimited
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


# A close frame's reason is at most 123 bytes of UTF-8 (RFC 6455 5.5); a longer one is not sent at all.
MAX_CLOSE_REASON_BYTES = 123


def close_reason(text: str) -> str:
    """`text` cut to fit a close frame, at a character boundary."""
    return text.encode(errors="replace")[:MAX_CLOSE_REASON_BYTES].decode(errors="ignore")


class _Close:
    __slots__ = ("code", "reason")

    def __init__(self, code: CloseCode, reason: str) -> None:
        self.code = code
        self.reason = close_reason(reason)


class Refused(Exception):
    """Ends the connection at hello (or later) with an error frame and a close code."""

    def __init__(
        self,
        code: CloseCode,
        error: ErrorCode,
        message: str,
        *,
        retry_after_ms: int | None = None,
        limit: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.error = error
        self.message = message
        self.retry_after_ms = retry_after_ms
        self.limit = limit


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
        self.close_reason = ""
        self.closed_by: str | None = None  # "gateway", or "client" (the client, or its connection)
        self._tasks: tuple[asyncio.Task[None], ...] = ()
        self._pending_close: _Close | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._address_key: str | None = None
        self._conversation_key: str | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> None:
        await self.ws.accept()
        if self.gw.draining:
            self._closing(CloseCode.DRAINING, "this instance is draining: reconnect", "gateway")
            await self.ws.close(CloseCode.DRAINING, self.close_reason)
            self._log_closed()
            return
        if not await self._admit():
            return
        self.gw.sessions.add(self)
        self.gw.metrics.sockets.inc()
        reader = asyncio.create_task(self._read(), name=f"ws-read-{self.session_id}")
        writer = asyncio.create_task(self._write(), name=f"ws-write-{self.session_id}")
        self._tasks = (reader, writer)
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
            await self._close_abandoned()
            if self._deadline is not None:
                self._deadline.cancel()
            await self._leave()
            self.gw.limits.close_connection(self._address_key)
            self.gw.limits.close_conversation_socket(self._conversation_key)
            self.gw.metrics.sockets.dec()
            self.gw.sessions.discard(self)
            self.closed.set()
            self._log_closed()

    def _closing(self, code: int | None, reason: str, by: str) -> None:
        """Record the first close seen: the one the gateway sent, or the client's."""
        if self.closed_by is None:
            self.close_code, self.close_reason, self.closed_by = code, reason, by

    def _log_closed(self) -> None:
        code = self.close_code if self.close_code is not None else "no close code"
        reason = f" {self.close_reason!r}" if self.close_reason else ""
        log.info(
            "socket closed by the %s: %s%s",
            self.closed_by or "connection",
            code,
            reason,
            extra={
                **self.log_extra(),
                "close_code": self.close_code,
                "close_reason": self.close_reason,
                "closed_by": self.closed_by,
            },
        )

    async def _admit(self) -> bool:
        """Count the socket against its address's limits; refuse it (1013) when over."""
        client = self.ws.client
        try:
            self._address_key = await self.gw.limits.open_connection(client.host if client else None)
        except RateLimited as exc:
            self.gw.metrics.error(ErrorCode.RATE_LIMITED.value)
            frame = error_frame(ErrorCode.RATE_LIMITED, exc.message, retry_after_ms=exc.retry_after_ms)
            frame["limit"] = exc.limit.value
            self._closing(CloseCode.TRY_AGAIN_LATER, close_reason(exc.message), "gateway")
            await self.ws.send_text(encode(frame))
            await self.ws.close(CloseCode.TRY_AGAIN_LATER, self.close_reason)
            self._log_closed()
            return False
        return True

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
        self._pending_close = _Close(code, reason)
        self._outbox.append(self._pending_close)
        self._wake.set()
        # Closed whatever the client does: a client that reads nothing holds up the writer, so
        # after the close timeout both tasks are ended (and the transport aborted: gateway.transport).
        timeout = self.gw.settings.limits.close_timeout
        self._deadline = asyncio.get_running_loop().call_later(timeout, self._abandon)

    async def _close_abandoned(self) -> None:
        """The writer was ended before it sent the queued close (the client reads nothing): send
        it now; the protocol does not wait for room to send it (gateway.transport)."""
        pending = self._pending_close
        if pending is None or self.closed_by is not None:
            return
        self._closing(pending.code, pending.reason, "gateway")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(pending.code, pending.reason), 1.0)

    def _abandon(self) -> None:
        for task in self._tasks:
            if not task.done():
                task.cancel()

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
                    self._closing(item.code, item.reason, "gateway")
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
            message = await self._receive_or_idle()
            if message is None:
                return
            if message["type"] == "websocket.disconnect":
                self._disconnected(message)
                return
            # An agent's console follows and acts on many conversations: its frames have a limit
            # of their own, higher than a widget's.
            agent = self.role is not None and self.role.kind == "agent"
            try:
                await self.gw.limits.hit(
                    Limit.AGENT_FRAMES if agent else Limit.SOCKET_FRAMES, self.session_id
                )
            except RateLimited as exc:
                await self.rate_limited(exc, None, None)
                continue
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

    async def _receive_or_idle(self) -> Message | None:
        """The next message; None (and the socket closing) after CHATGW_WS_IDLE_TIMEOUT_S without one.
        Agents' sockets are not timed: an agent watches the console without sending anything."""
        idle = self.gw.settings.limits.idle_timeout
        if self.role is not None and self.role.kind == "agent":
            idle = 0
        try:
            async with asyncio.timeout(idle or None):
                return await self.ws.receive()
        except TimeoutError:
            self.close(CloseCode.GOING_AWAY, f"idle for {idle:g} s")
            return None

    def _disconnected(self, message: Mapping[str, Any]) -> None:
        self._closing(message.get("code"), str(message.get("reason") or ""), "client")

    def refuse(self, refused: Refused) -> None:
        self.gw.metrics.error(refused.error.value)
        frame = error_frame(refused.error, refused.message, retry_after_ms=refused.retry_after_ms)
        if refused.limit is not None:
            frame["limit"] = refused.limit
        self.send(frame)
        self.close(refused.code, refused.message)

    async def _receive_hello(self) -> Hello | None:
        timeout = self.gw.settings.hello_timeout
        try:
            message = await asyncio.wait_for(self.ws.receive(), timeout)
        except TimeoutError:
            raise Refused(
                CloseCode.UNAUTHORIZED, ErrorCode.UNAUTHORIZED, f"no hello within {timeout:g} s"
            ) from None
        if message["type"] == "websocket.disconnect":
            self._disconnected(message)
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
        if principal.role != "agent" and principal.conversation_id is not None:
            try:
                self._conversation_key = self.gw.limits.open_conversation_socket(principal.conversation_id)
            except RateLimited as exc:
                raise Refused(
                    CloseCode.TRY_AGAIN_LATER,
                    ErrorCode.RATE_LIMITED,
                    exc.message,
                    retry_after_ms=exc.retry_after_ms,
                    limit=exc.limit.value,
                ) from None
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
            await self._admit_frame(frame, conversation_id)
            await self.role.handle(frame)
        except RateLimited as exc:
            await self.rate_limited(exc, client_msg_id, conversation_id)
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

    async def _admit_frame(self, frame: ClientFrame, conversation_id: str | None) -> None:
        principal = self.principal
        assert principal is not None
        user = None
        if principal.role != "agent":
            conversation_id = principal.conversation_id
            user = (str(principal.business_id), principal.subject)
        await self.gw.limits.admit_frame(
            frame, session_id=self.session_id, conversation_id=conversation_id, user=user
        )

    async def rate_limited(
        self, exc: RateLimited, client_msg_id: str | None, conversation_id: str | None
    ) -> None:
        """Answer a breach with `rate_limited`; a socket that breaches too often is closed (4429)."""
        self.gw.metrics.error(ErrorCode.RATE_LIMITED.value)
        frame = error_frame(
            ErrorCode.RATE_LIMITED,
            exc.message,
            client_msg_id=client_msg_id,
            retry_after_ms=exc.retry_after_ms,
        )
        frame["limit"] = exc.limit.value
        self.send(self._tagged(frame, conversation_id))
        if await self.gw.limits.violated(self.session_id):
            self.close(CloseCode.TOO_MANY_VIOLATIONS, "too many rate limit violations")

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
