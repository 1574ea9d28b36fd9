"""Dashboard projects and their Kanban board: request validation and the store records.

Two halves, like `lokid.session_records`:

* `parse_*` functions turn request bodies and query strings into typed
  values, or raise `ValidationFailed` (422, body) / `InvalidQuery` (400,
  query string) naming the field (`details.field`). They do no I/O, except
  `check_project_path`, which looks at the file system (run it in a worker
  thread).
* The record functions take a `sqlite_utils.Database` and are meant to run
  inside `StoreActor.write` / `StoreActor.read`: each is one transaction, so
  what it reads and what it writes cannot interleave with another request.
  They return plain JSON-ready dicts in the Dashboard API's shapes
  (DESIGN.md §7, snake_case except the seed's `taskCount`). They validate
  their own arguments too (a caller that skipped `parse_*` still cannot
  break the board).

The board's one invariant: the tasks of each (project, column) have the
positions 0..n-1, each once. It holds by construction: the store keeps a
sparse `rank` per task (an integer; gaps of `RANK_GAP` between neighbours)
and a task's position is computed when it is read - its index in the
column ordered by (rank, rowid). A move or an insert writes one row: the
new rank is the midpoint of its new neighbours' (or one gap past the first
or last), and only when two neighbours have no integer between them is the
column renumbered (ranks `i * RANK_GAP`; rare, and never needed for
appends or inserts at the top). A delete writes nothing else. So a move
costs the same in a column of 10 tasks as in one of 10,000, instead of
shifting every task between the old and the new place. The store has one
writer, so two moves never see each other half done. See docs/board.md.

Decisions (where DESIGN.md and the seed are silent):

* Status follows the column (`COLUMN_STATUS`) unless it is `failed`. A move
  to another column re-derives it (a failed task moved to `todo` is pending
  again) unless the request says `failed`; a reorder within a column keeps
  it. A non-failed `status` without a `column` picks the status's own column
  (`STATUS_COLUMN`: pending → backlog, active → in_progress, completed →
  done) if the current one does not fit; `status` and `column` that
  disagree are a 422 on `status`.
* A JSON `null` counts as absent, except `path` in a project update, where
  it clears the path, and `description`, where it means "".
* Read-only keys (`id`, `created_at`, ...) in an update body are a 422
  naming them, like unknown keys: a client that sends them back expecting a
  change would otherwise be ignored silently.
* `GET /api/tasks?project_id=` of an unknown (well-formed) project is a 404,
  not an empty list: the older implementation answered `[]` for every
  project, and a silent empty board is the bug users could not see.
* Ties in rank (only a writer outside this module can make them) are
  broken by rowid (insertion order), so positions stay dense and stable.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, NamedTuple

import attrs
import sqlite_utils

from lokid.errors import InvalidQuery, NotFound, ValidationFailed
from lokid.jsontypes import json_type_name
from lokid.session_records import query_int
from lokid.timefmt import utc_now_iso

__all__ = [
    "COLUMNS",
    "COLUMN_STATUS",
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "PRIORITIES",
    "PROJECT_STATUSES",
    "STATUSES",
    "STATUS_COLUMN",
    "Move",
    "NewProject",
    "NewTask",
    "ProjectQuery",
    "TaskChanges",
    "TaskQuery",
    "check_project_path",
    "delete_project",
    "delete_task",
    "get_project",
    "get_task",
    "insert_project",
    "insert_task",
    "list_projects",
    "list_tasks",
    "move_task",
    "new_project_id",
    "new_task_id",
    "parse_move",
    "parse_project_create",
    "parse_project_query",
    "parse_project_update",
    "parse_task_create",
    "parse_task_query",
    "parse_task_update",
    "update_project",
    "update_task",
]

# -- vocabulary and limits --------------------------------------------------------

COLUMNS: Final = ("backlog", "todo", "in_progress", "review", "done")
PRIORITIES: Final = ("low", "medium", "high", "critical")
STATUSES: Final = ("pending", "active", "completed", "failed")
PROJECT_STATUSES: Final = ("active", "archived")
FAILED: Final = "failed"

COLUMN_STATUS: Final[Mapping[str, str]] = {
    "backlog": "pending",
    "todo": "pending",
    "in_progress": "active",
    "review": "active",
    "done": "completed",
}
STATUS_COLUMN: Final[Mapping[str, str]] = {
    "pending": "backlog",
    "active": "in_progress",
    "completed": "done",
}
_COLUMN_RANK = {name: rank for rank, name in enumerate(COLUMNS)}

MAX_NAME_CHARS = 200
MAX_TITLE_CHARS = 500
MAX_DESCRIPTION_CHARS = 10_000
MAX_PATH_CHARS = 4096
MAX_ID_CHARS = 64
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_OFFSET = 2**62

_PROJECT_ID = re.compile(r"proj-[0-9a-f]{12}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc

_PROJECT_CREATE_KEYS = ("name", "path", "description")
_PROJECT_UPDATE_KEYS = ("name", "path", "description", "status")
_PROJECT_READ_ONLY = ("id", "taskCount", "created_at", "updated_at")
_TASK_CREATE_KEYS = (
    "project_id",
    "title",
    "description",
    "column",
    "status",
    "priority",
    "position",
)
_TASK_UPDATE_KEYS = ("title", "description", "column", "status", "priority", "position")
_TASK_READ_ONLY = ("id", "project_id", "created_at", "updated_at")
_MOVE_KEYS = ("column", "position", "status")


# -- ids ------------------------------------------------------------------------------


def new_project_id() -> str:
    """`proj-` + 12 random hex digits (48 bits: collisions are a primary-key 409, not a merge)."""
    return f"proj-{secrets.token_hex(6)}"


def new_task_id() -> str:
    """`task-` + 12 random hex digits."""
    return f"task-{secrets.token_hex(6)}"


# -- validation helpers ----------------------------------------------------------------


def _fail(message: str, field: str, **details: Any) -> ValidationFailed:
    return ValidationFailed(message, field=field, details=details or None)


def _encodable(text: str, field: str) -> None:
    """Refuse lone surrogates (JSON allows "\\ud800"): SQLite could not store them (a 500)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _fail(f"{field} contains an invalid character (a lone surrogate)", field) from None


def _line(value: Any, field: str, limit: int) -> str:
    """A one-line label (a name, a title): stripped, 1..limit characters, no control characters."""
    if not isinstance(value, str):
        raise _fail(f"{field} must be a string, not {json_type_name(value)}", field)
    text = value.strip()
    if not text:
        raise _fail(f"{field} must not be empty", field)
    if len(text) > limit:
        raise _fail(f"{field} is longer than {limit} characters", field, limit=limit)
    if _CONTROL.search(text):
        raise _fail(f"{field} must not contain control characters (newlines, tabs...)", field)
    _encodable(text, field)
    return text


def _description(value: Any, field: str = "description") -> str:
    """Free text up to `MAX_DESCRIPTION_CHARS`; null means empty; no NUL."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _fail(f"{field} must be a string, not {json_type_name(value)}", field)
    if len(value) > MAX_DESCRIPTION_CHARS:
        raise _fail(
            f"{field} is longer than {MAX_DESCRIPTION_CHARS} characters",
            field,
            limit=MAX_DESCRIPTION_CHARS,
        )
    if "\0" in value:
        raise _fail(f"{field} contains a NUL character", field)
    _encodable(value, field)
    return value


def _choice(value: Any, field: str, known: Sequence[str]) -> str:
    if not isinstance(value, str):
        raise _fail(f"{field} must be a string, not {json_type_name(value)}", field)
    if value not in known:
        raise _fail(
            f"{field} must be one of {', '.join(known)}, got {value[:50]!r}",
            field,
            known=list(known),
        )
    return value


def _position(value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON has one number type: 3.0 is the integer 3
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(f"position must be an integer, not {json_type_name(value)}", "position")
    if value < 0:
        raise _fail(f"position must be 0 or more, got {value}", "position")
    return value


def _path_text(value: Any) -> str:
    if not isinstance(value, str):
        raise _fail(f"path must be a string, not {json_type_name(value)}", "path")
    if not value.strip():
        raise _fail("path must not be empty (leave it out for no path)", "path")
    if len(value) > MAX_PATH_CHARS:
        raise _fail(f"path is longer than {MAX_PATH_CHARS} characters", "path")
    if "\0" in value:
        raise _fail("path contains a NUL character", "path")
    _encodable(value, "path")
    if not (value.startswith("/") or value.startswith("~")):
        raise _fail(f"path must be absolute (or start with ~), got {value[:100]!r}", "path")
    return value


def _check_keys(
    body: Mapping[str, Any], known: Sequence[str], read_only: Sequence[str] = ()
) -> None:
    if not isinstance(body, Mapping):
        raise _fail(f"the request body must be a JSON object, not {json_type_name(body)}", "body")
    for key in body:
        if key in known:
            continue
        if key in read_only:
            raise _fail(f"{key} is read-only; it cannot be changed", str(key))
        raise _fail(f"unknown key {str(key)[:50]!r}; known keys: {', '.join(known)}", str(key))


def check_project_path(text: str) -> str:
    """The real path of an existing folder (`~` expanded, symlinks resolved), or a 422 on `path`.

    Does file-system I/O: run it in a worker thread.
    """
    text = _path_text(text)
    try:
        path = Path(text).expanduser() if text.startswith("~") else Path(text)
        real = path.resolve(strict=True)
        st = real.stat()
    except FileNotFoundError:
        raise _fail(f"path {text} does not exist", "path", path=text) from None
    except (OSError, RuntimeError) as exc:  # permission, symlink loop, unknown ~user
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise _fail(f"path {text} cannot be used: {reason}", "path", path=text) from None
    if not stat.S_ISDIR(st.st_mode):
        raise _fail(f"path {text} is not a folder", "path", path=text)
    return os.fspath(real)


# -- request bodies: projects ----------------------------------------------------------


@attrs.frozen
class NewProject:
    """A validated `POST /api/projects`; `path` is as given until `check_project_path`."""

    name: str
    path: str | None = None
    description: str = ""


def parse_project_create(body: Mapping[str, Any]) -> NewProject:
    """Validate `{"name", "path"?, "description"?}`; 422 names the field."""
    _check_keys(body, _PROJECT_CREATE_KEYS)
    if body.get("name") is None:
        raise _fail("name is required", "name")
    path = body.get("path")
    return NewProject(
        name=_line(body["name"], "name", MAX_NAME_CHARS),
        path=_path_text(path) if path is not None else None,
        description=_description(body.get("description")),
    )


def parse_project_update(body: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a `PUT /api/projects/{id}` body: the columns to set.

    A `null` counts as left out (as in every board body), except `path` (None
    clears it) and `description` (null is empty). A `path` string is as given
    until `check_project_path`.
    """
    _check_keys(body, _PROJECT_UPDATE_KEYS, _PROJECT_READ_ONLY)
    changes: dict[str, Any] = {}
    if body.get("name") is not None:
        changes["name"] = _line(body["name"], "name", MAX_NAME_CHARS)
    if "path" in body:
        path = body["path"]
        changes["path"] = _path_text(path) if path is not None else None
    if "description" in body:
        changes["description"] = _description(body["description"])
    if body.get("status") is not None:
        changes["status"] = _choice(body["status"], "status", PROJECT_STATUSES)
    return changes


# -- request bodies: tasks ---------------------------------------------------------------


@attrs.frozen
class NewTask:
    """A validated `POST /api/tasks`: `column` decided, `failed` if the status says so.

    `position` None appends at the end of the column.
    """

    project_id: str
    title: str
    description: str = ""
    column: str = "backlog"
    priority: str = "medium"
    failed: bool = False
    position: int | None = None


@attrs.frozen
class TaskChanges:
    """A validated `PUT /api/tasks/{id}`; None means "leave as it is"."""

    title: str | None = None
    description: str | None = None
    priority: str | None = None
    status: str | None = None
    column: str | None = None
    position: int | None = None

    def is_empty(self) -> bool:
        return all(value is None for value in attrs.astuple(self))


@attrs.frozen
class Move:
    """A validated `POST /api/tasks/{id}/move`; `position` None appends."""

    column: str
    position: int | None = None
    status: str | None = None


def _status_for(column: str | None, status: str | None) -> str | None:
    """Check that a non-failed `status` fits `column`; return the column it implies."""
    if status is None or status == FAILED:
        return column
    if column is None:
        return STATUS_COLUMN[status]
    if COLUMN_STATUS[column] != status:
        raise _fail(
            f"status follows the column: a task in {column} is {COLUMN_STATUS[column]}, "
            f"not {status} (only failed can be set apart from the column)",
            "status",
        )
    return column


def parse_task_create(body: Mapping[str, Any]) -> NewTask:
    """Validate `POST /api/tasks`; 422 names the field (the project is checked by `insert_task`)."""
    _check_keys(body, _TASK_CREATE_KEYS)
    given = {key: value for key, value in body.items() if value is not None}
    if "project_id" not in given:
        raise _fail("project_id is required", "project_id")
    project_id = given["project_id"]
    if not isinstance(project_id, str):
        raise _fail(f"project_id must be a string, not {json_type_name(project_id)}", "project_id")
    if len(project_id) > MAX_ID_CHARS:
        raise _fail(f"project_id is longer than {MAX_ID_CHARS} characters", "project_id")
    if "title" not in given:
        raise _fail("title is required", "title")
    column = _choice(given["column"], "column", COLUMNS) if "column" in given else None
    status = _choice(given["status"], "status", STATUSES) if "status" in given else None
    column = _status_for(column, status) or "backlog"
    return NewTask(
        project_id=project_id,
        title=_line(given["title"], "title", MAX_TITLE_CHARS),
        description=_description(given.get("description")),
        column=column,
        priority=_choice(given["priority"], "priority", PRIORITIES)
        if "priority" in given
        else "medium",
        failed=status == FAILED,
        position=_position(given["position"]) if "position" in given else None,
    )


def parse_task_update(body: Mapping[str, Any]) -> TaskChanges:
    """Validate `PUT /api/tasks/{id}` (every field optional; null = leave as it is)."""
    _check_keys(body, _TASK_UPDATE_KEYS, _TASK_READ_ONLY)
    given = {key: value for key, value in body.items() if value is not None}
    column = _choice(given["column"], "column", COLUMNS) if "column" in given else None
    status = _choice(given["status"], "status", STATUSES) if "status" in given else None
    _status_for(column, status)
    return TaskChanges(
        title=_line(given["title"], "title", MAX_TITLE_CHARS) if "title" in given else None,
        description=_description(given["description"]) if "description" in given else None,
        priority=_choice(given["priority"], "priority", PRIORITIES)
        if "priority" in given
        else None,
        status=status,
        column=column,
        position=_position(given["position"]) if "position" in given else None,
    )


def parse_move(body: Mapping[str, Any]) -> Move:
    """Validate `{"column", "position"?, "status"?}` of `POST /api/tasks/{id}/move`."""
    _check_keys(body, _MOVE_KEYS)
    given = {key: value for key, value in body.items() if value is not None}
    if "column" not in given:
        raise _fail(f"column is required (one of {', '.join(COLUMNS)})", "column")
    column = _choice(given["column"], "column", COLUMNS)
    status = _choice(given["status"], "status", STATUSES) if "status" in given else None
    _status_for(column, status)
    return Move(
        column=column,
        position=_position(given["position"]) if "position" in given else None,
        status=status,
    )


# -- query strings --------------------------------------------------------------------


@attrs.frozen
class TaskQuery:
    """`GET /api/tasks`: the filters (None: any) and the page."""

    project_id: str | None = None
    status: str | None = None
    column: str | None = None
    limit: int = DEFAULT_LIMIT
    offset: int = 0


@attrs.frozen
class ProjectQuery:
    """`GET /api/projects`: the filter (None: any) and the page. The answer is the seed's
    bare array, so it cannot say its `total`; it is bounded like every list (a page of
    `limit` projects may have more after it)."""

    status: str | None = None
    limit: int = DEFAULT_LIMIT
    offset: int = 0


def _query_choice(params: Mapping[str, Any], name: str, known: Iterable[str]) -> str | None:
    raw = params.get(name)
    if raw is None:
        return None
    value = str(raw)
    choices = tuple(known)
    if value not in choices:
        raise InvalidQuery(
            f"{name} must be one of {', '.join(choices)}, got {value[:50]!r}", field=name
        )
    return value


def parse_task_query(params: Mapping[str, Any]) -> TaskQuery:
    """`project_id`, `status`, `column`, `limit` (1..1000, default 100), `offset`; 400 if bad."""
    project_id = params.get("project_id")
    if project_id is not None:
        project_id = str(project_id)
        if not _PROJECT_ID.fullmatch(project_id):
            raise InvalidQuery(
                f"project_id must be a project id (proj- and 12 hex digits), "
                f"got {project_id[:50]!r}",
                field="project_id",
            )
    return TaskQuery(
        project_id=project_id,
        status=_query_choice(params, "status", STATUSES),
        column=_query_choice(params, "column", COLUMNS),
        limit=query_int(params, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT),
        offset=query_int(params, "offset", 0, 0, MAX_OFFSET),
    )


def parse_project_query(params: Mapping[str, Any]) -> ProjectQuery:
    """`status`, `limit` (1..1000, default 100), `offset`; 400 if bad."""
    return ProjectQuery(
        status=_query_choice(params, "status", PROJECT_STATUSES),
        limit=query_int(params, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT),
        offset=query_int(params, "offset", 0, 0, MAX_OFFSET),
    )


# -- records: projects -------------------------------------------------------------------

_PROJECT_SELECT = (
    "SELECT p.id, p.name, p.path, p.description, p.status,"
    " (SELECT COUNT(*) FROM board_tasks t WHERE t.project_id = p.id) AS task_count,"
    " p.created_at, p.updated_at FROM projects p"
)


def _project_json(row: Sequence[Any]) -> dict[str, Any]:
    return {
        "id": row[0],
        "name": row[1],
        "path": row[2],
        "description": row[3],
        "status": row[4],
        "taskCount": int(row[5]),
        "created_at": row[6],
        "updated_at": row[7],
    }


def _project_exists(db: sqlite_utils.Database, project_id: str) -> None:
    if db.execute("SELECT 1 FROM projects WHERE id = ?", (project_id,)).fetchone() is None:
        raise NotFound("Project not found", details={"project_id": project_id})


def get_project(db: sqlite_utils.Database, project_id: str) -> dict[str, Any]:
    """The project with its `taskCount`; `NotFound` ("Project not found")."""
    row = db.execute(f"{_PROJECT_SELECT} WHERE p.id = ?", (project_id,)).fetchone()
    if row is None:
        raise NotFound("Project not found", details={"project_id": project_id})
    return _project_json(row)


def list_projects(
    db: sqlite_utils.Database, query: ProjectQuery | None = None
) -> list[dict[str, Any]]:
    """Projects newest first (made in the same millisecond: the later first, not by
    their random ids), each with its `taskCount`: one query (a correlated count
    per row, answered from the `board_tasks_column` index), not one per project."""
    query = query or ProjectQuery()
    where, params = ("WHERE p.status = ?", [query.status]) if query.status else ("", [])
    rows = db.execute(
        f"{_PROJECT_SELECT} {where} ORDER BY p.created_at DESC, p.rowid DESC LIMIT ? OFFSET ?",
        [*params, query.limit, query.offset],
    ).fetchall()
    return [_project_json(row) for row in rows]


def insert_project(
    db: sqlite_utils.Database,
    project: NewProject,
    *,
    project_id: str | None = None,
    now: str | None = None,
) -> dict[str, Any]:
    """Record a new active project; `project.path` must already be checked (or None)."""
    project_id = project_id or new_project_id()
    now = now or utc_now_iso()
    db.execute(
        "INSERT INTO projects (id, name, path, description, status, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, 'active', ?, ?)",
        (project_id, project.name, project.path, project.description, now, now),
    )
    return get_project(db, project_id)


_PROJECT_COLUMNS = frozenset(_PROJECT_UPDATE_KEYS)


def update_project(
    db: sqlite_utils.Database,
    project_id: str,
    changes: Mapping[str, Any],
    *,
    now: str | None = None,
) -> dict[str, Any]:
    """Set `name`, `path` (checked, or None), `description`, `status`; bump `updated_at`."""
    unknown = set(changes) - _PROJECT_COLUMNS
    if unknown:
        raise TypeError(f"update_project: unknown fields {sorted(unknown)}")
    _project_exists(db, project_id)
    if "status" in changes:
        _choice(changes["status"], "status", PROJECT_STATUSES)
    fields = {**changes, "updated_at": now or utc_now_iso()}
    names = sorted(fields)
    db.execute(
        f"UPDATE projects SET {', '.join(f'{name} = ?' for name in names)} WHERE id = ?",
        [*(fields[name] for name in names), project_id],
    )
    return get_project(db, project_id)


def delete_project(db: sqlite_utils.Database, project_id: str) -> dict[str, Any]:
    """Remove the project and its board tasks: `{"id", "project_id", "tasks_deleted"}`.

    The tasks are deleted explicitly as well as by the foreign key's
    ON DELETE CASCADE, so a connection without `PRAGMA foreign_keys` cannot
    leave orphans behind.
    """
    _project_exists(db, project_id)
    cursor = db.execute("DELETE FROM board_tasks WHERE project_id = ?", (project_id,))
    removed = max(cursor.rowcount, 0)
    db.execute("DELETE FROM projects WHERE id = ?", (project_id,))
    return {"id": project_id, "project_id": project_id, "tasks_deleted": removed}


# -- records: tasks -----------------------------------------------------------------------

RANK_GAP: Final = 1024
"""The rank distance between neighbours after a renumbering or an append (see the module)."""
_RANK_LIMIT = 2**62  # past this (after ~4e15 appends) a column is renumbered, well before overflow

# A task's position: how many tasks of its column come before it, by (rank, rowid). The
# row-value comparison walks the `board_tasks_column` index (whose entries end in the
# rowid), so it costs a count of the tasks before it, in C.
# A task's position: the tasks before it in its column, by (rank, rowid). Written as two
# counts (rank below; same rank, rowid below) because SQLite checks the row value
# `(o.rank, o.rowid) < (t.rank, t.rowid)` per index entry: twice as slow (~0.2 ms for a
# column of 2,000 on this VM; every create, move and single read counts one column).
_POSITION_SQL = (
    "((SELECT COUNT(*) FROM board_tasks o WHERE o.project_id = t.project_id"
    " AND o.column_name = t.column_name AND o.rank < t.rank)"
    " + (SELECT COUNT(*) FROM board_tasks o WHERE o.project_id = t.project_id"
    " AND o.column_name = t.column_name AND o.rank = t.rank AND o.rowid < t.rowid))"
)
_TASK_FIELDS = (
    "id, project_id, title, description, column_name, status, priority, position,"
    " created_at, updated_at"
)
_COLUMN_ORDER_SQL = (
    "CASE column_name "
    + " ".join(f"WHEN '{name}' THEN {rank}" for name, rank in _COLUMN_RANK.items())
    + " END"
)


def _task_json(row: Sequence[Any]) -> dict[str, Any]:
    return {
        "id": row[0],
        "project_id": row[1],
        "title": row[2],
        "description": row[3],
        "column": row[4],
        "status": row[5],
        "priority": row[6],
        "position": row[7],
        "created_at": row[8],
        "updated_at": row[9],
    }


def _task_row(db: sqlite_utils.Database, task_id: str) -> tuple[Any, ...]:
    """(rowid, project_id, column, position, status) of the task; `NotFound` ("Task not found")."""
    row = db.execute(
        f"SELECT rowid, project_id, column_name, {_POSITION_SQL}, status FROM board_tasks t"
        " WHERE id = ?",
        (task_id,),
    ).fetchone()
    if row is None:
        raise NotFound("Task not found", details={"id": task_id})
    return tuple(row)


def get_task(db: sqlite_utils.Database, task_id: str) -> dict[str, Any]:
    """The board task; `NotFound` ("Task not found")."""
    fields = _TASK_FIELDS.replace("position", f"{_POSITION_SQL} AS position")
    row = db.execute(f"SELECT {fields} FROM board_tasks t WHERE id = ?", (task_id,)).fetchone()
    if row is None:
        raise NotFound("Task not found", details={"id": task_id})
    return _task_json(row)


def list_tasks(db: sqlite_utils.Database, query: TaskQuery | None = None) -> dict[str, Any]:
    """`{"tasks": [...], "total", "limit", "offset"}`: column order (backlog..done), then
    position; across projects, equal positions are ordered by project id.

    Positions are numbered over whole columns (`project_id` and `column`
    select whole columns, so they filter before the numbering; `status`
    after it, so a filtered list still shows each task's real position).
    With `project_id` the rows come from the `board_tasks_column` index and
    are numbered in Python (`_list_project_tasks`); across projects, by a
    window function. `NotFound` for an unknown project.
    """
    query = query or TaskQuery()
    if query.project_id is not None:
        _project_exists(db, query.project_id)
        return _list_project_tasks(db, query)
    columns: list[str] = []  # filters that keep whole (project, column) groups
    params: list[Any] = []
    if query.column is not None:
        columns.append("column_name = ?")
        params.append(query.column)
    statuses: list[Any] = [] if query.status is None else [query.status]
    inner = f"WHERE {' AND '.join(columns)}" if columns else ""
    outer = "WHERE status = ?" if statuses else ""
    every = " AND ".join([*columns, *(["status = ?"] if statuses else [])])
    total = int(
        db.execute(
            f"SELECT COUNT(*) FROM board_tasks {'WHERE ' + every if every else ''}",
            [*params, *statuses],
        ).fetchone()[0]
    )
    rows = db.execute(
        f"SELECT {_TASK_FIELDS} FROM (SELECT *, rowid AS rid, ROW_NUMBER() OVER"
        " (PARTITION BY project_id, column_name ORDER BY rank, rowid) - 1 AS position"
        f" FROM board_tasks {inner}) {outer}"
        f" ORDER BY {_COLUMN_ORDER_SQL}, position, project_id, rid LIMIT ? OFFSET ?",
        [*params, *statuses, query.limit, query.offset],
    ).fetchall()
    return {
        "tasks": [_task_json(row) for row in rows],
        "total": total,
        "limit": query.limit,
        "offset": query.offset,
    }


def _list_project_tasks(db: sqlite_utils.Database, query: TaskQuery) -> dict[str, Any]:
    """`list_tasks` of one project (the board's own view, the hot case): its tasks in
    index order, numbered here rather than by a window function in SQL (half the time
    for a thousand tasks), then put in column order and filtered by status."""
    assert query.project_id is not None
    where, params = "project_id = ?", [query.project_id]
    if query.column is not None:
        where, params = f"{where} AND column_name = ?", [*params, query.column]
    rows = db.execute(
        f"SELECT {_TASK_FIELDS.replace('position', 'NULL')} FROM board_tasks"
        f" WHERE {where} ORDER BY column_name, rank, rowid",
        params,
    ).fetchall()
    by_column: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        task = _task_json(row)
        numbered = by_column.setdefault(task["column"], [])
        task["position"] = len(numbered)
        numbered.append(task)
    tasks = [task for column in COLUMNS for task in by_column.get(column, ())]
    if query.status is not None:
        tasks = [task for task in tasks if task["status"] == query.status]
    return {
        "tasks": tasks[query.offset : query.offset + query.limit],
        "total": len(tasks),
        "limit": query.limit,
        "offset": query.offset,
    }


def _renumber(db: sqlite_utils.Database, project_id: str, column: str) -> None:
    """Give (project, column) the ranks 0, RANK_GAP, 2*RANK_GAP... in its current order.

    Not on the hot path: only when a task must go between two neighbours
    with no integer between their ranks, or ranks grew past `_RANK_LIMIT`.
    Only rows whose rank changes are written.
    """
    db.execute(
        "WITH ranked AS ("
        " SELECT rowid AS rid, (ROW_NUMBER() OVER (ORDER BY rank, rowid) - 1) * ? AS new"
        " FROM board_tasks WHERE project_id = ? AND column_name = ?)"
        " UPDATE board_tasks SET rank = ranked.new FROM ranked"
        " WHERE board_tasks.rowid = ranked.rid AND board_tasks.rank != ranked.new",
        (RANK_GAP, project_id, column),
    )


def _ranks(
    db: sqlite_utils.Database,
    project_id: str,
    column: str,
    skip: int,
    order: str,
    limit: int,
    offset: int,
) -> list[int]:
    """Ranks of (project, column) but the task with rowid `skip`, in `order`, a page."""
    return [
        int(row[0])
        for row in db.execute(
            "SELECT rank FROM board_tasks WHERE project_id = ? AND column_name = ?"
            f" AND rowid != ? ORDER BY rank {order}, rowid {order} LIMIT ? OFFSET ?",
            (project_id, column, skip, limit, offset),
        )
    ]


def _rank_at(
    db: sqlite_utils.Database, project_id: str, column: str, position: int | None, skip: int
) -> int:
    """The rank that puts a task at `position` (None or past the end: the end) of
    (project, column), where the task with rowid `skip` (if any) is not counted."""
    for _ in range(2):
        rank = _free_rank(db, project_id, column, position, skip)
        if rank is not None and abs(rank) < _RANK_LIMIT:
            return rank
        _renumber(db, project_id, column)  # no room between the neighbours: make some
    raise AssertionError("a renumbered column always has room")  # pragma: no cover


def _free_rank(
    db: sqlite_utils.Database, project_id: str, column: str, position: int | None, skip: int
) -> int | None:
    """`_rank_at` without renumbering: None when the two neighbours at `position` have
    no integer between their ranks."""
    if position == 0:
        first = _ranks(db, project_id, column, skip, "ASC", 1, 0)
        return first[0] - RANK_GAP if first else 0
    if position is not None and position < _RANK_LIMIT:  # (a larger one is past the end)
        around = _ranks(db, project_id, column, skip, "ASC", 2, position - 1)
        if len(around) == 2:
            low, high = around
            return (low + high) // 2 if high - low >= 2 else None
    last = _ranks(db, project_id, column, skip, "DESC", 1, 0)  # at or past the end
    return last[0] + RANK_GAP if last else 0


def _relocate(
    db: sqlite_utils.Database,
    rowid: int,
    project_id: str,
    column: str,
    position: int | None,
    status: str,
    now: str,
) -> None:
    """Put the task at `position` of `column` (None or past the end: the end): one row
    written (see the module)."""
    rank = _rank_at(db, project_id, column, position, rowid)
    db.execute(
        "UPDATE board_tasks SET column_name = ?, rank = ?, status = ?, updated_at = ?"
        " WHERE rowid = ?",
        (column, rank, status, now, rowid),
    )


def insert_task(
    db: sqlite_utils.Database,
    task: NewTask,
    *,
    task_id: str | None = None,
    now: str | None = None,
) -> dict[str, Any]:
    """Add a task to its project's board: at the end of its column, or at `task.position`
    (past the end = the end), the tasks from there on moving down one.
    `NotFound` for an unknown project."""
    _choice(task.column, "column", COLUMNS)
    if task.position is not None:
        _position(task.position)
    _project_exists(db, task.project_id)
    task_id = task_id or new_task_id()
    now = now or utc_now_iso()
    status = FAILED if task.failed else COLUMN_STATUS[task.column]
    rank = _rank_at(db, task.project_id, task.column, task.position, -1)
    cursor = db.execute(
        "INSERT INTO board_tasks (id, project_id, title, description, column_name, status,"
        " priority, rank, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            task_id,
            task.project_id,
            task.title,
            task.description,
            task.column,
            status,
            task.priority,
            rank,
            now,
            now,
        ),
    )
    (at,) = db.execute(
        f"SELECT {_POSITION_SQL} FROM board_tasks t WHERE rowid = ?", (cursor.lastrowid,)
    ).fetchone()
    return {
        "id": task_id,
        "project_id": task.project_id,
        "title": task.title,
        "description": task.description,
        "column": task.column,
        "status": status,
        "priority": task.priority,
        "position": at,
        "created_at": now,
        "updated_at": now,
    }


class Moved(NamedTuple):
    """What `move_task` did: the task now, where it was (None: the move left it where it
    was), and whether anything changed (a move to its own place with its own status
    writes nothing: no `updated_at`, no notification)."""

    task: dict[str, Any]
    came_from: dict[str, Any] | None
    changed: bool


def move_task(
    db: sqlite_utils.Database,
    task_id: str,
    column: str,
    position: int | None = None,
    *,
    status: str | None = None,
    now: str | None = None,
) -> Moved:
    """Move a task to `position` (0-based; None or past the end: the end) of `column`,
    in the caller's transaction (one row written; see the module).

    Moving to another column re-derives the status unless `status` is
    `failed`; a reorder in the same column keeps it. A move that leaves the
    task where it was changes at most its status (and then `updated_at`):
    its rank is not rewritten, and `came_from` is None.
    `ValidationFailed` on `column` / `position` / `status`, `NotFound` for no such task.
    """
    _choice(column, "column", COLUMNS)
    if position is not None:
        _position(position)
    if status is not None:
        _choice(status, "status", STATUSES)
        _status_for(column, status)
    rowid, project_id, source, old_position, old_status = _task_row(db, task_id)
    if status is not None:
        new_status = status
    elif column != source:
        new_status = COLUMN_STATUS[column]
    else:
        new_status = old_status
    now = now or utc_now_iso()
    if column == source and _landing(db, project_id, column, position) == old_position:
        if new_status == old_status:
            return Moved(get_task(db, task_id), None, changed=False)
        db.execute(
            "UPDATE board_tasks SET status = ?, updated_at = ? WHERE rowid = ?",
            (new_status, now, rowid),
        )
        return Moved(get_task(db, task_id), None, changed=True)
    _relocate(db, rowid, project_id, column, position, new_status, now)
    return Moved(get_task(db, task_id), {"column": source, "position": old_position}, True)


def _landing(db: sqlite_utils.Database, project_id: str, column: str, position: int | None) -> int:
    """The position a task of (project, column) ends at when moved to `position` of its
    own column (None or past the end: the last place)."""
    (count,) = db.execute(
        "SELECT COUNT(*) FROM board_tasks WHERE project_id = ? AND column_name = ?",
        (project_id, column),
    ).fetchone()
    last = int(count) - 1
    return last if position is None else min(position, last)


def update_task(
    db: sqlite_utils.Database,
    task_id: str,
    changes: TaskChanges,
    *,
    now: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Apply a `PUT /api/tasks/{id}`; return the task and, if its column or position
    changed, where it was (`{"column", "position"}`), else None.

    A `column` change is a move to the end unless `position` is given too;
    `position` alone reorders within the column. A non-failed `status` that
    does not fit the current column moves the task to the end of the
    status's column (`STATUS_COLUMN`).
    """
    if changes.position is not None:
        _position(changes.position)
    rowid, project_id, source, old_position, old_status = _task_row(db, task_id)
    now = now or utc_now_iso()
    target = changes.column or source
    if changes.status is not None and changes.status != FAILED and changes.column is None:
        if COLUMN_STATUS[source] != changes.status:
            target = STATUS_COLUMN[changes.status]
    else:
        _status_for(target, changes.status)
    if changes.status is not None:
        status = changes.status
    elif target != source:
        status = COLUMN_STATUS[target]
    else:
        status = old_status
    fields = {
        name: value
        for name, value in (
            ("title", changes.title),
            ("description", changes.description),
            ("priority", changes.priority),
        )
        if value is not None
    }
    if fields:
        names = sorted(fields)
        db.execute(
            f"UPDATE board_tasks SET {', '.join(f'{name} = ?' for name in names)} WHERE rowid = ?",
            [*(fields[name] for name in names), rowid],
        )
    if target != source or changes.position is not None:
        _relocate(db, rowid, project_id, target, changes.position, status, now)
    else:
        db.execute(
            "UPDATE board_tasks SET status = ?, updated_at = ? WHERE rowid = ?",
            (status, now, rowid),
        )
    task = get_task(db, task_id)
    came_from = {"column": source, "position": old_position}
    changed_place = task["column"] != source or task["position"] != old_position
    return task, came_from if changed_place else None


def delete_task(db: sqlite_utils.Database, task_id: str) -> dict[str, Any]:
    """Remove a task (the tasks after it in its column move up one, as positions are
    counted): `{"id", "project_id"}`."""
    rowid, project_id, _, _, _ = _task_row(db, task_id)
    db.execute("DELETE FROM board_tasks WHERE rowid = ?", (rowid,))
    return {"id": task_id, "project_id": project_id}
