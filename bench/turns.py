"""Turn latency and throughput of a real gateway process, on the embedded default and on
PostgreSQL + Redis, side by side in one run.

For each backend it starts `python -m gateway serve` (scripted model at full speed, answers of
`--tokens` pieces), opens `--conversations` sockets (each on a new conversation, before the clock
starts), and has them all at once send `--turns` messages one after another, each waiting for
its answer's end. Per turn it records, as the client sees them:
time to `ack`, time to the first `delta`, and time to `ai_end`. It prints percentiles over all
turns, the frames per second the clients received, the share of answers that did not end
`complete`, and the gateway process's CPU time per turn, per run and per backend.

    .venv/bin/python bench/turns.py --runs 3
    TEST_DATABASE_URL=... TEST_REDIS_URL=... .venv/bin/python bench/turns.py --backends postgres+redis

Needs PostgreSQL and Redis for the second backend (the same URLs as the tests).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.databases import drop_database, migrated_database, redis_url  # noqa: E402
from tests.e2e.client import Client, new_widget  # noqa: E402
from tests.servers import GatewayProcess, start_gateway  # noqa: E402


async def connected(gw: GatewayProcess, opening: asyncio.Semaphore) -> Client:
    """A socket that said hello on a new conversation (set up before the clock starts)."""
    widget = await asyncio.to_thread(new_widget, gw)
    async with opening:
        client = await Client.open(gw)
        await client.hello(widget)
    return client


async def conversation(client: Client, turns: int, samples: dict[str, list[float]]) -> int:
    frames = 0
    for n in range(turns):
        sent = time.perf_counter()
        await client.send({"type": "message", "client_msg_id": f"b-{n}", "text": f"question {n}"})
        first_delta = acked = None
        frame: dict[str, Any] = {"type": "none"}
        while True:
            try:
                frame = await client.recv(timeout=60)
            except TimeoutError:
                break  # nothing for a minute: the turn is lost
            frames += 1
            now = time.perf_counter()
            if frame["type"] == "ack" and acked is None:
                acked = now
            elif frame["type"] == "delta" and first_delta is None:
                first_delta = now
            elif frame["type"] == "error" and frame.get("client_msg_id") == f"b-{n}":
                break  # refused (unavailable, say): a turn that did not complete
            elif frame["type"] == "ai_end":
                break
        if frame["type"] != "ai_end" or frame["status"] != "complete":
            samples["not_complete"].append(1.0)
        if frame["type"] == "ai_end":
            samples["ack"].append((acked or now) - sent)
            samples["first_delta"].append((first_delta or now) - sent)
            samples["ai_end"].append(now - sent)
    client.frames.clear()
    await client.close()
    return frames


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) the process has used so far (Linux: /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000


async def one_run(env: dict[str, str], args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        gw = await asyncio.to_thread(
            start_gateway,
            Path(tmp),
            {
                **env,
                "CHATGW_SCRIPTED_TPS": "0",
                "CHATGW_SCRIPTED_TOKENS": str(args.tokens),
                "CHATGW_LOG_LEVEL": "WARNING",
                "CHATGW_MAX_ACTIVE_ANSWERS": "0",  # capacity is measured here: no overload limit
            },
        )
        try:
            samples: dict[str, list[float]] = {"ack": [], "first_delta": [], "ai_end": [], "not_complete": []}
            opening = asyncio.Semaphore(50)
            clients = await asyncio.gather(*(connected(gw, opening) for _ in range(args.conversations)))
            cpu = process_cpu(gw.process.pid)
            started = time.perf_counter()
            frames = await asyncio.gather(*(conversation(c, args.turns, samples) for c in clients))
            cpu = process_cpu(gw.process.pid) - cpu
            elapsed = time.perf_counter() - started
        finally:
            gw.stop()
    failed = samples.pop("not_complete")
    result = {f"{k} p{p}": pct(v, p) for k, v in samples.items() for p in (50, 95, 99)}
    result["answers not complete %"] = len(failed) / (args.conversations * args.turns) * 100
    result["frames/s"] = sum(frames) / elapsed
    result["turns/s"] = args.conversations * args.turns / elapsed
    result["gateway CPU ms/turn"] = cpu / (args.conversations * args.turns) * 1000
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=50)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--backends", default="memory,postgres+redis")
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {}
    for run in range(args.runs):
        for backend in args.backends.split(","):
            env: dict[str, str] = {}
            database = None
            if backend == "postgres+redis":
                database = await migrated_database()
                env = {
                    "DATABASE_URL": database,
                    "REDIS_URL": redis_url(),
                    "CHATGW_REDIS_PREFIX": f"bench-{run}:",
                }
            try:
                results.setdefault(backend, []).append(await one_run(env, args))
            finally:
                if database:
                    await drop_database(database)
            print(
                f"run {run + 1} {backend}: "
                + ", ".join(f"{k} {v:.1f}" for k, v in results[backend][-1].items())
            )
    print(
        f"\n{args.conversations} conversations x {args.turns} turns, {args.tokens} pieces per answer, {args.runs} runs"
    )
    print("metric (ms, or per s)          " + "".join(f"{b:>28}" for b in results))
    for key in next(iter(results.values()))[0]:
        cells = []
        for runs in results.values():
            values = [r[key] for r in runs]
            cells.append(f"{statistics.median(values):10.1f} ({min(values):.1f}-{max(values):.1f})")
        print(f"{key:<30}" + "".join(f"{c:>28}" for c in cells))


if __name__ == "__main__":
    asyncio.run(main())
