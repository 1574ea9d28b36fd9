"""The session lifecycle as one table-driven state machine. Pure: no I/O, no trio, no clock.

Rules:

* Everything that decides whether a session may change status, and to what,
  lives in this file, and as much of it as possible in the one table
  `TRANSITIONS`. The session actor, the supervisor's restart reconciliation
  and the HTTP handlers ask `next_status` / `step` / `allowed`; they never
  compare statuses themselves.
* This file does not know *why* a trigger fires (which request, which
  process exited, which limit was hit) and does nothing about it: it kills
  no process, emits no event, writes no row. What a transition implies is
  returned as data (`Transition.event`, `Transition.removes_record`) for the
  caller to carry out.
* `TRANSITIONS` is the source of truth. `allowed`, `ACTIVE`, `TERMINAL`, the
  error messages and `docs/session-states.md` are derived from it or checked
  against it by tests. After editing a table, run
  `python -m lokid.session_state > docs/session-states.md`; a test fails
  until you do.
* A trigger missing from a status's row is illegal: `IllegalTransition`
  (`CONFLICT`, HTTP 409, `details.status` = the current status,
  `details.trigger`), and the status does not change. There is no other way
  to fail a transition.
* An entry that maps a status to itself means "accepted, nothing changes"
  (input, an agent starting or exiting, a repeated stop, a daemon restart
  of a paused session). The check is the point: the same trigger is
  illegal elsewhere.
* Invariants: a session has exactly one status; it is born `starting`;
  terminal statuses (`stopped`, `completed`, `failed`) accept nothing but
  `delete`; `interrupted` is entered only by a daemon restart; `stopped` is
  entered only when nothing of the session runs any more; a deleted session
  accepts nothing (404, not 409).

Theory of operation:

* Triggers come from three places. The API (user commands): `pause`,
  `resume`, `stop`, `input`, `delete`. The runner (reports about its own
  work): `bootstrapped`, `agent_start`, `agent_exit`, `agents_gone`,
  `complete`, `fail`. The daemon: `daemon_restart`, fired by start-up
  reconciliation for each session that was active, after the session's
  recorded agent process groups were killed (DESIGN.md §8).
* **Active** = `starting`, `running`, `paused`, `stopping`: the session owns
  its `projectDir` (one active session per `projectDir`), has or may soon
  have agent processes, cannot be deleted, and is reconciled on daemon
  start. `GET /api/status` says `running` while any session is active.
* **Terminal** = `stopped`, `completed`, `failed`: only `delete` is
  accepted. `interrupted` is neither active nor terminal: nothing runs and
  it holds no `projectDir`, but it can be resumed, stopped or deleted.

Decisions (where DESIGN.md §5 is silent):

* Bootstrap ends with `bootstrapped` (`starting → running`, the one
  `session.started`) or `fail` (`starting → failed`). A session never
  completes without running.
* `stop` of a `starting` session goes to `stopping`: the runner cancels the
  bootstrap, then reports `agents_gone`. Every stop of a session that may
  have work in flight passes through `stopping`.
* `stop` of an `interrupted` session goes to `stopped` directly: nothing of
  it runs (reconciliation killed its processes).
* A second `stop` while `stopping` is accepted and changes nothing (a stop
  must be safe to retry; the runner may take it as "kill now"). A repeated
  `pause` of a paused or `resume` of a running session is a 409: its
  `details.status` tells the client its view was stale.
* `pause` is legal only in `running` (409 while `starting`: nothing to
  pause yet). Pause takes effect between iterations: an agent already
  running goes on, and its `agent_exit` leaves the session `paused`; no
  agent starts while paused (`agent_start` is legal only in `running`).
* While `stopping` only `stop`, `agent_exit` and `agents_gone` are legal
  (and `daemon_restart`); `pause`, `resume`, `input`, `complete`, `fail` are
  409. A stop always ends `stopped`, never `failed` (the older server's
  `stopping → failed` was a bug).
* `complete` only from `running`: completion is decided between iterations,
  which a paused session does not run; after `resume` it completes.
* `fail` from `starting`, `running` and `paused` (a permanent error of an
  agent still finishing, or a crash of the runner, fails a paused session
  at once); never from `stopping` or `interrupted`.
* `input` is accepted (no change) only in `running` and `paused`; it is
  delivered into the next agent prompt.
* Daemon restart: `starting` and `running` become `interrupted`
  (`session.interrupted`). `stopping` becomes `stopped`: reconciliation
  killed the processes, which is all the stop wanted, and an interrupted
  session could be revived by `LOKI_RESUME_ON_START`. `paused` stays
  `paused`: the user asked for no progress; an agent still finishing is
  killed and its task retried after `resume`; it is never auto-resumed.
* `resume` of an `interrupted` session goes to `running`, not `starting`: it
  continues from stored progress like a paused one (`session.resumed`); the
  PRD is not parsed again as a new session's would be (if bootstrap had not
  finished, the runner finishes it, with its deterministic task ids). The
  one-active-session-per-`projectDir` rule is checked by the supervisor
  before it fires `resume` on an interrupted session (it concerns other
  sessions, so it cannot live here).
* `delete` is legal in every status that is not active, and removes the
  record; the status row keeps it as "no change" and `removes_record` says
  the rest. A deleted session accepts nothing: `SessionDeleted` (404).
* Entering `stopping` emits no event (the API answer shows `stopping`);
  `session.stopped` is emitted when the session is `stopped`, with `status`,
  `source` and `survivors` whichever way it got there (the runner, the
  restart's reconciliation, a stop of an `interrupted` session;
  [sessions.md](sessions.md), "Events a session publishes").
* `daemon_restart` on a status that is not active is a 409: reconciliation
  fires it only for active sessions, so it would be a caller bug.
"""

from __future__ import annotations

import enum
import sys

import attrs

from lokid.errors import Conflict, NotFound

__all__ = [
    "ACTIVE",
    "EVENT_FOR",
    "INITIAL",
    "REMOVES_RECORD",
    "TERMINAL",
    "TRANSITIONS",
    "TRIGGER_SOURCE",
    "IllegalTransition",
    "Lifecycle",
    "SessionDeleted",
    "Status",
    "Transition",
    "Trigger",
    "allowed",
    "is_active",
    "is_terminal",
    "next_status",
    "render_markdown",
    "step",
]


class Status(enum.StrEnum):
    """A session's status; the values are the wire strings."""

    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"
    COMPLETED = "completed"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


class Trigger(enum.StrEnum):
    """What can happen to a session; the values appear in `details.trigger`."""

    # user commands (API, control socket, CLI)
    PAUSE = "pause"
    RESUME = "resume"
    STOP = "stop"
    INPUT = "input"
    DELETE = "delete"
    # reports of the session's runner
    BOOTSTRAPPED = "bootstrapped"
    AGENT_START = "agent_start"
    AGENT_EXIT = "agent_exit"
    AGENTS_GONE = "agents_gone"
    COMPLETE = "complete"
    FAIL = "fail"
    # start-up reconciliation of the daemon
    DAEMON_RESTART = "daemon_restart"


S = Status
T = Trigger

INITIAL = S.STARTING

TRANSITIONS: dict[Status, dict[Trigger, Status]] = {
    S.STARTING: {
        T.BOOTSTRAPPED: S.RUNNING,
        T.FAIL: S.FAILED,
        T.STOP: S.STOPPING,
        T.DAEMON_RESTART: S.INTERRUPTED,
    },
    S.RUNNING: {
        T.PAUSE: S.PAUSED,
        T.STOP: S.STOPPING,
        T.INPUT: S.RUNNING,
        T.AGENT_START: S.RUNNING,
        T.AGENT_EXIT: S.RUNNING,
        T.COMPLETE: S.COMPLETED,
        T.FAIL: S.FAILED,
        T.DAEMON_RESTART: S.INTERRUPTED,
    },
    S.PAUSED: {
        T.RESUME: S.RUNNING,
        T.STOP: S.STOPPING,
        T.INPUT: S.PAUSED,
        T.AGENT_EXIT: S.PAUSED,
        T.FAIL: S.FAILED,
        T.DAEMON_RESTART: S.PAUSED,
    },
    S.STOPPING: {
        T.STOP: S.STOPPING,
        T.AGENT_EXIT: S.STOPPING,
        T.AGENTS_GONE: S.STOPPED,
        T.DAEMON_RESTART: S.STOPPED,
    },
    S.STOPPED: {
        T.DELETE: S.STOPPED,
    },
    S.COMPLETED: {
        T.DELETE: S.COMPLETED,
    },
    S.FAILED: {
        T.DELETE: S.FAILED,
    },
    S.INTERRUPTED: {
        T.RESUME: S.RUNNING,
        T.STOP: S.STOPPED,
        T.DELETE: S.INTERRUPTED,
    },
}

# The event type (DESIGN.md §5) emitted when a session moves from one status
# to another. Transitions that keep the status emit nothing; so does entering
# `stopping`.
EVENT_FOR: dict[tuple[Status, Status], str] = {
    (S.STARTING, S.RUNNING): "session.started",
    (S.RUNNING, S.PAUSED): "session.paused",
    (S.PAUSED, S.RUNNING): "session.resumed",
    (S.INTERRUPTED, S.RUNNING): "session.resumed",
    (S.STOPPING, S.STOPPED): "session.stopped",
    (S.INTERRUPTED, S.STOPPED): "session.stopped",
    (S.RUNNING, S.COMPLETED): "session.completed",
    (S.STARTING, S.FAILED): "session.failed",
    (S.RUNNING, S.FAILED): "session.failed",
    (S.PAUSED, S.FAILED): "session.failed",
    (S.STARTING, S.INTERRUPTED): "session.interrupted",
    (S.RUNNING, S.INTERRUPTED): "session.interrupted",
}

# Triggers after which the session's record is gone.
REMOVES_RECORD: frozenset[Trigger] = frozenset({T.DELETE})

# Who fires each trigger (for the docs).
TRIGGER_SOURCE: dict[Trigger, str] = {
    T.PAUSE: "user",
    T.RESUME: "user",
    T.STOP: "user",
    T.INPUT: "user",
    T.DELETE: "user",
    T.BOOTSTRAPPED: "runner",
    T.AGENT_START: "runner",
    T.AGENT_EXIT: "runner",
    T.AGENTS_GONE: "runner",
    T.COMPLETE: "runner",
    T.FAIL: "runner",
    T.DAEMON_RESTART: "daemon",
}

# "cannot <phrase> a session that is <status>"
_PHRASE: dict[Trigger, str] = {
    T.PAUSE: "pause",
    T.RESUME: "resume",
    T.STOP: "stop",
    T.INPUT: "send input to",
    T.DELETE: "delete",
    T.BOOTSTRAPPED: "finish bootstrapping",
    T.AGENT_START: "start an agent in",
    T.AGENT_EXIT: "record an agent exit in",
    T.AGENTS_GONE: "finish stopping",
    T.COMPLETE: "complete",
    T.FAIL: "fail",
    T.DAEMON_RESTART: "interrupt",
}

ACTIVE: frozenset[Status] = frozenset({S.STARTING, S.RUNNING, S.PAUSED, S.STOPPING})
TERMINAL: frozenset[Status] = frozenset(
    status for status, row in TRANSITIONS.items() if set(row) <= REMOVES_RECORD
)


class IllegalTransition(Conflict):
    """`trigger` is not legal for a session in `status` (409 CONFLICT)."""

    def __init__(self, status: Status, trigger: Trigger) -> None:
        super().__init__(
            f"cannot {_PHRASE[trigger]} a session that is {status.value}",
            details={"status": status.value, "trigger": trigger.value},
        )
        self.status = status
        self.trigger = trigger


class SessionDeleted(NotFound):
    """The session was deleted; nothing can happen to it any more (404)."""

    def __init__(self, trigger: Trigger) -> None:
        super().__init__("session not found (deleted)", details={"trigger": trigger.value})
        self.trigger = trigger


@attrs.frozen
class Transition:
    """One accepted trigger and what the caller must do about it."""

    before: Status
    trigger: Trigger
    after: Status
    event: str | None
    """The event type to emit, if any (`EVENT_FOR`)."""
    removes_record: bool
    """The session's record (and its tasks and events) is to be removed."""

    @property
    def changed(self) -> bool:
        return self.before is not self.after


def next_status(status: Status, trigger: Trigger) -> Status:
    """The status after `trigger`; `IllegalTransition` if it is not legal now."""
    try:
        return TRANSITIONS[status][trigger]
    except KeyError:
        raise IllegalTransition(status, trigger) from None


def step(status: Status, trigger: Trigger) -> Transition:
    """`next_status` plus its effects as data."""
    after = next_status(status, trigger)
    return Transition(
        before=status,
        trigger=trigger,
        after=after,
        event=EVENT_FOR.get((status, after)),
        removes_record=trigger in REMOVES_RECORD,
    )


def allowed(status: Status) -> frozenset[Trigger]:
    """The triggers a session in `status` accepts."""
    return frozenset(TRANSITIONS[status])


def is_active(status: Status) -> bool:
    """Owns its `projectDir`, may have agents, cannot be deleted, reconciled on restart."""
    return status in ACTIVE


def is_terminal(status: Status) -> bool:
    """Finished for good: only `delete` is accepted."""
    return status in TERMINAL


@attrs.define
class Lifecycle:
    """One session's status, advanced only through `fire` (the actor embeds one).

    Like h11's `ConnectionState`: the table decides, this holder only keeps
    the current status and remembers a deletion, after which every trigger
    raises `SessionDeleted`.
    """

    status: Status = INITIAL
    deleted: bool = False

    def fire(self, trigger: Trigger) -> Transition:
        if self.deleted:
            raise SessionDeleted(trigger)
        transition = step(self.status, trigger)
        self.status = transition.after
        self.deleted = transition.removes_record
        return transition


# -- the generated documentation ---------------------------------------------


def _cell(status: Status, trigger: Trigger) -> str:
    target = TRANSITIONS[status].get(trigger)
    if target is None:
        return "—"
    if trigger in REMOVES_RECORD:
        return "*removed*"
    if target is status:
        return "(same)"
    return f"`{target.value}`"


def _edges() -> dict[tuple[str, str], list[str]]:
    """Diagram edges `(from, to) -> trigger names`, in table order; `[*]` = removed."""
    edges: dict[tuple[str, str], list[str]] = {("[*]", INITIAL.value): ["create"]}
    for status, row in TRANSITIONS.items():
        for trigger, target in row.items():
            end = "[*]" if trigger in REMOVES_RECORD else target.value
            edges.setdefault((status.value, end), []).append(trigger.value)
    return edges


def render_markdown() -> str:
    """`docs/session-states.md`: the rules above, the tables and a Mermaid diagram."""
    lines: list[str] = [
        "# Session states",
        "",
        "<!-- Generated from lokid/session_state.py by"
        " `python -m lokid.session_state > docs/session-states.md`. Do not edit. -->",
        "",
        (__doc__ or "").strip(),
        "",
        "## Statuses",
        "",
        "| status | active | terminal | accepts |",
        "|---|---|---|---|",
    ]
    for status in Status:
        accepts = ", ".join(f"`{t.value}`" for t in Trigger if t in TRANSITIONS[status])
        lines.append(
            f"| `{status.value}` | {'yes' if is_active(status) else 'no'}"
            f" | {'yes' if is_terminal(status) else 'no'} | {accepts} |"
        )
    lines += [
        "",
        "## Transitions",
        "",
        "Rows are statuses, columns triggers; a cell is the next status,"
        " (same) for accepted without change, *removed* for a deleted record,"
        " and — for illegal (409 `CONFLICT`).",
        "",
        "| status | " + " | ".join(f"`{t.value}`" for t in Trigger) + " |",
        "|---|" + "---|" * len(Trigger),
    ]
    for status in Status:
        cells = " | ".join(_cell(status, t) for t in Trigger)
        lines.append(f"| `{status.value}` | {cells} |")
    lines += [
        "",
        "## Triggers",
        "",
        "| trigger | fired by | illegal message |",
        "|---|---|---|",
    ]
    for trigger in Trigger:
        lines.append(
            f"| `{trigger.value}` | {TRIGGER_SOURCE[trigger]}"
            f" | cannot {_PHRASE[trigger]} a session that is `<status>` |"
        )
    lines += [
        "",
        "## Events",
        "",
        "| from | to | event |",
        "|---|---|---|",
    ]
    for (before, after), event in EVENT_FOR.items():
        lines.append(f"| `{before.value}` | `{after.value}` | `{event}` |")
    lines += [
        "",
        "## Diagram",
        "",
        "```mermaid",
        "stateDiagram-v2",
    ]
    for (start, end), triggers in _edges().items():
        lines.append(f"    {start} --> {end}: {', '.join(triggers)}")
    lines += ["```", ""]
    return "\n".join(lines)


def main() -> None:
    """`python -m lokid.session_state` prints `docs/session-states.md`."""
    sys.stdout.write(render_markdown())


if __name__ == "__main__":
    main()
