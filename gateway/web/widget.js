/*
 * chatgw chat widget: one <script> tag on any page, no build step, no dependencies.
 *
 *   <script src="https://chat.example.com/widget.js" data-business="demo" async></script>
 *
 * Attributes of the tag (all but data-business optional):
 *   data-business   the business's public id
 *   data-title      the panel's heading (default "Chat with us")
 *   data-user-id, data-user-hash   a verified user identity: the business's own id of the signed-in user,
 *                   and the hex HMAC-SHA256 of that id under the business's identity secret, made by the
 *                   business's server (never in the page); sent as `user: {id, hash}` when a session is made
 *   data-open="true"   open the panel at once
 *   data-accent     a CSS colour for the launcher, the header and the user's bubbles
 *   data-gateway    the gateway's base URL (default: where this script was loaded from)
 *
 * The page can call window.chatgw.open() and window.chatgw.close().
 *
 * It speaks wire protocol v1 (docs/protocol.md). What it keeps in localStorage (per gateway, business
 * and user): the conversation's token and id, the position (epoch, last seq), the transcript and the
 * messages not yet acknowledged. A reload paints that at once and resumes from the position, an answer
 * still streaming included; a `reset` refetches history over HTTP.
 */
(function () {
  "use strict";

  var script = document.currentScript;
  if (!script) {
    console.error("chatgw: load widget.js with a classic <script> tag (not a module)");
    return;
  }

  // -- configuration --------------------------------------------------------------------------

  var cfg = readConfig(script);
  if (!cfg) return;

  function readConfig(el) {
    var d = el.dataset;
    var business = (d.business || "").trim();
    if (!business) {
      console.error('chatgw: add data-business="<your public id>" to the widget\'s <script> tag');
      return null;
    }
    var base;
    try {
      base = new URL(d.gateway || ".", el.src || location.href);
    } catch (e) {
      console.error("chatgw: data-gateway is not a URL: " + d.gateway);
      return null;
    }
    var accent = d.accent && window.CSS && CSS.supports("color", d.accent) ? d.accent : null;
    return {
      business: business,
      base: base,
      title: d.title || "Chat with us",
      user: d.userId ? { id: d.userId, hash: d.userHash || "" } : null,
      open: d.open === "true",
      accent: accent,
    };
  }

  var SESSIONS_URL = new URL("v1/widget/sessions", cfg.base).href;
  var WS_URL = (function () {
    var u = new URL("ws", cfg.base);
    u.protocol = u.protocol === "https:" ? "wss:" : "ws:";
    return u.href;
  })();
  var STORE_KEY = ["chatgw", "v1", cfg.base.host + cfg.base.pathname, cfg.business, cfg.user ? cfg.user.id : ""].join("|");
  var KEEP_ITEMS = 200; // transcript items kept in storage
  var MAX_CHARS = 4000; // the gateway's default CHATGW_MAX_MESSAGE_CHARS
  var TYPING_EXPIRES_MS = 10000;

  // -- ids --------------------------------------------------------------------------------------

  // crypto.randomUUID exists only in secure contexts (https, localhost); getRandomValues everywhere.
  function newId() {
    var c = window.crypto;
    if (c && typeof c.randomUUID === "function") return c.randomUUID();
    var b = new Uint8Array(16);
    if (c && typeof c.getRandomValues === "function") c.getRandomValues(b);
    else for (var i = 0; i < 16; i++) b[i] = Math.floor(Math.random() * 256);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    var h = Array.prototype.map.call(b, function (x) { return (x + 0x100).toString(16).slice(1); }).join("");
    return h.slice(0, 8) + "-" + h.slice(8, 12) + "-" + h.slice(12, 16) + "-" + h.slice(16, 20) + "-" + h.slice(20);
  }

  // -- state ------------------------------------------------------------------------------------

  var conv = null; // {token, conversationId, epoch, seq, mode}
  var items = []; // the transcript in seq order: {key, kind: "message"|"notice", role, text, status, seq, clientMsgId, partial}
  var byKey = new Map();
  var pending = []; // messages not acknowledged yet: {id, text, failed, note (why it waits)}
  var streaming = null; // response_id of the answer streaming now
  var isOpen = false;
  var unread = 0;

  function loadSaved() {
    try {
      var s = JSON.parse(localStorage.getItem(STORE_KEY) || "null");
      if (s && s.v === 1 && typeof s.token === "string" && typeof s.conversationId === "string") return s;
    } catch (e) { /* storage off or corrupt: start afresh */ }
    return null;
  }

  var saveTimer = 0;
  function scheduleSave() {
    if (!saveTimer) saveTimer = setTimeout(saveNow, 250);
  }
  function saveNow() {
    clearTimeout(saveTimer);
    saveTimer = 0;
    if (!conv) return;
    var saved = {
      v: 1,
      token: conv.token,
      conversationId: conv.conversationId,
      epoch: conv.epoch,
      seq: conv.seq,
      mode: conv.mode,
      items: items.slice(-KEEP_ITEMS),
      pending: pending,
      open: isOpen,
    };
    try {
      localStorage.setItem(STORE_KEY, JSON.stringify(saved));
    } catch (e) { /* storage full or off: the widget still works, a reload starts afresh */ }
  }

  function restore(s) {
    conv = { token: s.token, conversationId: s.conversationId, epoch: s.epoch || null, seq: s.seq || 0, mode: s.mode || "ai" };
    items = [];
    byKey.clear();
    (s.items || []).forEach(function (it) {
      // An answer that was streaming goes on streaming after the resume (or is fixed by its ai_end).
      items.push(it);
      byKey.set(it.key, it);
    });
    pending = (s.pending || []).filter(function (p) { return p && typeof p.id === "string"; });
    isOpen = !!s.open;
  }

  // -- HTTP ---------------------------------------------------------------------------------------

  function HttpError(status, code, message, retryAfterMs) {
    this.status = status;
    this.code = code;
    this.message = message;
    this.retryAfterMs = retryAfterMs;
  }

  function request(url, options) {
    return fetch(url, options).then(
      function (r) {
        if (r.ok) return r.json();
        return r.json().catch(function () { return {}; }).then(function (body) {
          var e = (body && body.error) || {};
          // The body's retry_after_ms keeps the gateway's spread; Retry-After is whole seconds.
          var retry = Number(e.retry_after_ms) || Number(r.headers.get("Retry-After")) * 1000 || null;
          throw new HttpError(r.status, e.code || "http_" + r.status, e.message || r.statusText, retry);
        });
      },
      function () {
        throw new HttpError(0, "network", "network error", null);
      }
    );
  }

  function createSession(continueConversation) {
    var body = { business: cfg.business };
    if (cfg.user) body.user = cfg.user;
    var headers = { "Content-Type": "application/json" };
    if (continueConversation) {
      body.conversation_id = conv.conversationId;
      headers.Authorization = "Bearer " + conv.token;
    }
    return request(SESSIONS_URL, { method: "POST", headers: headers, body: JSON.stringify(body) });
  }

  function fetchHistory() {
    var all = [];
    var first = null;
    function page(afterSeq, pages) {
      var url = new URL("v1/conversations/" + encodeURIComponent(conv.conversationId) + "/messages", cfg.base);
      url.searchParams.set("after_seq", String(afterSeq));
      url.searchParams.set("limit", "500");
      return request(url.href, { headers: { Authorization: "Bearer " + conv.token } }).then(function (h) {
        if (!first) first = h; // the position is read before the rows: the first page's is the one
        all = all.concat(h.messages);
        var last = h.messages[h.messages.length - 1];
        if (h.has_more && last && pages < 20) return page(last.seq, pages + 1);
        return { messages: all, epoch: first.epoch, seq: first.seq };
      });
    }
    return page(0, 1);
  }

  function tokenExpiresSoon(token) {
    try {
      var part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      var claims = JSON.parse(atob(part + "===".slice((part.length + 3) % 4)));
      return claims.exp * 1000 < Date.now() + 60000;
    } catch (e) {
      return true;
    }
  }

  // -- the transcript -------------------------------------------------------------------------------

  function addItem(it) {
    // Events come in seq order, so this is nearly always an append.
    var i = items.length;
    while (i > 0 && items[i - 1].seq > it.seq) i--;
    items.splice(i, 0, it);
    byKey.set(it.key, it);
    view.place(it, items[i + 1] || null);
    return it;
  }

  function notice(seq, text) {
    var key = "notice:" + seq;
    if (byKey.has(key)) return;
    addItem({ key: key, kind: "notice", role: "system", text: text, seq: seq });
  }

  function pendingById(id) {
    for (var i = 0; i < pending.length; i++) if (pending[i].id === id) return pending[i];
    return null;
  }

  function settlePending(id) {
    var p = pendingById(id);
    if (!p) return null;
    pending.splice(pending.indexOf(p), 1);
    view.removePending(p);
    return p;
  }

  function onMessage(f) {
    var existing = byKey.get(f.message_id);
    var p = f.client_msg_id ? settlePending(f.client_msg_id) : null;
    if (existing) return; // seen already in history, or through its ack
    addItem({
      key: f.message_id, kind: "message", role: f.role, text: f.text, seq: f.seq,
      clientMsgId: f.client_msg_id || null, status: null, author: f.agent_name || null,
    });
    if (f.role === "agent") view.typing({ role: "agent", state: false });
    if (f.role !== "user" && !p) noteUnread();
  }

  function onAck(f) {
    var p = settlePending(f.client_msg_id);
    if (!p || byKey.has(f.message_id)) return;
    // The ack can come before the message event: show the message as sent now; the event, when
    // it comes, finds it by message_id. The position (conv.seq) moves only with events.
    addItem({ key: f.message_id, kind: "message", role: "user", text: p.text, seq: f.seq, clientMsgId: p.id, status: null });
  }

  function answerItem(responseId, seq) {
    var it = byKey.get(responseId);
    if (it) return it;
    // An answer whose start we did not see (after a reset): what follows is only its end.
    return addItem({ key: responseId, kind: "message", role: "assistant", text: "", seq: seq, status: "streaming", partial: seq !== null });
  }

  function onAiStart(f) {
    var it = byKey.get(f.response_id) || addItem({ key: f.response_id, kind: "message", role: "assistant", text: "", seq: f.seq, status: "streaming" });
    if (it.status === "streaming") setStreaming(f.response_id);
    view.update(it);
    noteUnread();
  }

  function onDelta(f) {
    var it = answerItem(f.response_id, f.seq);
    if (it.status !== "streaming") return; // ended already (seen in history)
    it.text += f.text;
    setStreaming(f.response_id);
    view.update(it);
  }

  function onAiEnd(f) {
    var it = answerItem(f.response_id, f.seq);
    it.text = f.text; // exactly the answer's deltas joined: authoritative
    it.status = f.status;
    it.partial = false;
    if (streaming === f.response_id) setStreaming(null);
    view.update(it);
  }

  function onMode(f) {
    var was = conv.mode;
    conv.mode = f.mode;
    if (f.mode === "human" && was !== "human") notice(f.seq, "An agent joined the conversation.");
    if (f.mode === "ai" && was === "human") notice(f.seq, "The agent handed the conversation back to the assistant.");
    view.status();
  }

  function setStreaming(responseId) {
    streaming = responseId;
    view.stopButton();
  }

  function onEvent(f) {
    if (typeof f.seq === "number") {
      if (f.seq <= conv.seq) return; // replay overlap: seen already
      if (f.seq > conv.seq + 1 && conv.epoch !== null) {
        // A gap should never happen; reconnect and let the resume fill it.
        link.restart("gap");
        return;
      }
      conv.seq = f.seq;
    }
    switch (f.type) {
      case "message": onMessage(f); break;
      case "ai_start": onAiStart(f); break;
      case "delta": onDelta(f); break;
      case "ai_end": onAiEnd(f); break;
      case "mode": onMode(f); break;
      default: break; // stage and fields of later versions
    }
    scheduleSave();
  }

  function historyItem(m) {
    var key = m.role === "assistant" && m.response_id ? m.response_id : m.message_id;
    return { key: key, kind: "message", role: m.role, text: m.text, seq: m.seq, clientMsgId: m.client_msg_id || null, status: m.status || null, author: m.agent_name || null };
  }

  // After a reset: the stored messages, the notices still meaningful, and what is still pending.
  function rebuild(history, keepNotices) {
    var kept = keepNotices ? items.filter(function (it) { return it.kind === "notice" && it.seq <= history.seq; }) : [];
    var stored = history.messages.map(historyItem);
    var sent = {};
    stored.forEach(function (it) { if (it.clientMsgId) sent[it.clientMsgId] = true; });
    pending = pending.filter(function (p) { return !sent[p.id]; });
    items = stored.concat(kept).sort(function (a, b) { return a.seq - b.seq; });
    byKey.clear();
    items.forEach(function (it) { byKey.set(it.key, it); });
    setStreaming(null);
    view.renderAll();
  }

  // -- the connection -------------------------------------------------------------------------------

  var link = (function () {
    var ws = null;
    var live = false;
    var attempt = 0;
    var timer = 0;
    var helloTimer = 0;
    var resumed = false;
    var held = null; // events held back while history is refetched after a reset
    var nextDelay = null; // set by a `reconnect` frame or an error's retry_after_ms
    var lastError = null;
    var holdUntil = 0; // a refusal's retry_after_ms: no message is sent before this (Date.now())
    var holdTimer = 0;
    var stopped = false;
    var resetGen = 0;
    var welcomeMode = "ai";

    function connect() {
      clearTimeout(timer);
      timer = 0;
      if (ws || stopped || !conv) return;
      view.connection("connecting");
      var sock;
      try {
        sock = new WebSocket(WS_URL);
      } catch (e) {
        schedule();
        return;
      }
      ws = sock;
      lastError = null;
      sock.onopen = function () {
        if (ws !== sock) return;
        var hello = { type: "hello", token: conv.token };
        resumed = conv.epoch !== null;
        if (resumed) hello.resume = { epoch: conv.epoch, last_seq: conv.seq };
        sock.send(JSON.stringify(hello));
        helloTimer = setTimeout(function () { if (ws === sock && !live) sock.close(); }, 10000);
      };
      sock.onmessage = function (msg) {
        if (ws !== sock) return;
        var f;
        try { f = JSON.parse(msg.data); } catch (e) { return; }
        if (f && typeof f.type === "string") onFrame(f);
      };
      sock.onclose = function (ev) {
        if (ws !== sock) return;
        ws = null;
        live = false;
        held = null;
        clearTimeout(helloTimer);
        setStreaming(null);
        view.pendingAll();
        closed(ev.code);
      };
    }

    function onFrame(f) {
      switch (f.type) {
        case "welcome": return welcome(f);
        case "reset": return reset(f);
        case "ack": return onAck(f), scheduleSave();
        case "error": return error(f);
        case "typing": return view.typing(f);
        case "reconnect": nextDelay = f.after_ms; return;
        default:
          if (held) held.push(f);
          else onEvent(f);
      }
    }

    function welcome(f) {
      clearTimeout(helloTimer);
      live = true;
      attempt = 0;
      welcomeMode = f.mode;
      // On a resume the replayed `mode` events bring the mode (and their notices) in order.
      if (!resumed) conv.mode = f.mode;
      if (!resumed) {
        conv.epoch = f.epoch;
        var behind = f.seq > conv.seq;
        conv.seq = f.seq;
        // A conversation we have no transcript of (storage was lost): its history, merged by id.
        if (behind) mergeHistory();
      }
      view.connection("online");
      view.banner(null);
      flush();
      saveNow();
    }

    function mergeHistory() {
      fetchHistory().then(function (h) {
        h.messages.map(historyItem).forEach(function (it) {
          if (!byKey.has(it.key)) addItem(it);
        });
        scheduleSave();
      }, function () { /* the live conversation still works; history shows after the next reset */ });
    }

    function reset(f) {
      var gen = ++resetGen;
      held = [];
      fetchHistory().then(
        function (h) {
          if (gen !== resetGen || !held) return;
          rebuild(h, f.epoch === conv.epoch);
          conv.epoch = f.epoch;
          conv.seq = f.seq;
          conv.mode = welcomeMode;
          view.status();
          var events = held;
          held = null;
          events.forEach(onEvent);
          saveNow();
        },
        function () {
          if (gen === resetGen) restart("history");
        }
      );
    }

    function error(f) {
      // An error about one message says nothing about the connection: it must not decide how a
      // later close is handled.
      if (f.client_msg_id) return messageError(f);
      // Typing is throttled here already; a refused typing frame is nothing the user must know.
      if (f.code === "rate_limited" && f.limit === "socket_typing") return;
      lastError = f;
      if (f.code === "rate_limited") view.banner("You're sending messages too fast. Please wait a moment.", true);
      else if (f.code === "unavailable") view.banner("The chat service is having trouble right now. We'll keep trying.");
      else if (f.code === "too_large") view.banner("That was too long to send.", true);
    }

    function messageError(f) {
      var p = pendingById(f.client_msg_id);
      if (!p) return;
      if (f.code === "rate_limited" || f.code === "unavailable" || f.code === "internal") {
        // Not stored: it stays pending and is sent again (same id) after retry_after_ms.
        var wait = Math.max(1000, f.retry_after_ms || 3000);
        var secs = Math.ceil(wait / 1000);
        view.banner(
          f.code === "rate_limited"
            ? "You're sending messages too fast. Your message will be sent in " + secs + " s."
            : f.code === "unavailable"
              ? "The chat service is busy right now. Your message will be sent in " + secs + " s."
              : "The chat service is having trouble. Your message will be sent as soon as it can.",
          f.code !== "internal"
        );
        if (f.code === "rate_limited") {
          p.note = "Waiting to send: too many messages in a short time.";
          view.updatePending(p);
        }
        holdSends(wait);
        return;
      }
      p.failed = f.code === "too_large" ? "Too long to send (at most " + MAX_CHARS + " characters)." : "Not sent: " + f.message;
      view.updatePending(p);
      scheduleSave();
    }

    function closed(code) {
      if (stopped) return;
      if (code === 4401) return renew();
      if (code === 4403) {
        view.connection("off");
        view.banner("This chat can't be used on this page.");
        stopped = true;
        return;
      }
      var delay = nextDelay;
      nextDelay = null;
      if (code === 1013 || (lastError && lastError.code === "unavailable")) {
        view.banner("The chat service is temporarily unavailable. Reconnecting…");
        if (lastError && lastError.retry_after_ms) delay = lastError.retry_after_ms;
      }
      if (code === 4429) delay = 30000 + Math.random() * 30000;
      schedule(delay);
    }

    // Exponential backoff with jitter: 0.5-1 s, 1-2 s, 2-4 s, ... up to 7.5-15 s.
    function schedule(delay) {
      if (timer || stopped) return;
      if (delay == null) {
        var cap = Math.min(15000, 1000 * Math.pow(2, attempt));
        delay = cap / 2 + (Math.random() * cap) / 2;
      }
      attempt++;
      view.connection("waiting", delay);
      timer = setTimeout(connect, delay);
    }

    function renew() {
      createSession(true).then(
        function (s) {
          conv.token = s.token;
          saveNow();
          connect();
        },
        function (e) {
          if (e.status === 401 || e.status === 403 || e.status === 404) {
            // The conversation cannot be continued (gone, or its token is too old): a new one.
            start(true).then(function () {
              notice(0, "Your earlier conversation could not be continued, so this is a new one.");
            });
          } else {
            schedule();
          }
        }
      );
    }

    // The gateway said to wait: this message and any written meanwhile stay pending and go out,
    // in order, when the wait is over (the gateway would refuse them before then anyway).
    function holdSends(wait) {
      holdUntil = Math.max(holdUntil, Date.now() + wait);
      clearTimeout(holdTimer);
      holdTimer = setTimeout(function () {
        holdTimer = 0;
        if (live) flush();
      }, holdUntil - Date.now());
    }

    function send(p) {
      if (!live || Date.now() < holdUntil) return false;
      ws.send(JSON.stringify({ type: "message", client_msg_id: p.id, text: p.text }));
      return true;
    }

    function flush() {
      pending.forEach(function (p) { if (!p.failed) { p.note = null; send(p); } });
      view.pendingAll();
    }

    function frame(f) {
      if (live) ws.send(JSON.stringify(f));
    }

    function restart(why) {
      if (ws) ws.close(1000, why);
    }

    function stop() {
      stopped = true;
      clearTimeout(timer);
      clearTimeout(holdTimer);
      timer = holdTimer = 0;
      var sock = ws;
      ws = null;
      live = false;
      held = null;
      if (sock) sock.close(1000, "new conversation");
    }

    return {
      connect: function () { stopped = false; connect(); },
      now: function () { attempt = 0; if (timer) connect(); },
      offline: function () { restart("offline"); },
      send: send,
      frame: frame,
      restart: restart,
      stop: stop,
      isLive: function () { return live; },
      isStopped: function () { return stopped; },
    };
  })();

  // -- actions --------------------------------------------------------------------------------------

  var starting = null;

  // A conversation is created only when the visitor opens the chat, not for every page view.
  function start(fresh) {
    if (starting) return starting;
    starting = (fresh || !conv ? createSession(false).then(function (s) {
      link.stop();
      conv = { token: s.token, conversationId: s.conversation_id, epoch: null, seq: 0, mode: "ai" };
      items = [];
      byKey.clear();
      pending = [];
      setStreaming(null);
      view.clear();
      saveNow();
    }) : tokenExpiresSoon(conv.token) ? createSession(true).then(function (s) {
      conv.token = s.token;
      saveNow();
    }, function (e) {
      if (e.status === 401 || e.status === 403 || e.status === 404) return start(true);
      throw e;
    }) : Promise.resolve()).then(
      function () {
        starting = null;
        link.connect();
      },
      function (e) {
        starting = null;
        view.connection("off");
        // Without a conversation yet, try again while the trouble may pass (not for a refusal):
        // when the gateway said when (an overloaded instance's 503, a 429), then.
        var again = !conv && (e.status === 0 || e.status === 429 || e.status >= 500);
        var wait = e.retryAfterMs ? Math.max(1000, e.retryAfterMs) : 5000 + Math.random() * 5000;
        view.banner(again && e.status === 503 && e.retryAfterMs
          ? "The chat service is busy right now. Trying again in " + Math.ceil(wait / 1000) + " s."
          : plainHttpError(e));
        if (again) {
          setTimeout(function () { start(false).catch(function () {}); }, wait);
        }
        throw e;
      }
    );
    return starting;
  }

  function plainHttpError(e) {
    if (e.status === 0) return "Can't reach the chat service. Check your connection and try again.";
    if (e.status === 429) return "Too many people are starting chats right now. Please try again in a minute.";
    if (e.status >= 500) return "The chat service is temporarily unavailable. Please try again soon.";
    return "The chat could not start: " + e.message;
  }

  function submit(text) {
    text = text.trim();
    if (!text) return false;
    if (text.length > MAX_CHARS) {
      view.banner("That message is too long: at most " + MAX_CHARS + " characters.", true);
      return false;
    }
    var p = { id: newId(), text: text, failed: null };
    pending.push(p);
    view.addPending(p);
    link.send(p);
    view.updatePending(p);
    saveNow();
    if (!conv) start(false).catch(function () {});
    return true;
  }

  function retry(p) {
    p.failed = null;
    view.updatePending(p);
    link.send(p);
    scheduleSave();
  }

  function noteUnread() {
    if (isOpen) return;
    unread++;
    view.unread(unread);
  }

  // -- links ------------------------------------------------------------------------------------------

  var URL_RE = /\bhttps?:\/\/[^\s<>"'`]+/gi;

  // Text only ever becomes text nodes; http(s) URLs become links that open in a new tab without
  // giving the opened page a handle on this one.
  function renderText(el, text) {
    el.textContent = "";
    var last = 0;
    var m;
    URL_RE.lastIndex = 0;
    while ((m = URL_RE.exec(text)) !== null) {
      var url = trimUrl(m[0]);
      var a = safeLink(url);
      if (!a) continue;
      el.appendChild(document.createTextNode(text.slice(last, m.index)));
      el.appendChild(a);
      last = m.index + url.length;
      URL_RE.lastIndex = last;
    }
    el.appendChild(document.createTextNode(text.slice(last)));
  }

  function trimUrl(url) {
    // Punctuation that ends a sentence is not part of the link; a closing bracket is when it has an opening one.
    for (;;) {
      var c = url.charAt(url.length - 1);
      if (".,;:!?'\"".indexOf(c) >= 0) url = url.slice(0, -1);
      else if (c === ")" && url.split("(").length <= url.split(")").length - 1) url = url.slice(0, -1);
      else return url;
    }
  }

  function safeLink(text) {
    var u;
    try { u = new URL(text); } catch (e) { return null; }
    if (u.protocol !== "http:" && u.protocol !== "https:") return null;
    var a = document.createElement("a");
    a.href = u.href;
    a.target = "_blank";
    a.rel = "noopener noreferrer";
    a.textContent = text;
    return a;
  }

  // -- the view -----------------------------------------------------------------------------------------

  var CSS_TEXT = [
    ":host{all:initial}",
    "*{box-sizing:border-box}",
    ".root{--accent:" + (cfg.accent || "#1d4ed8") + ";--ink:#1b1f24;--muted:#4b5563;--line:#d7dbe2;font:15px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;color:var(--ink)}",
    ".launcher{position:fixed;right:20px;bottom:20px;z-index:2147483000;width:60px;height:60px;border-radius:50%;border:0;background:var(--accent);color:#fff;cursor:pointer;box-shadow:0 4px 16px rgba(0,0,0,.25);display:grid;place-items:center}",
    ".launcher svg{width:28px;height:28px}",
    ".launcher:focus-visible,button:focus-visible,a:focus-visible,.log:focus-visible{outline:3px solid #f59e0b;outline-offset:2px}",
    "textarea:focus{outline:2px solid var(--accent);outline-offset:0;border-color:var(--accent)}",
    ".badge{position:absolute;top:-2px;right:-2px;min-width:22px;height:22px;padding:0 6px;border-radius:11px;background:#b91c1c;color:#fff;font-size:12px;font-weight:700;line-height:22px;text-align:center}",
    ".panel{position:fixed;right:20px;bottom:92px;z-index:2147483000;width:380px;max-width:calc(100% - 40px);height:600px;max-height:calc(100% - 112px);display:flex;flex-direction:column;background:#fff;border-radius:14px;box-shadow:0 8px 32px rgba(0,0,0,.28);overflow:hidden}",
    ".panel[hidden]{display:none}",
    "header{display:flex;align-items:center;gap:8px;padding:12px 12px 12px 16px;background:var(--accent);color:#fff}",
    "header .titles{flex:1;min-width:0}",
    "h2{margin:0;font-size:16px;font-weight:650;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}",
    ".status{margin:0;font-size:12.5px;opacity:.95}",
    ".status::before{content:'';display:inline-block;width:8px;height:8px;border-radius:50%;margin-right:6px;background:#9ca3af;vertical-align:1px}",
    ".status[data-state=online]::before{background:#4ade80}",
    ".status[data-state=waiting]::before,.status[data-state=connecting]::before{background:#fbbf24}",
    "header button{flex:none;border:1px solid rgba(255,255,255,.6);background:transparent;color:#fff;border-radius:8px;padding:6px 9px;font:inherit;font-size:13px;cursor:pointer}",
    "header button:hover{background:rgba(255,255,255,.15)}",
    "header .close{font-size:20px;line-height:1;padding:3px 9px}",
    ".log{flex:1;margin:0;padding:14px 12px;list-style:none;overflow-y:auto;overflow-x:hidden;background:#f7f8fa}",
    ".log li{margin:0 0 10px;display:flex;flex-direction:column;align-items:flex-start}",
    ".bubble{max-width:85%;padding:8px 12px;border-radius:14px;background:#fff;border:1px solid var(--line);white-space:pre-wrap;overflow-wrap:anywhere;word-break:break-word}",
    ".bubble a{color:inherit;text-decoration:underline}",
    "li.user{align-items:flex-end}",
    "li.user .bubble{background:var(--accent);border-color:var(--accent);color:#fff}",
    "li.agent .bubble{background:#fff7e6;border-color:#d98e04}",
    ".who{font-size:12px;color:var(--muted);margin:0 4px 2px;font-weight:600}",
    "li.agent .who{color:#7a4a00}",
    ".meta{font-size:12px;color:var(--muted);margin:3px 4px 0}",
    "li.failed .meta,.meta.bad{color:#b91c1c}",
    "li.notice{align-items:center}",
    "li.notice .bubble{background:transparent;border:0;color:var(--muted);font-size:13px;text-align:center;padding:2px 8px}",
    "li.pending .bubble{background:#fff;color:var(--ink);border:1px dashed var(--accent)}",
    ".meta button{font:inherit;color:#1d4ed8;background:none;border:0;padding:0 2px;text-decoration:underline;cursor:pointer}",
    ".dots{display:inline-flex;gap:4px;padding:4px 0}",
    ".dots i{width:7px;height:7px;border-radius:50%;background:#6b7280;animation:b 1.2s infinite}",
    ".dots i:nth-child(2){animation-delay:.2s}.dots i:nth-child(3){animation-delay:.4s}",
    "@keyframes b{0%,60%,100%{opacity:.3}30%{opacity:1}}",
    "li[data-state=streaming] .bubble .text::after{content:'▍';opacity:.6;animation:b 1s infinite}",
    ".typing{min-height:20px;padding:0 16px;font-size:12.5px;color:var(--muted);background:#f7f8fa}",
    ".stopbar{display:flex;justify-content:center;padding:6px;background:#f7f8fa}",
    ".stopbar[hidden]{display:none}",
    ".stop{border:1px solid var(--line);background:#fff;color:var(--ink);border-radius:18px;padding:6px 14px;font:inherit;font-size:13.5px;cursor:pointer}",
    ".banner{margin:0;padding:8px 14px;background:#fef3c7;color:#78350f;font-size:13.5px;border-top:1px solid #fcd34d}",
    ".banner[hidden]{display:none}",
    "form{display:flex;gap:8px;align-items:flex-end;padding:10px;border-top:1px solid var(--line);background:#fff}",
    "textarea{flex:1;min-width:0;resize:none;border:1px solid #9ca3af;border-radius:10px;padding:8px 10px;font:inherit;color:var(--ink);max-height:120px;background:#fff}",
    "form button{flex:none;border:0;border-radius:10px;padding:9px 14px;background:var(--accent);color:#fff;font:inherit;font-weight:600;cursor:pointer}",
    ".sr{position:absolute;width:1px;height:1px;margin:-1px;padding:0;overflow:hidden;clip:rect(0 0 0 0);white-space:nowrap;border:0}",
    "@media (max-width:480px){.panel{inset:0;width:auto;max-width:none;height:auto;max-height:none;border-radius:0}.launcher.open{display:none}}",
    "@media (prefers-reduced-motion:reduce){.dots i,li[data-state=streaming] .bubble .text::after{animation:none}}",
  ].join("\n");

  var ICON = '<svg viewBox="0 0 24 24" fill="none" stroke="currentColor" stroke-width="2" stroke-linecap="round" stroke-linejoin="round" aria-hidden="true"><path d="M21 15a2 2 0 0 1-2 2H7l-4 4V5a2 2 0 0 1 2-2h14a2 2 0 0 1 2 2z"/></svg>';

  var view = (function () {
    var host = document.createElement("div");
    host.setAttribute("data-chatgw", cfg.business);
    var root = host.attachShadow({ mode: "open" });
    applyStyles(root);
    var wrap = el("div", "root");
    root.appendChild(wrap);

    var launcher = el("button", "launcher");
    launcher.type = "button";
    launcher.setAttribute("aria-label", "Open chat: " + cfg.title);
    launcher.setAttribute("aria-expanded", "false");
    launcher.setAttribute("aria-controls", "chatgw-panel");
    launcher.innerHTML = ICON; // a constant, not user text
    var badge = el("span", "badge");
    badge.hidden = true;
    launcher.appendChild(badge);

    var panel = el("section", "panel");
    panel.id = "chatgw-panel";
    panel.hidden = true;
    panel.setAttribute("role", "dialog");
    panel.setAttribute("aria-modal", "false");
    panel.setAttribute("aria-labelledby", "chatgw-title");

    var header = el("header");
    var titles = el("div", "titles");
    var title = el("h2");
    title.id = "chatgw-title";
    title.textContent = cfg.title;
    var statusLine = el("p", "status");
    statusLine.setAttribute("role", "status");
    titles.append(title, statusLine);
    var newBtn = el("button", "new");
    newBtn.type = "button";
    newBtn.textContent = "New chat";
    newBtn.title = "Start a new conversation";
    var closeBtn = el("button", "close");
    closeBtn.type = "button";
    closeBtn.setAttribute("aria-label", "Close chat");
    closeBtn.textContent = "×";
    header.append(titles, newBtn, closeBtn);

    var log = el("ol", "log");
    log.setAttribute("role", "log");
    log.setAttribute("aria-label", "Messages");
    log.setAttribute("aria-live", "polite");
    log.tabIndex = 0;

    var typingLine = el("div", "typing");
    typingLine.setAttribute("aria-live", "polite");
    var stopbar = el("div", "stopbar");
    stopbar.hidden = true;
    var stopBtn = el("button", "stop");
    stopBtn.type = "button";
    stopBtn.textContent = "■ Stop answering";
    stopbar.appendChild(stopBtn);
    var banner = el("p", "banner");
    banner.setAttribute("role", "alert");
    banner.hidden = true;

    var form = el("form");
    var label = el("label", "sr");
    label.htmlFor = "chatgw-input";
    label.textContent = "Your message";
    var input = el("textarea");
    input.id = "chatgw-input";
    input.rows = 1;
    input.maxLength = MAX_CHARS;
    input.placeholder = "Type a message…";
    input.autocomplete = "off";
    var sendBtn = el("button");
    sendBtn.type = "submit";
    sendBtn.textContent = "Send";
    form.append(label, input, sendBtn);

    panel.append(header, log, typingLine, stopbar, banner, form);
    wrap.append(panel, launcher);

    var lis = new Map(); // item key -> <li>
    var pendingLis = new Map(); // pending id -> <li>
    var typingTimer = 0;
    var bannerTimer = 0;
    var typingSent = 0;
    var typingIdle = 0;

    function el(tag, cls) {
      var e = document.createElement(tag);
      if (cls) e.className = cls;
      return e;
    }

    function applyStyles(r) {
      // A constructed stylesheet also works under a Content-Security-Policy without 'unsafe-inline'.
      try {
        var sheet = new CSSStyleSheet();
        sheet.replaceSync(CSS_TEXT);
        r.adoptedStyleSheets = [sheet];
      } catch (e) {
        var style = document.createElement("style");
        style.textContent = CSS_TEXT;
        r.appendChild(style);
      }
    }

    function nearBottom() {
      return log.scrollHeight - log.scrollTop - log.clientHeight < 80;
    }

    function keepScrolled(wasNear) {
      if (wasNear) log.scrollTop = log.scrollHeight;
    }

    function build(it) {
      var li = el("li");
      var who = el("span", "who");
      var bubble = el("div", "bubble");
      var text = el("span", "text");
      bubble.appendChild(text);
      var meta = el("div", "meta");
      li.append(who, bubble, meta);
      li.dataset.key = it.key;
      return li;
    }

    var STATUS_TEXT = {
      stopped: "Stopped.",
      taken_over: "An agent took over from the assistant here.",
      failed: "This answer could not be finished.",
      interrupted: "This answer was interrupted. Please ask again if it is incomplete.",
    };
    var WHO = { assistant: "Assistant", agent: "Agent", user: "You said", system: "" };

    function update(it) {
      var li = lis.get(it.key);
      if (!li) return;
      var wasNear = nearBottom();
      // The gateway's own messages (role system, such as "could not finish that answer") read as notices.
      li.className = it.kind === "notice" || it.role === "system" ? "notice" : it.role;
      li.dataset.role = it.role;
      li.dataset.state = it.status || "sent";
      li.dataset.seq = String(it.seq);
      var who = li.children[0];
      // An agent's message says who wrote it: "Sam (agent)"; the look (colour) says it too.
      var name = it.role === "agent" && it.author ? it.author + " (agent)" : WHO[it.role];
      who.textContent = it.kind === "notice" ? "" : name || "";
      who.className = it.role === "user" ? "who sr" : "who"; // the look says it; screen readers hear it
      who.hidden = !who.textContent;
      var textEl = li.children[1].firstChild;
      var shown = (it.partial ? "… " : "") + it.text;
      if (it.status === "streaming" && !it.text) {
        textEl.textContent = "";
        if (!li.querySelector(".dots")) {
          var dots = el("span", "dots");
          dots.setAttribute("aria-label", "The assistant is typing");
          dots.append(el("i"), el("i"), el("i"));
          li.children[1].appendChild(dots);
        }
      } else {
        var d = li.querySelector(".dots");
        if (d) d.remove();
        if (textEl.dataset.shown !== shown) {
          renderText(textEl, shown);
          textEl.dataset.shown = shown;
        }
      }
      // Screen readers announce the answer once it is complete, not word by word.
      li.setAttribute("aria-busy", it.status === "streaming" ? "true" : "false");
      var meta = li.children[2];
      meta.textContent = STATUS_TEXT[it.status] || "";
      meta.className = it.status === "failed" ? "meta bad" : "meta";
      meta.hidden = !meta.textContent;
      keepScrolled(wasNear);
    }

    function place(it, before) {
      var li = build(it);
      lis.set(it.key, li);
      var anchor = before ? lis.get(before.key) : null;
      if (!anchor) anchor = pendingLis.size ? pendingLis.values().next().value : null;
      var wasNear = nearBottom();
      log.insertBefore(li, anchor);
      update(it);
      keepScrolled(wasNear);
    }

    function addPending(p) {
      var li = build({ key: "pending:" + p.id });
      li.className = "user pending";
      li.dataset.role = "user";
      pendingLis.set(p.id, li);
      log.appendChild(li);
      updatePending(p);
      log.scrollTop = log.scrollHeight;
    }

    function updatePending(p) {
      var li = pendingLis.get(p.id);
      if (!li) return;
      li.className = "user pending" + (p.failed ? " failed" : "");
      li.dataset.state = p.failed ? "failed" : "pending";
      li.children[0].textContent = "You said";
      li.children[0].className = "who sr";
      var textEl = li.children[1].firstChild;
      if (textEl.dataset.shown !== p.text) {
        renderText(textEl, p.text);
        textEl.dataset.shown = p.text;
      }
      var meta = li.children[2];
      meta.className = "meta" + (p.failed ? " bad" : "");
      meta.textContent = p.failed || p.note || (link.isLive() ? "Sending…" : "Not sent yet: it will be sent when the chat reconnects.");
      meta.hidden = false;
      if (p.failed) {
        var again = el("button");
        again.type = "button";
        again.textContent = "Try again";
        again.addEventListener("click", function () { retry(p); });
        meta.append(" ", again);
      }
    }

    function removePending(p) {
      var li = pendingLis.get(p.id);
      pendingLis.delete(p.id);
      if (li) li.remove();
    }

    function pendingAll() {
      pending.forEach(updatePending);
    }

    function clear() {
      log.textContent = "";
      lis.clear();
      pendingLis.clear();
    }

    function renderAll() {
      clear();
      items.forEach(function (it) { place(it, null); });
      pending.forEach(addPending);
      stopButton();
      status();
    }

    var connState = "off";
    var waitUntil = 0;
    var waitTimer = 0;
    function connection(state, delay) {
      connState = state;
      clearInterval(waitTimer);
      if (state === "waiting") {
        waitUntil = Date.now() + delay;
        waitTimer = setInterval(status, 1000);
      }
      status();
    }

    function status() {
      var text;
      if (connState === "online") text = conv && conv.mode === "human" ? "Online: you're talking with an agent" : "Online";
      else if (connState === "connecting") text = "Connecting…";
      else if (connState === "waiting") {
        var s = Math.max(0, Math.ceil((waitUntil - Date.now()) / 1000));
        text = navigator.onLine === false ? "You're offline. Waiting for the network…" : s ? "Connection lost. Reconnecting in " + s + " s…" : "Reconnecting…";
      } else text = conv ? "Offline" : "We usually answer right away";
      if (statusLine.textContent !== text) statusLine.textContent = text;
      statusLine.dataset.state = connState;
    }

    var stopAsked = null; // the answer a stop was sent for
    function stopButton() {
      stopbar.hidden = !(streaming && conv && conv.mode !== "human");
      stopBtn.disabled = stopAsked !== null && stopAsked === streaming;
    }

    function showBanner(text, transient) {
      clearTimeout(bannerTimer);
      banner.textContent = text || "";
      banner.hidden = !text;
      if (text && transient) bannerTimer = setTimeout(function () { showBanner(null); }, 6000);
    }

    function typing(f) {
      if (f.role !== "agent") return;
      clearTimeout(typingTimer);
      typingLine.textContent = f.state ? "An agent is typing…" : "";
      if (f.state) typingTimer = setTimeout(function () { typingLine.textContent = ""; }, TYPING_EXPIRES_MS);
    }

    function setUnread(n) {
      badge.textContent = n > 9 ? "9+" : String(n);
      badge.hidden = n === 0;
      launcher.setAttribute("aria-label", "Open chat: " + cfg.title + (n ? " (" + n + " new)" : ""));
    }

    function open(focus) {
      isOpen = true;
      unread = 0;
      setUnread(0);
      panel.hidden = false;
      launcher.classList.add("open");
      launcher.setAttribute("aria-expanded", "true");
      launcher.setAttribute("aria-label", "Close chat: " + cfg.title);
      log.scrollTop = log.scrollHeight;
      if (focus !== false) input.focus();
      scheduleSave();
      if (!conv) start(false).catch(function () {});
    }

    function close() {
      isOpen = false;
      panel.hidden = true;
      launcher.classList.remove("open");
      launcher.setAttribute("aria-expanded", "false");
      setUnread(unread);
      launcher.focus();
      scheduleSave();
    }

    function sendTyping(state) {
      if (!link.isLive()) return;
      link.frame({ type: "typing", state: state });
    }

    launcher.addEventListener("click", function () { if (isOpen) close(); else open(); });
    closeBtn.addEventListener("click", close);
    panel.addEventListener("keydown", function (e) { if (e.key === "Escape") close(); });
    newBtn.addEventListener("click", function () {
      newBtn.disabled = true;
      connection("connecting");
      start(true).then(
        function () { newBtn.disabled = false; input.focus(); },
        function () { newBtn.disabled = false; }
      );
    });
    stopBtn.addEventListener("click", function () {
      link.frame({ type: "stop" });
      stopAsked = streaming;
      stopBtn.disabled = true;
    });
    form.addEventListener("submit", function (e) {
      e.preventDefault();
      if (submit(input.value)) {
        input.value = "";
        autosize();
        clearTimeout(typingIdle);
        if (typingSent) { typingSent = 0; sendTyping(false); }
      }
    });
    input.addEventListener("keydown", function (e) {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        form.requestSubmit ? form.requestSubmit() : form.dispatchEvent(new Event("submit", { cancelable: true }));
      }
    });
    input.addEventListener("input", function () {
      autosize();
      // Typing is renewed every 4 s while it goes on and ends after 5 s without a keystroke.
      var now = Date.now();
      if (now - typingSent > 4000) { typingSent = now; sendTyping(true); }
      clearTimeout(typingIdle);
      typingIdle = setTimeout(function () { typingSent = 0; sendTyping(false); }, 5000);
    });
    function autosize() {
      input.style.height = "auto";
      input.style.height = Math.min(input.scrollHeight + 2, 120) + "px";
    }

    function mount() {
      (document.body || document.documentElement).appendChild(host);
    }

    return {
      mount: mount, place: place, update: update, clear: clear, renderAll: renderAll,
      addPending: addPending, updatePending: updatePending, removePending: removePending, pendingAll: pendingAll,
      connection: connection, status: status, stopButton: stopButton, banner: showBanner, typing: typing,
      unread: setUnread, open: open, close: close,
    };
  })();

  // -- start --------------------------------------------------------------------------------------------

  function boot() {
    view.mount();
    var saved = loadSaved();
    if (saved) {
      restore(saved);
      view.renderAll();
    }
    view.status();
    // A conversation kept from an earlier visit reconnects at once (new answers raise the badge);
    // otherwise one is created when the visitor opens the chat.
    if (conv) start(false).catch(function () {});
    if (cfg.open || isOpen) view.open(false);
    window.addEventListener("pagehide", saveNow);
    document.addEventListener("visibilitychange", function () { if (document.hidden) saveNow(); });
    window.addEventListener("online", function () { link.now(); });
    window.addEventListener("offline", function () { link.offline(); });
    window.chatgw = { open: function () { view.open(); }, close: function () { view.close(); } };
  }

  if (document.body) boot();
  else document.addEventListener("DOMContentLoaded", boot);
})();
