"""A streamed chat completion read straight from the HTTP response, one `orjson.loads` per event.

The `openai` client turns every Server-Sent Event of a streamed answer into a pydantic
`ChatCompletionChunk` (and decodes each line to `str` on the way); at a few hundred pieces a
second that was most of the gateway's CPU (bench/README.md). `OpenAILLM` still sends the request
through the client (auth, base_url, timeouts, status errors); `ChunkReader` reads the body of its
streaming response (`with_streaming_response`) with `SSEDecoder` and takes from each chunk only
what the gateway uses: `choices[0].delta.content`, and `usage` from the usage chunk.

Failures are raised as the client's own exception types, so `OpenAILLM` classifies them as it
classifies a failed request: the transport's errors while reading the body (the client's transport
is `httpx2` since openai 3) as `openai.APIConnectionError` / `openai.APITimeoutError`, an error the
provider sends inside the stream as `openai.APIError`, and a stream that cannot be read as
`StreamFormatError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import httpx2
import openai
import orjson

from core.llm import Usage

__all__ = [
    "MAX_EVENT_BYTES",
    "ChunkReader",
    "SSEDecoder",
    "SSEFormatError",
    "StreamFormatError",
    "read_chunk",
    "transport_failure",
]

MAX_EVENT_BYTES = 1 << 20
"""The largest line or event accepted (a chunk carries a few tokens; an answer is far smaller)."""

_DRAIN_SECONDS = 0.1  # reading the body's end after [DONE], so that the connection can be reused


class SSEFormatError(ValueError):
    """The bytes are not a `text/event-stream` the decoder accepts (an oversized line or event)."""


class StreamFormatError(openai.APIError):
    """The provider's stream cannot be read as a chat completion stream."""


class SSEDecoder:
    """Incremental `text/event-stream` decoder following the WHATWG rules.

    `feed(bytes)` returns the events completed by those bytes, as `(event type, data)` pairs: lines
    end with LF, CRLF or CR (also when a CRLF is split between two reads); the `data` lines of one
    event are joined with LF; `event` names it (empty when absent); comments (`:` lines, keep-alives)
    and the `id` and `retry` fields are ignored; an event without data is not dispatched. An event
    left incomplete when the body ends is dropped, as the standard says. A line or an event larger
    than `MAX_EVENT_BYTES` raises `SSEFormatError`.
    """

    __slots__ = ("_data", "_event", "_size", "_skip_lf", "_tail")

    def __init__(self) -> None:
        self._tail = b""  # an incomplete line from the previous read
        self._skip_lf = False  # the previous read ended with a CR: a LF starting this one is its pair
        self._data: list[bytes] = []
        self._size = 0
        self._event = b""

    def feed(self, chunk: bytes) -> list[tuple[bytes, bytes]]:
        if self._skip_lf:
            self._skip_lf = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]
        if self._tail:
            chunk = self._tail + chunk
        if b"\r" in chunk:
            self._skip_lf = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *lines, self._tail = chunk.split(b"\n")
        if len(self._tail) > MAX_EVENT_BYTES:
            raise SSEFormatError(f"a line of the event stream exceeds {MAX_EVENT_BYTES} bytes")
        events: list[tuple[bytes, bytes]] = []
        for line in lines:
            if line.startswith(b"data:"):  # nearly every line: checked first
                value = line[6:] if line[5:6] == b" " else line[5:]
                self._data.append(value)
                self._size += len(value) + 1
                if self._size > MAX_EVENT_BYTES:
                    raise SSEFormatError(f"an event of the event stream exceeds {MAX_EVENT_BYTES} bytes")
            elif not line:
                if self._data:
                    data = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
                    events.append((self._event, data))
                self._data, self._size, self._event = [], 0, b""
            elif not line.startswith(b":"):  # a comment (keep-alive) is skipped
                self._field(line)
        return events

    def _field(self, line: bytes) -> None:
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if name == b"event":
            self._event = value
        elif name == b"data":  # "data" without a colon: an empty data line
            self._data.append(value)
            self._size += len(value) + 1


def transport_failure(exc: Exception, request: httpx2.Request, message: str | None = None) -> openai.APIError:
    """The client's exception for what the HTTP transport raised while sending `request` or reading
    its response: `APITimeoutError` for a timeout, `APIConnectionError` for anything else."""
    if isinstance(exc, httpx2.TimeoutException):
        return openai.APITimeoutError(request=request)
    if message is None:
        return openai.APIConnectionError(request=request)
    return openai.APIConnectionError(message=message, request=request)


class ProviderError(Exception):
    """A chunk that is an error object (`{"error": {...}}`): the provider's answer failed."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def read_chunk(data: bytes) -> tuple[str, Usage | None]:
    """The text (`choices[0].delta.content`, "" when absent) and the usage of one chunk's JSON.

    Lenient where the gateway does not care (unknown fields, a chunk without choices, usage that
    is not two integers); `ValueError` naming the problem where the text cannot be read, and
    `ProviderError` with the provider's message for an error object.
    """
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ValueError(f"a chunk is not JSON: {_excerpt(data)}") from None
    if not isinstance(chunk, dict):
        raise ValueError(f"a chunk is not a JSON object: {_excerpt(data)}")
    if chunk.get("error"):
        raise ProviderError(_error_message(chunk))
    text = ""
    choices = chunk.get("choices")
    if choices:  # the usage chunk (and some keep-alive chunks) have no choices at all
        if not isinstance(choices, list) or not isinstance(choices[0], dict):
            raise ValueError(f"a chunk's choices are not a list of objects: {_excerpt(data)}")
        delta = choices[0].get("delta")
        if delta is not None:
            if not isinstance(delta, dict):
                raise ValueError(f"a chunk's delta is not an object: {_excerpt(data)}")
            content = delta.get("content")
            if isinstance(content, str):
                text = content
            elif content is not None:
                raise ValueError(f"a chunk's content is not a string: {_excerpt(data)}")
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if type(prompt) is int and type(completion) is int:
            return text, Usage(prompt, completion)
    return text, None


def _excerpt(data: bytes, limit: int = 120) -> str:
    text = data[:limit].decode("utf-8", "replace")
    return repr(text + "…" if len(data) > limit else text)


def _error_message(body: object) -> str:
    """The message of an error event's or error chunk's body (`{"error": {"message": ...}}`,
    `{"message": ...}` or plain text)."""
    if isinstance(body, str) and body:
        return body
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and isinstance(error.get("message"), str) and error["message"]:
            return str(error["message"])
        if isinstance(error, str) and error:
            return error
    return "an error occurred during streaming"


def _loads_or_text(data: bytes) -> object:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return data.decode("utf-8", "replace")


class ChunkReader:
    """Reads one streamed chat completion from the client's streaming response.

    `read()` returns the text pieces of the next network read that carries any, in order, and
    `[]` once the stream ended (`[DONE]`, or the body's end); `usage` is the usage chunk's, once
    seen. An event stream that carries no event for `idle_timeout` seconds (keep-alive comments
    only) fails like a read timeout. `aclose()` closes the HTTP response (the provider sees the
    client go away); it is idempotent.
    """

    __slots__ = (
        "_chunks",
        "_closer",
        "_decoder",
        "_failure",
        "_idle_timeout",
        "_last_event",
        "_response",
        "done",
        "usage",
    )

    def __init__(
        self, response: httpx2.Response, *, closer: contextlib.AsyncExitStack, idle_timeout: float
    ) -> None:
        self._response = response
        self._closer = closer
        # A body sent with a content-encoding goes through the client's decoder; a plain one
        # (the usual for an event stream) is read raw, one generator layer less per read.
        encoded = response.headers.get("content-encoding", "identity") != "identity"
        self._chunks: AsyncIterator[bytes] = response.aiter_bytes() if encoded else response.aiter_raw()
        self._decoder = SSEDecoder()
        self._idle_timeout = idle_timeout
        self._last_event = time.monotonic()
        self._failure: openai.APIError | None = None
        self.usage: Usage | None = None
        self.done = False

    async def read(self) -> list[str]:
        if self._failure is not None:
            raise self._failure
        pieces: list[str] = []
        while not pieces and not self.done:
            raw = await self._next_bytes()
            if raw is None:
                self.done = True
                break
            try:
                events = self._decoder.feed(raw)
            except SSEFormatError as exc:
                raise self._format_error(str(exc)) from exc
            if not events:
                if time.monotonic() - self._last_event > self._idle_timeout:
                    raise openai.APITimeoutError(request=self._response.request)
                continue
            self._last_event = time.monotonic()
            self._take(events, pieces)
        return pieces

    def _take(self, events: list[tuple[bytes, bytes]], pieces: list[str]) -> None:
        for event, data in events:
            if data.startswith(b"[DONE]"):
                self.done = True
                return
            try:
                text, usage = self._read_event(event, data)
            except openai.APIError as exc:
                if not pieces:
                    raise
                # The pieces before the failure are the provider's answer so far: hand them over
                # first, and fail on the next read, as if the failure had come in a read of its own.
                self._failure = exc
                return
            if usage is not None:
                self.usage = usage
            if text:
                pieces.append(text)

    def _read_event(self, event: bytes, data: bytes) -> tuple[str, Usage | None]:
        if event == b"error":
            body = _loads_or_text(data)
            raise openai.APIError(_error_message(body), self._response.request, body=body)
        try:
            return read_chunk(data)
        except ProviderError as exc:
            raise openai.APIError(exc.message, self._response.request, body=_loads_or_text(data)) from None
        except ValueError as exc:
            raise self._format_error(str(exc)) from exc

    async def _next_bytes(self) -> bytes | None:
        try:
            return await anext(self._chunks)
        except StopAsyncIteration:
            return None
        except Exception as exc:  # whatever the transport raises while reading: the connection failed
            raise transport_failure(
                exc, self._response.request, f"the stream broke: {type(exc).__name__}: {exc}"
            ) from exc

    def _format_error(self, detail: str) -> StreamFormatError:
        return StreamFormatError(f"malformed stream: {detail}", self._response.request, body=None)

    async def aclose(self) -> None:
        if self.done and not self._response.is_closed:
            # Read the body's end (usually already received with [DONE]) so that the connection
            # goes back to the pool instead of being closed; bounded, and never an error.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(_DRAIN_SECONDS):
                    async for _ in self._chunks:
                        pass
        await self._closer.aclose()
