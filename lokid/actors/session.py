"""SessionActor: one session's run over its PRD (DESIGN.md §6), and its controls.

One actor per live session, a transient child of the session supervisor
(`lokid.actors.session_manager`). Its task runs two things side by side:
the **mailbox** (pause, resume, stop, input from the API) and the **runner**
(the phases). Both change the session only through `_fire`, which asks the
state machine (`lokid.session_state`), writes the store, then publishes the
event - under one lock, so the store, the events and the in-memory status
always agree on the order of transitions.

Theory of operation:

* **bootstrap**: create `.loki/`, read and parse the PRD, insert its tasks
  (`prd-001`, ...; ids already stored are skipped, so a bootstrap cut off
  by a restart is finished, not repeated), then `bootstrapped` ->
  `running` (`session.started`). Whether it is due comes from the store
  (no phase recorded yet), not from the status: a session interrupted
  during its bootstrap is `running` again after `resume`, and the runner
  finishes the bootstrap first (no transition, so no `session.started`).
* **development**: a scheduler loop starts one worker per task, at most
  one at a time, or with `options.parallel` at most `maxAgents` (else the
  pool's cap). A worker takes an agent slot from the pool, marks the task
  active, builds the prompt (with queued human input), spawns the provider
  CLI and turns its output into events. The verdict of the run
  (`providers.classify`) completes the task, retries it later (exponential
  backoff with jitter; a rate limit holds the whole session until the
  provider's reset and uses up no attempt), fails it after
  `max_task_attempts`, or - for a permanent error (bad credentials, unknown
  model, a CLI the sandbox cannot see) - fails the session. A parallel
  run's work that cannot be merged (conflict, git error) is a failed run;
  one the project's own state refuses (uncommitted changes in the way)
  pauses the session until the person makes room (`_merge`).
* **qa**: nothing pending and nothing running: `options.verify` runs as a
  process of the pool (own process group, recorded); a failure becomes a
  new task (`verify-001`, ...) and development goes on.
* **completion**: every task completed and verify passed, or the agent
  wrote `.loki/signals/COMPLETION_REQUESTED`: `complete` -> `completed`.
* Limits end the session `failed` with `exitReason`: `maxIterations`
  (agent runs), `maxDurationSeconds` (since `startedAt`; a running agent's
  hard timeout is cut to what is left, and a run the scheduler's look at
  the limit cuts off first is reported as that timeout, so the outcome
  does not depend on which came first; a paused session fails at its
  deadline too, and one resumed past it fails before any run), `budgetUsd`
  (sum of the provider's reported cost; only while work is left: a last run
  that spends it completes the session), `maxConsecutiveFailures`,
  `tasksFailed` (a task used up its attempts), `permanentError`,
  `bootstrapFailed`.
* **pause** takes effect between runs: no new worker starts; running agents
  finish (`?now=true` stops them, and their tasks go back to `pending`
  without counting a failure). **stop** cancels the work: each slot stops
  its agent (group SIGTERM, grace, SIGKILL, and a check that nothing of the
  group is left), active tasks go back to `pending`, then `agents_gone` ->
  `stopped`, with the survivors (none, unless a process sits in
  uninterruptible sleep) in the event.
* **daemon shutdown** (`on_stop_requested`, as soon as the daemon's stop
  begins): like stop, but the session ends `interrupted` (`daemon_restart`;
  a paused one stays paused), so the next daemon continues it on `resume`
  or with `LOKI_RESUME_ON_START`. The agent pool refusing a run
  (`PoolClosed`) or stopping a running agent itself (a hurried stop's
  SIGKILL) means the same: the pool only does that when it stops. Such a
  run is cut off, never a failed run: its task goes back to `pending`
  without a retry, and its `agent.failed` says `run cut off: the daemon is
  stopping`.
* **The store refuses writes** (`StoreUnavailable`: disk full, read-only,
  I/O error): hold, don't crash. The runner's work is cancelled like a
  stop's (every agent is stopped: group SIGTERM, grace, SIGKILL; an agent
  whose output the store can no longer take is stopped at its next pipe
  read), everything in memory is kept, and the session waits, in ticks of
  `HOLD_POLL` seconds, until `store.writable` again (the store probes by
  itself). Then a `warning` (`reason: store_unwritable`) says how long it
  was held, the tasks cut off go back to `pending` (their attempt counts)
  and the work goes on. The mailbox keeps serving meanwhile: a command
  whose write is refused answers 503, except `stop`, which is taken in
  memory anyway (503 too, saying so): the work stays cancelled and
  `stopped` is recorded once the store takes writes. On daemon shutdown a
  held session's end is not recorded; the next start reconciles it.
* `.loki/` files: `PAUSE` appearing pauses, its removal resumes a session
  paused by it; API pause/resume create/remove it (other tools see the
  state). `STOP` is consumed and stops. `HUMAN_INPUT.md` is consumed as
  input; one the store refuses is put back, taken again after the hold.
  Tasks the agent appends to `queue/pending.json` are ingested; an
  agent in a worktree that wrote its worktree's own `.loki/` instead (a CLI
  confined to its working folder) has its tasks and completion request taken
  when its run ends, before the worktree goes (`lokid.worktree_loki`).
  The state files are rewritten after changes, at most every
  `mirror_interval` seconds. A malformed file is a `warning` event, once
  per distinct problem, never a crash.

Bounds: mailbox 64 (`WhenFull.REJECT`: a burst of commands beyond it gets
503 at once); workers <= the parallel limit; per-run output is bounded by
the agent host and the parser; repeated warnings are remembered up to
`MAX_REMEMBERED_WARNINGS`; waits (backoff, rate limits) are in ticks of at
most `control_poll` seconds so that stop, pause and control files are
noticed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import logging
import math
import os
import random
import stat
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import attrs
import sqlite_utils
import trio

from lokid import __version__, idempotency, lokidir, providers, sandbox, worktree
from lokid.actor import Actor, ActorStatistics, WhenFull
from lokid.actors.agent_pool import (
    ROW_WRITE_TIMEOUT,
    AgentPool,
    PoolBusy,
    PoolClosed,
    RecordWith,
    Slot,
)
from lokid.actors.event_bus import EventBus
from lokid.actors.store import StoreActor, StoreUnavailable
from lokid.agent_host import AgentRun, AgentSpec, EndReason, RunResult, Stream
from lokid.crashpoints import crash_point
from lokid.errors import AskTimeout, LokiError
from lokid.events import Level
from lokid.loki_mirror import MirrorState, PendingView, pending_view, write_mirror
from lokid.prd import (
    MAX_PRD_BYTES,
    PrdParseResult,
    PrdTask,
    parse_prd_detailed,
    validate_prd_bytes,
)
from lokid.prompt import PromptTask, build_prompt, inputs_that_fit
from lokid.session_records import (
    RunnerTask,
    add_input,
    get_session_fields,
    insert_tasks,
    mark_inputs_applied,
    new_input_id,
    pending_inputs,
    requeue_active_tasks,
    requeue_inputs_of_unreleased,
    runner_tasks,
    session_iteration,
    set_session_fields,
    stop_source,
    update_session,
    update_task,
)
from lokid.session_state import IllegalTransition, Lifecycle, Status, Trigger, step
from lokid.timefmt import utc_now_iso
from lokid.worktree_loki import WORKTREE_LOKI_WAIT, add_agent_tasks, take_worktree_loki

log = logging.getLogger("lokid.sessions")

MAX_REMEMBERED_WARNINGS = 256

CONTROL_MIN_INTERVAL = 0.1  # seconds between two looks at the control files

HOLD_POLL = 0.5  # seconds between two looks at `store.writable` while held

CUT_OFF_END_WAIT = 1.0
"""Seconds the end event of a run a stop or shutdown cut off may take (shielded)."""

_RNG = random.Random()  # retry jitter; one for all sessions (seeding one each costs ~1 ms)

EventArgs = tuple[str, str | None, Level, Mapping[str, Any]]
"""(type, session id, level, data) of one event for `EventBus.emit_many`."""
VERIFY_OUTPUT_CHARS = 4000

_LEVEL_FOR_EVENT = {
    "session.failed": Level.ERROR,
    "session.interrupted": Level.WARNING,
}


# -- settings and messages ------------------------------------------------------------


class _NothingLanded(Exception):
    """`_requeue_unreleased` found no mark to undo: the timed-out write never landed."""


class _AlreadyStored(Exception):
    """A claimed `HUMAN_INPUT.md` whose input id is stored already (its first commit
    landed before a crash or a refusal): raised inside the write, so that neither a
    second input nor a second `input.received` is stored."""


@attrs.frozen
class RunnerSettings:
    """How sessions run; one value for the daemon (from `Config`)."""

    grace: float = 5.0
    idle_timeout: float = 900.0
    hard_timeout: float = 7200.0
    retry_base: float = 2.0
    retry_cap: float = 300.0
    max_task_attempts: int = 3
    max_consecutive_failures: int = 5
    control_poll: float = 2.0
    mirror_interval: float = 1.0
    verify_timeout: float = 1800.0
    env: Mapping[str, str] = attrs.field(factory=dict)


@attrs.frozen
class Pause:
    now: bool = False


@attrs.frozen
class Resume:
    pass


@attrs.frozen
class Stop:
    pass


@attrs.frozen
class Input:
    message: str
    source: str = "api"
    once: idempotency.Once | None = None  # an `Idempotency-Key`: its answer is remembered


@attrs.frozen
class Ending:
    """How the runner ends the session: `complete` or `fail` with an exit reason."""

    trigger: Trigger
    reason: str
    detail: str | None = None


@attrs.define
class _Worker:
    task_id: str
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    cut_by_pause: bool = False
    cut_at_deadline: bool = False
    """The session's time limit ended the session while this worker ran."""
    has_slot: bool = False
    """It holds an agent slot: once cut off, it ends within its agent's stop."""
    run_over: bool = False
    """Its agent ended and was judged: it only records the outcome now."""


@attrs.frozen
class SessionStatistics(ActorStatistics):
    session_status: str
    phase: str | None
    iteration: int
    workers: int
    runs: int
    cost_usd: float
    held: bool
    """Held: the store refused a write and the session waits until it takes writes again."""
    holds: int


# -- the actor --------------------------------------------------------------------------


class SessionActor(Actor[Any]):
    """One session. Mailbox 64, `WhenFull.REJECT`. See the module docstring."""

    mailbox_size: ClassVar[int] = 64
    when_full: ClassVar[WhenFull] = WhenFull.REJECT

    def __init__(
        self,
        session: Mapping[str, Any],
        *,
        store: StoreActor,
        bus: EventBus,
        pool: AgentPool,
        settings: RunnerSettings,
        on_finished: Callable[[SessionActor], None] = lambda actor: None,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(f"session {session['id']}")
        self.id: str = session["id"]
        self.store = store
        self.bus = bus
        self.pool = pool
        self.settings = settings
        self.on_finished = on_finished
        self.rng = rng or _RNG
        self.lifecycle = Lifecycle(Status(session["status"]))
        self.provider: str = session["provider"]
        self.prd_path = Path(session["prd"])
        self.project_dir = Path(session["projectDir"])
        self.options: dict[str, Any] = dict(session["options"])
        self.phase: str | None = session["phase"]
        self.iteration: int = session["iteration"]
        self.created_at: str = session["createdAt"]
        self.started_at: str | None = session["startedAt"]
        self.cost_usd: float = float(session["costUsd"] or 0.0)
        self.paths = lokidir.LokiPaths.for_project(self.project_dir)
        self._controls = lokidir.ControlWatch(self.paths)
        self._controls_checked_at = -math.inf
        self._controls_due = False  # an agent run ended: it may have written a signal
        self._ingest_checked_at = -math.inf
        self._ingest_due = False
        self.prd_title: str | None = None
        self._bootstrapped = bootstrap_recorded(session)
        # Inputs are added only through this actor (`_add_input`), and only once the
        # session runs: a new session has none in the store until then, so its runs
        # and its end skip the read. A restored one (resumed, restarted) may have some.
        self._inputs_maybe = self.lifecycle.status is not Status.STARTING
        self._lock = trio.Lock()
        self._wakeup = trio.Event()
        self._workers: dict[str, _Worker] = {}
        self._not_before: dict[str, float] = {}  # task id -> trio time of its next attempt
        self._hold_until = -math.inf  # rate limit: no run before this trio time
        self._consecutive_failures = 0
        self._consecutive_rate_limits = 0  # doubles the rate-limit wait's floor
        self._ending: Ending | None = None
        self._completion: str | None = None
        self._stop_wanted = self.status is Status.STOPPING  # a restart mid-stop finishes it
        self._stop_source: str | None = None  # None: from the store (a restart mid-stop)
        self._shutdown = False
        self._work_scope: trio.CancelScope | None = None
        self._pause_file_seen = False
        self._warnings_seen: set[str] = set()
        self._mirror = MirrorState()
        self._pending = PendingView(None)  # what we last read or wrote of pending.json
        # The session and its tasks as the final transition left them (its transaction
        # read them): the last `.loki/` write, without a store read.
        self._final_state: tuple[dict[str, Any], list[RunnerTask]] | None = None
        # The tasks as the bootstrap's transaction left them, for the scheduler's first
        # step; dropped by any other change of them before it (`_take_fresh_tasks`).
        self._fresh_tasks: list[RunnerTask] | None = None
        self._mirror_dirty = trio.Event()
        self._sync_lock = trio.Lock()
        self._survivors: list[int] = []
        # Queued inputs a worker put into its prompt, until its run started or never will.
        self._claimed_inputs: set[str] = set()
        self._runs = 0
        self._retries = 0
        self._last_exit_code = 0
        self._held_since: float | None = None  # trio time the current hold began
        self._held_cause = ""
        # Claims of HUMAN_INPUT.md in logs/ may wait (a crash, a refused store): look once,
        # and again after a hold.
        self._claims_unknown = True
        self._holds = 0
        # Resumed (or restarted) past its deadline, e.g. after the daemon was down: the
        # first look at the limit fails it before any run, and its detail says why.
        self._resumed_late = self.status is Status.RUNNING and self._deadline_left() <= 0

    # -- what the manager reads ------------------------------------------------------

    @property
    def status(self) -> Status:
        return self.lifecycle.status

    def summary(self) -> dict[str, Any]:
        """`{id, phase, iteration, startedAt}` for `/api/status`."""
        return {
            "id": self.id,
            "phase": self.phase,
            "iteration": self.iteration,
            "startedAt": self.started_at,
        }

    def statistics(self) -> SessionStatistics:
        base = super().statistics()
        return SessionStatistics(
            **attrs.asdict(base, recurse=False),
            session_status=self.status.value,
            phase=self.phase,
            iteration=self.iteration,
            workers=len(self._workers),
            runs=self._runs,
            cost_usd=self.cost_usd,
            held=self._held_since is not None,
            holds=self._holds,
        )

    # -- the task -------------------------------------------------------------------

    async def serve(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._mailbox)
            nursery.start_soon(self._mirror_loop)
            try:
                await self._run()
            finally:
                self.on_finished(self)
            with trio.CancelScope(shield=True), trio.move_on_after(30):
                try:
                    await self._sync_loki(ingest=False)
                except LokiError as exc:  # the store went first (a cancelled daemon)
                    log.warning("%s: last .loki/ update skipped: %s", self.name, exc)
            nursery.cancel_scope.cancel()
        # Commands that arrived before the manager forgot us are answered by the
        # state machine (a finished session refuses them with a 409).
        while (message := self.next_message_nowait()) is not None:
            await self.dispatch(message)

    def on_stop_requested(self) -> None:
        """The daemon stops: no new run; the runs in flight are cut off; end `interrupted`."""
        self._shutdown = True
        if self._work_scope is not None:
            self._work_scope.cancel()
        self._poke()

    def _pool_stopping(self) -> None:
        """The agent pool refused a run or stopped an agent itself: it stops, and so
        does the daemon (a pool that restarts after a crash restarts the sessions after
        it too). Wind down as on the daemon's shutdown instead of failing the run."""
        if not self._shutdown:
            log.info("%s: the agent pool is stopping; winding down", self.name)
            self.on_stop_requested()

    async def _mailbox(self) -> None:
        while (message := await self.next_message()) is not None:
            await self.dispatch(message)

    async def handle(self, message: Any) -> Any:
        match message:
            case Pause(now=now):
                session = await self._fire(Trigger.PAUSE, data={"source": "api", "now": now})
                await self._control_file(self.paths.pause, present=True)
                if now:
                    for worker in self._workers.values():
                        worker.cut_by_pause = True
                        worker.scope.cancel()
                return session
            case Resume():
                session = await self._fire(Trigger.RESUME, data={"source": "api"})
                await self._control_file(self.paths.pause, present=False)
                return session
            case Stop():
                return await self._stop("api")
            case Input(message=text, source=source, once=once):
                return await self._add_input(text, source, once)
        raise TypeError(f"{self.name}: unexpected message {message!r}")

    # -- transitions -----------------------------------------------------------------

    async def _fire(
        self,
        trigger: Trigger,
        *,
        data: Mapping[str, Any] | None = None,
        also: Callable[[sqlite_utils.Database], object] | None = None,
        before: Sequence[EventArgs] = (),
        in_memory_if_unstored: bool = False,
        final: bool = False,
        read_tasks: bool = False,
        **fields: Any,
    ) -> dict[str, Any]:
        """Apply `trigger`: the state machine decides, then the change and its event
        are committed in one transaction (`EventBus.publish_with`), under the lock.

        `also` runs in that transaction before the session row changes;
        `before` are stored in that transaction just ahead of the transition's
        event (bootstrap: the tasks' `task.created` and `phase.completed`, then
        `session.started`; a completion: its phase events). With
        `in_memory_if_unstored`, a transition the store refuses
        (`StoreUnavailable`, re-raised) is still applied in memory: the caller
        has it recorded later (a stop: by the final transition). With `final`
        (the session's end), the transaction also reads the tasks: the last
        `.loki/` write needs no store read of its own (`_final_state`); with
        `read_tasks` (the bootstrap), the scheduler's next step uses them
        (`_fresh_tasks`).
        """
        async with self._lock:
            transition = step(self.lifecycle.status, trigger)  # IllegalTransition: nothing changed
            now = utc_now_iso()
            update = dict(fields)
            if transition.changed:
                update["status"] = transition.after.value
                if transition.after is Status.RUNNING and self.started_at is None:
                    update["started_at"] = self.started_at = now
                if transition.after in (Status.STOPPED, Status.COMPLETED, Status.FAILED):
                    update["ended_at"] = now
            requeue = trigger is Trigger.DAEMON_RESTART or transition.after in (
                Status.STOPPED,
                Status.FAILED,
            )
            cut_off_by = (
                "daemon shutdown"
                if trigger is Trigger.DAEMON_RESTART
                else f"the session {transition.after.value}"
            )

            kept: list[tuple[dict[str, Any], list[RunnerTask]]] = []

            def write(db: sqlite_utils.Database) -> dict[str, Any]:
                if also is not None:
                    also(db)
                if requeue:  # in words, not the trigger's internal name
                    requeue_active_tasks(db, self.id, f"run cut off: {cut_off_by}")
                session = update_session(db, self.id, **update)
                if final or read_tasks:
                    kept[:] = [(session, runner_tasks(db, self.id))]
                return session

            try:
                if transition.event is None:
                    if before:
                        await self.bus.emit_many(before)
                    session = await self.store.write(write)
                else:
                    _, session = await self.bus.publish_with(
                        write,
                        transition.event,
                        self.id,
                        _LEVEL_FOR_EVENT.get(transition.event, Level.INFO),
                        {"status": transition.after.value, **(data or {})},
                        before=before,
                    )
            except StoreUnavailable:
                if in_memory_if_unstored:
                    self.lifecycle.fire(trigger)
                    self._poke()
                raise
            self.lifecycle.fire(trigger)
            self._fresh_tasks = kept[0][1] if read_tasks else None
            if final:
                self._final_state = kept[0]
        self._poke()
        self._mirror_dirty.set()
        return session

    async def _stop(self, source: str) -> dict[str, Any]:
        try:
            session = await self._fire(
                Trigger.STOP,
                data={"source": source},
                in_memory_if_unstored=True,
                stop_source=source,  # for an actor restarted before the stop is done
            )
        except StoreUnavailable as exc:
            # Stop anyway: the agents go now, `stopped` is recorded once the store
            # takes writes again (`_finish`). The caller hears both.
            self._cancel_work(source)
            raise StoreUnavailable(
                f"{exc.message}; the session stops anyway: its agents are stopped now, and "
                "it is recorded stopped once the store takes writes again",
                details={**exc.details, "status": self.status.value},
            ) from None
        self._cancel_work(source)
        return session

    def _cancel_work(self, source: str) -> None:
        self._stop_wanted = True
        self._stop_source = source
        if self._work_scope is not None:
            self._work_scope.cancel()
        self._poke()

    async def _add_input(
        self, text: str, source: str, once: idempotency.Once | None = None
    ) -> dict[str, Any]:
        """Queue an input (`input.received`); with `once`, its answer is stored with it.

        A request with the key of one stored meanwhile (a concurrent retry) gets
        that answer and queues nothing.
        """
        answer, created = await self._store_input(text, once)
        if created:
            await self._announce_input(answer, source, text)
        return answer

    async def _store_input(
        self, text: str, once: idempotency.Once | None = None
    ) -> tuple[dict[str, Any], bool]:
        """Store an input (and the answer of `once`): the answer, and False if `once`
        found one stored already. `StoreUnavailable`: nothing of it was stored."""
        step(self.lifecycle.status, Trigger.INPUT)  # 409 unless running or paused

        self._inputs_maybe = True  # before the write: a refused one may still have landed

        def write(db: sqlite_utils.Database) -> tuple[dict[str, Any], bool]:
            if once is not None:
                first = idempotency.lookup(db, once.route, once.key, once.digest)
                if first is not None:
                    return first.body, False  # a `Replayed`: the route says so
            answer = add_input(db, self.id, text)
            if once is not None:
                idempotency.remember(db, once.route, once.key, once.digest, 202, answer)
            return answer, True

        return await self.store.write(write)

    async def _announce_input(self, answer: Mapping[str, Any], source: str, text: str) -> None:
        await self.bus.publish(
            "input.received",
            self.id,
            Level.INFO,
            {"inputId": answer["id"], "source": source, "chars": len(text)},
        )
        self._poke()

    def _poke(self) -> None:
        self._wakeup.set()
        self._wakeup = trio.Event()

    async def _wait_change(self, timeout: float) -> None:
        with trio.move_on_after(max(0.0, min(timeout, self.settings.control_poll))):
            await self._wakeup.wait()

    async def _set_phase(self, phase: str) -> None:
        if self.phase == phase:
            return
        previous = self.phase
        # The phase and its first event in one transaction; `phase.started` after a
        # `phase.completed` is emitted (stored in order, before the next publish).
        first = ("phase.started", phase) if previous is None else ("phase.completed", previous)
        await self.bus.publish_with(
            lambda db: set_session_fields(db, self.id, phase=phase),
            first[0],
            self.id,
            Level.INFO,
            {"phase": first[1]},
        )
        self.phase = phase  # after the write: a refused one is written again on the retry
        if previous is not None:
            await self.bus.emit("phase.started", self.id, Level.INFO, {"phase": phase})
        self._mirror_dirty.set()

    async def _warn(self, reason: str, message: str, **data: Any) -> None:
        key = f"{reason}:{data.get('taskId')}:{message}"  # one per task: each needs telling
        if key in self._warnings_seen:
            return
        if len(self._warnings_seen) < MAX_REMEMBERED_WARNINGS:
            self._warnings_seen.add(key)
        await self.bus.publish(
            "warning", self.id, Level.WARNING, {"reason": reason, "message": message, **data}
        )

    # -- the runner --------------------------------------------------------------------

    async def _run(self) -> None:
        # Not this session's first start (a crash restart of this actor, a resume,
        # a paused session restored at daemon start): no run of it is alive now
        # (slots stop their agents; reconciliation killed a dead daemon's), so
        # tasks still marked active run again.
        requeue = None if self.status is Status.STARTING else "run cut off: runner restarted"
        ending: Ending | None = None
        while True:
            refused: StoreUnavailable | None = None
            try:
                ending = await self._work(requeue)
            except* StoreUnavailable as group:
                refused = _first_leaf(group)
            if refused is None:
                break
            # Hold, don't crash: the work was cancelled (its agents are stopped), the
            # state in memory is kept; go on once the store takes writes again.
            self._begin_hold(refused)
            await self._hold(stop_ends_it=True)
            if self._held_since is not None:  # stopping or shutting down while held
                break
            requeue = "run cut off: the store was not writable"
        await self._finish(ending)

    async def _work(self, requeue: str | None) -> Ending | None:
        """Bootstrap (a new session) and development, until an ending or a stop."""
        ending: Ending | None = None
        if requeue is not None:
            self._fresh_tasks = None
            await self.store.write(lambda db: requeue_active_tasks(db, self.id, requeue))
        with trio.CancelScope() as self._work_scope:
            if self._stop_wanted or self._shutdown:
                self._work_scope.cancel()
            if not self._bootstrapped:  # from the store: a resume may find it unfinished
                ending = await self._bootstrap()
            elif self.prd_title is None:
                await self._recall_prd_title()
            if ending is None:
                ending = await self._develop()
        return ending

    async def _finish(self, ending: Ending | None) -> None:
        """Record the end; while the store refuses it, hold. On daemon shutdown a held
        session gives up: the next start reconciles it from what the store has."""
        while True:
            if self._held_since is not None:
                await self._hold(stop_ends_it=False)
                if self._held_since is not None:
                    log.warning(
                        "%s: its end is not recorded, the store is not writable (%s); "
                        "the next daemon start reconciles it",
                        self.name,
                        self._held_cause,
                    )
                    return
            try:
                with trio.CancelScope(shield=True):
                    await self._end(ending)
                return
            except StoreUnavailable as exc:
                self._begin_hold(exc)

    # -- holding while the store refuses writes ---------------------------------------

    def _begin_hold(self, cause: StoreUnavailable) -> None:
        if self._held_since is not None:
            return
        self._held_since = trio.current_time()
        self._held_cause = self.store.unwritable_reason or cause.message
        self._holds += 1
        log.warning(
            "%s: held, the store is not writable (%s): its agents are stopped, and it goes "
            "on once the store takes writes again",
            self.name,
            self._held_cause,
        )

    async def _hold(self, *, stop_ends_it: bool) -> None:
        """Wait, in ticks of at most `HOLD_POLL` s, until the store takes writes and the
        `warning` saying so is stored. Returns still held on daemon shutdown, and - with
        `stop_ends_it` - when the session is to stop (its end holds in `_finish`)."""
        while self._held_since is not None:
            leaving = self._shutdown or (stop_ends_it and self._stop_wanted)
            if not leaving:
                await self._wait_change(HOLD_POLL)
            if self.store.writable:
                with contextlib.suppress(StoreUnavailable):
                    await self._end_hold()
            if leaving:
                return

    async def _end_hold(self) -> None:
        assert self._held_since is not None
        seconds = trio.current_time() - self._held_since
        await self.bus.publish(
            "warning",
            self.id,
            Level.WARNING,
            {
                "reason": "store_unwritable",
                "message": f"the session was held for {seconds:.1f} s because the store "
                f"was not writable: {self._held_cause}",
                "heldSeconds": round(seconds, 3),
            },
        )
        log.info("%s: the store takes writes again; held %.1f s", self.name, seconds)
        self._held_since = None

    async def _end(self, ending: Ending | None) -> None:
        """The final transition. A stop may land while it is decided: then it wins."""
        for _ in range(3):
            try:
                await self._end_once(ending)
                return
            except IllegalTransition:
                if self.status is not Status.STOPPING:
                    raise

    async def _end_once(self, ending: Ending | None) -> None:
        if self.status is Status.STOPPING or (ending is not None and not self._shutdown):
            await self._warn_undelivered_inputs()  # the session ends for good
        if self.status is Status.STOPPING:
            if self._stop_source is None:  # this actor was restarted in the middle of the stop
                stored = await self.store.read(lambda db: stop_source(db, self.id))
                self._stop_source = stored or "api"  # (a stop stored before lokid kept it)
            await self._fire(
                Trigger.AGENTS_GONE,
                data={"survivors": self._survivors, "source": self._stop_source},
                final=True,
                exit_reason="stopped",
            )
        elif ending is not None and not self._shutdown:
            # A completion enters its phase in the same transaction as the transition.
            phase: dict[str, Any] = {}
            before: list[EventArgs] = []
            if ending.trigger is Trigger.COMPLETE and self.phase != "completion":
                phase["phase"] = "completion"
                if self.phase is not None:
                    before.append(("phase.completed", self.id, Level.INFO, {"phase": self.phase}))
                before.append(("phase.started", self.id, Level.INFO, {"phase": "completion"}))
            await self._fire(
                ending.trigger,
                data={"exitReason": ending.reason, "detail": ending.detail},
                before=before,
                final=True,
                exit_reason=ending.reason,
                last_error=ending.detail if ending.trigger is Trigger.FAIL else None,
                **phase,
            )
            if phase:
                self.phase = "completion"
        elif self.status in (Status.STARTING, Status.RUNNING, Status.PAUSED):
            await self._fire(Trigger.DAEMON_RESTART, data={"reason": "daemon shutdown"}, final=True)

    async def _warn_undelivered_inputs(self) -> None:
        """`undelivered_inputs_warning`, before the session's end is announced."""
        if not self._inputs_maybe:  # a new session given no input
            return
        warning = await self.store.read(lambda db: undelivered_inputs_warning(db, self.id))
        if warning is not None:
            await self._warn(**warning)

    async def _bootstrap(self) -> Ending | None:
        """Prepare `.loki/`, parse the PRD, then tasks + `running` in one store write.

        A session resumed after a daemon restart cut its bootstrap off is
        `running` (or paused) already: its bootstrap is finished without a
        transition (`_record_bootstrap`).
        """
        self.phase = "bootstrap"
        await self.bus.emit("phase.started", self.id, Level.INFO, {"phase": "bootstrap"})
        try:
            parsed, seen = await trio.to_thread.run_sync(
                _prepare_project,
                self.paths,
                self.prd_path,
                self.iteration == 0,
                self.status is Status.STARTING,
            )
        except (LokiError, OSError) as exc:
            return Ending(Trigger.FAIL, "bootstrapFailed", _bootstrap_problem(self.prd_path, exc))
        self.prd_title = parsed.title

        # A session still `starting` has no task in the store: its PRD's tasks are
        # inserted with the `bootstrapped` transition, agents add theirs after it.
        known = (
            set()
            if self.status is Status.STARTING
            else {task.id for task in await self.store.read(lambda db: runner_tasks(db, self.id))}
        )
        new = [task for task in parsed.tasks if task.id not in known]
        src = "prd"
        events: list[EventArgs] = [
            ("task.created", self.id, Level.INFO, {"taskId": t.id, "title": t.title, "source": src})
            for t in new
        ]
        events += [
            (
                "warning",
                self.id,
                Level.WARNING,
                {"reason": "prd", "message": w.message, "code": w.code, "line": w.line},
            )
            for w in parsed.warnings
        ]
        events.append(("phase.completed", self.id, Level.INFO, {"phase": "bootstrap"}))

        if self.status is Status.STARTING:
            self.phase = "development"
            try:
                await self._fire(
                    Trigger.BOOTSTRAPPED,
                    data={
                        "provider": self.provider,
                        "projectDir": str(self.project_dir),
                        "prd": str(self.prd_path),
                        "tasks": len(parsed.tasks),
                    },
                    also=lambda db: insert_tasks(db, self.id, new),
                    before=events,
                    read_tasks=True,
                    phase="development",
                )
            except IllegalTransition:  # judged under the lock: a stop took it first
                if not self._stop_wanted:
                    raise
                self.phase = "bootstrap"  # nothing of it was stored; the stop wins
                await trio.lowlevel.checkpoint()  # the stop cancelled this work: leave
                return None
        else:
            await self._record_bootstrap(new, events)
        if seen is not None and self._pending.stamp is None:
            self._pending = seen  # the mirror's first look is a `stat`, not a read
        self._bootstrapped = True
        await self.bus.emit("phase.started", self.id, Level.INFO, {"phase": "development"})
        return None

    async def _recall_prd_title(self) -> None:
        """A resumed session skips the bootstrap; its prompts still name the PRD's title.

        Read from the PRD as it is now; one that cannot be read any more leaves
        the prompts naming its path only (the agent finds out when it reads it).
        """
        try:
            parsed = await trio.to_thread.run_sync(_read_prd, self.prd_path)
        except (LokiError, OSError):
            return
        self.prd_title = parsed.title

    async def _record_bootstrap(self, new: list[PrdTask], events: list[EventArgs]) -> None:
        """Finish the bootstrap of a session that is past `starting` (resumed): its tasks,
        phase and `startedAt` in one store write; no transition, so no `session.started`."""
        async with self._lock:
            now = utc_now_iso()
            started = {} if self.started_at is not None else {"started_at": now}

            def write(db: sqlite_utils.Database) -> None:
                insert_tasks(db, self.id, new)
                set_session_fields(db, self.id, phase="development", **started)

            await self.bus.emit_many(events)
            await self.store.write(write)
            self.phase = "development"
            if started:
                self.started_at = now
        self._mirror_dirty.set()

    async def _develop(self) -> Ending | None:
        if self.phase != "development":
            await self._set_phase("development")
        async with trio.open_nursery() as workers:
            ending = await self._schedule(workers)
            if ending is not None and ending.reason == "maxDurationSeconds":
                await self._end_runs_at_deadline(ending)
            workers.cancel_scope.cancel()
        return ending

    async def _end_runs_at_deadline(self, ending: Ending) -> None:
        """The time limit ends the runs in flight, and they are reported as if their hard
        timeout (cut to the same deadline) had fired: `agent.failed` and `task.failed`
        with the time limit's message. So the events and the task do not depend on
        whether the run's timeout or the scheduler's look at the limit came first.

        Waits for the workers holding a slot (each within its agent's stop); the caller
        cancels the rest, which wait for a slot and have no run to report.
        """
        self._ending = ending  # a worker given its slot now starts no run
        for worker in self._workers.values():
            worker.cut_at_deadline = True
            worker.scope.cancel()
        while any(worker.has_slot for worker in self._workers.values()):
            await self._wait_change(self.settings.control_poll)

    async def _schedule(self, workers: trio.Nursery) -> Ending | None:
        """Start workers until the session ends; return how it ends."""
        while True:
            await self._check_controls()
            if self._ending is not None:
                return self._ending
            if self.status is not Status.RUNNING:
                limit = self._time_up_while_paused()
                if limit is not None:
                    return limit
                await self._wait_change(max(self._deadline_left(), CONTROL_MIN_INTERVAL))
                continue
            limit = self._time_up()
            if limit is not None:
                return limit
            spent = self._budget_spent()
            if spent is not None and any(not w.run_over for w in self._workers.values()):
                return spent  # runs in flight or about to start: work is left
            if self._completion is not None:
                if not self._workers:
                    return Ending(Trigger.COMPLETE, "completionRequested", self._completion)
                await self._wait_change(self.settings.control_poll)
                continue
            if len(self._workers) >= self._parallel_limit():
                await self._wait_change(self.settings.control_poll)
                continue
            now = trio.current_time()
            if now < self._hold_until:
                await self._wait_change(self._hold_until - now)
                continue
            fresh = self._take_fresh_tasks()
            tasks: list[RunnerTask] = (
                fresh
                if fresh is not None
                else await self.store.read(lambda db: runner_tasks(db, self.id))
            )
            if await self._ingest({t.id for t in tasks}, force=False):
                continue
            task = self._next_task(tasks, now)
            pending = [t for t in tasks if t.status == "pending"]
            if spent is not None and (task is not None or pending):
                return spent
            if task is None:
                if self._workers or pending:
                    waits = [self._not_before.get(t.id, now) - now for t in pending]
                    await self._wait_change(min(waits, default=self.settings.control_poll))
                    continue
                if await self._ingest({t.id for t in tasks}, force=True):
                    continue  # the agent left more work
                failed = [t.id for t in tasks if t.status == "failed"]
                if failed:
                    return Ending(Trigger.FAIL, "tasksFailed", ", ".join(failed[:20]))
                if await self._verify():
                    return Ending(Trigger.COMPLETE, "allTasksCompleted")
                continue
            if self.iteration >= int(self.options.get("maxIterations") or 50):
                if self._workers:
                    await self._wait_change(self.settings.control_poll)
                    continue
                return Ending(Trigger.FAIL, "maxIterations", f"{self.iteration} agent runs")
            self.iteration += 1
            worker = _Worker(task.id)
            self._workers[task.id] = worker
            workers.start_soon(self._work_on, worker, task, self.iteration)

    def _take_fresh_tasks(self) -> list[RunnerTask] | None:
        """The tasks the bootstrap's transaction read, once: the scheduler's first step
        starts no read of its own (no worker runs before it, and each other change of
        the tasks drops them: `_fire`, `_add_agent_tasks`, `_take_worktree_loki`)."""
        tasks, self._fresh_tasks = self._fresh_tasks, None
        return tasks

    def _parallel_limit(self) -> int:
        if not self.options.get("parallel"):
            return 1
        wanted = int(self.options.get("maxAgents") or self.pool.capacity)
        return min(wanted, self.pool.max_waiters_per_session)

    def _next_task(self, tasks: list[RunnerTask], now: float) -> RunnerTask | None:
        for task in tasks:  # already in run order
            if (
                task.status == "pending"
                and task.id not in self._workers
                and self._not_before.get(task.id, now) <= now
            ):
                return task
        return None

    def _deadline_left(self) -> float:
        """Seconds until `maxDurationSeconds` runs out (inf without the limit)."""
        limit = self.options.get("maxDurationSeconds")
        if not limit or self.started_at is None:
            return math.inf
        started = dt.datetime.fromisoformat(self.started_at.replace("Z", "+00:00"))
        elapsed = (dt.datetime.now(dt.UTC) - started).total_seconds()
        return float(limit) - elapsed

    def _time_limit(self) -> str:
        """The session's deadline, as messages name it."""
        return (
            f"the session's time limit (maxDurationSeconds: {self.options['maxDurationSeconds']} s)"
        )

    def _limit_reached(self) -> Ending | None:
        return self._time_up() or self._budget_spent()

    def _time_up(self) -> Ending | None:
        if self._deadline_left() > 0:
            return None
        late = " before the session was resumed" if self._resumed_late else ""
        return Ending(Trigger.FAIL, "maxDurationSeconds", f"{self._time_limit()} ran out{late}")

    def _time_up_while_paused(self) -> Ending | None:
        """The deadline of a paused session (by the person, `.loki/PAUSE` or a blocked
        merge): it is a deadline, not a budget of work, so a pause does not hold it off
        and the session fails instead of waiting for a resume that could only fail it."""
        if self.status is not Status.PAUSED or self._deadline_left() > 0:
            return None
        return Ending(
            Trigger.FAIL,
            "maxDurationSeconds",
            f"{self._time_limit()} ran out while the session was paused",
        )

    def _budget_spent(self) -> Ending | None:
        """The budget ends a session that has work left (a run to start, one running or
        waiting for a retry); a session whose last run spent it completes as usual,
        as one whose last run is its `maxIterations`-th does."""
        budget = self.options.get("budgetUsd")
        if budget is not None and self.cost_usd >= float(budget):
            return Ending(Trigger.FAIL, "budgetUsd", f"${self.cost_usd:.4f} of ${budget}")
        return None

    # -- control files and the mirror ----------------------------------------------------

    async def _check_controls(self) -> None:
        now = trio.current_time()
        if not self._controls_due and now - self._controls_checked_at < CONTROL_MIN_INTERVAL:
            return  # a burst of scheduling steps shares one look at the files
        self._controls_checked_at = now
        self._controls_due = False
        controls = self._controls.read()
        if (
            controls.stop
            and self.status in (Status.STARTING, Status.RUNNING, Status.PAUSED)
            and lokidir.consume_control(self.paths.stop)
        ):
            await self._stop(".loki/STOP")
            return
        appeared = controls.pause and not self._pause_file_seen
        vanished = self._pause_file_seen and not controls.pause
        self._pause_file_seen = controls.pause
        # A command may change the status while we wait for the lock or a thread:
        # then the file's request is refused like a late API call (it lost the race).
        try:
            with contextlib.suppress(IllegalTransition):
                if appeared and self.status is Status.RUNNING:
                    await self._fire(Trigger.PAUSE, data={"source": ".loki/PAUSE"})
                elif vanished and self.status is Status.PAUSED:
                    await self._fire(Trigger.RESUME, data={"source": ".loki/PAUSE"})
        except StoreUnavailable:
            self._pause_file_seen = not controls.pause  # not taken: noticed again after the hold
            raise
        human_input = controls.human_input or self._claims_unknown
        if human_input and self.status in (Status.RUNNING, Status.PAUSED):
            await self._take_human_input()
        if controls.completion_requested and self._completion is None:
            try:
                request = await trio.to_thread.run_sync(
                    lokidir.consume_completion_request, self.paths
                )
            except lokidir.LokiDirFormatError as exc:
                await self._warn("malformed_file", exc.message, file="signals")
            else:
                if request is not None:
                    self._completion = request.statement or "the agent requested completion"

    async def _take_human_input(self) -> None:
        """Queue the text of `HUMAN_INPUT.md`, claimed by moving it into `logs/`.

        The claim's name holds the id its input is stored under, and the claim
        becomes the record `logs/human-input-<ts>.md` only once the input is
        stored. Claims left from before (a crash between the rename and the
        commit, or a store that refused the input) are stored first, oldest
        first: each once, even if its first commit landed after all. A claim the
        store refuses stays in `logs/` and is taken again after the hold.
        """
        if self._claims_unknown:
            notes, problems = await trio.to_thread.run_sync(
                lokidir.pending_human_inputs, self.paths
            )
            for problem in problems:
                await self._warn("malformed_file", problem.message, file="HUMAN_INPUT.md")
            for note in notes:
                if not await self._store_human_input(note):
                    return
            self._claims_unknown = False
        try:
            claimed = await trio.to_thread.run_sync(
                lambda: lokidir.consume_human_input(self.paths, input_id=new_input_id())
            )
        except lokidir.LokiDirFormatError as exc:
            await self._warn("malformed_file", exc.message, file="HUMAN_INPUT.md")
            return
        if claimed is not None:
            crash_point("human_input.claimed")
            await self._store_human_input(claimed)

    async def _store_human_input(self, note: lokidir.HumanInput) -> bool:
        """Store a claimed input with its `input.received` (one transaction), unless its
        id is stored already; then make the claim the record. False: the session
        no longer takes input (its claim became the record, and a warning says so)."""

        def write(db: sqlite_utils.Database) -> None:
            if db.execute("SELECT 1 FROM session_inputs WHERE id = ?", (note.input_id,)).fetchone():
                raise _AlreadyStored
            add_input(db, self.id, note.text, input_id=note.input_id)

        data = {"inputId": note.input_id, "source": ".loki/HUMAN_INPUT.md", "chars": len(note.text)}
        refused: IllegalTransition | None = None
        try:
            step(self.lifecycle.status, Trigger.INPUT)  # 409 unless running or paused
            self._inputs_maybe = True  # before the write: a refused one may still have landed
            await self.bus.publish_with(write, "input.received", self.id, Level.INFO, data)
            crash_point("human_input.stored")
        except _AlreadyStored:
            pass
        except IllegalTransition as exc:
            refused = exc
        except StoreUnavailable:
            self._claims_unknown = True  # the claim stays in logs/: taken after the hold
            raise
        try:
            record = await trio.to_thread.run_sync(lokidir.settle_human_input, self.paths, note)
        except OSError as exc:  # the claim stays; storing it again finds its id
            record = note.processed_path
            log.warning("%s: could not rename %s: %s", self.name, record, exc)
        if refused is not None:
            await self._warn(
                "input_refused",
                f"HUMAN_INPUT.md not delivered: {refused.message}; it is kept in {record}",
            )
            return False
        self._poke()
        return True

    async def _control_file(self, path: Path, *, present: bool) -> None:
        try:
            if present:
                await trio.to_thread.run_sync(lokidir.create_control, path)
            else:
                await trio.to_thread.run_sync(lokidir.consume_control, path)
        except (LokiError, OSError) as exc:
            await self._warn("loki_dir", f"cannot update {path}: {exc}")
        else:
            self._pause_file_seen = present

    async def _mirror_loop(self) -> None:
        while True:
            await self._mirror_dirty.wait()
            # Wait first: the changes of the next interval share one write (a short
            # session's whole life may fit in it).
            await trio.sleep(self.settings.mirror_interval)
            self._mirror_dirty = trio.Event()
            try:
                await self._sync_loki(ingest=True)
            except StoreUnavailable as exc:  # the files follow at the next change
                log.warning("%s: .loki/ update skipped: %s", self.name, exc.message)

    async def _ingest(self, known: set[str], *, force: bool, throttle: bool = True) -> bool:
        """Take the tasks the agent appended to `queue/pending.json`; True if any.

        Without `force` a file whose stamp is the one seen last (our own write,
        or the last read) is not read again: one `stat` instead of a thread hop
        per scheduling step - unless that read left tasks for the next one -
        and, with `throttle`, not looked at more than every
        `CONTROL_MIN_INTERVAL` s. The mirror looks at the stamp before each
        write (its compare-and-swap of the file is on the same stamp); the
        scheduler forces a read before it decides that nothing is left to do.
        What was read decides whether the mirror may replace the file
        (`PendingView`): not while it holds tasks not taken or cannot be read.
        """
        if not self._bootstrapped:
            return False  # the PRD's tasks first
        if not force:
            if throttle:
                now = trio.current_time()
                if not self._ingest_due and now - self._ingest_checked_at < CONTROL_MIN_INTERVAL:
                    return False
                self._ingest_checked_at = now
                self._ingest_due = False
            seen = self._pending
            if not seen.deferred and lokidir.file_stamp(self.paths.pending) == seen.stamp:
                return False
        try:
            result, stamp = await trio.to_thread.run_sync(
                lokidir.ingest_pending_file, self.paths.pending, known
            )
        except lokidir.LokiDirFormatError as exc:
            await self._warn("malformed_file", exc.message, file="queue/pending.json")
            self._pending = PendingView(lokidir.file_stamp(self.paths.pending), readable=False)
            return False
        self._pending = PendingView(stamp, deferred=result.deferred, wrapper=result.wrapper)
        for line in result.warnings:
            await self._warn("malformed_file", line, file="queue/pending.json")
        if result.tasks:
            await self._add_agent_tasks(result.tasks)
        return bool(result.tasks)

    async def _sync_loki(self, *, ingest: bool) -> None:
        """Ingest agent-added tasks, then write the state files (one at a time)."""
        if not self._bootstrapped and not self.paths.root.is_dir():
            return  # not bootstrapped yet
        async with self._sync_lock:
            if not ingest and self._final_state is not None:
                session, tasks = self._final_state  # read by the final transition
            else:
                session, tasks = await self.store.read(self._read_state)
            known = {task.id for task in tasks}
            if ingest and await self._ingest(known, force=False, throttle=False):
                session, tasks = await self.store.read(self._read_state)
            seen = self._pending

            def write() -> PendingView:
                # The session ended: a file with tasks not taken stays as it is (read
                # in the write's own thread hop).
                pending = seen if ingest else pending_view(self.paths.pending, known)
                return write_mirror(
                    self.paths,
                    session,
                    tasks,
                    pending=pending,
                    pid=os.getpid(),
                    version=__version__,
                    retries=self._retries,
                    last_exit_code=self._last_exit_code,
                    state=self._mirror,
                )

            try:
                self._pending = await trio.to_thread.run_sync(write)
            except LokiError as exc:
                await self._warn("loki_dir", exc.message)

    def _read_state(self, db: sqlite_utils.Database) -> tuple[dict[str, Any], list[RunnerTask]]:
        return get_session_fields(db, self.id), runner_tasks(db, self.id)

    async def _add_agent_tasks(self, new: tuple[lokidir.AgentTask, ...]) -> None:
        self._final_state = self._fresh_tasks = None  # the last write and the next step read
        await add_agent_tasks(self.store, self.bus, self.id, new)
        self._mirror_dirty.set()  # their files, and the next read of what a read left
        self._poke()

    # -- one task -----------------------------------------------------------------------

    async def _work_on(self, worker: _Worker, task: RunnerTask, iteration: int) -> None:
        try:
            async with self.pool.slot(
                self.id, max_for_session=self.options.get("maxAgents")
            ) as slot:
                if self.status is not Status.RUNNING or self._ending is not None:
                    self.iteration -= 1  # paused or ending while we waited: no run
                    return
                worker.has_slot = True
                await self._run_task(worker, slot, task, iteration)
        except PoolBusy:  # the pool's queue is full: this task waits for a later round
            self.iteration -= 1
            self._not_before[task.id] = trio.current_time() + self.settings.control_poll
        except PoolClosed:  # no run: the task, if marked active, is put back by the end
            if not worker.has_slot:
                self.iteration -= 1
            self._pool_stopping()
        finally:
            self._workers.pop(task.id, None)
            self._controls_due = self._ingest_due = True
            self._poke()

    async def _run_task(
        self, worker: _Worker, slot: Slot, task: RunnerTask, iteration: int
    ) -> None:
        cwd = self.project_dir
        tree: worktree.Worktree | None = None
        if self.options.get("parallel") and await worktree.is_git_repo(self.project_dir):
            try:
                tree = await worktree.create_worktree(
                    self.project_dir, session_id=self.id, task_id=task.id
                )
                cwd = tree.path
            except LokiError as exc:
                await self._warn("worktree", exc.message, taskId=task.id)
        inputs = await self._claim_inputs()
        try:
            await self._run_agent(worker, slot, task, iteration, cwd, tree, inputs)
        finally:
            # Applied once its agent started; else back to the queue for a later prompt.
            self._claimed_inputs.difference_update(item["id"] for item in inputs)
            if tree is not None:
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(WORKTREE_LOKI_WAIT):
                        await self._take_worktree_loki(tree, task.id)
                    with trio.move_on_after(60):
                        try:
                            await worktree.remove_worktree(self.project_dir, tree)
                        except LokiError as exc:
                            await self._warn("worktree", exc.message, taskId=task.id)

    async def _take_worktree_loki(self, tree: worktree.Worktree, task_id: str) -> None:
        """Take what the agent wrote in its worktree's own `.loki/` (`lokid.worktree_loki`)
        before the worktree, and that folder with it, is removed, whatever the run's
        outcome: its new tasks, and a completion request, as if written in the project's."""
        try:
            request = await take_worktree_loki(
                self.store, self.bus, self.id, tree.path, task_id, self._warn
            )
        except LokiError as exc:  # the store refused: they go with the worktree
            log.warning("%s: %s's .loki/ not taken: %s", self.name, tree.path, exc.message)
            return
        self._final_state = self._fresh_tasks = None
        self._mirror_dirty.set()
        if request is not None and self._completion is None:
            self._completion = request.statement or "the agent requested completion"
        self._poke()

    async def _claim_inputs(self) -> list[dict[str, Any]]:
        """The queued inputs for the next prompt, claimed for it: oldest first, each whole.

        Parallel workers build their prompts at the same time and the inputs stay
        `queued` in the store until an agent started: the claim (in memory, so a
        crash loses none) keeps another worker's prompt from taking them too. What
        does not fit waits for the next prompt; the caller releases the claim.
        """
        if not self._inputs_maybe:  # a new session given no input: nothing to read
            return []
        queued = await self.store.read(lambda db: pending_inputs(db, self.id))
        free = [item for item in queued if item["id"] not in self._claimed_inputs]
        inputs = free[: inputs_that_fit([item["message"] for item in free])]
        self._claimed_inputs.update(item["id"] for item in inputs)
        return inputs

    async def _run_agent(
        self,
        worker: _Worker,
        slot: Slot,
        task: RunnerTask,
        iteration: int,
        cwd: Path,
        tree: worktree.Worktree | None,
        inputs: list[dict[str, Any]],
    ) -> None:
        attempt = task.attempts + 1
        prompt = build_prompt(
            PromptTask(task.id, task.title, task.description, task.acceptance, attempt),
            prd_path=str(self.prd_path),
            prd_title=self.prd_title,
            human_input=[item["message"] for item in inputs],
            previous_error=task.error,
            iteration=iteration,
            loki_dir=None if tree is None else str(self.paths.root),
        )
        try:
            command = providers.build_command(
                self.provider,
                prompt,
                model=None,
                project_dir=cwd,
                options={key: value for key, value in self.options.items() if value is not None},
                resume=task.resume_id,
            )
        except LokiError as exc:  # e.g. a prompt too large for a CLI that takes it in argv
            failure = providers.Failure(providers.FailureKind.PERMANENT, "command", exc.message)
            await self._task_failed(task, attempt, failure)
            return
        argv: tuple[str, ...] = command.argv
        if self.options.get("sandbox"):
            writable = [self.project_dir, *_provider_state_dirs()]
            argv = sandbox.bwrap_argv(argv, writable=writable, cwd=cwd)
        spec = AgentSpec(
            argv=argv,
            cwd=cwd,
            env={
                **command.env,
                **self.settings.env,
                "LOKI_SESSION_ID": self.id,
                "LOKI_TASK_ID": task.id,
            },
            stdin=command.stdin,
            idle_timeout=self.settings.idle_timeout,
            hard_timeout=max(1.0, min(self.settings.hard_timeout, self._deadline_left())),
            stop_grace=self.settings.grace,
        )
        now = utc_now_iso()

        def start_task(db: sqlite_utils.Database) -> None:
            update_task(
                db,
                self.id,
                task.id,
                status="active",
                attempts=attempt,
                started_at=now,
                completed_at=None,
            )
            # Parallel workers start in any order: keep the highest number reached.
            reached = max(iteration, session_iteration(db, self.id))
            set_session_fields(db, self.id, iteration=reached)

        await self.bus.publish_with(
            start_task,
            "task.started",
            self.id,
            Level.INFO,
            {"taskId": task.id, "title": task.title, "attempt": attempt, "iteration": iteration},
        )
        self._mirror_dirty.set()
        run: AgentRun | None = None
        result: RunResult | None = None
        parser = providers.parser_for(command.output_format)
        stderr = providers.TailBuffer()
        resume_id: list[str] = []
        run_started = trio.current_time()
        agent_id = ""  # set once its `agent.spawned` is stored: no end without it
        cut_off = False
        try:
            with worker.scope:
                try:
                    run = await slot.start(
                        spec, task.id, record_with=self._recorder(inputs, task.id)
                    )
                except OSError as exc:  # by errno: the CLI, the folder or a shortage
                    failure = providers.spawn_failure(exc, argv[0], os.fspath(spec.cwd))
                    await self._task_failed(task, attempt, failure)
                    return
                self._runs += 1
                spawned = f"agent-{slot.row_id}"
                await self._agent_spawned(spawned, run, task.id, command, iteration)
                agent_id = spawned  # announced: from now on its end is published too
                await self._read_output(run, parser, stderr, task.id, resume_id)
                result = await run.wait()
        except BaseException:  # a stop, a shutdown (or a crash): no end publish below
            cut_off = True
            raise
        finally:
            if run is not None and result is None:  # cut off: stop it before the slot goes
                with trio.CancelScope(shield=True):
                    result = await self._stop_unread(run)
            if result is not None:
                self._survivors.extend(result.survivors)
                if cut_off and agent_id:
                    await self._agent_cut_off(agent_id, task.id, result, parser.finish())
        if result is None or run is None:
            if worker.cut_by_pause:  # paused ?now=true before the agent started
                await self._requeue(task, "stopped by pause ?now=true", resume_id)
            return
        if result.reason is EndReason.STOPPED and not worker.scope.cancel_called:
            # Not stopped by this session: by the pool, which only does so when it stops
            # (a hurried daemon stop). Cut off, not failed: the end puts the task back.
            self._pool_stopping()
            await self._agent_cut_off(agent_id, task.id, result, parser.finish())
            return
        outcome = parser.finish()
        if outcome.result is not None and outcome.result.cost_usd:
            self.cost_usd += outcome.result.cost_usd
        self._last_exit_code = result.exit_code
        seconds = trio.current_time() - run_started
        if _cut_at_deadline(worker, result):
            # Its hard timeout is that deadline: reported as that timeout, which may
            # have fired already (the agent taking its grace) or not yet.
            result = attrs.evolve(result, reason=EndReason.HARD_TIMEOUT)
            failure = self._deadline_failure(seconds)
        else:
            failure = self._verdict(result, outcome, stderr, spec, seconds=seconds)
        worker.run_over = True
        ended: EventArgs = (
            "agent.completed" if failure.ok else "agent.failed",
            self.id,
            Level.INFO if failure.ok else Level.WARNING,
            {
                "agentId": agent_id,
                "kind": "process",
                "taskId": task.id,
                "exitCode": result.exit_code,
                "endReason": result.reason.value,
                "summary": outcome.summary,
                "costUsd": outcome.result.cost_usd if outcome.result else None,
                "survivors": list(result.survivors),
                **({} if failure.ok else {"code": failure.code, "error": failure.reason}),
            },
        )
        # The agent's end and the task's in one transaction (one ask, one commit),
        # unless the run's task is not this run's to settle, or a merge comes between.
        if not self._ends_run_here(worker) and (tree is None or not failure.ok):
            if failure.ok:
                await self._task_completed(task, attempt, before=[ended])
            else:
                await self._task_failed(task, attempt, failure, resume_id, before=[ended])
            return
        await self.bus.publish(*ended)
        if self._stop_wanted or self._shutdown:
            return  # the end transition puts the task back
        if worker.cut_by_pause:
            await self._requeue(task, "stopped by pause ?now=true", resume_id)
            return
        if not failure.ok:
            await self._task_failed(task, attempt, failure, resume_id)
            return
        if tree is not None and not await self._merge(task, tree, attempt):
            return
        await self._task_completed(task, attempt)

    async def _agent_spawned(
        self,
        agent_id: str,
        run: AgentRun,
        task_id: str,
        command: providers.AgentCommand,
        iteration: int,
    ) -> None:
        """`agent.spawned`, with the task naming its agent in the same transaction.

        Shielded (bounded by the ask's timeout): its process runs, so a stop or a
        pause `?now=true` landing now must not drop the event, which left an end
        (`agent.failed`) for an agent never announced and the task's `agent` stale.
        """
        with trio.CancelScope(shield=True):
            await self.bus.publish_with(  # the task names its agent from now on
                lambda db: update_task(db, self.id, task_id, agent=agent_id),
                "agent.spawned",
                self.id,
                Level.INFO,
                {
                    "agentId": agent_id,
                    "kind": "process",
                    "pid": run.identity.pid,
                    "taskId": task_id,
                    "provider": self.provider,
                    "command": command.display(),
                    "sandbox": bool(self.options.get("sandbox")),
                    "iteration": iteration,
                },
            )

    async def _agent_cut_off(
        self, agent_id: str, task_id: str, result: RunResult, outcome: providers.Outcome
    ) -> None:
        """`agent.failed` for a run cut off by a stop, a shutdown or the session's end,
        whose cancellation skips the end publish of `_run_agent`: every
        `agent.spawned` gets its end.
        Shielded, for at most `CUT_OFF_END_WAIT` s (a hurried stop must stay bounded);
        not stored is logged."""
        why = "run cut off"  # e.g. the session ended another way, or a hurried stop
        if self._stop_wanted:
            why = "run cut off: the session was stopped"
        elif self._shutdown:
            why = "run cut off: the daemon is stopping"
        data = {
            "agentId": agent_id,
            "kind": "process",
            "taskId": task_id,
            "exitCode": result.exit_code,
            "endReason": result.reason.value,
            "summary": outcome.summary,
            "costUsd": outcome.result.cost_usd if outcome.result else None,
            "survivors": list(result.survivors),
            "code": "stopped",
            "error": why,
        }
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + CUT_OFF_END_WAIT
            try:
                await self.bus.publish("agent.failed", self.id, Level.WARNING, data)
            except LokiError as exc:
                log.warning("%s: the end of %s was not recorded: %s", self.name, agent_id, exc)
        if scope.cancelled_caught:
            log.warning("%s: the end of %s was not recorded in time", self.name, agent_id)

    async def _stop_unread(self, run: AgentRun) -> RunResult:
        """Stop a run whose output is no longer read, discarding what it still prints:
        with its buffer full, the host's pipe readers would hold up the end of the run."""
        async with trio.open_nursery() as nursery:

            async def discard() -> None:
                async for _ in run.batches():
                    pass

            nursery.start_soon(discard)
            result = await run.stop(self.settings.grace)
            nursery.cancel_scope.cancel()
        return result

    async def _merge(self, task: RunnerTask, tree: worktree.Worktree, attempt: int) -> bool:
        """Merge a parallel run's worktree; False when it did not.

        A run whose work is not merged is a failed run (backoff, counts toward
        `max_task_attempts`): the task runs again on the merged work of the
        others, in a new worktree. Only a project that refuses the merge by its
        own state pauses the session instead (`_pause_for_project`): a rerun
        cannot fix that, the person must."""
        try:
            merged = await worktree.merge_worktree(
                self.project_dir, tree, message=f"loki: {task.id} {task.title}"
            )
        except worktree.GitError as exc:
            await self._warn("worktree", exc.message, taskId=task.id)
            failure = _merge_failure("merge_failed", f"not merged: {exc.message}")
            await self._task_failed(task, attempt, failure)
            return False
        if merged.outcome is worktree.MergeOutcome.BLOCKED and merged.blocked_by_project:
            await self._pause_for_project(task, merged.message)
            return False
        if merged.outcome is worktree.MergeOutcome.CONFLICT:
            await self._warn("merge", merged.message, taskId=task.id, branch=tree.branch)
            failure = _merge_failure("merge_conflict", f"not merged: {merged.message}")
            await self._task_failed(task, attempt, failure)
            return False
        if merged.outcome is worktree.MergeOutcome.BLOCKED:  # by the agent's worktree
            await self._warn("merge", merged.message, taskId=task.id, branch=tree.branch)
            await self._task_failed(task, attempt, _merge_failure("merge_blocked", merged.message))
            return False
        return True

    async def _pause_for_project(self, task: RunnerTask, message: str) -> None:
        """The project's own state refused the merge (uncommitted changes the merge
        would overwrite, the person's merge or rebase, a locked index): the task goes
        back to `pending` without counting a failure and the session pauses (source
        `merge`, `.loki/PAUSE` created) until the person fixes it and resumes. Rerunning
        the agent meanwhile would only pay for runs that cannot be merged either."""
        await self._requeue(task, message, [])
        await self.bus.publish(  # one per occurrence: each needs the person's resume
            "warning",
            self.id,
            Level.WARNING,
            {
                "reason": "merge_blocked",
                "message": f"{task.id}: {message}. The session is paused: commit or stash "
                "those changes (or finish your git operation), then resume it",
                "taskId": task.id,
            },
        )
        with contextlib.suppress(IllegalTransition):  # paused already, or stopping
            await self._fire(
                Trigger.PAUSE, data={"source": "merge", "now": False, "taskId": task.id}
            )
            await self._control_file(self.paths.pause, present=True)

    def _verdict(
        self,
        result: RunResult,
        outcome: providers.Outcome,
        stderr: providers.TailBuffer,
        spec: AgentSpec,
        *,
        seconds: float,
    ) -> providers.Failure:
        """The run's verdict; `seconds` is how long it ran (for a timeout's message)."""
        if result.reason is EndReason.IDLE_TIMEOUT:
            return providers.timeout_failure("idle", self.settings.idle_timeout)
        if result.reason is EndReason.HARD_TIMEOUT:
            if spec.hard_timeout < self.settings.hard_timeout:  # cut to the session's deadline
                return self._deadline_failure(seconds)
            return providers.timeout_failure("hard", self.settings.hard_timeout)
        if self.options.get("sandbox"):
            unstarted = sandbox.exec_failure(result.exit_code, stderr.text())
            if unstarted is not None:  # bwrap never started the CLI: no retry can help
                code, reason = unstarted
                return providers.Failure(
                    providers.FailureKind.PERMANENT, code, reason, result.exit_code
                )
        return outcome.failure(result.exit_code, stderr.text())

    def _deadline_failure(self, seconds: float) -> providers.Failure:
        """A run the session's time limit ended after `seconds`: transient, but the
        session ends with it, so it is not retried."""
        return providers.Failure(
            providers.FailureKind.TRANSIENT,
            "timeout",
            f"{self._time_limit()} ended the run after {round(seconds, 1):g} s",
        )

    async def _read_output(
        self,
        run: AgentRun,
        parser: providers.OutputParser,
        stderr: providers.TailBuffer,
        task_id: str,
        resume_id: list[str],
    ) -> None:
        async for batch in run.batches():
            events: list[EventArgs] = []
            for line in batch:
                if line.stream is Stream.STDERR:
                    stderr.feed(line.data + b"\n")
                    continue
                for record in parser.feed(line.data):
                    if isinstance(record, providers.SystemInit) and record.session_id:
                        resume_id[:] = [record.session_id]
                        await self._remember_resume_id(task_id, record.session_id)
                    spec = providers.to_event(record)
                    if spec is not None:
                        data = {**spec.data, "taskId": task_id, "provider": self.provider}
                        events.append((spec.type, self.id, spec.level, data))
            if events:
                await self.bus.emit_many(events)
                if not self.store.writable:  # the bus only logs what it could not store
                    raise StoreUnavailable(
                        f"the agent's output cannot be stored: {self.store.unwritable_reason}"
                    )

    async def _remember_resume_id(self, task_id: str, provider_session: str) -> None:
        """Kept so that a run cut off by a daemon crash is continued, not restarted."""
        await self.store.write(
            lambda db: update_task(db, self.id, task_id, resume_id=provider_session)
        )

    def _recorder(self, inputs: list[dict[str, Any]], task_id: str) -> RecordWith | None:
        """How the agent pool records the start of an agent whose prompt holds `inputs`:
        its row, the inputs marked applied and one `input.applied` each, in one
        transaction, committed before the agent is let run (docs/sessions.md).

        A crash before that commit leaves the inputs `queued`, and the agent never
        ran (a held start, lokid/agent_host.py): they go into a later prompt. After
        it, they were delivered and are never delivered again. A pause `?now=true`
        or a stop cannot split the marks from their events either (the pool's
        start is shielded).
        """
        if not inputs:
            return None
        input_ids = [item["id"] for item in inputs]
        applied: list[EventArgs] = [
            ("input.applied", self.id, Level.INFO, {"inputId": input_id, "taskId": task_id})
            for input_id in input_ids
        ]
        *along, (type, session_id, level, data) = applied

        async def record(insert: Callable[[sqlite_utils.Database], int]) -> int:
            def write(db: sqlite_utils.Database) -> int:
                row_id = insert(db)
                # All `queued` (this prompt claimed them); the row is how the next start
                # finds them if this agent never runs (the daemon dies before the release).
                mark_inputs_applied(db, input_ids, agent_row=row_id)
                return row_id

            try:
                _, row_id = await self.bus.publish_with(
                    write, type, session_id, level, data, along=along, timeout=ROW_WRITE_TIMEOUT
                )
            except AskTimeout:
                # The pool stops the held agent (it never runs), but the bus still runs a
                # message whose caller gave up: the marks may commit after all.
                await self._requeue_unreleased(input_ids)
                raise
            return row_id

        return record

    async def _requeue_unreleased(self, input_ids: list[str]) -> None:
        """Queue again the inputs of a recorded start that timed out, if its write lands
        after all, with a `warning` `input_requeued` after their `input.applied`.

        Sent through the bus, which keeps its mailbox's order: this runs after the
        timed-out write, in the same transaction or a later one. If it times out too,
        the bus still runs it; if the store refuses it, the inputs stay `applied` (the
        next start's reconciliation closes the row as `gone`; docs/sessions.md)."""

        def write(db: sqlite_utils.Database) -> list[str]:
            ids = requeue_inputs_of_unreleased(db, input_ids, ended_at=utc_now_iso())
            if not ids:  # the timed-out write never landed: nothing to say
                raise _NothingLanded
            return ids

        data = {
            "reason": "input_requeued",
            "message": f"{len(input_ids)} input(s) announced applied reached no agent: its start"
            " was not recorded in time and the agent never ran; they go into a later prompt",
            "inputIds": input_ids,
        }
        try:
            await self.bus.publish_with(
                write, "warning", self.id, Level.WARNING, data, timeout=ROW_WRITE_TIMEOUT
            )
        except _NothingLanded:
            pass
        except LokiError as exc:
            log.warning("%s: inputs %s may stay applied: %s", self.name, input_ids, exc)

    def _ends_run_here(self, worker: _Worker) -> bool:
        """The session stops or shuts down, or a pause cut this run: its task is not
        completed by it (put back by the end transition, or requeued)."""
        return self._stop_wanted or self._shutdown or worker.cut_by_pause

    async def _task_completed(
        self, task: RunnerTask, attempt: int, *, before: Sequence[EventArgs] = ()
    ) -> None:
        self._consecutive_failures = self._consecutive_rate_limits = 0
        self._not_before.pop(task.id, None)
        now = utc_now_iso()

        def write(db: sqlite_utils.Database) -> None:
            update_task(
                db,
                self.id,
                task.id,
                status="completed",
                completed_at=now,
                error=None,
                resume_id=None,
            )
            set_session_fields(db, self.id, cost_usd=self.cost_usd)

        await self.bus.publish_with(
            write,
            "task.completed",
            self.id,
            Level.INFO,
            {"taskId": task.id, "title": task.title, "attempts": attempt},
            before=before,
        )
        self._mirror_dirty.set()
        if self._ending is None:  # the budget is the scheduler's (it knows what is left)
            self._ending = self._time_up()
        self._poke()

    async def _requeue(self, task: RunnerTask, note: str, resume_id: list[str]) -> None:
        await self.store.write(
            lambda db: update_task(
                db,
                self.id,
                task.id,
                status="pending",
                error=note,
                resume_id=resume_id[0] if resume_id else None,
            )
        )
        self._mirror_dirty.set()

    async def _task_failed(
        self,
        task: RunnerTask,
        attempt: int,
        failure: providers.Failure,
        resume_id: list[str] | None = None,
        *,
        before: Sequence[EventArgs] = (),
    ) -> None:
        # A rate limit is the provider's, not the task's or the agent's: it uses up no
        # attempt and no consecutive failure; maxIterations and the waits bound it.
        rate_limited = failure.kind is providers.FailureKind.RATE_LIMIT
        if rate_limited:
            self._consecutive_rate_limits += 1
        else:
            self._consecutive_failures += 1
        self._retries += 1
        now_wall = dt.datetime.now(dt.UTC)
        delay = providers.retry_delay(
            failure,
            self._consecutive_rate_limits if rate_limited else self._consecutive_failures,
            rng=self.rng,
            now=now_wall,
            base=self.settings.retry_base,
            cap=self.settings.retry_cap,
        )
        final = delay is None or (not rate_limited and attempt >= self.settings.max_task_attempts)
        time_left = self._deadline_left()
        no_retry = time_left <= 0 or self._ending is not None  # the session ends

        def write(db: sqlite_utils.Database) -> None:
            update_task(
                db,
                self.id,
                task.id,
                status="failed" if final else "pending",
                error=failure.reason,
                completed_at=utc_now_iso() if final else None,
                resume_id=None,
            )
            set_session_fields(db, self.id, cost_usd=self.cost_usd, last_error=failure.reason)

        data = {
            "taskId": task.id,
            "title": task.title,
            "attempt": attempt,
            "code": failure.code,
            "error": failure.reason,
            "retryInSeconds": None if final or delay is None or no_retry else round(delay, 3),
        }
        await self.bus.publish_with(
            write,
            "task.failed",
            self.id,
            Level.ERROR if final else Level.WARNING,
            data,
            before=before,
        )
        self._mirror_dirty.set()
        if self._ending is None:  # else the session ends already (it may have cut this run)
            self._after_failure(task, failure, delay, final=final, time_left=time_left)
        self._poke()

    def _after_failure(
        self,
        task: RunnerTask,
        failure: providers.Failure,
        delay: float | None,
        *,
        final: bool,
        time_left: float,
    ) -> None:
        """What a failed run means for the session: its ending, or when to retry."""
        if failure.kind is providers.FailureKind.PERMANENT:
            self._ending = Ending(Trigger.FAIL, "permanentError", failure.reason)
        elif time_left <= 0:
            self._ending = self._limit_reached()
        elif self._consecutive_failures >= self.settings.max_consecutive_failures:
            self._ending = Ending(
                Trigger.FAIL,
                "maxConsecutiveFailures",
                f"{self._consecutive_failures} failed runs in a row; last: {failure.reason}",
            )
        elif delay is not None and not final:
            if delay > time_left:
                self._ending = Ending(
                    Trigger.FAIL,
                    "maxDurationSeconds",
                    f"{self._time_limit()} runs out in {round(time_left, 1):g} s, "
                    f"before the next retry (in {round(delay, 1):g} s)",
                )
            elif failure.kind is providers.FailureKind.RATE_LIMIT:
                self._hold_until = trio.current_time() + delay
            else:
                self._not_before[task.id] = trio.current_time() + delay
        if self._ending is None:
            self._ending = self._limit_reached()

    # -- qa ------------------------------------------------------------------------------

    async def _verify(self) -> bool:
        """Run `options.verify`; True if it passed (or there is none)."""
        command = self.options.get("verify")
        if not command:
            return True
        await self._set_phase("qa")
        spec = AgentSpec(
            argv=("/bin/sh", "-c", command),
            cwd=self.project_dir,
            env={"LOKI_SESSION_ID": self.id},
            hard_timeout=self.settings.verify_timeout,
            stop_grace=self.settings.grace,
        )
        output = providers.TailBuffer(VERIFY_OUTPUT_CHARS)
        try:
            async with self.pool.slot(self.id) as slot:
                run = await slot.start(spec, None)
                async for line in run.lines():
                    output.feed(line.data + b"\n")
                result = await run.wait()
        except PoolClosed:  # not run: the session winds down (its work scope is cancelled)
            self._pool_stopping()
            return False
        if result.reason is EndReason.STOPPED:  # stopped by the pool, not a verdict
            self._pool_stopping()
            return False
        passed = result.exit_code == 0 and result.reason is EndReason.EXITED
        await self.bus.publish(
            "log",
            self.id,
            Level.INFO if passed else Level.WARNING,
            {
                "message": "verify passed" if passed else "verify failed",
                "verify": command,
                "exitCode": result.exit_code,
                "endReason": result.reason.value,
            },
        )
        if passed:
            return True
        tail = output.text()[-VERIFY_OUTPUT_CHARS:]

        def add_fix(db: sqlite_utils.Database) -> list[dict[str, Any]]:
            count = sum(1 for t in runner_tasks(db, self.id) if t.id.startswith("verify-"))
            fix = _FixTask(
                id=f"verify-{count + 1:03d}",
                title=f"Make the verification pass: {command}"[:200],
                description=f"`{command}` exited with {result.exit_code}. Output (end):\n{tail}",
                priority=0,
                acceptance=(f"`{command}` exits with status 0",),
            )
            return insert_tasks(db, self.id, [fix], source="agent")

        for task in await self.store.write(add_fix):
            await self.bus.publish(
                "task.created",
                self.id,
                Level.INFO,
                {"taskId": task["id"], "title": task["title"], "source": "agent"},
            )
        await self._set_phase("development")
        return False


def undelivered_inputs_warning(db: sqlite_utils.Database, session_id: str) -> dict[str, Any] | None:
    """The `warning` data (`reason: input_undelivered`, `message`, `inputIds`) for the
    inputs still queued, or None: for a session that ends for good (completed, failed,
    stopped), whoever ends it - its actor, or the manager for a session without one.

    Input accepted (202) but still queued then reaches no agent (a prompt takes what
    fits in 64 KiB; no task was left for the rest): say so rather than drop it
    silently. An interrupted or paused session keeps its queue for the resume.
    """
    queued = pending_inputs(db, session_id)
    if not queued:
        return None
    return {
        "reason": "input_undelivered",
        "message": f"{len(queued)} input(s) reached no agent: the session ended before a "
        "run took them",
        "inputIds": [item["id"] for item in queued],
    }


def _merge_failure(code: str, reason: str) -> providers.Failure:
    """A run whose work was not merged: transient, retried with backoff like a failed run."""
    return providers.Failure(providers.FailureKind.TRANSIENT, code, reason)


def bootstrap_recorded(session: Mapping[str, Any]) -> bool:
    """The stored session finished its bootstrap: the bootstrap stores its tasks and
    phase `development` in one transaction, and a session has no phase before."""
    return session["phase"] is not None


def _cut_at_deadline(worker: _Worker, result: RunResult) -> bool:
    """The session's time limit cut this run off (`_end_runs_at_deadline`): its scope
    was cancelled and the agent had not exited by itself (a run that had finished is
    judged on its own result). A pause `?now=true` that cut it too keeps its meaning:
    the task goes back to `pending` without a failure."""
    return (
        worker.cut_at_deadline
        and not worker.cut_by_pause
        and worker.scope.cancelled_caught
        and result.reason is not EndReason.EXITED
    )


def _first_leaf(group: BaseExceptionGroup[StoreUnavailable]) -> StoreUnavailable:
    leaf: StoreUnavailable | BaseExceptionGroup[StoreUnavailable] = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf


@attrs.frozen
class _FixTask:
    id: str
    title: str
    description: str
    priority: int
    acceptance: tuple[str, ...]


def _bootstrap_problem(prd_path: Path, exc: LokiError | OSError) -> str:
    """Why the bootstrap failed, naming the file at fault once: a `.loki/` error names
    its own path; anything else is about the PRD."""
    if isinstance(exc, lokidir.LokiDirFormatError | lokidir.LokiDirWriteError):
        return exc.message
    message = exc.message if isinstance(exc, LokiError) else f"{exc.strerror}"
    return f"{prd_path}: {message}"


def _prepare_project(
    paths: lokidir.LokiPaths, prd_path: Path, new: bool, look_at_pending: bool
) -> tuple[PrdParseResult, PendingView | None]:
    """Bootstrap's file work, in one worker thread: `.loki/`, the PRD, its tasks.

    With `look_at_pending` (a session still `starting`: its tasks in the store
    will be the PRD's), also what the runner would read of `queue/pending.json`
    first: a view if it holds nothing but the PRD's tasks (e.g. the empty queue
    just made), so the first ingest needs no read while the file keeps that
    stamp; None if it holds more, or cannot be read (read again after the bootstrap).
    """
    lokidir.init_loki_dir(paths.project)
    if new:  # nothing of an earlier run applies
        _fresh_run_files(paths)
    parsed = _read_prd(prd_path)
    if not look_at_pending:
        return parsed, None
    try:
        found, stamp = lokidir.ingest_pending_file(
            paths.pending, {task.id for task in parsed.tasks}
        )
    except lokidir.LokiDirFormatError:
        return parsed, None
    if found.tasks or found.deferred or found.warnings or stamp is None:
        return parsed, None
    return parsed, PendingView(stamp, wrapper=found.wrapper)


def _read_prd(prd_path: Path) -> PrdParseResult:
    return parse_prd_detailed(validate_prd_bytes(_read_bounded(prd_path)))


def _fresh_run_files(paths: lokidir.LokiPaths) -> None:
    """Drop an earlier run's control signals and queues (its tasks are not this PRD's)."""
    lokidir.clear_stale_controls(paths)
    for path in [paths.queue(name) for name in ("pending", "in-progress", "completed", "failed")]:
        if _has_entries(path):
            lokidir.atomic_write_bytes(path, lokidir.encode_queue([]), durable=False)
    if _has_entries(paths.current_task):
        lokidir.atomic_write_bytes(
            paths.current_task, lokidir.encode_current_task(None), durable=False
        )


def _has_entries(path: Path) -> bool:
    """The file holds something other than an empty list or object (cheap: no parse).

    Opened without blocking: a FIFO named like a queue file (no writer) must not
    hang the bootstrap; anything but a regular file is left to the readers, which
    report it as a warning."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        head = os.read(fd, 64).strip()
    except OSError:
        return False
    finally:
        os.close(fd)
    return head not in (b"", b"[]", b"{}")


PROVIDER_STATE_DIRS = (".claude", ".codex", ".gemini", ".aider", ".cline", ".config", ".cache")


def _provider_state_dirs() -> list[Path]:
    """Folders in $HOME where provider CLIs keep logins and state: writable in the sandbox."""
    home = Path.home()
    return [home / name for name in PROVIDER_STATE_DIRS if (home / name).is_dir()]


def _read_bounded(path: Path) -> bytes:
    """The PRD's bytes; `LokiDirFormatError` if it is not a regular file of at most
    `MAX_PRD_BYTES`.

    Checked at creation, but a resume reads it again later: by then the path may be
    a FIFO, which a blocking open would wait on forever."""
    found = lokidir.read_file(path, limit=MAX_PRD_BYTES)
    if found is None:
        raise FileNotFoundError(errno.ENOENT, "PRD not found", str(path))
    return found.data
