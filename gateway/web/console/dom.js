// Small DOM and text helpers of the agent console. Text from the wire only ever becomes text nodes.

/** An element: el("button", {class: "x", onclick: fn, "aria-label": "..."}, "text", child, ...). */
export function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") node.addEventListener(name.slice(2), value);
    else if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    node.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

/** An SVG element with attributes. */
export function svg(tag, attrs, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined) continue;
    if (name === "text") node.textContent = value;
    else node.setAttribute(name, String(value));
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

const URL_RE = /\bhttps?:\/\/[^\s<>"'`]+/gi;

/** `text` into `node` as text nodes; http(s) URLs become links opening in a new tab, safely. */
export function renderText(node, text) {
  node.textContent = "";
  let last = 0;
  URL_RE.lastIndex = 0;
  for (let m = URL_RE.exec(text); m !== null; m = URL_RE.exec(text)) {
    const url = trimUrl(m[0]);
    const a = safeLink(url);
    if (!a) continue;
    node.append(document.createTextNode(text.slice(last, m.index)), a);
    last = m.index + url.length;
    URL_RE.lastIndex = last;
  }
  node.append(document.createTextNode(text.slice(last)));
}

// Punctuation that ends a sentence is not part of the link; a closing bracket is when it has an opening one.
function trimUrl(url) {
  for (;;) {
    const c = url.charAt(url.length - 1);
    if (".,;:!?'\"".includes(c)) url = url.slice(0, -1);
    else if (c === ")" && url.split("(").length <= url.split(")").length - 1) url = url.slice(0, -1);
    else return url;
  }
}

function safeLink(text) {
  let u;
  try {
    u = new URL(text);
  } catch {
    return null;
  }
  if (u.protocol !== "http:" && u.protocol !== "https:") return null;
  return el("a", { href: u.href, target: "_blank", rel: "noopener noreferrer" }, text);
}

/** A client message id: crypto.randomUUID exists only in secure contexts, getRandomValues everywhere. */
export function newId() {
  if (typeof crypto.randomUUID === "function") return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** How a conversation is named on screen: its visitor and the start of its id. */
export function visitorName(conversationId) {
  return "Visitor " + conversationId.slice(0, 6);
}

/** "just now", "5 min ago", "3 h ago", "2 d ago". */
export function ago(ms) {
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 45) return "just now";
  if (s < 3600) return `${Math.max(1, Math.round(s / 60))} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

/** At most `n` characters of `text` on one line. */
export function snippet(text, n) {
  const one = String(text || "").replace(/\s+/g, " ").trim();
  return one.length > n ? one.slice(0, n - 1) + "…" : one;
}
