"""With Redis the rate limits, and the counts of sockets held open, are one count across instances:
a client does not get twice as much by spreading its calls or its sockets over two of them."""

from __future__ import annotations

import asyncio

from tests.e2e.client import Client, Widget, new_widget
from tests.e2e.limits_support import (
    ATTACKER,
    BYSTANDER,
    closed_with,
    hello_or_refusal,
    open_from,
    refused,
    send_messages,
    served,
    widget_from,
)
from tests.multi.conftest import Cluster
from tests.servers import GatewayProcess

# Per day: a test's few seconds do not straddle the end of a window (docs/limits.md).
LIMITS = {
    "CHATGW_LIMIT_EXEMPT_IPS": "127.0.0.1,::1",
    "CHATGW_LIMIT_VIOLATIONS": "off",
    "CHATGW_LIMIT_CONVERSATION_MESSAGES": "4/day",
    "CHATGW_LIMIT_IP_WIDGET_SESSIONS": "3/day",
}


async def test_a_conversations_rate_is_shared_by_its_sockets_on_two_instances(cluster: Cluster) -> None:
    """Sockets of one conversation on two instances share its message rate; another conversation
    is served on either instance."""
    a, b = cluster(2, LIMITS)
    widget = new_widget(a)
    on_a, on_b = await open_from(a, ATTACKER), await open_from(b, ATTACKER)
    await on_a.hello(widget)
    await on_b.hello(widget)
    outcome = await send_messages(on_a, ["a-0", "a-1", "a-2"])
    outcome |= await send_messages(on_b, ["b-0", "b-1", "b-2"])
    assert refused(outcome, "conversation_messages") == ["b-1", "b-2"]
    await served(a, new_widget(a))
    await served(b, new_widget(b))
    await on_a.close()
    await on_b.close()


def test_widget_sessions_per_address_are_counted_across_instances(cluster: Cluster) -> None:
    """An address's new conversations count on every instance alike."""
    a, b = cluster(2, LIMITS)
    codes = [widget_from(gw, ATTACKER).status_code for gw in (a, b, a, b)]
    assert codes == [201, 201, 201, 429]
    assert widget_from(b, BYSTANDER).status_code == 201


async def welcomed_after_retries(gw: GatewayProcess, widget: Widget, address: str, limit: str) -> Client:
    """Open sockets until one is welcomed: the server counts a closed socket out once it has seen
    the close, so the first tries may still be refused by `limit`."""
    for _ in range(50):
        client = await open_from(gw, address)
        first = await hello_or_refusal(client, widget)
        if first["type"] == "welcome":
            return client
        assert (first["code"], first["limit"]) == ("rate_limited", limit), first
        await closed_with(client)
        await asyncio.sleep(0.1)
    raise AssertionError(f"still refused by {limit}")


async def test_a_conversations_open_sockets_are_counted_across_instances(cluster: Cluster) -> None:
    """CHATGW_MAX_SOCKETS_PER_CONVERSATION holds for the conversation's sockets on all instances:
    with two open on one, a third on the other is refused (1013); once one closes, it is taken."""
    a, b = cluster(2, {**LIMITS, "CHATGW_MAX_SOCKETS_PER_CONVERSATION": "2"})
    widget = new_widget(a)
    held = [await open_from(a, BYSTANDER) for _ in range(2)]
    for client in held:
        await client.hello(widget)
    extra = await open_from(b, BYSTANDER)
    error = await hello_or_refusal(extra, widget)
    assert (error["type"], error["code"], error["limit"]) == ("error", "rate_limited", "conversation_sockets")
    assert error["retry_after_ms"] > 0
    assert await closed_with(extra) == 1013
    await served(b, new_widget(b))

    await held.pop().close()
    again = await welcomed_after_retries(b, widget, BYSTANDER, "conversation_sockets")
    for client in [*held, again]:
        await client.close()


async def test_an_addresss_open_sockets_are_counted_across_instances(cluster: Cluster) -> None:
    """CHATGW_MAX_CONNECTIONS_PER_IP holds for an address's sockets on all instances: with two
    open on one, a third on the other is refused (1013); once one closes, it is taken."""
    a, b = cluster(2, {**LIMITS, "CHATGW_MAX_CONNECTIONS_PER_IP": "2"})
    widget = new_widget(a)
    held = [await open_from(a, ATTACKER) for _ in range(2)]
    for client in held:
        await client.hello(widget)
    extra = await open_from(b, ATTACKER)
    error = await extra.recv()
    assert (error["type"], error["code"], error["limit"]) == ("error", "rate_limited", "ip_connections")
    assert await closed_with(extra) == 1013
    await served(b, new_widget(b))  # another address

    await held.pop().close()
    again = await welcomed_after_retries(b, widget, ATTACKER, "ip_connections")
    for client in [*held, again]:
        await client.close()
