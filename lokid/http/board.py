"""Project and board-task routes of the Dashboard API (seed "Project Endpoints",
"Task Endpoints (Dashboard)"; DESIGN.md §7).

Every view is one store call: reads run `lokid.board` functions in one read
transaction (`StoreActor.read`), changes in one write (`StoreActor.write`),
so a move's renumbering of two columns commits as a whole or not at all, and
concurrent moves are serialised by the store's single writer.

After a change has committed, `notify(type, data)` is called once,
synchronously, before the answer is sent: `project.created|updated|deleted`,
`task.created|updated|moved|deleted`. `data` is the full object (a copy);
for deletes `{"id", "project_id"}`; for moves the task plus
`"from": {"column", "position"}` (null when the move left the task in its
place; a `PUT` that moved the task carries `from` too, under
`task.updated`). A change that changes nothing (an empty `PUT`, a move to
the task's own place) announces nothing. Never inside the write function: the store may
run a write function twice (see `StoreActor`), and a rolled-back change must
not be announced. A notify that raises is logged; the change stands.

`POST /api/projects` and `POST /api/tasks` honour `Idempotency-Key` the way
`POST /api/sessions` does (`lokid.idempotency`): the first answer is stored
in the creating transaction; a retry gets it back (without a second notify).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import trio

from lokid import board, idempotency
from lokid.actors.store import StoreActor
from lokid.http.surface import (
    CONTROL,
    IDEMPOTENCY_KEY,
    LeanResponse,
    Link,
    Param,
    Scope,
    Surface,
    idempotency_key,
    json_response,
    lean_json,
    path_param,
    query_params,
    stripped_text,
)

log = logging.getLogger("lokid.http.board")

Notify = Callable[[str, dict[str, Any]], None]

PROJECTS_ROUTE = "POST /api/projects"
TASKS_ROUTE = "POST /api/tasks"

# -- OpenAPI schemas ---------------------------------------------------------------------

_NAME = stripped_text(
    board.MAX_NAME_CHARS, CONTROL, description="one line; surrounding white space is dropped"
)
_PATH = {
    "type": ["string", "null"],
    "maxLength": board.MAX_PATH_CHARS,
    "pattern": "^[/~][^\\x00]*$",
    "description": "an existing folder (else 422): absolute or ~; stored resolved",
}
_DESCRIPTION = {
    "type": ["string", "null"],
    "maxLength": board.MAX_DESCRIPTION_CHARS,
    "pattern": "^[^\\x00]*$",
    "description": "free text; null is empty",
}
_TITLE = stripped_text(
    board.MAX_TITLE_CHARS, CONTROL, description="one line; surrounding white space is dropped"
)
_COLUMN = {"type": "string", "enum": list(board.COLUMNS)}
_STATUS = {
    "type": ["string", "null"],
    "enum": [*board.STATUSES, None],
    "description": "follows the column unless failed",
}
_PRIORITY = {"type": ["string", "null"], "enum": [*board.PRIORITIES, None]}
_POSITION = {
    "type": ["integer", "null"],
    "minimum": 0,
    "description": "0-based; past the end (or absent) = at the end",
}
_NULLABLE_COLUMN = {"type": ["string", "null"], "enum": [*board.COLUMNS, None]}
STATUS_FOLLOWS_COLUMN: list[dict[str, Any]] = [
    {
        "if": {
            "required": ["column", "status"],
            "properties": {"column": {"const": column}, "status": {"type": "string"}},
        },
        "then": {"properties": {"status": {"enum": [status, board.FAILED]}}},
    }
    for column, status in board.COLUMN_STATUS.items()
]
"""Given both, a status other than failed must be the column's (a task in done is completed)."""

PROJECT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^proj-[0-9a-f]{12}$"},
        "name": {"type": "string"},
        "path": {"type": ["string", "null"]},
        "description": {"type": "string"},
        "status": {"type": "string", "enum": list(board.PROJECT_STATUSES)},
        "taskCount": {"type": "integer"},
        "created_at": {"type": "string", "format": "date-time"},
        "updated_at": {"type": "string", "format": "date-time"},
    },
}
TASK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^task-[0-9a-f]{12}$"},
        "project_id": {"type": "string"},
        "title": {"type": "string"},
        "description": {"type": "string"},
        "column": _COLUMN,
        "status": {"type": "string", "enum": list(board.STATUSES)},
        "priority": {"type": "string", "enum": list(board.PRIORITIES)},
        "position": {"type": "integer", "minimum": 0},
        "created_at": {"type": "string", "format": "date-time"},
        "updated_at": {"type": "string", "format": "date-time"},
    },
}
TASK_PAGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "tasks": {"type": "array", "items": TASK_SCHEMA},
        "total": {"type": "integer"},
        "limit": {"type": "integer"},
        "offset": {"type": "integer"},
    },
}
PROJECT_CREATE_BODY: dict[str, Any] = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {"name": _NAME, "path": _PATH, "description": _DESCRIPTION},
}
PROJECT_UPDATE_BODY: dict[str, Any] = {
    "type": "object",
    "description": "Fields left out (or null) stay as they are, but a null path clears it "
    "and a null description empties it.",
    "additionalProperties": False,
    "properties": {
        "name": {**_NAME, "type": ["string", "null"]},
        "path": {**_PATH, "description": "an existing folder; null clears the path"},
        "description": _DESCRIPTION,
        "status": {"type": ["string", "null"], "enum": [*board.PROJECT_STATUSES, None]},
    },
}
TASK_CREATE_BODY: dict[str, Any] = {
    "type": "object",
    "description": "A null counts as left out.",
    "required": ["project_id", "title"],
    "additionalProperties": False,
    "allOf": STATUS_FOLLOWS_COLUMN,
    "properties": {
        "project_id": {
            "type": "string",
            "maxLength": board.MAX_ID_CHARS,
            "description": "an existing project (else 404)",
        },
        "title": _TITLE,
        "description": _DESCRIPTION,
        "column": {
            **_NULLABLE_COLUMN,
            "description": "default: the status's column (pending: backlog, active: "
            "in_progress, completed: done), else backlog",
        },
        "status": _STATUS,
        "priority": {**_PRIORITY, "default": "medium"},
        "position": _POSITION,
    },
}
TASK_UPDATE_BODY: dict[str, Any] = {
    "type": "object",
    "description": "Fields left out (or null) stay as they are.",
    "additionalProperties": False,
    "allOf": STATUS_FOLLOWS_COLUMN,
    "properties": {
        "title": {**_TITLE, "type": ["string", "null"]},
        "description": _DESCRIPTION,
        "column": {**_NULLABLE_COLUMN, "description": "another column: a move (to the end)"},
        "status": {
            **_STATUS,
            "description": "without column: moves the task to the status's column (failed: stays)",
        },
        "priority": _PRIORITY,
        "position": _POSITION,
    },
}
MOVE_BODY: dict[str, Any] = {
    "type": "object",
    "required": ["column"],
    "additionalProperties": False,
    "allOf": STATUS_FOLLOWS_COLUMN,
    "properties": {
        "column": _COLUMN,
        "position": _POSITION,
        "status": {
            **_STATUS,
            "description": "failed keeps the task failed; otherwise re-derived from the column",
        },
    },
}

IDEMPOTENCY = Param(
    idempotency.HEADER,
    "header",
    IDEMPOTENCY_KEY,
    description="the same key and body within 24 h: the first answer",
)
PAGE_PARAMS = (
    Param(
        "limit",
        "query",
        {
            "type": "integer",
            "minimum": 1,
            "maximum": board.MAX_LIMIT,
            "default": board.DEFAULT_LIMIT,
        },
    ),
    Param("offset", "query", {"type": "integer", "minimum": 0, "maximum": board.MAX_OFFSET}),
)
TASK_LIST_PARAMS = (
    Param("project_id", "query", {"type": "string", "pattern": "^proj-[0-9a-f]{12}$"}),
    Param("status", "query", {"type": "string", "enum": list(board.STATUSES)}),
    Param("column", "query", _COLUMN),
    *PAGE_PARAMS,
)
PROJECT_LIST_PARAMS = (
    Param("status", "query", {"type": "string", "enum": list(board.PROJECT_STATUSES)}),
    *PAGE_PARAMS,
)
ID = "$response.body#/id"
PROJECT_LINKS: dict[str, Link] = {
    "GetProject": ("GET", "/api/projects/{id}", {"id": ID}),
    "UpdateProject": ("PUT", "/api/projects/{id}", {"id": ID}),
    "DeleteProject": ("DELETE", "/api/projects/{id}", {"id": ID}),
    "ProjectTasks": ("GET", "/api/tasks", {"project_id": ID}),
}
TASK_LINKS: dict[str, Link] = {
    "GetTask": ("GET", "/api/tasks/{id}", {"id": ID}),
    "UpdateTask": ("PUT", "/api/tasks/{id}", {"id": ID}),
    "MoveTask": ("POST", "/api/tasks/{id}/move", {"id": ID}),
    "DeleteTask": ("DELETE", "/api/tasks/{id}", {"id": ID}),
}


def _announcing(
    notify: Notify, kind: str, data_of: Callable[[Any], Mapping[str, Any] | None] = dict
) -> Callable[[Any], None]:
    """The store commit hook that announces a write's change as `kind` (`data_of(value)`;
    None: nothing to announce). As a hook it runs in commit order (`StoreActor.write`), so
    `/ws` clients see the changes of concurrent requests in the order they were made."""

    def announce(value: Any) -> None:
        data = data_of(value)
        if data is None:
            return
        try:
            notify(kind, dict(data))
        except Exception:
            log.exception("notify(%r) failed; the change itself is committed", kind)

    return announce


def _if_created(outcome: idempotency.CreateOutcome) -> Mapping[str, Any] | None:
    return outcome.answer if outcome.created else None


def _with_origin(value: tuple[dict[str, Any], dict[str, Any] | None]) -> dict[str, Any]:
    """A moved or updated task, with `from` when it changed place."""
    task, came_from = value
    return task if came_from is None else {**task, "from": came_from}


def _if_moved(moved: board.Moved) -> dict[str, Any] | None:
    """A move's `task.moved`: the task with `from` (null: it stayed in its place, its
    status changed); nothing when the move changed nothing."""
    return {**moved.task, "from": moved.came_from} if moved.changed else None


def install_board(surface: Surface, store: StoreActor, notify: Notify) -> None:
    """Declare the project and board-task routes on `surface` (the Dashboard API)."""
    _install_projects(surface, store, notify)
    _install_tasks(surface, store, notify)


def _install_projects(surface: Surface, store: StoreActor, notify: Notify) -> None:
    tags = ("projects",)

    @surface.lean(
        "GET",
        "/api/projects",
        "Projects, newest first, with their board task counts (a bare array: one page, "
        "100 by default; a full page may have more after it)",
        responses={200: "The projects", 400: "Bad query value (details.field)"},
        params=PROJECT_LIST_PARAMS,
        response_schema={"type": "array", "items": PROJECT_SCHEMA},
        tags=tags,
        requires="read",
    )
    async def projects_list(scope: Scope) -> LeanResponse:
        query = board.parse_project_query(query_params(scope))
        return json_response(200, await store.read(lambda db: board.list_projects(db, query)))

    @surface.lean(
        "POST",
        "/api/projects",
        "Create a project",
        responses={
            201: "Created",
            400: "Malformed JSON or Idempotency-Key",
            409: "The key was used for another body",
            422: "Invalid field (details.field)",
        },
        params=(IDEMPOTENCY,),
        request_body=PROJECT_CREATE_BODY,
        response_schema=PROJECT_SCHEMA,
        links=PROJECT_LINKS,
        tags=tags,
        requires="write",
    )
    async def project_create(scope: Scope) -> LeanResponse:
        key = idempotency_key(scope)
        body = lean_json(scope)

        async def prepare() -> board.NewProject:
            new = board.parse_project_create(body)
            if new.path is None:
                return new
            path = await trio.to_thread.run_sync(board.check_project_path, new.path)
            return attrs.evolve(new, path=path)

        outcome = await idempotency.create_once(
            store,
            PROJECTS_ROUTE,
            body,
            key,
            prepare,
            board.insert_project,
            on_commit=_announcing(notify, "project.created", _if_created),
        )
        return json_response(outcome.status, outcome.answer)

    @surface.lean(
        "GET",
        "/api/projects/{id}",
        "One project",
        responses={200: "The project", 404: "No such project"},
        response_schema=PROJECT_SCHEMA,
        tags=tags,
        requires="read",
    )
    async def project_detail(scope: Scope) -> LeanResponse:
        id = path_param(scope, "id")
        return json_response(200, await store.read(lambda db: board.get_project(db, id)))

    @surface.lean(
        "PUT",
        "/api/projects/{id}",
        "Change a project's name, path, description or status (fields left out stay)",
        responses={
            200: "The project",
            400: "Malformed JSON",
            404: "No such project",
            422: "Invalid field (details.field)",
        },
        request_body=PROJECT_UPDATE_BODY,
        response_schema=PROJECT_SCHEMA,
        tags=tags,
        requires="write",
    )
    async def project_update(scope: Scope) -> LeanResponse:
        id = path_param(scope, "id")
        changes = board.parse_project_update(lean_json(scope))
        if not changes:  # nothing to change: no write, no notification
            return json_response(200, await store.read(lambda db: board.get_project(db, id)))
        if isinstance(changes.get("path"), str):
            changes["path"] = await trio.to_thread.run_sync(
                board.check_project_path, changes["path"]
            )
        project = await store.write(
            lambda db: board.update_project(db, id, changes),
            on_commit=_announcing(notify, "project.updated"),
        )
        return json_response(200, project)

    @surface.lean(
        "DELETE",
        "/api/projects/{id}",
        "Delete a project and its board tasks",
        responses={204: "Deleted", 404: "No such project"},
        tags=tags,
        requires="write",
    )
    async def project_delete(scope: Scope) -> LeanResponse:
        id = path_param(scope, "id")
        await store.write(
            lambda db: board.delete_project(db, id),
            on_commit=_announcing(notify, "project.deleted"),
        )
        return LeanResponse(204, b"")


def _install_tasks(surface: Surface, store: StoreActor, notify: Notify) -> None:
    tags = ("board",)

    @surface.lean(
        "GET",
        "/api/tasks",
        "Board tasks: by column (backlog..done), then position",
        responses={
            200: "A page of tasks",
            400: "Bad query value (details.field)",
            404: "No such project (project_id)",
        },
        params=TASK_LIST_PARAMS,
        response_schema=TASK_PAGE_SCHEMA,
        tags=tags,
        requires="read",
    )
    async def tasks_list(scope: Scope) -> LeanResponse:
        query = board.parse_task_query(query_params(scope))
        return json_response(200, await store.read(lambda db: board.list_tasks(db, query)))

    @surface.lean(
        "POST",
        "/api/tasks",
        "Create a board task (at the end of its column, or at position)",
        responses={
            201: "Created",
            400: "Malformed JSON or Idempotency-Key",
            404: "No such project",
            409: "The key was used for another body",
            422: "Invalid field (details.field)",
        },
        params=(IDEMPOTENCY,),
        request_body=TASK_CREATE_BODY,
        response_schema=TASK_SCHEMA,
        links=TASK_LINKS,
        tags=tags,
        requires="write",
    )
    async def task_create(scope: Scope) -> LeanResponse:
        key = idempotency_key(scope)
        body = lean_json(scope)

        async def prepare() -> board.NewTask:
            return board.parse_task_create(body)

        outcome = await idempotency.create_once(
            store,
            TASKS_ROUTE,
            body,
            key,
            prepare,
            board.insert_task,
            on_commit=_announcing(notify, "task.created", _if_created),
        )
        return json_response(outcome.status, outcome.answer)

    @surface.lean(
        "GET",
        "/api/tasks/{id}",
        "One board task",
        responses={200: "The task", 404: "No such task"},
        response_schema=TASK_SCHEMA,
        tags=tags,
        requires="read",
    )
    async def task_detail(scope: Scope) -> LeanResponse:
        id = path_param(scope, "id")
        return json_response(200, await store.read(lambda db: board.get_task(db, id)))

    @surface.lean(
        "PUT",
        "/api/tasks/{id}",
        "Change a board task (fields left out stay; a new column is a move to its end)",
        responses={
            200: "The task",
            400: "Malformed JSON",
            404: "No such task",
            422: "Invalid field (details.field)",
        },
        request_body=TASK_UPDATE_BODY,
        response_schema=TASK_SCHEMA,
        tags=tags,
        requires="write",
    )
    async def task_update(scope: Scope) -> LeanResponse:
        id = path_param(scope, "id")
        changes = board.parse_task_update(lean_json(scope))
        if changes.is_empty():  # nothing to change: no write, no notification
            return json_response(200, await store.read(lambda db: board.get_task(db, id)))
        task, _ = await store.write(
            lambda db: board.update_task(db, id, changes),
            on_commit=_announcing(notify, "task.updated", _with_origin),
        )
        return json_response(200, task)

    @surface.lean(
        "DELETE",
        "/api/tasks/{id}",
        "Delete a board task (its column is renumbered)",
        responses={204: "Deleted", 404: "No such task"},
        tags=tags,
        requires="write",
    )
    async def task_delete(scope: Scope) -> LeanResponse:
        id = path_param(scope, "id")
        await store.write(
            lambda db: board.delete_task(db, id),
            on_commit=_announcing(notify, "task.deleted"),
        )
        return LeanResponse(204, b"")

    @surface.lean(
        "POST",
        "/api/tasks/{id}/move",
        "Move a task to a position of a column; both columns are renumbered 0..n-1",
        responses={
            200: "The task where it is now",
            400: "Malformed JSON",
            404: "No such task",
            422: "Invalid field (details.field): column, position, status",
        },
        request_body=MOVE_BODY,
        response_schema=TASK_SCHEMA,
        tags=tags,
        requires="write",
    )
    async def task_move(scope: Scope) -> LeanResponse:
        id = path_param(scope, "id")
        move = board.parse_move(lean_json(scope))
        moved = await store.write(
            lambda db: board.move_task(db, id, move.column, move.position, status=move.status),
            on_commit=_announcing(notify, "task.moved", _if_moved),
        )
        return json_response(200, moved.task)
