"""The Store contract (core.store), run against every Store implementation."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable

import pytest

from core.errors import Conflict, InvalidInput, NotFound
from core.flow_models import (
    ExtractionRule,
    ExtractorKind,
    FieldType,
    Flow,
    Stage,
    Template,
    TemplateType,
    Transition,
)
from core.llm import Usage
from core.models import AuditEntry, AuditRecord, Business, Conversation
from core.store import Store
from core.types import (
    AgentId,
    AnswerStatus,
    BusinessId,
    ConversationId,
    MessageId,
    Mode,
    ResponseId,
    Role,
    StageName,
    new_id,
)


def a_business(public_id: str | None = None) -> Business:
    public_id = public_id or f"biz-{new_id()[:8]}"
    return Business(business_id=BusinessId(new_id()), public_id=public_id, name=public_id)


async def a_conversation(store: Store, business: Business | None = None) -> Conversation:
    business = await store.ensure_business(business or a_business())
    user = await store.create_end_user(business.business_id, None)
    return await store.create_conversation(business.business_id, user, StageName("default"))


async def test_ensure_business_is_idempotent_by_public_id(store: Store) -> None:
    first = await store.ensure_business(a_business("acme"))
    again = await store.ensure_business(a_business("acme"))
    assert again == first
    assert await store.get_business_by_public_id("acme") == first
    assert await store.get_business(first.business_id) == first
    with pytest.raises(NotFound):
        await store.get_business_by_public_id("nobody")


async def test_a_new_conversation_is_in_ai_mode_at_its_stage(store: Store) -> None:
    conv = await a_conversation(store)
    assert conv.mode.value == "ai"
    assert conv.stage == "default"
    assert await store.get_conversation(conv.business_id, conv.conversation_id) == conv


async def test_another_business_never_sees_a_conversation(store: Store) -> None:
    conv = await a_conversation(store)
    other = await store.ensure_business(a_business())
    with pytest.raises(NotFound):
        await store.get_conversation(other.business_id, conv.conversation_id)
    with pytest.raises(NotFound):
        await store.add_user_message(other.business_id, conv.conversation_id, "m", "hi")
    with pytest.raises(NotFound):
        await store.list_messages(other.business_id, conv.conversation_id, after_seq=0, limit=10)


async def test_user_messages_are_idempotent_on_client_msg_id(store: Store) -> None:
    conv = await a_conversation(store)
    first, created = await store.add_user_message(conv.business_id, conv.conversation_id, "m-1", "hello")
    again, created_again = await store.add_user_message(
        conv.business_id, conv.conversation_id, "m-1", "hello"
    )
    assert created is True
    assert created_again is False
    assert again.message_id == first.message_id
    assert first.role is Role.USER
    assert first.seq is None


async def test_concurrent_duplicates_make_one_row(store: Store) -> None:
    conv = await a_conversation(store)
    results = await asyncio.gather(
        *(store.add_user_message(conv.business_id, conv.conversation_id, "same", "hi") for _ in range(20))
    )
    assert sum(created for _, created in results) == 1
    assert len({m.message_id for m, _ in results}) == 1
    rows = await store.recent_messages(conv.business_id, conv.conversation_id, limit=100)
    assert len(rows) == 1


async def test_the_same_client_msg_id_in_two_conversations_is_two_messages(store: Store) -> None:
    a, b = await a_conversation(store), await a_conversation(store)
    ma, _ = await store.add_user_message(a.business_id, a.conversation_id, "k", "x")
    mb, created = await store.add_user_message(b.business_id, b.conversation_id, "k", "x")
    assert created is True
    assert ma.message_id != mb.message_id


async def test_listing_is_by_seq_and_skips_unsequenced_rows(store: Store) -> None:
    conv = await a_conversation(store)
    bid, cid = conv.business_id, conv.conversation_id
    m1, _ = await store.add_user_message(bid, cid, "1", "one")
    m2, _ = await store.add_user_message(bid, cid, "2", "two")
    m3, _ = await store.add_user_message(bid, cid, "3", "three")
    await store.set_message_seq(bid, m2.conversation_id, m2.message_id, 5)
    await store.set_message_seq(bid, m1.conversation_id, m1.message_id, 9)
    listed = await store.list_messages(bid, cid, after_seq=0, limit=10)
    assert [(m.message_id, m.seq) for m in listed] == [(m2.message_id, 5), (m1.message_id, 9)]
    assert [m.seq for m in await store.list_messages(bid, cid, after_seq=5, limit=10)] == [9]
    assert [m.seq for m in await store.list_messages(bid, cid, after_seq=0, limit=1)] == [5]
    assert m3.message_id not in {m.message_id for m in listed}
    again, _ = await store.add_user_message(bid, cid, "2", "two")
    assert again.seq == 5


async def test_assistant_messages_are_idempotent_on_response_id(store: Store) -> None:
    conv = await a_conversation(store)
    rid = ResponseId(new_id())
    first = await store.add_assistant_message(
        conv.business_id, conv.conversation_id, rid, "partial", AnswerStatus.STOPPED
    )
    again = await store.add_assistant_message(
        conv.business_id, conv.conversation_id, rid, "partial", AnswerStatus.STOPPED
    )
    assert again.message_id == first.message_id
    assert first.role is Role.ASSISTANT
    assert first.status is AnswerStatus.STOPPED
    assert first.response_id == rid


async def test_recent_messages_are_the_last_n_in_stored_order(store: Store) -> None:
    conv = await a_conversation(store)
    for n in range(5):
        await store.add_user_message(conv.business_id, conv.conversation_id, f"m{n}", f"text {n}")
    recent = await store.recent_messages(conv.business_id, conv.conversation_id, limit=3)
    assert [m.text for m in recent] == ["text 2", "text 3", "text 4"]


async def test_unknown_ids_are_not_found(store: Store) -> None:
    conv = await a_conversation(store)
    with pytest.raises(NotFound):
        await store.get_conversation(conv.business_id, ConversationId(new_id()))
    with pytest.raises(NotFound):
        await store.get_business(BusinessId(new_id()))


async def test_seqs_raise_last_seq_and_are_unique(store: Store) -> None:
    """set_message_seq keeps the conversation's last_seq at the highest seq, and a seq is taken once."""
    conv = await a_conversation(store)
    bid, cid = conv.business_id, conv.conversation_id
    assert conv.last_seq == 0
    m1, _ = await store.add_user_message(bid, cid, "1", "one")
    m2, _ = await store.add_user_message(bid, cid, "2", "two")
    await store.set_message_seq(bid, m1.conversation_id, m1.message_id, 7)
    await store.set_message_seq(bid, m1.conversation_id, m1.message_id, 7)  # the same value again is fine
    assert (await store.get_conversation(bid, cid)).last_seq == 7
    with pytest.raises(Conflict):
        await store.set_message_seq(bid, m1.conversation_id, m1.message_id, 8)
    with pytest.raises(Conflict):
        await store.set_message_seq(bid, m2.conversation_id, m2.message_id, 7)
    await store.set_message_seq(bid, m2.conversation_id, m2.message_id, 3)
    assert (await store.get_conversation(bid, cid)).last_seq == 7


async def test_the_active_response_is_recorded_and_cleared(store: Store) -> None:
    conv = await a_conversation(store)
    rid = ResponseId(new_id())
    await store.set_active_response(conv.business_id, conv.conversation_id, rid)
    assert (await store.get_conversation(conv.business_id, conv.conversation_id)).active_response_id == rid
    await store.set_active_response(conv.business_id, conv.conversation_id, None)
    assert (await store.get_conversation(conv.business_id, conv.conversation_id)).active_response_id is None


async def test_the_epoch_is_recorded(store: Store) -> None:
    conv = await a_conversation(store)
    assert conv.epoch is None
    await store.set_epoch(conv.business_id, conv.conversation_id, "e-2")
    assert (await store.get_conversation(conv.business_id, conv.conversation_id)).epoch == "e-2"


async def test_turns_count_per_stage(store: Store) -> None:
    conv = await a_conversation(store)
    bid, cid = conv.business_id, conv.conversation_id
    first = await store.record_turn(bid, cid, stage=StageName("default"), data={"a": {"value": 1}})
    assert (first.turns, first.turns_in_stage, first.stage, dict(first.data)) == (
        1,
        1,
        "default",
        {"a": {"value": 1}},
    )
    second = await store.record_turn(bid, cid, stage=StageName("default"), data={})
    assert (second.turns, second.turns_in_stage) == (2, 2)
    moved = await store.record_turn(bid, cid, stage=StageName("contact"), data={"email": {"value": "a@b.c"}})
    assert (moved.turns, moved.turns_in_stage, moved.stage) == (3, 1, "contact")
    assert await store.get_conversation(bid, cid) == moved
    other = await store.ensure_business(a_business())
    with pytest.raises(NotFound):
        await store.record_turn(other.business_id, cid, stage=StageName("x"), data={})


async def test_a_turn_records_the_answer_it_starts_unless_it_is_stored(store: Store) -> None:
    """record_turn with `answering`: the turn and the active answer in one write; without it the
    active answer stays; an answer already stored (ended before its turn was recorded) is not
    recorded as active."""
    conv = await a_conversation(store)
    bid, cid = conv.business_id, conv.conversation_id
    first, second = ResponseId(new_id()), ResponseId(new_id())
    turn = await store.record_turn(bid, cid, stage=StageName("default"), data={}, answering=first)
    assert (turn.turns, turn.active_response_id) == (1, first)
    assert turn == await store.get_conversation(bid, cid)
    kept = await store.record_turn(bid, cid, stage=StageName("default"), data={})
    assert (kept.turns, kept.active_response_id) == (2, first)
    await store.finish_answer(bid, cid, second, "stopped early", AnswerStatus.STOPPED, seq=3)
    late = await store.record_turn(bid, cid, stage=StageName("default"), data={}, answering=second)
    assert (late.turns, late.active_response_id) == (3, first)
    assert late == await store.get_conversation(bid, cid)


async def test_api_keys_name_their_business(store: Store) -> None:
    one, two = await store.ensure_business(a_business()), await store.ensure_business(a_business())
    first, second, rotated = new_id(), new_id(), new_id()
    await store.set_api_key(one.business_id, first)
    await store.set_api_key(two.business_id, second)
    assert (await store.get_business_by_api_key(first)).business_id == one.business_id
    await store.set_api_key(one.business_id, rotated)
    with pytest.raises(NotFound):
        await store.get_business_by_api_key(first)
    assert (await store.get_business_by_api_key(rotated)).business_id == one.business_id
    with pytest.raises(Conflict):
        await store.set_api_key(two.business_id, rotated)


async def test_the_first_claim_of_a_setting_decides_and_replace_overrides_it(store: Store) -> None:
    name = f"setting-{new_id()[:8]}"
    claims = await asyncio.gather(*(store.claim_setting(name, f"value-{n}") for n in range(8)))
    assert len(set(claims)) == 1
    assert claims[0] in {f"value-{n}" for n in range(8)}
    assert await store.claim_setting(name, "later") == claims[0]
    assert await store.claim_setting(name, "chosen", replace=True) == "chosen"
    assert await store.claim_setting(name, "after that") == "chosen"
    assert await store.claim_setting(f"other-{name}", "own value") == "own value"


def a_flow(business_id: BusinessId) -> Flow:
    template = Template(
        new_id(), business_id, "answer", TemplateType.RESPONSE_GENERATION, "{{ message }}", "Be brief."
    )
    greet = Stage(new_id(), business_id, "greeting", is_entry=True, response_template_id=template.template_id)
    done = Stage(new_id(), business_id, "done")
    return Flow(
        business_id=business_id,
        templates=(template,),
        stages=(greet, done),
        transitions=(
            Transition(new_id(), business_id, greet.stage_id, done.stage_id, "turns > 1", 5),
            Transition(new_id(), business_id, greet.stage_id, done.stage_id, None, 1),
        ),
        rules=(
            ExtractionRule(
                new_id(), business_id, "email", ExtractorKind.PATTERN, FieldType.EMAIL, greet.stage_id
            ),
            ExtractionRule(new_id(), business_id, "name", ExtractorKind.LLM, FieldType.TEXT, None),
        ),
    )


async def test_flows_are_saved_whole_versioned_and_audited(store: Store) -> None:
    business = await store.ensure_business(a_business())
    bid = business.business_id
    empty = await store.get_flow(bid)
    assert (empty.stages, empty.transitions, empty.templates, empty.rules) == ((), (), (), ())
    flow = a_flow(bid)
    audit = AuditEntry("admin", "flow.replace", {"stages": 2})
    saved = await store.save_flow(bid, flow, expected_version=empty.version, audit=audit)
    assert saved.version == empty.version + 1
    assert await store.get_flow(bid) == saved
    assert (saved.stages, saved.transitions, saved.templates, saved.rules) == (
        flow.stages,
        flow.transitions,
        flow.templates,
        flow.rules,
    )
    with pytest.raises(Conflict):
        await store.save_flow(bid, flow, expected_version=empty.version, audit=audit)
    smaller = dataclasses.replace(saved, transitions=saved.transitions[1:], rules=())
    again = await store.save_flow(bid, smaller, expected_version=saved.version, audit=audit)
    assert again.transitions == saved.transitions[1:]
    assert again.rules == ()
    records = await store.list_audit(bid, limit=10)
    assert [r.entry for r in records] == [audit, audit]
    other = await store.ensure_business(a_business())
    assert (await store.get_flow(other.business_id)).stages == ()
    with pytest.raises(Conflict):
        await store.save_flow(other.business_id, flow, expected_version=1, audit=audit)
    assert await store.list_audit(other.business_id, limit=10) == []


async def test_answers_keep_their_token_usage_and_system_notes_their_role(store: Store) -> None:
    conv = await a_conversation(store)
    bid, cid = conv.business_id, conv.conversation_id
    rid = ResponseId(new_id())
    answer = await store.add_assistant_message(bid, cid, rid, "hi", AnswerStatus.COMPLETE, usage=Usage(12, 3))
    assert (answer.prompt_tokens, answer.completion_tokens) == (12, 3)
    await store.set_message_seq(bid, cid, answer.message_id, 1)
    note, created = await store.add_user_message(bid, cid, "system:n-1", "a note", role=Role.SYSTEM)
    assert created
    assert note.role is Role.SYSTEM
    await store.set_message_seq(bid, cid, note.message_id, 2)
    listed = await store.list_messages(bid, cid, after_seq=0, limit=10)
    assert [(m.role, m.prompt_tokens, m.completion_tokens) for m in listed] == [
        (Role.ASSISTANT, 12, 3),
        (Role.SYSTEM, None, None),
    ]


# --- agents, who answers, the console's list, the audit log ------------------------------------


async def test_agents_are_created_listed_and_disabled(store: Store) -> None:
    business = await store.ensure_business(a_business())
    bid = business.business_id
    ana = await store.create_agent(bid, "Ana")
    ben = await store.create_agent(bid, "Ben")
    assert (ana.business_id, ana.name, ana.disabled) == (bid, "Ana", False)
    assert await store.get_agent(bid, ana.agent_id) == ana
    assert await store.list_agents(bid) == [ana, ben]

    disabled = await store.set_agent_disabled(bid, ana.agent_id, True)
    assert disabled == dataclasses.replace(ana, disabled=True)
    assert await store.set_agent_disabled(bid, ana.agent_id, True) == disabled  # idempotent
    assert await store.get_agent(bid, ana.agent_id) == disabled
    assert await store.list_agents(bid) == [disabled, ben]
    assert (await store.set_agent_disabled(bid, ana.agent_id, False)).disabled is False


async def test_another_business_never_sees_an_agent(store: Store) -> None:
    owner = await store.ensure_business(a_business())
    agent = await store.create_agent(owner.business_id, "Ana")
    other = await store.ensure_business(a_business())
    assert await store.list_agents(other.business_id) == []
    with pytest.raises(NotFound):
        await store.get_agent(other.business_id, agent.agent_id)
    with pytest.raises(NotFound):
        await store.set_agent_disabled(other.business_id, agent.agent_id, True)
    assert (await store.get_agent(owner.business_id, agent.agent_id)).disabled is False
    for unknown in (new_id(), "not-an-id", ""):
        with pytest.raises(NotFound):
            await store.get_agent(owner.business_id, AgentId(unknown))
    with pytest.raises(NotFound):
        await store.create_agent(BusinessId(new_id()), "Nobody's")


async def test_agent_messages_keep_their_author_as_named_when_written(store: Store) -> None:
    conv = await a_conversation(store)
    bid, cid = conv.business_id, conv.conversation_id
    ana = await store.create_agent(bid, "Ana")
    written, created = await store.add_user_message(
        bid, cid, "a-1", "Hello, Ana here", role=Role.AGENT, author=ana
    )
    assert created
    assert (written.author_id, written.author_name) == (ana.agent_id, "Ana")
    again, created_again = await store.add_user_message(bid, cid, "a-1", "Hello, Ana here", role=Role.AGENT)
    assert not created_again
    assert (again.author_id, again.author_name) == (ana.agent_id, "Ana")
    user, _ = await store.add_user_message(bid, cid, "u-1", "hi")
    await store.set_message_seq(bid, cid, written.message_id, 1)
    await store.set_message_seq(bid, cid, user.message_id, 2)
    listed = await store.list_messages(bid, cid, after_seq=0, limit=10)
    assert [(m.role, m.author_id, m.author_name) for m in listed] == [
        (Role.AGENT, ana.agent_id, "Ana"),
        (Role.USER, None, None),
    ]
    recent = await store.recent_messages(bid, cid, limit=10)
    assert [(m.author_id, m.author_name) for m in recent] == [(ana.agent_id, "Ana"), (None, None)]


async def test_set_mode_records_who_answers(store: Store) -> None:
    conv = await a_conversation(store)
    bid, cid = conv.business_id, conv.conversation_id
    agent = await store.create_agent(bid, "Ana")
    assert conv.agent_id is None
    human = await store.set_mode(bid, cid, Mode.HUMAN, agent.agent_id)
    assert (human.mode, human.agent_id) == (Mode.HUMAN, agent.agent_id)
    assert await store.get_conversation(bid, cid) == human
    back = await store.set_mode(bid, cid, Mode.AI, None)
    assert (back.mode, back.agent_id) == (Mode.AI, None)
    assert await store.get_conversation(bid, cid) == back


async def test_set_mode_refuses_what_it_cannot_record(store: Store) -> None:
    conv = await a_conversation(store)
    bid, cid = conv.business_id, conv.conversation_id
    agent = await store.create_agent(bid, "Ana")
    with pytest.raises(InvalidInput):
        await store.set_mode(bid, cid, Mode.HUMAN, None)
    with pytest.raises(InvalidInput):
        await store.set_mode(bid, cid, Mode.AI, agent.agent_id)
    other = await store.ensure_business(a_business())
    stranger = await store.create_agent(other.business_id, "Stranger")
    with pytest.raises(NotFound):
        await store.set_mode(bid, cid, Mode.HUMAN, stranger.agent_id)  # another business's agent
    with pytest.raises(NotFound):
        await store.set_mode(other.business_id, cid, Mode.HUMAN, stranger.agent_id)  # its conversation
    assert await store.get_conversation(bid, cid) == conv


async def test_open_conversations_newest_activity_first(store: Store) -> None:
    business = await store.ensure_business(a_business())
    bid = business.business_id
    first, second, third = [await a_conversation(store, business) for _ in range(3)]
    agent = await store.create_agent(bid, "Ana")
    await a_conversation(store)  # another business's: never listed

    message, _ = await store.add_user_message(bid, first.conversation_id, "m-1", "hello")
    await store.set_message_seq(bid, first.conversation_id, message.message_id, 1)
    await store.add_user_message(bid, first.conversation_id, "m-2", "not sequenced yet")
    await store.set_mode(bid, second.conversation_id, Mode.HUMAN, agent.agent_id)
    listed = await store.list_open_conversations(bid, active_within_s=3600, limit=10)
    assert [s.conversation_id for s in listed] == [
        second.conversation_id,
        first.conversation_id,
        third.conversation_id,
    ]
    by_id = {s.conversation_id: s for s in listed}
    one = by_id[first.conversation_id]
    assert (one.mode, one.stage, one.agent_id, one.active_response_id) == (Mode.AI, "default", None, None)
    assert (one.last_message_role, one.last_message_text) == (Role.USER, "hello")
    assert one.last_message_at == message.created_at
    two = by_id[second.conversation_id]
    assert (two.mode, two.agent_id, two.last_message_text, two.last_message_at) == (
        Mode.HUMAN,
        agent.agent_id,
        None,
        None,
    )
    assert [
        s.conversation_id for s in await store.list_open_conversations(bid, active_within_s=3600, limit=1)
    ] == [second.conversation_id]


async def test_every_state_write_counts_as_activity(store: Store) -> None:
    """Messages' seqs, answers, turns (the stage), the epoch and the mode each move a conversation
    to the top of the open list."""
    business = await store.ensure_business(a_business())
    bid = business.business_id
    moved, other = await a_conversation(store, business), await a_conversation(store, business)
    cid = moved.conversation_id
    agent = await store.create_agent(bid, "Ana")
    rid = ResponseId(new_id())
    answer = await store.add_assistant_message(bid, cid, rid, "answer", AnswerStatus.COMPLETE)
    writes: list[Callable[[], Awaitable[object]]] = [
        lambda: store.set_active_response(bid, cid, rid),
        lambda: store.set_message_seq(bid, cid, answer.message_id, 4),
        lambda: store.record_turn(bid, cid, stage=StageName("contact"), data={}),
        lambda: store.set_epoch(bid, cid, "e-9"),
        lambda: store.set_mode(bid, cid, Mode.HUMAN, agent.agent_id),
    ]
    for write in writes:
        await store.set_epoch(bid, other.conversation_id, new_id())  # the other one on top
        await write()
        top = (await store.list_open_conversations(bid, active_within_s=3600, limit=1))[0]
        assert top.conversation_id == cid
    assert (top.active_response_id, top.last_message_text, top.stage) == (rid, "answer", "contact")


async def test_quiet_conversations_are_not_open(store: Store) -> None:
    conv = await a_conversation(store)
    bid = conv.business_id
    await asyncio.sleep(1.2)  # only a lower bound on the age matters here: this cannot flake
    assert await store.list_open_conversations(bid, active_within_s=1, limit=10) == []
    await store.set_epoch(bid, conv.conversation_id, "e-1")
    listed = await store.list_open_conversations(bid, active_within_s=3600, limit=10)
    assert [s.conversation_id for s in listed] == [conv.conversation_id]


async def test_audit_records_name_their_conversation_and_actor(store: Store) -> None:
    conv = await a_conversation(store)
    bid = conv.business_id
    agent = await store.create_agent(bid, "Ana")
    entry = AuditEntry(
        "agent",
        "conversation.takeover",
        {"x": 1},
        actor_id=agent.agent_id,
        conversation_id=conv.conversation_id,
    )
    await store.add_audit(bid, entry)
    [record] = await store.list_audit(bid, limit=10)
    assert record.entry == entry
    assert (record.actor_id, record.conversation_id, record.business_id) == (
        agent.agent_id,
        conv.conversation_id,
        bid,
    )


async def test_audit_filters_and_pages_newest_first(store: Store) -> None:
    conv, elsewhere = await a_conversation(store), await a_conversation(store)
    bid = conv.business_id
    ana, ben = await store.create_agent(bid, "Ana"), await store.create_agent(bid, "Ben")
    cid = conv.conversation_id
    entries = [
        AuditEntry("admin", "agent.create", {"n": 0}),
        AuditEntry("agent", "conversation.takeover", {"n": 1}, ana.agent_id, cid),
        AuditEntry("agent", "conversation.handback", {"n": 2}, ana.agent_id, cid),
        AuditEntry("agent", "conversation.takeover", {"n": 3}, ben.agent_id, cid),
        AuditEntry("system", "flow.seed_demo", {"n": 4}),
    ]
    for entry in entries:
        await store.add_audit(bid, entry)
    await store.add_audit(elsewhere.business_id, AuditEntry("admin", "agent.create", {"n": 9}))

    def numbers(records: list[AuditRecord]) -> list[int]:
        return [r.entry.action_data["n"] for r in records]

    everything = await store.list_audit(bid, limit=10)
    assert numbers(everything) == [4, 3, 2, 1, 0]
    assert numbers(await store.list_audit(bid, limit=10, conversation_id=cid)) == [3, 2, 1]
    assert numbers(await store.list_audit(bid, limit=10, actor_id=ana.agent_id)) == [2, 1]
    assert numbers(await store.list_audit(bid, limit=10, action_type="conversation.takeover")) == [3, 1]
    both = await store.list_audit(bid, limit=10, actor_id=ben.agent_id, action_type="conversation.takeover")
    assert numbers(both) == [3]
    at = [r.created_at for r in everything]
    assert numbers(await store.list_audit(bid, limit=10, since=at[2])) == [4, 3, 2]
    assert numbers(await store.list_audit(bid, limit=10, until=at[2])) == [1, 0]
    assert numbers(await store.list_audit(bid, limit=10, since=at[3], until=at[1])) == [2, 1]
    for nothing in (ConversationId(new_id()), ConversationId("not-an-id")):
        assert await store.list_audit(bid, limit=10, conversation_id=nothing) == []
    assert await store.list_audit(bid, limit=10, actor_id="not-an-id") == []
    assert await store.list_audit(bid, limit=10, conversation_id=elsewhere.conversation_id) == []

    pages: list[list[int]] = []
    cursor: str | None = None
    while True:
        page = await store.list_audit(bid, limit=2, before=cursor)
        if not page:
            break
        pages.append(numbers(page))
        cursor = page[-1].cursor
    assert pages == [[4, 3], [2, 1], [0]]
    after_ana = await store.list_audit(bid, limit=10, actor_id=ana.agent_id, before=everything[1].cursor)
    assert numbers(after_ana) == [2, 1]
    for bad in (
        "",
        "garbage",
        "2025-01-01T00:00:00|",
        "2025-01-01T00:00:00|x",
        "2025-01-01T00:00:00+00:00|x",
        "yesterday|" + new_id(),
    ):
        with pytest.raises(InvalidInput):
            await store.list_audit(bid, limit=10, before=bad)


async def test_state_writes_return_the_conversation_as_they_left_it(store: Store) -> None:
    conv = await a_conversation(store)
    bid, cid = conv.business_id, conv.conversation_id
    rid = ResponseId(new_id())
    active = await store.set_active_response(bid, cid, rid)
    assert active.active_response_id == rid
    assert active == await store.get_conversation(bid, cid)
    epoch = await store.set_epoch(bid, cid, "e-9")
    assert (epoch.epoch, epoch.active_response_id) == ("e-9", rid)
    assert epoch == await store.get_conversation(bid, cid)
    message, _ = await store.add_user_message(bid, cid, "m-1", "hello")
    sequenced = await store.set_message_seq(bid, cid, message.message_id, 4)
    assert (sequenced.last_seq, sequenced.epoch) == (4, "e-9")
    assert sequenced == await store.get_conversation(bid, cid)
    cleared = await store.set_active_response(bid, cid, None)
    assert cleared.active_response_id is None
    assert cleared == await store.get_conversation(bid, cid)
    other = await store.ensure_business(a_business())
    with pytest.raises(NotFound):
        await store.set_epoch(other.business_id, cid, "hijack")


async def test_finishing_an_answer_stores_it_with_its_seq_and_clears_it(store: Store) -> None:
    """finish_answer: the answer with its usage and seq, listed in history; last_seq raised; the
    active answer cleared because it was this one; the state returned is the stored one."""
    conv = await a_conversation(store)
    bid, cid = conv.business_id, conv.conversation_id
    rid = ResponseId(new_id())
    await store.set_active_response(bid, cid, rid)
    message, state = await store.finish_answer(
        bid, cid, rid, "the answer", AnswerStatus.COMPLETE, seq=6, usage=Usage(10, 2)
    )
    assert (message.message_id, message.response_id, message.role) == (MessageId(rid), rid, Role.ASSISTANT)
    assert (message.text, message.status, message.seq) == ("the answer", AnswerStatus.COMPLETE, 6)
    assert (message.prompt_tokens, message.completion_tokens) == (10, 2)
    assert (state.last_seq, state.active_response_id) == (6, None)
    assert state == await store.get_conversation(bid, cid)
    assert await store.list_messages(bid, cid, after_seq=0, limit=10) == [message]


async def test_finishing_an_answer_is_idempotent_and_leaves_a_newer_answer_active(store: Store) -> None:
    conv = await a_conversation(store)
    bid, cid = conv.business_id, conv.conversation_id
    old, new = ResponseId(new_id()), ResponseId(new_id())
    await store.set_active_response(bid, cid, new)
    first, state = await store.finish_answer(bid, cid, old, "old", AnswerStatus.INTERRUPTED, seq=3)
    assert state.active_response_id == new  # another answer: not cleared
    again, state = await store.finish_answer(bid, cid, old, "old, again", AnswerStatus.INTERRUPTED, seq=3)
    assert again == first  # the stored answer, not a second one
    assert (state.last_seq, state.active_response_id) == (3, new)
    assert [m.message_id for m in await store.list_messages(bid, cid, after_seq=0, limit=10)] == [
        MessageId(old)
    ]


async def test_an_answer_finished_without_seq_gets_it_later(store: Store) -> None:
    """With no seq (its event log was lost) the answer is stored but not listed; finishing it again
    with a seq records it, as set_message_seq would."""
    conv = await a_conversation(store)
    bid, cid = conv.business_id, conv.conversation_id
    rid = ResponseId(new_id())
    await store.set_active_response(bid, cid, rid)
    message, state = await store.finish_answer(bid, cid, rid, "text", AnswerStatus.STOPPED, seq=None)
    assert message.seq is None
    assert (state.last_seq, state.active_response_id) == (0, None)
    assert await store.list_messages(bid, cid, after_seq=0, limit=10) == []
    assert [m.message_id for m in await store.recent_messages(bid, cid, limit=5)] == [MessageId(rid)]
    message, state = await store.finish_answer(bid, cid, rid, "text", AnswerStatus.STOPPED, seq=2)
    assert (message.seq, state.last_seq) == (2, 2)
    with pytest.raises(Conflict):
        await store.finish_answer(bid, cid, rid, "text", AnswerStatus.STOPPED, seq=5)
    assert (await store.get_conversation(bid, cid)).last_seq == 2


async def test_a_finish_whose_seq_is_taken_stores_nothing(store: Store) -> None:
    conv = await a_conversation(store)
    bid, cid = conv.business_id, conv.conversation_id
    user, _ = await store.add_user_message(bid, cid, "m-1", "hello")
    await store.set_message_seq(bid, cid, user.message_id, 1)
    rid = ResponseId(new_id())
    await store.set_active_response(bid, cid, rid)
    with pytest.raises(Conflict):
        await store.finish_answer(bid, cid, rid, "text", AnswerStatus.COMPLETE, seq=1)
    assert [m.message_id for m in await store.recent_messages(bid, cid, limit=5)] == [user.message_id]
    assert (await store.get_conversation(bid, cid)).active_response_id == rid


async def test_finishing_an_answer_of_another_business_is_not_found(store: Store) -> None:
    conv = await a_conversation(store)
    other = await store.ensure_business(a_business())
    rid = ResponseId(new_id())
    with pytest.raises(NotFound):
        await store.finish_answer(
            other.business_id, conv.conversation_id, rid, "x", AnswerStatus.COMPLETE, seq=1
        )
    with pytest.raises(NotFound):
        await store.finish_answer(
            conv.business_id, ConversationId(new_id()), rid, "x", AnswerStatus.COMPLETE, seq=1
        )
    assert await store.recent_messages(conv.business_id, conv.conversation_id, limit=5) == []


async def test_active_conversations_are_counted_by_mode(store: Store) -> None:
    """The operator's count: conversations active lately, of every business, by mode."""
    before = await store.count_active_conversations(active_within_s=3600)
    first, second = await a_conversation(store), await a_conversation(store)
    agent = await store.create_agent(second.business_id, "Ana")
    await store.set_mode(second.business_id, second.conversation_id, Mode.HUMAN, agent.agent_id)
    after = await store.count_active_conversations(active_within_s=3600)
    assert after[Mode.AI] - before[Mode.AI] == 1
    assert after[Mode.HUMAN] - before[Mode.HUMAN] == 1
    assert first.mode is Mode.AI
