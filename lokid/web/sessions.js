/**
 * Sessions: the list with a start form (#/sessions), and one session
 * (#/sessions/<id>) with its tasks, its controls (pause, resume, stop,
 * delete, input) and a live event log.
 *
 * Live data: the list refreshes on `session.*`, `phase.*` and `agent.*`
 * messages of the page's WebSocket (and polls while a session is active, in
 * case the socket is down); the session view reads `GET /api/events` for that
 * session as SSE (sse.js) and refreshes the session and its tasks when an
 * event says they changed.
 * @module sessions
 */

import { ApiError, del, get, post } from "./api.js";
import {
  badge,
  checkbox,
  clearInvalid,
  dataTable,
  emptyState,
  errorBox,
  field,
  formatAge,
  formatClock,
  formatCost,
  formatTime,
  FieldError,
  h,
  markInvalid,
  numberValue,
  replace,
  select,
  showFormError,
  throttle,
  toast,
  uid,
} from "./dom.js";
import { EventStream } from "./sse.js";
import { live } from "./ws.js";

const ACTIVE = new Set(["starting", "running", "paused", "stopping"]);
const STATUSES = ["starting", "running", "paused", "stopping", "stopped", "completed", "failed", "interrupted"];
const PAGE = 50;
/** The event log keeps at most this many events (and DOM lines). */
export const MAX_LOG_LINES = 1000;
const HISTORY = 300;
/** A finished session is re-read every this many 5-s polls (15 s). */
const IDLE_POLL_TICKS = 3;
const LEVELS = ["debug", "info", "warning", "error"];

/** The last path segment, for showing a project folder compactly. */
function baseName(path) {
  if (!path) return "—";
  const parts = String(path).split("/").filter(Boolean);
  return parts.length ? parts[parts.length - 1] : path;
}

function shortId(id) {
  return id.replace(/^session-/, "").slice(0, 10);
}

/** "2/3" with a small bar; the numbers carry the meaning, the bar only helps. */
function taskProgress(tasks) {
  if (!tasks || !tasks.total) return h("span", { class: "muted", text: "—" });
  const fill = h("span", { class: "progress-fill" });
  fill.style.width = `${Math.round((100 * tasks.completed) / tasks.total)}%`;
  return h(
    "span",
    { class: "progress" },
    h("span", { class: "progress-bar", "aria-hidden": "true" }, fill),
    h("span", { class: "nowrap", text: `${tasks.completed}/${tasks.total}` }),
    tasks.failed ? h("span", { class: "badge badge-plain tone-red", text: `${tasks.failed} failed` }) : null,
  );
}

// -- the list -------------------------------------------------------------------

/** #/sessions: every session, newest first, and the start form. */
export function mountList(root, _params, ctx) {
  let status = "";
  let offset = 0;
  let stopped = false;
  let lastLoad = null;

  const count = h("p", { class: "subtitle", "aria-live": "polite", dataset: { testid: "sessions-count" } });
  const statusFilter = select([["", "All statuses"], ...STATUSES.map((s) => [s, s])], {
    "aria-label": "Filter sessions by status",
    dataset: { testid: "sessions-status-filter" },
    onchange: () => {
      status = statusFilter.value;
      offset = 0;
      load();
    },
  });
  const refresh = h("button", { type: "button", class: "button", text: "Refresh", onclick: () => load() });
  const body = h("div", { dataset: { testid: "sessions-list" } }, h("p", { class: "loading panel-body", text: "Loading sessions…" }));
  const pager = h("div", { class: "pager", hidden: true });

  replace(
    root,
    h(
      "div",
      { class: "page-head" },
      h("div", {}, h("h1", { text: "Sessions" }), count),
    ),
    h(
      "div",
      { class: "split" },
      h(
        "section",
        { class: "panel", "aria-labelledby": "sessions-heading" },
        h(
          "div",
          { class: "panel-head" },
          h("h2", { id: "sessions-heading", text: "All sessions" }),
          h("div", { class: "row" }, statusFilter, refresh),
        ),
        body,
        pager,
      ),
      startForm(ctx),
    ),
  );

  async function load() {
    const started = Date.now();
    lastLoad = started;
    try {
      const page = await get("/api/sessions", { status, limit: PAGE, offset });
      if (stopped || lastLoad !== started) return;
      render(page);
    } catch (err) {
      if (stopped) return;
      replace(body, h("div", { class: "panel-body" }, errorBox(err, "Could not load the sessions")));
    }
  }

  function render(page) {
    const active = page.sessions.filter((s) => ACTIVE.has(s.status)).length;
    count.textContent = `${page.total} session${page.total === 1 ? "" : "s"}${active ? ` · ${active} active` : ""}`;
    if (!page.sessions.length) {
      replace(
        body,
        status
          ? emptyState("No sessions with this status", `No session is ${status}. Choose another status to see more.`)
          : emptyState(
              "No sessions yet",
              "A session drives a coding agent through a PRD in a project folder. Start one with the form on the right.",
            ),
      );
      pager.hidden = true;
      return;
    }
    const rows = page.sessions.map((s) =>
      h(
        "tr",
        { dataset: { testid: "session-row", sessionId: s.id, status: s.status } },
        h(
          "td",
          {},
          h("a", { href: `#/sessions/${encodeURIComponent(s.id)}`, class: "session-id", text: shortId(s.id), title: s.id }),
          h("div", { class: "muted small truncate", text: `${baseName(s.projectDir)} · ${s.provider}`, title: `${s.projectDir} (${s.provider})` }),
        ),
        h("td", {}, badge(s.status, { testid: "session-status" })),
        h("td", { text: s.phase || "—" }),
        h("td", { class: "num", text: String(s.iteration ?? 0) }),
        h("td", {}, taskProgress(s.tasks)),
        h("td", { class: "num", text: s.agents ? `${s.agents.active}/${s.agents.total}` : "—" }),
        h("td", { class: "num", text: formatCost(s.costUsd) }),
        h("td", { class: "nowrap", text: formatAge(s.createdAt), title: formatTime(s.createdAt) }),
      ),
    );
    replace(
      body,
      dataTable("Sessions, newest first", ["Session", "Status", "Phase", "Iteration", "Tasks", "Agents", "Cost", "Created"], rows, { numeric: ["Iteration", "Agents", "Cost"] }),
    );
    pager.hidden = page.total <= PAGE;
    replace(
      pager,
      h("span", { class: "muted small", text: `${offset + 1}–${offset + page.sessions.length} of ${page.total}` }),
      h("button", {
        type: "button",
        class: "button button-small",
        text: "Newer",
        disabled: offset === 0,
        onclick: () => {
          offset = Math.max(0, offset - PAGE);
          load();
        },
      }),
      h("button", {
        type: "button",
        class: "button button-small",
        text: "Older",
        disabled: offset + PAGE >= page.total,
        onclick: () => {
          offset += PAGE;
          load();
        },
      }),
    );
  }

  const reload = throttle(load, 1000);
  const unsubscribe = live.subscribe(["session.*", "phase.*", "agent.spawned", "agent.completed", "agent.failed"], reload);
  const unwatch = live.onStatus((state) => {
    if (state === "open") reload();
  });
  const poll = setInterval(load, 5000);
  load();

  return () => {
    stopped = true;
    reload.cancel();
    unsubscribe();
    unwatch();
    clearInterval(poll);
  };
}

/** The start form: PRD path or pasted PRD, project folder, provider, options. */
function startForm(ctx) {
  const error = h("p", { class: "form-error", role: "alert", hidden: true, dataset: { testid: "start-error" } });
  const sourcePath = h("input", { type: "radio", name: "prd-source", value: "path", id: uid("src"), checked: true });
  const sourceText = h("input", { type: "radio", name: "prd-source", value: "text", id: uid("src") });
  const prd = h("input", { type: "text", name: "prd", placeholder: "/home/me/app/prd.md", spellcheck: "false", dataset: { testid: "start-prd" } });
  const prdText = h("textarea", { name: "prdText", placeholder: "# My app\n\n## Features\n- …", dataset: { testid: "start-prd-text" } });
  const projectDir = h("input", { type: "text", name: "projectDir", placeholder: "/home/me/app", spellcheck: "false", dataset: { testid: "start-project" } });
  const providers = ctx.status && ctx.status.providers ? Object.entries(ctx.status.providers) : [["claude", true]];
  const provider = select(
    providers.map(([name, installed]) => [name, installed ? name : `${name} (not installed)`]),
    { name: "provider", value: (ctx.status && ctx.status.provider) || "claude", dataset: { testid: "start-provider" } },
  );
  const parallel = checkbox("Parallel agents (git worktrees)");
  const sandbox = checkbox("Sandbox (bubblewrap)");
  const num = (name, placeholder, step = "1") =>
    h("input", { type: "number", name, min: step === "1" ? "1" : "0.01", step, placeholder, inputmode: "decimal" });
  const maxAgents = num("maxAgents", "daemon cap");
  const maxIterations = num("maxIterations", "50");
  const maxDurationSeconds = num("maxDurationSeconds", "no limit");
  const budgetUsd = num("budgetUsd", "no limit", "0.01");
  const model = h("input", { type: "text", name: "model", placeholder: "provider default" });
  const verify = h("input", { type: "text", name: "verify", placeholder: "e.g. make test", spellcheck: "false" });
  const submit = h("button", { type: "submit", class: "button button-primary", text: "Start session", dataset: { testid: "start-submit" } });

  const pathField = field("PRD path", prd, "Absolute, or relative to the project folder.");
  const textField = field("PRD text", prdText, "Written to <project>/.loki/prd.md.");
  textField.hidden = true;
  const switchSource = () => {
    const text = sourceText.checked;
    pathField.hidden = text;
    textField.hidden = !text;
  };
  sourcePath.addEventListener("change", switchSource);
  sourceText.addEventListener("change", switchSource);

  const fields = {
    prd,
    prdText,
    projectDir,
    provider,
    "options.parallel": parallel.input,
    "options.sandbox": sandbox.input,
    "options.maxAgents": maxAgents,
    "options.maxIterations": maxIterations,
    "options.maxDurationSeconds": maxDurationSeconds,
    "options.budgetUsd": budgetUsd,
    "options.model": model,
    "options.verify": verify,
  };
  const advanced = h(
    "details",
    {},
    h("summary", { text: "Options" }),
    h(
      "div",
      { class: "stack" },
      parallel.el,
      sandbox.el,
      h(
        "div",
        { class: "options-grid" },
        field("Max agents", maxAgents),
        field("Max iterations", maxIterations),
        field("Max duration (s)", maxDurationSeconds),
        field("Budget (USD)", budgetUsd),
        field("Model", model),
        field("Verify command", verify),
      ),
    ),
  );

  const form = h(
    "form",
    { class: "panel-body stack", novalidate: true, "aria-labelledby": "start-heading", dataset: { testid: "start-form" } },
    h(
      "fieldset",
      {},
      h("legend", { text: "PRD" }),
      h(
        "div",
        { class: "row" },
        h("div", { class: "field-inline" }, sourcePath, h("label", { for: sourcePath.id, text: "A file path" })),
        h("div", { class: "field-inline" }, sourceText, h("label", { for: sourceText.id, text: "Paste the text" })),
      ),
    ),
    pathField,
    textField,
    field("Project folder", projectDir, "Required with pasted text; else the PRD's folder."),
    field("Provider", provider),
    advanced,
    error,
    h("div", { class: "actions" }, submit),
  );

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearInvalid(form);
    showFormError(error, null);
    const body = { provider: provider.value };
    if (sourceText.checked) body.prdText = prdText.value;
    else body.prd = prd.value.trim();
    if (projectDir.value.trim()) body.projectDir = projectDir.value.trim();
    const options = {};
    if (parallel.input.checked) options.parallel = true;
    if (sandbox.input.checked) options.sandbox = true;
    try {
      for (const [key, control, label] of [
        ["maxAgents", maxAgents, "Max agents"],
        ["maxIterations", maxIterations, "Max iterations"],
        ["maxDurationSeconds", maxDurationSeconds, "Max duration (s)"],
        ["budgetUsd", budgetUsd, "Budget (USD)"],
      ]) {
        const value = numberValue(control, label);
        if (value !== undefined) options[key] = value;
      }
    } catch (err) {
      if (!(err instanceof FieldError)) throw err;
      // Refuse the form rather than start a session without the limit typed.
      advanced.open = true;
      markInvalid(err.control, err.message);
      showFormError(error, err);
      err.control.focus();
      return;
    }
    if (model.value.trim()) options.model = model.value.trim();
    if (verify.value.trim()) options.verify = verify.value.trim();
    if (Object.keys(options).length) body.options = options;

    submit.disabled = true;
    submit.textContent = "Starting…";
    try {
      const created = await post("/api/sessions", body);
      toast(`Session ${shortId(created.id)} is starting.`, "ok");
      ctx.navigate(`/sessions/${encodeURIComponent(created.id)}`);
    } catch (err) {
      showFormError(error, err);
      const control = err instanceof ApiError && err.field ? fields[err.field] : null;
      if (control) {
        control.setAttribute("aria-invalid", "true");
        if (err.field.startsWith("options.")) advanced.open = true;
      }
    } finally {
      submit.disabled = false;
      submit.textContent = "Start session";
    }
  });

  return h(
    "section",
    { class: "panel", "aria-labelledby": "start-heading" },
    h("div", { class: "panel-head" }, h("h2", { id: "start-heading", text: "Start a session" })),
    form,
  );
}

// -- one session ----------------------------------------------------------------

/** What an event says, in one line. */
export function describeEvent(event) {
  const d = event.data || {};
  const clip = (text, n = 600) => {
    const s = String(text ?? "");
    return s.length > n ? `${s.slice(0, n - 1)}…` : s;
  };
  switch (event.type) {
    case "agent.output":
      return clip(d.text !== undefined ? d.text : `${d.tool || "tool"} ${JSON.stringify(d.input ?? {})}`);
    case "task.created":
    case "task.started":
    case "task.completed":
      return `${d.taskId} ${d.title || ""}${d.attempt ? ` (attempt ${d.attempt})` : ""}`;
    case "task.failed":
      return `${d.taskId} ${d.title || ""}: ${clip(d.error || d.code || "failed", 300)}${d.retryInSeconds ? ` — retry in ${d.retryInSeconds} s` : ""}`;
    case "phase.started":
    case "phase.completed":
      return String(d.phase || "");
    case "agent.spawned":
      return d.kind === "subagent"
        ? `sub-agent ${d.agentType || ""} ${clip(d.description || "", 200)}`
        : `${d.agentId} pid ${d.pid} for ${d.taskId} (${d.provider})`;
    case "agent.completed":
    case "agent.failed":
      return `${d.agentId || ""} ${clip(d.summary || d.error || "", 300)}`.trim();
    case "input.received":
      return `input ${d.inputId} from ${d.source || "api"}`;
    case "input.applied":
      return `input ${d.inputId} given to ${d.taskId}`;
    case "session.started":
      return `${d.status} with ${d.provider}, ${d.tasks ?? "?"} tasks`;
    case "session.completed":
    case "session.failed":
      return `${d.status}: ${d.exitReason || ""}${d.detail ? ` — ${clip(d.detail, 300)}` : ""}`;
    case "session.paused":
    case "session.resumed":
    case "session.stopped":
      return `${d.status}${d.source ? ` (by ${d.source})` : ""}`;
    case "session.interrupted":
      return `${d.status}: ${d.reason || ""}`;
    case "stream.reset":
      return `stream reset (${d.reason}): some older events are no longer available`;
    case "log":
    case "warning":
    case "error":
      return clip(d.message || JSON.stringify(d));
    default:
      return clip(JSON.stringify(d));
  }
}

const REFRESHING = /^(session\.|phase\.|task\.|agent\.(spawned|completed|failed)|input\.)/;

/** #/sessions/<id>: a session's facts, controls, tasks, input box and live log. */
export function mountDetail(root, { id }, ctx) {
  let stopped = false;
  let session = null;

  const title = h("h1", {}, "Session ", h("span", { class: "session-id", text: id }));
  const statusSlot = h("span", { dataset: { testid: "session-status-slot" } });
  const facts = h("dl", { class: "facts", dataset: { testid: "session-facts" } });
  const commandError = h("p", { class: "form-error", role: "alert", hidden: true, dataset: { testid: "command-error" } });
  const button = (label, action, extra = "") =>
    h("button", {
      type: "button",
      class: `button ${extra}`,
      text: label,
      dataset: { testid: `session-${action}` },
      onclick: () => command(action),
    });
  const buttons = {
    pause: button("Pause", "pause"),
    resume: button("Resume", "resume"),
    stop: button("Stop", "stop", "button-danger"),
    delete: button("Delete", "delete", "button-danger"),
  };
  const tasksBody = h("div", { dataset: { testid: "session-tasks" } }, h("p", { class: "loading panel-body", text: "Loading tasks…" }));

  // input box
  const inputText = h("textarea", { name: "message", placeholder: "e.g. Use SQLite for storage", dataset: { testid: "input-message" } });
  const inputResult = h("p", { role: "status", hidden: true, dataset: { testid: "input-result" } });
  const inputSubmit = h("button", { type: "submit", class: "button button-primary", text: "Send input", dataset: { testid: "input-submit" } });
  const inputForm = h(
    "form",
    { class: "panel-body stack input-form", novalidate: true, dataset: { testid: "input-form" } },
    field("Message for the agent", inputText, "Delivered into the next agent prompt (running or paused sessions)."),
    inputResult,
    h("div", { class: "actions" }, inputSubmit),
  );

  // the log
  const log = h("div", {
    class: "log",
    role: "log",
    "aria-live": "polite",
    "aria-label": "Event log",
    tabindex: "0",
    dataset: { testid: "event-log" },
  });
  const logState = h("span", { class: "muted small", "aria-live": "polite", dataset: { testid: "log-state" }, text: "connecting…" });
  const levelFilter = select(
    [
      ["debug", "Everything (debug)"],
      ["info", "Info and above"],
      ["warning", "Warnings and errors"],
      ["error", "Errors only"],
    ],
    { value: "debug", dataset: { testid: "log-level" } },
  );
  const typeFilter = select(
    [
      ["", "All types"],
      ["session.*", "session.*"],
      ["phase.*", "phase.*"],
      ["task.*", "task.*"],
      ["agent.*", "agent.*"],
      ["agent.output", "agent output"],
      ["input.*", "input.*"],
      ["log", "log"],
      ["warning", "warning"],
      ["error", "error"],
    ],
    { value: "", dataset: { testid: "log-type" } },
  );
  const textFilter = h("input", { type: "text", placeholder: "text in the line", dataset: { testid: "log-search" } });
  const clearButton = h("button", { type: "button", class: "button button-small", text: "Clear", onclick: () => clearLog() });

  replace(
    root,
    h(
      "div",
      { class: "page-head" },
      h(
        "div",
        { class: "stack" },
        h("a", { href: "#/sessions", text: "← All sessions", class: "small" }),
        h("div", { class: "row" }, title, statusSlot),
      ),
      h("div", { class: "controls", role: "group", "aria-label": "Session controls" }, Object.values(buttons)),
    ),
    commandError,
    h("section", { class: "panel panel-body", "aria-label": "Session details" }, facts),
    h(
      "div",
      { class: "session-layout" },
      h(
        "div",
        { class: "stack" },
        h(
          "section",
          { class: "panel", "aria-labelledby": "tasks-heading" },
          h("div", { class: "panel-head" }, h("h2", { id: "tasks-heading", text: "Tasks" })),
          tasksBody,
        ),
        h(
          "section",
          { class: "panel", "aria-labelledby": "input-heading" },
          h("div", { class: "panel-head" }, h("h2", { id: "input-heading", text: "Send input" })),
          inputForm,
        ),
      ),
      h(
        "section",
        { class: "panel", "aria-labelledby": "log-heading" },
        h(
          "div",
          { class: "panel-head" },
          h("div", { class: "row" }, h("h2", { id: "log-heading", text: "Event log" }), logState),
          h(
            "div",
            { class: "log-toolbar" },
            field("Level", levelFilter),
            field("Type", typeFilter),
            field("Search", textFilter),
            clearButton,
          ),
        ),
        log,
      ),
    ),
  );

  // -- session and tasks -------------------------------------------------------

  async function loadSession() {
    try {
      const [s, tasks] = await Promise.all([get(`/api/sessions/${encodeURIComponent(id)}`), get(`/api/sessions/${encodeURIComponent(id)}/tasks`, { limit: 1000 })]);
      if (stopped) return;
      session = s;
      renderSession(s);
      renderTasks(tasks);
    } catch (err) {
      if (stopped) return;
      if (err instanceof ApiError && err.status === 404) {
        replace(
          root,
          emptyState(
            "No such session",
            `Session ${id} does not exist (it may have been deleted).`,
            h("a", { class: "button", href: "#/sessions", text: "Back to sessions" }),
          ),
        );
        stop();
        return;
      }
      replace(facts, errorBox(err, "Could not load the session"));
    }
  }

  function renderSession(s) {
    replace(statusSlot, badge(s.status, { testid: "session-status" }));
    const fact = (label, value, opts = {}) =>
      h("div", { class: opts.mono ? "wide" : null }, h("dt", { text: label }), h("dd", { class: opts.mono ? "mono" : null, text: value ?? "—", dataset: opts.testid ? { testid: opts.testid } : {} }));
    const tasks = s.tasks || {};
    replace(
      facts,
      fact("Phase", s.phase || "—", { testid: "session-phase" }),
      fact("Iteration", String(s.iteration ?? 0), { testid: "session-iteration" }),
      fact("Agents", s.agents ? `${s.agents.active} active / ${s.agents.total} run` : "—", { testid: "session-agents" }),
      fact("Cost", formatCost(s.costUsd), { testid: "session-cost" }),
      fact("Tasks", tasks.total ? `${tasks.completed} of ${tasks.total} done${tasks.failed ? `, ${tasks.failed} failed` : ""}` : "—", { testid: "session-task-count" }),
      fact("Provider", s.provider),
      fact("Exit reason", s.exitReason || "—", { testid: "session-exit" }),
      fact("Created", formatTime(s.createdAt)),
      fact("Started", formatTime(s.startedAt)),
      fact("Ended", formatTime(s.endedAt)),
      fact("Project", s.projectDir, { mono: true }),
      fact("PRD", s.prd, { mono: true }),
    );
    buttons.pause.disabled = s.status !== "running";
    buttons.resume.disabled = !["paused", "interrupted"].includes(s.status);
    buttons.stop.disabled = !["starting", "running", "paused", "interrupted"].includes(s.status);
    buttons.delete.disabled = ACTIVE.has(s.status);
    const canInput = ["running", "paused"].includes(s.status);
    inputText.disabled = !canInput;
    inputSubmit.disabled = !canInput;
  }

  function renderTasks(page) {
    if (!page.tasks.length) {
      replace(tasksBody, emptyState("No tasks yet", "Tasks appear once the PRD has been read (the bootstrap phase)."));
      return;
    }
    replace(
      tasksBody,
      dataTable("Tasks of this session", ["Task", "Title", "Status", "Tries"], page.tasks.map((t) =>
        h(
          "tr",
          { dataset: { testid: "task-row", taskId: t.id, status: t.status } },
          h("td", { class: "mono nowrap", text: t.id }),
          h("td", {}, t.title, t.error ? h("div", { class: "muted small", text: t.error }) : null),
          h("td", {}, badge(t.status, { testid: "task-status" })),
          h("td", { class: "num", text: String(t.attempts ?? 0) }),
        ),
      ), { numeric: ["Tries"] }),
    );
  }

  async function command(action) {
    showFormError(commandError, null);
    if (action === "delete" && !window.confirm(`Delete session ${id}? Its tasks and events are removed too.`)) return;
    const control = buttons[action];
    control.disabled = true;
    try {
      if (action === "delete") {
        await del(`/api/sessions/${encodeURIComponent(id)}`);
        toast(`Session ${shortId(id)} deleted.`, "ok");
        ctx.navigate("/sessions");
        return;
      }
      const answer = await post(`/api/sessions/${encodeURIComponent(id)}/${action}`);
      const words = { pause: "Pause", resume: "Resume", stop: "Stop" }[action];
      toast(`${words} requested: the session is ${answer.status}.`, "ok");
      if (answer && answer.status) renderSession({ ...session, ...answer });
      refresh();
    } catch (err) {
      showFormError(commandError, err);
      toast(err.message, "error", `Could not ${action} the session`);
      refresh();
    }
  }

  inputForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const message = inputText.value;
    inputResult.hidden = true;
    if (!message.trim()) {
      inputResult.className = "form-error";
      inputResult.textContent = "Write a message first.";
      inputResult.hidden = false;
      return;
    }
    inputSubmit.disabled = true;
    try {
      await post(`/api/sessions/${encodeURIComponent(id)}/input`, { message });
      inputText.value = "";
      inputResult.className = "form-ok";
      inputResult.textContent = "Input queued: it goes into the next agent prompt.";
    } catch (err) {
      inputResult.className = "form-error";
      inputResult.textContent = err.message;
    } finally {
      inputResult.hidden = false;
      inputSubmit.disabled = !(session && ["running", "paused"].includes(session.status));
    }
  });

  const refresh = throttle(loadSession, 500);

  // -- the log ------------------------------------------------------------------

  /** Events kept (oldest first), each with its DOM line once rendered. */
  let events = [];
  const placeholder = h("p", { class: "log-empty", text: "No events yet. They appear here as the session works." });
  log.append(placeholder);

  function visible(event) {
    const min = LEVELS.indexOf(levelFilter.value);
    if (LEVELS.indexOf(event.level) < min) return false;
    const type = typeFilter.value;
    if (type) {
      if (type.endsWith(".*") ? !event.type.startsWith(type.slice(0, -1)) : event.type !== type) return false;
    }
    const needle = textFilter.value.trim().toLowerCase();
    if (needle && !lineText(event).toLowerCase().includes(needle)) return false;
    return true;
  }

  function lineText(event) {
    if (event._text === undefined) event._text = `${event.type} ${describeEvent(event)}`;
    return event._text;
  }

  function lineFor(event) {
    if (!event._node) {
      const level = LEVELS.includes(event.level) ? event.level : "info";
      event._node = h(
        "div",
        { class: "log-line", dataset: { testid: "log-line", type: event.type, level } },
        h("span", { class: "log-time", text: formatClock(event.timestamp) }),
        h("span", { class: `log-level log-level-${level}`, text: level === "warning" ? "warn" : level }),
        h("span", { class: "log-type", text: event.type, title: event.type }),
        h("span", { class: "log-text", text: describeEvent(event) }),
      );
    }
    return event._node;
  }

  function atBottom() {
    return log.scrollHeight - log.scrollTop - log.clientHeight < 24;
  }

  function addEvents(batch) {
    const follow = atBottom();
    const fragment = document.createDocumentFragment();
    for (const event of batch) {
      events.push(event);
      if (visible(event)) fragment.append(lineFor(event));
    }
    if (events.length > MAX_LOG_LINES) {
      const dropped = events.splice(0, events.length - MAX_LOG_LINES);
      for (const event of dropped) if (event._node) event._node.remove();
    }
    placeholder.remove();
    log.append(fragment);
    if (follow) log.scrollTop = log.scrollHeight;
    if (batch.some((e) => REFRESHING.test(e.type))) refresh();
  }

  function rerender() {
    const fragment = document.createDocumentFragment();
    for (const event of events) if (visible(event)) fragment.append(lineFor(event));
    log.replaceChildren(fragment);
    if (!log.children.length) log.append(h("p", { class: "log-empty", text: events.length ? "No event matches the filters." : placeholder.textContent }));
    log.scrollTop = log.scrollHeight;
  }

  function clearLog() {
    for (const event of events) event._node = undefined;
    events = [];
    rerender();
  }

  levelFilter.addEventListener("change", rerender);
  typeFilter.addEventListener("change", rerender);
  textFilter.addEventListener("input", throttle(rerender, 250));

  const stream = new EventStream({
    query: { sessionId: id, minLevel: "debug", history: HISTORY },
    onEvents: addEvents,
    onStatus: (state, detail) => {
      if (state === "reconnecting") refresh(); // the stream broke: the session may be gone
      if (state === "open") logState.textContent = "live";
      else if (state === "reconnecting") logState.textContent = detail && detail.delay ? `reconnecting in ${Math.ceil(detail.delay / 1000)} s…` : "reconnecting…";
      else if (state === "failed") logState.textContent = `stopped: ${detail ? detail.message : "error"}`;
      else if (state === "connecting") logState.textContent = "connecting…";
    },
  });
  stream.start();
  loadSession();
  // The stream carries every change; a poll covers a missed event (every 5 s
  // while the session is active). A delete sends no event, so a finished
  // session is re-read every 15 s too: a session deleted elsewhere turns
  // into "No such session" instead of staying on the page.
  let ticks = 0;
  const poll = setInterval(() => {
    ticks += 1;
    if (session && (ACTIVE.has(session.status) || ticks % IDLE_POLL_TICKS === 0)) refresh();
  }, 5000);

  function stop() {
    stopped = true;
    stream.stop();
    refresh.cancel();
    clearInterval(poll);
  }
  return stop;
}
