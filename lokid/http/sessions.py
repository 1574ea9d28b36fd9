"""Session and task routes of the HTTP API (seed "Session/Task Endpoints", DESIGN.md §5).

Reads need no actor beyond the store: each view runs one read-only
transaction in a worker thread (`StoreActor.read`). Changes go to the
session manager, which hands each command to the session's actor (or, for
a session without one, decides it against the store).
"""

from __future__ import annotations

from typing import Any

from lokid import idempotency
from lokid.actors.session import Input, Pause, Resume, Stop
from lokid.actors.session_manager import SessionManager
from lokid.actors.store import StoreActor
from lokid.http.surface import (
    LeanResponse,
    Param,
    Scope,
    Surface,
    bool_param,
    header,
    json_response,
    lean_json,
    path_param,
    query_params,
)
from lokid.session_records import (
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
    Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 1000}),
    Param("offset", "query", {"type": "integer", "minimum": 0}),
)
SESSION_STATUS = Param("status", "query", description="filter by session status")
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
        query = parse_list_query(query_params(scope))
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
        query = parse_list_query(query_params(scope))
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
        query = parse_list_query(query_params(scope))
        return json_response(
            200,
            await store.read(lambda db: queued_tasks(db, limit=query.limit, offset=query.offset)),
        )


SESSION_BODY = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "prd": {"type": "string", "description": "path of the PRD (absolute, or under projectDir)"},
        "prdText": {"type": "string", "description": "the PRD itself, instead of prd"},
        "projectDir": {"type": "string"},
        "provider": {
            "type": "string",
            "enum": ["claude", "codex", "gemini", "aider", "cline", "opencode", "command"],
        },
        "options": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "parallel": {"type": "boolean"},
                "sandbox": {"type": "boolean"},
                "maxAgents": {"type": "integer", "minimum": 1},
                "maxIterations": {"type": "integer", "minimum": 1},
                "maxDurationSeconds": {"type": "integer", "minimum": 1},
                "budgetUsd": {"type": "number", "exclusiveMinimum": 0},
                "model": {"type": "string"},
                "verify": {"type": "string"},
                "command": {"type": "array", "items": {"type": "string"}},
            },
        },
    },
}
INPUT_BODY = {
    "type": "object",
    "required": ["message"],
    "additionalProperties": False,
    "properties": {"message": {"type": "string", "maxLength": 65536}},
}
IDEMPOTENCY = Param(
    idempotency.HEADER, "header", description="the same key and body within 24 h: the first answer"
)
NOW = Param("now", "query", {"type": "boolean"}, description="stop running agents too")


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
        tags=tags,
        requires="write",
    )
    async def session_create(scope: Scope) -> LeanResponse:
        key = idempotency.validate_key(header(scope, idempotency.HEADER))
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
            202: "Queued",
            404: "No such session",
            409: "Not running or paused",
            422: "Invalid message",
        },
        request_body=INPUT_BODY,
        tags=tags,
        requires="write",
    )
    async def session_input(scope: Scope) -> LeanResponse:
        id = path_param(scope, "id")
        message = validate_input_message(lean_json(scope))
        return json_response(202, await manager.command(id, Input(message)))

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
