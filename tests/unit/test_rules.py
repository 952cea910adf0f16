"""The conversation rules, decided purely."""

from __future__ import annotations

import pytest

from core.errors import InvalidInput, TooLarge
from core.models import StreamPosition
from core.rules import (
    GateVerdict,
    ResumeAction,
    SeqGate,
    check_client_msg_id,
    check_message_text,
    decide_resume,
    should_answer,
)
from core.types import Mode


def test_only_ai_mode_answers() -> None:
    assert should_answer(Mode.AI)
    assert not should_answer(Mode.HUMAN)


def test_message_text_limits() -> None:
    assert check_message_text("hi", max_chars=2) == "hi"
    with pytest.raises(TooLarge, match="3 characters long; the maximum is 2"):
        check_message_text("hey", max_chars=2)
    with pytest.raises(InvalidInput, match="whitespace"):
        check_message_text(" \n\t", max_chars=10)
    with pytest.raises(InvalidInput, match="client_msg_id"):
        check_client_msg_id("x" * 129)


@pytest.mark.parametrize(
    ("epoch", "last_seq", "action", "reason"),
    [
        ("e1", 10, ResumeAction.LIVE, ""),
        ("e1", 4, ResumeAction.REPLAY, ""),
        ("e1", 0, ResumeAction.REPLAY, ""),
        ("e1", 11, ResumeAction.RESET, "seq_ahead"),
        ("e0", 4, ResumeAction.RESET, "epoch_changed"),
    ],
)
def test_resume_decision(epoch: str, last_seq: int, action: ResumeAction, reason: str) -> None:
    decision = decide_resume(epoch=epoch, last_seq=last_seq, position=StreamPosition("e1", 10))
    assert decision.action is action
    assert decision.reason == reason


def test_seq_gate_delivers_each_seq_once_in_order() -> None:
    gate = SeqGate(3)
    assert gate.admit(3) is GateVerdict.DUPLICATE
    assert gate.admit(4) is GateVerdict.DELIVER
    assert gate.admit(6) is GateVerdict.GAP
    assert gate.last_seq == 4
    assert gate.admit(5) is GateVerdict.DELIVER
    assert gate.admit(6) is GateVerdict.DELIVER
    assert gate.admit(5) is GateVerdict.DUPLICATE
