"""Signed, expiring tokens (JWT, HS256) for widget users, and later agents."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any, Literal

import jwt

from core.types import BusinessId, ConversationId
from gateway.errors import Unauthorized

_ISSUER = "chatgw"
_AUDIENCE = "chatgw"
_ALGORITHM = "HS256"

Role = Literal["user", "agent"]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a verified token speaks for. User tokens are bound to one conversation."""

    business_id: BusinessId
    role: Role
    subject: str
    conversation_id: ConversationId | None
    expires_at: int


class TokenIssuer:
    def __init__(self, secret: str, *, ttl: int) -> None:
        if len(secret.encode()) < 32:  # RFC 7518 3.2: an HS256 key has at least 256 bits
            raise ValueError("the signing secret must be at least 32 bytes long")
        if ttl < 1:
            raise ValueError("ttl must be >= 1 second")
        self._secret = secret
        self.ttl = ttl

    def issue_widget(self, business_id: BusinessId, end_user_id: str, conversation_id: ConversationId) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": _ISSUER,
            "aud": _AUDIENCE,
            "sub": end_user_id,
            "bid": business_id,
            "role": "user",
            "cid": conversation_id,
            "iat": now,
            "exp": now + self.ttl,
        }
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
        cid = claims.get("cid")
        if role == "user" and not isinstance(cid, str):
            raise Unauthorized("invalid token: a user token must name its conversation")
        return Principal(
            business_id=BusinessId(str(claims["bid"])),
            role=role,
            subject=str(claims["sub"]),
            conversation_id=ConversationId(cid) if isinstance(cid, str) else None,
            expires_at=int(claims["exp"]),
        )


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
