"""The HTTP side of the limits: request bodies and request rates, before any handler runs.

- A body whose `Content-Length` is over CHATGW_MAX_BODY_BYTES is refused at once (413), unread;
  a body without one (chunked) is counted while it streams in, and reading past the limit raises
  `BodyTooLarge` (413) before more of it is buffered.
- API requests (`/v1/...`) count against the client address (CHATGW_LIMIT_IP_HTTP, unless the
  address is exempt) and against their credential (CHATGW_LIMIT_KEY_HTTP: the admin API key or
  token in `Authorization`, known by a hash). Over either: 429 with `Retry-After`. Requests from
  an exempt address (CHATGW_LIMIT_EXEMPT_IPS: a trusted network, a load test) are not counted.

Every refusal is the API's JSON error body `{"error": {"code", "message"}}`.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.errors import TooLarge
from gateway.limits import Limit, RateLimited, key_id

if TYPE_CHECKING:
    from gateway.context import Gateway


class BodyTooLarge(TooLarge):
    """The request body grew past CHATGW_MAX_BODY_BYTES while it was being read."""


def limit_response(code: str, status: int, message: str, retry_after_ms: int | None = None) -> JSONResponse:
    error: dict[str, object] = {"code": code, "message": message}
    headers = None
    if retry_after_ms is not None:
        error["retry_after_ms"] = retry_after_ms
        headers = {"Retry-After": str(max(1, math.ceil(retry_after_ms / 1000)))}
    return JSONResponse({"error": error}, status, headers=headers)


class LimitsMiddleware:
    def __init__(self, app: ASGIApp, *, gateway: Gateway) -> None:
        self.app = app
        self.gw = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        most = self.gw.settings.limits.max_body_bytes
        refusal = self._length_refusal(Headers(scope=scope), most)
        if refusal is None and scope["path"].startswith("/v1/"):
            refusal = await self._rate_refusal(scope)
        if refusal is not None:
            _readable_by_the_widget(refusal, scope)
            await refusal(scope, receive, send)
            return
        await self._call_with_body_cap(scope, receive, send, most)

    def _length_refusal(self, headers: Headers, most: int) -> JSONResponse | None:
        raw = headers.get("content-length")
        if raw is None:
            return None
        if not raw.isdigit():
            return limit_response("bad_request", 400, "Content-Length must be a number of bytes")
        if int(raw) > most:
            self.gw.metrics.error("too_large")
            return limit_response("too_large", 413, f"request body is over {most} bytes")
        return None

    async def _rate_refusal(self, scope: Scope) -> JSONResponse | None:
        limits = self.gw.limits
        client = scope.get("client")
        address = client[0] if client else None
        if limits.exempt(address):
            return None
        try:
            if address is not None:
                await limits.hit(Limit.IP_HTTP, address)
            credential = _bearer(Headers(scope=scope))
            if credential is not None:
                await limits.hit(Limit.KEY_HTTP, key_id(credential))
        except RateLimited as exc:
            self.gw.metrics.error("rate_limited")
            return limit_response("rate_limited", 429, exc.message, exc.retry_after_ms)
        return None

    async def _call_with_body_cap(self, scope: Scope, receive: Receive, send: Send, most: int) -> None:
        received = 0
        started = False

        async def capped_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > most:
                    raise BodyTooLarge(f"request body is over {most} bytes")
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, capped_receive, watched_send)
        except BodyTooLarge as exc:  # a handler that does not map errors itself
            if started:
                raise
            self.gw.metrics.error("too_large")
            await limit_response("too_large", 413, exc.message)(scope, capped_receive, send)


# The endpoints the widget calls from businesses' pages (http_api.browser_facing): their refusals
# here must be readable cross-origin too, so that the widget can say why and when to retry.
_WIDGET_PATHS = re.compile(r"^/v1/(widget/sessions|conversations/[^/]+/messages)$")


def _readable_by_the_widget(response: JSONResponse, scope: Scope) -> None:
    origin = Headers(scope=scope).get("origin")
    if origin is not None and _WIDGET_PATHS.match(scope["path"]):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = "Retry-After"
        response.headers["Vary"] = "Origin"


def _bearer(headers: Headers) -> str | None:
    value = headers.get("authorization")
    if value is None:
        return None
    scheme, _, credential = value.partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential:
        return None
    return credential
