"""SessionManager: creates sessions, routes commands to them, reconciles them at start.

It owns the **session supervisor** (`one_for_one`, `forget_finished`): one
transient child per live session, running a `SessionActor`. A session actor
that crashes is restarted and continues from the store; after
`MAX_SESSION_CRASHES` crashes of one session the session is failed
(`exitReason: runnerCrashed`) instead of crashing again. A crash with
`StoreUnavailable` (the store refuses writes; the runner normally holds
instead) is not counted: the actor is restarted once the store is writable
again (waiting at most `UNWRITABLE_RESTART_WAIT` s). Failing a session here
(`_fail_offline`) never raises the store's errors into the manager: it is
logged and retried with backoff until the store takes it.

Theory of operation:

* **Create** (`create`): validate the request off the trio loop (it reads
  the PRD and looks CLIs up), insert the `starting` session - and, with an
  `Idempotency-Key`, the answer - in one transaction, write an inline PRD,
  start its actor. The answer is `{id, status: "starting", createdAt}`.
* **Commands** (`command`): a live session's actor gets the message in its
  mailbox and answers after its transition is stored. A session without an
  actor (interrupted or finished) is handled here against the store, which
  serialises concurrent requests: `resume` of an interrupted session marks
  it `running` (409 if its `projectDir` is taken meanwhile) and starts its
  actor; `stop` of an interrupted session marks it `stopped`; anything else
  is refused by the state machine (409 with `details.status`).
* **Delete** (`delete`): the store refuses an active session (409); a
  session whose actor is just finishing is waited for (bounded).
* **Start-up reconciliation** (`setup`, after the agent pool killed what a
  previous daemon left): every active session is fired `daemon_restart`
  (`starting`/`running` -> `interrupted`, `stopping` -> `stopped`, `paused`
  stays `paused`), its active tasks go back to `pending`, and its `.loki/`
  files are rewritten from the store (a killed daemon left them saying
  `running`; a folder that is gone or unwritable is a `warning`), and the
  git worktrees and branches of a parallel session's cut-off runs are
  removed (`worktree.prune_worktrees`; a failure is a `warning`), once what
  their agents left in each worktree's own `.loki/` is taken, before the
  transition (`_take_leftover_worktrees`). Paused
  sessions get their actor again (so resume, stop and input work); with
  `resume_on_start` the sessions active when the last daemon ended are
  resumed (interrupted by its graceful stop, or here after a crash), not
  one interrupted by an earlier stop and left so (one whose `projectDir` is
  taken meanwhile is left interrupted, with a log line).
* **Shutdown**: `wind_down`, called by the daemon the moment its stop begins
  (before the listeners drain), tells every live actor to wind down at once
  (their agents stop in parallel; no session starts another agent run) and
  refuses new sessions and resumes (503) from then on; an actor started or
  restarted meanwhile is told at once. When the supervisor tree reaches the
  manager, the same is done again (a manager stopped on its own, e.g. by a
  `rest_for_one` restart), then the session supervisor stops them in order.

Mailbox: like the agent pool, the API is methods called from request
handlers (`create`, `command`, `delete`, `summary`); each command still
reaches its session through that session's mailbox. `mailbox_size = 1`,
`WhenFull.REJECT`, unused.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import attrs
import sqlite_utils
import trio

from lokid import __version__, idempotency, lokidir, worktree
from lokid.actor import Actor, ActorStatistics, WhenFull, exception_leaves
from lokid.actors.agent_pool import AgentPool
from lokid.actors.event_bus import EventBus
from lokid.actors.session import (
    Input,
    Pause,
    Resume,
    RunnerSettings,
    SessionActor,
    Stop,
    undelivered_inputs_warning,
)
from lokid.actors.store import StoreActor, StoreUnavailable
from lokid.agent_host import EndReason
from lokid.errors import ActorError, Conflict, LokiError, Unavailable
from lokid.events import Level
from lokid.loki_mirror import write_reconciled
from lokid.session_records import (
    SessionRequest,
    active_session_ids,
    agents_without_end,
    delete_session,
    get_session,
    get_session_fields,
    insert_session,
    interrupted_by_last_stop,
    parse_session_request,
    requeue_active_tasks,
    runner_tasks,
    session_counts,
    update_session,
)
from lokid.session_state import EVENT_FOR, Status, Trigger, is_active, step
from lokid.supervisor import ChildSpec, Restart, Strategy, Supervisor, SupervisorStatistics
from lokid.timefmt import utc_now_iso
from lokid.worktree_loki import WORKTREE_LOKI_WAIT, take_worktree_loki

log = logging.getLogger("lokid.sessions")

CREATE_ROUTE = "POST /api/sessions"
INPUT_ROUTE = "POST /api/sessions/{id}/input"  # keys are scoped to the session: {id} filled in
CUT_OFF_BY_RESTART = "run cut off: daemon restart"  # a task's error, an agent's end
MAX_SESSION_CRASHES = 3
COMMAND_TIMEOUT = 30.0
FINISH_WAIT_SECONDS = 10.0
FAIL_RETRY_FIRST = 0.5  # seconds before `_fail_offline` tries again; doubles up to the cap
FAIL_RETRY_CAP = 30.0
UNWRITABLE_RESTART_WAIT = 60.0  # a StoreUnavailable crash: wait this long for writable, at most
STORE_POLL = 0.5  # seconds between two looks at `store.writable`

Command = Pause | Resume | Stop | Input

_TRIGGER = {Pause: Trigger.PAUSE, Resume: Trigger.RESUME, Stop: Trigger.STOP, Input: Trigger.INPUT}


@attrs.frozen
class SessionManagerStatistics(ActorStatistics):
    live: int
    created: int
    reconciled: int
    session_crashes: int
    supervisor: SupervisorStatistics


class SessionManager(Actor[Any]):
    """See the module docstring. Bounds: at most `max_sessions` live session actors
    (`TooManyChildren` -> 503 at create)."""

    mailbox_size: ClassVar[int] = 1
    when_full: ClassVar[WhenFull] = WhenFull.REJECT

    def __init__(
        self,
        store: StoreActor,
        bus: EventBus,
        pool: AgentPool,
        *,
        settings: RunnerSettings,
        default_provider: str,
        max_sessions: int = 1000,
        resume_on_start: bool = False,
        which: Callable[[str], str | None] = shutil.which,
        name: str = "sessions",
    ) -> None:
        super().__init__(name)
        self.store = store
        self.bus = bus
        self.pool = pool
        self.settings = settings
        self.default_provider = default_provider
        self.max_sessions = max_sessions
        self.resume_on_start = resume_on_start
        self.which = which
        self.supervisor = self._new_supervisor()
        self._live: dict[str, SessionActor] = {}
        self._initial: dict[str, dict[str, Any]] = {}
        self._session_crashes: dict[str, int] = {}
        self._finished_events: dict[str, trio.Event] = {}
        self._reserved = 0  # places held by creates and resumes not started yet
        self._to_restore: list[str] = []
        self._to_resume: list[str] = []
        self._background: trio.Nursery | None = None  # retries of `_fail_offline`
        self._winding_down = False  # the daemon is stopping: one way, never reset
        self._created = 0
        self._reconciled = 0
        self._crash_total = 0

    def _new_supervisor(self) -> Supervisor:
        return Supervisor(
            "session_supervisor",
            strategy=Strategy.ONE_FOR_ONE,
            max_restarts=10,
            period=60.0,
            max_children=self.max_sessions,
            forget_finished=True,
        )

    # -- lifecycle --------------------------------------------------------------------

    async def setup(self) -> None:
        self.supervisor = self._new_supervisor()
        self._live.clear()
        self._to_restore, self._to_resume = await self._reconcile()

    async def _reconcile(self) -> tuple[list[str], list[str]]:
        """Fire `daemon_restart` on every active session; (paused to restore, to resume).

        To resume (`resume_on_start`): the sessions that were active when the last
        daemon ended - those its graceful stop interrupted, and those turned
        `interrupted` here (it died) - oldest first; not one interrupted by an
        earlier stop and left so, which would take the folder of the one running then.
        """
        restore: list[str] = []
        resume = await self.store.read(interrupted_by_last_stop) if self.resume_on_start else []
        for session_id, status_text in await self.store.read(active_session_ids):
            status = Status(status_text)
            transition = step(status, Trigger.DAEMON_RESTART)
            fields: dict[str, Any] = {"status": transition.after.value}
            if transition.after is Status.STOPPED:
                fields["ended_at"] = utc_now_iso()
                fields["exit_reason"] = "stopped"

            def write(
                db: sqlite_utils.Database, sid: str = session_id, values: dict[str, Any] = fields
            ) -> None:
                requeue_active_tasks(db, sid, CUT_OFF_BY_RESTART)
                update_session(db, sid, **values)

            await self._end_cut_off_agents(session_id)
            await self._warn_requeued_inputs(session_id)
            await self._take_leftover_worktrees(session_id, transition.after)
            await self.store.write(write)
            self._reconciled += 1
            if transition.event is not None:
                data: dict[str, Any] = {
                    "status": transition.after.value,
                    "reason": "daemon restart",
                }
                level = Level.WARNING  # session.interrupted
                if transition.event == "session.stopped":  # a stop the crash cut short
                    data.update(source="daemon restart", survivors=self._survivors_of(session_id))
                    level = Level.INFO
                    await self._warn_undelivered_inputs(session_id)
                await self.bus.publish(transition.event, session_id, level, data)
            await self._rewrite_loki_dir(session_id)
            await self._prune_worktrees(session_id)
            if transition.after is Status.PAUSED:
                restore.append(session_id)
            elif transition.after is Status.INTERRUPTED and self.resume_on_start:
                resume.append(session_id)
        return restore, resume

    async def _end_cut_off_agents(self, session_id: str) -> None:
        """`agent.failed` for each agent process of the session that the crash left
        without an end (every `agent.spawned` gets one), before the session's own event.

        The pool's reconciliation (run before this) killed what was still alive and
        closed the rows; the dead daemon never published their ends. Published before
        the session's transition is stored, so a crash in between repeats none: the
        next start looks at the events again.
        """
        survivors = {
            f"agent-{outcome.row_id}": list(outcome.survivors)
            for outcome in self.pool.last_reconcile
            if outcome.session_id == session_id
        }
        for spawned in await self.store.read(lambda db: agents_without_end(db, session_id)):
            agent_id = spawned.get("agentId")
            await self.bus.publish(
                "agent.failed",
                session_id,
                Level.WARNING,
                {
                    "agentId": agent_id,
                    "kind": "process",
                    "taskId": spawned.get("taskId"),
                    "exitCode": None,  # not seen: the daemon that waited for it was gone
                    "endReason": EndReason.STOPPED.value,
                    "summary": None,
                    "costUsd": None,
                    "survivors": survivors.get(str(agent_id), []),
                    "code": "stopped",
                    "error": CUT_OFF_BY_RESTART,
                },
            )

    async def _warn_requeued_inputs(self, session_id: str) -> None:
        """A `warning` `input_requeued` for inputs whose `input.applied` the dead daemon
        published for an agent that never ran (it died between recording the agent's
        start and letting it run): the pool's reconciliation queued them again, and
        the `input.applied` of the prompt that takes them next is the one that counts."""
        requeued = [
            input_id
            for outcome in self.pool.last_reconcile
            if outcome.session_id == session_id
            for input_id in outcome.requeued_inputs
        ]
        if requeued:
            await self.bus.publish(
                "warning",
                session_id,
                Level.WARNING,
                {
                    "reason": "input_requeued",
                    "message": f"{len(requeued)} input(s) announced applied reached no agent:"
                    " the daemon stopped before the agent started; they go into the next prompt",
                    "inputIds": requeued,
                },
            )

    def _survivors_of(self, session_id: str) -> list[int]:
        """Pids of the session's agents that this start's kill left alive (none expected)."""
        return sorted(
            pid
            for outcome in self.pool.last_reconcile
            if outcome.session_id == session_id
            for pid in outcome.survivors
        )

    async def _rewrite_loki_dir(self, session_id: str) -> None:
        """Make a reconciled session's `.loki/` files say what the store now says: a
        killed daemon left them `running`, with its pid and the task it cut off. A
        project folder that is gone or unwritable is a `warning`, never a crash."""
        session, tasks = await self.store.read(
            lambda db: (get_session(db, session_id), runner_tasks(db, session_id))
        )
        write = functools.partial(
            write_reconciled, session, tasks, pid=os.getpid(), version=__version__
        )
        try:
            await trio.to_thread.run_sync(write)
        except (LokiError, OSError) as exc:
            message = f".loki/ not updated after the restart: {exc}"
            log.warning("session %s: %s", session_id, message)
            await self.bus.publish(
                "warning", session_id, Level.WARNING, {"reason": "loki_dir", "message": message}
            )

    async def _take_leftover_worktrees(self, session_id: str, after: Status) -> None:
        """Take what the cut-off agents of a parallel session left in their worktrees'
        own `.loki/` (`lokid.worktree_loki`, as after a run) before `_prune_worktrees`
        removes them: their new tasks, and a completion request, which goes to the
        project's `signals/` for the actor that runs the session next (none for one
        that ends `stopped`: a stop wins over a completion, as in the runner).

        Before the transition is stored, so a start killed halfway takes them again
        (the worktrees are still there; a task taken is recognised). Each worktree
        gets at most `WORKTREE_LOKI_WAIT` s; a failure is logged, never a crash.
        """
        session, tasks = await self.store.read(
            lambda db: (get_session(db, session_id), runner_tasks(db, session_id))
        )
        if not session["options"].get("parallel"):
            return
        project = Path(session["projectDir"])
        by_folder = {worktree.ref_component(task.id): task.id for task in tasks}
        try:
            trees = await worktree.session_worktrees(project, session_id)
        except LokiError as exc:  # _prune_worktrees meets it again and warns
            log.warning("session %s: worktrees not listed: %s", session_id, exc.message)
            return

        async def warn(reason: str, message: str, **data: Any) -> None:
            data = {"reason": reason, "message": message, **data}
            await self.bus.publish("warning", session_id, Level.WARNING, data)

        for tree in trees:
            with trio.move_on_after(WORKTREE_LOKI_WAIT):
                try:
                    request = await take_worktree_loki(
                        self.store, self.bus, session_id, tree, by_folder.get(tree.name), warn
                    )
                    if request is not None and after is not Status.STOPPED:
                        paths = lokidir.LokiPaths.for_project(project)
                        await trio.to_thread.run_sync(_forward_completion, paths, request)
                except (LokiError, OSError) as exc:
                    log.warning("session %s: %s's .loki/ not taken: %s", session_id, tree, exc)

    async def _prune_worktrees(self, session_id: str) -> None:
        """Remove the worktrees and branches a killed daemon left for a parallel session.

        Its runs were cut off (their tasks are `pending` again, and a rerun gets a
        new worktree), and its agents were killed before this, so nothing uses
        them. Done before any session runs again, so it never races a new run of
        the same session. A failure is a `warning`, never a crash."""
        session = await self.store.read(lambda db: get_session(db, session_id))
        if not session["options"].get("parallel"):
            return
        try:
            removed = await worktree.prune_worktrees(Path(session["projectDir"]), session_id)
        except LokiError as exc:
            message = f"worktrees of the cut-off runs not removed: {exc.message}"
            log.warning("session %s: %s", session_id, message)
            await self.bus.publish(
                "warning", session_id, Level.WARNING, {"reason": "worktree", "message": message}
            )
            return
        if removed:
            log.info("session %s: removed %d leftover worktree(s)/branch(es)", session_id, removed)

    async def serve(self) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.supervisor.run)
            async with trio.open_nursery() as self._background:
                for session_id in self._to_restore:
                    try:
                        await self._start_actor(session_id)
                    except Unavailable as exc:
                        log.error("paused session %s has no actor: %s", session_id, exc)
                for session_id in self._to_resume:
                    try:
                        await self._offline(session_id, Resume(), source="LOKI_RESUME_ON_START")
                    except LokiError as exc:
                        log.warning("could not resume %s at start: %s", session_id, exc)
                while await self.next_message() is not None:
                    pass  # no messages: the API is methods
                self._background.cancel_scope.cancel()  # a failure still unrecorded: reconciled
            self._background = None
            for actor in list(self._live.values()):
                actor.on_stop_requested()
            self.supervisor.request_stop()

    def wind_down(self) -> None:
        """The daemon is stopping: no session starts another agent run from now on.

        Called when the stop begins, not when the supervisor tree reaches this
        actor (after the listeners, which may drain for most of `shutdown_grace`):
        every live session ends its runs now (agents get SIGTERM, `agent_grace`,
        SIGKILL) and ends `interrupted`; new sessions and resumes are refused.
        Synchronous, so a second signal cannot cut it short.
        """
        self._winding_down = True
        for actor in list(self._live.values()):
            actor.on_stop_requested()

    def _refuse_if_winding_down(self) -> None:
        if self._winding_down:
            raise Unavailable("lokid is stopping: no new session runs")

    # -- create --------------------------------------------------------------------------

    async def create(
        self, body: Mapping[str, Any], *, idempotency_key: idempotency.Key | None = None
    ) -> tuple[int, dict[str, Any]]:
        """`POST /api/sessions`: (201, `{id, status, createdAt}`), or a remembered answer."""
        if not self.running:
            raise Unavailable("the session manager is not running")
        self._refuse_if_winding_down()

        reserved = False

        async def prepare() -> SessionRequest:  # (a retry got its first answer before this)
            nonlocal reserved
            self._reserve_slot()
            reserved = True
            return await trio.to_thread.run_sync(
                functools.partial(
                    parse_session_request,
                    body,
                    default_provider=self.default_provider,
                    which=self.which,
                )
            )

        def insert(db: sqlite_utils.Database, request: SessionRequest) -> dict[str, Any]:
            session = insert_session(db, request)
            self._initial[session["id"]] = session
            return {
                "id": session["id"],
                "status": session["status"],
                "createdAt": session["createdAt"],
            }

        try:
            outcome = await idempotency.create_once(
                self.store, CREATE_ROUTE, body, idempotency_key, prepare, insert
            )
            status, answer = outcome.status, outcome.answer
            if outcome.created:
                await self._start_created(outcome.prepared, answer["id"])
        finally:
            if reserved:  # the child holds its place now, or there is none
                self._release_slot()
        return status, answer

    async def _start_created(self, request: SessionRequest, session_id: str) -> None:
        """Write a created session's inline PRD and start its actor (a slot is reserved)."""
        self._created += 1
        if request.prd_text is not None:
            try:
                await trio.to_thread.run_sync(_write_inline_prd, request)
            except LokiError as exc:
                self._initial.pop(session_id, None)
                await self._fail_offline(
                    session_id, "bootstrapFailed", exc.message, in_request=True
                )
                return
        try:
            await self._start_actor(session_id)
        except Unavailable as exc:  # recorded, but it cannot run: say so on the session
            await self._fail_offline(session_id, "runnerUnavailable", exc.message, in_request=True)
            raise

    def _check_capacity(self) -> None:
        """503 unless a session may start: live children and reserved places count (a
        child being started counts twice for those few ticks: it errs toward a 503)."""
        if self.supervisor.count_children().specs + self._reserved >= self.max_sessions:
            raise Unavailable(
                f"{self.max_sessions} sessions are live (max_sessions); "
                "try again when one has ended",
                details={"maxSessions": self.max_sessions},
            )

    def _reserve_slot(self) -> None:
        """Check the capacity and hold a place for a session about to be stored and
        started, in one step (no checkpoint): concurrent creates each see the others'
        places, so one over the cap is refused before anything of it is stored. The
        caller releases it (`_release_slot`) once the child is started or not."""
        self._check_capacity()
        self._reserved += 1

    def _release_slot(self) -> None:
        self._reserved -= 1

    async def _start_actor(self, session_id: str) -> None:
        spec = ChildSpec(
            session_id,
            functools.partial(self._run_session, session_id),
            Restart.TRANSIENT,
            shutdown=self.settings.grace + 20.0,
            traps_shutdown=True,
        )
        try:
            await self.supervisor.start_child(spec)
        except LokiError as exc:
            self._initial.pop(session_id, None)
            raise Unavailable(f"could not start session {session_id}: {exc.message}") from None

    async def _run_session(self, session_id: str, *, task_status: Any) -> None:
        session = self._initial.pop(session_id, None)
        if session is None:
            session = await self.store.read(lambda db: get_session(db, session_id))
        stopping: trio.Event | None = getattr(task_status, "shutdown_requested", None)
        if self._session_crashes.get(session_id, 0) >= MAX_SESSION_CRASHES:
            task_status.started(None)
            await self._fail_offline(
                session_id, "runnerCrashed", "the session runner crashed", stop=stopping
            )
            return
        actor = SessionActor(
            session,
            store=self.store,
            bus=self.bus,
            pool=self.pool,
            settings=self.settings,
            on_finished=self._forget,
        )
        self._live[session_id] = actor
        if self._winding_down:  # started (or restarted) after the daemon's stop began
            actor.on_stop_requested()
        self._finished_events[session_id] = trio.Event()
        crash: Exception | None = None
        try:
            await actor.run(task_status=task_status)
        except Exception as exc:
            crash = exc
        finally:
            self._forget(actor)
            event = self._finished_events.pop(session_id, None)
            if event is not None:
                event.set()
        if crash is None:
            return
        if _store_refused(crash):
            # Not the runner's fault, and a restart now would only meet it again.
            log.warning(
                "session %s stopped, the store is not writable (%s); it is restarted once "
                "the store takes writes (not counted as a crash)",
                session_id,
                crash,
            )
            await self._until_writable(stopping)
        else:
            self._session_crashes[session_id] = self._session_crashes.get(session_id, 0) + 1
            self._crash_total += 1
            log.error("session %s crashed", session_id, exc_info=crash)
        raise crash

    async def _until_writable(self, stopping: trio.Event | None) -> None:
        """Until `store.writable`, a shutdown, or `UNWRITABLE_RESTART_WAIT` s."""
        stop = stopping or trio.Event()
        with trio.move_on_after(UNWRITABLE_RESTART_WAIT):
            while not self.store.writable and not stop.is_set():
                with trio.move_on_after(STORE_POLL):  # no event for "writable again"
                    await stop.wait()

    def _forget(self, actor: SessionActor) -> None:
        if self._live.get(actor.id) is actor:
            del self._live[actor.id]

    # -- commands -----------------------------------------------------------------------

    async def command(self, session_id: str, message: Command) -> dict[str, Any]:
        """Pause / resume / stop / input: the answer of the session's actor, or of the store."""
        actor = self._live.get(session_id)
        if actor is not None:
            answer: dict[str, Any] = await actor.ask(message, timeout=COMMAND_TIMEOUT)
            return answer
        return await self._offline(session_id, message, source="api")

    async def add_input(
        self, session_id: str, message: str, *, idempotency_key: idempotency.Key | None = None
    ) -> dict[str, Any]:
        """`POST /api/sessions/{id}/input`: the queued input, or the remembered answer.

        A retry (same key and message) is answered from the store before the
        session's status is looked at: the session may have ended since. The
        first answer is stored by the actor, in the write that queues the input.
        """
        route = INPUT_ROUTE.replace("{id}", session_id)
        once = idempotency.Once.of(route, idempotency_key, {"message": message})
        if once is not None:
            first = await self.store.read(
                lambda db: idempotency.lookup_only(db, once.route, once.key, once.digest)
            )
            if first is not None:
                remembered: dict[str, Any] = first.body
                return remembered
        return await self.command(session_id, Input(message, once=once))

    async def _offline(self, session_id: str, message: Command, *, source: str) -> dict[str, Any]:
        trigger = _TRIGGER[type(message)]
        session = await self.store.read(lambda db: get_session(db, session_id))
        status = Status(session["status"])
        transition = step(status, trigger)  # 409 for every illegal pair
        if is_active(status):
            # Active without an actor: it is being started or finishing right now.
            raise Unavailable(f"session {session_id} is changing state; retry")
        if transition.after is not Status.RUNNING:
            return await self._apply_offline(session_id, trigger, status, transition.after, source)
        self._refuse_if_winding_down()
        self._reserve_slot()  # the resume's actor has its place before the store says running
        try:
            return await self._apply_offline(session_id, trigger, status, transition.after, source)
        finally:
            self._release_slot()

    async def _apply_offline(
        self, session_id: str, trigger: Trigger, status: Status, after: Status, source: str
    ) -> dict[str, Any]:
        """`_offline`'s change, once allowed: stored, announced, and a resume's actor started."""
        fields: dict[str, Any] = {"status": after.value}
        if after is Status.STOPPED:
            fields.update(ended_at=utc_now_iso(), exit_reason="stopped")

        def write(db: sqlite_utils.Database) -> dict[str, Any]:
            current = Status(get_session(db, session_id)["status"])
            step(current, trigger)  # the store decides between concurrent requests
            return update_session(db, session_id, **fields)

        session = await self.store.write(write)
        event = EVENT_FOR.get((status, after))
        if event is not None:
            data: dict[str, Any] = {"status": after.value, "source": source}
            if event == "session.stopped":
                data["survivors"] = []  # an interrupted session has no process left to kill
                await self._warn_undelivered_inputs(session_id)
            await self.bus.publish(event, session_id, Level.INFO, data)
        if after is Status.RUNNING:
            try:
                await self._start_actor(session_id)
            except Unavailable as exc:  # back to where it was: the resume did not happen
                await self.store.write(
                    lambda db: update_session(db, session_id, status=status.value)
                )
                await self.bus.publish(
                    "session.interrupted",
                    session_id,
                    Level.WARNING,
                    {"status": status.value, "reason": exc.message},
                )
                raise
        return session

    async def _fail_offline(
        self,
        session_id: str,
        reason: str,
        detail: str,
        *,
        stop: trio.Event | None = None,
        in_request: bool = False,
    ) -> None:
        """Record a session without an actor `failed`, with its `session.failed`.

        Never raises the store's errors: while the store refuses, it logs and
        tries again after `FAIL_RETRY_FIRST` s, doubling up to `FAIL_RETRY_CAP`,
        until the store takes it or `stop` is set. A request handler
        (`in_request`) tries once and leaves the retries to the manager's task.
        """
        delay = FAIL_RETRY_FIRST
        while not await self._try_fail_offline(session_id, reason, detail, delay):
            if in_request:
                if self._background is not None:
                    self._background.start_soon(
                        self._fail_offline_later, session_id, reason, detail
                    )
                return
            if stop is None:
                await trio.sleep(delay)
            else:
                with trio.move_on_after(delay):
                    await stop.wait()
                if stop.is_set():
                    log.warning("session %s: not recorded failed before shutdown", session_id)
                    return
            delay = min(2 * delay, FAIL_RETRY_CAP)

    async def _fail_offline_later(self, session_id: str, reason: str, detail: str) -> None:
        await trio.sleep(FAIL_RETRY_FIRST)
        await self._fail_offline(session_id, reason, detail)

    async def _try_fail_offline(
        self, session_id: str, reason: str, detail: str, retry_in: float
    ) -> bool:
        """One try of `_fail_offline`; False if the store refused it for now."""

        def write(db: sqlite_utils.Database) -> None:
            requeue_active_tasks(db, session_id, f"run cut off: {reason}")
            update_session(
                db,
                session_id,
                status=Status.FAILED.value,
                ended_at=utc_now_iso(),
                exit_reason=reason,
                last_error=detail,
            )

        # The change, its event and the warning about inputs it leaves undelivered in one
        # transaction: a retry repeats none of them, and the warning comes before the end,
        # as for every other end.
        try:
            warning = await self.store.read(lambda db: undelivered_inputs_warning(db, session_id))
            await self.bus.publish_with(
                write,
                "session.failed",
                session_id,
                Level.ERROR,
                {"status": "failed", "exitReason": reason, "detail": detail},
                before=[] if warning is None else [("warning", session_id, Level.WARNING, warning)],
            )
        except (Unavailable, ActorError) as exc:
            log.warning(
                "session %s: could not record it failed (%s): %s; trying again in %g s",
                session_id,
                reason,
                exc,
                retry_in,
            )
            return False
        except LokiError as exc:  # not the store's state: trying again would not help
            log.error("session %s: could not record it failed (%s): %s", session_id, reason, exc)
        return True

    async def _warn_undelivered_inputs(self, session_id: str) -> None:
        """The `warning` `input_undelivered` of a session without an actor that ends for
        good here (the actor says it itself otherwise): before its end is announced (a
        failure stores it in its end's transaction: `_try_fail_offline`)."""
        warning = await self.store.read(lambda db: undelivered_inputs_warning(db, session_id))
        if warning is not None:
            await self.bus.publish("warning", session_id, Level.WARNING, warning)

    async def delete(self, session_id: str) -> None:
        """`DELETE /api/sessions/{id}`: 404, 409 while active, else the record goes.

        Whether it is active is what the store says (what `GET` shows): an actor's
        status changes only once its transition's commit is answered, so in between
        it would contradict the store. An actor whose end is stored is waited for
        (bounded) while it finishes.
        """
        actor = self._live.get(session_id)
        if actor is not None:
            stored = await self.store.read(
                lambda db: Status(get_session_fields(db, session_id)["status"])
            )
            step(stored, Trigger.DELETE)  # the 409 while active, with the stored status
            event = self._finished_events.get(session_id)
            if event is not None:
                with trio.move_on_after(FINISH_WAIT_SECONDS):
                    await event.wait()
            if session_id in self._live:
                raise Conflict(f"session {session_id} is finishing; retry in a moment")
        # The tail goes with the rows, in commit order: a replay must not resurrect them.
        await self.store.write(
            lambda db: delete_session(db, session_id),
            on_commit=lambda _: self.bus.forget_session(session_id),
        )

    # -- what /api/status reads --------------------------------------------------------

    def current(self) -> SessionActor | None:
        """The most recently started active session with an actor, if any."""
        active = [actor for actor in self._live.values() if is_active(actor.status)]
        if not active:
            return None
        return max(active, key=lambda actor: (actor.started_at or "", actor.created_at))

    async def counts(self) -> dict[str, int]:
        return await self.store.read(session_counts)

    @property
    def live(self) -> int:
        return len(self._live)

    def statistics(self) -> SessionManagerStatistics:
        base = super().statistics()
        return SessionManagerStatistics(
            **attrs.asdict(base, recurse=False),
            live=len(self._live),
            created=self._created,
            reconciled=self._reconciled,
            session_crashes=self._crash_total,
            supervisor=self.supervisor.statistics(),
        )


def _write_inline_prd(request: SessionRequest) -> None:
    assert request.prd_text is not None
    lokidir.init_loki_dir(request.project_dir)
    lokidir.atomic_write_bytes(request.prd_path, request.prd_text.encode("utf-8"))


def _forward_completion(paths: lokidir.LokiPaths, request: lokidir.CompletionRequest) -> None:
    """Write a worktree's completion request as the project's `COMPLETION_REQUESTED`
    (its text is the statement), unless the project has one already."""
    if os.path.lexists(paths.completion_requested):
        return
    paths.completion_requested.parent.mkdir(parents=True, exist_ok=True)
    lokidir.atomic_write_bytes(paths.completion_requested, (request.statement or "").encode())


def _store_refused(exc: BaseException) -> bool:
    """`exc` is `StoreUnavailable`, or a group of nothing else."""
    if isinstance(exc, BaseExceptionGroup):
        return all(isinstance(leaf, StoreUnavailable) for leaf in exception_leaves(exc))
    return isinstance(exc, StoreUnavailable)
