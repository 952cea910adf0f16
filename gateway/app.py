"""The ASGI application: routes, and the lifespan that owns start and stop order."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import Route, WebSocketRoute
from starlette.types import Message, Receive, Scope, Send

from core.broker import Broker
from core.conditions import prepare as prepare_conditions
from core.conversation import ConversationService, CoreSettings
from core.llm import LLMProvider
from core.pipeline import off_loop
from core.scripted_llm import ScriptedLLM
from gateway import access_api, admin_api, agents_api, console_api, http_api, static
from gateway.auth import TokenIssuer
from gateway.backends import make_backends
from gateway.connection import serve_socket
from gateway.context import Gateway
from gateway.hub import Hub
from gateway.limits import Limiter
from gateway.limits_http import LimitsMiddleware
from gateway.metrics import Metrics
from gateway.presence import Presence
from gateway.settings import Settings
from gateway.startup import StartupError, connect_backends, log_start, seed_demo, share_credentials

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
            overload_arrivals_lag_seconds=settings.overload_arrivals_lag_ms / 1000,
            overload_arrivals_queue_wait_seconds=settings.overload_arrivals_db_wait_ms / 1000,
        ),
    )
    limiter = Limiter(
        settings.limits,
        registry=metrics.registry,
        redis_url=settings.redis_url,
        redis_prefix=settings.redis_prefix,
        redis_pool_size=settings.redis_pool_size,
        on_error=metrics.error,
    )
    metrics.watch(
        pool=backends.pool_stats,
        reconnects=backends.broker_reconnects,
        pool_waits=backends.pool_waits,
        redis=backends.redis_stats,
        limiter_redis=limiter.transport_stats if settings.redis_url else None,
    )
    admission = conversations.answers.admission
    admission.queue_waits = backends.pool_waits  # None without PostgreSQL
    metrics.answers_active.set_function(lambda: conversations.answers.active)
    metrics.answers_active_limit.set_function(lambda: admission.limit)
    metrics.answers_active_cap.set(settings.max_active_answers)
    metrics.event_loop_lag.set_function(lambda: admission.lag)
    metrics.event_loop_lag_recent.set_function(lambda: admission.recent_lag)
    metrics.db_pool_wait_recent.set_function(lambda: admission.recent_queue_wait)
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
        limits=limiter,
        demo_api_key=settings.demo_api_key,
    )


class SocketEndpoint:
    """`/ws` as a bare ASGI app (a class, so that Starlette's route passes `receive` and `send`
    through instead of wrapping them in its WebSocket)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await serve_socket(scope, receive, send)


class GatewayApp(Starlette):
    """The gateway's Starlette app. A start that fails with `StartupError` is reported to the server
    as its one line (Starlette would send the whole traceback).

    A `/ws` socket goes to the connection before the middleware and the router: none of them acts
    on a WebSocket here (the limits middleware and the error pages are HTTP only), and each would
    stay on the socket's stack for its whole life and wrap every frame sent (bench/README.md, "The
    send path")."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] == scope.get("root_path", "") + "/ws":
            scope["app"] = self
            await serve_socket(scope, receive, send)
            return
        if scope["type"] != "lifespan":
            await super().__call__(scope, receive, send)
            return

        async def send_one_line(message: Message) -> None:
            error = getattr(self.state, "startup_error", None)
            if message["type"] == "lifespan.startup.failed" and error:
                message = {**message, "message": error}
            await send(message)

        await super().__call__(scope, receive, send_one_line)


def create_app(settings: Settings | None = None, *, broker: Broker | None = None) -> Starlette:
    """The app; the server announces ready once it listens (gateway.drain.DrainingServer)."""
    settings = settings or Settings.from_env()
    gw = build_gateway(settings, broker=broker)  # bad backend URLs fail here, at start

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        log_start(gw)
        await gw.limits.connect()
        try:
            await connect_backends(gw)
        except StartupError as exc:
            app.state.startup_error = str(exc)
            raise
        try:
            try:
                await share_credentials(gw)
            except StartupError as exc:
                app.state.startup_error = str(exc)
                raise
            await seed_demo(gw)
            await off_loop(prepare_conditions)  # on a config worker, as conditions run later
            gw.conversations.start()
            gw.presence.start()
            yield
        finally:
            await gw.presence.close()
            await gw.conversations.aclose(grace=settings.graceful_shutdown)
            await gw.broker.close()
            await gw.store.close()
            await gw.llm.close()
            await gw.limits.close()
            log.info("stopped")

    routes = [
        WebSocketRoute("/ws", SocketEndpoint()),
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
    app = GatewayApp(
        routes=routes,
        middleware=[Middleware(LimitsMiddleware, gateway=gw)],
        lifespan=lifespan,
        exception_handlers={HTTPException: http_api.http_exception},
    )
    app.state.gateway = gw
    return app
