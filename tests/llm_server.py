"""A test double: a real OpenAI-compatible server whose answers the test scripts.

`LLMServer` runs a Starlette app under uvicorn in a background thread, on 127.0.0.1 and a free
port, so the real `openai` client talks to it over real HTTP. It serves `POST /v1/chat/completions`:

- with `"stream": true`, Server-Sent Events in the OpenAI format: a role chunk, one chunk per
  scripted piece, a chunk with `finish_reason`, a usage chunk with empty `choices` when
  `stream_options.include_usage` is set, then `data: [DONE]`;
- without it, one JSON chat completion whose content is the scripted pieces joined (so
  `json_answer(...)` answers a `response_format` request with the JSON the test chose).

What each request gets is scripted: `script(*behaviours, model=...)` queues behaviours consumed one
per request (for that model, or for any model), `always(behaviour, model=...)` answers every
request once the queues are empty. An unscripted request gets a 400. Behaviours: `ok`, `slow`,
`json_answer`, `status`, `hang_before_first_token`, `drop_after`, `stall_after`, and `raw_sse`
(exactly the bytes the test gives: split lines, comments, malformed chunks, error events).

Everything seen is recorded as `SeenRequest`s: the model, the messages, the whole body, and for a
streamed answer how many pieces were sent and whether the client disconnected before the end. That
last record is how a test proves on the wire that closing a stream closed the HTTP response.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from tests.servers import free_port

Kind = Literal["ok", "status", "hang", "drop", "stall", "raw"]


@dataclass(frozen=True, slots=True)
class Behaviour:
    """How the server answers one request (build it with the functions below)."""

    kind: Kind
    pieces: tuple[str, ...] = ()
    delay: float = 0.0  # seconds before each piece (non-streaming: before the answer)
    status: int = 200
    retry_after: str | None = None
    message: str = ""
    drop_after: int = 0  # for "drop" and "stall": the pieces sent before it
    keepalive_every: float = 0.0  # for "raw": then send ": keep-alive" comments this often, forever


def ok(*pieces: str, delay: float = 0.0) -> Behaviour:
    """A successful answer made of `pieces`, `delay` seconds before each."""
    return Behaviour("ok", pieces=pieces, delay=delay)


def slow(*pieces: str, delay: float) -> Behaviour:
    """`ok`, paced: a stream a test can interrupt halfway."""
    return Behaviour("ok", pieces=pieces, delay=delay)


def json_answer(value: object) -> Behaviour:
    """A successful answer whose text is `value` as JSON (for structured-output requests)."""
    return Behaviour("ok", pieces=(json.dumps(value),))


def status(code: int, *, retry_after: float | None = None, message: str = "scripted failure") -> Behaviour:
    """An error response with an OpenAI-style error body, and a `Retry-After` header if given."""
    return Behaviour(
        "status", status=code, retry_after=None if retry_after is None else str(retry_after), message=message
    )


def hang_before_first_token() -> Behaviour:
    """Open the stream (headers and the role chunk) and then send nothing until the client leaves."""
    return Behaviour("hang")


def drop_after(n_pieces: int, *pieces: str, delay: float = 0.0) -> Behaviour:
    """Stream the first `n_pieces` of `pieces`, then close the connection mid-stream (streaming only)."""
    return Behaviour("drop", pieces=pieces, delay=delay, drop_after=n_pieces)


def stall_after(n_pieces: int, *pieces: str) -> Behaviour:
    """Stream the first `n_pieces` of `pieces`, then send nothing until the client leaves."""
    return Behaviour("stall", pieces=pieces, drop_after=n_pieces)


def raw_sse(*parts: str, delay: float = 0.0, keepalive_every: float = 0.0) -> Behaviour:
    """A 200 event stream whose body is exactly `parts`, each written on its own `delay` seconds
    after the previous one (so that the client reads them separately); then, with
    `keepalive_every`, a `: keep-alive` comment that often until the client leaves, else the end."""
    return Behaviour("raw", pieces=parts, delay=delay, keepalive_every=keepalive_every)


_UNSCRIPTED = status(400, message="no scripted behaviour for this request")


@dataclass
class SeenRequest:
    """One request the server received, and what became of its answer."""

    model: str
    messages: list[dict[str, Any]]
    body: dict[str, Any]
    stream: bool
    behaviour: Behaviour
    received_at: float  # time.monotonic()
    headers: dict[str, str] = field(default_factory=dict)  # lower-cased names
    pieces_sent: int = 0
    client_disconnected: bool = False  # the client went away before the answer was complete
    completed: bool = False  # the whole scripted answer was sent
    finished: bool = False  # the server is done with this request, whatever the outcome

    @property
    def pieces_scripted(self) -> int:
        return len(self.behaviour.pieces)

    @property
    def last_user_message(self) -> str:
        return next((str(m.get("content")) for m in reversed(self.messages) if m.get("role") == "user"), "")


class LLMServer:
    """A real OpenAI-compatible HTTP server for tests; use it as a context manager."""

    def __init__(self) -> None:
        self.port = free_port()
        self._lock = threading.Lock()
        self._queues: dict[str | None, deque[Behaviour]] = {}
        self._always: dict[str | None, Behaviour] = {}
        self._seen: list[SeenRequest] = []
        self._ids = itertools.count(1)
        self._stopping = threading.Event()
        app = Starlette(routes=[Route("/v1/chat/completions", self._chat_completions, methods=["POST"])])
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            loop="asyncio",
            http="h11",
            ws="none",
            lifespan="off",
            log_config=None,
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="llm-test-server", daemon=True)

    # -- life cycle -----------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test LLM server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self._stopping.set()
        self._server.should_exit = True
        self._thread.join(15)

    def __enter__(self) -> LLMServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- control API ----------------------------------------------------------------------------

    def script(self, *behaviours: Behaviour, model: str | None = None) -> None:
        """Queue behaviours, consumed one per request for `model` (None: for any model)."""
        with self._lock:
            self._queues.setdefault(model, deque()).extend(behaviours)

    def always(self, behaviour: Behaviour, *, model: str | None = None) -> None:
        """Answer every request for `model` (None: any model) this way once its queues are empty."""
        with self._lock:
            self._always[model] = behaviour

    @property
    def requests(self) -> list[SeenRequest]:
        """The requests seen so far, in order of arrival."""
        with self._lock:
            return list(self._seen)

    def models(self) -> list[str]:
        return [r.model for r in self.requests]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait (in the test's event loop) until `predicate()` holds; fail after `timeout` s."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"the test LLM server never reached the expected state: {self.requests}")
            await asyncio.sleep(0.01)

    def _next_behaviour(self, model: str) -> Behaviour:
        with self._lock:
            for key in (model, None):
                queue = self._queues.get(key)
                if queue:
                    return queue.popleft()
            for key in (model, None):
                if key in self._always:
                    return self._always[key]
            return _UNSCRIPTED

    # -- the endpoint (runs in the server's thread) ---------------------------------------------

    async def _chat_completions(self, request: Request) -> Response:
        body = await request.json()
        model = str(body.get("model", ""))
        behaviour = self._next_behaviour(model)
        stream = bool(body.get("stream"))
        seen = SeenRequest(
            model=model,
            messages=list(body.get("messages", [])),
            body=body,
            stream=stream,
            behaviour=behaviour,
            received_at=time.monotonic(),
            headers={k.lower(): v for k, v in request.headers.items()},
        )
        with self._lock:
            self._seen.append(seen)
        if behaviour.kind == "status":
            seen.finished = True
            headers = {} if behaviour.retry_after is None else {"retry-after": behaviour.retry_after}
            error = {"message": behaviour.message, "type": "scripted_error", "param": None, "code": None}
            return JSONResponse({"error": error}, status_code=behaviour.status, headers=headers)
        completion_id = f"chatcmpl-test-{next(self._ids)}"
        usage = {
            "prompt_tokens": sum(len(str(m.get("content", "")).split()) for m in seen.messages),
            "completion_tokens": len(behaviour.pieces),
            "total_tokens": 0,
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if stream:
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return _SSEAnswer(self, seen, completion_id, usage if include_usage else None)
        return _JSONAnswer(self, seen, completion_id, usage)


class _Answer(Response):
    """An ASGI response that watches for the client's disconnect while it answers."""

    def __init__(self, server: LLMServer, seen: SeenRequest, completion_id: str) -> None:
        super().__init__()
        self.server = server
        self.seen = seen
        self.completion_id = completion_id
        self.disconnected = asyncio.Event()

    async def _watch(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnected.set()
                return

    async def _pause(self, seconds: float) -> bool:
        """Wait `seconds`; True if the client disconnected meanwhile."""
        if seconds > 0 and not self.disconnected.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.disconnected.wait(), seconds)
        return self.disconnected.is_set()

    async def _hang(self) -> None:
        """Send nothing until the client disconnects (or the server stops)."""
        while not self.server._stopping.is_set() and not await self._pause(0.05):
            pass

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.create_task(self._watch(receive))
        try:
            await self._answer(send)
        except OSError:  # a write to a client that is gone
            self.disconnected.set()
        finally:
            watcher.cancel()
            if self.disconnected.is_set() and not self.seen.completed:
                self.seen.client_disconnected = True
            self.seen.finished = True

    async def _answer(self, send: Send) -> None:
        raise NotImplementedError


class _JSONAnswer(_Answer):
    def __init__(
        self, server: LLMServer, seen: SeenRequest, completion_id: str, usage: dict[str, int]
    ) -> None:
        super().__init__(server, seen, completion_id)
        self.usage = usage

    async def _answer(self, send: Send) -> None:
        behaviour = self.seen.behaviour
        if behaviour.kind == "hang":
            await self._hang()
            return
        if await self._pause(behaviour.delay):
            return
        payload = {
            "id": self.completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.seen.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(behaviour.pieces)},
                    "finish_reason": "stop",
                }
            ],
            "usage": self.usage,
        }
        data = json.dumps(payload).encode()
        self.seen.completed = True
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(data)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": data})


class _SSEAnswer(_Answer):
    def __init__(
        self, server: LLMServer, seen: SeenRequest, completion_id: str, usage: dict[str, int] | None
    ) -> None:
        super().__init__(server, seen, completion_id)
        self.usage = usage

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> Message:
        payload = {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self.seen.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }
        return _event(payload)

    async def _answer(self, send: Send) -> None:
        behaviour = self.seen.behaviour
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
            }
        )
        if behaviour.kind == "raw":
            await self._raw(send)
            return
        await send(self._chunk({"role": "assistant", "content": ""}))
        if behaviour.kind == "hang":
            await self._hang()
            return
        for index, piece in enumerate(behaviour.pieces):
            if behaviour.kind == "drop" and index == behaviour.drop_after:
                # Returning without finishing the chunked body makes uvicorn close the connection
                # (it logs "ASGI callable returned without completing response.").
                return
            if behaviour.kind == "stall" and index == behaviour.drop_after:
                await self._hang()
                return
            if await self._pause(behaviour.delay):
                return
            await send(self._chunk({"content": piece}))
            self.seen.pieces_sent += 1
        if behaviour.kind in ("drop", "stall"):
            return
        await send(self._chunk({}, "stop"))
        if self.usage is not None:
            await send(
                _event(
                    {
                        "id": self.completion_id,
                        "object": "chat.completion.chunk",
                        "created": int(time.time()),
                        "model": self.seen.model,
                        "choices": [],
                        "usage": self.usage,
                    }
                )
            )
        self.seen.completed = True
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    async def _raw(self, send: Send) -> None:
        behaviour = self.seen.behaviour
        for index, part in enumerate(behaviour.pieces):
            if index and await self._pause(behaviour.delay):
                return
            await send({"type": "http.response.body", "body": part.encode(), "more_body": True})
            self.seen.pieces_sent += 1
        while behaviour.keepalive_every and not self.server._stopping.is_set():
            if await self._pause(behaviour.keepalive_every):
                return
            await send({"type": "http.response.body", "body": b": keep-alive\n\n", "more_body": True})
        self.seen.completed = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _event(payload: dict[str, Any]) -> Message:
    return {
        "type": "http.response.body",
        "body": f"data: {json.dumps(payload)}\n\n".encode(),
        "more_body": True,
    }
