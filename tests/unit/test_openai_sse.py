"""The event-stream decoder and the chunk reader's parsing, byte by byte (core/openai_sse.py)."""

from __future__ import annotations

import orjson
import pytest

from core.llm import Usage
from core.openai_sse import MAX_EVENT_BYTES, ProviderError, SSEDecoder, SSEFormatError, read_chunk

CHUNK = b'{"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}'


def feed_all(decoder: SSEDecoder, *parts: bytes) -> list[tuple[bytes, bytes]]:
    return [event for part in parts for event in decoder.feed(part)]


def split_everywhere(body: bytes) -> list[list[bytes]]:
    """The body cut in two at every position (and byte by byte)."""
    return [[body[:i], body[i:]] for i in range(1, len(body))] + [[body[i : i + 1] for i in range(len(body))]]


BODY = (
    b": a comment first\n"
    b"data: " + CHUNK + b"\n\n"
    b"event: error\r\n"
    b'data: {"error":\r\n'
    b'data: {"message": "boom"}}\r\n'
    b"\r\n"
    b"id: 7\rretry: 100\rdata: [DONE]\r\r"
)
EXPECTED = [
    (b"", CHUNK),
    (b"error", b'{"error":\n{"message": "boom"}}'),
    (b"", b"[DONE]"),
]


def test_a_body_decodes_to_its_events() -> None:
    assert feed_all(SSEDecoder(), BODY) == EXPECTED


def test_the_same_events_come_out_wherever_the_reads_split_the_body() -> None:
    # Includes a CRLF split between two reads, which must not count as two line ends.
    for parts in split_everywhere(BODY):
        assert feed_all(SSEDecoder(), *parts) == EXPECTED, parts


def test_multi_line_data_is_joined_with_line_feeds() -> None:
    events = feed_all(SSEDecoder(), b'data: {"choices":\ndata: []}\ndata\n\n')
    assert events == [(b"", b'{"choices":\n[]}\n')]


def test_comments_and_events_without_data_are_not_dispatched() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b": keep-alive\n\n:\n\nevent: ping\n\nid: 3\n\n") == []
    # The event type does not leak into the next event.
    assert decoder.feed(b"data: x\n\n") == [(b"", b"x")]


def test_one_space_after_the_colon_is_dropped_and_only_one() -> None:
    assert feed_all(SSEDecoder(), b"data:x\n\ndata:  y\n\n") == [(b"", b"x"), (b"", b" y")]


def test_an_event_cut_by_the_end_of_the_body_is_not_dispatched() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: [DONE]\n") == []  # no empty line yet: the event is not complete


def test_an_endless_line_is_refused() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: " + b"x" * (MAX_EVENT_BYTES - 10)) == []  # long, still accepted
    with pytest.raises(SSEFormatError, match="exceeds"):
        decoder.feed(b"x" * 10)


def test_an_endless_event_is_refused() -> None:
    decoder = SSEDecoder()
    line = b"data: " + b"x" * 1000 + b"\n"
    with pytest.raises(SSEFormatError, match="exceeds"):
        decoder.feed(line * (MAX_EVENT_BYTES // 1000 + 2))  # many data lines and no empty line


def test_a_chunk_gives_its_text() -> None:
    assert read_chunk(CHUNK) == ("Hi", None)


def test_the_usage_chunk_has_no_choices_and_gives_the_usage() -> None:
    data = orjson.dumps(
        {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}}
    )
    assert read_chunk(data) == ("", Usage(12, 3))


@pytest.mark.parametrize(
    ("chunk", "text"),
    [
        ({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}, ""),  # the role chunk
        ({"choices": [{"index": 0, "delta": {"content": None}, "finish_reason": "stop"}]}, ""),
        ({"choices": [{"index": 0, "finish_reason": "stop"}]}, ""),
        ({"id": "x", "object": "chat.completion.chunk"}, ""),
        ({"choices": [{"delta": {"content": "a", "refusal": None}, "logprobs": None}], "usage": None}, "a"),
        ({"choices": [], "usage": {"prompt_tokens": "many"}}, ""),  # usage it cannot read is ignored
    ],
)
def test_unknown_fields_and_chunks_without_text_are_fine(chunk: dict[str, object], text: str) -> None:
    assert read_chunk(orjson.dumps(chunk)) == (text, None)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b'{"choices": [', "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"choices": {"0": {}}}', "choices are not a list of objects"),
        (b'{"choices": ["text"]}', "choices are not a list of objects"),
        (b'{"choices": [{"delta": "Hi"}]}', "delta is not an object"),
        (b'{"choices": [{"delta": {"content": 5}}]}', "content is not a string"),
    ],
)
def test_a_malformed_chunk_is_refused_with_the_problem_named(data: bytes, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as caught:
        read_chunk(data)
    assert data[:10].decode() in str(caught.value)  # the offending chunk is quoted


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            b'{"error": {"message": "the model is overloaded", "type": "server_error"}}',
            "the model is overloaded",
        ),
        (b'{"error": "rate limit"}', "rate limit"),
        (b'{"error": {"code": 500}}', "an error occurred during streaming"),
    ],
)
def test_an_error_chunk_gives_the_providers_message(data: bytes, message: str) -> None:
    with pytest.raises(ProviderError) as caught:
        read_chunk(data)
    assert caught.value.message == message


def test_an_empty_error_field_is_not_an_error() -> None:
    assert read_chunk(b'{"error": null, "choices": [{"delta": {"content": "ok"}}]}') == ("ok", None)
