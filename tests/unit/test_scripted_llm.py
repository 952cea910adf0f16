"""ScriptedLLM: deterministic, sized by its settings, and stoppable mid-stream."""

from __future__ import annotations

import asyncio

import pytest

from core.llm import ChatMessage
from core.scripted_llm import ScriptedLLM, scripted_reply


async def collect(llm: ScriptedLLM, text: str) -> list[str]:
    stream = await llm.stream([ChatMessage("system", "s"), ChatMessage("user", text)])
    return [piece async for piece in stream]


async def test_the_same_prompt_gives_the_same_answer() -> None:
    llm = ScriptedLLM(tokens_per_second=0, tokens=12)
    first, second = await collect(llm, "hello there"), await collect(llm, "hello there")
    assert first == second
    assert len(first) == 12
    assert "".join(first).startswith("You said: hello there.")
    assert first == scripted_reply([ChatMessage("user", "hello there")], 12)


async def test_aclose_stops_the_stream() -> None:
    llm = ScriptedLLM(tokens_per_second=200, tokens=1000)
    stream = await llm.stream([ChatMessage("user", "x")])
    got = []
    async for piece in stream:
        got.append(piece)
        if len(got) == 3:
            await stream.aclose()
    assert len(got) == 3
    assert stream.usage is None


async def test_cancelling_the_consumer_ends_generation_promptly() -> None:
    llm = ScriptedLLM(tokens_per_second=100, tokens=10_000)

    async def consume() -> None:
        stream = await llm.stream([ChatMessage("user", "x")])
        async for _ in stream:
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_usage_is_reported_at_the_end() -> None:
    llm = ScriptedLLM(tokens_per_second=0, tokens=5)
    stream = await llm.stream([ChatMessage("user", "one two")])
    assert [p async for p in stream]
    assert stream.usage is not None
    assert stream.usage.completion_tokens == 5
    assert stream.usage.prompt_tokens == 2


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="tokens_per_second"):
        ScriptedLLM(tokens_per_second=-1)
    with pytest.raises(ValueError, match="tokens"):
        ScriptedLLM(tokens=0)


async def test_complete_picks_the_option_the_prompt_names() -> None:
    """Stage selection with the scripted model: the option named before the Options line, else the first."""
    llm = ScriptedLLM(tokens_per_second=0, tokens=5)
    named = await llm.complete([ChatMessage("user", "I want a human please\n\nOptions: questions, human")])
    assert named.text == "human"
    unnamed = await llm.complete([ChatMessage("user", "thanks\n\nOptions: questions, human")])
    assert unnamed.text == "questions"
    extracted = await llm.complete(
        [ChatMessage("user", "x")], json_schema={"type": "object", "properties": {"name": {}, "city": {}}}
    )
    assert extracted.text == '{"name": null, "city": null}'
