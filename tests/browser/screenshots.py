"""Refresh the README's screenshots: `scripts/screenshots` (or `python -m tests.browser.screenshots`).

Starts a gateway on the embedded default, drives the demo page in Chromium as a visitor would and
the agent console as the demo agent would, and writes docs/images/widget.png and console.png.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

from tests.browser.conftest import CHROMIUM_ARGS, DEFAULT_CHROMIUM
from tests.browser.console_page import ConsolePage, SocketUser
from tests.browser.widget_page import WidgetPage
from tests.servers import ROOT, start_gateway

IMAGES = ROOT / "docs" / "images"


def widget_shot(page_url: str, w: WidgetPage, out: Path) -> None:
    w.page.goto(page_url)
    w.page.click("button.launcher")
    w.wait_online()
    w.send("Do you ship to Norway? My last parcel: https://track.example.com/parcels/DCR-2026-000123")
    answer = w.wait_answer(chars=1)
    w.follow(answer.key, answer.text)
    w.send("Can I still change the grind of my order?")
    w.wait_answer(chars=70)
    w.page.screenshot(path=str(out))


def console_shot(agent: ConsolePage, out: Path) -> None:
    """The demo agent with three conversations listed, one open while its answer streams: its
    email extracted, its stage moved on in the flow."""
    agent.open()
    agent.sign_in_as_demo_agent()
    ana, other, third = SocketUser(agent.gateway), SocketUser(agent.gateway), SocketUser(agent.gateway)
    ana.say("Hi! I'm Ana. You can write to ana@example.com")
    other.say("Do you ship to Norway?")
    third.say("Is the decaf in stock this week?")
    agent.row(ana.cid).wait_for()
    agent.open_conversation(ana.cid)
    ana.send("I'd like two bags of the Huila beans, ground for filter")
    agent.wait_answer(ana.cid, chars=90)
    agent.page.locator("#rows").focus()
    agent.page.screenshot(path=str(out))
    for user in (ana, other, third):
        user.close()


def main() -> int:
    chromium = os.environ.get("TEST_CHROMIUM") or DEFAULT_CHROMIUM
    IMAGES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        gw = start_gateway(Path(tmp), {"CHATGW_SCRIPTED_TPS": "12", "CHATGW_SCRIPTED_TOKENS": "40"})
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
                context = browser.new_context(viewport={"width": 1100, "height": 760})
                w = WidgetPage(context.new_page(), gw)
                widget_shot(f"{gw.http}/demo/", w, IMAGES / "widget.png")
                context = browser.new_context(viewport={"width": 1280, "height": 800})
                console_shot(ConsolePage(context.new_page(), gw), IMAGES / "console.png")
                browser.close()
        finally:
            gw.stop()
    print(f"wrote {IMAGES / 'widget.png'} and {IMAGES / 'console.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
