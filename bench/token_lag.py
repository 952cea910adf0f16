"""Per-token lag and the gateway's CPU per delivered delta, at rising numbers of conversations.

For each run and each level (a number of concurrent conversations) it starts `chatgw model-server`
and a fresh gateway process (the embedded default unless `--backend postgres+redis`), answering
through the model server, and runs `chatgw loadtest` against it; it keeps each JSON report. The
levels are interleaved within each run (run 1: every level, then run 2: every level, ...) so that
all levels see the same state of a shared machine. It prints, per level, the median of the runs
with the lowest and highest in brackets.

    .venv/bin/python bench/token_lag.py --levels 10,20,40,80 --runs 3
    .venv/bin/python bench/token_lag.py --levels 40 --runs 3 --backend postgres+redis
    .venv/bin/python bench/token_lag.py --levels 50,100 --backend postgres+redis --instances 2
    .venv/bin/python bench/token_lag.py --levels 10,100 --variant before=/path/to/old/checkout --variant after=.

With `--variant NAME=DIR` (repeatable) the gateway runs from the checkout in DIR (the model server
and the load tool always from this one), and the variants alternate within each level of each
run, so that old and new see the same state of the machine; `--variant-env NAME:KEY=VALUE` sets a
setting for one variant's gateways (two variants may share a DIR and differ by settings alone). `--flow plain` replaces the demo
business's flow (before the load starts, over the admin API) with its greeting stage alone: no
transition, no extraction, so no model call and no condition before the streamed answer.
On PostgreSQL + Redis the gateways of the whole invocation share one migrated database and a
Redis key prefix of its own, deleted at the end. With `--instances 2` (PostgreSQL + Redis only)
two gateway processes share the database and Redis and the load tool gets both URLs: conversations alternate between them and each watcher connects
to the other instance, so every delta crosses Redis to reach it; the CPU is both processes'. With `--gc` the gateways run under `bench/gc_pauses.py`, and each
report gets the count, total and longest pause of each generation's garbage collections
(`bench.gc`; summed over the instances, longest of any). With `--profile SECONDS` each gateway
runs with `--loop asyncio` and py-spy records it (raw format, 200 samples a second, from 10 s
into the load) into `--out`, for `profile_groups.py` and `profile_raw.py`.

The default workload: a model at 200 ms to the first token, then 20 tokens/s, 40-token answers; a
message every 3 s per conversation; one user and one watcher socket per conversation; 30 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.loadtest_support import model_env, run_loadtest, start_model_server  # noqa: E402
from tests.servers import start_gateway  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from gc_pauses import summarize  # noqa: E402

COLUMNS: list[tuple[str, str]] = [
    ("delta frames/s", "deltas.frames_per_s"),
    ("tokens/s", "deltas.tokens_per_s"),
    ("token lag p50 ms", "latency_ms.token_lag.p50"),
    ("token lag p99 ms", "latency_ms.token_lag.p99"),
    ("token lag max ms", "latency_ms.token_lag.max"),
    ("TTFT added p50 ms", "latency_ms.ttft_added.p50"),
    ("TTFT added p99 ms", "latency_ms.ttft_added.p99"),
    ("TTFT total p50 ms", "latency_ms.ttft_total.p50"),
    ("TTFT total - model TTFT, p50 ms", "bench.ttft_beyond_model_p50"),
    ("TTFT total - model TTFT, p99 ms", "bench.ttft_beyond_model_p99"),
    ("ack p99 ms", "latency_ms.ack.p99"),
    ("gateway CPU s", "gateway_cpu.cpu_seconds"),
    ("gateway CPU, cores", "bench.gateway_cores"),
    ("gateway CPU µs/delta frame", "gateway_cpu.us_per_delta_frame"),
    ("gateway CPU µs/model token", "bench.us_per_model_token"),
    ("client CPU, % of a core", "bench.client_percent"),
    ("load avg (1 min) at start", "bench.loadavg"),
    ("load avg (1 min) at end", "bench.loadavg_end"),
    ("unfinished answers", "answers.unfinished"),
    ("full GCs (gen 2)", "bench.gc.gen2.collections"),
    ("longest full GC ms", "bench.gc.gen2.max_ms"),
    ("full GC ms in all", "bench.gc.gen2.total_ms"),
    ("young GCs (gen 0+1) ms in all", "bench.gc_young_ms"),
]


def pick(report: dict[str, Any], path: str) -> float | None:
    value: Any = report
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return None if value is None else float(value)


def backend_env(name: str, prefix: str) -> dict[str, str]:
    """The gateways' backend: nothing for memory; else one migrated database for the invocation and
    Redis under `prefix` (deleted at the end, see `main`)."""
    if name == "memory":
        return {}
    from tests.databases import migrated_database, redis_url, sync

    return {
        "DATABASE_URL": sync(migrated_database()),
        "REDIS_URL": redis_url(),
        "CHATGW_REDIS_PREFIX": prefix,
    }


ADMIN_KEY = "bench-admin-key-0123456789abcdef"


def plain_flow(url: str) -> None:
    """Make the demo business's flow its entry stage alone (see the module docstring)."""
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    flow = httpx.get(f"{url}/v1/admin/flow", headers=headers, timeout=10).json()
    entry = next(stage for stage in flow["stages"] if stage["is_entry"])
    body = {
        "version": flow["version"],
        "stages": [entry],
        "transitions": [],
        "templates": [t for t in flow["templates"] if t["name"] == entry["response_template"]],
        "rules": [],
    }
    httpx.put(f"{url}/v1/admin/flow", headers=headers, json=body, timeout=10).raise_for_status()


def one_run(
    args: argparse.Namespace,
    conversations: int,
    env: dict[str, str],
    tmp: Path,
    cwd: Path = ROOT,
    extra_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    model = start_model_server(
        tmp,
        *("--ttft-ms", str(args.ttft_ms), "--tokens-per-second", str(args.tps), "--tokens", str(args.tokens)),
    )
    gateways = []
    gc_logs: list[Path] = []
    try:
        # Capacity is measured here: no overload limit (CHATGW_MAX_ACTIVE_ANSWERS=0).
        for number in range(args.instances):
            timed: dict[str, str] = {}
            if args.gc:
                gc_logs.append(tmp / f"gc-{os.getpid()}-{time.monotonic_ns()}-{number}.log")
                timed = {
                    "CHATGW_BENCH_GC_LOG": str(gc_logs[-1]),
                    "PYTHONPATH": os.pathsep.join([str(ROOT / "bench"), str(cwd)]),
                }
            gateways.append(
                start_gateway(
                    tmp,
                    {
                        **env,
                        **model_env(model),
                        "CHATGW_LOG_LEVEL": "WARNING",
                        "CHATGW_DEMO_API_KEY": ADMIN_KEY,
                        "CHATGW_MAX_ACTIVE_ANSWERS": "0",
                        **(extra_env or {}),
                        **timed,
                    },
                    module="gc_pauses" if args.gc else "gateway",
                    cwd=cwd,
                    args=("--loop", "asyncio") if args.profile else (),
                )
            )
        if args.flow == "plain":
            plain_flow(gateways[0].http)  # the flow is shared through the database
        profilers = [
            profile(args, gateway.process.pid, n, conversations) for n, gateway in enumerate(gateways)
        ]
        load = os.getloadavg()[0]
        began = time.time()
        urls = [arg for gateway in gateways for arg in ("--url", gateway.http)]
        run = run_loadtest(
            tmp,
            *urls,
            *("--model-server", model.url, "--quiet"),
            *("--conversations", str(conversations), "--watchers-per-conversation", str(args.watchers)),
            *("--message-interval", str(args.interval), "--duration", str(args.duration)),
            *("--processes", str(args.processes)),
            timeout=args.duration + 300,
        )
        ended = time.time()
        for profiler in profilers:
            if profiler is not None:
                profiler.wait(timeout=60)
    finally:
        for gateway in gateways:
            gateway.stop()
        model.stop()
    if not run.report:
        raise RuntimeError(f"the load tool failed ({run.status}):\n{run.stderr}")
    report = run.report
    cpu, tokens = report["gateway_cpu"]["cpu_seconds"], report["deltas"]["tokens_user"]
    ttft_total = report["latency_ms"]["ttft_total"]
    report["bench"] = {
        "loadavg": load,
        "loadavg_end": os.getloadavg()[0],
        # Time to first token beyond the model's own (its configured TTFT): everything the gateway
        # did from the message's arrival to the first delta's, model call before it included.
        "ttft_beyond_model_p50": ttft_total["p50"] - args.ttft_ms if ttft_total["p50"] is not None else None,
        "ttft_beyond_model_p99": ttft_total["p99"] - args.ttft_ms if ttft_total["p99"] is not None else None,
        "status": run.status,
        "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        # Each model token reaches every socket of its conversation once: per model token is the
        # gateway's cost of relaying it to all of them, plus its share of the per-message work.
        "us_per_model_token": cpu * 1e6 / tokens if cpu is not None and tokens else None,
        "gateway_cores": cpu / report["window_s"] if cpu is not None else None,
        "client_percent": 100 * (report["client"]["busiest_process_load"] or 0),
    }
    if args.gc:
        # Start-up's collections (the gateway's own `gc.collect()` once it serves) left out.
        collections = summarize(gc_logs, began, ended)
        report["bench"]["gc"] = collections
        report["bench"]["gc_young_ms"] = round(
            sum(collections.get(g, {}).get("total_ms", 0.0) for g in ("gen0", "gen1")), 3
        )
    return report


def profile(
    args: argparse.Namespace, pid: int, number: int, conversations: int
) -> subprocess.Popen[bytes] | None:
    """With `--profile SECONDS`: py-spy on gateway `number`, from 10 s into the load (the sockets
    open and answers stream by then) for SECONDS, in raw format, into `--out`."""
    if not args.profile:
        return None
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        raise SystemExit("--profile needs py-spy (.venv/bin/pip install py-spy)")
    args.out.mkdir(parents=True, exist_ok=True)
    output = args.out / f"profile-level{conversations}-instance{number}-{time.strftime('%H%M%S')}.raw"
    record = [spy, "record", "--pid", str(pid), "--duration", str(args.profile), "--rate", "200"]
    record += ["--format", "raw", "--nonblocking", "--output", str(output)]
    return subprocess.Popen(
        ["sh", "-c", 'sleep 10 && exec "$@"', "sh", *record],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def summary(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    digits = 2 if max(known) < 10 else 1 if max(known) < 100 else 0
    return f"{statistics.median(known):.{digits}f} ({min(known):.{digits}f}-{max(known):.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--levels", default="10,20,40,80", help="numbers of conversations, comma-separated")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=3.0, help="seconds between a user's messages")
    parser.add_argument("--watchers", type=int, default=1, help="watcher sockets per conversation")
    parser.add_argument("--ttft-ms", type=float, default=200.0)
    parser.add_argument("--tps", type=float, default=20.0, help="model tokens per second")
    parser.add_argument("--tokens", type=int, default=40, help="tokens per answer")
    parser.add_argument("--processes", type=int, default=1, help="load tool client processes")
    parser.add_argument("--backend", choices=["memory", "postgres+redis"], default="memory")
    parser.add_argument("--out", type=Path, help="directory for the raw JSON reports")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="run the gateway from the checkout in DIR (repeatable; default: this checkout)",
    )
    parser.add_argument(
        "--variant-env",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE",
        help="set KEY=VALUE in the gateways' environment for variant NAME (repeatable)",
    )
    parser.add_argument("--flow", choices=["demo", "plain"], default="demo", help="the demo business's flow")
    parser.add_argument("--gc", action="store_true", help="time the gateways' garbage collections")
    parser.add_argument(
        "--instances", type=int, default=1, help="gateway processes (more than 1: postgres+redis only)"
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="SECONDS",
        help="py-spy each gateway (run with --loop asyncio) for SECONDS from 10 s into the load, into --out",
    )
    args = parser.parse_args()
    if args.profile and not args.out:
        parser.error("--profile needs --out for the profiles")
    if args.instances < 1 or (args.instances > 1 and args.backend != "postgres+redis"):
        parser.error("--instances above 1 needs --backend postgres+redis")
    levels = [int(n) for n in args.levels.split(",")]
    variants = [(name, Path(path).resolve()) for name, _, path in (v.partition("=") for v in args.variant)]
    variants = variants or [("", ROOT)]
    extra: dict[str, dict[str, str]] = {name: {} for name, _ in variants}
    for spec in args.variant_env:
        name, _, setting = spec.partition(":")
        key, _, value = setting.partition("=")
        if name not in extra or not key:
            parser.error(f"--variant-env {spec}: expected NAME:KEY=VALUE for a variant's NAME")
        extra[name][key] = value
    prefix = f"chatgw-bench-{uuid.uuid4().hex[:8]}:"
    env = backend_env(args.backend, prefix)
    cells = [(n, name) for n in levels for name, _ in variants]
    results: dict[tuple[int, str], list[dict[str, Any]]] = {cell: [] for cell in cells}
    try:
        measure_all(args, levels, variants, extra, env, results)
    finally:
        if env:  # the conversations' logs would stay in Redis for a day (CHATGW_STREAM_TTL_S)
            from tests.databases import delete_redis_keys

            delete_redis_keys(prefix)
    print()
    heads = [f"{n} conversations" + (f", {name}" if name else "") for n, name in cells]
    print("| metric | " + " | ".join(heads) + " |")
    print("| --- |" + " --- |" * len(cells))
    for label, path in COLUMNS:
        print(
            f"| {label} | " + " | ".join(summary([pick(r, path) for r in results[c]]) for c in cells) + " |"
        )


def measure_all(
    args: argparse.Namespace,
    levels: list[int],
    variants: list[tuple[str, Path]],
    extra: dict[str, dict[str, str]],
    env: dict[str, str],
    results: dict[tuple[int, str], list[dict[str, Any]]],
) -> None:
    """Every run, level and variant, interleaved (see the module docstring), into `results`."""
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(1, args.runs + 1):
            for n in levels:
                for name, cwd in variants:
                    report = one_run(args, n, env, Path(tmp), cwd, extra[name])
                    results[(n, name)].append(report)
                    lag = report["latency_ms"]["token_lag"]
                    print(
                        f"run {run} level {n} {name}: token lag p50 {lag['p50']} p99 {lag['p99']} ms, "
                        f"{report['gateway_cpu']['us_per_delta_frame']} µs/delta, "
                        f"load avg {report['bench']['loadavg']:.1f}, exit {report['bench']['status']}",
                        flush=True,
                    )
                    if args.out:
                        args.out.mkdir(parents=True, exist_ok=True)
                        tag = f"-{name}" if name else ""
                        (args.out / f"level{n}{tag}-run{run}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
