"""Tenant isolation on the agent socket: an agent of another business can neither see, follow, take
over, write to, type into nor hand back a conversation of the demo business, nor learn whether it
exists; its snapshot and feed carry nothing of it."""

from __future__ import annotations

import asyncio
import uuid

from tests.e2e.agents import AgentClient, new_agent
from tests.e2e.client import Client, new_widget
from tests.servers import GatewayProcess
from tests.tenant_gateway import OTHER_API_KEY


async def test_an_agent_of_another_business_gets_nothing(tenant_gateway: GatewayProcess) -> None:
    gw = tenant_gateway
    widget = new_widget(gw)  # a demo conversation, with an answer streaming
    user = await Client.open(gw)
    await user.hello(widget)
    outsider = await AgentClient.open(gw)
    _, snapshot = await outsider.agent_hello(new_agent(gw, OTHER_API_KEY))
    assert widget.conversation_id not in {c["conversation_id"] for c in snapshot["conversations"]}
    await user.ask_and_read(uuid.uuid4().hex, "a private question", deltas=1)

    cid = widget.conversation_id
    missing = str(uuid.uuid4())
    answers: dict[str, list[tuple[str, str]]] = {}
    for target in (cid, missing):
        for frame in (
            {"type": "subscribe", "conversation_id": target},
            {"type": "takeover", "conversation_id": target},
            {"type": "handback", "conversation_id": target},
            {"type": "message", "conversation_id": target, "client_msg_id": "x", "text": "hi"},
            {"type": "typing", "conversation_id": target, "state": True},
        ):
            await outsider.send(frame)
            error = await outsider.recv_type("error")
            answers.setdefault(target, []).append((error["code"], error["message"].replace(target, "<id>")))
    # Exactly the answers a conversation that does not exist gets: nothing tells them apart.
    assert answers[cid] == answers[missing]
    assert {code for code, _ in answers[cid]} == {"not_found"}

    # The user's conversation went on untouched: no mode change, no typing, the answer still ours.
    frames = await user.until_ai_end()
    assert frames[-1]["status"] == "complete"
    assert not [f for f in user.frames if f["type"] in ("mode", "typing")]
    # Nothing of the demo business reached the outsider's feed.
    await asyncio.sleep(0.2)
    assert not [f for f in outsider.frames if f.get("conversation_id") == cid and f["type"] != "error"]
    await user.close()
    await outsider.close()
