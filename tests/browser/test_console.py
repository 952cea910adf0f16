"""The agent console in real Chromium against real gateway processes, beside the widget of the user
it talks to: watching an answer stream, taking over mid-answer (on one instance, and across two
instances sharing PostgreSQL and Redis), writing, handing back; the list, the stage, the extracted
data and the flow; the keyboard; a phone-sized viewport."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import pytest
from playwright.sync_api import BrowserContext, expect

from core.llm import ChatMessage
from core.scripted_llm import scripted_reply
from tests.browser.conftest import Screenshots
from tests.browser.console_page import ConsolePage, SocketUser
from tests.browser.contrast import assert_contrast
from tests.browser.fit import assert_fits
from tests.browser.widget_page import WidgetPage
from tests.e2e.agents import new_agent
from tests.multi.conftest import Cluster
from tests.servers import GatewayProcess, start_gateway

pytestmark = pytest.mark.browser

NewContext = Callable[..., BrowserContext]

# Answers of about ten seconds (200 pieces at 20 a second): time enough to watch one grow and take
# it over in the middle, however loaded the machine is.
LONG_ANSWERS = {"CHATGW_SCRIPTED_TPS": "20", "CHATGW_SCRIPTED_TOKENS": "200"}
REPLY = "Hi, Sam from the roastery here: yes, the Peru decaf is in stock."


@pytest.fixture(scope="module")
def long_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """The embedded default (so the demo agent exists) with long answers."""
    gw = start_gateway(tmp_path_factory.mktemp("long-gateway"), LONG_ANSWERS)
    yield gw
    gw.stop()


def full_answer(question: str) -> str:
    """What the scripted model answers to `question` when nobody stops it."""
    return "".join(
        scripted_reply([ChatMessage("user", question)], int(LONG_ANSWERS["CHATGW_SCRIPTED_TOKENS"]))
    )


# -- taking over mid-answer -----------------------------------------------------------------------


def take_over_mid_answer(user: WidgetPage, agent: ConsolePage, shots: Screenshots, agent_name: str) -> None:
    """(`user` records its frames, and is open.) The agent watches the user's answer grow in the console, takes over in one click: the
    answer stops mid-sentence in the widget, which says an agent joined; the agent's message
    arrives, named by the agent's name; after the handback the AI answers the user's next
    message, live in both."""
    cid = user.saved()["conversationId"]
    agent.open_conversation(cid)
    question = "Do you have a decaf this week?"
    user.send(question)

    first = agent.wait_answer(cid, chars=30)
    samples = agent.follow(cid, first.key, first.text, samples=3)
    shots.take(agent.page, "console-watching-the-answer")
    shots.take(user.page, "widget-answer-streaming")
    previous = first.text
    for sample in samples:
        assert sample.startswith(previous), (previous, sample)
        assert len(sample) > len(previous), (previous, sample)
        previous = sample
    assert len(samples) == 3, "the answer should still be streaming in the console"

    agent.take_over(cid)
    user.page.wait_for_selector(f'li[data-key="{first.key}"][data-state=taken_over]')
    user.page.get_by_text("An agent joined the conversation.").wait_for()
    agent.wait_mode(cid, "human")
    shots.take(user.page, "widget-taken-over")
    shots.take(agent.page, "console-taken-over")
    assert_contrast(agent.page)
    end = user.ai_end(first.key)
    full = full_answer(question)
    assert end["status"] == "taken_over"
    assert end["text"].startswith(previous)
    assert full.startswith(end["text"])
    assert len(end["text"]) < len(full), "the answer should stop mid-way"
    cut = user.page.locator(f'li[data-key="{first.key}"] .text')
    assert cut.text_content() == end["text"]
    assert agent.last_answer(cid) == type(first)(first.key, end["text"], "taken_over")

    agent.write(cid, REPLY)
    said = user.page.locator("li.agent").filter(has_text=REPLY)
    said.wait_for()
    assert said.locator(".who").text_content() == f"{agent_name} (agent)"
    shots.take(user.page, "widget-agent-message")
    assert cut.text_content() == end["text"], "the cut answer must not grow again"
    ends = [i for i, f in enumerate(user.received) if f["type"] == "ai_end" and f["response_id"] == first.key]
    later = [f for f in user.received[ends[0] :] if f["type"] == "delta" and f["response_id"] == first.key]
    assert len(ends) == 1
    assert later == [], "no delta of the cut answer after its end"
    agent.pane(cid).locator("li.msg.agent:not(.pending) .text").filter(has_text=REPLY).wait_for()
    assert [m["role"] for m in agent.messages(cid)][-3:] == ["assistant", "notice", "agent"]

    agent.hand_back(cid)
    user.page.get_by_text("The agent handed the conversation back to the assistant.").wait_for()
    agent.wait_mode(cid, "ai")
    user.send("Thanks! When do you ship?")
    again = user.wait_answer(chars=20)
    assert again.key != first.key
    watched = agent.wait_answer(cid, chars=20, after=first.key)
    assert watched.key == again.key
    shots.take(user.page, "widget-ai-answers-again")
    shots.take(agent.page, "console-ai-answers-again")
    roles = [b["role"] for b in user.bubbles()]
    assert roles == ["user", "assistant", "system", "agent", "system", "user", "assistant"], roles


def test_an_agent_takes_over_mid_answer_and_hands_back(
    new_context: NewContext, long_gateway: GatewayProcess, shots: Screenshots
) -> None:
    """On one gateway, signed in with the one-click demo agent."""
    user = WidgetPage(new_context().new_page(), long_gateway)
    user.watch_frames()
    user.open()
    agent = ConsolePage(new_context(viewport={"width": 1280, "height": 900}).new_page(), long_gateway)
    agent.open()
    agent.sign_in_as_demo_agent()
    shots.take(agent.page, "console-signed-in")
    take_over_mid_answer(user, agent, shots, "Demo agent")


def test_the_same_with_the_user_and_the_agent_on_two_instances(
    new_context: NewContext, cluster: Cluster, shots: Screenshots
) -> None:
    """The widget talks to instance A, the console to instance B (PostgreSQL and Redis shared); the
    agent signs in with a token pasted from the admin API (there is no demo agent on PostgreSQL)."""
    a, b = cluster(2, LONG_ANSWERS)
    user = WidgetPage(new_context().new_page(), a)
    user.watch_frames()
    user.open()
    agent = ConsolePage(new_context(viewport={"width": 1280, "height": 900}).new_page(), b)
    agent.open()
    agent.page.wait_for_selector("#demo-signin[data-checked]", state="attached")
    expect(agent.page.locator("#demo-signin")).to_be_hidden()
    agent.sign_in(new_agent(b, name="Sam").token)
    agent.wait_live()
    assert agent.page.locator("#me").text_content() == "Sam"
    take_over_mid_answer(user, agent, shots, "Sam")


# -- signing in -----------------------------------------------------------------------------------


def test_a_bad_token_is_refused_in_plain_words(
    new_context: NewContext, page_gateway: GatewayProcess, shots: Screenshots
) -> None:
    """Not a token, a forged one: each is refused with a message saying why; a good one signs in,
    and a reload keeps the agent signed in (in this tab) until "Sign out"."""
    agent = ConsolePage(new_context().new_page(), page_gateway)
    agent.open()
    agent.sign_in("an-admin-key-perhaps")
    assert "not an agent token" in agent.signin_error()
    forged = new_agent(page_gateway).token[:-4] + "AAAA"
    agent.sign_in(forged)
    expect(agent.page.locator("#signin-error")).to_contain_text(
        "The gateway refused this token: invalid token"
    )
    shots.take(agent.page, "refused")
    assert_contrast(agent.page)
    assert agent.page.locator("#app").is_hidden()

    agent.sign_in(new_agent(page_gateway, name="Ana").token)
    agent.wait_live()
    agent.page.reload()
    agent.wait_live()
    assert agent.page.locator("#me").text_content() == "Ana"
    agent.page.get_by_role("button", name="Sign out").click()
    expect(agent.page.get_by_label("Agent token")).to_be_visible()
    agent.page.reload()
    expect(agent.page.get_by_label("Agent token")).to_be_visible()


# -- the list, the stage, the data and the flow ---------------------------------------------------


def test_the_list_is_live_sorted_and_filtered(
    new_context: NewContext, page_gateway: GatewayProcess, shots: Screenshots
) -> None:
    """Newest activity first, re-sorted by the feed; filtered by text, by mode and by "answering
    now"; each row says the mode, stage, last message, whether the user is online and who holds it."""
    agent = ConsolePage(new_context(viewport={"width": 1280, "height": 900}).new_page(), page_gateway)
    agent.open()
    agent.sign_in_as_demo_agent()
    older, newer = SocketUser(page_gateway), SocketUser(page_gateway)
    older.say("First visitor: hello")
    newer.say("Second visitor: pistachio beans?")
    agent.row(newer.cid).filter(has_text="pistachio").wait_for()
    mine = [cid for cid in agent.rows() if cid in (older.cid, newer.cid)]
    assert mine == [newer.cid, older.cid]
    row = agent.row(newer.cid)
    assert "online" in (row.locator(".presence").text_content() or "")
    assert (row.locator(".badge.ai").text_content(), row.locator(".badge.stage").text_content()) == (
        "AI",
        "stage greeting",
    )

    older.send("First visitor again")  # the feed moves it to the top, and it answers now
    agent.page.get_by_label("Answering now").check()
    agent.row(older.cid).locator(".badge.live").wait_for()
    assert newer.cid not in agent.rows()
    shots.take(agent.page, "answering-now")
    older.until("ai_end")
    expect(agent.row(older.cid)).to_have_count(0)
    agent.page.get_by_label("Answering now").uncheck()
    agent.page.wait_for_function(
        "([a, b]) => { const ids = Array.from(document.querySelectorAll('#rows li.row'), li => li.dataset.id);"
        " return ids.indexOf(a) >= 0 && ids.indexOf(a) < ids.indexOf(b); }",
        arg=[older.cid, newer.cid],
    )

    agent.page.get_by_label("Search").fill("pistachio")
    expect(agent.page.locator("#rows li.row")).to_have_count(1)
    assert agent.rows() == [newer.cid]
    agent.page.get_by_label("Search").fill("")

    agent.page.get_by_label("Mode").select_option("mine")
    expect(agent.page.locator("#rows li.row")).to_have_count(0)
    agent.page.get_by_label("Mode").select_option("all")
    agent.open_conversation(older.cid)
    agent.take_over(older.cid)
    agent.wait_mode(older.cid, "human")
    agent.page.get_by_label("Mode").select_option("mine")
    expect(agent.page.locator("#rows li.row")).to_have_count(1)
    assert agent.rows() == [older.cid]
    assert agent.row(older.cid).locator(".badge.human").text_content() == "Held by you"
    shots.take(agent.page, "held-by-me")
    older.close()
    agent.page.get_by_label("Mode").select_option("all")
    expect(agent.row(older.cid).locator(".presence")).to_have_text("away")
    newer.close()


def test_the_stage_the_data_with_its_source_and_the_flow(
    new_context: NewContext, page_gateway: GatewayProcess, shots: Screenshots
) -> None:
    """The pane shows the extracted email with the rule and the message it came from, and the flow
    with the current stage marked, moving when the conversation's stage moves."""
    agent = ConsolePage(new_context(viewport={"width": 1280, "height": 1000}).new_page(), page_gateway)
    agent.open()
    agent.sign_in_as_demo_agent()
    user = SocketUser(page_gateway)
    user.say("Hello! I'm Ana, write to ana@example.com please")
    agent.row(user.cid).filter(has_text="Ana").wait_for()
    pane = agent.open_conversation(user.cid)
    data = pane.locator("dl.data")
    expect(data.locator("dt")).to_have_text(["email"])
    expect(data.locator("dd .value")).to_have_text(["ana@example.com"])
    expect(data.locator("dd .source")).to_have_text(
        re.compile(
            r"^found by pattern rule for email in “Hello! I'm Ana, write to ana@example\.com please” show$"
        )
    )
    current = pane.locator("svg .node.current")
    expect(current).to_have_attribute("data-stage", "greeting")
    expect(pane.locator(".transitions li")).to_have_count(4)
    expect(pane.locator(".transitions li").nth(1)).to_have_text("contact → questions: when has(data.email)")
    shots.take(agent.page, "stage-greeting")

    user.say("I'd like to order the Huila beans")  # the second message moves it to `contact`
    expect(current).to_have_attribute("data-stage", "contact")
    expect(current.locator(".now")).to_have_text("current stage")
    expect(pane.locator(".stage-now strong")).to_have_text("contact")
    expect(agent.row(user.cid).locator(".badge.stage")).to_have_text("stage contact")
    shots.take(agent.page, "stage-contact")
    pane.get_by_role("button", name="show").click()
    expect(pane.locator("li.msg.pointed .text")).to_have_text(
        "Hello! I'm Ana, write to ana@example.com please"
    )
    user.close()


# -- keyboard and small screens -------------------------------------------------------------------


def test_the_frequent_actions_work_from_the_keyboard(
    new_context: NewContext, page_gateway: GatewayProcess, shots: Screenshots
) -> None:
    """? shows the shortcuts; / searches; j and Enter open; t takes over and puts the focus in the
    message box; Enter sends; Escape leaves the box; h hands back; x closes."""
    agent = ConsolePage(new_context(viewport={"width": 1280, "height": 900}).new_page(), page_gateway)
    agent.open()
    agent.sign_in_as_demo_agent()
    user = SocketUser(page_gateway)
    user.say("Keyboard visitor here")
    agent.row(user.cid).wait_for()
    keys = agent.page.keyboard

    keys.press("?")
    help_dialog = agent.page.get_by_role("dialog", name="Keyboard shortcuts")
    expect(help_dialog).to_be_visible()
    expect(help_dialog.locator("tr")).to_have_count(9)
    shots.take(agent.page, "shortcuts")
    keys.press("Escape")
    expect(help_dialog).to_be_hidden()

    keys.press("/")
    expect(agent.page.get_by_label("Search")).to_be_focused()
    keys.type(user.cid[:8])
    expect(agent.page.locator("#rows li.row")).to_have_count(1)
    keys.press("Escape")
    expect(agent.page.locator("#rows")).to_be_focused()
    keys.press("j")
    keys.press("Enter")
    agent.page.wait_for_selector(f'.pane[data-id="{user.cid}"][data-live="true"]')
    expect(agent.pane(user.cid).get_by_role("heading", level=3)).to_be_focused()

    keys.press("t")
    agent.wait_mode(user.cid, "human")
    box = agent.pane(user.cid).get_by_label("Message to the user")
    expect(box).to_be_focused()
    keys.type("Typed without a mouse")
    keys.press("Enter")
    assert user.until("message")["text"] == "Typed without a mouse"
    expect(agent.pane(user.cid).locator("li.msg.agent:not(.pending) .text")).to_have_text(
        "Typed without a mouse"
    )
    keys.press("Escape")
    keys.press("h")
    agent.wait_mode(user.cid, "ai")
    assert user.until("mode")["mode"] == "ai"
    shots.take(agent.page, "handed-back")
    keys.press("x")
    expect(agent.pane(user.cid)).to_have_count(0)
    expect(agent.page.locator("#rows")).to_be_focused()
    user.close()


def test_the_console_at_390_px_is_no_wider_than_the_viewport(
    new_context: NewContext, page_gateway: GatewayProcess, shots: Screenshots
) -> None:
    """A phone-sized viewport: the sign-in page, the list, an open conversation with a long URL,
    its data and flow, and the shortcuts: no element wider than the viewport, no sideways scroll,
    and every text readable against its background."""
    agent = ConsolePage(
        new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2).new_page(), page_gateway
    )
    agent.open()
    agent.page.wait_for_selector("#demo-signin:visible")
    shots.take(agent.page, "sign-in")
    assert_fits(agent.page, 390)
    assert_contrast(agent.page)
    agent.sign_in_as_demo_agent()
    user = SocketUser(page_gateway)
    long_url = "https://track.example.com/parcels/" + "DCR-2026-000123-" * 6 + "end"
    user.say(f"Where is my parcel? {long_url} Mail me: ana.long.address@example.com")
    agent.row(user.cid).wait_for()
    shots.take(agent.page, "list")
    assert_fits(agent.page, 390)
    assert_contrast(agent.page)
    pane = agent.open_conversation(user.cid)
    pane.locator("li.msg.assistant").wait_for()
    pane.locator("svg .node.current").wait_for()
    agent.take_over(user.cid)
    agent.wait_mode(user.cid, "human")
    shots.take(agent.page, "conversation")
    pane.locator(".facts").scroll_into_view_if_needed()
    shots.take(agent.page, "data-and-flow")
    assert_fits(agent.page, 390)
    assert_contrast(agent.page)
    agent.page.get_by_role("button", name="Shortcuts").click()
    shots.take(agent.page, "shortcuts")
    assert_fits(agent.page, 390)
    assert_contrast(agent.page)
    user.close()


_LAYOUT = """async () => {
  const { layout } = await import('/console/flow.js');
  const plan = layout({
    stages: [{name: 'b'}, {name: 'a', is_entry: true}, {name: 'c'}, {name: 'lost'}],
    transitions: [
      {from: 'a', to: 'b'}, {from: 'a', to: 'c'}, {from: 'b', to: 'a'}, {from: 'c', to: 'c'}, {from: 'b', to: 'gone'},
    ],
  });
  const nodes = Object.fromEntries([...plan.nodes].map(([name, n]) => [name, [n.layer, n.y]]));
  return {nodes, entry: plan.entry, edges: plan.edges.map(e => [e.n, e.t.from, e.t.to, e.d.includes('C')])};
}"""


def test_the_flow_drawing_puts_each_stage_below_the_one_it_is_reached_from(
    new_context: NewContext, page_gateway: GatewayProcess
) -> None:
    """Layers by distance from the entry stage (stages it never reaches last); arrows down are
    straight, arrows back up and to the same stage curve; transitions to unknown stages are left out."""
    page = new_context().new_page()
    page.goto(f"{page_gateway.http}/console/")
    plan = page.evaluate(_LAYOUT)
    layers = {name: layer for name, (layer, _) in plan["nodes"].items()}
    assert layers == {"a": 0, "b": 1, "c": 1, "lost": 2}
    ys = {name: y for name, (_, y) in plan["nodes"].items()}
    assert ys["a"] < ys["b"] == ys["c"] < ys["lost"]
    assert plan["entry"] == "a"
    assert plan["edges"] == [
        [1, "a", "b", False],
        [2, "a", "c", False],
        [3, "b", "a", True],
        [4, "c", "c", True],
    ]
