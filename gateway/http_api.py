"""HTTP endpoints: widget sessions, history, health, readiness, metrics.

Every error is a JSON body `{"error": {"code", "message"}}` with a 4xx or 5xx status.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Match, Route

from core.conversation import message_payload
from core.errors import CoreError, Forbidden, InvalidInput, NotFound, Overloaded, TooLarge, Unavailable
from core.models import Business, Conversation, Message
from core.types import BusinessId, ConversationId, EndUserId, EventType, StageName
from gateway.auth import active_agent, bearer_token, business_for_api_key, looks_like_token
from gateway.context import Gateway
from gateway.errors import GatewayError, Unauthorized
from gateway.limits import Limit, RateLimited
from gateway.limits_http import limit_response
from gateway.origins import origin_problem
from gateway.protocol import unstorable, unstorable_in

log = logging.getLogger(__name__)

# How long after its expiry a widget token still proves its conversation when asking for a new one.
CONTINUE_GRACE_SECONDS = 7 * 24 * 3600
MAX_BODY_BYTES = 16 * 1024

_STATUS = {
    "bad_request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "conflict": 409,
    "too_large": 413,
    "rate_limited": 429,
    "unavailable": 503,
}

Handler = Callable[[Request], Awaitable[Response]]


def error_response(code: str, message: str, *, retry_after_ms: int | None = None) -> JSONResponse:
    return limit_response(code, _STATUS.get(code, 500), message, retry_after_ms)


def api(handler: Handler) -> Handler:
    """Turn the core's and the gateway's errors into JSON error responses."""

    @functools.wraps(handler)
    async def wrapper(request: Request) -> Response:
        gw: Gateway = request.app.state.gateway
        try:
            _check_params(request)
            return await handler(request)
        except (CoreError, GatewayError) as exc:
            gw.metrics.error(exc.code)
            retry = exc.retry_after_ms if isinstance(exc, Unavailable | RateLimited) else None
            return error_response(exc.code, exc.message, retry_after_ms=retry)
        except Exception:
            log.exception("request failed: %s %s", request.method, request.url.path)
            gw.metrics.error("internal")
            return error_response("internal", "internal error")

    return wrapper


def _check_params(request: Request) -> None:
    """Refuse path and query parameters holding text that cannot be stored (a NUL character)."""
    params = [*request.path_params.items(), *request.query_params.multi_items()]
    for name, value in params:
        problem = unstorable(str(name)) or unstorable(str(value))
        if problem is not None:
            raise InvalidInput(f"parameter {str(name)[:40]!r} holds {problem}")


def storable_json(data: Any) -> Any:
    """`data` (decoded JSON), if every string in it can be stored; else `InvalidInput` naming it."""
    problem = unstorable_in(data)
    if problem is not None:
        raise InvalidInput(problem)
    return data


async def _json_object(request: Request) -> dict[str, Any]:
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise TooLarge(f"request body is over {MAX_BODY_BYTES} bytes")
    try:
        data = orjson.loads(body or b"{}")
    except orjson.JSONDecodeError:
        raise InvalidInput("request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidInput("request body must be a JSON object")
    storable_json(data)
    return data


def browser_facing(handler: Handler) -> Handler:
    """CORS for an endpoint the widget calls from the business's pages (cross-origin, with a
    bearer token and never cookies). A preflight is answered for any origin: it carries no
    credentials and reveals nothing. The answer itself names the page's origin only once the
    endpoint let it through: the endpoint refuses a disallowed origin with 403 (whose JSON body the
    page may read, to say why)."""

    @functools.wraps(handler)
    async def wrapper(request: Request) -> Response:
        origin = request.headers.get("origin")
        if request.method == "OPTIONS":
            response: Response = Response(status_code=204)
            if origin is not None and request.headers.get("access-control-request-method"):
                response.headers.update(
                    {
                        "Access-Control-Allow-Origin": origin,
                        "Access-Control-Allow-Methods": "GET, POST",
                        "Access-Control-Allow-Headers": "Authorization, Content-Type",
                        "Access-Control-Max-Age": "600",
                    }
                )
        else:
            response = await handler(request)
            if origin is not None:
                response.headers["Access-Control-Allow-Origin"] = origin
                response.headers["Access-Control-Expose-Headers"] = "Retry-After"
        response.headers["Vary"] = "Origin"
        return response

    return wrapper


def check_origin(request: Request, business: Business, *, agent: bool = False) -> None:
    """`Forbidden` unless the request's `Origin` may use the business's chat (gateway.origins)."""
    problem = origin_problem(
        business, request.headers.get("origin"), request.headers.get("host"), agent=agent
    )
    if problem is not None:
        raise Forbidden(problem)


MAX_USER_ID_CHARS = 255


def verified_user(business: Business, user: Any) -> str:
    """The business's own id of the user a widget session is for, once `user` = `{id, hash}` proves
    it: `hash` is the HMAC-SHA256 of `id` under the business's identity secret, in hex, made by the
    business's server. An unverifiable claim is refused, never trusted."""
    if (
        not isinstance(user, dict)
        or not isinstance(user.get("id"), str)
        or not isinstance(user.get("hash"), str)
    ):
        raise InvalidInput('field \'user\' must be an object {"id": string, "hash": string}')
    user_id: str = user["id"]
    claimed: str = user["hash"]
    if not 1 <= len(user_id) <= MAX_USER_ID_CHARS:
        raise InvalidInput(f"field 'user.id' must hold 1 to {MAX_USER_ID_CHARS} characters")
    secret = business.identity_secret
    if secret is None:
        raise InvalidInput(
            f"business {business.public_id!r} has no identity secret, so 'user' cannot be verified: "
            "its admin creates one (POST /v1/admin/identity-secret), or the page leaves 'user' out"
        )
    expected = hmac.new(secret.encode(), user_id.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, claimed.strip().lower()):
        raise Forbidden(
            "field 'user.hash' is not the HMAC-SHA256 of 'user.id' under the business's identity secret"
        )
    return user_id


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidInput(f"query parameter {name} must be an integer") from None
    if not low <= value <= high:
        raise InvalidInput(f"query parameter {name} must be between {low} and {high}")
    return value


@browser_facing
@api
async def create_widget_session(request: Request) -> Response:
    """POST /v1/widget/sessions: a token and a conversation for a visitor, anonymous or (with
    `user`) verified."""
    gw: Gateway = request.app.state.gateway
    body = await _json_object(request)
    public_id = body.get("business")
    if not isinstance(public_id, str) or not public_id:
        raise InvalidInput("field 'business' (the business's public id) is required")
    if body.get("conversation_id") is None:
        _admit_new_conversation(gw)
    business = await gw.store.get_business_by_public_id(public_id)
    check_origin(request, business)
    bid = business.business_id
    external_id = verified_user(business, body["user"]) if body.get("user") is not None else None
    end_user = await gw.store.ensure_end_user(bid, external_id) if external_id is not None else None
    cid = body.get("conversation_id")
    if cid is None:
        await _count_new_session(gw, request)
        end_user = end_user or await gw.store.create_end_user(bid, None)
        flow = await gw.conversations.flows.get(bid)
        start = next((s.name for s in flow.stages if s.is_entry), business.entry_stage)
        conversation = await gw.store.create_conversation(bid, end_user, StageName(start))
        await _announce(gw, conversation)
        status = 201
    else:
        if not isinstance(cid, str) or not cid:
            raise InvalidInput("field 'conversation_id' must be a string")
        conversation = await _continued(gw, request, bid, ConversationId(cid), end_user)
        end_user = conversation.end_user_id
        status = 200
    token = gw.tokens.issue_widget(bid, end_user, conversation.conversation_id)
    return JSONResponse(
        {
            "token": token,
            "conversation_id": conversation.conversation_id,
            "business": business.public_id,
            "expires_in": gw.tokens.ttl,
            "verified": external_id is not None,
        },
        status,
    )


def _admit_new_conversation(gw: Gateway) -> None:
    """Refuse a new conversation (503 `unavailable`, `Retry-After`) while the instance is
    overloaded (its event loop or its database pool late beyond CHATGW_OVERLOAD_ARRIVALS_LAG_MS or
    CHATGW_OVERLOAD_ARRIVALS_DB_WAIT_MS), before it costs a query (core.admission)."""
    try:
        gw.conversations.answers.admission.admit_arrival("a new conversation")
    except Overloaded:
        gw.metrics.arrivals_refused.labels("session").inc()
        raise


async def _count_new_session(gw: Gateway, request: Request) -> None:
    """A new conversation costs rows and may cost answers: count it against the client address."""
    address = request.client.host if request.client is not None else None
    if address is not None and not gw.limits.exempt(address):
        await gw.limits.hit(Limit.IP_WIDGET_SESSIONS, address)


async def _continued(
    gw: Gateway, request: Request, bid: BusinessId, cid: ConversationId, verified: EndUserId | None
) -> Conversation:
    """The conversation a session continues: proved by an earlier token of it (expired up to
    `CONTINUE_GRACE_SECONDS` ago), or by the verified identity of the user it belongs to."""
    if verified is not None:
        try:
            conversation = await gw.store.get_conversation(bid, cid)
        except NotFound:
            conversation = None
        if conversation is not None and conversation.end_user_id == verified:
            return conversation
    try:
        credential = bearer_token(request.headers.get("authorization"))
    except Unauthorized:
        if verified is not None:
            raise Forbidden("that conversation is not the verified user's") from None
        raise
    previous = gw.tokens.verify(credential, expired_grace=CONTINUE_GRACE_SECONDS)
    if previous.business_id != bid or previous.conversation_id != cid:
        raise Forbidden("the Authorization token is not for that conversation")
    return await gw.store.get_conversation(bid, cid)


async def _announce(gw: Gateway, conversation: Conversation) -> None:
    """Tell the business's agents that a conversation was created (a live view: best effort)."""
    payload = {
        "mode": conversation.mode.value,
        "stage": conversation.stage,
        "created_at": conversation.created_at.isoformat(),
    }
    try:
        await gw.broker.publish_feed(
            conversation.business_id, conversation.conversation_id, EventType.CONVERSATION, payload
        )
    except CoreError as exc:
        log.warning("announcing a new conversation failed: %s", exc.message)


@browser_facing
@api
async def list_messages(request: Request) -> Response:
    """GET /v1/conversations/{id}/messages?after_seq=&limit=: history, in seq order (a widget
    token of the conversation, an agent token or the admin key of its business)."""
    gw: Gateway = request.app.state.gateway
    cid = ConversationId(request.path_params["conversation_id"])
    bid = await _history_reader(gw, request, cid)
    after_seq = _int_param(request, "after_seq", 0, 0, 2**62)
    limit = _int_param(request, "limit", 100, 1, 500)
    conversation = await gw.store.get_conversation(bid, cid)
    # The position is read before the rows: a client that resets can go live from this seq
    # without a gap; a message it then sees twice has the same message_id.
    position = await gw.conversations.open_stream(bid, cid, conversation)
    rows = await gw.store.list_messages(bid, cid, after_seq=after_seq, limit=limit)
    return JSONResponse(
        {
            "messages": [history_item(m) for m in rows],
            "epoch": position.epoch,
            "seq": position.seq,
            "has_more": len(rows) == limit,
        }
    )


def history_item(message: Message) -> dict[str, Any]:
    item: dict[str, Any] = {"seq": message.seq, **message_payload(message)}
    if message.status is not None:
        item["status"] = message.status.value
        item["response_id"] = message.response_id
    return item


async def _history_reader(gw: Gateway, request: Request, cid: ConversationId) -> BusinessId:
    """The business whose conversation `cid` the caller may read: a widget token of that
    conversation, an agent token (of an enabled agent) or the admin API key. For the latter two
    the conversation is looked up in their own business only, so another business's conversation
    is `not_found` exactly like one that does not exist."""
    credential = bearer_token(request.headers.get("authorization"))
    if not looks_like_token(credential):
        business = await business_for_api_key(gw.store, credential)
        check_origin(request, business, agent=True)
        return business.business_id
    principal = gw.tokens.verify(credential)
    if principal.role == "agent":
        await active_agent(gw.store, principal)
    elif principal.conversation_id != cid:
        raise Forbidden("this token is not for that conversation")
    business = await gw.store.get_business(principal.business_id)
    check_origin(request, business, agent=principal.role == "agent")
    return principal.business_id


def _operator(request: Request) -> Response | None:
    """A 401 unless the request carries `CHATGW_METRICS_TOKEN` (when it is set) as its bearer."""
    gw: Gateway = request.app.state.gateway
    expected = gw.settings.metrics_token
    if expected is None:
        return None
    try:
        given = bearer_token(request.headers.get("authorization"))
    except Unauthorized as exc:
        return error_response(exc.code, f"{exc.message}: this endpoint needs CHATGW_METRICS_TOKEN")
    if not hmac.compare_digest(given.encode(), expected.encode()):
        return error_response("unauthorized", "wrong token: this endpoint needs CHATGW_METRICS_TOKEN")
    return None


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """200 when every dependency answers, 503 otherwise; each dependency reported by name."""
    refused = _operator(request)
    if refused is not None:
        return refused
    gw: Gateway = request.app.state.gateway
    checks: dict[str, dict[str, Any]] = {}
    for name, (backend, ping) in gw.checks.items():
        try:
            await asyncio.wait_for(ping(), 5)
            checks[name] = {"backend": backend, "ok": True}
        except Exception as exc:
            checks[name] = {"backend": backend, "ok": False, "error": str(exc) or type(exc).__name__}
    ok = all(c["ok"] for c in checks.values()) and not gw.draining
    status = "draining" if gw.draining else "ok" if ok else "unavailable"
    return JSONResponse({"status": status, "checks": checks}, 200 if ok else 503)


# The conversations-by-mode gauge is counted in the store at most this often, when /metrics is read.
CONVERSATION_COUNT_S = 5.0


async def metrics(request: Request) -> Response:
    refused = _operator(request)
    if refused is not None:
        return refused
    gw: Gateway = request.app.state.gateway
    now = time.monotonic()
    if now - gw.metrics.conversations_counted_at >= CONVERSATION_COUNT_S:
        gw.metrics.conversations_counted_at = now
        try:
            counts = await gw.store.count_active_conversations(active_within_s=gw.settings.snapshot_window_s)
        except CoreError as exc:  # the other metrics are still worth serving
            log.warning("counting conversations failed: %s", exc.message)
        else:
            for mode, count in counts.items():
                gw.metrics.conversations.labels(mode.value).set(count)
    return Response(gw.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


async def http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 and 405 (no route, a method a route does not take) as JSON on the API
    (`/v1/...`), with `Allow` naming the methods the path does take; plain text elsewhere."""
    assert isinstance(exc, HTTPException)
    if not request.url.path.startswith("/v1/"):
        if exc.status_code in (204, 304):
            return Response(status_code=exc.status_code, headers=exc.headers)
        return PlainTextResponse(exc.detail, exc.status_code, headers=exc.headers)
    allowed: set[str] = set()
    for route in request.app.routes:
        if isinstance(route, Route) and route.methods and route.matches(request.scope)[0] is not Match.NONE:
            allowed |= route.methods
    if allowed and request.method not in allowed:
        methods = ", ".join(sorted(allowed))
        return JSONResponse(
            {
                "error": {
                    "code": "method_not_allowed",
                    "message": f"{request.method} is not allowed here: use {methods}",
                }
            },
            405,
            headers={"Allow": methods},
        )
    if exc.status_code in (404, 405):
        return error_response("not_found", f"no such endpoint: {request.method} {request.url.path}")
    return JSONResponse(
        {"error": {"code": f"http_{exc.status_code}", "message": exc.detail}}, exc.status_code
    )
