"""A business's configuration cannot hurt anyone else, against real gateway processes.

Refused when saved (422 naming the problem): patterns RE2 cannot run (backreferences,
lookaround), conditions nesting comprehensions too deep, templates with a literal `range()` over
the limit. Accepted but bounded when run: a catastrophic-backtracking pattern meets the message
that would have frozen Python's `re` (it runs on RE2, the bystander's answer streams on); a
template that goes over a limit at render time fails its own answer, which ends `failed`, is
stored and is followed by the usual notice. And a loop held up longer than the answer lease
(`tests.stall_gateway`) never ends another conversation's answer on the same instance.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator

import pytest

from core.answers import FAILED_NOTICE
from tests.databases import delete_redis_keys
from tests.e2e.client import Client, new_widget, stored_history
from tests.e2e.test_admin_api import Admin, error, restoring_flow, unique
from tests.servers import GatewayProcess
from tests.stall_gateway import STALL_MARK


@pytest.fixture
def admin(gateway: GatewayProcess) -> Iterator[Admin]:
    yield from restoring_flow(Admin(gateway))


@pytest.fixture
def slow_admin(slow_gateway: GatewayProcess) -> Iterator[Admin]:
    yield from restoring_flow(Admin(slow_gateway))


# --- refused when saved ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "problem"),
    [
        ({"pattern": r"(a)\1"}, "pattern does not compile: backreferences are not supported"),
        ({"pattern": r"(?P<v>a)(?P=v)"}, "pattern does not compile: backreferences are not supported"),
        ({"pattern": r"(?<!x)\d+"}, "pattern does not compile: lookbehind are not supported"),
        ({"pattern": r"\w+", "validator": r"(?=\d)\w+"}, "validator does not compile: lookahead"),
        ({"pattern": "a" * 2001}, "pattern is 2001 characters long; the maximum is 2000"),
    ],
)
def test_patterns_re2_cannot_run_are_refused_naming_the_problem(
    admin: Admin, rule: dict[str, str], problem: str
) -> None:
    before = admin.flow()
    refused = error(
        admin.post("/extraction-rules", {"field": "code", "kind": "pattern", **rule}), 422, "invalid_flow"
    )
    assert any(problem in p and "field 'code'" in p for p in refused["problems"]), refused
    assert admin.flow() == before


def test_a_catastrophic_pattern_in_python_terms_is_accepted_by_re2(admin: Admin) -> None:
    r = admin.post("/extraction-rules", {"field": "shout", "kind": "pattern", "pattern": "(a+)+$"})
    assert r.status_code == 201, r.text


def test_costly_conditions_are_refused_naming_the_limit(admin: Admin) -> None:
    numbers = "[0,1,2,3,4,5,6,7,8,9]"
    nested = f"{numbers}.all(a, {numbers}.all(b, {numbers}.all(c, {numbers}.all(d, a+b+c+d >= 0))))"
    refused = error(
        admin.post("/transitions", {"from": "greeting", "to": "contact", "condition": nested}),
        422,
        "invalid_flow",
    )
    assert any("nests comprehensions" in p and "4 deep; the maximum is 2" in p for p in refused["problems"])
    long = " || ".join(['message.contains("refund")'] * 40)
    refused = error(
        admin.post("/transitions", {"from": "greeting", "to": "contact", "condition": long}),
        422,
        "invalid_flow",
    )
    assert any("characters long; the maximum is 1000" in p for p in refused["problems"]), refused


def test_a_literal_range_over_the_limit_is_refused_when_saved(admin: Admin) -> None:
    body = {
        "name": unique("tpl"),
        "type": "response_generation",
        "content": "{% for i in range(10**9) %}x{% endfor %}",
    }
    refused = error(admin.post("/templates", body), 422, "invalid_flow")
    assert any(
        "content line 1: range() of 1000000000 numbers; the maximum is 1000" in p for p in refused["problems"]
    ), refused


def test_a_template_too_long_or_too_deep_to_compile_is_refused_when_saved(admin: Admin) -> None:
    body = {"name": unique("tpl"), "type": "response_generation", "content": "x" * 20_001}
    refused = error(admin.post("/templates", body), 422, "invalid_flow")
    assert any("content is 20001 characters long; the maximum is 20000" in p for p in refused["problems"])
    body = {**body, "content": "ok", "system_prompt": "{% if 1 %}" * 600 + "{% endif %}" * 600}
    refused = error(admin.post("/templates", body), 422, "invalid_flow")
    assert any("system_prompt nests too deeply to compile" in p for p in refused["problems"]), refused


def test_a_template_over_a_limit_at_render_time_is_a_clear_dry_run_error(admin: Admin) -> None:
    r = admin.patch(
        "/templates/greet", {"content": "{% for i in range(message|length * 10**6) %}x{% endfor %}"}
    )
    assert r.status_code == 200, r.text
    failed = error(admin.post("/dry-run", {"message": "hi"}), 422, "template_error")
    assert "range() of 2000000 numbers; the maximum is 1000" in failed["message"], failed
    r = admin.patch("/templates/greet", {"content": "{{ message * 10**6 }}"})
    assert r.status_code == 200, r.text
    failed = error(admin.post("/dry-run", {"message": "hi"}), 422, "template_error")
    assert "the result would be over 1000000" in failed["message"], failed


# --- bounded when run --------------------------------------------------------------------------


async def test_a_hostile_pattern_and_message_do_not_hold_up_a_bystander(
    slow_gateway: GatewayProcess, slow_admin: Admin
) -> None:
    """`(a+)+$` against 60 a's and a `!` would run for ages on Python's `re` (each a doubles the
    time); on RE2 it does not match, at once, and both conversations are answered in full."""
    r = slow_admin.post("/extraction-rules", {"field": "shout", "kind": "pattern", "pattern": "(a+)+$"})
    assert r.status_code == 201, r.text
    bystander, hostile = new_widget(slow_gateway), new_widget(slow_gateway)
    by_client, hostile_client = await Client.open(slow_gateway), await Client.open(slow_gateway)
    try:
        await by_client.hello(bystander)
        await hostile_client.hello(hostile)
        started = await by_client.ask_and_read("by-1", "hello there", deltas=2)
        await hostile_client.send({"type": "message", "client_msg_id": "h-1", "text": "a" * 60 + "!"})
        hostile_end, by_end = await asyncio.gather(hostile_client.until_ai_end(), by_client.until_ai_end())
    finally:
        await by_client.close()
        await hostile_client.close()
    assert by_end[-1]["response_id"] == started["response_id"]
    assert by_end[-1]["status"] == "complete", by_end[-1]
    assert hostile_end[-1]["status"] == "complete", hostile_end[-1]
    history = await stored_history(slow_gateway, hostile, 2)
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert history[1]["status"] == "complete"


async def test_a_template_over_a_limit_fails_its_answer_which_is_stored(
    gateway: GatewayProcess, admin: Admin
) -> None:
    r = admin.patch(
        "/templates/greet", {"content": "{% for i in range(message|length * 10**6) %}x{% endfor %}"}
    )
    assert r.status_code == 200, r.text
    widget = new_widget(gateway)
    client = await Client.open(gateway)
    try:
        await client.hello(widget)
        await client.send({"type": "message", "client_msg_id": "m-1", "text": "hi"})
        frames = await client.until_ai_end()
        notice = await client.recv_type("message")
    finally:
        await client.close()
    assert [f["type"] for f in frames if f["type"] in ("ai_start", "ai_end")] == ["ai_start", "ai_end"]
    assert frames[-1]["status"] == "failed", frames[-1]
    assert (notice["role"], notice["text"]) == ("system", FAILED_NOTICE)
    history = await stored_history(gateway, widget, 3)
    assert [(m["role"], m.get("status")) for m in history] == [
        ("user", None),
        ("assistant", "failed"),
        ("system", None),
    ]
    assert history[1]["response_id"] == frames[-1]["response_id"]


@pytest.fixture(scope="session")
def stall_gateway(gateway_factory: Callable[..., GatewayProcess]) -> Iterator[GatewayProcess]:
    """A gateway whose loop a message can hold up for 3 s, three times its 1 s answer lease, and
    whose answers stream for several seconds.

    It is an instance on its own: with Redis, its keys have a prefix no other gateway of the run
    shares. (Instances sharing Redis sweep each other's expired leases, and one held up longer
    than a lease cannot be told from a dead one: that is what the lease is for.)"""
    prefix = f"chatgw-stall-{uuid.uuid4().hex[:8]}:"
    env = {
        "CHATGW_ANSWER_LEASE_S": "1",
        "CHATGW_TEST_STALL_S": "3",
        "CHATGW_SCRIPTED_TPS": "40",
        "CHATGW_SCRIPTED_TOKENS": "200",
        "CHATGW_REDIS_PREFIX": prefix,
    }
    gw = gateway_factory(env, module="tests.stall_gateway")
    yield gw
    gw.stop()
    if "REDIS_URL" in gw.env:
        delete_redis_keys(prefix)


async def test_a_stalled_loop_does_not_end_another_conversations_answer(
    stall_gateway: GatewayProcess,
) -> None:
    bystander, staller = new_widget(stall_gateway), new_widget(stall_gateway)
    by_client, stall_client = await Client.open(stall_gateway), await Client.open(stall_gateway)
    try:
        await by_client.hello(bystander)
        await stall_client.hello(staller)
        started = await by_client.ask_and_read("by-1", "tell me a long story", deltas=2)
        await stall_client.send({"type": "message", "client_msg_id": "s-1", "text": f"{STALL_MARK} now"})
        stall_end, by_end = await asyncio.gather(stall_client.until_ai_end(), by_client.until_ai_end())
    finally:
        await by_client.close()
        await stall_client.close()
    assert by_end[-1]["response_id"] == started["response_id"]
    assert by_end[-1]["status"] == "complete", by_end[-1]
    assert stall_end[-1]["status"] == "complete", stall_end[-1]
    history = await stored_history(stall_gateway, bystander, 2)
    assert [(m["role"], m.get("status")) for m in history] == [("user", None), ("assistant", "complete")]
