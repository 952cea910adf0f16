"""Wire protocol v1: parsing client frames and encoding server frames. No I/O here.

docs/protocol.md is the contract; this module implements it. Unknown fields in a client frame
are ignored (so that newer clients can talk to older servers); unknown types are errors.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any

import orjson

from core.models import Event

PROTOCOL_VERSION = 1

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def unstorable(text: str) -> str | None:
    """What in `text` cannot be stored (PostgreSQL text holds no NUL character, and UTF-8 no lone
    surrogate), or None. The edge refuses such text in every input, frames and HTTP alike."""
    found = _UNSTORABLE.search(text)
    if found is None:
        return None
    return "a NUL character" if found.group() == "\x00" else "a lone surrogate (not valid Unicode)"


def unstorable_in(data: Any, where: str = "") -> str | None:
    """The first string (object keys included) in decoded JSON `data` that cannot be stored, as
    "field 'a.b[2]' holds a NUL character", or None."""
    if isinstance(data, str):
        problem = unstorable(data)
        return None if problem is None else f"field {where or 'value'!r} holds {problem}"
    if isinstance(data, dict):
        for key, value in data.items():
            path = f"{where}.{key}" if where else str(key)
            problem = unstorable(str(key))
            if problem is not None:
                return f"a field name in {where or 'the body'!r} holds {problem}"
            found = unstorable_in(value, path)
            if found is not None:
                return found
    elif isinstance(data, list):
        for n, value in enumerate(data):
            found = unstorable_in(value, f"{where}[{n}]")
            if found is not None:
                return found
    return None


class CloseCode(enum.IntEnum):
    """WebSocket close codes the gateway sends.

    Ranges a client can act on: 1011-1013 and 4000-4099 mean "reconnect (with resume)";
    4400-4499 mean "do not reconnect with the same credentials"; 1009 means "send less".
    """

    NORMAL = 1000
    TOO_LARGE = 1009
    INTERNAL_ERROR = 1011
    DRAINING = 1012
    TRY_AGAIN_LATER = 1013
    SLOW_CONSUMER = 4008
    UNAUTHORIZED = 4401
    FORBIDDEN = 4403
    TOO_MANY_VIOLATIONS = 4429

    @property
    def should_reconnect(self) -> bool:
        return 1011 <= self <= 1013 or 4000 <= self < 4100


class ErrorCode(enum.StrEnum):
    BAD_FRAME = "bad_frame"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    RATE_LIMITED = "rate_limited"
    TOO_LARGE = "too_large"
    CONFLICT = "conflict"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class FrameError(Exception):
    """A client frame that cannot be used; answered with an `error` frame, socket stays open."""

    def __init__(self, code: ErrorCode, message: str, *, client_msg_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.client_msg_id = client_msg_id


@dataclass(frozen=True, slots=True)
class Resume:
    epoch: str
    last_seq: int


@dataclass(frozen=True, slots=True)
class Hello:
    token: str
    conversation_id: str | None
    resume: Resume | None


@dataclass(frozen=True, slots=True)
class SendMessage:
    client_msg_id: str
    text: str
    conversation_id: str | None


@dataclass(frozen=True, slots=True)
class Typing:
    state: bool
    conversation_id: str | None


@dataclass(frozen=True, slots=True)
class Stop:
    conversation_id: str | None


@dataclass(frozen=True, slots=True)
class AgentAction:
    """subscribe, unsubscribe, takeover, handback: the agent side of the protocol."""

    type: str
    conversation_id: str
    resume: Resume | None


ClientFrame = Hello | SendMessage | Typing | Stop | AgentAction

AGENT_TYPES = frozenset({"subscribe", "unsubscribe", "takeover", "handback"})
CLIENT_TYPES = frozenset({"hello", "message", "typing", "stop"}) | AGENT_TYPES


def parse_frame(text: str) -> ClientFrame:
    """Parse one client text frame; raise `FrameError` naming the problem."""
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise FrameError(ErrorCode.BAD_FRAME, "frame is not valid JSON") from None
    if not isinstance(data, dict):
        raise FrameError(ErrorCode.BAD_FRAME, "frame must be a JSON object")
    kind = data.get("type")
    if not isinstance(kind, str):
        raise FrameError(ErrorCode.BAD_FRAME, "frame needs a string field 'type'")
    problem = unstorable_in(data)
    if problem is not None:
        client_msg_id = data.get("client_msg_id") if kind == "message" else None
        raise FrameError(
            ErrorCode.BAD_FRAME,
            f"{kind if kind in CLIENT_TYPES else 'frame'}: {problem}",
            client_msg_id=client_msg_id
            if isinstance(client_msg_id, str) and not unstorable(client_msg_id)
            else None,
        )
    f = _Fields(kind, data)
    if kind == "hello":
        return Hello(f.text("token"), f.opt_text("conversation_id"), f.resume())
    if kind == "message":
        f.client_msg_id = f.opt_text("client_msg_id")
        return SendMessage(
            f.text("client_msg_id"), f.text("text", allow_empty=True), f.opt_text("conversation_id")
        )
    if kind == "typing":
        return Typing(f.flag("state"), f.opt_text("conversation_id"))
    if kind == "stop":
        return Stop(f.opt_text("conversation_id"))
    if kind in AGENT_TYPES:
        return AgentAction(kind, f.text("conversation_id"), f.resume())
    raise FrameError(ErrorCode.BAD_FRAME, f"unknown frame type {kind!r}")


class _Fields:
    def __init__(self, kind: str, data: dict[str, Any]) -> None:
        self.kind = kind
        self.data = data
        self.client_msg_id: str | None = None

    def _fail(self, message: str) -> FrameError:
        return FrameError(ErrorCode.BAD_FRAME, f"{self.kind}: {message}", client_msg_id=self.client_msg_id)

    def text(self, name: str, *, allow_empty: bool = False) -> str:
        value = self.data.get(name)
        if value is None:
            raise self._fail(f"missing field '{name}'")
        if not isinstance(value, str):
            raise self._fail(f"field '{name}' must be a string")
        if not value and not allow_empty:
            raise self._fail(f"field '{name}' must not be empty")
        return value

    def opt_text(self, name: str) -> str | None:
        if self.data.get(name) is None:
            return None
        return self.text(name)

    def flag(self, name: str) -> bool:
        value = self.data.get(name)
        if not isinstance(value, bool):
            raise self._fail(f"field '{name}' must be true or false")
        return value

    def resume(self) -> Resume | None:
        value = self.data.get("resume")
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self._fail("field 'resume' must be an object {epoch, last_seq}")
        epoch, last_seq = value.get("epoch"), value.get("last_seq")
        if not isinstance(epoch, str) or not epoch:
            raise self._fail("field 'resume.epoch' must be a non-empty string")
        if not isinstance(last_seq, int) or isinstance(last_seq, bool) or last_seq < 0:
            raise self._fail("field 'resume.last_seq' must be an integer >= 0")
        return Resume(epoch, last_seq)


def encode(frame: dict[str, Any]) -> str:
    """One server frame as JSON text."""
    return orjson.dumps(frame).decode()


def event_frame(event: Event) -> dict[str, Any]:
    """The wire frame of a conversation event."""
    frame: dict[str, Any] = {"type": event.type.value}
    if event.seq is not None:
        frame["seq"] = event.seq
    frame.update(event.payload)
    return frame


def error_frame(
    code: ErrorCode | str,
    message: str,
    *,
    client_msg_id: str | None = None,
    retry_after_ms: int | None = None,
) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "error", "code": str(code), "message": message}
    if client_msg_id is not None:
        frame["client_msg_id"] = client_msg_id
    if retry_after_ms is not None:
        frame["retry_after_ms"] = retry_after_ms
    return frame
