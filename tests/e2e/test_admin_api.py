"""The admin API against a real gateway process: the demo business edits its flow by name, is
refused invalid flows, tries messages out in a dry run, and reads its audit log.

The gateway is shared by the whole session: every test that writes restores the demo flow at its
end (the `admin` fixture), and records the tests create have names of their own.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.e2e.client import Client, new_widget
from tests.servers import DEMO_API_KEY, GatewayProcess

DEMO_STAGES = ["greeting", "contact", "questions", "human"]


class Admin:
    """An HTTP client of the admin API with the demo business's key."""

    def __init__(self, gw: GatewayProcess) -> None:
        headers = {"Authorization": f"Bearer {DEMO_API_KEY}"}
        self.http = httpx.Client(base_url=f"{gw.http}/v1/admin", headers=headers, timeout=15)

    def get(self, path: str, **params: Any) -> httpx.Response:
        return self.http.get(path, params=params)

    def post(self, path: str, body: Any) -> httpx.Response:
        return self.http.post(path, json=body)

    def put(self, path: str, body: Any) -> httpx.Response:
        return self.http.put(path, json=body)

    def patch(self, path: str, body: Any) -> httpx.Response:
        return self.http.patch(path, json=body)

    def delete(self, path: str) -> httpx.Response:
        return self.http.delete(path)

    def flow(self) -> dict[str, Any]:
        r = self.get("/flow")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    def audit(self, limit: int = 100) -> list[dict[str, Any]]:
        r = self.get("/audit", limit=limit)
        assert r.status_code == 200, r.text
        entries: list[dict[str, Any]] = r.json()["entries"]
        return entries

    def new_stage(self, name: str, **fields: Any) -> dict[str, Any]:
        """A stage reachable from `human` (only when a message says a word no test sends)."""
        incoming = [{"stage": "human", "condition": f'message.contains("{name}")'}]
        r = self.post("/stages", {"name": name, "from": incoming, **fields})
        assert r.status_code == 201, r.text
        stage: dict[str, Any] = r.json()
        return stage


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def content(flow: dict[str, Any]) -> dict[str, Any]:
    """A flow without its versions (restoring a flow counts versions on)."""
    templates = [{k: v for k, v in t.items() if k != "version"} for t in flow["templates"]]
    return {**{k: v for k, v in flow.items() if k != "version"}, "templates": templates}


def error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()["error"]
    assert body["code"] == code, body
    assert body["message"]
    return body


@pytest.fixture
def admin(gateway: GatewayProcess) -> Iterator[Admin]:
    yield from restoring_flow(Admin(gateway))


def restoring_flow(client: Admin) -> Iterator[Admin]:
    """The admin client; the demo flow as it was is put back at the end."""
    original = client.flow()
    try:
        yield client
    finally:
        current = client.flow()
        if content(current) != content(original):
            r = client.put("/flow", {**original, "version": current["version"]})
            assert r.status_code == 200, r.text
        client.http.close()


def test_the_admin_api_needs_the_business_admin_key(gateway: GatewayProcess) -> None:
    widget = new_widget(gateway)
    for headers in ({}, {"Authorization": "Bearer not-the-key"}, {"Authorization": f"Bearer {widget.token}"}):
        error(httpx.get(f"{gateway.http}/v1/admin/flow", headers=headers), 401, "unauthorized")


def test_the_demo_flow_reads_by_name(admin: Admin) -> None:
    flow = admin.flow()
    assert [s["name"] for s in flow["stages"]] == DEMO_STAGES
    greeting = flow["stages"][0]
    assert greeting["is_entry"] is True
    assert greeting["response_template"] == "greet"
    first = flow["transitions"][0]
    assert (first["from"], first["to"], first["condition"]) == ("greeting", "contact", "turns > 1")
    assert {(r["field"], r["kind"], r["stage"]) for r in flow["rules"]} == {
        ("email", "pattern", None),
        ("phone", "pattern", None),
        ("name", "llm", "contact"),
    }
    assert "extract-contact" in {t["name"] for t in flow["templates"]}
    assert admin.get("/stages").json()["stages"] == flow["stages"]
    assert admin.get("/stages/contact").json() == flow["stages"][1]


def test_template_round_trip(admin: Admin) -> None:
    name = unique("tpl")
    body = {
        "name": name,
        "type": "response_generation",
        "content": "Hi {{ message }}",
        "variables": ["message"],
    }
    r = admin.post("/templates", body)
    assert r.status_code == 201, r.text
    created = r.json()
    assert {**body, "system_prompt": "", "version": 1}.items() <= created.items()
    assert admin.get(f"/templates/{name}").json() == created
    assert created in admin.get("/templates").json()["templates"]
    error(admin.post("/templates", body), 409, "conflict")

    r = admin.patch(f"/templates/{name}", {"content": "Hello {{ message }}", "system_prompt": "Be brief."})
    assert r.status_code == 200, r.text
    assert r.json() == {
        **created,
        "content": "Hello {{ message }}",
        "system_prompt": "Be brief.",
        "version": 2,
    }
    renamed = unique("tpl")
    assert admin.patch(f"/templates/{name}", {"name": renamed}).json()["name"] == renamed
    error(admin.get(f"/templates/{name}"), 404, "not_found")
    assert admin.get(f"/templates/{renamed}").json()["id"] == created["id"]

    assert admin.delete(f"/templates/{renamed}").status_code == 204
    error(admin.get(f"/templates/{renamed}"), 404, "not_found")
    error(admin.delete(f"/templates/{renamed}"), 404, "not_found")


def test_stage_round_trip_with_its_incoming_transition(admin: Admin) -> None:
    template, name = unique("tpl"), unique("stage")
    admin.post("/templates", {"name": template, "type": "response_generation", "content": "{{ message }}"})
    incoming = [{"stage": "human", "condition": 'message.contains("callback")', "priority": 5}]
    r = admin.post(
        "/stages", {"name": name, "description": "Call back", "response_template": template, "from": incoming}
    )
    assert r.status_code == 201, r.text
    stage = r.json()
    (transition,) = stage.pop("transitions")
    assert stage == {
        "id": stage["id"],
        "name": name,
        "description": "Call back",
        "is_entry": False,
        "selection_template": None,
        "extraction_template": None,
        "response_template": template,
    }
    assert transition == {
        **transition,
        "from": "human",
        "to": name,
        "condition": incoming[0]["condition"],
        "priority": 5,
    }
    assert admin.get(f"/stages/{name}").json() == stage
    assert transition in admin.get("/transitions").json()["transitions"]

    r = admin.patch(
        f"/stages/{name}", {"description": "Call the customer back", "response_template": "answer"}
    )
    assert r.status_code == 200, r.text
    assert r.json() == {**stage, "description": "Call the customer back", "response_template": "answer"}
    admin.patch(f"/stages/{name}", {"response_template": template})
    used = error(admin.delete(f"/templates/{template}"), 409, "conflict")
    assert name in used["message"]

    rule = admin.post(
        "/extraction-rules",
        {"field": "callback_at", "kind": "pattern", "stage": name, "pattern": r"at (?P<value>\d+)"},
    )
    assert rule.status_code == 201, rule.text
    assert admin.delete(f"/stages/{name}").status_code == 204
    error(admin.get(f"/stages/{name}"), 404, "not_found")
    flow = admin.flow()
    assert transition["id"] not in {t["id"] for t in flow["transitions"]}
    assert rule.json()["id"] not in {r["id"] for r in flow["rules"]}
    assert admin.delete(f"/templates/{template}").status_code == 204


def test_transition_round_trip(admin: Admin) -> None:
    name = unique("stage")
    admin.new_stage(name)
    body = {"from": name, "to": "questions", "condition": "turns_in_stage > 2", "priority": 1}
    r = admin.post("/transitions", body)
    assert r.status_code == 201, r.text
    created = r.json()
    assert created == {"id": created["id"], **body}
    assert created in admin.get("/transitions").json()["transitions"]

    r = admin.patch(f"/transitions/{created['id']}", {"condition": None, "priority": 3})
    assert r.status_code == 200, r.text
    assert r.json() == {**created, "condition": None, "priority": 3}
    assert r.json() in admin.get("/transitions").json()["transitions"]

    assert admin.delete(f"/transitions/{created['id']}").status_code == 204
    assert created["id"] not in {t["id"] for t in admin.get("/transitions").json()["transitions"]}
    error(admin.patch(f"/transitions/{created['id']}", {"priority": 1}), 404, "not_found")
    error(admin.delete(f"/transitions/{created['id']}"), 404, "not_found")


def test_extraction_rule_round_trip(admin: Admin) -> None:
    name = unique("stage")
    admin.new_stage(name)
    body = {
        "field": "order_no",
        "kind": "pattern",
        "field_type": "text",
        "stage": name,
        "pattern": r"#(?P<value>\d+)",
        "validator": None,
    }
    r = admin.post("/extraction-rules", body)
    assert r.status_code == 201, r.text
    created = r.json()
    assert created == {"id": created["id"], **body}
    assert created in admin.get("/extraction-rules").json()["rules"]

    r = admin.patch(f"/extraction-rules/{created['id']}", {"validator": r"\d{4,}", "stage": None})
    assert r.status_code == 200, r.text
    assert r.json() == {**created, "validator": r"\d{4,}", "stage": None}
    assert r.json() in admin.get("/extraction-rules").json()["rules"]

    assert admin.delete(f"/extraction-rules/{created['id']}").status_code == 204
    assert created["id"] not in {rule["id"] for rule in admin.get("/extraction-rules").json()["rules"]}
    error(admin.delete(f"/extraction-rules/{created['id']}"), 404, "not_found")


def test_refused_writes_name_the_problem_and_change_nothing(admin: Admin) -> None:
    before = admin.flow()
    audit_before = admin.audit()
    orphan = unique("stage")

    refused = error(admin.post("/stages", {"name": orphan}), 422, "invalid_flow")
    assert any("unreachable" in p and orphan in p for p in refused["problems"]), refused

    missing = error(admin.post("/transitions", {"from": "greeting", "to": "nowhere"}), 400, "bad_request")
    assert "nowhere" in missing["message"]
    assert "'to'" in missing["message"]

    syntax = error(
        admin.post("/transitions", {"from": "greeting", "to": "human", "condition": "turns >"}),
        422,
        "invalid_flow",
    )
    assert any("turns >" in p for p in syntax["problems"]), syntax
    unknown = error(
        admin.post("/transitions", {"from": "greeting", "to": "human", "condition": "turn > 1"}),
        422,
        "invalid_flow",
    )
    assert any("'turn'" in p for p in unknown["problems"]), unknown

    error(admin.delete("/stages/greeting"), 422, "invalid_flow")
    error(admin.patch("/stages/contact", {"is_entry": True}), 422, "invalid_flow")
    error(admin.patch("/stages/contact", {"name": "greeting"}), 409, "conflict")
    error(admin.patch("/stages/greeting", {"response_template": "no-such-template"}), 400, "bad_request")
    wrong_type = error(
        admin.patch("/stages/greeting", {"response_template": "pick-stage"}), 422, "invalid_flow"
    )
    assert any("pick-stage" in p for p in wrong_type["problems"]), wrong_type
    kind = error(admin.post("/extraction-rules", {"field": "x", "kind": "regex"}), 400, "bad_request")
    assert "kind" in kind["message"]
    error(
        admin.post("/extraction-rules", {"field": "x", "kind": "pattern", "pattern": "("}),
        422,
        "invalid_flow",
    )
    broken = error(admin.patch("/templates/greet", {"content": "Hi {{ message"}), 422, "invalid_flow")
    assert any("'greet'" in p and "syntax" in p for p in broken["problems"]), broken
    error(
        admin.post("/templates", {"name": unique("tpl"), "type": "response_generation"}), 400, "bad_request"
    )
    error(admin.http.post("/templates", content=b"not json"), 400, "bad_request")
    error(admin.post("/templates", ["a list"]), 400, "bad_request")
    error(admin.post("/stages", {"name": unique("stage"), "colour": "red"}), 400, "bad_request")
    error(admin.get("/stages/no-such-stage"), 404, "not_found")
    error(admin.get("/templates/no-such-template"), 404, "not_found")
    error(admin.patch(f"/transitions/{uuid.uuid4()}", {"priority": 1}), 404, "not_found")
    error(admin.patch(f"/extraction-rules/{uuid.uuid4()}", {"field": "x"}), 404, "not_found")

    assert admin.flow() == before
    assert admin.audit() == audit_before


def test_put_flow_replaces_the_whole_flow_at_its_version(admin: Admin) -> None:
    flow = admin.flow()
    error(admin.put("/flow", {**flow, "version": flow["version"] - 1}), 409, "conflict")
    assert admin.flow() == flow

    name = unique("stage")
    stages = [*flow["stages"], {"name": name, "description": "added whole"}]
    transitions = [
        *flow["transitions"],
        {"from": "questions", "to": name, "condition": 'message.contains("zzz")'},
    ]
    r = admin.put("/flow", {**flow, "stages": stages, "transitions": transitions})
    assert r.status_code == 200, r.text
    saved = r.json()
    assert saved["version"] == flow["version"] + 1
    assert saved["stages"][:-1] == flow["stages"]
    assert saved["stages"][-1]["name"] == name
    uuid.UUID(saved["stages"][-1]["id"])  # a new id
    assert saved["transitions"][-1]["to"] == name
    assert admin.flow() == saved

    error(admin.put("/flow", {**saved, "transitions": flow["transitions"]}), 422, "invalid_flow")
    error(
        admin.put("/flow", {**saved, "transitions": [{"from": "greeting", "to": "nowhere"}]}),
        400,
        "bad_request",
    )
    error(admin.put("/flow", {k: v for k, v in saved.items() if k != "version"}), 400, "bad_request")
    assert admin.flow() == saved


def test_validate_checks_a_flow_without_saving_it(admin: Admin) -> None:
    flow = admin.flow()
    assert admin.post("/flow/validate", flow).json() == {"valid": True, "problems": []}
    broken = {**flow, "transitions": flow["transitions"][1:]}
    r = admin.post("/flow/validate", broken)
    assert r.status_code == 200, r.text
    assert r.json()["valid"] is False
    assert any("unreachable" in p and "contact" in p for p in r.json()["problems"]), r.json()
    assert admin.flow() == flow


def test_dry_run_shows_the_pipeline_decisions_and_writes_nothing(admin: Admin) -> None:
    flow, audit = admin.flow(), admin.audit()
    r = admin.post("/dry-run", {"message": "write me at ann@example.com", "state": {"stage": "contact"}})
    assert r.status_code == 200, r.text
    run = r.json()
    assert run["extracted"] == {"email": "ann@example.com"}
    assert run["stage"] == "questions"
    assert run["stage_changed"] is True
    assert run["data"]["email"]["value"] == "ann@example.com"
    assert "response" in run["prompts"]
    assert run["prompts"]["response"][-1] == {"role": "user", "content": "write me at ann@example.com"}
    assert run["errors"] == []

    first = admin.post("/dry-run", {"message": "hello"}).json()
    assert (first["stage"], first["stage_changed"], first["extracted"]) == ("greeting", False, {})
    second = admin.post(
        "/dry-run", {"message": "hello again", "state": {"turns": 1, "data": {"email": "a@b.co"}}}
    )
    assert second.status_code == 200, second.text
    assert (second.json()["stage"], second.json()["stage_changed"]) == ("contact", True)
    assert second.json()["data"]["email"] == {
        "value": "a@b.co",
        "extractor": "dry-run",
        "source_message_id": None,
    }

    error(admin.post("/dry-run", {"message": "hi", "state": {"stage": "nowhere"}}), 400, "bad_request")
    error(admin.post("/dry-run", {"message": "  "}), 400, "bad_request")
    error(admin.post("/dry-run", {"state": {}}), 400, "bad_request")
    assert admin.flow() == flow
    assert admin.audit() == audit


def test_every_write_is_in_the_audit_log(admin: Admin) -> None:
    template, stage = unique("tpl"), unique("stage")
    admin.post("/templates", {"name": template, "type": "response_generation", "content": "{{ message }}"})
    admin.patch(f"/templates/{template}", {"content": "Hi: {{ message }}"})
    stage_id = admin.new_stage(stage, response_template=template)["id"]
    admin.patch(f"/stages/{stage}", {"description": "audited"})
    transition = admin.post("/transitions", {"from": stage, "to": "questions"}).json()["id"]
    admin.patch(f"/transitions/{transition}", {"priority": 2})
    admin.delete(f"/transitions/{transition}")
    rule = admin.post(
        "/extraction-rules", {"field": "audited", "kind": "pattern", "pattern": "x(?P<value>y)"}
    ).json()["id"]
    admin.patch(f"/extraction-rules/{rule}", {"stage": stage})
    admin.delete(f"/extraction-rules/{rule}")
    admin.delete(f"/stages/{stage}")
    admin.delete(f"/templates/{template}")
    flow = admin.flow()
    assert admin.put("/flow", flow).status_code == 200

    expected = [
        ("template.create", template),
        ("template.update", template),
        ("stage.create", stage_id),
        ("stage.update", stage_id),
        ("transition.create", transition),
        ("transition.update", transition),
        ("transition.delete", transition),
        ("extraction_rule.create", rule),
        ("extraction_rule.update", rule),
        ("extraction_rule.delete", rule),
        ("stage.delete", stage_id),
        ("template.delete", template),
        ("flow.replace", flow["version"]),
    ]
    entries = admin.audit(limit=len(expected))
    assert {e["actor_type"] for e in entries} == {"admin"}
    for action, subject in expected:
        assert any(e["action_type"] == action and subject in e["action_data"].values() for e in entries), (
            action,
            subject,
            entries,
        )
    assert all(e["id"] and e["created_at"] for e in entries)


async def test_a_change_is_used_by_the_next_turn(gateway: GatewayProcess, admin: Admin) -> None:
    r = admin.patch("/templates/greet", {"content": "Greeting: {{ message }}"})
    assert r.status_code == 200, r.text
    widget = new_widget(gateway)
    client = await Client.open(gateway)
    try:
        await client.hello(widget)
        await client.send({"type": "message", "client_msg_id": "m-1", "text": "hi there"})
        frames = await client.until_ai_end()
    finally:
        await client.close()
    assert frames[-1]["status"] == "complete"
    assert frames[-1]["text"].startswith("You said: Greeting: hi there."), frames[-1]


def test_dry_run_reports_a_template_that_does_not_render(admin: Admin) -> None:
    template, stage = unique("tpl"), unique("stage")
    r = admin.post("/templates", {"name": template, "type": "response_generation", "content": "{{ nope }}"})
    assert r.status_code == 201, r.text
    admin.new_stage(stage, response_template=template)
    failed = error(
        admin.post("/dry-run", {"message": "hi", "state": {"stage": stage}}), 422, "template_error"
    )
    assert template in failed["message"]
    assert "nope" in failed["message"]
