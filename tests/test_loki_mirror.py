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
from lokid.loki_mirror import (
    MirrorState,
    PendingView,
    _write_pending,
    write_mirror,
    write_reconciled,
)
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


def test_the_first_pending_write_leaves_the_version_read_if_it_holds_those_bytes(
    tmp_path: Path,
) -> None:
    paths = ld.init_loki_dir(tmp_path)
    inode = paths.pending.stat().st_ino
    seen = PendingView(ld.file_stamp(paths.pending))
    state = MirrorState()
    after = _write_pending(paths.pending, [], seen, state)
    assert after == seen and paths.pending.stat().st_ino == inode  # no new file
    # A version it did not read (another stamp) is replaced as before, by compare-and-swap.
    other = tmp_path / "other.json"
    other.write_bytes(b"[]\n")
    stale = PendingView(ld.FileStamp(0, 0, 3, 0))
    assert _write_pending(other, [], stale, MirrorState()) == stale  # refused: re-read
    fresh = PendingView(ld.file_stamp(other))
    task = ld.QueueTask(id="t-1", title="One")
    written = _write_pending(other, [task], fresh, MirrorState())
    assert written.stamp == ld.file_stamp(other) and b"t-1" in other.read_bytes()


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
        pending=PendingView(ld.file_stamp(paths.pending)),
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
    """pending.json is left alone, and so are in-progress.json and current-task.json:
    emptying them dropped the cut-off task (prd-002) from every queue file."""
    paths = mirror_of_a_killed_daemon(tmp_path)
    appended = b'[{"id": "agent-1", "title": "Write the docs", "status": "pending"}]\n'
    paths.pending.write_bytes(appended)
    session, tasks = reconciled(tmp_path)
    assert write_reconciled(session, tasks, pid=NEW_PID, version="test")
    assert paths.pending.read_bytes() == appended  # ingested on resume, not overwritten
    in_progress = ld.read_queue(paths.in_progress)
    assert in_progress is not None
    assert [task.id for task in in_progress.tasks] == ["prd-002"]
    current = ld.read_current_task(paths.current_task)
    assert current is not None and current.id == "prd-002"
    autonomy = ld.read_autonomy_state(paths.autonomy_state)
    assert autonomy is not None and autonomy.status == "interrupted"  # the rest is rewritten


def test_a_malformed_pending_file_is_left_alone_by_reconciliation(tmp_path: Path) -> None:
    paths = mirror_of_a_killed_daemon(tmp_path)
    torn = b'[{"id": "agent-1", "title": "Wri'
    paths.pending.write_bytes(torn)
    session, tasks = reconciled(tmp_path)
    assert write_reconciled(session, tasks, pid=NEW_PID, version="test")
    assert paths.pending.read_bytes() == torn


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


# -- pending.json: replaced only when that loses nothing ----------------------------------


def agent_entries(count: int) -> list[dict[str, str]]:
    return [{"id": f"bulk-{n:03}", "title": f"Bulk {n}", "status": "pending"} for n in range(count)]


def mirror_pending(paths: ld.LokiPaths, pending: PendingView, task_ids: list[str]) -> PendingView:
    """`write_mirror` of a running session whose pending tasks are `task_ids`."""
    return write_mirror(
        paths,
        session_row(paths.project),
        [runner_task(task_id, "pending") for task_id in task_ids],
        pending=pending,
        pid=NEW_PID,
        version="test",
        retries=0,
        last_exit_code=0,
        state=MirrorState(),
    )


def ingested(paths: ld.LokiPaths, known: set[str]) -> tuple[PendingView, list[str]]:
    """What the runner's ingest makes of the file: its view, and the ids it took."""
    result, stamp = ld.ingest_pending_file(paths.pending, known)
    view = PendingView(stamp, deferred=result.deferred, wrapper=result.wrapper)
    return view, [task.id for task in result.tasks]


def test_tasks_left_for_the_next_read_keep_the_file_as_it_is(tmp_path: Path) -> None:
    """120 new entries: 50 taken per read; the file keeps the other 70 until they are taken."""
    paths = ld.init_loki_dir(tmp_path)
    data = json.dumps(agent_entries(120)).encode()
    paths.pending.write_bytes(data)
    view, taken = ingested(paths, set())
    assert (len(taken), view.deferred, view.replaceable) == (50, 70, False)
    assert mirror_pending(paths, view, taken) == view
    assert paths.pending.read_bytes() == data

    known = set(taken)
    while view.deferred:
        view, more = ingested(paths, known)
        known.update(more)
    assert len(known) == 120
    after = mirror_pending(paths, view, sorted(known))  # all taken: now it is rewritten
    assert after.stamp == ld.file_stamp(paths.pending) != view.stamp
    assert [entry["id"] for entry in json.loads(paths.pending.read_text())] == sorted(known)


@pytest.mark.parametrize(
    "content",
    [
        b'[{"id": "half-1", "title": "half written", "stat',
        b"[" + b" " * ld.MAX_LOKI_FILE_BYTES + b"]",
    ],
    ids=["torn", "oversized"],
)
def test_a_file_the_runner_cannot_read_is_never_overwritten(tmp_path: Path, content: bytes) -> None:
    paths = ld.init_loki_dir(tmp_path)
    paths.pending.write_bytes(content)
    with pytest.raises(ld.LokiDirFormatError):
        ld.ingest_pending_file(paths.pending, set())
    view = PendingView(ld.file_stamp(paths.pending), readable=False)
    assert mirror_pending(paths, view, ["prd-001"]) == view
    assert paths.pending.read_bytes() == content


def test_a_rewrite_keeps_the_object_form_and_its_other_keys(tmp_path: Path) -> None:
    paths = ld.init_loki_dir(tmp_path)
    form = {"meta": {"owner": "planner"}, "tasks": agent_entries(2), "version": 2}
    paths.pending.write_text(json.dumps(form))
    view, taken = ingested(paths, set())
    mirror_pending(paths, view, ["prd-001", *taken])
    written = json.loads(paths.pending.read_text())
    assert {key: written[key] for key in ("meta", "version")} == {
        "meta": {"owner": "planner"},
        "version": 2,
    }
    assert [entry["id"] for entry in written["tasks"]] == ["prd-001", "bulk-000", "bulk-001"]
