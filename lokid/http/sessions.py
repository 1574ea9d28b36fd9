"""Session and task routes of the HTTP API that read the store (seed "Session/Task Endpoints").

Reading needs no actor beyond the store: each view runs one read-only
transaction in a worker thread (`StoreActor.read`). The routes that change
a session (create, stop, pause, resume, input, delete) arrive with the
session actor, which owns those transitions.
"""

from __future__ import annotations

from typing import Any

from quart import request

from lokid.actors.store import StoreActor
from lokid.http.surface import Param, Surface
from lokid.session_records import (
    TASK_STATUSES,
    active_tasks,
    get_session,
    get_task,
    list_sessions,
    list_tasks,
    parse_list_query,
    queued_tasks,
)

PAGE_PARAMS = (
    Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 1000}),
    Param("offset", "query", {"type": "integer", "minimum": 0}),
)
SESSION_STATUS = Param("status", "query", description="filter by session status")
TASK_STATUS = Param("status", "query", {"type": "string", "enum": list(TASK_STATUSES)})


def install_session_reads(surface: Surface, store: StoreActor) -> None:
    tags = ("sessions",)

    @surface.route(
        "GET",
        "/api/sessions",
        "Sessions, newest first",
        responses={200: "A page of sessions"},
        params=(SESSION_STATUS, *PAGE_PARAMS),
        tags=tags,
    )
    async def sessions_list() -> dict[str, Any]:
        query = parse_list_query(request.args)
        return await store.read(
            lambda db: list_sessions(
                db, status=query.status, limit=query.limit, offset=query.offset
            )
        )

    @surface.route(
        "GET",
        "/api/sessions/{id}",
        "One session",
        responses={200: "The session", 404: "No such session"},
        tags=tags,
    )
    async def session_detail(id: str) -> dict[str, Any]:
        return await store.read(lambda db: get_session(db, id))

    @surface.route(
        "GET",
        "/api/sessions/{id}/tasks",
        "A session's tasks, in order",
        responses={200: "A page of tasks", 404: "No such session"},
        params=(TASK_STATUS, *PAGE_PARAMS),
        tags=("tasks",),
    )
    async def session_tasks(id: str) -> dict[str, Any]:
        query = parse_list_query(request.args, statuses=TASK_STATUSES)
        return await store.read(
            lambda db: list_tasks(
                db, session_id=id, status=query.status, limit=query.limit, offset=query.offset
            )
        )

    @surface.route(
        "GET",
        "/api/sessions/{id}/tasks/{taskId}",
        "One task of a session",
        responses={200: "The task", 404: "No such session or task"},
        tags=("tasks",),
    )
    async def session_task(id: str, taskId: str) -> dict[str, Any]:
        return await store.read(lambda db: get_task(db, id, taskId))

    @surface.route(
        "GET",
        "/api/tasks",
        "Tasks of every session",
        responses={200: "A page of tasks"},
        params=(TASK_STATUS, *PAGE_PARAMS),
        tags=("tasks",),
    )
    async def tasks_list() -> dict[str, Any]:
        query = parse_list_query(request.args, statuses=TASK_STATUSES)
        return await store.read(
            lambda db: list_tasks(db, status=query.status, limit=query.limit, offset=query.offset)
        )

    @surface.route(
        "GET",
        "/api/tasks/active",
        "Tasks an agent is working on now",
        responses={200: "A page of tasks"},
        params=PAGE_PARAMS,
        tags=("tasks",),
    )
    async def tasks_active() -> dict[str, Any]:
        query = parse_list_query(request.args)
        return await store.read(lambda db: active_tasks(db, limit=query.limit, offset=query.offset))

    @surface.route(
        "GET",
        "/api/tasks/queue",
        "Pending tasks of active sessions, in the order they will run",
        responses={200: "A page of tasks"},
        params=PAGE_PARAMS,
        tags=("tasks",),
    )
    async def tasks_queue() -> dict[str, Any]:
        query = parse_list_query(request.args)
        return await store.read(lambda db: queued_tasks(db, limit=query.limit, offset=query.offset))
