// The agent's socket (docs/protocol.md, "The agent side"): hello with the agent token, then welcome,
// snapshot and the live feed. It reconnects with backoff and jitter after any close but a refusal
// (4400-4499: the token is bad, expired or the agent disabled), and after `reconnect` (a draining
// instance) when the gateway says.

export class Link {
  /**
   * @param {string} url  the gateway's WebSocket endpoint
   * @param {{frame: (f: object) => void, state: (s: string, detail?: object) => void}} on
   *   frame: every frame after hello (welcome included); state: "connecting", "live",
   *   "waiting" ({delay}), "refused" ({message}).
   */
  constructor(url, on) {
    this.url = url;
    this.on = on;
    this.ws = null;
    this.token = null;
    this.live = false;
    this.attempt = 0;
    this.timer = 0;
    this.stopped = true;
    this.nextDelay = null;
    this.lastError = null;
  }

  start(token) {
    this.token = token;
    this.stopped = false;
    this.attempt = 0;
    this.connect();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    this.timer = 0;
    const ws = this.ws;
    this.ws = null;
    this.live = false;
    if (ws) ws.close(1000, "signed out");
  }

  /** Send a frame if the socket is live; false when it is not (the caller says so). */
  send(frame) {
    if (!this.live) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  /** Reconnect at once (the browser came back online). */
  now() {
    if (this.timer) {
      this.attempt = 0;
      this.connect();
    }
  }

  connect() {
    clearTimeout(this.timer);
    this.timer = 0;
    if (this.ws || this.stopped) return;
    this.on.state("connecting");
    const ws = new WebSocket(this.url);
    this.ws = ws;
    this.lastError = null;
    ws.onopen = () => ws === this.ws && ws.send(JSON.stringify({ type: "hello", token: this.token }));
    ws.onmessage = (msg) => {
      if (ws !== this.ws) return;
      let f;
      try {
        f = JSON.parse(msg.data);
      } catch {
        return;
      }
      if (!f || typeof f.type !== "string") return;
      if (f.type === "welcome") {
        this.live = true;
        this.attempt = 0;
        this.on.state("live");
      } else if (f.type === "reconnect") {
        this.nextDelay = f.after_ms;
      } else if (f.type === "error" && !f.conversation_id) {
        this.lastError = f;
      }
      this.on.frame(f);
    };
    ws.onclose = (ev) => {
      if (ws !== this.ws) return;
      this.ws = null;
      this.live = false;
      this.closed(ev.code);
    };
  }

  closed(code) {
    if (this.stopped) return;
    if (code >= 4400 && code <= 4499) {
      this.stopped = true;
      const why = this.lastError ? this.lastError.message : "the gateway refused this token";
      this.on.state("refused", { code, message: why });
      return;
    }
    let delay = this.nextDelay;
    this.nextDelay = null;
    if (this.lastError && this.lastError.retry_after_ms) delay = this.lastError.retry_after_ms;
    if (delay == null) {
      // Exponential backoff with jitter: 0.5-1 s, 1-2 s, 2-4 s, ... up to 7.5-15 s.
      const cap = Math.min(15000, 1000 * 2 ** this.attempt);
      delay = cap / 2 + (Math.random() * cap) / 2;
    }
    this.attempt++;
    this.on.state("waiting", { delay });
    this.timer = setTimeout(() => this.connect(), delay);
  }
}
