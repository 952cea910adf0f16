"""The tenant isolation matrix: for every HTTP endpoint and every client frame type, the principals
of one business (X, the demo business: its admin key, an agent token, a widget token, and no
credential) try to read, write, watch, take over, list or count something of another business
(Y, other-shop). Nothing of Y reaches them and nothing of Y changes.

The endpoints are enumerated from the application itself, and the frame types from the protocol
module: a new route or frame type without an entry here fails `test_every_route_and_frame_type
_has_a_matrix_entry`. An entry says what is tried, and the expectation:

- `REFUSED`: every principal gets 401, 403 or 404 (an object of Y looks exactly like one that does
  not exist);
- `OWN`: the endpoint acts on the caller's own business (or is public): any answer, but none
  holds anything of Y that the request did not itself carry.

After all probes, Y's flow, agents, conversation history, audit log, settings and key are as they
were, and Y's user saw no foreign event.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
from starlette.routing import Mount, Route, WebSocketRoute

from gateway.app import create_app
from gateway.protocol import CLIENT_TYPES
from gateway.settings import Settings
from tests.e2e.agents import AgentClient, new_agent
from tests.e2e.client import Client, new_widget, stored_history
from tests.servers import DEMO_API_KEY, GatewayProcess
from tests.tenant_gateway import OTHER_API_KEY

REFUSED = "refused"
OWN = "own"
PRINCIPALS = ("admin", "agent", "widget", "none")


@dataclass(frozen=True)
class Probe:
    """One request, made once per principal (or only by `who`)."""

    path: str  # {cid}, {agent}, {stage}, {template}, {transition}, {rule}: Y's objects
    expect: str
    body: Any = None
    who: tuple[str, ...] = PRINCIPALS
    params: dict[str, str] = field(default_factory=dict)


@dataclass
class World:
    """Y's objects (ids and unique texts an outsider must never see), and X's credentials."""

    gw: GatewayProcess
    ids: dict[str, str]
    secrets: list[str]
    credentials: dict[str, str | None]
    y_widget_token: str

    def fill(self, text: str) -> str:
        return text.format(**self.ids)


def admin(gw: GatewayProcess, key: str) -> httpx.Client:
    return httpx.Client(base_url=gw.http, headers={"Authorization": f"Bearer {key}"}, timeout=15)


def _flow_names(gw: GatewayProcess) -> dict[str, str]:
    """Y's flow records, made for the matrix with names nobody else uses."""
    with admin(gw, OTHER_API_KEY) as y:
        return _make_flow(y)


def _make_flow(y: httpx.Client) -> dict[str, str]:
    tag = uuid.uuid4().hex[:8]
    entry = next((st["name"] for st in y.get("/v1/admin/flow").json()["stages"] if st["is_entry"]), None)
    # The entry stage when Y has none yet (other tests may have given Y a flow), else reached from it.
    new_stage: dict[str, Any] = {"name": f"y-stage-{tag}", "is_entry": entry is None}
    if entry is not None:
        new_stage["from"] = [{"stage": entry}]
    stage = y.post("/v1/admin/stages", json=new_stage)
    assert stage.status_code == 201, stage.text
    template = y.post(
        "/v1/admin/templates",
        json={
            "name": f"y-template-{tag}",
            "type": "response_generation",
            "content": f"y-secret-prompt-{tag}",
        },
    )
    assert template.status_code == 201, template.text
    patched = y.patch(f"/v1/admin/stages/y-stage-{tag}", json={"response_template": f"y-template-{tag}"})
    assert patched.status_code == 200, patched.text
    transition = y.post("/v1/admin/transitions", json={"from": f"y-stage-{tag}", "to": f"y-stage-{tag}"})
    assert transition.status_code == 201, transition.text
    rule = y.post(
        "/v1/admin/extraction-rules",
        json={"field": f"y_field_{tag}", "kind": "pattern", "pattern": f"(?P<y_field_{tag}>y-secret-\\d+)"},
    )
    assert rule.status_code == 201, rule.text
    return {
        "template": f"y-template-{tag}",
        "template_id": template.json()["id"],
        "stage": f"y-stage-{tag}",
        "stage_id": stage.json()["id"],
        "transition": transition.json()["id"],
        "rule": rule.json()["id"],
        "prompt": f"y-secret-prompt-{tag}",
    }


def _y_state(gw: GatewayProcess, cid: str, token: str) -> dict[str, Any]:
    """Everything of Y the probes must leave as it is."""
    history = httpx.get(
        f"{gw.http}/v1/conversations/{cid}/messages", headers={"Authorization": f"Bearer {token}"}, timeout=15
    )
    with admin(gw, OTHER_API_KEY) as y:
        return {
            "flow": y.get("/v1/admin/flow").json(),
            "agents": y.get("/v1/agents").json(),
            "audit": y.get("/v1/audit", params={"limit": 50}).json(),
            "business": y.get("/v1/admin/business").json(),
            "history": history.json()["messages"],
        }


@pytest.fixture(scope="module")
def world(tenant_gateway: GatewayProcess) -> World:
    gw = tenant_gateway
    names = _flow_names(gw)
    y_agent = new_agent(gw, OTHER_API_KEY, name=f"y-agent-{uuid.uuid4().hex[:8]}")
    y_widget = new_widget(gw, "other-shop")
    y_text = f"y-secret-message-{uuid.uuid4().hex[:8]}"

    async def converse() -> None:
        client = await Client.open(gw)
        await client.hello(y_widget)
        await client.send({"type": "message", "client_msg_id": "y-1", "text": y_text})
        await client.until_ai_end()
        await client.close()

    asyncio.run(converse())
    asyncio.run(stored_history(gw, y_widget, 2))
    ids = {**names, "cid": y_widget.conversation_id, "agent": y_agent.agent_id}
    x_agent = new_agent(gw, DEMO_API_KEY)
    x_widget = new_widget(gw, "demo")
    credentials: dict[str, str | None] = {
        "admin": DEMO_API_KEY,
        "agent": x_agent.token,
        "widget": x_widget.token,
        "none": None,
    }
    secrets = [
        ids["cid"],
        ids["agent"],
        ids["stage"],
        ids["stage_id"],
        ids["template"],
        ids["template_id"],
        ids["transition"],
        ids["rule"],
        ids["prompt"],
        y_text,
        OTHER_API_KEY,
        y_widget.token,
        y_agent.token,
    ]
    return World(gw, ids, secrets, credentials, y_widget.token)


# --- the HTTP matrix -----------------------------------------------------------------------------

_Y_STAGE = {"id": "{stage_id}", "name": "x-stage-with-y-id"}

HTTP: dict[tuple[str, str], list[Probe]] = {
    ("POST", "/v1/widget/sessions"): [
        Probe("/v1/widget/sessions", REFUSED, {"business": "other-shop", "conversation_id": "{cid}"}),
        Probe("/v1/widget/sessions", REFUSED, {"business": "demo", "conversation_id": "{cid}"}),
    ],
    ("OPTIONS", "/v1/widget/sessions"): [Probe("/v1/widget/sessions", OWN)],
    ("GET", "/v1/conversations/{conversation_id}/messages"): [
        Probe("/v1/conversations/{cid}/messages", REFUSED),
        Probe("/v1/conversations/{cid}/messages", REFUSED, params={"after_seq": "0", "limit": "500"}),
    ],
    ("OPTIONS", "/v1/conversations/{conversation_id}/messages"): [
        Probe("/v1/conversations/{cid}/messages", OWN)
    ],
    ("GET", "/healthz"): [Probe("/healthz", OWN)],
    ("GET", "/readyz"): [Probe("/readyz", OWN)],
    # An operator's endpoint (CHATGW_METRICS_TOKEN protects it): counts of all businesses together,
    # takeovers and handbacks by business public id; never a conversation, agent or text.
    ("GET", "/metrics"): [Probe("/metrics", OWN)],
    # -- the admin API: Y's records by name or id are not found; writes land in X's own flow.
    ("GET", "/v1/admin/flow"): [Probe("/v1/admin/flow", OWN)],
    ("PUT", "/v1/admin/flow"): [Probe("/v1/admin/flow", OWN, "X_FLOW_WITH_Y_STAGE_ID", who=("admin",))],
    ("POST", "/v1/admin/flow/validate"): [
        Probe("/v1/admin/flow/validate", OWN, {"stages": [{"name": "{stage}"}], "transitions": []})
    ],
    ("GET", "/v1/admin/stages"): [Probe("/v1/admin/stages", OWN)],
    ("POST", "/v1/admin/stages"): [
        Probe("/v1/admin/stages", OWN, {**_Y_STAGE, "response_template": "{template}"}),
        Probe("/v1/admin/stages", OWN, _Y_STAGE, who=("admin",)),
    ],
    ("GET", "/v1/admin/stages/{name}"): [Probe("/v1/admin/stages/{stage}", REFUSED)],
    ("PATCH", "/v1/admin/stages/{name}"): [Probe("/v1/admin/stages/{stage}", REFUSED, {"description": "x"})],
    ("DELETE", "/v1/admin/stages/{name}"): [Probe("/v1/admin/stages/{stage}", REFUSED)],
    ("GET", "/v1/admin/transitions"): [Probe("/v1/admin/transitions", OWN)],
    ("POST", "/v1/admin/transitions"): [
        Probe("/v1/admin/transitions", OWN, {"from": "{stage}", "to": "{stage}"})
    ],
    ("PATCH", "/v1/admin/transitions/{id}"): [
        Probe("/v1/admin/transitions/{transition}", REFUSED, {"priority": 5})
    ],
    ("DELETE", "/v1/admin/transitions/{id}"): [Probe("/v1/admin/transitions/{transition}", REFUSED)],
    ("GET", "/v1/admin/templates"): [Probe("/v1/admin/templates", OWN)],
    ("POST", "/v1/admin/templates"): [
        Probe(
            "/v1/admin/templates",
            OWN,
            {"id": "{template_id}", "name": "{template}", "type": "response_generation", "content": "x"},
            who=("agent", "widget", "none"),
        )
    ],
    ("GET", "/v1/admin/templates/{name}"): [Probe("/v1/admin/templates/{template}", REFUSED)],
    ("PATCH", "/v1/admin/templates/{name}"): [
        Probe("/v1/admin/templates/{template}", REFUSED, {"content": "x"})
    ],
    ("DELETE", "/v1/admin/templates/{name}"): [Probe("/v1/admin/templates/{template}", REFUSED)],
    ("GET", "/v1/admin/extraction-rules"): [Probe("/v1/admin/extraction-rules", OWN)],
    ("POST", "/v1/admin/extraction-rules"): [
        Probe("/v1/admin/extraction-rules", OWN, {"field": "x", "kind": "pattern", "stage": "{stage}"})
    ],
    ("PATCH", "/v1/admin/extraction-rules/{id}"): [
        Probe("/v1/admin/extraction-rules/{rule}", REFUSED, {"pattern": "(?P<x>x)"})
    ],
    ("DELETE", "/v1/admin/extraction-rules/{id}"): [Probe("/v1/admin/extraction-rules/{rule}", REFUSED)],
    ("POST", "/v1/admin/dry-run"): [
        Probe("/v1/admin/dry-run", OWN, {"message": "hi", "state": {"stage": "{stage}"}})
    ],
    ("GET", "/v1/admin/audit"): [Probe("/v1/admin/audit", OWN, params={"limit": "500"})],
    # -- access settings: X's own only (the key rotation is tried with a body it refuses, so that
    # the demo key the other tests use stays; its scope is in the store contract tests).
    ("GET", "/v1/admin/business"): [Probe("/v1/admin/business", OWN)],
    ("PATCH", "/v1/admin/business"): [Probe("/v1/admin/business", OWN, {})],
    ("POST", "/v1/admin/identity-secret"): [Probe("/v1/admin/identity-secret", OWN)],
    ("DELETE", "/v1/admin/identity-secret"): [Probe("/v1/admin/identity-secret", OWN)],
    ("POST", "/v1/admin/api-keys"): [Probe("/v1/admin/api-keys", OWN, {"overlap_s": -1})],
    ("DELETE", "/v1/admin/api-keys/previous"): [Probe("/v1/admin/api-keys/previous", OWN)],
    # -- agents and the audit log
    ("GET", "/v1/agents"): [Probe("/v1/agents", OWN)],
    ("POST", "/v1/agents"): [Probe("/v1/agents", OWN, {"name": "x-agent-of-the-matrix"})],
    ("GET", "/v1/agents/{agent_id}"): [Probe("/v1/agents/{agent}", REFUSED)],
    ("PATCH", "/v1/agents/{agent_id}"): [Probe("/v1/agents/{agent}", REFUSED, {"disabled": True})],
    ("POST", "/v1/agents/{agent_id}/tokens"): [Probe("/v1/agents/{agent}/tokens", REFUSED)],
    ("GET", "/v1/audit"): [
        Probe("/v1/audit", OWN, params={"conversation_id": "{cid}"}),
        Probe("/v1/audit", OWN, params={"agent_id": "{agent}"}),
        Probe("/v1/audit", OWN, params={"limit": "500"}),
    ],
    ("GET", "/v1/agents/me/flow"): [Probe("/v1/agents/me/flow", OWN)],
    ("GET", "/v1/agents/me/team"): [Probe("/v1/agents/me/team", OWN)],
    # The embedded default's one-click demo agent: an agent of the demo business (X) only.
    ("GET", "/v1/demo/agent"): [Probe("/v1/demo/agent", OWN)],
    ("POST", "/v1/demo/agent"): [Probe("/v1/demo/agent", OWN)],
    # Public pages: the widget, the demo page and the console, no data.
    ("GET", "/"): [Probe("/", OWN)],
    ("MOUNT", "/"): [Probe("/widget.js", OWN), Probe("/console/", OWN), Probe("/demo/", OWN)],
    # The socket: the frame matrix below.
    ("WS", "/ws"): [],
}


def app_routes() -> set[tuple[str, str]]:
    """Every (method, path) the application serves, from its own route table."""
    found: set[tuple[str, str]] = set()
    for route in create_app(Settings.from_env({})).routes:
        if isinstance(route, Route):
            methods = route.methods or {"GET"}
            found |= {(m, route.path) for m in methods if not (m == "HEAD" and "GET" in methods)}
        elif isinstance(route, WebSocketRoute):
            found.add(("WS", route.path))
        elif isinstance(route, Mount):
            found.add(("MOUNT", route.path or "/"))
        else:
            raise AssertionError(f"a route of an unknown kind: {route!r}")
    return found


def test_every_route_and_frame_type_has_a_matrix_entry() -> None:
    routes = app_routes()
    assert routes - HTTP.keys() == set(), "routes without an entry in the tenant isolation matrix"
    assert HTTP.keys() - routes == set(), "matrix entries for routes that no longer exist"
    assert set(CLIENT_TYPES) - FRAMES.keys() == set(), "frame types without an entry in the matrix"


def _request(world: World, method: str, probe: Probe, principal: str, body: Any) -> httpx.Response:
    credential = world.credentials[principal]
    headers = {"Authorization": f"Bearer {credential}"} if credential else {}
    if method == "OPTIONS":
        headers.update({"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"})
    params = {k: world.fill(v) for k, v in probe.params.items()}
    content = None if body is None else orjson.dumps(body)
    return httpx.request(
        method if method != "MOUNT" else "GET",
        world.gw.http + world.fill(probe.path),
        params=params,
        content=content,
        headers=headers,
        timeout=15,
    )


def _filled(world: World, value: Any) -> Any:
    if isinstance(value, str):
        return world.fill(value)
    if isinstance(value, dict):
        return {k: _filled(world, v) for k, v in value.items()}
    if isinstance(value, list):
        return [_filled(world, v) for v in value]
    return value


def test_no_principal_of_x_reads_or_changes_anything_of_y(world: World) -> None:
    with admin(world.gw, DEMO_API_KEY) as demo:
        _probe_everything(world, demo)


def _probe_everything(world: World, demo: httpx.Client) -> None:
    gw = world.gw
    x_flow = demo.get("/v1/admin/flow").json()
    before = _y_state(gw, world.ids["cid"], world.y_widget_token)
    tried = 0
    sent = ""
    try:
        for (method, _), probes in HTTP.items():
            for probe in probes:
                for principal in probe.who:
                    body: Any = probe.body
                    if body == "X_FLOW_WITH_Y_STAGE_ID":
                        current = demo.get("/v1/admin/flow").json()
                        current["stages"][0]["id"] = world.ids["stage_id"]
                        body = current
                    body = _filled(world, body)
                    r = _request(world, method, probe, principal, body)
                    tried += 1
                    where = f"{method} {probe.path} as {principal}: {r.status_code} {r.text[:200]}"
                    if probe.expect == REFUSED:
                        assert r.status_code in (401, 403, 404), where
                    params = {k: world.fill(v) for k, v in probe.params.items()}
                    # What X itself sent (now or before: an id it gave its own record) is no leak.
                    sent += world.fill(probe.path) + orjson.dumps(body).decode() + str(params)
                    leaked = [s for s in world.secrets if s in r.text and s not in sent]
                    assert not leaked, f"{where}: holds {leaked}"
    finally:
        # Put X's own flow and identity secret back as they were (the probes may change them).
        current = demo.get("/v1/admin/flow").json()
        restored = demo.put("/v1/admin/flow", json={**x_flow, "version": current["version"]})
        assert restored.status_code == 200, restored.text
        assert demo.delete("/v1/admin/identity-secret").status_code == 204
    assert tried > 100
    after = _y_state(gw, world.ids["cid"], world.y_widget_token)
    assert after == before


# --- the frame matrix ----------------------------------------------------------------------------

FRAMES: dict[str, list[dict[str, Any]]] = {
    "hello": [{"type": "hello", "conversation_id": "{cid}"}],
    "message": [{"type": "message", "conversation_id": "{cid}", "client_msg_id": "x-1", "text": "hi"}],
    "typing": [{"type": "typing", "conversation_id": "{cid}", "state": True}],
    "stop": [{"type": "stop", "conversation_id": "{cid}"}],
    "subscribe": [
        {"type": "subscribe", "conversation_id": "{cid}"},
        {"type": "subscribe", "conversation_id": "{cid}", "resume": {"epoch": "e", "last_seq": 0}},
    ],
    "unsubscribe": [{"type": "unsubscribe", "conversation_id": "{cid}"}],
    "takeover": [{"type": "takeover", "conversation_id": "{cid}"}],
    "handback": [{"type": "handback", "conversation_id": "{cid}"}],
}
"""Each client frame type, naming Y's conversation. On an open socket every one is refused with an
error frame (`not_found` for an agent, as for a conversation that does not exist; `forbidden` for a
widget), except `unsubscribe` (answered `unsubscribed` whatever the id: it reveals nothing) and a
second `hello` (`bad_frame`). As a first frame, `hello` naming Y's conversation is refused with a
close."""


async def test_no_frame_of_x_reaches_into_a_conversation_of_y(world: World) -> None:
    gw = world.gw
    cid = world.ids["cid"]
    before = _y_state(gw, cid, world.y_widget_token)
    # Y's user watches their own conversation throughout.
    y_user = await Client.open(gw)
    await y_user.send({"type": "hello", "token": world.y_widget_token})
    assert (await y_user.recv())["type"] == "welcome"

    agent = await AgentClient.open(gw)
    await agent.send({"type": "hello", "token": world.credentials["agent"]})
    assert (await agent.recv())["type"] == "welcome"
    snapshot = await agent.recv_type("snapshot")
    assert cid not in orjson.dumps(snapshot).decode()
    widget = await Client.open(gw)
    await widget.send({"type": "hello", "token": world.credentials["widget"]})
    assert (await widget.recv())["type"] == "welcome"

    for kind, frames in FRAMES.items():
        for template in frames:
            frame = _filled(world, template)
            for socket, role in ((agent, "agent"), (widget, "widget")):
                await socket.send({**frame, "token": world.credentials[role]} if kind == "hello" else frame)
                answer = await socket.recv_type("error", "unsubscribed")
                where = f"{kind} on the {role} socket: {answer}"
                if kind == "unsubscribe" and role == "agent":
                    assert answer["type"] == "unsubscribed", where
                elif kind == "hello":
                    assert answer["code"] == "bad_frame", where
                else:
                    assert answer["type"] == "error", where
                    expected = "not_found" if role == "agent" and kind != "stop" else "forbidden"
                    assert answer["code"] == expected, where
    # A first hello naming Y's conversation: refused and closed.
    for role in ("agent", "widget"):
        client = await Client.open(gw)
        await client.send({"type": "hello", "token": world.credentials[role], "conversation_id": cid})
        error = await client.recv()
        assert error["type"] == "error", error
        await client.close()

    await asyncio.sleep(0.3)  # anything wrongly published would have arrived by now
    for socket in (agent, widget):
        seen = orjson.dumps(socket.frames).decode()
        assert not [s for s in world.secrets if s in seen and s != cid], seen[:500]
        assert not [
            f
            for f in socket.frames
            if f.get("conversation_id") == cid and f["type"] not in ("error", "unsubscribed")
        ]
    assert not [f for f in y_user.frames if f["type"] in ("mode", "typing", "message", "ai_start")]
    for socket in (agent, widget, y_user):
        await socket.close()
    assert _y_state(gw, cid, world.y_widget_token) == before
