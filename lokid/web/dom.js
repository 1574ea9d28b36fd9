/**
 * Small DOM helpers shared by every view: element creation without innerHTML
 * (so nothing from the API is ever parsed as markup), formatting, status
 * badges, empty states, error boxes and toasts.
 * @module dom
 */

let nextId = 0;

/** A page-unique id for label/control pairs. */
export function uid(prefix = "f") {
  nextId += 1;
  return `${prefix}-${nextId}`;
}

const PROPERTIES = new Set(["value", "checked", "disabled", "hidden", "selected", "open", "draggable"]);

/**
 * Create an element.
 * `props`: `class`, `text`, `dataset` ({key: value}), `on<event>` (listeners),
 * DOM properties (value, checked, disabled, hidden, selected, draggable) and any
 * other attribute (`aria-*`, `role`, `for`, ...). `null`, `undefined` and `false`
 * are left out. Children: nodes, strings, arrays, or nothing (null/false).
 * @param {string} tag
 * @param {Record<string, any>} [props]
 * @param {...any} children
 * @returns {HTMLElement}
 */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "text") el.textContent = String(value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2).toLowerCase(), value);
    } else if (PROPERTIES.has(key)) el[key] = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

/** Append nodes, strings or (nested) arrays of them; null and false are skipped. */
export function append(parent, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(parent, child);
    else parent.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return parent;
}

/** Replace every child of `parent`. */
export function replace(parent, ...children) {
  parent.replaceChildren();
  return append(parent, children);
}

/**
 * A labelled form field: `<div class=field><label for=id>…</label>control hint</div>`.
 * The control gets a generated id when it has none.
 */
export function field(labelText, control, hint) {
  if (!control.id) control.id = uid("field");
  const parts = [h("label", { for: control.id, text: labelText }), control];
  if (hint) {
    const hintEl = h("span", { class: "hint", id: `${control.id}-hint`, text: hint });
    control.setAttribute("aria-describedby", hintEl.id);
    parts.push(hintEl);
  }
  return h("div", { class: "field" }, parts);
}

/**
 * The number typed in an `<input type=number>`: `undefined` when the field is
 * empty, else the number. Text the browser cannot read as a number ("1e",
 * "7-") reaches a script as `value === ""` with `validity.badInput` set; it
 * must not pass for an empty field (the option would be silently left out),
 * so it throws a `FieldError` naming the field, as does a number too large
 * for JavaScript ("1e400").
 * @param {HTMLInputElement} control
 * @param {string} label the field's label, for the message
 */
export function numberValue(control, label) {
  if (control.validity && control.validity.badInput) throw new FieldError(control, `${label} must be a number.`);
  const text = control.value.trim();
  if (text === "") return undefined;
  const value = Number(text);
  if (!Number.isFinite(value)) throw new FieldError(control, `${label} must be a number.`);
  return value;
}

/** A form field the page itself refuses (before anything is sent). */
export class FieldError extends Error {
  constructor(control, message) {
    super(message);
    this.name = "FieldError";
    this.control = control;
  }
}

/**
 * Mark `control` invalid (`aria-invalid`) with `message` written under it and
 * tied to it by `aria-describedby`, so the field itself says what is wrong.
 */
export function markInvalid(control, message) {
  control.setAttribute("aria-invalid", "true");
  if (!message) return;
  const holder = control.closest(".field") || control.parentElement;
  let note = holder.querySelector(".field-error");
  if (!note) {
    if (!control.id) control.id = uid("field");
    note = h("span", { class: "field-error", id: `${control.id}-error`, dataset: { testid: "field-error" } });
    holder.append(note);
    const described = control.getAttribute("aria-describedby");
    control.setAttribute("aria-describedby", described ? `${described} ${note.id}` : note.id);
  }
  note.textContent = message;
}

/** Undo every `markInvalid` inside `form`. */
export function clearInvalid(form) {
  for (const control of form.querySelectorAll("[aria-invalid]")) control.removeAttribute("aria-invalid");
  for (const note of form.querySelectorAll(".field-error")) {
    const control = form.querySelector(`[aria-describedby~="${CSS.escape(note.id)}"]`);
    if (control) {
      const rest = control.getAttribute("aria-describedby").split(" ").filter((id) => id !== note.id);
      if (rest.length) control.setAttribute("aria-describedby", rest.join(" "));
      else control.removeAttribute("aria-describedby");
    }
    note.remove();
  }
}

/** A checkbox with its label on the right. */
export function checkbox(labelText, props = {}) {
  const input = h("input", { type: "checkbox", id: uid("check"), ...props });
  return { input, el: h("div", { class: "field-inline" }, input, h("label", { for: input.id, text: labelText })) };
}

/** `<select>` with options [[value, label], ...] or plain values. */
export function select(options, props = {}) {
  const el = h("select", props);
  for (const option of options) {
    const [value, label] = Array.isArray(option) ? option : [option, option];
    el.append(h("option", { value, text: label, selected: String(props.value ?? "") === String(value) }));
  }
  if (props.value !== undefined) el.value = props.value;
  return el;
}

// -- formatting -------------------------------------------------------------------

const pad = (n) => String(n).padStart(2, "0");

/** `2026-11-28 12:00:03` in local time, or an em dash. */
export function formatTime(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

/** `12:00:03` in local time. */
export function formatClock(iso) {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return "";
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

/** "3 min ago" style age, for lists. */
export function formatAge(iso) {
  if (!iso) return "—";
  const seconds = Math.round((Date.now() - new Date(iso).getTime()) / 1000);
  if (!Number.isFinite(seconds)) return "—";
  if (seconds < 45) return "just now";
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.round(seconds / 3600)} h ago`;
  return `${Math.round(seconds / 86400)} d ago`;
}

/** `$0.0246`; small costs keep four decimals. */
export function formatCost(usd) {
  if (usd === null || usd === undefined) return "—";
  const value = Number(usd);
  return value >= 100 ? `$${value.toFixed(2)}` : `$${value.toFixed(4)}`;
}

export function formatBytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = Number(n);
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit ? 1 : 0)} ${units[unit]}`;
}

// -- badges -----------------------------------------------------------------------

const TONES = {
  starting: "indigo",
  running: "blue",
  paused: "amber",
  stopping: "orange",
  stopped: "gray",
  completed: "green",
  failed: "red",
  interrupted: "purple",
  pending: "gray",
  active: "blue",
  ok: "green",
  healthy: "green",
  degraded: "amber",
  missing: "red",
  unreadable: "orange",
  revoked: "red",
  expired: "amber",
  valid: "green",
  invalid: "red",
};

/** A status badge: a coloured dot plus the status word (never colour alone). */
export function badge(status, { testid, label } = {}) {
  const tone = TONES[status] || "gray";
  return h("span", {
    class: `badge tone-${tone}`,
    text: label ?? status,
    dataset: { status, ...(testid ? { testid } : {}) },
  });
}

/**
 * A data table in its scrolling wrapper: a caption for screen readers, one row of
 * column headings (those named in `numeric` right-aligned), then `rows` (`<tr>`s).
 */
export function dataTable(caption, headings, rows, { numeric = [] } = {}) {
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      { class: "data" },
      h("caption", { class: "visually-hidden", text: caption }),
      h("thead", {}, h("tr", {}, headings.map((t) => h("th", { scope: "col", class: numeric.includes(t) ? "num" : null, text: t })))),
      h("tbody", {}, rows),
    ),
  );
}

// -- empty states, errors, toasts ---------------------------------------------------

/** A clear empty state: what is missing and what to do about it. */
export function emptyState(title, text, ...actions) {
  return h(
    "div",
    { class: "empty", dataset: { testid: "empty-state" } },
    h("h3", { text: title }),
    text ? h("p", { text }) : null,
    actions.length ? h("div", { class: "actions" }, actions) : null,
  );
}

/** An error box for a view that could not load: the API's message, in words. */
export function errorBox(error, title = "Could not load this view") {
  return h(
    "div",
    { class: "error-box", role: "alert", dataset: { testid: "view-error" } },
    h("h3", { text: title }),
    h("p", { text: error?.message || String(error) }),
  );
}

/** Show an error message inside a form (or hide it with `null`). */
export function showFormError(el, error) {
  if (!error) {
    el.hidden = true;
    el.textContent = "";
    return;
  }
  el.textContent = error.message || String(error);
  el.hidden = false;
}

/**
 * A toast in the notification region (aria-live). Errors stay until dismissed;
 * other toasts go away after a few seconds. At most 5 are shown.
 * @param {string} message
 * @param {"info"|"ok"|"error"} [kind]
 * @param {string} [title]
 */
export function toast(message, kind = "info", title) {
  const region = document.getElementById("toasts");
  if (!region) return;
  const item = h(
    "div",
    { class: `toast toast-${kind}`, role: kind === "error" ? "alert" : "status", dataset: { testid: `toast-${kind}` } },
    h("p", {}, title ? h("strong", { text: title }) : null, message),
    h("button", {
      type: "button",
      class: "button button-small button-quiet",
      "aria-label": "Dismiss notification",
      text: "✕",
      onclick: () => item.remove(),
    }),
  );
  region.append(item);
  while (region.children.length > 5) region.firstElementChild.remove();
  if (kind !== "error") setTimeout(() => item.remove(), 6000);
}

/**
 * Run `fn` at most once per `ms`, trailing: calls during the wait coalesce
 * into one more call at its end. Used to turn bursts of live messages into
 * one refresh.
 */
export function throttle(fn, ms) {
  let timer = null;
  let again = false;
  const run = () => {
    timer = null;
    if (again) {
      again = false;
      fn();
      timer = setTimeout(run, ms);
    }
  };
  const wrapped = () => {
    if (timer) {
      again = true;
      return;
    }
    fn();
    timer = setTimeout(run, ms);
  };
  wrapped.cancel = () => {
    clearTimeout(timer);
    timer = null;
    again = false;
  };
  return wrapped;
}

/**
 * Remember which control has the focus (by its `data-focus-key`, e.g.
 * "task-1:down") across a re-render of `root`, and put the focus back on the
 * control with the same key; if that one is disabled now (a card moved to the
 * bottom cannot move down), on the first enabled control of the same item
 * ("task-1:…").
 */
export function keepFocus(root, render) {
  const active = document.activeElement;
  const key = active && root.contains(active) ? active.dataset.focusKey : undefined;
  render();
  if (!key) return;
  let again = root.querySelector(`[data-focus-key="${CSS.escape(key)}"]`);
  if (!again || again.disabled) {
    const item = key.slice(0, key.lastIndexOf(":") + 1);
    again = [...root.querySelectorAll("[data-focus-key]")].find((el) => el.dataset.focusKey.startsWith(item) && !el.disabled);
  }
  if (again) again.focus();
}
