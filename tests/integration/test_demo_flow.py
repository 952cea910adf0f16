"""The demo flow walked over a real socket on PostgreSQL: greeting -> contact -> questions -> human
-> questions, with the stage events users see and the data the pipeline stored."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.e2e.client import Client, new_widget
from tests.servers import GatewayProcess, start_gateway


@pytest.fixture
def pg_gateway(database_url: str, tmp_path: Path) -> Iterator[GatewayProcess]:
    gw = start_gateway(tmp_path, {"DATABASE_URL": database_url, "CHATGW_SCRIPTED_TOKENS": "6"})
    yield gw
    gw.stop()


async def turn(client: Client, n: int, text: str) -> list[dict[str, Any]]:
    await client.send({"type": "message", "client_msg_id": f"t-{n}", "text": text})
    return await client.until_ai_end()


def stages(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f for f in frames if f["type"] == "stage"]


async def test_the_demo_flow_moves_through_its_stages_and_extracts_the_email(
    pg_gateway: GatewayProcess, database_url: str
) -> None:
    widget = new_widget(pg_gateway)
    client = await Client.open(pg_gateway)
    welcome = await client.hello(widget)
    assert welcome["stage"] == "greeting"

    assert stages(await turn(client, 1, "Hello there")) == []  # answered in the greeting stage
    second = stages(await turn(client, 2, "I have a question about my order"))
    assert [s["stage"] for s in second] == ["contact"]
    assert "data" not in second[0]  # extracted data goes to agents only

    third_frames = await turn(client, 3, "Sure, write me at Ann@Example.com")
    assert [s["stage"] for s in stages(third_frames)] == ["questions"]  # has(data.email) now holds
    email_message = next(f for f in third_frames if f["type"] == "message" and f["role"] == "user")

    human = stages(await turn(client, 4, "Can I talk to a human?"))
    assert [s["stage"] for s in human] == ["human"]  # picked by the model among the allowed stages
    back = stages(await turn(client, 5, "Thanks, later maybe"))
    assert [s["stage"] for s in back] == ["questions"]
    await client.close()

    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(
            "SELECT current_stage, extracted_data, turns, turns_in_stage FROM conversations"
            " WHERE conversation_id = $1",
            widget.conversation_id,
        )
    finally:
        await conn.close()
    assert row is not None
    assert row["current_stage"] == "questions"
    assert (row["turns"], row["turns_in_stage"]) == (5, 1)
    data = json.loads(row["extracted_data"])
    assert data["email"] == {
        "value": "Ann@example.com",  # the domain is normalised, the local part kept as typed
        "extractor": "pattern:00000000-0000-4000-8000-0000000d0031",
        "source_message_id": email_message["message_id"],
    }
    assert "name" not in data  # the scripted model extracts nothing: the LLM rule found no name
