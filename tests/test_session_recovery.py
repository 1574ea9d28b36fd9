"""Recovery end to end: `loki serve` as a subprocess, SIGKILLed while an agent runs.

The agent runs in its own session and process group, so it outlives the
killed daemon. The next daemon must kill it (identity checked by pid and
start time), mark the session `interrupted`, and continue it on resume -
passing `--resume <provider session id>` to claude - or at start with
`LOKI_RESUME_ON_START=true`.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from . import fake_agent
from .daemon_proc import DaemonProcess, wait_until
from .sessions_kit import git, invocations, json_field, live_members, make_project

WAIT = 30.0


def events(client: httpx.Client, session_id: str, type: str) -> list[dict[str, Any]]:
    answer = client.get(
        "/api/events/history", params={"sessionId": session_id, "types": type, "limit": 1000}
    )
    assert answer.status_code == 200, answer.text
    found: list[dict[str, Any]] = answer.json()["events"]
    return found


def agent_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    bin_dir = tmp_path / "bin"
    fake_agent.install(bin_dir, ("claude",))
    log = tmp_path / "agent-log.jsonl"
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_AGENT_LOG": str(log),
        "FAKE_AGENT_LIFETIME": "120",
        "LOKI_AGENT_GRACE": "1",
    }
    return env, log


def start_hanging_session(
    daemon: DaemonProcess, project: Path, log: Path
) -> tuple[str, dict[str, Any]]:
    with httpx.Client(base_url=daemon.api_url, timeout=10) as client:
        answer = client.post("/api/sessions", json={"prd": str(project / "prd.md")})
        assert answer.status_code == 201, answer.text
        session_id: str = answer.json()["id"]
        wait_until(lambda: events(client, session_id, "agent.spawned"), "the agent started")
    calls = wait_until(
        lambda: [c for c in invocations(log) if c["cwd"] == str(project)],
        "the agent logged its start",
    )
    call = calls[0]
    # the provider session id is stored once the agent printed its init line
    time.sleep(0.5)
    return session_id, call


def test_sigkill_then_restart_kills_the_orphan_and_resume_continues(
    tmp_path: Path, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    env, log = agent_env(tmp_path)
    project = make_project(tmp_path, "# App\n\n## Features\n- Long job [mode:slow] [seconds:60]\n")
    home = tmp_path / "home"
    first = daemon_factory(home, extra_env=env).start()
    session_id, call = start_hanging_session(first, project, log)
    pgid = call["pgid"]
    assert live_members(pgid)

    first.kill()  # SIGKILL to the daemon's group: the agent's own group survives it
    assert live_members(pgid), "the agent should outlive the SIGKILLed daemon"

    second = daemon_factory(home, extra_env=env).start()
    assert live_members(pgid) == []
    with httpx.Client(base_url=second.api_url, timeout=10) as client:
        session = client.get(f"/api/sessions/{session_id}").json()
        assert session["status"] == "interrupted"
        (task,) = client.get(f"/api/sessions/{session_id}/tasks").json()["tasks"]
        assert task["status"] == "pending"
        (interrupted,) = events(client, session_id, "session.interrupted")
        assert interrupted["data"]["reason"] == "daemon restart"
        # The killed run gets its end (every agent.spawned gets one), before the interrupt.
        (spawned,) = events(client, session_id, "agent.spawned")
        (ended,) = events(client, session_id, "agent.completed,agent.failed")
        assert ended["type"] == "agent.failed"
        assert ended["data"]["agentId"] == spawned["data"]["agentId"]
        assert ended["data"]["taskId"] == spawned["data"]["taskId"] == task["id"]
        assert (ended["data"]["endReason"], ended["data"]["code"]) == ("stopped", "stopped")
        assert ended["data"]["error"] == "run cut off: daemon restart"
        assert ended["data"]["exitCode"] is None and ended["data"]["survivors"] == []
        assert spawned["id"] < ended["id"] < interrupted["id"]

        answer = client.post(f"/api/sessions/{session_id}/resume")
        assert answer.status_code == 200 and answer.json()["status"] == "running"
        wait_until(lambda: len(invocations(log)) >= 2, "the agent was started again")
        resumed = invocations(log)[1]
        argv = resumed["argv"]
        assert "--resume" in argv
        provider_session = argv[argv.index("--resume") + 1]
        assert len(provider_session) == 36  # the fake's uuid from its first init line

        answer = client.post(f"/api/sessions/{session_id}/stop")
        assert answer.status_code == 200
        wait_until(
            lambda: client.get(f"/api/sessions/{session_id}").json()["status"] == "stopped",
            "the session stopped",
        )
    assert live_members(resumed["pgid"]) == []
    code, _ = second.terminate()
    assert code == 0


def test_session_stopped_carries_source_and_survivors_after_a_restart(
    tmp_path: Path, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    """Every `session.stopped` has `status, source, survivors` (docs/sessions.md): a stop
    the crash cut short, finished by the restart, and a stop of an `interrupted` session
    had `{status, reason}` and `{status, source}`. Both ends also report the input
    still queued (`warning` `input_undelivered`, before the end), which they skipped."""
    env, log = agent_env(tmp_path)
    stubborn = make_project(tmp_path, "# A\n\n## Features\n- Stubborn [mode:ignore-term]\n", "a")
    hanging = make_project(tmp_path, "# B\n\n## Features\n- Job [mode:slow] [seconds:60]\n", "b")
    home = tmp_path / "home"
    first = daemon_factory(home, extra_env={**env, "LOKI_AGENT_GRACE": "60"}).start()
    stopping, _ = start_hanging_session(first, stubborn, log)
    interrupted, _ = start_hanging_session(first, hanging, log)
    with httpx.Client(base_url=first.api_url, timeout=10) as client:
        queued = {}  # no run takes them: each session's only task is running
        for sid in (stopping, interrupted):
            answer = client.post(f"/api/sessions/{sid}/input", json={"message": "too late"})
            assert answer.status_code == 202, answer.text
            queued[sid] = answer.json()["id"]
        answer = client.post(f"/api/sessions/{stopping}/stop")  # its agent ignores SIGTERM
        assert answer.status_code == 200 and answer.json()["status"] == "stopping"
    first.kill()

    second = daemon_factory(home, extra_env=env).start()
    with httpx.Client(base_url=second.api_url, timeout=10) as client:
        (finished,) = events(client, stopping, "session.stopped")
        assert finished["data"] == {
            "status": "stopped",
            "source": "daemon restart",
            "survivors": [],
            "reason": "daemon restart",
        }
        assert finished["level"] == "info"
        (ended,) = events(client, stopping, "agent.failed")
        assert ended["id"] < finished["id"]
        (warning,) = events(client, stopping, "warning")
        assert warning["data"]["reason"] == "input_undelivered"
        assert warning["data"]["inputIds"] == [queued[stopping]]
        assert warning["id"] < finished["id"]

        assert client.post(f"/api/sessions/{interrupted}/stop").status_code == 200
        (stopped,) = events(client, interrupted, "session.stopped")
        assert stopped["data"] == {"status": "stopped", "source": "api", "survivors": []}
        (warning,) = events(client, interrupted, "warning")
        assert warning["data"] == {
            "reason": "input_undelivered",
            "message": "1 input(s) reached no agent: the session ended before a run took them",
            "inputIds": [queued[interrupted]],
        }
        assert warning["id"] < stopped["id"]
    code, _ = second.terminate()
    assert code == 0


def test_sigkill_then_restart_rewrites_the_loki_files(
    tmp_path: Path, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    env, log = agent_env(tmp_path)
    project = make_project(tmp_path, "# App\n\n## Features\n- Long job [mode:slow] [seconds:60]\n")
    loki = project / ".loki"
    home = tmp_path / "home"
    first = daemon_factory(home, extra_env=env).start()
    session_id, _ = start_hanging_session(first, project, log)
    wait_until(  # the mirror follows the store within a second
        lambda: json_field(loki / "state" / "orchestrator.json", "currentTask") == "prd-001",
        "orchestrator.json names the running task",
    )
    assert first.process is not None
    dead_pid = first.process.pid
    assert json_field(loki / "autonomy-state.json", "pid") == dead_pid

    first.kill()
    second = daemon_factory(home, extra_env=env).start()  # ready: reconciliation is done
    assert second.process is not None
    autonomy = json.loads((loki / "autonomy-state.json").read_text())
    assert (autonomy["status"], autonomy["pid"]) == ("interrupted", second.process.pid)
    orchestrator = json.loads((loki / "state" / "orchestrator.json").read_text())
    assert orchestrator["status"] == "interrupted" and "currentTask" not in orchestrator
    assert json.loads((loki / "queue" / "in-progress.json").read_text()) == []
    assert json.loads((loki / "queue" / "current-task.json").read_text()) == {}
    (pending,) = json.loads((loki / "queue" / "pending.json").read_text())
    assert (pending["id"], pending["status"]) == ("prd-001", "pending")
    with httpx.Client(base_url=second.api_url, timeout=10) as client:
        assert client.get(f"/api/sessions/{session_id}").json()["status"] == "interrupted"
        assert events(client, session_id, "warning") == []
    code, _ = second.terminate()
    assert code == 0


def test_resume_on_start_continues_interrupted_sessions(
    tmp_path: Path, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    env, log = agent_env(tmp_path)
    project = make_project(tmp_path, "# App\n\n## Features\n- Job [mode:slow] [seconds:2]\n")
    home = tmp_path / "home"
    first = daemon_factory(home, extra_env=env).start()
    session_id, call = start_hanging_session(first, project, log)
    code, _ = first.terminate()
    assert code == 0
    assert live_members(call["pgid"]) == []  # a graceful stop stops its agents

    second = daemon_factory(home, extra_env={**env, "LOKI_RESUME_ON_START": "true"}).start()
    with httpx.Client(base_url=second.api_url, timeout=10) as client:
        wait_until(
            lambda: client.get(f"/api/sessions/{session_id}").json()["status"] == "completed",
            "the resumed session completed",
        )
        (resumed,) = events(client, session_id, "session.resumed")
        assert resumed["data"]["source"] == "LOKI_RESUME_ON_START"
        kinds = [e["type"] for e in events(client, session_id, "session.*")]
        assert kinds == [
            "session.started",
            "session.interrupted",
            "session.resumed",
            "session.completed",
        ]
    code, _ = second.terminate()
    assert code == 0


def test_an_input_queued_before_a_restart_reaches_the_resumed_run(
    tmp_path: Path, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    """The resumed session's actor did not take the input itself: it reads the store's."""
    env, log = agent_env(tmp_path)
    project = make_project(tmp_path, "# App\n\n## Features\n- Job [mode:slow] [seconds:2]\n")
    home = tmp_path / "home"
    first = daemon_factory(home, extra_env=env).start()
    session_id, _call = start_hanging_session(first, project, log)
    with httpx.Client(base_url=first.api_url, timeout=10) as client:
        answer = client.post(f"/api/sessions/{session_id}/input", json={"message": "Use SQLite"})
        assert answer.status_code == 202, answer.text
    code, _ = first.terminate()
    assert code == 0

    second = daemon_factory(home, extra_env={**env, "LOKI_RESUME_ON_START": "true"}).start()
    with httpx.Client(base_url=second.api_url, timeout=10) as client:
        wait_until(
            lambda: client.get(f"/api/sessions/{session_id}").json()["status"] == "completed",
            "the resumed session completed",
        )
        (applied,) = events(client, session_id, "input.applied")
        assert applied["data"]["inputId"] == answer.json()["id"]
    code, _ = second.terminate()
    assert code == 0
    prompts = [c["prompt"] for c in invocations(log) if c["cwd"] == str(project)]
    assert "Use SQLite" not in prompts[0] and "Use SQLite" in prompts[-1]


@pytest.mark.parametrize("stop", ["sigkill", "sigterm"])
def test_resume_on_start_resumes_what_the_last_stop_cut_off_not_older_sessions(
    tmp_path: Path, daemon_factory: Callable[..., DaemonProcess], stop: str
) -> None:
    """Regression: every `interrupted` session was resumed, oldest first, so one abandoned
    after an earlier restart took the folder and the session running at the crash (or the
    graceful stop) stayed interrupted ("already running in ...")."""
    env, log = agent_env(tmp_path)
    project = make_project(tmp_path, "# App\n\n## Features\n- Long job [mode:slow] [seconds:60]\n")
    home = tmp_path / "home"

    def end(daemon: DaemonProcess) -> None:
        if stop == "sigkill":
            daemon.kill()  # its agent is killed by the next start
        else:
            assert daemon.terminate()[0] == 0

    first = daemon_factory(home, extra_env=env).start()
    older, _ = start_hanging_session(first, project, log)
    end(first)
    second = daemon_factory(home, extra_env=env).start()  # older: interrupted, left so
    newer, _ = start_hanging_session(second, project, log)
    end(second)
    third = daemon_factory(home, extra_env={**env, "LOKI_RESUME_ON_START": "true"}).start()
    with httpx.Client(base_url=third.api_url, timeout=10) as client:
        (resumed,) = wait_until(
            lambda: events(client, newer, "session.resumed"), "the newer session resumed"
        )
        assert resumed["data"]["source"] == "LOKI_RESUME_ON_START"
        assert client.get(f"/api/sessions/{newer}").json()["status"] == "running"
        assert client.get(f"/api/sessions/{older}").json()["status"] == "interrupted"
        assert events(client, older, "session.resumed") == []
    code, err = third.terminate()
    assert code == 0
    assert "could not resume" not in err


def test_a_session_end_to_end_over_sse_and_shutdown_leaves_no_agent(
    tmp_path: Path, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    env, log = agent_env(tmp_path)
    done = make_project(tmp_path, "# App\n\n## Features\n- Add it\n- Test it\n", name="done")
    busy = make_project(
        tmp_path, "# App\n\n## Features\n- Forever [mode:ignore-term]\n", name="busy"
    )
    daemon = daemon_factory(tmp_path / "home", extra_env=env).start()
    seen: list[dict[str, Any]] = []
    with httpx.Client(base_url=daemon.api_url, timeout=10) as client:
        with client.stream("GET", "/api/events", params={"types": "session.*,task.*"}) as stream:
            answer = client.post("/api/sessions", json={"prd": str(done / "prd.md")})
            assert answer.status_code == 201
            session_id = answer.json()["id"]
            for line in stream.iter_lines():
                if line.startswith("data:"):
                    event = json.loads(line[5:])
                    seen.append(event)
                    if event["type"] == "session.completed":
                        break
        assert [e["type"] for e in seen if e["sessionId"] == session_id] == [
            "task.created",
            "task.created",
            "session.started",
            "task.started",
            "task.completed",
            "task.started",
            "task.completed",
            "session.completed",
        ]
        tasks = client.get(f"/api/sessions/{session_id}/tasks").json()["tasks"]
        assert [t["status"] for t in tasks] == ["completed", "completed"]
        orchestrator = done / ".loki" / "state" / "orchestrator.json"
        wait_until(
            lambda: json_field(orchestrator, "currentPhase") == "COMPLETED",
            "the mirror shows the end",
        )

        busy_id, call = start_hanging_session(daemon, busy, log)
        wait_until(lambda: len(live_members(call["pgid"])) >= 2, "the grandchild was forked")
    code, _ = daemon.terminate()
    assert code == 0
    assert live_members(call["pgid"]) == []  # SIGTERM ignored: KILL after the grace
    with sqlite3.connect(tmp_path / "home" / "lokid" / "lokid.db") as db:
        (status,) = db.execute("SELECT status FROM sessions WHERE id = ?", (busy_id,)).fetchone()
    assert status == "interrupted"


def test_sigkill_then_restart_removes_the_worktrees_of_the_cut_off_runs(
    tmp_path: Path, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    env, log = agent_env(tmp_path)
    prd = "# App\n\n## Features\n- One [mode:hang]\n- Two [mode:hang]\n"
    project = make_project(tmp_path, prd)
    for args in (("init", "-q", "-b", "main"), ("add", "-A"), ("commit", "-qm", "start")):
        git(project, *args)
    home = tmp_path / "home"
    first = daemon_factory(home, extra_env=env).start()
    with httpx.Client(base_url=first.api_url, timeout=10) as client:
        body = {"prd": str(project / "prd.md"), "options": {"parallel": True}}
        answer = client.post("/api/sessions", json=body)
        assert answer.status_code == 201, answer.text
        session_id = answer.json()["id"]
        wait_until(lambda: len(invocations(log)) == 2, "both agents started")
    assert git(project, "worktree", "list").count("\n") == 3
    assert len(loki_branches(project)) == 2

    first.kill()  # nothing of the daemon cleans up
    assert git(project, "worktree", "list").count("\n") == 3

    second = daemon_factory(home, extra_env=env).start()  # ready: reconciliation is done
    assert git(project, "worktree", "list").count("\n") == 1
    assert loki_branches(project) == []
    assert not list((project / ".loki" / "worktrees").iterdir())
    with httpx.Client(base_url=second.api_url, timeout=10) as client:
        assert client.get(f"/api/sessions/{session_id}").json()["status"] == "interrupted"
    code, _ = second.terminate()
    assert code == 0


def test_sigkill_then_restart_takes_what_cut_off_agents_left_in_their_worktrees(
    tmp_path: Path, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    """Agents confined to their worktree (`[loki:cwd]`) wrote its own `.loki/` - a task,
    a completion request - and the daemon was killed: the restart takes them before it
    prunes the worktrees (it pruned them unread), as a run's end does: the task (its id
    taken by another task of the session: renamed, with a warning) is the session's, and
    the completion request ends the session on resume."""
    env, _ = agent_env(tmp_path)
    prd = (
        "# App\n\n## Features\n"
        "- One [mode:add-task] [task:Left in a worktree] [id:prd-003] [loki:cwd] [then:hang]\n"
        "- Two [mode:complete] [loki:cwd] [then:hang]\n"
        "- Three\n"
    )
    project = make_project(tmp_path, prd)
    for args in (("init", "-q", "-b", "main"), ("add", "-A"), ("commit", "-qm", "start")):
        git(project, *args)
    trees = project / ".loki" / "worktrees"
    left = [
        trees / "prd-001" / ".loki" / "queue" / "pending.json",
        trees / "prd-002" / ".loki" / "signals" / "COMPLETION_REQUESTED",
    ]
    home = tmp_path / "home"
    first = daemon_factory(home, extra_env=env).start()
    with httpx.Client(base_url=first.api_url, timeout=10) as client:
        body = {"prd": str(project / "prd.md"), "options": {"parallel": True, "maxAgents": 2}}
        answer = client.post("/api/sessions", json=body)
        assert answer.status_code == 201, answer.text
        session_id = answer.json()["id"]
        wait_until(lambda: all(path.exists() for path in left), "both agents wrote")
    first.kill()

    second = daemon_factory(home, extra_env=env).start()  # ready: reconciliation is done
    assert not list(trees.iterdir())  # pruned, after being read
    assert (project / ".loki" / "signals" / "COMPLETION_REQUESTED").exists()
    with httpx.Client(base_url=second.api_url, timeout=10) as client:
        assert client.get(f"/api/sessions/{session_id}").json()["status"] == "interrupted"
        tasks = client.get(f"/api/sessions/{session_id}/tasks").json()["tasks"]
        (taken,) = [t for t in tasks if t["source"] == "agent"]
        assert taken["title"] == "Left in a worktree" and taken["status"] == "pending"
        assert taken["id"].startswith("agent-") and len(taken["id"]) == len("agent-") + 12
        (warning,) = events(client, session_id, "warning")
        assert warning["data"] == {
            "reason": "worktree",
            "message": "task prd-003 ('Left in a worktree') has the id of another task of "
            f"the session; it is taken as {taken['id']}",
            "file": str(left[0]),
            "taskId": "prd-001",
        }
        created = events(client, session_id, "task.created")
        (interrupted,) = events(client, session_id, "session.interrupted")
        assert created[-1]["data"]["taskId"] == taken["id"]
        assert created[-1]["id"] < interrupted["id"]

        assert client.post(f"/api/sessions/{session_id}/resume").status_code == 200
        ended = wait_until(
            lambda: events(client, session_id, "session.completed"), "the session completed"
        )
        assert ended[0]["data"]["exitReason"] == "completionRequested"
    code, _ = second.terminate()
    assert code == 0


def loki_branches(project: Path) -> list[str]:
    return git(project, "branch", "--list", "--format=%(refname:short)", "loki/*").split()


def wait_killed(daemon: DaemonProcess) -> str:
    """Wait for a daemon a crash point SIGKILLed; its stderr."""
    assert daemon.process is not None
    _, err = daemon.process.communicate(timeout=WAIT)
    assert daemon.process.returncode == -9, err.decode()
    return err.decode()


@pytest.mark.parametrize("point", ["human_input.claimed", "human_input.stored"])
def test_human_input_claimed_just_before_a_crash_is_delivered_after_the_restart(
    tmp_path: Path, daemon_factory: Callable[..., DaemonProcess], point: str
) -> None:
    """SIGKILL between the rename of HUMAN_INPUT.md into logs/ and the commit of its
    input (the crash point `human_input.claimed`): the text was in logs/ only, and
    no restart delivered it. Now the claim in logs/ is stored by the next daemon's
    session and reaches exactly one prompt; a claim whose input was stored just
    before the crash (`human_input.stored`) is not stored again (its id is in its name)."""
    env, log = agent_env(tmp_path)
    project = make_project(tmp_path, "# App\n\n## Features\n- Job [mode:slow] [seconds:5]\n")
    human_input = project / ".loki" / "HUMAN_INPUT.md"
    logs = project / ".loki" / "logs"
    home = tmp_path / "home"
    first = daemon_factory(home, extra_env={**env, "LOKI_CRASH_AT": point}).start()
    session_id, _ = start_hanging_session(first, project, log)
    human_input.write_text("Use PostgreSQL, not SQLite.\n")
    assert f"crash point {point}" in wait_killed(first)
    assert not human_input.exists()  # claimed: only logs/ has the text now
    assert len(list(logs.iterdir())) == 1

    second = daemon_factory(home, extra_env={**env, "LOKI_RESUME_ON_START": "true"}).start()
    with httpx.Client(base_url=second.api_url, timeout=10) as client:
        wait_until(
            lambda: client.get(f"/api/sessions/{session_id}").json()["status"] == "completed",
            "the resumed session completed",
        )
        (received,) = events(client, session_id, "input.received")
        assert received["data"]["source"] == ".loki/HUMAN_INPUT.md"
        (applied,) = events(client, session_id, "input.applied")
        assert applied["data"]["inputId"] == received["data"]["inputId"]
    code, _ = second.terminate()
    assert code == 0
    prompts = [c["prompt"] for c in invocations(log) if c["cwd"] == str(project)]
    assert [("Use PostgreSQL, not SQLite." in p) for p in prompts] == [False, True]
    (record,) = logs.iterdir()  # the claim became the record of what was delivered
    assert record.name.startswith("human-input-") and record.name.endswith(".md")
    assert record.read_text() == "Use PostgreSQL, not SQLite.\n"


@pytest.mark.parametrize("point", ["agent.recorded", "agent.released"])
def test_an_input_reaches_one_prompt_when_the_daemon_dies_as_its_agent_starts(
    tmp_path: Path, daemon_factory: Callable[..., DaemonProcess], point: str
) -> None:
    """SIGKILL while the agent that carries an input starts: after its row, the input's
    mark and its `input.applied` committed and before the agent was released (it never
    runs: the next start queues the input again, says so, and the next prompt takes
    it), or right after the release (it ran with the input: not again)."""
    env, log = agent_env(tmp_path)
    project = make_project(
        tmp_path,
        "# App\n\n## Features\n- First [mode:slow] [seconds:3]\n- Second [mode:slow] [seconds:1]\n",
    )
    home = tmp_path / "home"
    first = daemon_factory(home, extra_env={**env, "LOKI_CRASH_AT": f"{point}#2"}).start()
    session_id, _ = start_hanging_session(first, project, log)
    with httpx.Client(base_url=first.api_url, timeout=10) as client:
        answer = client.post(f"/api/sessions/{session_id}/input", json={"message": "Use SQLite"})
        assert answer.status_code == 202, answer.text
    assert f"crash point {point}" in wait_killed(first)
    if point == "agent.released":  # it execs the agent, which logs its start
        wait_until(lambda: len(invocations(log)) == 2, "the released agent started")

    second = daemon_factory(home, extra_env={**env, "LOKI_RESUME_ON_START": "true"}).start()
    with httpx.Client(base_url=second.api_url, timeout=10) as client:
        wait_until(
            lambda: client.get(f"/api/sessions/{session_id}").json()["status"] == "completed",
            "the resumed session completed",
        )
        input_id = answer.json()["id"]
        applied = events(client, session_id, "input.applied")
        warnings = events(client, session_id, "warning")
        if point == "agent.released":
            assert [e["data"]["inputId"] for e in applied] == [input_id]
            assert warnings == []
        else:
            # The dead daemon's `input.applied`, then the warning, then the one that counts.
            assert [e["data"]["inputId"] for e in applied] == [input_id, input_id]
            (requeued,) = warnings
            assert requeued["data"]["reason"] == "input_requeued"
            assert requeued["data"]["inputIds"] == [input_id]
            assert applied[0]["id"] < requeued["id"] < applied[1]["id"]
    code, _ = second.terminate()
    assert code == 0
    prompts = [c["prompt"] for c in invocations(log) if c["cwd"] == str(project)]
    assert sum("Use SQLite" in p for p in prompts) == 1, prompts
