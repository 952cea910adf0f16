"""Agents and the audit log over HTTP, for a business's admin API key.

Every request carries `Authorization: Bearer <the business's admin API key>` (else 401) and sees
that business only: another business's agent is 404 `not_found`, like one that does not exist.

- `POST /v1/agents` `{name}` -> 201 the agent; `GET /v1/agents` -> `{agents}`, oldest first;
  `GET /v1/agents/{agent_id}` -> the agent; `PATCH /v1/agents/{agent_id}` `{disabled}` -> the
  agent. An agent is `{agent_id, name, disabled, created_at}`.
- `POST /v1/agents/{agent_id}/tokens` -> `{token, agent_id, expires_in}`: a token for the agent
  console (409 `conflict` for a disabled agent). Disabling an agent also stops the tokens it holds.
- `GET /v1/audit?conversation_id=&agent_id=&action=&since=&until=&limit=&cursor=` ->
  `{entries: [{log_id, actor_type, actor_id, action, data, conversation_id, created_at}],
  next_cursor}`, newest first; `next_cursor` (null on the last page) continues the listing.

Creating, disabling and enabling an agent and issuing it a token each write an audit record
(`agent.create`, `agent.disable`, `agent.enable`, `agent.token`; actor `admin`).
"""

from __future__ import annotations

import unicodedata
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from core.errors import Conflict, InvalidInput
from core.models import Agent, AuditEntry, AuditRecord, Business
from core.types import AgentId, ConversationId
from gateway.admin_api import admin, read_body
from gateway.context import Gateway
from gateway.http_api import _int_param

MAX_NAME_CHARS = 100
MAX_ACTION_CHARS = 50  # audit_logs.action_type is varchar(50)
IdT = TypeVar("IdT", ConversationId, AgentId)
_AUDIT_PARAMS = frozenset({"conversation_id", "agent_id", "action", "since", "until", "limit", "cursor"})


def agent_json(agent: Agent) -> dict[str, Any]:
    return {
        "agent_id": agent.agent_id,
        "name": agent.name,
        "disabled": agent.disabled,
        "created_at": agent.created_at.isoformat(),
    }


def audit_json(record: AuditRecord) -> dict[str, Any]:
    return {
        "log_id": record.log_id,
        "actor_type": record.entry.actor_type,
        "actor_id": record.actor_id,
        "action": record.entry.action_type,
        "data": dict(record.entry.action_data),
        "conversation_id": record.conversation_id,
        "created_at": record.created_at.isoformat(),
    }


async def _audit(gw: Gateway, business: Business, action: str, agent: Agent) -> None:
    data = {"agent_id": agent.agent_id, "name": agent.name}
    await gw.store.add_audit(business.business_id, AuditEntry("admin", action, data))


def _agent_id(request: Request) -> AgentId:
    return AgentId(str(request.path_params["agent_id"]))


# --- agents ------------------------------------------------------------------------------------


@admin
async def create_agent(request: Request, gw: Gateway, business: Business) -> Response:
    body = await read_body(request)
    body.only("name")
    name = body.text("name").strip()
    if not 1 <= len(name) <= MAX_NAME_CHARS or any(unicodedata.category(c) == "Cc" for c in name):
        raise body.bad(
            "name", f"must hold 1 to {MAX_NAME_CHARS} characters, not only blanks, no control characters"
        )
    agent = await gw.store.create_agent(business.business_id, name)
    await _audit(gw, business, "agent.create", agent)
    return JSONResponse(agent_json(agent), 201)


@admin
async def list_agents(request: Request, gw: Gateway, business: Business) -> Response:
    agents = await gw.store.list_agents(business.business_id)
    return JSONResponse({"agents": [agent_json(a) for a in agents]})


@admin
async def get_agent(request: Request, gw: Gateway, business: Business) -> Response:
    return JSONResponse(agent_json(await gw.store.get_agent(business.business_id, _agent_id(request))))


@admin
async def patch_agent(request: Request, gw: Gateway, business: Business) -> Response:
    body = await read_body(request)
    body.only("disabled")
    if not body.has("disabled"):
        raise body.bad("disabled", "is required")
    disabled = body.flag("disabled", False)
    agent = await gw.store.get_agent(business.business_id, _agent_id(request))
    if agent.disabled != disabled:  # a request that changes nothing records nothing
        agent = await gw.store.set_agent_disabled(business.business_id, agent.agent_id, disabled)
        await _audit(gw, business, "agent.disable" if disabled else "agent.enable", agent)
    return JSONResponse(agent_json(agent))


@admin
async def issue_token(request: Request, gw: Gateway, business: Business) -> Response:
    agent = await gw.store.get_agent(business.business_id, _agent_id(request))
    if agent.disabled:
        raise Conflict(
            f"agent {agent.agent_id} is disabled: enable it first"
            f' (PATCH /v1/agents/{agent.agent_id} with {{"disabled": false}})'
        )
    token = gw.tokens.issue_agent(business.business_id, agent.agent_id)
    await _audit(gw, business, "agent.token", agent)
    return JSONResponse({"token": token, "agent_id": agent.agent_id, "expires_in": gw.tokens.agent_ttl}, 201)


# --- the audit log -----------------------------------------------------------------------------


@admin
async def list_audit(request: Request, gw: Gateway, business: Business) -> Response:
    unknown = sorted(set(request.query_params) - _AUDIT_PARAMS)
    if unknown:
        raise InvalidInput(f"unknown query parameter(s): {', '.join(unknown)}")
    limit = _int_param(request, "limit", 50, 1, 500)
    records = await gw.store.list_audit(
        business.business_id,
        limit=limit + 1,  # one more tells whether there is a next page
        conversation_id=_id_param(request, "conversation_id", ConversationId),
        actor_id=_id_param(request, "agent_id", AgentId),
        action_type=_action_param(request),
        since=_time_param(request, "since"),
        until=_time_param(request, "until"),
        before=_param(request, "cursor"),
    )
    page = records[:limit]
    next_cursor = page[-1].cursor if len(records) > limit else None
    return JSONResponse({"entries": [audit_json(r) for r in page], "next_cursor": next_cursor})


def _param(request: Request, name: str) -> str | None:
    """A query parameter; absent or empty is None."""
    return request.query_params.get(name) or None


def _id_param(request: Request, name: str, kind: Callable[[str], IdT]) -> IdT | None:
    raw = _param(request, name)
    if raw is None:
        return None
    try:
        return kind(str(uuid.UUID(raw)))
    except ValueError:
        raise InvalidInput(f"query parameter {name} must be an id (a UUID)") from None


def _action_param(request: Request) -> str | None:
    action = _param(request, "action")
    if action is not None and len(action) > MAX_ACTION_CHARS:
        raise InvalidInput(f"query parameter action must be at most {MAX_ACTION_CHARS} characters")
    return action


def _time_param(request: Request, name: str) -> datetime | None:
    """An ISO 8601 time; one without a UTC offset is read as UTC."""
    raw = _param(request, name)
    if raw is None:
        return None
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise InvalidInput(
            f"query parameter {name} must be an ISO 8601 time, such as 2025-01-31T09:30:00Z"
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def routes() -> list[BaseRoute]:
    """The agents' and the audit log's routes, for the application's route list."""
    table: list[tuple[str, str, Callable[[Request], Awaitable[Response]]]] = [
        ("GET", "/v1/agents", list_agents),
        ("POST", "/v1/agents", create_agent),
        ("GET", "/v1/agents/{agent_id}", get_agent),
        ("PATCH", "/v1/agents/{agent_id}", patch_agent),
        ("POST", "/v1/agents/{agent_id}/tokens", issue_token),
        ("GET", "/v1/audit", list_audit),
    ]
    return [Route(path, endpoint, methods=[method]) for method, path, endpoint in table]
