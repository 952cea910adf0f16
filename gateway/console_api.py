"""What the agent console reads over HTTP beside its socket, with an agent token, and the one-click
demo agent of the embedded default.

With `Authorization: Bearer <agent token>` (an enabled agent's; see docs/agents.md), for the
token's business only:

- `GET /v1/agents/me/flow` -> `{version, stages: [{id, name, description, is_entry}], transitions:
  [{id, from, to, condition, priority}], rules: [{id, field, kind, field_type, stage}]}`: the
  business's flow, read-only, to draw it. Templates (the prompts) are not in it.
- `GET /v1/agents/me/team` -> `{agents: [{agent_id, name, disabled}]}`: the business's agents,
  oldest first, so that the console names who holds a conversation.

The demo agent (`GET` and `POST /v1/demo/agent`) exists only on the embedded default: the memory
store (no `DATABASE_URL`) and `CHATGW_DEMO_AGENT` on (the default). There, the demo business is a
throwaway sample that lives in the process's memory, and anyone who can open the demo page can
also try the console: `POST` creates the agent "Demo agent" of the demo business once (later calls
reuse it) and returns a token for it. Elsewhere both answer 404 `not_found`: a gateway keeping
real conversations in PostgreSQL never hands out an agent token without the admin key.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from core.errors import Conflict, NotFound
from core.models import Agent, AuditEntry, Business
from gateway.admin_codec import rule_json, transition_json
from gateway.auth import Principal, active_agent, bearer_token, looks_like_token
from gateway.context import Gateway
from gateway.demo import DEMO_PUBLIC_ID
from gateway.errors import Unauthorized
from gateway.http_api import api

DEMO_AGENT_NAME = "Demo agent"
_demo_agent_lock = asyncio.Lock()  # one "Demo agent", however many first clicks come at once


async def _agent(gw: Gateway, request: Request) -> Principal:
    """The principal of the request's agent token, if its agent may act (401 or 403 otherwise)."""
    credential = bearer_token(request.headers.get("authorization"))
    if not looks_like_token(credential):
        raise Unauthorized("this needs an agent token (the admin key reads the flow at GET /v1/admin/flow)")
    principal = gw.tokens.verify(credential)
    await active_agent(gw.store, principal)
    return principal


@api
async def my_flow(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    principal = await _agent(gw, request)
    flow = await gw.conversations.flows.get(principal.business_id)
    stages = [
        {"id": s.stage_id, "name": s.name, "description": s.description, "is_entry": s.is_entry}
        for s in flow.stages
    ]
    rules = [
        {k: v for k, v in rule_json(flow, r).items() if k not in ("pattern", "validator")} for r in flow.rules
    ]
    body = {
        "version": flow.version,
        "stages": stages,
        "transitions": [transition_json(flow, t) for t in flow.transitions],
        "rules": rules,
    }
    return JSONResponse(body)


@api
async def my_team(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    principal = await _agent(gw, request)
    agents = await gw.store.list_agents(principal.business_id)
    team = [{"agent_id": a.agent_id, "name": a.name, "disabled": a.disabled} for a in agents]
    return JSONResponse({"agents": team})


def demo_agent_available(gw: Gateway) -> bool:
    """Whether this gateway hands out the demo agent: only on the memory store, when allowed."""
    return gw.settings.database_url is None and gw.settings.demo_agent


async def _demo_business(gw: Gateway) -> Business:
    if not demo_agent_available(gw):
        raise NotFound(
            "this gateway has no demo agent (only the embedded default has one, with the memory store "
            "and CHATGW_DEMO_AGENT on): sign in with an agent token made with the admin key"
        )
    return await gw.store.get_business_by_public_id(DEMO_PUBLIC_ID)


@api
async def describe_demo_agent(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    business = await _demo_business(gw)
    return JSONResponse({"business": business.public_id, "name": DEMO_AGENT_NAME})


@api
async def issue_demo_agent(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    business = await _demo_business(gw)
    async with _demo_agent_lock:
        agent = await _reuse_or_create(gw, business)
    token = gw.tokens.issue_agent(business.business_id, agent.agent_id)
    await _audit(gw, business, "agent.token", agent)
    body: dict[str, Any] = {
        "token": token,
        "agent_id": agent.agent_id,
        "name": agent.name,
        "business": business.public_id,
        "expires_in": gw.tokens.agent_ttl,
    }
    return JSONResponse(body, 201)


async def _reuse_or_create(gw: Gateway, business: Business) -> Agent:
    """The demo business's "Demo agent", made on first use. One that an admin disabled stays so."""
    agents = await gw.store.list_agents(business.business_id)
    agent = next((a for a in agents if a.name == DEMO_AGENT_NAME), None)
    if agent is None:
        agent = await gw.store.create_agent(business.business_id, DEMO_AGENT_NAME)
        await _audit(gw, business, "agent.create", agent)
    if agent.disabled:
        raise Conflict(f"the demo agent {agent.agent_id} was disabled by the demo business's admin")
    return agent


async def _audit(gw: Gateway, business: Business, action: str, agent: Agent) -> None:
    data = {"agent_id": agent.agent_id, "name": agent.name, "via": "demo"}
    await gw.store.add_audit(business.business_id, AuditEntry("system", action, data))


def routes() -> list[BaseRoute]:
    """The console's routes, for the application's route list."""
    table: list[tuple[str, str, Callable[[Request], Awaitable[Response]]]] = [
        ("GET", "/v1/agents/me/flow", my_flow),
        ("GET", "/v1/agents/me/team", my_team),
        ("GET", "/v1/demo/agent", describe_demo_agent),
        ("POST", "/v1/demo/agent", issue_demo_agent),
    ]
    return [Route(path, endpoint, methods=[method]) for method, path, endpoint in table]
