"""Session requests and the session/task/input records, on real files and a real store."""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import sqlite_utils
import trio

from lokid import session_records as sr
from lokid.actors import StoreActor
from lokid.errors import Conflict, InvalidQuery, NotFound, ValidationFailed
from lokid.migrations import latest_version
from lokid.prd import MAX_PRD_BYTES, PrdTask
from lokid.session_state import IllegalTransition

from .child_status import StubChildStatus

WAIT = 5.0
PRD = "# Shop\n\n## Features\n\n- Add a cart\n- Add a checkout\n"

SESSION_KEYS = {
    "id",
    "status",
    "provider",
    "prd",
    "projectDir",
    "options",
    "phase",
    "iteration",
    "createdAt",
    "startedAt",
    "updatedAt",
    "endedAt",
    "exitReason",
    "agents",
    "tasks",
    "costUsd",
}
TASK_KEYS = {
    "id",
    "sessionId",
    "title",
    "description",
    "status",
    "priority",
    "attempts",
    "agent",
    "createdAt",
    "startedAt",
    "completedAt",
    "error",
    "source",
}
OPTION_KEYS = {
    "parallel",
    "sandbox",
    "maxAgents",
    "maxIterations",
    "maxDurationSeconds",
    "budgetUsd",
    "model",
    "verify",
    "command",
}


def everything(name: str) -> str | None:
    """A `which` that finds every program."""
    return f"/usr/bin/{name}"


def lacking(*missing: str) -> Callable[[str], str | None]:
    def which(name: str) -> str | None:
        return None if name in missing else f"/usr/bin/{name}"

    return which


def write_prd(path: Path, text: str = PRD) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def works(bwrap: str) -> str | None:
    """A sandbox probe that finds bubblewrap working."""
    return None


def parse(
    body: dict[str, Any],
    which: Callable[[str], str | None] = everything,
    sandbox_check: Callable[[str], str | None] = works,
) -> sr.SessionRequest:
    return sr.parse_session_request(
        body, default_provider="claude", which=which, sandbox_check=sandbox_check
    )


def refused(
    body: dict[str, Any],
    which: Callable[[str], str | None] = everything,
    sandbox_check: Callable[[str], str | None] = works,
) -> ValidationFailed:
    with pytest.raises(ValidationFailed) as info:
        parse(body, which, sandbox_check)
    assert info.value.code == "VALIDATION_ERROR"
    assert info.value.details["field"] == info.value.field
    return info.value


# -- request validation ----------------------------------------------------------


def test_valid_request_with_defaults(tmp_path: Path) -> None:
    prd = write_prd(tmp_path / "proj" / "prd.md")
    request = parse({"prd": str(prd)})
    assert request.prd_path == prd.resolve()
    assert request.prd_text is None
    assert request.project_dir == prd.parent.resolve()
    assert request.provider == "claude"
    assert request.options == sr.SessionOptions()
    assert request.options.max_iterations == 50
    assert set(request.options.to_json()) == OPTION_KEYS


def test_all_options_are_typed(tmp_path: Path) -> None:
    prd = write_prd(tmp_path / "prd.md")
    request = parse(
        {
            "prd": str(prd),
            "provider": "claude",
            "options": {
                "parallel": True,
                "sandbox": True,
                "maxAgents": 3,
                "maxIterations": 7,
                "maxDurationSeconds": 3600,
                "budgetUsd": 2,
                "model": "gpt-5",
                "verify": "make test",
            },
        }
    )
    assert request.provider == "claude"
    assert request.options == sr.SessionOptions(
        parallel=True,
        sandbox=True,
        max_agents=3,
        max_iterations=7,
        max_duration_seconds=3600,
        budget_usd=2.0,
        model="gpt-5",
        verify="make test",
    )
    assert sr.SessionOptions.from_json(request.options.to_json()) == request.options


def test_missing_prd(tmp_path: Path) -> None:
    error = refused({"prd": str(tmp_path / "nope.md")})
    assert error.field == "prd"
    assert "does not exist" in error.message


def test_directory_as_prd(tmp_path: Path) -> None:
    (tmp_path / "dir.md").mkdir()
    error = refused({"prd": str(tmp_path / "dir.md")})
    assert error.field == "prd"
    assert "is a directory" in error.message


def test_binary_prd(tmp_path: Path) -> None:
    (tmp_path / "prd.md").write_bytes(b"# Title\n\x00\x01\x02")
    error = refused({"prd": str(tmp_path / "prd.md")})
    assert error.field == "prd"
    assert "binary" in error.message


def test_empty_prd(tmp_path: Path) -> None:
    (tmp_path / "prd.md").write_bytes(b"")
    error = refused({"prd": str(tmp_path / "prd.md")})
    assert error.field == "prd"
    assert "empty" in error.message


def test_huge_prd(tmp_path: Path) -> None:
    path = tmp_path / "prd.md"
    with path.open("wb") as handle:
        handle.write(b"# Title\n")
        handle.truncate(MAX_PRD_BYTES + 1)  # sparse
    error = refused({"prd": str(path)})
    assert error.field == "prd"
    assert "too large" in error.message
    assert error.details["size"] == MAX_PRD_BYTES + 1


def test_prd_of_exactly_the_limit_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "prd.md"
    path.write_bytes(b"# Title\n" + b"x" * (MAX_PRD_BYTES - 8))
    assert parse({"prd": str(path)}).prd_path == path.resolve()


def test_unreadable_prd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_prd(tmp_path / "prd.md")
    path.chmod(0)
    if os.geteuid() == 0:  # root reads every file: make the open fail as it would for a user
        real_open = Path.open

        def denied(self: Path, *args: Any, **kwargs: Any) -> Any:
            if self == path:
                raise PermissionError(13, "Permission denied", str(self))
            return real_open(self, *args, **kwargs)

        monkeypatch.setattr(Path, "open", denied)
    error = refused({"prd": str(path)})
    assert error.field == "prd"
    assert "not readable" in error.message


def test_unknown_top_level_key(tmp_path: Path) -> None:
    prd = write_prd(tmp_path / "prd.md")
    error = refused({"prd": str(prd), "flavour": "x"})
    assert error.field == "flavour"
    assert "unknown key 'flavour'" in error.message


def test_unknown_option(tmp_path: Path) -> None:
    prd = write_prd(tmp_path / "prd.md")
    error = refused({"prd": str(prd), "options": {"turbo": True}})
    assert error.field == "options.turbo"
    assert "unknown option 'turbo'" in error.message


@pytest.mark.parametrize(
    ("body", "field", "fragment"),
    [
        ({"prd": 12}, "prd", "prd must be a string"),
        ({"projectDir": ["a"]}, "projectDir", "must be a string"),
        ({"provider": True}, "provider", "must be a string"),
        ({"options": []}, "options", "options must be an object"),
        ({"options": {"parallel": "yes"}}, "options.parallel", "true or false"),
        ({"options": {"sandbox": 1}}, "options.sandbox", "true or false"),
        ({"options": {"maxIterations": "5"}}, "options.maxIterations", "must be an integer"),
        ({"options": {"maxIterations": 2.5}}, "options.maxIterations", "must be an integer"),
        ({"options": {"maxIterations": True}}, "options.maxIterations", "must be an integer"),
        ({"options": {"maxIterations": 0}}, "options.maxIterations", "between 1 and 10000"),
        ({"options": {"maxIterations": 10001}}, "options.maxIterations", "between 1 and 10000"),
        ({"options": {"maxAgents": 0}}, "options.maxAgents", "between 1 and 100"),
        ({"options": {"maxAgents": 101}}, "options.maxAgents", "between 1 and 100"),
        (
            {"options": {"maxDurationSeconds": 30 * 86400 + 1}},
            "options.maxDurationSeconds",
            "between 1 and 2592000",
        ),
        ({"options": {"maxDurationSeconds": 0}}, "options.maxDurationSeconds", "between 1"),
        ({"options": {"budgetUsd": 0}}, "options.budgetUsd", "greater than 0"),
        ({"options": {"budgetUsd": -1.5}}, "options.budgetUsd", "greater than 0"),
        ({"options": {"budgetUsd": float("inf")}}, "options.budgetUsd", "finite"),
        ({"options": {"budgetUsd": "1"}}, "options.budgetUsd", "must be a number"),
        ({"options": {"model": 5}}, "options.model", "must be a string"),
        ({"options": {"model": "m" * 201}}, "options.model", "longer than 200"),
        ({"options": {"model": "-rf"}}, "options.model", "not starting with -"),
        ({"options": {"verify": "v" * 4097}}, "options.verify", "longer than 4096"),
        ({"options": {"verify": ""}}, "options.verify", "must not be empty"),
        ({"options": {"command": ["x"]}}, "options.command", "only for provider 'command'"),
    ],
)
def test_wrong_types_and_bounds(
    tmp_path: Path, body: dict[str, Any], field: str, fragment: str
) -> None:
    prd = write_prd(tmp_path / "prd.md")
    error = refused({"prd": str(prd), **body})
    assert error.field == field
    assert fragment in error.message


def test_long_paths_are_refused(tmp_path: Path) -> None:
    error = refused({"prd": "/" + "a" * 5000})
    assert error.field == "prd"
    assert "longer than 4096" in error.message


def test_unknown_provider(tmp_path: Path) -> None:
    prd = write_prd(tmp_path / "prd.md")
    error = refused({"prd": str(prd), "provider": "copilot"})
    assert error.field == "provider"
    assert "unknown provider 'copilot'" in error.message


def test_provider_cli_missing(tmp_path: Path) -> None:
    prd = write_prd(tmp_path / "prd.md")
    error = refused({"prd": str(prd), "provider": "gemini"}, which=lacking("gemini"))
    assert error.field == "provider"
    assert "`gemini` CLI" in error.message
    assert "npm install -g @google/gemini-cli" in error.message
    # the same request passes when the CLI is there
    assert parse({"prd": str(prd), "provider": "gemini"}, which=lacking("claude")).provider == (
        "gemini"
    )


@pytest.mark.parametrize("provider", ["codex", "gemini", "aider", "cline", "opencode"])
def test_a_budget_for_a_provider_that_reports_no_cost_is_refused(
    tmp_path: Path, provider: str
) -> None:
    """It was accepted and could never stop the session (only claude reports its cost)."""
    body = {"prd": str(write_prd(tmp_path / "prd.md")), "provider": provider}
    error = refused({**body, "options": {"budgetUsd": 1}})
    assert error.field == "options.budgetUsd"
    assert f"{provider!r} reports none" in error.message
    assert parse({**body, "options": {"budgetUsd": None}}).options.budget_usd is None


def test_default_provider_cli_missing(tmp_path: Path) -> None:
    prd = write_prd(tmp_path / "prd.md")
    error = refused({"prd": str(prd)}, which=lacking("claude"))
    assert error.field == "provider"
    assert "`claude` CLI" in error.message


def test_command_provider(tmp_path: Path) -> None:
    prd = write_prd(tmp_path / "prd.md")
    error = refused({"prd": str(prd), "provider": "command"})
    assert error.field == "options.command"
    body = {"prd": str(prd), "provider": "command", "options": {"command": ["my-agent", "-q"]}}
    assert parse(body).options.command == ("my-agent", "-q")
    error = refused(body, which=lacking("my-agent"))
    assert error.field == "options.command"
    assert "my-agent" in error.message


def test_sandbox_without_bubblewrap(tmp_path: Path) -> None:
    prd = write_prd(tmp_path / "prd.md")
    body = {"prd": str(prd), "options": {"sandbox": True}}
    error = refused(body, which=lacking("bwrap"))
    assert error.field == "options.sandbox"
    assert "bubblewrap" in error.message
    assert parse(body).options.sandbox is True
    # no sandbox, no bubblewrap needed
    assert parse({"prd": str(prd)}, which=lacking("bwrap")).options.sandbox is False


def test_sandbox_whose_bubblewrap_cannot_run_is_refused(tmp_path: Path) -> None:
    prd = write_prd(tmp_path / "prd.md")
    body = {"prd": str(prd), "options": {"sandbox": True}}
    probed: list[str] = []

    def broken(bwrap: str) -> str:
        probed.append(bwrap)
        return "bwrap: No permissions to create new namespace"

    error = refused(body, sandbox_check=broken)
    assert error.field == "options.sandbox"
    assert error.message == (
        "options.sandbox cannot be used on this machine: "
        "bwrap: No permissions to create new namespace"
    )
    assert probed == ["/usr/bin/bwrap"]  # the bwrap `which` found
    parse({"prd": str(prd)}, sandbox_check=broken)  # no sandbox asked: no probe
    assert probed == ["/usr/bin/bwrap"]


@pytest.mark.parametrize("marker", [".git", ".loki"])
def test_project_dir_defaults_to_marked_ancestor(tmp_path: Path, marker: str) -> None:
    repo = tmp_path / "repo"
    (repo / marker).mkdir(parents=True)
    prd = write_prd(repo / "docs" / "specs" / "prd.md")
    assert parse({"prd": str(prd)}).project_dir == repo.resolve()


def test_nearest_marked_ancestor_wins(tmp_path: Path) -> None:
    (tmp_path / "outer" / ".git").mkdir(parents=True)
    (tmp_path / "outer" / "inner" / ".git").mkdir(parents=True)
    prd = write_prd(tmp_path / "outer" / "inner" / "docs" / "prd.md")
    assert parse({"prd": str(prd)}).project_dir == (tmp_path / "outer" / "inner").resolve()


def test_relative_prd_with_project_dir(tmp_path: Path) -> None:
    project = tmp_path / "proj"
    prd = write_prd(project / "docs" / "prd.md")
    request = parse({"prd": "docs/prd.md", "projectDir": str(project)})
    assert request.prd_path == prd.resolve()
    assert request.project_dir == project.resolve()


def test_relative_prd_without_project_dir(tmp_path: Path) -> None:
    error = refused({"prd": "docs/prd.md"})
    assert error.field == "prd"
    assert "absolute" in error.message


def test_prd_text_without_project_dir() -> None:
    error = refused({"prdText": PRD})
    assert error.field == "projectDir"
    assert "required with prdText" in error.message


def test_prd_text_with_project_dir(tmp_path: Path) -> None:
    request = parse({"prdText": PRD, "projectDir": str(tmp_path)})
    assert request.prd_text == PRD
    assert request.prd_path == tmp_path.resolve() / ".loki" / "prd.md"
    assert not request.prd_path.exists()  # written later by the runner


def test_prd_text_rules(tmp_path: Path) -> None:
    error = refused({"prdText": "", "projectDir": str(tmp_path)})
    assert (error.field, "empty" in error.message) == ("prdText", True)
    error = refused({"prdText": "x" * (MAX_PRD_BYTES + 1), "projectDir": str(tmp_path)})
    assert (error.field, "too large" in error.message) == ("prdText", True)
    error = refused({"prdText": 5, "projectDir": str(tmp_path)})
    assert (error.field, "must be a string" in error.message) == ("prdText", True)


def test_prd_xor_prd_text(tmp_path: Path) -> None:
    prd = write_prd(tmp_path / "prd.md")
    error = refused({"prd": str(prd), "prdText": PRD, "projectDir": str(tmp_path)})
    assert error.field == "prdText"
    assert "not both" in error.message
    error = refused({"projectDir": str(tmp_path)})
    assert error.field == "prd"
    assert "either prd" in error.message


def test_project_dir_must_be_an_existing_directory(tmp_path: Path) -> None:
    prd = write_prd(tmp_path / "prd.md")
    error = refused({"prd": str(prd), "projectDir": str(tmp_path / "missing")})
    assert (error.field, "does not exist" in error.message) == ("projectDir", True)
    error = refused({"prd": str(prd), "projectDir": str(prd)})
    assert (error.field, "not a directory" in error.message) == ("projectDir", True)
    error = refused({"prd": str(prd), "projectDir": "relative/dir"})
    assert (error.field, "absolute" in error.message) == ("projectDir", True)


def test_a_real_path_that_is_not_utf8_is_refused_with_the_path_shown(tmp_path: Path) -> None:
    """A link whose real path is not UTF-8: SQLite, events and the 422 itself could not
    carry it (the body could not be encoded: a 500)."""
    bad = os.fsencode(tmp_path) + b"/bad\xffname"
    os.makedirs(bad)
    os.symlink(bad, os.fsencode(tmp_path / "link"))
    prd = write_prd(tmp_path / "prd.md")
    shown = f"{tmp_path}/bad\\xffname"
    error = refused({"prd": str(prd), "projectDir": str(tmp_path / "link")})
    assert (error.field, error.details["path"]) == ("projectDir", shown)
    assert f"projectDir {shown} is not valid UTF-8" in error.message
    write_prd(Path(os.fsdecode(bad + b"/prd.md")))
    error = refused({"prd": str(tmp_path / "link" / "prd.md")})
    assert (error.field, error.details["path"]) == ("prd", shown + "/prd.md")


def test_project_dir_must_be_writable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "ro"
    prd = write_prd(project / "prd.md")
    if os.geteuid() == 0:  # root writes everywhere: answer access() as it would for a user
        real_access = os.access
        monkeypatch.setattr(
            os,
            "access",
            lambda p, mode, **kw: False if Path(p) == project else real_access(p, mode, **kw),
        )
    project.chmod(0o555)
    try:
        error = refused({"prd": str(prd)})
    finally:
        project.chmod(0o755)
    assert (error.field, "not writable" in error.message) == ("projectDir", True)


def test_null_counts_as_absent(tmp_path: Path) -> None:
    prd = write_prd(tmp_path / "prd.md")
    request = parse({"prd": str(prd), "prdText": None, "provider": None, "options": None})
    assert request.provider == "claude"
    assert request.options == sr.SessionOptions()


# -- list queries ---------------------------------------------------------------


def test_list_query_defaults_and_values() -> None:
    sessions = sr.SESSION_STATUSES
    assert sr.parse_list_query({}, statuses=sessions) == (None, 100, 0)
    assert sr.parse_list_query(
        {"status": "running", "limit": "1000", "offset": "5"}, statuses=sessions
    ) == ("running", 1000, 5)
    assert sr.parse_list_query({"status": "active"}, statuses=sr.TASK_STATUSES).status == "active"
    assert sr.parse_list_query({"limit": "7"}, statuses=None) == (None, 7, 0)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": "abc"}, "limit"),
        ({"limit": ""}, "limit"),
        ({"limit": "0"}, "limit"),
        ({"limit": "5000"}, "limit"),
        ({"limit": "1.5"}, "limit"),
        ({"offset": "-1"}, "offset"),
        ({"offset": "x"}, "offset"),
        ({"status": "sleeping"}, "status"),
        ({"sort": "id"}, "sort"),
    ],
)
def test_list_query_refuses(params: dict[str, str], field: str) -> None:
    with pytest.raises(InvalidQuery) as info:
        sr.parse_list_query(params, statuses=sr.SESSION_STATUSES)
    assert info.value.code == "BAD_REQUEST"
    assert info.value.field == field


def test_task_status_is_not_a_session_status() -> None:
    with pytest.raises(InvalidQuery):
        sr.parse_list_query({"status": "pending"}, statuses=sr.SESSION_STATUSES)
    with pytest.raises(InvalidQuery):
        sr.parse_list_query({"status": "running"}, statuses=sr.TASK_STATUSES)


@pytest.mark.parametrize("text", ["100000000000000000000000", "-" + "9" * 30])
def test_a_huge_integer_is_told_the_bound_not_called_no_integer(text: str) -> None:
    with pytest.raises(InvalidQuery) as info:
        sr.query_int({"offset": text}, "offset", 0, 0, sr.MAX_OFFSET)
    assert info.value.field == "offset"
    assert str(info.value) == f"offset must be between 0 and {sr.MAX_OFFSET}"


@pytest.mark.parametrize("status", ["completed", "running", ""])
def test_a_list_without_a_status_filter_refuses_status(status: str) -> None:
    """Not a 400 listing the session statuses, not a filter silently ignored."""
    with pytest.raises(InvalidQuery) as info:
        sr.parse_list_query({"status": status}, statuses=None)
    assert info.value.field == "status"
    assert "not a query parameter" in str(info.value) and "limit, offset" in str(info.value)


# -- ids ------------------------------------------------------------------------


async def test_ids_have_prefix_and_sort_by_time() -> None:
    first = sr.new_session_id()
    await trio.sleep(0.002)
    second = sr.new_session_id()
    assert re.fullmatch(r"session-[0-9a-hjkmnp-tv-z]{26}", first)
    assert first < second
    assert re.fullmatch(r"input-[0-9a-hjkmnp-tv-z]{26}", sr.new_input_id())
    assert len({sr.new_session_id() for _ in range(1000)}) == 1000


# -- the store ------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running(store: StoreActor) -> AsyncIterator[StoreActor]:
    status = StubChildStatus()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(store.run, task_status=status))
        with trio.fail_after(WAIT):
            await status.started_event.wait()
        yield store
        status.shutdown_requested.set()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[StoreActor]:
    async with running(StoreActor(tmp_path / "data" / "lokid.db", group_window=0)) as actor:
        yield actor


def request_for(project: Path, provider: str = "claude") -> sr.SessionRequest:
    project.mkdir(parents=True, exist_ok=True)
    return sr.SessionRequest(
        prd_path=project / "prd.md",
        prd_text=None,
        project_dir=project,
        provider=provider,
        options=sr.SessionOptions(model="m1"),
    )


async def create(
    store: StoreActor, project: Path, *, session_id: str | None = None, now: str | None = None
) -> dict[str, Any]:
    request = request_for(project)
    return await store.write(
        lambda db: sr.insert_session(db, request, session_id=session_id, now=now)
    )


def task(task_id: str, priority: int = 2, title: str | None = None) -> PrdTask:
    return PrdTask(
        id=task_id,
        title=title or f"Task {task_id}",
        description=f"About {task_id}",
        priority=priority,
        acceptance=(),
        section="Features",
        line=1,
    )


async def test_migration_4_creates_the_tables(store: StoreActor) -> None:
    assert store.schema_version == latest_version() >= 4

    def tables(db: sqlite_utils.Database) -> set[str]:
        return set(db.table_names())

    assert {"sessions", "tasks", "session_inputs"} <= await store.read(tables)


async def test_insert_and_get_session_shape(store: StoreActor, tmp_path: Path) -> None:
    now = "2026-01-02T03:04:05.678Z"
    created = await create(store, tmp_path / "p", session_id="session-a", now=now)
    assert set(created) == SESSION_KEYS
    fetched = await store.read(lambda db: sr.get_session(db, "session-a"))
    assert fetched == created
    assert fetched["id"] == "session-a"
    assert fetched["status"] == "starting"
    assert fetched["provider"] == "claude"
    assert fetched["prd"] == str(tmp_path / "p" / "prd.md")
    assert fetched["projectDir"] == str(tmp_path / "p")
    assert set(fetched["options"]) == OPTION_KEYS
    assert fetched["options"]["model"] == "m1"
    assert fetched["options"]["maxIterations"] == 50
    assert fetched["createdAt"] == fetched["updatedAt"] == now
    assert fetched["startedAt"] is None
    assert fetched["iteration"] == 0
    assert fetched["agents"] == {"active": 0, "total": 0}
    assert fetched["tasks"] == {"total": 0, "pending": 0, "active": 0, "completed": 0, "failed": 0}
    assert fetched["costUsd"] == 0.0


async def test_get_missing_session(store: StoreActor) -> None:
    with pytest.raises(NotFound, match="Session not found"):
        await store.read(lambda db: sr.get_session(db, "session-nope"))


async def test_agents_counts_come_from_the_agents_table(store: StoreActor, tmp_path: Path) -> None:
    await create(store, tmp_path / "p", session_id="session-a")

    def add_agents(db: sqlite_utils.Database) -> None:
        for ended in (None, None, "2026-01-01T00:00:00.000Z"):
            db.execute(
                "INSERT INTO agents (session_id, pid, start_ticks, started_at, ended_at)"
                " VALUES ('session-a', 1, 1, 'x', ?)",
                (ended,),
            )

    await store.write(add_agents)
    session = await store.read(lambda db: sr.get_session(db, "session-a"))
    assert session["agents"] == {"active": 2, "total": 3}


async def test_second_active_session_in_same_project_is_409(
    store: StoreActor, tmp_path: Path
) -> None:
    first = await create(store, tmp_path / "p", session_id="session-a")
    with pytest.raises(Conflict) as info:
        await create(store, tmp_path / "p", session_id="session-b")
    assert info.value.details["sessionId"] == first["id"]
    # another project is fine
    await create(store, tmp_path / "q", session_id="session-c")
    # once the first is stopped, the project is free
    await store.write(lambda db: sr.update_session(db, "session-a", status="stopped"))
    second = await create(store, tmp_path / "p", session_id="session-b")
    assert second["status"] == "starting"


@pytest.mark.parametrize("status", ["running", "paused", "stopping"])
async def test_every_active_status_holds_the_project(
    store: StoreActor, tmp_path: Path, status: str
) -> None:
    await create(store, tmp_path / "p", session_id="session-a")
    await store.write(lambda db: sr.update_session(db, "session-a", status=status))
    with pytest.raises(Conflict):
        await create(store, tmp_path / "p", session_id="session-b")


async def test_interrupted_session_frees_the_project_until_resumed(
    store: StoreActor, tmp_path: Path
) -> None:
    await create(store, tmp_path / "p", session_id="session-a")
    await store.write(lambda db: sr.update_session(db, "session-a", status="interrupted"))
    await create(store, tmp_path / "p", session_id="session-b")
    with pytest.raises(Conflict) as info:
        await store.write(lambda db: sr.update_session(db, "session-a", status="running"))
    assert info.value.details["sessionId"] == "session-b"


async def test_unique_index_is_the_backstop(store: StoreActor, tmp_path: Path) -> None:
    await create(store, tmp_path / "p", session_id="session-a")

    def raw_insert(db: sqlite_utils.Database) -> None:
        db.execute(
            "INSERT INTO sessions (id, status, provider, prd, project_dir, options,"
            " created_at, updated_at) VALUES ('session-z', 'running', 'claude', 'x', ?, '{}',"
            " 'x', 'x')",
            (str(tmp_path / "p"),),
        )

    with pytest.raises(Conflict):
        await store.write(raw_insert)


async def test_update_session(store: StoreActor, tmp_path: Path) -> None:
    await create(store, tmp_path / "p", session_id="session-a", now="2026-01-01T00:00:00.000Z")
    updated = await store.write(
        lambda db: sr.update_session(
            db,
            "session-a",
            status="running",
            phase="development",
            iteration=3,
            started_at="2026-01-01T00:00:01.000Z",
            cost_usd=1.25,
        )
    )
    assert (updated["status"], updated["phase"], updated["iteration"]) == (
        "running",
        "development",
        3,
    )
    assert updated["startedAt"] == "2026-01-01T00:00:01.000Z"
    assert updated["costUsd"] == 1.25
    assert updated["updatedAt"] != "2026-01-01T00:00:00.000Z"
    with pytest.raises(NotFound):
        await store.write(lambda db: sr.update_session(db, "session-x", phase="x"))
    with pytest.raises(TypeError):
        await store.write(lambda db: sr.update_session(db, "session-a", colour="red"))
    with pytest.raises(ValueError):
        await store.write(lambda db: sr.update_session(db, "session-a", status="bogus"))


async def test_set_session_fields_and_the_reads_without_counts(
    store: StoreActor, tmp_path: Path
) -> None:
    await create(store, tmp_path / "p", session_id="session-a", now="2026-01-01T00:00:00.000Z")
    await store.write(lambda db: sr.set_session_fields(db, "session-a", iteration=4))
    full = await store.read(lambda db: sr.get_session(db, "session-a"))
    fields = await store.read(lambda db: sr.get_session_fields(db, "session-a"))
    assert fields == {**full, "agents": None, "tasks": None}
    assert fields["iteration"] == 4 and fields["updatedAt"] != "2026-01-01T00:00:00.000Z"
    assert await store.read(lambda db: sr.session_iteration(db, "session-a")) == 4
    with pytest.raises(NotFound):
        await store.write(lambda db: sr.set_session_fields(db, "session-x", phase="x"))
    with pytest.raises(TypeError):
        await store.write(lambda db: sr.set_session_fields(db, "session-a", colour="red"))


async def test_list_sessions_order_filter_pagination(store: StoreActor, tmp_path: Path) -> None:
    ids = []
    for i in range(5):
        created = await create(store, tmp_path / f"p{i}", now=f"2026-01-01T00:00:0{i}.000Z")
        ids.append(created["id"])
    for session_id in ids[:2]:
        await store.write(
            functools.partial(sr.update_session, session_id=session_id, status="stopped")
        )

    page = await store.read(lambda db: sr.list_sessions(db))
    assert set(page) == {"sessions", "total", "limit", "offset"}
    assert [s["id"] for s in page["sessions"]] == ids[::-1]
    assert (page["total"], page["limit"], page["offset"]) == (5, 100, 0)
    assert all(set(s) == SESSION_KEYS for s in page["sessions"])

    page = await store.read(lambda db: sr.list_sessions(db, limit=2, offset=1))
    assert [s["id"] for s in page["sessions"]] == [ids[3], ids[2]]
    assert (page["total"], page["limit"], page["offset"]) == (5, 2, 1)

    page = await store.read(lambda db: sr.list_sessions(db, status="stopped"))
    assert [s["id"] for s in page["sessions"]] == [ids[1], ids[0]]
    assert page["total"] == 2

    page = await store.read(lambda db: sr.list_sessions(db, status="starting", offset=10))
    assert page["sessions"] == []
    assert page["total"] == 3


async def test_same_timestamp_sorts_by_id(store: StoreActor, tmp_path: Path) -> None:
    now = "2026-01-01T00:00:00.000Z"
    await create(store, tmp_path / "a", session_id="session-1", now=now)
    await create(store, tmp_path / "b", session_id="session-2", now=now)
    page = await store.read(lambda db: sr.list_sessions(db))
    assert [s["id"] for s in page["sessions"]] == ["session-2", "session-1"]


async def test_delete_removes_tasks_inputs_and_events(store: StoreActor, tmp_path: Path) -> None:
    for name in ("session-a", "session-b"):
        await create(store, tmp_path / name, session_id=name)
        await store.write(functools.partial(sr.insert_tasks, session_id=name, tasks=[task("t1")]))
        await store.write(functools.partial(sr.update_session, session_id=name, status="running"))
        await store.write(functools.partial(sr.add_input, session_id=name, message="hi"))

        def event(db: sqlite_utils.Database, name: str = name) -> None:
            db.execute(
                "INSERT INTO events (type, session_id, level, timestamp, data)"
                " VALUES ('log', ?, 20, 'x', '{}')",
                (name,),
            )

        await store.write(event)

    # active: refused, nothing removed
    with pytest.raises(IllegalTransition) as info:
        await store.write(lambda db: sr.delete_session(db, "session-a"))
    assert info.value.details["status"] == "running"

    await store.write(lambda db: sr.update_session(db, "session-a", status="stopped"))
    await store.write(lambda db: sr.delete_session(db, "session-a"))

    def counts(db: sqlite_utils.Database) -> dict[str, list[str]]:
        return {
            table: [row[0] for row in db.execute(f"SELECT {column} FROM {table}")]
            for table, column in (
                ("sessions", "id"),
                ("tasks", "session_id"),
                ("session_inputs", "session_id"),
                ("events", "session_id"),
            )
        }

    assert await store.read(counts) == {
        "sessions": ["session-b"],
        "tasks": ["session-b"],
        "session_inputs": ["session-b"],
        "events": ["session-b"],
    }
    with pytest.raises(NotFound):
        await store.write(lambda db: sr.delete_session(db, "session-a"))


async def test_tasks_shape_and_queue_order(store: StoreActor, tmp_path: Path) -> None:
    await create(store, tmp_path / "p", session_id="session-a")
    now = "2026-01-01T00:00:00.000Z"
    inserted = await store.write(
        lambda db: sr.insert_tasks(
            db,
            "session-a",
            [task("prd-001", 2), task("prd-002", 0), task("prd-003", 2), task("prd-004", 1)],
            now=now,
        )
    )
    assert [t["id"] for t in inserted] == ["prd-001", "prd-002", "prd-003", "prd-004"]
    first = inserted[0]
    assert set(first) == TASK_KEYS
    assert first == {
        "id": "prd-001",
        "sessionId": "session-a",
        "title": "Task prd-001",
        "description": "About prd-001",
        "status": "pending",
        "priority": 2,
        "attempts": 0,
        "agent": None,
        "createdAt": now,
        "startedAt": None,
        "completedAt": None,
        "error": None,
        "source": "prd",
    }
    # a later task of the same priority runs after the earlier ones
    await store.write(
        lambda db: sr.insert_tasks(db, "session-a", [task("agent-1", 0)], source="agent")
    )

    queue = await store.read(lambda db: sr.queued_tasks(db, session_id="session-a"))
    assert [t["id"] for t in queue["tasks"]] == [
        "prd-002",
        "agent-1",
        "prd-004",
        "prd-001",
        "prd-003",
    ]
    assert queue["total"] == 5

    await store.write(
        lambda db: sr.update_task(
            db, "session-a", "prd-002", status="active", attempts=1, agent="agent-7"
        )
    )
    active = await store.read(lambda db: sr.active_tasks(db))
    assert [t["id"] for t in active["tasks"]] == ["prd-002"]
    assert active["tasks"][0]["agent"] == "agent-7"
    queue = await store.read(lambda db: sr.queued_tasks(db))
    assert [t["id"] for t in queue["tasks"]] == ["agent-1", "prd-004", "prd-001", "prd-003"]

    session = await store.read(lambda db: sr.get_session(db, "session-a"))
    assert session["tasks"] == {"total": 5, "pending": 4, "active": 1, "completed": 0, "failed": 0}


async def test_global_queue_skips_sessions_that_will_not_run(
    store: StoreActor, tmp_path: Path
) -> None:
    await create(store, tmp_path / "a", session_id="session-a")
    await create(store, tmp_path / "b", session_id="session-b")
    await store.write(lambda db: sr.insert_tasks(db, "session-a", [task("prd-001")]))
    await store.write(lambda db: sr.insert_tasks(db, "session-b", [task("prd-001")]))
    await store.write(lambda db: sr.update_session(db, "session-a", status="failed"))
    queue = await store.read(lambda db: sr.queued_tasks(db))
    assert [(t["sessionId"], t["id"]) for t in queue["tasks"]] == [("session-b", "prd-001")]


async def test_list_tasks_filters_and_pages(store: StoreActor, tmp_path: Path) -> None:
    await create(store, tmp_path / "a", session_id="session-a", now="2026-01-01T00:00:00.000Z")
    await create(store, tmp_path / "b", session_id="session-b", now="2026-01-01T00:00:01.000Z")
    await store.write(
        lambda db: sr.insert_tasks(db, "session-a", [task("prd-001"), task("prd-002")])
    )
    await store.write(lambda db: sr.insert_tasks(db, "session-b", [task("prd-001")]))
    await store.write(
        lambda db: sr.update_task(
            db, "session-a", "prd-002", status="failed", error="boom", completed_at="t"
        )
    )

    every = await store.read(lambda db: sr.list_tasks(db))
    assert [(t["sessionId"], t["id"]) for t in every["tasks"]] == [
        ("session-b", "prd-001"),
        ("session-a", "prd-001"),
        ("session-a", "prd-002"),
    ]
    assert every["total"] == 3
    mine = await store.read(lambda db: sr.list_tasks(db, session_id="session-a", limit=1))
    assert [t["id"] for t in mine["tasks"]] == ["prd-001"]
    assert (mine["total"], mine["limit"], mine["offset"]) == (2, 1, 0)
    failed = await store.read(lambda db: sr.list_tasks(db, status="failed"))
    assert [t["error"] for t in failed["tasks"]] == ["boom"]
    assert failed["total"] == 1
    with pytest.raises(NotFound):
        await store.read(lambda db: sr.list_tasks(db, session_id="session-x"))


async def test_task_errors(store: StoreActor, tmp_path: Path) -> None:
    await create(store, tmp_path / "a", session_id="session-a")
    await store.write(lambda db: sr.insert_tasks(db, "session-a", [task("prd-001")]))
    with pytest.raises(NotFound, match="Task not found"):
        await store.read(lambda db: sr.get_task(db, "session-a", "prd-999"))
    with pytest.raises(NotFound, match="Task not found"):
        await store.write(lambda db: sr.update_task(db, "session-a", "prd-999", status="active"))
    with pytest.raises(Conflict):
        await store.write(lambda db: sr.insert_tasks(db, "session-a", [task("prd-001")]))
    with pytest.raises(NotFound, match="Session not found"):
        await store.write(lambda db: sr.insert_tasks(db, "session-x", [task("prd-001")]))
    with pytest.raises(ValueError):
        await store.write(lambda db: sr.update_task(db, "session-a", "prd-001", status="done"))
    assert (await store.read(lambda db: sr.get_task(db, "session-a", "prd-001")))[
        "status"
    ] == "pending"


async def test_inputs(store: StoreActor, tmp_path: Path) -> None:
    await create(store, tmp_path / "a", session_id="session-a")
    # a starting session takes no input
    with pytest.raises(IllegalTransition):
        await store.write(lambda db: sr.add_input(db, "session-a", "hello"))
    await store.write(lambda db: sr.update_session(db, "session-a", status="running"))
    answer = await store.write(lambda db: sr.add_input(db, "session-a", "hello"))
    assert set(answer) == {"id", "sessionId", "status"}
    assert answer["id"].startswith("input-")
    assert (answer["sessionId"], answer["status"]) == ("session-a", "queued")
    with pytest.raises(ValidationFailed) as info:
        await store.write(lambda db: sr.add_input(db, "session-a", "x" * (64 * 1024 + 1)))
    assert info.value.field == "message"
    with pytest.raises(NotFound):
        await store.write(lambda db: sr.add_input(db, "session-x", "hello"))

    pending = await store.read(lambda db: sr.pending_inputs(db, "session-a"))
    assert [p["message"] for p in pending] == ["hello"]
    applied = await store.write(lambda db: sr.mark_inputs_applied(db, [answer["id"]]))
    assert applied == [answer["id"]]
    again = await store.write(lambda db: sr.mark_inputs_applied(db, [answer["id"]]))
    assert again == []  # applied once: a second mark changes nothing
    assert await store.read(lambda db: sr.pending_inputs(db, "session-a")) == []


def test_validate_input_message() -> None:
    assert sr.validate_input_message({"message": "go"}) == "go"
    for body, fragment in (
        ({}, "must be a string"),
        ({"message": "  "}, "must not be empty"),
        ({"message": "é" * (32 * 1024 + 1)}, "64 KiB"),
    ):
        with pytest.raises(ValidationFailed, match=fragment):
            sr.validate_input_message(body)
    with pytest.raises(ValidationFailed) as info:
        sr.validate_input_message({"message": "go", "extra": 1})
    assert info.value.field == "extra"
