"""The load tool's report built from merged tallies: rates over the window, CPU per delivered
delta frame, latency summaries over every client process, and the table for people."""

from __future__ import annotations

from gateway.loadtest.config import parse
from gateway.loadtest.report import SCHEMA, build, table
from gateway.loadtest.tally import Tally


def tally(frames: int, tokens: int, lags_us: list[int]) -> Tally:
    t = Tally()
    t.counts.update(
        {
            "sockets_opened": 2,
            "messages_sent": 4,
            "acks": 4,
            "answers_started": 4,
            "answers_ended": 4,
            "delta_frames_user": frames,
            "delta_frames_watcher": frames,
            "tokens_user": tokens,
            "tokens_watcher": tokens,
        }
    )
    t.keyed["answer_status"]["complete"] = 4
    t.keyed["tokens_per_answer"][str(tokens // 4)] = 4
    for lag in lags_us:
        t.hist["token_lag_user"].add(lag)
        t.hist["token_lag_watcher"].add(lag + 1000)
    return t


def test_a_report_merges_client_processes_and_computes_rates_and_cpu_per_frame() -> None:
    config = parse(
        ["--url", "http://127.0.0.1:1", "--conversations", "2", "--watchers-per-conversation", "0"]
    )
    merged = Tally()
    merged.merge(Tally.from_state(tally(10, 20, [1000, 2000]).to_state()))
    merged.merge(Tally.from_state(tally(30, 60, [3000, 4000]).to_state()))
    report = build(
        config,
        merged,
        window_s=10.0,
        connect_s=0.5,
        client_cpu=[0.2, 0.4],
        gateways=[{"url": "http://127.0.0.1:1", "cpu_seconds": 0.16}],
        model_server=None,
        aborted=False,
        failed_workers=0,
    )
    assert report["schema"] == SCHEMA
    assert report["messages"]["acks_per_s"] == 0.8
    assert report["deltas"]["frames"] == 80
    assert report["deltas"]["frames_per_s"] == 8.0
    assert report["deltas"]["tokens_per_s"] == 16.0
    assert report["gateway_cpu"]["us_per_delta_frame"] == 2000.0  # 0.16 s over 80 frames
    lag = report["latency_ms"]["token_lag"]
    assert lag["count"] == 8
    assert (lag["p50"], lag["max"]) == (3.0, 5.0)  # user 1-4 ms and watcher 2-5 ms together
    assert report["latency_ms"]["token_lag_user"]["max"] == 4.0
    assert report["answers"]["tokens_per_complete_answer"] == {"min": 5, "max": 15}
    assert report["client"]["busiest_process_load"] == 0.04
    text = table(report)
    assert "8 started, 8 ended (complete=8)" in text
    assert "2000.0 µs per delivered delta frame" in text


def test_an_unreadable_gateway_leaves_its_cpu_unknown() -> None:
    config = parse(["--url", "http://127.0.0.1:1", "--url", "http://127.0.0.1:2"])
    report = build(
        config,
        tally(10, 20, [1000]),
        window_s=1.0,
        connect_s=0.1,
        client_cpu=[0.1],
        gateways=[
            {"url": "http://127.0.0.1:1", "cpu_seconds": 0.5},
            {"url": "http://127.0.0.1:2", "cpu_seconds": None},
        ],
        model_server=None,
        aborted=True,
        failed_workers=0,
    )
    assert report["gateway_cpu"]["cpu_seconds"] is None
    assert report["gateway_cpu"]["us_per_delta_frame"] is None
    assert report["fanout"]["cross_instance"] is True
    assert "gateway CPU    unknown" in table(report)
    assert "(aborted)" in table(report)


def test_refused_opens_are_reported_by_reason_apart_from_failures() -> None:
    config = parse(["--url", "http://127.0.0.1:1", "--conversations", "2"])
    t = tally(10, 20, [1000])
    t.counts.update({"sockets_opened": 3, "sockets_failed": 1, "opens_retried": 4})
    t.keyed["open_refusals"].update({"session_http_503": 3, "hello_unavailable": 2})
    t.keyed["connect_failures"]["hello_unavailable"] = 1  # refused again past --open-within
    merged = Tally()
    merged.merge(Tally.from_state(t.to_state()))
    report = build(
        config,
        merged,
        window_s=1.0,
        connect_s=0.1,
        client_cpu=[0.1],
        gateways=[{"url": "http://127.0.0.1:1", "cpu_seconds": None}],
        model_server=None,
        aborted=False,
        failed_workers=0,
    )
    connections = report["connections"]
    assert connections["refused"] == 5
    assert connections["retried"] == 4
    assert connections["refusals_by_reason"] == {"session_http_503": 3, "hello_unavailable": 2}
    assert connections["failures_by_reason"] == {"hello_unavailable": 1}
    assert connections["sockets_failed"] == 1
    text = table(report)
    assert "refused      hello_unavailable=2 session_http_503=3: 4 tried again after the hinted wait" in text
