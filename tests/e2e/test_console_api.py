"""What the agent console reads over HTTP with an agent token (its business's flow and agents), and
the one-click demo agent of the embedded default, against real gateway processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.agents import AgentClient, new_agent
from tests.e2e.client import new_widget
from tests.e2e.test_agents_api import error
from tests.servers import DEMO_API_KEY, GatewayProcess, start_gateway
from tests.tenant_gateway import OTHER_API_KEY


def get(gw: GatewayProcess, path: str, credential: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {credential}"} if credential is not None else {}
    return httpx.get(f"{gw.http}{path}", headers=headers, timeout=15)


def flow_of(gw: GatewayProcess, token: str) -> dict[str, Any]:
    r = get(gw, "/v1/agents/me/flow", token)
    assert r.status_code == 200, r.text
    flow: dict[str, Any] = r.json()
    return flow


OTHER_FLOW = {
    "stages": [
        {"name": "intake", "description": "Hear the request", "is_entry": True},
        {"name": "billing", "description": "Invoices and refunds"},
    ],
    "transitions": [{"from": "intake", "to": "billing", "condition": 'message.contains("invoice")'}],
    "templates": [],
    "rules": [],
}


def put_other_flow(gw: GatewayProcess) -> None:
    """Give the second business a flow of its own (the same one every time: the test may run twice)."""
    headers = {"Authorization": f"Bearer {OTHER_API_KEY}"}
    current = httpx.get(f"{gw.http}/v1/admin/flow", headers=headers, timeout=15).json()
    r = httpx.put(
        f"{gw.http}/v1/admin/flow",
        json={**OTHER_FLOW, "version": current["version"]},
        headers=headers,
        timeout=15,
    )
    assert r.status_code == 200, r.text


def test_an_agent_reads_its_own_business_flow_and_only_that(tenant_gateway: GatewayProcess) -> None:
    """Each business's agent gets its business's stages, transitions with their conditions and
    extraction fields, and nothing of the other business's flow; the prompts are not in it."""
    gw = tenant_gateway
    put_other_flow(gw)
    ours, theirs = new_agent(gw), new_agent(gw, OTHER_API_KEY)

    demo = flow_of(gw, ours.token)
    assert [s["name"] for s in demo["stages"]] == ["greeting", "contact", "questions", "human"]
    assert [s["name"] for s in demo["stages"] if s["is_entry"]] == ["greeting"]
    edges = {(t["from"], t["to"]): t["condition"] for t in demo["transitions"]}
    assert edges[("contact", "questions")] == "has(data.email)"
    assert edges[("human", "questions")] is None
    assert {(r["field"], r["kind"]) for r in demo["rules"]} == {
        ("email", "pattern"),
        ("phone", "pattern"),
        ("name", "llm"),
    }
    assert "templates" not in demo
    assert "friendly assistant" not in get(gw, "/v1/agents/me/flow", ours.token).text

    other = flow_of(gw, theirs.token)
    assert [s["name"] for s in other["stages"]] == ["intake", "billing"]
    assert [(t["from"], t["to"], t["condition"]) for t in other["transitions"]] == [
        ("intake", "billing", 'message.contains("invoice")')
    ]
    assert other["rules"] == []
    names = {s["name"] for s in demo["stages"]} & {s["name"] for s in other["stages"]}
    assert names == set()


def test_the_agent_endpoints_need_an_enabled_agent_token(tenant_gateway: GatewayProcess) -> None:
    gw = tenant_gateway
    agent = new_agent(gw)
    widget = new_widget(gw)
    for path in ("/v1/agents/me/flow", "/v1/agents/me/team"):
        error(get(gw, path, None), 401, "unauthorized", "Authorization")
        error(get(gw, path, DEMO_API_KEY), 401, "unauthorized", "agent token", "/v1/admin/flow")
        error(get(gw, path, agent.token + "x"), 401, "unauthorized", "invalid token")
        error(get(gw, path, widget.token), 403, "forbidden", "agent token")
    r = httpx.patch(
        f"{gw.http}/v1/agents/{agent.agent_id}",
        json={"disabled": True},
        headers={"Authorization": f"Bearer {DEMO_API_KEY}"},
        timeout=15,
    )
    assert r.status_code == 200, r.text
    error(get(gw, "/v1/agents/me/flow", agent.token), 403, "forbidden", "disabled")


def test_an_agent_sees_the_names_of_its_own_colleagues(tenant_gateway: GatewayProcess) -> None:
    gw = tenant_gateway
    ours = new_agent(gw, name="Ana from the roastery")
    theirs = new_agent(gw, OTHER_API_KEY, name="Someone elsewhere")
    r = get(gw, "/v1/agents/me/team", ours.token)
    assert r.status_code == 200, r.text
    team = {a["agent_id"]: a for a in r.json()["agents"]}
    assert team[ours.agent_id] == {
        "agent_id": ours.agent_id,
        "name": "Ana from the roastery",
        "disabled": False,
    }
    assert theirs.agent_id not in team
    assert "Someone elsewhere" not in r.text


async def test_the_demo_agent_exists_only_on_the_embedded_default(
    gateway: GatewayProcess, backend_env: dict[str, str]
) -> None:
    """On the memory store: one "Demo agent" of the demo business, reused, whose token opens an
    agent socket. With PostgreSQL: no such endpoint (404, saying to use the admin key)."""
    if "DATABASE_URL" in backend_env:
        error(get(gateway, "/v1/demo/agent", None), 404, "not_found", "admin key")
        r = httpx.post(f"{gateway.http}/v1/demo/agent", timeout=15)
        error(r, 404, "not_found", "admin key")
        return
    described = get(gateway, "/v1/demo/agent", None)
    assert described.status_code == 200, described.text
    assert described.json() == {"business": "demo", "name": "Demo agent"}
    first = httpx.post(f"{gateway.http}/v1/demo/agent", timeout=15)
    second = httpx.post(f"{gateway.http}/v1/demo/agent", timeout=15)
    assert first.status_code == second.status_code == 201, (first.text, second.text)
    assert first.json()["agent_id"] == second.json()["agent_id"]
    assert first.json()["business"] == "demo"
    console = await AgentClient.open(gateway)
    await console.send({"type": "hello", "token": second.json()["token"]})
    welcome = await console.recv_type("welcome")
    assert (welcome["agent_name"], welcome["business"]) == ("Demo agent", "demo")
    await console.close()
    audit = httpx.get(
        f"{gateway.http}/v1/audit",
        params={"action": "agent.create"},
        headers={"Authorization": f"Bearer {DEMO_API_KEY}"},
        timeout=15,
    ).json()["entries"]
    made = [e for e in audit if e["data"].get("via") == "demo"]
    assert [(e["actor_type"], e["data"]["name"]) for e in made] == [("system", "Demo agent")]


StartGateway = Callable[..., GatewayProcess]


@pytest.fixture
def own_gateway(tmp_path: Path) -> Iterator[StartGateway]:
    """Gateways of the test's own on the embedded default, with extra environment."""
    started: list[GatewayProcess] = []

    def start(env: dict[str, str] | None = None) -> GatewayProcess:
        gw = start_gateway(tmp_path, env)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


def test_the_demo_agent_can_be_switched_off_and_disabled(own_gateway: StartGateway) -> None:
    """CHATGW_DEMO_AGENT=off removes it; an admin who disables the demo agent keeps it disabled."""
    off = own_gateway({"CHATGW_DEMO_AGENT": "off"})
    error(httpx.post(f"{off.http}/v1/demo/agent", timeout=15), 404, "not_found", "CHATGW_DEMO_AGENT")

    on = own_gateway()
    made = httpx.post(f"{on.http}/v1/demo/agent", timeout=15)
    assert made.status_code == 201, made.text
    r = httpx.patch(
        f"{on.http}/v1/agents/{made.json()['agent_id']}",
        json={"disabled": True},
        headers={"Authorization": f"Bearer {DEMO_API_KEY}"},
        timeout=15,
    )
    assert r.status_code == 200, r.text
    error(httpx.post(f"{on.http}/v1/demo/agent", timeout=15), 409, "conflict", "disabled")
