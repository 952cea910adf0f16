"""Helpers of the limit tests: clients from a named address, and the outcome of each message."""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import Any

import httpx
from websockets.exceptions import ConnectionClosed

from tests.e2e.client import Client, Widget
from tests.servers import GatewayProcess

# Test clients all connect from loopback, which the gateway trusts for X-Forwarded-For (uvicorn's
# FORWARDED_ALLOW_IPS default): a client names the address it stands for with that header.
ATTACKER = "203.0.113.7"
BYSTANDER = "198.51.100.20"


def from_address(address: str) -> dict[str, str]:
    return {"X-Forwarded-For": address}


async def open_from(gw: GatewayProcess, address: str) -> Client:
    return await Client.open(gw, additional_headers=from_address(address))


def widget_from(gw: GatewayProcess, address: str, business: str = "demo") -> httpx.Response:
    return httpx.post(
        f"{gw.http}/v1/widget/sessions",
        json={"business": business},
        headers=from_address(address),
        timeout=10,
    )


async def send_messages(client: Client, ids: list[str], **extra: Any) -> dict[str, dict[str, Any]]:
    """Send one message per id, each after the previous one's ack or error; return that frame by id."""
    outcome = {}
    for client_msg_id in ids:
        await client.send({"type": "message", "client_msg_id": client_msg_id, "text": "hello", **extra})
        while True:
            frame = await client.recv_type("ack", "error")
            if frame.get("client_msg_id") == client_msg_id:
                outcome[client_msg_id] = frame
                break
    return outcome


def refused(outcome: dict[str, dict[str, Any]], limit: str) -> list[str]:
    """The ids refused as `rate_limited` by `limit` (each with a positive retry_after_ms)."""
    ids = []
    for client_msg_id, frame in outcome.items():
        if frame["type"] == "error":
            assert frame["code"] == "rate_limited", frame
            assert frame["limit"] == limit, frame
            assert frame["retry_after_ms"] > 0, frame
            ids.append(client_msg_id)
    return ids


async def hello_or_refusal(client: Client, widget: Widget) -> dict[str, Any]:
    """Say hello; the first frame back: `welcome`, or the `error` of a socket refused at once."""
    with contextlib.suppress(ConnectionClosed):  # refused: the server may have closed already
        await client.send({"type": "hello", "token": widget.token})
    return await client.recv()


async def closed_with(client: Client) -> int | None:
    """Read until the server closes; the close code."""
    try:
        while True:
            await client.recv(timeout=20)
    except ConnectionClosed:
        return client.ws.close_code


async def served(gw: GatewayProcess, widget: Widget, address: str = BYSTANDER) -> None:
    """A bystander's whole turn: hello, message, ack, the answer to its end."""
    client = await open_from(gw, address)
    await client.hello(widget)
    outcome = await send_messages(client, ["bystander-1"])
    assert outcome["bystander-1"]["type"] == "ack", outcome
    end = (await client.until_ai_end())[-1]
    assert end["status"] == "complete", end
    await client.close()


def rate_limited_count(gw: GatewayProcess, limit: str) -> float:
    text = httpx.get(f"{gw.http}/metrics", timeout=10).text
    match = re.search(rf'^chatgw_rate_limited_total{{limit="{limit}"}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


async def metric_until(gw: GatewayProcess, name: str, value: float, *, seconds: float = 30) -> float:
    """Poll /metrics until the unlabelled metric `name` equals `value` (or `seconds` pass); its last value."""
    last = float("nan")
    async with httpx.AsyncClient() as http:
        for _ in range(int(seconds * 10)):
            text = (await http.get(f"{gw.http}/metrics", timeout=10)).text
            match = re.search(rf"^{name} (\S+)$", text, re.M)
            last = float(match.group(1)) if match else float("nan")
            if last == value:
                return last
            await asyncio.sleep(0.1)
    return last
