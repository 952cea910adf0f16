"""The load tool's report: a JSON document with a stable schema (`SCHEMA`, documented in
bench/README.md; fields are only ever added) and a table for people."""

from __future__ import annotations

from typing import Any

from gateway.loadtest.config import LoadConfig
from gateway.loadtest.stats import Histogram
from gateway.loadtest.tally import Tally

SCHEMA = "chatgw.loadtest/1"

_LATENCIES = (
    ("ack", "ack"),
    ("ttft_total", "time to first token, total"),
    ("ttft_added", "time to first token, added by the gateway"),
    ("token_lag", "per-token lag, all sockets"),
    ("token_lag_user", "per-token lag, user sockets"),
    ("token_lag_watcher", "per-token lag, watcher sockets"),
    ("fanout", "fan-out lag (watcher - user)"),
)
_AGENT_LATENCIES = (
    ("token_lag_agent", "per-token lag, agent sockets"),
    ("fanout_agent", "fan-out lag (agent - user)"),
    ("takeover", "takeover sent -> ai_end on the user socket"),
    ("takeover_agent", "takeover sent -> ai_end on the agent socket"),
)


def _rate(n: int, seconds: float) -> float:
    return round(n / seconds, 2) if seconds > 0 else 0.0


def build(
    config: LoadConfig,
    tally: Tally,
    *,
    window_s: float,
    connect_s: float,
    client_cpu: list[float],
    gateways: list[dict[str, Any]],
    model_server: dict[str, Any] | None,
    aborted: bool,
    failed_workers: int,
) -> dict[str, Any]:
    """The report of a whole run, from the merged tally of every client process."""
    c = tally.counts
    frames = c["delta_frames_user"] + c["delta_frames_watcher"] + c["delta_frames_agent"]
    tokens = c["tokens_user"] + c["tokens_watcher"] + c["tokens_agent"]
    lag = Histogram()
    for name, histogram in tally.hist.items():
        if name.startswith("token_lag_"):
            lag.merge(histogram)
    latencies = {name: tally.hist[name].summary_ms() for name in tally.hist}
    latencies["token_lag"] = lag.summary_ms()
    cpu = [g["cpu_seconds"] for g in gateways if g["cpu_seconds"] is not None]
    gateway_cpu = round(sum(cpu), 3) if cpu and len(cpu) == len(gateways) else None
    answer_tokens = [int(k) for k in tally.keyed["tokens_per_answer"]]
    return {
        "schema": SCHEMA,
        "config": config.public(),
        "aborted": aborted,
        "failed_client_processes": failed_workers,
        "window_s": round(window_s, 3),
        "connect_s": round(connect_s, 3),
        "connections": {
            "sockets_planned": config.sockets,
            "sockets_opened": c["sockets_opened"],
            "sockets_failed": c["sockets_failed"],
            "sessions_failed": c["sessions_failed"],
            "failures_by_reason": dict(tally.keyed["connect_failures"]),
            "refused": sum(tally.keyed["open_refusals"].values()),
            "retried": c["opens_retried"],
            "refusals_by_reason": dict(tally.keyed["open_refusals"]),
            "closed_by_server": c["closed_by_server"],
            "close_codes": dict(tally.keyed["close_codes"]),
        },
        "messages": {
            "sent": c["messages_sent"],
            "acked": c["acks"],
            "refused": c["messages_refused"],
            "retried": c["messages_retried"],
            "held": c["messages_held"],
            "waiting": c["messages_waiting"],
            "refusals_by_code": dict(tally.keyed["message_refusals"]),
            "unacked": c["unacked_messages"],
            "unexpected_acks": c["unexpected_acks"],
            "stops_sent": c["stops_sent"],
            "acks_per_s": _rate(c["acks"], window_s),
        },
        "answers": {
            "started": c["answers_started"],
            "ended": c["answers_ended"],
            "by_status": dict(tally.keyed["answer_status"]),
            "unfinished": c["unfinished_answers"],
            "users_left_waiting": c["unanswered_users"],
            "ttft_unattributed": c["ttft_unattributed"],
            "tokens_per_complete_answer": {
                "min": min(answer_tokens) if answer_tokens else None,
                "max": max(answer_tokens) if answer_tokens else None,
            },
        },
        "deltas": {
            "frames": frames,
            "frames_user": c["delta_frames_user"],
            "frames_watcher": c["delta_frames_watcher"],
            "frames_agent": c["delta_frames_agent"],
            "tokens": tokens,
            "tokens_user": c["tokens_user"],
            "tokens_watcher": c["tokens_watcher"],
            "tokens_agent": c["tokens_agent"],
            "frames_per_s": _rate(frames, window_s),
            "tokens_per_s": _rate(tokens, window_s),
        },
        "latency_ms": latencies,
        "ttft_added_source": {
            "marker": c["ttft_added_from_marker"],
            "configured_ttft": c["ttft_added_from_config"],
        },
        "fanout": {
            "cross_instance": len({t.http for t in config.targets}) > 1,
            "pairs": c["fanout_pairs"],
            "watcher_first": c["fanout_watcher_first"],
            "agent_pairs": c["fanout_agent_pairs"],
            "agent_first": c["fanout_agent_first"],
        },
        "agents": _agents(config, tally),
        "takeovers": _takeovers(tally),
        "integrity": {
            "seq_gaps": c["seq_gaps"],
            "seq_missing": c["seq_missing"],
            "seq_duplicates": c["seq_duplicates"],
            "late_deltas": c["late_deltas"],
            "duplicate_ai_end": c["duplicate_ai_end"],
            "text_mismatches": c["text_mismatches"],
            "reset_frames": c["reset_frames"],
            "reconnect_frames": c["reconnect_frames"],
        },
        "errors": dict(tally.keyed["errors"]),
        "gateway_cpu": {
            "targets": gateways,
            "cpu_seconds": gateway_cpu,
            "us_per_delta_frame": round(gateway_cpu * 1e6 / frames, 2)
            if gateway_cpu is not None and frames
            else None,
        },
        "model_server": model_server,
        "client": {
            "processes": config.processes,
            "cpu_seconds": round(sum(client_cpu), 3),
            "busiest_process_load": round(max(client_cpu) / window_s, 3)
            if client_cpu and window_s > 0
            else None,
        },
    }


def _agents(config: LoadConfig, tally: Tally) -> dict[str, Any]:
    c = tally.counts
    caps = [int(cap) for cap in tally.keyed["agent_max_subscriptions"]]
    return {
        "planned": config.agents,
        "opened": c["opened_agent"],
        "max_subscriptions": min(caps) if caps else None,
        "conversations_followed": c["conversations_followed"],
        "conversations_unfollowed": c["conversations_unfollowed"],
        "follow_failures": dict(tally.keyed["follow_failures"]),
        "followed_cross_instance": c["followed_cross_instance"],
        "feed_frames": c["feed_frames"],
    }


def _takeovers(tally: Tally) -> dict[str, Any]:
    c = tally.counts
    return {
        "sent": c["takeovers_sent"],
        "done": c["takeovers_done"],
        "cut_answers": c["takeovers_cut"],
        "between_answers": c["takeovers_done"] - c["takeovers_cut"],
        "skipped": c["takeovers_skipped"],
        "refused": c["takeovers_refused"],
        "unanswered": c["takeovers_unanswered"],
        "handbacks_sent": c["handbacks_sent"],
        "handbacks_done": c["handbacks_done"],
        "handbacks_refused": c["handbacks_refused"],
        "handbacks_unanswered": c["handbacks_unanswered"],
        "held_at_end": c["takeovers_held_at_end"],
        "late_deltas": c["late_deltas_taken_over"],
        "errors": dict(tally.keyed["takeover_errors"]),
    }


def problems(report: dict[str, Any]) -> list[str]:
    """Integrity problems of a run (they make the exit status 1)."""
    found = []
    for key in ("seq_gaps", "seq_duplicates", "late_deltas", "duplicate_ai_end", "text_mismatches"):
        if report["integrity"][key]:
            found.append(f"{key.replace('_', ' ')}: {report['integrity'][key]}")
    if report["messages"]["unacked"]:
        found.append(f"messages never acknowledged: {report['messages']['unacked']}")
    if report["answers"]["unfinished"]:
        found.append(f"answers without ai_end: {report['answers']['unfinished']}")
    takeovers = report.get("takeovers") or {}
    for key, what in (("unanswered", "takeovers"), ("handbacks_unanswered", "handbacks")):
        if takeovers.get(key):
            found.append(f"{what} the gateway never answered: {takeovers[key]}")
    return found


def table(report: dict[str, Any]) -> str:
    """The report for people."""
    r = report
    conn, msgs, ans, deltas = r["connections"], r["messages"], r["answers"], r["deltas"]
    agents = r["config"].get("agents", 0)
    agent_frames = f", agents {deltas['frames_agent']}" if agents else ""
    lines = [
        f"chatgw loadtest: {r['config']['conversations']} conversations x "
        f"(1 user + {r['config']['watchers_per_conversation']} watchers)"
        f"{f' + {agents} agents' if agents else ''} on {', '.join(r['config']['urls'])}, "
        f"window {r['window_s']:.1f} s" + (" (aborted)" if r["aborted"] else ""),
        "",
        f"sockets        {conn['sockets_opened']} opened, {conn['sockets_failed']} failed, "
        f"{conn['sessions_failed']} sessions failed, {conn['closed_by_server']} closed by the server",
    ]
    if conn["failures_by_reason"]:
        lines.append(f"  failures     {_pairs(conn['failures_by_reason'])}")
    if conn["refusals_by_reason"]:
        lines.append(
            f"  refused      {_pairs(conn['refusals_by_reason'])}: "
            f"{conn['retried']} tried again after the hinted wait"
        )
    if conn["close_codes"]:
        lines.append(f"  close codes  {_pairs(conn['close_codes'])}")
    lines += [
        f"messages       {msgs['sent']} sent, {msgs['acked']} acked ({msgs['acks_per_s']}/s), "
        f"{msgs['unacked']} unacked, {msgs['waiting']} still waiting to be sent again, "
        f"{msgs['refused']} refused, {msgs['retried']} sent again after a refusal"
        f"{' (' + _pairs(msgs['refusals_by_code']) + ')' if msgs['refusals_by_code'] else ''}, "
        f"{msgs['stops_sent']} stops sent",
        f"answers        {ans['started']} started, {ans['ended']} ended"
        f"{' (' + _pairs(ans['by_status']) + ')' if ans['by_status'] else ''}, {ans['unfinished']} unfinished, "
        f"tokens per complete answer {_span(ans['tokens_per_complete_answer'])}",
        f"deltas         {deltas['frames']} frames ({deltas['frames_per_s']}/s; users {deltas['frames_user']}, "
        f"watchers {deltas['frames_watcher']}{agent_frames}), "
        f"{deltas['tokens']} tokens ({deltas['tokens_per_s']}/s)",
    ]
    if agents:
        lines += _agent_lines(r)
    lines += ["", f"{'latency (ms)':<44}{'count':>9}{'p50':>10}{'p95':>10}{'p99':>10}{'max':>10}"]
    for key, label in _LATENCIES + (_AGENT_LATENCIES if agents else ()):
        s = r["latency_ms"][key]
        cells = "".join(f"{_ms(s[p]):>10}" for p in ("p50", "p95", "p99", "max"))
        lines.append(f"{label:<44}{s['count']:>9}{cells}")
    source = r["ttft_added_source"]
    lines += [
        f"  (gateway-added TTFT from markers: {source['marker']}, from the configured TTFT: {source['configured_ttft']}; "
        f"fan-out {'across instances' if r['fanout']['cross_instance'] else 'on one instance'}, "
        f"watcher first {r['fanout']['watcher_first']} of {r['fanout']['pairs']}"
        + (f", agent first {r['fanout']['agent_first']} of {r['fanout']['agent_pairs']})" if agents else ")"),
        "",
        "integrity      " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in r["integrity"].items()),
        f"errors         {_pairs(r['errors']) or 'none'}",
    ]
    cpu = r["gateway_cpu"]
    if cpu["cpu_seconds"] is None:
        lines.append("gateway CPU    unknown (a target's /metrics has no process_cpu_seconds_total)")
    else:
        lines.append(
            f"gateway CPU    {cpu['cpu_seconds']} s, {cpu['us_per_delta_frame']} µs per delivered delta frame"
        )
    client = r["client"]
    lines.append(
        f"client CPU     {client['cpu_seconds']} s over {client['processes']} processes, "
        f"busiest {_percent(client['busiest_process_load'])} of a core"
    )
    if client["busiest_process_load"] is not None and client["busiest_process_load"] > 0.8:
        lines.append(
            "  warning: a client process was nearly saturated, so lags include client delay; use more --processes"
        )
    model = r["model_server"]
    if model is not None:
        lines.append(
            f"model server   {model['requests']} requests, {model['streams']} streams, "
            f"{model['disconnects']} disconnects, {model['tokens_sent']} tokens sent, {model['cpu_seconds']} s CPU"
        )
    return "\n".join(lines)


def _agent_lines(r: dict[str, Any]) -> list[str]:
    a, t = r["agents"], r["takeovers"]
    followed = a["conversations_followed"]
    lines = [
        f"agents         {a['opened']} of {a['planned']} sockets opened, following {followed} of "
        f"{r['config']['conversations']} conversations ({a['followed_cross_instance']} across instances; "
        f"at most {a['max_subscriptions'] if a['max_subscriptions'] is not None else '-'} each), "
        f"{a['feed_frames']} feed frames",
        f"takeovers      {t['sent']} sent: {t['done']} done ({t['cut_answers']} cut an answer, "
        f"{t['between_answers']} between answers), {t['refused']} refused, {t['unanswered']} unanswered; "
        f"{t['skipped']} skipped (the answer ended first)",
        f"handbacks      {t['handbacks_sent']} sent: {t['handbacks_done']} done, {t['handbacks_refused']} refused, "
        f"{t['handbacks_unanswered']} unanswered; {t['held_at_end']} conversations held at the end; "
        f"late deltas of taken-over answers {t['late_deltas']}",
    ]
    if a["follow_failures"]:
        lines.append(f"  not followed {_pairs(a['follow_failures'])}")
    if t["errors"]:
        lines.append(f"  refusals     {_pairs(t['errors'])}")
    return lines


def _pairs(mapping: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(mapping.items()))


def _span(bounds: dict[str, int | None]) -> str:
    low, high = bounds["min"], bounds["max"]
    return "-" if low is None else str(low) if low == high else f"{low}..{high}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"
