"""lokid.loki_mirror: a file is written only when its content changes; a reconciled
session's files are rewritten from the store."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from lokid import lokidir as ld
from lokid.loki_mirror import MirrorState, write_mirror, write_reconciled
from lokid.session_records import RunnerTask


def test_a_first_write_of_the_bytes_already_on_disk_leaves_the_file_alone(
    tmp_path: Path,
) -> None:
    path = tmp_path / "queue.json"
    path.write_bytes(b"[]\n")
    inode = path.stat().st_ino
    MirrorState().write(path, b"[]\n")
    assert path.stat().st_ino == inode  # not replaced (a replace makes a new file)


def test_other_bytes_replace_the_file_and_the_same_bytes_again_do_not(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(b"{}\n")
    state = MirrorState()
    state.write(path, b'{"a": 1}\n')
    assert path.read_bytes() == b'{"a": 1}\n'
    inode = path.stat().st_ino
    state.write(path, b'{"a": 1}\n')
    assert path.stat().st_ino == inode
    state.write(path, b'{"a": 2}\n')
    assert path.read_bytes() == b'{"a": 2}\n'


def test_a_missing_file_is_created(tmp_path: Path) -> None:
    path = tmp_path / "current-task.json"
    MirrorState().write(path, b"{}\n")
    assert path.read_bytes() == b"{}\n"


def test_a_link_to_the_same_bytes_is_replaced_by_a_plain_file(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.json"
    target.write_bytes(b"[]\n")
    path = tmp_path / "queue.json"
    path.symlink_to(target)
    MirrorState().write(path, b"[]\n")
    assert not path.is_symlink()
    assert path.read_bytes() == b"[]\n"


def test_a_fifo_in_the_way_neither_hangs_nor_stays(tmp_path: Path) -> None:
    path = tmp_path / "queue.json"
    os.mkfifo(path)
    MirrorState().write(path, b"[]\n")  # would block forever if the FIFO were opened to read
    assert path.is_file() and path.read_bytes() == b"[]\n"


def test_a_session_starting_in_a_fresh_loki_dir_keeps_its_empty_queues(tmp_path: Path) -> None:
    paths = ld.init_loki_dir(tmp_path)
    names = ("in-progress", "completed", "failed")
    inodes = {name: paths.queue(name).stat().st_ino for name in names}
    state = MirrorState()
    for name in names:
        state.write(paths.queue(name), ld.encode_queue([]))
    assert {name: paths.queue(name).stat().st_ino for name in names} == inodes


# -- write_reconciled: the files of a session reconciled after a killed daemon ---------------

DEAD_PID, NEW_PID = 4242, 5151


def session_row(project: Path, session_id: str = "s-1", **fields: Any) -> dict[str, Any]:
    return {
        "id": session_id,
        "status": "running",
        "projectDir": str(project),
        "prd": str(project / "prd.md"),
        "options": {},
        "phase": "development",
        "iteration": 2,
        "createdAt": "2026-03-01T12:00:00.000Z",
        "startedAt": "2026-03-01T12:00:01.000Z",
        "updatedAt": "2026-03-01T12:05:00.000Z",
        "exitReason": None,
        **fields,
    }


def runner_task(task_id: str, status: str) -> RunnerTask:
    return RunnerTask(
        id=task_id,
        title=f"Task {task_id}",
        description="",
        status=status,
        priority=2,
        attempts=1,
        error=None,
        source="prd",
        position=int(task_id[-1]),
        acceptance=(),
        resume_id=None,
        created_at="2026-03-01T12:00:00.000Z",
        started_at="2026-03-01T12:00:02.000Z",
        completed_at=None,
    )


def mirror_of_a_killed_daemon(project: Path) -> ld.LokiPaths:
    """The files a daemon SIGKILLed while prd-002 ran left: running, its pid, the task."""
    paths = ld.init_loki_dir(project)
    tasks = [runner_task("prd-001", "completed"), runner_task("prd-002", "active")]
    write_mirror(
        paths,
        session_row(project),
        tasks,
        pending_stamp=ld.file_stamp(paths.pending),
        pid=DEAD_PID,
        version="test",
        retries=3,
        last_exit_code=1,
        state=MirrorState(),
    )
    return paths


def reconciled(project: Path) -> tuple[dict[str, Any], list[RunnerTask]]:
    """What the store says after reconciliation: interrupted, prd-002 back to pending."""
    tasks = [runner_task("prd-001", "completed"), runner_task("prd-002", "pending")]
    return session_row(project, status="interrupted"), tasks


def test_reconciled_files_say_interrupted_with_the_task_back_in_pending(tmp_path: Path) -> None:
    paths = mirror_of_a_killed_daemon(tmp_path)
    session, tasks = reconciled(tmp_path)
    assert write_reconciled(session, tasks, pid=NEW_PID, version="test")
    autonomy = ld.read_autonomy_state(paths.autonomy_state)
    assert autonomy is not None
    assert (autonomy.status, autonomy.pid) == ("interrupted", NEW_PID)
    assert (autonomy.retry_count, autonomy.last_exit_code) == (3, 1)  # carried over
    orchestrator = ld.read_orchestrator(paths.orchestrator)
    assert orchestrator is not None
    assert (orchestrator.current_task, orchestrator.extra["status"]) == (None, "interrupted")
    assert orchestrator.retries == 3
    assert ld.read_current_task(paths.current_task) is None

    def ids(path: Path) -> list[str]:
        queue = ld.read_queue(path)
        assert queue is not None
        return [task.id for task in queue.tasks]

    assert ids(paths.in_progress) == []
    assert ids(paths.pending) == ["prd-002"]
    assert ids(paths.completed) == ["prd-001"]


def test_tasks_a_killed_agent_appended_are_left_for_the_runner(tmp_path: Path) -> None:
    paths = mirror_of_a_killed_daemon(tmp_path)
    appended = b'[{"id": "agent-1", "title": "Write the docs", "status": "pending"}]\n'
    paths.pending.write_bytes(appended)
    session, tasks = reconciled(tmp_path)
    assert write_reconciled(session, tasks, pid=NEW_PID, version="test")
    assert paths.pending.read_bytes() == appended  # ingested on resume, not overwritten
    assert json.loads(paths.in_progress.read_text()) == []


def test_files_of_another_session_are_left_alone(tmp_path: Path) -> None:
    paths = mirror_of_a_killed_daemon(tmp_path)
    before = paths.autonomy_state.read_bytes()
    session, tasks = reconciled(tmp_path)
    other = {**session, "id": "s-2"}
    assert not write_reconciled(other, tasks, pid=NEW_PID, version="test")
    assert paths.autonomy_state.read_bytes() == before


def test_a_session_without_loki_dir_gets_none(tmp_path: Path) -> None:
    session, tasks = reconciled(tmp_path)
    assert not write_reconciled(session, tasks, pid=NEW_PID, version="test")
    assert not (tmp_path / ".loki").exists()


def test_a_gone_project_folder_or_a_failed_write_is_an_error(tmp_path: Path) -> None:
    session, tasks = reconciled(tmp_path / "gone")
    with pytest.raises(ld.LokiDirWriteError, match="the project folder is gone"):
        write_reconciled(session, tasks, pid=NEW_PID, version="test")

    paths = mirror_of_a_killed_daemon(tmp_path)
    shutil.rmtree(paths.state_dir)
    paths.state_dir.write_text("a file where the folder should be")
    session, tasks = reconciled(tmp_path)
    with pytest.raises(ld.LokiDirWriteError):
        write_reconciled(session, tasks, pid=NEW_PID, version="test")
