"""The session runner end to end in one process: a real daemon, the fake Claude CLI as agent.

Each test creates a session over HTTP against a temporary project and checks
what the runner did: events, task states, `.loki/` files, the prompts the
agent received (the fake logs every invocation) and the processes left.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from lokid import idempotency
from lokid.actors import agent_pool as agent_pool_module
from lokid.actors import session as session_module
from lokid.actors.event_bus import EventBus
from lokid.actors.session import SessionActor
from lokid.actors.store import StoreActor, StoreUnavailable
from lokid.errors import AskTimeout, Conflict, Unavailable

from .sessions_kit import (
    Lab,
    eventually,
    git,
    install_fake_agent,
    invocations,
    json_field,
    lab,
    live_members,
    make_git_project,
    make_project,
)

T = TypeVar("T")


@pytest.fixture
def agent_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return install_fake_agent(tmp_path, monkeypatch)


async def test_a_session_runs_every_task_and_completes(tmp_path: Path, agent_log: Path) -> None:
    project = make_project(tmp_path)
    async with lab(tmp_path / "home") as lab_:
        created = await lab_.create({"prd": str(project / "prd.md")})
        session = await lab_.wait_status(created["id"], "completed", "failed")
        assert session["status"] == "completed"
        assert session["exitReason"] == "allTasksCompleted"
        assert session["tasks"] == {
            "total": 3,
            "pending": 0,
            "active": 0,
            "completed": 3,
            "failed": 0,
        }
        assert session["iteration"] == 3
        assert session["agents"] == {"active": 0, "total": 3}
        assert session["costUsd"] == pytest.approx(3 * 0.0123)
        assert session["phase"] == "completion"
        tasks = await lab_.tasks(created["id"])
        assert [t["id"] for t in tasks] == ["prd-001", "prd-002", "prd-003"]
        assert all(t["status"] == "completed" and t["attempts"] == 1 for t in tasks)
        assert all(t["source"] == "prd" for t in tasks)

        types = [e["type"] for e in await lab_.events(created["id"])]
        lifecycle = [t for t in types if t.startswith(("session.", "task.", "phase."))]
        assert lifecycle[:6] == [
            "phase.started",
            "task.created",
            "task.created",
            "task.created",
            "phase.completed",
            "session.started",
        ]
        assert lifecycle[-1] == "session.completed"
        assert lifecycle.count("task.started") == lifecycle.count("task.completed") == 3
        assert types.count("agent.spawned") >= 3  # the processes, plus the fake's sub-agents
        assert "agent.output" in types

    calls = invocations(agent_log)
    assert len(calls) == 3
    assert "Your task is prd-001: Add a todo item" in calls[0]["prompt"]
    assert all(call["cwd"] == str(project) for call in calls)
    assert len({call["pgid"] for call in calls}) == 3
    assert all(call["pgid"] == call["pid"] for call in calls)  # each its own group

    loki = project / ".loki"
    completed = json.loads((loki / "queue" / "completed.json").read_text())
    assert [t["id"] for t in completed] == ["prd-001", "prd-002", "prd-003"]
    assert json.loads((loki / "queue" / "pending.json").read_text()) == []
    orchestrator = json.loads((loki / "state" / "orchestrator.json").read_text())
    assert orchestrator["currentPhase"] == "COMPLETED"
    assert orchestrator["metrics"]["tasksCompleted"] == 3
    autonomy = json.loads((loki / "autonomy-state.json").read_text())
    assert autonomy["status"] == "completion_promise_fulfilled"


async def test_the_last_loki_write_uses_what_the_final_transition_read(
    tmp_path: Path, agent_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The end's transaction reads the session and its tasks: the last `.loki/` write
    needs no store read of its own, and says what the store says."""
    import functools

    from lokid import daemon as daemon_module

    monkeypatch.setattr(
        daemon_module,
        "RunnerSettings",
        functools.partial(session_module.RunnerSettings, mirror_interval=3600),
    )
    reads = [0]
    real = SessionActor._read_state

    def counted(self: SessionActor, db: Any) -> Any:
        reads[0] += 1
        return real(self, db)

    monkeypatch.setattr(SessionActor, "_read_state", counted)
    project = make_project(tmp_path, "# App\n\n## Features\n- First\n- Second\n")
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md")}))["id"]
        session = await lab_.wait_status(sid, "completed", "failed")
        await eventually(
            lambda: (project / ".loki" / "state" / "orchestrator.json").exists(), "the mirror"
        )
    assert session["status"] == "completed"
    assert reads[0] == 0  # the mirror loop waits an hour; the end read nothing
    loki = project / ".loki"
    completed = json.loads((loki / "queue" / "completed.json").read_text())
    assert [t["id"] for t in completed] == ["prd-001", "prd-002"]
    orchestrator = json.loads((loki / "state" / "orchestrator.json").read_text())
    assert (orchestrator["currentPhase"], orchestrator["metrics"]["tasksCompleted"]) == (
        "COMPLETED",
        2,
    )
    assert orchestrator["sessionId"] == sid and orchestrator["status"] == "completed"
    autonomy = json.loads((loki / "autonomy-state.json").read_text())
    assert autonomy["status"] == "completion_promise_fulfilled"


async def test_fifos_named_like_queue_files_do_not_hang_the_bootstrap(
    tmp_path: Path, agent_log: Path
) -> None:
    """Another tool left FIFOs (no writer) where `.loki/` keeps its queues: a blocking open
    would wait forever in the bootstrap; the session runs as usual."""
    project = make_project(tmp_path)
    queue = project / ".loki" / "queue"
    queue.mkdir(parents=True)
    for name in ("pending.json", "in-progress.json", "current-task.json"):
        os.mkfifo(queue / name)
    async with lab(tmp_path / "home") as lab_:
        created = await lab_.create({"prd": str(project / "prd.md")})
        session = await lab_.wait_status(created["id"], "completed", "failed")
    assert (session["status"], session["tasks"]["completed"]) == ("completed", 3)


async def test_a_prd_that_became_a_fifo_fails_the_bootstrap_instead_of_hanging(
    tmp_path: Path, agent_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = make_project(tmp_path)
    prd = project / "prd.md"
    real_prepare = session_module._prepare_project

    def swapped(paths: Any, prd_path: Path, *args: Any) -> Any:
        prd_path.unlink()  # replaced after the create's checks, before the bootstrap reads it
        os.mkfifo(prd_path)
        return real_prepare(paths, prd_path, *args)

    monkeypatch.setattr(session_module, "_prepare_project", swapped)
    async with lab(tmp_path / "home") as lab_:
        created = await lab_.create({"prd": str(prd)})
        session = await lab_.wait_status(created["id"], "failed")
        [failed] = await lab_.events(created["id"], "session.failed")
    assert session["exitReason"] == "bootstrapFailed"
    assert "not a regular file" in json.dumps(failed["data"])


async def test_a_loki_file_in_the_way_fails_the_bootstrap_naming_it_once(
    tmp_path: Path, agent_log: Path
) -> None:
    project = make_project(tmp_path)
    (project / ".loki").write_text("a file where lokid's folder goes")
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md")}))["id"]
        session = await lab_.wait_status(sid, "failed")
        [failed] = await lab_.events(sid, "session.failed")
    assert session["exitReason"] == "bootstrapFailed"
    assert failed["data"]["detail"] == f"{project / '.loki'}: exists and is not a folder"


async def test_a_failing_task_is_retried_then_fails_the_session(
    tmp_path: Path, agent_log: Path
) -> None:
    project = make_project(tmp_path, "# App\n\n## Features\n- Build it [mode:fail]\n")
    async with lab(tmp_path / "home") as lab_:
        created = await lab_.create({"prd": str(project / "prd.md")})
        session = await lab_.wait_status(created["id"], "completed", "failed")
        assert session["status"] == "failed"
        assert session["exitReason"] == "tasksFailed"
        (task,) = await lab_.tasks(created["id"])
        assert task["status"] == "failed" and task["attempts"] == 3
        assert "error_during_execution" in task["error"] or "simulated" in task["error"]
        failures = await lab_.events(created["id"], "task.failed")
        assert [e["data"]["attempt"] for e in failures] == [1, 2, 3]
        assert failures[0]["data"]["retryInSeconds"] is not None
        assert failures[-1]["data"]["retryInSeconds"] is None
    assert len(invocations(agent_log)) == 3


async def test_out_of_file_descriptors_at_a_spawn_is_retried_not_a_missing_cli(
    tmp_path: Path, agent_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EMFILE from the spawn was a permanent `cli_missing` that failed the session."""
    real = trio.lowlevel.open_process
    refused: list[int] = []

    async def short_of_descriptors(*args: Any, **kwargs: Any) -> Any:
        if not refused:
            refused.append(1)
            raise OSError(errno.EMFILE, "Too many open files")
        return await real(*args, **kwargs)

    monkeypatch.setattr(trio.lowlevel, "open_process", short_of_descriptors)
    project = make_project(tmp_path, "# App\n\n## Features\n- Build it\n")
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md")}))["id"]
        session = await lab_.wait_status(sid, "completed", "failed")
        assert session["status"] == "completed", session
        (failed,) = await lab_.events(sid, "task.failed")
        assert failed["data"]["code"] == "spawn_failed"
        assert failed["data"]["error"] == "cannot start claude: Too many open files"
        assert failed["data"]["retryInSeconds"] is not None
        (task,) = await lab_.tasks(sid)
        assert task["attempts"] == 2
    assert len(invocations(agent_log)) == 1


async def test_a_deleted_project_folder_fails_the_session_naming_the_folder(
    tmp_path: Path, agent_log: Path
) -> None:
    """It was `cli_missing` "cannot start ...: No such file or directory" (the CLI is fine)."""
    prd = "# App\n\n## Features\n- First [mode:slow] [seconds:1]\n- Second\n"
    project = make_project(tmp_path, prd)
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md"), "projectDir": str(project)}))[
            "id"
        ]
        await lab_.wait_event(sid, "agent.spawned")
        shutil.rmtree(project)  # under the first run: the second cannot start in it
        session = await lab_.wait_status(sid, "completed", "failed")
        assert (session["status"], session["exitReason"]) == ("failed", "permanentError")
        *before, failed = await lab_.events(sid, "task.failed")
        # The run in it may fail first (the folder goes under it) and wait for its retry;
        # the next start - prd-002's, or prd-001's retry if that came due first (seen
        # under load) - finds the folder gone.
        assert [e["data"]["taskId"] for e in before] in ([], ["prd-001"])
        tried = (failed["data"]["taskId"], failed["data"]["attempt"])
        assert tried in ([("prd-002", 1)] + ([("prd-001", 2)] if before else []))
        assert failed["data"]["code"] == "workdir_missing"
        assert failed["data"]["error"] == (
            f"cannot start claude: its working folder {project} is gone (No such file or directory)"
        )


async def test_a_task_names_the_agent_that_works_or_last_worked_on_it(
    tmp_path: Path, agent_log: Path
) -> None:
    prd = "# App\n\n## Features\n- Slow one [mode:slow] [seconds:1.5]\n- Failing [mode:fail]\n"
    project = make_project(tmp_path, prd)
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md")}))["id"]
        (spawned,) = await lab_.wait_event(sid, "agent.spawned")
        assert spawned["data"]["kind"] == "process"
        active = (await lab_.client.get("/api/tasks/active")).json()["tasks"]
        assert [(t["id"], t["agent"]) for t in active] == [("prd-001", spawned["data"]["agentId"])]
        await lab_.wait_status(sid, "failed")
        runs = [
            e["data"]
            for e in await lab_.events(sid, "agent.spawned")
            if e["data"]["kind"] == "process"
        ]
        assert len(runs) == 4  # the slow one once, the failing one three times
        slow, failing = await lab_.tasks(sid)
        assert slow["agent"] == runs[0]["agentId"]  # kept after the run ended
        assert failing["agent"] == runs[-1]["agentId"]  # the last of its attempts


async def test_a_permanent_error_fails_the_session_at_once(tmp_path: Path, agent_log: Path) -> None:
    project = make_project(tmp_path)
    script = "echo 'Error: Invalid API key - please run /login' >&2; exit 1"
    async with lab(tmp_path / "home") as lab_:
        created = await lab_.create(
            {
                "prd": str(project / "prd.md"),
                "provider": "command",
                "options": {"command": ["/bin/sh", "-c", script]},
            }
        )
        session = await lab_.wait_status(created["id"], "completed", "failed")
        assert session["status"] == "failed"
        assert session["exitReason"] == "permanentError"
        assert session["iteration"] == 1  # no retry
        tasks = await lab_.tasks(created["id"])
        assert [t["status"] for t in tasks] == ["failed", "pending", "pending"]
        (failed,) = await lab_.events(created["id"], "session.failed")
        assert "invalid api key" in failed["data"]["detail"].lower()


async def test_limits_end_the_session(tmp_path: Path, agent_log: Path) -> None:
    project = make_project(tmp_path)
    async with lab(tmp_path / "home") as lab_:
        by_iterations = await lab_.create(
            {"prd": str(project / "prd.md"), "options": {"maxIterations": 2}}
        )
        session = await lab_.wait_status(by_iterations["id"], "completed", "failed")
        assert (session["status"], session["exitReason"]) == ("failed", "maxIterations")
        assert session["tasks"]["completed"] == 2

        other = make_project(tmp_path, name="other")
        by_budget = await lab_.create(
            {"prd": str(other / "prd.md"), "options": {"budgetUsd": 0.02}}
        )
        session = await lab_.wait_status(by_budget["id"], "completed", "failed")
        assert (session["status"], session["exitReason"]) == ("failed", "budgetUsd")
        assert session["costUsd"] == pytest.approx(2 * 0.0123)
        autonomy = other / ".loki" / "autonomy-state.json"
        await eventually(  # the mirror follows the store
            lambda: json_field(autonomy, "status") == "budget_exceeded",
            "autonomy-state.json says budget_exceeded",
        )


async def test_a_budget_the_last_run_spends_lets_the_session_complete(
    tmp_path: Path, agent_log: Path
) -> None:
    """Like a last run that is the `maxIterations`-th: nothing is left to stop. It was
    `failed`/`budgetUsd` with every task completed."""
    project = make_project(tmp_path, "# App\n\n## Features\n- First\n- Second\n")
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md"), "options": {"budgetUsd": 0.02}}))[
            "id"
        ]
        session = await lab_.wait_status(sid, "completed", "failed")
    assert (session["status"], session["exitReason"]) == ("completed", "allTasksCompleted")
    assert session["costUsd"] == pytest.approx(2 * 0.0123)  # over the budget, by the last run


async def _assert_the_time_limit_ended_the_run(lab_: Lab, sid: str, limit: int) -> str:
    """What a user sees of a session whose time limit cut its only run off, whichever
    noticed the deadline first (the run's shortened hard timeout, or the scheduler's own
    look at the limit): the run fails its task with the time limit's message (no retry),
    the task is `pending` again, and the session fails `maxDurationSeconds`. Returns the
    run's error."""
    session = await lab_.wait_status(sid, "completed", "failed")
    assert (session["status"], session["exitReason"]) == ("failed", "maxDurationSeconds")
    name = f"the session's time limit (maxDurationSeconds: {limit} s)"
    ends = await lab_.events(sid, "agent.failed", "task.failed", "session.failed")
    assert [e["type"] for e in ends] == ["agent.failed", "task.failed", "session.failed"]
    agent_failed, task_failed, session_failed = (e["data"] for e in ends)
    error: str = task_failed["error"]
    (task,) = await lab_.tasks(sid)
    assert (task["status"], task["error"], task["attempts"]) == ("pending", error, 1)
    assert re.fullmatch(re.escape(name) + r" ended the run after \d+(\.\d)? s", error), error
    assert task_failed == {
        "taskId": "prd-001",
        "title": task["title"],
        "attempt": 1,
        "code": "timeout",
        "error": error,
        "retryInSeconds": None,  # the session ends: no retry
    }
    assert ends[1]["level"] == "warning"  # not the task's last attempt
    assert {key: agent_failed[key] for key in ("taskId", "endReason", "code", "error")} == {
        "taskId": "prd-001",
        "endReason": "hard-timeout",
        "code": "timeout",
        "error": error,
    }
    assert session_failed["detail"] == f"{name} ran out"
    autonomy = Path(session["projectDir"]) / ".loki" / "autonomy-state.json"
    await eventually(  # the mirror follows the store
        lambda: json_field(autonomy, "status") == "max_duration_reached",
        "autonomy-state.json says max_duration_reached",
    )
    return error


async def test_the_session_time_limit_ending_a_run_says_so(tmp_path: Path, agent_log: Path) -> None:
    # The run's hard timeout is cut to the 3 s left; the scheduler's own look at the
    # limit comes at its 2 s ticks (2 s, then 4 s), so the run's verdict comes first.
    project = make_project(tmp_path, "# App\n\n## Features\n- A [mode:hang]\n")
    options = {"maxDurationSeconds": 3}
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md"), "options": options}))["id"]
        error = await _assert_the_time_limit_ended_the_run(lab_, sid, 3)
        assert re.search(r"after (2\.[5-9]|3(\.\d)?) s$", error)
    assert len(invocations(agent_log)) == 1


async def test_the_time_limit_seen_first_by_the_scheduler_reports_the_run_alike(
    tmp_path: Path, agent_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deadline is on the wall clock, the run's timer on trio's: here the wall clock
    jumps an hour (a suspended machine, a clock step) once the agent runs, so the run's
    own timeout is still far off when the scheduler's look at the limit ends the session.
    The run it cuts off is reported as if its timeout had fired, not silently requeued."""
    jump = [0.0]
    real_deadline_left = SessionActor._deadline_left
    monkeypatch.setattr(
        SessionActor, "_deadline_left", lambda actor: real_deadline_left(actor) - jump[0]
    )
    project = make_project(tmp_path, "# App\n\n## Features\n- A [mode:hang]\n")
    options = {"maxDurationSeconds": 3600}
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md"), "options": options}))["id"]
        await lab_.wait_event(sid, "agent.spawned")
        jump[0] = 3600.0
        await _assert_the_time_limit_ended_the_run(lab_, sid, 3600)
    assert len(invocations(agent_log)) == 1


async def test_the_time_limit_seen_by_the_scheduler_during_the_runs_grace_reports_it_once(
    tmp_path: Path, agent_log: Path
) -> None:
    # The run's timeout fires at the 3 s deadline, but the agent ignores SIGTERM: its
    # 2.5 s grace spans the scheduler's 2 s tick at 4 s, which ends the session first.
    project = make_project(tmp_path, "# App\n\n## Features\n- A [mode:ignore-term]\n")
    options = {"maxDurationSeconds": 3}
    async with lab(tmp_path / "home", agent_grace=2.5) as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md"), "options": options}))["id"]
        await _assert_the_time_limit_ended_the_run(lab_, sid, 3)
    assert len(invocations(agent_log)) == 1


def _jump_wall_clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Let a test move the sessions' wall clock (the deadline's) forward: set `[0]`."""
    jump = [0.0]
    real_deadline_left = SessionActor._deadline_left
    monkeypatch.setattr(
        SessionActor, "_deadline_left", lambda actor: real_deadline_left(actor) - jump[0]
    )
    return jump


PAUSED_DETAIL = (
    "the session's time limit (maxDurationSeconds: 3600 s) ran out while the session was paused"
)


async def test_a_paused_session_fails_when_its_deadline_passes(
    tmp_path: Path, agent_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """maxDurationSeconds is a deadline: a pause does not hold it off. A paused session
    fails within a scheduler tick of it instead of waiting for a resume forever."""
    jump = _jump_wall_clock(monkeypatch)
    project = make_project(tmp_path, "# App\n\n## Features\n- A [mode:hang]\n- B\n")
    options = {"maxDurationSeconds": 3600}
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md"), "options": options}))["id"]
        await lab_.wait_event(sid, "agent.spawned")
        answer = await lab_.client.post(f"/api/sessions/{sid}/pause", params={"now": "true"})
        assert answer.status_code == 200
        await eventually(
            lambda: lab_.daemon.sessions._live[sid]._workers == {}, "the run is stopped"
        )
        jump[0] = 3600.0
        session = await lab_.wait_status(sid, "failed", "completed", timeout=10)
        assert (session["status"], session["exitReason"]) == ("failed", "maxDurationSeconds")
        ends = await lab_.events(sid, "session.*")
        assert [e["type"] for e in ends] == ["session.started", "session.paused", "session.failed"]
        assert ends[2]["data"] == {
            "status": "failed",
            "exitReason": "maxDurationSeconds",
            "detail": PAUSED_DETAIL,
        }
        assert [t["status"] for t in await lab_.tasks(sid)] == ["pending", "pending"]
        assert len(await lab_.events(sid, "agent.spawned")) == 1  # no run after the pause


async def test_a_deadline_passing_while_paused_ends_the_run_still_in_flight(
    tmp_path: Path, agent_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Paused by `.loki/PAUSE` while an agent runs (a pause lets it finish): the deadline
    fails the session and ends that run, reported as the time limit's timeout."""
    jump = _jump_wall_clock(monkeypatch)
    project = make_project(tmp_path, "# App\n\n## Features\n- A [mode:hang]\n")
    options = {"maxDurationSeconds": 3600}
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md"), "options": options}))["id"]
        await lab_.wait_event(sid, "agent.spawned")
        (project / ".loki" / "PAUSE").touch()
        (paused,) = await lab_.wait_event(sid, "session.paused")
        assert paused["data"]["source"] == ".loki/PAUSE"
        jump[0] = 3600.0
        session = await lab_.wait_status(sid, "failed", "completed", timeout=10)
        assert (session["status"], session["exitReason"]) == ("failed", "maxDurationSeconds")
        (failed,) = await lab_.events(sid, "session.failed")
        assert failed["data"]["detail"] == PAUSED_DETAIL
        (agent_failed,) = await lab_.events(sid, "agent.failed")
        assert (agent_failed["data"]["endReason"], agent_failed["data"]["code"]) == (
            "hard-timeout",
            "timeout",
        )
        assert len(await lab_.events(sid, "agent.spawned")) == 1


async def test_a_session_resumed_after_its_deadline_fails_before_any_run(
    tmp_path: Path, agent_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted, and the daemon was down past the deadline: `resume` is accepted (the
    state machine's `interrupted -> running`), and the session fails at its first look
    at the limit, before any run, saying the time ran out before the resume."""
    jump = _jump_wall_clock(monkeypatch)
    project = make_project(tmp_path, "# App\n\n## Features\n- A [mode:hang]\n")
    options = {"maxDurationSeconds": 3600}
    home = tmp_path / "home"
    async with lab(home) as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md"), "options": options}))["id"]
        await lab_.wait_event(sid, "agent.spawned")
    jump[0] = 3600.0
    async with lab(home) as lab_:
        assert (await lab_.session(sid))["status"] == "interrupted"
        answer = await lab_.post(f"/api/sessions/{sid}/resume")
        assert answer.status_code == 200 and answer.json()["status"] == "running"
        session = await lab_.wait_status(sid, "failed", "completed", timeout=10)
        assert (session["status"], session["exitReason"]) == ("failed", "maxDurationSeconds")
        (failed,) = await lab_.events(sid, "session.failed")
        assert failed["data"]["detail"] == (
            "the session's time limit (maxDurationSeconds: 3600 s) ran out before the "
            "session was resumed"
        )
        assert len(await lab_.events(sid, "agent.spawned")) == 1  # none after the resume


async def test_a_session_paused_past_its_deadline_fails_when_the_daemon_starts(
    tmp_path: Path, agent_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A paused session stays paused over a daemon restart and gets its actor back: one
    whose deadline passed while the daemon was down fails at once."""
    jump = _jump_wall_clock(monkeypatch)
    project = make_project(tmp_path, "# App\n\n## Features\n- A [mode:hang]\n")
    options = {"maxDurationSeconds": 3600}
    home = tmp_path / "home"
    async with lab(home) as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md"), "options": options}))["id"]
        await lab_.wait_event(sid, "agent.spawned")
        answer = await lab_.client.post(f"/api/sessions/{sid}/pause", params={"now": "true"})
        assert answer.status_code == 200
    jump[0] = 3600.0
    async with lab(home) as lab_:
        session = await lab_.wait_status(sid, "failed", "completed", timeout=10)
        assert (session["status"], session["exitReason"]) == ("failed", "maxDurationSeconds")
        (failed,) = await lab_.events(sid, "session.failed")
        assert failed["data"]["detail"] == PAUSED_DETAIL


async def test_pause_waits_for_the_running_agent_and_resume_goes_on(
    tmp_path: Path, agent_log: Path
) -> None:
    prd = "# App\n\n## Features\n- First [mode:slow] [seconds:1.5]\n- Second\n"
    project = make_project(tmp_path, prd)
    async with lab(tmp_path / "home") as lab_:
        created = await lab_.create({"prd": str(project / "prd.md")})
        sid = created["id"]
        await lab_.wait_event(sid, "task.started")
        answer = await lab_.post(f"/api/sessions/{sid}/pause")
        assert answer.status_code == 200 and answer.json()["status"] == "paused"
        assert (project / ".loki" / "PAUSE").exists()
        again = await lab_.post(f"/api/sessions/{sid}/pause")
        assert again.status_code == 409
        assert again.json()["error"]["details"]["status"] == "paused"
        await lab_.wait_event(sid, "task.completed")  # the running agent finished
        await trio.sleep(0.5)
        tasks = await lab_.tasks(sid)
        assert [t["status"] for t in tasks] == ["completed", "pending"]  # nothing new started
        assert (await lab_.session(sid))["status"] == "paused"
        answer = await lab_.post(f"/api/sessions/{sid}/resume")
        assert answer.status_code == 200 and answer.json()["status"] == "running"
        assert not (project / ".loki" / "PAUSE").exists()
        session = await lab_.wait_status(sid, "completed", "failed")
        assert session["status"] == "completed"
        types = [e["type"] for e in await lab_.events(sid, "session.*")]
        assert types == [
            "session.started",
            "session.paused",
            "session.resumed",
            "session.completed",
        ]


async def test_pause_now_stops_the_agent_and_requeues_its_task(
    tmp_path: Path, agent_log: Path
) -> None:
    project = make_project(tmp_path, "# App\n\n## Features\n- Forever [mode:hang]\n")
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md")}))["id"]
        (spawned,) = await lab_.wait_event(sid, "agent.spawned")
        answer = await lab_.client.post(f"/api/sessions/{sid}/pause", params={"now": "true"})
        assert answer.status_code == 200
        (ended,) = await lab_.wait_event(sid, "agent.failed")
        assert ended["data"]["endReason"] == "stopped"

        async def requeued() -> bool:
            return bool((await lab_.tasks(sid))[0]["status"] == "pending")

        await eventually(requeued, "the task is pending again")
        (task,) = await lab_.tasks(sid)
        assert task["attempts"] == 1 and "pause" in task["error"]
        assert not live_members(spawned["data"]["pid"])  # the group id is the agent's pid
        assert (await lab_.session(sid))["status"] == "paused"
        assert not [e for e in await lab_.events(sid, "task.failed")]


async def test_stop_kills_the_whole_process_group(tmp_path: Path, agent_log: Path) -> None:
    prd = "# App\n\n## Features\n- Stubborn [mode:ignore-term]\n- Never reached\n"
    project = make_project(tmp_path, prd)
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md")}))["id"]
        await lab_.wait_event(sid, "agent.spawned")
        await eventually(lambda: bool(invocations(agent_log)), "the agent logged its start")
        pgid = invocations(agent_log)[0]["pgid"]
        await eventually(lambda: len(live_members(pgid)) >= 2, "the agent forked its grandchild")
        answer = await lab_.post(f"/api/sessions/{sid}/stop")
        assert answer.status_code == 200 and answer.json()["status"] == "stopping"
        session = await lab_.wait_status(sid, "stopped")
        assert session["exitReason"] == "stopped" and session["endedAt"] is not None
        assert live_members(pgid) == []
        (stopped,) = await lab_.events(sid, "session.stopped")
        assert stopped["data"]["survivors"] == []
        tasks = await lab_.tasks(sid)
        assert [t["status"] for t in tasks] == ["pending", "pending"]
        assert (await lab_.post(f"/api/sessions/{sid}/stop")).status_code == 409
    assert len(invocations(agent_log)) == 1


@pytest.mark.parametrize("how", ["stop", "shutdown"])
async def test_an_agent_a_stop_or_shutdown_cuts_off_gets_its_end_event(
    tmp_path: Path, agent_log: Path, how: str
) -> None:
    """Regression: the cancellation skipped the end publish, so an agent killed by a stop or
    the daemon's shutdown had `agent.spawned` and never `agent.completed`/`agent.failed`."""
    project = make_project(tmp_path, "# App\n\n## Features\n- Forever [mode:hang]\n")
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md")}))["id"]
        (spawned,) = await lab_.wait_event(sid, "agent.spawned")
        if how == "stop":
            assert (await lab_.post(f"/api/sessions/{sid}/stop")).status_code == 200
            await lab_.wait_status(sid, "stopped")
    # leaving `lab` is a graceful stop of the daemon
    async with lab(tmp_path / "home") as lab_:  # the events as stored
        ends = await lab_.events(sid, "agent.completed", "agent.failed")
        kinds = [e["type"] for e in await lab_.events(sid, "agent.*", "session.*")]
    [ended] = ends
    assert ended["data"]["agentId"] == spawned["data"]["agentId"]
    assert ended["data"]["taskId"] == spawned["data"]["taskId"]
    assert ended["data"]["endReason"] == "stopped"
    assert ended["data"]["code"] == "stopped"
    why = "the session was stopped" if how == "stop" else "the daemon is stopping"
    assert ended["data"]["error"] == f"run cut off: {why}"
    assert kinds.index("agent.failed") > kinds.index("agent.spawned")


@pytest.mark.parametrize("how", ["stop", "pause-now"])
async def test_an_agent_cut_off_while_announced_gets_its_spawned_before_its_end(
    tmp_path: Path, agent_log: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Regression: a stop or pause `?now=true` landing while `agent.spawned` was being
    stored dropped it, yet the process ran: its `agent.failed` named an agent never
    announced, and the task's `agent` stayed stale."""
    project = make_project(tmp_path, "# App\n\n## Features\n- Forever [mode:hang]\n")
    real_publish_with = EventBus.publish_with
    reached, release = trio.Event(), trio.Event()

    async def publish_with(bus: EventBus, write: Any, type: str, *args: Any, **kw: Any) -> Any:
        if type == "agent.spawned" and not release.is_set():
            reached.set()  # the process runs; its event is not sent yet
            with trio.move_on_after(10):
                await release.wait()
        return await real_publish_with(bus, write, type, *args, **kw)

    monkeypatch.setattr(EventBus, "publish_with", publish_with)
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md")}))["id"]
        with trio.fail_after(30):
            await reached.wait()
        if how == "stop":
            answer = await lab_.post(f"/api/sessions/{sid}/stop")
        else:
            answer = await lab_.client.post(f"/api/sessions/{sid}/pause", params={"now": "true"})
        assert answer.status_code == 200
        release.set()
        (ended,) = await lab_.wait_event(sid, "agent.failed")
        spawned = await lab_.events(sid, "agent.spawned")
        kinds = [e["type"] for e in await lab_.events(sid, "agent.*")]
        (task,) = await lab_.tasks(sid)
    assert [e["data"]["agentId"] for e in spawned] == [ended["data"]["agentId"]]
    assert kinds == ["agent.spawned", "agent.failed"]
    assert task["agent"] == ended["data"]["agentId"]


async def test_input_goes_into_the_next_prompt(tmp_path: Path, agent_log: Path) -> None:
    prd = "# App\n\n## Features\n- First [mode:slow] [seconds:1]\n- Second\n"
    project = make_project(tmp_path, prd)
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md")}))["id"]
        await lab_.wait_event(sid, "task.started")
        answer = await lab_.post(f"/api/sessions/{sid}/input", {"message": "Use SQLite please"})
        assert answer.status_code == 202
        body = answer.json()
        assert body["status"] == "queued" and body["id"].startswith("input-")
        (project / ".loki" / "HUMAN_INPUT.md").write_text("Also add tests.\n")
        await lab_.wait_status(sid, "completed", "failed")
        received = await lab_.events(sid, "input.received")
        applied = await lab_.events(sid, "input.applied")
        assert {e["data"]["source"] for e in received} == {"api", ".loki/HUMAN_INPUT.md"}
        assert {e["data"]["inputId"] for e in applied} == {e["data"]["inputId"] for e in received}
        assert all(e["data"]["taskId"] == "prd-002" for e in applied)
    prompts = [call["prompt"] for call in invocations(agent_log)]
    assert "Use SQLite please" not in prompts[0]
    assert "Use SQLite please" in prompts[1] and "Also add tests." in prompts[1]
    assert not (project / ".loki" / "HUMAN_INPUT.md").exists()


async def test_a_new_session_given_no_input_never_reads_the_input_queue(
    tmp_path: Path, agent_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lokid import session_records

    reads: list[str] = []
    real = session_records.pending_inputs

    def counted(db: Any, session_id: str) -> Any:
        reads.append(session_id)
        return real(db, session_id)

    monkeypatch.setattr(session_module, "pending_inputs", counted)
    project = make_project(tmp_path)
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md")}))["id"]
        session = await lab_.wait_status(sid, "completed", "failed")
        assert (session["status"], session["iteration"]) == ("completed", 3)
    assert reads == []


async def test_large_inputs_go_whole_into_prompts_and_the_rest_waits(
    tmp_path: Path, agent_log: Path
) -> None:
    """Two inputs of 60,000 characters (the API takes 65,536 bytes): the next prompt holds
    the first whole, the one after the second; each is marked applied to its own task."""
    prd = "# App\n\n## Features\n- First [mode:slow] [seconds:1]\n- Second\n- Third\n"
    project = make_project(tmp_path, prd)
    first, second = "a" * 59_999 + "!", "b" * 59_999 + "?"
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md")}))["id"]
        await lab_.wait_event(sid, "task.started")
        ids = []
        for message in (first, second):
            answer = await lab_.post(f"/api/sessions/{sid}/input", {"message": message})
            assert answer.status_code == 202
            ids.append(answer.json()["id"])
        await lab_.wait_status(sid, "completed", "failed")
        applied = await lab_.events(sid, "input.applied")
    assert {e["data"]["inputId"]: e["data"]["taskId"] for e in applied} == {
        ids[0]: "prd-002",
        ids[1]: "prd-003",
    }
    prompts = [call["prompt"] for call in invocations(agent_log)]
    assert first in prompts[1] and "b" * 100 not in prompts[1]
    assert second in prompts[2] and "a" * 100 not in prompts[2]


async def test_inputs_no_run_took_are_reported_when_the_session_ends(
    tmp_path: Path, agent_log: Path
) -> None:
    """Two large inputs, one task left: the second reaches no agent. It was dropped
    silently; now a warning names it (and the first is applied as before)."""
    prd = "# App\n\n## Features\n- First [mode:slow] [seconds:1]\n- Second\n"
    project = make_project(tmp_path, prd)
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md")}))["id"]
        await lab_.wait_event(sid, "task.started")
        ids = []
        for message in ("a" * 60_000, "b" * 60_000):
            answer = await lab_.post(f"/api/sessions/{sid}/input", {"message": message})
            ids.append(answer.json()["id"])
        session = await lab_.wait_status(sid, "completed", "failed")
        applied = await lab_.events(sid, "input.applied")
        warnings = [
            w["data"]
            for w in await lab_.events(sid, "warning")
            if w["data"]["reason"] == "input_undelivered"
        ]
    assert session["status"] == "completed"
    assert [e["data"]["inputId"] for e in applied] == [ids[0]]
    assert [w["inputIds"] for w in warnings] == [[ids[1]]]
    assert "1 input(s) reached no agent" in warnings[0]["message"]


async def test_parallel_runs_starting_together_share_no_input(
    tmp_path: Path, agent_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Paused with inputs queued, a parallel session resumes into two runs that start
    together (each holds its agent's start until the other built its prompt too): each
    input goes into one prompt and is `input.applied` once. Every starting worker took
    every queued input, and published each as applied."""
    features = "".join(f"- {name} [mode:slow] [seconds:1]\n" for name in "ABCDEF")
    project = make_project(tmp_path, f"# App\n\n## Features\n{features}")
    messages = [f"ONLY-ONCE-{n}" for n in range(6)]
    real_start = agent_pool_module.Slot.start
    armed, arrived, together = False, 0, trio.Event()

    async def start(slot: Any, spec: Any, task_id: str | None = None, **kwargs: Any) -> Any:
        nonlocal arrived
        if armed and not together.is_set():  # the first two starts after the resume
            arrived += 1
            if arrived == 2:
                together.set()
            with trio.move_on_after(10):
                await together.wait()
        return await real_start(slot, spec, task_id, **kwargs)

    monkeypatch.setattr(agent_pool_module.Slot, "start", start)
    async with lab(tmp_path / "home") as lab_:
        options = {"parallel": True, "maxAgents": 2}
        sid = (await lab_.create({"prd": str(project / "prd.md"), "options": options}))["id"]
        await lab_.wait_event(sid, "task.started")
        assert (await lab_.post(f"/api/sessions/{sid}/pause")).status_code == 200
        ids = []
        for message in messages:
            answer = await lab_.post(f"/api/sessions/{sid}/input", {"message": message})
            assert answer.status_code == 202
            ids.append(answer.json()["id"])
        armed = True
        assert (await lab_.post(f"/api/sessions/{sid}/resume")).status_code == 200
        session = await lab_.wait_status(sid, "completed", "failed")
        applied = await lab_.events(sid, "input.applied")
    assert together.is_set()
    assert session["status"] == "completed"
    assert sorted(e["data"]["inputId"] for e in applied) == sorted(ids)
    prompts = [call["prompt"] for call in invocations(agent_log)]
    assert [sum(message in prompt for prompt in prompts) for message in messages] == [1] * 6


async def test_an_input_whose_run_never_started_goes_into_a_later_prompt(
    tmp_path: Path, agent_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run cut off (pause ?now=true) while its agent is being started took the queued
    input into its prompt: the input goes back to the queue, into the next run's prompt."""
    prd = "# App\n\n## Features\n- First [mode:slow] [seconds:1]\n- Second\n"
    project = make_project(tmp_path, prd)
    real_start = agent_pool_module.Slot.start
    held = trio.Event()
    starts = 0

    async def start(slot: Any, spec: Any, task_id: str | None = None, **kwargs: Any) -> Any:
        nonlocal starts
        starts += 1
        if starts == 2:  # the run that took the input never gets its agent
            held.set()
            await trio.sleep_forever()
        return await real_start(slot, spec, task_id, **kwargs)

    monkeypatch.setattr(agent_pool_module.Slot, "start", start)
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md")}))["id"]
        await lab_.wait_event(sid, "task.started")
        answer = await lab_.post(f"/api/sessions/{sid}/input", {"message": "COME-BACK"})
        input_id = answer.json()["id"]
        with trio.fail_after(30):
            await held.wait()
        paused = await lab_.client.post(f"/api/sessions/{sid}/pause", params={"now": "true"})
        assert paused.status_code == 200
        await lab_.wait_status(sid, "paused")
        assert (await lab_.post(f"/api/sessions/{sid}/resume")).status_code == 200
        session = await lab_.wait_status(sid, "completed", "failed")
        applied = await lab_.events(sid, "input.applied")
        warnings = await lab_.events(sid, "warning")
    assert session["status"] == "completed"
    assert [(e["data"]["inputId"], e["data"]["taskId"]) for e in applied] == [(input_id, "prd-002")]
    assert not [w for w in warnings if w["data"]["reason"] == "input_undelivered"]
    prompts = [call["prompt"] for call in invocations(agent_log)]
    assert len(prompts) == 2 and "COME-BACK" in prompts[1]


@pytest.mark.parametrize("landed", [True, False])
async def test_an_input_whose_recorded_start_timed_out_goes_into_a_later_prompt(
    tmp_path: Path, agent_log: Path, monkeypatch: pytest.MonkeyPatch, landed: bool
) -> None:
    """Regression: the event bus runs a message whose caller gave up (`AskTimeout`), so
    the agent's row, its inputs marked applied and their `input.applied` could commit
    after the pool had stopped the held agent, which never ran: the input was never
    delivered. Now the session queues such inputs again (a `warning` says why) and a
    later prompt carries them; a write that never landed leaves nothing to undo."""
    prd = "# App\n\n## Features\n- First [mode:slow] [seconds:1]\n- Second\n"
    project = make_project(tmp_path, prd)
    real_publish_with = EventBus.publish_with
    timed_out = False

    async def publish_with(bus: EventBus, write: Any, type: str, *args: Any, **kwargs: Any) -> Any:
        nonlocal timed_out
        if type == "input.applied" and not timed_out:
            timed_out = True
            if landed:  # the bus stored it, but only after its caller gave up
                await real_publish_with(bus, write, type, *args, **kwargs)
            raise AskTimeout("event_bus did not answer within 10 s")
        return await real_publish_with(bus, write, type, *args, **kwargs)

    monkeypatch.setattr(EventBus, "publish_with", publish_with)
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md")}))["id"]
        await lab_.wait_event(sid, "task.started")
        answer = await lab_.post(f"/api/sessions/{sid}/input", {"message": "COME-BACK"})
        input_id = answer.json()["id"]
        session = await lab_.wait_status(sid, "completed", "failed")
        applied = await lab_.events(sid, "input.applied")
        warnings = await lab_.events(sid, "warning")
        stored = await lab_.daemon.store.read(
            lambda db: [
                tuple(row)
                for row in db.execute(
                    "SELECT status, agent_row FROM session_inputs WHERE session_id = ?", [sid]
                )
            ]
        )
        open_rows = await lab_.daemon.store.read(
            lambda db: db.execute("SELECT COUNT(*) FROM agents WHERE ended_at IS NULL").fetchone()[
                0
            ]
        )
    assert timed_out
    assert session["status"] == "completed"
    requeued = [w for w in warnings if w["data"]["reason"] == "input_requeued"]
    if landed:
        assert [w["data"]["inputIds"] for w in requeued] == [[input_id]]
        assert [e["data"]["inputId"] for e in applied] == [input_id, input_id]
        assert applied[0]["id"] < requeued[0]["id"] < applied[1]["id"]
    else:
        assert requeued == []
        assert [e["data"]["inputId"] for e in applied] == [input_id]
    prompts = [call["prompt"] for call in invocations(agent_log)]
    assert sum("COME-BACK" in prompt for prompt in prompts) == 1
    ((status, agent_row),) = stored
    assert status == "applied" and agent_row is not None
    assert open_rows == 0  # the row of the agent that never ran is closed too


async def test_an_input_marked_applied_is_announced_even_if_a_pause_now_cuts_in(
    tmp_path: Path, agent_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: a pause `?now=true` landing between the store's mark and the event
    left the input `applied` in the store with no `input.applied` (nor undelivered).
    Now the mark, its event and the agent's row are one transaction, before the agent
    runs; a pause arriving while it commits cuts the run after it."""
    prd = "# App\n\n## Features\n- First [mode:slow] [seconds:1]\n- Second [mode:hang]\n"
    project = make_project(tmp_path, prd)
    real_publish_with = EventBus.publish_with
    reached, release = trio.Event(), trio.Event()

    async def publish_with(bus: EventBus, write: Any, type: str, *args: Any, **kwargs: Any) -> Any:
        if type == "input.applied" and not release.is_set():
            reached.set()  # the agent is spawned and held; its start is not recorded yet
            with trio.move_on_after(10):
                await release.wait()
        return await real_publish_with(bus, write, type, *args, **kwargs)

    monkeypatch.setattr(EventBus, "publish_with", publish_with)
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md")}))["id"]
        await lab_.wait_event(sid, "task.started")
        answer = await lab_.post(f"/api/sessions/{sid}/input", {"message": "Use SQLite"})
        input_id = answer.json()["id"]
        with trio.fail_after(30):
            await reached.wait()
        paused = await lab_.client.post(f"/api/sessions/{sid}/pause", params={"now": "true"})
        assert paused.status_code == 200
        release.set()
        await lab_.wait_event(sid, "agent.failed")  # the second run, cut off
        stored = await lab_.daemon.store.read(
            lambda db: [
                tuple(row)
                for row in db.execute(
                    "SELECT id, status FROM session_inputs WHERE session_id = ?", [sid]
                )
            ]
        )
        applied = await lab_.events(sid, "input.applied")
    assert stored == [(input_id, "applied")]
    assert [(e["data"]["inputId"], e["data"]["taskId"]) for e in applied] == [(input_id, "prd-002")]


async def test_control_files_of_other_tools_are_honoured(tmp_path: Path, agent_log: Path) -> None:
    prd = "# App\n\n## Features\n- First [mode:slow] [seconds:30]\n"
    project = make_project(tmp_path, prd)
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md")}))["id"]
        await lab_.wait_event(sid, "task.started")
        (project / ".loki" / "PAUSE").write_text("")
        await lab_.wait_status(sid, "paused")
        (project / ".loki" / "PAUSE").unlink()
        await lab_.wait_status(sid, "running")
        (project / ".loki" / "STOP").write_text("")
        await lab_.wait_status(sid, "stopped")
        assert not (project / ".loki" / "STOP").exists()
        sources = [
            e["data"]["source"]
            for e in await lab_.events(sid, "session.*")
            if "source" in e["data"]
        ]
        assert sources == [".loki/PAUSE", ".loki/PAUSE", ".loki/STOP"]


async def test_tasks_the_agent_adds_are_run(tmp_path: Path, agent_log: Path) -> None:
    prd = "# App\n\n## Features\n- Explore [mode:add-task] [task:Write the docs]\n"
    project = make_project(tmp_path, prd)
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md")}))["id"]
        session = await lab_.wait_status(sid, "completed", "failed")
        assert session["status"] == "completed"
        tasks = await lab_.tasks(sid)
        assert [(t["title"], t["source"], t["status"]) for t in tasks] == [
            ("Explore [mode:add-task] [task:Write the docs]", "prd", "completed"),
            ("Write the docs", "agent", "completed"),
        ]


async def test_the_agent_may_request_completion(tmp_path: Path, agent_log: Path) -> None:
    prd = "# App\n\n## Features\n- Everything [mode:complete]\n- Never needed\n"
    project = make_project(tmp_path, prd)
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md")}))["id"]
        session = await lab_.wait_status(sid, "completed", "failed")
        assert (session["status"], session["exitReason"]) == ("completed", "completionRequested")
        assert session["tasks"]["pending"] == 1
    assert not (project / ".loki" / "signals" / "COMPLETION_REQUESTED").exists()


async def test_a_failing_verify_becomes_a_task(tmp_path: Path, agent_log: Path) -> None:
    project = make_project(tmp_path, "# App\n\n## Features\n- Build it\n")
    verify = "test -f .verified-once && exit 0; touch .verified-once; echo 'FAILED: 1 test'; exit 1"
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md"), "options": {"verify": verify}}))[
            "id"
        ]
        session = await lab_.wait_status(sid, "completed", "failed")
        assert session["status"] == "completed"
        tasks = await lab_.tasks(sid)
        assert [t["id"] for t in tasks] == ["prd-001", "verify-001"]
        assert "FAILED: 1 test" in tasks[1]["description"]
        phases = [e["data"]["phase"] for e in await lab_.events(sid, "phase.started")]
        assert phases == ["bootstrap", "development", "qa", "development", "qa", "completion"]
    assert len(invocations(agent_log)) == 2


async def test_malformed_output_is_a_warning_not_a_failure(tmp_path: Path, agent_log: Path) -> None:
    project = make_project(tmp_path, "# App\n\n## Features\n- Build it [mode:malformed]\n")
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md")}))["id"]
        session = await lab_.wait_status(sid, "completed", "failed")
        assert session["status"] == "completed"
        warnings = await lab_.events(sid, "warning")
        assert any(w["data"]["reason"] == "malformed_output" for w in warnings)


async def test_a_malformed_pending_queue_is_reported_once(tmp_path: Path, agent_log: Path) -> None:
    prd = "# App\n\n## Features\n- First [mode:slow] [seconds:1]\n- Second\n"
    project = make_project(tmp_path, prd)
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md")}))["id"]
        await lab_.wait_event(sid, "task.started")
        (project / ".loki" / "queue" / "pending.json").write_text("{not json")
        session = await lab_.wait_status(sid, "completed", "failed")
        assert session["status"] == "completed"
        warnings = [
            w for w in await lab_.events(sid, "warning") if w["data"]["reason"] == "malformed_file"
        ]
        assert len(warnings) == 1
        assert warnings[0]["data"]["file"] == "queue/pending.json"


async def test_the_mirror_reads_pending_json_again_only_when_it_changed(
    tmp_path: Path, agent_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each mirror write looks at the stamp of `pending.json` (its compare-and-swap is on
    that stamp); the file is read again only when someone else changed it."""
    import functools

    from lokid import daemon as daemon_module
    from lokid import loki_mirror, lokidir

    monkeypatch.setattr(
        daemon_module,
        "RunnerSettings",
        functools.partial(session_module.RunnerSettings, mirror_interval=0.05),
    )
    syncs, reads = [0], [0]
    real_write, real_read = loki_mirror.write_mirror, lokidir.ingest_pending_file

    def counted_write(*args: Any, **kwargs: Any) -> Any:
        syncs[0] += 1
        return real_write(*args, **kwargs)

    def counted_read(*args: Any, **kwargs: Any) -> Any:
        reads[0] += 1
        return real_read(*args, **kwargs)

    monkeypatch.setattr(session_module, "write_mirror", counted_write)
    monkeypatch.setattr(lokidir, "ingest_pending_file", counted_read)
    prd = (
        "# App\n\n## Features\n- First [mode:slow] [seconds:1]\n- Second [mode:slow] [seconds:1]\n"
    )
    project = make_project(tmp_path, prd)
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md")}))["id"]
        await lab_.wait_event(sid, "task.started")
        await trio.sleep(0.5)
        before = reads[0]
        write_atomically(
            project / ".loki" / "queue" / "pending.json",
            json.dumps([{"id": "agent-1", "title": "Added", "status": "pending"}]).encode(),
        )
        session = await lab_.wait_status(sid, "completed", "failed")
        assert session["status"] == "completed"
        assert session["tasks"]["total"] == 3  # the agent's task was taken
    # Read: at the first scheduling step, after the agent's change, before the end is
    # decided (4 here; 7 when every mirror write read it first).
    assert syncs[0] >= 3
    assert reads[0] - before >= 1
    assert reads[0] <= 5


def test_the_bootstrap_hands_the_mirror_the_empty_queue_it_made(tmp_path: Path) -> None:
    """`_prepare_project` of a new session looks at `pending.json` in its own thread hop:
    a queue holding only the PRD's tasks is a view (the first ingest is a `stat`); one
    holding more, or unreadable, is read again after the bootstrap."""
    from lokid import lokidir

    project = make_project(tmp_path, "# App\n\n## Features\n- First\n")
    paths = lokidir.LokiPaths.for_project(project)
    parsed, seen = session_module._prepare_project(paths, project / "prd.md", True, True)
    assert [task.id for task in parsed.tasks] == ["prd-001"]
    assert seen is not None and seen.replaceable
    assert seen.stamp == lokidir.file_stamp(paths.pending)
    assert session_module._prepare_project(paths, project / "prd.md", True, False)[1] is None
    for text in ('[{"id": "agent-1", "title": "Added"}]', "{not json"):
        paths.pending.write_text(text)
        assert session_module._prepare_project(paths, project / "prd.md", False, True)[1] is None
    paths.pending.write_text('[{"id": "prd-001", "title": "First"}]')
    assert session_module._prepare_project(paths, project / "prd.md", False, True)[1] is not None


def write_atomically(path: Path, data: bytes) -> None:
    """As another tool replaces a file: complete temp file, then rename."""
    temp = path.with_name(f".{path.name}.other-tool")
    temp.write_bytes(data)
    temp.replace(path)


def queue_ids(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    entries = data["tasks"] if isinstance(data, dict) else data
    return [entry["id"] for entry in entries]


async def test_tasks_past_the_per_read_limit_are_taken_later_not_deleted(
    tmp_path: Path, agent_log: Path
) -> None:
    """120 new tasks in pending.json: 50 per read, the rest stay in the file for the next
    reads; the file keeps its object form."""
    project = make_project(tmp_path, "# App\n\n## Features\n- First [mode:slow] [seconds:30]\n")
    pending = project / ".loki" / "queue" / "pending.json"
    bulk = [{"id": f"bulk-{n:03}", "title": f"Bulk {n}", "status": "pending"} for n in range(120)]
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md")}))["id"]
        await lab_.wait_event(sid, "task.started")
        write_atomically(pending, json.dumps({"tasks": bulk, "meta": {"by": "planner"}}).encode())

        async def all_taken() -> bool:
            return bool((await lab_.session(sid))["tasks"]["total"] == 121)

        await eventually(all_taken, "all 120 tasks taken", timeout=15)
        assert (await lab_.post(f"/api/sessions/{sid}/stop")).status_code == 200
        await lab_.wait_status(sid, "stopped")
    written = json.loads(pending.read_text())
    assert written["meta"] == {"by": "planner"}
    assert queue_ids(pending) == ["prd-001", *(entry["id"] for entry in bulk)]


async def test_tasks_appended_during_a_run_survive_a_stop(tmp_path: Path, agent_log: Path) -> None:
    prd = "# App\n\n## Features\n- First [mode:slow] [seconds:30]\n- Second\n"
    project = make_project(tmp_path, prd)
    pending = project / ".loki" / "queue" / "pending.json"
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md")}))["id"]
        await lab_.wait_event(sid, "task.started")
        await eventually(lambda: queue_ids(pending) == ["prd-002"], "the mirror's pending.json")
        entries = json.loads(pending.read_text())
        entries.append({"id": "ext-keep", "title": "Appended by another tool", "status": "pending"})
        write_atomically(pending, json.dumps(entries).encode())
        assert (await lab_.post(f"/api/sessions/{sid}/stop")).status_code == 200
        await lab_.wait_status(sid, "stopped")
        taken = "ext-keep" in [task["id"] for task in await lab_.tasks(sid)]
    assert "ext-keep" in queue_ids(pending), f"ingested before the stop: {taken}"
    # and the run the stop cut off is in some queue file still (in-progress.json, when
    # pending.json holds what lokid has not read)
    in_progress = project / ".loki" / "queue" / "in-progress.json"
    assert "prd-001" in queue_ids(pending) + queue_ids(in_progress), taken


@pytest.mark.parametrize(
    "content",
    [b'[{"id": "half-1", "title": "half written", "stat', b"[" + b" " * 6_000_000 + b"]"],
    ids=["torn", "oversized"],
)
async def test_a_pending_queue_lokid_cannot_read_is_never_overwritten(
    tmp_path: Path, agent_log: Path, content: bytes
) -> None:
    prd = "# App\n\n## Features\n- First [mode:slow] [seconds:30]\n- Second\n"
    project = make_project(tmp_path, prd)
    pending = project / ".loki" / "queue" / "pending.json"
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md")}))["id"]
        await lab_.wait_event(sid, "task.started")
        write_atomically(pending, content)
        await lab_.wait_event(sid, "warning")
        await trio.sleep(1.5)  # a mirror round: it must not overwrite the file
        assert pending.read_bytes() == content
        assert (await lab_.post(f"/api/sessions/{sid}/stop")).status_code == 200
        await lab_.wait_status(sid, "stopped")
    assert pending.read_bytes() == content


async def test_daemon_shutdown_interrupts_and_resume_continues(
    tmp_path: Path, agent_log: Path
) -> None:
    prd = "# App\n\n## Features\n- First\n- Second [mode:slow] [seconds:3]\n- Third\n"
    project = make_project(tmp_path, prd)
    home = tmp_path / "home"
    async with lab(home) as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md")}))["id"]
        await lab_.wait_event(sid, "task.started", count=2)
        await eventually(lambda: len(invocations(agent_log)) >= 2, "the second agent started")
    hung = invocations(agent_log)[1]
    assert live_members(hung["pgid"]) == []
    async with lab(home) as lab_:
        session = await lab_.session(sid)
        assert session["status"] == "interrupted"
        assert [t["status"] for t in await lab_.tasks(sid)] == ["completed", "pending", "pending"]
        assert (await lab_.post(f"/api/sessions/{sid}/pause")).status_code == 409
        answer = await lab_.post(f"/api/sessions/{sid}/resume")
        assert answer.status_code == 200 and answer.json()["status"] == "running"
        session = await lab_.wait_status(sid, "completed", "failed")
        assert session["status"] == "completed"
        tasks = await lab_.tasks(sid)
        assert [t["attempts"] for t in tasks] == [1, 2, 1]  # the cut run counted, not failed
        types = [e["type"] for e in await lab_.events(sid, "session.*")]
        assert types == [
            "session.started",
            "session.interrupted",
            "session.resumed",
            "session.completed",
        ]
    calls = invocations(agent_log)
    assert [call["prompt"].count("Second") > 0 for call in calls] == [False, True, True, False]
    named = f"the PRD at {project / 'prd.md'} (App)."
    assert all(named in call["prompt"] for call in calls)  # also after the resume


async def test_a_bootstrap_cut_off_by_a_shutdown_is_finished_on_resume(
    tmp_path: Path, agent_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lokid.actors import session as session_module

    real = session_module._prepare_project
    entered, release = threading.Event(), threading.Event()

    def slow_prepare(*args: Any) -> Any:  # a PRD that takes long to read and parse
        entered.set()
        release.wait(30)
        return real(*args)

    monkeypatch.setattr(session_module, "_prepare_project", slow_prepare)
    project = make_project(tmp_path)
    home = tmp_path / "home"
    async with lab(home) as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md")}))["id"]
        await eventually(entered.is_set, "the bootstrap is under way")
        actor = lab_.daemon.sessions._live[sid]
        actor.on_stop_requested()  # what the daemon's shutdown does to each session
        release.set()
        await lab_.wait_status(sid, "interrupted")
    async with lab(home) as lab_:
        session = await lab_.session(sid)
        assert (session["status"], session["phase"], session["tasks"]["total"]) == (
            "interrupted",
            None,
            0,
        )
        answer = await lab_.post(f"/api/sessions/{sid}/resume")
        assert answer.status_code == 200 and answer.json()["status"] == "running"
        session = await lab_.wait_status(sid, "completed", "failed")
        assert (session["status"], session["exitReason"]) == ("completed", "allTasksCompleted")
        assert session["startedAt"] is not None
        tasks = await lab_.tasks(sid)
        assert [(t["id"], t["status"]) for t in tasks] == [
            ("prd-001", "completed"),
            ("prd-002", "completed"),
            ("prd-003", "completed"),
        ]
        types = [e["type"] for e in await lab_.events(sid, "session.*", "task.created", "phase.*")]
        resumed = types.index("session.resumed")
        assert types[resumed : resumed + 6] == [
            "session.resumed",
            "phase.started",
            "task.created",
            "task.created",
            "task.created",
            "phase.completed",
        ]
        assert "session.started" not in types  # it never went starting -> running
    assert len(invocations(agent_log)) == 3


async def test_a_project_folder_gone_after_a_crash_is_a_warning_at_restart(
    tmp_path: Path, agent_log: Path
) -> None:
    project = make_project(tmp_path, "# App\n\n## Features\n- Long [mode:slow] [seconds:30]\n")
    home = tmp_path / "home"
    async with lab(home) as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md")}))["id"]
        await lab_.wait_event(sid, "task.started")
    # What a SIGKILLed daemon leaves in the store: the session still running.
    with sqlite3.connect(home / "lokid" / "lokid.db") as db:
        db.execute("UPDATE sessions SET status = 'running' WHERE id = ?", (sid,))
    shutil.rmtree(project)
    async with lab(home) as lab_:
        assert (await lab_.session(sid))["status"] == "interrupted"
        (warning,) = await lab_.events(sid, "warning")
        assert warning["data"]["reason"] == "loki_dir"
        assert "the project folder is gone" in warning["data"]["message"]
        assert (await lab_.client.get("/api/status")).status_code == 200


async def test_parallel_tasks_run_in_worktrees_and_are_merged(
    tmp_path: Path, agent_log: Path
) -> None:
    prd = "# App\n\n## Features\n- Alpha\n- Beta\n- Gamma\n"
    project = make_git_project(tmp_path, prd)
    script = (
        'cat >/dev/null; echo "$LOKI_TASK_ID" > "$LOKI_TASK_ID.txt"; pwd > "$LOKI_TASK_ID.cwd";'
        " sleep 0.5; echo done"
    )
    async with lab(tmp_path / "home") as lab_:
        sid = (
            await lab_.create(
                {
                    "prd": str(project / "prd.md"),
                    "provider": "command",
                    "options": {"parallel": True, "command": ["/bin/sh", "-c", script]},
                }
            )
        )["id"]
        session = await lab_.wait_status(sid, "completed", "failed")
        assert session["status"] == "completed", session
        events = await lab_.events(sid, "agent.spawned", "agent.completed")
        first_end = next(i for i, e in enumerate(events) if e["type"] == "agent.completed")
        assert first_end >= 3  # all three ran at once
    for task_id in ("prd-001", "prd-002", "prd-003"):
        assert (project / f"{task_id}.txt").read_text().strip() == task_id
        ran_in = (project / f"{task_id}.cwd").read_text().strip()
        assert ran_in == str(project / ".loki" / "worktrees" / task_id)
    assert git(project, "status", "--porcelain").strip() == ""
    assert git(project, "log", "--merges", "--oneline").count("loki: prd-") == 3
    assert git(project, "worktree", "list").count("\n") == 1  # the worktrees are gone


async def test_parallel_agents_in_worktrees_reach_the_projects_loki_folder(
    tmp_path: Path, agent_log: Path
) -> None:
    """An agent in a worktree is told the project's `.loki/` by absolute path: the task it
    adds and its completion request reach the session (a relative `.loki/` would be the
    worktree's own, deleted with it)."""
    prd = (
        "# App\n\n## Features\n- One [mode:add-task] [task:Extra from agent]\n"
        "- Two [mode:complete]\n- Three\n"
    )
    project = make_git_project(tmp_path, prd)
    options = {"parallel": True, "maxAgents": 1}
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md"), "options": options}))["id"]
        session = await lab_.wait_status(sid, "completed", "failed")
        assert (session["status"], session["exitReason"]) == ("completed", "completionRequested")
        tasks = await lab_.tasks(sid)
        assert [(t["title"], t["source"], t["status"]) for t in tasks] == [
            ("One [mode:add-task] [task:Extra from agent]", "prd", "completed"),
            ("Two [mode:complete]", "prd", "completed"),
            ("Three", "prd", "pending"),
            ("Extra from agent", "agent", "pending"),
        ]
    calls = invocations(agent_log)
    assert [call["cwd"] for call in calls] == [
        str(project / ".loki" / "worktrees" / task_id) for task_id in ("prd-001", "prd-002")
    ]
    loki = project / ".loki"
    assert all(f"{loki}/queue/pending.json" in call["prompt"] for call in calls)
    assert not (loki / "signals" / "COMPLETION_REQUESTED").exists()  # consumed


async def test_what_a_worktree_agent_leaves_in_its_own_loki_folder_is_taken(
    tmp_path: Path, agent_log: Path
) -> None:
    """A CLI that may only write in its working folder (codex's workspace-write sandbox)
    writes the worktree's `.loki/`: its task and completion request are taken before the
    worktree is removed, and never reach the project's git history. A task written to
    both queues (same id, same title) is taken once; one numbered like another task of
    the session (each worktree's queue starts empty) is taken under an id of its own."""
    prd = (
        "# App\n\n## Features\n- One [mode:add-task] [task:Extra from worktree] [loki:cwd]\n"
        "- Two [mode:add-task] [task:Written twice] [id:twice] [loki:both]\n"
        "- Three [mode:add-task] [task:Same number] [loki:cwd]\n"
        "- Four [mode:complete] [loki:cwd]\n- Five\n"
    )
    project = make_git_project(tmp_path, prd)
    options = {"parallel": True, "maxAgents": 1}
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md"), "options": options}))["id"]
        session = await lab_.wait_status(sid, "completed", "failed")
        assert (session["status"], session["exitReason"]) == ("completed", "completionRequested")
        tasks = await lab_.tasks(sid)
        agent_tasks = [(t["id"], t["title"]) for t in tasks if t["source"] == "agent"]
        assert [t["status"] for t in tasks] == 4 * ["completed"] + 4 * ["pending"]
        assert agent_tasks[:2] == [("agent-001", "Extra from worktree"), ("twice", "Written twice")]
        renamed, title = agent_tasks[2]
        assert re.fullmatch(r"agent-[0-9a-f]{12}", renamed) and title == "Same number"
        created = await lab_.events(sid, "task.created")
        assert [e["data"]["title"] for e in created if e["data"]["source"] == "agent"] == [
            "Extra from worktree",
            "Written twice",
            "Same number",
        ]
        (warning,) = await lab_.events(sid, "warning")
        assert warning["data"]["reason"] == "worktree"
        assert warning["data"]["message"] == (
            "task agent-001 ('Same number') has the id of another task of the session; "
            f"it is taken as {renamed}"
        )
    calls = invocations(agent_log)
    worktrees = project / ".loki" / "worktrees"
    assert [call["cwd"] for call in calls] == [str(worktrees / f"prd-00{n}") for n in (1, 2, 3, 4)]
    assert not worktrees.exists() or list(worktrees.iterdir()) == []  # removed, .loki/ and all
    tracked = git(project, "log", "--all", "--name-only", "--format=").split()
    assert not [path for path in tracked if path.startswith(".loki")], tracked


async def test_a_worktree_agent_that_fails_still_has_its_tasks_taken(
    tmp_path: Path, agent_log: Path
) -> None:
    """Taken whatever the run's outcome: a failed run's task is as much work left."""
    script = (
        'cat >/dev/null; if [ "$LOKI_TASK_ID" = prd-001 ]; then mkdir -p .loki/queue;'
        ' echo \'[{"id": "found-1", "title": "Found while failing"}, {"title": ""}]\''
        " > .loki/queue/pending.json; exit 3; fi; echo done"
    )
    project = make_git_project(tmp_path, "# App\n\n## Features\n- Alpha\n")
    options = {
        "parallel": True,
        "maxAgents": 1,
        "command": ["/bin/sh", "-c", script],
    }
    async with lab(tmp_path / "home") as lab_:
        body = {"prd": str(project / "prd.md"), "provider": "command", "options": options}
        sid = (await lab_.create(body))["id"]
        session = await lab_.wait_status(sid, "completed", "failed")
        assert (session["status"], session["exitReason"]) == ("failed", "tasksFailed")
        tasks = await lab_.tasks(sid)
        assert [(t["id"], t["source"], t["status"]) for t in tasks] == [
            ("prd-001", "prd", "failed"),
            ("found-1", "agent", "completed"),
        ]
        (warning,) = await lab_.events(sid, "warning")  # once, not once per attempt
        pending = project / ".loki" / "worktrees" / "prd-001" / ".loki" / "queue" / "pending.json"
        message = warning["data"].pop("message")
        assert re.fullmatch(r"entry 1 \(agent-[0-9a-f]{12}\): no title; rejected", message)
        assert warning["data"] == {
            "reason": "malformed_file",
            "file": str(pending),
            "taskId": "prd-001",
        }
        assert [e["data"]["taskId"] for e in await lab_.events(sid, "task.created")][-1:] == [
            "found-1"  # taken once, though each of the three failed attempts wrote it
        ]


async def test_sandboxed_agents_write_only_the_project(tmp_path: Path, agent_log: Path) -> None:
    from lokid.sandbox import sandbox_problem

    problem = sandbox_problem()
    if problem is not None:
        pytest.skip(problem)
    escape = Path("/usr") / f"lokid-escape-{tmp_path.name}"
    script = (
        f"cat >/dev/null; echo inside > inside.txt; touch {escape} 2>/dev/null || echo refused"
        " > refused.txt; echo done"
    )
    project = make_project(tmp_path, "# App\n\n## Features\n- Only task\n")
    try:
        async with lab(tmp_path / "home") as lab_:
            sid = (
                await lab_.create(
                    {
                        "prd": str(project / "prd.md"),
                        "provider": "command",
                        "options": {"sandbox": True, "command": ["/bin/sh", "-c", script]},
                    }
                )
            )["id"]
            session = await lab_.wait_status(sid, "completed", "failed")
            assert session["status"] == "completed", session
            (spawned,) = [
                e for e in await lab_.events(sid, "agent.spawned") if e["data"]["kind"] == "process"
            ]
            assert spawned["data"]["sandbox"] is True
        assert (project / "inside.txt").read_text() == "inside\n"
        assert (project / "refused.txt").exists()
        assert not escape.exists()
    finally:
        escape.unlink(missing_ok=True)


async def test_a_new_session_ignores_the_queues_an_earlier_one_left(
    tmp_path: Path, agent_log: Path
) -> None:
    project = make_project(
        tmp_path, "# App\n\n## Features\n- Old one [mode:slow] [seconds:30]\n- Old two\n"
    )
    async with lab(tmp_path / "home") as lab_:
        first = (await lab_.create({"prd": str(project / "prd.md")}))["id"]
        await lab_.wait_event(first, "task.started")
        assert (await lab_.post(f"/api/sessions/{first}/stop")).status_code == 200
        await lab_.wait_status(first, "stopped")
        pending = project / ".loki" / "queue" / "pending.json"
        await eventually(  # the mirror of the stop: both tasks back in the queue
            lambda: [t["id"] for t in json.loads(pending.read_text())] == ["prd-001", "prd-002"],
            "pending.json lists both tasks",
        )
        (project / "prd.md").write_text("# App\n\n## Features\n- The only feature\n")
        second = (await lab_.create({"prd": str(project / "prd.md")}))["id"]
        session = await lab_.wait_status(second, "completed", "failed")
        assert session["status"] == "completed"
        tasks = await lab_.tasks(second)
        assert [(t["id"], t["title"], t["source"]) for t in tasks] == [
            ("prd-001", "The only feature", "prd")
        ]


async def test_a_crashed_runner_is_restarted_and_continues(
    tmp_path: Path, agent_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lokid.prompt import build_prompt as real

    crashes = {"left": 1}

    def flaky_prompt(*args: Any, **kwargs: Any) -> str:
        if "Mark an item done" in args[0].title and crashes["left"]:
            crashes["left"] -= 1
            raise RuntimeError("a bug in the runner")
        return real(*args, **kwargs)

    monkeypatch.setattr("lokid.actors.session.build_prompt", flaky_prompt)
    project = make_project(tmp_path)
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md")}))["id"]
        session = await lab_.wait_status(sid, "completed", "failed")
        assert session["status"] == "completed"
        assert [t["status"] for t in await lab_.tasks(sid)] == ["completed"] * 3
        stats = lab_.daemon.sessions.statistics()
        assert stats.session_crashes == 1


async def test_a_runner_that_keeps_crashing_fails_its_session(
    tmp_path: Path, agent_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> str:
        raise RuntimeError("a bug in the runner")

    monkeypatch.setattr("lokid.actors.session.build_prompt", broken)
    project = make_project(tmp_path)
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md")}))["id"]
        session = await lab_.wait_status(sid, "completed", "failed")
        assert (session["status"], session["exitReason"]) == ("failed", "runnerCrashed")
        assert session["tasks"]["active"] == 0
        assert lab_.daemon.sessions.statistics().session_crashes == 3
        assert lab_.daemon.core_problems() == {}  # the daemon itself is fine


async def test_a_stop_that_takes_the_lock_before_the_bootstrap_ends_it_without_a_crash(
    tmp_path: Path, agent_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: the bootstrap saw `starting`, then waited for the lock a stop held;
    `bootstrapped` was illegal by then (`stopping`) and the actor crashed."""
    real_prepare = session_module._prepare_project
    preparing, go = threading.Event(), threading.Event()

    def held_prepare(*args: Any) -> Any:
        preparing.set()
        go.wait(10)
        return real_prepare(*args)

    monkeypatch.setattr(session_module, "_prepare_project", held_prepare)
    project = make_project(tmp_path)
    async with lab(tmp_path / "home") as lab_:
        sessions = lab_.daemon.sessions
        sid = (await lab_.create({"prd": str(project / "prd.md")}))["id"]
        await eventually(preparing.is_set, "the bootstrap reads the PRD")
        actor = sessions._live[sid]
        lock = actor._lock

        def waiting(count: int) -> Callable[[], bool]:
            return lambda: lock.statistics().tasks_waiting == count

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await lock.acquire()  # the stop queues for the lock first ...
                nursery.start_soon(lab_.post, f"/api/sessions/{sid}/stop")
                await eventually(waiting(1), "the stop waits for the lock")
                go.set()  # ... then the bootstrap, which still saw `starting`
                await eventually(waiting(2), "the bootstrap waits for the lock")
                lock.release()
        session = await lab_.wait_status(sid, "stopped", "failed")
        started = await lab_.events(sid, "session.started")
    assert session["status"] == "stopped"
    assert not started
    assert sessions.statistics().session_crashes == 0


async def test_a_runner_restarted_in_the_middle_of_a_stop_reports_who_asked(
    tmp_path: Path, agent_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runner crashes after `.loki/STOP` made the session `stopping`: the restarted
    actor finishes the stop with the stored source (it said `api`)."""
    real = SessionActor._warn_undelivered_inputs  # the first step of a session's end
    crashed = False

    async def crash_once(actor: SessionActor) -> None:
        nonlocal crashed
        if not crashed:
            crashed = True
            raise RuntimeError("a bug in the runner")
        await real(actor)

    monkeypatch.setattr(SessionActor, "_warn_undelivered_inputs", crash_once)
    project = make_project(tmp_path, "# App\n\n## Features\n- A [mode:slow] [seconds:30]\n")
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md")}))["id"]
        await lab_.wait_event(sid, "task.started")
        (project / ".loki" / "STOP").touch()
        session = await lab_.wait_status(sid, "stopped", "failed")
        (stopped,) = await lab_.events(sid, "session.stopped")
        assert crashed and lab_.daemon.sessions.statistics().session_crashes == 1
    assert session["status"] == "stopped"
    assert stopped["data"] == {"status": "stopped", "source": ".loki/STOP", "survivors": []}


async def test_a_session_failed_for_its_crashing_runner_reports_its_queued_input(
    tmp_path: Path, agent_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manager fails a session whose runner keeps crashing (here on every prompt that
    holds the input): the input it never delivered is a `warning` `input_undelivered`."""
    from lokid.prompt import build_prompt as real

    def broken(*args: Any, **kwargs: Any) -> str:
        if kwargs.get("human_input"):
            raise RuntimeError("a bug in the runner")
        return real(*args, **kwargs)

    monkeypatch.setattr("lokid.actors.session.build_prompt", broken)
    project = make_project(tmp_path, "# App\n\n## Features\n- A [mode:slow] [seconds:3]\n- B\n")
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md")}))["id"]
        await lab_.wait_event(sid, "task.started")
        # Paused while A runs (3 s), no prompt is built until the input is queued.
        assert (await lab_.post(f"/api/sessions/{sid}/pause")).status_code == 200
        answer = await lab_.post(f"/api/sessions/{sid}/input", {"message": "never read"})
        assert (await lab_.post(f"/api/sessions/{sid}/resume")).status_code == 200
        session = await lab_.wait_status(sid, "completed", "failed")
        assert (session["status"], session["exitReason"]) == ("failed", "runnerCrashed")
        # Stored with the failure (there as soon as the status is), just before its event.
        (warning,) = await lab_.events(sid, "warning")
        assert warning["data"]["reason"] == "input_undelivered"
        assert warning["data"]["inputIds"] == [answer.json()["id"]]
        (failed,) = await lab_.events(sid, "session.failed")
        assert failed["id"] == warning["id"] + 1


async def test_a_rate_limit_holds_the_session_until_the_reset(
    tmp_path: Path, agent_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_AGENT_RESET_SECONDS", "7200")
    project = make_project(tmp_path, "# App\n\n## Features\n- Build [mode:rate-limited]\n- Next\n")
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md")}))["id"]
        (failed,) = await lab_.wait_event(sid, "task.failed")
        assert failed["data"]["code"] == "rate_limit"
        assert failed["data"]["retryInSeconds"] >= 7200  # the provider's reset, not a backoff
        warnings = await lab_.events(sid, "warning")
        assert any(w["data"]["reason"] == "rate_limited" for w in warnings)
        await trio.sleep(1.0)
        session = await lab_.session(sid)
        assert session["status"] == "running"  # waiting, not failed
        assert [t["status"] for t in await lab_.tasks(sid)] == ["pending", "pending"]
        assert len(invocations(agent_log)) == 1  # and no other task ran meanwhile
        assert (await lab_.post(f"/api/sessions/{sid}/stop")).status_code == 200
        await lab_.wait_status(sid, "stopped", timeout=5)  # a stop ends the wait at once


async def test_a_run_without_a_result_is_a_transient_failure(
    tmp_path: Path, agent_log: Path
) -> None:
    project = make_project(tmp_path, "# App\n\n## Features\n- Build [mode:no-result]\n")
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md")}))["id"]
        session = await lab_.wait_status(sid, "completed", "failed")
        assert (session["status"], session["exitReason"]) == ("failed", "tasksFailed")
        failures = await lab_.events(sid, "task.failed")
        assert [f["data"]["code"] for f in failures] == ["no_result"] * 3


async def test_a_session_get_shows_ended_is_deleted_while_its_actor_catches_up(
    tmp_path: Path, agent_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: between the commit of a session's end and its actor's status, DELETE
    answered 409 "running" for a session GET already showed `completed`."""
    real_publish_with = EventBus.publish_with
    committed, release = trio.Event(), trio.Event()

    async def publish_with(bus: EventBus, write: Any, type: str, *args: Any, **kw: Any) -> Any:
        answer = await real_publish_with(bus, write, type, *args, **kw)
        if type == "session.completed":
            committed.set()  # stored; the actor has not heard back yet
            with trio.move_on_after(10):
                await release.wait()
        return answer

    monkeypatch.setattr(EventBus, "publish_with", publish_with)
    project = make_project(tmp_path, "# App\n\n## Features\n- Quick\n")
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md")}))["id"]
        with trio.fail_after(30):
            await committed.wait()
        assert (await lab_.session(sid))["status"] == "completed"
        outcome: list[object] = []

        async def delete() -> None:
            try:
                await lab_.daemon.sessions.delete(sid)
                outcome.append("deleted")
            except Conflict as exc:
                outcome.append(exc)

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(delete)
                await trio.sleep(0.1)  # the delete is looking while the actor waits
                release.set()
        assert outcome == ["deleted"]
        assert (await lab_.client.get(f"/api/sessions/{sid}")).status_code == 404


async def test_a_start_beyond_max_sessions_is_a_503_and_stores_nothing(
    tmp_path: Path, agent_log: Path
) -> None:
    busy = make_project(tmp_path, "# App\n\n## Features\n- Long [mode:slow] [seconds:30]\n")
    other = make_project(tmp_path, name="other")
    async with lab(tmp_path / "home", max_sessions=1) as lab_:
        first = (await lab_.create({"prd": str(busy / "prd.md")}))["id"]
        await lab_.wait_event(first, "task.started")
        answer = await lab_.post("/api/sessions", {"prd": str(other / "prd.md")})
        assert answer.status_code == 503
        error = answer.json()["error"]
        assert error["code"] == "UNAVAILABLE" and "max_sessions" in error["message"]
        listed = (await lab_.client.get("/api/sessions")).json()
        assert [s["id"] for s in listed["sessions"]] == [first]
        assert (await lab_.post(f"/api/sessions/{first}/stop")).status_code == 200
        await lab_.wait_status(first, "stopped")
        await eventually(
            lambda: lab_.daemon.sessions.supervisor.count_children().specs == 0,
            "the stopped session's child is gone",
        )
        assert (await lab_.post("/api/sessions", {"prd": str(other / "prd.md")})).status_code == 201


async def test_creates_racing_at_max_sessions_store_nothing_for_the_one_refused(
    tmp_path: Path, agent_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two creates for the last place, both past the replay lookup before either is
    stored: the second is refused (503) before anything of it is stored, so its
    Idempotency-Key remembers nothing and a retry later really creates the session."""
    from lokid.session_records import parse_session_request as real_parse

    parsing = threading.Event()  # the first create is validating (its place is taken)
    gate = threading.Event()

    def held_parse(*args: Any, **kwargs: Any) -> Any:
        parsing.set()
        gate.wait(10)
        return real_parse(*args, **kwargs)

    monkeypatch.setattr("lokid.actors.session_manager.parse_session_request", held_parse)
    busy = make_project(tmp_path, "# App\n\n## Features\n- Long [mode:slow] [seconds:30]\n")
    other = make_project(tmp_path, name="other")
    async with lab(tmp_path / "home", max_sessions=1) as lab_:
        sessions = lab_.daemon.sessions
        outcomes: dict[str, Any] = {}

        async def create(name: str, project: Path) -> None:
            try:
                outcomes[name] = await sessions.create(
                    {"prd": str(project / "prd.md")}, idempotency_key=idempotency.Key(f"key-{name}")
                )
            except Exception as exc:
                outcomes[name] = exc

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(create, "first", busy)
                await eventually(parsing.is_set, "the first create validates its body")
                parsing.clear()
                nursery.start_soon(create, "second", other)
                # Old code: the second passes the capacity check and validates too.
                await eventually(
                    lambda: "second" in outcomes or parsing.is_set(), "the second create's check"
                )
                gate.set()
        assert outcomes["first"][0] == 201
        refused = outcomes["second"]
        assert isinstance(refused, Unavailable) and "max_sessions" in refused.message
        listed = (await lab_.client.get("/api/sessions")).json()["sessions"]
        assert [s["id"] for s in listed] == [outcomes["first"][1]["id"]]
        first = outcomes["first"][1]["id"]
        assert (await lab_.post(f"/api/sessions/{first}/stop")).status_code == 200
        await lab_.wait_status(first, "stopped")
        await eventually(
            lambda: sessions.supervisor.count_children().specs == 0, "the stopped child is gone"
        )
        retry = await lab_.client.post(
            "/api/sessions",
            json={"prd": str(other / "prd.md")},
            headers={"Idempotency-Key": "key-second"},
        )
        assert retry.status_code == 201 and "Idempotent-Replayed" not in retry.headers
        assert (await lab_.session(retry.json()["id"]))["status"] != "failed"


# -- the store refuses writes (disk full): hold, don't crash --------------------------------


class FullDiskStore(StoreActor):
    """A store whose disk can be made "full": every write is refused like SQLITE_FULL
    (nothing committed, `StoreUnavailable`) and `writable` says so, until `full` is False."""

    full = False

    def _refuse(self) -> None:
        if self.full:
            raise StoreUnavailable("store: nothing of this write was committed: disk full (test)")

    async def write(
        self,
        fn: Callable[[Any], T],
        *,
        timeout: float = 10.0,
        on_commit: Callable[[T], None] | None = None,
    ) -> T:
        self._refuse()
        return await super().write(fn, timeout=timeout, on_commit=on_commit)

    async def write_alone(
        self,
        fn: Callable[[Any], T],
        *,
        timeout: float = 10.0,
        sync_follows: bool = False,
        on_commit: Callable[[T], None] | None = None,
        to_end: bool = False,
    ) -> T:
        self._refuse()
        return await super().write_alone(
            fn, timeout=timeout, sync_follows=sync_follows, on_commit=on_commit, to_end=to_end
        )

    @property
    def writable(self) -> bool:
        return super().writable and not self.full

    @property
    def unwritable_reason(self) -> str | None:
        return "disk full (test)" if self.full else super().unwritable_reason


@pytest.fixture
def full_disk_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lokid.daemon.StoreActor", FullDiskStore)


def disk_of(lab_: Any) -> FullDiskStore:
    store = lab_.daemon.store
    assert isinstance(store, FullDiskStore)
    return store


async def test_a_store_refusing_writes_holds_the_session_which_then_goes_on(
    tmp_path: Path, agent_log: Path, full_disk_store: None
) -> None:
    prd = "# App\n\n## Features\n- First [mode:slow] [seconds:3]\n- Second\n"
    project = make_project(tmp_path, prd)
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md"), "projectDir": str(project)}))[
            "id"
        ]
        await lab_.wait_event(sid, "agent.output")
        actor = lab_.daemon.sessions._live[sid]
        disk_of(lab_).full = True
        # Its next output line cannot be stored: the agent is stopped and the session holds.
        await eventually(lambda: actor.statistics().held, "the session holds")
        pgid = invocations(agent_log)[0]["pgid"]
        await eventually(lambda: not live_members(pgid), "the agent's group is gone")
        await trio.sleep(1.0)  # held, not crashed, not failed
        assert lab_.daemon.sessions._live.get(sid) is actor and actor.statistics().held
        assert (await lab_.session(sid))["status"] == "running"
        assert lab_.daemon.sessions.statistics().session_crashes == 0
        assert len(invocations(agent_log)) == 1  # no run starts while held

        disk_of(lab_).full = False
        session = await lab_.wait_status(sid, "completed", "failed")
        assert session["status"] == "completed", session
        tasks = await lab_.tasks(sid)
        assert [t["status"] for t in tasks] == ["completed", "completed"]
        assert sorted(t["attempts"] for t in tasks) == [1, 2], tasks  # the cut run, again
        warnings = await lab_.events(sid, "warning")
        (held,) = [w for w in warnings if w["data"]["reason"] == "store_unwritable"]
        assert held["data"]["heldSeconds"] >= 1.0
        assert "disk full (test)" in held["data"]["message"]
        assert actor.statistics().holds == 1
        assert lab_.daemon.sessions.statistics().session_crashes == 0
        assert lab_.daemon.core_problems() == {}
    assert len(invocations(agent_log)) == 3  # the cut run again, then the second task


async def test_a_stop_the_store_refuses_still_stops_the_agent_and_is_recorded_later(
    tmp_path: Path, agent_log: Path, full_disk_store: None
) -> None:
    project = make_project(tmp_path, "# App\n\n## Features\n- Forever [mode:hang]\n- Next\n")
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md"), "projectDir": str(project)}))[
            "id"
        ]
        await lab_.wait_event(sid, "agent.spawned")
        await eventually(lambda: bool(invocations(agent_log)), "the agent logged its start")
        pgid = invocations(agent_log)[0]["pgid"]
        actor = lab_.daemon.sessions._live[sid]
        disk_of(lab_).full = True  # a silent agent: nothing is written until the stop
        answer = await lab_.post(f"/api/sessions/{sid}/stop")
        assert answer.status_code == 503, answer.text
        assert "stops anyway" in answer.json()["error"]["message"]
        await eventually(lambda: not live_members(pgid), "the agent's group is gone")
        await eventually(lambda: actor.statistics().held, "the session holds its end")
        assert actor.status.value == "stopping"
        assert (await lab_.session(sid))["status"] == "running"  # what the store has
        again = await lab_.post(f"/api/sessions/{sid}/stop")  # still legal, still refused
        assert again.status_code == 503, again.text

        disk_of(lab_).full = False
        session = await lab_.wait_status(sid, "stopped", "failed", "completed")
        assert (session["status"], session["exitReason"]) == ("stopped", "stopped")
        assert [t["status"] for t in await lab_.tasks(sid)] == ["pending", "pending"]
        (stopped,) = await lab_.events(sid, "session.stopped")
        assert stopped["data"]["survivors"] == []
        types = [e["type"] for e in await lab_.events(sid, "warning", "session.*")]
        assert types[-2:] == ["warning", "session.stopped"]
    assert len(invocations(agent_log)) == 1


async def test_human_input_the_store_refuses_waits_in_its_claim_and_is_taken_after_the_hold(
    tmp_path: Path, agent_log: Path, full_disk_store: None
) -> None:
    """The file was moved into logs/ before its input was stored: a refused store lost it
    (never stored, delivered or reported). Now its claim stays in logs/ (named with the
    input's id) and is stored after the hold, once."""
    project = make_project(tmp_path, "# App\n\n## Features\n- Forever [mode:hang]\n")
    human_input = project / ".loki" / "HUMAN_INPUT.md"
    logs = project / ".loki" / "logs"
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md"), "projectDir": str(project)}))[
            "id"
        ]
        await lab_.wait_event(sid, "agent.spawned")
        actor = lab_.daemon.sessions._live[sid]
        disk_of(lab_).full = True
        human_input.write_text("Use PostgreSQL, not SQLite.\n")
        await eventually(lambda: actor.statistics().held, "the session holds")
        (claim,) = logs.glob("human-input-*.claimed")  # kept, with its input's id
        assert claim.read_text() == "Use PostgreSQL, not SQLite.\n"
        assert not human_input.exists()
        assert sorted(logs.glob("human-input-*.md")) == []

        disk_of(lab_).full = False
        (received,) = await lab_.wait_event(sid, "input.received")
        assert claim.name.endswith(f".{received['data']['inputId']}.claimed")
        assert received["data"]["source"] == ".loki/HUMAN_INPUT.md"
        await eventually(lambda: len(invocations(agent_log)) == 2, "the cut run again")
        assert "Use PostgreSQL, not SQLite." in invocations(agent_log)[1]["prompt"]
        assert not human_input.exists() and not claim.exists()
        assert len(list(logs.glob("human-input-*.md"))) == 1
        assert len(await lab_.events(sid, "input.received")) == 1  # stored once
        assert (await lab_.post(f"/api/sessions/{sid}/stop")).status_code == 200
        await lab_.wait_status(sid, "stopped")


async def test_failing_a_crashed_session_waits_for_the_store_instead_of_crashing_the_manager(
    tmp_path: Path, agent_log: Path, full_disk_store: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    store: list[FullDiskStore] = []

    def broken(*args: Any, **kwargs: Any) -> str:
        calls["n"] += 1
        if calls["n"] == 3:  # the last crash: failing the session now needs a full disk
            store[0].full = True
        raise RuntimeError("a bug in the runner")

    monkeypatch.setattr("lokid.actors.session.build_prompt", broken)
    project = make_project(tmp_path)
    async with lab(tmp_path / "home") as lab_:
        store.append(disk_of(lab_))
        sid = (await lab_.create({"prd": str(project / "prd.md"), "projectDir": str(project)}))[
            "id"
        ]
        await eventually(lambda: calls["n"] == 3, "the third crash")
        await trio.sleep(2.0)  # several refused tries to record the failure
        manager = lab_.daemon.sessions
        assert manager.running and manager.statistics().session_crashes == 3
        assert lab_.daemon.core_problems() == {"store": "not writable: disk full (test)"}
        assert (await lab_.session(sid))["status"] == "running"

        store[0].full = False
        session = await lab_.wait_status(sid, "failed", "completed", timeout=10)
        assert (session["status"], session["exitReason"]) == ("failed", "runnerCrashed")
        assert session["tasks"]["active"] == 0
        assert len(await lab_.events(sid, "session.failed")) == 1
        assert lab_.daemon.core_problems() == {}


async def test_a_runner_crash_for_an_unwritable_store_is_not_counted(
    tmp_path: Path, agent_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = SessionActor._run
    runs = {"n": 0}

    async def refused_once(self: SessionActor) -> None:
        runs["n"] += 1
        if runs["n"] == 1:
            raise StoreUnavailable("store: nothing of this write was committed (test)")
        await real(self)

    monkeypatch.setattr(SessionActor, "_run", refused_once)
    project = make_project(tmp_path, "# App\n\n## Features\n- Only\n")
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md"), "projectDir": str(project)}))[
            "id"
        ]
        session = await lab_.wait_status(sid, "completed", "failed")
        assert session["status"] == "completed"
        assert runs["n"] == 2  # restarted
        assert lab_.daemon.sessions.statistics().session_crashes == 0


async def test_a_session_whose_runs_the_pool_refuses_ends_interrupted(
    tmp_path: Path, agent_log: Path
) -> None:
    """Regression: `PoolClosed` (the pool stopping) crashed the session runner, three
    times, then the session was `failed` (`runnerCrashed`) and could not be resumed."""
    project = make_project(tmp_path)
    async with lab(tmp_path / "home") as lab_:
        await lab_.daemon.pool.stop_all()  # what the daemon's stop does to the pool
        sid = (await lab_.create({"prd": str(project / "prd.md")}))["id"]
        session = await lab_.wait_status(sid, "interrupted", "failed")
        assert (session["status"], session["exitReason"]) == ("interrupted", None)
        assert session["iteration"] == 0  # no run
        assert [t["status"] for t in await lab_.tasks(sid)] == ["pending"] * 3
        assert await lab_.events(sid, "task.*", "agent.*") == [
            e for e in await lab_.events(sid, "task.created")
        ]
        assert lab_.daemon.sessions.statistics().session_crashes == 0
    assert invocations(agent_log) == []


async def test_a_run_the_pool_kills_is_cut_off_not_failed(tmp_path: Path, agent_log: Path) -> None:
    """Regression: an agent the hurried stop killed (`AgentPool.hurry`) was judged a failed
    run (`code: signal`) and retried; the retry met the closed pool and crashed the
    runner. It is cut off by the daemon stopping: the task goes back to `pending`."""
    project = make_project(tmp_path, "# App\n\n## Features\n- Forever [mode:hang]\n- Next\n")
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md")}))["id"]
        (spawned,) = await lab_.wait_event(sid, "agent.spawned")
        assert lab_.daemon.pool.hurry() == 1  # the session is not told first
        session = await lab_.wait_status(sid, "interrupted", "failed")
        assert (session["status"], session["exitReason"]) == ("interrupted", None)
        assert [t["status"] for t in await lab_.tasks(sid)] == ["pending", "pending"]
        assert await lab_.events(sid, "task.failed") == []
        (ended,) = await lab_.events(sid, "agent.failed")
        assert ended["data"]["agentId"] == spawned["data"]["agentId"]
        assert (ended["data"]["endReason"], ended["data"]["code"], ended["data"]["error"]) == (
            "stopped",
            "stopped",
            "run cut off: the daemon is stopping",
        )
        (interrupted,) = await lab_.events(sid, "session.interrupted")
        assert interrupted["data"]["reason"] == "daemon shutdown"
        assert lab_.daemon.sessions.statistics().session_crashes == 0
        spawned_all = await lab_.events(sid, "agent.spawned")
        assert [e["data"]["taskId"] for e in spawned_all if e["data"]["kind"] == "process"] == [
            "prd-001"
        ]


async def test_wind_down_ends_the_runs_and_refuses_new_ones(
    tmp_path: Path, agent_log: Path
) -> None:
    """What the daemon does the moment its stop begins (before the listeners drain): no
    session starts another run (it used to, until the supervisor reached the sessions),
    its run is cut off, it ends `interrupted`; new sessions and resumes get 503."""
    prd = "# App\n\n## Features\n- First [mode:slow] [seconds:1]\n- Second\n"
    project = make_project(tmp_path, prd)
    other = make_project(tmp_path, name="other")
    async with lab(tmp_path / "home") as lab_:
        sid = (await lab_.create({"prd": str(project / "prd.md")}))["id"]
        await lab_.wait_event(sid, "agent.spawned")
        lab_.daemon.sessions.wind_down()
        session = await lab_.wait_status(sid, "interrupted", "completed", "failed")
        assert session["status"] == "interrupted"
        assert [t["status"] for t in await lab_.tasks(sid)] == ["pending", "pending"]
        (ended,) = await lab_.events(sid, "agent.failed")
        assert ended["data"]["error"] == "run cut off: the daemon is stopping"
        refused = await lab_.client.post("/api/sessions", json={"prd": str(other / "prd.md")})
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["message"] == "lokid is stopping: no new session runs"
        resumed = await lab_.post(f"/api/sessions/{sid}/resume")
        assert resumed.status_code == 503, resumed.text
        await trio.sleep(1.5)  # the first run would have ended; the second never starts
        assert len(await lab_.events(sid, "task.started")) == 1
