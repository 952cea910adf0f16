"""What an instance does at start, before it serves: connect its backends, agree with the other
instances on the credentials they share, and seed the demo business.

Shared credentials (docs/decisions.md, "Instances share their secret and demo key"):

- The token signing secret is CHATGW_SECRET when it is set. Otherwise the first instance on a
  database stores a random one in `gateway_settings` and every instance reads it back, so a client
  whose token one instance signed can resume on any other. On the memory store it is random per
  process, as before: nothing else could serve that process's conversations anyway.
- The demo business's admin API key is CHATGW_DEMO_API_KEY when it is set (it then replaces the
  stored one); otherwise the stored one, created once by the first instance. Every instance prints
  and installs that same key, so the key printed is the key that works.

A start that cannot go on because of a setting fails with `StartupError`: one line naming the
variable to fix, no traceback (gateway.app turns it into uvicorn's start-up failure message).
"""

from __future__ import annotations

import contextlib
import logging

from core.errors import Conflict
from core.models import AuditEntry
from gateway.auth import TokenIssuer, hash_api_key
from gateway.context import Gateway
from gateway.demo import DEMO_BUSINESS, DEMO_FLOW
from gateway.migrate import SchemaOutOfDate

log = logging.getLogger(__name__)

SECRET_SETTING = "token_secret"
DEMO_KEY_SETTING = "demo_api_key"


class StartupError(Exception):
    """The instance cannot start; the message is one line naming what to fix."""


def one_line(exc: BaseException) -> str:
    """`exc` and its direct cause, on one line."""
    text = f"{exc}" or type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause) not in text:
        text = f"{text} ({type(cause).__name__}: {cause})"
    return " ".join(text.split())


def log_start(gw: Gateway) -> None:
    """The start line, and what the operator should know about the configuration."""
    settings = gw.settings
    log.info(
        "starting: %s, model=%s",
        ", ".join(f"{name}={backend}" for name, (backend, _) in gw.checks.items()),
        gw.llm.name,
    )
    if settings.redis_url and not settings.database_url:
        log.warning(
            "REDIS_URL is set without DATABASE_URL: conversations, the signing secret and the demo key "
            "stay in this process, so other instances on this Redis cannot serve its clients; set "
            "DATABASE_URL to share them"
        )
    if not settings.secret_is_random:
        return
    if settings.database_url:
        log.info(
            "CHATGW_SECRET is not set: tokens are signed with the secret every instance shares in the database"
        )
    else:
        log.warning("CHATGW_SECRET is not set: tokens are signed with a random key and die with this process")


async def connect_backends(gw: Gateway) -> None:
    """Connect the store, then the broker; `StartupError` naming the variable when one fails."""
    settings = gw.settings
    try:
        await gw.store.connect()
    except SchemaOutOfDate as exc:
        raise StartupError(f"DATABASE_URL: {exc.message}") from exc
    except Exception as exc:
        if not settings.database_url:
            raise
        raise StartupError(f"DATABASE_URL: cannot use the database: {one_line(exc)}") from exc
    try:
        await gw.broker.connect()
    except Exception as exc:
        await gw.store.close()
        if not settings.redis_url:
            raise
        raise StartupError(f"REDIS_URL: cannot use Redis: {one_line(exc)}") from exc


async def share_credentials(gw: Gateway) -> None:
    """Settle the signing secret and the demo key with the other instances on the store."""
    settings = gw.settings
    if settings.secret_is_random:
        secret = await gw.store.claim_setting(SECRET_SETTING, settings.secret)
        try:
            gw.tokens = TokenIssuer(secret, ttl=settings.token_ttl, agent_ttl=settings.agent_token_ttl)
        except ValueError as exc:  # someone edited the stored row
            raise StartupError(
                f"CHATGW_SECRET is not set and the secret stored in the database (gateway_settings, "
                f"{SECRET_SETTING!r}) is unusable: {exc}; set CHATGW_SECRET or delete that row"
            ) from None
    gw.demo_api_key = await gw.store.claim_setting(
        DEMO_KEY_SETTING, settings.demo_api_key, replace=not settings.demo_api_key_is_random
    )


async def seed_demo(gw: Gateway) -> None:
    """The demo business, its admin API key and its flow (only when it has none yet)."""
    business = await gw.store.ensure_business(DEMO_BUSINESS)
    # Install the shared key, then check it is still the shared one: an instance started with an
    # explicit CHATGW_DEMO_API_KEY may have replaced it meanwhile, and the last to install a key
    # then re-installs the one stored, so every instance ends on the key they all print.
    key = gw.demo_api_key
    for _ in range(5):
        await gw.store.set_api_key(business.business_id, hash_api_key(key))
        stored = await gw.store.claim_setting(DEMO_KEY_SETTING, key)
        if stored == key:
            break
        key = stored
    gw.demo_api_key = key
    flow = await gw.store.get_flow(business.business_id)
    if not flow.stages:
        audit = AuditEntry("system", "flow.seed_demo", {"stages": len(DEMO_FLOW.stages)})
        with contextlib.suppress(Conflict):  # another instance seeded it at the same moment
            await gw.store.save_flow(
                business.business_id, DEMO_FLOW, expected_version=flow.version, audit=audit
            )
