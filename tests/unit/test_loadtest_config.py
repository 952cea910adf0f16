"""The load tool's options: loopback targets only unless allowed, caps with errors that name the
option, URLs normalised to the HTTP base and the WebSocket endpoint; and its integrity verdict."""

from __future__ import annotations

import pytest

from gateway.loadtest.cli import EXIT_USAGE, main
from gateway.loadtest.config import ConfigError, Target, parse, target
from gateway.loadtest.report import problems


def test_urls_become_an_http_base_and_the_ws_endpoint() -> None:
    assert target("http://127.0.0.1:8000", allow_remote=False) == Target(
        "http://127.0.0.1:8000", "ws://127.0.0.1:8000/ws"
    )
    assert target("ws://localhost:9/ws", allow_remote=False) == Target(
        "http://localhost:9", "ws://localhost:9/ws"
    )
    assert target("https://[::1]:8443/", allow_remote=False) == Target(
        "https://[::1]:8443", "wss://[::1]:8443/ws"
    )
    assert target("http://127.1.2.3:80/prefix/", allow_remote=False).ws == "ws://127.1.2.3:80/prefix/ws"


@pytest.mark.parametrize(
    "url", ["http://10.0.0.1:8000", "http://192.168.1.2", "http://example.com:8000", "http://[2001:db8::1]"]
)
def test_targets_off_the_loopback_need_allow_remote(url: str) -> None:
    with pytest.raises(ConfigError, match=r"not a loopback address.*--allow-remote"):
        parse(["--url", url])
    assert parse(["--url", url, "--allow-remote"]).targets[0].http == url


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--url", "ftp://127.0.0.1"], "expected a base URL"),
        (["--url", "http://127.0.0.1:99999"], "port"),
        (["--conversations", "0"], "--conversations must be between 1 and 10000"),
        (["--conversations", "10001"], "--conversations must be between 1 and 10000"),
        (["--duration", "0.5"], "--duration must be between 1 and 3600"),
        (["--duration", "7200"], "--duration must be between 1 and 3600"),
        (["--watchers-per-conversation", "9"], "--watchers-per-conversation"),
        (["--stop-rate", "1.5"], "--stop-rate"),
        (["--message-interval", "0"], "--message-interval"),
        (["--processes", "3", "--conversations", "2"], "--processes must be between 1 and 2"),
        (["--conversations", "10000", "--watchers-per-conversation", "8"], "over the cap of 50000"),
        (["--business", " "], "--business"),
        (["--model-server", "http://10.1.1.1:8100"], "--allow-remote"),
        (["--open-within", "-1"], "--open-within must be between 0 and 3600"),
    ],
)
def test_bad_options_are_refused_naming_the_option(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(argv)


def test_the_command_prints_the_problem_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--url", "http://10.0.0.1:1"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("chatgw loadtest: --url")
    assert "Traceback" not in err


def test_defaults_and_the_socket_count() -> None:
    config = parse(["--url", "http://127.0.0.1:1", "--url", "http://127.0.0.1:2", "--conversations", "7"])
    assert [t.http for t in config.targets] == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    assert config.sockets == 14  # one user and one watcher each, by default
    assert config.public()["urls"] == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    assert config.public()["open_within_s"] == 60.0  # refused opens are tried again for up to 60 s
    assert parse(["--open-within", "0"]).open_within == 0


def _report(**changes: int) -> dict[str, object]:
    integrity = {
        "seq_gaps": 0,
        "seq_duplicates": 0,
        "late_deltas": 0,
        "duplicate_ai_end": 0,
        "text_mismatches": 0,
    }
    messages = {"unacked": 0}
    answers = {"unfinished": 0}
    for key, value in changes.items():
        for group in (integrity, messages, answers):
            if key in group:
                group[key] = value
    return {"integrity": integrity, "messages": messages, "answers": answers}


def test_integrity_problems_are_named() -> None:
    assert problems(_report()) == []
    assert problems(_report(seq_gaps=2)) == ["seq gaps: 2"]
    assert problems(_report(late_deltas=1, unacked=3)) == ["late deltas: 1", "messages never acknowledged: 3"]
    assert problems(_report(unfinished=1)) == ["answers without ai_end: 1"]
