"""Parsing client frames and encoding server frames, without sockets."""

from __future__ import annotations

import orjson
import pytest

from core.models import Event
from core.types import ConversationId, EventType
from gateway.protocol import (
    AgentAction,
    CloseCode,
    ErrorCode,
    FrameError,
    Hello,
    Resume,
    SendMessage,
    Stop,
    Typing,
    encode,
    error_frame,
    event_frame,
    parse_frame,
)


def test_hello_with_and_without_resume() -> None:
    assert parse_frame('{"type":"hello","token":"t"}') == Hello("t", None, None)
    frame = parse_frame(
        '{"type":"hello","token":"t","conversation_id":"c","resume":{"epoch":"e","last_seq":4}}'
    )
    assert frame == Hello("t", "c", Resume("e", 4))


def test_client_frames_parse_to_their_types() -> None:
    assert parse_frame('{"type":"message","client_msg_id":"a","text":"hi"}') == SendMessage("a", "hi", None)
    assert parse_frame('{"type":"typing","state":false}') == Typing(False, None)
    assert parse_frame('{"type":"stop"}') == Stop(None)
    assert parse_frame('{"type":"takeover","conversation_id":"c"}') == AgentAction("takeover", "c", None)


def test_unknown_fields_are_ignored() -> None:
    assert parse_frame('{"type":"stop","future_field":1}') == Stop(None)


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("", "not valid JSON"),
        ("{", "not valid JSON"),
        ('"text"', "JSON object"),
        ("null", "JSON object"),
        ("{}", "'type'"),
        ('{"type":null}', "'type'"),
        ('{"type":"nope"}', "unknown frame type 'nope'"),
        ('{"type":"hello"}', "missing field 'token'"),
        ('{"type":"hello","token":""}', "'token' must not be empty"),
        ('{"type":"hello","token":"t","resume":5}', "'resume' must be an object"),
        ('{"type":"hello","token":"t","resume":{"epoch":"e","last_seq":-1}}', "last_seq"),
        ('{"type":"hello","token":"t","resume":{"epoch":"e","last_seq":true}}', "last_seq"),
        ('{"type":"hello","token":"t","resume":{"last_seq":1}}', "epoch"),
        ('{"type":"message","client_msg_id":"a","text":3}', "'text' must be a string"),
        ('{"type":"typing"}', "'state' must be true or false"),
        ('{"type":"typing","state":1}', "'state' must be true or false"),
        ('{"type":"subscribe"}', "missing field 'conversation_id'"),
    ],
)
def test_bad_frames_name_the_problem(raw: str, fragment: str) -> None:
    with pytest.raises(FrameError) as info:
        parse_frame(raw)
    assert info.value.code is ErrorCode.BAD_FRAME
    assert fragment in info.value.message


def test_a_bad_message_frame_carries_its_client_msg_id() -> None:
    with pytest.raises(FrameError) as info:
        parse_frame('{"type":"message","client_msg_id":"m-9"}')
    assert info.value.client_msg_id == "m-9"


def test_event_frames_carry_seq_and_payload() -> None:
    event = Event(ConversationId("c"), EventType.DELTA, 7, {"response_id": "r", "text": "hé"})
    assert orjson.loads(encode(event_frame(event))) == {
        "type": "delta",
        "seq": 7,
        "response_id": "r",
        "text": "hé",
    }
    typing = Event(ConversationId("c"), EventType.TYPING, None, {"role": "user", "state": True})
    assert "seq" not in event_frame(typing)


def test_error_frame_fields() -> None:
    assert error_frame(ErrorCode.UNAVAILABLE, "down", retry_after_ms=500) == {
        "type": "error",
        "code": "unavailable",
        "message": "down",
        "retry_after_ms": 500,
    }


def test_close_code_ranges_tell_reconnect_from_give_up() -> None:
    assert CloseCode.SLOW_CONSUMER.should_reconnect
    assert CloseCode.DRAINING.should_reconnect
    assert not CloseCode.UNAUTHORIZED.should_reconnect
    assert not CloseCode.FORBIDDEN.should_reconnect
    assert not CloseCode.TOO_LARGE.should_reconnect


def test_a_close_reason_is_cut_to_fit_a_close_frame() -> None:
    from gateway.connection import MAX_CLOSE_REASON_BYTES, close_reason

    assert close_reason("short") == "short"
    long = close_reason("é" * 200)
    assert len(long.encode()) <= MAX_CLOSE_REASON_BYTES
    assert long == "é" * 61
    assert close_reason("😀" * 40) == "😀" * 30
