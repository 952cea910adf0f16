"""Presence: whether a conversation's end user is connected, on any instance.

Each widget connection is a present member of its conversation in the broker from its `welcome`
until it closes; this instance renews all of its members in one call every third of the presence
TTL, so the members of an instance that died expire by themselves. When the first member of a
conversation comes or the last one leaves, the business feed gets a `presence` event
(`{"online": true|false}`), which agent consoles show. (An instance that dies sends no `offline`:
its members expire, and the next snapshot tells.)
"""

from __future__ import annotations

import asyncio
import logging

from core.broker import Broker
from core.errors import CoreError
from core.types import BusinessId, ConversationId, EventType

log = logging.getLogger(__name__)


class Presence:
    def __init__(self, broker: Broker, *, ttl: float) -> None:
        self._broker = broker
        self._ttl = ttl
        self._members: dict[str, ConversationId] = {}
        self._task: asyncio.Task[None] | None = None

    async def came(self, business_id: BusinessId, conversation_id: ConversationId, member: str) -> None:
        self._members[member] = conversation_id
        await self._set(business_id, conversation_id, member, True)

    async def left(self, business_id: BusinessId, conversation_id: ConversationId, member: str) -> None:
        if self._members.pop(member, None) is not None:
            await self._set(business_id, conversation_id, member, False)

    async def online(self, conversation_ids: list[ConversationId]) -> set[ConversationId]:
        return await self._broker.present(conversation_ids)

    async def _set(self, business_id: BusinessId, cid: ConversationId, member: str, present: bool) -> None:
        try:
            if await self._broker.set_presence(cid, member, present):
                await self._broker.publish_feed(business_id, cid, EventType.PRESENCE, {"online": present})
        except CoreError as exc:  # presence is a view; the chat goes on without it
            log.warning("presence update failed: %s", exc.message, extra={"conversation_id": cid})

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._renew_forever(), name="presence-renewal")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self._ttl / 3)
            try:
                await self._broker.renew_presence(dict(self._members))
            except CoreError as exc:
                log.warning("renewing presence failed: %s", exc.message)
            except Exception:
                log.exception("renewing presence failed")
