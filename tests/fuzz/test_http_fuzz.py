"""Hostile HTTP bodies, paths and query strings against a live gateway: every answer is a success or
a 4xx with the JSON error body `{"error": {"code", "message"}}`, never a 5xx, and the gateway keeps
serving (tests/fuzz/conftest.py checks a bystander's chat, /healthz and the log after each test)."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import httpx
from hypothesis import example, given
from hypothesis import strategies as st

from tests.e2e.client import new_widget
from tests.fuzz.conftest import admin_headers, fuzz_settings
from tests.fuzz.launcher import FUZZ_API_KEY
from tests.fuzz.wire import JSON_VALUES, NASTY, TEXT, field_values
from tests.servers import GatewayProcess

# Query keys and values short enough for a URL (httpx refuses a query over 64 KiB).
QUERY_TEXT = st.lists(st.one_of(NASTY, st.text(max_size=8)), max_size=6).map("".join)

# A body: raw bytes, JSON text of any value, or an object with the endpoint's fields (plausible or not).
ADMIN_FIELDS = [
    "name",
    "description",
    "is_entry",
    "response_template",
    "selection_template",
    "extraction_template",
    "system_prompt",
    "content",
    "type",
    "variables",
    "from",
    "to",
    "condition",
    "priority",
    "field",
    "field_type",
    "kind",
    "pattern",
    "validator",
    "stage",
    "message",
    "state",
    "version",
    "stages",
    "templates",
    "transitions",
    "rules",
    "disabled",
]
SEGMENT = st.one_of(
    st.sampled_from(["greeting", "x", "0", "-1", "00000000-0000-4000-8000-000000000000"]),
    st.lists(st.one_of(NASTY, st.text(max_size=6)), min_size=1, max_size=6).map("".join),
).filter(lambda s: s not in ("", ".", ".."))


# Header values HTTP can carry (visible ASCII and bytes >= 0x80), after any scheme or none.
HEADER_VALUES = st.tuples(
    st.sampled_from([b"Bearer ", b"bearer ", b"Basic ", b""]),
    st.lists(
        st.integers(min_value=0x21, max_value=0xFF).filter(lambda c: c != 0x7F), min_size=1, max_size=60
    ).map(bytes),
).map(b"".join)


def bodies(fields: list[str], *plausible: str) -> st.SearchStrategy[bytes]:
    objects = st.dictionaries(st.sampled_from(fields) | TEXT, field_values(*plausible), max_size=6)
    return st.one_of(
        objects.map(lambda o: json.dumps(o).encode()),
        JSON_VALUES.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=300),
        st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.integers(min_value=1, max_value=5000).map(lambda d: b"[" * d + b"]" * d),
        st.integers(min_value=17_000, max_value=200_000).map(lambda n: b'{"name": "' + b"n" * n + b'"}'),
    )


def check(response: httpx.Response) -> None:
    """A success, or a 4xx with the JSON error body naming the problem."""
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        body = response.json()
        assert isinstance(body["error"]["code"], str), body
        assert body["error"]["message"], body


def test_widget_session_bodies(healthy: GatewayProcess) -> None:
    widget = new_widget(healthy)
    fields = ["business", "user", "conversation_id", "id", "hash"]

    # Known troublemakers first, every run: NUL (which PostgreSQL cannot store in text) in each field.
    @example(body=b'{"business": "demo\\u0000"}', authorization=None, content_type="application/json")
    @example(
        body=b'{"business": "demo", "conversation_id": "\\u0000"}',
        authorization=f"Bearer {widget.token}".encode(),
        content_type="application/json",
    )
    @example(body=b'{"business": "demo", "user": {"id": "\\u0000"}}', authorization=None, content_type="")
    @fuzz_settings(200)
    @given(
        body=bodies(fields, "demo", "fuzz-shop", widget.conversation_id),
        authorization=st.one_of(st.none(), st.just(f"Bearer {widget.token}".encode()), HEADER_VALUES),
        content_type=st.sampled_from(
            ["application/json", "text/plain", "", "application/json; charset=latin-1"]
        ),
    )
    def run(body: bytes, authorization: bytes | None, content_type: str) -> None:
        headers: dict[bytes, bytes] = {b"Content-Type": content_type.encode()}
        if authorization is not None:
            headers[b"Authorization"] = authorization
        check(http.post("/v1/widget/sessions", content=body, headers=headers))

    with httpx.Client(base_url=healthy.http, timeout=30) as http:
        run()


ADMIN_CALLS = [
    ("PUT", "/v1/admin/flow"),
    ("POST", "/v1/admin/flow/validate"),
    ("POST", "/v1/admin/stages"),
    ("PATCH", "/v1/admin/stages/{}"),
    ("DELETE", "/v1/admin/stages/{}"),
    ("GET", "/v1/admin/stages/{}"),
    ("POST", "/v1/admin/transitions"),
    ("PATCH", "/v1/admin/transitions/{}"),
    ("POST", "/v1/admin/templates"),
    ("PATCH", "/v1/admin/templates/{}"),
    ("GET", "/v1/admin/templates/{}"),
    ("POST", "/v1/admin/extraction-rules"),
    ("PATCH", "/v1/admin/extraction-rules/{}"),
    ("POST", "/v1/admin/dry-run"),
    ("GET", "/v1/admin/audit"),
]


def test_admin_api_bodies_paths_and_queries(healthy: GatewayProcess) -> None:
    @example(call=("POST", "/v1/admin/stages"), segment="x", body=b'{"name": "a\\u0000"}', query={})
    @example(call=("GET", "/v1/admin/stages/{}"), segment="a\x00", body=b"", query={})
    @example(
        call=("PATCH", "/v1/admin/templates/{}"), segment="greet", body=b'{"content": "\\u0000"}', query={}
    )
    @example(call=("POST", "/v1/admin/dry-run"), segment="x", body=b'{"message": "hi\\u0000"}', query={})
    @example(call=("GET", "/v1/admin/audit"), segment="x", body=b"", query={"action": "a\x00"})
    @fuzz_settings(250)
    @given(
        call=st.sampled_from(ADMIN_CALLS),
        segment=SEGMENT,
        body=bodies(ADMIN_FIELDS, "greeting", "contact", "{{ message }}", "turns > 1", "email", "text"),
        query=st.dictionaries(
            st.sampled_from(["limit", "cursor", "since", "action"]) | QUERY_TEXT, QUERY_TEXT, max_size=3
        ),
    )
    def run(call: tuple[str, str], segment: str, body: bytes, query: dict[str, str]) -> None:
        method, path = call
        url = path.format(quote(segment, safe="", errors="surrogatepass"))
        response = http.request(
            method,
            url,
            content=body if method in ("PUT", "POST", "PATCH") else None,
            params=_latin(query),
            headers={**admin_headers(FUZZ_API_KEY), "Content-Type": "application/json"},
        )
        check(response)

    with httpx.Client(base_url=healthy.http, timeout=30) as http:
        run()


def test_agent_api_and_history_queries(healthy: GatewayProcess) -> None:
    widget = new_widget(healthy, "fuzz-shop")
    r = httpx.post(f"{healthy.http}/v1/agents", json={"name": "fuzz"}, headers=admin_headers(FUZZ_API_KEY))
    assert r.status_code == 201, r.text
    agent_id = r.json()["agent_id"]
    calls = [
        ("POST", "/v1/agents", "admin"),
        ("PATCH", "/v1/agents/{}", "admin"),
        ("GET", "/v1/agents/{}", "admin"),
        ("POST", "/v1/agents/{}/tokens", "admin"),
        ("GET", "/v1/agents", "admin"),
        ("GET", "/v1/audit", "admin"),
        ("GET", "/v1/conversations/{}/messages", "widget"),
        ("GET", "/v1/conversations/{}/messages", "admin"),
    ]

    @example(call=calls[0], segment="x", body=b'{"name": "\\u0000"}', query={})
    @example(call=calls[2], segment="\x00", body=b"", query={})
    @example(call=calls[6], segment="\x00", body=b"", query={})
    @example(call=calls[7], segment=widget.conversation_id, body=b"", query={"after_seq": "\x00"})
    @example(call=calls[5], segment="x", body=b"", query={"conversation_id": "\x00", "since": "\x00"})
    @fuzz_settings(250)
    @given(
        call=st.sampled_from(calls),
        segment=st.one_of(st.sampled_from([agent_id, widget.conversation_id]), SEGMENT),
        body=bodies(["name", "disabled"], "a name", agent_id),
        query=st.dictionaries(
            st.sampled_from(["limit", "after_seq", "cursor", "since", "until", "agent_id", "conversation_id"])
            | QUERY_TEXT,
            st.one_of(QUERY_TEXT, st.integers().map(str)),
            max_size=3,
        ),
    )
    def run(call: tuple[str, str, str], segment: str, body: bytes, query: dict[str, str]) -> None:
        method, path, who = call
        url = path.format(quote(segment, safe="", errors="surrogatepass"))
        auth = widget.token if who == "widget" else FUZZ_API_KEY
        response = http.request(
            method,
            url,
            content=body if method in ("POST", "PATCH") else None,
            params=_latin(query),
            headers={"Authorization": f"Bearer {auth}", "Content-Type": "application/json"},
        )
        check(response)

    with httpx.Client(base_url=healthy.http, timeout=30) as http:
        run()


def _latin(query: dict[str, Any]) -> dict[str, str]:
    """Query parameters as text httpx can send (lone surrogates as their UTF-8 bytes, percent-encoded)."""
    return {
        k.encode("utf-8", "surrogatepass").decode("utf-8", "replace"): str(v)
        .encode("utf-8", "surrogatepass")
        .decode("utf-8", "replace")
        for k, v in query.items()
    }
