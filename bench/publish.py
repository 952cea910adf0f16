"""CPU per publish of the Redis broker, by transport, side by side in one run.

- `pipelined`: the publish script through the broker's pipelining client (a bounded pool with
  automatic pipelining, `redis_client.AutoPipelineRedis`), as the broker sent it until the
  publishing connection; every other broker command still goes this way.
- `connection`: the broker as it is: the publish script on a connection of its own
  (`redis_wire.Commands`: one write in flight, replies read a chunk at a time).

(An earlier version of this script measured redis-py's plain client, one round trip per call,
against `pipelined`: bench/README.md keeps those figures.)

For each transport and each concurrency C it opens C conversations and has each publish `--each`
deltas one after another (as an answer's delta pump does: each publish awaited before the next),
all C at once. It records the process's CPU time (user + system) per publish, Redis's CPU time
per publish (`INFO cpu`), publishes per second, and how many publishes failed. Transports
alternate within each run.

    .venv/bin/python bench/publish.py --runs 5
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import redis.asyncio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.errors import CoreError  # noqa: E402
from core.types import ConversationId, EventType, new_id  # noqa: E402
from gateway.backends.redis_broker import RedisBroker  # noqa: E402
from gateway.backends.redis_client import AutoPipelineRedis  # noqa: E402
from tests.databases import redis_url  # noqa: E402


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def redis_cpu(admin: redis.asyncio.Redis) -> float:
    info = await admin.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def broker_for(transport: str, prefix: str) -> RedisBroker:
    broker = RedisBroker(redis_url(), prefix=prefix, replay_window=1000, ttl=600)
    await broker.connect()
    if transport == "pipelined":
        script = broker._scripts["publish"]

        async def through_the_pool(client: redis.asyncio.Redis, arguments: tuple[str | int, ...]) -> Any:
            return await script(keys=list(arguments[:3]), args=list(arguments[3:]), client=client)

        broker._run_publish = through_the_pool  # type: ignore[method-assign]
    return broker


async def answer(broker: RedisBroker, cid: ConversationId, each: int) -> int:
    failed = 0
    for n in range(each):
        try:
            await broker.publish(cid, EventType.DELTA, {"response_id": "r", "text": f"piece {n} "})
        except CoreError:
            failed += 1
    return failed


async def measure(
    transport: str, concurrency: int, each: int, admin: redis.asyncio.Redis
) -> dict[str, float]:
    prefix = f"bench-publish-{uuid.uuid4().hex[:8]}:"
    broker = await broker_for(transport, prefix)
    try:
        conversations = [ConversationId(new_id()) for _ in range(concurrency)]
        for cid in conversations:
            await broker.open(cid, floor_seq=0)
            await broker.publish(cid, EventType.AI_START, {"response_id": "r"})
        client = broker._client
        assert isinstance(client, AutoPipelineRedis)
        before, client.most_in_flight = broker.transport_stats(), 0
        cpu, server, started = cpu_seconds(), await redis_cpu(admin), time.perf_counter()
        failures = await asyncio.gather(*(answer(broker, cid, each) for cid in conversations))
        elapsed = time.perf_counter() - started
        cpu, server = cpu_seconds() - cpu, await redis_cpu(admin) - server
        after = broker.transport_stats()
        per_trip = (after["commands"] - before["commands"]) / (after["round_trips"] - before["round_trips"])
        most = client.most_in_flight if transport == "pipelined" else 1
    finally:
        await broker.close()
        keys = [k async for k in admin.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await admin.delete(*keys)
    total = concurrency * each
    return {
        "client CPU us/publish": cpu / total * 1e6,
        "redis CPU us/publish": server / total * 1e6,
        "publishes/s": total / elapsed,
        "failed %": sum(failures) / total * 100,
        "commands/round trip": per_trip,
        "most pipelines or writes in flight": most,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,50,1000", help="comma-separated conversations at once")
    parser.add_argument("--publishes", type=int, default=20_000, help="publishes per measurement")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    admin = redis.asyncio.Redis.from_url(redis_url())
    results: dict[tuple[int, str], list[dict[str, float]]] = {}
    try:
        for run in range(args.runs):
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                each = max(args.publishes // concurrency, 1)
                for transport in ("pipelined", "connection"):
                    result = await measure(transport, concurrency, each, admin)
                    results.setdefault((concurrency, transport), []).append(result)
                    cells = ", ".join(f"{k} {v:.1f}" for k, v in result.items())
                    print(f"run {run + 1} C={concurrency} {transport}: {cells}", flush=True)
    finally:
        await admin.aclose()
    print(f"\n{args.publishes} publishes per measurement, {args.runs} runs: median (min-max)")
    for (concurrency, transport), runs in results.items():
        cells = []
        for key in runs[0]:
            values = [r[key] for r in runs]
            cells.append(f"{key} {statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})")
        print(f"C={concurrency:<5} {transport:<10} " + ", ".join(cells))


if __name__ == "__main__":
    asyncio.run(main())
