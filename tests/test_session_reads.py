"""Read routes of sessions and tasks over a real in-process daemon and store."""

from __future__ import annotations

import pathlib
from typing import Any

import httpx
import pytest

from lokid.daemon import Daemon
from lokid.prd import PrdTask, parse_prd
from lokid.session_records import (
    SessionRequest,
    insert_session,
    insert_tasks,
    parse_session_request,
    update_task,
)

from .test_events_http import api, running_daemon, stream


def write_project(project: pathlib.Path) -> tuple[SessionRequest, list[PrdTask]]:
    project.mkdir()
    prd = project / "prd.md"
    prd.write_text("# App\n\n## Features\n\n- Login page\n- Logout button\n")
    request = parse_session_request(
        {"prd": str(prd), "provider": "claude"},
        default_provider="claude",
        which=lambda name: f"/usr/bin/{name}",  # the CLI counts as installed
    )
    return request, parse_prd(prd.read_text())


async def make_session(daemon: Daemon, project: pathlib.Path) -> dict[str, Any]:
    request, tasks = write_project(project)

    def create(db: Any) -> dict[str, Any]:
        session = insert_session(db, request)
        insert_tasks(db, session["id"], tasks)
        return session

    return await daemon.store.write(create)


async def test_sessions_and_their_tasks(tmp_path: pathlib.Path) -> None:
    async with running_daemon(tmp_path / "home") as daemon, httpx.AsyncClient(timeout=10) as client:
        session = await make_session(daemon, tmp_path / "project")
        sid = session["id"]
        listed = (await client.get(api(daemon) + "/api/sessions")).json()
        assert [s["id"] for s in listed["sessions"]] == [sid]
        assert (listed["total"], listed["limit"], listed["offset"]) == (1, 100, 0)
        detail = (await client.get(api(daemon) + f"/api/sessions/{sid}")).json()
        assert detail["status"] == "starting"
        assert detail["tasks"] == {
            "total": 2,
            "pending": 2,
            "active": 0,
            "completed": 0,
            "failed": 0,
        }
        tasks = (await client.get(api(daemon) + f"/api/sessions/{sid}/tasks")).json()
        assert [t["title"] for t in tasks["tasks"]] == ["Login page", "Logout button"]
        one = (await client.get(api(daemon) + f"/api/sessions/{sid}/tasks/prd-002")).json()
        assert (one["id"], one["sessionId"], one["source"]) == ("prd-002", sid, "prd")
        await daemon.store.write(lambda db: update_task(db, sid, "prd-001", status="active"))
        active = (await client.get(api(daemon) + "/api/tasks/active")).json()
        assert [t["id"] for t in active["tasks"]] == ["prd-001"]
        pending = (await client.get(api(daemon) + "/api/tasks?status=pending")).json()
        assert [t["id"] for t in pending["tasks"]] == ["prd-002"]
        queue = (await client.get(api(daemon) + "/api/tasks/queue")).json()
        assert [t["id"] for t in queue["tasks"]] == ["prd-002"]


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/api/sessions/session-nope", 404, "NOT_FOUND"),
        ("/api/sessions/session-nope/tasks", 404, "NOT_FOUND"),
        ("/api/sessions/session-nope/tasks/prd-001", 404, "NOT_FOUND"),
        ("/api/sessions?limit=abc", 400, "BAD_REQUEST"),
        ("/api/sessions?status=sleeping", 400, "BAD_REQUEST"),
        ("/api/tasks?status=done", 400, "BAD_REQUEST"),
        ("/api/tasks/queue?offset=-1", 400, "BAD_REQUEST"),
    ],
)
async def test_read_errors_use_the_error_body(
    tmp_path: pathlib.Path, path: str, status: int, code: str
) -> None:
    async with running_daemon(tmp_path) as daemon, httpx.AsyncClient(timeout=10) as client:
        answer = await client.get(api(daemon) + path)
    assert answer.status_code == status
    assert answer.json()["error"]["code"] == code


async def test_empty_lists_are_lists(tmp_path: pathlib.Path) -> None:
    async with running_daemon(tmp_path) as daemon, httpx.AsyncClient(timeout=10) as client:
        for path, key in (("/api/sessions", "sessions"), ("/api/tasks", "tasks")):
            body = (await client.get(api(daemon) + path)).json()
            assert body == {key: [], "total": 0, "limit": 100, "offset": 0}


async def test_a_deleted_sessions_events_are_not_replayed(tmp_path: pathlib.Path) -> None:
    """Regression: DELETE removed the rows, but a replay with Last-Event-ID served from the
    bus's in-memory tail still sent the deleted session's events."""
    async with running_daemon(tmp_path / "home") as daemon, httpx.AsyncClient(timeout=10) as client:
        sid = (await make_session(daemon, tmp_path / "project"))["id"]
        await daemon.store.write(
            lambda db: db.execute("UPDATE sessions SET status = 'completed' WHERE id = ?", [sid])
        )
        mark = (await daemon.bus.publish("log", None, data={"message": "mark"})).id
        ids: dict[str | None, list[int]] = {sid: [], "other": []}
        for n in range(3):
            for owner in (sid, "other"):
                ids[owner].append((await daemon.bus.publish("log", owner, data={"n": n})).id)
        deleted = await client.delete(f"{api(daemon)}/api/sessions/{sid}")
        assert deleted.status_code == 204, deleted.text
        headers = {"Last-Event-ID": str(mark)}
        async with stream(api(daemon), None, headers) as sse:
            replayed = await sse.events(3)
            live = (await daemon.bus.publish("log", "other")).id
            assert [e["id"] for e in replayed + await sse.events(1)] == [*ids["other"], live]
        async with stream(api(daemon), {"sessionId": sid}, headers) as sse:
            live = (await daemon.bus.publish("log", sid)).id  # a first event after the delete
            assert [e["id"] for e in await sse.events(1)] == [live]
