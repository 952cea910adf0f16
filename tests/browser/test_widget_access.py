"""The widget embedded in a business's own site, on another origin than the gateway's, in a real
Chromium: a page the business does not allow is told so (the 403 crosses CORS to the widget), and
an allowed page chats as a verified user (the cross-origin session request, the socket's Origin)."""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from playwright.sync_api import BrowserContext

from tests.browser.conftest import QUICKER, Screenshots
from tests.browser.widget_page import WidgetPage
from tests.servers import GatewayProcess, free_port, start_gateway
from tests.tenant_gateway import THIRD_API_KEY

NewContext = Callable[..., BrowserContext]


class Site:
    """A business's web site: one page, served by a real HTTP server on its own port (so its own
    origin), embedding the gateway's widget with the attributes given."""

    def __init__(self) -> None:
        self.port = free_port()
        self.page_html = ""
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = site.page_html.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def embed(self, gw: GatewayProcess, **attributes: str) -> str:
        attrs = " ".join(f'data-{k.replace("_", "-")}="{v}"' for k, v in attributes.items())
        self.page_html = (
            "<!doctype html><html><head><title>A shop</title></head><body><h1>A shop</h1>"
            f'<script src="{gw.http}/widget.js" {attrs} async></script></body></html>'
        )
        return f"{self.origin}/"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def tenant_page_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """The embedded default serving the demo business and tests.tenant_gateway's others."""
    gw = start_gateway(tmp_path_factory.mktemp("tenant-page-gateway"), QUICKER, module="tests.tenant_gateway")
    yield gw
    gw.stop()


@pytest.fixture
def site() -> Iterator[Site]:
    s = Site()
    yield s
    s.close()


def test_a_page_the_business_does_not_allow_is_told_so(
    new_context: NewContext, tenant_page_gateway: GatewayProcess, site: Site, shots: Screenshots
) -> None:
    """The demo business allows only the gateway's own pages: on another site the widget cannot
    start, and says why (the gateway's 403 reaches it across origins)."""
    page = new_context().new_page()
    page.goto(site.embed(tenant_page_gateway, business="demo"))
    page.click("button.launcher")
    banner = page.wait_for_selector("text=/not allowed for business 'demo'/")
    assert banner is not None
    assert site.origin in (banner.text_content() or "")
    shots.take(page, "refused")


def test_an_allowed_site_chats_as_a_verified_user(
    new_context: NewContext, tenant_page_gateway: GatewayProcess, site: Site, shots: Screenshots
) -> None:
    gw = tenant_page_gateway
    admin = httpx.Client(base_url=gw.http, headers={"Authorization": f"Bearer {THIRD_API_KEY}"}, timeout=10)
    with admin:
        r = admin.patch("/v1/admin/business", json={"allowed_origins": [site.origin]})
        assert r.status_code == 200, r.text
        secret = admin.post("/v1/admin/identity-secret").json()["identity_secret"]
    user_hash = hmac.new(secret.encode(), b"customer-7", hashlib.sha256).hexdigest()
    page = new_context().new_page()
    url = site.embed(gw, business="third-shop", user_id="customer-7", user_hash=user_hash)
    with page.expect_response(
        lambda r: r.url.endswith("/v1/widget/sessions") and r.request.method == "POST"
    ) as got:
        page.goto(url)
        page.click("button.launcher")
    session = got.value
    assert session.status == 201
    assert session.json()["verified"] is True
    assert session.headers["access-control-allow-origin"] == site.origin
    widget = WidgetPage(page, gw)
    widget.wait_online()
    widget.send("Hello from the shop's own site")
    answer = widget.wait_answer(chars=1)
    final = widget.follow(answer.key, answer.text).final
    assert final.state == "complete"
    shots.take(page, "answered")
    assert [b["role"] for b in widget.bubbles()] == ["user", "assistant"]
