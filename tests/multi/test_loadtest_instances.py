"""`chatgw loadtest` over two gateway instances: conversations are created on one, their watchers
read on the other, and the report measures fan-out across instances with every delta paired."""

from __future__ import annotations

from pathlib import Path

from tests.loadtest_support import assert_consistent, model_env, run_loadtest, start_model_server
from tests.multi.conftest import Cluster


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
