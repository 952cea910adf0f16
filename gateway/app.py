"""The ASGI application: routes, and the lifespan that owns start and stop order."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.routing import Route, WebSocketRoute

from core.broker import Broker
from core.conversation import ConversationService, CoreSettings
from core.errors import Conflict
from core.llm import LLMProvider
from core.models import AuditEntry
from core.scripted_llm import ScriptedLLM
from gateway import access_api, admin_api, agents_api, console_api, http_api, static
from gateway.auth import TokenIssuer, hash_api_key
from gateway.backends import make_backends
from gateway.connection import serve_socket
from gateway.context import Gateway
from gateway.demo import DEMO_BUSINESS, DEMO_FLOW
from gateway.hub import Hub
from gateway.metrics import Metrics
from gateway.presence import Presence
from gateway.settings import Settings

log = logging.getLogger(__name__)

# A user socket's presence lasts this long without a renewal (its instance renews every third).
PRESENCE_TTL_S = 60.0


def make_llm(settings: Settings, observer: Metrics) -> LLMProvider:
    """Any OpenAI-compatible endpoint with OPENAI_API_KEY, else the offline scripted model."""
    if settings.openai_api_key:
        from core.llm_service import OpenAILLM

        return OpenAILLM(
            api_key=settings.openai_api_key,
            base_url=settings.openai_base_url,
            model=settings.llm_model,
            fallback_models=settings.llm_fallback_models,
            first_token_timeout=settings.llm_first_token_timeout,
            max_concurrency_per_business=settings.llm_concurrency,
            requests_per_minute_per_business=settings.llm_requests_per_minute,
            observer=observer,
        )
    return ScriptedLLM(tokens_per_second=settings.scripted_tps, tokens=settings.scripted_tokens)


def build_gateway(settings: Settings, *, broker: Broker | None = None) -> Gateway:
    """Everything one process shares; `broker` replaces the one the settings select (tests)."""
    backends = make_backends(settings, broker=broker)
    store, broker = backends.store, backends.broker
    metrics = Metrics()
    llm = make_llm(settings, metrics)
    conversations = ConversationService(
        store=store,
        broker=broker,
        llm=llm,
        observer=metrics,
        settings=CoreSettings(
            max_message_chars=settings.max_message_chars,
            delta_flush_seconds=settings.delta_flush_ms / 1000,
            delta_max_chars=settings.delta_max_chars,
            lease_seconds=settings.answer_lease,
            sweep_seconds=min(1.0, settings.answer_lease / 5),
            max_active_answers=settings.max_active_answers,
            overload_retry_ms=settings.overload_retry_ms,
            overload_lag_seconds=settings.overload_lag_ms / 1000,
        ),
    )
    metrics.watch(
        pool=backends.pool_stats,
        reconnects=backends.broker_reconnects,
        pool_waits=backends.pool_waits,
        redis=backends.redis_stats,
    )
    admission = conversations.answers.admission
    metrics.answers_active.set_function(lambda: conversations.answers.active)
    metrics.answers_active_limit.set_function(lambda: admission.limit)
    metrics.answers_active_cap.set(settings.max_active_answers)
    metrics.event_loop_lag.set_function(lambda: admission.lag)
    hub = Hub(broker)
    hub.on_flow_changed = conversations.flows.invalidate
    hub.on_answer_ended = conversations.on_answer_ended
    return Gateway(
        settings=settings,
        store=store,
        broker=broker,
        llm=llm,
        conversations=conversations,
        hub=hub,
        tokens=TokenIssuer(settings.secret, ttl=settings.token_ttl, agent_ttl=settings.agent_token_ttl),
        metrics=metrics,
        presence=Presence(broker, ttl=PRESENCE_TTL_S),
        checks=backends.checks,
    )


async def seed_demo(gw: Gateway) -> None:
    """The demo business, its admin API key and its flow (only when it has none yet)."""
    business = await gw.store.ensure_business(DEMO_BUSINESS)
    await gw.store.set_api_key(business.business_id, hash_api_key(gw.settings.demo_api_key))
    flow = await gw.store.get_flow(business.business_id)
    if not flow.stages:
        audit = AuditEntry("system", "flow.seed_demo", {"stages": len(DEMO_FLOW.stages)})
        with contextlib.suppress(Conflict):  # another instance seeded it at the same moment
            await gw.store.save_flow(
                business.business_id, DEMO_FLOW, expected_version=flow.version, audit=audit
            )


def create_app(
    settings: Settings | None = None,
    *,
    on_ready: Callable[[], None] | None = None,
    broker: Broker | None = None,
) -> Starlette:
    settings = settings or Settings.from_env()
    gw = build_gateway(settings, broker=broker)  # bad backend URLs fail here, at start

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if settings.secret_is_random:
            log.warning(
                "CHATGW_SECRET is not set: tokens are signed with a random key and die with this process"
            )
        log.info(
            "starting: %s, model=%s",
            ", ".join(f"{name}={backend}" for name, (backend, _) in gw.checks.items()),
            gw.llm.name,
        )
        await gw.store.connect()
        await gw.broker.connect()
        try:
            await seed_demo(gw)
            gw.conversations.start()
            gw.presence.start()
            if on_ready is not None:
                on_ready()
            yield
        finally:
            await gw.presence.close()
            await gw.conversations.aclose(grace=settings.graceful_shutdown)
            await gw.broker.close()
            await gw.store.close()
            await gw.llm.close()
            log.info("stopped")

    routes = [
        WebSocketRoute("/ws", serve_socket),
        Route("/v1/widget/sessions", http_api.create_widget_session, methods=["POST", "OPTIONS"]),
        Route(
            "/v1/conversations/{conversation_id}/messages", http_api.list_messages, methods=["GET", "OPTIONS"]
        ),
        Route("/healthz", http_api.healthz, methods=["GET"]),
        Route("/readyz", http_api.readyz, methods=["GET"]),
        Route("/metrics", http_api.metrics, methods=["GET"]),
        *admin_api.routes(),
        *access_api.routes(),
        *agents_api.routes(),
        *console_api.routes(),
        *static.routes(),
    ]
    # No CORS middleware: only the two endpoints the widget calls from businesses' pages answer
    # cross-origin requests (http_api.browser_facing); the admin and agent APIs are same-origin.
    app = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_api.http_exception}
    )
    app.state.gateway = gw
    return app
