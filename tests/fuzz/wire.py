"""Hostile input for the fuzz tests (hypothesis strategies) and the checks of what the gateway
answers: only the protocol's frames and close codes, never an `internal` error, never a 5xx."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from gateway.protocol import ErrorCode
from tests.servers import GatewayProcess

SERVER_TYPES = {
    "welcome",
    "ack",
    "message",
    "ai_start",
    "delta",
    "ai_end",
    "mode",
    "stage",
    "typing",
    "error",
    "reset",
    "reconnect",
    "snapshot",
    "feed",
    "subscribed",
    "unsubscribed",
}
# What a fuzzed client may be answered with as an error (never `internal`).
CLIENT_ERRORS = {code.value for code in ErrorCode} - {ErrorCode.INTERNAL.value}
# Close codes that refuse a client (never 1011 internal error, never an abrupt end without one);
# 1007 is the WebSocket layer's answer to a text frame that is not UTF-8.
REFUSALS = {1007, 1009, 4008, 4401, 4403, 4429}
MAX_FRAME_BYTES = 64 * 1024  # CHATGW_MAX_FRAME_BYTES's default, which the fuzz gateway keeps
CLIENT_TYPES = ["hello", "message", "typing", "stop", "subscribe", "unsubscribe", "takeover", "handback"]
PROBE = '{"type": "fuzz-probe"}'

# -- strategies -------------------------------------------------------------------------------------

# Characters that broke things elsewhere: NUL (PostgreSQL refuses it in text), lone surrogates (not
# encodable as UTF-8), a byte order mark, bidi overrides, a line separator, non-characters.
NASTY = st.sampled_from(["\x00", "\ud800", "\udfff", "\ufeff", "\u202e", "\u2028", "\uffff", "\U0010ffff"])
TEXT = st.one_of(
    st.text(max_size=40),
    st.lists(st.one_of(NASTY, st.text(max_size=5)), max_size=8).map("".join),
    # Around the message length limit (4000 characters), in characters of 1 to 4 bytes.
    st.builds(
        lambda n, c: c * n, st.integers(min_value=3990, max_value=4010), st.sampled_from(["a", "é", "😀"])
    ),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63 - 2, max_value=2**70),
    st.floats(),
    TEXT,
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)


def field_values(*plausible: str) -> st.SearchStrategy[Any]:
    """A frame field's value: one of `plausible` (valid ones), a fresh id, or anything."""
    options: list[st.SearchStrategy[Any]] = [JSON_VALUES, st.builds(lambda: str(uuid.uuid4()))]
    if plausible:
        options.insert(0, st.sampled_from(plausible))
    return st.one_of(*options)


def frames(types: list[str], *plausible_ids: str, token: str = "") -> st.SearchStrategy[dict[str, Any]]:
    """Client frames of `types` (or an unknown type), with fields plausible or not, present or not."""
    ids = field_values(*plausible_ids)
    resume = st.fixed_dictionaries(
        {}, optional={"epoch": field_values("", "0"), "last_seq": st.one_of(st.integers(), JSON_VALUES)}
    )
    return st.fixed_dictionaries(
        {"type": st.one_of(st.sampled_from(types), TEXT, JSON_VALUES)},
        optional={
            "client_msg_id": field_values("m-1", "m-2", "x" * 200),
            "text": st.one_of(TEXT, JSON_VALUES),
            "state": st.one_of(st.booleans(), JSON_VALUES),
            "conversation_id": ids,
            "token": field_values(token) if token else JSON_VALUES,
            "resume": st.one_of(resume, JSON_VALUES),
        },
    )


@dataclass(frozen=True)
class BadUtf8:
    """A text frame whose payload is not UTF-8 (the client library would refuse to encode it)."""

    payload: bytes


@dataclass(frozen=True)
class Nested:
    """A message whose text is `depth` nested JSON arrays (built when sent: a short repr)."""

    depth: int

    def text(self) -> str:
        return (
            '{"type": "message", "client_msg_id": "deep", "text": '
            + "[" * self.depth
            + "]" * self.depth
            + "}"
        )


@dataclass(frozen=True)
class Huge:
    """A message frame of about `size` bytes, over the frame size limit (built when sent)."""

    size: int

    def text(self) -> str:
        return json.dumps({"type": "message", "client_msg_id": "huge", "text": "y" * self.size})


Raw = str | bytes | BadUtf8 | Nested | Huge


def _sendable(text: str) -> Raw:
    """`text` as a text frame; one holding a lone surrogate goes as the bytes it would be (not UTF-8)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return BadUtf8(text.encode("utf-8", "surrogatepass"))
    return text


# Frames that are wrong whatever the state: not JSON, not an object, no or an unknown type, deep
# nesting, binary, or text that is not UTF-8.
GARBAGE: st.SearchStrategy[Raw] = st.one_of(
    st.text(max_size=60).filter(lambda s: not _is_object(s)).map(_sendable),
    st.lists(st.one_of(NASTY, st.text(max_size=5)), max_size=8)
    .map("".join)
    .filter(lambda s: not _is_object(s))
    .map(_sendable),
    JSON_VALUES.filter(lambda v: not isinstance(v, dict)).map(json.dumps),
    st.dictionaries(TEXT.filter(lambda k: k != "type"), JSON_VALUES, max_size=3).map(json.dumps),
    st.integers(min_value=1, max_value=200_000).map(Nested),
    st.binary(max_size=200),
    st.sampled_from([b"\xff", b"\xc3\x28", b'{"type": "\xed\xa0\x80"}']).map(BadUtf8),
)
# Frames over the frame size limit (CHATGW_MAX_FRAME_BYTES, 64 KiB by default).
HUGE = st.integers(min_value=70_000, max_value=600_000).map(Huge)


def _is_object(text: str) -> bool:
    try:
        return isinstance(orjson.loads(text), dict)
    except orjson.JSONDecodeError:
        return False


def encode(frame: dict[str, Any], *, ascii_only: bool) -> str:
    """JSON text for `frame`. The stdlib writes lone surrogates as \\u escapes, which a client can send
    (orjson refuses them); `ascii_only=False` writes the other characters raw (sent as UTF-8), and
    lone surrogates still escaped."""
    if ascii_only:
        return json.dumps(frame)
    text = json.dumps(frame, ensure_ascii=False)
    try:
        text.encode()
    except UnicodeEncodeError:
        return json.dumps(frame)
    return text


# -- the wire ---------------------------------------------------------------------------------------


def open_socket(gw: GatewayProcess) -> ClientConnection:
    """A connected socket (entered, as websockets wants it; the caller closes it)."""
    return connect(gw.ws, open_timeout=10, max_size=2**22, close_timeout=5).__enter__()


@dataclass
class Session:
    """One fuzzing socket and what came back on it."""

    ws: ClientConnection
    received: list[dict[str, Any]] = field(default_factory=list)
    close_code: int | None = None
    closed: bool = False
    failing: bool = False  # a frame was sent that the WebSocket layer fails the connection for

    @classmethod
    def open(cls, gw: GatewayProcess) -> Session:
        return cls(open_socket(gw))

    def send(self, raw: Raw) -> bool:
        """Send one frame; False when the gateway has closed the socket meanwhile."""
        try:
            if isinstance(raw, Nested | Huge):
                raw = raw.text()
            payload = raw.payload if isinstance(raw, BadUtf8) else raw
            size = len(payload.encode()) if isinstance(payload, str) else len(payload)
            self.failing = self.failing or size > MAX_FRAME_BYTES or isinstance(raw, BadUtf8)
            if isinstance(raw, BadUtf8):
                self.ws.send(raw.payload, text=True)
            else:
                self.ws.send(raw)
        except ConnectionClosed as closed:
            self._closed(closed)
            return False
        return True

    def recv(self, timeout: float = 15) -> dict[str, Any] | None:
        """The next frame, checked against the protocol; None once the gateway closed the socket."""
        try:
            raw = self.ws.recv(timeout=timeout)
        except ConnectionClosed as closed:
            self._closed(closed)
            return None
        assert isinstance(raw, str), f"binary frame from the gateway: {raw!r}"
        frame = orjson.loads(raw)
        assert isinstance(frame, dict), raw
        assert frame.get("type") in SERVER_TYPES, raw
        if frame["type"] == "error":
            assert frame["code"] in CLIENT_ERRORS, raw
            assert isinstance(frame["message"], str)
            assert frame["message"], raw
        self.received.append(frame)
        return frame

    def _closed(self, closed: ConnectionClosed) -> None:
        code = closed.rcvd.code if closed.rcvd is not None else None
        # The WebSocket layer fails a connection whose frame is too large (1009) or not UTF-8 (1007):
        # it drops the connection right after its close frame, while the client may still be
        # sending, and TCP may then lose the close frame (a reset). Nothing else may end a
        # connection without a close code.
        allowed = REFUSALS | ({None} if self.failing else set())
        assert code in allowed, f"closed with {code} ({closed}); received {self.received[-5:]}"
        self.close_code = code
        self.closed = True

    def probe(self) -> bool:
        """Send an unknown frame type and read up to its error: everything sent before was
        answered (or not, as the protocol says). False when the gateway closed the socket."""
        if not self.send(PROBE):
            return False
        while (frame := self.recv()) is not None:
            if frame["type"] == "error" and "fuzz-probe" in frame["message"]:
                assert frame["code"] == "bad_frame", frame
                return True
        return False

    def errors(self) -> list[dict[str, Any]]:
        return [f for f in self.received if f["type"] == "error" and "fuzz-probe" not in f["message"]]

    def close(self) -> None:
        self.ws.close()
