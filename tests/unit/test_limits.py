"""The limits' settings and the limiter's decisions, on its in-memory storage."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest
from prometheus_client import CollectorRegistry

from gateway.limits import Limit, Limiter, RateLimited, SweptMemoryStorage, retry_after_s
from gateway.protocol import SendMessage, Typing
from gateway.settings import LimitSettings, Settings, SettingsError


def test_rates_parse_turn_off_and_name_the_variable_when_bad() -> None:
    limits = Settings.from_env(
        {"CHATGW_LIMIT_SOCKET_MESSAGES": "5 per minute", "CHATGW_LIMIT_IP_HTTP": "off"}
    ).limits
    assert limits.socket_messages == "5 per minute"
    assert limits.ip_http is None
    assert Settings.from_env({}).limits == LimitSettings()
    with pytest.raises(SettingsError, match=r"^CHATGW_LIMIT_KEY_HTTP must be a rate"):
        Settings.from_env({"CHATGW_LIMIT_KEY_HTTP": "lots"})
    with pytest.raises(SettingsError, match=r"^CHATGW_LIMIT_EXEMPT_IPS must list IP addresses"):
        Settings.from_env({"CHATGW_LIMIT_EXEMPT_IPS": "127.0.0.1, localhost"})
    with pytest.raises(SettingsError, match=r"^CHATGW_MAX_CONNECTIONS_PER_IP must be >= 1"):
        Settings.from_env({"CHATGW_MAX_CONNECTIONS_PER_IP": "0"})


async def limiter(registry: CollectorRegistry | None = None, **settings: object) -> Limiter:
    made = Limiter(LimitSettings(**settings), registry=registry or CollectorRegistry())  # type: ignore[arg-type]
    await made.connect()
    return made


async def test_a_rate_refuses_past_its_amount_with_a_retry_time_and_counts_it() -> None:
    registry = CollectorRegistry()
    made = await limiter(registry, socket_messages="2/day")
    frame = SendMessage("m", "hi", None)
    for _ in range(2):
        await made.admit_frame(frame, session_id="s1", conversation_id=None, user=None)
    with pytest.raises(RateLimited) as refused:
        await made.admit_frame(frame, session_id="s1", conversation_id=None, user=None)
    assert refused.value.limit is Limit.SOCKET_MESSAGES
    assert 0 < refused.value.retry_after_ms <= 2 * 86_400_000
    assert "too many messages on this socket (at most 2 per 1 day)" in refused.value.message
    await made.admit_frame(frame, session_id="s2", conversation_id=None, user=None)  # another socket
    assert registry.get_sample_value("chatgw_rate_limited_total", {"limit": "socket_messages"}) == 1
    await made.close()


async def test_a_user_message_counts_for_the_user_and_the_business_but_typing_does_not() -> None:
    made = await limiter(user_answers="1/day", business_answers="2/day")
    for _ in range(3):
        await made.admit_frame(Typing(True, None), session_id="s", conversation_id="c", user=("b", "u1"))
    await made.admit_frame(
        SendMessage("1", "hi", None), session_id="s", conversation_id="c", user=("b", "u1")
    )
    with pytest.raises(RateLimited) as refused:
        await made.admit_frame(
            SendMessage("2", "hi", None), session_id="s", conversation_id="c", user=("b", "u1")
        )
    assert refused.value.limit is Limit.USER_ANSWERS
    await made.admit_frame(
        SendMessage("3", "hi", None), session_id="t", conversation_id="d", user=("b", "u2")
    )
    with pytest.raises(RateLimited) as refused:
        await made.admit_frame(
            SendMessage("4", "hi", None), session_id="v", conversation_id="e", user=("b", "u3")
        )
    assert refused.value.limit is Limit.BUSINESS_ANSWERS
    await made.close()


async def test_open_sockets_are_counted_per_address_and_freed_and_exempt_addresses_are_not() -> None:
    made = await limiter(connections_per_ip=2)
    keys = [await made.open_connection("203.0.113.1") for _ in range(2)]
    with pytest.raises(RateLimited) as refused:
        await made.open_connection("203.0.113.1")
    assert refused.value.limit is Limit.IP_CONNECTIONS
    await made.close_connection(keys[0])
    assert await made.open_connection("203.0.113.1") is not None

    exempting = await limiter(connections_per_ip=1, exempt=(ipaddress.ip_network("10.0.0.0/8"),))
    assert [await exempting.open_connection("10.1.2.3") for _ in range(3)] == [None, None, None]
    assert exempting.exempt("10.9.9.9")
    assert not exempting.exempt("11.0.0.1")
    assert not exempting.exempt(None)


async def test_open_sockets_are_counted_per_conversation_and_freed() -> None:
    made = await limiter(sockets_per_conversation=1)
    held = await made.open_conversation_socket("c1")
    with pytest.raises(RateLimited) as refused:
        await made.open_conversation_socket("c1")
    assert refused.value.limit is Limit.CONVERSATION_SOCKETS
    assert await made.open_conversation_socket("c2") is not None
    await made.close_conversation_socket(held)
    assert await made.open_conversation_socket("c1") is not None


async def test_a_socket_is_told_to_close_past_its_violations() -> None:
    made = await limiter(violations="2/day")
    assert [await made.violated("s") for _ in range(3)] == [False, False, True]
    assert not await made.violated("another")


@pytest.mark.parametrize(
    ("window", "expected"),
    [
        # (previous, previous_ttl, current, current_ttl) of a 60 s window with room for 10.
        ((0, 0.0, 10, 100.0), 40.0),  # full: once this window ends (in 40 s), its 10 weigh less than 10
        ((0, 0.0, 20, 100.0), 70.0),  # twice over: the end, then half the next window
        ((10, 48.0, 5, 110.0), 18.0),  # the previous window weighs 8 now, and must weigh under 5
        ((0, 0.0, 3, 80.0), 0.0),  # not over at all
    ],
)
def test_retry_after_is_when_the_sliding_window_has_room(
    window: tuple[int, float, int, float], expected: float
) -> None:
    assert retry_after_s(10, 60, *window) == pytest.approx(expected)


async def test_shared_limits_let_calls_through_when_redis_cannot_be_reached() -> None:
    """Nothing listens on port 1: the shared limits and counts are not counted, the calls pass,
    and each failure is reported (the per-socket limits, in memory, still hold)."""
    errors: list[str] = []
    made = Limiter(
        LimitSettings(
            ip_http="1/day", socket_messages="1/day", connections_per_ip=1, sockets_per_conversation=1
        ),
        registry=CollectorRegistry(),
        redis_url="redis://127.0.0.1:1/0",
        on_error=errors.append,
    )
    await made.connect()
    for _ in range(3):
        await made.hit(Limit.IP_HTTP, "203.0.113.1")
    assert errors == ["limiter_unavailable"] * 3
    for _ in range(2):
        await made.close_connection(await made.open_connection("203.0.113.1"))
        await made.close_conversation_socket(await made.open_conversation_socket("c"))
    assert errors == ["limiter_unavailable"] * (
        3 + 2 * 3
    )  # a socket: its rate and its count; a conversation: its count
    await made.hit(Limit.SOCKET_MESSAGES, "s")
    with pytest.raises(RateLimited):
        await made.hit(Limit.SOCKET_MESSAGES, "s")
    await made.close()


async def test_the_memory_counters_are_swept_at_most_once_an_interval_and_expired_ones_freed() -> None:
    storage = SweptMemoryStorage()
    await storage.incr("first", 60)
    sweep = storage.timer
    assert sweep is not None
    await asyncio.sleep(0)  # the sweep runs and ends
    assert sweep.done()
    for n in range(50):  # the library alone starts a new sweep for each of these
        await storage.incr(f"key-{n}", 60)
        await asyncio.sleep(0)
    assert storage.timer is sweep
    assert await storage.get("key-7") == 1

    await storage.incr("short", 0.01)
    await asyncio.sleep(0.05)
    storage._next_sweep = 0.0  # the interval is over
    await storage.incr("later", 60)
    await asyncio.sleep(0)
    assert storage.timer is not sweep
    await storage.timer
    assert "short" not in storage.storage  # expired and freed by the sweep, never read again
    assert storage.storage["later"] == 1
