/**
 * Every call to the daemon goes through here: same-origin fetch, the bearer
 * token (kept in sessionStorage, never in localStorage or a cookie), and the
 * seed's error body turned into an `ApiError` whose message is the server's
 * own words.
 * @module api
 */

const TOKEN_KEY = "lokid.token";

/** Listeners for "auth-required" (a 401: no token, or the token stopped working). */
export const authEvents = new EventTarget();

/** An answer that is not 2xx, or no answer at all (status 0). */
export class ApiError extends Error {
  /**
   * @param {number} status HTTP status, 0 when the daemon could not be reached
   * @param {string} code the error body's `code` (`NOT_FOUND`, `VALIDATION_ERROR`, …)
   * @param {string} message the error body's `message`, shown to the person as is
   * @param {Record<string, any>} [details] the error body's `details` (`field`, …)
   */
  constructor(status, code, message, details = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.details = details || {};
  }

  /** The request field the server blamed (`details.field`), if any. */
  get field() {
    return typeof this.details.field === "string" ? this.details.field : null;
  }
}

/** The token of this tab, or null. */
export function getToken() {
  try {
    return sessionStorage.getItem(TOKEN_KEY);
  } catch {
    return null;
  }
}

export function setToken(token) {
  sessionStorage.setItem(TOKEN_KEY, token);
}

export function clearToken() {
  sessionStorage.removeItem(TOKEN_KEY);
}

/** Headers every request carries: the token, when there is one. */
export function authHeaders() {
  const token = getToken();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

/** `path?query` with empty values left out. */
export function withQuery(path, query) {
  if (!query) return path;
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(query)) {
    if (value === null || value === undefined || value === "") continue;
    params.set(key, String(value));
  }
  const text = params.toString();
  return text ? `${path}?${text}` : path;
}

/**
 * Turn a non-2xx response into an ApiError with the server's message. A body
 * that is not the seed's error shape still gives a readable message.
 * @param {Response} response
 */
export async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  const error = body && typeof body === "object" ? body.error : null;
  if (error && typeof error.message === "string") {
    const details = { ...(error.details || {}) };
    if (error.retry_after !== undefined) details.retry_after = error.retry_after;
    return new ApiError(response.status, error.code || "ERROR", error.message, details);
  }
  return new ApiError(
    response.status,
    "HTTP_ERROR",
    `The daemon answered ${response.status} ${response.statusText || ""}`.trim(),
  );
}

/**
 * Call the API. Resolves with the parsed JSON (null for 204), rejects with an
 * ApiError. A 401 also fires "auth-required" so the page can ask for a token.
 * @param {string} path e.g. "/api/sessions"
 * @param {{method?: string, body?: any, query?: Record<string, any>, signal?: AbortSignal, headers?: Record<string,string>}} [options]
 */
export async function api(path, { method = "GET", body, query, signal, headers = {} } = {}) {
  const init = {
    method,
    headers: { Accept: "application/json", ...authHeaders(), ...headers },
    signal,
    cache: "no-store",
  };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(withQuery(path, query), init);
  } catch (err) {
    if (err && err.name === "AbortError") throw err;
    throw new ApiError(0, "NETWORK", "Cannot reach the lokid daemon (is it running?)");
  }
  if (!response.ok) {
    const error = await errorFrom(response);
    if (response.status === 401) authEvents.dispatchEvent(new CustomEvent("auth-required", { detail: error }));
    throw error;
  }
  if (response.status === 204) return null;
  const text = await response.text();
  return text ? JSON.parse(text) : null;
}

/** Shorthands. */
export const get = (path, query, options = {}) => api(path, { ...options, query });
export const post = (path, body, options = {}) => api(path, { ...options, method: "POST", body });
export const put = (path, body, options = {}) => api(path, { ...options, method: "PUT", body });
export const del = (path, options = {}) => api(path, { ...options, method: "DELETE" });

/** A 403 (the token lacks the scope) as opposed to any other failure. */
export function isForbidden(error) {
  return error instanceof ApiError && error.status === 403;
}
