"""`chatgw serve` refuses what it cannot run, before starting anything, with one clear line."""

from __future__ import annotations

import gc

import pytest

from gateway.cli import main, serve_command, settle_heap
from gateway.settings import Settings


@pytest.mark.parametrize(
    "env",
    [{}, {"DATABASE_URL": "postgresql://db/chat"}, {"REDIS_URL": "redis://cache/0"}],
)
def test_several_workers_need_postgresql_and_redis(
    env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    code = serve_command(Settings.from_env(env), host="127.0.0.1", port=1, workers=2)

    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--workers 2 needs DATABASE_URL and REDIS_URL" in err
    assert "each worker would keep its own conversations" in err


@pytest.mark.parametrize("value", ["0", "-1", "two", "1000"])
def test_a_bad_number_of_workers_is_refused(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["serve", "--workers", value])

    assert caught.value.code == 2
    assert "argument --workers" in capsys.readouterr().err


def test_an_unknown_event_loop_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--loop", "trio"])

    assert "argument --loop: invalid choice" in capsys.readouterr().err


def test_the_model_limits_fit_a_busy_site_and_can_be_changed() -> None:
    defaults = Settings.from_env({})
    # Hundreds of live answers for one business, and requests enough to start them all in a minute.
    assert defaults.llm_concurrency >= 200
    assert defaults.llm_requests_per_minute >= 60 * defaults.llm_concurrency / 10
    tuned = Settings.from_env({"CHATGW_LLM_CONCURRENCY": "16", "CHATGW_LLM_REQUESTS_PER_MINUTE": "500"})
    assert (tuned.llm_concurrency, tuned.llm_requests_per_minute) == (16, 500)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--port", "70000"], "argument --port: expected a port from 1 to 65535, got 70000"),
        (["--port", "0"], "argument --port: expected a port from 1 to 65535, got 0"),
        (["--port", "eighty"], "argument --port: expected a port number, got 'eighty'"),
        (["--host", "two words"], "argument --host: expected an IP address or a host name"),
        (["--host", ""], "argument --host: expected an IP address or a host name"),
        (["--host", "under_score.example"], "argument --host: expected an IP address or a host name"),
    ],
)
def test_a_bad_flag_is_refused_in_one_line(
    args: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["serve", *args])

    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"chatgw serve: {expected}")
    assert err.endswith("(see chatgw serve --help)\n")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "127.0.0.1", "localhost", "gw-1.internal.example"])
def test_addresses_and_host_names_are_accepted(host: str) -> None:
    from gateway.cli import _host

    assert _host(host) == host


def test_once_serving_the_youngest_generation_gets_the_configured_threshold() -> None:
    before = gc.get_threshold()
    try:
        settle_heap(12_345)
        assert gc.get_threshold() == (12_345, before[1], before[2])
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
