"""`chatgw loadtest` against real gateway processes answering through `chatgw model-server`: the
report agrees with what was sent and with what the model server counted, on the embedded default
and on PostgreSQL + Redis; stopped answers close the model's stream; agents follow every
conversation and take over and hand back, and the report agrees with what every socket saw;
sockets the server closes (a gateway told to stop mid-run) are counted, with the run still
reporting; and widget sessions and hellos refused by an overloaded gateway (its loop held up:
`tests.stall_gateway`) are tried again after the hinted wait and reported as refusals, not
failures."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from gateway.loadtest.clients import Conversation, WatcherClient
from gateway.loadtest.config import parse
from gateway.loadtest.sockets import Run
from gateway.loadtest.tally import Tally
from tests.e2e.client import Client
from tests.e2e.test_overload import SLOW_S, Lagging, lagging_env
from tests.loadtest_support import (
    ModelServerProcess,
    assert_consistent,
    assert_takeovers_consistent,
    model_env,
    run_loadtest,
    start_loadtest,
    start_model_server,
)
from tests.servers import DEMO_API_KEY, GatewayProcess, start_gateway

TOKENS = 12


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServerProcess]:
    """Short, fast answers: every answer is over long before the user's next message."""
    server = start_model_server(
        tmp_path_factory.mktemp("model"),
        "--ttft-ms",
        "20",
        "--tokens",
        str(TOKENS),
        "--tokens-per-second",
        "200",
    )
    yield server
    server.stop()


@pytest.fixture
def gateway_on(tmp_path: Path, model: ModelServerProcess) -> Iterator[Callable[..., GatewayProcess]]:
    """Start gateways that answer through the model server (or the one in `env`)."""
    started: list[GatewayProcess] = []

    def start(env: dict[str, str] | None = None) -> GatewayProcess:
        gw = start_gateway(tmp_path, {**model_env(model), "CHATGW_LOG_LEVEL": "WARNING", **(env or {})})
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


def args(gw: GatewayProcess, model: ModelServerProcess, *extra: str) -> list[str]:
    return ["--url", gw.http, "--model-server", model.url, "--quiet", *extra]


def test_a_small_run_reports_what_was_sent(
    gateway_on: Callable[..., GatewayProcess],
    model: ModelServerProcess,
    backend_env: dict[str, str],
    tmp_path: Path,
) -> None:
    gw = gateway_on(backend_env)
    run = run_loadtest(
        tmp_path,
        *args(gw, model, "--conversations", "4", "--watchers-per-conversation", "1"),
        *("--message-interval", "0.5", "--duration", "2", "--processes", "2"),
    )
    assert run.status == 0, run.stderr
    report = run.report
    assert_consistent(report, conversations=4, watchers=1)
    answers = report["answers"]
    assert answers["by_status"] == {"complete": answers["ended"]}
    assert answers["tokens_per_complete_answer"] == {"min": TOKENS, "max": TOKENS}
    assert report["deltas"]["tokens_user"] == TOKENS * answers["ended"]
    assert report["model_server"]["disconnects"] == 0
    assert report["model_server"]["tokens_sent"] == report["deltas"]["tokens_user"]
    assert report["config"]["processes"] == 2
    assert "chatgw loadtest: 4 conversations" in run.stdout


def test_stopped_answers_end_stopped_and_close_the_model_stream(
    gateway_on: Callable[..., GatewayProcess], tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    slow = start_model_server(
        tmp_path_factory.mktemp("slow-model"),
        "--ttft-ms",
        "10",
        "--tokens",
        "100",
        "--tokens-per-second",
        "20",
    )
    try:
        gw = gateway_on(model_env(slow))
        run = run_loadtest(
            tmp_path,
            *args(gw, slow, "--conversations", "3", "--watchers-per-conversation", "0", "--stop-rate", "1"),
            *("--message-interval", "1", "--duration", "2"),
        )
        assert run.status == 0, run.stderr
        answers, messages = run.report["answers"], run.report["messages"]
        assert answers["started"] >= 3
        assert answers["by_status"] == {"stopped": answers["started"]}
        assert messages["stops_sent"] == answers["started"]
        assert messages["acked"] == messages["sent"]
        slow.wait_stats(lambda s: s["disconnects"] == answers["started"] and s["active_streams"] == 0)
    finally:
        slow.stop()


def test_refusals_are_reported_by_code_and_sent_again(
    gateway_on: Callable[..., GatewayProcess], tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """A gateway answering one conversation at a time refuses the others' messages with
    `unavailable` and `retry_after_ms`: the load tool counts each refusal by code, sends the
    message again after it, and in the end every message is acked and answered."""
    slow = start_model_server(
        tmp_path_factory.mktemp("one-second-answers"),
        *("--ttft-ms", "10", "--tokens", "40", "--tokens-per-second", "40"),
    )
    try:
        gw = gateway_on(
            {**model_env(slow), "CHATGW_MAX_ACTIVE_ANSWERS": "1", "CHATGW_OVERLOAD_RETRY_MS": "200"}
        )
        # Four users send within the same half second; each answer lasts a second.
        run = run_loadtest(
            tmp_path,
            *args(gw, slow, "--conversations", "4", "--watchers-per-conversation", "0"),
            *("--message-interval", "0.5", "--duration", "1", "--drain-timeout", "60"),
            timeout=120,
        )
        assert run.status == 0, run.stderr
        messages, answers = run.report["messages"], run.report["answers"]
        assert messages["retried"] >= 3
        assert messages["refusals_by_code"] == {"unavailable": messages["retried"]}
        assert run.report["errors"] == {"unavailable": messages["retried"]}
        assert (
            messages["refused"]
            == messages["unacked"]
            == messages["waiting"]
            == messages["unexpected_acks"]
            == 0
        )
        assert messages["acked"] == messages["sent"] >= 4
        assert answers["by_status"] == {"complete": answers["started"]}
        assert answers["unfinished"] == answers["users_left_waiting"] == 0
        assert "sent again after a refusal (unavailable=" in run.stdout
    finally:
        slow.stop()


def test_agents_take_over_mid_answer_and_hand_back(
    gateway_on: Callable[..., GatewayProcess], tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """Answers of 2 s and every answer picked: the agents cut them within 0.3 s of their first
    delta, hold for 0.3 s and hand back, so the users' next questions are answered by the AI."""
    slow = start_model_server(
        tmp_path_factory.mktemp("long-answers"),
        *("--ttft-ms", "20", "--tokens", "100", "--tokens-per-second", "50"),
    )
    try:
        gw = gateway_on(model_env(slow))
        run = run_loadtest(
            tmp_path,
            *args(gw, slow, "--conversations", "4", "--agents", "2", "--admin-key", DEMO_API_KEY),
            *("--takeover-rate", "1", "--takeover-within", "0.3", "--takeover-hold", "0.3"),
            *("--message-interval", "1", "--duration", "4"),
        )
        assert run.status == 0, run.stderr
        report = run.report
        assert_consistent(report, conversations=4, watchers=1, agents=2)
        assert_takeovers_consistent(report, conversations=4, agents=2)
        taken_over = report["answers"]["by_status"].get("taken_over", 0)
        assert taken_over >= 1
        assert report["agents"]["followed_cross_instance"] == 0  # one URL
        assert report["config"]["takeover_rate"] == 1.0
        assert DEMO_API_KEY not in run.stdout + json.dumps(report)
        assert "takeover sent -> ai_end on the user socket" in run.stdout
        # Every answer cut closed its request to the model.
        slow.wait_stats(lambda s: s["disconnects"] == taken_over and s["active_streams"] == 0)
        # The run's agents are disabled afterwards.
        listed = httpx.get(
            f"{gw.http}/v1/agents", headers={"Authorization": f"Bearer {DEMO_API_KEY}"}, timeout=10
        ).json()["agents"]
        made = [a for a in listed if a["name"].startswith("loadtest ")]
        assert len(made) == 2
        assert all(a["disabled"] for a in made)
    finally:
        slow.stop()


def test_sockets_the_server_closes_are_counted_and_the_run_reports(
    gateway_on: Callable[..., GatewayProcess], model: ModelServerProcess, tmp_path: Path
) -> None:
    gw = gateway_on({"CHATGW_RECONNECT_SPREAD_MS": "0", "CHATGW_GRACEFUL_SHUTDOWN_S": "1"})
    process, out = start_loadtest(
        tmp_path, *args(gw, model, "--conversations", "3", "--message-interval", "0.5", "--duration", "4")
    )
    try:
        deadline = time.monotonic() + 30
        while _open_sockets(gw) < 6:  # every socket is open: stop the gateway under the load
            assert time.monotonic() < deadline, "the load tool never opened its sockets"
            time.sleep(0.05)
        gw.process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    report = json.loads(out.read_text())
    assert process.returncode in (0, 1), stderr
    assert "Traceback" not in stderr
    connections = report["connections"]
    assert connections["closed_by_server"] == 6
    assert connections["close_codes"] == {"1012": 6}
    assert report["integrity"]["reconnect_frames"] == 6
    assert report["integrity"]["seq_gaps"] == report["integrity"]["seq_duplicates"] == 0


def _open_sockets(gw: GatewayProcess) -> float:
    try:
        text = httpx.get(f"{gw.http}/metrics", timeout=5).text
    except httpx.TransportError:
        return 0
    for line in text.splitlines():
        if line.startswith("chatgw_ws_connections "):
            return float(line.split()[1])
    return 0


@pytest.fixture
def lagging_on(tmp_path: Path, model: ModelServerProcess) -> Iterator[Lagging]:
    """A gateway answering through the model server whose loop lags while its flag exists (the
    flag is made by the test once the gateway is up), refusing arrivals with hints of 200-300 ms."""
    flag = tmp_path / "lag"
    env = {
        **model_env(model),
        **lagging_env(flag),
        "CHATGW_OVERLOAD_RETRY_MS": "200",
        "CHATGW_LOG_LEVEL": "WARNING",
    }
    gw = start_gateway(tmp_path, env, module="tests.stall_gateway")
    yield Lagging(gw, flag)
    flag.unlink(missing_ok=True)
    gw.stop()


def _until(condition: Callable[[], bool], what: str) -> None:
    for _attempt in range(600):  # a bound on a hang, not a timed assertion
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"never: {what}")


def _refuses_sessions(lagging: Lagging) -> bool:
    r = httpx.post(f"{lagging.gw.http}/v1/widget/sessions", json={"business": "demo"}, timeout=SLOW_S)
    assert r.status_code in (201, 503), r.text
    return r.status_code == 503


def test_a_refused_session_creation_is_tried_again_and_reported_as_a_refusal(
    lagging_on: Lagging, model: ModelServerProcess, tmp_path: Path
) -> None:
    """The load tool starts while the gateway refuses new conversations (503 with a hint); once
    the gateway refused one of the tool's, the lag ends: every session and socket opens in the
    end, and the report counts the refusals by reason and the tries again, not failures."""
    gw = lagging_on.gw
    lagging_on.flag.touch()
    _until(lambda: _refuses_sessions(lagging_on), "a session refused while the loop lags")
    before = lagging_on.refused("session")
    process, out = start_loadtest(
        tmp_path,
        *args(gw, model, "--conversations", "2", "--watchers-per-conversation", "1"),
        *("--message-interval", "0.5", "--duration", "1"),
    )
    try:
        _until(lambda: lagging_on.refused("session") > before, "the load tool's session refused")
        lagging_on.flag.unlink()
        stdout, stderr = process.communicate(timeout=120)
    except (subprocess.TimeoutExpired, AssertionError):
        process.kill()
        raise
    assert process.returncode == 0, stderr
    report = json.loads(out.read_text())
    connections = report["connections"]
    assert connections["sockets_opened"] == 4
    assert connections["sockets_failed"] == connections["sessions_failed"] == 0
    assert connections["failures_by_reason"] == {}
    refusals = connections["refusals_by_reason"]
    assert refusals["session_http_503"] >= 1
    assert set(refusals) <= {"session_http_503", "hello_unavailable"}  # hellos too, if still lagging
    assert connections["refused"] == connections["retried"] == sum(refusals.values())
    assert report["config"]["open_within_s"] == 60.0
    assert report["messages"]["acked"] == report["messages"]["sent"] > 0
    assert "tried again after the hinted wait" in stdout


async def test_a_refused_hello_is_tried_again_on_a_new_socket(lagging_on: Lagging) -> None:
    """A socket of the load tool whose hello is refused (`unavailable`, then close 1013) opens a
    new socket after the hinted wait and says hello again: it opens once the lag is gone."""
    gw = lagging_on.gw
    run = Run(parse(["--url", gw.http, "--conversations", "1", "--watchers-per-conversation", "0"]), Tally())
    conversation = Conversation(0, run)
    async with httpx.AsyncClient(timeout=SLOW_S) as http:
        await conversation.setup(http)  # before the lag
    assert run.tally.counts["sockets_opened"] == 1
    lagging_on.flag.touch()
    for _attempt in range(50):  # until the gateway has seen the lag
        probe = await Client.open(gw)
        await probe.send({"type": "hello", "token": conversation.token})
        answer = await probe.recv(timeout=SLOW_S)
        await probe.close()
        if answer["type"] == "error":
            assert answer["code"] == "unavailable", answer
            break
        assert answer["type"] == "welcome", answer
    assert answer["type"] == "error", "no hello was refused while the loop lagged"
    before = await asyncio.to_thread(lagging_on.refused, "socket")
    watcher = WatcherClient(run, conversation, conversation.home)
    opening = asyncio.create_task(watcher.open())
    for _attempt in range(600):
        if await asyncio.to_thread(lagging_on.refused, "socket") > before:
            break
        await asyncio.sleep(0.1)
    lagging_on.flag.unlink()
    assert await opening
    counts, refusals = run.tally.counts, run.tally.keyed["open_refusals"]
    assert refusals["hello_unavailable"] >= 1
    assert set(refusals) == {"hello_unavailable"}
    assert counts["opens_retried"] == refusals["hello_unavailable"]
    assert counts["sockets_opened"] == 2
    assert counts["sockets_failed"] == 0
    await watcher.close()
    await conversation.close()
