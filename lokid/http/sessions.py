"""Session and task routes of the HTTP API (seed "Session/Task Endpoints", DESIGN.md §5).

Reads need no actor beyond the store: each view runs one read-only
transaction in a worker thread (`StoreActor.read`). Changes go to the
session manager, which hands each command to the session's actor (or, for
a session without one, decides it against the store).
"""

from __future__ import annotations

from typing import Any

from lokid import idempotency
from lokid.actors.session import Pause, Resume, Stop
from lokid.actors.session_manager import SessionManager
from lokid.actors.store import StoreActor
from lokid.config import PROVIDERS
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
    json_response,
    lean_json,
    path_param,
    query_params,
)
from lokid.providers import (
    MAX_COMMAND_ARG_CHARS,
    MAX_COMMAND_ARGS,
    MAX_MODEL_CHARS,
)
from lokid.session_records import (
    DEFAULT_LIMIT,
    MAX_AGENTS,
    MAX_DURATION_SECONDS,
    MAX_INPUT_BYTES,
    MAX_ITERATIONS,
    MAX_LIMIT,
    MAX_OFFSET,
    MAX_PATH_CHARS,
    MAX_VERIFY_CHARS,
    SESSION_STATUSES,
    TASK_STATUSES,
    active_tasks,
    get_session,
    get_task,
    list_sessions,
    list_tasks,
    parse_list_query,
    queued_tasks,
    validate_input_message,
)

PAGE_PARAMS = (
    Param(
        "limit",
        "query",
        {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT},
    ),
    Param("offset", "query", {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET}),
)
SESSION_STATUS = Param(
    "status",
    "query",
    {"type": "string", "enum": list(SESSION_STATUSES)},
    description="filter by session status",
)
TASK_STATUS = Param("status", "query", {"type": "string", "enum": list(TASK_STATUSES)})


def install_session_reads(surface: Surface, store: StoreActor) -> None:
    tags = ("sessions",)

    @surface.lean(
        "GET",
        "/api/sessions",
        "Sessions, newest first",
        responses={200: "A page of sessions"},
        params=(SESSION_STATUS, *PAGE_PARAMS),
        tags=tags,
        requires="read",
    )
    async def sessions_list(scope: Scope) -> LeanResponse:
        query = parse_list_query(query_params(scope), statuses=SESSION_STATUSES)
        return json_response(
            200,
            await store.read(
                lambda db: list_sessions(
                    db, status=query.status, limit=query.limit, offset=query.offset
                )
            ),
        )

    @surface.lean(
        "GET",
        "/api/sessions/{id}",
        "One session",
        responses={200: "The session", 404: "No such session"},
        tags=tags,
        requires="read",
    )
    async def session_detail(scope: Scope) -> LeanResponse:
        id = path_param(scope, "id")
        return json_response(200, await store.read(lambda db: get_session(db, id)))

    @surface.lean(
        "GET",
        "/api/sessions/{id}/tasks",
        "A session's tasks, in order",
        responses={200: "A page of tasks", 404: "No such session"},
        params=(TASK_STATUS, *PAGE_PARAMS),
        tags=("tasks",),
        requires="read",
    )
    async def session_tasks(scope: Scope) -> LeanResponse:
        id = path_param(scope, "id")
        query = parse_list_query(query_params(scope), statuses=TASK_STATUSES)
        return json_response(
            200,
            await store.read(
                lambda db: list_tasks(
                    db, session_id=id, status=query.status, limit=query.limit, offset=query.offset
                )
            ),
        )

    @surface.lean(
        "GET",
        "/api/sessions/{id}/tasks/{taskId}",
        "One task of a session",
        responses={200: "The task", 404: "No such session or task"},
        tags=("tasks",),
        requires="read",
    )
    async def session_task(scope: Scope) -> LeanResponse:
        id, task_id = path_param(scope, "id"), path_param(scope, "taskId")
        return json_response(200, await store.read(lambda db: get_task(db, id, task_id)))


def install_task_reads(surface: Surface, store: StoreActor) -> None:
    """`/api/tasks*`: tasks across sessions (only on the API listener, where the
    dashboard listener's `/api/tasks` is the board's)."""

    @surface.lean(
        "GET",
        "/api/tasks",
        "Tasks of every session",
        responses={200: "A page of tasks"},
        params=(TASK_STATUS, *PAGE_PARAMS),
        tags=("tasks",),
        requires="read",
    )
    async def tasks_list(scope: Scope) -> LeanResponse:
        query = parse_list_query(query_params(scope), statuses=TASK_STATUSES)
        return json_response(
            200,
            await store.read(
                lambda db: list_tasks(
                    db, status=query.status, limit=query.limit, offset=query.offset
                )
            ),
        )

    @surface.lean(
        "GET",
        "/api/tasks/active",
        "Tasks an agent is working on now",
        responses={200: "A page of tasks"},
        params=PAGE_PARAMS,
        tags=("tasks",),
        requires="read",
    )
    async def tasks_active(scope: Scope) -> LeanResponse:
        query = parse_list_query(query_params(scope), statuses=None)
        return json_response(
            200,
            await store.read(lambda db: active_tasks(db, limit=query.limit, offset=query.offset)),
        )

    @surface.lean(
        "GET",
        "/api/tasks/queue",
        "Pending tasks of active sessions, in the order they will run",
        responses={200: "A page of tasks"},
        params=PAGE_PARAMS,
        tags=("tasks",),
        requires="read",
    )
    async def tasks_queue(scope: Scope) -> LeanResponse:
        query = parse_list_query(query_params(scope), statuses=None)
        return json_response(
            200,
            await store.read(lambda db: queued_tasks(db, limit=query.limit, offset=query.offset)),
        )


NO_NUL = "^[^\\x00]*$"


def _text(most: int, **extra: Any) -> dict[str, Any]:
    """A string field of a session body: 1..`most` characters, no NUL; null = left out."""
    return {
        "type": ["string", "null"],
        "minLength": 1,
        "maxLength": most,
        "pattern": NO_NUL,
        **extra,
    }


def _count(most: int) -> dict[str, Any]:
    return {"type": ["integer", "null"], "minimum": 1, "maximum": most}


SESSION_BODY: dict[str, Any] = {
    "type": "object",
    "description": "Exactly one of prd and prdText. A null counts as left out. What a schema "
    "cannot say is a 422 naming the field: the PRD file must exist and be UTF-8 text "
    "(at most 5 MiB), projectDir an existing writable folder without an active session "
    "(else 409), the provider's CLI (or bubblewrap, for sandbox) must be installed, "
    "options.command is for provider command only (which needs it).",
    "additionalProperties": False,
    "oneOf": [
        {"required": ["prd"], "properties": {"prd": {"type": "string"}}},
        {"required": ["prdText"], "properties": {"prdText": {"type": "string"}}},
    ],
    "properties": {
        "prd": _text(
            MAX_PATH_CHARS,
            description="path of the PRD: absolute (or ~), or relative to projectDir",
        ),
        "prdText": {
            "type": ["string", "null"],
            "pattern": f"^[^\\x00]*[^{SPACE}\\x00][^\\x00]*$",
            "description": "the PRD itself, instead of prd (needs projectDir): UTF-8 text "
            "of at most 5 MiB, not only white space",
        },
        "projectDir": _text(
            MAX_PATH_CHARS,
            pattern="^[/~][^\\x00]*$",
            description="absolute (or ~); default: the PRD's nearest ancestor holding .git or "
            ".loki, else its folder",
        ),
        "provider": {"type": ["string", "null"], "enum": [*PROVIDERS, None]},
        "options": {
            "type": ["object", "null"],
            "additionalProperties": False,
            "properties": {
                "parallel": {"type": ["boolean", "null"]},
                "sandbox": {"type": ["boolean", "null"]},
                "maxAgents": _count(MAX_AGENTS),
                "maxIterations": _count(MAX_ITERATIONS),
                "maxDurationSeconds": _count(MAX_DURATION_SECONDS),
                "budgetUsd": {"type": ["number", "null"], "exclusiveMinimum": 0},
                "model": _text(
                    MAX_MODEL_CHARS,
                    pattern="^[A-Za-z0-9][A-Za-z0-9._:/@\\[\\]+-]*$",
                    description="one model name",
                ),
                "verify": _text(MAX_VERIFY_CHARS, description="a shell command"),
                "command": {
                    "type": ["array", "null"],
                    "minItems": 1,
                    "maxItems": MAX_COMMAND_ARGS,
                    "items": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": MAX_COMMAND_ARG_CHARS,
                        "pattern": NO_NUL,
                    },
                    "description": "provider command: the argv (no shell); {model} and "
                    "{projectDir} are replaced, the prompt comes on stdin",
                },
            },
        },
    },
}
INPUT_BODY = {
    "type": "object",
    "required": ["message"],
    "additionalProperties": False,
    "properties": {
        "message": {
            "type": "string",
            "minLength": 1,
            "pattern": f"[^{SPACE}]",
            # A limit in bytes, which maxLength (characters) cannot state
            "description": f"not only white space; at most {MAX_INPUT_BYTES} bytes as UTF-8 "
            "(else 422)",
        }
    },
}
COMMAND_BODY = {
    "type": "object",
    "description": "Optional, and ignored; if sent, it must be a JSON object",
}
IDEMPOTENCY = Param(
    idempotency.HEADER,
    "header",
    IDEMPOTENCY_KEY,
    description="the same key and body within 24 h: the first answer",
)
NOW = Param("now", "query", BOOLEAN_PARAM, description="stop running agents too")
ID = "$response.body#/id"
SESSION_LINKS: dict[str, Link] = {
    "GetSession": ("GET", "/api/sessions/{id}", {"id": ID}),
    "SessionTasks": ("GET", "/api/sessions/{id}/tasks", {"id": ID}),
    "StopSession": ("POST", "/api/sessions/{id}/stop", {"id": ID}),
    "PauseSession": ("POST", "/api/sessions/{id}/pause", {"id": ID}),
    "ResumeSession": ("POST", "/api/sessions/{id}/resume", {"id": ID}),
    "SessionInput": ("POST", "/api/sessions/{id}/input", {"id": ID}),
    "DeleteSession": ("DELETE", "/api/sessions/{id}", {"id": ID}),
}
CREATED_SCHEMA = {
    "type": "object",
    "required": ["id", "status", "createdAt"],
    "properties": {
        "id": {"type": "string", "pattern": "^session-[0-9a-z]+$"},
        "status": {"type": "string", "enum": list(SESSION_STATUSES)},
        "createdAt": {"type": "string", "format": "date-time"},
    },
}


def install_session_writes(surface: Surface, manager: SessionManager) -> None:
    tags = ("sessions",)

    @surface.lean(
        "POST",
        "/api/sessions",
        "Start a session",
        responses={
            201: "Created (status starting)",
            400: "Malformed JSON or Idempotency-Key",
            409: "projectDir has an active session, or the key was used for another body",
            422: "Invalid field (details.field)",
        },
        params=(IDEMPOTENCY,),
        request_body=SESSION_BODY,
        response_schema=CREATED_SCHEMA,
        links=SESSION_LINKS,
        tags=tags,
        requires="write",
    )
    async def session_create(scope: Scope) -> LeanResponse:
        key = idempotency_key(scope)
        status, answer = await manager.create(lean_json(scope), idempotency_key=key)
        return json_response(status, answer)

    def command_route(name: str, summary: str, make: Any, params: tuple[Param, ...] = ()) -> None:
        @surface.lean(
            "POST",
            f"/api/sessions/{{id}}/{name}",
            summary,
            responses={
                200: "The session after the transition",
                404: "No such session",
                409: "Illegal in the current status (details.status)",
            },
            params=params,
            request_body=COMMAND_BODY,
            tags=tags,
            requires="write",
        )
        async def view(scope: Scope) -> LeanResponse:
            id = path_param(scope, "id")
            lean_json(scope)  # a body is optional, but must be JSON if given
            return json_response(200, await manager.command(id, make(scope)))

        view.__name__ = f"session_{name}"

    command_route("stop", "Stop a session", lambda scope: Stop())
    command_route(
        "pause",
        "Pause a session (between agent runs; ?now=true also stops running agents)",
        lambda scope: Pause(now=bool_param(query_params(scope), "now", False)),
        (NOW,),
    )
    command_route("resume", "Resume a paused or interrupted session", lambda scope: Resume())

    @surface.lean(
        "POST",
        "/api/sessions/{id}/input",
        "Send human input into the next agent prompt",
        responses={
            202: "Queued; a retry (same Idempotency-Key and message): the first answer",
            400: "Malformed JSON or Idempotency-Key",
            404: "No such session",
            409: "Not running or paused, or the key was used for another message",
            422: "Invalid message",
        },
        params=(IDEMPOTENCY,),
        request_body=INPUT_BODY,
        tags=tags,
        requires="write",
    )
    async def session_input(scope: Scope) -> LeanResponse:
        id = path_param(scope, "id")
        key = idempotency_key(scope)
        message = validate_input_message(lean_json(scope))
        return json_response(202, await manager.add_input(id, message, idempotency_key=key))

    @surface.lean(
        "DELETE",
        "/api/sessions/{id}",
        "Delete a session that is not active (its record, tasks and events)",
        responses={204: "Deleted", 404: "No such session", 409: "Active"},
        tags=tags,
        requires="write",
    )
    async def session_delete(scope: Scope) -> LeanResponse:
        id = path_param(scope, "id")
        await manager.delete(id)
        return LeanResponse(204, b"")
