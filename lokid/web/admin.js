/**
 * Enterprise views: the audit log (#/audit, needs the `audit` scope) and API
 * tokens (#/tokens, needs `admin`). Both try the API and, on a 403, explain
 * which scope is missing instead of showing an empty page.
 * @module admin
 */

import { del, get, isForbidden, post } from "./api.js";
import { badge, checkbox, clearInvalid, dataTable, emptyState, errorBox, field, formatTime, h, markInvalid, numberValue, replace, showFormError, toast } from "./dom.js";

const PAGE = 50;

/** The explanation shown instead of a view the token may not see. */
function forbidden(err, scope, what) {
  return h(
    "div",
    { class: "panel" },
    emptyState(
      `You cannot see ${what}`,
      `${err.message}. Sign in with a token that has the “${scope}” scope (an admin token has every scope).`,
    ),
  );
}

function statusTone(status) {
  if (status === null || status === undefined) return badge("pending", { label: "—" });
  const s = Number(status);
  const kind = s < 300 ? "completed" : s < 500 ? "paused" : "failed";
  return badge(kind, { label: String(status) });
}

// -- audit --------------------------------------------------------------------------

/**
 * The instant a local day starts, `days` after the date `YYYY-MM-DD` (a date
 * input's value), as an ISO time in UTC; null past the API's years (0001 to
 * 9999), where the bound is better left out. The table shows local times, so
 * the filter's days must be local days too: the API reads a bare date as a
 * UTC day.
 */
export function localDayStart(value, days = 0) {
  const [year, month, day] = value.split("-").map(Number);
  const date = new Date(2000, 0, 1); // local midnight; setFullYear keeps years < 100 as they are
  date.setFullYear(year, month - 1, day + days);
  if (Number.isNaN(date.getTime())) return null;
  const utcYear = date.getUTCFullYear();
  return utcYear < 1 || utcYear > 9999 ? null : date.toISOString();
}

/** `start`/`end` for the audit query: From's local midnight to the midnight after To. */
function dayBounds(from, to) {
  return {
    start: from ? localDayStart(from) : null,
    end: to ? localDayStart(to, 1) : null,
  };
}

/** #/audit: summary, filters, and a page of entries, newest first. */
export function mountAudit(root) {
  let stopped = false;
  let offset = 0;
  let filters = {};

  const subtitle = h("p", { class: "subtitle", dataset: { testid: "audit-subtitle" } });
  const cards = h("dl", { class: "stat-cards", dataset: { testid: "audit-summary" } });
  const action = h("input", { type: "text", placeholder: "session.* or token.create", spellcheck: "false", dataset: { testid: "audit-action" } });
  const start = h("input", { type: "date", dataset: { testid: "audit-start" } });
  const end = h("input", { type: "date", dataset: { testid: "audit-end" } });
  const error = h("p", { class: "form-error", role: "alert", hidden: true, dataset: { testid: "audit-error" } });
  const filterForm = h(
    "form",
    { class: "row-end", novalidate: true, "aria-label": "Filter the audit log" },
    field("Action", action),
    field("From", start),
    field("To", end),
    h("button", { type: "submit", class: "button button-primary", text: "Apply" }),
    h(
      "button",
      {
        type: "button",
        class: "button",
        text: "Reset",
        onclick: () => {
          action.value = "";
          start.value = "";
          end.value = "";
          filters = {};
          offset = 0;
          loadEntries();
        },
      },
    ),
  );
  const table = h("div", { dataset: { testid: "audit-entries" } }, h("p", { class: "loading panel-body", text: "Loading entries…" }));
  const pager = h("div", { class: "pager", hidden: true });
  const byAction = h("ul", { class: "breakdown", dataset: { testid: "audit-by-action" } });
  const byActor = h("ul", { class: "breakdown" });

  const page = h(
    "div",
    {},
    h("div", { class: "page-head" }, h("div", {}, h("h1", { text: "Audit log" }), subtitle)),
    cards,
    h(
      "section",
      { class: "panel", "aria-labelledby": "audit-heading" },
      h("div", { class: "panel-head" }, h("h2", { id: "audit-heading", text: "Entries" }), filterForm),
      h("div", { class: "panel-body", hidden: true }, error),
      table,
      pager,
    ),
    h(
      "div",
      { class: "split-even panel-gap" },
      h("section", { class: "panel", "aria-labelledby": "by-action" }, h("div", { class: "panel-head" }, h("h2", { id: "by-action", text: "By action" })), h("div", { class: "panel-body" }, byAction)),
      h("section", { class: "panel", "aria-labelledby": "by-actor" }, h("div", { class: "panel-head" }, h("h2", { id: "by-actor", text: "By actor" })), h("div", { class: "panel-body" }, byActor)),
    ),
  );
  replace(root, h("p", { class: "loading", text: "Loading the audit log…" }));

  filterForm.addEventListener("submit", (event) => {
    event.preventDefault();
    filters = { action: action.value.trim(), ...dayBounds(start.value, end.value) };
    offset = 0;
    loadEntries();
  });

  async function loadEntries() {
    showFormError(error, null);
    error.parentElement.hidden = true;
    try {
      const answer = await get("/api/enterprise/audit", { ...filters, limit: PAGE, offset });
      if (stopped) return;
      if (!root.contains(page)) replace(root, page);
      renderEntries(answer);
      return true;
    } catch (err) {
      if (stopped) return;
      if (isForbidden(err)) {
        replace(root, h("div", { class: "page-head" }, h("h1", { text: "Audit log" })), forbidden(err, "audit", "the audit log"));
        return false;
      }
      if (!root.contains(page)) replace(root, page);
      showFormError(error, err);
      error.parentElement.hidden = false;
      replace(table);
      pager.hidden = true;
      return true;
    }
  }

  function renderEntries(answer) {
    if (!answer.entries.length) {
      replace(table, emptyState(filters.action || filters.start || filters.end ? "No entries match" : "The audit log is empty", "Every change and every refused request is recorded here."));
      pager.hidden = true;
      return;
    }
    replace(
      table,
      dataTable("Audit entries, newest first", ["#", "Time", "Actor", "Action", "Resource", "Request", "Status"], answer.entries.map((e) =>
        h(
          "tr",
          { dataset: { testid: "audit-row", action: e.action } },
          h("td", { class: "num", text: String(e.id) }),
          h("td", { class: "nowrap", text: formatTime(e.timestamp) }),
          h("td", { class: "mono small", text: e.actor }),
          h("td", { class: "mono small", text: e.action }),
          h("td", { class: "mono small wrap", text: e.resource || "—" }),
          h("td", { class: "mono small wrap" }, e.method ? `${e.method} ${e.path}` : "—"),
          h("td", {}, statusTone(e.status)),
        ),
      )),
    );
    pager.hidden = answer.total <= PAGE;
    replace(
      pager,
      h("span", { class: "muted small", text: `${offset + 1}–${offset + answer.entries.length} of ${answer.total}` }),
      h("button", { type: "button", class: "button button-small", text: "Newer", disabled: offset === 0, onclick: () => { offset = Math.max(0, offset - PAGE); loadEntries(); } }),
      h("button", { type: "button", class: "button button-small", text: "Older", disabled: offset + PAGE >= answer.total, onclick: () => { offset += PAGE; loadEntries(); } }),
    );
  }

  async function loadSummary() {
    try {
      const s = await get("/api/enterprise/audit/summary");
      if (stopped) return;
      const stat = (label, value, small) => h("div", { class: "stat" }, h("dt", { text: label }), h("dd", { class: small ? "small-value" : null }, value));
      replace(
        cards,
        stat("Entries", String(s.total)),
        stat("Hash chain", badge(s.chain_valid ? "valid" : "invalid", { testid: "audit-chain", label: s.chain_valid ? "valid" : "INVALID" })),
        stat("First entry", formatTime(s.first_timestamp), true),
        stat("Last entry", formatTime(s.last_timestamp), true),
      );
      subtitle.textContent = s.chain && s.chain.message ? s.chain.message : "";
      const breakdown = (el, counts) =>
        replace(el, Object.entries(counts || {}).slice(0, 12).map(([k, v]) => h("li", {}, h("span", { class: "mono small", text: k }), h("strong", { text: String(v) }))));
      breakdown(byAction, s.by_action);
      breakdown(byActor, s.by_actor);
      if (!Object.keys(s.by_action || {}).length) replace(byAction, h("li", { class: "muted", text: "No entries yet" }));
      if (!Object.keys(s.by_actor || {}).length) replace(byActor, h("li", { class: "muted", text: "No entries yet" }));
    } catch (err) {
      if (stopped || isForbidden(err)) return;
      replace(cards, errorBox(err, "Could not read the summary"));
    }
  }

  loadEntries().then((ok) => {
    if (ok) loadSummary();
  });
  return () => {
    stopped = true;
  };
}

// -- tokens -------------------------------------------------------------------------

const SCOPES = [
  ["read", "read — every GET but tokens and audit"],
  ["write", "write — session commands, board and registry changes"],
  ["audit", "audit — the audit log"],
  ["admin", "admin — everything, including tokens"],
];

function tokenState(t) {
  if (t.revoked) return badge("revoked", { testid: "token-state" });
  if (t.expired) return badge("expired", { testid: "token-state" });
  return badge("ok", { label: "active", testid: "token-state" });
}

/** #/tokens: list, create (the secret shown once), revoke. */
export function mountTokens(root) {
  let stopped = false;
  const subtitle = h("p", { class: "subtitle", dataset: { testid: "tokens-subtitle" } });
  const list = h("div", { dataset: { testid: "tokens-list" } }, h("p", { class: "loading panel-body", text: "Loading tokens…" }));
  const authNote = h("p", { class: "muted small", hidden: true, dataset: { testid: "auth-note" } });

  const name = h("input", { type: "text", maxlength: "100", placeholder: "e.g. ci-bot", dataset: { testid: "token-name" } });
  const scopeBoxes = SCOPES.map(([scope, label]) => ({ scope, ...checkbox(label, { value: scope, checked: scope === "read", dataset: { testid: `token-scope-${scope}` } }) }));
  const days = h("input", { type: "number", min: "1", max: "3650", placeholder: "never", dataset: { testid: "token-days" } });
  const error = h("p", { class: "form-error", role: "alert", hidden: true, dataset: { testid: "token-create-error" } });
  const secret = h("div", { class: "stack", hidden: true, role: "status", dataset: { testid: "token-secret" } });
  const form = h(
    "form",
    { class: "panel-body stack", novalidate: true, dataset: { testid: "token-create-form" } },
    field("Name", name),
    h("fieldset", {}, h("legend", { text: "Scopes" }), h("div", { class: "stack" }, scopeBoxes.map((b) => b.el))),
    field("Expires after (days)", days, "Empty: never expires."),
    error,
    h("div", { class: "actions" }, h("button", { type: "submit", class: "button button-primary", text: "Create token", dataset: { testid: "token-create" } })),
    secret,
  );

  const page = h(
    "div",
    {},
    h("div", { class: "page-head" }, h("div", {}, h("h1", { text: "API tokens" }), subtitle), authNote),
    h(
      "div",
      { class: "split" },
      h("section", { class: "panel", "aria-labelledby": "tokens-heading" }, h("div", { class: "panel-head" }, h("h2", { id: "tokens-heading", text: "Tokens" })), list),
      h("section", { class: "panel", "aria-labelledby": "create-token-heading" }, h("div", { class: "panel-head" }, h("h2", { id: "create-token-heading", text: "Create a token" })), form),
    ),
  );
  replace(root, h("p", { class: "loading", text: "Loading tokens…" }));

  async function load() {
    try {
      const answer = await get("/api/enterprise/tokens", { limit: 1000 });
      if (stopped) return;
      if (!root.contains(page)) replace(root, page);
      render(answer);
    } catch (err) {
      if (stopped) return;
      if (isForbidden(err)) {
        replace(root, h("div", { class: "page-head" }, h("h1", { text: "API tokens" })), forbidden(err, "admin", "the API tokens"));
        return;
      }
      if (!root.contains(page)) replace(root, page);
      replace(list, h("div", { class: "panel-body" }, errorBox(err, "Could not load the tokens")));
    }
  }

  function render(answer) {
    const active = answer.tokens.filter((t) => !t.revoked && !t.expired).length;
    subtitle.textContent = `${answer.total} token${answer.total === 1 ? "" : "s"} · ${active} active`;
    if (!answer.tokens.length) {
      replace(list, emptyState("No tokens yet", "Tokens let scripts and people call lokid when auth is on. Create one with the form; its secret is shown once."));
      return;
    }
    replace(
      list,
      dataTable("API tokens", ["Name", "Scopes", "State", "Created", "Expires", "Last used", ""], answer.tokens.map((t) =>
        h(
          "tr",
          { dataset: { testid: "token-row", id: t.id } },
          h("td", {}, h("strong", { text: t.name }), h("div", { class: "muted small mono nowrap", text: t.id })),
          // Scopes and times may wrap (at ", " and between date and time): seven
          // columns fit the 1280-px layout's table only so (docs/web-dashboard.md).
          h("td", { class: "mono small", text: t.scopes.join(", ") }),
          h("td", {}, tokenState(t)),
          h("td", { class: "small", text: formatTime(t.created_at) }),
          h("td", { class: "small", text: t.expires_at ? formatTime(t.expires_at) : "never" }),
          h("td", { class: "small", text: t.last_used_at ? formatTime(t.last_used_at) : "never" }),
          h(
            "td",
            {},
            t.revoked
              ? null
              : h("button", {
                  type: "button",
                  class: "button button-small button-danger",
                  text: "Revoke",
                  "aria-label": `Revoke ${t.name}`,
                  dataset: { testid: "token-revoke" },
                  onclick: () => revoke(t),
                }),
          ),
        ),
      )),
    );
  }

  async function revoke(t) {
    if (!window.confirm(`Revoke the token “${t.name}” (${t.id})? It stops working at once.`)) return;
    try {
      await del(`/api/enterprise/tokens/${encodeURIComponent(t.id)}`);
      toast(`Token ${t.name} revoked.`, "ok");
    } catch (err) {
      toast(err.message, "error", "Could not revoke the token");
    }
    load();
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    showFormError(error, null);
    clearInvalid(form);
    secret.hidden = true;
    const body = { name: name.value.trim(), scopes: scopeBoxes.filter((b) => b.input.checked).map((b) => b.scope) };
    try {
      const expiresDays = numberValue(days, "Expires after (days)");
      if (expiresDays !== undefined) body.expires_days = expiresDays;
    } catch (err) {
      // "1e" must not become a token that never expires.
      markInvalid(err.control, err.message);
      showFormError(error, err);
      days.focus();
      return;
    }
    try {
      const made = await post("/api/enterprise/tokens", body);
      const value = h("div", { class: "secret", dataset: { testid: "token-secret-value" }, text: made.token });
      const copy = h("button", {
        type: "button",
        class: "button button-small",
        text: "Copy",
        onclick: async () => {
          try {
            await navigator.clipboard.writeText(made.token);
            copy.textContent = "Copied";
          } catch {
            getSelection().selectAllChildren(value);
            copy.textContent = "Selected: press Ctrl+C";
          }
        },
      });
      replace(secret, h("p", { class: "form-ok", text: `Token “${made.name}” created. Copy it now: it is not shown again.` }), value, h("div", { class: "actions" }, copy));
      secret.hidden = false;
      name.value = "";
      load();
    } catch (err) {
      showFormError(error, err);
    }
  });

  get("/api/enterprise/status")
    .then((s) => {
      if (stopped || s.auth_enabled) return;
      authNote.textContent = "Auth is off on this daemon: tokens are only checked once LOKI_ENTERPRISE_AUTH=true.";
      authNote.hidden = false;
    })
    .catch(() => {});
  load();
  return () => {
    stopped = true;
  };
}
