"""Graceful drain: what an instance does between SIGTERM and exit.

1. Stop accepting connections (the listening sockets close) and report not ready.
2. Tell every client `reconnect{after_ms}`, with `after_ms` spread at random over
   CHATGW_RECONNECT_SPREAD_MS so that they do not all return at once, and close with 1012. The
   clients resume on another instance; answers keep streaming to them through the broker.
3. Let running answers finish within the grace period (CHATGW_GRACEFUL_SHUTDOWN_S); end the rest
   as `interrupted`, with the text streamed so far.
Every step is bounded: the drain never hangs.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections.abc import Callable

import uvicorn

from gateway.context import Gateway

log = logging.getLogger(__name__)


async def drain_gateway(gw: Gateway) -> None:
    settings = gw.settings
    gw.draining = True
    sessions = list(gw.sessions)
    spread = settings.reconnect_spread_ms
    for session in sessions:
        session.reconnect(random.randint(0, spread) if spread else 0)
    log.info("draining: told %d sockets to reconnect elsewhere", len(sessions))
    if sessions:
        # Give the writers a moment to send reconnect and the close frame; then move on regardless.
        await asyncio.wait([s.finished() for s in sessions], timeout=5)
    await gw.conversations.drain(grace=settings.graceful_shutdown)
    log.info("drained")


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the gateway's drain run first on shutdown; `on_ready` is called once
    the app has started and the server listens (never before the port is bound)."""

    def __init__(
        self, config: uvicorn.Config, gateway: Gateway, *, on_ready: Callable[[], None] | None = None
    ) -> None:
        super().__init__(config)
        self._gateway = gateway
        self._on_ready = on_ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and not self.should_exit and self._on_ready is not None:
            self._on_ready()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        try:
            await drain_gateway(self._gateway)
        except Exception:  # the rest of the shutdown must still happen
            log.exception("drain failed")
        await super().shutdown(sockets)
