"""`chatgw serve --workers 2` on PostgreSQL + Redis: two processes behind one port serve the same
conversations, a worker that dies is replaced, and SIGTERM drains every worker."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from core.llm import ChatMessage
from core.scripted_llm import scripted_reply
from tests.databases import delete_redis_keys, redis_url
from tests.e2e.client import Client, joined_deltas, new_widget, sequenced
from tests.multi.test_drain import drained
from tests.servers import GatewayProcess, start_gateway

SLOW = {"CHATGW_SCRIPTED_TPS": "40", "CHATGW_SCRIPTED_TOKENS": "80", "CHATGW_RECONNECT_SPREAD_MS": "400"}


@pytest.fixture
def workers(database_url: str, tmp_path: Path) -> Iterator[GatewayProcess]:
    prefix = f"chatgw-test-{uuid.uuid4().hex[:8]}:"
    env = {"DATABASE_URL": database_url, "REDIS_URL": redis_url(), "CHATGW_REDIS_PREFIX": prefix, **SLOW}
    gw = start_gateway(tmp_path, env, args=["--workers", "2"])
    try:
        # Ready, not only started: a worker that dies before it said it serves stops the command.
        wait_for_log(gw, lambda log: len(re.findall(r"worker \d \(pid \d+\) is ready", log)) == 2)
        yield gw
    finally:
        gw.stop()
        delete_redis_keys(prefix)


def wait_for_log(gw: GatewayProcess, predicate: Callable[[str], bool], timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while not predicate(log := gw.log()):
        assert time.monotonic() < deadline, f"the gateway's log never got there:\n{log}"
        time.sleep(0.05)
    return log


def worker_pids(log: str) -> list[int]:
    """The worker pids the supervisor logged, the latest first."""
    started = re.findall(r"started 2 workers: \[(\d+), (\d+)\]", log)
    assert started, log
    replaced = re.findall(r"worker \d \(pid \d+\) exited with [-\d]+: starting another", log)
    assert not replaced, log
    return [int(pid) for pid in started[-1]]


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def converse(gw: GatewayProcess, n: int) -> None:
    """One conversation with two sockets on it: both see the whole answer, in the same order."""
    widget = new_widget(gw)
    first, second = await Client.open(gw), await Client.open(gw)
    await first.hello(widget)
    await second.hello(widget)
    text = f"question number {n}"
    await first.send({"type": "message", "client_msg_id": f"w-{n}", "text": text})
    frames = await first.until_ai_end()
    seen_by_second = await second.until_ai_end()
    end = frames[-1]
    assert end["status"] == "complete"
    assert end["text"] == "".join(scripted_reply([ChatMessage("user", text)], 80))
    assert joined_deltas(frames, end["response_id"]) == end["text"]
    assert sequenced(frames) == sequenced(seen_by_second)
    await first.close()
    await second.close()


async def test_two_worker_processes_serve_conversations_on_one_port(workers: GatewayProcess) -> None:
    pids = worker_pids(workers.log())
    assert len(set(pids)) == 2
    for pid in pids:
        assert f"Started server process [{pid}]" in workers.log()
        assert running(pid)
    await asyncio.gather(*(converse(workers, n) for n in range(6)))


async def test_a_worker_that_dies_is_replaced_and_the_port_keeps_serving(workers: GatewayProcess) -> None:
    dead, alive = worker_pids(workers.log())
    os.kill(dead, signal.SIGKILL)

    log = await asyncio.to_thread(
        wait_for_log, workers, lambda log: len(re.findall(r"worker \d \(pid \d+\) is ready", log)) == 3
    )
    assert f"(pid {dead}) exited with -9: starting another" in log
    await asyncio.gather(*(converse(workers, n) for n in range(4)))
    assert workers.process.poll() is None
    assert running(alive)


async def test_sigterm_drains_every_worker_then_the_port_closes(
    workers: GatewayProcess, database_url: str
) -> None:
    widget = new_widget(workers)
    client = await Client.open(workers)
    await client.hello(widget)
    start = await client.ask_and_read("w-drain", "finish while draining")
    workers.process.send_signal(signal.SIGTERM)

    reconnect = await drained(client)  # closed with 1012 after it
    assert 0 <= int(str(reconnect["after_ms"])) <= 400
    # The parent waits for both workers, then ends on the signal as a single instance does.
    code = await asyncio.to_thread(workers.process.wait, 60)
    assert code == -signal.SIGTERM, workers.log()
    log = workers.log()
    assert log.count('"msg":"drained"') == 2
    assert "all workers stopped" in log
    assert '"level":"error"' not in log
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{workers.http}/healthz", timeout=2)
    # The answer streaming when the signal came was finished within the grace period, and stored.
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(
            "SELECT status, text FROM messages WHERE response_id = $1", start["response_id"]
        )
    finally:
        await conn.close()
    assert row is not None
    assert row["status"] == "complete"
    assert row["text"] == "".join(scripted_reply([ChatMessage("user", "finish while draining")], 80))
