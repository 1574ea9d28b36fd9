"""Registry routes of the Dashboard API (seed "Registry Endpoints"; DESIGN.md §7).

Every view parses and checks its input, then asks the registry scanner
(`lokid.actors.registry_scanner`); no view touches the file system or the
store itself. Reads need `read`, changes `write`. Query values that cannot
be used are 400 naming the parameter, body fields 422 naming the field
(DESIGN.md §4); an empty value is one of them (`status=`, `project_id=`,
`project_id=a,,b`: never "no filter"), and a repeated key counts with its
last value, as on every route (docs/http.md). File-system trouble (an
unreadable folder, a malformed queue file, a folder deleted during the
scan, a symlink loop) is never an error status: it is listed in the
answer's `errors` (`{"path", "kind", "message"}`) or shows in an entry's
`status`.

`GET /api/registry/discover?register=true` changes the registry although
it is a GET: the view demands `write` of the caller before registering
(`Gate.demand`, a recorded 403 otherwise) and records the change in the
audit log (`registry.discover`, `details.registered`) before it answers.

The hot reads (`/projects`, `/discover`, `/tasks`, `/learnings`) are lean
routes (answered before Quart); the rest are Quart views. Lists answer
`{"<items>": [...], "total", "limit", "offset"}` with the items first, plus
`errors` where file-system problems can occur. `/discover` is not paged:
it is one walk, capped at `MAX_DISCOVER_RESULTS` projects (`truncated`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import trio
from quart import request

from lokid import idempotency
from lokid import registry as fs
from lokid.actors.registry_scanner import (
    ENTRY_STATUSES,
    MAX_NAME_CHARS,
    RegistryScanner,
)
from lokid.errors import InvalidQuery, ValidationFailed
from lokid.http.enterprise import NAME_FORBIDDEN
from lokid.http.gate import Gate
from lokid.http.surface import (
    BOOLEAN_PARAM,
    IDEMPOTENCY_KEY,
    SPACE,
    LeanResponse,
    Link,
    Param,
    Scope,
    Surface,
    bool_param,
    idempotency_key,
    int_param,
    json_body,
    json_response,
    query_params,
    stripped_text,
    words,
)

REGISTER_ROUTE = "POST /api/registry/projects"
DISCOVER_ACTION = "registry.discover"  # `?register=true`, admitted or refused alike
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_OFFSET = 1_000_000
MAX_QUERY_CHARS = 200
MAX_PROJECT_IDS = 1000

STATUS_FILTER = {
    "pending": "pending",
    "active": "active",
    "in_progress": "active",
    "in-progress": "active",
    "completed": "completed",
    "failed": "failed",
}
"""`status` of `GET /api/registry/tasks`: lokid's words, and the reference's `in_progress`."""

HEALTH_STATUSES = ("healthy", "degraded", "missing", "unreadable")
"""`lokid.registry.health`'s overall status."""

# -- OpenAPI ------------------------------------------------------------------------------

_COUNTS = {
    "type": "object",
    "properties": {k: {"type": "integer"} for k in (*fs.TASK_STATUSES, "total")},
}
ENTRY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": [
        "id",
        "name",
        "path",
        "status",
        "has_loki",
        "registered_at",
        "last_seen",
        "tasks",
    ],
    "properties": {
        "id": {"type": "string", "pattern": "^reg-[0-9a-f]{12}$"},
        "name": {"type": "string"},
        "path": {"type": "string", "description": "the real path"},
        "status": {
            "type": "string",
            "enum": list(ENTRY_STATUSES),
            "description": "unreadable: the folder, .loki or .loki/queue cannot be read; "
            "has_loki, tasks and last_seen are kept from the last time it could",
        },
        "has_loki": {"type": "boolean"},
        "registered_at": {"type": "string", "format": "date-time"},
        "last_seen": {"type": ["string", "null"], "format": "date-time"},
        "tasks": _COUNTS,
    },
}
_PROBLEMS = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {
            "path": {"type": "string"},
            "kind": {"type": "string"},
            "message": {"type": "string"},
        },
    },
}
REGISTER_BODY_NAME: dict[str, Any] = {
    **stripped_text(MAX_NAME_CHARS, NAME_FORBIDDEN),
    "type": ["string", "null"],
    "description": "default: the folder's name (control characters shown as U+FFFD); "
    "surrounding white space is dropped",
}
REGISTER_BODY = {
    "type": "object",
    "required": ["path"],
    "additionalProperties": False,
    "properties": {
        "path": {
            "type": "string",
            # stripped: at most MAX_PATH_CHARS characters, no NUL, starting with / or ~
            "pattern": f"^[{SPACE}]*[/~](?:[^\\x00]{{0,{fs.MAX_PATH_CHARS - 2}}}"
            f"[^{SPACE}\\x00])?[{SPACE}]*$",
            "description": "an existing folder (else 422): absolute or ~; stored as its real "
            "path; surrounding white space is dropped",
        },
        "name": REGISTER_BODY_NAME,
    },
}
PAGE_PARAMS = (
    Param(
        "limit",
        "query",
        {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT},
    ),
    Param("offset", "query", {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET}),
)
IDEMPOTENCY = Param(
    idempotency.HEADER,
    "header",
    IDEMPOTENCY_KEY,
    description="the same key and body within 24 h: the first answer",
)
ROOT = {
    "type": "string",
    "maxLength": fs.MAX_PATH_CHARS,
    "pattern": f"^[{SPACE}]*[/~][^\\x00,]*$",
}
"""One root of `roots`: absolute or ~ once stripped (an empty one is refused); a ~user
must name a user with a home folder (else 400)."""
LEARNING_WORDS = sorted(
    {w for t in fs.LEARNING_TYPES for w in (t, t[:-1], t[:-2]) if fs.learning_type(w) == t}
)
"""What `type` of `/api/registry/learnings` takes (`lokid.registry.learning_type`)."""
ID = "$response.body#/id"
ENTRY_LINKS: dict[str, Link] = {
    "GetEntry": ("GET", "/api/registry/projects/{id}", {"id": ID}),
    "EntryHealth": ("GET", "/api/registry/projects/{id}/health", {"id": ID}),
    "EntryTasks": ("GET", "/api/registry/tasks", {"project_id": ID}),
    "UnregisterEntry": ("DELETE", "/api/registry/projects/{id}", {"id": ID}),
}

PROJECTS_PARAMS = (
    Param("status", "query", {"type": "string", "enum": list(ENTRY_STATUSES)}),
    *PAGE_PARAMS,
)

DISCOVER_PARAMS = (
    Param(
        "roots",
        "query",
        {"type": "array", "minItems": 1, "maxItems": fs.MAX_ROOTS, "items": ROOT},
        explode=False,
        description="comma list of absolute or ~ paths (a repeated roots: the last one "
        "counts); default: config",
    ),
    Param(
        "depth",
        "query",
        {"type": "integer", "minimum": fs.MIN_DEPTH, "maximum": fs.MAX_DEPTH},
        description=f"folders below a root (default {fs.DEFAULT_DEPTH})",
    ),
    Param(
        "max_depth",
        "query",
        {"type": "integer", "minimum": fs.MIN_DEPTH, "maximum": fs.MAX_DEPTH},
        description="another name of depth (depth wins)",
    ),
    Param("register", "query", BOOLEAN_PARAM, description="register what is new"),
)

TASKS_PARAMS = (
    Param(
        "project_id",
        "query",
        {
            "type": "array",
            "minItems": 1,
            "maxItems": MAX_PROJECT_IDS,
            "items": {"type": "string", "pattern": f"^[{SPACE}]*[^,{SPACE}][^,]*$"},
        },
        explode=False,
        description="comma list of reg- ids (a repeated project_id: the last one counts); "
        "an unknown one is 404",
    ),
    Param(
        "status",
        "query",
        {"type": "string", "enum": list(STATUS_FILTER)},
        description="in_progress is active",
    ),
    *PAGE_PARAMS,
)

LEARNINGS_PARAMS = (
    Param(
        "type",
        "query",
        words(*LEARNING_WORDS),
        description="patterns, mistakes or successes (any case, or singular)",
    ),
    Param(
        "q",
        "query",
        {"type": "string", "maxLength": MAX_QUERY_CHARS},
        description="text in description, category or project (empty: every entry holds it)",
    ),
    *PAGE_PARAMS,
)


def install_registry(surface: Surface, scanner: RegistryScanner, gate: Gate) -> None:
    """Declare the registry routes on `surface` (the Dashboard API)."""
    tags = ("registry",)

    @surface.lean(
        "GET",
        "/api/registry/projects",
        "Registered projects, newest first",
        responses={200: "A page of entries", 400: "Bad query value (details.field)"},
        params=PROJECTS_PARAMS,
        response_schema=_page_schema("projects", ENTRY_SCHEMA),
        tags=tags,
        requires="read",
    )
    async def projects_list(scope: Scope) -> LeanResponse:
        params = query_params(scope)
        status = _choice(params, "status", ENTRY_STATUSES)
        limit, offset = _page(params)
        return json_response(200, await scanner.list_entries(status, limit, offset))

    @surface.route(
        "POST",
        "/api/registry/projects",
        "Register a project folder",
        responses={
            201: "Registered",
            400: "Malformed JSON or Idempotency-Key",
            409: "Already registered (details.id), or the key was used for another body",
            422: "Invalid field (details.field): e.g. the folder does not exist",
        },
        params=(IDEMPOTENCY,),
        request_body=REGISTER_BODY,
        response_schema=ENTRY_SCHEMA,
        links=ENTRY_LINKS,
        tags=tags,
        requires="write",
    )
    async def project_register() -> tuple[dict[str, Any], int, dict[str, str]]:
        key = idempotency_key(request.scope)
        body = await json_body()
        path, name = parse_register_body(body)
        once = idempotency.Once.of(REGISTER_ROUTE, key, body)
        answer = await scanner.register(path, name, idempotent=once)
        return answer, 201, idempotency.replay_headers(answer)

    @surface.route(
        "GET",
        "/api/registry/projects/{id}",
        "One registry entry",
        responses={200: "The entry", 404: "Not registered"},
        response_schema=ENTRY_SCHEMA,
        tags=tags,
        requires="read",
    )
    async def project_get(id: str) -> dict[str, Any]:
        return await scanner.get(id)

    @surface.route(
        "DELETE",
        "/api/registry/projects/{id}",
        "Unregister a project (its files are not touched)",
        responses={204: "Unregistered", 404: "Not registered"},
        tags=tags,
        requires="write",
    )
    async def project_unregister(id: str) -> tuple[str, int]:
        await scanner.unregister(id)
        return "", 204

    @surface.route(
        "GET",
        "/api/registry/projects/{id}/health",
        "Health checks of a registered project",
        responses={
            200: "healthy | degraded | missing | unreadable, with each check",
            404: "Not registered",
        },
        response_schema={
            "type": "object",
            "properties": {
                "status": {"type": "string", "enum": list(HEALTH_STATUSES)},
                "checks": {"type": "object"},
                "problems": {"type": "array", "items": {"type": "string"}},
            },
        },
        tags=tags,
        requires="read",
    )
    async def project_health(id: str) -> dict[str, Any]:
        return await scanner.check_health(id)

    @surface.lean(
        "GET",
        "/api/registry/discover",
        "Find folders holding .loki/ (register=true also registers them: needs write)",
        responses={
            200: "What was found, with registered flags, roots and errors",
            400: "Bad query value (details.field)",
            403: "register=true without the write scope",
        },
        params=DISCOVER_PARAMS,
        response_schema={
            "type": "object",
            "properties": {
                "projects": {"type": "array", "items": {"type": "object"}},
                "total": {"type": "integer"},
                "truncated": {"type": "boolean"},
                "errors": _PROBLEMS,
            },
        },
        tags=tags,
        requires="read",
    )
    async def discover(scope: Scope) -> LeanResponse:
        params = query_params(scope)
        roots = parse_roots(params)
        if roots and any(root.startswith("~") for root in roots):
            await trio.to_thread.run_sync(refuse_unknown_users, roots)
        depth = _depth(params)
        register = bool_param(params, "register", False)
        if register:
            await gate.demand(scope, "write", action=DISCOVER_ACTION)
        answer = await scanner.discover(roots, depth, register=register)
        if register:
            await gate.record(
                scope,
                200,
                action=DISCOVER_ACTION,
                details={"registered": answer["registered"]},
            )
        return json_response(200, answer)

    @surface.route(
        "POST",
        "/api/registry/sync",
        "Refresh every entry (status, .loki, task counts) now",
        responses={200: "total, ok, missing, unreadable, updated, errors"},
        response_schema={
            "type": "object",
            "properties": {
                "total": {"type": "integer"},
                "ok": {"type": "integer"},
                "missing": {"type": "integer"},
                "unreadable": {"type": "integer"},
                "updated": {"type": "integer"},
                "errors": _PROBLEMS,
            },
        },
        tags=tags,
        requires="write",
    )
    async def sync() -> dict[str, Any]:
        return await scanner.sync()

    @surface.lean(
        "GET",
        "/api/registry/tasks",
        "Tasks of the registered projects' .loki/queue/*.json",
        responses={
            200: "A page of tasks, total, counts by status, errors",
            400: "Bad query value (details.field)",
            404: "An unknown project_id",
        },
        params=TASKS_PARAMS,
        response_schema={
            "type": "object",
            "properties": {
                "tasks": {"type": "array", "items": {"type": "object"}},
                "total": {"type": "integer"},
                "limit": {"type": "integer"},
                "offset": {"type": "integer"},
                "counts": _COUNTS,
                "errors": _PROBLEMS,
            },
        },
        tags=tags,
        requires="read",
    )
    async def tasks(scope: Scope) -> LeanResponse:
        params = query_params(scope)
        ids = _list_param(params, "project_id", MAX_PROJECT_IDS)
        status = _choice(params, "status", tuple(STATUS_FILTER))
        limit, offset = _page(params)
        answer = await scanner.tasks(
            ids, STATUS_FILTER[status] if status is not None else None, limit, offset
        )
        return json_response(200, answer)

    @surface.lean(
        "GET",
        "/api/registry/learnings",
        "Shared learnings ($LOKI_HOME/learnings/*.jsonl), newest first",
        responses={200: "A page of learnings, counts, errors", 400: "Bad query value"},
        params=LEARNINGS_PARAMS,
        response_schema=_page_schema("learnings", {"type": "object"}),
        tags=tags,
        requires="read",
    )
    async def learnings(scope: Scope) -> LeanResponse:
        params = query_params(scope)
        kind = None
        if "type" in params:
            kind = fs.learning_type(params["type"])
            if kind is None:
                raise InvalidQuery(
                    f"type must be one of {', '.join(fs.LEARNING_TYPES)}, "
                    f"got {params['type'][:50]!r}",
                    field="type",
                )
        q = params.get("q") or None
        if q is not None and len(q) > MAX_QUERY_CHARS:
            raise InvalidQuery(f"q must be at most {MAX_QUERY_CHARS} characters", field="q")
        limit, offset = _page(params)
        return json_response(200, await scanner.learnings(kind, q, limit, offset))


# -- parsing ------------------------------------------------------------------------------


def parse_register_body(body: Mapping[str, Any]) -> tuple[str, str | None]:
    """`path` and `name` of a register body; 422 naming the field otherwise."""
    for key in body:
        if key not in ("path", "name"):
            raise ValidationFailed(f"unknown field {key!r}", field=str(key))
    path = body.get("path")
    if path is None:
        raise ValidationFailed("path is required", field="path")
    if not isinstance(path, str) or not path.strip():
        raise ValidationFailed("path must be a non-empty string", field="path")
    name = body.get("name")
    if name is not None and not isinstance(name, str):
        raise ValidationFailed("name must be a string", field="name")
    for field, text in (("path", path), ("name", name)):
        if text is not None and not _encodable(text):
            raise ValidationFailed(
                f"{field} contains an invalid character (a lone surrogate)", field=field
            )
    return path.strip(), name


def _encodable(text: str) -> bool:
    """Whether `text` is valid Unicode (JSON allows a lone "\\ud800"; no file name or
    stored text can hold one)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_roots(params: Mapping[str, str]) -> list[str] | None:
    """`roots` (a comma list); None when not given (use the defaults).

    Given, it must name roots (`roots=`, `roots=,,` or `roots=/a,` is not "the
    defaults"), and each must be absolute or start with `~` (see also
    `refuse_unknown_users`)."""
    roots = _list_param(params, "roots", fs.MAX_ROOTS, "leave roots out for the configured ones")
    if roots is None:
        return None
    for root in roots:
        if len(root) > fs.MAX_PATH_CHARS or "\x00" in root:
            raise InvalidQuery(
                f"each root must be at most {fs.MAX_PATH_CHARS} characters", field="roots"
            )
        if not (root.startswith("/") or root.startswith("~")):
            raise InvalidQuery(
                f"each root must be absolute (or start with ~), got {root[:80]!r}", field="roots"
            )
    return roots


def refuse_unknown_users(roots: Sequence[str]) -> None:
    """400 for a root whose `~` or `~user` does not expand (no such user, no home): it
    would otherwise be a folder named `~user` below the daemon's working folder. A user
    lookup may block (NSS): call it off the trio loop."""
    for root in roots:
        prefix = fs.unexpanded(os.path.expanduser(root))
        if prefix is not None:
            raise InvalidQuery(
                f"root {root[:80]!r}: {prefix[:80]} names no user with a home folder",
                field="roots",
            )


def _list_param(
    params: Mapping[str, str], name: str, most: int, absent: str = "leave it out for all"
) -> list[str] | None:
    """A comma list's values (stripped, repeats once, order kept); None when not given.

    Given, every item must hold something: `name=`, `name=,,` and `name=a,,b` are
    400, never "no filter" (an empty item is a typo or a value that went missing
    in the caller's code; `absent` tells what leaving the parameter out does)."""
    value = params.get(name)
    if value is None:
        return None
    values = [part.strip() for part in value.split(",")]
    if not all(values):
        raise InvalidQuery(
            f"{name} must not hold an empty item (no value, a comma at an end, or two in "
            f"a row); {absent}",
            field=name,
        )
    if len(values) > most:
        raise InvalidQuery(f"{name}: at most {most} values", field=name)
    return list(dict.fromkeys(values))


def _choice(params: Mapping[str, str], name: str, allowed: Sequence[str]) -> str | None:
    """One of `allowed`, None when not given; an empty value is not "no filter" (400)."""
    value = params.get(name)
    if value is None:
        return None
    if value not in allowed:
        raise InvalidQuery(
            f"{name} must be one of {', '.join(allowed)}, got {value[:50]!r}", field=name
        )
    return value


def _page(params: Mapping[str, str]) -> tuple[int, int]:
    limit = int_param(params, "limit", DEFAULT_LIMIT, minimum=1, maximum=MAX_LIMIT)
    offset = int_param(params, "offset", 0, minimum=0, maximum=MAX_OFFSET)
    assert limit is not None and offset is not None
    return limit, offset


def _depth(params: Mapping[str, str]) -> int:
    """`depth`, else its other name `max_depth`; either is checked whenever given."""
    bounds = {"minimum": fs.MIN_DEPTH, "maximum": fs.MAX_DEPTH}
    depth = int_param(params, "depth", None, **bounds)
    other = int_param(params, "max_depth", None, **bounds)
    chosen = depth if depth is not None else other
    return fs.DEFAULT_DEPTH if chosen is None else chosen


def _page_schema(items: str, item: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            items: {"type": "array", "items": dict(item)},
            "total": {"type": "integer"},
            "limit": {"type": "integer"},
            "offset": {"type": "integer"},
        },
    }
