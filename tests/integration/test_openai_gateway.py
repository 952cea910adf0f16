"""A gateway process whose model is an OpenAI-compatible endpoint: the real `openai` client, in
the real gateway, against the test's own streaming server. The answer streams to the socket, its
token usage is stored, a provider failure mid-answer ends it `failed` with a notice to the user,
and a user's stop closes the HTTP stream to the provider."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from core.conversation import FAILED_NOTICE
from tests.e2e.agents import AgentClient, new_agent
from tests.e2e.client import Client, joined_deltas, new_widget
from tests.llm_server import LLMServer, drop_after, ok, slow
from tests.servers import GatewayProcess, start_gateway


@pytest.fixture
def llm_server() -> Iterator[LLMServer]:
    with LLMServer() as server:
        yield server


@pytest.fixture
def openai_gateway(llm_server: LLMServer, database_url: str, tmp_path: Path) -> Iterator[GatewayProcess]:
    gw = start_gateway(
        tmp_path,
        {
            "DATABASE_URL": database_url,
            "OPENAI_API_KEY": "test-key",
            "OPENAI_BASE_URL": llm_server.base_url,
            "LLM_MODEL": "main-model",
        },
    )
    yield gw
    gw.stop()


async def test_an_answer_streams_from_the_provider_and_its_usage_is_stored(
    openai_gateway: GatewayProcess, llm_server: LLMServer, database_url: str
) -> None:
    llm_server.script(ok("Our beans ", "ship in ", "two days."))
    widget = new_widget(openai_gateway)
    client = await Client.open(openai_gateway)
    await client.hello(widget)
    await client.send({"type": "message", "client_msg_id": "o-1", "text": "When do you ship?"})
    frames = await client.until_ai_end()
    end = frames[-1]
    assert end["status"] == "complete"
    assert end["text"] == "Our beans ship in two days."
    assert joined_deltas(frames, end["response_id"]) == end["text"]
    request = llm_server.requests[-1]
    assert request.model == "main-model"
    assert request.last_user_message == "When do you ship?"
    assert request.messages[0]["role"] == "system"
    await client.close()
    conn = await asyncpg.connect(database_url)
    try:
        usage = await conn.fetchrow(
            "SELECT prompt_tokens, completion_tokens FROM messages WHERE message_id = $1", end["message_id"]
        )
    finally:
        await conn.close()
    assert usage is not None
    assert usage["prompt_tokens"] > 0
    assert usage["completion_tokens"] > 0


async def test_nul_characters_from_the_model_are_dropped_before_anyone_sees_them(
    openai_gateway: GatewayProcess, llm_server: LLMServer, database_url: str
) -> None:
    """PostgreSQL cannot store NUL: the model's NULs are dropped from the pieces, so what streams
    is what is stored, and the answer completes."""
    llm_server.script(ok("Nul\x00 here", "\x00", " and\x00 there."))
    widget = new_widget(openai_gateway)
    client = await Client.open(openai_gateway)
    await client.hello(widget)
    await client.send({"type": "message", "client_msg_id": "n-1", "text": "Say something odd"})
    frames = await client.until_ai_end()
    end = frames[-1]
    assert (end["status"], end["text"]) == ("complete", "Nul here and there.")
    assert joined_deltas(frames, end["response_id"]) == end["text"]
    await client.close()
    conn = await asyncpg.connect(database_url)
    try:
        stored = await conn.fetchval(
            "SELECT text FROM messages WHERE response_id = $1 AND status = 'complete'", end["response_id"]
        )
    finally:
        await conn.close()
    assert stored == "Nul here and there."


async def test_a_provider_failing_mid_answer_ends_it_failed_and_tells_the_user(
    openai_gateway: GatewayProcess, llm_server: LLMServer
) -> None:
    llm_server.script(drop_after(2, "Half ", "an ", "answer"))
    widget = new_widget(openai_gateway)
    client = await Client.open(openai_gateway)
    await client.hello(widget)
    await client.send({"type": "message", "client_msg_id": "o-2", "text": "Tell me everything"})
    end = (await client.until_ai_end())[-1]
    assert end["status"] == "failed"
    assert end["text"] == "Half an "
    notice = await client.recv_type("message")
    assert (notice["role"], notice["text"]) == ("system", FAILED_NOTICE)
    await client.close()


async def test_a_stop_closes_the_http_stream_to_the_provider(
    openai_gateway: GatewayProcess, llm_server: LLMServer
) -> None:
    llm_server.script(slow(*[f"word{n} " for n in range(200)], delay=0.05))
    widget = new_widget(openai_gateway)
    client = await Client.open(openai_gateway)
    await client.hello(widget)
    await client.send({"type": "message", "client_msg_id": "o-3", "text": "Talk for a long time"})
    await client.recv_type("delta")
    await client.send({"type": "stop"})
    end = (await client.until_ai_end())[-1]
    assert end["status"] == "stopped"
    await llm_server.wait_for(lambda: llm_server.requests[-1].finished)
    seen = llm_server.requests[-1]
    assert seen.client_disconnected  # the provider saw the gateway hang up...
    assert seen.pieces_sent < 200  # ...and stopped generating
    await client.close()


async def test_after_a_handback_the_model_hears_what_the_agent_said(
    openai_gateway: GatewayProcess, llm_server: LLMServer
) -> None:
    """A handback with the user waiting answers at once; the model's prompt holds the agent's
    words as the assistant's side of the conversation, then the user's waiting message."""
    llm_server.always(ok("Sure, ", "happy to help."))
    widget = new_widget(openai_gateway)
    user = await Client.open(openai_gateway)
    await user.hello(widget)
    agent = new_agent(openai_gateway)
    console = await AgentClient.open(openai_gateway)
    await console.agent_hello(agent)
    cid = widget.conversation_id
    await console.act("takeover", cid)
    await user.recv_type("mode")
    await user.send({"type": "message", "client_msg_id": "h-1", "text": "Do you ship to Norway?"})
    await user.recv_type("ack")
    await console.send(
        {"type": "message", "conversation_id": cid, "client_msg_id": "a-1", "text": "Yes, within three days."}
    )
    while (await user.recv_type("message"))["role"] != "agent":
        pass  # the user's own message may come before or after its ack
    await user.send({"type": "message", "client_msg_id": "h-2", "text": "And to Sweden?"})
    await user.recv_type("ack")
    assert not [r for r in llm_server.requests if r.stream]  # nothing asked of the model while human
    await console.act("handback", cid)
    end = (await user.until_ai_end())[-1]
    assert (end["status"], end["text"]) == ("complete", "Sure, happy to help.")
    prompt = next(r for r in reversed(llm_server.requests) if r.stream).messages
    said = [(m["role"], m["content"]) for m in prompt]
    assert ("assistant", "Yes, within three days.") in said
    assert said.index(("assistant", "Yes, within three days.")) < len(said) - 1
    assert said[-1][0] == "user"
    assert "And to Sweden?" in said[-1][1]
    await user.close()
    await console.close()
