"""What an ended answer leaves in the store, and how it gets there even while the store is down.

Every answer that ended (here, through a stop or a takeover, or through the lease sweep) is
stored as an `EndedAnswer`: the row, the seq of its `ai_end` (so that history lists it where
replay has it) and the conversation's active answer cleared, in one atomic step of the store.
The `ai_end` is out before the row is written; when the store is unavailable then, the write is
kept and tried again until it goes through (`core.pending_writes`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from core.errors import CoreError, Unavailable
from core.llm import Usage
from core.models import Event
from core.observer import Observer
from core.pending_writes import PendingWrites
from core.store import Store
from core.types import AnswerStatus, BusinessId, ConversationId, ResponseId

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EndedAnswer:
    """An answer as its `ai_end` ended it: what is stored."""

    business_id: BusinessId
    conversation_id: ConversationId
    response_id: ResponseId
    text: str
    status: AnswerStatus
    seq: int | None
    """The seq of its `ai_end` (None only for an answer whose `ai_end` was never published)."""
    usage: Usage | None = None

    @classmethod
    def from_event(cls, business_id: BusinessId, event: Event, usage: Usage | None = None) -> EndedAnswer:
        payload = event.payload
        return cls(
            business_id,
            event.conversation_id,
            ResponseId(payload["response_id"]),
            payload["text"],
            AnswerStatus(payload["status"]),
            event.seq,
            usage,
        )


class AnswerWriter:
    """Stores ended answers; keeps the ones the store could not take and writes them later."""

    def __init__(self, store: Store, observer: Observer) -> None:
        self._store = store
        self.observer = observer
        self.unstored = PendingWrites(what="ended answer")

    async def store(self, ended: EndedAnswer) -> None:
        """Store an ended answer: its row, the seq of its ai_end, the active answer cleared (one
        atomic step of the store).
        The ai_end is out already: when the store is unavailable the write is kept and tried
        again until it goes through (`unstored`); other failures are logged and counted."""
        # Shielded as a whole: a cancelled caller (a shutdown, a closing socket) must not leave
        # the row stored but invisible in history (no seq), or the active answer set.
        try:
            await asyncio.shield(self._write_ended(ended))
        except Unavailable as exc:  # kept, and written once the store is back
            log.warning(
                "storing an answer failed (%s kept, to be written again): %s",
                ended.response_id,
                exc.message,
                extra={"conversation_id": ended.conversation_id},
            )
            self.observer.error(exc.code)
            self.unstored.add(ended.response_id, lambda: self._write_ended(ended))
        except CoreError as exc:
            log.error(
                "storing an answer failed: %s", exc.message, extra={"conversation_id": ended.conversation_id}
            )
            self.observer.error(exc.code)

    async def _write_ended(self, ended: EndedAnswer) -> None:
        await self._store.finish_answer(
            ended.business_id,
            ended.conversation_id,
            ended.response_id,
            ended.text,
            ended.status,
            seq=ended.seq,
            usage=ended.usage,
        )

    async def aclose(self, *, grace: float) -> None:
        """Try the kept writes once more (for up to `grace` seconds) and stop retrying."""
        await self.unstored.aclose(grace=grace)
