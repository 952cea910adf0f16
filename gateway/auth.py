"""Credentials: signed, expiring tokens (JWT, HS256) for widget users and agents, and the
businesses' admin API keys."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any, Literal

import jwt

from core.errors import Forbidden, NotFound
from core.models import Agent, Business
from core.store import Store
from core.types import AgentId, BusinessId, ConversationId
from gateway.errors import Unauthorized

_ISSUER = "chatgw"
_AUDIENCE = "chatgw"
_ALGORITHM = "HS256"

Role = Literal["user", "agent"]


DEFAULT_AGENT_TTL = 8 * 3600
"""An agent token lasts a working day."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a verified token speaks for. User tokens are bound to one conversation; agent tokens
    to none (`conversation_id` None), their `subject` is the agent's id."""

    business_id: BusinessId
    role: Role
    subject: str
    conversation_id: ConversationId | None
    expires_at: int


class TokenIssuer:
    """Issues and verifies tokens; `ttl` is a widget token's lifetime, `agent_ttl` an agent's."""

    def __init__(self, secret: str, *, ttl: int, agent_ttl: int = DEFAULT_AGENT_TTL) -> None:
        if len(secret.encode()) < 32:  # RFC 7518 3.2: an HS256 key has at least 256 bits
            raise ValueError("the signing secret must be at least 32 bytes long")
        if ttl < 1 or agent_ttl < 1:
            raise ValueError("ttl and agent_ttl must be >= 1 second")
        self._secret = secret
        self.ttl = ttl
        self.agent_ttl = agent_ttl

    def issue_widget(self, business_id: BusinessId, end_user_id: str, conversation_id: ConversationId) -> str:
        return self._issue(
            {"sub": end_user_id, "bid": business_id, "role": "user", "cid": conversation_id}, self.ttl
        )

    def issue_agent(self, business_id: BusinessId, agent_id: AgentId) -> str:
        """A token for the agent, valid `agent_ttl` seconds. Where it is used, the agent must
        still exist and be enabled (`active_agent`): disabling an agent stops its tokens."""
        return self._issue({"sub": agent_id, "bid": business_id, "role": "agent"}, self.agent_ttl)

    def _issue(self, claims: dict[str, Any], ttl: int) -> str:
        now = int(time.time())
        claims = {"iss": _ISSUER, "aud": _AUDIENCE, **claims, "iat": now, "exp": now + ttl}
        return jwt.encode(claims, self._secret, algorithm=_ALGORITHM)

    def verify(self, token: str, *, expired_grace: int = 0) -> Principal:
        """The token's principal; `Unauthorized` when it is forged, malformed or expired.

        `expired_grace` accepts a token that expired at most that many seconds ago (used only to
        prove a widget's earlier session when it asks for a fresh token).
        """
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[_ALGORITHM],
                audience=_AUDIENCE,
                issuer=_ISSUER,
                leeway=expired_grace,
                options={"require": ["exp", "iat", "sub", "bid", "role"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token expired") from None
        except jwt.InvalidTokenError as exc:
            raise Unauthorized(f"invalid token: {exc}") from None
        role = claims.get("role")
        if role not in ("user", "agent"):
            raise Unauthorized("invalid token: unknown role")
        cid = claims.get("cid") if role == "user" else None  # an agent's token names no conversation
        if role == "user" and not isinstance(cid, str):
            raise Unauthorized("invalid token: a user token must name its conversation")
        return Principal(
            business_id=BusinessId(str(claims["bid"])),
            role=role,
            subject=str(claims["sub"]),
            conversation_id=ConversationId(cid) if isinstance(cid, str) else None,
            expires_at=int(claims["exp"]),
        )


def looks_like_token(credential: str) -> bool:
    """Whether a bearer credential is one of our tokens (a JWT) rather than an admin API key.
    Our API keys are URL-safe text without dots; a JWT is three dot-separated parts."""
    try:
        jwt.get_unverified_header(credential)
    except jwt.InvalidTokenError:
        return False
    return True


async def active_agent(store: Store, principal: Principal) -> Agent:
    """The agent an agent token speaks for, if it may act now: `Unauthorized` when the token names
    no agent of its business, `Forbidden` when the agent is disabled. Check it on every use of an
    agent token (a token outlives the agent's enabled state)."""
    if principal.role != "agent":
        raise Forbidden("this needs an agent token")
    try:
        agent = await store.get_agent(principal.business_id, AgentId(principal.subject))
    except NotFound:
        raise Unauthorized("the token names no agent of its business") from None
    if agent.disabled:
        raise Forbidden(f"agent {agent.agent_id} is disabled")
    return agent


async def business_for_api_key(store: Store, key: str) -> Business:
    """The business whose admin API key `key` is, or `Unauthorized`."""
    try:
        return await store.get_business_by_api_key(hash_api_key(key))
    except NotFound:
        raise Unauthorized("unknown API key") from None


def bearer_token(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header, or `Unauthorized`."""
    if not authorization:
        raise Unauthorized("missing Authorization header (expected 'Bearer <token>')")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Authorization header must be 'Bearer <token>'")
    return token.strip()


def hash_api_key(key: str) -> str:
    """The stored form of an admin API key: SHA-256, hex. Keys are long random strings, so a
    plain hash suffices (no salt or stretching needed, unlike for passwords)."""
    return hashlib.sha256(key.encode()).hexdigest()
