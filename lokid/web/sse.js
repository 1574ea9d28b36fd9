/**
 * Server-Sent Events read with fetch() and a ReadableStream, not EventSource:
 * EventSource cannot send the Authorization header that lokid needs when auth
 * is on. The stream reconnects by itself with bounded, jittered backoff and
 * sends `Last-Event-ID`, so the daemon replays exactly what was missed
 * (docs/events.md: no gap, no duplicate).
 * @module sse
 */

import { authEvents, authHeaders, errorFrom, withQuery } from "./api.js";

/** Backoff: 1 s, 2 s, 4 s … at most 30 s, each with ±25 % jitter. */
export function backoffDelay(attempt, base = 1000, cap = 30000) {
  const delay = Math.min(cap, base * 2 ** Math.min(attempt, 10));
  return Math.round(delay * (0.75 + Math.random() * 0.5));
}

/**
 * Incremental parser of the text/event-stream format (WHATWG HTML §9.2.6):
 * feed it chunks of text, it calls `onMessage({id, event, data})` per event
 * and `onComment(text)` per comment line.
 */
export class SseParser {
  constructor(onMessage, onComment = () => {}) {
    this.onMessage = onMessage;
    this.onComment = onComment;
    this.buffer = "";
    this.data = [];
    this.event = "";
    this.lastId = null;
  }

  /** @param {string} text */
  feed(text) {
    this.buffer += text;
    let start = 0;
    for (;;) {
      const match = /\r\n|\n|\r/g;
      match.lastIndex = start;
      const found = match.exec(this.buffer);
      if (!found) break;
      // A lone \r at the very end might be the first half of \r\n: wait for more.
      if (found[0] === "\r" && found.index === this.buffer.length - 1) break;
      this.line(this.buffer.slice(start, found.index));
      start = found.index + found[0].length;
    }
    this.buffer = this.buffer.slice(start);
  }

  line(line) {
    if (line === "") {
      if (this.data.length) this.onMessage({ id: this.lastId, event: this.event || "message", data: this.data.join("\n") });
      this.data = [];
      this.event = "";
      return;
    }
    if (line.startsWith(":")) {
      this.onComment(line.slice(1).trim());
      return;
    }
    const colon = line.indexOf(":");
    const name = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (name === "data") this.data.push(value);
    else if (name === "event") this.event = value;
    else if (name === "id" && !value.includes("\0")) this.lastId = value;
    // `retry:` is ignored: the client's own bounded backoff decides.
  }
}

/**
 * A live event stream of `GET /api/events`.
 *
 * Callbacks: `onEvents(envelopes[])` once per received chunk (a batch, so a
 * flood of agent output costs one render per chunk, not per line);
 * `onStatus(state, detail)` with state `connecting | open | reconnecting |
 * failed | closed`.
 */
export class EventStream {
  /**
   * @param {{query?: Record<string, any>, onEvents: (events: any[]) => void,
   *          onStatus?: (state: string, detail?: any) => void, path?: string}} options
   */
  constructor({ query = {}, onEvents, onStatus = () => {}, path = "/api/events" }) {
    this.path = path;
    this.query = query;
    this.onEvents = onEvents;
    this.onStatus = onStatus;
    this.lastEventId = null;
    this.controller = null;
    this.stopped = true;
    this.attempt = 0;
    this.timer = null;
  }

  start() {
    if (!this.stopped) return;
    this.stopped = false;
    this.connect();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    this.timer = null;
    if (this.controller) this.controller.abort();
    this.controller = null;
    this.onStatus("closed");
  }

  /** Reconnect now (e.g. after a new token was entered). */
  restart() {
    this.stop();
    this.attempt = 0;
    this.start();
  }

  async connect() {
    if (this.stopped) return;
    this.onStatus(this.lastEventId === null ? "connecting" : "reconnecting");
    const controller = new AbortController();
    this.controller = controller;
    const headers = { Accept: "text/event-stream", ...authHeaders() };
    // A reconnect replays from the last id seen; `history` only matters the first time.
    const query = { ...this.query };
    if (this.lastEventId !== null) {
      headers["Last-Event-ID"] = this.lastEventId;
      delete query.history;
    }
    let response;
    try {
      response = await fetch(withQuery(this.path, query), { headers, signal: controller.signal, cache: "no-store" });
    } catch {
      return this.retry("Cannot reach the daemon");
    }
    if (!response.ok) {
      const error = await errorFrom(response);
      if (response.status === 401) {
        authEvents.dispatchEvent(new CustomEvent("auth-required", { detail: error }));
        this.onStatus("failed", error);
        this.stopped = true;
        return;
      }
      if (response.status >= 400 && response.status < 500 && response.status !== 429) {
        this.onStatus("failed", error); // a bad query will not get better by retrying
        this.stopped = true;
        return;
      }
      return this.retry(error.message);
    }
    this.onStatus("open");
    const parser = new SseParser(
      (message) => batch.push(message),
      (comment) => {
        if (comment.startsWith("closed")) this.onStatus("reconnecting", comment);
      },
    );
    let batch = [];
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        parser.feed(value);
        this.attempt = 0; // the stream delivers: the next break starts from a short delay
        if (batch.length) {
          const envelopes = [];
          for (const message of batch) {
            if (message.id !== null) this.lastEventId = message.id;
            try {
              envelopes.push(JSON.parse(message.data));
            } catch {
              // not JSON: not one of lokid's events; ignore it
            }
          }
          batch = [];
          if (envelopes.length) this.onEvents(envelopes);
        }
      }
    } catch {
      // aborted by stop(), or the connection broke
    }
    if (this.controller === controller) this.controller = null;
    return this.retry("The event stream ended");
  }

  retry(reason) {
    if (this.stopped) return;
    const delay = backoffDelay(this.attempt);
    this.attempt += 1;
    this.onStatus("reconnecting", { reason, delay });
    this.timer = setTimeout(() => this.connect(), delay);
  }
}
