"""Who may use a business's chat, over real sockets and HTTP: the `Origin` check, CORS only where
a browser needs it, verified identity, admin key rotation, the operator token of /metrics and
/readyz, JSON 404/405 on the API, and text PostgreSQL cannot store refused at the edge."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import jwt
import pytest
from websockets.exceptions import ConnectionClosed

from tests.e2e.agents import AgentClient, new_agent
from tests.e2e.client import Client, Widget, new_widget
from tests.servers import TEST_SECRET, GatewayProcess
from tests.tenant_gateway import ROTATING_API_KEY, THIRD_API_KEY

METRICS_TOKEN = "operator-token-for-the-e2e-suite"
SHOP = "https://shop.example.com"
EVIL = "https://evil.example"


@pytest.fixture(scope="module")
def access_gateway(gateway_factory: Callable[..., GatewayProcess]) -> GatewayProcess:
    """The tenant gateway (demo, other-shop, third-shop) with /metrics and /readyz behind a token;
    a process of this module's own, since its tests rotate third-shop's key."""
    return gateway_factory({"CHATGW_METRICS_TOKEN": METRICS_TOKEN}, module="tests.tenant_gateway")


class Admin:
    def __init__(self, gw: GatewayProcess, key: str) -> None:
        self.gw = gw
        self.key = key

    def __call__(self, method: str, path: str, body: Any = None, key: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key or self.key}"}
        return httpx.request(method, f"{self.gw.http}{path}", json=body, headers=headers, timeout=10)


@pytest.fixture
def third(access_gateway: GatewayProcess) -> Iterator[Admin]:
    """third-shop's admin; its access settings are put back as seeded afterwards."""
    admin = Admin(access_gateway, THIRD_API_KEY)
    yield admin
    reset = {"allowed_origins": [], "require_origin": False}
    assert admin("PATCH", "/v1/admin/business", reset).status_code == 200
    assert admin("DELETE", "/v1/admin/identity-secret").status_code == 204


def session(gw: GatewayProcess, business: str, origin: str | None = None, **body: Any) -> httpx.Response:
    headers = {"Origin": origin} if origin else {}
    return httpx.post(f"{gw.http}/v1/widget/sessions", json={"business": business, **body}, headers=headers)


async def hello(gw: GatewayProcess, token: str, origin: str | None) -> tuple[dict[str, Any], int | None]:
    """The answer to hello from a socket opened by a page of `origin`, and the close code if the
    server closed it."""
    client = await Client.open(gw, origin=origin) if origin else await Client.open(gw)
    await client.send({"type": "hello", "token": token})
    first = await client.recv()
    try:
        await client.recv(timeout=5)
    except ConnectionClosed:
        return first, client.ws.close_code
    except TimeoutError:
        pass
    await client.close()
    return first, None


def refused(response: httpx.Response, status: int, code: str, fragment: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert fragment in error["message"], error


async def test_a_widget_is_refused_on_pages_its_business_does_not_allow(
    access_gateway: GatewayProcess, third: Admin
) -> None:
    gw = access_gateway
    r = third("PATCH", "/v1/admin/business", {"allowed_origins": ["https://SHOP.example.com:443/"]})
    assert r.status_code == 200
    assert r.json()["allowed_origins"] == [SHOP]

    refused(session(gw, "third-shop", EVIL), 403, "forbidden", f"origin '{EVIL}' is not allowed")
    allowed = session(gw, "third-shop", SHOP)
    assert allowed.status_code == 201
    assert allowed.headers["access-control-allow-origin"] == SHOP
    assert session(gw, "third-shop").status_code == 201  # no Origin: not a browser page

    token = allowed.json()["token"]
    error, code = await hello(gw, token, EVIL)
    assert (error["type"], error["code"], code) == ("error", "forbidden", 4403)
    assert EVIL in error["message"]
    welcome, code = await hello(gw, token, SHOP)
    assert (welcome["type"], code) == ("welcome", None)
    welcome, code = await hello(gw, token, None)
    assert (welcome["type"], code) == ("welcome", None)

    # History follows the same rule.
    url = f"{gw.http}/v1/conversations/{allowed.json()['conversation_id']}/messages"
    auth = {"Authorization": f"Bearer {token}"}
    refused(httpx.get(url, headers={**auth, "Origin": EVIL}), 403, "forbidden", "not allowed")
    read = httpx.get(url, headers={**auth, "Origin": SHOP})
    assert read.status_code == 200
    assert read.headers["access-control-allow-origin"] == SHOP

    # require_origin: clients outside a browser are refused too.
    assert third("PATCH", "/v1/admin/business", {"require_origin": True}).json()["require_origin"] is True
    refused(session(gw, "third-shop"), 403, "forbidden", "no Origin")
    error, code = await hello(gw, token, None)
    assert (error["code"], code) == ("forbidden", 4403)
    welcome, _ = await hello(gw, token, SHOP)
    assert welcome["type"] == "welcome"


async def test_the_demo_business_allows_its_own_pages_only(access_gateway: GatewayProcess) -> None:
    gw = access_gateway
    own = f"http://127.0.0.1:{gw.port}"
    r = session(gw, "demo", own)
    assert r.status_code == 201
    welcome, code = await hello(gw, r.json()["token"], own)
    assert (welcome["type"], code) == ("welcome", None)
    for stranger in (EVIL, f"http://127.0.0.1:{gw.port + 1}", f"https://127.0.0.1:{gw.port}0"):
        refused(session(gw, "demo", stranger), 403, "forbidden", "not allowed for business 'demo'")
        error, code = await hello(gw, r.json()["token"], stranger)
        assert (error["code"], code) == ("forbidden", 4403)


async def test_agent_sockets_take_the_gateway_console_and_the_business_origins(
    access_gateway: GatewayProcess, third: Admin
) -> None:
    gw = access_gateway
    assert third("PATCH", "/v1/admin/business", {"allowed_origins": [SHOP]}).status_code == 200
    agent = new_agent(gw, THIRD_API_KEY)
    for origin, expected in (
        (f"http://127.0.0.1:{gw.port}", "welcome"),  # the gateway's own console
        (SHOP, "welcome"),
        (None, "welcome"),  # tools outside a browser
        (EVIL, "error"),
    ):
        client = await AgentClient.open(gw, origin=origin) if origin else await AgentClient.open(gw)
        await client.send({"type": "hello", "token": agent.token})
        first = await client.recv()
        assert first["type"] == expected, (origin, first)
        if expected == "error":
            assert first["code"] == "forbidden"
            with pytest.raises(ConnectionClosed):
                await client.recv()
            assert client.ws.close_code == 4403
        await client.close()


def test_cors_only_on_the_widget_endpoints(access_gateway: GatewayProcess) -> None:
    gw = access_gateway
    preflight = {"Origin": SHOP, "Access-Control-Request-Method": "POST"}
    for path in ("/v1/widget/sessions", "/v1/conversations/c-1/messages"):
        r = httpx.options(
            f"{gw.http}{path}", headers={**preflight, "Access-Control-Request-Headers": "authorization"}
        )
        assert r.status_code == 204
        assert r.headers["access-control-allow-origin"] == SHOP
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        assert "access-control-allow-credentials" not in r.headers
    admin = {"Authorization": f"Bearer {THIRD_API_KEY}", "Origin": SHOP}
    for path in ("/v1/admin/flow", "/v1/agents", "/v1/admin/business", "/v1/audit", "/v1/agents/me/team"):
        r = httpx.options(f"{gw.http}{path}", headers=preflight)
        assert r.status_code == 405, (path, r.text)
        assert r.json()["error"]["code"] == "method_not_allowed"
        assert "access-control-allow-origin" not in r.headers
        assert "access-control-allow-origin" not in httpx.get(f"{gw.http}{path}", headers=admin).headers


def test_api_paths_answer_404_and_405_in_json(access_gateway: GatewayProcess) -> None:
    gw = access_gateway
    r = httpx.get(f"{gw.http}/v1/no-such-thing")
    refused(r, 404, "not_found", "no such endpoint: GET /v1/no-such-thing")
    r = httpx.delete(f"{gw.http}/v1/widget/sessions")
    refused(r, 405, "method_not_allowed", "DELETE is not allowed")
    assert r.headers["allow"] == "OPTIONS, POST"
    r = httpx.put(f"{gw.http}/v1/agents/a-1", headers={"Authorization": f"Bearer {THIRD_API_KEY}"})
    refused(r, 405, "method_not_allowed", "use GET, HEAD, PATCH")
    # Outside the API, Starlette's plain answers stay.
    page = httpx.get(f"{gw.http}/no-such-page")
    assert page.status_code == 404
    assert page.headers["content-type"].startswith("text/plain")


def test_metrics_and_readiness_need_the_operator_token(access_gateway: GatewayProcess) -> None:
    gw = access_gateway
    for path in ("/metrics", "/readyz"):
        refused(httpx.get(f"{gw.http}{path}"), 401, "unauthorized", "CHATGW_METRICS_TOKEN")
        wrong = httpx.get(f"{gw.http}{path}", headers={"Authorization": f"Bearer {METRICS_TOKEN}x"})
        refused(wrong, 401, "unauthorized", "wrong token")
        ok = httpx.get(f"{gw.http}{path}", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert ok.status_code == 200, ok.text
    assert httpx.get(f"{gw.http}/healthz").json() == {"status": "ok"}  # liveness stays open


def sign(secret: str, user_id: str) -> str:
    return hmac.new(secret.encode(), user_id.encode(), hashlib.sha256).hexdigest()


def test_verified_identity_is_proved_by_the_business_server_hmac(
    access_gateway: GatewayProcess, third: Admin
) -> None:
    gw = access_gateway
    user = {"id": "customer-7", "hash": sign("not-the-secret", "customer-7")}
    refused(session(gw, "third-shop", user=user), 400, "bad_request", "no identity secret")
    made = third("POST", "/v1/admin/identity-secret")
    assert made.status_code == 201
    secret = made.json()["identity_secret"]
    assert third("GET", "/v1/admin/business").json()["identity_verification"] is True

    refused(session(gw, "third-shop", user=user), 403, "forbidden", "user.hash")
    user["hash"] = sign(secret, "customer-7")
    first = session(gw, "third-shop", user=user)
    assert first.status_code == 201
    assert first.json()["verified"] is True
    second = session(gw, "third-shop", user=user)
    sub = jwt.decode(first.json()["token"], TEST_SECRET, audience="chatgw", algorithms=["HS256"])["sub"]
    assert (
        jwt.decode(second.json()["token"], TEST_SECRET, audience="chatgw", algorithms=["HS256"])["sub"] == sub
    )
    # The verified user continues their conversation from anywhere, without its earlier token...
    cid = first.json()["conversation_id"]
    again = session(gw, "third-shop", user=user, conversation_id=cid)
    assert again.status_code == 200
    assert again.json()["conversation_id"] == cid
    # ...and nobody else does: not another verified user, not an anonymous visitor.
    other = {"id": "customer-8", "hash": sign(secret, "customer-8")}
    refused(
        session(gw, "third-shop", user=other, conversation_id=cid),
        403,
        "forbidden",
        "not the verified user's",
    )
    assert session(gw, "third-shop", conversation_id=cid).status_code == 401

    # A new secret invalidates hashes made with the old one.
    assert third("POST", "/v1/admin/identity-secret").json()["replaced"] is True
    refused(session(gw, "third-shop", user=user), 403, "forbidden", "user.hash")
    actions = [e["action"] for e in third("GET", "/v1/audit?limit=5").json()["entries"]]
    assert actions[:2] == ["identity_secret.create", "identity_secret.create"]
    assert secret not in third("GET", "/v1/audit?limit=5").text


def test_a_rotated_admin_key_works_until_revoked_and_each_step_is_audited(
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    # A process of its own: its start sets rotating-shop's key again (the test rotates it away).
    admin = Admin(gateway_factory(module="tests.tenant_gateway"), ROTATING_API_KEY)
    r = admin("POST", "/v1/admin/api-keys", {"overlap_s": 3600})
    assert r.status_code == 201, r.text
    new_key = r.json()["api_key"]
    assert r.json()["previous_key_valid_until"] is not None
    for key in (ROTATING_API_KEY, new_key):  # both work during the overlap
        assert admin("GET", "/v1/admin/business", key=key).status_code == 200
    revoke = admin("DELETE", "/v1/admin/api-keys/previous", key=new_key)
    assert revoke.json() == {"revoked": True}
    refused(admin("GET", "/v1/admin/business"), 401, "unauthorized", "unknown API key")
    assert admin("GET", "/v1/admin/business", key=new_key).json()["previous_key_valid_until"] is None

    # overlap_s 0: the replaced key stops at once.
    newest = admin("POST", "/v1/admin/api-keys", {"overlap_s": 0}, key=new_key).json()["api_key"]
    refused(admin("GET", "/v1/admin/business", key=new_key), 401, "unauthorized", "unknown API key")
    entries = admin("GET", "/v1/audit?limit=3", key=newest).json()["entries"]
    assert [e["action"] for e in entries] == ["api_key.rotate", "api_key.revoke_previous", "api_key.rotate"]
    assert new_key not in str(entries)
    assert newest not in str(entries)
    refused(
        admin("POST", "/v1/admin/api-keys", {"overlap_s": -1}, key=newest), 400, "bad_request", "overlap_s"
    )


def test_bad_origins_are_refused_by_name(access_gateway: GatewayProcess, third: Admin) -> None:
    for body, fragment in (
        ({"allowed_origins": ["shop.example.com"]}, "allowed_origins[0]"),
        ({"allowed_origins": [SHOP, "https://shop.example.com/path"]}, "allowed_origins[1]"),
        ({"allowed_origins": SHOP}, "must be a list"),
        ({"allowed_origins": [SHOP] * 101}, "at most 100"),
        ({"require_origin": "yes"}, "require_origin"),
        ({"name": "x"}, "unknown field"),
    ):
        refused(third("PATCH", "/v1/admin/business", body), 400, "bad_request", fragment)
    assert third("GET", "/v1/admin/business").json()["allowed_origins"] == []


NUL = "before\x00after"


async def test_text_that_cannot_be_stored_is_refused_at_the_edge(access_gateway: GatewayProcess) -> None:
    """A NUL character anywhere (a message, a client id, an admin field, a query or path
    parameter) is a clear 400 or bad_frame, never a database error; the socket goes on."""
    gw = access_gateway
    admin = {"Authorization": f"Bearer {THIRD_API_KEY}"}
    http = [
        httpx.post(f"{gw.http}/v1/widget/sessions", json={"business": NUL}),
        httpx.post(f"{gw.http}/v1/agents", json={"name": NUL}, headers=admin),
        httpx.post(f"{gw.http}/v1/admin/templates", json={"name": "t", "content": NUL}, headers=admin),
        httpx.post(f"{gw.http}/v1/admin/dry-run", json={"message": NUL}, headers=admin),
        httpx.get(f"{gw.http}/v1/audit", params={"action": NUL}, headers=admin),
        httpx.get(f"{gw.http}/v1/admin/stages/a%00b", headers=admin),
    ]
    for r in http:
        refused(r, 400, "bad_request", "a NUL character")

    widget: Widget = new_widget(gw, "third-shop")
    client = await Client.open(gw)
    await client.hello(widget)
    for frame, fragment in (
        ({"type": "message", "client_msg_id": "n-1", "text": NUL}, "field 'text' holds a NUL"),
        ({"type": "message", "client_msg_id": "n\x00", "text": "hi"}, "field 'client_msg_id' holds a NUL"),
        ({"type": "typing", "state": True, "conversation_id": NUL}, "holds a NUL"),
    ):
        await client.send(frame)
        error = await client.recv_type("error")
        assert error["code"] == "bad_frame"
        assert fragment in error["message"]
    await client.send({"type": "message", "client_msg_id": "n-2", "text": "still here?"})
    ack = await client.recv_type("ack")
    assert ack["client_msg_id"] == "n-2"
    await client.close()
