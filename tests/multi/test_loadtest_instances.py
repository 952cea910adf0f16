"""`chatgw loadtest` over two gateway instances: conversations are created on one, their watchers
read on the other, and the report measures fan-out across instances with every delta paired; with
agents on the other instance than their conversations, every takeover crosses instances and the
report agrees with what the users and the agents saw."""

from __future__ import annotations

from pathlib import Path

from tests.loadtest_support import (
    assert_consistent,
    assert_takeovers_consistent,
    model_env,
    run_loadtest,
    start_model_server,
)
from tests.multi.conftest import Cluster
from tests.servers import DEMO_API_KEY


def test_watchers_on_another_instance_get_every_delta(cluster: Cluster, tmp_path: Path) -> None:
    model = start_model_server(tmp_path, "--ttft-ms", "20", "--tokens", "10", "--tokens-per-second", "200")
    try:
        a, b = cluster(2, {**model_env(model), "CHATGW_LOG_LEVEL": "WARNING"})
        run = run_loadtest(
            tmp_path,
            *("--url", a.http, "--url", b.http, "--model-server", model.url, "--quiet"),
            *("--conversations", "4", "--message-interval", "0.5", "--duration", "2"),
        )
    finally:
        model.stop()
    assert run.status == 0, run.stderr
    report = run.report
    assert_consistent(report, conversations=4, watchers=1)
    assert report["fanout"]["cross_instance"] is True
    assert report["config"]["urls"] == [a.http, b.http]
    assert all(t["cpu_seconds"] is not None for t in report["gateway_cpu"]["targets"])
    assert len(report["gateway_cpu"]["targets"]) == 2


def test_agents_on_the_other_instance_take_over_and_hand_back(cluster: Cluster, tmp_path: Path) -> None:
    model = start_model_server(tmp_path, "--ttft-ms", "20", "--tokens", "100", "--tokens-per-second", "50")
    try:
        a, b = cluster(2, {**model_env(model), "CHATGW_LOG_LEVEL": "WARNING"})
        run = run_loadtest(
            tmp_path,
            *("--url", a.http, "--url", b.http, "--model-server", model.url, "--quiet"),
            *("--conversations", "4", "--processes", "2", "--agents", "2", "--admin-key", DEMO_API_KEY),
            *("--takeover-rate", "1", "--takeover-within", "0.3", "--takeover-hold", "0.3"),
            *("--message-interval", "1", "--duration", "4"),
        )
        assert run.status == 0, run.stderr
        report = run.report
        taken_over = report["answers"]["by_status"].get("taken_over", 0)
        model.wait_stats(lambda s: s["disconnects"] == taken_over and s["active_streams"] == 0)
    finally:
        model.stop()
    assert_consistent(report, conversations=4, watchers=1, agents=2)
    assert_takeovers_consistent(report, conversations=4, agents=2)
    assert taken_over >= 1
    # Each process's conversations are on one instance and its agent on the other.
    assert report["agents"]["followed_cross_instance"] == 4
