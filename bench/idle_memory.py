"""Memory per idle connected socket: the reference servers and the gateway, side by side in one run.

For each N in `--sockets` and each server (`--servers`), on a freshly started server process:

1. warm up: open and close `WARMUP` sockets (first-use allocations are not the sockets' cost);
2. read the server's RSS (VmRSS, /proc/<pid>/status): `before`;
3. gateway only: create N widget sessions (`POST /v1/widget/sessions {"business": "demo"}`, each
   a new end user and conversation in the embedded default's memory store) and read RSS again;
4. open N sockets from ceil(N / 5000) (at least 2) client processes and make each a member:
   reference servers get a `join` as a watcher of a room of its own (socket.io: after the
   Engine.IO and namespace handshakes); gateway sockets send `hello` with their token and get
   `welcome`;
5. wait `--settle` seconds, read RSS: `after`. Per socket: (after - before) / N bytes. The
   clients then check that all N sockets were still open at the reading (else the measurement
   is tried once more, then the script stops).

Servers alternate within each run; figures are the median of `--runs` runs with min-max.
Soft limits on open files are raised to the hard limit in every process (20,000 here, which is
why the largest N is 19,500: the server holds one descriptor per socket plus its own).

    .venv/bin/python bench/idle_memory.py --runs 3
    .venv/bin/python bench/idle_memory.py --servers gateway --sockets 1000 --runs 1
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import httpx
import orjson
import refservers
from clients import Proto, SocketSpec, from_driver, keep_open, open_joined, retried
from websockets.asyncio.client import ClientConnection, connect
from workload import raise_file_limit, rss_bytes

from tests.servers import ROOT, GatewayProcess, start_gateway

KINDS = ["websockets", "starlette", "socketio", "gateway"]
WARMUP = 20
PER_CLIENT = 5000
CONNECTS_AT_ONCE = 64
SESSIONS_AT_ONCE = 32


@dataclass(frozen=True)
class Target:
    kind: str
    port: int
    pid: int


@dataclass
class Sample:
    kind: str
    sockets: int
    before: int
    sessions: int  # RSS after creating the sessions (gateway), else = before
    after: int

    @property
    def per_socket(self) -> float:
        return (self.after - self.before) / self.sockets


# ---- client processes ------------------------------------------------------------------------


def client_process(pipe: Connection, target: Target, count: int, first: int) -> None:
    raise_file_limit()
    asyncio.run(_client(pipe, target, count, first))


async def _client(pipe: Connection, target: Target, count: int, first: int) -> None:
    proto: Proto = "socketio" if target.kind == "socketio" else "plain"
    holders: list[asyncio.Task[None]] = []
    sockets: list[ClientConnection] = []
    try:
        tokens = await _sessions(target, count) if target.kind.startswith("gateway") else []
        pipe.send(("sessions", len(tokens)))
        await from_driver(pipe)
        gate = asyncio.Semaphore(CONNECTS_AT_ONCE)

        async def one(i: int) -> None:
            async with gate:
                if target.kind.startswith("gateway"):
                    ws = await retried(lambda: _gateway_socket(target.port, tokens[i]))
                else:
                    spec = SocketSpec(target.port, proto, f"idle{first + i}", "watcher")
                    ws = await retried(lambda: open_joined(spec))
            sockets.append(ws)
            # At once, not after the last socket opened: socket.io drops a client that does not
            # answer its pings within 45 s, and opening thousands of sockets can take longer.
            holders.append(asyncio.create_task(keep_open(ws, proto)))

        await asyncio.gather(*(one(i) for i in range(count)))
    except Exception as exc:
        pipe.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    pipe.send(("ready", len(sockets)))
    await from_driver(pipe)
    pipe.send(("open", sum(not task.done() for task in holders)))
    for task in holders:
        task.cancel()
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)


async def _sessions(target: Target, count: int) -> list[str]:
    gate = asyncio.Semaphore(SESSIONS_AT_ONCE)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{target.port}", timeout=60) as http:

        async def one() -> str:
            async with gate:
                r = await http.post("/v1/widget/sessions", json={"business": "demo"})
                r.raise_for_status()
                return str(r.json()["token"])

        return await asyncio.gather(*(one() for _ in range(count)))


async def _gateway_socket(port: int, token: str) -> ClientConnection:
    ws = await connect(f"ws://127.0.0.1:{port}/ws", compression=None, ping_interval=None, open_timeout=60)
    await ws.send(orjson.dumps({"type": "hello", "token": token}).decode())
    welcome = orjson.loads(await ws.recv())
    if welcome.get("type") != "welcome":
        raise RuntimeError(f"expected welcome, got {welcome}")
    return ws


# ---- one measurement --------------------------------------------------------------------------


def open_sockets(
    target: Target, n: int, on_sessions: list[int]
) -> tuple[list[Connection], list[multiprocessing.process.BaseProcess]]:
    """Start client processes holding n sockets between them; returns once all are open. The RSS
    after the sessions were created (before any socket) is appended to on_sessions."""
    ctx = multiprocessing.get_context("fork")
    clients = max(2, math.ceil(n / PER_CLIENT))
    pipes: list[Connection] = []
    procs: list[multiprocessing.process.BaseProcess] = []
    first = 0
    for c in range(clients):
        count = n // clients + (1 if c < n % clients else 0)
        ours, theirs = ctx.Pipe()
        proc: multiprocessing.process.BaseProcess = ctx.Process(
            target=client_process, args=(theirs, target, count, first), daemon=True
        )
        proc.start()
        pipes.append(ours)
        procs.append(proc)
        first += count
    patience = 120 + n / 20  # seconds per phase; a loaded machine opens some 50-100 sockets a second
    try:
        for phase in ("sessions", "ready"):
            for pipe in pipes:
                if not pipe.poll(patience):
                    raise RuntimeError(f"a client process did not report '{phase}' within {patience:.0f} s")
                state, detail = pipe.recv()
                if state != phase:
                    raise RuntimeError(f"a client process failed: {detail}")
            if phase == "sessions":
                on_sessions.append(rss_bytes(target.pid))
                for pipe in pipes:
                    pipe.send("go")
    except BaseException:
        for proc in procs:
            proc.kill()
        raise
    return pipes, procs


def close_sockets(pipes: list[Connection], procs: list[multiprocessing.process.BaseProcess]) -> int:
    """Have the client processes close their sockets; returns how many were still open before."""
    for pipe in pipes:
        pipe.send("close")
    still_open = 0
    for pipe in pipes:
        if pipe.poll(60):
            still_open += pipe.recv()[1]
    for proc in procs:
        proc.join(60)
        if proc.is_alive():
            proc.kill()
    return still_open


# Gateways run from other checkouts (`--variant NAME=DIR`): kind "gateway-NAME" -> DIR.
VARIANTS: dict[str, Path] = {}


def measure(kind: str, n: int, settle: float, tmp: Path) -> Sample:
    gateway: GatewayProcess | None = None
    reference: refservers.Running | None = None
    try:
        if kind.startswith("gateway"):
            cwd = VARIANTS.get(kind, ROOT)
            gateway = start_gateway(tmp, {"CHATGW_LOG_LEVEL": "WARNING"}, cwd=cwd)
            target = Target(kind, gateway.port, gateway.process.pid)
        else:
            reference = refservers.start(kind)
            target = Target(kind, reference.ports[0], reference.pids[0])
        close_sockets(*open_sockets(target, WARMUP, []))
        time.sleep(1)
        before = rss_bytes(target.pid)
        sessions: list[int] = []
        started = time.monotonic()
        pipes, procs = open_sockets(target, n, sessions)
        print(
            f"  {kind}: {n} sockets open in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True
        )
        time.sleep(settle)
        after = rss_bytes(target.pid)
        still_open = close_sockets(pipes, procs)
        if still_open != n:
            raise RuntimeError(f"only {still_open} of {n} sockets were still open at the reading")
        return Sample(kind, n, before, sessions[0], after)
    finally:
        if gateway:
            gateway.stop()
        if reference:
            reference.stop()


# ---- summary ----------------------------------------------------------------------------------


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def summarise(kinds: list[str], sizes: list[int], samples: list[Sample]) -> None:
    print("\nKiB of server RSS per idle connected socket, (after - before) / N:\n")
    print("| server | " + " | ".join(f"{n:,} sockets" for n in sizes) + " |")
    print("| --- |" + " --- |" * len(sizes))
    for kind in kinds:
        cells = [
            spread([s.per_socket / 1024 for s in samples if s.kind == kind and s.sockets == n]) for n in sizes
        ]
        print(f"| {kind} | " + " | ".join(cells) + " |")
    for name in [k for k in kinds if k.startswith("gateway")]:
        _sessions_share(name, sizes, [s for s in samples if s.kind == name])


def _sessions_share(name: str, sizes: list[int], gateway: list[Sample]) -> None:
    if gateway:
        print(
            f"\n{name}, of which its widget session and conversation (before any socket opened), KiB per socket:\n"
        )
        print("| " + " | ".join(f"{n:,}" for n in sizes) + " |")
        print("|" + " --- |" * len(sizes))
        cells = [
            spread([(s.sessions - s.before) / s.sockets / 1024 for s in gateway if s.sockets == n])
            for n in sizes
        ]
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--servers", default=",".join(KINDS), help="comma-separated, from: " + ", ".join(KINDS)
    )
    parser.add_argument("--sockets", default="1000,5000,10000,19500", help="comma-separated socket counts")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--settle", type=float, default=3.0, help="seconds between the last socket and the reading"
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="also measure the gateway run from the checkout in DIR, as server gateway-NAME (repeatable)",
    )
    args = parser.parse_args()
    for name, _, path in (v.partition("=") for v in args.variant):
        VARIANTS[f"gateway-{name}"] = Path(path).resolve()
    # A terminated run still stops the servers and client processes it started (finally blocks).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    kinds = [k for k in args.servers.split(",") if k]
    kinds += [k for k in VARIANTS if k not in kinds]
    if unknown := [k for k in kinds if k not in KINDS and k not in VARIANTS]:
        parser.error(f"unknown server(s): {', '.join(unknown)}; known: {', '.join(KINDS)}")
    try:
        sizes = [int(n) for n in args.sockets.split(",")]
    except ValueError:
        parser.error("--sockets takes comma-separated whole numbers")
    if any(n < 1 for n in sizes) or args.runs < 1:
        parser.error("--sockets and --runs must be at least 1")
    limit = raise_file_limit()
    if max(sizes) + 100 > limit:
        parser.error(f"{max(sizes)} sockets do not fit the open-file limit of {limit} (server side)")
    samples: list[Sample] = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(1, args.runs + 1):
            for n in sizes:
                for kind in kinds:
                    try:
                        sample = measure(kind, n, args.settle, Path(tmp))
                    except (RuntimeError, OSError) as exc:  # a process stopped from outside, say
                        print(f"run {run} {kind} {n} failed ({exc}); trying once more", flush=True)
                        sample = measure(kind, n, args.settle, Path(tmp))
                    samples.append(sample)
                    print(
                        f"run {run} {kind:<10} {n:>6} sockets: before {sample.before / 2**20:7.1f} MiB, "
                        f"after {sample.after / 2**20:7.1f} MiB, {sample.per_socket / 1024:6.1f} KiB/socket"
                        f" (sessions {(sample.sessions - sample.before) / n / 1024:.1f})",
                        flush=True,
                    )
    summarise(kinds, sizes, samples)


if __name__ == "__main__":
    main()
