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
        "tree": "this checkout" if tree == ROOT else tree.name,
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
    if all(float(v).is_integer() for v in known):
        digits = 0
    if len(known) == 1:
        return f"{known[0]:.{digits}f}"
    return f"{statistics.median(known):.{digits}f} ({min(known):.{digits}f}-{max(known):.{digits}f})"


def metric(report: dict[str, Any], name: str) -> float:
    """A gateway metric summed over the run's gateways (0 when absent)."""
    return sum(m.get(name, 0.0) for m in report["bench"]["metrics"])


def derived(report: dict[str, Any]) -> dict[str, float | None]:
    r, m = report, report["messages"]
    errors = r["errors"]
    pool_waits = metric(r, "chatgw_db_pool_waits")
    return {
        "sockets opened": r["connections"]["sockets_opened"],
        "sockets that failed to open (session or hello timeout)": r["connections"]["sockets_failed"]
        + r["connections"]["sessions_failed"] * 2,
        "sockets closed by the server (1011: keepalive)": r["connections"]["closed_by_server"],
        "sessions and hellos refused, overloaded, then tried again (503, unavailable)": r["connections"].get(
            "retried"
        ),
        "messages sent (on the wire at least once)": m["sent"],
        "of them held first, while told to wait": m.get("held", 0),
        "messages acked": m["acked"],
        "messages unacked at the end (sent, no reply)": m["unacked"],
        "messages still waiting to be sent again at the end": m.get("waiting"),
        "error frames: unavailable (refusals)": errors.get("unavailable", 0),
        "error frames: other codes": sum(v for k, v in errors.items() if k != "unavailable"),
        "answers complete": r["answers"]["by_status"].get("complete", 0),
        "answers failed": r["answers"]["by_status"].get("failed", 0),
        "answers interrupted (lease expired)": r["answers"]["by_status"].get("interrupted", 0),
        "answers left unfinished on a socket": r["answers"]["unfinished"],
        "leases found lost while streaming": metric(r, 'chatgw_errors_total{code="lease_lost"}'),
        "model first-token timeouts": metric(r, 'chatgw_errors_total{code="llm_timeout"}'),
        "DB pool waits": pool_waits
        if r["bench"]["metrics"] and "chatgw_db_pool_waits" in r["bench"]["metrics"][0]
        else None,
        "DB pool mean wait (ms)": metric(r, "chatgw_db_pool_wait_seconds") * 1000 / pool_waits
        if pool_waits
        else None,
        "Redis pipelines in flight, most (pool 16)": metric(r, 'chatgw_redis_broker{what="most_in_flight"}')
        or None,
        "Redis commands per round trip": metric(r, 'chatgw_redis_broker{what="commands"}')
        / metric(r, 'chatgw_redis_broker{what="round_trips"}')
        if metric(r, 'chatgw_redis_broker{what="round_trips"}')
        else None,
        "limit in force at the end": metric(r, "chatgw_answers_active_limit") or None,
        "token lag p50 (ms)": r["latency_ms"]["token_lag"]["p50"],
        "token lag p99 (ms)": r["latency_ms"]["token_lag"]["p99"],
        "ack p50 (ms)": r["latency_ms"]["ack"]["p50"],
        "ack p99 (ms)": r["latency_ms"]["ack"]["p99"],
        "time to first token p50 (ms)": r["latency_ms"]["ttft_total"]["p50"],
        "tokens per delta frame": r["deltas"]["tokens"] / r["deltas"]["frames"]
        if r["deltas"]["frames"]
        else None,
        "tokens delivered per second": r["deltas"]["tokens_per_s"],
        "gateway CPU (cores)": r["bench"]["gateway_cores"],
        "load average (1 min) at start": r["bench"]["loadavg_start"][0],
        "load average (1 min) at end": r["bench"]["loadavg_end"][0],
    }


def tables(results: dict[tuple[str, int], list[dict[str, Any]]], names: list[str], levels: list[int]) -> None:
    for n in levels:
        print(f"\n{n} conversations")
        print("| metric | " + " | ".join(names) + " |")
        print("| --- |" + " --- |" * len(names))
        rows = list(derived(next(iter(results.values()))[0]))
        for label in rows:
            cells = [summary([derived(r)[label] for r in results.get((name, n), [])]) for name in names]
            print(f"| {label} | " + " | ".join(cells) + " |")


def from_json(directory: Path) -> None:
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    names: list[str] = []
    for path in sorted(directory.glob("*.json")):
        match = re.match(r".*-(?P<name>[^-]+)-c(?P<n>\d+)-run\d+\.json$", path.name)
        if not match:
            continue
        if match["name"] not in names:
            names.append(match["name"])
        results.setdefault((match["name"], int(match["n"])), []).append(json.loads(path.read_text()))
    names.sort(key=lambda name: name != "before")  # "before" first, as it ran
    tables(results, names, sorted({n for _, n in results}))


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
    parser.add_argument("--from-json", type=Path, help="print the tables from the reports in a directory")
    args = parser.parse_args()
    if args.from_json:
        from_json(args.from_json)
        return
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
    tables(results, [name for name, _, _ in variants], levels)


if __name__ == "__main__":
    main()
