"""The pipeline runs a business's configuration off the event loop, and its limits surface as the
pipeline's own errors: a template over a limit fails the prompt; a condition over its budget is
false and reported; a hostile pattern costs nothing."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import pytest

from core.errors import TemplateError
from core.flow_models import ExtractionRule, ExtractorKind, Flow, Stage, Template, TemplateType, Transition
from core.models import Business, Conversation, Message
from core.observer import NullObserver
from core.pipeline import Pipeline, off_loop
from core.scripted_llm import ScriptedLLM
from core.types import BusinessId, ConversationId, EndUserId, MessageId, Mode, Role, StageName

BIZ = BusinessId("biz-1")
BUSINESS = Business(BIZ, "shop", "Shop")
THIRTY = "[" + ",".join(str(n) for n in range(30)) + "]"


def conversation() -> Conversation:
    return Conversation(
        ConversationId("c-1"), BIZ, EndUserId("u-1"), Mode.AI, StageName("start"), datetime.now(UTC)
    )


def message(text: str) -> Message:
    return Message(MessageId("m-1"), ConversationId("c-1"), Role.USER, text, datetime.now(UTC))


def flow(content: str, condition: str = "false", pattern: str = r"\d+") -> Flow:
    return Flow(
        BIZ,
        stages=(
            Stage("s-start", BIZ, "start", is_entry=True, response_template_id="t-1"),
            Stage("s-next", BIZ, "next", response_template_id="t-1"),
        ),
        transitions=(Transition("t-a", BIZ, "s-start", "s-next", condition=condition),),
        templates=(Template("t-1", BIZ, "reply", TemplateType.RESPONSE_GENERATION, content),),
        rules=(ExtractionRule("r-1", BIZ, "code", ExtractorKind.PATTERN, pattern=pattern),),
    )


def pipeline() -> Pipeline:
    return Pipeline(ScriptedLLM(), NullObserver())


async def test_configuration_work_runs_on_a_worker_thread() -> None:
    name = await off_loop(lambda: threading.current_thread().name)
    assert name.startswith("flow-config")
    assert name != threading.current_thread().name


async def test_a_template_over_a_limit_fails_the_prompt_naming_it() -> None:
    hostile = flow("{% for i in range(message|length * 10**6) %}x{% endfor %}")
    with pytest.raises(TemplateError, match=r"template 'reply': template over a limit: range\(\) of 2000000"):
        await pipeline().prepare(BUSINESS, conversation(), hostile, message("hi"), [])


async def test_a_condition_over_its_budget_is_false_and_reported() -> None:
    costly = flow("{{ message }}", condition=f"{THIRTY}.all(a, {THIRTY}.all(b, a + b >= 0))")
    prepared = await pipeline().prepare(BUSINESS, conversation(), costly, message("hi"), [])
    assert prepared.stage == "start"
    # The steps run out first; on a machine loaded enough the time (the backstop) may instead.
    spent = ("took more than 5000 steps (the limit)", "took longer than 0.25 s (the limit)")
    assert any(limit in error for error in prepared.errors for limit in spent), prepared.errors


async def test_a_hostile_pattern_and_message_extract_nothing_and_go_on() -> None:
    shout = flow("{{ message }}", condition="true", pattern="(?P<value>(a+)+)$")
    prepared = await pipeline().prepare(BUSINESS, conversation(), shout, message("a" * 4000 + "!"), [])
    assert (prepared.stage, prepared.data, prepared.errors) == ("next", {}, ())
