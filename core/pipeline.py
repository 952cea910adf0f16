"""The per-message pipeline: stage selection, then data extraction, then the response prompt.

For one user message in a conversation of a business with a flow:

1. Pattern rules of the current stage (and stage-less ones) run first: they cost nothing, and
   transition conditions then see what this very message said.
2. Stage selection: the transitions' conditions by priority; or, for a stage with a
   stage-selection template, the model picks among the allowed next stages (an invalid pick
   keeps the stage and counts a StageTransitionError).
3. Data extraction by the model, concurrently with 2: the current stage's LLM rules (the message
   answers what that stage asked) through its extraction template, with JSON-schema structured
   output. Then the pattern rules of the stage entered, if it changed. A failure is a
   DataExtractionError, logged and counted, never fatal. Conditions see pattern data of this
   message, not the model's extraction of it (that runs at the same time).
4. The response prompt, rendered from the selected stage's response template (the business's
   default template when the stage has none).

Steps that are not configured cost nothing. Each step's time goes to the observer.
A business without a flow skips 1-3: its default prompts answer, in its entry stage.

What a business configured (patterns, conditions, templates) runs on a budget (see
core/patterns.py, core/conditions.py, core/templates.py), and off the event loop, on a small pool
of worker threads (`CONFIG_WORKERS`): a costly configuration delays its own conversation's answer
by at most its budget, and never stalls the loop the other conversations are served on.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from core.errors import DataExtractionError, LLMError, StageTransitionError, TemplateError
from core.extraction import (
    extract_with_patterns,
    llm_schema,
    merge_extracted,
    parse_llm_extraction,
    plain_values,
)
from core.flow import parse_stage_choice, rules_for_stage, select_next_stage, stage_by_name, template_by_id
from core.flow_models import ExtractedField, ExtractorKind, Flow, FlowContext, Stage, Template
from core.llm import ChatMessage, LLMProvider
from core.models import Business, Conversation, Message
from core.observer import Observer
from core.templates import render
from core.types import Role

log = logging.getLogger(__name__)

T = TypeVar("T")

CONFIG_WORKERS = 2
"""Threads that run businesses' patterns, conditions and templates, for every conversation."""
_WORKERS = ThreadPoolExecutor(max_workers=CONFIG_WORKERS, thread_name_prefix="flow-config")


async def off_loop(function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` on a config worker thread: bounded CPU work that must not stall the loop."""
    return await asyncio.get_running_loop().run_in_executor(_WORKERS, functools.partial(function, *args))


_PROMPT_ROLES = {
    Role.USER: "user",
    Role.ASSISTANT: "assistant",
    Role.AGENT: "assistant",
    Role.SYSTEM: "system",
}


@dataclass(frozen=True, slots=True)
class Prepared:
    """What the pipeline decided for one message."""

    stage: str
    stage_changed: bool
    data: dict[str, Any]
    """The conversation's stored data after this message (values with their source)."""
    data_changed: bool
    prompt: list[ChatMessage]
    """The response prompt, ready for the model."""
    errors: tuple[str, ...] = ()
    prompts: dict[str, list[ChatMessage]] = field(default_factory=dict)
    """Every prompt rendered on the way (selection, extraction, response), for dry runs."""


def standard_variables(
    business: Business, conversation: Conversation, stage: str, message: str, history: Sequence[Message]
) -> dict[str, Any]:
    """The variables every template may use."""
    data = plain_values(conversation.data)
    return {
        "message": message,
        "history": [{"role": m.role.value, "text": m.text} for m in history],
        "stage": stage,
        "extracted": data,
        "business_name": business.name,
        "business_info": business.info,
        "user_name": data.get("name"),
    }


def render_template(template: Template, variables: Mapping[str, Any]) -> tuple[str, str]:
    """(system prompt, content) of a template; a declared variable not provided is an error."""
    missing = [name for name in template.variables if name not in variables]
    if missing:
        raise TemplateError(f"template {template.name!r}: variable(s) not provided: {', '.join(missing)}")
    try:
        return render(template.system_prompt, variables), render(template.content, variables)
    except TemplateError as exc:
        raise TemplateError(f"template {template.name!r}: {exc.message}") from exc


class Pipeline:
    def __init__(self, llm: LLMProvider, observer: Observer) -> None:
        self.llm = llm
        self.observer = observer

    async def prepare(
        self,
        business: Business,
        conversation: Conversation,
        flow: Flow,
        message: Message | None,
        history: Sequence[Message],
    ) -> Prepared:
        """Run the pipeline for `message` (None: answer without a new message)."""
        text = message.text if message is not None else ""
        earlier = [m for m in history if message is None or m.message_id != message.message_id]
        if not flow.stages:
            variables = standard_variables(business, conversation, conversation.stage, text, earlier)
            prompt = await self._default_prompt(business, variables, earlier)
            return Prepared(
                conversation.stage, False, dict(conversation.data), False, prompt, (), {"response": prompt}
            )
        errors: list[str] = []
        prompts: dict[str, list[ChatMessage]] = {}
        message_id = message.message_id if message is not None else None
        current = stage_by_name(flow, conversation.stage)

        # 1. Pattern rules of the current stage: free, and conditions see their results.
        started = time.perf_counter()
        found: dict[str, ExtractedField] = {}
        if current is not None:
            found, pattern_errors = await off_loop(
                functools.partial(extract_with_patterns, message_id=message_id),
                rules_for_stage(flow, current.stage_id),
                text,
            )
            self._extraction_errors(pattern_errors, errors)
        data = merge_extracted(conversation.data, found)
        self.observer.step_seconds("pattern_extraction", time.perf_counter() - started)

        # 2 and 3, concurrently: stage selection, and the model's extraction for the stage the
        # message answered (the current one). Neither needs the other.
        ctx = FlowContext(
            message=text,
            stage=conversation.stage,
            data=plain_values(data),
            turns=conversation.turns + 1,
            turns_in_stage=conversation.turns_in_stage + 1,
        )
        stage_name, extracted = await asyncio.gather(
            self._timed(
                "stage_selection", self._select(business, conversation, flow, ctx, earlier, errors, prompts)
            ),
            self._timed(
                "data_extraction",
                self._extract_llm(
                    business, conversation, flow, current, text, message_id, earlier, errors, prompts
                ),
            ),
        )
        found.update(extracted)
        stage = stage_by_name(flow, stage_name)
        if stage is not None and (current is None or stage.stage_id != current.stage_id):
            # Pattern rules of the stage entered cost nothing either: apply them too.
            more, pattern_errors = await off_loop(
                functools.partial(extract_with_patterns, message_id=message_id),
                rules_for_stage(flow, stage.stage_id),
                text,
            )
            self._extraction_errors(pattern_errors, errors)
            found = {**more, **found}
        data = merge_extracted(conversation.data, found)

        # 4. The response prompt.
        started = time.perf_counter()
        variables = standard_variables(business, replace(conversation, data=data), stage_name, text, earlier)
        response = (
            template_by_id(flow, stage.response_template_id) if stage and stage.response_template_id else None
        )
        if response is None:
            prompt = await self._default_prompt(business, variables, earlier)
        else:
            system, content = await off_loop(render_template, response, variables)
            prompt = _prompt(system, earlier, content)
        prompts["response"] = prompt
        self.observer.step_seconds("response_prompt", time.perf_counter() - started)
        return Prepared(
            stage_name,
            stage_name != conversation.stage,
            data,
            bool(found),
            prompt,
            tuple(errors),
            prompts,
        )

    async def _select(
        self,
        business: Business,
        conversation: Conversation,
        flow: Flow,
        ctx: FlowContext,
        history: Sequence[Message],
        errors: list[str],
        prompts: dict[str, list[ChatMessage]],
    ) -> str:
        decision = await off_loop(select_next_stage, flow, conversation.stage, ctx)
        for error in decision.errors:
            self._count(StageTransitionError, error, errors)
        if decision.via != "llm":
            return decision.stage
        current = stage_by_name(flow, decision.stage)
        template = (
            template_by_id(flow, current.selection_template_id)
            if current and current.selection_template_id
            else None
        )
        if template is None:
            return decision.stage
        variables = standard_variables(business, conversation, decision.stage, ctx.message, history)
        variables["allowed_stages"] = list(decision.allowed)
        system, content = await off_loop(render_template, template, variables)
        prompt = _prompt(
            system,
            history,
            f"{content}\n\nOptions: {', '.join(decision.allowed)}\nAnswer with one option only.",
        )
        prompts["stage_selection"] = prompt
        try:
            answer = await self.llm.complete(prompt, business_id=business.business_id)
        except LLMError as exc:
            self._count(StageTransitionError, f"stage selection failed: {exc.message}", errors)
            return decision.stage
        choice = parse_stage_choice(answer.text, decision.allowed)
        if choice is None:
            self._count(
                StageTransitionError, f"the model picked no allowed stage: {answer.text[:80]!r}", errors
            )
            return decision.stage
        return choice

    async def _timed(self, step: str, work: Awaitable[T]) -> T:
        started = time.perf_counter()
        try:
            return await work
        finally:
            self.observer.step_seconds(step, time.perf_counter() - started)

    async def _extract_llm(
        self,
        business: Business,
        conversation: Conversation,
        flow: Flow,
        stage: Stage | None,
        text: str,
        message_id: str | None,
        history: Sequence[Message],
        errors: list[str],
        prompts: dict[str, list[ChatMessage]],
    ) -> dict[str, ExtractedField]:
        if stage is None:
            return {}
        rules = [r for r in rules_for_stage(flow, stage.stage_id) if r.kind is ExtractorKind.LLM]
        template = (
            template_by_id(flow, stage.extraction_template_id) if stage.extraction_template_id else None
        )
        if not rules or template is None or not text:
            return {}
        variables = standard_variables(business, conversation, stage.name, text, history)
        variables["fields"] = [r.field for r in rules]
        try:
            system, content = await off_loop(render_template, template, variables)
        except TemplateError as exc:
            self._count(DataExtractionError, exc.message, errors)
            return {}
        prompt = _prompt(system, history, content)
        prompts["data_extraction"] = prompt
        try:
            answer = await self.llm.complete(
                prompt, json_schema=llm_schema(rules), business_id=business.business_id
            )
        except LLMError as exc:
            self._count(DataExtractionError, f"extraction failed: {exc.message}", errors)
            return {}
        found, problems = parse_llm_extraction(
            answer.text, rules, message_id=message_id, template_name=template.name
        )
        self._extraction_errors(problems, errors)
        return found

    async def _default_prompt(
        self, business: Business, variables: Mapping[str, Any], history: Sequence[Message]
    ) -> list[ChatMessage]:
        sources = (business.system_prompt, business.response_template)
        if any("{%" in source for source in sources):  # loops or macros: may take its whole budget
            system, content = await off_loop(_render_both, sources, variables)
        else:  # expressions only: a few bounded operations, cheaper than a thread hop
            system, content = _render_both(sources, variables)
        return _prompt(system, history, content)

    def _extraction_errors(self, problems: Sequence[str], errors: list[str]) -> None:
        for problem in problems:
            self._count(DataExtractionError, problem, errors)

    def _count(self, kind: type[Exception], problem: str, errors: list[str]) -> None:
        log.warning("%s: %s", kind.__name__, problem)
        self.observer.error(kind.__name__)
        errors.append(f"{kind.__name__}: {problem}")


def _render_both(sources: tuple[str, str], variables: Mapping[str, Any]) -> tuple[str, str]:
    return render(sources[0], variables), render(sources[1], variables)


def _prompt(system: str, history: Sequence[Message], content: str) -> list[ChatMessage]:
    prompt = [ChatMessage("system", system)] if system else []
    prompt += [ChatMessage(_PROMPT_ROLES[m.role], m.text) for m in history if m.text]
    prompt.append(ChatMessage("user", content))
    return prompt
