"""Driving the widget on the demo page, as a visitor would, and reading what it shows.

The widget lives in an open shadow root: Playwright's CSS locators pierce it; the scripts evaluated
in the page reach it through the host element `[data-chatgw]`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from playwright.sync_api import Page, WebSocketRoute

from tests.servers import GatewayProcess

WS_URL = re.compile(r"/ws$")

_ROOT = "document.querySelector('[data-chatgw]').shadowRoot"

# The newest answer bubble: its response id, text and state (streaming, complete, stopped, ...).
_LAST_ANSWER = f"""() => {{
  const root = {_ROOT};
  if (!root) return null;
  const all = root.querySelectorAll('li[data-role=assistant]');
  const li = all[all.length - 1];
  return li ? {{key: li.dataset.key, text: li.querySelector('.text').textContent, state: li.dataset.state}} : null;
}}"""

# Resolves once the answer `key` shows something other than `prev`, or stopped streaming.
_CHANGED = f"""([key, prev]) => {{
  const li = {_ROOT}.querySelector(`li[data-key="${{key}}"]`);
  if (!li) return null;
  const text = li.querySelector('.text').textContent;
  return text !== prev || li.dataset.state !== 'streaming' ? {{text, state: li.dataset.state}} : null;
}}"""

_LONG_ENOUGH = f"""([chars]) => {{
  const all = {_ROOT}.querySelectorAll('li[data-role=assistant]');
  const li = all[all.length - 1];
  return !!li && li.dataset.state === 'streaming' && li.querySelector('.text').textContent.length >= chars;
}}"""

_BUBBLES = f"""() => Array.from({_ROOT}.querySelectorAll('.log li')).map(li => ({{
  key: li.dataset.key, role: li.dataset.role, state: li.dataset.state, text: li.querySelector('.text').textContent,
}}))"""

_SAVED = """() => {
  const key = Object.keys(localStorage).find(k => k.startsWith('chatgw|v1|'));
  return key ? JSON.parse(localStorage.getItem(key)) : null;
}"""


@dataclass
class Network:
    """What the test does to the page's sockets (see `WidgetPage.route_sockets`)."""

    down: bool = False  # new sockets are refused
    lose_next_ack: bool = False  # the socket of the next message sent dies when its ack comes


@dataclass
class Answer:
    key: str
    text: str
    state: str


@dataclass
class Growth:
    """What the bubble showed each time it changed while streaming, and what it showed at the end."""

    samples: list[str]
    final: Answer


@dataclass
class WidgetPage:
    page: Page
    gateway: GatewayProcess
    received: list[dict[str, Any]] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)
    routed: list[tuple[WebSocketRoute, WebSocketRoute]] = field(default_factory=list)
    lost: list[dict[str, Any]] = field(default_factory=list)  # frames the test kept from the page

    # -- observing the page's sockets ----------------------------------------------------------

    def watch_frames(self) -> None:
        """Record every frame the page's sockets receive and send (not used with `route_sockets`)."""

        def on_socket(ws: Any) -> None:
            ws.on("framereceived", lambda payload: self._record(self.received, payload))
            ws.on("framesent", lambda payload: self._record(self.sent, payload))

        self.page.on("websocket", on_socket)

    def route_sockets(self, network: Network) -> None:
        """Pass the page's sockets through the test, recording frames, so that the test can cut
        them (`drop`), refuse new ones, or lose an ack, as a failing network would (`network`)."""

        def handler(ws: WebSocketRoute) -> None:
            if network.down:
                ws.close(code=4000, reason="network down (test)")
                return
            server = ws.connect_to_server()
            losing = False  # this socket dies once the server acked the message it just got

            def to_page(message: str | bytes) -> None:
                frame = self._record(self.received, message)
                if not losing:
                    ws.send(message)
                elif frame.get("type") == "ack":
                    self.lost.append(frame)
                    server.close()
                    ws.close(code=4000, reason="network drop (test)")

            def to_server(message: str | bytes) -> None:
                nonlocal losing
                frame = self._record(self.sent, message)
                if frame.get("type") == "message" and network.lose_next_ack:
                    network.lose_next_ack = False
                    losing = True
                server.send(message)

            server.on_message(to_page)
            ws.on_message(to_server)
            self.routed.append((ws, server))

        self.page.route_web_socket(WS_URL, handler)

    def drop(self) -> None:
        """Cut the newest routed socket on both sides, as a lost network would."""
        ws, server = self.routed[-1]
        server.close()
        ws.close(code=4000, reason="network drop (test)")

    @staticmethod
    def _record(into: list[dict[str, Any]], payload: str | bytes) -> dict[str, Any]:
        frame = orjson.loads(payload)
        assert isinstance(frame, dict), frame
        into.append(frame)
        return frame

    def ai_end(self, response_id: str) -> dict[str, Any]:
        """The `ai_end` frame the page received for an answer (waits for the recording to catch up)."""
        for _ in range(200):
            for frame in self.received:
                if frame["type"] == "ai_end" and frame["response_id"] == response_id:
                    return frame
            self.page.wait_for_timeout(25)
        raise AssertionError(f"the page received no ai_end for {response_id}")

    # -- acting ----------------------------------------------------------------------------------

    def open(self) -> None:
        """The demo page, with the chat opened and connected."""
        self.page.goto(f"{self.gateway.http}/demo/")
        self.page.click("button.launcher")
        self.wait_online()

    def wait_online(self) -> None:
        self.page.wait_for_selector(".status[data-state=online]")

    def send(self, text: str) -> None:
        self.page.fill("textarea", text)
        self.page.keyboard.press("Enter")

    # -- reading ---------------------------------------------------------------------------------

    def last_answer(self) -> Answer | None:
        got = self.page.evaluate(_LAST_ANSWER)
        return Answer(**got) if got else None

    def wait_answer(self, chars: int) -> Answer:
        """The newest answer once it streams and shows at least `chars` characters."""
        self.page.wait_for_function(_LONG_ENOUGH, arg=[chars], polling=20)
        answer = self.last_answer()
        assert answer is not None
        return answer

    def follow(self, key: str, shown: str) -> Growth:
        """Sample the answer `key` every time what it shows changes, until it stops streaming."""
        samples: list[str] = []
        while True:
            got = self.page.wait_for_function(_CHANGED, arg=[key, shown], polling=10).json_value()
            if got["state"] != "streaming":
                return Growth(samples, Answer(key, got["text"], got["state"]))
            samples.append(got["text"])
            shown = got["text"]

    def bubbles(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.page.evaluate(_BUBBLES)
        return result

    def saved(self) -> dict[str, Any]:
        """What the widget keeps in localStorage (token, conversation, position, transcript)."""
        saved: dict[str, Any] | None = self.page.evaluate(_SAVED)
        assert saved is not None, "the widget saved nothing"
        return saved

    def history(self) -> list[dict[str, Any]]:
        """The conversation's stored messages, over HTTP with the widget's own token."""
        saved = self.saved()
        r = httpx.get(
            f"{self.gateway.http}/v1/conversations/{saved['conversationId']}/messages",
            params={"limit": 500},
            headers={"Authorization": f"Bearer {saved['token']}"},
            timeout=10,
        )
        assert r.status_code == 200, r.text
        messages: list[dict[str, Any]] = r.json()["messages"]
        return messages


def assert_grows(growth: Growth, start: str, final: str, at_least: int) -> None:
    """Each sample is a prefix of the final text and longer than the one before (the first: longer
    than `start`); there are at least `at_least` of them."""
    assert len(growth.samples) >= at_least, growth.samples
    previous = start
    for sample in growth.samples:
        assert final.startswith(sample), f"{sample!r} is not a prefix of the final text {final!r}"
        assert len(sample) > len(previous), f"{sample!r} is not longer than {previous!r}"
        previous = sample
