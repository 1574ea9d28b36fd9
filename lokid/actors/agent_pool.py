"""AgentPool: the global cap on agent processes, fair slots, durable records, reconciliation.

Theory of operation:

* **Slots.** A session that wants to run an agent takes a slot:
  ``async with pool.slot(session_id, max_for_session=n) as slot:`` and then
  ``run = await slot.start(spec, task_id)``. At most `max_agents` slots are
  held at once, so at most `max_agents` agent processes run. A slot runs
  one agent. Leaving the block stops the agent if it is still alive (group
  TERM, `grace`, KILL), waits until its row is closed, then frees the slot.
* **Fairness.** Requests wait in one FIFO queue per session. When a slot is
  free it goes to the waiting session holding the *fewest* slots; ties go
  to the session served least recently, then to the oldest request. Between
  sessions that hold the same number of slots this is round-robin; a
  session holding many slots never gets one before a session holding fewer,
  so queuing 50 requests buys nothing over queuing one. A request whose
  session already holds its `max_for_session` slots is skipped (it keeps
  its place) and the slot goes to the next eligible session.
* **Waiting is cancellable.** A cancelled request leaves its queue; a slot
  granted to a request that was cancelled before it resumed is given back
  at once.
* **Records before waiting.** `slot.start` spawns the agent (own session
  and process group, see `lokid.agent_host`), commits its row in `agents`
  (pid + start ticks + boot id, never a bare pid) and only then returns the
  run; a watcher closes the row (`ended_at`, `exit_code`, `end_reason`) when
  the run ends. If the row cannot be committed the agent is stopped and
  `start` raises: an agent the store does not know about must not run.
  Spawn and record run shielded from cancellation (bounded by the store
  write timeout and the stop), so a cancelled session cannot leave an
  unrecorded process.
* **Ownership.** The agent processes run in a nursery of the pool's task
  (inside a shielded scope that only the pool cancels, after every agent has
  been stopped), so a cancelled session task never cancels the supervision
  of a process it started. They belong to one incarnation of the pool: when
  the task stops (graceful stop, crash or cancellation) `stop_all` runs
  shielded first.
* **Rows close while the store runs.** A watcher closes an ended agent's row
  through the store, but gives up as soon as the store task is not running
  (a daemon stop cut short, a store crash restarting the pool too): a
  stopped store never answers, and the next start's reconciliation closes
  the row (`gone`, "exited"). So stopping the pool never waits for a store
  that has gone. A close the store refuses (disk full, database locked)
  frees the slot at once and is tried again in the background with
  backoff (`CLOSE_RETRY_FIRST` doubling to `CLOSE_RETRY_CAP`) for at most
  `CLOSE_RETRY_FOR` (1 h), with the end time of the run: an open row
  counts as a live agent (`agents.active` of its session).
* **Hurry** (`hurry`, a daemon stop that ran out of `shutdown_grace` or got
  a second signal): the pool closes and every live agent gets SIGKILL at
  once instead of waiting out its SIGTERM grace; every later stop of this
  incarnation (slot exit, `stop_all`) has no grace. The group is still
  checked empty (bounded, as always) before the slot is freed: hurrying
  never leaves a process behind.
* **Reconciliation** (`setup`, before the supervisor hears "started", and
  before any slot is granted): every row with `ended_at IS NULL` that is not
  an agent of this process is checked. A process group is signalled only if
  its leader is still exactly the recorded process (pid and start ticks), or
  if no process with the recorded pid exists and live members of the group
  remain (the kernel never hands out a pid that is still some group's id,
  so they are that agent's). The check is repeated before each signal. The
  group gets SIGTERM, `grace` seconds, SIGKILL, then a bounded wait until it
  is empty. The row becomes `reconciled` when live processes were killed,
  `gone` when nothing of it was alive or it cannot be verified (pid reused,
  recorded before a reboot). Nothing is raised for a row. A row whose agent
  **never ran** - its held launcher is still waiting, or wrote
  `<held_dir>/<pid>.<start ticks>` when it saw the dead daemon's end-of-file instead of
  the release (lokid.agent_host) - gets back, in the transaction that closes
  it, the inputs its start marked applied: they are `queued` again
  (`ReconcileOutcome.requeued_inputs`), for the next prompt. The files in
  `held_dir` are removed once the rows are closed.
* **Stop everything** (`stop_all`, run by the task on its way out): no new
  slot or agent, every waiting request gets `PoolClosed`, every live agent
  is stopped (group TERM, grace, KILL), and it returns once every row is
  closed (or left to reconciliation, above). A new incarnation of the task
  (restart) opens the pool again.

Bounds and policies:

* slots held: at most `max_agents` (the cap itself);
* waiting requests per session: `max_waiters_per_session` (default 64);
  one more raises `PoolBusy` at once;
* sessions with waiting requests: `max_waiting_sessions` (default 1024); a
  request from one more session raises `PoolBusy` at once;
* live agents: at most `max_agents`; each has one watcher task;
* reconciliation reads open rows in pages of `RECONCILE_PAGE` and kills the
  groups of one page concurrently (one grace per page, not per row);
* per-agent output is bounded by `lokid.agent_host` (a slot holder must read
  `run.lines()` or the agent blocks on its pipe).

Mailbox: the pool's API is not message based. Slots are a scheduling
primitive used from session tasks (like a `trio.CapacityLimiter`); every
state change is a synchronous section on the trio loop, so it is atomic
without an extra hop and an extra queue. The class still is an `Actor` for
the supervisor's lifecycle (setup = reconcile, graceful stop = `stop_all`)
and statistics. `mailbox_size = 1`, `WhenFull.REJECT`; it takes no message
(one that arrives anyway is answered with `BadRequest`).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import logging
import os
import pathlib
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, ClassVar, cast

import attrs
import sqlite_utils
import trio

from lokid.actor import Actor, ActorStatistics, WhenFull
from lokid.actors.store import StoreActor
from lokid.agent_host import (
    AgentRun,
    AgentSpec,
    LocalAgentHost,
    LocalAgentRun,
    RunResult,
    still_held,
)
from lokid.crashpoints import crash_point
from lokid.errors import BadRequest, LokiError, Unavailable
from lokid.process import ProcessIdentity, scan_groups, start_ticks
from lokid.session_records import requeue_inputs_of_agents
from lokid.timefmt import utc_now_iso

log = logging.getLogger("lokid.agents")

DEFAULT_MAX_AGENTS = 10
DEFAULT_GRACE = 5.0
KILL_WAIT_SECONDS = 5.0  # after SIGKILL, how long reconciled groups may take to disappear
POLL_SECONDS = 0.05  # /proc polling while waiting for a group to empty
ROW_WRITE_TIMEOUT = 10.0
RecordWith = Callable[[Callable[[sqlite_utils.Database], int]], Awaitable[int]]
"""`Slot.start(record_with=...)`: commits the agent row's insert with the caller's records."""
# A row close the store refused (disk full, database locked) is tried again after
# CLOSE_RETRY_FIRST s, doubling up to CLOSE_RETRY_CAP, for CLOSE_RETRY_FOR s at most;
# then (or when the pool or the store stops) the next start's reconciliation closes it.
CLOSE_RETRY_FIRST = 0.5
CLOSE_RETRY_CAP = 30.0
CLOSE_RETRY_FOR = 3600.0
RECONCILE_PAGE = 256
ARGV_ITEM_LIMIT = 1024  # characters of one argv item kept in the row
ARGV_ITEMS_LIMIT = 64  # argv items kept in the row

_STORE_STOPPED = "the store has stopped"

RECONCILED = "reconciled"
GONE = "gone"


# -- errors ------------------------------------------------------------------------


class PoolClosed(Unavailable):
    """The pool is stopping or stopped: no new slot, no new agent (503)."""


class PoolBusy(Unavailable):
    """A bound of the waiting queues was reached; the request was refused at once (503)."""


# -- records -----------------------------------------------------------------------


@attrs.frozen
class ReconcileOutcome:
    """What reconciliation did with one open row left by a previous daemon."""

    row_id: int
    session_id: str
    task_id: str | None
    pid: int
    end_reason: str  # RECONCILED or GONE
    detail: str  # "killed", "orphaned group killed", "exited", "pid reused", ...
    killed: tuple[int, ...] = ()  # pids of the group seen alive while it was being killed
    survivors: tuple[int, ...] = ()  # pids still alive after SIGKILL (should be none)
    escalated: bool = False  # SIGKILL was needed
    never_ran: bool = False  # its held start was never released: the agent never ran
    requeued_inputs: tuple[str, ...] = ()  # inputs its start marked applied, queued again


@attrs.frozen
class AgentPoolStatistics(ActorStatistics):
    """`ActorStatistics` plus the pool's own state and counters.

    `active` counts live agent processes (spawned, not yet ended),
    `slots_held` the granted slots (a slot may hold no process yet, or one
    that ended while its block is still open); `active <= slots_held <=
    capacity`. `waiting` maps a session id to its number of waiting requests.
    """

    capacity: int
    active: int
    slots_held: int
    waiting: dict[str, int]
    waiting_total: int
    open: bool
    started_total: int
    ended_total: int
    start_failures: int
    record_failures: int
    stopped_at_release: int
    escalated_total: int
    survivors_total: int
    rejected_total: int
    reconciled_killed: int
    reconciled_processes: int
    reconciled_gone: int


@attrs.define(eq=False)
class _Waiter:
    session_id: str
    max_for_session: int | None
    seq: int
    event: trio.Event = attrs.field(factory=trio.Event)
    granted: bool = False
    error: LokiError | None = None


@attrs.define(eq=False)
class _Agent:
    session_id: str
    task_id: str | None
    run: LocalAgentRun
    row_id: int | None = None
    closed: trio.Event = attrs.field(factory=trio.Event)


@attrs.define(eq=False)
class _OpenRow:
    row_id: int
    session_id: str
    task_id: str | None
    pid: int
    start_ticks: int
    boot_id: str | None


@attrs.define(eq=False)
class _Target:
    """A process group reconciliation kills."""

    row: _OpenRow
    detail: str
    seen: set[int] = attrs.field(factory=set)
    escalated: bool = False
    survivors: tuple[int, ...] = ()


# -- slots -------------------------------------------------------------------------


class Slot:
    """One granted slot: the right to run one agent process. Made by `AgentPool.slot`."""

    def __init__(self, pool: AgentPool, session_id: str) -> None:
        self.pool = pool
        self.session_id = session_id
        self._agent: _Agent | None = None
        self._starting = False
        self._released = False

    async def start(
        self, spec: AgentSpec, task_id: str | None = None, *, record_with: RecordWith | None = None
    ) -> AgentRun:
        """Spawn the agent and commit its row; return the run once the row is durable.

        `record_with(insert)`, if given, commits `insert` (the row's write, which
        returns the row id) in one transaction with what the caller records
        with the agent's start (the session: the inputs its prompt carries,
        marked applied, and their `input.applied`), and returns the row id. The
        agent runs only after that commit: a daemon killed before it leaves
        neither the row nor the caller's records, and an agent that never ran.

        Raises `PoolClosed` when the pool is stopping, the store's errors
        (`StoreUnavailable`, `AskTimeout`, ...) when the row could not be
        committed (the agent was stopped), and what spawning raised
        (`FileNotFoundError`, ...). A slot runs one agent: a second `start`
        after one succeeded raises `RuntimeError`.
        """
        if self._released:
            raise RuntimeError("this slot was released")
        if self._agent is not None or self._starting:
            raise RuntimeError("a slot runs one agent; take another slot for the next one")
        self._starting = True
        try:
            self._agent = await self.pool._start_agent(self.session_id, spec, task_id, record_with)
        finally:
            self._starting = False
        return self._agent.run

    @property
    def run(self) -> AgentRun | None:
        return None if self._agent is None else self._agent.run

    @property
    def row_id(self) -> int | None:
        """The agent's row in `agents`, once `start` returned."""
        return None if self._agent is None else self._agent.row_id

    async def _finish(self, grace: float) -> None:
        agent = self._agent
        if agent is None:
            return
        if agent.run.result is None and not agent.closed.is_set():
            self.pool._stopped_at_release += 1
            await agent.run.stop(grace)
        await agent.closed.wait()


# -- the actor ---------------------------------------------------------------------


class AgentPool(Actor[Any]):
    """Global cap on agent processes, fair across sessions; records and reconciles agents.

    See the module docstring for the rules. Bounds: `max_agents` slots,
    `max_waiters_per_session` waiting requests per session and
    `max_waiting_sessions` sessions with waiting requests; a request beyond
    a waiting bound raises `PoolBusy` at once (it never queues unboundedly).
    Mailbox: `mailbox_size = 1`, `WhenFull.REJECT`, unused (the API is
    `slot()`, `stop_all()`, `reconcile()`, `statistics()`).
    """

    mailbox_size: ClassVar[int] = 1
    when_full: ClassVar[WhenFull] = WhenFull.REJECT

    def __init__(
        self,
        store: StoreActor,
        *,
        max_agents: int = DEFAULT_MAX_AGENTS,
        grace: float = DEFAULT_GRACE,
        max_waiters_per_session: int = 64,
        max_waiting_sessions: int = 1024,
        held_dir: pathlib.Path | None = None,
        name: str = "agent_pool",
    ) -> None:
        if max_agents < 1:
            raise ValueError("max_agents must be >= 1")
        if grace < 0:
            raise ValueError("grace must be >= 0")
        if max_waiters_per_session < 1 or max_waiting_sessions < 1:
            raise ValueError("the waiting bounds must be >= 1")
        super().__init__(name)
        self.store = store
        self.max_agents = max_agents
        self.grace = grace
        self.max_waiters_per_session = max_waiters_per_session
        self.max_waiting_sessions = max_waiting_sessions
        self.held_dir = held_dir
        """Where a held start whose daemon died writes `<pid>.<start ticks>`
        (lokid.agent_host); None: nowhere, and only a launcher still waiting tells an
        agent that never ran."""
        self._held_dir_ok = False  # created: given to the host
        # slots
        self._open = False  # slots are granted and agents started
        self._closed = False  # stop_all ran: requests are refused until the next setup
        self._hurried = False  # hurry() ran: agents are stopped without a SIGTERM grace
        self._queues: dict[str, collections.deque[_Waiter]] = {}
        self._held = 0
        self._held_by_session: dict[str, int] = {}
        self._last_grant: dict[str, int] = {}  # only sessions that hold or wait
        self._grant_seq = 0
        self._waiter_seq = 0
        # agents
        self._host: LocalAgentHost | None = None
        self._nursery: trio.Nursery | None = None
        self._host_scope: trio.CancelScope | None = None
        self._live: dict[ProcessIdentity, _Agent] = {}
        self._spawning = 0
        self._last_reconcile: tuple[ReconcileOutcome, ...] = ()
        # statistics
        self._started_total = 0
        self._ended_total = 0
        self._start_failures = 0
        self._record_failures = 0
        self._stopped_at_release = 0
        self._escalated_total = 0
        self._survivors_total = 0
        self._rejected_total = 0
        self._reconciled_killed = 0
        self._reconciled_processes = 0
        self._reconciled_gone = 0

    # -- slots: the API sessions use ----------------------------------------------

    @contextlib.asynccontextmanager
    async def slot(
        self, session_id: str, *, max_for_session: int | None = None
    ) -> AsyncIterator[Slot]:
        """Wait (cancellably) for a slot; hold it for the block.

        `max_for_session` caps the slots this session holds at once
        (`options.maxAgents`); None means only the global cap applies.
        Raises `PoolClosed` (stopping) or `PoolBusy` (a waiting bound).
        On exit a still-running agent is stopped with the pool's `grace`,
        shielded from cancellation; the slot is freed once its row is closed.
        """
        if max_for_session is not None and max_for_session < 1:
            raise ValueError("max_for_session must be >= 1")
        await self._acquire(session_id, max_for_session)
        slot = Slot(self, session_id)
        try:
            yield slot
        finally:
            slot._released = True
            try:
                with trio.CancelScope(shield=True):
                    await slot._finish(self._grace_now)
            finally:
                self._release(session_id)

    async def _acquire(self, session_id: str, max_for_session: int | None) -> None:
        if self._closed:
            raise PoolClosed(f"{self.name} is stopping: no new agents")
        self._waiter_seq += 1
        waiter = _Waiter(session_id, max_for_session, self._waiter_seq)
        if (
            self._open
            and self._held < self.max_agents
            and session_id not in self._queues
            and self._eligible(waiter)
        ):
            # Free slot and nobody of this session ahead: the dispatcher has
            # already served every eligible waiter of other sessions.
            self._grant(waiter)
        else:
            queue = self._queues.get(session_id)
            if queue is None and len(self._queues) >= self.max_waiting_sessions:
                self._rejected_total += 1
                raise PoolBusy(
                    f"{self.name}: {self.max_waiting_sessions} sessions are already waiting "
                    "for an agent slot",
                    details={"sessionId": session_id},
                )
            if queue is not None and len(queue) >= self.max_waiters_per_session:
                self._rejected_total += 1
                raise PoolBusy(
                    f"{self.name}: session {session_id} already has "
                    f"{self.max_waiters_per_session} requests waiting for an agent slot",
                    details={"sessionId": session_id},
                )
            self._queues.setdefault(session_id, collections.deque()).append(waiter)
            self._dispatch()
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted:
                self._release(session_id)  # granted while we were being cancelled
            else:
                self._leave_queue(waiter)
            raise
        if waiter.error is not None:
            raise waiter.error

    def _eligible(self, waiter: _Waiter) -> bool:
        limit = waiter.max_for_session
        return limit is None or self._held_by_session.get(waiter.session_id, 0) < limit

    def _grant(self, waiter: _Waiter) -> None:
        session_id = waiter.session_id
        self._held += 1
        self._held_by_session[session_id] = self._held_by_session.get(session_id, 0) + 1
        self._grant_seq += 1
        self._last_grant[session_id] = self._grant_seq
        waiter.granted = True
        waiter.event.set()

    def _dispatch(self) -> None:
        """Grant free slots to waiting requests (fewest held, least recently served, oldest)."""
        while self._open and self._held < self.max_agents and self._queues:
            best: _Waiter | None = None
            best_key: tuple[int, int, int] | None = None
            for session_id, queue in self._queues.items():
                head = queue[0]
                if not self._eligible(head):
                    continue
                key = (
                    self._held_by_session.get(session_id, 0),
                    self._last_grant.get(session_id, -1),
                    head.seq,
                )
                if best_key is None or key < best_key:
                    best, best_key = head, key
            if best is None:
                return
            queue = self._queues[best.session_id]
            queue.popleft()
            if not queue:
                del self._queues[best.session_id]
            self._grant(best)

    def _leave_queue(self, waiter: _Waiter) -> None:
        queue = self._queues.get(waiter.session_id)
        if queue is not None:
            with contextlib.suppress(ValueError):
                queue.remove(waiter)
            if not queue:
                del self._queues[waiter.session_id]
        self._forget_if_idle(waiter.session_id)
        self._dispatch()  # the next request of that session may be eligible now

    def _release(self, session_id: str) -> None:
        self._held -= 1
        left = self._held_by_session.get(session_id, 0) - 1
        if left > 0:
            self._held_by_session[session_id] = left
        else:
            self._held_by_session.pop(session_id, None)
        self._forget_if_idle(session_id)
        self._dispatch()

    def _forget_if_idle(self, session_id: str) -> None:
        if session_id not in self._queues and session_id not in self._held_by_session:
            self._last_grant.pop(session_id, None)

    def _close(self) -> None:
        """Refuse new requests and fail every waiting one with `PoolClosed`."""
        self._open = False
        self._closed = True
        queues, self._queues = self._queues, {}
        for queue in queues.values():
            for waiter in queue:
                waiter.error = PoolClosed(f"{self.name} is stopping: no new agents")
                waiter.event.set()
                self._forget_if_idle(waiter.session_id)

    # -- agents ---------------------------------------------------------------------

    async def _start_agent(
        self,
        session_id: str,
        spec: AgentSpec,
        task_id: str | None,
        record_with: RecordWith | None = None,
    ) -> _Agent:
        if not self._open or self._host is None or self._nursery is None:
            raise PoolClosed(f"{self.name} is not running: no new agents")
        host, nursery = self._host, self._nursery
        self._spawning += 1
        try:
            # Spawn -> registered -> row committed must not stop halfway.
            with trio.CancelScope(shield=True):
                try:
                    run = await host.start(spec, held=True)  # runs once recorded
                except BaseException:
                    self._start_failures += 1
                    raise
                agent = _Agent(session_id, task_id, run)
                self._live[run.identity] = agent  # stop_all and reconcile see it from now on
                try:
                    if not self._open:
                        raise PoolClosed(f"{self.name} is stopping: no new agents")
                    agent.row_id = await self._insert_row(agent, spec, record_with)
                    crash_point("agent.recorded")
                    run.release()
                except BaseException:
                    self._start_failures += 1
                    try:
                        result = await run.stop(self._grace_now)
                        self._account_end(agent, result)
                    finally:
                        self._live.pop(run.identity, None)
                        agent.closed.set()
                    raise
                self._started_total += 1
                nursery.start_soon(self._watch, agent)
        finally:
            self._spawning -= 1
        return agent

    async def _insert_row(
        self, agent: _Agent, spec: AgentSpec, record_with: RecordWith | None = None
    ) -> int:
        identity = agent.run.identity
        values = (
            agent.session_id,
            agent.task_id,
            identity.pid,
            identity.start_ticks,
            _argv_record(spec.argv),
            utc_now_iso(),
            _boot_id(),
        )

        def insert(db: sqlite_utils.Database) -> int:
            cursor = db.execute(
                "INSERT INTO agents (session_id, task_id, pid, start_ticks, argv, started_at,"
                " boot_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
                values,
            )
            return int(cast(int, cursor.lastrowid))

        if record_with is not None:
            return await record_with(insert)
        return await self.store.write(insert, timeout=ROW_WRITE_TIMEOUT)

    async def _watch(self, agent: _Agent) -> None:
        """Close the agent's row when its run ends (runs in the pool's agent nursery)."""
        try:
            result = await agent.run.wait()
            self._account_end(agent, result)
            await self._close_row(agent, result)
        finally:
            self._live.pop(agent.run.identity, None)
            agent.closed.set()

    async def _close_row(self, agent: _Agent, result: RunResult) -> None:
        """Record the end in the agent's row, unless the store stops first (module rules).

        A close the store refuses is retried in the background (module rules),
        so the slot is freed meanwhile.
        """
        assert agent.row_id is not None
        row = (utc_now_iso(), result.exit_code, result.reason.value, agent.row_id)
        failure = await self._write_close(row)
        if failure is None:
            return
        self._record_failures += 1
        if failure is _STORE_STOPPED:
            log.warning(
                "row of agent %d left open, the store has stopped; the next start closes it",
                agent.row_id,
            )
        elif self._nursery is None:  # the pool is going: reconciliation closes it
            log.error("could not close the row of agent %d: %s", agent.row_id, failure)
        else:
            log.error(
                "could not close the row of agent %d: %s; trying again for up to %g s",
                agent.row_id,
                failure,
                CLOSE_RETRY_FOR,
            )
            self._nursery.start_soon(self._close_row_later, row)

    async def _close_row_later(self, row: tuple[str, int | None, str, int]) -> None:
        """Retry a refused close with backoff, for `CLOSE_RETRY_FOR` s at most."""
        give_up_at = trio.current_time() + CLOSE_RETRY_FOR
        delay = CLOSE_RETRY_FIRST
        while True:
            await trio.sleep(delay)
            failure = await self._write_close(row)
            if failure is None:
                log.info("row of agent %d closed after the store took writes again", row[3])
                return
            if failure is _STORE_STOPPED or trio.current_time() >= give_up_at:
                log.warning(
                    "row of agent %d left open (%s); the next start closes it", row[3], failure
                )
                return
            delay = min(2 * delay, CLOSE_RETRY_CAP)

    async def _write_close(self, row: tuple[str, int | None, str, int]) -> str | None:
        """One try at closing a row: None when done, else why not (`_STORE_STOPPED`)."""

        def close(db: sqlite_utils.Database) -> None:
            db.execute(
                "UPDATE agents SET ended_at = ?, exit_code = ?, end_reason = ?"
                " WHERE id = ? AND ended_at IS NULL",
                row,
            )

        failure: str | None = None
        with trio.CancelScope() as store_stopped, self.store.cancelled_when_ended(store_stopped):
            try:
                await self.store.write(close, timeout=ROW_WRITE_TIMEOUT)
            except LokiError as exc:
                failure = str(exc)
        return _STORE_STOPPED if store_stopped.cancelled_caught else failure

    def _account_end(self, agent: _Agent, result: RunResult) -> None:
        self._ended_total += 1
        if result.escalated:
            self._escalated_total += 1
        if result.survivors:
            self._survivors_total += len(result.survivors)
            log.error(
                "agent %d of session %s: processes %s survived SIGKILL of its group",
                agent.run.identity.pid,
                agent.session_id,
                list(result.survivors),
            )

    async def stop_all(self, grace: float | None = None) -> int:
        """Close the pool and stop every live agent; return how many were stopped.

        `grace` defaults to the pool's (none once hurried). Waiting requests
        get `PoolClosed`, new ones too, until the next incarnation of the
        task opens the pool again. Returns once every stopped agent's row is
        closed (or its close failed and was logged).
        """
        grace = self._grace_now if grace is None else grace
        self._close()
        stopped: set[int] = set()
        while self._live or self._spawning:
            agents = list(self._live.values())
            if not agents:  # a start is between spawn and registration
                await trio.sleep(POLL_SECONDS)
                continue
            async with trio.open_nursery() as nursery:
                for agent in agents:
                    stopped.add(id(agent))
                    nursery.start_soon(self._stop_one, agent, grace)
        return len(stopped)

    @staticmethod
    async def _stop_one(agent: _Agent, grace: float) -> None:
        await agent.run.stop(grace)
        await agent.closed.wait()

    def hurry(self) -> int:
        """SIGKILL every live agent's group now, and skip the grace of every later stop.

        For a daemon stop that ran out of `shutdown_grace` or got a second
        signal (module rules). Closes the pool like `stop_all`; an agent in
        its SIGTERM grace gets SIGKILL at once. Each group is still checked
        empty before its slot is freed. Returns how many agents were live.
        """
        self._hurried = True
        self._close()
        agents = list(self._live.values())
        for agent in agents:
            agent.run.request_stop(0.0)
        return len(agents)

    @property
    def _grace_now(self) -> float:
        """SIGTERM -> SIGKILL grace for a stop starting now: none once hurried."""
        return 0.0 if self._hurried else self.grace

    # -- reconciliation -------------------------------------------------------------

    async def reconcile(self) -> list[ReconcileOutcome]:
        """Kill what a previous daemon left running and close its rows (see the module rules).

        Rows of agents this process runs are skipped. Raises only the
        store's errors (reading or closing the rows).
        """
        outcomes: list[ReconcileOutcome] = []
        markers = await trio.to_thread.run_sync(_held_markers, self.held_dir)
        after = 0
        while True:
            rows = await self.store.read(functools.partial(_read_open_rows, after=after))
            if not rows:
                break
            after = rows[-1].row_id
            foreign = [
                row for row in rows if ProcessIdentity(row.pid, row.start_ticks) not in self._live
            ]
            page = await self._reconcile_rows(foreign, set(markers.values()))
            if page:
                requeued = await self.store.write(
                    functools.partial(_close_reconciled, outcomes=page, ended_at=utc_now_iso()),
                    timeout=ROW_WRITE_TIMEOUT,
                )
                page = [
                    attrs.evolve(o, requeued_inputs=tuple(requeued.get(o.row_id, ()))) for o in page
                ]
            outcomes.extend(page)
        if markers:  # the rows they speak of are closed (and their inputs queued)
            await trio.to_thread.run_sync(_remove_markers, self.held_dir, list(markers))
        for outcome in outcomes:
            if outcome.end_reason == RECONCILED:
                self._reconciled_killed += 1
                self._reconciled_processes += len(outcome.killed)
                log.warning(
                    "killed agent process group %d (session %s, task %s, row %d) left by a "
                    "previous daemon: pids %s%s",
                    outcome.pid,
                    outcome.session_id,
                    outcome.task_id,
                    outcome.row_id,
                    list(outcome.killed),
                    f"; survivors {list(outcome.survivors)}" if outcome.survivors else "",
                )
            else:
                self._reconciled_gone += 1
                log.info(
                    "agent %d (session %s, row %d) of a previous daemon: %s",
                    outcome.pid,
                    outcome.session_id,
                    outcome.row_id,
                    outcome.detail,
                )
            self._survivors_total += len(outcome.survivors)
            if outcome.requeued_inputs:
                log.warning(
                    "agent %d (session %s, row %d) of a previous daemon never ran (it died "
                    "before letting it start): its inputs %s are queued again",
                    outcome.pid,
                    outcome.session_id,
                    outcome.row_id,
                    list(outcome.requeued_inputs),
                )
        self._last_reconcile = tuple(outcomes)
        return outcomes

    async def _reconcile_rows(
        self, rows: Sequence[_OpenRow], markers: set[ProcessIdentity | None]
    ) -> list[ReconcileOutcome]:
        boot = _boot_id()
        members = _scan_groups({row.pid for row in rows})
        targets: list[_Target] = []
        gone: list[tuple[_OpenRow, str]] = []
        never_ran: set[int] = set()  # row ids
        for row in rows:
            # A file names its launcher (pid and start ticks), whatever the boot it ran
            # in: not a later process given the same pid.
            if ProcessIdentity(row.pid, row.start_ticks) in markers:
                never_ran.add(row.row_id)
            if row.boot_id is not None and boot is not None and row.boot_id != boot:
                gone.append((row, "recorded before a reboot"))
                continue
            ticks = start_ticks(row.pid)
            # Before any kill: a launcher still waiting is not the agent yet.
            if ticks == row.start_ticks and still_held(row.pid):
                never_ran.add(row.row_id)
            alive = members.get(row.pid, [])
            if ticks == row.start_ticks:
                if alive:
                    targets.append(_Target(row, "killed"))
                else:
                    gone.append((row, "exited"))  # only the zombie leader is left
            elif ticks is None:
                if alive:
                    targets.append(_Target(row, "orphaned group killed"))
                else:
                    gone.append((row, "exited"))
            else:
                gone.append((row, "pid reused by another process"))
        if targets:
            await self._kill_groups(targets)
        outcomes = [
            ReconcileOutcome(row.row_id, row.session_id, row.task_id, row.pid, GONE, detail)
            for row, detail in gone
        ]
        for target in targets:
            row = target.row
            killed = bool(target.seen)
            outcomes.append(
                ReconcileOutcome(
                    row.row_id,
                    row.session_id,
                    row.task_id,
                    row.pid,
                    RECONCILED if killed else GONE,
                    target.detail if killed else "exited",
                    tuple(sorted(target.seen)),
                    target.survivors,
                    target.escalated,
                )
            )
        outcomes = [
            attrs.evolve(o, never_ran=True) if o.row_id in never_ran else o for o in outcomes
        ]
        outcomes.sort(key=lambda outcome: outcome.row_id)
        return outcomes

    async def _kill_groups(self, targets: list[_Target]) -> None:
        """SIGTERM, `grace`, SIGKILL, bounded wait: for all groups at once."""
        pgids = {target.row.pid for target in targets}

        def remaining() -> dict[int, list[int]]:
            found = _scan_groups(pgids)
            for target in targets:
                target.seen.update(found.get(target.row.pid, ()))
            return found

        async def wait_empty(seconds: float) -> dict[int, list[int]]:
            found = remaining()
            with trio.move_on_after(seconds):
                while found:
                    await trio.sleep(POLL_SECONDS)
                    found = remaining()
            return found

        found = remaining()
        for target in targets:
            if target.row.pid in found:
                _signal_verified(target.row, signal.SIGTERM)
        found = await wait_empty(self.grace)
        for target in targets:
            if target.row.pid in found:
                target.escalated = True
                _signal_verified(target.row, signal.SIGKILL)
        found = await wait_empty(KILL_WAIT_SECONDS)
        for target in targets:
            target.survivors = tuple(sorted(found.get(target.row.pid, ())))

    # -- the task ---------------------------------------------------------------------

    async def setup(self) -> None:
        self._closed = False
        self._hurried = False
        self._open = False
        if self.held_dir is not None and not self._held_dir_ok:
            try:
                await trio.to_thread.run_sync(
                    functools.partial(self.held_dir.mkdir, mode=0o700, exist_ok=True)
                )
                self._held_dir_ok = True
            except OSError as exc:  # then only a launcher still waiting is recognised
                log.warning("cannot create %s: %s", self.held_dir, exc)
        await self.reconcile()

    async def serve(self) -> None:
        # The agents' nursery lives in a shielded scope that only this method
        # cancels, after `stop_all`: a cancelled pool task still stops its
        # agents (bounded) instead of abandoning their supervision. Not
        # `nursery.start`: a child that calls `started()` while its caller is
        # being cancelled is not moved to the nursery, and `start` would then
        # wait forever for a shielded child.
        host_scope = trio.CancelScope(shield=True)
        ready = trio.Event()
        self._host_scope = host_scope
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._host_agents, host_scope, ready)
            try:
                await ready.wait()
                if not self._closed:
                    self._open = True
                    self._dispatch()
                while (message := await self.next_message()) is not None:
                    with contextlib.suppress(LokiError):
                        await self.dispatch(message)
            finally:
                try:
                    with trio.CancelScope(shield=True):
                        await self.stop_all()
                finally:
                    host_scope.cancel()

    async def _host_agents(self, scope: trio.CancelScope, ready: trio.Event) -> None:
        # No checkpoint before `with scope`: the shield is in place before any
        # cancellation of the pool's task can reach this one.
        try:
            with scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    held_dir = self.held_dir if self._held_dir_ok else None
                    self._host = LocalAgentHost(nursery, held_dir=held_dir)
                    ready.set()
                    await trio.sleep_forever()
        finally:
            self._host = None
            self._nursery = None
            if self._host_scope is scope:
                self._host_scope = None

    async def teardown(self) -> None:
        self._close()

    async def handle(self, message: Any) -> Any:
        raise BadRequest(f"{self.name} takes no messages (got {type(message).__name__})")

    # -- introspection --------------------------------------------------------------

    @property
    def active(self) -> int:
        """Live agent processes (for `/api/status` `agents.active`)."""
        return len(self._live)

    @property
    def capacity(self) -> int:
        """The global cap (for `/api/status` `agents.total`)."""
        return self.max_agents

    @property
    def last_reconcile(self) -> tuple[ReconcileOutcome, ...]:
        return self._last_reconcile

    def statistics(self) -> AgentPoolStatistics:
        base = super().statistics()
        waiting = {session_id: len(queue) for session_id, queue in self._queues.items()}
        return AgentPoolStatistics(
            **attrs.asdict(base, recurse=False),
            capacity=self.max_agents,
            active=len(self._live),
            slots_held=self._held,
            waiting=waiting,
            waiting_total=sum(waiting.values()),
            open=self._open,
            started_total=self._started_total,
            ended_total=self._ended_total,
            start_failures=self._start_failures,
            record_failures=self._record_failures,
            stopped_at_release=self._stopped_at_release,
            escalated_total=self._escalated_total,
            survivors_total=self._survivors_total,
            rejected_total=self._rejected_total,
            reconciled_killed=self._reconciled_killed,
            reconciled_processes=self._reconciled_processes,
            reconciled_gone=self._reconciled_gone,
        )


# -- helpers -----------------------------------------------------------------------


@functools.cache
def _boot_id() -> str | None:
    """This boot's id: a row from another boot cannot name a live process."""
    try:
        return pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _argv_record(argv: Iterable[str]) -> str:
    """The argv as a JSON list, bounded (prompts can be long): items and their lengths cut."""
    items = list(argv)
    kept = [
        item if len(item) <= ARGV_ITEM_LIMIT else f"{item[:ARGV_ITEM_LIMIT]}...[cut]"
        for item in items[:ARGV_ITEMS_LIMIT]
    ]
    if len(items) > ARGV_ITEMS_LIMIT:
        kept.append(f"...[{len(items) - ARGV_ITEMS_LIMIT} more]")
    return json.dumps(kept, ensure_ascii=False)


def _read_open_rows(db: sqlite_utils.Database, *, after: int) -> list[_OpenRow]:
    rows = db.execute(
        "SELECT id, session_id, task_id, pid, start_ticks, boot_id FROM agents"
        " WHERE ended_at IS NULL AND id > ? ORDER BY id LIMIT ?",
        (after, RECONCILE_PAGE),
    ).fetchall()
    return [_OpenRow(*row) for row in rows]


def _close_reconciled(
    db: sqlite_utils.Database, *, outcomes: Sequence[ReconcileOutcome], ended_at: str
) -> dict[int, list[str]]:
    """Close the rows; queue again the inputs of those whose agent never ran (one
    transaction: a crash now leaves both for the next start). Row id -> input ids."""
    db.conn.executemany(
        "UPDATE agents SET ended_at = ?, exit_code = NULL, end_reason = ?"
        " WHERE id = ? AND ended_at IS NULL",
        [(ended_at, outcome.end_reason, outcome.row_id) for outcome in outcomes],
    )
    requeued: dict[int, list[str]] = {}
    for outcome in outcomes:
        if outcome.never_ran:
            ids = requeue_inputs_of_agents(db, [outcome.row_id])
            if ids:
                requeued[outcome.row_id] = ids
    return requeued


def _held_markers(held_dir: pathlib.Path | None) -> dict[str, ProcessIdentity | None]:
    """The files of held launchers that saw their daemon die before the release: name
    -> the launcher (pid and start ticks), which no later process given that pid
    matches. A bare `<pid>` (no start time: it cannot tell its launcher from a later
    process) maps to None: removed with the others, never trusted."""
    if held_dir is None:
        return {}
    try:
        names = os.listdir(held_dir)
    except OSError:
        return {}
    markers: dict[str, ProcessIdentity | None] = {}
    for name in names:
        pid, dot, ticks = name.partition(".")
        if pid.isdigit() and dot and ticks.isdigit():
            markers[name] = ProcessIdentity(int(pid), int(ticks))
        elif name.isdigit():
            markers[name] = None
    return markers


def _remove_markers(held_dir: pathlib.Path | None, names: Sequence[str]) -> None:
    if held_dir is None:
        return
    for name in names:
        with contextlib.suppress(OSError):
            os.unlink(held_dir / name)


def _scan_groups(pgids: set[int]) -> dict[int, list[int]]:
    """Live (not zombie) members of each of `pgids` that has any."""
    found: dict[int, list[int]] = {}
    for pgid, members in scan_groups(pgids).items():
        live = [pid for pid, state in members if state not in ("Z", "X")]
        if live:
            found[pgid] = live
    return found


def _group_is_verified(row: _OpenRow) -> bool:
    """May group `row.pid` be signalled? (the signalling rule of the module docstring)"""
    ticks = start_ticks(row.pid)
    if ticks is not None:
        return ticks == row.start_ticks  # the leader is exactly the recorded process
    # No process has that pid: members still using it as their group id keep it
    # from being reused, so they are the recorded agent's.
    return bool(_scan_groups({row.pid}))


def _signal_verified(row: _OpenRow, signum: int) -> None:
    if not _group_is_verified(row):
        log.warning("agent group %d changed identity; not signalled", row.pid)
        return
    try:
        os.killpg(row.pid, signum)
    except ProcessLookupError:
        pass  # emptied in between
    except PermissionError as exc:
        log.error("cannot signal agent group %d: %s", row.pid, exc)
