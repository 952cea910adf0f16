"""Driving the agent console (`/console/`) as an agent would, and reading what it shows."""

from __future__ import annotations

import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
from playwright.sync_api import Locator, Page
from websockets.sync.client import ClientConnection, connect

from tests.browser.widget_page import Answer, Growth
from tests.servers import GatewayProcess

# The newest answer in a pane: its response id, text and state.
_LAST_ANSWER = """([cid]) => {
  const all = document.querySelectorAll(`.pane[data-id="${cid}"] li.msg.assistant`);
  const li = all[all.length - 1];
  return li ? {key: li.dataset.key, text: li.querySelector('.text').textContent, state: li.dataset.state} : null;
}"""

_LONG_ENOUGH = """([cid, chars, after]) => {
  const all = document.querySelectorAll(`.pane[data-id="${cid}"] li.msg.assistant`);
  const li = all[all.length - 1];
  return !!li && li.dataset.key !== after && li.dataset.state === 'streaming'
    && li.querySelector('.text').textContent.length >= chars;
}"""

_CHANGED = """([cid, key, prev]) => {
  const li = document.querySelector(`.pane[data-id="${cid}"] li[data-key="${key}"]`);
  if (!li) return null;
  const text = li.querySelector('.text').textContent;
  return text !== prev || li.dataset.state !== 'streaming' ? {text, state: li.dataset.state} : null;
}"""

_ROWS = """() => Array.from(document.querySelectorAll('#rows li.row')).map(li => li.dataset.id)"""


@dataclass
class ConsolePage:
    page: Page
    gateway: GatewayProcess

    # -- signing in --------------------------------------------------------------------------------

    def open(self) -> None:
        self.page.goto(f"{self.gateway.http}/console/")

    def sign_in_as_demo_agent(self) -> None:
        self.page.get_by_role("button", name="Sign in as the demo agent").click()
        self.wait_live()

    def sign_in(self, token: str) -> None:
        self.page.get_by_label("Agent token").fill(token)
        self.page.get_by_role("button", name="Sign in", exact=True).click()

    def wait_live(self) -> None:
        self.page.wait_for_selector("#app:not([hidden]) #conn[data-state=live]")

    def signin_error(self) -> str:
        return self.page.locator("#signin-error").text_content() or ""

    # -- the list --------------------------------------------------------------------------------

    def row(self, cid: str) -> Locator:
        return self.page.locator(f'#rows li.row[data-id="{cid}"]')

    def rows(self) -> list[str]:
        ids: list[str] = self.page.evaluate(_ROWS)
        return ids

    def open_conversation(self, cid: str) -> Locator:
        """Click the conversation in the list; its pane, once it follows the conversation live."""
        self.row(cid).click()
        self.page.wait_for_selector(f'.pane[data-id="{cid}"][data-live="true"]')
        return self.pane(cid)

    # -- a pane --------------------------------------------------------------------------------------

    def pane(self, cid: str) -> Locator:
        return self.page.locator(f'.pane[data-id="{cid}"]')

    def last_answer(self, cid: str) -> Answer | None:
        got: dict[str, Any] | None = self.page.evaluate(_LAST_ANSWER, [cid])
        return Answer(**got) if got else None

    def wait_answer(self, cid: str, chars: int, after: str | None = None) -> Answer:
        """The pane's newest answer (not `after`) once it streams with at least `chars` characters."""
        self.page.wait_for_function(_LONG_ENOUGH, arg=[cid, chars, after], polling=20)
        answer = self.last_answer(cid)
        assert answer is not None
        return answer

    def follow(self, cid: str, key: str, shown: str, samples: int) -> list[str]:
        """What the answer shows the next `samples` times it changes while it streams."""
        seen: list[str] = []
        while len(seen) < samples:
            got = self.page.wait_for_function(_CHANGED, arg=[cid, key, shown], polling=10).json_value()
            if got["state"] != "streaming":
                break
            seen.append(got["text"])
            shown = got["text"]
        return seen

    def follow_to_end(self, cid: str, key: str, shown: str) -> Growth:
        samples: list[str] = []
        while True:
            got = self.page.wait_for_function(_CHANGED, arg=[cid, key, shown], polling=10).json_value()
            if got["state"] != "streaming":
                return Growth(samples, Answer(key, got["text"], got["state"]))
            samples.append(got["text"])
            shown = got["text"]

    def take_over(self, cid: str) -> None:
        self.pane(cid).get_by_role("button", name="Take over").click()

    def hand_back(self, cid: str) -> None:
        self.pane(cid).get_by_role("button", name="Hand back to AI").click()

    def write(self, cid: str, text: str) -> None:
        box = self.pane(cid).get_by_label("Message to the user")
        box.fill(text)
        box.press("Enter")

    def wait_mode(self, cid: str, mode: str) -> None:
        self.page.wait_for_selector(f'.pane[data-id="{cid}"][data-mode="{mode}"]')

    def messages(self, cid: str) -> list[dict[str, str]]:
        """The pane's transcript: role (user, assistant, agent, notice) and text of each item."""
        got: list[dict[str, str]] = self.page.evaluate(
            """([cid]) => Array.from(document.querySelectorAll(`.pane[data-id="${cid}"] .log li.msg`)).map(li => ({
              role: li.classList[1], text: li.querySelector('.text').textContent, state: li.dataset.state || '',
              pending: li.classList.contains('pending') ? 'yes' : '',
            }))""",
            [cid],
        )
        return got


class SocketUser:
    """An end user of the demo business on a plain socket (no browser), for conversations the
    console only has to list and show."""

    def __init__(self, gw: GatewayProcess) -> None:
        r = httpx.post(f"{gw.http}/v1/widget/sessions", json={"business": "demo"}, timeout=15)
        assert r.status_code == 201, r.text
        self.cid: str = r.json()["conversation_id"]
        self._closing = ExitStack()
        self.ws: ClientConnection = self._closing.enter_context(connect(gw.ws, open_timeout=15))
        self._send({"type": "hello", "token": r.json()["token"]})
        assert self._recv()["type"] == "welcome"

    def _send(self, frame: dict[str, Any]) -> None:
        self.ws.send(orjson.dumps(frame).decode())

    def _recv(self) -> dict[str, Any]:
        frame: dict[str, Any] = orjson.loads(self.ws.recv(timeout=30))
        return frame

    def send(self, text: str) -> None:
        self._send({"type": "message", "client_msg_id": uuid.uuid4().hex, "text": text})

    def until(self, kind: str) -> dict[str, Any]:
        while (frame := self._recv())["type"] != kind:
            pass
        return frame

    def say(self, text: str) -> dict[str, Any]:
        """Send `text` and wait for the whole answer: its ai_end."""
        self.send(text)
        return self.until("ai_end")

    def close(self) -> None:
        self._closing.close()
