/**
 * One WebSocket to `WS /ws` for the whole page (docs/websocket.md): board,
 * project, registry and session messages. Views subscribe to message types
 * (exact, `family.*`, or `*`) and to the connection state; the socket
 * reconnects with bounded, jittered backoff, and a view refetches what it
 * shows when the socket comes back (it may have missed messages meanwhile).
 * Browsers cannot set headers on a WebSocket, so the token goes in `?token=`.
 *
 * The daemon accepts a handshake it refuses and closes it at once with 1008
 * and its reason, so a socket that opens has not proven anything yet: the
 * state becomes "open" (and the backoff starts again from 1 s) only once the
 * daemon sent a message, the `pong` to the `ping` sent on open. A refusal
 * that retrying cannot change ends the retries with state "refused": 1008
 * `FORBIDDEN: …` (the token lacks `read`, or a foreign origin), and 1008
 * `UNAUTHORIZED: …` (the token was revoked, expired or is unknown), which also
 * fires "auth-required" so that the page asks for a new token at once.
 * @module ws
 */

import { ApiError, authEvents, getToken } from "./api.js";
import { backoffDelay } from "./sse.js";

export class LiveSocket {
  constructor() {
    /** @type {WebSocket|null} */
    this.socket = null;
    this.handlers = new Set();
    this.statusHandlers = new Set();
    this.state = "closed";
    this.attempt = 0;
    this.timer = null;
    this.wanted = false;
    /** Whether the current socket has delivered a message (see the module's doc). */
    this.proven = false;
  }

  /** ws(s)://<this origin>/ws[?token=…] */
  url() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const token = getToken();
    const query = token ? `?token=${encodeURIComponent(token)}` : "";
    return `${scheme}://${location.host}/ws${query}`;
  }

  connect() {
    this.wanted = true;
    if (this.socket) return;
    clearTimeout(this.timer);
    this.setState(this.attempt ? "reconnecting" : "connecting");
    let socket;
    try {
      socket = new WebSocket(this.url());
    } catch {
      this.scheduleRetry();
      return;
    }
    this.socket = socket;
    this.proven = false;
    // A refused handshake opens too (then closes with 1008): ask for a pong to
    // tell a real connection from one.
    socket.addEventListener("open", () => this.send({ type: "ping" }));
    socket.addEventListener("message", (event) => {
      if (this.socket !== socket) return;
      if (!this.proven) {
        this.proven = true;
        this.attempt = 0;
        this.setState("open");
      }
      this.dispatch(event.data);
    });
    socket.addEventListener("close", (event) => {
      if (this.socket !== socket) return;
      this.socket = null;
      const reason = event.code === 1008 ? event.reason : "";
      if (isFinalRefusal(event.code, reason)) {
        this.refuse(event.code, reason);
        if (isUnauthorized(event.code, reason)) {
          // As a 401 of an HTTP call: the page asks for a token (its message is the
          // daemon's, without the code: "Token revoked").
          const message = reason.slice("UNAUTHORIZED:".length).trim() || "The token was refused.";
          const error = new ApiError(401, "UNAUTHORIZED", message);
          authEvents.dispatchEvent(new CustomEvent("auth-required", { detail: error }));
        }
        return;
      }
      // Any other 1008 ("RATE_LIMITED: …") or break: retry with growing delays.
      this.scheduleRetry(event.code, reason);
    });
  }

  /** Stop retrying: the daemon refused this token for good (until reconnect()). */
  refuse(code, reason) {
    this.wanted = false;
    clearTimeout(this.timer);
    this.setState("refused", { code, reason });
  }

  /** Close for good (until connect() is called again). */
  close() {
    this.wanted = false;
    clearTimeout(this.timer);
    const socket = this.socket;
    this.socket = null;
    if (socket) socket.close(1000, "bye");
    this.setState("closed");
  }

  /** Reconnect now, e.g. with a new token. */
  reconnect() {
    this.close();
    this.attempt = 0;
    this.connect();
  }

  /** Retry after a delay (close codes: 1013 too slow, 1001 daemon stopping, 1008
   * refused, 1006 lost); `reason` is the daemon's words for a refusal. */
  scheduleRetry(code, reason = "") {
    if (!this.wanted) return;
    const delay = backoffDelay(this.attempt);
    this.attempt += 1;
    this.setState("reconnecting", { delay, code, reason });
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.connect(), delay);
  }

  setState(state, detail) {
    this.state = state;
    for (const handler of this.statusHandlers) handler(state, detail);
  }

  dispatch(raw) {
    let message;
    try {
      message = JSON.parse(raw);
    } catch {
      return;
    }
    if (!message || typeof message.type !== "string") return;
    if (message.type === "ping") {
      this.send({ type: "pong" });
      return;
    }
    for (const { patterns, handler } of this.handlers) {
      if (patterns.some((p) => matches(p, message.type))) {
        try {
          handler(message);
        } catch (err) {
          console.error("live update handler failed", err);
        }
      }
    }
  }

  send(message) {
    if (this.socket && this.socket.readyState === WebSocket.OPEN) this.socket.send(JSON.stringify(message));
  }

  /**
   * Call `handler({type, data})` for messages matching any pattern.
   * @returns {() => void} unsubscribe
   */
  subscribe(patterns, handler) {
    const entry = { patterns, handler };
    this.handlers.add(entry);
    return () => this.handlers.delete(entry);
  }

  /**
   * Call `handler(state, detail)` on every state change (and once now).
   * @returns {() => void} unsubscribe
   */
  onStatus(handler) {
    this.statusHandlers.add(handler);
    handler(this.state);
    return () => this.statusHandlers.delete(handler);
  }
}

/**
 * A close that another try with the same token cannot change: 1008 with
 * `FORBIDDEN: …` (the token lacks `read`, or the page's origin is foreign) or
 * `UNAUTHORIZED: …` (the token was revoked or expired while the page was open,
 * or is unknown). Retrying it would be refused (and audited) every time.
 */
export function isFinalRefusal(code, reason) {
  return code === 1008 && typeof reason === "string" && (reason.startsWith("FORBIDDEN") || isUnauthorized(code, reason));
}

/** 1008 `UNAUTHORIZED: …`: the token stopped working; a new one is needed. */
export function isUnauthorized(code, reason) {
  return code === 1008 && typeof reason === "string" && reason.startsWith("UNAUTHORIZED");
}

/** `task.*` matches `task.moved`; `*` matches everything. */
export function matches(pattern, type) {
  if (pattern === "*") return true;
  if (pattern.endsWith(".*")) return type.startsWith(pattern.slice(0, -1));
  return pattern === type;
}

/** The page's one socket. */
export const live = new LiveSocket();
