"""Takeover latency across two instances on PostgreSQL + Redis.

Starts two gateway processes (A and B) on one database and one Redis (scripted model streaming at
`--tps` pieces a second, long answers). For each of `--conversations` conversations, the user's
socket is on A (A generates the answers) and an agent's socket is on B; each round the user asks,
the agent takes over at a random point of the answer, then hands back. It reports, over all
takeovers:

- `takeover_to_ai_end` (the gateway's own figure): B's histogram
  `chatgw_takeover_to_ai_end_seconds`, from the takeover frame arriving to the `ai_end` being
  published (read from /metrics: p50 and p99 interpolated within the buckets);
- `agent_send_to_user_ai_end`: as the clients see it, from the agent sending `takeover` on B to
  the user receiving the `ai_end` on A (one host, one clock);
- `late_deltas`: deltas of a taken-over answer the user received after its `ai_end` (must be 0).

    .venv/bin/python bench/takeover.py --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.databases import delete_redis_keys, drop_database, migrated_database, redis_url  # noqa: E402
from tests.e2e.agents import AgentClient, new_agent  # noqa: E402
from tests.e2e.client import Client, new_widget  # noqa: E402
from tests.servers import GatewayProcess, start_gateway  # noqa: E402


async def conversation(
    a: GatewayProcess, b: GatewayProcess, rounds: int, seed: int
) -> tuple[list[float], int]:
    rng = random.Random(seed)
    # The HTTP setup is blocking: off the event loop, and before any socket opens, so that no
    # socket of another conversation misses the gateway's hello deadline meanwhile.
    widget = await asyncio.to_thread(new_widget, a)
    agent = await asyncio.to_thread(new_agent, b)
    user = await Client.open(a)
    await user.hello(widget)
    console = await AgentClient.open(b)
    await console.agent_hello(agent)
    cid = widget.conversation_id
    samples: list[float] = []
    late = 0
    for _ in range(rounds):
        user.frames.clear()
        await user.send(
            {"type": "message", "client_msg_id": uuid.uuid4().hex, "text": "a long story, please"}
        )
        start = await user.recv_type("ai_start")
        await asyncio.sleep(rng.uniform(0.05, 0.5))
        sent = time.perf_counter()
        await console.act("takeover", cid)
        end = await user.recv_type("ai_end")
        if end["status"] == "taken_over":
            samples.append(time.perf_counter() - sent)
        await user.recv_type("mode")
        await console.act("handback", cid)
        await user.recv_type("mode")
        late += sum(1 for f in user.frames if f["type"] == "delta" and f["seq"] > end["seq"])
        assert start["response_id"] == end["response_id"]
    await user.close()
    await console.close()
    return samples, late


def histogram_quantiles(metrics: str, name: str, quantiles: tuple[float, ...]) -> dict[float, float]:
    """Quantiles of a Prometheus histogram (linear within buckets, as histogram_quantile does)."""
    buckets: list[tuple[float, float]] = []
    for line in metrics.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    total = buckets[-1][1] if buckets else 0.0
    out: dict[float, float] = {}
    for q in quantiles:
        rank, lower, below = q * total, 0.0, 0.0
        for upper, count in buckets:
            if count >= rank:
                span = count - below
                out[q] = lower + (upper - lower) * ((rank - below) / span if span else 0.0)
                break
            lower, below = upper, count
    return out


async def one_run(args: argparse.Namespace, run: int) -> dict[str, float]:
    database = await migrated_database()
    prefix = f"bench-takeover-{uuid.uuid4().hex[:6]}:"
    env = {
        "DATABASE_URL": database,
        "REDIS_URL": redis_url(),
        "CHATGW_REDIS_PREFIX": prefix,
        "CHATGW_SCRIPTED_TPS": str(args.tps),
        "CHATGW_SCRIPTED_TOKENS": str(args.tps * 3),
        "CHATGW_LOG_LEVEL": "WARNING",
        "CHATGW_MAX_ACTIVE_ANSWERS": "0",  # capacity is measured here: no overload limit
    }
    with tempfile.TemporaryDirectory() as tmp:
        a = await asyncio.to_thread(start_gateway, Path(tmp), env)
        b = await asyncio.to_thread(start_gateway, Path(tmp), env)
        try:
            results = await asyncio.gather(
                *(conversation(a, b, args.rounds, run * 1000 + n) for n in range(args.conversations))
            )
            metrics = (await asyncio.to_thread(httpx.get, f"{b.http}/metrics", timeout=10)).text
        finally:
            a.stop()
            b.stop()
            await drop_database(database)
            delete_redis_keys(prefix)
    samples = sorted(s for r, _ in results for s in r)
    server = histogram_quantiles(metrics, "chatgw_takeover_to_ai_end_seconds", (0.5, 0.99))
    return {
        "takeovers": float(len(samples)),
        "takeover_to_ai_end p50 (ms)": server.get(0.5, float("nan")) * 1000,
        "takeover_to_ai_end p99 (ms)": server.get(0.99, float("nan")) * 1000,
        "agent_send_to_user_ai_end p50 (ms)": samples[len(samples) // 2] * 1000,
        "agent_send_to_user_ai_end p99 (ms)": samples[min(len(samples) - 1, int(0.99 * len(samples)))] * 1000,
        "late_deltas": float(sum(late for _, late in results)),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--tps", type=int, default=200, help="pieces a second of the scripted model")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    runs = []
    for run in range(args.runs):
        runs.append(await one_run(args, run))
        print(f"run {run + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in runs[-1].items()))
    print(
        f"\n{args.conversations} conversations x {args.rounds} takeovers, {args.tps} pieces/s, {args.runs} runs"
    )
    for key in runs[0]:
        values = [r[key] for r in runs]
        print(f"{key:<40} {statistics.median(values):10.1f} ({min(values):.1f}-{max(values):.1f})")


if __name__ == "__main__":
    asyncio.run(main())
