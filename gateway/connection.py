"""One WebSocket connection: hello, then frames in and events out.

The connection runs in the ASGI endpoint's own task (uvicorn's task for the socket): that task is
the only reader (the only caller of `receive`). Frames out are written at once, from whoever
queues them (the hub's fan-out, a role answering a frame): under uvicorn's websockets-sansio
protocol the frame is written straight to the socket's transport whenever uvicorn's `send` would
not wait (`gateway.transport.write_text_now`); otherwise, and under any other server, by calling
the server's ASGI `send` with a prepared message, which writes without waiting unless the
socket's write buffer is full. When it does wait, the rest of that send and every frame queued behind it
go out from a writer task made for the occasion, which ends once the bounded outbox is empty; so
frames leave in the order they were queued, and an idle socket holds one task, not three. A
client that lets the outbox fill up is closed with 4008 and recovers by resuming; it never holds
anyone up.

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
from collections.abc import Generator, Mapping
from typing import Any, Protocol

from starlette.types import Message, Receive, Scope, Send
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from core.errors import CoreError, InvalidInput, Overloaded, TooLarge, Unavailable
from core.models import Business
from core.types import ConversationId, new_id
from gateway.auth import Principal
from gateway.context import Gateway
from gateway.errors import Unauthorized
from gateway.held import Place
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
from gateway.transport import write_text_now

log = logging.getLogger(__name__)


class State(enum.Enum):
    AWAITING_HELLO = "awaiting_hello"
    OPEN = "open"
    CLOSING = "closing"


# Messages refused for overload remembered per socket, so that their resend is not counted again.
MAX_UNCOUNTED = 64

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


def send_message(text: str) -> dict[str, Any]:
    """The ASGI message that sends `text` as one WebSocket text frame."""
    return {"type": "websocket.send", "text": text}


def close_message(code: int, reason: str) -> dict[str, Any]:
    """The ASGI message that closes the socket with `code` and `reason`."""
    return {"type": "websocket.close", "code": code, "reason": reason}


async def finish(steps: Generator[Any, None, None], waiting: Any) -> None:
    """Run to its end, in the calling task, an awaitable that was started by hand (`steps`, its
    `__await__()`) and suspended once on `waiting` (what its `send(None)` returned: a future, or
    None for a bare yield).

    This is what asyncio's Task does for every step; done here because the first step ran
    outside any task (Python 3.12's eager tasks do the same, this code runs on 3.11)."""
    while True:
        try:
            if waiting is None:
                await asyncio.sleep(0)
            else:
                # Taken over from the awaitable's own yield, as a task does (else awaiting it
                # again here raises "await wasn't used with future").
                waiting._asyncio_future_blocking = False
                await waiting
        except BaseException as exc:  # passed into the coroutine, as a task would
            try:
                waiting = steps.throw(exc)
            except StopIteration:
                return
            continue
        try:
            waiting = steps.send(None)
        except StopIteration:
            return


class Connection:
    __slots__ = (
        "_abandoned",
        "_address_key",
        "_conversation_key",
        "_deadline",
        "_done",
        "_ended",
        "_limit",
        "_outbox",
        "_peer",
        "_pending_close",
        "_protocol",
        "_reading",
        "_receive",
        "_send",
        "_task",
        "_uncounted",
        "_writer",
        "close_code",
        "close_reason",
        "closed_by",
        "gw",
        "host",
        "origin",
        "principal",
        "role",
        "session_id",
        "state",
        "subscriptions",
    )

    def __init__(self, scope: Scope, receive: Receive, send: Send, gateway: Gateway) -> None:
        self.origin = header(scope, b"origin")
        self.host = header(scope, b"host")
        # The request's headers are not read again: a socket holds them (a list of byte pairs,
        # about 1 KiB) for its whole life unless they are let go here.
        scope["headers"] = ()
        self._receive = receive
        self._send = send
        # uvicorn's protocol for the socket, when `send` is its method: frames are then written
        # straight to its transport whenever its `send` would not wait (`write_text_now`).
        protocol = getattr(send, "__self__", None)
        self._protocol = protocol if isinstance(protocol, WebSocketsSansIOProtocol) else None
        self.gw = gateway
        self.session_id = new_id()
        self.state = State.AWAITING_HELLO
        self.principal: Principal | None = None
        self.role: Role | None = None
        self.subscriptions: dict[ConversationId, Subscription] = {}
        # Frames waiting behind a send the socket could not take at once; made when first needed.
        self._outbox: deque[_Item] | None = None
        self._writer: asyncio.Task[None] | None = None  # only while a send waits for the socket
        self._limit = gateway.settings.outbox_frames
        self._done: asyncio.Future[None] | None = None  # made by `finished()`
        self._ended = False
        self.close_code: int | None = None
        self.close_reason = ""
        self.closed_by: str | None = None  # "gateway", or "client" (the client, or its connection)
        client = scope.get("client")
        self._peer: str | None = client[0] if client else None
        self._task: asyncio.Task[Any] | None = None  # the socket's own task, while it reads
        self._reading = False
        self._abandoned = False
        self._pending_close: _Close | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._address_key: Place | None = None
        self._conversation_key: Place | None = None
        # Messages refused unstored because the instance answers as many conversations as it may:
        # counted against the message limits once, at their first try, not again when resent.
        self._uncounted: dict[tuple[str | None, str], None] | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> None:
        if (await self._receive())["type"] != "websocket.connect":
            return
        await self._send({"type": "websocket.accept"})
        if self.gw.draining:
            self._closing(CloseCode.DRAINING, "this instance is draining: reconnect", "gateway")
            await self._send(close_message(CloseCode.DRAINING, self.close_reason))
            self._log_closed()
            return
        if not await self._admit():
            return
        self.gw.sessions.add(self)
        self.gw.metrics.sockets.inc()
        self._task = asyncio.current_task()
        self._reading = True
        try:
            await self._read()
            writer = self._writer
            if self.state is State.CLOSING and writer is not None:
                # The reader asked for a close: let the writer send what is queued, then the close.
                await asyncio.wait({writer}, timeout=5.0)
        except asyncio.CancelledError:
            if not self._abandoned:
                raise
            if self._task is not None:
                self._task.uncancel()  # ended by `_abandon`: go on with the cleanup below
        except Exception:
            log.error("socket reader failed", exc_info=True, extra=self.log_extra())
        finally:
            self._reading = False
            if self._deadline is not None:
                self._deadline.cancel()
            self.state = State.CLOSING
            writer = self._writer
            if writer is not None and not writer.done():
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)
            await self._close_abandoned()
            await self._leave()
            await self.gw.limits.close_connection(self._address_key)
            await self.gw.limits.close_conversation_socket(self._conversation_key)
            self.gw.metrics.sockets.dec()
            self.gw.sessions.discard(self)
            self._ended = True
            if self._done is not None and not self._done.done():
                self._done.set_result(None)
            self._log_closed()

    def _closing(self, code: int | None, reason: str, by: str) -> None:
        """Record the first close seen: the one the gateway sent, or the client's."""
        if self.closed_by is None:
            self.close_code, self.close_reason, self.closed_by = code, reason, by

    def _log_closed(self) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
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
        try:
            self._address_key = await self.gw.limits.open_connection(self._peer)
        except RateLimited as exc:
            self.gw.metrics.error(ErrorCode.RATE_LIMITED.value)
            frame = error_frame(ErrorCode.RATE_LIMITED, exc.message, retry_after_ms=exc.retry_after_ms)
            frame["limit"] = exc.limit.value
            self._closing(CloseCode.TRY_AGAIN_LATER, close_reason(exc.message), "gateway")
            await self._send(send_message(encode(frame)))
            await self._send(close_message(CloseCode.TRY_AGAIN_LATER, self.close_reason))
            self._log_closed()
            return False
        return True

    def finished(self) -> asyncio.Future[None]:
        """A future done once the connection has ended (its subscriptions left)."""
        if self._done is None:
            self._done = asyncio.get_running_loop().create_future()
            if self._ended:
                self._done.set_result(None)
        return self._done

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
        """Send a close after what is already queued; nothing is sent after it."""
        if self.state is State.CLOSING:
            return
        self.state = State.CLOSING
        pending = self._pending_close = _Close(code, reason)
        # Closed whatever the client does: a client that reads nothing holds up the writer, so
        # after the close timeout the socket's task and its writer are ended (and the transport
        # aborted: gateway.transport).
        timeout = self.gw.settings.limits.close_timeout
        self._deadline = asyncio.get_running_loop().call_later(timeout, self._abandon)
        if self._writer is not None and self._outbox is not None:
            self._outbox.append(pending)
            return
        self._closing(code, pending.reason, "gateway")
        self._write(None, close_message(code, pending.reason))

    async def _close_abandoned(self) -> None:
        """The writer was ended before it sent the queued close (the client reads nothing): send
        it now; the protocol does not wait for room to send it (gateway.transport)."""
        pending = self._pending_close
        if pending is None or self.closed_by is not None:
            return
        self._closing(pending.code, pending.reason, "gateway")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._send(close_message(pending.code, pending.reason)), 1.0)

    def _abandon(self) -> None:
        self._abandoned = True
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()
        if self._reading and self._task is not None:
            self._task.cancel()

    # -- out ------------------------------------------------------------------------------------

    def send(self, frame: dict[str, Any]) -> None:
        self.enqueue(frame["type"], encode(frame))

    def enqueue(self, frame_type: str, text: str) -> None:
        """Send one encoded frame now, or queue it behind a send that waits for the socket."""
        if self.state is State.CLOSING:
            return
        if self._writer is not None and self._outbox is not None:
            if len(self._outbox) >= self._limit:
                self.overflow()
                return
            self._outbox.append((frame_type, text))
            return
        protocol = self._protocol
        if protocol is not None and write_text_now(protocol, text):
            self.gw.metrics.frame_out(frame_type)
            return
        self._write(frame_type, send_message(text))

    def overflow(self) -> None:
        """The client does not keep up: drop what is queued and close it as a slow consumer."""
        if self.state is State.CLOSING:
            return
        log.warning("slow consumer closed", extra=self.log_extra())
        self.gw.metrics.error("slow_consumer")
        if self._outbox is not None:
            self._outbox.clear()
        self.close(CloseCode.SLOW_CONSUMER, "too slow: resume from your last seq")

    def _write(self, frame_type: str | None, message: Message) -> None:
        """Start the server's `send` of `message` here and now; if it has to wait for the socket,
        a writer task finishes it and then sends what was queued meanwhile."""
        steps = self._send(message).__await__()
        try:
            waiting = steps.send(None)
        except StopIteration:
            if frame_type is not None:
                self.gw.metrics.frame_out(frame_type)
            return
        except Exception as exc:  # the client went away: the reader sees the disconnect
            self._lost(exc)
            return
        if self._outbox is None:
            self._outbox = deque()
        self._writer = asyncio.get_running_loop().create_task(
            self._drain(steps, waiting, frame_type), name=f"ws-write-{self.session_id}"
        )

    async def _drain(self, steps: Generator[Any, None, None], waiting: Any, frame_type: str | None) -> None:
        outbox = self._outbox
        assert outbox is not None
        try:
            await finish(steps, waiting)
            if frame_type is not None:
                self.gw.metrics.frame_out(frame_type)
            while outbox:
                item = outbox.popleft()
                if isinstance(item, _Close):
                    self._closing(item.code, item.reason, "gateway")
                    outbox.clear()
                    await self._send(close_message(item.code, item.reason))
                    return
                frame_type, text = item
                await self._send(send_message(text))
                self.gw.metrics.frame_out(frame_type)
        except Exception as exc:  # the client went away mid-send
            self._lost(exc)
        finally:
            self._writer = None

    def _lost(self, exc: BaseException) -> None:
        log.debug("send failed: %r", exc, extra=self.log_extra())
        self.state = State.CLOSING
        if self._outbox is not None:
            self._outbox.clear()

    # -- in -------------------------------------------------------------------------------------

    async def _read(self) -> None:
        if not await self._hello():
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
                return await self._receive()
        except TimeoutError:
            self.close(CloseCode.GOING_AWAY, f"idle for {idle:g} s")
            return None

    async def _hello(self) -> bool:
        """Wait for `hello` and take the role it asks for; False when the connection ends there.
        (A method of its own so that the hello, token included, is not kept for the socket's life.)"""
        try:
            hello = await self._receive_hello()
            if hello is None:
                return False
            await self._start(hello)
        except Refused as refused:
            self.refuse(refused)
            return False
        return True

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
            async with asyncio.timeout(timeout):
                message = await self._receive()
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
        if principal.role != "agent" and hello.resume is None:
            self._admit_new_socket()
        if principal.role != "agent" and principal.conversation_id is not None:
            try:
                self._conversation_key = await self.gw.limits.open_conversation_socket(
                    principal.conversation_id
                )
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

    def _admit_new_socket(self) -> None:
        """Refuse a widget's new socket (not a resume) while the instance is overloaded (see
        `http_api._admit_new_conversation`): `unavailable` with `retry_after_ms`, then close 1013,
        before the hello costs a query (core.admission). A resume goes on: its user is in a
        conversation already."""
        try:
            self.gw.conversations.answers.admission.admit_arrival("a new socket")
        except Overloaded as exc:
            self.gw.metrics.arrivals_refused.labels("socket").inc()
            raise Refused(
                CloseCode.TRY_AGAIN_LATER,
                ErrorCode.UNAVAILABLE,
                exc.message,
                retry_after_ms=exc.retry_after_ms,
            ) from None

    def check_origin(self, business: Business, *, agent: bool = False) -> None:
        """Refuse the connection (`forbidden`, close 4403) unless the page that opened it may use
        the business's chat: its `Origin` header checked at hello, when the token names the
        business (the rules are gateway.origins')."""
        problem = origin_problem(business, self.origin, self.host, agent=agent)
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
            if client_msg_id is not None and self._uncounted is not None:
                self._uncounted.pop(self._message_key(conversation_id, client_msg_id), None)
        except RateLimited as exc:
            await self.rate_limited(exc, client_msg_id, conversation_id)
        except Refused as refused:
            self.refuse(refused)
        except FrameError as exc:
            exc.client_msg_id = exc.client_msg_id or client_msg_id
            self.frame_error(exc, conversation_id)
        except CoreError as exc:
            if isinstance(exc, Overloaded) and client_msg_id is not None:
                self._count_once(conversation_id, client_msg_id)
            self.core_error(exc, client_msg_id, conversation_id)
        except Exception:
            log.exception("frame handling failed", extra=self.log_extra())
            self.gw.metrics.error(ErrorCode.INTERNAL.value)
            self.send(error_frame(ErrorCode.INTERNAL, "internal error", client_msg_id=client_msg_id))

    def _count_once(self, conversation_id: str | None, client_msg_id: str) -> None:
        """Remember a message refused for overload (up to `MAX_UNCOUNTED`, the oldest forgotten):
        the client sends it again after `retry_after_ms`, as it was told, and that is no new
        message to count against the socket's, conversation's, user's and business's limits.
        Counted again, a user writing at the rate the limits allow would be refused `rate_limited`
        for doing as told, and closed with 4429 after enough of them."""
        if self._uncounted is None:
            self._uncounted = {}
        key = self._message_key(conversation_id, client_msg_id)
        self._uncounted.pop(key, None)
        self._uncounted[key] = None
        if len(self._uncounted) > MAX_UNCOUNTED:
            del self._uncounted[next(iter(self._uncounted))]

    def _message_key(self, conversation_id: str | None, client_msg_id: str) -> tuple[str | None, str]:
        """A message's conversation (a widget's own, whatever the frame says) and client id."""
        principal = self.principal
        if principal is not None and principal.role != "agent":
            conversation_id = principal.conversation_id
        return conversation_id, client_msg_id

    async def _admit_frame(self, frame: ClientFrame, conversation_id: str | None) -> None:
        if (
            isinstance(frame, SendMessage)
            and self._uncounted is not None
            and self._message_key(conversation_id, frame.client_msg_id) in self._uncounted
        ):
            return  # counted at its first try (see `_count_once`)
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


def header(scope: Mapping[str, Any], name: bytes) -> str | None:
    """The first value of a request header (`name` in lower case), as text."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


async def serve_socket(scope: Scope, receive: Receive, send: Send) -> None:
    """The `/ws` endpoint, a bare ASGI app: the connection talks to the server's `receive` and
    `send` directly, without Starlette's WebSocket wrapper (its checks cost on every frame)."""
    gateway: Gateway = scope["app"].state.gateway
    await Connection(scope, receive, send, gateway).run()
