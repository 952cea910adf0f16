"""One WebSocket session: hello, then frames in and events out.

Each session runs one reader task (the only caller of `receive`) and one writer task (the only
caller of `send`), joined by a bounded outbox. Everything for the client, events from the hub
included, goes through the outbox, so frames leave in the order they were queued. A client that
lets the outbox fill up is closed with 4008 and recovers by resuming; it never holds anyone up.

States: AWAITING_HELLO -> SYNCING -> LIVE -> CLOSING. While SYNCING (after hello, and while a gap
is being filled) events from the hub are held back and released through the session's SeqGate,
so the client sees every seq exactly once and in order.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import deque
from typing import Any

from starlette.websockets import WebSocket

from core.broker import StreamMissing
from core.errors import CoreError, InvalidInput, TooLarge, Unavailable
from core.models import Business, Conversation, Event, Replay, StreamPosition
from core.rules import GateVerdict, ResumeAction, ResumeDecision, SeqGate, decide_resume
from core.types import ConversationId, Role, new_id
from gateway.context import Gateway
from gateway.errors import Unauthorized
from gateway.hub import public_frame
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
    event_frame,
    parse_frame,
)

log = logging.getLogger(__name__)


class State(enum.Enum):
    AWAITING_HELLO = "awaiting_hello"
    SYNCING = "syncing"
    LIVE = "live"
    CLOSING = "closing"


class _Close:
    __slots__ = ("code", "reason")

    def __init__(self, code: CloseCode, reason: str) -> None:
        self.code = code
        self.reason = reason


class _Refused(Exception):
    """Ends the session at hello with a close code."""

    def __init__(self, code: CloseCode, error: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.error = error
        self.message = message


_Item = tuple[str, str] | _Close

# A gap fill tries this many times (0.2 s, 0.4 s, ... apart) before closing the socket with 1011.
_FILL_ATTEMPTS = 5


class Session:
    def __init__(self, websocket: WebSocket, gateway: Gateway) -> None:
        self.ws = websocket
        self.gw = gateway
        self.session_id = new_id()
        self.sees_private = False  # widget users; agent sessions see private event fields
        self.state = State.AWAITING_HELLO
        self.business: Business | None = None
        self.conversation_id: ConversationId | None = None
        self._outbox: deque[_Item] = deque()
        self._limit = gateway.settings.outbox_frames
        self._wake = asyncio.Event()
        self._gate = SeqGate(0)
        self._epoch = ""  # the epoch of the seqs this client holds
        self._held: list[tuple[Event, str]] = []
        self._filling: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()

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
                log.error("socket reader failed", exc_info=reader.exception(), extra=self._log_extra())
            if reader.done() and self.state is State.CLOSING and not writer.done():
                # The reader asked for a close: let the writer send what is queued, then the close.
                await asyncio.wait({writer}, timeout=5.0)
        finally:
            self.state = State.CLOSING
            for task in (reader, writer, self._filling):
                if task is not None and not task.done():
                    task.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)
            if self.conversation_id is not None:
                await self.gw.hub.leave(self.conversation_id, self)
            self.gw.metrics.sockets.dec()
            self.gw.sessions.discard(self)
            self.closed.set()
            log.info("socket closed", extra=self._log_extra())

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
        self._enqueue(frame["type"], encode(frame))

    def deliver(self, event: Event, frame: str) -> None:
        """Called by the hub for every event of this session's conversation."""
        if self.state is State.CLOSING:
            return
        if self.state is State.SYNCING:
            self._held.append((event, frame))
            if len(self._held) > self._limit:
                self._slow_consumer()
            return
        self._admit(event, frame)

    def resync(self) -> None:
        """Called by the hub when events may have been missed: fill from the log."""
        if self.state is State.LIVE:
            self.state = State.SYNCING
            self._filling = asyncio.create_task(self._fill_gap())

    def _admit(self, event: Event, frame: str) -> None:
        if event.seq is None:  # ephemeral
            self._enqueue(event.type.value, frame)
            return
        if event.epoch is not None and event.epoch != self._epoch:
            # The log was recreated (lost and opened again): its seqs are not comparable with ours.
            self.state = State.SYNCING
            self._held.append((event, frame))
            self._filling = asyncio.create_task(self._fill_gap())
            return
        verdict = self._gate.admit(event.seq)
        if verdict is GateVerdict.DELIVER:
            self._enqueue(event.type.value, frame)
        elif verdict is GateVerdict.GAP:
            self.state = State.SYNCING
            self._held.append((event, frame))
            self._filling = asyncio.create_task(self._fill_gap())

    def _enqueue(self, frame_type: str, text: str) -> None:
        if self.state is State.CLOSING:
            return
        if len(self._outbox) >= self._limit:
            self._slow_consumer()
            return
        self._outbox.append((frame_type, text))
        self._wake.set()

    def _slow_consumer(self) -> None:
        log.warning("slow consumer closed", extra=self._log_extra())
        self.gw.metrics.error("slow_consumer")
        self._outbox.clear()
        self._held.clear()
        self.close(CloseCode.SLOW_CONSUMER, "too slow: resume from your last seq")

    async def _write(self) -> None:
        try:
            while True:
                while not self._outbox:
                    self._wake.clear()
                    await self._wake.wait()
                item = self._outbox.popleft()
                if isinstance(item, _Close):
                    await self.ws.close(item.code, item.reason)
                    return
                frame_type, text = item
                await self.ws.send({"type": "websocket.send", "text": text})
                self.gw.metrics.frames_out.labels(frame_type).inc()
        except Exception as exc:  # the client went away mid-send
            log.debug("send failed: %r", exc, extra=self._log_extra())

    # -- in -------------------------------------------------------------------------------------

    async def _read(self) -> None:
        try:
            hello = await self._receive_hello()
            if hello is None:
                return
            await self._start(hello)
        except _Refused as refused:
            self.gw.metrics.error(refused.error.value)
            self.send(error_frame(refused.error, refused.message))
            self.close(refused.code, refused.message[:120])
            return
        while self.state is not State.CLOSING:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                self._frame_error(
                    FrameError(ErrorCode.BAD_FRAME, "binary frames are not accepted: send JSON text")
                )
                self.gw.metrics.frame_in("binary")
                continue
            try:
                frame = parse_frame(text)
            except FrameError as exc:
                self.gw.metrics.frame_in("invalid")
                self._frame_error(exc)
                continue
            self.gw.metrics.frame_in(_frame_type(frame))
            await self._handle(frame)

    async def _receive_hello(self) -> Hello | None:
        timeout = self.gw.settings.hello_timeout
        try:
            message = await asyncio.wait_for(self.ws.receive(), timeout)
        except TimeoutError:
            raise _Refused(
                CloseCode.UNAUTHORIZED, ErrorCode.UNAUTHORIZED, f"no hello within {timeout:g} s"
            ) from None
        if message["type"] == "websocket.disconnect":
            return None
        text = message.get("text")
        try:
            frame = parse_frame(text) if text is not None else None
        except FrameError as exc:
            raise _Refused(
                CloseCode.UNAUTHORIZED, ErrorCode.UNAUTHORIZED, f"first frame must be hello: {exc.message}"
            ) from None
        if not isinstance(frame, Hello):
            raise _Refused(CloseCode.UNAUTHORIZED, ErrorCode.UNAUTHORIZED, "first frame must be hello")
        self.gw.metrics.frame_in("hello")
        return frame

    async def _start(self, hello: Hello) -> None:
        gw = self.gw
        try:
            principal = gw.tokens.verify(hello.token)
        except Unauthorized as exc:
            raise _Refused(CloseCode.UNAUTHORIZED, ErrorCode.UNAUTHORIZED, exc.message) from None
        if principal.role != "user" or principal.conversation_id is None:
            raise _Refused(
                CloseCode.UNAUTHORIZED, ErrorCode.UNAUTHORIZED, "agent sessions are not available yet"
            )
        cid = principal.conversation_id
        if hello.conversation_id is not None and hello.conversation_id != cid:
            raise _Refused(CloseCode.FORBIDDEN, ErrorCode.FORBIDDEN, "the token is for another conversation")
        try:
            business = await gw.store.get_business(principal.business_id)
            conversation = await gw.store.get_conversation(principal.business_id, cid)
        except Unavailable as exc:
            raise _Refused(CloseCode.TRY_AGAIN_LATER, ErrorCode.UNAVAILABLE, exc.message) from None
        except CoreError as exc:
            raise _Refused(
                CloseCode.UNAUTHORIZED, ErrorCode.UNAUTHORIZED, f"{exc.message}: request a new session"
            ) from None
        origin = self.ws.headers.get("origin")
        if business.allowed_origins and origin not in business.allowed_origins:
            raise _Refused(CloseCode.FORBIDDEN, ErrorCode.FORBIDDEN, f"origin {origin!r} is not allowed")
        self.business = business
        self.conversation_id = cid
        self.state = State.SYNCING
        await gw.hub.join(cid, self)
        await self._welcome(hello, conversation)
        log.info("socket opened", extra=self._log_extra())

    async def _welcome(self, hello: Hello, conversation: Conversation) -> None:
        """Send welcome, then what a resuming client missed, then release held live events."""
        cid = conversation.conversation_id
        position = await self.gw.conversations.open_stream(conversation.business_id, cid, conversation)
        welcome = {
            "type": "welcome",
            "session_id": self.session_id,
            "conversation_id": cid,
            "epoch": position.epoch,
            "seq": position.seq,
            "mode": conversation.mode.value,
            "stage": conversation.stage,
            "resumed": False,
            "protocol": 1,
        }
        self._epoch = position.epoch
        if hello.resume is None:
            self.send(welcome)
            self._go_live(position.seq, ())
            return
        decision = decide_resume(epoch=hello.resume.epoch, last_seq=hello.resume.last_seq, position=position)
        events: tuple[Event, ...] | None = ()
        if decision.action is ResumeAction.REPLAY:
            try:
                events = (await self.gw.broker.replay(cid, hello.resume.last_seq)).events
            except StreamMissing:  # the log was dropped since it was opened above
                events = None
            if events is None:
                decision = ResumeDecision(ResumeAction.RESET, "window")
        if decision.action is ResumeAction.RESET:
            self.send(welcome)
            self._reset(decision.reason, position)
            return
        self.send({**welcome, "resumed": True})
        self._go_live(hello.resume.last_seq, events or ())

    def _go_live(self, after_seq: int, replayed: tuple[Event, ...]) -> None:
        """Deliver `replayed` then the held live events through a gate starting at `after_seq`."""
        self._gate = SeqGate(after_seq)
        held, self._held = self._held, []
        self.state = State.LIVE
        for event in replayed:
            self._admit(event, encode(public_frame(event_frame(event), self.sees_private)))
        for event, frame in held:
            if self.state is not State.LIVE:  # a gap reopened syncing: keep the rest held
                self._held.append((event, frame))
            else:
                self._admit(event, frame)

    async def _fill_gap(self) -> None:
        """Fetch the events the broker skipped for this session from the replay log; when the log
        cannot supply them (trimmed, or lost and opened again with a new epoch), send `reset`."""
        assert self.business is not None
        assert self.conversation_id is not None
        for attempt in range(_FILL_ATTEMPTS):
            try:
                try:
                    replay = await self.gw.broker.replay(self.conversation_id, self._gate.last_seq)
                except StreamMissing:  # lost: open it again (new epoch, after the stored seqs)
                    position = await self.gw.conversations.open_stream(
                        self.business.business_id, self.conversation_id
                    )
                    replay = Replay(position, None)
                break
            except CoreError as exc:
                log.warning("gap fill failed: %s", exc.message, extra=self._log_extra())
                await asyncio.sleep(0.2 * 2**attempt)
        else:
            self.close(CloseCode.INTERNAL_ERROR, "lost sync: reconnect and resume")
            return
        if self.state is not State.SYNCING:
            return
        position = replay.position
        if replay.events is None or position.epoch != self._epoch:
            reason = "gap" if position.epoch == self._epoch else "epoch_changed"
            self._reset(reason, position)
            return
        self._go_live(self._gate.last_seq, replay.events)

    def _reset(self, reason: str, position: StreamPosition) -> None:
        """Tell the client to refetch history and continue live from `position`."""
        self._epoch = position.epoch
        self.send({"type": "reset", "reason": reason, "epoch": position.epoch, "seq": position.seq})
        self._held = [
            (e, f) for e, f in self._held if e.epoch == position.epoch and (e.seq or 0) > position.seq
        ]
        self._go_live(position.seq, ())

    # -- frame handlers -------------------------------------------------------------------------

    async def _handle(self, frame: ClientFrame) -> None:
        assert self.business is not None
        assert self.conversation_id is not None
        cid = self.conversation_id
        conversations = self.gw.conversations
        client_msg_id = frame.client_msg_id if isinstance(frame, SendMessage) else None
        try:
            if isinstance(frame, Hello):
                raise FrameError(ErrorCode.BAD_FRAME, "hello: already said hello on this socket")
            if isinstance(frame, AgentAction):
                raise FrameError(ErrorCode.FORBIDDEN, f"{frame.type}: agents only")
            if frame.conversation_id is not None and frame.conversation_id != cid:
                raise FrameError(ErrorCode.FORBIDDEN, "this socket belongs to another conversation")
            if isinstance(frame, SendMessage):
                ack = await conversations.post_user_message(
                    self.business, cid, frame.client_msg_id, frame.text
                )
                self.send(
                    {
                        "type": "ack",
                        "client_msg_id": ack.client_msg_id,
                        "message_id": ack.message_id,
                        "seq": ack.seq,
                    }
                )
            elif isinstance(frame, Typing):
                await conversations.set_typing(cid, Role.USER, frame.state, origin=self.session_id)
            elif isinstance(frame, Stop):
                await conversations.stop(self.business, cid)
        except FrameError as exc:
            exc.client_msg_id = exc.client_msg_id or client_msg_id
            self._frame_error(exc)
        except CoreError as exc:
            self._core_error(exc, client_msg_id)
        except Exception:
            log.exception("frame handling failed", extra=self._log_extra())
            self.gw.metrics.error(ErrorCode.INTERNAL.value)
            self.send(error_frame(ErrorCode.INTERNAL, "internal error", client_msg_id=client_msg_id))

    def _frame_error(self, exc: FrameError) -> None:
        self.gw.metrics.error(exc.code.value)
        self.send(error_frame(exc.code, exc.message, client_msg_id=exc.client_msg_id))

    def _core_error(self, exc: CoreError, client_msg_id: str | None) -> None:
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
        self.send(error_frame(code, exc.message, client_msg_id=client_msg_id, retry_after_ms=retry))

    def _log_extra(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "conversation_id": self.conversation_id,
            "business_id": self.business.business_id if self.business else None,
        }


def _frame_type(frame: ClientFrame) -> str:
    if isinstance(frame, AgentAction):
        return frame.type
    return {Hello: "hello", SendMessage: "message", Typing: "typing", Stop: "stop"}[type(frame)]


async def serve_socket(websocket: WebSocket) -> None:
    """The `/ws` endpoint."""
    gateway: Gateway = websocket.app.state.gateway
    await Session(websocket, gateway).run()
