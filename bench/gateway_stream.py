"""CPU the gateway process spends per streamed model piece, with an OpenAI-compatible model.

It starts bench/fake_openai.py (a fast local provider, its own process) and one real gateway
(`python -m gateway serve` with OPENAI_API_KEY and OPENAI_BASE_URL pointing at it), then keeps
`--streams` answers streaming at once for `--seconds`: each client opens a widget session, sends
one message and reads to `ai_end`, again and again (a new conversation each time, so every turn is
the demo flow's first stage: one streamed answer, no other model call). Over the measured window
it reads the gateway's CPU time (user + system, from /proc) and its `chatgw_llm_pieces_relayed_total`
counter, and counts the `delta` frames the clients got.

`--variant NAME=ARGS` (repeatable) names gateway variants run alternately within each run, for
example `--variant asyncio="--loop asyncio" --variant uvloop="--loop uvloop"`; `ARGS` are extra
arguments of `chatgw serve`, and `NAME@DIR=ARGS` runs the gateway from another checkout `DIR`
(for comparing commits). `--profile FILE` records the gateway of the first run with py-spy
(speedscope format).

    .venv/bin/python bench/gateway_stream.py --runs 3 --variant asyncio="--loop asyncio" --variant uvloop="--loop uvloop"
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from fake_openai import start_fake  # noqa: E402

from tests.e2e.client import Client, new_widget  # noqa: E402
from tests.servers import DEMO_API_KEY, TEST_SECRET, GatewayProcess, free_port  # noqa: E402

_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    root: Path
    args: tuple[str, ...]


def parse_variant(text: str) -> Variant:
    name, _, args = text.partition("=")
    name, _, root = name.partition("@")
    return Variant(name, Path(root).resolve() if root else ROOT, tuple(shlex.split(args)))


def cpu_seconds(pid: int) -> float:
    """User + system CPU of one process (and of its children that it waited for)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _CLK_TCK


def pieces_relayed(gw: GatewayProcess) -> float:
    text = httpx.get(f"{gw.http}/metrics", timeout=10).text
    match = re.search(r"^chatgw_llm_pieces_relayed_total (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def start_gateway(variant: Variant, tmp: Path, base_url: str, streams: int) -> GatewayProcess:
    port = free_port()
    scrubbed = ("DATABASE_URL", "REDIS_URL", "PORT", "CHATGW_LLM_CONCURRENCY")
    env = {k: v for k, v in os.environ.items() if k not in scrubbed}
    env.update(
        {
            "CHATGW_SECRET": TEST_SECRET,
            "CHATGW_DEMO_API_KEY": DEMO_API_KEY,
            "OPENAI_API_KEY": "bench-key",
            "OPENAI_BASE_URL": base_url,
            "LLM_MODEL": "bench-model",
            "CHATGW_LLM_CONCURRENCY": str(max(streams, 1)),
            "CHATGW_LLM_REQUESTS_PER_MINUTE": "1000000",
            # Every stream comes from this machine, all to one business (docs/limits.md).
            "CHATGW_LIMIT_EXEMPT_IPS": "127.0.0.1,::1",
            "CHATGW_LIMIT_BUSINESS_ANSWERS": "off",
            "CHATGW_LOG_LEVEL": "WARNING",
            "CHATGW_MAX_ACTIVE_ANSWERS": "0",  # capacity is measured here: no overload limit
            "PYTHONUNBUFFERED": "1",
        }
    )
    log_path = tmp / f"gateway-{variant.name}-{port}.log"
    command = [sys.executable, "-m", "gateway", "serve", "--port", str(port), *variant.args]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command, cwd=variant.root, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    gw = GatewayProcess(port, process, log_path, env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gateway exited with {process.returncode}:\n{gw.log()}")
        try:
            if httpx.get(f"{gw.http}/healthz", timeout=1).status_code == 200:
                return gw
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    gw.stop()
    raise RuntimeError(f"gateway did not become healthy:\n{gw.log()}")


def start_profiler(pid: int, seconds: float, output: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling `pid` for `seconds` into a speedscope file (see bench/profile_summary.py
    for reading it, and why to profile with `--loop asyncio`)."""
    command = [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid)]
    command += ["--duration", str(int(seconds)), "--rate", "200", "--format", "speedscope"]
    return subprocess.Popen([*command, "--output", str(output)], stdout=subprocess.DEVNULL)


class Load:
    """Clients that keep answers streaming until `stop` is set, counting the deltas they get."""

    def __init__(self, gw: GatewayProcess) -> None:
        self.gw = gw
        self.deltas = 0
        self.turns = 0
        self.failed = 0
        self.stop = asyncio.Event()

    async def client(self) -> None:
        while not self.stop.is_set():
            widget = await asyncio.to_thread(new_widget, self.gw)
            client = await Client.open(self.gw)
            try:
                await client.hello(widget)
                await client.send({"type": "message", "client_msg_id": "m-1", "text": "Hello there"})
                while True:
                    frame = await client.recv(timeout=60)
                    if frame["type"] == "delta":
                        self.deltas += 1
                    elif frame["type"] == "ai_end":
                        self.turns += 1
                        self.failed += frame["status"] != "complete"
                        break
                client.frames.clear()
            finally:
                await client.close()


async def measure(gw: GatewayProcess, args: argparse.Namespace, profile: Path | None) -> dict[str, float]:
    load = Load(gw)
    clients = [asyncio.create_task(load.client()) for _ in range(args.streams)]
    await asyncio.sleep(args.warmup)
    spy = None if profile is None else start_profiler(gw.process.pid, args.seconds, profile)
    cpu0, pieces0, deltas0, wall0 = (
        cpu_seconds(gw.process.pid),
        await asyncio.to_thread(pieces_relayed, gw),
        load.deltas,
        time.perf_counter(),
    )
    await asyncio.sleep(args.seconds)
    cpu1, pieces1, deltas1, wall1 = (
        cpu_seconds(gw.process.pid),
        await asyncio.to_thread(pieces_relayed, gw),
        load.deltas,
        time.perf_counter(),
    )
    load.stop.set()
    await asyncio.gather(*clients, return_exceptions=True)
    if spy is not None:
        spy.wait(60)
    cpu, pieces, deltas, wall = cpu1 - cpu0, pieces1 - pieces0, deltas1 - deltas0, wall1 - wall0
    return {
        "cpu s per 1000 pieces": 1000 * cpu / max(pieces, 1),
        "cpu us per delta frame": 1e6 * cpu / max(deltas, 1),
        "pieces/s": pieces / wall,
        "delta frames/s": deltas / wall,
        "gateway cpu %": 100 * cpu / wall,
        "failed turns": float(load.failed),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=50, help="answers streaming at once")
    parser.add_argument("--pieces", type=int, default=200, help="pieces per answer")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="provider's pause before each piece")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured window per run")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--variant", action="append", type=parse_variant, default=[])
    parser.add_argument("--profile", type=Path, default=None, help="py-spy speedscope file (first run)")
    args = parser.parse_args()
    variants: list[Variant] = args.variant or [Variant("default", ROOT, ())]
    fake, base_url = start_fake(args.pieces, args.delay_ms)
    results: dict[str, list[dict[str, float]]] = {v.name: [] for v in variants}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for run in range(args.runs):
                for variant in variants:
                    gw = start_gateway(variant, Path(tmp), base_url, args.streams)
                    try:
                        profile = args.profile if run == 0 else None
                        if profile is not None and len(variants) > 1:
                            profile = profile.with_name(f"{profile.stem}-{variant.name}{profile.suffix}")
                        result = await measure(gw, args, profile)
                    finally:
                        gw.stop()
                    results[variant.name].append(result)
                    print(
                        f"run {run + 1} {variant.name}: "
                        + ", ".join(f"{k} {v:.3g}" for k, v in result.items())
                    )
    finally:
        fake.terminate()
        fake.wait(10)
    print(
        f"\n{args.streams} answers at once, {args.pieces} pieces each, {args.delay_ms} ms apart, "
        f"{args.seconds} s measured, {args.runs} runs: median (min-max)"
    )
    print(f"{'metric':<26}" + "".join(f"{name:>26}" for name in results))
    for key in next(iter(results.values()))[0]:
        cells = []
        for runs in results.values():
            values = [r[key] for r in runs]
            cells.append(f"{statistics.median(values):.3g} ({min(values):.3g}-{max(values):.3g})")
        print(f"{key:<26}" + "".join(f"{c:>26}" for c in cells))


if __name__ == "__main__":
    asyncio.run(main())
