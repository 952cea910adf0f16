// The demo chat widget: a small client of protocol v1 (see docs/protocol.md).
// It keeps its token, conversation, epoch and last seq in localStorage so that a reload resumes.
(() => {
  "use strict";
  const KEY = "chatgw.demo";
  const $ = (id) => document.getElementById(id);
  const log = $("log"), statusEl = $("status"), input = $("text"), stopBtn = $("stop");
  let state = JSON.parse(localStorage.getItem(KEY) || "null");
  let ws = null, retry = 0;
  const bubbles = new Map();   // message_id or response_id -> <li>
  const pending = new Map();   // client_msg_id -> text, resent after a reconnect until acked

  const save = () => localStorage.setItem(KEY, JSON.stringify(state));
  const setStatus = (text) => { statusEl.textContent = text; };

  function bubble(id, role, text) {
    let li = id && bubbles.get(id);
    if (!li) {
      li = document.createElement("li");
      li.className = role;
      li.append(document.createTextNode(""));
      log.append(li);
      if (id) bubbles.set(id, li);
    }
    li.firstChild.textContent = text;
    log.scrollTop = log.scrollHeight;
    return li;
  }

  function markStatus(li, status) {
    if (status === "complete") return;
    const s = li.querySelector(".status") || li.appendChild(document.createElement("span"));
    s.className = "status";
    s.textContent = status;
  }

  async function newSession(body, token) {
    const headers = { "Content-Type": "application/json" };
    if (token) headers.Authorization = "Bearer " + token;
    const r = await fetch("/v1/widget/sessions", { method: "POST", headers, body: JSON.stringify(body) });
    if (!r.ok) throw new Error((await r.json()).error.message);
    const s = await r.json();
    return { token: s.token, conversation_id: s.conversation_id, epoch: null, seq: 0 };
  }

  async function loadHistory() {
    const r = await fetch(`/v1/conversations/${state.conversation_id}/messages?limit=500`,
      { headers: { Authorization: "Bearer " + state.token } });
    if (!r.ok) return false;
    const h = await r.json();
    log.replaceChildren(); bubbles.clear();
    for (const m of h.messages) {
      const li = bubble(m.response_id || m.message_id, m.role, m.text);
      if (m.status) markStatus(li, m.status);
    }
    // Resume from the last stored message: an answer still streaming is replayed from its start.
    const last = h.messages[h.messages.length - 1];
    state.epoch = h.epoch; state.seq = last ? last.seq : 0; save();
    return true;
  }

  function onEvent(f) {
    if (f.seq !== undefined) { state.seq = f.seq; save(); }
    switch (f.type) {
      case "message": bubble(f.message_id, f.role, f.text); pending.delete(f.client_msg_id); break;
      case "ai_start": bubble(f.response_id, "assistant", ""); stopBtn.disabled = false; break;
      case "delta": { const li = bubble(f.response_id, "assistant", ""); li.firstChild.textContent += f.text; break; }
      case "ai_end": markStatus(bubble(f.response_id, "assistant", f.text), f.status); stopBtn.disabled = true; break;
      case "mode": bubble(null, "system", f.mode === "human" ? "An agent joined the conversation." : "The assistant is back."); break;
    }
  }

  function connect() {
    ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
    ws.onopen = () => {
      const hello = { type: "hello", token: state.token };
      if (state.epoch) hello.resume = { epoch: state.epoch, last_seq: state.seq };
      ws.send(JSON.stringify(hello));
    };
    ws.onmessage = async (msg) => {
      const f = JSON.parse(msg.data);
      if (f.type === "welcome") {
        retry = 0; setStatus("connected");
        if (!f.resumed && state.epoch === null) { state.epoch = f.epoch; state.seq = f.seq; save(); }
        for (const [id, text] of pending) ws.send(JSON.stringify({ type: "message", client_msg_id: id, text }));
      } else if (f.type === "reset") {
        await loadHistory();
        state.epoch = f.epoch; state.seq = Math.max(state.seq, f.seq); save();
      } else if (f.type === "ack") {
        pending.delete(f.client_msg_id);
      } else if (f.type === "error") {
        bubble(null, "system", `${f.code}: ${f.message}`);
      } else {
        onEvent(f);
      }
    };
    ws.onclose = async (ev) => {
      stopBtn.disabled = true;
      if (ev.code === 4401 || ev.code === 4403) {
        // The token expired or the conversation is gone: continue it with a fresh token, or start anew.
        setStatus("renewing session…");
        try { state = Object.assign(await newSession({ business: "demo", conversation_id: state.conversation_id }, state.token), { epoch: state.epoch, seq: state.seq }); }
        catch { state = await newSession({ business: "demo" }); log.replaceChildren(); bubbles.clear(); }
        save();
      }
      const delay = Math.min(10000, 250 * 2 ** retry++) * (0.5 + Math.random() / 2);
      setStatus(`reconnecting in ${(delay / 1000).toFixed(1)} s…`);
      setTimeout(connect, delay);
    };
  }

  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = input.value.trim();
    if (!text) return;
    const id = crypto.randomUUID();
    pending.set(id, text);
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "message", client_msg_id: id, text }));
    input.value = "";
  });
  stopBtn.addEventListener("click", () => ws && ws.send(JSON.stringify({ type: "stop" })));
  $("new").addEventListener("click", async () => {
    state = await newSession({ business: "demo" }); save();
    log.replaceChildren(); bubbles.clear();
    if (ws) ws.close();
  });

  (async () => {
    try {
      if (!state) { state = await newSession({ business: "demo" }); save(); }
      else if (!(await loadHistory())) { state = await newSession({ business: "demo" }); save(); }
    } catch (err) { setStatus("cannot start: " + err.message); return; }
    connect();
  })();
})();
