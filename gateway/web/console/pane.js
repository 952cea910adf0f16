// One open conversation: its transcript with the answer growing as it streams, the takeover,
// writing and handback, the stage, the extracted data with where each value came from, and the
// flow with the current stage marked.
//
// Following it: history first (over HTTP, with the agent token), then `subscribe` with `resume`
// from the newest stored message, so the replay brings everything after it, an answer streaming
// now included from its start. Events are applied in seq order exactly once; a `reset` refetches
// history and goes on from the reset's position; after a reconnect the pane subscribes again with
// resume from the last seq it applied.

import { drawFlow } from "./flow.js";
import { el, newId, renderText, snippet, visitorName } from "./dom.js";

const TYPING_EXPIRES_MS = 10000;
const TYPING_RENEW_MS = 3000;
const TYPING_IDLE_MS = 4000;

const ENDED = {
  stopped: "The user stopped this answer.",
  taken_over: "Taken over here: the AI stopped mid-answer.",
  failed: "This answer failed.",
  interrupted: "This answer was interrupted.",
};

export class Pane {
  constructor(cid, app) {
    this.cid = cid;
    this.app = app;
    this.epoch = null;
    this.seq = 0;
    this.items = []; // transcript in seq order: {key, role, text, seq, status, notice}
    this.byKey = new Map();
    this.mine = new Set(); // message ids of this agent's messages
    this.pending = new Map(); // client_msg_id -> {id, text, failed}
    this.mode = "ai";
    this.agentId = null;
    this.stage = null;
    this.extracted = {}; // field -> {value, extractor, source_message_id}
    this.held = null; // events held while history is refetched after a reset
    this.subscribed = false;
    this.busy = null; // "takeover" | "handback" while waiting for the outcome
    this.closed = false;
    this.typingTimer = 0;
    this.typingSent = 0;
    this.idleTimer = 0;
    this.sourcesTimer = 0;
    this.build();
  }

  // -- the DOM -----------------------------------------------------------------------------------

  build() {
    const id = this.cid;
    const name = visitorName(id);
    this.title = el("h3", { id: `title-${id}`, tabindex: "-1" }, name);
    this.state = el("p", { class: "pane-state" });
    this.takeButton = el("button", { type: "button", class: "primary", "aria-keyshortcuts": "t", onclick: () => this.takeOver() }, "Take over");
    this.backButton = el("button", { type: "button", "aria-keyshortcuts": "h", onclick: () => this.handBack() }, "Hand back to AI");
    const closeButton = el("button", { type: "button", class: "close", "aria-keyshortcuts": "x", "aria-label": `Close ${name}`, onclick: () => this.close() }, "✕");
    this.alert = el("p", { class: "alert", role: "alert" });
    this.log = el("ol", { class: "log", role: "log", "aria-label": `Transcript of ${name}`, tabindex: "0" });
    this.typing = el("p", { class: "typing", "aria-live": "polite" });
    this.box = el("textarea", {
      id: `msg-${id}`,
      class: "msg",
      rows: "2",
      maxlength: "4000",
      "aria-keyshortcuts": "r",
      oninput: () => this.typed(),
      onkeydown: (e) => this.boxKey(e),
      onblur: () => this.stopTyping(),
    });
    this.sendButton = el("button", { type: "submit", class: "primary" }, "Send");
    const form = el(
      "form",
      { class: "composer", onsubmit: (e) => (e.preventDefault(), this.submit()) },
      el("label", { for: `msg-${id}`, class: "sr" }, "Message to the user"),
      this.box,
      this.sendButton,
    );
    this.facts = el("div", { class: "facts-body" });
    const facts = el("details", { class: "facts", open: true }, el("summary", {}, "Stage, data and flow"), this.facts);
    this.root = el(
      "article",
      { class: "pane", "aria-labelledby": `title-${id}`, "data-id": id, onfocusin: () => this.app.activate(this) },
      el("header", { class: "pane-head" }, el("div", { class: "titles" }, this.title, this.state), el("div", { class: "actions" }, this.takeButton, this.backButton, closeButton)),
      this.alert,
      el("div", { class: "pane-body" }, el("div", { class: "talk" }, this.log, this.typing, form), facts),
    );
    this.renderHead();
    this.renderFacts();
  }

  focus() {
    this.title.focus({ preventScroll: true });
    const top = this.root.getBoundingClientRect().top;
    if (top < 0 || top > innerHeight - 120) this.root.scrollIntoView({ block: "start" });
  }

  say(text) {
    this.alert.textContent = text || "";
  }

  heldByMe() {
    return this.mode === "human" && this.app.me && this.agentId === this.app.me.agent_id;
  }

  renderHead() {
    const row = this.app.rows.get(this.cid);
    const streaming = [...this.byKey.values()].some((it) => it.status === "streaming");
    let mode;
    if (this.mode === "human") mode = this.heldByMe() ? "You hold this conversation" : `Held by ${this.app.holderName(this.agentId)}`;
    else mode = streaming ? "The AI is answering" : "The AI answers";
    const parts = [mode, row ? (row.online ? "user online" : "user away") : null, this.stage ? `stage ${this.stage}` : null];
    this.state.textContent = parts.filter(Boolean).join(" · ");
    this.root.dataset.mode = this.mode;
    this.takeButton.disabled = this.mode === "human" || this.busy !== null;
    this.takeButton.textContent = this.busy === "takeover" ? "Taking over…" : "Take over";
    this.backButton.disabled = this.mode !== "human" || this.busy !== null;
    this.backButton.textContent = this.busy === "handback" ? "Handing back…" : "Hand back to AI";
    const mine = this.heldByMe();
    this.box.disabled = !mine;
    this.sendButton.disabled = !mine;
    this.box.placeholder = mine ? "Write to the user (Enter sends)" : "Take over to write to the user";
  }

  // -- following the conversation ------------------------------------------------------------------

  async start() {
    this.say("Loading the conversation…");
    let history;
    try {
      history = await this.history();
    } catch (e) {
      this.say(e.status === 404 ? "This conversation no longer exists." : `The history could not be loaded: ${e.message}.`);
      return;
    }
    if (this.closed) return;
    this.rebuild(history.messages);
    this.epoch = history.epoch;
    const last = history.messages[history.messages.length - 1];
    this.seq = last ? last.seq : 0;
    this.say("");
    this.resubscribe();
  }

  async history() {
    let all = [];
    let first = null;
    for (let after = 0, pages = 0; pages < 20; pages++) {
      const path = `/v1/conversations/${encodeURIComponent(this.cid)}/messages?after_seq=${after}&limit=500`;
      const page = await this.app.api(path);
      first = first || page; // the position is read before the rows: the first page's is the one
      all = all.concat(page.messages);
      const last = page.messages[page.messages.length - 1];
      if (!page.has_more || !last) break;
      after = last.seq;
    }
    return { messages: all, epoch: first.epoch, seq: first.seq };
  }

  /** Subscribe (again), resuming from the last seq applied. */
  resubscribe() {
    if (this.closed || this.epoch === null) return;
    this.subscribed = false;
    this.root.dataset.live = "false";
    this.app.send({ type: "subscribe", conversation_id: this.cid, resume: { epoch: this.epoch, last_seq: this.seq } });
  }

  frame(f) {
    switch (f.type) {
      case "subscribed":
        return this.onSubscribed(f);
      case "unsubscribed":
        return;
      case "reset":
        return this.onReset(f);
      case "ack":
        return this.onAck(f);
      case "error":
        return this.onError(f);
      case "typing":
        return this.onTyping(f);
      default:
        if (this.held) this.held.push(f);
        else this.apply(f);
    }
  }

  onSubscribed(f) {
    this.subscribed = true;
    this.root.dataset.live = "true";
    this.mode = f.mode;
    this.agentId = f.agent_id;
    this.stage = f.stage;
    this.extracted = f.extracted || {};
    this.renderHead();
    this.renderFacts();
    for (const p of this.pending.values()) if (!p.failed) this.sendPending(p);
  }

  async onReset(f) {
    const held = (this.held = []);
    try {
      const history = await this.history();
      if (this.held !== held) return;
      this.rebuild(history.messages);
    } catch {
      if (this.held === held) this.held = null;
      this.say("The conversation could not be brought up to date: reopen it.");
      return;
    }
    this.epoch = f.epoch;
    this.seq = f.seq;
    this.held = null;
    held.forEach((event) => this.apply(event));
  }

  apply(f) {
    if (typeof f.seq === "number") {
      if (f.seq <= this.seq) return; // seen already (replay overlap)
      if (f.seq > this.seq + 1) return this.resubscribe(); // a gap (never sent): resume fills it
      this.seq = f.seq;
    }
    switch (f.type) {
      case "message":
        this.add({ key: f.message_id, role: f.role, text: f.text, seq: f.seq, author: f.agent_name || null });
        if (f.role === "user") this.onTyping({ role: "user", state: false });
        break;
      case "ai_start":
        this.add({ key: f.response_id, role: "assistant", text: "", seq: f.seq, status: "streaming" });
        break;
      case "delta":
        this.grow(f);
        break;
      case "ai_end":
        this.end(f);
        break;
      case "mode":
        this.onMode(f);
        break;
      case "stage":
        this.onStage(f);
        break;
      default:
        break; // event types of later versions
    }
  }

  onMode(f) {
    const was = this.mode;
    const asked = this.busy;
    this.mode = f.mode;
    this.agentId = f.agent_id;
    this.busy = null;
    if (f.mode === "human" && was !== "human") this.notice(f.seq, `${capital(this.app.holderName(f.agent_id))} took over from the AI.`);
    if (f.mode === "ai" && was === "human") this.notice(f.seq, "Handed back: the AI answers again.");
    this.renderHead();
    if (asked === "takeover" && this.heldByMe()) this.box.focus(); // taken over: write at once
  }

  onStage(f) {
    const changed = this.stage !== f.stage;
    this.stage = f.stage;
    const data = f.data || {};
    let newValues = false;
    for (const [field, value] of Object.entries(data)) {
      const had = this.extracted[field];
      if (!had || JSON.stringify(had.value) !== JSON.stringify(value)) {
        this.extracted[field] = { value }; // where it came from: asked below
        newValues = true;
      }
    }
    if (changed && this.app.flow && !this.app.flow.stages.some((s) => s.name === f.stage)) this.app.refreshFlow();
    // A `stage` event carries the values only; `subscribed` says where each came from.
    if (newValues) {
      clearTimeout(this.sourcesTimer);
      this.sourcesTimer = setTimeout(() => this.resubscribe(), 250);
    }
    this.renderHead();
    this.renderFacts();
  }

  // -- the transcript ------------------------------------------------------------------------------

  rebuild(messages) {
    const notices = this.items.filter((it) => it.notice);
    this.items = [];
    this.byKey.clear();
    this.log.replaceChildren();
    for (const m of messages) {
      const key = m.role === "assistant" && m.response_id ? m.response_id : m.message_id;
      this.add({ key, role: m.role, text: m.text, seq: m.seq, status: m.status || null, author: m.agent_name || null });
    }
    for (const it of notices) this.add(it);
    for (const p of this.pending.values()) this.log.append(this.pendingNode(p));
  }

  add(it) {
    if (this.byKey.has(it.key)) return this.byKey.get(it.key);
    let i = this.items.length;
    while (i > 0 && this.items[i - 1].seq > it.seq) i--;
    this.items.splice(i, 0, it);
    this.byKey.set(it.key, it);
    it.node = this.node(it);
    const before = this.items[i + 1] ? this.items[i + 1].node : this.log.querySelector("li.pending");
    this.keepScrolled(() => this.log.insertBefore(it.node, before || null));
    if (it.status === "streaming") this.renderHead();
    return it;
  }

  notice(seq, text) {
    this.add({ key: `notice:${seq}`, role: "notice", text, seq, notice: true });
  }

  grow(f) {
    const it = this.byKey.get(f.response_id) || this.add({ key: f.response_id, role: "assistant", text: "", seq: f.seq, status: "streaming" });
    if (it.status !== "streaming") return;
    it.text += f.text;
    this.keepScrolled(() => this.paint(it));
  }

  end(f) {
    const it = this.byKey.get(f.response_id) || this.add({ key: f.response_id, role: "assistant", text: "", seq: f.seq });
    it.text = f.text; // exactly the answer's deltas joined
    it.status = f.status;
    this.keepScrolled(() => this.paint(it));
    this.renderHead();
  }

  node(it) {
    const li = el("li", { class: `msg ${it.role}`, "data-key": it.key });
    li.append(el("p", { class: "who" }), el("div", { class: "bubble" }, el("span", { class: "text" })), el("p", { class: "meta" }));
    it.node = li;
    this.paint(it);
    return li;
  }

  paint(it) {
    const li = it.node;
    const agent = this.mine.has(it.key) ? "You" : it.author || "Agent";
    const who = { user: "User", assistant: "AI", agent, system: "Note", notice: "" }[it.role];
    li.querySelector(".who").textContent = who || "";
    renderText(li.querySelector(".text"), it.text);
    li.dataset.state = it.status || "";
    li.setAttribute("aria-busy", String(it.status === "streaming"));
    li.querySelector(".meta").textContent = ENDED[it.status] || "";
  }

  keepScrolled(change) {
    const log = this.log;
    const atEnd = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
    change();
    if (atEnd) log.scrollTop = log.scrollHeight;
  }

  onTyping(f) {
    clearTimeout(this.typingTimer);
    const who = f.role === "user" ? "The user" : "Another agent";
    this.typing.textContent = f.state ? `${who} is typing…` : "";
    if (f.state) this.typingTimer = setTimeout(() => (this.typing.textContent = ""), TYPING_EXPIRES_MS);
  }

  // -- acting --------------------------------------------------------------------------------------

  act(kind) {
    if (!this.app.send({ type: kind, conversation_id: this.cid })) {
      this.say("Not connected right now: try again once the console is live.");
      return false;
    }
    this.say("");
    this.busy = kind;
    this.renderHead();
    return true;
  }

  takeOver() {
    if (this.mode === "human") {
      this.say(this.heldByMe() ? "You already hold this conversation." : `Held by ${this.app.holderName(this.agentId)}.`);
      return;
    }
    this.act("takeover");
  }

  handBack() {
    if (this.mode !== "human") return this.say("The AI already answers this conversation.");
    this.stopTyping();
    this.act("handback");
  }

  reply() {
    if (!this.heldByMe()) return this.say("Take over first (t) to write to the user.");
    this.box.focus();
  }

  boxKey(e) {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      this.submit();
    } else if (e.key === "Escape") {
      e.preventDefault();
      this.title.focus();
    }
  }

  submit() {
    const text = this.box.value.trim();
    if (!text || !this.heldByMe()) return;
    const p = { id: newId(), text, failed: null };
    this.pending.set(p.id, p);
    this.box.value = "";
    this.stopTyping();
    this.keepScrolled(() => this.log.append(this.pendingNode(p)));
    if (!this.sendPending(p)) this.paintPending(p);
  }

  sendPending(p) {
    const sent = this.app.send({ type: "message", conversation_id: this.cid, client_msg_id: p.id, text: p.text });
    this.paintPending(p, sent);
    return sent;
  }

  pendingNode(p) {
    if (!p.node) {
      p.node = el("li", { class: "msg agent pending", "data-pending": p.id }, el("p", { class: "who" }, "You"), el("div", { class: "bubble" }, el("span", { class: "text" })), el("p", { class: "meta" }));
      renderText(p.node.querySelector(".text"), p.text);
    }
    return p.node;
  }

  paintPending(p, sent) {
    const meta = p.node.querySelector(".meta");
    meta.textContent = p.failed ? `Not sent: ${p.failed}` : sent ? "Sending…" : "Not sent yet: it goes when the console reconnects.";
    p.node.classList.toggle("failed", !!p.failed);
  }

  onAck(f) {
    this.mine.add(f.message_id);
    const p = this.pending.get(f.client_msg_id);
    if (!p) return;
    this.pending.delete(p.id);
    p.node.remove();
    const it = this.byKey.get(f.message_id);
    if (it) this.paint(it);
    else this.add({ key: f.message_id, role: "agent", text: p.text, seq: f.seq }); // the event follows
  }

  onError(f) {
    if (f.client_msg_id && this.pending.has(f.client_msg_id)) {
      const p = this.pending.get(f.client_msg_id);
      p.failed = f.message;
      this.paintPending(p);
      return;
    }
    if (this.busy) this.busy = null;
    this.say(f.code === "not_found" ? "This conversation no longer exists." : f.message);
    this.renderHead();
  }

  typed() {
    const now = Date.now();
    if (now - this.typingSent > TYPING_RENEW_MS) {
      this.typingSent = now;
      this.app.send({ type: "typing", conversation_id: this.cid, state: true });
    }
    clearTimeout(this.idleTimer);
    this.idleTimer = setTimeout(() => this.stopTyping(), TYPING_IDLE_MS);
  }

  stopTyping() {
    clearTimeout(this.idleTimer);
    if (!this.typingSent) return;
    this.typingSent = 0;
    this.app.send({ type: "typing", conversation_id: this.cid, state: false });
  }

  close({ quiet = false } = {}) {
    this.closed = true;
    this.stopTyping();
    clearTimeout(this.sourcesTimer);
    clearTimeout(this.typingTimer);
    if (!quiet) this.app.send({ type: "unsubscribe", conversation_id: this.cid });
    this.root.remove();
    const next = this.app.paneClosed(this);
    if (quiet) return;
    if (next) next.focus();
    else document.getElementById("rows").focus();
  }

  // -- stage, data and flow ------------------------------------------------------------------------

  renderFacts() {
    const fields = Object.entries(this.extracted);
    const data = fields.length
      ? el("dl", { class: "data" }, ...fields.flatMap(([field, entry]) => [el("dt", {}, field), el("dd", {}, el("span", { class: "value" }, show(entry.value)), this.source(entry))]))
      : el("p", { class: "muted" }, "Nothing extracted yet.");
    const flow = this.app.flow ? drawFlow(this.app.flow, this.stage) : el("p", { class: "muted" }, "Loading the flow…");
    this.facts.replaceChildren(
      el("p", { class: "stage-now" }, "Current stage: ", el("strong", {}, this.stage || "…")),
      el("h4", {}, "Extracted data"),
      data,
      el("h4", {}, "Flow"),
      flow,
    );
  }

  /** Where a value came from: the rule or template, and the message it was found in. */
  source(entry) {
    if (!entry.extractor) return el("span", { class: "source" }, "source: being looked up…");
    const [kind, ...rest] = String(entry.extractor).split(":");
    const name = rest.join(":");
    let how = entry.extractor;
    if (kind === "pattern") {
      const rule = this.app.flow && this.app.flow.rules.find((r) => r.id === name);
      how = rule ? `pattern rule for ${rule.field}` : "a pattern rule";
    } else if (kind === "llm") {
      how = `the model, with the template "${name}"`;
    }
    const message = entry.source_message_id && this.byKey.get(entry.source_message_id);
    const from = message
      ? [" in “", snippet(message.text, 60), "” ", el("button", { type: "button", class: "link", onclick: () => this.point(message) }, "show")]
      : entry.source_message_id
        ? [` in message ${entry.source_message_id.slice(0, 8)}`]
        : [];
    return el("span", { class: "source" }, `found by ${how}`, ...from);
  }

  point(it) {
    it.node.scrollIntoView({ block: "center" });
    it.node.classList.add("pointed");
    setTimeout(() => it.node.classList.remove("pointed"), 2000);
  }
}

function show(value) {
  return typeof value === "string" ? value : JSON.stringify(value);
}

function capital(text) {
  return text.charAt(0).toUpperCase() + text.slice(1);
}
