/**
 * The project registry (#/registry): registered folders with their status,
 * task counts and a health check on demand; a form to register a folder; a
 * discovery of Loki projects under given roots (with "register" per result
 * or for all); and a sync of every entry. `registry.updated` messages on the
 * WebSocket re-read the list.
 * @module registry
 */

import { del, get, post } from "./api.js";
import { badge, clearInvalid, dataTable, emptyState, errorBox, field, formatAge, formatBytes, formatTime, h, markInvalid, numberValue, replace, showFormError, throttle, toast } from "./dom.js";
import { live } from "./ws.js";

/** `3 pending · 1 active · 5 done · 1 failed`, or an em dash. */
function taskSummary(tasks) {
  if (!tasks || !tasks.total) return "—";
  const parts = [];
  if (tasks.pending) parts.push(`${tasks.pending} pending`);
  if (tasks.active) parts.push(`${tasks.active} active`);
  if (tasks.completed) parts.push(`${tasks.completed} done`);
  if (tasks.failed) parts.push(`${tasks.failed} failed`);
  return parts.join(" · ");
}

/** Mount the registry view. */
export function mount(root) {
  let stopped = false;
  const subtitle = h("p", { class: "subtitle", "aria-live": "polite", dataset: { testid: "registry-count" } });
  const list = h("div", { dataset: { testid: "registry-list" } }, h("p", { class: "loading panel-body", text: "Loading the registry…" }));
  const syncButton = h("button", { type: "button", class: "button", text: "Sync all", dataset: { testid: "registry-sync" }, onclick: () => sync() });
  const syncResult = h("p", { class: "muted small", role: "status", dataset: { testid: "registry-sync-result" } });

  // register form
  const regPath = h("input", { type: "text", placeholder: "/home/me/code/app", spellcheck: "false", dataset: { testid: "register-path" } });
  const regName = h("input", { type: "text", placeholder: "the folder's name", maxlength: "200", dataset: { testid: "register-name" } });
  const regError = h("p", { class: "form-error", role: "alert", hidden: true, dataset: { testid: "register-error" } });
  const regForm = h(
    "form",
    { class: "panel-body stack", novalidate: true, dataset: { testid: "register-form" } },
    field("Folder", regPath, "An existing folder; a Loki project holds .loki/."),
    field("Name", regName, "Optional."),
    regError,
    h("div", { class: "actions" }, h("button", { type: "submit", class: "button button-primary", text: "Register" })),
  );

  // discover form
  const roots = h("input", { type: "text", placeholder: "~/code, ~/projects (default roots when empty)", spellcheck: "false", dataset: { testid: "discover-roots" } });
  const depth = h("input", { type: "number", min: "1", max: "10", value: "3", dataset: { testid: "discover-depth" } });
  const discError = h("p", { class: "form-error", role: "alert", hidden: true, dataset: { testid: "discover-error" } });
  const discResults = h("div", { dataset: { testid: "discover-results" } });
  const discForm = h(
    "form",
    { class: "panel-body stack", novalidate: true, dataset: { testid: "discover-form" } },
    h("div", { class: "row-end" }, h("div", { class: "grow" }, field("Roots", roots, "Comma-separated folders to search.")), field("Depth", depth)),
    discError,
    h(
      "div",
      { class: "actions" },
      h("button", { type: "button", class: "button", text: "Discover and register all", dataset: { testid: "discover-register-all" }, onclick: () => discover(true) }),
      h("button", { type: "submit", class: "button button-primary", text: "Discover", dataset: { testid: "discover-submit" } }),
    ),
    discResults,
  );

  replace(
    root,
    h(
      "div",
      { class: "page-head" },
      h("div", {}, h("h1", { text: "Registry" }), subtitle),
      h("div", { class: "row" }, syncResult, syncButton),
    ),
    h(
      "section",
      { class: "panel", "aria-labelledby": "registry-heading" },
      h("div", { class: "panel-head" }, h("h2", { id: "registry-heading", text: "Registered projects" })),
      list,
    ),
    h(
      "div",
      { class: "split panel-gap" },
      h(
        "section",
        { class: "panel", "aria-labelledby": "discover-heading" },
        h("div", { class: "panel-head" }, h("h2", { id: "discover-heading", text: "Discover projects" })),
        discForm,
      ),
      h(
        "section",
        { class: "panel", "aria-labelledby": "register-heading" },
        h("div", { class: "panel-head" }, h("h2", { id: "register-heading", text: "Register a folder" })),
        regForm,
      ),
    ),
  );

  async function load() {
    try {
      const page = await get("/api/registry/projects", { limit: 1000 });
      if (!stopped) render(page);
    } catch (err) {
      if (!stopped) replace(list, h("div", { class: "panel-body" }, errorBox(err, "Could not load the registry")));
    }
  }

  function render(page) {
    subtitle.textContent = `${page.total} registered project${page.total === 1 ? "" : "s"}`;
    if (!page.projects.length) {
      replace(
        list,
        emptyState(
          "No registered projects",
          "The registry keeps an eye on project folders: whether they still exist, their .loki/ state and task queues. Register a folder, or discover the Loki projects under your code folders below.",
        ),
      );
      return;
    }
    const rows = [];
    for (const entry of page.projects) {
      const healthRow = h("tr", { hidden: true, class: "health-row", dataset: { testid: "health-row" } });
      const healthButton = h("button", {
        type: "button",
        class: "button button-small",
        text: "Check health",
        "aria-label": `Check health of ${entry.name}`,
        "aria-expanded": "false",
        dataset: { testid: "registry-health" },
        onclick: () => health(entry, healthRow, healthButton),
      });
      rows.push(
        h(
          "tr",
          { dataset: { testid: "registry-row", id: entry.id } },
          h("td", {}, h("strong", { text: entry.name }), h("div", { class: "muted small mono", text: entry.id })),
          h("td", { class: "mono small", text: entry.path }),
          h("td", {}, badge(entry.status, { testid: "registry-status" })),
          h("td", { text: entry.has_loki ? "yes" : "no" }),
          h("td", { text: taskSummary(entry.tasks) }),
          h("td", { class: "nowrap", text: formatAge(entry.last_seen), title: formatTime(entry.last_seen) }),
          h(
            "td",
            { class: "nowrap" },
            h(
              "div",
              { class: "row" },
              healthButton,
              h("button", {
                type: "button",
                class: "button button-small button-danger",
                text: "Remove",
                "aria-label": `Remove ${entry.name} from the registry`,
                onclick: () => unregister(entry),
              }),
            ),
          ),
        ),
        healthRow,
      );
    }
    replace(
      list,
      dataTable("Registered projects", ["Project", "Path", "Status", ".loki", "Tasks", "Last seen", "Actions"], rows),
    );
  }

  async function health(entry, row, button) {
    if (!row.hidden) {
      row.hidden = true;
      button.setAttribute("aria-expanded", "false");
      return;
    }
    row.hidden = false;
    button.setAttribute("aria-expanded", "true");
    const cell = h("td", { colspan: "7" }, h("p", { class: "muted", text: "Checking…" }));
    replace(row, cell);
    try {
      const report = await get(`/api/registry/projects/${encodeURIComponent(entry.id)}/health`);
      const checks = Object.entries(report.checks || {}).map(([name, check]) => {
        let note = "";
        if (name === "disk" && check.free_bytes !== undefined) note = `${formatBytes(check.free_bytes)} free`;
        else if (name === "activity" && check.last_activity) note = `last ${formatAge(check.last_activity)}`;
        else if (name === "session") note = check.active ? `active (pid ${check.pid})` : "no active session";
        else if (check.message) note = check.message;
        return h("li", {}, badge(check.ok ? "ok" : "failed", { label: check.ok ? "pass" : "fail" }), h("span", {}, h("strong", { text: name }), note ? ` — ${note}` : ""));
      });
      replace(
        cell,
        h(
          "div",
          { class: "stack", dataset: { testid: "health-report" } },
          h("div", { class: "row" }, h("strong", { text: "Health:" }), badge(report.status, { testid: "health-status" }), h("span", { class: "muted small", text: `checked ${formatTime(report.checked_at)}` })),
          h("ul", { class: "health-checks" }, checks),
          report.problems && report.problems.length ? h("ul", {}, report.problems.map((p) => h("li", { text: typeof p === "string" ? p : p.message || JSON.stringify(p) }))) : null,
        ),
      );
    } catch (err) {
      replace(cell, errorBox(err, "Health check failed"));
    }
  }

  async function unregister(entry) {
    if (!window.confirm(`Remove ${entry.name} from the registry? The folder itself is not touched.`)) return;
    try {
      await del(`/api/registry/projects/${encodeURIComponent(entry.id)}`);
      toast(`${entry.name} removed from the registry.`, "ok");
    } catch (err) {
      toast(err.message, "error", "Could not remove the project");
    }
    load();
  }

  async function sync() {
    syncButton.disabled = true;
    syncResult.textContent = "Syncing…";
    try {
      const summary = await post("/api/registry/sync");
      syncResult.textContent = `Synced ${summary.total}: ${summary.ok} ok, ${summary.missing} missing, ${summary.unreadable} unreadable, ${summary.updated} updated (${formatTime(summary.synced_at)})`;
      if (summary.errors && summary.errors.length) toast(summary.errors.map((e) => e.message).join("; "), "error", "Sync problems");
    } catch (err) {
      syncResult.textContent = "";
      toast(err.message, "error", "Sync failed");
    } finally {
      syncButton.disabled = false;
    }
    load();
  }

  regForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    showFormError(regError, null);
    regPath.removeAttribute("aria-invalid");
    regName.removeAttribute("aria-invalid");
    const body = { path: regPath.value.trim() };
    if (regName.value.trim()) body.name = regName.value.trim();
    try {
      const entry = await post("/api/registry/projects", body);
      toast(`${entry.name} registered.`, "ok");
      regPath.value = "";
      regName.value = "";
      load();
    } catch (err) {
      showFormError(regError, err);
      (err.field === "name" ? regName : regPath).setAttribute("aria-invalid", "true");
    }
  });

  discForm.addEventListener("submit", (event) => {
    event.preventDefault();
    discover(false);
  });

  async function discover(register) {
    showFormError(discError, null);
    clearInvalid(discForm);
    let depthValue;
    try {
      depthValue = numberValue(depth, "Depth");
    } catch (err) {
      markInvalid(err.control, err.message);
      showFormError(discError, err);
      depth.focus();
      return;
    }
    replace(discResults, h("p", { class: "muted", text: "Searching…" }));
    const query = { roots: roots.value.split(",").map((r) => r.trim()).filter(Boolean).join(","), depth: depthValue, register: register ? "true" : "" };
    try {
      const found = await get("/api/registry/discover", query);
      renderFound(found);
      if (register) {
        toast(`${found.registered ?? 0} project${found.registered === 1 ? "" : "s"} registered.`, "ok");
        load();
      }
    } catch (err) {
      replace(discResults);
      showFormError(discError, err);
    }
  }

  function renderFound(found) {
    const meta = h(
      "p",
      { class: "muted small" },
      `${found.total} found in ${found.folders} folders (${found.seconds}s)`,
      found.truncated ? ` — stopped early: ${found.truncated_reason}` : "",
      found.roots && found.roots.some((r) => r.status !== "ok") ? ` — roots: ${found.roots.map((r) => `${r.given || r.path} (${r.status})`).join(", ")}` : "",
    );
    if (!found.projects.length) {
      replace(discResults, meta, emptyState("Nothing found", "No folder holding .loki/ under these roots. Try another root or a greater depth."));
      return;
    }
    replace(
      discResults,
      meta,
      dataTable("Projects found", ["Project", "Path", "Has", ""], found.projects.map((p) =>
        h(
          "tr",
          { dataset: { testid: "found-row" } },
          h("td", { text: p.name }),
          h("td", { class: "mono small", text: p.path }),
          h("td", { class: "small", text: [p.has_state && "state", p.has_queue && "queue", p.has_prd && "PRD"].filter(Boolean).join(", ") || "—" }),
          h(
            "td",
            {},
            p.registered || p.registered_now
              ? badge("ok", { label: "registered" })
              : h("button", {
                  type: "button",
                  class: "button button-small",
                  text: "Register",
                  "aria-label": `Register ${p.name}`,
                  onclick: async (event) => {
                    const button = event.currentTarget;
                    button.disabled = true;
                    try {
                      await post("/api/registry/projects", { path: p.path });
                      button.replaceWith(badge("ok", { label: "registered" }));
                      load();
                    } catch (err) {
                      button.disabled = false;
                      toast(err.message, "error", "Could not register");
                    }
                  },
                }),
          ),
        ),
      )),
      found.errors && found.errors.length ? h("p", { class: "muted small", text: `Problems: ${found.errors.map((e) => `${e.path}: ${e.message}`).join("; ")}` }) : null,
    );
  }

  const reload = throttle(load, 500);
  const unsubscribe = live.subscribe(["registry.updated"], reload);
  load();
  return () => {
    stopped = true;
    reload.cancel();
    unsubscribe();
  };
}
