"""FlowCache: businesses' flows (stages, transitions, templates, rules) cached in this process.

Entries live `ttl` seconds; a change through the admin API invalidates the business's entry on
every instance at once (the admin API publishes a control message through the broker, and each
instance's hub calls `invalidate`). The TTL bounds how stale an entry can be if such a message
is lost. Compiled templates are cached by their source text (core.templates), so an edited
template is compiled anew and the old compilation ages out.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from core.flow_models import Flow
from core.observer import Observer
from core.store import Store
from core.types import BusinessId


class FlowCache:
    def __init__(
        self,
        store: Store,
        observer: Observer,
        *,
        ttl: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl <= 0:
            raise ValueError("ttl must be > 0")
        self._store = store
        self._observer = observer
        self._ttl = ttl
        self._clock = clock
        self._entries: dict[BusinessId, tuple[float, Flow]] = {}

    async def get(self, business_id: BusinessId) -> Flow:
        entry = self._entries.get(business_id)
        now = self._clock()
        if entry is not None and entry[0] > now:
            self._observer.flow_cache(True)
            return entry[1]
        self._observer.flow_cache(False)
        flow = await self._store.get_flow(business_id)
        self._entries[business_id] = (now + self._ttl, flow)
        return flow

    def invalidate(self, business_id: BusinessId) -> None:
        self._entries.pop(business_id, None)
