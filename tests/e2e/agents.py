"""Helpers for the agent side of the protocol: agents made over the HTTP API, agent sockets."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import httpx

from tests.e2e.client import Client
from tests.servers import DEMO_API_KEY, GatewayProcess


@dataclass
class AgentCredentials:
    agent_id: str
    token: str


def new_agent(gw: GatewayProcess, api_key: str = DEMO_API_KEY, name: str | None = None) -> AgentCredentials:
    """Create an agent of the key's business and give it a token."""
    headers = {"Authorization": f"Bearer {api_key}"}
    r = httpx.post(
        f"{gw.http}/v1/agents",
        json={"name": name or f"agent-{uuid.uuid4().hex[:6]}"},
        headers=headers,
        timeout=10,
    )
    assert r.status_code == 201, r.text
    agent_id = r.json()["agent_id"]
    r = httpx.post(f"{gw.http}/v1/agents/{agent_id}/tokens", headers=headers, timeout=10)
    assert r.status_code in (200, 201), r.text
    return AgentCredentials(agent_id, r.json()["token"])


class AgentClient(Client):
    """An agent's socket: hello gives welcome then snapshot; frames of conversations carry
    `conversation_id`."""

    async def agent_hello(self, agent: AgentCredentials) -> tuple[dict[str, Any], dict[str, Any]]:
        await self.send({"type": "hello", "token": agent.token})
        welcome = await self.recv()
        assert welcome["type"] == "welcome", welcome
        snapshot = await self.recv_type("snapshot")
        return welcome, snapshot

    async def subscribe(self, conversation_id: str, **extra: Any) -> dict[str, Any]:
        await self.send({"type": "subscribe", "conversation_id": conversation_id, **extra})
        return await self.recv_type("subscribed", "error")

    async def act(self, kind: str, conversation_id: str) -> None:
        await self.send({"type": kind, "conversation_id": conversation_id})

    def of(self, conversation_id: str) -> list[dict[str, Any]]:
        """The frames received for one conversation through a subscription (not the feed)."""
        return [f for f in self.frames if f.get("conversation_id") == conversation_id and f["type"] != "feed"]
