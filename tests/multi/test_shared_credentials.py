"""Instances on one PostgreSQL database started as the README says, without CHATGW_SECRET or
CHATGW_DEMO_API_KEY: they share the signing secret and the demo business's admin key."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import httpx
import pytest

from tests.databases import delete_redis_keys, drop_database, migrated_database, redis_url, sync
from tests.e2e.client import Client, new_widget
from tests.servers import GatewayProcess, start_gateway

# Empty values unset what tests/servers.py gives every gateway (the settings treat "" as unset).
UNSET = {"CHATGW_SECRET": "", "CHATGW_DEMO_API_KEY": ""}
Start = Callable[[Mapping[str, str]], GatewayProcess]


@pytest.fixture
def fresh_cluster(tmp_path: Path) -> Iterator[Start]:
    """start(env) runs a gateway on a database of this test's own (nothing stored yet) and a Redis
    key prefix of its own."""
    url = sync(migrated_database())
    prefix = f"chatgw-test-{uuid.uuid4().hex[:8]}:"
    started: list[GatewayProcess] = []

    def start(env: Mapping[str, str]) -> GatewayProcess:
        common = {"DATABASE_URL": url, "REDIS_URL": redis_url(), "CHATGW_REDIS_PREFIX": prefix}
        gw = start_gateway(tmp_path, {**common, **env})
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()
    delete_redis_keys(prefix)
    sync(drop_database(url))


def printed_demo_key(gw: GatewayProcess) -> str:
    match = re.search(r"^demo admin API key \(([^)]*)\): (\S+)$", gw.log(), re.MULTILINE)
    assert match is not None, gw.log()
    assert "kept in the database" in match[1]
    return match[2]


def admin_status(gw: GatewayProcess, key: str) -> int:
    r = httpx.get(f"{gw.http}/v1/agents", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    return r.status_code


async def test_a_client_of_one_instance_resumes_on_another_without_a_configured_secret(
    fresh_cluster: Start,
) -> None:
    a, b = fresh_cluster(UNSET), fresh_cluster(UNSET)
    widget = new_widget(a)
    first = await Client.open(a)
    welcome = await first.hello(widget)
    await first.send({"type": "message", "client_msg_id": "s-1", "text": "shared secret"})
    await first.until_ai_end()
    last_seq = first.last_seq()
    await first.close()

    second = await Client.open(b)
    resumed = await second.hello(widget, resume={"epoch": welcome["epoch"], "last_seq": last_seq})
    assert resumed["resumed"] is True
    assert resumed["conversation_id"] == widget.conversation_id
    await second.send({"type": "message", "client_msg_id": "s-2", "text": "still me"})
    assert (await second.recv_type("ack"))["client_msg_id"] == "s-2"
    await second.close()
    # The widget token A signed also gets a fresh one from B.
    r = httpx.post(
        f"{b.http}/v1/widget/sessions",
        json={"business": "demo", "conversation_id": widget.conversation_id},
        headers={"Authorization": f"Bearer {widget.token}"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    assert r.json()["conversation_id"] == widget.conversation_id


def test_the_printed_demo_key_works_on_every_instance_and_an_explicit_one_wins(
    fresh_cluster: Start,
) -> None:
    a = fresh_cluster(UNSET)
    key = printed_demo_key(a)
    b = fresh_cluster(UNSET)
    assert printed_demo_key(b) == key
    assert admin_status(a, key) == admin_status(b, key) == 200

    chosen = "an-explicit-demo-key-" + uuid.uuid4().hex
    c = fresh_cluster({**UNSET, "CHATGW_DEMO_API_KEY": chosen})
    assert "demo admin API key" not in c.log()  # the operator chose it: nothing to print
    assert admin_status(a, chosen) == admin_status(c, chosen) == 200
    assert admin_status(a, key) == 401
    # An instance started later without a key prints and uses the chosen one.
    d = fresh_cluster(UNSET)
    assert printed_demo_key(d) == chosen
    assert admin_status(d, chosen) == 200
