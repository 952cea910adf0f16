"""Pure decisions of the conversation rules: no I/O, no clock, tested directly."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from core.errors import InvalidInput, TooLarge
from core.models import StreamPosition
from core.types import Mode


def should_answer(mode: Mode) -> bool:
    """The model answers a user message only while the conversation is in `ai` mode."""
    return mode is Mode.AI


def check_message_text(text: str, *, max_chars: int) -> str:
    """Validate a user's message text; return it unchanged or raise naming the problem."""
    if not text.strip():
        raise InvalidInput("text must contain something other than whitespace")
    if len(text) > max_chars:
        raise TooLarge(f"text is {len(text)} characters long; the maximum is {max_chars}")
    return text


def check_client_msg_id(client_msg_id: str, *, max_chars: int = 128) -> str:
    if not client_msg_id or len(client_msg_id) > max_chars:
        raise InvalidInput(f"client_msg_id must be 1 to {max_chars} characters long")
    return client_msg_id


class ResumeAction(enum.Enum):
    LIVE = "live"  # nothing missed: continue live
    REPLAY = "replay"  # replay events after last_seq, then live
    RESET = "reset"  # cannot replay: the client must refetch history


@dataclass(frozen=True, slots=True)
class ResumeDecision:
    action: ResumeAction
    reason: str = ""


def decide_resume(*, epoch: str, last_seq: int, position: StreamPosition) -> ResumeDecision:
    """What a client that saw events up to (epoch, last_seq) gets, given where the stream is.

    Whether the replay window still reaches `last_seq` is the broker's to tell (`Replay.events`
    is None); this decides everything that can be known from the position alone.
    """
    if epoch != position.epoch:
        return ResumeDecision(ResumeAction.RESET, "epoch_changed")
    if last_seq > position.seq:
        return ResumeDecision(ResumeAction.RESET, "seq_ahead")
    if last_seq == position.seq:
        return ResumeDecision(ResumeAction.LIVE)
    return ResumeDecision(ResumeAction.REPLAY)


class SeqGate:
    """Per-subscriber filter that keeps delivery gapless and duplicate-free by seq.

    Holds the last seq delivered. `admit(seq)` says what to do with the next event:
    deliver it (exactly the next seq), drop it (already delivered), or report a gap.
    """

    __slots__ = ("last_seq",)

    def __init__(self, last_seq: int) -> None:
        self.last_seq = last_seq

    def admit(self, seq: int) -> GateVerdict:
        if seq <= self.last_seq:
            return GateVerdict.DUPLICATE
        if seq == self.last_seq + 1:
            self.last_seq = seq
            return GateVerdict.DELIVER
        return GateVerdict.GAP


class GateVerdict(enum.Enum):
    DELIVER = "deliver"
    DUPLICATE = "duplicate"
    GAP = "gap"
