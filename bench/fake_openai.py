"""A fast OpenAI-compatible chat completions server for benchmarks.

It answers `POST /v1/chat/completions` like a provider does: with `"stream": true`, Server-Sent
Events in OpenAI's chunk format (a role chunk, one chunk per piece, a `finish_reason` chunk, a usage
chunk with empty `choices` when `stream_options.include_usage` is set, then `data: [DONE]`), sent
with chunked transfer encoding on a keep-alive connection; without it, one JSON completion.

It is raw asyncio (no framework) and sends pre-encoded chunks, so that it costs little CPU next to
the process being measured on the same machine. The tests use tests/llm_server.py instead, whose
answers are scripted per request.

    .venv/bin/python bench/fake_openai.py --port 8090 --pieces 200 --delay-ms 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import subprocess
import sys
import time

import orjson

_STREAM_HEADERS = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(payload: object) -> bytes:
    return _chunked(b"data: " + orjson.dumps(payload) + b"\n\n")


class FakeOpenAI:
    """Streams `pieces` pieces per answer, `delay` seconds apart (0: as fast as the socket takes them)."""

    def __init__(self, *, pieces: int, delay: float, model: str = "bench-model") -> None:
        self.pieces = pieces
        self.delay = delay
        self.answers = 0
        created = int(time.time())
        base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": created, "model": model}
        fingerprint = {"system_fingerprint": "fp_bench"}

        def chunk(delta: dict[str, str], finish: str | None, usage: bool) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            extra = {"usage": None} if usage else {}
            return _event({**base, **fingerprint, "choices": [choice], **extra})

        # Pre-encoded, with and without the `"usage": null` that providers add when usage is asked for.
        self._role = {u: chunk({"role": "assistant", "content": ""}, None, u) for u in (False, True)}
        words = [f" word{i % 97}" for i in range(pieces)]
        self._pieces = {u: [chunk({"content": w}, None, u) for w in words] for u in (False, True)}
        self._stop = {u: chunk({}, "stop", u) for u in (False, True)}
        usage = {"prompt_tokens": 20, "completion_tokens": pieces, "total_tokens": 20 + pieces}
        self._usage = _event({**base, **fingerprint, "choices": [], "usage": usage})
        self._done = _chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n"
        self._text = "".join(words)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = orjson.loads(await reader.readexactly(length)) if length else {}
                if body.get("stream"):
                    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                    await self._stream(writer, include_usage)
                else:
                    self._complete(writer, str(body.get("model", "")))
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _stream(self, writer: asyncio.StreamWriter, include_usage: bool) -> None:
        writer.write(_STREAM_HEADERS + self._role[include_usage])
        for piece in self._pieces[include_usage]:
            if self.delay:
                await asyncio.sleep(self.delay)
            writer.write(piece)
            await writer.drain()
        writer.write(self._stop[include_usage] + (self._usage if include_usage else b"") + self._done)
        await writer.drain()
        self.answers += 1

    def _complete(self, writer: asyncio.StreamWriter, model: str) -> None:
        payload = orjson.dumps(
            {
                "id": "chatcmpl-bench",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "{}"}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 20, "completion_tokens": 1, "total_tokens": 21},
            }
        )
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (len(payload), payload)
        )


async def serve(port: int, pieces: int, delay: float) -> None:
    fake = FakeOpenAI(pieces=pieces, delay=delay)
    server = await asyncio.start_server(fake.handle, "127.0.0.1", port, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    print(f"fake OpenAI server on http://127.0.0.1:{bound}/v1", flush=True)
    async with server:
        await server.serve_forever()


def start_fake(pieces: int, delay_ms: float) -> tuple[subprocess.Popen[str], str]:
    """This server in its own process; returns it and its base URL (…/v1)."""
    command = [sys.executable, __file__, "--pieces", str(pieces), "--delay-ms", str(delay_ms)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    match = re.search(r"(http://\S+/v1)", line)
    if not match:
        process.kill()
        raise RuntimeError(f"the fake provider did not start: {line!r}")
    return process, match.group(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="port (0: any free port, printed)")
    parser.add_argument("--pieces", type=int, default=200, help="pieces per streamed answer")
    parser.add_argument("--delay-ms", type=float, default=10.0, help="pause before each piece")
    args = parser.parse_args()
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        run(serve(args.port, args.pieces, args.delay_ms / 1000))


if __name__ == "__main__":
    main()
