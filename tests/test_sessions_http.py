"""The HTTP contract of the session and task routes (seed "Session/Task Endpoints", DESIGN.md §5).

An in-process daemon whose agent is the fake Claude CLI (`tests/sessions_kit.py`):
a `[mode:slow] [seconds:30]` marker in a PRD feature keeps that task's agent
running while a test looks at the session; tests stop such sessions before
they end, so nothing waits for the 30 seconds.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from lokid.config import PROVIDERS
from lokid.prd import MAX_PRD_BYTES

from . import fake_agent
from .daemon_proc import DaemonProcess
from .sessions_kit import Lab, install_fake_agent, lab, make_project
from .test_session_records import OPTION_KEYS, SESSION_KEYS, TASK_KEYS

SLOW_PRD = """\
# Slow app

## Features
- First feature [mode:slow] [seconds:30]
- Second feature
- Third feature
"""

READ_ONLY_DIR = "/proc/sys"
ONE_FEATURE = "# Tiny\n\n## Features\n- The only feature\n"


@asynccontextmanager
async def fake_lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Lab]:
    install_fake_agent(tmp_path, monkeypatch)
    async with lab(tmp_path / "home") as the_lab:
        yield the_lab


def error_of(answer: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """Assert the seed's error body with `status` and `code`; return its `error` object."""
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["details"], dict), error
    return error


def validation_error(answer: httpx.Response, field: str) -> dict[str, Any]:
    error = error_of(answer, 422, "VALIDATION_ERROR")
    assert error["details"]["field"] == field, error
    return error


async def start_slow(the_lab: Lab, root: Path, name: str = "slow") -> dict[str, Any]:
    """A session whose first agent runs for 30 s; returned once that agent runs."""
    project = make_project(root, SLOW_PRD, name)
    created = await the_lab.create({"prd": str(project / "prd.md")})
    await the_lab.wait_event(created["id"], "agent.spawned")
    return await the_lab.session(created["id"])


async def stop(the_lab: Lab, session_id: str) -> dict[str, Any]:
    answer = await the_lab.post(f"/api/sessions/{session_id}/stop")
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] in ("stopping", "stopped")
    return await the_lab.wait_status(session_id, "stopped")


async def listing(the_lab: Lab) -> dict[str, Any]:
    answer = await the_lab.client.get("/api/sessions")
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


# -- POST /api/sessions: bad input ----------------------------------------------------


def missing_provider() -> str:
    for name in ("codex", "gemini", "aider", "cline", "opencode"):
        if shutil.which(name) is None:
            return name
    pytest.skip("every provider CLI is installed here; none can be reported missing")


BadCase = Callable[[Path], tuple[dict[str, Any], str]]  # root -> (body, field)


def _write(root: Path, name: str, data: bytes) -> Path:
    path = root / name
    path.write_bytes(data)
    return path


def _big_prd(root: Path) -> Path:
    path = root / "big.md"
    with path.open("wb") as handle:
        handle.truncate(MAX_PRD_BYTES + 1)  # sparse: no 5 MiB written
    return path


async def test_bad_create_bodies_are_refused_and_nothing_stored_is_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "inputs"
    good = make_project(root, ONE_FEATURE, "good")
    prd = str(good / "prd.md")
    a_file = _write(root, "not-a-folder.txt", b"x")
    cases: list[tuple[str, dict[str, Any], str, str]] = [
        # (name, body, details.field, a word the message must contain)
        ("unknown top-level key", {"prd": prd, "colour": "red"}, "colour", "colour"),
        ("unknown option", {"prd": prd, "options": {"turbo": True}}, "options.turbo", "turbo"),
        ("no prd and no prdText", {"provider": "claude"}, "prd", "prd"),
        ("PRD path missing", {"prd": str(root / "nowhere.md")}, "prd", "not found"),
        ("PRD empty", {"prd": str(_write(root, "empty.md", b""))}, "prd", "empty"),
        (
            "PRD binary",
            {"prd": str(_write(root, "binary.md", b"# PRD\n\x00\x01\x02"))},
            "prd",
            "binary",
        ),
        ("PRD over 5 MiB", {"prd": str(_big_prd(root))}, "prd", "too large"),
        ("unknown provider", {"prd": prd, "provider": "gpt-9"}, "provider", "gpt-9"),
        ("projectDir is a file", {"prd": prd, "projectDir": str(a_file)}, "projectDir", "not a"),
        (
            "relative prd without projectDir",
            {"prd": "prd.md"},
            "prd",
            "absolute",
        ),
    ]
    missing = missing_provider()
    cases.append(
        ("provider CLI not installed", {"prd": prd, "provider": missing}, "provider", missing)
    )

    async with fake_lab(tmp_path, monkeypatch) as the_lab:
        # Something stored first: a finished session.
        done = await the_lab.create({"prd": prd})
        await the_lab.wait_status(done["id"], "completed")
        before = await listing(the_lab)
        assert before["total"] == 1

        not_json = await the_lab.client.post(
            "/api/sessions", content=b"{prd: nope", headers={"content-type": "application/json"}
        )
        assert "JSON" in error_of(not_json, 400, "BAD_REQUEST")["message"]
        assert await listing(the_lab) == before
        not_object = await the_lab.post("/api/sessions", [prd])
        assert "object" in error_of(not_object, 400, "BAD_REQUEST")["message"]
        assert await listing(the_lab) == before

        for name, body, field, word in cases:
            answer = await the_lab.post("/api/sessions", body)
            assert answer.status_code == 422, (name, answer.text)
            error = validation_error(answer, field)
            assert word.lower() in error["message"].lower(), (name, error)
            assert await listing(the_lab) == before, name

        unknown = await the_lab.post("/api/sessions", {"prd": prd, "provider": "gpt-9"})
        message = unknown.json()["error"]["message"]
        assert all(known in message for known in PROVIDERS), message


async def test_project_dir_not_writable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests run as root, which permission bits do not stop; /proc/sys is read-only even for root.
    if os.access(READ_ONLY_DIR, os.W_OK):
        pytest.skip(f"{READ_ONLY_DIR} is writable here; no read-only folder to point at")
    project = make_project(tmp_path, ONE_FEATURE)
    async with fake_lab(tmp_path, monkeypatch) as the_lab:
        answer = await the_lab.post(
            "/api/sessions", {"prd": str(project / "prd.md"), "projectDir": READ_ONLY_DIR}
        )
        error = validation_error(answer, "projectDir")
        assert "not writable" in error["message"]
        assert (await listing(the_lab))["total"] == 0


async def test_sandbox_needs_bubblewrap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = make_project(tmp_path, ONE_FEATURE)
    body = {"prd": str(project / "prd.md"), "options": {"sandbox": True}}
    async with fake_lab(tmp_path, monkeypatch) as the_lab:
        has_bwrap = shutil.which("bwrap") is not None
        # Only the fake agent on PATH: bubblewrap is absent whatever the host has.
        with monkeypatch.context() as patch:
            patch.setenv("PATH", str(tmp_path / "bin"))
            refused = await the_lab.post("/api/sessions", body)
        error = validation_error(refused, "options.sandbox")
        assert "bwrap" in error["message"]
        assert (await listing(the_lab))["total"] == 0
        if has_bwrap:
            created = await the_lab.create(body)
            session = await the_lab.session(created["id"])
            assert session["options"]["sandbox"] is True
            await the_lab.wait_status(created["id"], "completed", "failed")


# -- POST /api/sessions: what a good one gives --------------------------------------


async def test_created_session_shape(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = make_project(tmp_path, ONE_FEATURE)
    async with fake_lab(tmp_path, monkeypatch) as the_lab:
        answer = await the_lab.post("/api/sessions", {"prd": str(project / "prd.md")})
        assert answer.status_code == 201, answer.text
        created = answer.json()
        assert set(created) == {"id", "status", "createdAt"}
        assert created["id"].startswith("session-")
        assert created["status"] == "starting"
        assert created["createdAt"].endswith("Z")

        session = await the_lab.wait_status(created["id"], "completed")
        assert set(session) == SESSION_KEYS
        assert set(session["options"]) == OPTION_KEYS
        assert session["options"]["maxIterations"] == 50
        assert session["id"] == created["id"]
        assert session["createdAt"] == created["createdAt"]
        assert session["provider"] == "claude"
        assert session["prd"] == str((project / "prd.md").resolve())
        assert session["projectDir"] == str(project.resolve())  # the PRD's folder
        assert set(session["agents"]) == {"active", "total"}
        assert session["agents"]["active"] == 0
        assert session["tasks"] == {
            "total": 1,
            "pending": 0,
            "active": 0,
            "completed": 1,
            "failed": 0,
        }
        for key in ("startedAt", "updatedAt", "endedAt"):
            assert session[key].endswith("Z"), key
        assert session["iteration"] >= 1
        assert isinstance(session["costUsd"], float)


async def test_prd_without_features_is_one_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = make_project(tmp_path, "Build a small web page that greets the visitor.\n")
    async with fake_lab(tmp_path, monkeypatch) as the_lab:
        created = await the_lab.create({"prd": str(project / "prd.md")})
        await the_lab.wait_status(created["id"], "completed")
        tasks = await the_lab.tasks(created["id"])
        assert [(t["id"], t["title"], t["source"]) for t in tasks] == [
            ("prd-001", "Implement the PRD", "prd")
        ]


async def test_list_newest_first_with_pages_and_a_status_filter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with fake_lab(tmp_path, monkeypatch) as the_lab:
        ids = []
        for name in ("one", "two"):
            project = make_project(tmp_path, ONE_FEATURE, name)
            created = await the_lab.create({"prd": str(project / "prd.md")})
            await the_lab.wait_status(created["id"], "completed")
            ids.append(created["id"])
        running = await start_slow(the_lab, tmp_path)
        ids.append(running["id"])

        everything = await listing(the_lab)
        assert [s["id"] for s in everything["sessions"]] == ids[::-1]
        assert (everything["total"], everything["limit"], everything["offset"]) == (3, 100, 0)
        assert all(set(s) == SESSION_KEYS for s in everything["sessions"])

        page = (await the_lab.client.get("/api/sessions?limit=2&offset=1")).json()
        assert [s["id"] for s in page["sessions"]] == [ids[1], ids[0]]
        assert (page["total"], page["limit"], page["offset"]) == (3, 2, 1)

        done = (await the_lab.client.get("/api/sessions?status=completed")).json()
        assert [s["id"] for s in done["sessions"]] == [ids[1], ids[0]]
        assert done["total"] == 2
        live = (await the_lab.client.get("/api/sessions?status=running")).json()
        assert [s["id"] for s in live["sessions"]] == [ids[2]]

        for query in ("limit=0", "limit=abc", "limit=1001", "offset=-1", "status=asleep"):
            answer = await the_lab.client.get(f"/api/sessions?{query}")
            error = error_of(answer, 400, "BAD_REQUEST")
            assert error["details"]["field"] == query.split("=")[0], query
        await stop(the_lab, running["id"])


async def test_second_active_session_in_a_project_is_409(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with fake_lab(tmp_path, monkeypatch) as the_lab:
        first = await start_slow(the_lab, tmp_path)
        again = await the_lab.post("/api/sessions", {"prd": first["prd"]})
        error = error_of(again, 409, "CONFLICT")
        assert error["details"]["sessionId"] == first["id"]
        assert (await listing(the_lab))["total"] == 1
        await stop(the_lab, first["id"])
        # Once it is stopped the project is free again.
        second = await the_lab.create({"prd": first["prd"]})
        await stop(the_lab, second["id"])


# -- Idempotency-Key -----------------------------------------------------------------


async def test_idempotency_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = make_project(tmp_path, SLOW_PRD)
    body = {"prd": str(project / "prd.md"), "provider": "claude"}
    async with fake_lab(tmp_path, monkeypatch) as the_lab:
        key = {"Idempotency-Key": "create-once-1"}
        first = await the_lab.client.post("/api/sessions", json=body, headers=key)
        assert first.status_code == 201, first.text
        assert "idempotent-replayed" not in first.headers
        # Same key, same body (other key order): the first answer, no second session
        # (without the key this would be a 409: the project has an active session).
        reordered = {"provider": "claude", "prd": body["prd"]}
        again = await the_lab.client.post("/api/sessions", json=reordered, headers=key)
        assert again.status_code == 201, again.text
        assert again.json() == first.json()
        assert again.headers["idempotent-replayed"] == "true"  # audited as a replay
        assert (await listing(the_lab))["total"] == 1
        # A retry is answered even when the request would no longer validate.
        (project / "prd.md").rename(project / "prd.moved")
        late = await the_lab.client.post("/api/sessions", json=body, headers=key)
        assert late.status_code == 201 and late.json() == first.json()
        (project / "prd.moved").rename(project / "prd.md")

        other = await the_lab.client.post(
            "/api/sessions", json={**body, "options": {"parallel": True}}, headers=key
        )
        error = error_of(other, 409, "CONFLICT")
        assert error["details"]["idempotencyKey"] == "create-once-1"

        for bad in (b"k" * 300, b"cl\xe9"):  # too long; not ASCII
            answer = await the_lab.client.post(
                "/api/sessions", json=body, headers={b"Idempotency-Key": bad}
            )
            error = error_of(answer, 400, "BAD_REQUEST")
            assert error["details"]["field"] == "Idempotency-Key"
        assert (await listing(the_lab))["total"] == 1
        await the_lab.wait_event(first.json()["id"], "agent.spawned")
        await stop(the_lab, first.json()["id"])


async def test_idempotency_key_on_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An input is a record with its own id: a key queues it once (DESIGN.md §4)."""
    async with fake_lab(tmp_path, monkeypatch) as the_lab:
        sid = (await start_slow(the_lab, tmp_path, "one"))["id"]
        other = (await start_slow(the_lab, tmp_path, "two"))["id"]

        async def send(session_id: str, message: str, key: str | bytes) -> httpx.Response:
            raw = key.encode() if isinstance(key, str) else key
            return await the_lab.client.post(
                f"/api/sessions/{session_id}/input",
                json={"message": message},
                headers={b"Idempotency-Key": raw},
            )

        answers: list[httpx.Response] = []

        async def send_once() -> None:
            answers.append(await send(sid, "use SQLite", "input-once-1"))

        async with trio.open_nursery() as nursery:  # a request and its retries at once
            for _ in range(4):
                nursery.start_soon(send_once)
        await send_once()  # and one after
        first = answers[0]
        assert first.status_code == 202, first.text
        assert [(r.status_code, r.json()) for r in answers] == [(202, first.json())] * 5
        replayed = [r.headers.get("idempotent-replayed") for r in answers]
        assert sorted(replayed, key=str) == [None] + ["true"] * 4  # one queued, four replays
        received = await the_lab.events(sid, "input.received")
        assert [e["data"]["inputId"] for e in received] == [first.json()["id"]]

        changed = await send(sid, "use Postgres", "input-once-1")
        error = error_of(changed, 409, "CONFLICT")
        assert error["details"]["idempotencyKey"] == "input-once-1"
        elsewhere = await send(other, "use SQLite", "input-once-1")  # keys are per session
        assert elsewhere.status_code == 202, elsewhere.text
        assert elsewhere.json()["id"] != first.json()["id"]
        for bad in (b"k" * 300, b"cl\xe9"):
            error = error_of(await send(sid, "use SQLite", bad), 400, "BAD_REQUEST")
            assert error["details"]["field"] == "Idempotency-Key"
        assert len(await the_lab.events(sid, "input.received")) == 1

        await stop(the_lab, sid)
        late = await send(sid, "use SQLite", "input-once-1")  # a retry after the end
        assert (late.status_code, late.json()) == (202, first.json())
        fresh = await send(sid, "use SQLite", "input-once-2")
        assert error_of(fresh, 409, "CONFLICT")["details"]["status"] == "stopped"
        await stop(the_lab, other)


# -- commands: stop, pause, resume, input, delete ----------------------------------


async def test_commands_and_their_conflicts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with fake_lab(tmp_path, monkeypatch) as the_lab:
        session = await start_slow(the_lab, tmp_path)
        sid = session["id"]
        assert session["status"] == "running"

        resume = await the_lab.post(f"/api/sessions/{sid}/resume")
        assert error_of(resume, 409, "CONFLICT")["details"]["status"] == "running"

        paused = await the_lab.post(f"/api/sessions/{sid}/pause")
        assert paused.status_code == 200, paused.text
        assert paused.json()["status"] == "paused"
        assert set(paused.json()) == SESSION_KEYS
        again = await the_lab.post(f"/api/sessions/{sid}/pause")
        assert error_of(again, 409, "CONFLICT")["details"]["status"] == "paused"

        queued = await the_lab.post(f"/api/sessions/{sid}/input", {"message": "while paused"})
        assert queued.status_code == 202, queued.text

        resumed = await the_lab.post(f"/api/sessions/{sid}/resume")
        assert resumed.status_code == 200, resumed.text
        assert resumed.json()["status"] == "running"

        sent = await the_lab.post(f"/api/sessions/{sid}/input", {"message": "auth module first"})
        assert sent.status_code == 202, sent.text
        answer = sent.json()
        assert set(answer) == {"id", "sessionId", "status"}
        assert answer["id"].startswith("input-")
        assert (answer["sessionId"], answer["status"]) == (sid, "queued")
        await the_lab.wait_event(sid, "input.received", count=2)

        too_big = await the_lab.post(f"/api/sessions/{sid}/input", {"message": "x" * 65537})
        validation_error(too_big, "message")
        just_fits = await the_lab.post(f"/api/sessions/{sid}/input", {"message": "x" * 65536})
        assert just_fits.status_code == 202, just_fits.text
        for empty in ({"message": ""}, {"message": "   "}, {}):
            validation_error(await the_lab.post(f"/api/sessions/{sid}/input", empty), "message")

        busy = await the_lab.client.delete(f"/api/sessions/{sid}")
        assert error_of(busy, 409, "CONFLICT")["details"]["status"] == "running"

        stopped = await stop(the_lab, sid)
        assert stopped["exitReason"] == "stopped"
        assert stopped["endedAt"] is not None

        late = await the_lab.post(f"/api/sessions/{sid}/input", {"message": "too late"})
        assert error_of(late, 409, "CONFLICT")["details"]["status"] == "stopped"
        for command in ("pause", "resume"):
            refused = await the_lab.post(f"/api/sessions/{sid}/{command}")
            assert error_of(refused, 409, "CONFLICT")["details"]["status"] == "stopped"

        gone = await the_lab.client.delete(f"/api/sessions/{sid}")
        assert gone.status_code == 204, gone.text
        assert gone.content == b""
        error = error_of(await the_lab.client.get(f"/api/sessions/{sid}"), 404, "NOT_FOUND")
        assert error["message"] == "Session not found"
        assert (await listing(the_lab))["total"] == 0


async def test_a_deleted_sessions_events_do_not_push_out_the_others_history(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`DELETE /api/sessions/{id}` frees the room its events took: retention keeps the
    newest `event_retention_count` stored events, so an older session that still exists
    keeps its whole history (an id-range bound wiped it, `session.completed` included)."""
    install_fake_agent(tmp_path, monkeypatch)
    # The periodic prune runs at start (nothing stored) and then only after 60 s.
    async with lab(tmp_path / "home", event_retention_count=100) as the_lab:
        root = tmp_path / "projects"
        root.mkdir()
        kept = await the_lab.create(
            {"prd": str(make_project(root, ONE_FEATURE, "kept") / "prd.md")}
        )
        await the_lab.wait_status(kept["id"], "completed")
        history = [e["id"] for e in await the_lab.events(kept["id"])]
        assert 0 < len(history) < 100
        flood = "# Flood\n\n## Features\n- Many lines [mode:flood] [lines:300]\n"
        other = await the_lab.create({"prd": str(make_project(root, flood, "flood") / "prd.md")})
        await the_lab.wait_status(other["id"], "completed")
        assert len(await the_lab.events(other["id"])) > 300
        gone = await the_lab.client.delete(f"/api/sessions/{other['id']}")
        assert gone.status_code == 204, gone.text
        total = (await the_lab.client.get("/api/events/stats")).json()["total"]
        assert total < 100  # the sessionless events and the kept session's

        assert await the_lab.daemon.bus.prune() == 0
        assert [e["id"] for e in await the_lab.events(kept["id"])] == history
        stats = (await the_lab.client.get("/api/events/stats")).json()
        assert (stats["total"], stats["bus"]["retentionDeleted"]) == (total, 0)


async def test_unknown_session_is_404_on_every_route(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sid = "session-00000000000000000000000000"
    routes: list[tuple[str, str, dict[str, Any] | None]] = [
        ("GET", f"/api/sessions/{sid}", None),
        ("GET", f"/api/sessions/{sid}/tasks", None),
        ("GET", f"/api/sessions/{sid}/tasks/prd-001", None),
        ("POST", f"/api/sessions/{sid}/stop", None),
        ("POST", f"/api/sessions/{sid}/pause", None),
        ("POST", f"/api/sessions/{sid}/resume", None),
        ("POST", f"/api/sessions/{sid}/input", {"message": "hello"}),
        ("DELETE", f"/api/sessions/{sid}", None),
    ]
    async with fake_lab(tmp_path, monkeypatch) as the_lab:
        for method, path, body in routes:
            answer = await the_lab.client.request(method, path, json=body)
            error = error_of(answer, 404, "NOT_FOUND")
            expected = "Task not found" if path.endswith("prd-001") else "Session not found"
            assert error["message"] == expected, (method, path, error)


# -- task routes -------------------------------------------------------------------------


async def test_task_routes_while_an_agent_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with fake_lab(tmp_path, monkeypatch) as the_lab:
        session = await start_slow(the_lab, tmp_path)
        sid = session["id"]

        tasks = (await the_lab.client.get(f"/api/sessions/{sid}/tasks")).json()
        assert (tasks["total"], tasks["limit"], tasks["offset"]) == (3, 100, 0)
        assert [t["id"] for t in tasks["tasks"]] == ["prd-001", "prd-002", "prd-003"]
        assert [t["status"] for t in tasks["tasks"]] == ["active", "pending", "pending"]
        assert all(set(t) == TASK_KEYS for t in tasks["tasks"])

        pending = (await the_lab.client.get(f"/api/sessions/{sid}/tasks?status=pending")).json()
        assert [t["id"] for t in pending["tasks"]] == ["prd-002", "prd-003"]
        assert pending["total"] == 2

        one = await the_lab.client.get(f"/api/sessions/{sid}/tasks/prd-002")
        assert one.status_code == 200, one.text
        task = one.json()
        assert set(task) == TASK_KEYS
        assert (task["id"], task["sessionId"], task["title"]) == ("prd-002", sid, "Second feature")
        assert (task["status"], task["source"], task["attempts"]) == ("pending", "prd", 0)

        missing = await the_lab.client.get(f"/api/sessions/{sid}/tasks/prd-999")
        assert error_of(missing, 404, "NOT_FOUND")["message"] == "Task not found"

        active = (await the_lab.client.get("/api/tasks/active")).json()
        assert [(t["sessionId"], t["id"]) for t in active["tasks"]] == [(sid, "prd-001")]
        assert active["tasks"][0]["startedAt"] is not None
        queue = (await the_lab.client.get("/api/tasks/queue")).json()
        assert [t["id"] for t in queue["tasks"]] == ["prd-002", "prd-003"]
        everything = (await the_lab.client.get("/api/tasks")).json()
        assert [t["id"] for t in everything["tasks"]] == ["prd-001", "prd-002", "prd-003"]
        assert everything["total"] == 3
        only_active = (await the_lab.client.get("/api/tasks?status=active")).json()
        assert [t["id"] for t in only_active["tasks"]] == ["prd-001"]
        bad = await the_lab.client.get("/api/tasks?status=done")
        assert error_of(bad, 400, "BAD_REQUEST")["details"]["field"] == "status"

        await stop(the_lab, sid)
        assert (await the_lab.client.get("/api/tasks/active")).json()["tasks"] == []
        assert (await the_lab.client.get("/api/tasks/queue")).json()["tasks"] == []


# -- /api/status ------------------------------------------------------------------------


async def test_status_while_a_session_runs_and_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with fake_lab(tmp_path, monkeypatch) as the_lab:
        idle = (await the_lab.client.get("/api/status")).json()
        assert (idle["status"], idle["session"]) == ("idle", None)

        session = await start_slow(the_lab, tmp_path)
        status = (await the_lab.client.get("/api/status")).json()
        assert status["status"] == "running"
        assert status["provider"] == "claude"
        assert status["session"] == {
            "id": session["id"],
            "phase": session["phase"],
            "iteration": session["iteration"],
            "startedAt": session["startedAt"],
        }
        assert status["session"]["phase"] == "development"
        assert status["agents"] == {"active": 1, "total": 10}

        await stop(the_lab, session["id"])
        after = (await the_lab.client.get("/api/status")).json()
        assert (after["status"], after["session"]) == ("idle", None)
        assert after["agents"]["active"] == 0


# -- the control socket -------------------------------------------------------------------


@pytest.mark.e2e
def test_create_over_the_socket_read_over_tcp(
    tmp_path: Path, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    bin_dir = tmp_path / "bin"
    fake_agent.install(bin_dir, ("claude",))
    daemon = daemon_factory(extra_env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    daemon.start()
    project = make_project(tmp_path, ONE_FEATURE)
    with daemon.control() as control:
        answer = control.post("/api/sessions", json={"prd": str(project / "prd.md")})
        assert answer.status_code == 201, answer.text
    sid = answer.json()["id"]
    deadline = time.monotonic() + 30
    while True:
        session = httpx.get(f"{daemon.api_url}/api/sessions/{sid}", timeout=5)
        assert session.status_code == 200, session.text
        if session.json()["status"] == "completed" or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert session.json()["status"] == "completed"
    tasks = httpx.get(f"{daemon.api_url}/api/sessions/{sid}/tasks", timeout=5).json()
    assert [t["status"] for t in tasks["tasks"]] == ["completed"]
    code, _ = daemon.terminate()
    assert code == 0
