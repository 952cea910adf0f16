"""The HTTP side: widget sessions, history, health, readiness and metrics."""

from __future__ import annotations

import httpx
import jwt

from tests.e2e.client import Client, new_widget, stored_history
from tests.servers import GatewayProcess


def history(gw: GatewayProcess, conversation_id: str, token: str | None, **params: int) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(f"{gw.http}/v1/conversations/{conversation_id}/messages", params=params, headers=headers)


def test_widget_session_issues_a_signed_expiring_token(gateway: GatewayProcess) -> None:
    r = httpx.post(f"{gateway.http}/v1/widget/sessions", json={"business": "demo"})
    assert r.status_code == 201
    body = r.json()
    claims = jwt.decode(body["token"], options={"verify_signature": False})
    assert claims["cid"] == body["conversation_id"]
    assert claims["role"] == "user"
    assert claims["exp"] - claims["iat"] == body["expires_in"] == 3600


def test_widget_session_errors_are_json_with_a_code(gateway: GatewayProcess) -> None:
    cases = [
        (b"not json", 400, "bad_request"),
        (b"[]", 400, "bad_request"),
        (b"{}", 400, "bad_request"),
        (b'{"business": "no-such-business"}', 404, "not_found"),
        (b'{"business": "demo", "user": {"id": "u1", "hash": "x"}}', 400, "bad_request"),
        (b'{"business": "demo", "conversation_id": "c-1"}', 401, "unauthorized"),
    ]
    for body, status, code in cases:
        r = httpx.post(f"{gateway.http}/v1/widget/sessions", content=body)
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["code"] == code
        assert r.json()["error"]["message"]


def test_continuing_a_conversation_needs_its_earlier_token(gateway: GatewayProcess) -> None:
    """A fresh token for an existing conversation is issued only against a token of that conversation."""
    first, other = new_widget(gateway), new_widget(gateway)
    url = f"{gateway.http}/v1/widget/sessions"
    body = {"business": "demo", "conversation_id": first.conversation_id}
    ok = httpx.post(url, json=body, headers={"Authorization": f"Bearer {first.token}"})
    assert ok.status_code == 200
    assert ok.json()["conversation_id"] == first.conversation_id
    refused = httpx.post(url, json=body, headers={"Authorization": f"Bearer {other.token}"})
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "forbidden"


async def test_history_in_seq_order_with_position(gateway: GatewayProcess) -> None:
    """History lists stored messages by seq, filtered by after_seq and limit, with epoch and seq."""
    widget = new_widget(gateway)
    client = await Client.open(gateway)
    welcome = await client.hello(widget)
    seen = []
    for n in range(2):
        await client.send({"type": "message", "client_msg_id": f"h-{n}", "text": f"question {n}"})
        seen += await client.until_ai_end()
    await client.close()
    last = seen[-1]["seq"]

    await stored_history(gateway, widget, 4)
    r = history(gateway, widget.conversation_id, widget.token)
    assert r.status_code == 200
    body = r.json()
    assert body["epoch"] == welcome["epoch"]
    assert body["seq"] == last
    msgs = body["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert [m["seq"] for m in msgs] == sorted(m["seq"] for m in msgs)
    ends = [f for f in seen if f["type"] == "ai_end"]
    assert [m["text"] for m in msgs if m["role"] == "assistant"] == [e["text"] for e in ends]
    assert [m["message_id"] for m in msgs if m["role"] == "assistant"] == [e["message_id"] for e in ends]

    page = history(gateway, widget.conversation_id, widget.token, after_seq=msgs[0]["seq"], limit=2).json()
    assert [m["message_id"] for m in page["messages"]] == [m["message_id"] for m in msgs[1:3]]
    assert page["has_more"] is True


def test_history_of_another_conversation_is_refused(gateway: GatewayProcess) -> None:
    mine, theirs = new_widget(gateway), new_widget(gateway)
    r = history(gateway, theirs.conversation_id, mine.token)
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "forbidden"
    assert history(gateway, mine.conversation_id, None).status_code == 401
    assert history(gateway, mine.conversation_id, "garbage").status_code == 401
    bad = history(gateway, mine.conversation_id, mine.token, limit=0)
    assert bad.status_code == 400
    assert "limit" in bad.json()["error"]["message"]


def test_health_and_readiness_report_each_dependency(gateway: GatewayProcess) -> None:
    assert httpx.get(f"{gateway.http}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{gateway.http}/readyz")
    assert ready.status_code == 200
    checks = ready.json()["checks"]
    if "DATABASE_URL" in gateway.env:
        assert checks == {
            "store": {"backend": "postgres", "ok": True},
            "state_cache": {"backend": "redis", "ok": True},
            "broker": {"backend": "redis", "ok": True},
        }
    else:
        assert checks == {
            "store": {"backend": "memory", "ok": True},
            "broker": {"backend": "memory", "ok": True},
        }


async def test_metrics_count_sockets_frames_messages_and_first_tokens(gateway: GatewayProcess) -> None:
    widget = new_widget(gateway)
    client = await Client.open(gateway)
    await client.hello(widget)
    await client.send({"type": "message", "client_msg_id": "x-1", "text": "count me"})
    await client.until_ai_end()
    await client.ws.send("{oops")
    await client.recv_type("error")
    text = httpx.get(f"{gateway.http}/metrics").text
    await client.close()
    for name in (
        "chatgw_ws_connections ",
        'chatgw_ws_frames_in_total{type="message"}',
        'chatgw_ws_frames_in_total{type="invalid"}',
        'chatgw_ws_frames_out_total{type="delta"}',
        'chatgw_messages_processed_total{outcome="answered"}',
        "chatgw_llm_time_to_first_token_seconds_count",
        'chatgw_errors_total{code="bad_frame"}',
        'chatgw_answers_total{status="complete"}',
        "chatgw_llm_pieces_relayed_total",
        'chatgw_message_processing_seconds_count{step="stage_selection"}',
        'chatgw_template_cache_total{result="miss"}',
    ):
        line = next((ln for ln in text.splitlines() if ln.startswith(name)), None)
        assert line is not None, name
        if name != "chatgw_ws_connections ":
            assert float(line.rsplit(" ", 1)[1]) >= 1, line

    def value(name: str) -> float:
        return float(next(ln for ln in text.splitlines() if ln.startswith(name)).split()[1])

    assert value("chatgw_ws_connections ") >= 1
    if "DATABASE_URL" in gateway.env:
        assert value('chatgw_db_pool_connections{state="open"}') >= 1
        assert any(ln.startswith("chatgw_redis_reconnects ") for ln in text.splitlines())
        # The broker's publishes (on their own connection) and the limiter's counted calls (the
        # message was counted against the shared limits) are on their clients' counters.
        assert (
            value('chatgw_redis_broker{what="commands"}')
            >= value('chatgw_redis_broker{what="round_trips"}')
            >= 1
        )
        assert value('chatgw_redis_limiter{what="commands"}') >= 3
        assert value('chatgw_redis_limiter{what="pool_size"}') == 16
