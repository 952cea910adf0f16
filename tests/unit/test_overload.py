"""Overload on the in-memory backends: the instance-wide limit on answers running at once, and the
one lease renewal call per tick for all of an instance's answers."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from core.admission import Admission
from core.broker import AnswerLease
from core.conversation import ConversationService, CoreSettings
from core.errors import Overloaded
from core.scripted_llm import ScriptedLLM
from core.types import ConversationId, EventType, Role, StageName
from gateway.backends.memory_broker import MemoryBroker
from gateway.backends.memory_store import MemoryStore
from tests.unit.test_conversation_service import BUSINESS, Recorder


class CountingBroker(MemoryBroker):
    """The memory broker, counting its lease calls."""

    def __init__(self) -> None:
        super().__init__()
        self.holds = 0
        self.renewals: list[int] = []  # leases per renew_leases call

    async def hold_lease(self, lease: AnswerLease, ttl: float) -> None:
        self.holds += 1
        await super().hold_lease(lease, ttl)

    async def renew_leases(self, leases: Sequence[AnswerLease], ttl: float) -> list[AnswerLease]:
        self.renewals.append(len(leases))
        return await super().renew_leases(leases, ttl)


async def setup(
    llm: ScriptedLLM, conversations: int, settings: CoreSettings, broker: MemoryBroker | None = None
) -> tuple[ConversationService, list[ConversationId], Recorder, MemoryStore]:
    store, broker = MemoryStore(), broker or MemoryBroker()
    await store.ensure_business(BUSINESS)
    recorder = Recorder()
    broker.set_listener(recorder)
    cids = []
    for _ in range(conversations):
        user = await store.create_end_user(BUSINESS.business_id, None)
        conv = await store.create_conversation(BUSINESS.business_id, user, StageName("default"))
        await broker.subscribe(conv.conversation_id)
        cids.append(conv.conversation_id)
    service = ConversationService(store=store, broker=broker, llm=llm, settings=settings)
    return service, cids, recorder, store


async def until_idle(service: ConversationService, cids: list[ConversationId]) -> None:
    async with asyncio.timeout(20):
        while any(service.answering(c) for c in cids):
            await asyncio.sleep(0.01)


async def test_a_message_beyond_the_limit_is_refused_before_it_is_stored() -> None:
    llm = ScriptedLLM(tokens_per_second=100, tokens=30)  # each answer streams for about 0.3 s
    settings = CoreSettings(delta_flush_seconds=0.001, max_active_answers=2, overload_retry_ms=500)
    service, (a, b, c), recorder, store = await setup(llm, 3, settings)
    await service.post_user_message(BUSINESS, a, "a1", "first")
    await service.post_user_message(BUSINESS, b, "b1", "first")
    assert service.answers.active == 2
    with pytest.raises(Overloaded) as refused:
        await service.post_user_message(BUSINESS, c, "c1", "one too many")
    assert refused.value.code == "unavailable"
    assert 500 <= refused.value.retry_after_ms <= 1000
    assert await store.recent_messages(BUSINESS.business_id, c, limit=10) == []
    # A conversation answering already is admitted: its message waits for the running answer.
    ack = await service.post_user_message(BUSINESS, a, "a2", "second")
    assert not ack.duplicate
    await until_idle(service, [a, b])
    assert service.answers.active == 0
    # The refused message, sent again once answers ended, is taken and answered.
    retry = await service.post_user_message(BUSINESS, c, "c1", "one too many")
    assert not retry.duplicate
    await until_idle(service, [c])
    stored = await store.recent_messages(BUSINESS.business_id, c, limit=10)
    assert [(m.role, m.client_msg_id) for m in stored if m.role is Role.USER] == [(Role.USER, "c1")]
    assert [m.role for m in stored] == [Role.USER, Role.ASSISTANT]
    ends = recorder.of(EventType.AI_END)
    assert {e.conversation_id for e in ends} == {a, b, c}
    assert all(e.payload["status"] == "complete" for e in ends)


async def test_the_limit_does_not_refuse_a_conversation_an_agent_holds() -> None:
    llm = ScriptedLLM(tokens_per_second=100, tokens=30)
    settings = CoreSettings(delta_flush_seconds=0.001, max_active_answers=1)
    service, (a, b), _recorder, store = await setup(llm, 2, settings)
    agent = (await store.create_agent(BUSINESS.business_id, "Ann")).agent_id
    await service.take_over(BUSINESS, b, agent)
    await service.post_user_message(BUSINESS, a, "a1", "first")
    ack = await service.post_user_message(BUSINESS, b, "b1", "for the agent")  # no answer due
    assert not ack.duplicate
    stored = await store.recent_messages(BUSINESS.business_id, b, limit=10)
    assert [m.client_msg_id for m in stored] == ["b1"]
    await service.hand_back(BUSINESS, b, agent)
    await until_idle(service, [a, b])
    # Back in AI mode, the limit applies to it again.
    await service.post_user_message(BUSINESS, a, "a2", "second")
    with pytest.raises(Overloaded):
        await service.post_user_message(BUSINESS, b, "b2", "for the AI")
    await until_idle(service, [a, b])


async def test_concurrent_messages_never_exceed_the_limit() -> None:
    llm = ScriptedLLM(tokens_per_second=100, tokens=30)
    settings = CoreSettings(delta_flush_seconds=0.001, max_active_answers=3)
    service, cids, _recorder, _store = await setup(llm, 10, settings)
    outcomes = await asyncio.gather(
        *(service.post_user_message(BUSINESS, cid, "m1", "hello") for cid in cids), return_exceptions=True
    )
    refused = [o for o in outcomes if isinstance(o, Overloaded)]
    assert len(refused) == 7
    assert service.answers.active == 3
    await until_idle(service, cids)


async def test_every_answer_lease_is_renewed_in_one_call_per_tick() -> None:
    """Answers that last several lease periods are never swept as interrupted: their leases are
    renewed together, one broker call per tick however many answers stream."""
    broker = CountingBroker()
    llm = ScriptedLLM(tokens_per_second=20, tokens=40)  # about 2 s per answer
    settings = CoreSettings(delta_flush_seconds=0.001, lease_seconds=0.9, sweep_seconds=0.1)
    service, cids, recorder, _store = await setup(llm, 5, settings, broker)
    service.start()
    try:
        for cid in cids:
            await service.post_user_message(BUSINESS, cid, "m1", "hello")
        await until_idle(service, cids)
    finally:
        await service.aclose()
    ends = recorder.of(EventType.AI_END)
    assert [e.payload["status"] for e in ends] == ["complete"] * 5
    assert broker.holds == 5  # one hold per answer; every renewal after it went in a batch
    assert broker.renewals, "no renewal happened"
    assert max(broker.renewals) == 5


def test_the_retry_after_estimates_the_wait_for_a_slot() -> None:
    """Little's law: conversations waiting x seconds per answer / slots; never below the configured
    least, spread by up to half; refusals older than the window no longer count."""
    now = [100.0]
    admission = Admission(limit=10, retry_ms=1000, max_retry_ms=30_000, window=10, clock=lambda: now[0])
    busy = {ConversationId(f"busy-{n}") for n in range(10)}
    with pytest.raises(Overloaded) as first:
        admission.reserve(ConversationId("w-0"), busy)
    assert 1000 <= first.value.retry_after_ms <= 1500  # no answer ended yet: the least
    for _ in range(5):
        admission.answer_ended(2.0)
    for n in range(1, 50):
        with pytest.raises(Overloaded) as refused:
            admission.reserve(ConversationId(f"w-{n}"), busy)
    assert 10_000 <= refused.value.retry_after_ms <= 15_000  # 50 waiting x 2 s / 10 slots
    now[0] += 11
    with pytest.raises(Overloaded) as later:
        admission.reserve(ConversationId("w-late"), busy)
    assert 1000 <= later.value.retry_after_ms <= 1500  # the others' refusals are over 10 s old
    admission.reserve(ConversationId("w-late"), busy - {ConversationId("busy-0")})  # a slot freed
    admission.release(ConversationId("w-late"))


def test_the_limit_shrinks_while_the_event_loop_lags_and_grows_back_when_it_binds() -> None:
    admission = Admission(limit=100, retry_ms=1000, lag_target=0.1, floor=16)
    busy = {ConversationId(f"busy-{n}") for n in range(100)}
    admission.sample(0.02)
    assert admission.limit == 100  # no lag: the cap
    for _ in range(3):
        admission.sample(0.5)
    assert admission.limit == 72  # 100 -> 90 -> 81 -> 72: a tenth less per lagging tick
    for _ in range(50):
        admission.sample(2.0)
    assert admission.limit == 16  # never below the floor
    admission.sample(0.01)
    assert admission.limit == 16  # no lag, but nothing was refused: the limit held nobody back
    with pytest.raises(Overloaded):
        admission.reserve(ConversationId("new"), busy)
    admission.sample(0.01)
    assert admission.limit == 17  # it held someone back and the loop keeps up: one more
    with pytest.raises(Overloaded):
        admission.reserve(ConversationId("new"), busy)
    admission.sample(0.07)
    assert admission.limit == 17  # between half the target and the target: held
    off = Admission(limit=100, retry_ms=1000, lag_target=0)
    off.sample(5.0)
    assert off.limit == 100  # without a lag target the cap is the limit


def test_arrivals_are_refused_while_the_lag_of_the_last_second_is_over_its_threshold() -> None:
    """The mean of the last second's samples (4 ticks of 0.25 s) decides: one late tick among
    punctual ones lets arrivals in, a loop late tick after tick does not, and one on time again
    lets them in once the late ticks are out of the second."""
    admission = Admission(limit=0, retry_ms=1000, arrivals_lag=0.1)
    assert admission.watching  # no cap on answers, but the lag is needed for arrivals
    admission.admit_arrival("a new conversation")  # no sample yet
    for lag in (0.0, 0.0, 0.0, 0.3):
        admission.sample(lag)
    admission.admit_arrival("a new conversation")  # mean 0.075 s: one spike
    for _ in range(3):
        admission.sample(0.3)
    with pytest.raises(Overloaded) as refused:
        admission.admit_arrival("a new conversation")
    assert "overloaded (its event loop ran 300 ms late on average" in refused.value.message
    assert "a new conversation is not taken now" in refused.value.message
    assert 1000 <= refused.value.retry_after_ms <= 1500
    for _ in range(4):
        admission.sample(0.01)
    admission.admit_arrival("a new socket")
    assert admission.limit == 0  # the answer limit is not touched: there is none
    off = Admission(limit=10, retry_ms=1000, arrivals_lag=0)
    off.sample(5.0)
    off.admit_arrival("a new socket")  # 0: never refused
    assert not Admission(limit=0, retry_ms=1000, lag_target=0.1).watching


def test_a_refused_arrivals_retry_spreads_the_refused_over_time() -> None:
    """Refusals in the last window x 20 ms (50 a second in all), never below the configured least
    nor above the most, plus up to half; refusals older than the window no longer count."""
    now = [100.0]
    admission = Admission(
        limit=0, retry_ms=1000, max_retry_ms=30_000, window=10, arrivals_lag=0.1, clock=lambda: now[0]
    )
    for _ in range(4):
        admission.sample(1.0)
    for _ in range(499):
        with pytest.raises(Overloaded):
            admission.admit_arrival("a new socket")
    with pytest.raises(Overloaded) as refused:
        admission.admit_arrival("a new socket")
    assert 10_000 <= refused.value.retry_after_ms <= 15_000  # 500 refused x 20 ms
    for _ in range(2000):
        with pytest.raises(Overloaded) as refused:
            admission.admit_arrival("a new socket")
    assert 30_000 <= refused.value.retry_after_ms <= 45_000  # at most 30 s, plus the spread
    now[0] += 11
    with pytest.raises(Overloaded) as later:
        admission.admit_arrival("a new socket")
    assert 1000 <= later.value.retry_after_ms <= 1500


def test_arrivals_are_refused_while_the_database_pool_keeps_queries_waiting() -> None:
    """With the pool's running wait counts given, the mean wait of the queries that got a
    connection in the last second's ticks decides, whatever the loop's lag."""
    waited = [0, 0.0]
    admission = Admission(limit=0, retry_ms=1000, arrivals_lag=0.25, arrivals_queue_wait=1.0)
    admission.queue_waits = lambda: (int(waited[0]), float(waited[1]))
    admission.sample(0.0)  # the first reading: nothing to compare yet
    for _ in range(4):
        waited[0] += 10
        waited[1] += 5.0  # 10 queries waited 0.5 s each, per tick
        admission.sample(0.0)
    assert admission.recent_queue_wait == 0.5
    admission.admit_arrival("a new conversation")
    waited[0] += 10
    waited[1] += 40.0  # then 4 s each: the mean of the last 4 ticks is (3 x 0.5 + 4) / 4 s
    admission.sample(0.0)
    with pytest.raises(Overloaded) as refused:
        admission.admit_arrival("a new conversation")
    assert "database queries waited 1375 ms for a connection on average" in refused.value.message
    for _ in range(4):
        admission.sample(0.0)  # no query waited in the last second
    assert admission.recent_queue_wait == 0.0
    admission.admit_arrival("a new socket")
    assert Admission(limit=0, retry_ms=1000, arrivals_queue_wait=1.0).watching
