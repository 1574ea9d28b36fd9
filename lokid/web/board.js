/**
 * The Kanban board (#/board, #/board/<projectId>): one project's board tasks
 * in the five columns, moved by drag and drop or from the keyboard (each card
 * has a column picker and up/down buttons), created, edited and deleted in a
 * dialog. Every move is `POST /api/tasks/{id}/move {column, position}`; the
 * server renumbers the columns densely, so the page shows its move at once
 * (optimistic) and then re-reads the board. Changes made elsewhere arrive as
 * `task.*` / `project.*` messages on the WebSocket and re-read the board.
 * @module board
 */

import { ApiError, del, get, post, put } from "./api.js";
import { badge, emptyState, errorBox, field, h, keepFocus, replace, select, throttle, toast } from "./dom.js";
import { live } from "./ws.js";

export const COLUMNS = [
  ["backlog", "Backlog"],
  ["todo", "To do"],
  ["in_progress", "In progress"],
  ["review", "Review"],
  ["done", "Done"],
];
const PRIORITIES = ["low", "medium", "high", "critical"];
const LAST_PROJECT = "lokid.board.project";
const MAX_TASKS = 1000;
/** The largest page `GET /api/projects` gives (its default is 100). */
const MAX_PROJECTS = 1000;

/** Mount the board view. */
export function mount(root, params) {
  let stopped = false;
  let projects = [];
  let projectsCut = false; // a full page: there may be more active projects than listed
  let projectId = params.projectId || null;
  let tasks = [];
  let total = 0;
  let draggingId = null;

  const projectSelect = h("select", { dataset: { testid: "project-select" }, onchange: () => chooseProject(projectSelect.value) });
  const newProject = h("button", { type: "button", class: "button", text: "New project", dataset: { testid: "new-project" }, onclick: () => projectDialog() });
  const addCard = h("button", { type: "button", class: "button button-primary", text: "Add card", dataset: { testid: "add-card" }, onclick: () => cardDialog(null) });
  const deleteProject = h("button", { type: "button", class: "button button-danger", text: "Delete project", dataset: { testid: "delete-project" }, onclick: () => removeProject() });
  const subtitle = h("p", { class: "subtitle", "aria-live": "polite", dataset: { testid: "board-subtitle" } });
  const content = h("div", { dataset: { testid: "board-content" } }, h("p", { class: "loading", text: "Loading projects…" }));
  const status = h("p", { class: "visually-hidden", role: "status", "aria-live": "polite" });

  replace(
    root,
    h(
      "div",
      { class: "page-head" },
      h("div", {}, h("h1", { text: "Board" }), subtitle),
      h("div", { class: "board-bar" }, field("Project", projectSelect), newProject, addCard, deleteProject),
    ),
    status,
    content,
  );

  // -- loading ---------------------------------------------------------------------

  async function loadProjects() {
    try {
      // local until complete: two loads at once (a WebSocket message) must not mix
      const page = await get("/api/projects", { status: "active", limit: MAX_PROJECTS });
      const cut = page.length >= MAX_PROJECTS;
      if (cut && projectId && !page.some((p) => p.id === projectId)) {
        // the project this address names is older than the page: fetch it alone
        const named = await get(`/api/projects/${encodeURIComponent(projectId)}`).catch(() => null);
        if (named && named.status === "active") page.push(named);
      }
      projects = page;
      projectsCut = cut;
    } catch (err) {
      if (!stopped) replace(content, errorBox(err, "Could not load the projects"));
      return;
    }
    if (stopped) return;
    if (!projects.some((p) => p.id === projectId)) {
      const remembered = sessionStorage.getItem(LAST_PROJECT);
      projectId = projects.some((p) => p.id === remembered) ? remembered : projects[0] ? projects[0].id : null;
      if (projectId) history.replaceState(null, "", `#/board/${encodeURIComponent(projectId)}`);
    }
    replace(projectSelect, projects.map((p) => h("option", { value: p.id, text: p.name, selected: p.id === projectId })));
    projectSelect.disabled = !projects.length;
    addCard.disabled = !projectId;
    deleteProject.disabled = !projectId;
    if (!projectId) {
      subtitle.textContent = "No projects";
      replace(
        content,
        emptyState(
          "No projects yet",
          "A project holds a Kanban board of tasks (backlog, to do, in progress, review, done). Create one to start.",
          h("button", { type: "button", class: "button button-primary", text: "Create a project", onclick: () => projectDialog() }),
        ),
      );
      return;
    }
    sessionStorage.setItem(LAST_PROJECT, projectId);
    await loadTasks();
  }

  async function loadTasks() {
    if (!projectId) return;
    const asked = projectId;
    try {
      const page = await get("/api/tasks", { project_id: asked, limit: MAX_TASKS });
      if (stopped || asked !== projectId) return;
      tasks = page.tasks;
      total = page.total;
      render();
    } catch (err) {
      if (stopped) return;
      if (err instanceof ApiError && err.status === 404) {
        projectId = null;
        loadProjects();
        return;
      }
      replace(content, errorBox(err, "Could not load the board"));
    }
  }

  function chooseProject(id) {
    projectId = id;
    sessionStorage.setItem(LAST_PROJECT, id);
    history.replaceState(null, "", `#/board/${encodeURIComponent(id)}`);
    tasks = [];
    loadTasks();
  }

  // -- rendering -------------------------------------------------------------------

  function render() {
    const project = projects.find((p) => p.id === projectId);
    subtitle.textContent = `${project ? project.name : ""} · ${total} card${total === 1 ? "" : "s"}${total > tasks.length ? ` (showing the first ${tasks.length})` : ""}${projectsCut ? ` · the newest ${MAX_PROJECTS} projects are listed` : ""}`;
    keepFocus(content, () => {
      const board = h("div", { class: "board", dataset: { testid: "board" } }, COLUMNS.map(([column, label]) => renderColumn(column, label)));
      replace(
        content,
        tasks.length
          ? null
          : h("p", { class: "muted panel-gap", dataset: { testid: "board-empty" }, text: "This board has no cards yet. Use “Add card” to create the first one." }),
        board,
      );
    });
  }

  function inColumn(column) {
    return tasks.filter((t) => t.column === column).sort((a, b) => a.position - b.position);
  }

  function renderColumn(column, label) {
    const cards = inColumn(column);
    const headingId = `col-${column}`;
    const list = h(
      "ul",
      { class: "card-list", "aria-labelledby": headingId, dataset: { testid: `column-${column}`, column } },
      cards.length ? cards.map((t, i) => renderCard(t, i, cards.length)) : h("li", { class: "column-empty", text: "No cards" }),
    );
    list.addEventListener("dragover", (event) => dragOver(event, list));
    list.addEventListener("dragleave", (event) => {
      if (!list.contains(event.relatedTarget)) clearDropMarks();
    });
    list.addEventListener("drop", (event) => drop(event, list));
    return h(
      "section",
      { class: "column", "aria-labelledby": headingId },
      h("div", { class: "column-head" }, h("h2", { id: headingId, text: label }), h("span", { class: "column-count", "aria-label": `${cards.length} cards`, text: String(cards.length) })),
      list,
    );
  }

  function renderCard(task, index, count) {
    const name = `“${task.title}”`;
    const mover = select(
      COLUMNS.map(([value, label]) => [value, label]),
      {
        value: task.column,
        "aria-label": `Column of ${name}`,
        dataset: { testid: "card-column", focusKey: `${task.id}:column` },
        onchange: () => move(task.id, mover.value, Number.MAX_SAFE_INTEGER),
      },
    );
    const card = h(
      "li",
      {
        class: "card",
        draggable: true,
        dataset: { testid: "card", taskId: task.id, column: task.column, position: String(task.position) },
        "aria-label": `${task.title}, ${task.priority} priority`,
      },
      h("div", { class: "card-title", text: task.title, dataset: { testid: "card-title" } }),
      task.description ? h("div", { class: "card-desc", text: task.description.length > 160 ? `${task.description.slice(0, 159)}…` : task.description }) : null,
      h(
        "div",
        { class: "card-meta" },
        h("span", { class: `badge badge-plain prio-${task.priority}`, text: task.priority }),
        task.status === "failed" ? badge("failed") : null,
      ),
      h(
        "div",
        { class: "card-tools" },
        mover,
        h("button", {
          type: "button",
          class: "button button-small button-icon",
          text: "↑",
          "aria-label": `Move ${name} up`,
          disabled: index === 0,
          dataset: { testid: "card-up", focusKey: `${task.id}:up` },
          onclick: () => move(task.id, task.column, index - 1),
        }),
        h("button", {
          type: "button",
          class: "button button-small button-icon",
          text: "↓",
          "aria-label": `Move ${name} down`,
          disabled: index === count - 1,
          dataset: { testid: "card-down", focusKey: `${task.id}:down` },
          onclick: () => move(task.id, task.column, index + 1),
        }),
        h("button", {
          type: "button",
          class: "button button-small",
          text: "Edit",
          "aria-label": `Edit ${name}`,
          dataset: { testid: "card-edit", focusKey: `${task.id}:edit` },
          onclick: () => cardDialog(task),
        }),
        h("button", {
          type: "button",
          class: "button button-small button-danger",
          text: "Delete",
          "aria-label": `Delete ${name}`,
          dataset: { testid: "card-delete" },
          onclick: () => removeCard(task),
        }),
      ),
    );
    card.addEventListener("dragstart", (event) => {
      draggingId = task.id;
      event.dataTransfer.effectAllowed = "move";
      event.dataTransfer.setData("text/plain", task.id);
      card.classList.add("dragging");
    });
    card.addEventListener("dragend", () => {
      draggingId = null;
      card.classList.remove("dragging");
      clearDropMarks();
    });
    return card;
  }

  // -- drag and drop ----------------------------------------------------------------

  /** Where a drop at `y` lands in `list`: the index among the other cards. */
  function dropIndex(list, y) {
    const others = [...list.querySelectorAll(".card")].filter((c) => c.dataset.taskId !== draggingId);
    let index = 0;
    for (const card of others) {
      const rect = card.getBoundingClientRect();
      if (y > rect.top + rect.height / 2) index += 1;
    }
    return { index, others };
  }

  function clearDropMarks() {
    for (const el of content.querySelectorAll(".drop-target, .drop-before, .drop-after")) {
      el.classList.remove("drop-target", "drop-before", "drop-after");
    }
  }

  function dragOver(event, list) {
    if (!draggingId) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = "move";
    const { index, others } = dropIndex(list, event.clientY);
    clearDropMarks();
    list.classList.add("drop-target");
    if (others.length) {
      if (index < others.length) others[index].classList.add("drop-before");
      else others[others.length - 1].classList.add("drop-after");
    }
  }

  function drop(event, list) {
    event.preventDefault();
    const id = draggingId || event.dataTransfer.getData("text/plain");
    const { index } = dropIndex(list, event.clientY);
    clearDropMarks();
    draggingId = null;
    if (id) move(id, list.dataset.column, index);
  }

  // -- changes -----------------------------------------------------------------------

  /**
   * Move a card: show it at once, then ask the server; the server's numbering
   * wins (the board is re-read after the answer, and by the WebSocket message).
   */
  async function move(id, column, position) {
    const task = tasks.find((t) => t.id === id);
    if (!task) return;
    const target = inColumn(column).filter((t) => t.id !== id);
    const at = Math.max(0, Math.min(position, target.length));
    if (task.column === column && inColumn(column).indexOf(task) === at) return;
    // optimistic: renumber both columns locally
    const source = inColumn(task.column).filter((t) => t.id !== id);
    source.forEach((t, i) => (t.position = i));
    target.splice(at, 0, task);
    task.column = column;
    target.forEach((t, i) => (t.position = i));
    render();
    const label = COLUMNS.find(([c]) => c === column)[1];
    status.textContent = `Moved “${task.title}” to ${label}, position ${at + 1}.`;
    try {
      await post(`/api/tasks/${encodeURIComponent(id)}/move`, { column, position: at });
    } catch (err) {
      toast(err.message, "error", "Could not move the card");
    }
    reloadTasks();
  }

  async function removeCard(task) {
    if (!window.confirm(`Delete the card “${task.title}”?`)) return;
    try {
      await del(`/api/tasks/${encodeURIComponent(task.id)}`);
      tasks = tasks.filter((t) => t.id !== task.id);
      render();
      status.textContent = `Deleted “${task.title}”.`;
    } catch (err) {
      toast(err.message, "error", "Could not delete the card");
    }
    reloadTasks();
  }

  async function removeProject() {
    const project = projects.find((p) => p.id === projectId);
    if (!project || !window.confirm(`Delete the project “${project.name}” and all its cards?`)) return;
    try {
      await del(`/api/projects/${encodeURIComponent(project.id)}`);
      toast(`Project “${project.name}” deleted.`, "ok");
      projectId = null;
      sessionStorage.removeItem(LAST_PROJECT);
      history.replaceState(null, "", "#/board");
      loadProjects();
    } catch (err) {
      toast(err.message, "error", "Could not delete the project");
    }
  }

  /** The dialog that creates a project. */
  function projectDialog() {
    const name = h("input", { type: "text", required: true, maxlength: "200", dataset: { testid: "project-name" } });
    const path = h("input", { type: "text", placeholder: "/home/me/app (optional)", spellcheck: "false" });
    const description = h("textarea", { maxlength: "10000" });
    openDialog({
      title: "New project",
      testid: "project-dialog",
      fields: { name: field("Name", name), path: field("Folder", path, "Optional: an existing folder."), description: field("Description", description) },
      controls: { name, path, description },
      submitLabel: "Create project",
      async onSubmit() {
        const body = { name: name.value };
        if (path.value.trim()) body.path = path.value.trim();
        if (description.value) body.description = description.value;
        const project = await post("/api/projects", body);
        toast(`Project “${project.name}” created.`, "ok");
        projectId = project.id;
        sessionStorage.setItem(LAST_PROJECT, project.id);
        history.replaceState(null, "", `#/board/${encodeURIComponent(project.id)}`);
        await loadProjects();
      },
    });
  }

  /** The dialog that creates (task = null) or edits a card. */
  function cardDialog(task) {
    if (!projectId) return;
    const title = h("input", { type: "text", required: true, maxlength: "500", value: task ? task.title : "", dataset: { testid: "card-title-input" } });
    const description = h("textarea", { maxlength: "10000", value: task ? task.description : "", dataset: { testid: "card-description-input" } });
    const priority = select(PRIORITIES, { value: task ? task.priority : "medium", dataset: { testid: "card-priority-input" } });
    const column = select(COLUMNS, { value: task ? task.column : "backlog", dataset: { testid: "card-column-input" } });
    const fields = { title: field("Title", title), description: field("Description", description), priority: field("Priority", priority) };
    const controls = { title, description, priority };
    if (!task) {
      fields.column = field("Column", column);
      controls.column = column;
    }
    openDialog({
      title: task ? "Edit card" : "New card",
      testid: "card-dialog",
      fields,
      controls,
      submitLabel: task ? "Save" : "Add card",
      async onSubmit() {
        if (task) {
          await put(`/api/tasks/${encodeURIComponent(task.id)}`, { title: title.value, description: description.value, priority: priority.value });
          status.textContent = `Saved “${title.value}”.`;
        } else {
          await post("/api/tasks", { project_id: projectId, title: title.value, description: description.value, priority: priority.value, column: column.value });
          status.textContent = `Added “${title.value}”.`;
        }
        await loadTasks();
      },
    });
  }

  const reloadTasks = throttle(() => loadTasks(), 250);
  const reloadProjects = throttle(() => loadProjects(), 250);
  const unsubscribe = live.subscribe(["task.*", "project.*"], (message) => {
    if (message.type.startsWith("project.")) reloadProjects();
    else if (message.data && message.data.project_id === projectId) reloadTasks();
  });
  let wasOpen = live.state === "open";
  const unwatch = live.onStatus((state) => {
    if (state === "open" && !wasOpen) reloadProjects(); // back after a break: re-read what we may have missed
    wasOpen = state === "open";
  });
  loadProjects();

  return () => {
    stopped = true;
    unsubscribe();
    unwatch();
    reloadTasks.cancel();
    reloadProjects.cancel();
    for (const dialog of document.querySelectorAll("dialog.view-dialog")) dialog.remove();
  };
}

/**
 * A modal form dialog (native <dialog>: focus stays inside, Esc closes).
 * `onSubmit` may throw an ApiError: its message is shown in the dialog and
 * the field it names is marked.
 */
export function openDialog({ title, testid, fields, controls, submitLabel, onSubmit }) {
  const error = h("p", { class: "form-error", role: "alert", hidden: true, dataset: { testid: `${testid}-error` } });
  const submit = h("button", { type: "submit", class: "button button-primary", text: submitLabel, dataset: { testid: `${testid}-submit` } });
  const cancel = h("button", { type: "button", class: "button", text: "Cancel", onclick: () => dialog.close() });
  const headingId = `${testid}-title`;
  const form = h(
    "form",
    { class: "stack", novalidate: true },
    h("h2", { id: headingId, text: title }),
    Object.values(fields),
    error,
    h("div", { class: "actions" }, cancel, submit),
  );
  const dialog = h("dialog", { class: "dialog view-dialog", "aria-labelledby": headingId, dataset: { testid } }, form);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.hidden = true;
    for (const control of Object.values(controls)) control.removeAttribute("aria-invalid");
    submit.disabled = true;
    try {
      await onSubmit();
      dialog.close();
    } catch (err) {
      error.textContent = err.message;
      error.hidden = false;
      const control = err instanceof ApiError && err.field ? controls[err.field] : null;
      if (control) {
        control.setAttribute("aria-invalid", "true");
        control.focus();
      }
    } finally {
      submit.disabled = false;
    }
  });
  dialog.addEventListener("close", () => dialog.remove());
  document.body.append(dialog);
  dialog.showModal();
  const first = Object.values(controls)[0];
  if (first) first.focus();
  return dialog;
}
