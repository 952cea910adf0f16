"""Overload: many conversations on one instance on PostgreSQL + Redis, gateway versions side by side.

For each run, each level (a number of conversations) and each variant (a gateway source tree and
its extra environment), it starts `chatgw model-server` and fresh gateway processes on PostgreSQL
(one database for the whole invocation, migrated) and Redis (a key prefix of the invocation's
own, deleted at the end), answering through the model server, runs `chatgw loadtest` against them
(this checkout's load tool for every variant), then reads each gateway's `/metrics` and counts the
warnings and errors in its log, by message. Variants alternate within each level and levels within
each run, so all see the same state of a shared machine. The load average is recorded at the start
and at the end of every step.

    .venv/bin/python bench/overload.py --levels 300,600,1000 --runs 2 \
        --variant "before@/path/to/old/tree" --variant "after" --out bench/results/overload

A variant is `NAME[@TREE][=VAR=VALUE,VAR=VALUE...]`: TREE (default: this checkout) is the directory
the gateway runs from (`python -m gateway serve` with that directory first on the path).

The workload: the model at 200 ms to the first token, then 20 tokens/s, 40-token answers; a
message every 3 s per conversation; one user and one watcher socket per conversation (the watcher
on the second instance with `--instances 2`); 30 s of sending, then the drain.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.loadtest_support import model_env, run_loadtest, start_model_server  # noqa: E402
from tests.servers import GatewayProcess, start_gateway  # noqa: E402

# Metric families kept from each gateway's /metrics (histogram buckets are left out).
_KEPT = re.compile(
    r"^(chatgw_errors_total|chatgw_answers_total|chatgw_messages_processed_total|chatgw_db_pool_\w+"
    r"|chatgw_redis_\w+|chatgw_answers_active\w*|chatgw_answer_lease\w*|chatgw_answers_refused\w*"
    r"|process_cpu_seconds_total)(\{[^}]*\})? (\S+)$"
)


def parse_variant(text: str) -> tuple[str, Path, dict[str, str]]:
    head, _, env_text = text.partition("=")
    name, _, tree = head.partition("@")
    env = dict(pair.split("=", 1) for pair in env_text.split(",") if pair)
    return name, Path(tree) if tree else ROOT, env


def scrape(gateway: GatewayProcess) -> dict[str, float]:
    try:
        text = httpx.get(f"{gateway.http}/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    kept = {}
    for line in text.splitlines():
        match = _KEPT.match(line)
        if match:
            kept[match[1] + (match[2] or "")] = float(match[3])
    return kept


def log_counts(gateway: GatewayProcess) -> dict[str, int]:
    """Warnings and errors in the gateway's JSON log, by level and message (numbers masked)."""
    counts: Counter[str] = Counter()
    for line in gateway.log().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        level = str(record.get("level", "")).upper()
        if level in ("WARNING", "ERROR", "CRITICAL") or record.get("exc"):
            message = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}|\d+", "#", str(record.get("msg", "")))[:120]
            counts[f"{level}: {message}"] += 1
    return dict(counts)


def backend_env(prefix: str) -> dict[str, str]:
    from tests.databases import migrated_database, redis_url, sync

    return {
        "DATABASE_URL": sync(migrated_database()),
        "REDIS_URL": redis_url(),
        "CHATGW_REDIS_PREFIX": prefix,
    }


def one_run(
    args: argparse.Namespace, conversations: int, tree: Path, env: dict[str, str], tmp: Path
) -> dict[str, Any]:
    model = start_model_server(
        tmp,
        *("--ttft-ms", str(args.ttft_ms), "--tokens-per-second", str(args.tps), "--tokens", str(args.tokens)),
    )
    gateways: list[GatewayProcess] = []
    try:
        for _ in range(args.instances):
            gateways.append(
                start_gateway(tmp, {**model_env(model), "CHATGW_LOG_LEVEL": "WARNING", **env}, cwd=tree)
            )
        load_start = os.getloadavg()
        urls = [x for g in gateways for x in ("--url", g.http)]
        run = run_loadtest(
            tmp,
            *urls,
            *("--model-server", model.url, "--quiet"),
            *("--conversations", str(conversations), "--watchers-per-conversation", "1"),
            *("--message-interval", str(args.interval), "--duration", str(args.duration)),
            *("--processes", str(args.processes), "--drain-timeout", str(args.drain_timeout)),
            timeout=args.duration + args.drain_timeout + conversations / 10 + 300,
        )
        load_end = os.getloadavg()
        metrics = [scrape(g) for g in gateways]
        logs = [log_counts(g) for g in gateways]
        if args.logs:
            args.logs.mkdir(parents=True, exist_ok=True)
            for i, g in enumerate(gateways):
                name = f"{time.strftime('%H%M%S', time.gmtime())}-c{conversations}-{tree.name}-gw{i}.log"
                (args.logs / name).write_text(g.log())
    finally:
        for g in gateways:
            g.stop()
        model.stop()
    if not run.report:
        raise RuntimeError(f"the load tool failed ({run.status}):\n{run.stderr[-4000:]}")
    report = run.report
    report["bench"] = {
        "tree": str(tree),
        "env": env,
        "instances": args.instances,
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "status": run.status,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "gateway_cores": report["gateway_cpu"]["cpu_seconds"] / report["window_s"]
        if report["gateway_cpu"]["cpu_seconds"] is not None
        else None,
        "metrics": metrics,
        "log": logs,
    }
    return report


def pick(report: dict[str, Any], path: str) -> float | None:
    value: Any = report
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return None if value is None else float(value)


def summary(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    digits = 2 if max(known) < 10 else 1 if max(known) < 100 else 0
    if len(known) == 1:
        return f"{known[0]:.{digits}f}"
    return f"{statistics.median(known):.{digits}f} ({min(known):.{digits}f}-{max(known):.{digits}f})"


COLUMNS: list[tuple[str, str]] = [
    ("messages sent", "messages.sent"),
    ("messages acked", "messages.acked"),
    ("messages unacked at the end", "messages.unacked"),
    ("refusals (error frames naming a message)", "messages.refusals"),
    ("answers started", "answers.started"),
    ("answers unfinished", "answers.unfinished"),
    ("answers failed", "answers.by_status.failed"),
    ("answers interrupted", "answers.by_status.interrupted"),
    ("token lag p50 (ms)", "latency_ms.token_lag.p50"),
    ("token lag p99 (ms)", "latency_ms.token_lag.p99"),
    ("ack p50 (ms)", "latency_ms.ack.p50"),
    ("ack p99 (ms)", "latency_ms.ack.p99"),
    ("TTFT total p50 (ms)", "latency_ms.ttft_total.p50"),
    ("tokens per delta frame", "bench.tokens_per_frame"),
    ("gateway CPU (cores)", "bench.gateway_cores"),
    ("load avg at start (1 min)", "bench.loadavg_start.0"),
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--levels", default="300,600,1000")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--variant", action="append", default=[], help="NAME[@TREE][=VAR=V,VAR=V]")
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--drain-timeout", type=float, default=60.0)
    parser.add_argument("--interval", type=float, default=3.0)
    parser.add_argument("--ttft-ms", type=float, default=200.0)
    parser.add_argument("--tps", type=float, default=20.0)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--out", type=Path, help="directory for the raw JSON reports")
    parser.add_argument("--logs", type=Path, help="directory to keep the gateways' logs in")
    args = parser.parse_args()
    variants = [parse_variant(v) for v in args.variant or ["after"]]
    levels = [int(n) for n in args.levels.split(",")]
    prefix = f"chatgw-overload-{uuid.uuid4().hex[:8]}:"
    env = backend_env(prefix)
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for run in range(1, args.runs + 1):
                for n in levels:
                    for name, tree, extra in variants:
                        report = one_run(args, n, tree, {**env, **extra}, Path(tmp))
                        deltas = report["deltas"]
                        report["bench"]["tokens_per_frame"] = (
                            deltas["tokens"] / deltas["frames"] if deltas["frames"] else None
                        )
                        report["messages"]["refusals"] = report["messages"].get(
                            "refusals", report["messages"]["refused"]
                        )
                        results.setdefault((name, n), []).append(report)
                        lag = report["latency_ms"]["token_lag"]
                        print(
                            f"run {run} level {n} {name}: exit {report['bench']['status']}, "
                            f"errors {report['errors']}, status {report['answers']['by_status']}, "
                            f"unacked {report['messages']['unacked']}, lag p50 {lag['p50']} p99 {lag['p99']} ms, "
                            f"load {report['bench']['loadavg_start'][0]:.1f}",
                            flush=True,
                        )
                        if args.out:
                            args.out.mkdir(parents=True, exist_ok=True)
                            path = args.out / f"{stamp}-{name}-c{n}-run{run}.json"
                            path.write_text(json.dumps(report, indent=1))
    finally:
        from tests.databases import delete_redis_keys

        delete_redis_keys(prefix)
    names = [name for name, _, _ in variants]
    for n in levels:
        print(f"\n{n} conversations")
        print("| metric | " + " | ".join(names) + " |")
        print("| --- |" + " --- |" * len(names))
        for label, path in COLUMNS:
            cells = []
            for name in names:
                reports = results.get((name, n), [])
                if path == "bench.loadavg_start.0":
                    cells.append(summary([r["bench"]["loadavg_start"][0] for r in reports]))
                else:
                    cells.append(summary([pick(r, path) for r in reports]))
            print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
