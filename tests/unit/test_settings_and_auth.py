"""Settings from the environment, and signed tokens."""

from __future__ import annotations

import time

import jwt
import pytest

from core.types import AgentId, BusinessId, ConversationId
from gateway.auth import TokenIssuer, bearer_token, looks_like_token
from gateway.errors import Unauthorized
from gateway.settings import Settings, SettingsError

SECRET = "unit-test-secret-0123456789-abcdefghij"


def test_defaults_are_the_embedded_ones() -> None:
    s = Settings.from_env({})
    assert s.database_url is None
    assert s.redis_url is None
    assert s.openai_api_key is None
    assert s.secret_is_random
    assert s.port == 8000
    assert s.hello_timeout == 5.0


def test_values_are_read_and_checked() -> None:
    s = Settings.from_env({"PORT": "9001", "CHATGW_SCRIPTED_TPS": "0", "LLM_FALLBACK_MODELS": "a, b,,c"})
    assert s.port == 9001
    assert s.scripted_tps == 0
    assert s.llm_fallback_models == ("a", "b", "c")
    with pytest.raises(SettingsError, match="PORT must be an integer"):
        Settings.from_env({"PORT": "eighty"})
    with pytest.raises(SettingsError, match="CHATGW_OUTBOX_FRAMES must be >= 16"):
        Settings.from_env({"CHATGW_OUTBOX_FRAMES": "2"})
    with pytest.raises(SettingsError, match="a full replay fits"):
        Settings.from_env({"CHATGW_OUTBOX_FRAMES": "100", "CHATGW_REPLAY_WINDOW": "100"})
    with pytest.raises(SettingsError, match="CHATGW_SECRET must be at least 32 bytes"):
        Settings.from_env({"CHATGW_SECRET": "short"})
    with pytest.raises(SettingsError, match="CHATGW_LOG_FORMAT"):
        Settings.from_env({"CHATGW_LOG_FORMAT": "xml"})


def test_the_log_level_is_one_python_knows() -> None:
    assert Settings.from_env({"CHATGW_LOG_LEVEL": "debug"}).log_level == "DEBUG"
    with pytest.raises(
        SettingsError, match=r"^CHATGW_LOG_LEVEL must be one of DEBUG, INFO, .*got 'VERBOSE'$"
    ):
        Settings.from_env({"CHATGW_LOG_LEVEL": "verbose"})


@pytest.mark.parametrize(
    ("name", "good", "bad"),
    [
        ("DATABASE_URL", "postgresql://u:p@db:5432/chat", "mysql://u:secret-pw@db/chat"),
        ("DATABASE_URL", "postgres:///chat", "db.example:5432"),
        ("REDIS_URL", "redis://cache:6379/0", "localhost:6379"),
        ("REDIS_URL", "unix:///run/redis.sock", "http://cache"),
        ("OPENAI_BASE_URL", "http://127.0.0.1:8080/v1", "ftp://models"),
    ],
)
def test_urls_are_checked_by_scheme_without_echoing_them(name: str, good: str, bad: str) -> None:
    assert getattr(Settings.from_env({name: good}), name.lower()) == good
    with pytest.raises(SettingsError, match=f"^{name} must start with ") as caught:
        Settings.from_env({name: bad})
    assert "secret-pw" not in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_url_with_a_bad_port_names_its_variable() -> None:
    with pytest.raises(SettingsError, match=r"^REDIS_URL is not a valid URL: Port"):
        Settings.from_env({"REDIS_URL": "redis://cache:99999/0"})
    with pytest.raises(SettingsError, match=r"^DATABASE_URL is not a valid URL: Port"):
        Settings.from_env({"DATABASE_URL": "postgresql://db:port/chat"})


def test_the_redis_pool_size_is_read_and_bounded() -> None:
    assert Settings.from_env({}).redis_pool_size == 16
    assert Settings.from_env({"CHATGW_REDIS_POOL_SIZE": "64"}).redis_pool_size == 64
    with pytest.raises(SettingsError, match="CHATGW_REDIS_POOL_SIZE must be >= 1"):
        Settings.from_env({"CHATGW_REDIS_POOL_SIZE": "0"})
    with pytest.raises(SettingsError, match="CHATGW_REDIS_POOL_SIZE must be an integer"):
        Settings.from_env({"CHATGW_REDIS_POOL_SIZE": "many"})


def test_the_garbage_collector_threshold_is_read_and_bounded() -> None:
    assert Settings.from_env({}).gc_threshold == 10_000
    assert Settings.from_env({"CHATGW_GC_THRESHOLD": "700"}).gc_threshold == 700
    with pytest.raises(SettingsError, match="CHATGW_GC_THRESHOLD must be >= 100"):
        Settings.from_env({"CHATGW_GC_THRESHOLD": "0"})


def test_the_overload_limit_is_read_and_bounded() -> None:
    defaults = Settings.from_env({})
    assert defaults.max_active_answers > 0  # on by default
    assert defaults.overload_retry_ms > 0
    settings = Settings.from_env({"CHATGW_MAX_ACTIVE_ANSWERS": "0", "CHATGW_OVERLOAD_RETRY_MS": "250"})
    assert (settings.max_active_answers, settings.overload_retry_ms) == (0, 250)
    with pytest.raises(SettingsError, match="CHATGW_MAX_ACTIVE_ANSWERS must be >= 0"):
        Settings.from_env({"CHATGW_MAX_ACTIVE_ANSWERS": "-1"})
    with pytest.raises(SettingsError, match="CHATGW_OVERLOAD_RETRY_MS must be >= 100"):
        Settings.from_env({"CHATGW_OVERLOAD_RETRY_MS": "10"})
    assert Settings.from_env({"CHATGW_OVERLOAD_LAG_MS": "0"}).overload_lag_ms == 0
    with pytest.raises(SettingsError, match="CHATGW_OVERLOAD_LAG_MS must be a number"):
        Settings.from_env({"CHATGW_OVERLOAD_LAG_MS": "soon"})
    assert defaults.overload_arrivals_lag_ms == 250
    assert defaults.overload_arrivals_db_wait_ms == 1000
    assert Settings.from_env({"CHATGW_OVERLOAD_ARRIVALS_DB_WAIT_MS": "0"}).overload_arrivals_db_wait_ms == 0
    assert Settings.from_env({"CHATGW_OVERLOAD_ARRIVALS_LAG_MS": "0"}).overload_arrivals_lag_ms == 0
    with pytest.raises(SettingsError, match="CHATGW_OVERLOAD_ARRIVALS_LAG_MS must be >= 0"):
        Settings.from_env({"CHATGW_OVERLOAD_ARRIVALS_LAG_MS": "-5"})


def test_the_demo_agent_switch_reads_on_and_off_words() -> None:
    assert Settings.from_env({}).demo_agent is True
    assert Settings.from_env({"CHATGW_DEMO_AGENT": "off"}).demo_agent is False
    assert Settings.from_env({"CHATGW_DEMO_AGENT": "False"}).demo_agent is False
    assert Settings.from_env({"CHATGW_DEMO_AGENT": "1"}).demo_agent is True
    with pytest.raises(SettingsError, match="CHATGW_DEMO_AGENT must be on or off"):
        Settings.from_env({"CHATGW_DEMO_AGENT": "maybe"})


def test_a_widget_token_round_trips() -> None:
    issuer = TokenIssuer(SECRET, ttl=60)
    token = issuer.issue_widget(BusinessId("b"), "u", ConversationId("c"))
    p = issuer.verify(token)
    assert (p.business_id, p.role, p.subject, p.conversation_id) == ("b", "user", "u", "c")


def test_forged_expired_and_malformed_tokens_are_refused() -> None:
    issuer = TokenIssuer(SECRET, ttl=60)
    other = TokenIssuer("another-secret-0123456789-abcdefghij", ttl=60)
    with pytest.raises(Unauthorized, match="invalid token"):
        issuer.verify(other.issue_widget(BusinessId("b"), "u", ConversationId("c")))
    with pytest.raises(Unauthorized, match="invalid token"):
        issuer.verify("not.a.token")
    old = {"iss": "chatgw", "aud": "chatgw", "sub": "u", "bid": "b", "role": "user", "cid": "c"}
    now = int(time.time())
    expired = jwt.encode({**old, "iat": now - 100, "exp": now - 50}, SECRET, algorithm="HS256")
    with pytest.raises(Unauthorized, match="expired"):
        issuer.verify(expired)
    assert issuer.verify(expired, expired_grace=3600).conversation_id == "c"
    unsigned = jwt.encode({**old, "iat": now, "exp": now + 60}, None, algorithm="none")
    with pytest.raises(Unauthorized):
        issuer.verify(unsigned)


def test_an_agent_token_names_its_agent_and_no_conversation() -> None:
    issuer = TokenIssuer(SECRET, ttl=60, agent_ttl=7200)
    token = issuer.issue_agent(BusinessId("b"), AgentId("a-1"))
    p = issuer.verify(token)
    assert (p.business_id, p.role, p.subject, p.conversation_id) == ("b", "agent", "a-1", None)
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], audience="chatgw")
    assert claims["exp"] - claims["iat"] == 7200 == issuer.agent_ttl
    assert {"role", "bid", "sub", "iat", "exp"} <= claims.keys()
    assert "cid" not in claims


def test_an_agent_token_cannot_be_bent_into_a_conversation() -> None:
    """A forged `cid` in an agent token is ignored, and a user token without one is refused."""
    now = int(time.time())
    base = {"iss": "chatgw", "aud": "chatgw", "sub": "a", "bid": "b", "iat": now, "exp": now + 60}
    issuer = TokenIssuer(SECRET, ttl=60)
    agent = jwt.encode({**base, "role": "agent", "cid": "c"}, SECRET, algorithm="HS256")
    assert issuer.verify(agent).conversation_id is None
    user = jwt.encode({**base, "role": "user"}, SECRET, algorithm="HS256")
    with pytest.raises(Unauthorized, match="must name its conversation"):
        issuer.verify(user)
    admin = jwt.encode({**base, "role": "admin"}, SECRET, algorithm="HS256")
    with pytest.raises(Unauthorized, match="unknown role"):
        issuer.verify(admin)


def test_agent_tokens_last_a_working_day_unless_configured() -> None:
    assert Settings.from_env({}).agent_token_ttl == 8 * 3600
    assert TokenIssuer(SECRET, ttl=60).agent_ttl == 8 * 3600
    assert Settings.from_env({"CHATGW_AGENT_TOKEN_TTL_S": "600"}).agent_token_ttl == 600
    with pytest.raises(SettingsError, match="CHATGW_AGENT_TOKEN_TTL_S must be >= 60"):
        Settings.from_env({"CHATGW_AGENT_TOKEN_TTL_S": "5"})
    with pytest.raises(SettingsError, match="CHATGW_AGENT_TOKEN_TTL_S must be an integer"):
        Settings.from_env({"CHATGW_AGENT_TOKEN_TTL_S": "a day"})
    with pytest.raises(ValueError, match="agent_ttl"):
        TokenIssuer(SECRET, ttl=60, agent_ttl=0)


def test_tokens_are_told_from_api_keys() -> None:
    issuer = TokenIssuer(SECRET, ttl=60)
    assert looks_like_token(issuer.issue_agent(BusinessId("b"), AgentId("a")))
    assert looks_like_token(issuer.issue_widget(BusinessId("b"), "u", ConversationId("c")))
    for key in ("demo-admin-key-for-the-e2e-suite", "Xy_9-abcDEF0123456789abcdefghijkl", "a.b.c", ""):
        assert not looks_like_token(key)


def test_bearer_header_parsing() -> None:
    assert bearer_token("Bearer abc") == "abc"
    for bad in (None, "", "Basic abc", "Bearer "):
        with pytest.raises(Unauthorized):
            bearer_token(bad)


def test_the_server_runs_with_pings_on_deflate_off_and_a_frame_cap() -> None:
    from starlette.applications import Starlette

    from gateway.cli import uvicorn_config

    config = uvicorn_config(Starlette(), Settings.from_env({}), host="127.0.0.1", port=8000)
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    assert isinstance(config.ws, type)
    assert issubclass(config.ws, WebSocketsSansIOProtocol)
    assert config.ws_ping_interval == 20.0
    assert config.ws_per_message_deflate is False
    assert config.ws_max_size == 64 * 1024
    assert config.timeout_graceful_shutdown == 10
