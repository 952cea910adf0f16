"""Who may use a business's chat and its admin API: allowed origins, the identity secret of
verified users, and the rotation of the admin API key. For the business's admin API key.

- `GET /v1/admin/business` -> `{business, name, allowed_origins, require_origin,
  identity_verification, previous_key_valid_until}`.
- `PATCH /v1/admin/business` `{allowed_origins?, require_origin?}` -> the same. Origins are
  `scheme://host[:port]` (http or https, no path), or `self` (the gateway's own pages); they are
  stored in canonical form (lower case, no default port), without repeats; at most 100.
- `POST /v1/admin/identity-secret` -> 201 `{identity_secret}`: a new secret (replacing any
  earlier one at once); `DELETE /v1/admin/identity-secret` -> 204: verified identity off.
- `POST /v1/admin/api-keys` `{overlap_s?}` -> 201 `{api_key, previous_key_valid_until}`: a new
  admin key; the key it replaces keeps working `overlap_s` seconds (default 86400, 0 to 30 days).
- `DELETE /v1/admin/api-keys/previous` -> 200 `{revoked}`: the replaced key stops working now.

Each change writes an audit record (`business.update`, `identity_secret.create`,
`identity_secret.delete`, `api_key.rotate`, `api_key.revoke_previous`; actor `admin`). Secrets and
keys appear in no audit record and no log; they are shown once, in the answer that made them.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from core.models import AuditEntry, Business
from gateway.admin_api import admin, read_body
from gateway.admin_codec import Body
from gateway.auth import hash_api_key
from gateway.context import Gateway
from gateway.origins import MAX_ORIGINS, normalize_origin

DEFAULT_OVERLAP_S = 86_400
MAX_OVERLAP_S = 30 * 86_400
MAX_ORIGIN_CHARS = 300


def business_json(business: Business) -> dict[str, Any]:
    until = business.previous_key_until
    valid = until is not None and until > datetime.now(UTC)
    return {
        "business": business.public_id,
        "name": business.name,
        "allowed_origins": list(business.allowed_origins),
        "require_origin": business.require_origin,
        "identity_verification": business.identity_secret is not None,
        "previous_key_valid_until": until.isoformat() if valid and until is not None else None,
    }


def _origins(body: Body) -> tuple[str, ...]:
    value = body.items("allowed_origins")
    if len(value) > MAX_ORIGINS or not all(isinstance(v, str) and len(v) <= MAX_ORIGIN_CHARS for v in value):
        raise body.bad(
            "allowed_origins",
            f"must be a list of at most {MAX_ORIGINS} origins (strings of <= {MAX_ORIGIN_CHARS})",
        )
    canonical: list[str] = []
    for n, origin in enumerate(value):
        try:
            normalized = normalize_origin(origin)
        except ValueError as exc:
            raise body.bad(f"allowed_origins[{n}]", f"is not an origin: {exc}") from None
        if normalized not in canonical:
            canonical.append(normalized)
    return tuple(canonical)


@admin
async def get_business(request: Request, gw: Gateway, business: Business) -> Response:
    return JSONResponse(business_json(business))


@admin
async def patch_business(request: Request, gw: Gateway, business: Business) -> Response:
    body = await read_body(request)
    body.only("allowed_origins", "require_origin")
    origins = _origins(body) if body.has("allowed_origins") else None
    require = body.flag("require_origin", False) if body.has("require_origin") else None
    data: dict[str, Any] = {}
    if origins is not None:
        data["allowed_origins"] = list(origins)
    if require is not None:
        data["require_origin"] = require
    updated = await gw.store.update_business(
        business.business_id,
        allowed_origins=origins,
        require_origin=require,
        audit=AuditEntry("admin", "business.update", data),
    )
    return JSONResponse(business_json(updated))


@admin
async def create_identity_secret(request: Request, gw: Gateway, business: Business) -> Response:
    secret = secrets.token_urlsafe(32)
    replaced = business.identity_secret is not None
    await gw.store.set_identity_secret(
        business.business_id,
        secret,
        audit=AuditEntry("admin", "identity_secret.create", {"replaced": replaced}),
    )
    return JSONResponse({"identity_secret": secret, "algorithm": "HMAC-SHA256", "replaced": replaced}, 201)


@admin
async def delete_identity_secret(request: Request, gw: Gateway, business: Business) -> Response:
    if business.identity_secret is not None:
        await gw.store.set_identity_secret(
            business.business_id, None, audit=AuditEntry("admin", "identity_secret.delete", {})
        )
    return Response(status_code=204)


@admin
async def rotate_api_key(request: Request, gw: Gateway, business: Business) -> Response:
    body = await read_body(request)
    body.only("overlap_s")
    overlap = body.integer("overlap_s", DEFAULT_OVERLAP_S, 0, MAX_OVERLAP_S)
    key = secrets.token_urlsafe(32)
    until = datetime.now(UTC) + timedelta(seconds=overlap)
    audit = AuditEntry(
        "admin", "api_key.rotate", {"overlap_s": overlap, "previous_valid_until": until.isoformat()}
    )
    updated = await gw.store.rotate_api_key(
        business.business_id, hash_api_key(key), previous_until=until, audit=audit
    )
    return JSONResponse({"api_key": key, **business_json(updated)}, 201)


@admin
async def revoke_previous_key(request: Request, gw: Gateway, business: Business) -> Response:
    revoked = await gw.store.revoke_previous_api_key(
        business.business_id, audit=AuditEntry("admin", "api_key.revoke_previous", {})
    )
    return JSONResponse({"revoked": revoked})


def routes() -> list[BaseRoute]:
    """The access settings' routes, for the application's route list."""
    prefix = "/v1/admin"
    table: list[tuple[str, str, Callable[[Request], Awaitable[Response]]]] = [
        ("GET", "/business", get_business),
        ("PATCH", "/business", patch_business),
        ("POST", "/identity-secret", create_identity_secret),
        ("DELETE", "/identity-secret", delete_identity_secret),
        ("POST", "/api-keys", rotate_api_key),
        ("DELETE", "/api-keys/previous", revoke_previous_key),
    ]
    return [Route(prefix + path, endpoint, methods=[method]) for method, path, endpoint in table]
