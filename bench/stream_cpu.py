"""CPU per streamed piece inside the process that reads the model: `OpenAILLM` of this checkout
(on the client's aiohttp transport, its default, and on the client's default httpx2 transport)
against the one of an older commit, on asyncio and on uvloop, side by side in one run.

It starts bench/fake_openai.py (its own process, so its CPU is not counted) and, for each
combination in turn, runs `--streams` answers at once through `OpenAILLM.stream()` until
`--answers` answers were read to their end, measuring this process's CPU time (user + system,
`time.process_time()`) and the pieces read. The old implementation is `core/llm_service.py` as it
was at `--old-rev` (the SDK's `ChatCompletionChunk` per event, httpx2 transport), taken from git
and imported next to the current one (both share the rest of `core`).

    .venv/bin/python bench/stream_cpu.py --runs 5
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from fake_openai import start_fake  # noqa: E402

from core.llm import ChatMessage  # noqa: E402

PROMPT = [ChatMessage("system", "You are terse."), ChatMessage("user", "Tell me a long story")]
OLD_REV = "7b9fff5"  # the last commit whose OpenAILLM read the stream through the SDK's chunk objects


def load_old(rev: str, tmp: Path) -> ModuleType:
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:core/llm_service.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = tmp / "llm_service_old.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("llm_service_old", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


Impl = tuple[ModuleType, dict[str, Any]]


async def read_answers(impl: Impl, base_url: str, streams: int, answers: int) -> tuple[int, int]:
    module, options = impl
    llm = module.OpenAILLM(
        api_key="bench-key",
        base_url=base_url,
        model="bench-model",
        max_concurrency_per_business=streams,
        requests_per_minute_per_business=1_000_000,
        **options,
    )
    await llm.connect()
    remaining = answers
    pieces = 0

    async def worker() -> None:
        nonlocal remaining, pieces
        while remaining > 0:
            remaining -= 1
            stream = await llm.stream(PROMPT, business_id="bench")
            async for _ in stream:
                pieces += 1

    try:
        await asyncio.gather(*(worker() for _ in range(streams)))
    finally:
        await llm.close()
    return pieces, answers


def loop_factories() -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop}
    try:
        import uvloop

        factories["uvloop"] = uvloop.new_event_loop
    except ImportError:
        print("uvloop is not installed: asyncio only")
    return factories


def measure(impl: Impl, factory: Callable[[], asyncio.AbstractEventLoop], args: Any, url: str) -> float:
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(read_answers(impl, url, args.streams, max(args.streams, 10)))  # warm up
        cpu0 = time.process_time()
        pieces, _ = runner.run(read_answers(impl, url, args.streams, args.answers))
        cpu = time.process_time() - cpu0
    return 1000 * cpu / pieces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=50, help="answers read at once")
    parser.add_argument("--answers", type=int, default=200, help="answers per measurement")
    parser.add_argument("--pieces", type=int, default=200, help="pieces per answer")
    parser.add_argument("--delay-ms", type=float, default=10.0, help="provider's pause before each piece")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--old-rev", default=OLD_REV, help="commit of the old implementation")
    args = parser.parse_args()
    import core.llm_service as new

    fake, url = start_fake(args.pieces, args.delay_ms)
    results: dict[str, list[float]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            old = load_old(args.old_rev, Path(tmp))
            impls: dict[str, Impl] = {
                f"old {args.old_rev}": (old, {}),
                "new, httpx2": (new, {"transport": "httpx2"}),
                "new, aiohttp": (new, {"transport": "aiohttp"}),
            }
            for run in range(args.runs):
                for loop_name, factory in loop_factories().items():
                    for impl_name, impl in impls.items():
                        name = f"{impl_name}, {loop_name}"
                        value = measure(impl, factory, args, url)
                        results.setdefault(name, []).append(value)
                        print(f"run {run + 1} {name}: {value:.3f} CPU s per 1000 pieces", flush=True)
    finally:
        fake.terminate()
        fake.wait(10)
    print(
        f"\n{args.streams} answers at once, {args.answers} answers of {args.pieces} pieces "
        f"{args.delay_ms} ms apart per measurement, {args.runs} runs"
    )
    print(f"{'implementation, transport, loop':<34}{'CPU s per 1000 pieces: median (min-max)':>44}")
    for name, values in results.items():
        cell = f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"
        print(f"{name:<34}{cell:>44}")


if __name__ == "__main__":
    main()
