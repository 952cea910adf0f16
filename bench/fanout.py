"""Fan-out of streamed answers: the reference servers side by side, stepping the number of rooms up.

For each server (`--servers`, see refservers.KINDS) and each run, it steps the number of rooms R
up (doubling from `--start`, then bisecting between the last R that passed and the first that
failed) and, at each R, on a freshly started server:

1. opens 2R sockets from `--clients` client processes (per room a user and a watcher; with
   `socketio-2` the watcher is on the second instance) and joins them to their rooms, which
   starts each room's publisher (workload.py: every 3 s an answer of 40 pieces at 20 pieces/s,
   each piece stamped with its send time);
2. waits `--warmup` seconds, then measures for `--window` seconds: every piece that arrives in the
   window gives one lag sample (arrival time - send time; one clock, one machine), and the CPU
   seconds the server process(es) used in the window are read from /proc/<pid>/stat.

A step passes when the p99 lag is at most `--p99-ms` (50) and at least 95% of the frames the
workload schedules in the window arrived. The largest passing R is the server's capacity.

Report: one JSON object per step on `--json` (append), with the fields

    server, instances, run, rooms, sockets, window_s, expected_frames_per_s, frames_per_s,
    lag_ms {p50, p95, p99, max}, cpu_s, cpu_us_per_frame, passed

and, at the end, a table per server: the largest passing R, and the step figures at that R and at
R = `--compare` (median over the runs, min-max in brackets).

    .venv/bin/python bench/fanout.py --runs 3
    .venv/bin/python bench/fanout.py --servers starlette --start 100 --runs 1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import refservers
from clients import SocketSpec, open_joined, read_pieces
from websockets.asyncio.client import ClientConnection
from workload import FRAMES_PER_ROOM_PER_S, cpu_seconds, percentile, raise_file_limit

CONNECTS_AT_ONCE = 64


@dataclass
class Step:
    server: str
    instances: int
    run: int
    rooms: int
    sockets: int
    window_s: float
    expected_frames_per_s: float
    frames_per_s: float
    lag_ms: dict[str, float]
    cpu_s: float
    cpu_us_per_frame: float
    passed: bool


# ---- client processes ------------------------------------------------------------------------


def client_process(pipe: Connection, specs: list[SocketSpec]) -> None:
    raise_file_limit()
    asyncio.run(_client(pipe, specs))


async def _client(pipe: Connection, specs: list[SocketSpec]) -> None:
    window = [float("inf"), float("-inf")]
    lags: list[float] = []

    def on_piece(now: float, sent: float) -> None:
        if window[0] <= now < window[1]:
            lags.append(now - sent)

    gate = asyncio.Semaphore(CONNECTS_AT_ONCE)

    async def one(spec: SocketSpec) -> ClientConnection:
        async with gate:
            return await open_joined(spec)

    try:
        sockets = await asyncio.gather(*(one(s) for s in specs))
    except Exception as exc:
        pipe.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    readers = [
        asyncio.create_task(read_pieces(ws, s.proto, on_piece)) for ws, s in zip(sockets, specs, strict=True)
    ]
    pipe.send(("ready", len(sockets)))
    window[0], window[1] = await asyncio.to_thread(pipe.recv)
    await asyncio.sleep(max(0.0, window[1] - time.time()) + 0.1)
    pipe.send(("lags", lags))
    for task in readers:
        task.cancel()
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)


# ---- one step ---------------------------------------------------------------------------------


def socket_specs(server: refservers.Running, rooms: int) -> list[SocketSpec]:
    user_port, watcher_port = server.ports[0], server.ports[-1]
    specs = []
    for r in range(rooms):
        specs.append(SocketSpec(user_port, server.proto, f"r{r}", "user"))
        specs.append(SocketSpec(watcher_port, server.proto, f"r{r}", "watcher"))
    return specs


def run_step(kind: str, run: int, rooms: int, args: argparse.Namespace) -> Step:
    server = refservers.start(kind)
    ctx = multiprocessing.get_context("fork")
    procs: list[multiprocessing.process.BaseProcess] = []
    pipes: list[Connection] = []
    try:
        specs = socket_specs(server, rooms)
        for c in range(args.clients):
            ours, theirs = ctx.Pipe()
            proc: multiprocessing.process.BaseProcess = ctx.Process(
                target=client_process, args=(theirs, specs[c :: args.clients]), daemon=True
            )
            proc.start()
            procs.append(proc)
            pipes.append(ours)
        for pipe in pipes:
            if not pipe.poll(120):
                raise RuntimeError("a client process did not connect its sockets within 120 s")
            state, detail = pipe.recv()
            if state != "ready":
                raise RuntimeError(f"a client process failed to connect: {detail}")
        start = time.time() + args.warmup
        end = start + args.window
        for pipe in pipes:
            pipe.send((start, end))
        time.sleep(max(0.0, start - time.time()))
        cpu_start = sum(cpu_seconds(pid) for pid in server.pids)
        time.sleep(max(0.0, end - time.time()))
        cpu_used = sum(cpu_seconds(pid) for pid in server.pids) - cpu_start
        lags: list[float] = []
        for pipe in pipes:
            if not pipe.poll(60):
                raise RuntimeError("a client process did not report within 60 s")
            lags.extend(pipe.recv()[1])
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        server.stop()
    lags.sort()
    expected = rooms * FRAMES_PER_ROOM_PER_S
    frames_per_s = len(lags) / args.window
    lag_ms = {f"p{p}": percentile(lags, p) * 1000 for p in (50, 95, 99)}
    lag_ms["max"] = (lags[-1] if lags else float("nan")) * 1000
    return Step(
        server=kind,
        instances=len(server.ports),
        run=run,
        rooms=rooms,
        sockets=2 * rooms,
        window_s=args.window,
        expected_frames_per_s=round(expected, 1),
        frames_per_s=round(frames_per_s, 1),
        lag_ms={k: round(v, 2) for k, v in lag_ms.items()},
        cpu_s=round(cpu_used, 3),
        cpu_us_per_frame=round(cpu_used / len(lags) * 1e6, 1) if lags else float("nan"),
        passed=bool(lags) and lag_ms["p99"] <= args.p99_ms and frames_per_s >= 0.95 * expected,
    )


def capacity(kind: str, run: int, args: argparse.Namespace, record: list[Step]) -> int:
    """Step R up for one server; returns the largest R that passed (0 if none)."""

    def step(rooms: int) -> bool:
        try:
            result = run_step(kind, run, rooms, args)
        except RuntimeError as exc:
            print(f"  {kind} R={rooms}: {exc}", flush=True)
            return False
        record.append(result)
        report(result, args)
        return result.passed

    good, bad = 0, 0
    rooms = args.start
    while rooms <= args.max_rooms:
        if not step(rooms):
            bad = rooms
            break
        good = rooms
        rooms *= 2
    if bad:
        for _ in range(args.bisect):
            middle = (good + bad) // 2
            if middle in (good, bad):
                break
            if step(middle):
                good = middle
            else:
                bad = middle
    return good


def report(step: Step, args: argparse.Namespace) -> None:
    lag = step.lag_ms
    print(
        f"  run {step.run} {step.server:<11} R={step.rooms:<5} {step.frames_per_s:8.0f}/{step.expected_frames_per_s:.0f} frames/s"
        f"  lag p50 {lag['p50']:6.1f} p95 {lag['p95']:6.1f} p99 {lag['p99']:7.1f} max {lag['max']:7.1f} ms"
        f"  cpu {step.cpu_us_per_frame:6.1f} us/frame  {'pass' if step.passed else 'FAIL'}",
        flush=True,
    )
    if args.json:
        with Path(args.json).open("a") as out:
            out.write(json.dumps(asdict(step)) + "\n")


# ---- summary ----------------------------------------------------------------------------------


def spread(values: list[float], digits: int = 1) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def summarise(kinds: list[str], record: list[Step], capacities: dict[str, list[int]], compare: int) -> None:
    print(
        "\n| server | largest R with p99 <= limit | frames/s at it | p99 lag at it (ms) | CPU us/frame at it |"
    )
    print("| --- | --- | --- | --- | --- |")
    for kind in kinds:
        at_cap = [
            s for s in record if s.server == kind and s.passed and s.rooms == max_passed(record, kind, s.run)
        ]
        print(
            f"| {kind} | {spread([float(c) for c in capacities[kind]], 0)} | "
            f"{spread([s.frames_per_s for s in at_cap], 0)} | {spread([s.lag_ms['p99'] for s in at_cap])} | "
            f"{spread([s.cpu_us_per_frame for s in at_cap])} |"
        )
    print(
        f"\nAt R = {compare} rooms ({2 * compare} sockets, {compare * FRAMES_PER_ROOM_PER_S:.0f} frames/s scheduled):\n"
    )
    print("| server | frames/s | lag p50 (ms) | p95 (ms) | p99 (ms) | max (ms) | server CPU us/frame |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for kind in kinds:
        steps = [s for s in record if s.server == kind and s.rooms == compare]
        lag = {k: [s.lag_ms[k] for s in steps] for k in ("p50", "p95", "p99", "max")}
        print(
            f"| {kind} | {spread([s.frames_per_s for s in steps], 0)} | {spread(lag['p50'])} | {spread(lag['p95'])} "
            f"| {spread(lag['p99'])} | {spread(lag['max'])} | {spread([s.cpu_us_per_frame for s in steps])} |"
        )


def max_passed(record: list[Step], kind: str, run: int) -> int:
    return max((s.rooms for s in record if s.server == kind and s.run == run and s.passed), default=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--servers",
        default=",".join(refservers.KINDS),
        help="comma-separated, from: " + ", ".join(refservers.KINDS),
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--start", type=int, default=50, help="first R (rooms)")
    parser.add_argument("--max-rooms", type=int, default=6400)
    parser.add_argument("--bisect", type=int, default=2, help="bisection steps after the first failure")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--window", type=float, default=6.0)
    parser.add_argument("--p99-ms", type=float, default=50.0)
    parser.add_argument("--compare", type=int, default=100, help="R reported side by side for every server")
    parser.add_argument("--json", default=None, help="append one JSON object per step to this file")
    args = parser.parse_args()
    kinds = [k for k in args.servers.split(",") if k]
    unknown = [k for k in kinds if k not in refservers.KINDS]
    if unknown:
        parser.error(f"unknown server(s): {', '.join(unknown)}; known: {', '.join(refservers.KINDS)}")
    if args.clients < 1 or args.runs < 1 or args.start < 1:
        parser.error("--clients, --runs and --start must be at least 1")
    raise_file_limit()
    record: list[Step] = []
    capacities: dict[str, list[int]] = {k: [] for k in kinds}
    for run in range(1, args.runs + 1):
        for kind in kinds:  # servers alternate within each run: same machine state for all
            capacities[kind].append(capacity(kind, run, args, record))
            print(f"run {run} {kind}: largest R {capacities[kind][-1]}", flush=True)
    summarise(kinds, record, capacities, args.compare)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
    sys.exit(0)
