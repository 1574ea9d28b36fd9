"""The runner's answers to merges that fail, rate limits and runs that never started.

End to end in one process, like `test_session_runner.py`: a real daemon,
agents that are shell scripts (`provider: command`) in real git projects.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio

from lokid import providers, worktree
from lokid.sandbox import exec_failure, sandbox_problem

from .sessions_kit import Lab, eventually, git, json_field, lab, make_git_project, make_project


def git_project(tmp_path: Path, prd: str) -> Path:
    """A project with `prd.md` and `shared.txt` committed on `main`."""
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "shared.txt").write_text("base\n")
    return make_git_project(tmp_path, prd)


async def start(lab_: Lab, project: Path, options: dict[str, Any]) -> str:
    """Start a `command` session on `project`'s PRD with `options`; its id."""
    body = {"prd": str(project / "prd.md"), "provider": "command", "options": options}
    return str((await lab_.create(body))["id"])


def runs(log: Path) -> list[str]:
    """The task ids of the agent runs, from the log each run appends to."""
    return log.read_text().split() if log.exists() else []


def agent(log: Path, body: str) -> list[str]:
    """`options.command`: log the run's task, then `body`, in the task's worktree."""
    return ["/bin/sh", "-c", f'cat >/dev/null; echo "$LOKI_TASK_ID" >> {log}; {body}']


async def test_uncommitted_changes_in_the_way_pause_the_session_until_the_person_acts(
    tmp_path: Path,
) -> None:
    project = git_project(tmp_path, "# App\n\n## Features\n- Edit the shared file\n")
    (project / "shared.txt").write_text("the person's edit, uncommitted\n")
    log = tmp_path / "runs.log"
    command = agent(log, "echo agent > shared.txt; echo done")
    async with lab(tmp_path / "home") as lab_:
        sid = await start(lab_, project, {"parallel": True, "command": command})
        session = await lab_.wait_status(sid, "paused", "failed", "completed")
        assert session["status"] == "paused"
        (paused,) = await lab_.events(sid, "session.paused")
        assert paused["data"]["source"] == "merge" and paused["data"]["taskId"] == "prd-001"
        (warning,) = [
            w for w in await lab_.events(sid, "warning") if w["data"]["reason"] == "merge_blocked"
        ]
        assert warning["data"]["taskId"] == "prd-001"
        assert (
            "prd-001: not merged: the project has uncommitted changes"
            in (warning["data"]["message"])
        )
        assert "shared.txt" in warning["data"]["message"]
        (task,) = await lab_.tasks(sid)
        assert task["status"] == "pending"
        assert task["error"].startswith("not merged: the project has uncommitted")
        assert not task["error"].startswith("not merged: not merged")
        assert (project / ".loki" / "PAUSE").exists()
        await trio.sleep(0.5)
        assert runs(log) == ["prd-001"]  # no run is paid for while nothing can merge
        assert await lab_.events(sid, "task.failed") == []

        git(project, "checkout", "--", "shared.txt")  # the person makes room
        assert (await lab_.post(f"/api/sessions/{sid}/resume")).status_code == 200
        session = await lab_.wait_status(sid, "completed", "failed", "paused")
        assert session["status"] == "completed", session
    assert (project / "shared.txt").read_text() == "agent\n"
    assert runs(log) == ["prd-001", "prd-001"]


async def test_conflicts_back_off_count_as_failed_runs_and_warn_for_each_task(
    tmp_path: Path,
) -> None:
    prd = "# App\n\n## Features\n- First edit\n- Second edit\n"
    project = git_project(tmp_path, prd)
    log = tmp_path / "runs.log"
    # The worktree and the project change shared.txt differently: every merge conflicts.
    body = (
        "echo agent-$$ > shared.txt;"
        f" echo main-$$ > {project}/shared.txt;"
        f" git -C {project} -c user.name=t -c user.email=t@localhost commit -qam main-$$;"
        " echo done"
    )
    async with lab(tmp_path / "home") as lab_:
        sid = await start(
            lab_,
            project,
            {
                "parallel": True,
                "maxAgents": 1,
                "maxIterations": 20,
                "command": agent(log, body),
            },
        )
        session = await lab_.wait_status(sid, "failed", "completed")
        assert session["exitReason"] == "maxConsecutiveFailures", session
        failures = await lab_.events(sid, "task.failed")
        assert [f["data"]["code"] for f in failures] == ["merge_conflict"] * 5
        assert {f["data"]["error"] for f in failures} == {"not merged: conflict in shared.txt"}
        for failed in failures[:-1]:  # backed off, or used up its task's attempts
            final = failed["data"]["attempt"] == 3
            assert (failed["data"]["retryInSeconds"] is None) is final, failed
        assert len(runs(log)) == 5
        tasks = {t["id"]: t for t in await lab_.tasks(sid)}
        assert all(1 <= t["attempts"] <= 3 for t in tasks.values())
        warned = {
            w["data"]["taskId"]
            for w in await lab_.events(sid, "warning")
            if w["data"]["reason"] == "merge"
        }
        assert warned == {"prd-001", "prd-002"}  # the same message, told for each task
    assert not (project / ".git" / "MERGE_HEAD").exists()


async def test_a_git_error_while_merging_fails_the_task_after_its_attempts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> worktree.MergeResult:
        raise worktree.GitError("`git merge` failed (exit 128): something odd")

    monkeypatch.setattr(worktree, "merge_worktree", broken)
    project = git_project(tmp_path, "# App\n\n## Features\n- Only task\n")
    log = tmp_path / "runs.log"
    async with lab(tmp_path / "home") as lab_:
        sid = await start(
            lab_,
            project,
            {
                "parallel": True,
                "maxIterations": 10,
                "command": agent(log, "echo x > new.txt; echo done"),
            },
        )
        session = await lab_.wait_status(sid, "failed", "completed")
        assert session["exitReason"] == "tasksFailed", session
        assert runs(log) == ["prd-001"] * 3
        failures = await lab_.events(sid, "task.failed")
        assert [(f["data"]["code"], f["data"]["attempt"]) for f in failures] == [
            ("merge_failed", 1),
            ("merge_failed", 2),
            ("merge_failed", 3),
        ]
        (task,) = await lab_.tasks(sid)
        assert task["error"] == "not merged: `git merge` failed (exit 128): something odd"


async def test_a_rate_limit_uses_up_no_attempt_and_no_consecutive_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = providers.retry_delay
    waits: list[int] = []

    def short(failure: providers.Failure, attempt: int, **kwargs: Any) -> float | None:
        if failure.kind is providers.FailureKind.RATE_LIMIT:
            waits.append(attempt)
            return 0.05  # the real floor is a minute, doubling
        return real(failure, attempt, **kwargs)

    monkeypatch.setattr(providers, "retry_delay", short)
    project = make_project(tmp_path, "# App\n\n## Features\n- Only task\n")
    log = tmp_path / "runs.log"
    limited = (
        f'if [ "$(wc -l < {log})" -le 6 ]; then echo "Rate limit reached for gpt-4o in'
        ' organization org-x on tokens per min. Please try again in 1s." >&2; exit 1; fi;'
        " echo done"
    )
    async with lab(tmp_path / "home") as lab_:
        sid = await start(lab_, project, {"command": agent(log, limited)})
        session = await lab_.wait_status(sid, "failed", "completed")
        assert session["status"] == "completed", session
        failures = await lab_.events(sid, "task.failed")
        assert [f["data"]["code"] for f in failures] == ["rate_limit"] * 6
        assert all(f["data"]["retryInSeconds"] is not None for f in failures)
        assert all(f["level"] == "warning" for f in failures)
        (task,) = await lab_.tasks(sid)
        assert (task["status"], task["attempts"]) == ("completed", 7)
    assert waits == [1, 2, 3, 4, 5, 6]  # the wait's floor doubles per rate-limited run


async def test_a_parallel_session_keeps_the_highest_iteration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = worktree.create_worktree

    async def first_one_late(project_dir: Path, *, session_id: str, task_id: str) -> Any:
        if task_id == "prd-001":
            await trio.sleep(0.5)  # the first run's start is stored after the others'
        return await real(project_dir, session_id=session_id, task_id=task_id)

    monkeypatch.setattr(worktree, "create_worktree", first_one_late)
    project = git_project(tmp_path, "# App\n\n## Features\n- Alpha\n- Beta\n- Gamma\n")
    log = tmp_path / "runs.log"
    command = agent(log, 'echo x > "$LOKI_TASK_ID.txt"; sleep 1; echo done')
    async with lab(tmp_path / "home") as lab_:
        sid = await start(lab_, project, {"parallel": True, "command": command})
        started = await lab_.wait_event(sid, "task.started", count=3)
        assert started[-1]["data"]["taskId"] == "prd-001"
        assert (await lab_.session(sid))["iteration"] == 3
        session = await lab_.wait_status(sid, "completed", "failed")
        assert (session["status"], session["iteration"]) == ("completed", 3)
        autonomy = project / ".loki" / "autonomy-state.json"
        await eventually(lambda: json_field(autonomy, "iterationCount") == 3, "iterationCount 3")
        orchestrator = project / ".loki" / "state" / "orchestrator.json"
        assert json.loads(orchestrator.read_text())["iteration"] == 3


def test_a_command_bubblewrap_cannot_start_is_recognised() -> None:
    missing = exec_failure(1, "bwrap: execvp gemini: No such file or directory\n")
    assert missing is not None and missing[0] == "cli_missing"
    assert "cannot run gemini" in missing[1]
    denied = exec_failure(1, "bwrap: execvp /tmp/x.sh: Permission denied")
    assert denied == ("permission", "the sandbox cannot run /tmp/x.sh: Permission denied")
    assert exec_failure(2, "bwrap: execvp gemini: No such file or directory") is None
    assert exec_failure(1, "bwrap: execvp gemini: No such file or directory\nmore\n") is None
    assert exec_failure(1, "error: something else") is None


async def test_a_cli_the_sandbox_cannot_see_is_a_permanent_error(tmp_path: Path) -> None:
    problem = sandbox_problem()
    if problem is not None:
        pytest.skip(problem)
    cli = tmp_path / "bin" / "my-agent"  # under /tmp: hidden by the sandbox's private /tmp
    cli.parent.mkdir()
    cli.write_text("#!/bin/sh\ncat >/dev/null; echo done\n")
    cli.chmod(0o755)
    project = make_project(tmp_path, "# App\n\n## Features\n- Only task\n")
    async with lab(tmp_path / "home") as lab_:
        sid = await start(lab_, project, {"sandbox": True, "command": [str(cli)]})
        session = await lab_.wait_status(sid, "failed", "completed")
        assert session["exitReason"] == "permanentError", session
        (failed,) = await lab_.events(sid, "task.failed")
        assert failed["data"]["code"] == "cli_missing"
        assert f"the sandbox cannot run {cli}" in failed["data"]["error"]


async def test_a_run_cut_off_by_a_stop_says_so_in_words(tmp_path: Path) -> None:
    project = make_project(tmp_path, "# App\n\n## Features\n- Only task\n")
    log = tmp_path / "runs.log"
    async with lab(tmp_path / "home") as lab_:
        sid = await start(lab_, project, {"command": agent(log, "sleep 30")})
        await lab_.wait_event(sid, "agent.spawned")
        assert (await lab_.post(f"/api/sessions/{sid}/stop")).status_code == 200
        await lab_.wait_status(sid, "stopped")
        (task,) = await lab_.tasks(sid)
        assert (task["status"], task["error"]) == ("pending", "run cut off: the session stopped")
