"""Agents, their tokens and the audit API over HTTP against a real gateway process serving two
businesses (the demo one and another), on each backend: the admin key manages its own agents
only, disabling an agent stops its tokens, agents and admins read histories of their own business
only, and the audit log filters and pages.

The gateway is shared by the session: each test makes agents of its own, with names of their own.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest

from gateway.demo import DEMO_BUSINESS
from tests.e2e.client import Client, Widget, new_widget, stored_history
from tests.servers import DEMO_API_KEY, TEST_SECRET, GatewayProcess
from tests.tenant_gateway import OTHER_API_KEY


class Admin:
    """An HTTP client of the gateway with one business's admin API key."""

    def __init__(self, gw: GatewayProcess, key: str) -> None:
        self.http = httpx.Client(base_url=gw.http, headers={"Authorization": f"Bearer {key}"}, timeout=15)

    def new_agent(self, prefix: str = "agent") -> dict[str, Any]:
        r = self.http.post("/v1/agents", json={"name": unique(prefix)})
        assert r.status_code == 201, r.text
        agent: dict[str, Any] = r.json()
        return agent

    def token(self, agent_id: str) -> str:
        r = self.http.post(f"/v1/agents/{agent_id}/tokens")
        assert r.status_code == 201, r.text
        token: str = r.json()["token"]
        return token

    def disable(self, agent_id: str, disabled: bool = True) -> dict[str, Any]:
        r = self.http.patch(f"/v1/agents/{agent_id}", json={"disabled": disabled})
        assert r.status_code == 200, r.text
        agent: dict[str, Any] = r.json()
        return agent

    def audit(self, **params: Any) -> dict[str, Any]:
        r = self.http.get("/v1/audit", params=params)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def error(r: httpx.Response, status: int, code: str, *words: str) -> dict[str, Any]:
    """The response is that error, and its message says each of `words`."""
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()["error"]
    assert body["code"] == code, body
    for word in words:
        assert word in body["message"], body
    return body


def history(gw: GatewayProcess, conversation_id: str, credential: str) -> httpx.Response:
    return httpx.get(
        f"{gw.http}/v1/conversations/{conversation_id}/messages",
        headers={"Authorization": f"Bearer {credential}"},
        timeout=15,
    )


@pytest.fixture
def demo(tenant_gateway: GatewayProcess) -> Iterator[Admin]:
    admin = Admin(tenant_gateway, DEMO_API_KEY)
    yield admin
    admin.http.close()


@pytest.fixture
def other(tenant_gateway: GatewayProcess) -> Iterator[Admin]:
    admin = Admin(tenant_gateway, OTHER_API_KEY)
    yield admin
    admin.http.close()


@pytest.fixture
async def answered(tenant_gateway: GatewayProcess) -> tuple[Widget, list[dict[str, Any]]]:
    """A demo conversation with one question and its answer stored, and its history."""
    widget = new_widget(tenant_gateway)
    client = await Client.open(tenant_gateway)
    await client.hello(widget)
    await client.send({"type": "message", "client_msg_id": "q-1", "text": "Where is my order?"})
    await client.until_ai_end()
    await client.close()
    return widget, await stored_history(tenant_gateway, widget, 2)


def test_the_agents_api_needs_an_admin_key(tenant_gateway: GatewayProcess, demo: Admin) -> None:
    agent = demo.new_agent()
    widget = new_widget(tenant_gateway)
    calls = [
        ("GET", "/v1/agents"),
        ("POST", "/v1/agents"),
        ("GET", f"/v1/agents/{agent['agent_id']}"),
        ("PATCH", f"/v1/agents/{agent['agent_id']}"),
        ("POST", f"/v1/agents/{agent['agent_id']}/tokens"),
        ("GET", "/v1/audit"),
    ]
    credentials = [None, "not-a-key", widget.token, demo.token(agent["agent_id"])]
    for method, path in calls:
        for credential in credentials:
            headers = {"Authorization": f"Bearer {credential}"} if credential else {}
            r = httpx.request(method, f"{tenant_gateway.http}{path}", headers=headers, json={"name": "x"})
            error(r, 401, "unauthorized")


def test_an_agent_is_created_listed_disabled_and_enabled(demo: Admin) -> None:
    name = unique("Ana María")
    r = demo.http.post("/v1/agents", json={"name": f"  {name} "})
    assert r.status_code == 201, r.text
    agent = r.json()
    assert set(agent) == {"agent_id", "name", "disabled", "created_at"}
    assert (agent["name"], agent["disabled"]) == (name, False)
    uuid.UUID(agent["agent_id"])
    aid = agent["agent_id"]
    assert demo.http.get(f"/v1/agents/{aid}").json() == agent
    assert agent in demo.http.get("/v1/agents").json()["agents"]

    assert demo.disable(aid) == {**agent, "disabled": True}
    assert demo.disable(aid) == {**agent, "disabled": True}  # again: no change, no audit record
    assert {**agent, "disabled": True} in demo.http.get("/v1/agents").json()["agents"]
    assert demo.disable(aid, False) == agent

    actions = [
        e["action"]
        for e in demo.audit(since=agent["created_at"], limit=500)["entries"]
        if e["data"].get("agent_id") == aid
    ]
    assert actions == ["agent.enable", "agent.disable", "agent.create"]


def test_agents_list_oldest_first(demo: Admin) -> None:
    made = [demo.new_agent("order")["agent_id"] for _ in range(3)]
    listed = [a["agent_id"] for a in demo.http.get("/v1/agents").json()["agents"]]
    assert [a for a in listed if a in made] == made


def test_an_agent_token_is_a_signed_agent_jwt(demo: Admin) -> None:
    agent = demo.new_agent()
    r = demo.http.post(f"/v1/agents/{agent['agent_id']}/tokens")
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["agent_id"], body["expires_in"]) == (agent["agent_id"], 8 * 3600)
    claims = jwt.decode(body["token"], TEST_SECRET, algorithms=["HS256"], audience="chatgw")
    assert (claims["role"], claims["sub"], claims["bid"]) == (
        "agent",
        agent["agent_id"],
        DEMO_BUSINESS.business_id,
    )
    assert claims["exp"] - claims["iat"] == 8 * 3600
    tokens = demo.audit(action="agent.token", since=agent["created_at"])["entries"]
    assert agent["agent_id"] in {e["data"]["agent_id"] for e in tokens}


def test_a_disabled_agent_gets_no_token_and_its_tokens_stop(
    tenant_gateway: GatewayProcess, demo: Admin, answered: tuple[Widget, list[dict[str, Any]]]
) -> None:
    widget, messages = answered
    agent = demo.new_agent()
    aid = agent["agent_id"]
    token = demo.token(aid)
    assert history(tenant_gateway, widget.conversation_id, token).json()["messages"] == messages

    demo.disable(aid)
    error(demo.http.post(f"/v1/agents/{aid}/tokens"), 409, "conflict", "disabled", f"/v1/agents/{aid}")
    error(history(tenant_gateway, widget.conversation_id, token), 403, "forbidden", "disabled")

    demo.disable(aid, False)
    assert history(tenant_gateway, widget.conversation_id, token).status_code == 200


def test_history_is_read_with_an_agent_token_or_the_admin_key(
    tenant_gateway: GatewayProcess, demo: Admin, answered: tuple[Widget, list[dict[str, Any]]]
) -> None:
    widget, messages = answered
    assert [m["role"] for m in messages] == ["user", "assistant"]
    by_widget = history(tenant_gateway, widget.conversation_id, widget.token).json()
    by_agent = history(tenant_gateway, widget.conversation_id, demo.token(demo.new_agent()["agent_id"]))
    by_admin = history(tenant_gateway, widget.conversation_id, DEMO_API_KEY)
    assert by_agent.status_code == by_admin.status_code == 200
    assert by_agent.json() == by_admin.json() == by_widget
    other_widget = new_widget(tenant_gateway)
    error(history(tenant_gateway, widget.conversation_id, other_widget.token), 403, "forbidden")


def test_another_business_sees_nothing_of_the_demo_one(
    tenant_gateway: GatewayProcess,
    demo: Admin,
    other: Admin,
    answered: tuple[Widget, list[dict[str, Any]]],
) -> None:
    """Another business's admin key and agents get, for the demo business's agents and
    conversations, exactly what they get for ones that do not exist."""
    widget, _ = answered
    ours, theirs = demo.new_agent(), other.new_agent("theirs")
    assert theirs["agent_id"] not in {a["agent_id"] for a in demo.http.get("/v1/agents").json()["agents"]}
    assert ours["agent_id"] not in {a["agent_id"] for a in other.http.get("/v1/agents").json()["agents"]}
    for aid in (ours["agent_id"], str(uuid.uuid4()), "not-an-id"):
        error(other.http.get(f"/v1/agents/{aid}"), 404, "not_found")
        error(other.http.patch(f"/v1/agents/{aid}", json={"disabled": True}), 404, "not_found")
        error(other.http.post(f"/v1/agents/{aid}/tokens"), 404, "not_found")
    assert demo.http.get(f"/v1/agents/{ours['agent_id']}").json()["disabled"] is False

    their_token = other.token(theirs["agent_id"])
    missing = str(uuid.uuid4())
    for credential in (their_token, OTHER_API_KEY):
        refused = history(tenant_gateway, widget.conversation_id, credential)
        absent = history(tenant_gateway, missing, credential)
        assert refused.status_code == absent.status_code == 404
        assert refused.json() == absent.json()

    their_audit = other.audit(limit=500)["entries"]
    assert their_audit, "the other business's own records are listed"
    assert ours["agent_id"] not in {e["data"].get("agent_id") for e in their_audit}
    assert theirs["agent_id"] in {e["data"].get("agent_id") for e in their_audit}
    assert other.audit(conversation_id=widget.conversation_id)["entries"] == []


def test_the_audit_log_filters_and_pages(demo: Admin) -> None:
    made = [demo.new_agent("audited") for _ in range(3)]
    ids = [a["agent_id"] for a in made]
    since = made[0]["created_at"]

    entries: list[dict[str, Any]] = []
    cursor = None
    pages = 0
    while True:
        params = {
            "action": "agent.create",
            "since": since,
            "limit": 2,
            **({"cursor": cursor} if cursor else {}),
        }
        body = demo.audit(**params)
        entries += body["entries"]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages >= 2
    assert len({e["log_id"] for e in entries}) == len(entries)
    assert [e["data"]["agent_id"] for e in entries if e["data"]["agent_id"] in ids] == ids[::-1]
    assert all(e["action"] == "agent.create" for e in entries)
    assert [e["created_at"] for e in entries] == sorted((e["created_at"] for e in entries), reverse=True)
    last = next(e for e in entries if e["data"]["agent_id"] == ids[-1])
    assert set(last) == {
        "log_id",
        "actor_type",
        "actor_id",
        "action",
        "data",
        "conversation_id",
        "created_at",
    }
    assert (last["actor_type"], last["actor_id"], last["conversation_id"]) == ("admin", None, None)
    assert last["data"] == {"agent_id": ids[-1], "name": made[-1]["name"]}

    until = demo.audit(action="agent.create", since=since, until=last["created_at"], limit=500)["entries"]
    assert ids[-1] not in {e["data"]["agent_id"] for e in until}
    assert ids[0] in {e["data"]["agent_id"] for e in until}
    assert demo.audit(agent_id=ids[0])["entries"] == []  # admin actions name no agent as their actor
    assert demo.audit(conversation_id=str(uuid.uuid4()))["entries"] == []


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"since": "yesterday"}, "since"),
        ({"until": "2025-13-01"}, "until"),
        ({"cursor": "garbage"}, "cursor"),
        ({"cursor": "2025-01-01T00:00:00+00:00|not-a-log-id"}, "cursor"),
        ({"conversation_id": "c-1"}, "conversation_id"),
        ({"agent_id": "a-1"}, "agent_id"),
        ({"action": "x" * 51}, "action"),
        ({"actor": "someone"}, "actor"),
    ],
)
def test_bad_audit_parameters_are_named(demo: Admin, params: dict[str, str], named: str) -> None:
    error(demo.http.get("/v1/audit", params=params), 400, "bad_request", named)


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "named"),
    [
        ("POST", "/v1/agents", {}, 400, "name"),
        ("POST", "/v1/agents", {"name": "   "}, 400, "name"),
        ("POST", "/v1/agents", {"name": 7}, 400, "name"),
        ("POST", "/v1/agents", {"name": "x" * 101}, 400, "name"),
        ("POST", "/v1/agents", {"name": "a\u0000b"}, 400, "name"),
        ("POST", "/v1/agents", {"name": "Ana", "role": "boss"}, 400, "role"),
        ("POST", "/v1/agents", b"not json", 400, "JSON"),
        ("PATCH", "/v1/agents/{agent_id}", {}, 400, "disabled"),
        ("PATCH", "/v1/agents/{agent_id}", {"disabled": "yes"}, 400, "disabled"),
        ("PATCH", "/v1/agents/{agent_id}", {"disabled": True, "name": "B"}, 400, "name"),
    ],
)
def test_bad_agent_input_is_named(
    demo: Admin, method: str, path: str, body: Any, status: int, named: str
) -> None:
    path = path.format(agent_id=demo.new_agent()["agent_id"])
    kwargs: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": body}
    error(demo.http.request(method, path, **kwargs), status, "bad_request", named)
