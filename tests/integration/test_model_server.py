"""`chatgw model-server` on its own, through the real `openai` client: streamed answers of the
configured length whose every token carries its send time, whole answers for the gateway's
structured and stage-selection calls, and a stream the client closes counted as a disconnect."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from gateway.devtools.marker import markers
from tests.loadtest_support import ModelServerProcess, start_model_server

TOKEN = re.compile(r" ⟦[0-9]{16}⟧")


@pytest.fixture
def model(tmp_path: Path) -> Iterator[ModelServerProcess]:
    server = start_model_server(tmp_path, "--ttft-ms", "20", "--tokens", "8", "--tokens-per-second", "400")
    yield server
    server.stop()


def client(model: ModelServerProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key="any", base_url=model.base_url, max_retries=0)


async def test_a_stream_has_the_configured_tokens_each_with_its_send_time(model: ModelServerProcess) -> None:
    before_us = time.time_ns() // 1000
    async with client(model) as llm:
        stream = await llm.chat.completions.create(
            model="any-model",
            messages=[{"role": "user", "content": "hello"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces: list[str] = []
        usage = None
        finish = None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.choices:
                finish = chunk.choices[0].finish_reason or finish
                if chunk.choices[0].delta.content:
                    pieces.append(chunk.choices[0].delta.content)
    after_us = time.time_ns() // 1000
    assert len(pieces) == 8
    assert all(TOKEN.fullmatch(p) for p in pieces), pieces
    stamps = markers("".join(pieces))
    assert stamps == sorted(stamps)
    assert before_us <= stamps[0]
    assert stamps[-1] <= after_us
    assert finish == "stop"
    assert usage is not None
    assert usage.completion_tokens == 8
    stats = model.stats()
    assert (stats["requests"], stats["streams"], stats["streams_completed"]) == (1, 1, 1)
    assert (stats["tokens_sent"], stats["disconnects"], stats["active_streams"]) == (8, 0, 0)
    assert stats["config"] == {"ttft_ms": 20.0, "tokens_per_second": 400.0, "tokens": 8, "jitter_ms": 0.0}
    assert stats["cpu_seconds"] > 0


async def test_whole_answers_serve_structured_output_and_stage_choices(model: ModelServerProcess) -> None:
    async with client(model) as llm:
        structured = await llm.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "extract"}],
            response_format={
                "type": "json_schema",
                "json_schema": {
                    "name": "x",
                    "schema": {"type": "object", "properties": {"name": {}, "age": {}}},
                },
            },
        )
        choice = await llm.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Which stage?\nOptions: questions, human"}]
        )
        plain = await llm.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert structured.choices[0].message.content == '{"name":null,"age":null}'
    assert choice.choices[0].message.content == "questions"
    assert len(markers(plain.choices[0].message.content or "")) == 8
    stats = model.stats()
    assert (stats["requests"], stats["completions"], stats["streams"]) == (3, 3, 0)


async def test_a_stream_closed_by_the_client_counts_as_a_disconnect(tmp_path: Path) -> None:
    server = start_model_server(tmp_path, "--ttft-ms", "0", "--tokens", "200", "--tokens-per-second", "50")
    try:
        async with client(server) as llm:
            stream = await llm.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "a long one"}], stream=True
            )
            got = 0
            async for chunk in stream:
                got += 1 if chunk.choices and chunk.choices[0].delta.content else 0
                if got == 2:
                    break
            await stream.close()
        stats = server.wait_stats(lambda s: s["disconnects"] == 1)
        assert stats["streams_completed"] == 0
        assert stats["active_streams"] == 0
        assert 2 <= stats["tokens_sent"] < 200
    finally:
        server.stop()


def test_bad_requests_get_an_openai_style_error(model: ModelServerProcess) -> None:
    r = httpx.post(f"{model.base_url}/chat/completions", content=b"not json")
    assert r.status_code == 400
    assert "messages" in r.json()["error"]["message"]
    assert httpx.get(f"{model.url}/nowhere").status_code == 404
    assert httpx.get(f"{model.base_url}/models").json()["data"][0]["id"] == "chatgw-model-server"
    assert model.stats()["bad_requests"] == 1


def test_bad_options_are_refused_without_a_traceback(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="answer length must be between 1 and 100000") as failure:
        start_model_server(tmp_path, "--tokens", "0")
    assert "Traceback" not in str(failure.value)
