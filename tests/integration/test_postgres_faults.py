"""PostgreSQL failures: killed connections, a server that goes away and comes back.

A gateway process runs on a real PostgreSQL; the faults are real (pg_terminate_backend, pg_ctl
stop and start). Acked means committed: everything acked is in the database afterwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from gateway.migrate import Migrator
from tests.databases import with_database
from tests.e2e.client import Client, Widget, new_widget
from tests.servers import GatewayProcess, load_services, start_gateway


async def send_until_acked(client: Client, client_msg_id: str, text: str) -> tuple[dict[str, Any], int]:
    """Send, and resend the same client_msg_id after each `unavailable`, as the protocol says."""
    errors = 0
    while True:
        await client.send({"type": "message", "client_msg_id": client_msg_id, "text": text})
        frame = await client.recv_type("ack", "error")
        while frame.get("client_msg_id") != client_msg_id:
            frame = await client.recv_type("ack", "error")
        if frame["type"] == "ack":
            return frame, errors
        assert frame["code"] == "unavailable", frame
        assert frame["retry_after_ms"] > 0
        errors += 1
        await asyncio.sleep(frame["retry_after_ms"] / 1000 / 4)


async def hello_until_welcome(gw: GatewayProcess, widget: Widget) -> Client:
    """Connect and say hello; after an `unavailable` (close 1013) reconnect after `retry_after_ms`,
    as the protocol says."""
    while True:
        client = await Client.open(gw)
        await client.send({"type": "hello", "token": widget.token})
        frame = await client.recv()
        if frame["type"] == "welcome":
            return client
        assert (frame["type"], frame["code"]) == ("error", "unavailable"), frame
        await client.ws.wait_closed()
        assert client.ws.close_code == 1013
        await asyncio.sleep(frame["retry_after_ms"] / 1000 / 4)


def history(gw: GatewayProcess, conversation_id: str, token: str) -> list[dict[str, Any]]:
    r = httpx.get(
        f"{gw.http}/v1/conversations/{conversation_id}/messages",
        params={"limit": 500},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    messages: list[dict[str, Any]] = r.json()["messages"]
    return messages


@pytest.fixture
def pg_gateway(database_url: str, tmp_path: Path) -> Iterator[GatewayProcess]:
    gw = start_gateway(tmp_path, {"DATABASE_URL": database_url, "CHATGW_SCRIPTED_TOKENS": "8"})
    yield gw
    gw.stop()


async def test_connections_killed_during_traffic_lose_nothing_acked(
    pg_gateway: GatewayProcess, database_url: str
) -> None:
    """pg_terminate_backend on every gateway connection, again and again, while four clients send:
    the gateway recovers by itself and every acked message is stored once, as acked."""
    stop = asyncio.Event()
    kills = 0

    async def killer() -> None:
        nonlocal kills
        conn = await asyncpg.connect(database_url)
        try:
            while not stop.is_set():
                killed = await conn.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
                kills += int(killed)
                await asyncio.sleep(0.05)
        finally:
            await conn.close()

    async def chat(n: int) -> tuple[Any, list[dict[str, Any]]]:
        widget = new_widget(pg_gateway)
        client = await hello_until_welcome(pg_gateway, widget)
        acks = []
        for i in range(15):
            ack, _ = await send_until_acked(client, f"c{n}-{i}", f"client {n} message {i}")
            acks.append(ack)
        await client.close()
        return widget, acks

    killing = asyncio.create_task(killer())
    try:
        results = await asyncio.gather(*(chat(n) for n in range(4)))
    finally:
        stop.set()
        await killing
    assert kills > 0

    for widget, acks in results:
        stored = [m for m in history(pg_gateway, widget.conversation_id, widget.token) if m["role"] == "user"]
        assert [(m["client_msg_id"], m["message_id"], m["seq"]) for m in stored] == [
            (a["client_msg_id"], a["message_id"], a["seq"]) for a in acks
        ]


@pytest.fixture
async def own_postgres() -> AsyncIterator[tuple[str, Callable[[], None], Callable[[], None]]]:
    """A throwaway PostgreSQL server of this test's own, which the test may stop and start."""
    services = load_services()
    binaries = services.find_postgres_binaries()
    assert binaries is not None, "PostgreSQL binaries are needed for this test (scripts/test installs them)"
    server_url, base = await asyncio.to_thread(services.start_postgres_cluster, *binaries)
    url = with_database(server_url, "postgres")
    await Migrator(url).up()
    yield (
        url,
        lambda: services.stop_postgres(base, "fast"),
        lambda: services.restart_stopped_postgres(base),
    )
    await asyncio.to_thread(services.stop_postgres, base)


async def test_a_restarted_database_is_reconnected_and_meanwhile_refused_clearly(
    own_postgres: tuple[str, Callable[[], None], Callable[[], None]], tmp_path: Path
) -> None:
    """While PostgreSQL is down: `unavailable` with retry_after_ms on the socket, 503 with Retry-After
    over HTTP, /readyz 503. Once it is back: the same gateway process serves again, and the message
    resent with its client_msg_id is stored once."""
    url, stop_db, start_db = own_postgres
    gw = start_gateway(tmp_path, {"DATABASE_URL": url, "CHATGW_SCRIPTED_TOKENS": "4"})
    try:
        widget = new_widget(gw)
        client = await Client.open(gw)
        await client.hello(widget)
        first, _ = await send_until_acked(client, "before", "before the outage")

        await asyncio.to_thread(stop_db)
        await client.send({"type": "message", "client_msg_id": "during", "text": "during the outage"})
        error = await client.recv_type("error")
        assert error["code"] == "unavailable"
        assert error["client_msg_id"] == "during"
        assert error["retry_after_ms"] >= 1
        refused = httpx.get(
            f"{gw.http}/v1/conversations/{widget.conversation_id}/messages",
            headers={"Authorization": f"Bearer {widget.token}"},
            timeout=30,
        )
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "unavailable"
        assert int(refused.headers["Retry-After"]) >= 1
        ready = httpx.get(f"{gw.http}/readyz", timeout=30)
        assert ready.status_code == 503
        assert ready.json()["checks"]["store"]["ok"] is False

        await asyncio.to_thread(start_db)
        second, _ = await send_until_acked(client, "during", "during the outage")
        assert httpx.get(f"{gw.http}/readyz", timeout=30).status_code == 200
        stored = [m for m in history(gw, widget.conversation_id, widget.token) if m["role"] == "user"]
        assert [m["client_msg_id"] for m in stored] == ["before", "during"]
        assert [m["message_id"] for m in stored] == [first["message_id"], second["message_id"]]
        await client.close()
    finally:
        gw.stop()
