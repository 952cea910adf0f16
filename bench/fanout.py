"""Fan-out of streamed answers: the reference servers side by side, stepping the number of rooms up.

Each run climbs a ladder of room counts R (`--ladder`); at each R every server (`--servers`, see
refservers.KINDS) takes its turn, one after another, so that all see the same machine state. A
server leaves the ladder at its first failing R (except that R = `--compare` is run for all). At
each step, on a freshly started server:

1. opens 2R sockets from `--clients` client processes (per room a user and a watcher; with
   the two-instance kinds, `socketio-2` and the `floor-*` ones, the watcher is on the second
   instance) and joins them to their rooms, which
   starts each room's publisher (workload.py: every 3 s an answer of 40 pieces at 20 pieces/s,
   each piece stamped with its send time);
2. waits `--warmup` seconds, then measures for `--window` seconds: every piece that arrives in the
   window gives one lag sample (arrival time - send time; one clock, one machine), and the CPU
   seconds the server process(es) used in the window are read from /proc/<pid>/stat (for the
   kinds with a Redis server of their own, its CPU too, and for the kinds that read a model that
   of the model server, separately).

A step passes when the p99 lag is at most `--p99-ms` (50) and at least 95% of the frames the
workload schedules in the window arrived. The largest R passed before the first failure is the
server's capacity in that run. The machine is shared: before each step the driver waits (up to
`--quiet-wait` s) for the machine's busy cores to fall below `--quiet-below`, and each step records
how many cores, on average, were kept busy in the window by anything other than the server and
the clients (`others_cores`).

Report: one JSON object per step on `--json` (append), with the fields

    server, instances, run, rooms, sockets, window_s, expected_frames_per_s, frames_per_s,
    lag_ms {p50, p95, p99, max}, cpu_s, cpu_us_per_frame, redis_cpu_us_per_frame, client_cpu_s,
    others_cores, busy_cores_before, passed, model_cpu_us_per_frame

and, at the end, a table per server: the largest passing R, and the step figures at that R and at
R = `--compare` (median over the runs, min-max in brackets).

    .venv/bin/python bench/fanout.py --runs 3
    .venv/bin/python bench/fanout.py --servers starlette --ladder 100,200,300 --runs 1
    .venv/bin/python bench/fanout.py --from-json fanout.jsonl   # the tables again, from the steps
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import refservers
from clients import SocketSpec, from_driver, open_joined, read_pieces, retried
from websockets.asyncio.client import ClientConnection
from workload import (
    FRAMES_PER_ROOM_PER_S,
    cpu_seconds,
    machine_busy_seconds,
    percentile,
    raise_file_limit,
    wait_for_quiet,
)

CONNECTS_AT_ONCE = 64
DEFAULT_SERVERS = ["websockets", "starlette", "socketio", "socketio-2"]
LADDER = [25, 50, 75, 100, 150, 200, 300, 400, 500, 600, 800, 1000]


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
    redis_cpu_us_per_frame: float  # the kinds' own Redis server (0 for the kinds without one)
    client_cpu_s: float
    others_cores: float  # what else kept the machine's cores busy in the window, on average
    busy_cores_before: float  # the machine's busy cores just before the step
    passed: bool
    model_cpu_us_per_frame: float = 0.0  # the model server of the kinds that read one (0 for the others)


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
    sockets: list[ClientConnection] = []
    readers: list[asyncio.Task[None]] = []

    async def one(spec: SocketSpec) -> None:
        async with gate:
            ws = await retried(lambda: open_joined(spec))
        sockets.append(ws)
        readers.append(asyncio.create_task(read_pieces(ws, spec.proto, on_piece)))  # pings answered at once

    try:
        await asyncio.gather(*(one(s) for s in specs))
    except Exception as exc:
        pipe.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    pipe.send(("ready", len(sockets)))
    window[0], window[1] = await from_driver(pipe)
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
    before = wait_for_quiet(args.quiet_below, args.quiet_wait)
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
        client_pids = [p.pid for p in procs if p.pid is not None]
        redis_pid = server.redis.pid if server.redis else None
        redis_start = cpu_seconds(redis_pid) if redis_pid else 0.0
        model_pid = server.model.pid if server.model else None
        model_start = cpu_seconds(model_pid) if model_pid else 0.0
        cpu_start = sum(cpu_seconds(pid) for pid in server.pids)
        clients_start = sum(cpu_seconds(pid) for pid in client_pids)
        busy_start = machine_busy_seconds()
        time.sleep(max(0.0, end - time.time()))
        cpu_used = sum(cpu_seconds(pid) for pid in server.pids) - cpu_start
        clients_used = sum(cpu_seconds(pid) for pid in client_pids) - clients_start
        redis_used = cpu_seconds(redis_pid) - redis_start if redis_pid else 0.0
        model_used = cpu_seconds(model_pid) - model_start if model_pid else 0.0
        busy = machine_busy_seconds() - busy_start
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
        redis_cpu_us_per_frame=round(redis_used / len(lags) * 1e6, 1) if lags else float("nan"),
        client_cpu_s=round(clients_used, 3),
        others_cores=round(
            max(0.0, busy - cpu_used - clients_used - redis_used - model_used) / args.window, 2
        ),
        busy_cores_before=round(before, 2),
        passed=bool(lags) and lag_ms["p99"] <= args.p99_ms and frames_per_s >= 0.95 * expected,
        model_cpu_us_per_frame=round(model_used / len(lags) * 1e6, 1) if lags else float("nan"),
    )


def ladder_run(kinds: list[str], run: int, args: argparse.Namespace, record: list[Step]) -> dict[str, int]:
    """One run: every R of the ladder, each server in turn at that R (so that all servers see the
    same machine state), until each has failed once. The R in `--compare` is run for every server
    whatever happened before. Returns, per server, the largest R passed before its first failure."""
    capacity = dict.fromkeys(kinds, 0)
    failed: set[str] = set()
    for rooms in args.ladder:
        for kind in kinds:
            if kind in failed and rooms != args.compare:
                continue
            try:
                result = run_step(kind, run, rooms, args)
            except RuntimeError as exc:
                print(f"  run {run} {kind} R={rooms}: {exc}", flush=True)
                failed.add(kind)
                continue
            record.append(result)
            report(result, args)
            if kind in failed:
                continue
            if result.passed:
                capacity[kind] = rooms
            else:
                failed.add(kind)
        if failed.issuperset(kinds) and rooms >= args.compare:
            break
    return capacity


def report(step: Step, args: argparse.Namespace) -> None:
    lag = step.lag_ms
    print(
        f"  run {step.run} {step.server:<11} R={step.rooms:<5} {step.frames_per_s:8.0f}/{step.expected_frames_per_s:.0f} frames/s"
        f"  lag p50 {lag['p50']:6.1f} p95 {lag['p95']:6.1f} p99 {lag['p99']:7.1f} max {lag['max']:7.1f} ms"
        f"  cpu {step.cpu_us_per_frame:6.1f} (+redis {step.redis_cpu_us_per_frame:.1f}, model {step.model_cpu_us_per_frame:.1f}) us/frame"
        f"  others {step.others_cores:.2f} cores"
        f"  {'pass' if step.passed else 'FAIL'}",
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


def capacities_of(record: list[Step], kind: str) -> dict[int, int]:
    """Per run: the largest R that passed with no failure at a smaller R."""
    result: dict[int, int] = {}
    for run in sorted({s.run for s in record if s.server == kind}):
        best = 0
        for step in sorted((s for s in record if s.server == kind and s.run == run), key=lambda s: s.rooms):
            if not step.passed:
                break
            best = step.rooms
        result[run] = best
    return result


def summarise(kinds: list[str], record: list[Step], compare: int) -> None:
    capacities = {kind: capacities_of(record, kind) for kind in kinds}
    print(
        "\n| server | largest R, p99 <= limit | frames/s at it | p99 lag at it (ms) | server CPU us/frame at it |"
    )
    print("| --- | --- | --- | --- | --- |")
    for kind in kinds:
        at_cap = [s for s in record if s.server == kind and s.passed and s.rooms == capacities[kind][s.run]]
        print(
            f"| {kind} | {spread([float(c) for c in capacities[kind].values()], 0)} | "
            f"{spread([s.frames_per_s for s in at_cap], 0)} | {spread([s.lag_ms['p99'] for s in at_cap])} | "
            f"{spread([s.cpu_us_per_frame for s in at_cap])} |"
        )
    scheduled = compare * FRAMES_PER_ROOM_PER_S
    print(f"\nAt R = {compare} rooms ({2 * compare} sockets, {scheduled:.0f} frames/s scheduled):\n")
    print(
        "| server | frames/s | lag p50 (ms) | p95 (ms) | p99 (ms) | max (ms) | server CPU us/frame | Redis CPU us/frame |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for kind in kinds:
        steps = [s for s in record if s.server == kind and s.rooms == compare]
        lag = {k: [s.lag_ms[k] for s in steps] for k in ("p50", "p95", "p99", "max")}
        print(
            f"| {kind} | {spread([s.frames_per_s for s in steps], 0)} | {spread(lag['p50'])} | {spread(lag['p95'])} "
            f"| {spread(lag['p99'])} | {spread(lag['max'])} | {spread([s.cpu_us_per_frame for s in steps])} "
            f"| {spread([s.redis_cpu_us_per_frame for s in steps])} |"
        )
    print("\np99 lag (ms) by R, median (min-max) over the runs that reached it, [passed/runs]:\n")
    print("| R | " + " | ".join(kinds) + " |")
    print("| --- |" + " --- |" * len(kinds))
    for rooms in sorted({s.rooms for s in record}):
        cells = []
        for kind in kinds:
            steps = [s for s in record if s.server == kind and s.rooms == rooms]
            passed = sum(s.passed for s in steps)
            cells.append(
                f"{spread([s.lag_ms['p99'] for s in steps])} [{passed}/{len(steps)}]" if steps else "-"
            )
        print(f"| {rooms} | " + " | ".join(cells) + " |")


def _ladder(value: str) -> list[int]:
    try:
        steps = [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError("expected comma-separated whole numbers") from None
    if not steps or steps[0] < 1 or steps != sorted(set(steps)):
        raise argparse.ArgumentTypeError("expected rising numbers of rooms, each at least 1")
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--servers",
        default=",".join(DEFAULT_SERVERS),
        help=f"comma-separated, from: {', '.join(refservers.KINDS)} (default {','.join(DEFAULT_SERVERS)})",
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--ladder", type=_ladder, default=LADDER, help="comma-separated R (rooms), rising")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--window", type=float, default=6.0)
    parser.add_argument("--p99-ms", type=float, default=50.0)
    parser.add_argument(
        "--quiet-below",
        type=float,
        default=0.7,
        help="before each step, wait for the machine's busy cores to fall below this",
    )
    parser.add_argument("--quiet-wait", type=float, default=15.0, help="...for at most this many seconds")
    parser.add_argument("--compare", type=int, default=100, help="R reported side by side for every server")
    parser.add_argument("--json", default=None, help="append one JSON object per step to this file")
    parser.add_argument(
        "--first-run", type=int, default=1, help="number of the first run (to append to a file)"
    )
    parser.add_argument(
        "--from-json", default=None, help="measure nothing: print the tables of the steps in this file"
    )
    args = parser.parse_args()
    # A terminated run still stops the servers and client processes it started (finally blocks).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    kinds = [k for k in args.servers.split(",") if k]
    unknown = [k for k in kinds if k not in refservers.KINDS]
    if unknown:
        parser.error(f"unknown server(s): {', '.join(unknown)}; known: {', '.join(refservers.KINDS)}")
    if args.clients < 1 or args.runs < 1:
        parser.error("--clients and --runs must be at least 1")
    raise_file_limit()
    record: list[Step] = []
    if args.from_json:
        record = [Step(**json.loads(line)) for line in Path(args.from_json).read_text().splitlines() if line]
        kinds = [k for k in kinds if any(s.server == k for s in record)]
    else:
        for run in range(args.first_run, args.first_run + args.runs):
            for kind, rooms in ladder_run(kinds, run, args, record).items():
                print(f"run {run} {kind}: largest R {rooms}", flush=True)
    summarise(kinds, record, args.compare)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
    sys.exit(0)
