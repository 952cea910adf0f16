"""Every socket close is logged with its code, its reason and who closed it."""

from __future__ import annotations

import asyncio
from typing import Any

import jwt
import orjson
import pytest
from websockets.exceptions import ConnectionClosed

from tests.e2e.client import Client, new_widget
from tests.servers import GatewayProcess


async def close_records(
    gw: GatewayProcess, since: int, session_count: int, **match: Any
) -> list[dict[str, Any]]:
    """The gateway's "socket closed" log records after offset `since` of its log with the fields in
    `match`, once there are `session_count` of them (a close is logged just after the socket ends)."""
    for _ in range(500):
        records = []
        for line in gw.log()[since:].splitlines():
            if not line.startswith("{"):
                continue
            record = orjson.loads(line)
            if record["msg"].startswith("socket closed") and all(
                record.get(k) == v for k, v in match.items()
            ):
                records.append(record)
        if len(records) >= session_count:
            return records
        await asyncio.sleep(0.01)
    raise AssertionError(f"no close logged with {match}:\n{gw.log()[-4000:]}")


async def test_a_refused_token_is_logged_with_its_close_code_and_reason(gateway: GatewayProcess) -> None:
    since = len(gateway.log())
    widget = new_widget(gateway)
    forged = jwt.encode(
        {**jwt.decode(widget.token, options={"verify_signature": False})},
        "another-secret-another-secret-0123456789",
        algorithm="HS256",
    )
    client = await Client.open(gateway)
    await client.send({"type": "hello", "token": forged})
    assert (await client.recv())["code"] == "unauthorized"
    with pytest.raises(ConnectionClosed):
        await client.recv()
    assert client.ws.close_code == 4401

    [record] = await close_records(
        gateway, since, 1, close_code=4401, close_reason="invalid token: Signature verification failed"
    )
    assert record["closed_by"] == "gateway"
    assert (
        record["msg"] == "socket closed by the gateway: 4401 'invalid token: Signature verification failed'"
    )


async def test_a_client_close_is_logged_with_the_clients_code_and_reason(gateway: GatewayProcess) -> None:
    since = len(gateway.log())
    widget = new_widget(gateway)
    client = await Client.open(gateway)
    await client.hello(widget)
    await client.ws.close(4000, "page closed")

    [record] = await close_records(
        gateway, since, 1, conversation_id=widget.conversation_id, close_code=4000, closed_by="client"
    )
    assert record["close_reason"] == "page closed"
    assert record["session_id"]
