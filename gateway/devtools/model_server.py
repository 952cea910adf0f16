"""A local OpenAI-compatible model server for load tests and benchmarks: `chatgw model-server`.

It answers every chat completion with a configurable time to first token (`--ttft-ms`), speed
(`--tokens-per-second`, 0: as fast as possible), length (`--tokens`) and jitter (`--jitter-ms`),
so that a benchmark drives the gateway's real model path (the `openai` client, HTTP streaming)
without a GPU or a provider.

**The send-time marker.** Every token of an answer is the text ``" ⟦<µs>⟧"``: a space, U+27E6,
the Unix time in whole microseconds at which the server wrote that token (decimal digits), and
U+27E7. The gateway only ever concatenates tokens into `delta` frames, so each marker reaches the
client whole, and a client on the same clock computes each token's lag end to end as its arrival
time minus the marker (`gateway.devtools.marker` parses them; `chatgw loadtest` does exactly that).

Endpoints:

- `POST /v1/chat/completions`: with `"stream": true`, Server-Sent Events in OpenAI's format (a role
  chunk at once, then one chunk per token, the first after the TTFT and the next ones at the set
  speed, a `finish_reason` chunk, a usage chunk when `stream_options.include_usage` is set, and
  `data: [DONE]`). Without it, after the TTFT, one whole completion: for a `response_format` with
  a JSON schema, an object with every property null; for a prompt whose last message has a line
  `Options: a, b` (the gateway's stage selection), the first option; otherwise the tokens joined.
- `GET /v1/models`: one model, `chatgw-model-server` (any model name is accepted in requests).
- `GET /stats`: the configuration and counters: requests, streams, whole completions, streams
  completed, client disconnects (a stream the client closed before its end), active streams,
  tokens sent, bad requests, and the server's own CPU seconds so far.

Jitter: each token's due time (the first included) is delayed by a uniform random 0..jitter; the
schedule itself does not drift. It is cheap by design: SSE bytes are written directly from
templates, one task per stream plus one that watches for the client's disconnect, on uvloop when
it is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import random
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import orjson
import uvicorn
from starlette.types import Receive, Scope, Send

from gateway.devtools.eventloop import run
from gateway.devtools.marker import token

MODEL_NAME = "chatgw-model-server"
_MAX_BODY = 4 * 1024 * 1024
_OPEN = " ⟦".encode()
_CLOSE = "⟧".encode()


@dataclass(frozen=True, slots=True)
class ModelServerConfig:
    """How every answer is paced. Times in seconds; `tokens_per_second` 0 means no pacing."""

    ttft: float = 0.2
    tokens_per_second: float = 20.0
    tokens: int = 40
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.ttft <= 600:
            raise ValueError("the time to first token must be between 0 and 600 s")
        if not 0 <= self.tokens_per_second <= 1_000_000:
            raise ValueError("tokens per second must be between 0 (as fast as possible) and 1000000")
        if not 1 <= self.tokens <= 100_000:
            raise ValueError("the answer length must be between 1 and 100000 tokens")
        if not 0 <= self.jitter <= 60:
            raise ValueError("the jitter must be between 0 and 60 s")


@dataclass(slots=True)
class ModelStats:
    requests: int = 0  # chat completion requests that were well formed
    streams: int = 0
    completions: int = 0  # whole (non-streamed) answers
    streams_completed: int = 0
    disconnects: int = 0  # streams the client closed before their end
    active_streams: int = 0
    tokens_sent: int = 0
    bad_requests: int = 0


class ModelServer:
    """The ASGI application (run it under uvicorn; `serve()` does)."""

    def __init__(self, config: ModelServerConfig, *, seed: int | None = None) -> None:
        self.config = config
        self.stats = ModelStats()
        self._ids = itertools.count(1)
        self._random = random.Random(seed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        route = (scope["method"], scope["path"])
        if route == ("POST", "/v1/chat/completions"):
            await self._chat(receive, send)
        elif route == ("GET", "/v1/models"):
            models = {"object": "list", "data": [{"id": MODEL_NAME, "object": "model", "owned_by": "chatgw"}]}
            await _json(send, 200, models)
        elif route == ("GET", "/stats"):
            await _json(send, 200, self.describe())
        else:
            await _json(send, 404, _error(f"no route {scope['method']} {scope['path']}", "not_found"))

    def describe(self) -> dict[str, Any]:
        """What `GET /stats` returns."""
        c = self.config
        config = {
            "ttft_ms": c.ttft * 1000,
            "tokens_per_second": c.tokens_per_second,
            "tokens": c.tokens,
            "jitter_ms": c.jitter * 1000,
        }
        return {"config": config, **asdict(self.stats), "cpu_seconds": round(time.process_time(), 3)}

    async def _chat(self, receive: Receive, send: Send) -> None:
        request = await _read_json(receive)
        if request is None:
            self.stats.bad_requests += 1
            await _json(send, 400, _error("the body must be a JSON object with a 'messages' list"))
            return
        self.stats.requests += 1
        model = request.get("model")
        model = model if isinstance(model, str) and model else MODEL_NAME
        completion_id = f"chatcmpl-{next(self._ids)}"
        if request.get("stream") is True:
            options = request.get("stream_options")
            usage = isinstance(options, dict) and options.get("include_usage") is True
            await self._stream(
                receive, send, model, completion_id, _prompt_tokens(request) if usage else None
            )
        else:
            await self._complete(send, request, model, completion_id)

    async def _stream(
        self, receive: Receive, send: Send, model: str, completion_id: str, prompt_tokens: int | None
    ) -> None:
        self.stats.streams += 1
        self.stats.active_streams += 1
        head = b"".join(
            (
                b'data: {"id":"',
                completion_id.encode(),
                b'","object":"chat.completion.chunk","created":',
                str(int(time.time())).encode(),
                b',"model":',
                orjson.dumps(model),
            )
        )
        choice = b',"choices":[{"index":0,"delta":'
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
            }
        )
        await _chunk(send, head + choice + b'{"role":"assistant","content":""},"finish_reason":null}]}\n\n')
        # uvicorn's send() ignores writes to a client that left; only receive() tells.
        gone = asyncio.ensure_future(_disconnect(receive))
        try:
            prefix = head + choice + b'{"content":"' + _OPEN
            suffix = _CLOSE + b'"},"finish_reason":null}]}\n\n'
            await self._tokens(send, prefix, suffix, gone)
            if gone.done():
                self.stats.disconnects += 1
                return
            end = head + choice + b'{},"finish_reason":"stop"}]}\n\n'
            if prompt_tokens is not None:
                end += _usage_chunk(head, prompt_tokens, self.config.tokens)
            await send({"type": "http.response.body", "body": end + b"data: [DONE]\n\n", "more_body": False})
            self.stats.streams_completed += 1
        finally:
            gone.cancel()
            self.stats.active_streams -= 1

    async def _tokens(self, send: Send, prefix: bytes, suffix: bytes, gone: asyncio.Future[None]) -> None:
        c = self.config
        loop = asyncio.get_running_loop()
        start = loop.time() + c.ttft
        interval = 1.0 / c.tokens_per_second if c.tokens_per_second else 0.0
        for index in range(c.tokens):
            due = start + index * interval + (self._random.uniform(0, c.jitter) if c.jitter else 0.0)
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif index % 64 == 63:
                await asyncio.sleep(0)  # unpaced: let other streams and the disconnect watcher run
            if gone.done():
                return
            stamp = str(time.time_ns() // 1000).encode()
            await _chunk(send, prefix + stamp + suffix)
            self.stats.tokens_sent += 1

    async def _complete(self, send: Send, request: Mapping[str, Any], model: str, completion_id: str) -> None:
        self.stats.completions += 1
        if self.config.ttft:
            await asyncio.sleep(self.config.ttft)
        text = _whole_answer(request, self.config.tokens)
        prompt = _prompt_tokens(request)
        completion = len(text.split())
        payload = {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }
        await _json(send, 200, payload)


def _whole_answer(request: Mapping[str, Any], tokens: int) -> str:
    response_format = request.get("response_format")
    if isinstance(response_format, dict):
        schema = (response_format.get("json_schema") or {}).get("schema") or {}
        properties = schema.get("properties") if isinstance(schema, dict) else None
        return orjson.dumps({name: None for name in properties or {}}).decode()
    messages = request.get("messages") or []
    last = messages[-1].get("content") if messages and isinstance(messages[-1], dict) else None
    for line in str(last or "").splitlines():
        if line.strip().lower().startswith("options:"):
            options = [o.strip() for o in line.split(":", 1)[1].split(",") if o.strip()]
            if options:
                return options[0]
    stamp = time.time_ns() // 1000
    return "".join(token(stamp) for _ in range(tokens))


def _prompt_tokens(request: Mapping[str, Any]) -> int:
    messages = request.get("messages") or []
    return sum(len(str(m.get("content", "")).split()) for m in messages if isinstance(m, dict))


def _usage_chunk(head: bytes, prompt_tokens: int, completion_tokens: int) -> bytes:
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    return head + b',"choices":[],"usage":' + orjson.dumps(usage) + b"}\n\n"


async def _chunk(send: Send, body: bytes) -> None:
    await send({"type": "http.response.body", "body": body, "more_body": True})


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _read_json(receive: Receive) -> dict[str, Any] | None:
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        if len(body) > _MAX_BODY:
            return None
        if not message.get("more_body"):
            break
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
        return None
    return request


def _error(message: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}


async def _json(send: Send, status: int, payload: object) -> None:
    body = orjson.dumps(payload)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def serve(config: ModelServerConfig, *, host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM; print one line with the base URL once it listens. Raises
    OSError (with a readable message) when it cannot listen."""
    sock = _listen(host, port)
    server = uvicorn.Server(
        uvicorn.Config(
            ModelServer(config),
            http="auto",  # httptools when installed
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            backlog=4096,
            timeout_graceful_shutdown=2,
        )
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():  # noqa: ASYNC110 - uvicorn has no "started" event
        await asyncio.sleep(0.05)
    if server.started:
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        bound = sock.getsockname()[1]
        print(f"model server ready: OPENAI_BASE_URL=http://{shown}:{bound}/v1 (stats: /stats)", flush=True)
    await task


def _listen(host: str, port: int) -> socket.socket:
    # Bound here rather than by uvicorn, which exits the process on a failed bind.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="chatgw model-server",
        description=(
            "A local OpenAI-compatible streaming model server for load tests. Every token is "
            "' ⟦<Unix time in µs when sent>⟧', so clients can measure each token's lag end to end."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=8100, help="port (default 8100; 0: any free port, printed)"
    )
    parser.add_argument("--ttft-ms", type=float, default=200.0, help="time to first token, ms (default 200)")
    parser.add_argument(
        "--tokens-per-second",
        type=float,
        default=20.0,
        help="speed after the first token; 0: no pacing (default 20)",
    )
    parser.add_argument("--tokens", type=int, default=40, help="tokens per answer (default 40)")
    parser.add_argument(
        "--jitter-ms", type=float, default=0.0, help="random extra delay per token, 0..N ms (default 0)"
    )
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error("--port must be between 0 (any free port) and 65535")
    try:
        config = ModelServerConfig(
            ttft=args.ttft_ms / 1000,
            tokens_per_second=args.tokens_per_second,
            tokens=args.tokens,
            jitter=args.jitter_ms / 1000,
        )
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        run(serve(config, host=args.host, port=args.port))
    except OSError as exc:
        print(f"chatgw model-server: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
