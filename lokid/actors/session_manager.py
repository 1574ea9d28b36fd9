"""SessionManager: creates sessions, routes commands to them, reconciles them at start.

It owns the **session supervisor** (`one_for_one`, `forget_finished`): one
transient child per live session, running a `SessionActor`. A session actor
that crashes is restarted and continues from the store; after
`MAX_SESSION_CRASHES` crashes of one session the session is failed
(`exitReason: runnerCrashed`) instead of crashing again.

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
  stays `paused`), its active tasks go back to `pending`. Paused sessions
  get their actor again (so resume, stop and input work); with
  `resume_on_start` every `interrupted` session is resumed, oldest first
  (by a crash or a graceful shutdown alike; one whose `projectDir` is taken
  meanwhile is left interrupted, with a log line).
* **Shutdown**: every live actor is told to wind down at once (their agents
  stop in parallel), then the supervisor stops them in order.

Mailbox: like the agent pool, the API is methods called from request
handlers (`create`, `command`, `delete`, `summary`); each command still
reaches its session through that session's mailbox. `mailbox_size = 1`,
`WhenFull.REJECT`, unused.
"""

from __future__ import annotations

import functools
import logging
import shutil
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import attrs
import sqlite_utils
import trio

from lokid import idempotency, lokidir
from lokid.actor import Actor, ActorStatistics, WhenFull
from lokid.actors.agent_pool import AgentPool
from lokid.actors.event_bus import EventBus
from lokid.actors.session import Input, Pause, Resume, RunnerSettings, SessionActor, Stop
from lokid.actors.store import StoreActor
from lokid.errors import Conflict, LokiError, Unavailable
from lokid.events import Level
from lokid.session_records import (
    SessionRequest,
    active_session_ids,
    delete_session,
    get_session,
    insert_session,
    interrupted_session_ids,
    parse_session_request,
    requeue_active_tasks,
    session_counts,
    update_session,
)
from lokid.session_state import EVENT_FOR, Status, Trigger, is_active, step
from lokid.supervisor import ChildSpec, Restart, Strategy, Supervisor, SupervisorStatistics
from lokid.timefmt import utc_now_iso

log = logging.getLogger("lokid.sessions")

CREATE_ROUTE = "POST /api/sessions"
MAX_SESSION_CRASHES = 3
COMMAND_TIMEOUT = 30.0
FINISH_WAIT_SECONDS = 10.0

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
        self._to_restore: list[str] = []
        self._to_resume: list[str] = []
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
        """Fire `daemon_restart` on every active session; (paused to restore, to resume)."""
        restore: list[str] = []
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
                requeue_active_tasks(db, sid, "run cut off: daemon restart")
                update_session(db, sid, **values)

            await self.store.write(write)
            self._reconciled += 1
            if transition.event is not None:
                await self.bus.publish(
                    transition.event,
                    session_id,
                    Level.WARNING,
                    {"status": transition.after.value, "reason": "daemon restart"},
                )
            if transition.after is Status.PAUSED:
                restore.append(session_id)
        # Interrupted now or by an earlier shutdown: a session the user did not want
        # continued would have been stopped.
        resume = await self.store.read(interrupted_session_ids) if self.resume_on_start else []
        return restore, resume

    async def serve(self) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.supervisor.run)
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
            for actor in list(self._live.values()):
                actor.on_stop_requested()
            self.supervisor.request_stop()

    # -- create --------------------------------------------------------------------------

    async def create(
        self, body: Mapping[str, Any], *, idempotency_key: str | None = None
    ) -> tuple[int, dict[str, Any]]:
        """`POST /api/sessions`: (201, `{id, status, createdAt}`), or a remembered answer."""
        if not self.running:
            raise Unavailable("the session manager is not running")

        async def prepare() -> SessionRequest:  # (a retry got its first answer before this)
            self._check_capacity()
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

        outcome = await idempotency.create_once(
            self.store, CREATE_ROUTE, body, idempotency_key, prepare, insert
        )
        status, answer = outcome.status, outcome.answer
        if not outcome.created:
            return status, answer
        request: SessionRequest = outcome.prepared
        self._created += 1
        session_id = answer["id"]
        if request.prd_text is not None:
            try:
                await trio.to_thread.run_sync(_write_inline_prd, request)
            except LokiError as exc:
                self._initial.pop(session_id, None)
                await self._fail_offline(session_id, "bootstrapFailed", exc.message)
                return status, answer
        try:
            await self._start_actor(session_id)
        except Unavailable as exc:  # recorded, but it cannot run: say so on the session
            await self._fail_offline(session_id, "runnerUnavailable", exc.message)
            raise
        return status, answer

    def _check_capacity(self) -> None:
        if self.supervisor.count_children().specs >= self.max_sessions:
            raise Unavailable(
                f"{self.max_sessions} sessions are live (max_sessions); "
                "try again when one has ended",
                details={"maxSessions": self.max_sessions},
            )

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
        if self._session_crashes.get(session_id, 0) >= MAX_SESSION_CRASHES:
            task_status.started(None)
            await self._fail_offline(session_id, "runnerCrashed", "the session runner crashed")
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
        self._finished_events[session_id] = trio.Event()
        try:
            await actor.run(task_status=task_status)
        except Exception:
            self._session_crashes[session_id] = self._session_crashes.get(session_id, 0) + 1
            self._crash_total += 1
            log.exception("session %s crashed", session_id)
            raise
        finally:
            self._forget(actor)
            event = self._finished_events.pop(session_id, None)
            if event is not None:
                event.set()

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

    async def _offline(self, session_id: str, message: Command, *, source: str) -> dict[str, Any]:
        trigger = _TRIGGER[type(message)]
        session = await self.store.read(lambda db: get_session(db, session_id))
        status = Status(session["status"])
        transition = step(status, trigger)  # 409 for every illegal pair
        if is_active(status):
            # Active without an actor: it is being started or finishing right now.
            raise Unavailable(f"session {session_id} is changing state; retry")
        if transition.after is Status.RUNNING:
            self._check_capacity()
        fields: dict[str, Any] = {"status": transition.after.value}
        if transition.after is Status.STOPPED:
            fields.update(ended_at=utc_now_iso(), exit_reason="stopped")

        def write(db: sqlite_utils.Database) -> dict[str, Any]:
            current = Status(get_session(db, session_id)["status"])
            step(current, trigger)  # the store decides between concurrent requests
            return update_session(db, session_id, **fields)

        session = await self.store.write(write)
        event = EVENT_FOR.get((status, transition.after))
        if event is not None:
            await self.bus.publish(
                event, session_id, Level.INFO, {"status": transition.after.value, "source": source}
            )
        if transition.after is Status.RUNNING:
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

    async def _fail_offline(self, session_id: str, reason: str, detail: str) -> None:
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

        await self.store.write(write)
        await self.bus.publish(
            "session.failed",
            session_id,
            Level.ERROR,
            {"status": "failed", "exitReason": reason, "detail": detail},
        )

    async def delete(self, session_id: str) -> None:
        """`DELETE /api/sessions/{id}`: 404, 409 while active, else the record goes."""
        actor = self._live.get(session_id)
        if actor is not None:
            if is_active(actor.status):
                step(actor.status, Trigger.DELETE)  # raises the 409
            event = self._finished_events.get(session_id)
            if event is not None:
                with trio.move_on_after(FINISH_WAIT_SECONDS):
                    await event.wait()
            if session_id in self._live:
                raise Conflict(f"session {session_id} is finishing; retry in a moment")
        await self.store.write(lambda db: delete_session(db, session_id))

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
