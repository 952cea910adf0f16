"""Checking that a page fits a narrow viewport."""

from __future__ import annotations

from playwright.sync_api import Page

_OVERFLOW = """() => {
  const width = document.documentElement.clientWidth;
  const bad = [];
  const walk = (root) => {
    for (const el of root.querySelectorAll('*')) {
      const r = el.getBoundingClientRect();
      if (r.width > 0 && (r.width > width + 0.5 || r.right > width + 0.5)) {
        bad.push(`${el.tagName.toLowerCase()}.${el.getAttribute("class")} ${Math.round(r.left)}..${Math.round(r.right)}`);
      }
      if (el.classList.contains('bubble') && el.scrollWidth > el.clientWidth + 1) {
        bad.push(`bubble overflows: ${el.scrollWidth} > ${el.clientWidth}`);
      }
      if (el.shadowRoot) walk(el.shadowRoot);
    }
  };
  walk(document);
  return {width, scrollWidth: document.documentElement.scrollWidth, bad};
}"""


def assert_fits(page: Page, width: int) -> None:
    """No element (shadow roots' included) is wider than the viewport or sticks out of it, the page does
    not scroll sideways, and no bubble's text overflows it."""
    got = page.evaluate(_OVERFLOW)
    assert got["width"] == width
    assert got["scrollWidth"] <= width, got
    assert got["bad"] == [], got["bad"]
