"""Write a session's state into its `.loki/` folder in the reference formats (blocking I/O).

The store is the source of truth; these files are a mirror for other Loki
tools, the registry and agents (DESIGN.md §6, docs/loki-dir.md). The session
runner calls `write_mirror` from a worker thread after changes, coalesced
(at most one write per `SessionActor` mirror interval), and once more when
the session ends.

Rules:

* Every file is written atomically (`lokidir.atomic_write_bytes`).
* `queue/pending.json` is shared with the agent: it is replaced only if it
  still has the stamp the runner last read (`replace_if_unchanged`) AND the
  runner took in everything that version held (`PendingView.replaceable`).
  A task the agent appended meanwhile, tasks left for the next read (more
  than 50 new ones) and a file the runner could not read are never
  overwritten; the file is read again instead. A rewrite keeps the file's
  form (`{"tasks": [...], ...}` stays an object with its other keys).
* A file whose content would not change is not rewritten (fewer writes,
  and readers polling mtimes see only real changes). The first write of a
  file in a `MirrorState` compares with what is on disk: a session starting
  in a folder that `init_loki_dir` just filled with empty queues leaves
  them alone (`pending.json` too, if it is still the version the runner
  read). A rewrite creates a file (temp file + rename), and on this
  machine kind creating a file costs ~0.5 ms of kernel CPU, a read ~20 us
  (docs/performance.md, "Sessions").
* Writes are atomic but not fsync'd (`durable=False`): after a power loss
  a file may be older than the store, which rewrites it on the next change.

`write_reconciled` is the same write for a session that start-up
reconciliation changed without an actor (the previous daemon was killed
and left the files saying `running`, with its pid and the task it cut off).
"""

from __future__ import annotations

import datetime as dt
import os
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs

from lokid import lokidir as ld
from lokid.session_records import RunnerTask

__all__ = ["MirrorState", "PendingView", "pending_view", "write_mirror", "write_reconciled"]

T = TypeVar("T")


def _time(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _queue_task(task: RunnerTask, project: str) -> ld.QueueTask:
    return ld.QueueTask(
        id=task.id,
        title=task.title,
        description=task.description,
        status=ld.QUEUE_STATUS[task.status],
        priority=ld.queue_priority(task.priority),
        source=task.source,
        project=project,
        acceptance_criteria=task.acceptance,
        created_at=_time(task.created_at),
        started_at=_time(task.started_at),
        completed_at=_time(task.completed_at),
        error=task.error,
    )


@attrs.frozen
class PendingView:
    """What the runner knows of `queue/pending.json`, the file it shares with agents.

    `stamp` is the version it last read or wrote (None: absent). It may replace
    that version only if it took in all of it: `deferred` counts the new tasks
    it left for the next read (over 50 per read, or a resumed session's yet to
    be read), `readable` is False when the file could not be read at all
    (malformed, oversized, half-written). `wrapper` holds the other keys of the
    `{"tasks": [...]}` form, so a rewrite keeps it.
    """

    stamp: ld.FileStamp | None
    deferred: int = 0
    readable: bool = True
    wrapper: dict[str, Any] | None = None

    @property
    def replaceable(self) -> bool:
        """Replacing this version of the file loses nothing the store lacks."""
        return self.readable and self.deferred == 0


class MirrorState:
    """What the last write put into each file (to skip unchanged rewrites)."""

    def __init__(self) -> None:
        self.written: dict[Path, bytes] = {}

    def write(self, path: Path, data: bytes) -> None:
        known = self.written[path] if path in self.written else _on_disk(path, len(data))
        if known != data:
            ld.atomic_write_bytes(path, data, durable=False)
        self.written[path] = data


def _on_disk(path: Path, size: int, stamp: ld.FileStamp | None = None) -> bytes | None:
    """The content of `path` if it is a regular file (not a link) of `size` bytes (and,
    with `stamp`, of that stamp), else None.

    Opened without following a link and without blocking (a FIFO planted there
    must not hang the mirror); anything but a plain file of that size is
    rewritten.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size != size:
            return None
        if stamp is not None and ld.FileStamp.of(info) != stamp:
            return None
        return os.read(fd, size + 1)
    except OSError:
        return None
    finally:
        os.close(fd)


def write_mirror(
    paths: ld.LokiPaths,
    session: Mapping[str, Any],
    tasks: Sequence[RunnerTask],
    *,
    pending: PendingView,
    pid: int,
    version: str,
    retries: int,
    last_exit_code: int,
    state: MirrorState,
) -> PendingView:
    """Write orchestrator, autonomy state, queues and the current task.

    Returns what the runner now knows of `pending.json`: `pending` with the
    stamp of this write (for the next ingest to know the file is ours), or
    `pending` unchanged when the file was left alone - not all of it taken in,
    or someone wrote it after that stamp was taken (it must be read again).
    When it is left alone and no task is active (the session ended, or was
    reconciled after a crash), `in-progress.json` and `current-task.json`
    are left alone too: the task a stop or a crash cut off (back to `pending`
    in the store) stays in the file that had it, instead of vanishing from
    every queue file until `pending.json` can be rewritten (on resume).
    Raises `LokiDirWriteError` when a write fails.
    """
    project = Path(session["projectDir"]).name
    by_status: dict[str, list[ld.QueueTask]] = {status: [] for status in ld.QUEUE_FOR_STATUS}
    for task in tasks:
        by_status[task.status].append(_queue_task(task, project))
    active = by_status["active"]
    phase = session["phase"] or "bootstrap"
    status = session["status"]
    if status in ("completed", "failed"):
        phase = status
    state.write(
        paths.orchestrator,
        ld.encode_orchestrator(
            ld.OrchestratorState(
                current_phase=ld.orchestrator_phase(phase),
                version=f"lokid {version}",
                started_at=_time(session["startedAt"]) or _time(session["createdAt"]),
                tasks_completed=len(by_status["completed"]),
                tasks_failed=len(by_status["failed"]),
                retries=retries,
                current_task=active[0].id if active else None,
                iteration=session["iteration"],
                extra={"sessionId": session["id"], "status": status},
            )
        ),
    )
    state.write(
        paths.autonomy_state,
        ld.encode_autonomy_state(
            ld.AutonomyState(
                status=ld.autonomy_status(status, session["exitReason"]),
                iteration_count=session["iteration"],
                retry_count=retries,
                last_exit_code=last_exit_code,
                last_run=_time(session["updatedAt"]),
                prd_path=session["prd"],
                pid=pid,
                max_retries=session["options"].get("maxIterations"),
                extra={"sessionId": session["id"]},
            )
        ),
    )
    keep_cut_off = not pending.replaceable and not active  # see the docstring
    for status_name in ("completed", "failed", *(() if keep_cut_off else ("active",))):
        state.write(
            paths.queue(ld.QUEUE_FOR_STATUS[status_name]),
            ld.encode_queue(by_status[status_name]),
        )
    if not keep_cut_off:
        state.write(paths.current_task, ld.encode_current_task(active[0] if active else None))
    return _write_pending(paths.pending, by_status["pending"], pending, state)


def _write_pending(
    path: Path, tasks: Iterable[ld.QueueTask], seen: PendingView, state: MirrorState
) -> PendingView:
    """Replace `pending.json` if that loses nothing; what the caller knows of it now."""
    if not seen.replaceable:
        return seen  # tasks or bytes the store lacks: left for the next read
    data = ld.encode_queue(tasks, seen.wrapper)
    if state.written.get(path) == data:
        return seen  # nothing to write: what the caller saw is still what it saw
    # The first write: the version the caller took in may hold these bytes already
    # (the empty queue `init_loki_dir` made): then it stays, no new file.
    if (
        path not in state.written
        and seen.stamp is not None
        and _on_disk(path, len(data), seen.stamp) == data
    ):
        state.written[path] = data
        return seen
    if not ld.replace_if_unchanged(path, data, seen.stamp, durable=False):
        return seen  # someone wrote it: the caller's stamp is stale, it reads again
    state.written[path] = data
    return attrs.evolve(seen, stamp=ld.file_stamp(path))


def write_reconciled(
    session: Mapping[str, Any], tasks: Sequence[RunnerTask], *, pid: int, version: str
) -> bool:
    """Rewrite a reconciled session's `.loki/` files from the store; False if left alone.

    Left alone: `.loki/` does not exist (the session never got that far), or
    `state/orchestrator.json` names another session (another run took the
    folder since). `pending.json` is replaced only if it holds nothing the
    store lacks: tasks a killed agent appended are left for the runner to
    take on resume; then `in-progress.json` and `current-task.json` keep the
    task the crash cut off (`write_mirror`). The counters only the dead runner knew
    (retries, last exit code) are carried over from its files. Raises
    `LokiDirWriteError` when the project folder is gone or a write fails.
    """
    paths = ld.LokiPaths.for_project(session["projectDir"])
    if not paths.project.is_dir():
        raise ld.LokiDirWriteError(paths.project, "the project folder is gone")
    if not paths.root.is_dir():
        return False
    orchestrator = _readable(ld.read_orchestrator, paths.orchestrator)
    if orchestrator is not None and orchestrator.extra.get("sessionId") not in (
        None,
        session["id"],
    ):
        return False
    autonomy = _readable(ld.read_autonomy_state, paths.autonomy_state)
    pending = pending_view(paths.pending, {task.id for task in tasks})
    write_mirror(
        paths,
        session,
        tasks,
        pending=pending,
        pid=pid,
        version=version,
        retries=orchestrator.retries if orchestrator is not None else 0,
        last_exit_code=autonomy.last_exit_code if autonomy is not None else 0,
        state=MirrorState(),
    )
    return True


def _readable(read: Callable[[Path], T | None], path: Path) -> T | None:
    """What `read` makes of the file; None if it is absent or unusable (it is rewritten)."""
    try:
        return read(path)
    except ld.LokiDirFormatError:
        return None


def pending_view(path: Path, known_ids: set[str]) -> PendingView:
    """`pending.json` for a last rewrite that takes nothing in (a session that ended, or
    was reconciled): replaceable only if it could be read and holds no task the store
    lacks - those an agent appended are left for the runner to take on resume."""
    try:
        result, stamp = ld.ingest_pending_file(path, known_ids)
    except ld.LokiDirFormatError:
        return PendingView(ld.file_stamp(path), readable=False)
    return PendingView(stamp, deferred=len(result.tasks) + result.deferred, wrapper=result.wrapper)
