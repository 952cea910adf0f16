// chatgw agent console: sign in with an agent token (or the demo agent on the embedded default),
// watch the business's conversations live (the `snapshot` and the `feed`), open several at once to
// watch answers stream, take over, write, hand back, and see each conversation's stage, extracted
// data and flow. Plain ES modules, no build step. Protocol: docs/protocol.md, "The agent side".

import { ago, el, snippet, visitorName } from "./dom.js";
import { Link } from "./link.js";
import { Pane } from "./pane.js";

const TOKEN_KEY = "chatgw-console|token";
const $ = (id) => document.getElementById(id);

const wsUrl = new URL("/ws", location.href);
wsUrl.protocol = wsUrl.protocol === "https:" ? "wss:" : "ws:";

/** Everything the console knows; panes read it through `app`. */
const app = {
  token: null,
  me: null, // {agent_id, agent_name, business}
  team: new Map(), // agent id -> name
  flow: null, // {version, stages, transitions, rules} of the agent's business
  rows: new Map(), // conversation id -> row (what the list shows)
  selected: null, // the conversation chosen in the list
  panes: new Map(), // conversation id -> Pane, in the order opened
  active: null, // the pane the keyboard acts on
  signedIn: false,
  serverTime: 0, // the newest server time seen (ms): live events without a time sort after it
  link: null,

  send(frame) {
    return this.link.send(frame);
  },
  now() {
    return Math.max(Date.now(), this.serverTime);
  },
  holderName(agentId) {
    if (!agentId) return null;
    if (this.me && agentId === this.me.agent_id) return "you";
    const name = this.team.get(agentId);
    if (name === undefined) refreshTeam();
    return name || "agent " + agentId.slice(0, 6);
  },
  api,
  refreshFlow,
  paneClosed,
  activate,
};

app.link = new Link(wsUrl.href, { frame: onFrame, state: onLinkState });

// -- HTTP -------------------------------------------------------------------------------------------

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (app.token && !headers.Authorization) headers.Authorization = "Bearer " + app.token;
  let r;
  try {
    r = await fetch(path, { ...options, headers });
  } catch {
    throw new Error("the gateway cannot be reached");
  }
  const body = await r.json().catch(() => ({}));
  if (!r.ok) {
    const e = new Error((body.error && body.error.message) || r.statusText);
    e.status = r.status;
    throw e;
  }
  return body;
}

let flowAsked = 0;
async function refreshFlow() {
  if (Date.now() - flowAsked < 2000) return;
  flowAsked = Date.now();
  try {
    app.flow = await api("/v1/agents/me/flow");
    for (const pane of app.panes.values()) pane.renderFacts();
  } catch {
    /* drawn without the flow; asked again when a stage it does not know shows up */
  }
}

let teamAsked = 0;
async function refreshTeam() {
  if (Date.now() - teamAsked < 5000) return;
  teamAsked = Date.now();
  try {
    const { agents } = await api("/v1/agents/me/team");
    app.team = new Map(agents.map((a) => [a.agent_id, a.name]));
    scheduleRows(true);
    for (const pane of app.panes.values()) pane.renderHead();
  } catch {
    /* holders are named by their ids meanwhile */
  }
}

// -- signing in and out -----------------------------------------------------------------------------

function signinError(message) {
  $("signin-error").textContent = message || "";
}

function looksLikeToken(token) {
  return /^[\w-]+\.[\w-]+\.[\w-]+$/.test(token);
}

function signIn(token) {
  app.token = token;
  app.signedIn = false;
  signinError("");
  $("signin").setAttribute("aria-busy", "true");
  app.link.start(token);
}

function entered(welcome) {
  app.me = { agent_id: welcome.agent_id, agent_name: welcome.agent_name, business: welcome.business };
  $("me").textContent = welcome.agent_name;
  $("business").textContent = "· " + welcome.business;
  if (app.signedIn) return;
  app.signedIn = true;
  try {
    sessionStorage.setItem(TOKEN_KEY, app.token);
  } catch {
    /* without storage a reload asks again */
  }
  $("signin").hidden = true;
  $("signin").removeAttribute("aria-busy");
  $("app").hidden = false;
  document.title = `Agent console · ${welcome.business} · chatgw`;
  $("rows").focus();
}

function signOut(message) {
  app.link.stop();
  for (const pane of [...app.panes.values()]) pane.close({ quiet: true });
  app.token = null;
  app.me = null;
  app.signedIn = false;
  app.rows.clear();
  app.selected = null;
  forgetToken();
  $("app").hidden = true;
  $("signin").hidden = false;
  $("signin").removeAttribute("aria-busy");
  signinError(message);
  document.title = "Agent console · chatgw";
  $("token").focus();
}

function forgetToken() {
  try {
    sessionStorage.removeItem(TOKEN_KEY);
  } catch {
    /* nothing kept */
  }
}

$("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const token = $("token").value.trim();
  if (!token) return signinError("Paste your agent token first.");
  if (!looksLikeToken(token)) {
    return signinError(
      "That is not an agent token: a token is three parts joined by dots (eyJ…). An admin key cannot sign in here.",
    );
  }
  signIn(token);
});

$("demo-button").addEventListener("click", async () => {
  signinError("");
  try {
    const made = await api("/v1/demo/agent", { method: "POST" });
    signIn(made.token);
  } catch (e) {
    signinError("The demo agent is not available: " + e.message);
  }
});

$("signout").addEventListener("click", () => signOut(""));

async function offerDemo() {
  try {
    await api("/v1/demo/agent");
    $("demo-signin").hidden = false;
  } catch {
    $("demo-signin").hidden = true; // not on this gateway (PostgreSQL, or switched off)
  }
  $("demo-signin").dataset.checked = "true";
}

// -- the socket -------------------------------------------------------------------------------------

function onLinkState(s, detail) {
  const conn = $("conn");
  conn.dataset.state = s;
  if (s === "live") conn.textContent = "Live";
  else if (s === "connecting") conn.textContent = "Connecting…";
  else if (s === "waiting") conn.textContent = `Connection lost. Reconnecting in ${Math.ceil(detail.delay / 1000)} s…`;
  else if (s === "refused") {
    const why = `The gateway refused this token: ${detail.message}. Ask your admin for a new one.`;
    if (app.signedIn) return signOut(why);
    forgetToken();
    $("signin").removeAttribute("aria-busy");
    signinError(why);
  }
  if (s === "live") banner(null);
}

function onFrame(f) {
  switch (f.type) {
    case "welcome":
      entered(f);
      refreshFlow();
      refreshTeam();
      for (const pane of app.panes.values()) pane.resubscribe();
      return;
    case "snapshot":
      return snapshot(f);
    case "feed":
      return feed(f);
    case "reconnect":
      return banner("The gateway is restarting: reconnecting…");
    default:
      if (f.conversation_id && app.panes.has(f.conversation_id)) return app.panes.get(f.conversation_id).frame(f);
      if (f.type === "error") banner(f.message);
  }
}

function banner(text) {
  $("banner").hidden = !text;
  $("banner").textContent = text || "";
}

// -- the list of conversations ----------------------------------------------------------------------

function seen(iso) {
  const t = Date.parse(iso);
  if (!Number.isNaN(t)) app.serverTime = Math.max(app.serverTime, t);
  return Number.isNaN(t) ? app.now() : t;
}

function snapshot(f) {
  app.rows.clear();
  for (const c of f.conversations) {
    app.rows.set(c.conversation_id, {
      id: c.conversation_id,
      mode: c.mode,
      agentId: c.agent_id,
      stage: c.stage,
      streaming: c.streaming,
      last: c.last_message ? { role: c.last_message.role, text: c.last_message.text } : null,
      online: !!c.user_online,
      activity: seen(c.updated_at),
      stamp: ++stamps,
    });
  }
  scheduleRows();
  for (const pane of app.panes.values()) pane.renderHead();
}

function feed(f) {
  const e = f.event;
  let row = app.rows.get(f.conversation_id);
  if (!row) {
    row = { id: f.conversation_id, mode: "ai", agentId: null, stage: null, streaming: false, last: null, online: false };
    app.rows.set(f.conversation_id, row);
  }
  switch (e.type) {
    case "conversation":
      Object.assign(row, { mode: e.mode, stage: e.stage, activity: seen(e.created_at) });
      break;
    case "message":
      row.last = { role: e.role, text: e.text };
      row.activity = seen(e.created_at);
      break;
    case "ai_start":
      Object.assign(row, { streaming: true, activity: app.now() });
      break;
    case "ai_end":
      if (e.text) row.last = { role: "assistant", text: e.text };
      Object.assign(row, { streaming: false, activity: app.now() });
      break;
    case "mode":
      Object.assign(row, { mode: e.mode, agentId: e.agent_id, activity: app.now() });
      break;
    case "stage":
      row.stage = e.stage;
      break;
    case "presence":
      row.online = !!e.online;
      break;
    default:
      break;
  }
  row.activity = row.activity || app.now();
  row.stamp = ++stamps;
  scheduleRows();
  const pane = app.panes.get(f.conversation_id);
  if (pane && (e.type === "presence" || e.type === "mode")) pane.renderHead();
}

const filters = { text: "", mode: "all", streaming: false };

function matches(row) {
  if (filters.streaming && !row.streaming) return false;
  if (filters.mode === "ai" && row.mode !== "ai") return false;
  if (filters.mode === "human" && row.mode !== "human") return false;
  if (filters.mode === "mine" && !(row.mode === "human" && app.me && row.agentId === app.me.agent_id)) return false;
  if (!filters.text) return true;
  const hay = [visitorName(row.id), row.id, row.stage, row.last && row.last.text, app.holderName(row.agentId)];
  return hay.some((s) => s && String(s).toLowerCase().includes(filters.text));
}

function visibleRows() {
  return [...app.rows.values()].filter(matches).sort((a, b) => b.activity - a.activity || (a.id < b.id ? -1 : 1));
}

// Each change of a row gets a new stamp, and a row is drawn again only when its stamp or `redraws`
// moved (the time shown, names and open panes concern every row): a busy feed stays cheap.
let stamps = 0;
let redraws = 0;
let rowsFrame = 0;
function scheduleRows(all = false) {
  if (all) redraws++;
  if (!rowsFrame) rowsFrame = requestAnimationFrame(renderRows);
}

function renderRows() {
  rowsFrame = 0;
  const list = $("rows");
  const shown = visibleRows();
  const keep = new Set(shown.map((r) => "row-" + r.id));
  for (const li of [...list.children]) if (!keep.has(li.id)) li.remove();
  shown.forEach((row, i) => {
    const li = $("row-" + row.id) || el("li", { id: "row-" + row.id, role: "option", class: "row", "data-id": row.id });
    const drawn = `${row.stamp}:${redraws}`;
    if (li.dataset.drawn !== drawn) {
      fillRow(li, row);
      li.dataset.drawn = drawn;
    }
    if (list.children[i] !== li) list.insertBefore(li, list.children[i] || null);
  });
  if (!shown.some((r) => r.id === app.selected)) app.selected = shown.length ? shown[0].id : null;
  markSelected();
  const total = app.rows.size;
  $("count").textContent =
    shown.length === total ? `${total} conversation${total === 1 ? "" : "s"}` : `${shown.length} of ${total} shown`;
  $("rows-empty").hidden = shown.length > 0;
  $("rows-empty").textContent = total === 0 ? "No conversations yet." : "None match the filters.";
}

function fillRow(li, row) {
  const holder = row.mode === "human" ? app.holderName(row.agentId) : null;
  const mode =
    row.mode === "human"
      ? el("span", { class: "badge human" }, holder === "you" ? "Held by you" : `Held by ${holder}`)
      : el("span", { class: "badge ai" }, "AI");
  li.replaceChildren(
    el(
      "div",
      { class: "line" },
      el("strong", { class: "who" }, visitorName(row.id)),
      el("span", { class: "presence " + (row.online ? "on" : "off") }, row.online ? "online" : "away"),
      el("span", { class: "when" }, ago(Date.now() - row.activity)),
    ),
    el(
      "div",
      { class: "line badges" },
      mode,
      row.stage ? el("span", { class: "badge stage" }, "stage " + row.stage) : null,
      row.streaming ? el("span", { class: "badge live" }, "answering now") : null,
      app.panes.has(row.id) ? el("span", { class: "badge open" }, "open") : null,
    ),
    el(
      "p",
      { class: "last" },
      row.last ? el("span", { class: "role" }, roleName(row.last.role) + ": ") : null,
      row.last ? snippet(row.last.text, 110) : el("em", {}, "no messages yet"),
    ),
  );
  li.classList.toggle("is-open", app.panes.has(row.id));
}

function roleName(role) {
  return { user: "User", assistant: "AI", agent: "Agent", system: "Note" }[role] || role;
}

function markSelected() {
  const list = $("rows");
  for (const li of list.children) li.setAttribute("aria-selected", String(li.dataset.id === app.selected));
  if (app.selected) list.setAttribute("aria-activedescendant", "row-" + app.selected);
  else list.removeAttribute("aria-activedescendant");
}

function moveSelection(step) {
  const shown = visibleRows();
  if (!shown.length) return;
  const at = shown.findIndex((r) => r.id === app.selected);
  const next = at < 0 ? 0 : Math.min(shown.length - 1, Math.max(0, at + step));
  app.selected = shown[next].id;
  markSelected();
  const li = $("row-" + app.selected);
  if (li) li.scrollIntoView({ block: "nearest" });
}

$("rows").addEventListener("keydown", (e) => {
  const keys = { ArrowDown: 1, ArrowUp: -1, Home: -Infinity, End: Infinity };
  if (e.key in keys) {
    moveSelection(keys[e.key]);
    e.preventDefault();
  } else if (e.key === "Enter" || e.key === " ") {
    if (app.selected) open(app.selected);
    e.preventDefault();
  }
});

$("rows").addEventListener("click", (e) => {
  const li = e.target.closest("li.row");
  if (!li || e.target.closest("a")) return;
  app.selected = li.dataset.id;
  markSelected();
  open(li.dataset.id);
});

$("q").addEventListener("input", () => {
  filters.text = $("q").value.trim().toLowerCase();
  scheduleRows();
});
$("mode-filter").addEventListener("change", () => {
  filters.mode = $("mode-filter").value;
  scheduleRows();
});
$("streaming-filter").addEventListener("change", () => {
  filters.streaming = $("streaming-filter").checked;
  scheduleRows();
});
$("filters").addEventListener("submit", (e) => e.preventDefault());

setInterval(() => app.signedIn && scheduleRows(true), 30000); // "2 min ago" moves on

// -- open conversations -----------------------------------------------------------------------------

function open(cid) {
  let pane = app.panes.get(cid);
  if (!pane) {
    pane = new Pane(cid, app);
    app.panes.set(cid, pane);
    $("panes").append(pane.root);
    pane.start();
  }
  $("no-panes").hidden = true;
  activate(pane);
  pane.focus();
  touch(cid);
}

function activate(pane) {
  if (app.active === pane) return;
  if (app.active) app.active.root.classList.remove("active");
  app.active = pane;
  if (pane) pane.root.classList.add("active");
}

function paneClosed(pane) {
  const order = [...app.panes.values()];
  const at = order.indexOf(pane);
  app.panes.delete(pane.cid);
  const next = [...app.panes.values()][Math.min(at, app.panes.size - 1)] || null;
  if (app.active === pane) app.active = null;
  activate(next);
  $("no-panes").hidden = app.panes.size > 0;
  touch(pane.cid);
  return next;
}

/** Draw the conversation's row again (it shows whether the conversation is open). */
function touch(cid) {
  const row = app.rows.get(cid);
  if (row) row.stamp = ++stamps;
  scheduleRows();
}

function cyclePane(step) {
  const order = [...app.panes.values()];
  if (!order.length) return;
  const at = order.indexOf(app.active);
  const next = order[(at + step + order.length) % order.length];
  activate(next);
  next.focus();
}

// -- keyboard ---------------------------------------------------------------------------------------

const help = $("help");
$("help-button").addEventListener("click", () => help.showModal());

document.addEventListener("keydown", (e) => {
  if (e.defaultPrevented || e.ctrlKey || e.metaKey || e.altKey || !app.signedIn || help.open) return;
  if (e.target instanceof Element && e.target.closest("input, textarea, select")) {
    if (e.key === "Escape" && e.target.id === "q") $("rows").focus();
    return;
  }
  const pane = app.active;
  switch (e.key) {
    case "?":
      help.showModal();
      break;
    case "/":
      $("q").focus();
      break;
    case "j":
      moveSelection(1);
      $("rows").focus();
      break;
    case "k":
      moveSelection(-1);
      $("rows").focus();
      break;
    case "o":
      if (app.selected) open(app.selected);
      break;
    case "]":
      cyclePane(1);
      break;
    case "[":
      cyclePane(-1);
      break;
    case "t":
      if (pane) pane.takeOver();
      break;
    case "h":
      if (pane) pane.handBack();
      break;
    case "r":
      if (pane) pane.reply();
      break;
    case "x":
      if (pane) pane.close();
      break;
    default:
      return;
  }
  e.preventDefault();
});

// -- start ------------------------------------------------------------------------------------------

window.addEventListener("online", () => app.link.now());
offerDemo();
let saved = null;
try {
  saved = sessionStorage.getItem(TOKEN_KEY);
} catch {
  /* no storage: sign in every time */
}
if (saved) signIn(saved);
else $("token").focus();
