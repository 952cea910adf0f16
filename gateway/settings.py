"""Every setting the gateway reads from the environment, in one place.

Everything else takes its configuration as arguments. `Settings.from_env()` rejects a bad value
at start with the variable's name; nothing reads `os.environ` later.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlsplit

import limits

_N = TypeVar("_N", int, float)
# Allocations of tracked objects (less deallocations) between two collections of the garbage
# collector's youngest generation, once serving (Python's default: 700): bench/README.md, "Garbage
# collection".
GC_THRESHOLD = 10_000
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_FLAGS = dict.fromkeys(("on", "true", "1", "yes"), True) | dict.fromkeys(("off", "false", "0", "no"), False)


class SettingsError(ValueError):
    """A configuration variable has a value the gateway cannot use."""


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    database_url: str | None = None
    redis_url: str | None = None
    openai_api_key: str | None = None
    openai_base_url: str | None = None
    llm_model: str = "gpt-4o-mini"
    llm_fallback_models: tuple[str, ...] = ()
    llm_first_token_timeout: float = 20.0
    llm_concurrency: int = 256
    llm_requests_per_minute: int = 3000
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    secret_is_random: bool = True
    demo_api_key: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)
    demo_api_key_is_random: bool = True
    demo_agent: bool = True
    scripted_tps: float = 20.0
    scripted_tokens: int = 40
    hello_timeout: float = 5.0
    token_ttl: int = 3600
    agent_token_ttl: int = 8 * 3600
    max_frame_bytes: int = 64 * 1024
    max_message_chars: int = 4000
    outbox_frames: int = 2048
    agent_max_subscriptions: int = 50
    snapshot_window_s: int = 86_400
    snapshot_limit: int = 200
    replay_window: int = 1000
    delta_flush_ms: float = 15.0
    delta_max_chars: int = 512
    ws_ping_interval: float = 20.0
    graceful_shutdown: float = 10.0
    db_pool_size: int = 10
    redis_pool_size: int = 16
    state_ttl: int = 3600
    stream_ttl: int = 86_400
    answer_lease: float = 5.0
    max_active_answers: int = 200
    overload_retry_ms: int = 1000
    overload_lag_ms: float = 100.0
    overload_arrivals_lag_ms: float = 250.0
    overload_arrivals_db_wait_ms: float = 1000.0
    reconnect_spread_ms: int = 2000
    gc_threshold: int = GC_THRESHOLD
    redis_prefix: str = "chatgw:"
    log_level: str = "INFO"
    log_format: str = "json"
    limits: LimitSettings = field(default_factory=lambda: LimitSettings())
    metrics_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        e = _Env(os.environ if env is None else env)
        secret = e.get("CHATGW_SECRET")
        if secret is not None and len(secret.encode()) < 32:
            raise SettingsError("CHATGW_SECRET must be at least 32 bytes long")
        demo_key = e.get("CHATGW_DEMO_API_KEY")
        defaults = cls()
        log_format = e.get("CHATGW_LOG_FORMAT") or "json"
        if log_format not in ("json", "text"):
            raise SettingsError("CHATGW_LOG_FORMAT must be 'json' or 'text'")
        log_level = (e.get("CHATGW_LOG_LEVEL") or "INFO").upper()
        if log_level not in _LOG_LEVELS:
            raise SettingsError(
                f"CHATGW_LOG_LEVEL must be one of {', '.join(_LOG_LEVELS)}, got {log_level!r}"
            )
        settings = cls(
            port=e.integer("PORT", 8000, low=1, high=65535),
            database_url=e.url("DATABASE_URL", ("postgres", "postgresql")),
            redis_url=e.url("REDIS_URL", ("redis", "rediss", "unix")),
            openai_api_key=e.get("OPENAI_API_KEY"),
            openai_base_url=e.url("OPENAI_BASE_URL", ("http", "https")),
            llm_model=e.get("LLM_MODEL") or defaults.llm_model,
            llm_fallback_models=tuple(
                m.strip() for m in (e.get("LLM_FALLBACK_MODELS") or "").split(",") if m.strip()
            ),
            llm_first_token_timeout=e.number("CHATGW_LLM_FIRST_TOKEN_TIMEOUT_S", 20.0, low=0.1),
            llm_concurrency=e.integer("CHATGW_LLM_CONCURRENCY", defaults.llm_concurrency, low=1),
            llm_requests_per_minute=e.integer(
                "CHATGW_LLM_REQUESTS_PER_MINUTE", defaults.llm_requests_per_minute, low=1
            ),
            secret=secret or defaults.secret,
            secret_is_random=secret is None,
            demo_api_key=demo_key or defaults.demo_api_key,
            demo_api_key_is_random=demo_key is None,
            demo_agent=e.flag("CHATGW_DEMO_AGENT", True),
            scripted_tps=e.number("CHATGW_SCRIPTED_TPS", 20.0, low=0),
            scripted_tokens=e.integer("CHATGW_SCRIPTED_TOKENS", 40, low=1, high=100_000),
            hello_timeout=e.number("CHATGW_HELLO_TIMEOUT_S", 5.0, low=0.1),
            token_ttl=e.integer("CHATGW_TOKEN_TTL_S", 3600, low=60),
            agent_token_ttl=e.integer("CHATGW_AGENT_TOKEN_TTL_S", 8 * 3600, low=60, high=30 * 86_400),
            max_frame_bytes=e.integer("CHATGW_MAX_FRAME_BYTES", 64 * 1024, low=1024, high=16 * 1024 * 1024),
            max_message_chars=e.integer("CHATGW_MAX_MESSAGE_CHARS", 4000, low=1),
            outbox_frames=e.integer("CHATGW_OUTBOX_FRAMES", 2048, low=16),
            agent_max_subscriptions=e.integer("CHATGW_AGENT_MAX_SUBSCRIPTIONS", 50, low=1),
            snapshot_window_s=e.integer("CHATGW_SNAPSHOT_WINDOW_S", 86_400, low=60),
            snapshot_limit=e.integer("CHATGW_SNAPSHOT_LIMIT", 200, low=1),
            replay_window=e.integer("CHATGW_REPLAY_WINDOW", 1000, low=1),
            delta_flush_ms=e.number("CHATGW_DELTA_FLUSH_MS", 15.0, low=0, high=1000),
            delta_max_chars=e.integer("CHATGW_DELTA_MAX_CHARS", 512, low=1),
            ws_ping_interval=e.number("CHATGW_WS_PING_INTERVAL_S", 20.0, low=1),
            graceful_shutdown=e.number("CHATGW_GRACEFUL_SHUTDOWN_S", 10.0, low=0),
            db_pool_size=e.integer("CHATGW_DB_POOL_SIZE", 10, low=1, high=1000),
            redis_pool_size=e.integer("CHATGW_REDIS_POOL_SIZE", 16, low=1, high=1000),
            state_ttl=e.integer("CHATGW_STATE_TTL_S", 3600, low=1),
            stream_ttl=e.integer("CHATGW_STREAM_TTL_S", 86_400, low=60),
            answer_lease=e.number("CHATGW_ANSWER_LEASE_S", 5.0, low=0.5, high=60),
            max_active_answers=e.integer(
                "CHATGW_MAX_ACTIVE_ANSWERS", defaults.max_active_answers, low=0, high=1_000_000
            ),
            overload_retry_ms=e.integer("CHATGW_OVERLOAD_RETRY_MS", 1000, low=100, high=600_000),
            overload_lag_ms=e.number("CHATGW_OVERLOAD_LAG_MS", 100.0, low=0, high=60_000),
            overload_arrivals_lag_ms=e.number("CHATGW_OVERLOAD_ARRIVALS_LAG_MS", 250.0, low=0, high=60_000),
            overload_arrivals_db_wait_ms=e.number(
                "CHATGW_OVERLOAD_ARRIVALS_DB_WAIT_MS", 1000.0, low=0, high=600_000
            ),
            reconnect_spread_ms=e.integer("CHATGW_RECONNECT_SPREAD_MS", 2000, low=0, high=600_000),
            gc_threshold=e.integer("CHATGW_GC_THRESHOLD", GC_THRESHOLD, low=100, high=10_000_000),
            redis_prefix=e.get("CHATGW_REDIS_PREFIX") or "chatgw:",
            log_level=log_level,
            log_format=log_format,
            limits=LimitSettings.from_env(e),
            metrics_token=_metrics_token(e.get("CHATGW_METRICS_TOKEN")),
        )
        # A resume replays up to a whole window at once into the session's outbox.
        if settings.outbox_frames < settings.replay_window + 64:
            raise SettingsError(
                "CHATGW_OUTBOX_FRAMES must be at least CHATGW_REPLAY_WINDOW + 64 "
                f"({settings.replay_window + 64}), so that a full replay fits"
            )
        return settings


# A rate is written as the `limits` library parses it ("30/10seconds", "100 per minute"); "off"
# turns the limit off.
Rate = str | None


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """Rate and resource limits (docs/limits.md). Rates are per window; `None` is off."""

    socket_frames: Rate = "120/10seconds"
    agent_frames: Rate = "600/10seconds"
    socket_messages: Rate = "30/10seconds"
    socket_typing: Rate = "5/second"
    conversation_messages: Rate = "60/minute"
    user_answers: Rate = "20/minute"
    business_answers: Rate = "3000/minute"
    ip_connects: Rate = "120/minute"
    ip_widget_sessions: Rate = "30/minute"
    ip_http: Rate = "600/minute"
    key_http: Rate = "100/minute"
    violations: Rate = "10/minute"
    connections_per_ip: int = 200
    sockets_per_conversation: int = 10
    exempt: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    max_body_bytes: int = 512 * 1024
    idle_timeout: float = 600.0
    close_timeout: float = 5.0
    header_timeout: float = 10.0

    @classmethod
    def from_env(cls, e: _Env) -> LimitSettings:
        d = cls()
        return cls(
            socket_frames=e.rate("CHATGW_LIMIT_SOCKET_FRAMES", d.socket_frames),
            agent_frames=e.rate("CHATGW_LIMIT_AGENT_FRAMES", d.agent_frames),
            socket_messages=e.rate("CHATGW_LIMIT_SOCKET_MESSAGES", d.socket_messages),
            socket_typing=e.rate("CHATGW_LIMIT_SOCKET_TYPING", d.socket_typing),
            conversation_messages=e.rate("CHATGW_LIMIT_CONVERSATION_MESSAGES", d.conversation_messages),
            user_answers=e.rate("CHATGW_LIMIT_USER_ANSWERS", d.user_answers),
            business_answers=e.rate("CHATGW_LIMIT_BUSINESS_ANSWERS", d.business_answers),
            ip_connects=e.rate("CHATGW_LIMIT_IP_CONNECTS", d.ip_connects),
            ip_widget_sessions=e.rate("CHATGW_LIMIT_IP_WIDGET_SESSIONS", d.ip_widget_sessions),
            ip_http=e.rate("CHATGW_LIMIT_IP_HTTP", d.ip_http),
            key_http=e.rate("CHATGW_LIMIT_KEY_HTTP", d.key_http),
            violations=e.rate("CHATGW_LIMIT_VIOLATIONS", d.violations),
            connections_per_ip=e.integer("CHATGW_MAX_CONNECTIONS_PER_IP", d.connections_per_ip, low=1),
            sockets_per_conversation=e.integer(
                "CHATGW_MAX_SOCKETS_PER_CONVERSATION", d.sockets_per_conversation, low=1
            ),
            exempt=e.networks("CHATGW_LIMIT_EXEMPT_IPS"),
            max_body_bytes=e.integer(
                "CHATGW_MAX_BODY_BYTES", d.max_body_bytes, low=1024, high=64 * 1024 * 1024
            ),
            idle_timeout=e.number("CHATGW_WS_IDLE_TIMEOUT_S", d.idle_timeout, low=0),
            close_timeout=e.number("CHATGW_WS_CLOSE_TIMEOUT_S", d.close_timeout, low=0.1, high=60),
            header_timeout=e.number("CHATGW_HTTP_HEADER_TIMEOUT_S", d.header_timeout, low=0.1, high=600),
        )


def _metrics_token(token: str | None) -> str | None:
    """CHATGW_METRICS_TOKEN: when set, /metrics and /readyz need it as a bearer token."""
    if token is not None and (len(token) < 16 or any(c.isspace() for c in token)):
        raise SettingsError("CHATGW_METRICS_TOKEN must be at least 16 characters, without spaces")
    return token


class _Env:
    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def get(self, name: str) -> str | None:
        value = self._env.get(name, "").strip()
        return value or None

    def integer(self, name: str, default: int, *, low: int | None = None, high: int | None = None) -> int:
        raw = self.get(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
        return _bounded(name, value, low, high)

    def rate(self, name: str, default: Rate) -> Rate:
        """A rate limit such as "30/10seconds" or "100 per minute"; "off" (or 0) turns it off."""
        raw = self.get(name)
        if raw is None:
            return default
        if raw.lower() in ("off", "0", "none"):
            return None
        try:
            limits.parse(raw)
        except ValueError:
            raise SettingsError(
                f"{name} must be a rate such as '30/10seconds' or '100 per minute' (or 'off'), got {raw!r}"
            ) from None
        return raw

    def networks(self, name: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """Comma-separated addresses or networks ("127.0.0.1, 10.0.0.0/8")."""
        result = []
        for part in (self.get(name) or "").split(","):
            if not part.strip():
                continue
            try:
                result.append(ipaddress.ip_network(part.strip(), strict=False))
            except ValueError:
                raise SettingsError(
                    f"{name} must list IP addresses or networks, got {part.strip()!r}"
                ) from None
        return tuple(result)

    def url(self, name: str, schemes: tuple[str, ...]) -> str | None:
        """A URL with one of `schemes` and, if it names a port, a valid one. Errors show the
        scheme only: the rest may hold a password."""
        raw = self.get(name)
        if raw is None:
            return None
        try:
            parts = urlsplit(raw)
            parts.port  # noqa: B018 -- raises ValueError when the port is not a number in range
        except ValueError as exc:
            raise SettingsError(f"{name} is not a valid URL: {exc}") from None
        if parts.scheme.lower() not in schemes:
            expected = " or ".join(f"{scheme}://" for scheme in schemes)
            got = f"{parts.scheme}:..." if parts.scheme else "no scheme"
            raise SettingsError(f"{name} must start with {expected}, got {got!r}")
        return raw

    def flag(self, name: str, default: bool) -> bool:
        raw = self.get(name)
        if raw is None:
            return default
        value = _FLAGS.get(raw.lower())
        if value is None:
            raise SettingsError(f"{name} must be on or off (or true/false, 1/0), got {raw!r}")
        return value

    def number(
        self, name: str, default: float, *, low: float | None = None, high: float | None = None
    ) -> float:
        raw = self.get(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(f"{name} must be a number, got {raw!r}") from None
        return _bounded(name, value, low, high)


def _bounded(name: str, value: _N, low: _N | None, high: _N | None) -> _N:
    if low is not None and value < low:
        raise SettingsError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise SettingsError(f"{name} must be <= {high}, got {value}")
    return value
