"""OpenAILLM through the real `openai` client against a real OpenAI-compatible server (tests/llm_server.py).

Nothing is mocked: every request crosses HTTP on 127.0.0.1, so retries, fallbacks, timeouts and
closing a stream are seen by the server exactly as a provider would see them.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from core.errors import LLMError
from core.llm import ChatMessage, LLMProvider, Usage
from core.llm_service import OpenAILLM, OpenAIStream
from tests.llm_server import (
    LLMServer,
    drop_after,
    hang_before_first_token,
    json_answer,
    ok,
    raw_sse,
    slow,
    stall_after,
    status,
)

MAIN = "main-model"
BACKUP = "backup-model"
PROMPT = [ChatMessage("system", "You are terse."), ChatMessage("user", "Say hello to the world")]
MANY = tuple(f"p{i} " for i in range(40))


class Codes:
    """An observer that records the error codes it is told about."""

    def __init__(self) -> None:
        self.codes: list[str] = []

    def error(self, code: str) -> None:
        self.codes.append(code)


@pytest.fixture
def server() -> Iterator[LLMServer]:
    with LLMServer() as running:
        yield running


@pytest.fixture
def codes() -> Codes:
    return Codes()


@pytest.fixture
async def make_llm(server: LLMServer, codes: Codes) -> AsyncIterator[Callable[..., OpenAILLM]]:
    made: list[OpenAILLM] = []

    def make(**overrides: Any) -> OpenAILLM:
        options: dict[str, Any] = {
            "api_key": "test-key",
            "base_url": server.base_url,
            "model": MAIN,
            "backoff_base": 0.001,
            "backoff_cap": 2.0,
            "first_token_timeout": 10.0,
            "request_timeout": 10.0,
            "observer": codes,
        }
        options.update(overrides)
        llm = OpenAILLM(**options)
        made.append(llm)
        return llm

    yield make
    for llm in made:
        await llm.close()


async def read_all(stream: OpenAIStream) -> list[str]:
    return [piece async for piece in stream]


async def read_into(stream: OpenAIStream, received: list[str]) -> None:
    async for piece in stream:
        received.append(piece)


def ask(text: str) -> list[ChatMessage]:
    return [ChatMessage("user", text)]


async def test_a_stream_yields_the_pieces_in_order_then_usage_and_model(
    server: LLMServer, make_llm: Callable[..., OpenAILLM], codes: Codes
) -> None:
    server.script(ok("Hello", ", ", "world", "!"))
    llm = make_llm()

    stream = await llm.stream(PROMPT)
    usage_before_the_end = stream.usage
    pieces = await read_all(stream)

    assert pieces == ["Hello", ", ", "world", "!"]
    assert "".join(pieces) == "Hello, world!"
    assert usage_before_the_end is None  # usage is set at the end only
    assert stream.usage == Usage(prompt_tokens=8, completion_tokens=4)
    assert stream.model == MAIN
    [seen] = server.requests
    assert seen.model == MAIN
    assert seen.messages == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hello to the world"},
    ]
    assert seen.body["stream"] is True
    assert seen.body["stream_options"] == {"include_usage": True}
    await server.wait_for(lambda: seen.finished)
    assert seen.completed
    assert not seen.client_disconnected
    assert codes.codes == []
    await stream.aclose()  # safe after the end


@pytest.mark.parametrize("transport", ["aiohttp", "httpx2"])
async def test_both_calls_send_the_clients_headers_and_a_plain_json_body(
    server: LLMServer, make_llm: Callable[..., OpenAILLM], transport: str
) -> None:
    # The requests are built here from the client's URL and headers (not by `create()`): what
    # reaches the provider must be what the client would have sent.
    server.script(ok("Hi"), json_answer({"a": 1}))
    llm = make_llm(transport=transport, api_key="sk-the-key")

    assert await read_all(await llm.stream(PROMPT)) == ["Hi"]
    await llm.complete(ask("x"), json_schema={"type": "object"})

    streamed, completed = server.requests
    for seen in (streamed, completed):
        assert seen.headers["authorization"] == "Bearer sk-the-key"
        assert seen.headers["content-type"] == "application/json"
        assert seen.headers["user-agent"].startswith("AsyncOpenAI/Python ")
        assert seen.headers["x-stainless-lang"] == "python"
    assert streamed.body == {
        "model": MAIN,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say hello to the world"},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert set(completed.body) == {"model", "messages", "response_format"}
    assert not completed.stream


async def test_a_429_is_retried_once_after_its_retry_after(
    server: LLMServer, make_llm: Callable[..., OpenAILLM], codes: Codes
) -> None:
    server.script(status(429, retry_after=0.3), ok("fine"))
    llm = make_llm(max_attempts=3)

    stream = await llm.stream(PROMPT)

    assert await read_all(stream) == ["fine"]
    first, second = server.requests
    assert first.model == second.model == MAIN
    # The jittered backoff alone would wait at most backoff_base (1 ms): the gap is Retry-After's.
    assert second.received_at - first.received_at >= 0.25
    assert codes.codes == ["llm_rate_limited"]


async def test_a_model_that_always_fails_with_500_falls_back_to_the_next(
    server: LLMServer, make_llm: Callable[..., OpenAILLM], codes: Codes
) -> None:
    server.always(status(500), model=MAIN)
    server.script(ok("from ", "the backup"), model=BACKUP)
    llm = make_llm(fallback_models=[BACKUP], max_attempts=3)

    stream = await llm.stream(PROMPT)

    assert stream.model == BACKUP
    assert await read_all(stream) == ["from ", "the backup"]
    assert server.models() == [MAIN, MAIN, MAIN, BACKUP]
    assert codes.codes == ["llm_server_error"] * 3


async def test_a_400_goes_to_the_fallback_without_a_retry(
    server: LLMServer, make_llm: Callable[..., OpenAILLM], codes: Codes
) -> None:
    server.always(status(400, message="bad model"), model=MAIN)
    server.script(ok("ok"), model=BACKUP)
    llm = make_llm(fallback_models=[BACKUP], max_attempts=3)

    stream = await llm.stream(PROMPT)

    assert stream.model == BACKUP
    assert await read_all(stream) == ["ok"]
    assert server.models() == [MAIN, BACKUP]
    assert codes.codes == ["llm_rejected"]


async def test_when_every_model_fails_the_error_names_the_last_failure(
    server: LLMServer, make_llm: Callable[..., OpenAILLM], codes: Codes
) -> None:
    server.always(status(400), model=MAIN)
    server.always(status(503), model=BACKUP)
    llm = make_llm(fallback_models=[BACKUP], max_attempts=2)

    with pytest.raises(LLMError) as caught:
        await llm.stream(PROMPT)

    assert BACKUP in caught.value.message
    assert "503" in caught.value.message
    assert server.models() == [MAIN, BACKUP, BACKUP]
    assert codes.codes == ["llm_rejected", "llm_server_error", "llm_server_error"]


async def test_no_first_token_in_time_is_an_error_and_the_request_is_closed(
    server: LLMServer, make_llm: Callable[..., OpenAILLM], codes: Codes
) -> None:
    server.script(hang_before_first_token())
    llm = make_llm(first_token_timeout=0.5, max_attempts=1)

    with pytest.raises(LLMError) as caught:
        await llm.stream(PROMPT)

    assert "llm_timeout" in caught.value.message
    [seen] = server.requests
    assert seen.model == MAIN
    await server.wait_for(lambda: seen.finished)
    assert seen.client_disconnected  # the abandoned attempt does not linger at the provider
    assert codes.codes == ["llm_timeout"]


async def test_a_connection_dropped_mid_stream_fails_after_the_pieces_sent(
    server: LLMServer, make_llm: Callable[..., OpenAILLM], codes: Codes
) -> None:
    server.script(drop_after(2, "one ", "two ", "three ", "four"))
    llm = make_llm(fallback_models=[BACKUP])

    stream = await llm.stream(PROMPT)
    received: list[str] = []
    with pytest.raises(LLMError):
        await read_into(stream, received)

    assert received == ["one ", "two "]
    assert stream.usage is None
    assert stream.is_closed()
    assert server.models() == [MAIN]  # nothing is retried after the first token
    assert codes.codes == ["llm_connection"]


async def test_a_stream_that_stops_sending_fails_after_request_timeout(
    server: LLMServer, make_llm: Callable[..., OpenAILLM], codes: Codes
) -> None:
    server.script(stall_after(2, "one ", "two ", "three"))
    llm = make_llm(first_token_timeout=5.0, request_timeout=0.5)

    stream = await llm.stream(PROMPT)
    received: list[str] = []
    with pytest.raises(LLMError):
        await read_into(stream, received)

    assert received == ["one ", "two "]
    [seen] = server.requests
    await server.wait_for(lambda: seen.finished)
    assert seen.client_disconnected  # the stalled response was closed, not left open
    assert codes.codes == ["llm_timeout"]


async def test_aclose_closes_the_http_stream_so_the_server_stops_generating(
    server: LLMServer, make_llm: Callable[..., OpenAILLM]
) -> None:
    server.script(slow(*MANY, delay=0.05))
    llm = make_llm()

    stream = await llm.stream(PROMPT)
    received: list[str] = []
    async for piece in stream:
        received.append(piece)
        if len(received) == 3:
            break
    await stream.aclose()
    await stream.aclose()  # idempotent

    [seen] = server.requests
    await server.wait_for(lambda: seen.finished)
    assert received == list(MANY[:3])
    assert seen.client_disconnected
    assert 3 <= seen.pieces_sent < len(MANY)
    assert stream.usage is None


async def test_cancelling_the_consuming_task_closes_the_http_stream(
    server: LLMServer, make_llm: Callable[..., OpenAILLM]
) -> None:
    server.script(slow(*MANY, delay=0.05))
    llm = make_llm()
    stream = await llm.stream(PROMPT)
    three_read = asyncio.Event()
    received: list[str] = []

    async def consume() -> None:
        async for piece in stream:
            received.append(piece)
            if len(received) == 3:
                three_read.set()

    task = asyncio.create_task(consume())
    await three_read.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    [seen] = server.requests
    await server.wait_for(lambda: seen.finished)
    assert seen.client_disconnected
    assert len(received) <= seen.pieces_sent < len(MANY)
    assert stream.is_closed()


async def test_aclose_from_another_task_ends_a_waiting_consumer_quietly(
    server: LLMServer, make_llm: Callable[..., OpenAILLM]
) -> None:
    server.script(slow(*MANY, delay=0.05))
    llm = make_llm()
    stream = await llm.stream(PROMPT)
    first_read = asyncio.Event()
    received: list[str] = []

    async def consume() -> None:
        async for piece in stream:
            received.append(piece)
            first_read.set()

    task = asyncio.create_task(consume())
    await first_read.wait()
    await stream.aclose()  # a "stop" arriving while the consumer waits for the next piece
    await task  # ends without an error

    [seen] = server.requests
    await server.wait_for(lambda: seen.finished)
    assert seen.client_disconnected
    assert seen.pieces_sent < len(MANY)


async def test_complete_with_a_json_schema_asks_for_structured_output(
    server: LLMServer, make_llm: Callable[..., OpenAILLM]
) -> None:
    schema = {
        "type": "object",
        "properties": {"email": {"type": ["string", "null"]}},
        "required": ["email"],
        "additionalProperties": False,
    }
    server.script(json_answer({"email": "ada@example.com"}))
    llm = make_llm()

    completion = await llm.complete(ask("my address is ada@example.com"), json_schema=schema)

    assert json.loads(completion.text) == {"email": "ada@example.com"}
    assert completion.model == MAIN
    assert completion.usage == Usage(prompt_tokens=4, completion_tokens=1)
    [seen] = server.requests
    assert not seen.stream
    assert seen.body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "extraction", "schema": schema, "strict": True},
    }


async def test_complete_retries_and_falls_back_like_stream(
    server: LLMServer, make_llm: Callable[..., OpenAILLM], codes: Codes
) -> None:
    server.always(status(502), model=MAIN)
    server.script(ok("stage_two"), model=BACKUP)
    llm = make_llm(fallback_models=[BACKUP], max_attempts=2)

    completion = await llm.complete(ask("which stage?"))

    assert completion.text == "stage_two"
    assert completion.model == BACKUP
    assert "response_format" not in server.requests[-1].body
    assert server.models() == [MAIN, MAIN, BACKUP]
    assert codes.codes == ["llm_server_error"] * 2


async def test_the_concurrency_limit_is_per_business_and_held_until_the_stream_closes(
    server: LLMServer, make_llm: Callable[..., OpenAILLM]
) -> None:
    server.always(ok("a ", "b"))
    llm = make_llm(max_concurrency_per_business=1)

    first = await llm.stream(ask("first"), business_id="shop-1")
    second_task = asyncio.create_task(llm.stream(ask("second"), business_id="shop-1"))
    # Another business is not blocked: a whole answer goes through while shop-1 is full.
    other = await llm.stream(ask("other"), business_id="shop-2")
    assert await read_all(other) == ["a ", "b"]

    assert not second_task.done()
    assert [r.last_user_message for r in server.requests] == ["first", "other"]

    await first.aclose()
    second = await second_task
    assert await read_all(second) == ["a ", "b"]
    assert [r.last_user_message for r in server.requests] == ["first", "other", "second"]

    # A stream read to its end gives its slot back too.
    third = await llm.stream(ask("third"), business_id="shop-1")
    await third.aclose()


def chunk(text: str) -> str:
    """One content chunk as a provider sends it, ending with its empty line."""
    payload = {
        "id": "c",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": text}}],
    }
    return f"data: {json.dumps(payload)}\n\n"


USAGE = 'data: {"id": "c", "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}}\n\n'
DONE = "data: [DONE]\n\n"


async def test_lines_split_across_network_reads_are_put_back_together(
    server: LLMServer, make_llm: Callable[..., OpenAILLM]
) -> None:
    body = chunk("Hel") + chunk("lo") + USAGE + DONE
    cut = [0, 7, 40, len(chunk("Hel")) + 3, len(body) - 5, len(body)]
    server.script(raw_sse(*(body[a:b] for a, b in itertools.pairwise(cut)), delay=0.05))
    llm = make_llm()

    stream = await llm.stream(PROMPT)

    assert await read_all(stream) == ["Hel", "lo"]
    assert stream.usage == Usage(prompt_tokens=9, completion_tokens=2)
    [seen] = server.requests
    assert seen.pieces_sent == len(cut) - 1  # the body really went out in that many writes


async def test_multi_line_data_comments_and_crlf_are_read_as_the_standard_says(
    server: LLMServer, make_llm: Callable[..., OpenAILLM]
) -> None:
    server.script(
        raw_sse(
            ": connected\r\n\r\n",
            'data: {"choices": [{"index": 0,\r\ndata:  "delta": {"content": "multi"}}]}\r\n\r\n',
            ": keep-alive\n\n",
            "event: message\nid: 2\n" + chunk(" line"),
            USAGE + DONE,
        )
    )
    llm = make_llm()

    stream = await llm.stream(PROMPT)

    assert await read_all(stream) == ["multi", " line"]
    assert stream.usage == Usage(prompt_tokens=9, completion_tokens=2)


async def test_a_stream_that_ends_without_done_ends_normally(
    server: LLMServer, make_llm: Callable[..., OpenAILLM], codes: Codes
) -> None:
    server.script(raw_sse(chunk("no "), chunk("done"), USAGE))
    llm = make_llm()

    stream = await llm.stream(PROMPT)

    assert await read_all(stream) == ["no ", "done"]
    assert stream.usage == Usage(prompt_tokens=9, completion_tokens=2)
    assert codes.codes == []


async def test_a_malformed_chunk_after_the_first_token_fails_the_stream_naming_it(
    server: LLMServer, make_llm: Callable[..., OpenAILLM], codes: Codes
) -> None:
    server.script(
        raw_sse(chunk("fine "), 'data: {"choices": [{"delta": {"content": 42}}]}\n\n', chunk("never"))
    )
    llm = make_llm(fallback_models=[BACKUP])

    stream = await llm.stream(PROMPT)
    received: list[str] = []
    with pytest.raises(LLMError) as caught:
        await read_into(stream, received)

    assert received == ["fine "]
    assert "malformed stream" in caught.value.message
    assert "content is not a string" in caught.value.message
    assert "llm_bad_response" in caught.value.message
    assert server.models() == [MAIN]  # nothing is retried after the first token
    assert codes.codes == ["llm_bad_response"]


async def test_a_stream_that_is_not_json_before_its_first_token_is_retried_then_falls_back(
    server: LLMServer, make_llm: Callable[..., OpenAILLM], codes: Codes
) -> None:
    server.always(raw_sse("data: <html>Bad gateway</html>\n\n"), model=MAIN)
    server.script(ok("from the backup"), model=BACKUP)
    llm = make_llm(fallback_models=[BACKUP], max_attempts=2)

    stream = await llm.stream(PROMPT)

    assert stream.model == BACKUP
    assert await read_all(stream) == ["from the backup"]
    assert server.models() == [MAIN, MAIN, BACKUP]
    assert codes.codes == ["llm_bad_response"] * 2


async def test_an_error_event_mid_stream_fails_it_with_the_providers_message(
    server: LLMServer, make_llm: Callable[..., OpenAILLM], codes: Codes
) -> None:
    error = (
        'event: error\ndata: {"error": {"message": "the model is overloaded", "type": "server_error"}}\n\n'
    )
    server.script(raw_sse(chunk("half "), error))
    llm = make_llm()

    stream = await llm.stream(PROMPT)
    received: list[str] = []
    with pytest.raises(LLMError) as caught:
        await read_into(stream, received)

    assert received == ["half "]
    assert "the model is overloaded" in caught.value.message
    assert codes.codes == ["llm_server_error"]


async def test_an_error_chunk_before_the_first_token_is_retried(
    server: LLMServer, make_llm: Callable[..., OpenAILLM], codes: Codes
) -> None:
    server.script(raw_sse('data: {"error": {"message": "try again"}}\n\n'), ok("second time"))
    llm = make_llm(max_attempts=2)

    stream = await llm.stream(PROMPT)

    assert await read_all(stream) == ["second time"]
    assert server.models() == [MAIN, MAIN]
    assert codes.codes == ["llm_server_error"]


async def test_keep_alives_alone_after_the_first_token_time_out_and_close_the_request(
    server: LLMServer, make_llm: Callable[..., OpenAILLM], codes: Codes
) -> None:
    server.script(raw_sse(chunk("one "), keepalive_every=0.1))
    llm = make_llm(request_timeout=0.6)

    stream = await llm.stream(PROMPT)
    received: list[str] = []
    with pytest.raises(LLMError) as caught:
        await read_into(stream, received)

    assert received == ["one "]
    assert "llm_timeout" in caught.value.message
    [seen] = server.requests
    await server.wait_for(lambda: seen.finished)
    assert seen.client_disconnected
    assert codes.codes == ["llm_timeout"]


def test_openai_llm_is_an_llm_provider() -> None:
    provider: LLMProvider = OpenAILLM(api_key="k", base_url=None, model="m")  # checked by mypy
    assert provider.name == "openai"


@pytest.mark.parametrize(
    "overrides",
    [
        {"api_key": ""},
        {"model": ""},
        {"fallback_models": "gpt"},
        {"fallback_models": ["ok", ""]},
        {"max_attempts": 0},
        {"backoff_base": -1.0},
        {"backoff_cap": 0.1, "backoff_base": 1.0},
        {"first_token_timeout": 0.0},
        {"request_timeout": -1.0},
        {"max_concurrency_per_business": 0},
        {"requests_per_minute_per_business": 0},
        {"base_url": "ftp://example.com"},
        {"transport": "requests"},
    ],
)
def test_bad_settings_are_refused_at_once(overrides: dict[str, Any]) -> None:
    options: dict[str, Any] = {"api_key": "k", "base_url": None, "model": "m", **overrides}
    with pytest.raises(ValueError):  # noqa: PT011
        OpenAILLM(**options)
