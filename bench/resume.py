"""Resume after a gap of K events: the gateway on its embedded default and on PostgreSQL + Redis.

For each backend and run, on a fresh gateway process (and, for PostgreSQL + Redis, a fresh
migrated database of its own, dropped afterwards, and a Redis key prefix of its own):

1. one widget conversation is filled with at least `--events` events by sending messages one
   after another and reading each answer to its `ai_end` (scripted model at full speed, 200
   pieces per answer, `CHATGW_DELTA_MAX_CHARS=1` so that each piece is a `delta` event of its own,
   as at the scripted model's default 20 pieces/s; about 204 events per turn);
2. for each K in `--gaps`, `--repeats` times: a new socket (connected beforehand, not timed) sends
   `hello` with `resume: {epoch, last_seq: latest - K}`; the time runs from sending that `hello` to
   the arrival of the event with the latest seq. Each replay is checked: `welcome` with
   `resumed: true`, then exactly K events with seqs latest-K+1 .. latest in order.

The figure per run is the median over the repeats; the table gives the median of the runs with
min-max. The replay window (`CHATGW_REPLAY_WINDOW`) is the default 1000, so K = 1000 is the
longest gap that replays.

    .venv/bin/python bench/resume.py --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import orjson
from websockets.exceptions import ConnectionClosed

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.migrate import Migrator  # noqa: E402
from tests.databases import create_database, delete_redis_keys, drop_database, redis_url  # noqa: E402
from tests.e2e.client import Client, Widget, new_widget  # noqa: E402
from tests.servers import GatewayProcess, start_gateway  # noqa: E402

BACKENDS = ["memory", "postgres+redis"]


async def fill(gw: GatewayProcess, widget: Widget, events: int) -> tuple[str, int]:
    """Send messages until the conversation has at least `events` events; returns (epoch, latest seq)."""
    client = await Client.open(gw)
    welcome = await client.hello(widget)
    epoch, latest, turn = str(welcome["epoch"]), int(welcome["seq"]), 0
    while latest < events:
        turn += 1
        await client.send({"type": "message", "client_msg_id": f"fill-{turn}", "text": f"question {turn}"})
        for frame in await client.until_ai_end():
            latest = max(latest, int(frame.get("seq", 0)))
    await client.close()
    return epoch, latest


async def resume_once(gw: GatewayProcess, widget: Widget, epoch: str, latest: int, gap: int) -> float:
    """Seconds from `hello` with resume to the last replayed event."""
    client = await Client.open(gw)
    hello = {"type": "hello", "token": widget.token, "resume": {"epoch": epoch, "last_seq": latest - gap}}
    started = time.perf_counter()
    await client.ws.send(orjson.dumps(hello).decode())
    seqs: list[int] = []
    welcome = orjson.loads(await asyncio.wait_for(client.ws.recv(), 30))
    if welcome.get("type") != "welcome" or not welcome.get("resumed"):
        raise RuntimeError(f"resume of {gap} events was refused: {welcome}")
    while not seqs or seqs[-1] < latest:
        frame = orjson.loads(await asyncio.wait_for(client.ws.recv(), 30))
        if "seq" in frame and frame.get("type") != "typing":
            seqs.append(int(frame["seq"]))
    elapsed = time.perf_counter() - started
    await client.close()
    if seqs != list(range(latest - gap + 1, latest + 1)):
        raise RuntimeError(f"replay of {gap} events was not {latest - gap + 1}..{latest} in order")
    return elapsed


async def one_backend(backend: str, run: int, args: argparse.Namespace, gaps: list[int]) -> dict[int, float]:
    env = {
        "CHATGW_SCRIPTED_TPS": "0",
        "CHATGW_SCRIPTED_TOKENS": "200",
        "CHATGW_DELTA_MAX_CHARS": "1",
        "CHATGW_LOG_LEVEL": "WARNING",
    }
    database = None
    prefix = f"chatgw-bench-resume-{time.time_ns()}:"
    if backend == "postgres+redis":
        database = await create_database("chatgw_bench")
        await Migrator(database).up()
        env |= {"DATABASE_URL": database, "REDIS_URL": redis_url(), "CHATGW_REDIS_PREFIX": prefix}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            gw = await asyncio.to_thread(start_gateway, Path(tmp), env)
            try:
                widget = await asyncio.to_thread(new_widget, gw)
                epoch, latest = await fill(gw, widget, args.events)
                medians = {}
                for gap in gaps:
                    times = [await resume_once(gw, widget, epoch, latest, gap) for _ in range(args.repeats)]
                    medians[gap] = statistics.median(times) * 1000
                return medians
            finally:
                gw.stop()
    finally:
        if database:
            await drop_database(database)
            await asyncio.to_thread(delete_redis_keys, prefix)


async def with_retry(backend: str, run: int, args: argparse.Namespace, gaps: list[int]) -> dict[int, float]:
    """One backend's run, tried again once (on a fresh gateway) if its gateway or a socket failed:
    on a shared machine a process can be stopped from outside."""
    try:
        return await one_backend(backend, run, args, gaps)
    except (RuntimeError, OSError, ConnectionClosed, TimeoutError) as exc:
        print(f"run {run} {backend} failed ({type(exc).__name__}: {exc}); trying once more", flush=True)
        return await one_backend(backend, run, args, gaps)


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--backends", default=",".join(BACKENDS), help="comma-separated, from: " + ", ".join(BACKENDS)
    )
    parser.add_argument("--gaps", default="10,100,1000", help="comma-separated K")
    parser.add_argument("--events", type=int, default=1100, help="events in the conversation before resuming")
    parser.add_argument("--repeats", type=int, default=20, help="resumes per K per run")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    if unknown := [b for b in backends if b not in BACKENDS]:
        parser.error(f"unknown backend(s): {', '.join(unknown)}; known: {', '.join(BACKENDS)}")
    try:
        gaps = [int(k) for k in args.gaps.split(",")]
    except ValueError:
        parser.error("--gaps takes comma-separated whole numbers")
    if any(k < 1 or k > args.events for k in gaps) or args.repeats < 1 or args.runs < 1:
        parser.error("each K must be between 1 and --events; --repeats and --runs at least 1")
    results: dict[str, list[dict[int, float]]] = {b: [] for b in backends}
    for run in range(1, args.runs + 1):
        for backend in backends:  # alternate within each run: the same machine state for both
            results[backend].append(await with_retry(backend, run, args, gaps))
            cells = ", ".join(f"K={k} {ms:.1f} ms" for k, ms in results[backend][-1].items())
            print(f"run {run} {backend}: median of {args.repeats} resumes: {cells}", flush=True)
    print(f"\nms from hello with resume to the last replayed event (median of {args.runs} runs, min-max):\n")
    print("| K | " + " | ".join(backends) + " |")
    print("| --- |" + " --- |" * len(backends))
    for gap in gaps:
        row = []
        for backend in backends:
            values = [r[gap] for r in results[backend]]
            row.append(f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})")
        print(f"| {gap} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    asyncio.run(main())
