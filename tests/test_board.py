"""`lokid.board`: validation, and the records on a real, migrated SQLite database.

The board's invariant - every (project, column) numbered 0..n-1, each once -
is checked after every kind of change, and by a stateful Hypothesis test
that runs random sequences of creates, moves, updates and deletes against a
plain list model of the board (so the order is checked, not only the
numbering).
"""

from __future__ import annotations

import os
import random
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlite_utils
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from lokid import board
from lokid.board import NewProject, NewTask, TaskChanges, TaskQuery
from lokid.errors import InvalidQuery, NotFound, ValidationFailed
from lokid.migrations import MIGRATIONS, migrate

PROJECT_KEYS = [
    "id",
    "name",
    "path",
    "description",
    "status",
    "taskCount",
    "created_at",
    "updated_at",
]
TASK_KEYS = [
    "id",
    "project_id",
    "title",
    "description",
    "column",
    "status",
    "priority",
    "position",
    "created_at",
    "updated_at",
]


def open_db() -> sqlite_utils.Database:
    """A migrated in-memory database, with foreign keys on as the store has them."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    db = sqlite_utils.Database(conn)
    migrate(db)
    return db


@pytest.fixture
def db() -> Iterator[sqlite_utils.Database]:
    database = open_db()
    yield database
    database.close()


def project(db: sqlite_utils.Database, name: str = "p", **kwargs: Any) -> str:
    return str(board.insert_project(db, NewProject(name, **kwargs))["id"])


def task(db: sqlite_utils.Database, project_id: str, title: str = "t", **kwargs: Any) -> str:
    return str(board.insert_task(db, NewTask(project_id, title, **kwargs))["id"])


def columns(db: sqlite_utils.Database) -> dict[tuple[str, str], list[str]]:
    """Every (project, column) -> its task ids ordered by position; asserts the positions
    the API shows are 0..n-1, once each, and the same in the list and from `get_task`,
    and that every stored task is listed."""
    listed: list[dict[str, Any]] = []
    while page := board.list_tasks(db, TaskQuery(limit=board.MAX_LIMIT, offset=len(listed))):
        listed += page["tasks"]
        if len(listed) >= page["total"]:
            break
    assert len(listed) == db.execute("SELECT COUNT(*) FROM board_tasks").fetchone()[0]
    found: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for item in listed:
        assert board.get_task(db, item["id"]) == item
        found.setdefault((item["project_id"], item["column"]), []).append(
            (item["position"], item["id"])
        )
    ordered: dict[tuple[str, str], list[str]] = {}
    for key, entries in found.items():
        positions = [position for position, _ in entries]
        assert positions == list(range(len(entries))), (key, positions)  # listed in order
        ordered[key] = [task_id for _, task_id in entries]
    return ordered


def titles(db: sqlite_utils.Database, project_id: str, column: str) -> list[str]:
    ids = columns(db).get((project_id, column), [])
    return [board.get_task(db, task_id)["title"] for task_id in ids]


def field_of(
    exc: pytest.ExceptionInfo[ValidationFailed] | pytest.ExceptionInfo[InvalidQuery],
) -> str:
    return str(exc.value.details["field"])


# -- validation: projects ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "name"),
        ({"name": None}, "name"),
        ({"name": "   "}, "name"),
        ({"name": 7}, "name"),
        ({"name": "x" * 201}, "name"),
        ({"name": "two\nlines"}, "name"),
        ({"name": "tab\there"}, "name"),
        ({"name": "bell\x07"}, "name"),
        ({"name": "\x9b csi"}, "name"),
        ({"name": "lone \ud800"}, "name"),
        ({"name": "a", "path": ""}, "path"),
        ({"name": "a", "path": "relative/dir"}, "path"),
        ({"name": "a", "path": 3}, "path"),
        ({"name": "a", "path": "/x\0y"}, "path"),
        ({"name": "a", "path": "/" + "x" * 5000}, "path"),
        ({"name": "a", "description": "x" * 10_001}, "description"),
        ({"name": "a", "description": ["x"]}, "description"),
        ({"name": "a", "description": "nul\0"}, "description"),
        ({"name": "a", "status": "active"}, "status"),
        ({"name": "a", "tenant_id": 1}, "tenant_id"),
    ],
)
def test_project_create_refuses_naming_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationFailed) as exc:
        board.parse_project_create(body)
    assert field_of(exc) == field
    assert exc.value.code == "VALIDATION_ERROR"


def test_project_create_accepts_and_normalises() -> None:
    assert board.parse_project_create({"name": "  My app  "}) == NewProject("My app")
    longest = "é" * board.MAX_NAME_CHARS  # characters, not bytes
    assert board.parse_project_create({"name": longest}).name == longest
    parsed = board.parse_project_create(
        {"name": "x", "path": "~/code", "description": "multi\nline\ttext"}
    )
    assert parsed == NewProject("x", "~/code", "multi\nline\ttext")
    assert board.parse_project_create({"name": "x", "path": None, "description": None}) == (
        NewProject("x")
    )


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"id": "proj-000000000000"}, "id"),
        ({"taskCount": 3}, "taskCount"),
        ({"created_at": "2020"}, "created_at"),
        ({"status": "completed"}, "status"),
        ({"name": ""}, "name"),
        ({"path": "rel"}, "path"),
        ({"owner": "me"}, "owner"),
    ],
)
def test_project_update_refuses_naming_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationFailed) as exc:
        board.parse_project_update(body)
    assert field_of(exc) == field


def test_project_update_changes() -> None:
    assert board.parse_project_update({}) == {}
    assert board.parse_project_update(
        {"name": " n ", "path": None, "description": None, "status": "archived"}
    ) == {"name": "n", "path": None, "description": "", "status": "archived"}
    # a null counts as left out (docs/board.md), but for path and description
    assert board.parse_project_update({"name": None, "status": "archived"}) == {
        "status": "archived"
    }
    assert board.parse_project_update({"name": None, "status": None}) == {}


def test_project_path_must_be_an_existing_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "real"
    folder.mkdir()
    (tmp_path / "file").write_text("x")
    os.symlink(folder, tmp_path / "link")
    assert board.check_project_path(str(folder)) == str(folder.resolve())
    assert board.check_project_path(str(tmp_path / "link")) == str(folder.resolve())
    assert board.check_project_path(str(folder / ".." / "real")) == str(folder.resolve())
    monkeypatch.setenv("HOME", str(tmp_path))
    assert board.check_project_path("~/real") == str(folder.resolve())
    for bad in (str(tmp_path / "missing"), str(tmp_path / "file"), "~/missing", "rel"):
        with pytest.raises(ValidationFailed) as exc:
            board.check_project_path(bad)
        assert field_of(exc) == "path", bad
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    with pytest.raises(ValidationFailed) as exc:
        board.check_project_path(str(tmp_path / "loop"))
    assert field_of(exc) == "path"


# -- validation: tasks --------------------------------------------------------------------

P = "proj-0123456789ab"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"title": "t"}, "project_id"),
        ({"project_id": None, "title": "t"}, "project_id"),
        ({"project_id": 1, "title": "t"}, "project_id"),
        ({"project_id": "p" * 65, "title": "t"}, "project_id"),
        ({"project_id": P}, "title"),
        ({"project_id": P, "title": " "}, "title"),
        ({"project_id": P, "title": "x" * 501}, "title"),
        ({"project_id": P, "title": "a\rb"}, "title"),
        ({"project_id": P, "title": "t", "column": "pending"}, "column"),
        ({"project_id": P, "title": "t", "column": 1}, "column"),
        ({"project_id": P, "title": "t", "priority": "urgent"}, "priority"),
        ({"project_id": P, "title": "t", "status": "done"}, "status"),
        ({"project_id": P, "title": "t", "column": "todo", "status": "active"}, "status"),
        ({"project_id": P, "title": "t", "column": "done", "status": "pending"}, "status"),
        ({"project_id": P, "title": "t", "position": -1}, "position"),
        ({"project_id": P, "title": "t", "position": True}, "position"),
        ({"project_id": P, "title": "t", "position": "2"}, "position"),
        ({"project_id": P, "title": "t", "position": 1.5}, "position"),
        ({"project_id": P, "title": "t", "description": "x" * 10_001}, "description"),
        ({"project_id": P, "title": "t", "assignee": "me"}, "assignee"),
    ],
)
def test_task_create_refuses_naming_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationFailed) as exc:
        board.parse_task_create(body)
    assert field_of(exc) == field


def test_task_create_defaults_and_status_rules() -> None:
    assert board.parse_task_create({"project_id": P, "title": " T "}) == NewTask(P, "T")
    # A status without a column picks the status's column.
    for status, column in (
        ("pending", "backlog"),
        ("active", "in_progress"),
        ("completed", "done"),
    ):
        parsed = board.parse_task_create({"project_id": P, "title": "t", "status": status})
        assert (parsed.column, parsed.failed) == (column, False)
    # A status that fits the column is accepted; failed goes with any column.
    parsed = board.parse_task_create(
        {"project_id": P, "title": "t", "column": "review", "status": "active", "position": 3}
    )
    assert (parsed.column, parsed.position) == ("review", 3)
    parsed = board.parse_task_create(
        {"project_id": P, "title": "t", "column": "todo", "status": "failed", "priority": "low"}
    )
    assert (parsed.column, parsed.failed, parsed.priority) == ("todo", True, "low")
    parsed = board.parse_task_create({"project_id": P, "title": "t", "status": "failed"})
    assert (parsed.column, parsed.failed) == ("backlog", True)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"project_id": P}, "project_id"),
        ({"id": "task-1"}, "id"),
        ({"updated_at": "x"}, "updated_at"),
        ({"title": ""}, "title"),
        ({"column": "doing"}, "column"),
        ({"column": "done", "status": "active"}, "status"),
        ({"status": "blocked"}, "status"),
        ({"priority": 2}, "priority"),
        ({"position": -3}, "position"),
        ({"labels": []}, "labels"),
    ],
)
def test_task_update_refuses_naming_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationFailed) as exc:
        board.parse_task_update(body)
    assert field_of(exc) == field


def test_task_update_parses() -> None:
    assert board.parse_task_update({}).is_empty()
    assert board.parse_task_update({"title": None}).is_empty()
    assert board.parse_task_update({"column": "done", "position": 0}) == TaskChanges(
        column="done", position=0
    )
    assert board.parse_task_update({"description": ""}) == TaskChanges(description="")
    assert not board.parse_task_update({"description": ""}).is_empty()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "column"),
        ({"position": 0}, "column"),
        ({"status": "in_progress", "position": 0}, "column"),  # the older UI's shape
        ({"column": "nope"}, "column"),
        ({"column": "todo", "position": -1}, "position"),
        ({"column": "todo", "position": "0"}, "position"),
        ({"column": "todo", "status": "completed"}, "status"),
        ({"column": "todo", "where": 1}, "where"),
    ],
)
def test_move_body_refuses_naming_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationFailed) as exc:
        board.parse_move(body)
    assert field_of(exc) == field


def test_move_body_parses() -> None:
    assert board.parse_move({"column": "done"}) == board.Move("done")
    assert board.parse_move({"column": "done", "position": 10**30, "status": "failed"}) == (
        board.Move("done", 10**30, "failed")
    )


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"project_id": "1"}, "project_id"),
        ({"project_id": ""}, "project_id"),
        ({"project_id": "proj-0123456789AB"}, "project_id"),
        ({"status": "done"}, "status"),
        ({"column": "pending"}, "column"),
        ({"column": ""}, "column"),
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"offset": "-1"}, "offset"),
    ],
)
def test_task_query_refuses_naming_the_parameter(params: dict[str, str], field: str) -> None:
    with pytest.raises(InvalidQuery) as exc:
        board.parse_task_query(params)
    assert field_of(exc) == field
    assert exc.value.code == "BAD_REQUEST"


def test_task_query_defaults_and_values() -> None:
    assert board.parse_task_query({}) == TaskQuery()
    assert board.parse_task_query(
        {"project_id": P, "status": "failed", "column": "review", "limit": "1000", "offset": "5"}
    ) == TaskQuery(P, "failed", "review", 1000, 5)


def test_project_query() -> None:
    assert board.parse_project_query({}) == board.ProjectQuery(None, 100, 0)  # bounded
    assert board.parse_project_query({"limit": "1000"}).limit == 1000
    assert board.parse_project_query({"status": "archived", "limit": "2", "offset": "1"}) == (
        board.ProjectQuery("archived", 2, 1)
    )
    for params, field in (
        ({"status": "gone"}, "status"),
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
    ):
        with pytest.raises(InvalidQuery) as exc:
            board.parse_project_query(params)
        assert field_of(exc) == field


# -- records: projects ----------------------------------------------------------------------


def test_project_shape_and_task_count(db: sqlite_utils.Database) -> None:
    made = board.insert_project(
        db, NewProject("app", "/srv/app", "about"), now="2026-01-02T03:04:05.678Z"
    )
    assert list(made) == PROJECT_KEYS
    assert made["id"].startswith("proj-") and len(made["id"]) == 17
    assert made == {
        "id": made["id"],
        "name": "app",
        "path": "/srv/app",
        "description": "about",
        "status": "active",
        "taskCount": 0,
        "created_at": "2026-01-02T03:04:05.678Z",
        "updated_at": "2026-01-02T03:04:05.678Z",
    }
    for _ in range(3):
        task(db, made["id"])
    assert board.get_project(db, made["id"])["taskCount"] == 3
    with pytest.raises(NotFound, match="Project not found"):
        board.get_project(db, "proj-000000000000")


def test_list_projects_newest_first_with_counts_in_one_query(db: sqlite_utils.Database) -> None:
    ids = [
        board.insert_project(db, NewProject(f"p{i}"), now=f"2026-01-0{i + 1}T00:00:00.000Z")["id"]
        for i in range(4)
    ]
    for index, project_id in enumerate(ids):
        for _ in range(index):
            task(db, project_id)
    statements: list[str] = []
    db.conn.set_trace_callback(statements.append)
    listed = board.list_projects(db)
    db.conn.set_trace_callback(None)
    assert [p["id"] for p in listed] == ids[::-1]
    assert [p["taskCount"] for p in listed] == [3, 2, 1, 0]
    assert len(statements) == 1, statements  # not one count per project
    board.update_project(db, ids[0], {"status": "archived"})
    assert [p["id"] for p in board.list_projects(db, board.ProjectQuery("archived"))] == [ids[0]]
    page = board.list_projects(db, board.ProjectQuery(limit=2, offset=1))
    assert [p["id"] for p in page] == [ids[2], ids[1]]


def test_projects_made_in_the_same_millisecond_list_the_later_first(
    db: sqlite_utils.Database,
) -> None:
    # Ids are random: ordering ties by id put two quick creates in either order.
    same = "2026-01-01T00:00:00.000Z"
    ids = [
        board.insert_project(db, NewProject(f"p{i}"), project_id=f"proj-{hex_id:012x}", now=same)[
            "id"
        ]
        for i, hex_id in enumerate((0xAAA, 0xFFF, 0x111, 0x555))
    ]
    assert [p["id"] for p in board.list_projects(db)] == ids[::-1]


def test_update_project(db: sqlite_utils.Database) -> None:
    project_id = board.insert_project(db, NewProject("a", "/x"), now="2026-01-01T00:00:00.000Z")[
        "id"
    ]
    updated = board.update_project(
        db, project_id, {"name": "b", "description": "d", "status": "archived"}
    )
    assert (updated["name"], updated["path"], updated["description"], updated["status"]) == (
        "b",
        "/x",
        "d",
        "archived",
    )
    assert updated["updated_at"] > updated["created_at"]
    assert board.update_project(db, project_id, {"path": None})["path"] is None
    with pytest.raises(NotFound):
        board.update_project(db, "proj-000000000000", {"name": "x"})
    with pytest.raises(ValidationFailed):
        board.update_project(db, project_id, {"status": "gone"})
    with pytest.raises(TypeError):
        board.update_project(db, project_id, {"id": "x"})


def test_delete_project_removes_its_tasks_only(db: sqlite_utils.Database) -> None:
    doomed, kept = project(db, "doomed"), project(db, "kept")
    for _ in range(3):
        task(db, doomed)
    survivor = task(db, kept)
    gone = board.delete_project(db, doomed)
    assert gone == {"id": doomed, "project_id": doomed, "tasks_deleted": 3}
    assert db.execute("SELECT id FROM board_tasks").fetchall() == [(survivor,)]
    with pytest.raises(NotFound):
        board.delete_project(db, doomed)


def test_the_schema_cascades_too(db: sqlite_utils.Database) -> None:
    """The foreign key alone removes a project's tasks (the store turns foreign keys on)."""
    project_id = project(db)
    task(db, project_id)
    db.execute("DELETE FROM projects WHERE id = ?", (project_id,))
    assert db.execute("SELECT COUNT(*) FROM board_tasks").fetchone()[0] == 0


# -- records: tasks ------------------------------------------------------------------------------


def test_task_shape(db: sqlite_utils.Database) -> None:
    project_id = project(db)
    made = board.insert_task(
        db,
        NewTask(project_id, "Login", "Add auth", "in_progress", "high"),
        now="2026-01-01T00:00:00.000Z",
    )
    assert list(made) == TASK_KEYS
    assert made == {
        "id": made["id"],
        "project_id": project_id,
        "title": "Login",
        "description": "Add auth",
        "column": "in_progress",
        "status": "active",
        "priority": "high",
        "position": 0,
        "created_at": "2026-01-01T00:00:00.000Z",
        "updated_at": "2026-01-01T00:00:00.000Z",
    }
    assert made["id"].startswith("task-") and len(made["id"]) == 17
    assert board.get_task(db, made["id"]) == made
    with pytest.raises(NotFound, match="Task not found"):
        board.get_task(db, "task-000000000000")


def test_create_appends_or_inserts_and_renumbers(db: sqlite_utils.Database) -> None:
    project_id = project(db)
    for name in "abc":
        task(db, project_id, name)
    assert titles(db, project_id, "backlog") == ["a", "b", "c"]
    task(db, project_id, "front", position=0)
    task(db, project_id, "middle", position=2)
    task(db, project_id, "past-end", position=99)
    task(db, project_id, "at-end", position=6)
    assert titles(db, project_id, "backlog") == [
        "front",
        "a",
        "middle",
        "b",
        "c",
        "past-end",
        "at-end",
    ]
    task(db, project_id, "other column", column="done", position=5)
    assert titles(db, project_id, "done") == ["other column"]
    assert board.get_task(db, columns(db)[(project_id, "done")][0])["position"] == 0


def test_create_status_follows_the_column(db: sqlite_utils.Database) -> None:
    project_id = project(db)
    for column, status in board.COLUMN_STATUS.items():
        made = board.insert_task(db, NewTask(project_id, "t", column=column))
        assert made["status"] == status
    failed = board.insert_task(db, NewTask(project_id, "t", column="done", failed=True))
    assert (failed["column"], failed["status"]) == ("done", "failed")


def test_create_in_unknown_project_is_404(db: sqlite_utils.Database) -> None:
    with pytest.raises(NotFound, match="Project not found"):
        board.insert_task(db, NewTask("proj-000000000000", "t"))
    with pytest.raises(ValidationFailed):
        board.insert_task(db, NewTask(project(db), "t", column="nope"))
    with pytest.raises(ValidationFailed):
        board.insert_task(db, NewTask(project(db), "t", position=-1))


def test_positions_are_per_project_and_column(db: sqlite_utils.Database) -> None:
    one, two = project(db, "one"), project(db, "two")
    for index in range(3):
        task(db, one, f"1-{index}")
        task(db, two, f"2-{index}")
        task(db, one, f"1-todo-{index}", column="todo")
    assert {key: len(ids) for key, ids in columns(db).items()} == {
        (one, "backlog"): 3,
        (two, "backlog"): 3,
        (one, "todo"): 3,
    }


def test_move_across_columns_renumbers_both(db: sqlite_utils.Database) -> None:
    project_id = project(db)
    ids = {name: task(db, project_id, name) for name in "abcde"}
    for name in "xyz":
        task(db, project_id, name, column="review")
    moved, came_from, _ = board.move_task(db, ids["b"], "review", 1)
    assert came_from == {"column": "backlog", "position": 1}
    assert (moved["column"], moved["position"], moved["status"]) == ("review", 1, "active")
    assert titles(db, project_id, "backlog") == ["a", "c", "d", "e"]
    assert titles(db, project_id, "review") == ["x", "b", "y", "z"]
    board.move_task(db, ids["a"], "review")  # no position: the end
    board.move_task(db, ids["e"], "review", 10**30)  # past the end: the end
    board.move_task(db, ids["c"], "review", 0)
    assert titles(db, project_id, "backlog") == ["d"]
    assert titles(db, project_id, "review") == ["c", "x", "b", "y", "z", "a", "e"]
    board.move_task(db, ids["d"], "done", 0)
    assert (project_id, "backlog") not in columns(db)


def test_move_within_a_column(db: sqlite_utils.Database) -> None:
    project_id = project(db)
    ids = {name: task(db, project_id, name) for name in "abcdef"}
    board.move_task(db, ids["b"], "backlog", 4)
    assert titles(db, project_id, "backlog") == ["a", "c", "d", "e", "b", "f"]
    board.move_task(db, ids["e"], "backlog", 0)
    assert titles(db, project_id, "backlog") == ["e", "a", "c", "d", "b", "f"]
    board.move_task(db, ids["a"], "backlog")
    assert titles(db, project_id, "backlog") == ["e", "c", "d", "b", "f", "a"]
    _, came_from, _ = board.move_task(db, ids["f"], "backlog", 2)
    assert came_from == {"column": "backlog", "position": 4}
    assert titles(db, project_id, "backlog") == ["e", "c", "f", "d", "b", "a"]


@pytest.mark.parametrize(
    ("name", "position"), [("a", 0), ("b", 1), ("c", 2), ("c", None), ("c", 10**30)]
)
def test_a_move_to_its_own_place_writes_nothing(
    db: sqlite_utils.Database, name: str, position: int | None
) -> None:
    """No `from` (it was not moved), no new `updated_at`, no rank rewritten, no change."""
    project_id = project(db)
    ids = {n: task(db, project_id, n, column="todo") for n in "abc"}
    before = board.get_task(db, ids[name])
    ranks = db.execute("SELECT id, rank FROM board_tasks ORDER BY id").fetchall()
    moved = board.move_task(db, ids[name], "todo", position, now="2099-01-01T00:00:00.000Z")
    assert moved == (before, None, False)
    assert db.execute("SELECT id, rank FROM board_tasks ORDER BY id").fetchall() == ranks


def test_a_move_to_its_own_place_with_a_new_status_changes_only_that(
    db: sqlite_utils.Database,
) -> None:
    project_id = project(db)
    task_id = task(db, project_id, column="todo")
    later = "2099-01-01T00:00:00.000Z"
    moved = board.move_task(db, task_id, "todo", 0, status="failed", now=later)
    assert moved.came_from is None and moved.changed
    assert (moved.task["status"], moved.task["position"]) == ("failed", 0)
    assert moved.task["updated_at"] == later


def test_move_refuses_bad_arguments(db: sqlite_utils.Database) -> None:
    project_id = project(db)
    task_id = task(db, project_id)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"column": "nope", "position": 0}, "column"),
        ({"column": "todo", "position": -1}, "position"),
        ({"column": "todo", "position": 0, "status": "completed"}, "status"),
        ({"column": "todo", "position": 0, "status": "nope"}, "status"),
    ]
    for kwargs, field in cases:
        with pytest.raises(ValidationFailed) as exc:
            board.move_task(db, task_id, **kwargs)
        assert field_of(exc) == field
    with pytest.raises(NotFound, match="Task not found"):
        board.move_task(db, "task-000000000000", "todo", 0)
    assert board.get_task(db, task_id)["column"] == "backlog"


def test_move_status_rules(db: sqlite_utils.Database) -> None:
    project_id = project(db)
    task_id = task(db, project_id, column="in_progress", failed=True)
    other = task(db, project_id, column="in_progress")
    assert board.get_task(db, task_id)["status"] == "failed"
    moved, _, _ = board.move_task(db, task_id, "in_progress", 1)  # a reorder keeps failed
    assert (moved["position"], moved["status"]) == (1, "failed")
    moved, _, _ = board.move_task(db, task_id, "review", 0, status="failed")  # said so: kept
    assert moved["status"] == "failed"
    moved, _, _ = board.move_task(db, task_id, "todo", 0)  # another column: re-derived
    assert moved["status"] == "pending"
    moved, _, _ = board.move_task(db, task_id, "done", 0)
    assert moved["status"] == "completed"
    moved, _, _ = board.move_task(db, task_id, "done", 0, status="failed")
    assert moved["status"] == "failed"
    moved, _, _ = board.move_task(db, task_id, "done", 0, status="completed")  # explicit: cleared
    assert moved["status"] == "completed"
    assert board.get_task(db, other)["position"] == 0


def test_update_fields_and_moves(db: sqlite_utils.Database) -> None:
    project_id = project(db)
    ids = {name: task(db, project_id, name) for name in "abcd"}
    task(db, project_id, "x", column="done")
    updated, came_from = board.update_task(
        db, ids["b"], TaskChanges(title="B", description="d", priority="critical")
    )
    assert came_from is None
    assert (updated["title"], updated["description"], updated["priority"]) == ("B", "d", "critical")
    assert updated["position"] == 1 and updated["updated_at"] >= updated["created_at"]
    # A new column: a move to its end.
    updated, came_from = board.update_task(db, ids["a"], TaskChanges(column="done"))
    assert came_from == {"column": "backlog", "position": 0}
    assert (updated["column"], updated["position"], updated["status"]) == ("done", 1, "completed")
    assert titles(db, project_id, "backlog") == ["B", "c", "d"]
    # A new column and a position.
    board.update_task(db, ids["c"], TaskChanges(column="done", position=0))
    assert titles(db, project_id, "done") == ["c", "x", "a"]
    # A position alone: a reorder.
    _, came_from = board.update_task(db, ids["d"], TaskChanges(position=0))
    assert came_from == {"column": "backlog", "position": 1}
    assert titles(db, project_id, "backlog") == ["d", "B"]
    _, came_from = board.update_task(db, ids["d"], TaskChanges(position=0))
    assert came_from is None  # already there


def test_update_status_rules(db: sqlite_utils.Database) -> None:
    project_id = project(db)
    task_id = task(db, project_id, column="todo")
    task(db, project_id, "r", column="review")
    updated, came_from = board.update_task(db, task_id, TaskChanges(status="failed"))
    assert (updated["column"], updated["status"], came_from) == ("todo", "failed", None)
    updated, came_from = board.update_task(db, task_id, TaskChanges(status="pending"))
    assert (updated["column"], updated["status"], came_from) == ("todo", "pending", None)
    # A status the column does not fit: the status's column, at its end.
    updated, came_from = board.update_task(db, task_id, TaskChanges(status="active"))
    assert (updated["column"], updated["position"], updated["status"]) == (
        "in_progress",
        0,
        "active",
    )
    assert came_from == {"column": "todo", "position": 0}
    updated, _ = board.update_task(db, task_id, TaskChanges(column="review", status="failed"))
    assert (updated["column"], updated["position"], updated["status"]) == ("review", 1, "failed")
    updated, _ = board.update_task(db, task_id, TaskChanges(column="done"))
    assert updated["status"] == "completed"  # a column change re-derives it
    with pytest.raises(ValidationFailed) as exc:
        board.update_task(db, task_id, TaskChanges(column="todo", status="active"))
    assert field_of(exc) == "status"
    with pytest.raises(NotFound):
        board.update_task(db, "task-000000000000", TaskChanges(title="x"))
    columns(db)


def test_delete_renumbers_the_column_it_leaves(db: sqlite_utils.Database) -> None:
    project_id = project(db)
    ids = {name: task(db, project_id, name) for name in "abcde"}
    assert board.delete_task(db, ids["b"]) == {"id": ids["b"], "project_id": project_id}
    assert titles(db, project_id, "backlog") == ["a", "c", "d", "e"]
    board.delete_task(db, ids["a"])
    board.delete_task(db, ids["e"])
    assert titles(db, project_id, "backlog") == ["c", "d"]
    with pytest.raises(NotFound):
        board.delete_task(db, ids["a"])


def test_ranks_written_behind_its_back_still_give_dense_positions(
    db: sqlite_utils.Database,
) -> None:
    """Ranks set by someone else (ties, no gaps) still show as 0..n-1 in insertion order
    for ties, and a move between tied neighbours makes room by renumbering."""
    project_id = project(db)
    ids = [task(db, project_id, name) for name in "abcd"]
    db.execute("UPDATE board_tasks SET rank = 7")
    assert titles(db, project_id, "backlog") == ["a", "b", "c", "d"]
    board.move_task(db, ids[3], "backlog", 1)
    assert titles(db, project_id, "backlog") == ["a", "d", "b", "c"]
    db.execute("UPDATE board_tasks SET rank = rowid")  # neighbours one apart: no room
    board.move_task(db, ids[0], "backlog", 2)
    assert titles(db, project_id, "backlog") == ["b", "c", "a", "d"]


def test_a_projects_list_numbers_positions_as_the_cross_project_list_does(
    db: sqlite_utils.Database,
) -> None:
    """The two ways `list_tasks` numbers positions (Python for one project, a window
    function across projects) agree, for every filter and page."""
    rng = random.Random(5)
    projects = [project(db, name) for name in "xyz"]
    ids = [
        task(db, rng.choice(projects), f"t{n}", column=rng.choice(board.COLUMNS))
        for n in range(120)
    ]
    for task_id in rng.sample(ids, 30):
        board.move_task(db, task_id, rng.choice(board.COLUMNS), rng.randrange(0, 30))
    for task_id in rng.sample(ids, 10):
        board.update_task(db, task_id, TaskChanges(status="failed"))
    everything = board.list_tasks(db, TaskQuery(limit=board.MAX_LIMIT))["tasks"]
    for project_id in projects:
        for status in (None, *board.STATUSES):
            for column in (None, "backlog", "review"):
                expected = [
                    t
                    for t in everything
                    if t["project_id"] == project_id
                    and status in (None, t["status"])
                    and column in (None, t["column"])
                ]
                for offset, limit in ((0, 1000), (3, 5)):
                    query = TaskQuery(project_id, status, column, limit=limit, offset=offset)
                    page = board.list_tasks(db, query)
                    assert page["tasks"] == expected[offset : offset + limit]
                    assert page["total"] == len(expected)


def test_migration_9_keeps_each_columns_order_and_repairs_it() -> None:
    """Stored positions (dense, or damaged by an outside writer) become ranks in the
    same order, ties by insertion."""
    database = sqlite_utils.Database(sqlite3.connect(":memory:", isolation_level=None))
    migrate(database, MIGRATIONS[:8])
    database.execute(
        "INSERT INTO projects (id, name, created_at, updated_at) VALUES ('p', 'p', 'x', 'x')"
    )
    stored = [("a", "todo", 2), ("b", "todo", 0), ("c", "todo", 7), ("d", "todo", 0)]
    stored += [("e", "done", 0)]
    for title, column, position in stored:
        database.execute(
            "INSERT INTO board_tasks (id, project_id, title, column_name, status, position,"
            " created_at, updated_at) VALUES (?, 'p', ?, ?, 'pending', ?, 'x', 'x')",
            (f"task-{title}", title, column, position),
        )
    migrate(database)
    assert titles(database, "p", "todo") == ["b", "d", "a", "c"]
    assert titles(database, "p", "done") == ["e"]
    ranks = database.execute("SELECT rank FROM board_tasks WHERE column_name = 'todo'")
    assert sorted(row[0] for row in ranks) == [0, 1024, 2048, 3072]


def test_a_move_writes_one_row_and_renumbers_only_without_room(
    db: sqlite_utils.Database,
) -> None:
    project_id = project(db)
    ids = [task(db, project_id, f"t{n}") for n in range(50)]
    before = dict(db.execute("SELECT id, rank FROM board_tasks").fetchall())
    board.move_task(db, ids[40], "backlog", 3)
    after = dict(db.execute("SELECT id, rank FROM board_tasks").fetchall())
    assert {key for key in before if before[key] != after[key]} == {ids[40]}
    # Halving the same gap again and again runs out of room after log2(RANK_GAP) moves;
    # then the column is renumbered and the move still lands where it was asked to.
    for n in range(2 * board.RANK_GAP.bit_length()):
        board.move_task(db, ids[n], "backlog", 1)
        assert columns(db)[(project_id, "backlog")][1] == ids[n]
    ranks = [row[0] for row in db.execute("SELECT rank FROM board_tasks ORDER BY rank")]
    assert len(set(ranks)) == len(ranks)


def test_list_order_filters_and_pages(db: sqlite_utils.Database) -> None:
    one, two = project(db, "one"), project(db, "two")
    for column in reversed(board.COLUMNS):
        for index in range(2):
            task(db, one, f"{column}-{index}", column=column)
    task(db, two, "two-backlog")
    board.update_task(db, columns(db)[(one, "review")][1], TaskChanges(status="failed"))
    listed = board.list_tasks(db, TaskQuery(project_id=one))
    assert [t["title"] for t in listed["tasks"]] == [
        f"{column}-{index}" for column in board.COLUMNS for index in range(2)
    ]
    assert (listed["total"], listed["limit"], listed["offset"]) == (10, 100, 0)
    assert all(list(t) == TASK_KEYS for t in listed["tasks"])
    page = board.list_tasks(db, TaskQuery(project_id=one, limit=3, offset=4))
    assert [t["title"] for t in page["tasks"]] == ["in_progress-0", "in_progress-1", "review-0"]
    assert page["total"] == 10
    by_column = board.list_tasks(db, TaskQuery(column="backlog"))
    assert sorted(t["title"] for t in by_column["tasks"]) == [
        "backlog-0",
        "backlog-1",
        "two-backlog",
    ]
    assert [t["position"] for t in by_column["tasks"]] == [0, 0, 1]  # then position
    failed = board.list_tasks(db, TaskQuery(status="failed"))
    assert [t["title"] for t in failed["tasks"]] == ["review-1"]
    active = board.list_tasks(db, TaskQuery(project_id=one, status="active"))
    assert [t["title"] for t in active["tasks"]] == ["in_progress-0", "in_progress-1", "review-0"]
    everything = board.list_tasks(db)
    assert everything["total"] == 11
    with pytest.raises(NotFound, match="Project not found"):
        board.list_tasks(db, TaskQuery(project_id="proj-000000000000"))


# -- the invariant under random operations ---------------------------------------------------

Model = dict[str, dict[str, list[str]]]  # project -> column -> task ids in order


class BoardMachine(RuleBasedStateMachine):
    """Random creates, moves, updates and deletes vs. a list model of the board."""

    projects = Bundle("projects")
    tasks = Bundle("tasks")

    def __init__(self) -> None:
        super().__init__()
        self.db = open_db()
        self.model: Model = {}
        self.column_of: dict[str, tuple[str, str]] = {}

    def teardown(self) -> None:
        self.db.close()

    def _index(self, project_id: str, column: str) -> list[str]:
        return self.model[project_id].setdefault(column, [])

    @staticmethod
    def _at(position: int | None, length: int) -> int:
        return length if position is None else min(position, length)

    @rule(target=projects)
    def create_project(self) -> str:
        project_id = project(self.db)
        self.model[project_id] = {}
        return project_id

    @rule(
        target=tasks,
        project_id=projects,
        column=st.sampled_from(board.COLUMNS),
        position=st.none() | st.integers(0, 12),
    )
    def create_task(self, project_id: str, column: str, position: int | None) -> str:
        if project_id not in self.model:  # deleted meanwhile
            with pytest.raises(NotFound):
                task(self.db, project_id, column=column, position=position)
            return "task-000000000000"
        task_id = task(self.db, project_id, column=column, position=position)
        order = self._index(project_id, column)
        order.insert(self._at(position, len(order)), task_id)
        self.column_of[task_id] = (project_id, column)
        return task_id

    def _take(self, task_id: str) -> tuple[str, str] | None:
        where = self.column_of.get(task_id)
        if where is not None:
            self.model[where[0]][where[1]].remove(task_id)
        return where

    def _put(self, task_id: str, project_id: str, column: str, position: int | None) -> None:
        order = self._index(project_id, column)
        order.insert(self._at(position, len(order)), task_id)
        self.column_of[task_id] = (project_id, column)

    @rule(
        task_id=tasks,
        column=st.sampled_from(board.COLUMNS),
        position=st.none() | st.integers(0, 12),
    )
    def move(self, task_id: str, column: str, position: int | None) -> None:
        if task_id not in self.column_of:
            with pytest.raises(NotFound):
                board.move_task(self.db, task_id, column, position)
            return
        where = self._take(task_id)
        assert where is not None
        board.move_task(self.db, task_id, column, position)
        self._put(task_id, where[0], column, position)

    @rule(
        task_id=tasks,
        column=st.none() | st.sampled_from(board.COLUMNS),
        position=st.none() | st.integers(0, 12),
        title=st.none() | st.just("renamed"),
    )
    def update(
        self, task_id: str, column: str | None, position: int | None, title: str | None
    ) -> None:
        changes = TaskChanges(title=title, column=column, position=position)
        if task_id not in self.column_of:
            with pytest.raises(NotFound):
                board.update_task(self.db, task_id, changes)
            return
        project_id, source = self.column_of[task_id]
        board.update_task(self.db, task_id, changes)
        if (column is not None and column != source) or position is not None:
            self._take(task_id)
            self._put(task_id, project_id, column or source, position)

    @rule(task_id=consumes(tasks))
    def delete_task(self, task_id: str) -> None:
        if task_id not in self.column_of:
            return
        board.delete_task(self.db, task_id)
        self._take(task_id)
        del self.column_of[task_id]

    @precondition(lambda self: len(self.model) > 1)
    @rule(project_id=consumes(projects))
    def delete_project(self, project_id: str) -> None:
        board.delete_project(self.db, project_id)
        for task_id in [t for t, (p, _) in self.column_of.items() if p == project_id]:
            del self.column_of[task_id]
        del self.model[project_id]

    @invariant()
    def every_column_is_dense_and_in_the_model_order(self) -> None:
        actual = columns(self.db)  # asserts 0..n-1, each once
        expected = {
            (project_id, column): order
            for project_id, by_column in self.model.items()
            for column, order in by_column.items()
            if order
        }
        assert actual == expected


BoardMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_random_operations_keep_every_column_dense = BoardMachine.TestCase


def test_the_invariant_check_catches_a_broken_listing(
    db: sqlite_utils.Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`columns` (the check the tests rely on) fails when the positions the API shows
    have duplicates or gaps, or disagree between the list and `get_task`."""
    project_id = project(db)
    for name in "abc":
        task(db, project_id, name)
    real_list, real_get = board.list_tasks, board.get_task

    def shifted_list(db: sqlite_utils.Database, query: TaskQuery) -> dict[str, Any]:
        page = real_list(db, query)
        return {**page, "tasks": [{**t, "position": t["position"] + 1} for t in page["tasks"]]}

    def zero_list(db: sqlite_utils.Database, query: TaskQuery) -> dict[str, Any]:
        page = real_list(db, query)
        return {**page, "tasks": [{**t, "position": 0} for t in page["tasks"]]}

    def shifted_get(db: sqlite_utils.Database, task_id: str) -> dict[str, Any]:
        return {**real_get(db, task_id), "position": 9}

    breakers: list[Callable[[], object]] = [
        lambda: monkeypatch.setattr(board, "list_tasks", shifted_list),
        lambda: monkeypatch.setattr(board, "list_tasks", zero_list),
        lambda: monkeypatch.setattr(board, "get_task", shifted_get),
    ]
    for breaker in breakers:
        breaker()
        with pytest.raises(AssertionError):
            columns(db)
        monkeypatch.undo()
    columns(db)
