/**
 * The dashboard's entry point: hash routing, the token prompt, the header's
 * daemon status, and which admin views the caller may see.
 *
 * Routes: #/sessions, #/sessions/<id>, #/board, #/board/<projectId>,
 * #/registry, #/audit, #/tokens. Each view module exports `mount(root,
 * params, ctx)` returning a cleanup function, which is called when the route
 * changes (it closes streams, subscriptions and timers).
 * @module app
 */

import { ApiError, authEvents, clearToken, get, getToken, setToken } from "./api.js";
import { errorBox, h, replace, throttle } from "./dom.js";
import { live } from "./ws.js";
import * as sessions from "./sessions.js";
import * as board from "./board.js";
import * as registry from "./registry.js";
import * as admin from "./admin.js";

const ROUTES = [
  { pattern: /^\/sessions\/([^/]+)$/, name: "sessions", title: "Session", mount: sessions.mountDetail, keys: ["id"] },
  { pattern: /^\/sessions\/?$/, name: "sessions", title: "Sessions", mount: sessions.mountList, keys: [] },
  { pattern: /^\/board\/([^/]+)$/, name: "board", title: "Board", mount: board.mount, keys: ["projectId"] },
  { pattern: /^\/board\/?$/, name: "board", title: "Board", mount: board.mount, keys: [] },
  { pattern: /^\/registry\/?$/, name: "registry", title: "Registry", mount: registry.mount, keys: [] },
  { pattern: /^\/audit\/?$/, name: "audit", title: "Audit log", mount: admin.mountAudit, keys: [] },
  { pattern: /^\/tokens\/?$/, name: "tokens", title: "API tokens", mount: admin.mountTokens, keys: [] },
];

/** Shared state handed to every view. */
const ctx = {
  /** The last `/api/status` answer (null when unknown or not allowed). */
  status: null,
  /** Whether the caller may read the audit log / manage tokens (null: unknown). */
  scopes: { audit: null, tokens: null },
  /** Go to a hash route, e.g. ctx.navigate("/sessions/abc"). */
  navigate(path) {
    location.hash = `#${path}`;
  },
};

const main = document.getElementById("main");
let cleanup = null;
let booted = false;
let firstRoute = true;
let statusTimer = null;

// -- routing ---------------------------------------------------------------------

function currentPath() {
  const hash = location.hash.replace(/^#/, "");
  return hash.startsWith("/") ? hash : "/sessions";
}

function route() {
  const path = currentPath().split("?")[0];
  const found = ROUTES.find((r) => r.pattern.test(path));
  if (!found) {
    ctx.navigate("/sessions");
    return;
  }
  const match = path.match(found.pattern);
  const params = {};
  found.keys.forEach((key, i) => {
    params[key] = decodeURIComponent(match[i + 1]);
  });
  if (cleanup) {
    try {
      cleanup();
    } catch (err) {
      console.error("view cleanup failed", err);
    }
  }
  cleanup = null;
  for (const link of document.querySelectorAll(".nav a")) {
    if (link.dataset.route === found.name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = `${found.title} · lokid`;
  replace(main);
  main.dataset.view = found.name;
  try {
    cleanup = found.mount(main, params, ctx) || null;
  } catch (err) {
    console.error(err);
    replace(main, errorBox(err, "This view failed"));
  }
  if (!firstRoute) main.focus({ preventScroll: true });
  firstRoute = false;
}

// -- the header's status -----------------------------------------------------------

const daemonStatus = document.getElementById("daemon-status");
const liveStatus = document.getElementById("live-status");
const signOut = document.getElementById("sign-out");

/** Read /api/status and show it in the header. Returns the answer or throws. */
async function refreshStatus() {
  try {
    const status = await get("/api/status");
    ctx.status = status;
    const agents = status.agents ? `${status.agents.active}/${status.agents.total} agents` : "";
    daemonStatus.textContent = `Daemon ${status.status} · ${agents} · v${status.version}`;
    daemonStatus.dataset.state = status.status;
    return status;
  } catch (err) {
    if (err instanceof ApiError && err.status === 403) {
      daemonStatus.textContent = "Signed in (this token cannot read the status)";
      daemonStatus.dataset.state = "idle";
      return null;
    }
    daemonStatus.textContent = err instanceof ApiError && err.status === 401 ? "Sign-in needed" : "Daemon unreachable";
    daemonStatus.dataset.state = "down";
    throw err;
  }
}
const refreshStatusSoon = throttle(() => refreshStatus().catch(() => {}), 1500);

live.onStatus((state, detail) => {
  const words = { open: "live", connecting: "connecting", reconnecting: "reconnecting…", closed: "off", refused: "off" };
  const refused = detail && detail.reason ? ` (refused: ${detail.reason})` : "";
  liveStatus.textContent = `Live updates: ${words[state] || state}${refused}`;
  liveStatus.dataset.state = state;
});
live.subscribe(["session.*"], refreshStatusSoon);

// -- which admin views are allowed -------------------------------------------------

/** Try the audit and token routes; a 403 hides the link (the view explains if visited). */
async function probeScopes() {
  const probe = async (path) => {
    try {
      await get(path, { limit: 1 });
      return true;
    } catch (err) {
      if (err instanceof ApiError && (err.status === 403 || err.status === 401)) return false;
      return true; // another failure: show the view, which will say what is wrong
    }
  };
  const [audit, tokens] = await Promise.all([probe("/api/enterprise/audit"), probe("/api/enterprise/tokens")]);
  ctx.scopes = { audit, tokens };
  document.querySelector('[data-route="audit"]').hidden = !audit;
  document.querySelector('[data-route="tokens"]').hidden = !tokens;
}

// -- the token prompt ----------------------------------------------------------------

const dialog = document.getElementById("token-dialog");
const tokenForm = document.getElementById("token-form");
const tokenInput = document.getElementById("token-input");
const tokenError = document.getElementById("token-error");

function askForToken(message) {
  if (cleanup) {
    cleanup();
    cleanup = null;
  }
  live.close();
  replace(main, h("p", { class: "loading", text: "Waiting for an API token…" }));
  // Several calls may fail at once: keep the first reason rather than blank it.
  if (message || !dialog.open) {
    tokenError.hidden = !message;
    tokenError.textContent = message || "";
  }
  if (!dialog.open) dialog.showModal();
  tokenInput.focus();
}

dialog.addEventListener("cancel", (event) => event.preventDefault()); // nothing works without a token

tokenForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const token = tokenInput.value.trim();
  if (!token) {
    tokenError.textContent = "Enter a token.";
    tokenError.hidden = false;
    return;
  }
  setToken(token);
  try {
    await refreshStatus();
  } catch (err) {
    clearToken();
    tokenError.textContent = err.message;
    tokenError.hidden = false;
    tokenInput.select();
    return;
  }
  tokenInput.value = "";
  tokenError.hidden = true;
  dialog.close();
  await start();
});

authEvents.addEventListener("auth-required", (event) => {
  const message = getToken() ? (event.detail && event.detail.message) || "The token was refused." : "";
  if (getToken()) clearToken();
  askForToken(message);
});

signOut.addEventListener("click", () => {
  clearToken();
  signOut.hidden = true;
  askForToken("");
});

// -- start -------------------------------------------------------------------------

/** Everything after a successful status read (first load, or after signing in). */
async function start() {
  signOut.hidden = !getToken();
  await probeScopes();
  live.reconnect();
  clearInterval(statusTimer);
  statusTimer = setInterval(() => refreshStatus().catch(() => {}), 10000);
  if (!booted) {
    booted = true;
    window.addEventListener("hashchange", route);
  }
  route();
}

async function boot() {
  try {
    await refreshStatus();
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) return; // the prompt is open
    replace(main, errorBox(err, "The dashboard cannot reach the daemon"));
    // Keep trying: the daemon may be starting.
    setTimeout(boot, 3000);
    return;
  }
  await start();
}

boot();
