"""Subscription: one conversation followed by one connection, gapless and in order.

A widget connection holds exactly one subscription (its conversation); an agent connection holds
one per conversation it follows. The subscription joins the hub, opens the conversation's log,
sends the head frame (`welcome` for a widget, `subscribed` for an agent), replays what a resuming
client missed, then releases live events through its SeqGate, so the client sees every seq of
the conversation exactly once and in order. When the hub reports that events may have been
missed, or an event skips a seq, it fills the gap from the replay log or sends `reset`.

States: SYNCING (live events are held back) -> LIVE -> CLOSED. Frames go out through the
connection's outbox (`Outlet`); a subscription never blocks.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from typing import Any, Protocol

from core.broker import StreamMissing
from core.errors import CoreError
from core.models import Conversation, Event, Replay, StreamPosition
from core.rules import GateVerdict, ResumeAction, ResumeDecision, SeqGate, decide_resume
from core.types import BusinessId, ConversationId
from gateway.context import Gateway
from gateway.hub import View, view_frame
from gateway.protocol import CloseCode, Resume, encode

log = logging.getLogger(__name__)

# A gap fill tries this many times (0.2 s, 0.4 s, ... apart) before closing the socket with 1011.
_FILL_ATTEMPTS = 5

HeadFrame = Callable[[Conversation, StreamPosition, bool], dict[str, Any]]
"""Builds the frame that opens a subscription (welcome or subscribed): conversation, position,
whether the client resumed."""


class Outlet(Protocol):
    """What a subscription needs of its connection."""

    session_id: str

    def enqueue(self, frame_type: str, text: str) -> None:
        """Queue one encoded frame (never blocks; a full outbox closes the connection)."""

    def close(self, code: CloseCode, reason: str) -> None: ...

    def overflow(self) -> None:
        """Too much is held back for this client: close it as a slow consumer."""

    def log_extra(self) -> dict[str, Any]: ...


class SubState(enum.Enum):
    SYNCING = "syncing"
    LIVE = "live"
    CLOSED = "closed"


class Subscription:
    __slots__ = (
        "_epoch",
        "_filling",
        "_gate",
        "_held",
        "_hold_limit",
        "business_id",
        "conversation_id",
        "gw",
        "outlet",
        "session_id",
        "state",
        "view",
    )

    def __init__(
        self,
        outlet: Outlet,
        services: Gateway,
        business_id: BusinessId,
        conversation_id: ConversationId,
        *,
        view: View,
        hold_limit: int,
    ) -> None:
        self.outlet = outlet
        self.gw = services
        self.business_id = business_id
        self.conversation_id = conversation_id
        self.view = view
        self.session_id = outlet.session_id
        self.state = SubState.SYNCING
        self._hold_limit = hold_limit
        self._gate = SeqGate(0)
        self._epoch = ""  # the epoch of the seqs this client holds
        self._held: list[tuple[Event, str]] = []
        self._filling: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def open(self, conversation: Conversation, resume: Resume | None, head: HeadFrame) -> None:
        """Join the hub, send the head frame, replay what the client missed, go live."""
        await self.gw.hub.join(self.conversation_id, self)
        position = await self.gw.conversations.open_stream(
            self.business_id, self.conversation_id, conversation
        )
        self._epoch = position.epoch
        if resume is None:
            self._send(head(conversation, position, False))
            self._go_live(position.seq, ())
            return
        decision = decide_resume(epoch=resume.epoch, last_seq=resume.last_seq, position=position)
        events: tuple[Event, ...] | None = ()
        if decision.action is ResumeAction.REPLAY:
            try:
                events = (await self.gw.broker.replay(self.conversation_id, resume.last_seq)).events
            except StreamMissing:  # the log was dropped since it was opened above
                events = None
            if events is None:
                decision = ResumeDecision(ResumeAction.RESET, "window")
        if decision.action is ResumeAction.RESET:
            self._send(head(conversation, position, False))
            self._reset(decision.reason, position)
            return
        self._send(head(conversation, position, True))
        self._go_live(resume.last_seq, events or ())

    async def close(self) -> None:
        """Leave the hub; nothing more is delivered."""
        self.state = SubState.CLOSED
        self._held.clear()
        if self._filling is not None and not self._filling.done():
            self._filling.cancel()
        await self.gw.hub.leave(self.conversation_id, self)

    # -- from the hub ---------------------------------------------------------------------------

    def deliver(self, event: Event, frame: str) -> None:
        """Called by the hub for every event of the conversation (`frame`: encoded for our view)."""
        if self.state is SubState.CLOSED:
            return
        if self.state is SubState.SYNCING:
            self._held.append((event, frame))
            if len(self._held) > self._hold_limit:
                self.outlet.overflow()
            return
        self._admit(event, frame)

    def resync(self) -> None:
        """Called by the hub when events may have been missed: fill from the log."""
        if self.state is SubState.LIVE:
            self._start_fill()

    # -- internals ------------------------------------------------------------------------------

    def _admit(self, event: Event, frame: str) -> None:
        if event.seq is None:  # ephemeral
            self.outlet.enqueue(event.type.value, frame)
            return
        if event.epoch is not None and event.epoch != self._epoch:
            # The log was recreated (lost and opened again): its seqs are not comparable with ours.
            self._held.append((event, frame))
            self._start_fill()
            return
        verdict = self._gate.admit(event.seq)
        if verdict is GateVerdict.DELIVER:
            self.outlet.enqueue(event.type.value, frame)
        elif verdict is GateVerdict.GAP:
            self._held.append((event, frame))
            self._start_fill()

    def _start_fill(self) -> None:
        self.state = SubState.SYNCING
        self._filling = asyncio.create_task(self._fill_gap())

    def _send(self, frame: dict[str, Any]) -> None:
        if self.view is View.AGENT:
            frame = {**frame, "conversation_id": self.conversation_id}
        self.outlet.enqueue(frame["type"], encode(frame))

    def _go_live(self, after_seq: int, replayed: tuple[Event, ...]) -> None:
        """Deliver `replayed` then the held live events through a gate starting at `after_seq`."""
        self._gate = SeqGate(after_seq)
        held, self._held = self._held, []
        self.state = SubState.LIVE
        for event in replayed:
            self._admit(event, encode(view_frame(event, self.view)))
        for event, frame in held:
            if self.state is not SubState.LIVE:  # a gap reopened syncing: keep the rest held
                self._held.append((event, frame))
            else:
                self._admit(event, frame)

    async def _fill_gap(self) -> None:
        """Fetch the events the broker skipped from the replay log; when the log cannot supply
        them (trimmed, or lost and opened again with a new epoch), send `reset`."""
        for attempt in range(_FILL_ATTEMPTS):
            try:
                try:
                    replay = await self.gw.broker.replay(self.conversation_id, self._gate.last_seq)
                except StreamMissing:  # lost: open it again (new epoch, after the stored seqs)
                    position = await self.gw.conversations.open_stream(self.business_id, self.conversation_id)
                    replay = Replay(position, None)
                break
            except CoreError as exc:
                log.warning("gap fill failed: %s", exc.message, extra=self.outlet.log_extra())
                await asyncio.sleep(0.2 * 2**attempt)
        else:
            self.outlet.close(CloseCode.INTERNAL_ERROR, "lost sync: reconnect and resume")
            return
        if self.state is not SubState.SYNCING:
            return
        position = replay.position
        if replay.events is None or position.epoch != self._epoch:
            reason = "gap" if position.epoch == self._epoch else "epoch_changed"
            self._reset(reason, position)
            return
        self._go_live(self._gate.last_seq, replay.events)

    def _reset(self, reason: str, position: StreamPosition) -> None:
        """Tell the client to refetch history and continue live from `position`."""
        self._epoch = position.epoch
        self._send({"type": "reset", "reason": reason, "epoch": position.epoch, "seq": position.seq})
        self._held = [
            (e, f) for e, f in self._held if e.epoch == position.epoch and (e.seq or 0) > position.seq
        ]
        self._go_live(position.seq, ())
