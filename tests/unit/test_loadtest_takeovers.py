"""The load tool's agent side as pure functions: where agents go and which conversations each
follows, the takeover cycle of one followed conversation, when a user's question was asked around
a takeover, late deltas of taken-over answers, and the report's takeover figures."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from gateway.loadtest.config import ConfigError, parse
from gateway.loadtest.plan import assign_agents, place_agents
from gateway.loadtest.report import build, problems, table
from gateway.loadtest.stats import AskClock, check_frames
from gateway.loadtest.takeover import Phase, Send, TakeoverCycle, Wait
from gateway.loadtest.tally import Tally

# -- placement and assignment -------------------------------------------------------------------


def test_agents_live_with_their_conversations_and_start_on_the_next_url() -> None:
    # Two processes on two URLs: process 0's conversations (0, 2, ...) are all on URL 0.
    assert place_agents(4, 2, 2) == [(0, 1), (1, 0), (0, 0), (1, 1)]
    assert place_agents(3, 1, 3) == [(0, 1), (0, 2), (0, 0)]
    assert place_agents(2, 1, 1) == [(0, 0), (0, 0)]
    assert place_agents(0, 4, 2) == []
    with pytest.raises(ValueError, match="every client process"):
        place_agents(1, 2, 2)


def test_conversations_go_to_an_agent_on_another_url_first_then_by_load() -> None:
    homes = [0, 1, 0, 1, 0, 1]
    # Agent 0 on URL 1, agent 1 on URL 0, room for all: every conversation crosses instances.
    assert assign_agents(homes, [(1, 50), (0, 50)]) == [0, 1, 0, 1, 0, 1]
    # One agent on URL 1: it takes all, its own URL's too.
    assert assign_agents(homes, [(1, 50)]) == [0] * 6
    # One URL, three agents: round robin by load, ties to the first.
    assert assign_agents([0] * 7, [(0, 50), (0, 50), (0, 50)]) == [0, 1, 2, 0, 1, 2, 0]


def test_the_cap_of_each_agent_is_respected_and_the_rest_go_unfollowed() -> None:
    chosen = assign_agents([0, 0, 0, 0, 0], [(1, 2), (0, 1)])
    assert chosen == [0, 0, 1, None, None]  # the away agent fills first, then the home one
    assert assign_agents([0, 1], []) == [None, None]
    assert assign_agents([0, 1], [(0, 0)]) == [None, None]  # a cap of 0 follows nothing
    load = Counter(assign_agents([n % 3 for n in range(100)], [(0, 10), (1, 10), (2, 10)]))
    assert load == {0: 10, 1: 10, 2: 10, None: 70}


# -- the takeover cycle -------------------------------------------------------------------------


def cycle(**kw: float) -> tuple[TakeoverCycle, Counter[str]]:
    counts: Counter[str] = Counter()
    return TakeoverCycle(counts, "me", within=kw.get("within", 2.0), hold=kw.get("hold", 3.0)), counts


def test_a_takeover_mid_answer_then_a_handback() -> None:
    c, counts = cycle()
    c.ai_start("r1", picked=True)
    assert c.delta("r1", 0.25) == Wait(0.5)  # a quarter of the way into --takeover-within
    assert c.delta("r1", 0.9) is None  # only the first delta sets the point
    assert c.fired() == Send("takeover")
    c.ai_end("r1", "taken_over")
    assert c.mode("human", "me") == Wait(3.0)  # the hold
    assert c.phase is Phase.HELD
    assert c.fired() == Send("handback")
    assert c.mode("ai", None) is None
    assert c.idle
    assert counts == {
        "takeovers_sent": 1,
        "takeovers_done": 1,
        "takeovers_cut": 1,
        "handbacks_sent": 1,
        "handbacks_done": 1,
    }


def test_an_answer_not_picked_or_ending_before_its_point_is_left_alone() -> None:
    c, counts = cycle()
    c.ai_start("r1", picked=False)
    assert c.delta("r1", 0.5) is None
    assert c.fired() is None
    c.ai_start("r2", picked=True)
    assert c.delta("r2", 0.5) == Wait(1.0)
    c.ai_end("r2", "complete")
    assert c.fired() is None  # the timer of an answer that ended does nothing
    assert c.idle
    assert counts == {"takeovers_skipped": 1}


def test_a_takeover_that_finds_no_answer_streaming_is_done_but_cuts_nothing() -> None:
    c, counts = cycle()
    c.ai_start("r1", picked=True)
    c.delta("r1", 0.0)
    assert c.fired() == Send("takeover")
    c.ai_end("r1", "complete")  # the answer ended while the takeover was on its way
    assert c.mode("human", "me") == Wait(3.0)
    assert (counts["takeovers_done"], counts["takeovers_cut"]) == (1, 0)


def test_the_answer_cut_may_be_the_one_after_the_target() -> None:
    c, counts = cycle()
    c.ai_start("r1", picked=True)
    c.delta("r1", 0.0)
    c.fired()
    c.ai_end("r1", "complete")
    c.ai_start("r2", picked=True)  # not picked again: a takeover is in flight
    c.ai_end("r2", "taken_over")
    c.mode("human", "me")
    assert counts["takeovers_cut"] == 1


def test_refusals_reset_a_takeover_and_retry_a_handback() -> None:
    c, counts = cycle()
    c.ai_start("r1", picked=True)
    c.delta("r1", 0.0)
    c.fired()
    assert c.error() is None
    assert c.idle
    c.ai_start("r2", picked=True)
    c.delta("r2", 0.0)
    c.fired()
    c.mode("human", "me")
    assert c.fired() == Send("handback")
    assert c.error() == Wait(3.0)  # try again after another hold
    assert c.fired() == Send("handback")
    c.mode("ai", None)
    assert counts["takeovers_refused"] == counts["handbacks_refused"] == 1
    assert counts["handbacks_sent"] == 2
    assert counts["handbacks_done"] == 1


def test_another_agents_mode_and_errors_when_idle_change_nothing() -> None:
    c, counts = cycle()
    assert c.mode("human", "someone else") is None
    assert c.error() is None
    c.ai_start("r1", picked=True)
    c.delta("r1", 0.0)
    c.fired()
    assert c.mode("human", "someone else") is None
    assert c.phase is Phase.SENT
    assert counts == {"takeovers_sent": 1}


def test_what_is_in_flight_at_the_end_is_counted() -> None:
    sent, counts = cycle()
    sent.ai_start("r1", picked=True)
    sent.delta("r1", 0.0)
    sent.fired()
    sent.account_end()
    held = TakeoverCycle(counts, "me", within=1.0, hold=1.0)
    held.ai_start("r1", picked=True)
    held.delta("r1", 0.0)
    held.fired()
    held.mode("human", "me")
    held.fired()
    held.account_end()
    assert counts["takeovers_unanswered"] == 1
    assert counts["handbacks_unanswered"] == 1
    assert counts["takeovers_held_at_end"] == 1


# -- when the question was asked ----------------------------------------------------------------


def test_the_first_message_since_the_last_answer_start_is_the_question() -> None:
    clock = AskClock()
    clock.sent(10)
    clock.sent(20)
    assert clock.waiting
    assert clock.started() == 10
    assert clock.started() is None  # nothing asked since
    clock.sent(30)
    clock.stopped()
    assert not clock.waiting


def test_a_takeover_blurs_the_question_until_the_next_answer_starts() -> None:
    clock = AskClock()
    clock.sent(10)
    clock.mode(human=True)  # the question waiting is answered after the handback, or never
    assert not clock.waiting
    clock.sent(20)  # while the agent holds it
    clock.mode(human=False)
    clock.sent(30)  # after the handback, before the answer it triggers
    assert clock.started() is None
    clock.sent(40)
    assert clock.started() == 40  # clear again


def test_a_takeover_with_nothing_waiting_blurs_nothing() -> None:
    clock = AskClock()
    clock.mode(human=True)
    clock.mode(human=False)
    clock.sent(50)
    assert clock.started() == 50


# -- late deltas of taken-over answers ----------------------------------------------------------


def test_a_delta_after_a_taken_over_answers_end_is_counted_apart() -> None:
    def f(kind: str, seq: int, rid: str, text: str = "", status: str = "") -> dict[str, Any]:
        return {"type": kind, "seq": seq, "response_id": rid, "text": text, "status": status}

    check = check_frames(
        [
            f("ai_start", 1, "r1"),
            f("delta", 2, "r1", "ab"),
            f("ai_end", 3, "r1", "ab", "taken_over"),
            f("delta", 4, "r1", "cd"),
            f("ai_start", 5, "r2"),
            f("ai_end", 6, "r2", "", "complete"),
            f("delta", 7, "r2", "x"),
        ]
    )
    assert check.late_deltas == 2
    assert check.late_taken_over == 1
    assert check.text_mismatches == 0


# -- options and the report ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--agents", "1001", "--admin-key", "k"], "--agents must be between 0 and 1000"),
        (["--takeover-rate", "0.5"], "--takeover-rate needs agents"),
        (["--agents", "2", "--admin-key", "k", "--takeover-rate", "2"], "--takeover-rate must be between"),
        (["--agents", "2", "--admin-key", "k", "--takeover-hold", "-1"], "--takeover-hold"),
        (["--agents", "2", "--admin-key", "k", "--takeover-within", "601"], "--takeover-within"),
        (["--agents", "1", "--admin-key", "k", "--processes", "2"], "fewer than --processes 2"),
    ],
)
def test_bad_agent_options_are_refused_naming_the_option(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(argv)


def test_the_admin_key_comes_from_the_environment_and_stays_out_of_the_report(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CHATGW_DEMO_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="admin API key"):
        parse(["--agents", "1"])
    monkeypatch.setenv("CHATGW_DEMO_API_KEY", "from-env")
    config = parse(["--agents", "3", "--conversations", "5"])
    assert config.admin_key == "from-env"
    assert parse(["--agents", "1", "--admin-key", "given"]).admin_key == "given"
    assert config.sockets == 5 * 2 + 3
    assert "from-env" not in str(config.public())
    assert config.public()["agents"] == 3


def agent_tally() -> Tally:
    t = Tally()
    t.counts.update(
        {
            "opened_agent": 2,
            "conversations_followed": 5,
            "conversations_unfollowed": 1,
            "followed_cross_instance": 4,
            "takeovers_sent": 7,
            "takeovers_done": 6,
            "takeovers_cut": 5,
            "takeovers_refused": 1,
            "handbacks_sent": 6,
            "handbacks_done": 6,
            "late_deltas_taken_over": 0,
            "delta_frames_user": 10,
            "delta_frames_agent": 10,
        }
    )
    t.keyed["agent_max_subscriptions"].update({"50": 1, "40": 1})
    t.keyed["takeover_errors"]["conflict"] = 1
    for lag in (1000, 2000, 3000):
        t.hist["takeover"].add(lag)
    return t


def test_the_report_gives_takeovers_and_agents_and_the_table_shows_them() -> None:
    config = parse(
        ["--url", "http://127.0.0.1:1", "--conversations", "6", "--agents", "2", "--admin-key", "k"]
    )
    report = build(
        config,
        agent_tally(),
        window_s=1.0,
        connect_s=0.1,
        client_cpu=[0.1],
        gateways=[{"url": "http://127.0.0.1:1", "cpu_seconds": 0.5}],
        model_server=None,
        aborted=False,
        failed_workers=0,
    )
    t = report["takeovers"]
    assert (t["sent"], t["done"], t["cut_answers"], t["between_answers"]) == (7, 6, 5, 1)
    assert t["errors"] == {"conflict": 1}
    assert report["agents"]["max_subscriptions"] == 40
    assert report["agents"]["conversations_unfollowed"] == 1
    assert report["deltas"]["frames"] == 20
    assert report["latency_ms"]["takeover"]["p50"] == 2.0
    assert report["latency_ms"]["takeover_agent"]["count"] == 0
    assert problems(report) == []
    text = table(report)
    assert "+ 2 agents" in text
    assert "7 sent: 6 done (5 cut an answer, 1 between answers), 1 refused" in text
    assert "takeover sent -> ai_end on the user socket" in text


def test_takeovers_never_answered_are_a_problem() -> None:
    t = agent_tally()
    t.counts["takeovers_unanswered"] = 2
    config = parse(["--url", "http://127.0.0.1:1", "--agents", "1", "--admin-key", "k"])
    report = build(
        config,
        t,
        window_s=1.0,
        connect_s=0.1,
        client_cpu=[0.1],
        gateways=[{"url": "http://127.0.0.1:1", "cpu_seconds": None}],
        model_server=None,
        aborted=False,
        failed_workers=0,
    )
    assert problems(report) == ["takeovers the gateway never answered: 2"]
