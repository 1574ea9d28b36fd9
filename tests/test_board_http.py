"""The project and board-task routes over in-memory ASGI, on a real store.

A `Surface` with only `install_board` on it and a real `StoreActor` on a
temp file: every bad input gets the seed's error body with the right status
and `details.field`; every committed change is announced once through
`notify`; and 50 concurrent moves leave every column numbered 0..n-1 with no
task lost (issue 6).
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from lokid import board
from lokid.actors.audit_writer import AuditWriter
from lokid.actors.store import StoreActor
from lokid.http.board import install_board
from lokid.http.gate import Gate
from lokid.http.surface import Surface

from .asgi import Answer, call
from .child_status import StubChildStatus
from .test_board import PROJECT_KEYS, TASK_KEYS
from .test_http_conventions import documented, implemented

WAIT = 10.0  # the bound of every wait on the store in this file
MISSING_PROJECT = "proj-000000000000"
MISSING_TASK = "task-000000000000"


@attrs.define
class Board:
    """The app under test, its store and what it announced."""

    app: Surface
    store: StoreActor
    notes: list[tuple[str, dict[str, Any]]] = attrs.Factory(list)

    def notify(self, kind: str, data: dict[str, Any]) -> None:
        self.notes.append((kind, data))

    async def send(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        sent = {"content-type": "application/json", **(headers or {})}
        with trio.fail_after(WAIT):
            return await call(self.app, method, path, body=data, headers=sent)

    async def ok(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        answer = await self.send(method, path, body)
        assert answer.status == status, answer.body
        return answer.json() if answer.body else None

    async def project(self, name: str = "p", **fields: Any) -> dict[str, Any]:
        made: dict[str, Any] = await self.ok("POST", "/api/projects", {"name": name, **fields}, 201)
        return made

    async def task(self, project_id: str, title: str = "t", **fields: Any) -> dict[str, Any]:
        made: dict[str, Any] = await self.ok(
            "POST", "/api/tasks", {"project_id": project_id, "title": title, **fields}, 201
        )
        return made

    async def listing(self, query: str) -> list[dict[str, Any]]:
        page = await self.ok("GET", f"/api/tasks?{query}&limit=1000")
        tasks: list[dict[str, Any]] = page["tasks"]
        assert page["total"] == len(tasks)
        return tasks


@contextlib.asynccontextmanager
async def running(path: Path) -> AsyncIterator[StoreActor]:
    store = StoreActor(path)
    status = StubChildStatus()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(store.run, task_status=status))
        with trio.fail_after(WAIT):
            await status.started_event.wait()
        yield store
        status.shutdown_requested.set()


@pytest.fixture
async def the_board(tmp_path: Path) -> AsyncIterator[Board]:
    async with running(tmp_path / "data" / "lokid.db") as store:
        surface = Surface("test", "0")
        made = Board(surface, store)
        install_board(surface, store, made.notify)
        yield made


async def test_an_audited_change_shares_the_fsync_of_its_audit_entry(tmp_path: Path) -> None:
    """Each create is two commits (the row, then its audit entry) but one fsync: the
    row's commit is deferred to the audit entry's (lokid.actors.store, SYNC_FOLLOWS)."""
    async with running(tmp_path / "lokid.db") as store:
        writer = AuditWriter(store)
        status = StubChildStatus()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(writer.run, task_status=status))
            with trio.fail_after(WAIT):
                await status.started_event.wait()
            surface = Surface("test", "0")
            surface.gate = Gate(audit=writer)
            made = Board(surface, store)
            install_board(surface, store, made.notify)
            before, audited = store.statistics(), writer.last_id
            project = await made.project()
            await made.task(project["id"])
            after = store.statistics()
            assert writer.last_id - audited == 2
            assert after.commits_deferred - before.commits_deferred == 2
            assert after.batches - before.batches == 4  # two rows, two audit entries
            # A refused change writes nothing and is audited durably all the same.
            answer = await made.send("POST", "/api/tasks", {"project_id": MISSING_PROJECT})
            assert answer.status == 422
            assert store.statistics().commits_deferred == after.commits_deferred
            assert writer.last_id - audited == 3
            status.shutdown_requested.set()


def error_of(answer: Answer, status: int, code: str) -> dict[str, Any]:
    """Assert the seed's error body with `status` and `code`; return its `error` object."""
    assert answer.status == status, answer.body
    body = answer.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["details"], dict), error
    return error


def columns_of(tasks: list[dict[str, Any]]) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for item in tasks:
        found.setdefault(item["column"], []).append(item["position"])
    return found


def assert_dense(tasks: list[dict[str, Any]]) -> None:
    for column, positions in columns_of(tasks).items():
        assert sorted(positions) == list(range(len(positions))), (column, positions)


# -- projects ---------------------------------------------------------------------------


async def test_project_lifecycle_and_notifications(the_board: Board, tmp_path: Path) -> None:
    folder = tmp_path / "app"
    folder.mkdir()
    made = await the_board.project("app", path=str(folder / ".." / "app"), description="d")
    assert list(made) == PROJECT_KEYS
    assert made["path"] == str(folder.resolve())
    assert (made["name"], made["status"], made["taskCount"]) == ("app", "active", 0)
    other = await the_board.project("other")
    await the_board.task(made["id"])
    await the_board.task(made["id"])

    listed = await the_board.ok("GET", "/api/projects")
    assert isinstance(listed, list)  # the seed's bare array
    assert [(p["id"], p["taskCount"]) for p in listed] == [(other["id"], 0), (made["id"], 2)]
    assert (await the_board.ok("GET", f"/api/projects/{made['id']}"))["taskCount"] == 2

    changed = await the_board.ok(
        "PUT", f"/api/projects/{made['id']}", {"name": "renamed", "status": "archived"}
    )
    assert (changed["name"], changed["status"], changed["path"]) == (
        "renamed",
        "archived",
        made["path"],
    )
    archived = await the_board.ok("GET", "/api/projects?status=archived")
    assert [p["id"] for p in archived] == [made["id"]]
    cleared = await the_board.ok("PUT", f"/api/projects/{made['id']}", {"path": None})
    assert cleared["path"] is None
    for nothing in ({}, {"name": None, "status": None}):  # a null counts as left out
        same = await the_board.ok("PUT", f"/api/projects/{made['id']}", nothing)
        assert same == cleared  # nothing to change: nothing written, nothing announced

    deleted = await the_board.send("DELETE", f"/api/projects/{made['id']}")
    assert (deleted.status, deleted.body) == (204, b"")
    error_of(await the_board.send("GET", f"/api/projects/{made['id']}"), 404, "NOT_FOUND")
    assert (await the_board.listing("")) == []  # its tasks went with it

    kinds = [kind for kind, _ in the_board.notes]
    assert kinds == [
        "project.created",
        "project.created",
        "task.created",
        "task.created",
        "project.updated",
        "project.updated",
        "project.deleted",
    ]
    assert the_board.notes[0][1] == made
    assert the_board.notes[4][1] == changed
    assert the_board.notes[-1][1] == {
        "id": made["id"],
        "project_id": made["id"],
        "tasks_deleted": 2,
    }


async def test_the_project_list_is_bounded_like_every_list(the_board: Board) -> None:
    """`GET /api/projects` without `limit` answered every project (no bound); now a page
    of at most 100 (DESIGN.md §4), up to 1000 on request, still the seed's bare array;
    the rest is reached with offset."""
    await the_board.store.write(
        lambda db: [
            board.insert_project(
                db, board.NewProject(f"p{i:04}"), now=f"2026-01-01T00:{i // 60:02}:{i % 60:02}.000Z"
            )
            for i in range(1001)
        ]
    )
    first = await the_board.ok("GET", "/api/projects")
    assert isinstance(first, list) and len(first) == 100
    assert [p["name"] for p in first[:2]] == ["p1000", "p0999"]  # newest first
    most = await the_board.ok("GET", "/api/projects?limit=1000")
    assert len(most) == 1000 and most[:100] == first
    rest = await the_board.ok("GET", "/api/projects?limit=1000&offset=1000")
    assert [p["name"] for p in rest] == ["p0000"]
    answer = await the_board.send("GET", "/api/projects?limit=1001")
    error = error_of(answer, 400, "BAD_REQUEST")
    assert error["details"]["field"] == "limit"


async def test_project_message_is_the_seed_s(the_board: Board) -> None:
    error = error_of(
        await the_board.send("GET", f"/api/projects/{MISSING_PROJECT}"), 404, "NOT_FOUND"
    )
    assert error["message"] == "Project not found"
    for method, body in (("PUT", {"name": "x"}), ("DELETE", None)):
        answer = await the_board.send(method, f"/api/projects/{MISSING_PROJECT}", body)
        error_of(answer, 404, "NOT_FOUND")
    assert the_board.notes == []


async def test_bad_project_input(the_board: Board, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    cases: list[tuple[dict[str, Any], str]] = [
        ({}, "name"),
        ({"name": ""}, "name"),
        ({"name": "x" * 201}, "name"),
        ({"name": "a\nb"}, "name"),
        ({"name": 5}, "name"),
        ({"name": "a", "path": str(tmp_path / "missing")}, "path"),
        ({"name": "a", "path": str(tmp_path / "file")}, "path"),
        ({"name": "a", "path": "relative"}, "path"),
        ({"name": "a", "description": "x" * 10_001}, "description"),
        ({"name": "a", "tenant_id": 1}, "tenant_id"),
    ]
    for body, field in cases:
        error = error_of(
            await the_board.send("POST", "/api/projects", body), 422, "VALIDATION_ERROR"
        )
        assert error["details"]["field"] == field, body
    made = await the_board.project()
    for body, field in (
        ({"status": "done"}, "status"),
        ({"name": ""}, "name"),
        ({"path": str(tmp_path / "missing")}, "path"),
        ({"taskCount": 9}, "taskCount"),
    ):
        answer = await the_board.send("PUT", f"/api/projects/{made['id']}", body)
        assert error_of(answer, 422, "VALIDATION_ERROR")["details"]["field"] == field, body
    for query, field in (("status=gone", "status"), ("limit=0", "limit"), ("offset=x", "offset")):
        answer = await the_board.send("GET", f"/api/projects?{query}")
        assert error_of(answer, 400, "BAD_REQUEST")["details"]["field"] == field
    assert (await the_board.ok("GET", "/api/projects"))[0] == made  # nothing changed
    assert [kind for kind, _ in the_board.notes] == ["project.created"]


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b"{not json", 400, "BAD_REQUEST"),
        (b"[1, 2]", 400, "BAD_REQUEST"),
        (b'"name"', 400, "BAD_REQUEST"),
        (b"\xff\xfe", 400, "BAD_REQUEST"),
    ],
)
@pytest.mark.parametrize("path", ["/api/projects", "/api/tasks", f"/api/tasks/{MISSING_TASK}/move"])
async def test_malformed_bodies_are_400(
    the_board: Board, raw: bytes, status: int, code: str, path: str
) -> None:
    error_of(await the_board.send("POST", path, raw=raw), status, code)


# -- tasks ---------------------------------------------------------------------------------


async def test_task_lifecycle_and_notifications(the_board: Board) -> None:
    project_id = (await the_board.project())["id"]
    the_board.notes.clear()
    first = await the_board.task(project_id, "first", description="d", priority="high")
    assert list(first) == TASK_KEYS
    assert (first["column"], first["status"], first["position"], first["priority"]) == (
        "backlog",
        "pending",
        0,
        "high",
    )
    second = await the_board.task(project_id, "second")
    front = await the_board.task(project_id, "front", position=0)
    assert front["position"] == 0
    assert [t["title"] for t in await the_board.listing(f"project_id={project_id}")] == [
        "front",
        "first",
        "second",
    ]
    assert await the_board.ok("GET", f"/api/tasks/{first['id']}") == {**first, "position": 1}

    moved = await the_board.ok(
        "POST", f"/api/tasks/{first['id']}/move", {"column": "in_progress", "position": 0}
    )
    assert (moved["column"], moved["position"], moved["status"]) == ("in_progress", 0, "active")
    updated = await the_board.ok("PUT", f"/api/tasks/{second['id']}", {"title": "2nd"})
    assert (updated["title"], updated["position"]) == ("2nd", 1)
    put_moved = await the_board.ok("PUT", f"/api/tasks/{second['id']}", {"column": "done"})
    assert (put_moved["column"], put_moved["position"], put_moved["status"]) == (
        "done",
        0,
        "completed",
    )
    unchanged = await the_board.ok("PUT", f"/api/tasks/{second['id']}", {})
    assert unchanged == put_moved  # nothing to change: nothing written, nothing announced
    deleted = await the_board.send("DELETE", f"/api/tasks/{front['id']}")
    assert (deleted.status, deleted.body) == (204, b"")
    error_of(await the_board.send("GET", f"/api/tasks/{front['id']}"), 404, "NOT_FOUND")

    assert the_board.notes == [
        ("task.created", first),
        ("task.created", second),
        ("task.created", front),
        ("task.moved", {**moved, "from": {"column": "backlog", "position": 1}}),
        ("task.updated", updated),
        ("task.updated", {**put_moved, "from": {"column": "backlog", "position": 1}}),
        ("task.deleted", {"id": front["id"], "project_id": project_id}),
    ]
    assert_dense(await the_board.listing(f"project_id={project_id}"))


async def test_a_move_that_leaves_the_task_where_it_was(the_board: Board) -> None:
    """docs/board.md: `from` is null when the task stayed; a move that changes nothing
    writes nothing (no new `updated_at`) and announces nothing."""
    made = await the_board.project()
    first = await the_board.task(made["id"], "first", column="todo")
    await the_board.task(made["id"], "second", column="todo")
    the_board.notes.clear()
    path = f"/api/tasks/{first['id']}/move"
    for body in ({"column": "todo", "position": 0}, {"column": "todo", "status": None,
                 "position": 0}):  # fmt: skip
        assert await the_board.ok("POST", path, body) == first
    assert the_board.notes == []
    failed = await the_board.ok("POST", path, {"column": "todo", "position": 0, "status": "failed"})
    assert (failed["column"], failed["position"], failed["status"]) == ("todo", 0, "failed")
    assert the_board.notes == [("task.moved", {**failed, "from": None})]


async def test_task_list_filters_order_and_pages(the_board: Board) -> None:
    one = (await the_board.project("one"))["id"]
    two = (await the_board.project("two"))["id"]
    for column in reversed(board.COLUMNS):
        await the_board.task(one, f"{column}-a", column=column)
        await the_board.task(one, f"{column}-b", column=column)
    await the_board.task(two, "elsewhere")
    listed = await the_board.listing(f"project_id={one}")
    assert [t["title"] for t in listed] == [f"{c}-{s}" for c in board.COLUMNS for s in "ab"]
    page = await the_board.ok("GET", f"/api/tasks?project_id={one}&limit=3&offset=2")
    assert [t["title"] for t in page["tasks"]] == ["todo-a", "todo-b", "in_progress-a"]
    assert (page["total"], page["limit"], page["offset"]) == (10, 3, 2)
    review = await the_board.listing(f"project_id={one}&column=review")
    assert [t["title"] for t in review] == ["review-a", "review-b"]
    active = await the_board.listing("status=active")
    assert [t["title"] for t in active] == [
        "in_progress-a",
        "in_progress-b",
        "review-a",
        "review-b",
    ]
    everything = await the_board.ok("GET", "/api/tasks")
    assert (everything["total"], everything["limit"], everything["offset"]) == (11, 100, 0)
    backlog = await the_board.listing("column=backlog")
    assert sorted(t["title"] for t in backlog) == ["backlog-a", "backlog-b", "elsewhere"]


async def test_bad_task_input(the_board: Board) -> None:
    project_id = (await the_board.project())["id"]
    task_id = (await the_board.task(project_id))["id"]
    the_board.notes.clear()
    creates: list[tuple[dict[str, Any], str]] = [
        ({"title": "t"}, "project_id"),
        ({"project_id": 1, "title": "t"}, "project_id"),
        ({"project_id": project_id}, "title"),
        ({"project_id": project_id, "title": "x" * 501}, "title"),
        ({"project_id": project_id, "title": "t", "column": "pending"}, "column"),
        ({"project_id": project_id, "title": "t", "priority": "urgent"}, "priority"),
        ({"project_id": project_id, "title": "t", "position": -1}, "position"),
        (
            {"project_id": project_id, "title": "t", "status": "completed", "column": "todo"},
            "status",
        ),
        ({"project_id": project_id, "title": "t", "tenant_id": 1}, "tenant_id"),
    ]
    for body, field in creates:
        answer = await the_board.send("POST", "/api/tasks", body)
        assert error_of(answer, 422, "VALIDATION_ERROR")["details"]["field"] == field, body
    missing = await the_board.send(
        "POST", "/api/tasks", {"project_id": MISSING_PROJECT, "title": "t"}
    )
    assert error_of(missing, 404, "NOT_FOUND")["message"] == "Project not found"

    updates: list[tuple[dict[str, Any], str]] = [
        ({"project_id": project_id}, "project_id"),
        ({"column": "doing"}, "column"),
        ({"position": -2}, "position"),
        ({"status": "done"}, "status"),
        ({"column": "done", "status": "pending"}, "status"),
        ({"title": ""}, "title"),
    ]
    for body, field in updates:
        answer = await the_board.send("PUT", f"/api/tasks/{task_id}", body)
        assert error_of(answer, 422, "VALIDATION_ERROR")["details"]["field"] == field, body

    moves: list[tuple[dict[str, Any], str]] = [
        ({}, "column"),
        ({"column": "nope", "position": 0}, "column"),
        ({"status": "in_progress", "position": 0}, "column"),
        ({"column": "todo", "position": -1}, "position"),
        ({"column": "todo", "position": "1"}, "position"),
        ({"column": "todo", "status": "active"}, "status"),
    ]
    for body, field in moves:
        answer = await the_board.send("POST", f"/api/tasks/{task_id}/move", body)
        assert error_of(answer, 422, "VALIDATION_ERROR")["details"]["field"] == field, body

    missing_calls: list[tuple[str, str, dict[str, Any] | None]] = [
        ("GET", f"/api/tasks/{MISSING_TASK}", None),
        ("PUT", f"/api/tasks/{MISSING_TASK}", {"title": "x"}),
        ("DELETE", f"/api/tasks/{MISSING_TASK}", None),
        ("POST", f"/api/tasks/{MISSING_TASK}/move", {"column": "todo", "position": 0}),
    ]
    for method, path, payload in missing_calls:
        error = error_of(await the_board.send(method, path, payload), 404, "NOT_FOUND")
        assert error["message"] == "Task not found"

    queries = [
        ("project_id=1", "project_id"),
        ("status=done", "status"),
        ("column=pending", "column"),
        ("limit=1001", "limit"),
        ("limit=0", "limit"),
        ("offset=-1", "offset"),
    ]
    for query, field in queries:
        answer = await the_board.send("GET", f"/api/tasks?{query}")
        assert error_of(answer, 400, "BAD_REQUEST")["details"]["field"] == field, query
    answer = await the_board.send("GET", f"/api/tasks?project_id={MISSING_PROJECT}")
    error_of(answer, 404, "NOT_FOUND")

    assert the_board.notes == []  # nothing refused was announced
    [only] = await the_board.listing(f"project_id={project_id}")
    assert (only["id"], only["column"], only["position"]) == (task_id, "backlog", 0)


async def test_a_failing_notify_does_not_undo_the_change(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(kind: str, data: dict[str, Any]) -> None:
        raise RuntimeError("subscriber gone")

    async with running(tmp_path / "lokid.db") as store:
        surface = Surface("test", "0")
        install_board(surface, store, broken)
        with trio.fail_after(WAIT):
            answer = await call(surface, "POST", "/api/projects", body=b'{"name": "x"}')
            assert answer.status == 201
            listed = await call(surface, "GET", "/api/projects")
    assert [p["id"] for p in listed.json()] == [answer.json()["id"]]
    assert "project.created" in caplog.text


# -- Idempotency-Key -----------------------------------------------------------------------


async def test_idempotent_creates(the_board: Board) -> None:
    key = {"Idempotency-Key": "k-1"}
    body = {"name": "once"}
    first = await the_board.send("POST", "/api/projects", body, headers=key)
    again = await the_board.send("POST", "/api/projects", body, headers=key)
    assert first.status == again.status == 201
    assert first.json() == again.json()
    assert len(await the_board.ok("GET", "/api/projects")) == 1
    other = await the_board.send("POST", "/api/projects", {"name": "twice"}, headers=key)
    assert error_of(other, 409, "CONFLICT")["details"]["idempotencyKey"] == "k-1"
    bad = await the_board.send("POST", "/api/projects", body, headers={"Idempotency-Key": " "})
    assert error_of(bad, 400, "BAD_REQUEST")["details"]["field"] == "Idempotency-Key"

    project_id = first.json()["id"]
    task_body = {"project_id": project_id, "title": "t"}
    made = await the_board.send("POST", "/api/tasks", task_body, headers=key)  # same key, new route
    assert made.status == 201
    retry = await the_board.send("POST", "/api/tasks", task_body, headers=key)
    assert retry.json() == made.json()
    assert len(await the_board.listing(f"project_id={project_id}")) == 1
    # A retry is answered even when what the body names is gone by now.
    await the_board.ok("DELETE", f"/api/projects/{project_id}", status=204)
    late = await the_board.send("POST", "/api/tasks", task_body, headers=key)
    assert (late.status, late.json()) == (201, made.json())
    # A refused create is not remembered: the fixed body may reuse the key.
    refused = await the_board.send(
        "POST",
        "/api/tasks",
        {"project_id": project_id, "title": ""},
        headers={"Idempotency-Key": "k-2"},
    )
    error_of(refused, 422, "VALIDATION_ERROR")
    kinds = [kind for kind, _ in the_board.notes]
    assert kinds == ["project.created", "task.created", "project.deleted"]  # once each


# -- the concurrency test ------------------------------------------------------------


async def test_fifty_concurrent_moves_keep_every_column_dense(the_board: Board) -> None:
    project_id = (await the_board.project())["id"]
    rng = random.Random(6)
    ids = []
    for index in range(30):
        column = rng.choice(board.COLUMNS)
        ids.append((await the_board.task(project_id, f"t{index}", column=column))["id"])
    before = await the_board.listing(f"project_id={project_id}")
    assert_dense(before)
    moves = [(rng.choice(ids), rng.choice(board.COLUMNS), rng.randint(0, 12)) for _ in range(50)]
    statuses: list[int] = []

    async def move(task_id: str, column: str, position: int) -> None:
        answer = await the_board.send(
            "POST", f"/api/tasks/{task_id}/move", {"column": column, "position": position}
        )
        statuses.append(answer.status)

    batches_before = the_board.store.statistics().batches
    async with trio.open_nursery() as nursery:
        for task_id, column, position in moves:
            nursery.start_soon(move, task_id, column, position)
    assert statuses == [200] * 50
    stats = the_board.store.statistics()
    assert stats.batches - batches_before < 50  # they really were in flight together

    after = await the_board.listing(f"project_id={project_id}")
    assert_dense(after)
    assert sorted(t["id"] for t in after) == sorted(ids)  # no task lost, none doubled
    assert sum(len(p) for p in columns_of(after).values()) == 30
    moved = [data for kind, data in the_board.notes if kind == "task.moved"]
    assert 0 < len(moved) <= 50  # a move that left its task in place announces nothing
    # A client that applies the announcements in the order they came ends with the board
    # as stored: they came in commit order, each `from` where the one before left the task.
    assert replay(before, moved) == board_of(after)


def board_of(tasks: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Each column's task ids in position order."""
    ordered = sorted(tasks, key=lambda t: (t["column"], t["position"]))
    columns: dict[str, list[str]] = {column: [] for column in board.COLUMNS}
    for task in ordered:
        columns[task["column"]].append(task["id"])
    return columns


def replay(before: list[dict[str, Any]], moved: list[dict[str, Any]]) -> dict[str, list[str]]:
    """`before` with the `task.moved` announcements applied in order, as a client would."""
    columns = board_of(before)
    for data in moved:
        origin = data["from"] or {"column": data["column"], "position": data["position"]}
        assert columns[origin["column"]].index(data["id"]) == origin["position"], data
        columns[origin["column"]].remove(data["id"])
        columns[data["column"]].insert(data["position"], data["id"])
    return columns


# -- the route table ----------------------------------------------------------------------


def test_routes_scopes_and_openapi() -> None:
    surface = Surface("test", "0")
    install_board(surface, StoreActor(Path("unused.db")), lambda kind, data: None)
    assert implemented(surface) == documented(surface)
    declared = {(r.method, r.path): r.requires for r in surface.routes}
    assert declared == {
        ("GET", "/openapi.json"): "read",
        ("GET", "/api/projects"): "read",
        ("POST", "/api/projects"): "write",
        ("GET", "/api/projects/{id}"): "read",
        ("PUT", "/api/projects/{id}"): "write",
        ("DELETE", "/api/projects/{id}"): "write",
        ("GET", "/api/tasks"): "read",
        ("POST", "/api/tasks"): "write",
        ("GET", "/api/tasks/{id}"): "read",
        ("PUT", "/api/tasks/{id}"): "write",
        ("DELETE", "/api/tasks/{id}"): "write",
        ("POST", "/api/tasks/{id}/move"): "write",
    }
    doc = surface.openapi()["paths"]
    assert "201" in doc["/api/projects"]["post"]["responses"]
    assert "201" in doc["/api/tasks"]["post"]["responses"]
    assert "204" in doc["/api/tasks/{id}"]["delete"]["responses"]
    assert doc["/api/tasks/{id}/move"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]["required"] == ["column"]
    params = {p["name"] for p in doc["/api/tasks"]["get"]["parameters"]}
    assert params == {"project_id", "status", "column", "limit", "offset"}
