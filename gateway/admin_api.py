"""The admin API: a business edits its conversation flow, tries it out, and reads its audit log.

Every request carries `Authorization: Bearer <the business's admin API key>` (else 401
`unauthorized`) and acts on that business's flow only. The API speaks in names: stages and
templates are addressed by name, transitions and extraction rules by id; every record also
reports its `id` (a UUID).

Shapes (`null` where a field is optional and unset):

- stage: `{id, name, description, is_entry, selection_template, extraction_template,
  response_template}`, the three templates by name.
- transition: `{id, from, to, condition, priority}`: stage names, a CEL condition (null:
  always), higher priority first.
- template: `{id, name, type, content, system_prompt, variables, version}`; `type` is
  `stage_selection`, `data_extraction` or `response_generation`; `version` is read-only and
  counts changes of the text.
- rule: `{id, field, kind, field_type, stage, pattern, validator}`; `kind` is `pattern` or
  `llm`; `field_type` is `email`, `phone`, `number`, `date` or `text`; `stage` null: every stage.
- flow: `{version, stages, transitions, templates, rules}` (lists of the above).

Endpoints (JSON bodies; creations answer 201 with the record, deletions 204):

- `GET /v1/admin/flow`; `PUT /v1/admin/flow` (a flow; `version` must be the current one, else
  409; records without `id` get a new one) -> the saved flow; `POST /v1/admin/flow/validate`
  (a flow, `version` optional) -> `{valid, problems}`, saving nothing.
- `GET|POST /v1/admin/stages` (`{"stages": [...]}`), `GET|PATCH|DELETE /v1/admin/stages/{name}`.
  POST also takes `"from": [{"stage", "condition", "priority"}]`: incoming transitions created
  with the stage, answered as `"transitions"` beside the stage's fields. DELETE also deletes the
  stage's transitions (both ways) and its rules.
- `GET|POST /v1/admin/transitions`, `PATCH|DELETE /v1/admin/transitions/{id}`.
- `GET|POST /v1/admin/templates`, `GET|PATCH|DELETE /v1/admin/templates/{name}` (a template a
  stage uses cannot be deleted: 409 naming the stages).
- `GET|POST /v1/admin/extraction-rules` (`{"rules": [...]}`), `PATCH|DELETE
  /v1/admin/extraction-rules/{id}`.
- `POST /v1/admin/dry-run` `{message, state: {stage, data, turns, turns_in_stage}}` -> `{stage,
  stage_changed, extracted, data, prompts, errors}`: the pipeline's decisions for that message
  in a made-up conversation (stage: default the entry stage; data: plain values by field;
  turns: user messages before this one). It may ask the model; it stores nothing.
- `GET /v1/admin/audit?limit=` (1-500, default 50) -> `{"entries": [{id, actor_type, actor_id,
  action_type, action_data, created_at}]}`, newest first.

Every write loads the flow, changes it, checks the whole (422 `invalid_flow` with `problems`) and
saves it if its version did not move meanwhile (else 409 `conflict`), with an audit record
`<resource>.<verb>`; then every instance drops its cached copy. A body that cannot be read is 400
`bad_request` naming the field; an unknown name or id in the path is 404 `not_found`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from core.errors import Conflict, CoreError, InvalidInput, NotFound, TemplateError, TooLarge
from core.flow import FlowInvalid, stage_by_name
from core.flow_models import ExtractionRule, ExtractorKind, Flow, Stage, Template, Transition
from core.models import AuditEntry, AuditRecord, Business, Conversation, Message
from core.types import ConversationId, EndUserId, MessageId, Mode, Role, StageName, new_id
from gateway.admin_codec import (
    Body,
    blank_template,
    flow_json,
    flow_record,
    incoming_record,
    problems_of,
    rule_json,
    rule_record,
    stage_json,
    stage_record,
    template_json,
    template_record,
    transition_json,
    transition_record,
)
from gateway.auth import bearer_token, business_for_api_key
from gateway.context import Gateway
from gateway.http_api import _int_param, api, storable_json

log = logging.getLogger(__name__)

MAX_ADMIN_BODY_BYTES = 512 * 1024
"""A whole flow is larger than a chat message: the admin API reads bodies up to this size."""

AdminHandler = Callable[[Request, Gateway, Business], Awaitable[Response]]
R = TypeVar("R")


# --- plumbing ----------------------------------------------------------------------------------


def admin(handler: AdminHandler) -> Callable[[Request], Awaitable[Response]]:
    """Authenticate the business by its admin API key, and answer JSON errors (see `api`)."""

    @api
    @functools.wraps(handler)
    async def wrapper(request: Request) -> Response:
        gw: Gateway = request.app.state.gateway
        business = await authenticate(gw, request)
        try:
            return await handler(request, gw, business)
        except FlowInvalid as exc:
            gw.metrics.error("invalid_flow")
            return invalid_flow_response(exc)

    return wrapper


async def authenticate(gw: Gateway, request: Request) -> Business:
    return await business_for_api_key(gw.store, bearer_token(request.headers.get("authorization")))


def invalid_flow_response(exc: FlowInvalid) -> JSONResponse:
    error = {"code": "invalid_flow", "message": exc.message, "problems": exc.problems}
    return JSONResponse({"error": error}, 422)


async def read_body(request: Request) -> Body:
    raw = await request.body()
    if len(raw) > MAX_ADMIN_BODY_BYTES:
        raise TooLarge(f"request body is over {MAX_ADMIN_BODY_BYTES} bytes")
    try:
        data = orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError:
        raise InvalidInput("request body is not valid JSON") from None
    return Body(storable_json(data))


async def commit(gw: Gateway, loaded: Flow, flow: Flow, action: str, data: dict[str, Any]) -> Flow:
    """Check the changed flow, save it over `loaded` (409 if that moved meanwhile) with an audit
    record, and have every instance drop its cached copy."""
    problems = await checked(flow)
    if problems:
        raise FlowInvalid(problems)
    bid = loaded.business_id
    saved = await gw.store.save_flow(
        bid, flow, expected_version=loaded.version, audit=AuditEntry("admin", action, data)
    )
    gw.conversations.flows.invalidate(bid)
    try:
        await gw.broker.publish_control({"type": "flow_changed", "business_id": bid})
    except CoreError as exc:  # saved all the same: other instances' caches expire by their TTL
        log.warning("flow of %s changed, but the change could not be announced: %s", bid, exc.message)
    return saved


async def checked(flow: Flow) -> list[str]:
    """`problems_of(flow)` on a worker thread: compiling a flow's templates and conditions takes
    time that grows with them (up to about a second for the longest template), and the event loop
    serves every other business meanwhile."""
    return await asyncio.to_thread(problems_of, flow)


def _find(records: tuple[R, ...], match: Callable[[R], bool], what: str) -> R:
    found = next((record for record in records if match(record)), None)
    if found is None:
        raise NotFound(f"no such {what}")
    return found


def _replaced(records: tuple[R, ...], old: R, new: R) -> tuple[R, ...]:
    return tuple(new if record is old else record for record in records)


def _without(records: tuple[R, ...], old: R) -> tuple[R, ...]:
    return tuple(record for record in records if record is not old)


def _name_free(taken: Iterable[str], name: str, what: str) -> None:
    if name in set(taken):
        raise Conflict(f"a {what} named {name!r} already exists")


def _named(flow: Flow, request: Request) -> Stage:
    name = str(request.path_params["name"])
    return _find(flow.stages, lambda s: s.name == name, f"stage {name!r}")


def _template_named(flow: Flow, request: Request) -> Template:
    name = str(request.path_params["name"])
    return _find(flow.templates, lambda t: t.name == name, f"template {name!r}")


def _transition(flow: Flow, request: Request) -> Transition:
    tid = str(request.path_params["id"])
    return _find(flow.transitions, lambda t: t.transition_id == tid, f"transition {tid!r}")


def _rule(flow: Flow, request: Request) -> ExtractionRule:
    rid = str(request.path_params["id"])
    return _find(flow.rules, lambda r: r.rule_id == rid, f"extraction rule {rid!r}")


def _changed(body: Body, *fields: str) -> list[str]:
    return [field for field in fields if body.has(field)]


async def _flow(gw: Gateway, business: Business) -> Flow:
    return await gw.store.get_flow(business.business_id)


# --- the whole flow ----------------------------------------------------------------------------


@admin
async def get_flow(request: Request, gw: Gateway, business: Business) -> Response:
    return JSONResponse(flow_json(await _flow(gw, business)))


@admin
async def put_flow(request: Request, gw: Gateway, business: Business) -> Response:
    body = await read_body(request)
    loaded = await _flow(gw, business)
    flow = flow_record(body, loaded, version_required=True)
    if flow.version != loaded.version:
        raise Conflict(f"the flow is at version {loaded.version}, not {flow.version}: reload it")
    data: dict[str, Any] = {"from_version": loaded.version}
    data.update((kind, len(getattr(flow, kind))) for kind in ("stages", "transitions", "templates", "rules"))
    return JSONResponse(flow_json(await commit(gw, loaded, flow, "flow.replace", data)))


@admin
async def check_flow(request: Request, gw: Gateway, business: Business) -> Response:
    body = await read_body(request)
    flow = flow_record(body, await _flow(gw, business), version_required=False)
    problems = await checked(flow)
    return JSONResponse({"valid": not problems, "problems": problems})


# --- stages ------------------------------------------------------------------------------------

_STAGE_FIELDS = (
    "name",
    "description",
    "is_entry",
    "selection_template",
    "extraction_template",
    "response_template",
)


@admin
async def list_stages(request: Request, gw: Gateway, business: Business) -> Response:
    flow = await _flow(gw, business)
    return JSONResponse({"stages": [stage_json(flow, s) for s in flow.stages]})


@admin
async def get_stage(request: Request, gw: Gateway, business: Business) -> Response:
    flow = await _flow(gw, business)
    return JSONResponse(stage_json(flow, _named(flow, request)))


@admin
async def create_stage(request: Request, gw: Gateway, business: Business) -> Response:
    body = await read_body(request)
    loaded = await _flow(gw, business)
    stage = stage_record(
        body, loaded.templates, Stage(new_id(), loaded.business_id, ""), new=True, extra=("from",)
    )
    _name_free((s.name for s in loaded.stages), stage.name, "stage")
    stages = (*loaded.stages, stage)
    incoming = [incoming_record(item, stages, stage) for item in body.objects("from")]
    flow = replace(loaded, stages=stages, transitions=(*loaded.transitions, *incoming))
    ids = [t.transition_id for t in incoming]
    saved = await commit(
        gw, loaded, flow, "stage.create", {"id": stage.stage_id, "name": stage.name, "transitions": ids}
    )
    answer = stage_json(saved, stage)
    answer["transitions"] = [transition_json(saved, t) for t in saved.transitions if t.transition_id in ids]
    return JSONResponse(answer, 201)


@admin
async def patch_stage(request: Request, gw: Gateway, business: Business) -> Response:
    body = await read_body(request)
    loaded = await _flow(gw, business)
    old = _named(loaded, request)
    stage = stage_record(body, loaded.templates, old, new=False)
    _name_free((s.name for s in loaded.stages if s is not old), stage.name, "stage")
    flow = replace(loaded, stages=_replaced(loaded.stages, old, stage))
    data = {
        "id": stage.stage_id,
        "name": stage.name,
        "was": old.name,
        "fields": _changed(body, *_STAGE_FIELDS),
    }
    saved = await commit(gw, loaded, flow, "stage.update", data)
    return JSONResponse(stage_json(saved, stage))


@admin
async def delete_stage(request: Request, gw: Gateway, business: Business) -> Response:
    loaded = await _flow(gw, business)
    stage = _named(loaded, request)
    sid = stage.stage_id
    transitions = tuple(t for t in loaded.transitions if sid not in (t.from_stage_id, t.to_stage_id))
    rules = tuple(r for r in loaded.rules if r.stage_id != sid)
    flow = replace(loaded, stages=_without(loaded.stages, stage), transitions=transitions, rules=rules)
    data = {
        "id": sid,
        "name": stage.name,
        "transitions": [t.transition_id for t in loaded.transitions if t not in transitions],
        "rules": [r.rule_id for r in loaded.rules if r not in rules],
    }
    await commit(gw, loaded, flow, "stage.delete", data)
    return Response(status_code=204)


# --- transitions -------------------------------------------------------------------------------


@admin
async def list_transitions(request: Request, gw: Gateway, business: Business) -> Response:
    flow = await _flow(gw, business)
    return JSONResponse({"transitions": [transition_json(flow, t) for t in flow.transitions]})


@admin
async def create_transition(request: Request, gw: Gateway, business: Business) -> Response:
    body = await read_body(request)
    loaded = await _flow(gw, business)
    base = Transition(new_id(), loaded.business_id, "", "")
    transition = transition_record(body, loaded.stages, base, new=True)
    flow = replace(loaded, transitions=(*loaded.transitions, transition))
    answer = transition_json(flow, transition)
    await commit(gw, loaded, flow, "transition.create", answer)
    return JSONResponse(answer, 201)


@admin
async def patch_transition(request: Request, gw: Gateway, business: Business) -> Response:
    body = await read_body(request)
    loaded = await _flow(gw, business)
    old = _transition(loaded, request)
    transition = transition_record(body, loaded.stages, old, new=False)
    flow = replace(loaded, transitions=_replaced(loaded.transitions, old, transition))
    answer = transition_json(flow, transition)
    await commit(gw, loaded, flow, "transition.update", answer)
    return JSONResponse(answer)


@admin
async def delete_transition(request: Request, gw: Gateway, business: Business) -> Response:
    loaded = await _flow(gw, business)
    old = _transition(loaded, request)
    flow = replace(loaded, transitions=_without(loaded.transitions, old))
    await commit(gw, loaded, flow, "transition.delete", transition_json(loaded, old))
    return Response(status_code=204)


# --- templates ---------------------------------------------------------------------------------


@admin
async def list_templates(request: Request, gw: Gateway, business: Business) -> Response:
    flow = await _flow(gw, business)
    return JSONResponse({"templates": [template_json(t) for t in flow.templates]})


@admin
async def get_template(request: Request, gw: Gateway, business: Business) -> Response:
    return JSONResponse(template_json(_template_named(await _flow(gw, business), request)))


@admin
async def create_template(request: Request, gw: Gateway, business: Business) -> Response:
    body = await read_body(request)
    loaded = await _flow(gw, business)
    template = template_record(body, blank_template(loaded.business_id), new=True)
    _name_free((t.name for t in loaded.templates), template.name, "template")
    flow = replace(loaded, templates=(*loaded.templates, template))
    data = {"id": template.template_id, "name": template.name, "type": template.type.value}
    await commit(gw, loaded, flow, "template.create", data)
    return JSONResponse(template_json(template), 201)


@admin
async def patch_template(request: Request, gw: Gateway, business: Business) -> Response:
    body = await read_body(request)
    loaded = await _flow(gw, business)
    old = _template_named(loaded, request)
    template = template_record(body, old, new=False)
    _name_free((t.name for t in loaded.templates if t is not old), template.name, "template")
    flow = replace(loaded, templates=_replaced(loaded.templates, old, template))
    fields = _changed(body, "name", "type", "content", "system_prompt", "variables")
    data = {"id": template.template_id, "name": template.name, "was": old.name, "fields": fields}
    saved = await commit(gw, loaded, flow, "template.update", data)
    return JSONResponse(
        template_json(_find(saved.templates, lambda t: t.template_id == old.template_id, "template"))
    )


@admin
async def delete_template(request: Request, gw: Gateway, business: Business) -> Response:
    loaded = await _flow(gw, business)
    old = _template_named(loaded, request)
    tid = old.template_id
    users = [
        s.name
        for s in loaded.stages
        if tid in (s.selection_template_id, s.extraction_template_id, s.response_template_id)
    ]
    if users:
        raise Conflict(f"template {old.name!r} is used by stage(s): {', '.join(map(repr, users))}")
    flow = replace(loaded, templates=_without(loaded.templates, old))
    await commit(gw, loaded, flow, "template.delete", {"id": tid, "name": old.name})
    return Response(status_code=204)


# --- extraction rules --------------------------------------------------------------------------


@admin
async def list_rules(request: Request, gw: Gateway, business: Business) -> Response:
    flow = await _flow(gw, business)
    return JSONResponse({"rules": [rule_json(flow, r) for r in flow.rules]})


@admin
async def create_rule(request: Request, gw: Gateway, business: Business) -> Response:
    body = await read_body(request)
    loaded = await _flow(gw, business)
    base = ExtractionRule(new_id(), loaded.business_id, "", ExtractorKind.PATTERN)
    rule = rule_record(body, loaded.stages, base, new=True)
    flow = replace(loaded, rules=(*loaded.rules, rule))
    answer = rule_json(flow, rule)
    await commit(gw, loaded, flow, "extraction_rule.create", answer)
    return JSONResponse(answer, 201)


@admin
async def patch_rule(request: Request, gw: Gateway, business: Business) -> Response:
    body = await read_body(request)
    loaded = await _flow(gw, business)
    old = _rule(loaded, request)
    rule = rule_record(body, loaded.stages, old, new=False)
    flow = replace(loaded, rules=_replaced(loaded.rules, old, rule))
    answer = rule_json(flow, rule)
    await commit(gw, loaded, flow, "extraction_rule.update", answer)
    return JSONResponse(answer)


@admin
async def delete_rule(request: Request, gw: Gateway, business: Business) -> Response:
    loaded = await _flow(gw, business)
    old = _rule(loaded, request)
    flow = replace(loaded, rules=_without(loaded.rules, old))
    await commit(gw, loaded, flow, "extraction_rule.delete", rule_json(loaded, old))
    return Response(status_code=204)


# --- dry run and audit -------------------------------------------------------------------------


@admin
async def dry_run(request: Request, gw: Gateway, business: Business) -> Response:
    body = await read_body(request)
    body.only("message", "state")
    flow = await _flow(gw, business)
    message, conversation = _dry_run_input(body, gw, business, flow)
    try:
        prepared = await gw.conversations.pipeline.prepare(business, conversation, flow, message, [])
    except TemplateError as exc:
        error = {"code": "template_error", "message": exc.message, "problems": [exc.message]}
        return JSONResponse({"error": error}, 422)
    extracted = {
        field: entry["value"]
        for field, entry in prepared.data.items()
        if isinstance(entry, dict) and entry.get("source_message_id") == message.message_id
    }
    prompts = {
        step: [{"role": m.role, "content": m.content} for m in prompt]
        for step, prompt in prepared.prompts.items()
    }
    answer = {
        "stage": prepared.stage,
        "stage_changed": prepared.stage_changed,
        "extracted": extracted,
        "data": prepared.data,
        "prompts": prompts,
        "errors": list(prepared.errors),
    }
    return JSONResponse(answer)


def _dry_run_input(body: Body, gw: Gateway, business: Business, flow: Flow) -> tuple[Message, Conversation]:
    """A made-up conversation (in the state the body gives) and user message; neither is stored."""
    text = body.text("message")
    if not text.strip() or len(text) > gw.settings.max_message_chars:
        raise body.bad(
            "message", f"must hold 1 to {gw.settings.max_message_chars} characters, not only blanks"
        )
    state = body.obj("state")
    state.only("stage", "data", "turns", "turns_in_stage")
    entry = next((s.name for s in flow.stages if s.is_entry), business.entry_stage)
    stage = state.text("stage", entry)
    if flow.stages and stage_by_name(flow, stage) is None:
        raise state.bad("stage", f"names no stage: {stage!r}")
    data = {
        field: {"value": value, "extractor": "dry-run", "source_message_id": None}
        for field, value in state.mapping("data").items()
    }
    now = datetime.now(UTC)
    conversation = Conversation(
        conversation_id=ConversationId(new_id()),
        business_id=business.business_id,
        end_user_id=EndUserId("dry-run"),
        mode=Mode.AI,
        stage=StageName(stage),
        created_at=now,
        data=data,
        turns=state.integer("turns", 0, 0),
        turns_in_stage=state.integer("turns_in_stage", 0, 0),
    )
    message = Message(MessageId(new_id()), conversation.conversation_id, Role.USER, text, now)
    return message, conversation


@admin
async def audit(request: Request, gw: Gateway, business: Business) -> Response:
    limit = _int_param(request, "limit", 50, 1, 500)
    records = await gw.store.list_audit(business.business_id, limit=limit)
    return JSONResponse({"entries": [_audit_json(r) for r in records]})


def _audit_json(record: AuditRecord) -> dict[str, Any]:
    return {
        "id": record.log_id,
        "actor_type": record.entry.actor_type,
        "actor_id": record.entry.actor_id,
        "action_type": record.entry.action_type,
        "action_data": dict(record.entry.action_data),
        "created_at": record.created_at.isoformat(),
    }


def routes() -> list[BaseRoute]:
    """The admin API's routes, for the application's route list."""
    prefix = "/v1/admin"
    table: list[tuple[str, str, Callable[[Request], Awaitable[Response]]]] = [
        ("GET", "/flow", get_flow),
        ("PUT", "/flow", put_flow),
        ("POST", "/flow/validate", check_flow),
        ("GET", "/stages", list_stages),
        ("POST", "/stages", create_stage),
        ("GET", "/stages/{name}", get_stage),
        ("PATCH", "/stages/{name}", patch_stage),
        ("DELETE", "/stages/{name}", delete_stage),
        ("GET", "/transitions", list_transitions),
        ("POST", "/transitions", create_transition),
        ("PATCH", "/transitions/{id}", patch_transition),
        ("DELETE", "/transitions/{id}", delete_transition),
        ("GET", "/templates", list_templates),
        ("POST", "/templates", create_template),
        ("GET", "/templates/{name}", get_template),
        ("PATCH", "/templates/{name}", patch_template),
        ("DELETE", "/templates/{name}", delete_template),
        ("GET", "/extraction-rules", list_rules),
        ("POST", "/extraction-rules", create_rule),
        ("PATCH", "/extraction-rules/{id}", patch_rule),
        ("DELETE", "/extraction-rules/{id}", delete_rule),
        ("POST", "/dry-run", dry_run),
        ("GET", "/audit", audit),
    ]
    return [Route(prefix + path, endpoint, methods=[method]) for method, path, endpoint in table]
