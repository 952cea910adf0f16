"""The chat widget on the demo page, in real Chromium against a real gateway process.

Answers come from the scripted model at 20 pieces a second (see `web_gateway`), so a test can watch
an answer grow, reload in its middle or cut the network under it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from playwright.sync_api import BrowserContext
from websockets.sync.client import connect

from core.conversation import FAILED_NOTICE
from tests.browser.conftest import Screenshots
from tests.browser.fit import assert_fits
from tests.browser.widget_page import Network, WidgetPage, assert_grows
from tests.e2e.test_overload import SLOW_S, lagging_env
from tests.llm_server import LLMServer, drop_after
from tests.servers import GatewayProcess, start_gateway

pytestmark = pytest.mark.browser

NewContext = Callable[..., BrowserContext]
UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def widget(new_context: NewContext, gateway: GatewayProcess, **options: object) -> WidgetPage:
    return WidgetPage(new_context(**options).new_page(), gateway)


def test_the_answer_grows_in_place_while_it_streams(
    new_context: NewContext, web_gateway: GatewayProcess, shots: Screenshots
) -> None:
    """Every time the bubble changes mid-answer it shows a longer prefix of the final text, and the
    final text is the ai_end's."""
    w = widget(new_context, web_gateway)
    w.watch_frames()
    w.open()
    shots.take(w.page, "opened")
    w.send("Which beans do you have this week?")
    first = w.wait_answer(chars=1)
    shots.take(w.page, "streaming")

    growth = w.follow(first.key, first.text)

    shots.take(w.page, "answered")
    end = w.ai_end(first.key)
    assert end["status"] == "complete"
    assert growth.final.text == end["text"]
    assert growth.final.state == "complete"
    assert_grows(growth, first.text, end["text"], at_least=5)
    roles = [b["role"] for b in w.bubbles()]
    assert roles == ["user", "assistant"]


def test_a_reload_mid_answer_resumes_the_same_answer(
    new_context: NewContext, web_gateway: GatewayProcess, shots: Screenshots
) -> None:
    """After a reload the bubble shows at once what it showed before, then grows to the full answer."""
    w = widget(new_context, web_gateway)
    w.watch_frames()
    w.open()
    w.send("Can I change my grind after ordering?")
    before = w.wait_answer(chars=40)
    shots.take(w.page, "before-reload")

    w.page.reload()
    w.page.wait_for_selector(f'li[data-key="{before.key}"]')
    after = w.last_answer()
    assert after is not None
    shots.take(w.page, "after-reload")
    assert after.key == before.key
    assert after.text.startswith(before.text)

    growth = w.follow(after.key, after.text)
    end = w.ai_end(after.key)
    assert growth.final.text == end["text"]
    assert_grows(growth, after.text, end["text"], at_least=2)
    shots.take(w.page, "answered")
    # Nothing lost or doubled: one question, one answer.
    assert [(b["role"], b["key"]) for b in w.bubbles()][1:] == [("assistant", before.key)]
    assert [m["role"] for m in w.history()] == ["user", "assistant"]


def test_a_network_drop_mid_answer_resumes_the_same_answer(
    new_context: NewContext, web_gateway: GatewayProcess, shots: Screenshots
) -> None:
    """The page's socket is cut mid-answer: the widget reconnects with resume, keeps what it showed
    and grows to the full answer."""
    w = widget(new_context, web_gateway)
    w.route_sockets(Network())
    w.open()
    w.send("Do you ship to Norway?")
    before = w.wait_answer(chars=40)
    w.drop()
    w.page.wait_for_selector(".status[data-state=waiting]")
    shots.take(w.page, "dropped")
    cut = w.last_answer()
    assert cut is not None
    assert cut.text.startswith(before.text)

    growth = w.follow(cut.key, cut.text)
    end = w.ai_end(cut.key)
    shots.take(w.page, "resumed")
    assert growth.final.text == end["text"]
    assert_grows(growth, cut.text, end["text"], at_least=2)
    hellos = [f for f in w.sent if f["type"] == "hello"]
    assert len(hellos) == 2
    assert "resume" not in hellos[0]
    assert hellos[1]["resume"]["last_seq"] >= 3  # message, ai_start, a delta at least
    assert [b["role"] for b in w.bubbles()] == ["user", "assistant"]


def test_a_message_sent_while_offline_is_delivered_once(
    new_context: NewContext, web_gateway: GatewayProcess, shots: Screenshots
) -> None:
    """Typed while offline, the message shows as pending; back online, the first socket dies just
    as the server acks it, so the widget sends it again: it is stored and answered once."""
    network = Network()
    w = widget(new_context, web_gateway)
    w.route_sockets(network)
    w.open()

    network.down = True
    w.page.context.set_offline(True)
    w.drop()
    w.send("Is the decaf in stock?")
    pending = w.page.locator("li.pending")
    pending.wait_for()
    assert "will be sent when the chat reconnects" in (pending.locator(".meta").text_content() or "")
    shots.take(w.page, "pending-offline")
    w.page.wait_for_timeout(1500)  # reconnect attempts fail meanwhile
    assert pending.count() == 1
    assert w.history() == []

    network.down = False
    network.lose_next_ack = True
    w.page.context.set_offline(False)
    w.page.wait_for_selector("li.user:not(.pending)")
    answer = w.wait_answer(chars=1)
    growth = w.follow(answer.key, answer.text)
    shots.take(w.page, "delivered")

    assert growth.final.state == "complete"
    assert len(w.lost) == 1, "the first ack should have been lost"
    sends = [f for f in w.sent if f["type"] == "message"]
    assert len(sends) >= 2, "the widget should have sent the message again after the cut"
    assert {f["client_msg_id"] for f in sends} == {w.lost[0]["client_msg_id"]}
    stored = w.history()
    assert [(m["role"], m["text"]) for m in stored][:1] == [("user", "Is the decaf in stock?")]
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert [b["role"] for b in w.bubbles()] == ["user", "assistant"]
    assert w.page.locator("li.pending").count() == 0


def test_at_390_px_nothing_is_wider_than_the_viewport(
    new_context: NewContext, page_gateway: GatewayProcess, shots: Screenshots
) -> None:
    """A phone-sized viewport: the page and the open widget, mid-answer and after, with a long URL
    in both bubbles: no element is wider than the viewport or sticks out of it, nothing scrolls
    sideways, and no bubble's text overflows it."""
    w = widget(new_context, page_gateway, viewport={"width": 390, "height": 844}, device_scale_factor=2)
    w.page.goto(f"{page_gateway.http}/demo/")
    shots.take(w.page, "page")
    assert_fits(w.page, 390)
    w.page.click("button.launcher")
    w.wait_online()
    long_url = "https://track.example.com/parcels/" + "DCR-2026-000123-" * 6 + "end"
    w.send(f"Where is my parcel? {long_url}")
    answer = w.wait_answer(chars=60)
    assert w.page.locator(".stopbar button").is_visible()
    shots.take(w.page, "streaming")
    assert_fits(w.page, 390)
    w.follow(answer.key, answer.text)
    shots.take(w.page, "answered")
    assert_fits(w.page, 390)


def test_links_are_safe_and_text_is_never_html(
    new_context: NewContext, page_gateway: GatewayProcess, shots: Screenshots
) -> None:
    """http(s) URLs become links opening in a new tab with rel=noopener noreferrer; markup and
    javascript: URLs stay plain text."""
    w = widget(new_context, page_gateway)
    w.open()
    w.page.evaluate("() => { window.__pwned = 0; }")
    text = (
        '<img src=x onerror="window.__pwned=1"> <b>bold</b> javascript:window.__pwned=2 '
        "see https://example.com/a_(b)?q=1&r=2."
    )
    w.send(text)
    answer = w.wait_answer(chars=1)
    w.follow(answer.key, answer.text)
    shots.take(w.page, "answered")
    user = w.page.locator("li.user .text")
    assert user.text_content() == text
    assert w.page.locator(".log img, .log b").count() == 0
    assert w.page.evaluate("() => window.__pwned") == 0
    links = w.page.locator(".log a")
    assert links.count() >= 1
    for i in range(links.count()):
        link = links.nth(i)
        assert link.get_attribute("href") == "https://example.com/a_(b)?q=1&r=2"
        assert link.get_attribute("rel") == "noopener noreferrer"
        assert link.get_attribute("target") == "_blank"
        assert link.text_content() == "https://example.com/a_(b)?q=1&r=2"


def test_sending_works_without_crypto_random_uuid(
    new_context: NewContext, page_gateway: GatewayProcess, shots: Screenshots
) -> None:
    """On a plain-http origin other than localhost there is no crypto.randomUUID: the widget makes
    its client ids another way, and the message is sent and answered."""
    w = widget(new_context, page_gateway)
    w.page.add_init_script("Object.defineProperty(Crypto.prototype, 'randomUUID', {value: undefined});")
    w.watch_frames()
    w.open()
    assert w.page.evaluate("() => typeof crypto.randomUUID") == "undefined"
    w.send("Hello without randomUUID")
    answer = w.wait_answer(chars=1)
    w.follow(answer.key, answer.text)
    shots.take(w.page, "answered")
    sends = [f for f in w.sent if f["type"] == "message"]
    assert len(sends) == 1
    assert UUID4.match(sends[0]["client_msg_id"]), sends[0]
    assert [b["role"] for b in w.bubbles()] == ["user", "assistant"]


def test_a_new_conversation_starts_empty_and_survives_a_reload(
    new_context: NewContext, page_gateway: GatewayProcess, shots: Screenshots
) -> None:
    """ "New chat" starts another conversation; a reload shows the current one, from storage."""
    w = widget(new_context, page_gateway)
    w.open()
    w.send("First conversation")
    answer = w.wait_answer(chars=1)
    w.follow(answer.key, answer.text)
    first = w.saved()["conversationId"]

    w.page.click("header .new")
    w.page.wait_for_function(
        "([first]) => !Object.keys(localStorage).some(k => localStorage.getItem(k).includes(first))",
        arg=[first],
    )
    w.wait_online()
    assert w.bubbles() == []
    second = w.saved()["conversationId"]
    assert second != first
    w.send("Second conversation")
    answer = w.wait_answer(chars=1)
    w.follow(answer.key, answer.text)

    w.page.reload()
    w.page.wait_for_selector("li.user")
    w.wait_online()
    shots.take(w.page, "reloaded")
    assert w.saved()["conversationId"] == second
    texts = [b["text"] for b in w.bubbles()]
    assert texts[0] == "Second conversation"
    assert len(texts) == 2


def test_the_chat_works_from_the_keyboard_alone(
    new_context: NewContext, page_gateway: GatewayProcess, shots: Screenshots
) -> None:
    """The launcher is reachable with Tab and labelled; Enter opens the panel with the focus in the
    labelled message box; Enter sends; Escape closes it and gives the focus back to the launcher."""
    w = widget(new_context, page_gateway)
    w.page.goto(f"{page_gateway.http}/demo/")
    launcher = w.page.locator("button.launcher")
    assert launcher.get_attribute("aria-expanded") == "false"
    assert "Open chat" in (launcher.get_attribute("aria-label") or "")
    for _ in range(40):
        w.page.keyboard.press("Tab")
        if w.page.evaluate("() => document.activeElement?.dataset.chatgw === 'demo'"):
            break
    else:
        raise AssertionError("Tab never reached the widget")
    w.page.keyboard.press("Enter")
    w.wait_online()
    assert launcher.get_attribute("aria-expanded") == "true"
    box = w.page.get_by_label("Your message")
    assert box.evaluate("el => el === el.getRootNode().activeElement")
    w.page.keyboard.type("Typed from the keyboard")
    w.page.keyboard.press("Enter")
    answer = w.wait_answer(chars=1)
    shots.take(w.page, "answering")
    final = w.follow(answer.key, answer.text).final
    w.page.keyboard.press("Escape")
    assert w.page.locator(".panel").is_hidden()
    assert launcher.evaluate("el => el === el.getRootNode().activeElement")
    assert [b["text"] for b in w.bubbles()] == ["Typed from the keyboard", final.text]


@pytest.fixture(scope="module")
def failing_model() -> Iterator[LLMServer]:
    with LLMServer() as server:
        yield server


@pytest.fixture(scope="module")
def model_gateway(
    failing_model: LLMServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """The embedded default answering through an OpenAI-compatible endpoint the test scripts."""
    env = {"OPENAI_API_KEY": "test-key", "OPENAI_BASE_URL": failing_model.base_url, "LLM_MODEL": "main-model"}
    gw = start_gateway(tmp_path_factory.mktemp("model-gateway"), env)
    yield gw
    gw.stop()


def test_a_failed_answer_is_said_in_plain_words(
    new_context: NewContext, model_gateway: GatewayProcess, failing_model: LLMServer, shots: Screenshots
) -> None:
    """The model's stream breaks mid-answer: the bubble keeps what came, says it could not be
    finished, and the gateway's apology shows as a notice."""
    failing_model.script(drop_after(2, "Half ", "an ", "answer"))
    w = widget(new_context, model_gateway)
    w.open()
    w.send("Tell me everything")
    w.page.wait_for_selector("li[data-role=assistant][data-state=failed]")
    w.page.wait_for_selector("li.notice")
    shots.take(w.page, "failed")
    answer = w.page.locator("li[data-role=assistant]")
    assert answer.locator(".text").text_content() == "Half an "
    assert answer.locator(".meta").text_content() == "This answer could not be finished."
    assert w.page.locator("li.notice .text").text_content() == FAILED_NOTICE


@pytest.fixture(scope="module")
def limited_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """The embedded default letting one socket send one message in 3 seconds (docs/limits.md)."""
    env = {**QUICK_ANSWERS, "CHATGW_LIMIT_SOCKET_MESSAGES": "1/3seconds", "CHATGW_LIMIT_VIOLATIONS": "off"}
    gw = start_gateway(tmp_path_factory.mktemp("limited-gateway"), env)
    yield gw
    gw.stop()


_PENDING_GONE = (
    "document.querySelector('[data-chatgw]').shadowRoot.querySelectorAll('li.pending').length === 0"
)


@pytest.fixture(scope="module")
def one_answer_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """The embedded default answering one conversation at a time (CHATGW_MAX_ACTIVE_ANSWERS=1),
    with answers of about 2 s."""
    env = {"CHATGW_MAX_ACTIVE_ANSWERS": "1", "CHATGW_SCRIPTED_TPS": "20", "CHATGW_SCRIPTED_TOKENS": "40"}
    gw = start_gateway(tmp_path_factory.mktemp("one-answer-gateway"), env)
    yield gw
    gw.stop()


QUICK_ANSWERS = {"CHATGW_SCRIPTED_TPS": "200", "CHATGW_SCRIPTED_TOKENS": "10"}


def test_a_new_chat_refused_while_the_service_is_overloaded_says_so_and_starts_once_it_can(
    new_context: NewContext, tmp_path: Path, shots: Screenshots
) -> None:
    """The gateway's loop lags (`tests.stall_gateway`) when the visitor opens the chat: the new
    conversation is refused with 503 and a retry hint, the widget says so in plain words and asks
    again after the hint by itself; once the lag is gone the chat starts and answers."""
    flag = tmp_path / "lag"
    env = {**lagging_env(flag), "CHATGW_OVERLOAD_RETRY_MS": "2000", **QUICK_ANSWERS}
    gw = start_gateway(tmp_path, env, module="tests.stall_gateway")
    try:
        w = widget(new_context, gw)
        w.watch_frames()
        w.page.goto(f"{gw.http}/demo/")
        w.page.wait_for_selector("button.launcher")
        flag.touch()
        for _attempt in range(50):  # until the gateway has seen the lag
            r = httpx.post(f"{gw.http}/v1/widget/sessions", json={"business": "demo"}, timeout=SLOW_S)
            if r.status_code == 503:
                break
        assert r.status_code == 503, r.text
        w.page.click("button.launcher")
        w.page.wait_for_function(
            """() => {
              const banner = document.querySelector('[data-chatgw]').shadowRoot.querySelector('.banner');
              return banner && !banner.hidden && banner.textContent.includes('busy right now. Trying again in');
            }""",
            polling=50,
            timeout=SLOW_S * 1000,
        )
        shots.take(w.page, "refused-busy")
        flag.unlink()
        w.page.wait_for_selector(".status[data-state=online]", timeout=SLOW_S * 1000)
        w.send("Are you there?")
        answer = w.wait_answer(chars=1)
        final = w.follow(answer.key, answer.text).final
        shots.take(w.page, "answered")
        assert final.state == "complete"
    finally:
        flag.unlink(missing_ok=True)
        gw.stop()


def test_a_rate_limit_is_said_in_plain_words_and_the_message_waits(
    new_context: NewContext, limited_gateway: GatewayProcess, shots: Screenshots
) -> None:
    """A message over the socket's rate: the widget says so in a plain sentence, keeps the message
    as waiting, and sends it by itself after `retry_after_ms`: both are stored, once each."""
    w = widget(new_context, limited_gateway)
    w.watch_frames()
    w.open()
    sent: list[str] = []
    for text in ("First question", "Second question, right away", "Third question, right away"):
        w.send(text)
        sent.append(text)
        # A sliding window can let the second one through when the two straddle its end.
        if w.page.wait_for_function(_LIMITED_OR_SENT, arg=[len(sent)], polling=20).json_value() == "limited":
            break
    banner = w.page.locator(".banner")
    banner.wait_for()
    assert re.fullmatch(
        r"You're sending messages too fast\. Your message will be sent in \d+ s\.",
        banner.text_content() or "",
    )
    waiting = w.page.locator("li.pending .meta")
    assert waiting.text_content() == "Waiting to send: too many messages in a short time."
    shots.take(w.page, "rate-limited")
    refusals = [f for f in w.received if f["type"] == "error"]
    assert [(f["code"], f["limit"]) for f in refusals] == [("rate_limited", "socket_messages")]
    assert refusals[0]["retry_after_ms"] > 0

    w.page.wait_for_selector("li.pending", state="detached")
    shots.take(w.page, "sent-after-the-wait")
    users = [m["text"] for m in w.history() if m["role"] == "user"]
    assert users == sent


# "limited" once the widget shows its banner, "sent" once `n` messages are acknowledged.
_LIMITED_OR_SENT = """([n]) => {
  const root = document.querySelector('[data-chatgw]').shadowRoot;
  const banner = root.querySelector('.banner');
  if (banner && !banner.hidden) return 'limited';
  return root.querySelectorAll('li.user:not(.pending)').length >= n ? 'sent' : false;
}"""


def test_a_message_refused_while_the_service_is_full_is_sent_again_and_answered(
    new_context: NewContext, one_answer_gateway: GatewayProcess, shots: Screenshots
) -> None:
    """Another conversation holds the one answer allowed: the widget's message is refused with
    `unavailable` and `retry_after_ms`, stays pending with a notice, and is sent again (same id)
    after that time, then stored once and answered."""
    gw = one_answer_gateway
    session = httpx.post(f"{gw.http}/v1/widget/sessions", json={"business": "demo"}, timeout=10).json()
    w = widget(new_context, gw)
    w.watch_frames()
    w.open()
    with connect(gw.ws, open_timeout=10) as busy:
        busy.send(orjson.dumps({"type": "hello", "token": session["token"]}).decode())
        busy.send(orjson.dumps({"type": "message", "client_msg_id": "busy-1", "text": "Hold on"}).decode())
        while orjson.loads(busy.recv(timeout=10))["type"] != "ai_start":
            pass
        w.send("Are you there?")
        w.page.wait_for_selector(".banner:not([hidden])")
        assert "busy right now" in (w.page.locator(".banner").text_content() or "")
        w.send("Hello?")  # written during the wait: held, and sent after the first
        assert w.page.locator("li.pending").count() == 2
        shots.take(w.page, "refused-pending")
    refused = [f for f in w.received if f["type"] == "error"]
    assert refused[0]["code"] == "unavailable"
    assert refused[0]["retry_after_ms"] > 0
    w.page.wait_for_function(f"() => {_PENDING_GONE}", polling=50, timeout=30_000)
    answer = w.wait_answer(chars=1)
    final = w.follow(answer.key, answer.text).final
    shots.take(w.page, "answered")
    assert final.state == "complete"
    sends = [f["client_msg_id"] for f in w.sent if f["type"] == "message"]
    first, _second = dict.fromkeys(sends)  # two messages, in the order written
    assert sends.count(first) >= 2  # refused, then sent again
    assert sends[:2] == [first, first]  # the second was held during the wait, then sent after it
    stored = w.history()
    assert [(m["role"], m["text"]) for m in stored if m["role"] == "user"] == [
        ("user", "Are you there?"),
        ("user", "Hello?"),
    ]
    assert stored[-1]["role"] == "assistant"
