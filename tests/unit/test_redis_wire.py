"""gateway.backends.redis_wire: `Messages`, the replies of a subscribed connection, split out of its
byte stream however it arrives; `pack`, a command as redis-py packs it. (The broker reading real Redis through it is tested by the broker
contract and the multi-instance suites.)"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from redis.asyncio.connection import Connection
from redis.exceptions import DataError, InvalidResponse, NoScriptError, ReadOnlyError, ResponseError

from gateway.backends.redis_wire import Messages, pack

STREAM = (
    b"*3\r\n$9\r\nsubscribe\r\n$6\r\nconv:a\r\n:1\r\n"
    b"*3\r\n$7\r\nmessage\r\n$6\r\nconv:a\r\n$13\r\n7\nai_delta\n\r\n\r\n"  # data holding CR LF
    b"*4\r\n$8\r\npmessage\r\n$2\r\nc*\r\n$6\r\nconv:b\r\n$0\r\n\r\n"
    b"*3\r\n$11\r\nunsubscribe\r\n$-1\r\n:0\r\n"
    b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"
    b"-ERR unknown command 'NOPE'\r\n"
    b"+OK\r\n"
    b":42\r\n"
    b">3\r\n$7\r\nmessage\r\n$6\r\nconv:c\r\n$2\r\nhi\r\n"  # RESP3 pushes
    b">3\r\n$9\r\nsubscribe\r\n$6\r\nconv:c\r\n:2\r\n"
    b"_\r\n"
    b"$5\r\nhe\r\no\r\n"  # top-level bulk strings (a command's reply), one holding CR LF
    b"$-1\r\n"
)

EXPECTED: list[object] = [
    [b"subscribe", b"conv:a", 1],
    [b"message", b"conv:a", b"7\nai_delta\n\r\n"],
    [b"pmessage", b"c*", b"conv:b", b""],
    [b"unsubscribe", None, 0],
    [b"pong", b""],
    ("error", "unknown command 'NOPE'"),
    b"OK",
    42,
    [b"message", b"conv:c", b"hi"],
    [b"subscribe", b"conv:c", 2],
    None,
    b"he\r\no",
    None,
]


def _comparable(replies: Sequence[object]) -> list[object]:
    return [("error", str(r)) if isinstance(r, ResponseError) else r for r in replies]


def test_a_stream_read_whole_gives_every_reply_in_order() -> None:
    assert _comparable(Messages().feed(STREAM)) == EXPECTED


@pytest.mark.parametrize("piece", [1, 2, 3, 5, 7, 11, 16, 64])
def test_a_stream_cut_anywhere_gives_the_same_replies(piece: int) -> None:
    messages = Messages()
    replies: list[object] = []
    for at in range(0, len(STREAM), piece):
        replies.extend(messages.feed(STREAM[at : at + piece]))
    assert _comparable(replies) == EXPECTED


def test_every_split_point_of_a_message_holds_it_back_until_complete() -> None:
    one = b"*3\r\n$7\r\nmessage\r\n$6\r\nconv:a\r\n$5\r\nhello\r\n"
    for cut in range(1, len(one)):
        messages = Messages()
        assert messages.feed(one[:cut]) == []
        assert messages.feed(one[cut:]) == [[b"message", b"conv:a", b"hello"]]


def test_a_malformed_stream_is_refused_not_skipped() -> None:
    with pytest.raises(InvalidResponse):
        Messages().feed(b"*x\r\n")
    with pytest.raises(InvalidResponse):
        Messages().feed(b"*1\r\n%2\r\n")
    with pytest.raises(InvalidResponse):
        Messages().feed(b"!oops\r\n")


def test_error_replies_become_redis_pys_own_exceptions() -> None:
    """The same classes redis-py's parsers give, so that the broker translates them alike."""
    replies = Messages().feed(
        b"-READONLY You can't write against a read only replica.\r\n-NOSCRIPT No matching script\r\n"
    )
    assert isinstance(replies[0], ReadOnlyError)
    assert isinstance(replies[1], NoScriptError)


@pytest.mark.parametrize(
    "args",
    [
        ("PING",),
        ("EVALSHA", "a" * 40, 3, "k:{conv:é}:meta", b"\x00\r\n", -7, 0, "", "日本語 text\n"),
        ("SET", "k", "x" * 100_000),
    ],
)
def test_a_command_is_packed_byte_for_byte_as_redis_py_packs_it(args: tuple[str | bytes | int, ...]) -> None:
    assert pack(args) == b"".join(Connection().pack_command(*args))


@pytest.mark.parametrize("bad", [True, 1.5, None, ["a"]])
def test_an_argument_of_another_type_is_refused(bad: object) -> None:
    with pytest.raises(DataError, match="must be str, bytes or int"):
        pack(("SET", "k", bad))  # type: ignore[arg-type]
