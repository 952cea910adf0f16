"""Every setting the gateway reads from the environment, in one place.

Everything else takes its configuration as arguments. `Settings.from_env()` rejects a bad value
at start with the variable's name; nothing reads `os.environ` later.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar

_N = TypeVar("_N", int, float)
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
    reconnect_spread_ms: int = 2000
    redis_prefix: str = "chatgw:"
    log_level: str = "INFO"
    log_format: str = "json"
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
        settings = cls(
            port=e.integer("PORT", 8000, low=1, high=65535),
            database_url=e.get("DATABASE_URL"),
            redis_url=e.get("REDIS_URL"),
            openai_api_key=e.get("OPENAI_API_KEY"),
            openai_base_url=e.get("OPENAI_BASE_URL"),
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
            reconnect_spread_ms=e.integer("CHATGW_RECONNECT_SPREAD_MS", 2000, low=0, high=600_000),
            redis_prefix=e.get("CHATGW_REDIS_PREFIX") or "chatgw:",
            log_level=(e.get("CHATGW_LOG_LEVEL") or "INFO").upper(),
            log_format=log_format,
            metrics_token=_metrics_token(e.get("CHATGW_METRICS_TOKEN")),
        )
        # A resume replays up to a whole window at once into the session's outbox.
        if settings.outbox_frames < settings.replay_window + 64:
            raise SettingsError(
                "CHATGW_OUTBOX_FRAMES must be at least CHATGW_REPLAY_WINDOW + 64 "
                f"({settings.replay_window + 64}), so that a full replay fits"
            )
        return settings


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
