"""With Redis the rate limits are one count across instances: a client does not get twice the
rate by spreading its calls over two of them."""

from __future__ import annotations

from tests.e2e.client import new_widget
from tests.e2e.limits_support import (
    ATTACKER,
    BYSTANDER,
    open_from,
    refused,
    send_messages,
    served,
    widget_from,
)
from tests.multi.conftest import Cluster

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
