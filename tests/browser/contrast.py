"""Checking text contrast on a page as drawn: every visible text against the background behind it."""

from __future__ import annotations

from playwright.sync_api import Page

# WCAG 2 contrast of each visible text node's colour against its element's background (the
# ancestors' background colours blended down to the first opaque one, over white). Text at least
# 24 px, or 18.66 px and bold, needs 3:1, the rest 4.5:1. Disabled controls are exempt (as in WCAG),
# and while a modal dialog is open only the dialog counts (the rest is inert behind its backdrop).
# SVG text is left out (its colour is a fill over shapes that are not its ancestors).
_LOW_CONTRAST = """() => {
  const parse = (c) => {
    const m = /rgba?\\(([^)]+)\\)/.exec(c);
    if (!m) return null;
    const p = m[1].split(/[\\s,\\/]+/).filter(Boolean).map(Number);
    return {r: p[0], g: p[1], b: p[2], a: p.length > 3 ? p[3] : 1};
  };
  const over = (top, under) => ({
    r: top.r * top.a + under.r * (1 - top.a), g: top.g * top.a + under.g * (1 - top.a),
    b: top.b * top.a + under.b * (1 - top.a), a: 1,
  });
  const channel = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
  const luminance = (c) => 0.2126 * channel(c.r) + 0.7152 * channel(c.g) + 0.0722 * channel(c.b);
  const background = (el) => {
    const layers = [];
    for (let n = el; n; n = n.parentElement) {
      const c = parse(getComputedStyle(n).backgroundColor);
      if (c && c.a > 0) { layers.push(c); if (c.a >= 1) break; }
    }
    return layers.reverse().reduce((under, top) => over(top, under), {r: 255, g: 255, b: 255, a: 1});
  };
  const modal = document.querySelector('dialog[open]');
  const bad = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let t = walker.nextNode(); t; t = walker.nextNode()) {
    const el = t.parentElement;
    if (!t.textContent.trim() || !el || el.closest('svg, option, :disabled')) continue;
    if (modal && !modal.contains(el)) continue;
    const box = el.getBoundingClientRect();
    const style = getComputedStyle(el);
    if (!box.width || !box.height || style.visibility === 'hidden') continue;
    const bg = background(el);
    const fg = over(parse(style.color), bg);
    const [hi, lo] = [luminance(fg), luminance(bg)].sort((a, b) => b - a);
    const ratio = (hi + 0.05) / (lo + 0.05);
    const size = parseFloat(style.fontSize);
    const large = size >= 24 || (size >= 18.66 && Number(style.fontWeight) >= 700);
    if (ratio < (large ? 3 : 4.5)) {
      bad.push(`${el.tagName.toLowerCase()}.${el.className} ${ratio.toFixed(2)}:1 "${t.textContent.trim().slice(0, 40)}"`);
    }
  }
  return bad;
}"""


def assert_contrast(page: Page) -> None:
    """Every visible text reaches 4.5:1 against its background (3:1 when large)."""
    bad: list[str] = page.evaluate(_LOW_CONTRAST)
    assert bad == [], bad
