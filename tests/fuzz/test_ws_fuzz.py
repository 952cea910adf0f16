"""Hostile WebSocket frames against a live gateway: every one is answered with the protocol's
`error` frame or close code, never `internal`, and the gateway keeps serving (tests/fuzz/conftest.py
checks a bystander's chat, /healthz and the log after each test)."""

from __future__ import annotations

from typing import Any

import httpx
from hypothesis import example, given
from hypothesis import strategies as st

from tests.e2e.client import Widget, new_widget
from tests.fuzz.conftest import admin_headers, fuzz_settings
from tests.fuzz.launcher import FUZZ_API_KEY
from tests.fuzz.wire import CLIENT_TYPES, GARBAGE, HUGE, Huge, Raw, Session, encode, frames
from tests.servers import GatewayProcess

WIDGET_TYPES = ["message", "typing", "stop", "hello", *CLIENT_TYPES[4:]]


def greeted(gw: GatewayProcess, token: str) -> Session:
    session = Session.open(gw)
    session.send(encode({"type": "hello", "token": token}, ascii_only=True))
    welcome = session.recv()
    assert welcome is not None
    assert welcome["type"] == "welcome", welcome
    return session


def test_garbage_frames_after_hello_each_get_bad_frame(healthy: GatewayProcess) -> None:
    widget = new_widget(healthy)

    @fuzz_settings(80)
    @given(garbage=st.lists(GARBAGE, min_size=1, max_size=5))
    def run(garbage: list[Raw]) -> None:
        session = greeted(healthy, widget.token)
        try:
            sent = 0
            for raw in garbage:
                if not session.send(raw):
                    break
                sent += 1
            if session.probe():
                assert [e["code"] for e in session.errors()] == ["bad_frame"] * sent
            else:  # refused on the way (too large, not UTF-8): the close code was checked
                assert session.closed
        finally:
            session.close()

    run()


def test_frames_of_every_type_with_hostile_fields_after_hello(healthy: GatewayProcess) -> None:
    widget = new_widget(healthy)
    other = new_widget(healthy)

    # Known troublemakers first, every run: NUL (which PostgreSQL cannot store in text) in each field.
    @example(
        batch=[{"type": "message", "client_msg_id": "nul", "text": "a\x00b"}], ascii_only=True, huge=None
    )
    @example(batch=[{"type": "message", "client_msg_id": "a\x00", "text": "hi"}], ascii_only=False, huge=None)
    @example(batch=[{"type": "typing", "state": True, "conversation_id": "\x00"}], ascii_only=True, huge=None)
    @fuzz_settings(80)
    @given(
        batch=st.lists(
            frames(WIDGET_TYPES, widget.conversation_id, other.conversation_id, token=widget.token),
            min_size=1,
            max_size=6,
        ),
        ascii_only=st.booleans(),
        huge=st.one_of(st.none(), HUGE),
    )
    def run(batch: list[dict[str, Any]], ascii_only: bool, huge: Huge | None) -> None:
        session = greeted(healthy, widget.token)
        try:
            for frame in batch:
                if not session.send(encode(frame, ascii_only=ascii_only)):
                    return
            if huge is not None:
                session.send(huge)
                while session.recv() is not None:  # the answers to what came before
                    pass
                assert session.close_code in (1009, None)  # None: see Session._closed
                return
            session.probe()
        finally:
            session.close()

    run()


def test_hostile_hellos_get_a_welcome_or_an_error_and_a_close(healthy: GatewayProcess) -> None:
    widget = new_widget(healthy)
    other = new_widget(healthy)
    forged = widget.token[:-4] + ("AAAA" if not widget.token.endswith("AAAA") else "BBBB")

    @example(first={"type": "hello", "token": widget.token, "conversation_id": "\x00"}, ascii_only=True)
    @example(
        first={"type": "hello", "token": widget.token, "resume": {"epoch": "\x00", "last_seq": 1}},
        ascii_only=True,
    )
    @fuzz_settings(60)
    @given(
        first=st.one_of(
            frames(["hello"], widget.conversation_id, other.conversation_id, token=widget.token),
            frames(["hello"], widget.conversation_id, token=forged),
            GARBAGE,
        ),
        ascii_only=st.booleans(),
    )
    def run(first: dict[str, Any] | Raw, ascii_only: bool) -> None:
        session = Session.open(healthy)
        try:
            session.send(encode(first, ascii_only=ascii_only) if isinstance(first, dict) else first)
            reply = session.recv()
            if reply is None:  # refused by the WebSocket layer (too large, not UTF-8)
                return
            if reply["type"] == "welcome":
                assert reply["conversation_id"] == widget.conversation_id
                assert session.probe()
                return
            assert reply["type"] == "error", reply
            assert reply["code"] in ("unauthorized", "forbidden", "not_found", "unavailable"), reply
            assert session.recv() is None
            assert session.close_code in (4401, 4403, 1013)
        finally:
            session.close()

    run()


def agent_token(gw: GatewayProcess) -> str:
    r = httpx.post(f"{gw.http}/v1/agents", json={"name": "fuzz agent"}, headers=admin_headers(FUZZ_API_KEY))
    assert r.status_code == 201, r.text
    agent_id = r.json()["agent_id"]
    r = httpx.post(f"{gw.http}/v1/agents/{agent_id}/tokens", headers=admin_headers(FUZZ_API_KEY))
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


def test_agent_frames_with_hostile_fields(healthy: GatewayProcess) -> None:
    token = agent_token(healthy)
    own: Widget = new_widget(healthy, "fuzz-shop")
    foreign = new_widget(healthy)  # of the demo business: the agent may never touch it

    @example(batch=[{"type": "subscribe", "conversation_id": "\x00"}], ascii_only=True)
    @example(
        batch=[
            {"type": "takeover", "conversation_id": own.conversation_id},
            {"type": "message", "conversation_id": own.conversation_id, "client_msg_id": "n", "text": "\x00"},
        ],
        ascii_only=True,
    )
    @fuzz_settings(60)
    @given(
        batch=st.lists(
            frames(CLIENT_TYPES, own.conversation_id, foreign.conversation_id, token=token),
            min_size=1,
            max_size=6,
        ),
        ascii_only=st.booleans(),
    )
    def run(batch: list[dict[str, Any]], ascii_only: bool) -> None:
        session = greeted(healthy, token)
        try:
            for frame in batch:
                if not session.send(encode(frame, ascii_only=ascii_only)):
                    return
            session.probe()
            for received in session.received:
                assert (
                    received.get("conversation_id") != foreign.conversation_id or received["type"] == "error"
                )
        finally:
            session.close()

    run()
