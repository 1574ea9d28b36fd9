"""What an agent left in its git worktree's own `.loki/`, taken into its session.

An agent of a parallel session runs in `<project>/.loki/worktrees/<task>`; its
prompt names the project's `.loki/` by absolute path, but a CLI that may only
write in its working folder (codex's `--sandbox workspace-write`) cannot reach
it and writes the worktree's `.loki/` instead. That folder goes with the
worktree, so before a worktree is removed, what it holds is taken as if written
in the project's (`take_worktree_loki`):

* the new tasks of its `queue/pending.json`, validated as the project's queue
  (`lokidir.ingest_pending`, the same `warning` events, `file` naming the
  worktree's queue), at most `MAX_WORKTREE_TASKS` (there is no next read);
* a completion request in its `signals/` (returned: the caller decides).

The person's controls there (`PAUSE`, `STOP`, `HUMAN_INPUT.md`) are not read.

Two callers: the session's actor after every run in a worktree, whatever its
outcome, and the session manager at start for the worktrees of runs a daemon
crash cut off, before it prunes them (`SessionManager._take_leftover_worktrees`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import sqlite_utils
import trio

from lokid import lokidir
from lokid.events import Level
from lokid.session_records import insert_tasks, runner_tasks

if TYPE_CHECKING:
    from lokid.actors.event_bus import EventBus
    from lokid.actors.store import StoreActor

__all__ = [
    "MAX_WORKTREE_TASKS",
    "WORKTREE_LOKI_WAIT",
    "Warn",
    "add_agent_tasks",
    "take_worktree_loki",
]

WORKTREE_LOKI_WAIT = 30.0
"""Seconds taking a worktree's `.loki/` may take before the worktree is removed anyway."""
MAX_WORKTREE_TASKS = 500
"""New tasks taken from one worktree's `queue/pending.json` (the bound of a PRD's tasks)."""

Warn = Callable[..., Awaitable[None]]
"""`warn(reason, message, **data)`: publish a `warning` of the session."""


async def add_agent_tasks(
    store: StoreActor, bus: EventBus, session_id: str, new: tuple[lokidir.AgentTask, ...]
) -> list[dict[str, Any]]:
    """Insert the tasks an agent added (`source: agent`) that the session does not have
    yet, each with its `task.created`; the tasks inserted."""

    def write(db: sqlite_utils.Database) -> list[dict[str, Any]]:
        # Two reads may offer the same task (the project's queue and a worktree's,
        # or the scheduler's and the mirror's read): the store's ids decide.
        known = {task.id for task in runner_tasks(db, session_id)}
        return insert_tasks(db, session_id, [t for t in new if t.id not in known], source="agent")

    created = await store.write(write)
    for task in created:
        await bus.emit(
            "task.created",
            session_id,
            Level.INFO,
            {"taskId": task["id"], "title": task["title"], "source": "agent"},
        )
    return created


async def take_worktree_loki(
    store: StoreActor,
    bus: EventBus,
    session_id: str,
    tree: Path,
    task_id: str | None,
    warn: Warn,
) -> lokidir.CompletionRequest | None:
    """Take the new tasks of the `.loki/` of the worktree at `tree` (the run's task
    `task_id`) into the session, and consume its completion request: returned.

    The store's refusal (`LokiError`) is the caller's: what is not taken goes with
    the worktree.
    """
    paths = lokidir.LokiPaths.for_project(tree)
    if not await trio.to_thread.run_sync(paths.root.is_dir):
        return None
    concerns = {"file": str(paths.pending)} | ({"taskId": task_id} if task_id else {})
    await _ingest_worktree_tasks(store, bus, session_id, paths, concerns, warn)
    return await trio.to_thread.run_sync(lokidir.consume_completion_request, paths)


async def _ingest_worktree_tasks(
    store: StoreActor,
    bus: EventBus,
    session_id: str,
    paths: lokidir.LokiPaths,
    concerns: Mapping[str, str],
    warn: Warn,
) -> None:
    """The worktree's new tasks, validated as the project's; `concerns` go into each
    `warning` (the queue file, the run's task).

    The worktree's queue starts empty, so an agent numbering its tasks picks ids
    the session may have given other tasks: an id the session knows with the same
    title is that task (written to both queues, or by an earlier attempt) and is
    skipped; with another title it is a new task, taken under an id of its own.
    """
    stored = await store.read(lambda db: runner_tasks(db, session_id))
    titles = {task.id: task.title for task in stored}
    try:
        result, _ = await trio.to_thread.run_sync(
            lambda: lokidir.ingest_pending_file(paths.pending, (), max_new=MAX_WORKTREE_TASKS)
        )
    except lokidir.LokiDirFormatError as exc:
        await warn("malformed_file", exc.message, **concerns)
        return
    # Its last line promises a next read of the rest, which a removed file never gets.
    lines = result.warnings[:-1] if result.deferred else result.warnings
    for line in lines:
        await warn("malformed_file", line, **concerns)
    if result.deferred:
        await warn(
            "malformed_file",
            f"{result.deferred} more new task(s) not taken: at most {MAX_WORKTREE_TASKS} "
            "from a worktree's queue, which is removed with the worktree",
            **concerns,
        )
    new: list[lokidir.AgentTask] = []
    for task in result.tasks:
        if titles.get(task.id, task.title) != task.title:
            own = _worktree_task_id(task)
            await warn(
                "worktree",
                f"task {task.id} ({task.title!r}) has the id of another task of the "
                f"session; it is taken as {own}",
                **concerns,
            )
            task = attrs.evolve(task, id=own)
        if titles.get(task.id) != task.title:
            new.append(task)
    if new:
        await add_agent_tasks(store, bus, session_id, tuple(new))


def _worktree_task_id(task: lokidir.AgentTask) -> str:
    """An id for a worktree's task whose own id the session gave another task: derived
    from both (`agent-<12 hex>`, as for an entry without id), so a later read of the same
    entry maps to the same id and is recognised as taken."""
    digest = hashlib.sha256(f"{task.id}\n{task.title}".encode()).hexdigest()[:12]
    return f"agent-{digest}"
