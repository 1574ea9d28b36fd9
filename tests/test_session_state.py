"""The session lifecycle (`lokid.session_state`): the table, its derived views, the doc.

`EXPECTED` below is the specification written out a second time, on purpose:
a change to `TRANSITIONS` must be made in both places, so it is never silent.
"""

from __future__ import annotations

import itertools
import re
from collections import deque
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from lokid import session_state
from lokid.errors import LokiError
from lokid.events import EVENT_TYPES
from lokid.http.errors import ApiError
from lokid.session_state import (
    ACTIVE,
    EVENT_FOR,
    INITIAL,
    TERMINAL,
    TRANSITIONS,
    IllegalTransition,
    Lifecycle,
    SessionDeleted,
    Status,
    Transition,
    Trigger,
    allowed,
    is_active,
    is_terminal,
    next_status,
    render_markdown,
    step,
)

S = Status
T = Trigger

DOC = Path(__file__).resolve().parent.parent / "docs" / "session-states.md"

EXPECTED: dict[tuple[Status, Trigger], Status] = {
    (S.STARTING, T.BOOTSTRAPPED): S.RUNNING,
    (S.STARTING, T.FAIL): S.FAILED,
    (S.STARTING, T.STOP): S.STOPPING,
    (S.STARTING, T.DAEMON_RESTART): S.INTERRUPTED,
    (S.RUNNING, T.PAUSE): S.PAUSED,
    (S.RUNNING, T.STOP): S.STOPPING,
    (S.RUNNING, T.INPUT): S.RUNNING,
    (S.RUNNING, T.AGENT_START): S.RUNNING,
    (S.RUNNING, T.AGENT_EXIT): S.RUNNING,
    (S.RUNNING, T.COMPLETE): S.COMPLETED,
    (S.RUNNING, T.FAIL): S.FAILED,
    (S.RUNNING, T.DAEMON_RESTART): S.INTERRUPTED,
    (S.PAUSED, T.RESUME): S.RUNNING,
    (S.PAUSED, T.STOP): S.STOPPING,
    (S.PAUSED, T.INPUT): S.PAUSED,
    (S.PAUSED, T.AGENT_EXIT): S.PAUSED,
    (S.PAUSED, T.FAIL): S.FAILED,
    (S.PAUSED, T.DAEMON_RESTART): S.PAUSED,
    (S.STOPPING, T.STOP): S.STOPPING,
    (S.STOPPING, T.AGENT_EXIT): S.STOPPING,
    (S.STOPPING, T.AGENTS_GONE): S.STOPPED,
    (S.STOPPING, T.DAEMON_RESTART): S.STOPPED,
    (S.STOPPED, T.DELETE): S.STOPPED,
    (S.COMPLETED, T.DELETE): S.COMPLETED,
    (S.FAILED, T.DELETE): S.FAILED,
    (S.INTERRUPTED, T.RESUME): S.RUNNING,
    (S.INTERRUPTED, T.STOP): S.STOPPED,
    (S.INTERRUPTED, T.DELETE): S.INTERRUPTED,
}

EXPECTED_EVENTS: dict[tuple[Status, Status], str] = {
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

PHRASES: dict[Trigger, str] = {
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

ACTIVE_LITERAL = {S.STARTING, S.RUNNING, S.PAUSED, S.STOPPING}
TERMINAL_LITERAL = {S.STOPPED, S.COMPLETED, S.FAILED}


def _edges() -> set[tuple[Status, Trigger, Status]]:
    return {(s, t, target) for s, row in TRANSITIONS.items() for t, target in row.items()}


# -- the table ---------------------------------------------------------------


def test_wire_values() -> None:
    assert [s.value for s in Status] == [
        "starting",
        "running",
        "paused",
        "stopping",
        "stopped",
        "completed",
        "failed",
        "interrupted",
    ]
    assert INITIAL is S.STARTING


def test_table_has_a_row_for_every_status_and_matches_the_spec() -> None:
    assert set(TRANSITIONS) == set(Status)
    assert {(s, t): target for s, t, target in _edges()} == EXPECTED


@pytest.mark.parametrize(
    ("status", "trigger"),
    list(itertools.product(Status, Trigger)),
    ids=lambda v: str(v),
)
def test_every_pair_is_legal_or_a_precise_conflict(status: Status, trigger: Trigger) -> None:
    if (status, trigger) in EXPECTED:
        assert next_status(status, trigger) is EXPECTED[status, trigger]
        assert trigger in allowed(status)
        return
    assert trigger not in allowed(status)
    with pytest.raises(IllegalTransition) as info:
        next_status(status, trigger)
    exc = info.value
    assert isinstance(exc, LokiError)
    assert exc.code == "CONFLICT"
    assert exc.message == f"cannot {PHRASES[trigger]} a session that is {status.value}"
    assert str(exc) == exc.message
    assert exc.details == {"status": status.value, "trigger": trigger.value}
    assert (exc.status, exc.trigger) == (status, trigger)
    with pytest.raises(IllegalTransition):
        step(status, trigger)


def test_illegal_transition_is_a_409_with_the_current_status() -> None:
    with pytest.raises(IllegalTransition) as info:
        next_status(S.STOPPED, T.PAUSE)
    api = ApiError.from_loki(info.value)
    assert api.status == 409
    assert api.code == "CONFLICT"
    assert api.message == "cannot pause a session that is stopped"
    assert api.details == {"status": "stopped", "trigger": "pause"}


def test_allowed_is_the_row() -> None:
    for status in Status:
        assert allowed(status) == frozenset(t for (s, t) in EXPECTED if s is status)


def test_active_and_terminal_sets() -> None:
    assert set(ACTIVE) == ACTIVE_LITERAL
    assert set(TERMINAL) == TERMINAL_LITERAL
    for status in Status:
        assert is_active(status) == (status in ACTIVE_LITERAL)
        assert is_terminal(status) == (status in TERMINAL_LITERAL)
        # active, terminal and interrupted partition the statuses
        kinds = [is_active(status), is_terminal(status), status is S.INTERRUPTED]
        assert kinds.count(True) == 1, status


def test_active_means_reconciled_on_restart_and_not_deletable() -> None:
    for status in Status:
        assert (T.DAEMON_RESTART in allowed(status)) == is_active(status)
        assert (T.DELETE in allowed(status)) == (not is_active(status))


def test_terminal_statuses_accept_only_delete() -> None:
    for status in TERMINAL_LITERAL:
        assert allowed(status) == {T.DELETE}
        assert next_status(status, T.DELETE) is status


def test_every_status_is_reachable_and_every_live_one_can_finish() -> None:
    graph: dict[Status, set[Status]] = {s: set(row.values()) for s, row in TRANSITIONS.items()}

    def reach(start: Status) -> set[Status]:
        seen, todo = {start}, deque([start])
        while todo:
            for nxt in graph[todo.popleft()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    assert reach(INITIAL) == set(Status)
    for status in Status:
        assert reach(status) & TERMINAL_LITERAL, f"{status} can never finish"


def test_interrupted_is_entered_only_by_a_daemon_restart_of_an_active_session() -> None:
    for before, trigger, after in _edges():
        if after is S.INTERRUPTED and before is not S.INTERRUPTED:
            assert trigger is T.DAEMON_RESTART
            assert before in ACTIVE_LITERAL


def test_stopped_is_entered_only_when_nothing_runs() -> None:
    into_stopped = {(b, t) for b, t, a in _edges() if a is S.STOPPED and b is not S.STOPPED}
    assert into_stopped == {
        (S.STOPPING, T.AGENTS_GONE),
        (S.STOPPING, T.DAEMON_RESTART),  # reconciliation killed the agents
        (S.INTERRUPTED, T.STOP),  # nothing of it runs
    }


# -- decisions, one test each -------------------------------------------------


def test_stop_of_a_starting_session_goes_through_stopping() -> None:
    assert next_status(S.STARTING, T.STOP) is S.STOPPING
    assert next_status(S.STOPPING, T.AGENTS_GONE) is S.STOPPED


def test_stop_of_an_interrupted_session_is_stopped_at_once() -> None:
    transition = step(S.INTERRUPTED, T.STOP)
    assert transition.after is S.STOPPED
    assert transition.event == "session.stopped"


def test_bootstrap_failure_fails_the_session() -> None:
    assert step(S.STARTING, T.FAIL).event == "session.failed"
    with pytest.raises(IllegalTransition):
        next_status(S.STARTING, T.COMPLETE)


def test_pause_while_stopping_is_a_conflict() -> None:
    for trigger in (T.PAUSE, T.RESUME, T.INPUT, T.COMPLETE, T.FAIL):
        with pytest.raises(IllegalTransition) as info:
            next_status(S.STOPPING, trigger)
        assert info.value.details["status"] == "stopping"


def test_a_repeated_stop_is_accepted_but_a_repeated_pause_is_not() -> None:
    assert step(S.STOPPING, T.STOP) == Transition(S.STOPPING, T.STOP, S.STOPPING, None, False)
    with pytest.raises(IllegalTransition):
        next_status(S.PAUSED, T.PAUSE)
    with pytest.raises(IllegalTransition):
        next_status(S.RUNNING, T.RESUME)


def test_an_agent_finishing_after_pause_leaves_the_session_paused() -> None:
    assert next_status(S.PAUSED, T.AGENT_EXIT) is S.PAUSED
    with pytest.raises(IllegalTransition):
        next_status(S.PAUSED, T.AGENT_START)
    with pytest.raises(IllegalTransition):
        next_status(S.PAUSED, T.COMPLETE)


def test_input_only_while_running_or_paused_and_changes_nothing() -> None:
    for status in Status:
        if status in (S.RUNNING, S.PAUSED):
            assert step(status, T.INPUT) == Transition(status, T.INPUT, status, None, False)
        else:
            with pytest.raises(IllegalTransition):
                next_status(status, T.INPUT)


def test_daemon_restart_of_a_stopping_session_stops_it_and_of_a_paused_one_keeps_it() -> None:
    assert step(S.STOPPING, T.DAEMON_RESTART).event == "session.stopped"
    assert step(S.PAUSED, T.DAEMON_RESTART).after is S.PAUSED
    assert step(S.RUNNING, T.DAEMON_RESTART).event == "session.interrupted"
    assert step(S.STARTING, T.DAEMON_RESTART).event == "session.interrupted"


def test_resume_of_an_interrupted_session_continues_running() -> None:
    transition = step(S.INTERRUPTED, T.RESUME)
    assert transition.after is S.RUNNING
    assert transition.event == "session.resumed"


def test_delete_removes_the_record_of_a_session_that_is_not_active() -> None:
    for status in Status:
        if status in ACTIVE_LITERAL:
            with pytest.raises(IllegalTransition):
                step(status, T.DELETE)
        else:
            transition = step(status, T.DELETE)
            assert transition.removes_record
            assert transition.event is None
    assert not any(step(b, t).removes_record for b, t, _ in _edges() if t is not T.DELETE)


# -- events --------------------------------------------------------------------


def test_events_as_data() -> None:
    assert EVENT_FOR == EXPECTED_EVENTS
    assert set(EVENT_FOR.values()) <= EVENT_TYPES
    changed = {(b, a) for b, _, a in _edges() if b is not a}
    assert set(EVENT_FOR) <= changed
    # every status change is announced, except entering `stopping`
    assert changed - set(EVENT_FOR) == {(s, S.STOPPING) for s in (S.STARTING, S.RUNNING, S.PAUSED)}
    for before, trigger, after in _edges():
        transition = step(before, trigger)
        assert transition.event == EVENT_FOR.get((before, after))
        assert transition.changed == (before is not after)


def test_session_started_is_emitted_only_by_the_end_of_bootstrap() -> None:
    started = [(b, t) for b, t, a in _edges() if step(b, t).event == "session.started"]
    assert started == [(S.STARTING, T.BOOTSTRAPPED)]


# -- the holder --------------------------------------------------------------------


def test_lifecycle_advances_and_refuses_after_delete() -> None:
    assert Lifecycle().status is S.STARTING
    life = Lifecycle()
    events = [
        life.fire(t).event
        for t in (T.BOOTSTRAPPED, T.AGENT_START, T.PAUSE, T.AGENT_EXIT, T.STOP, T.AGENTS_GONE)
    ]
    assert events == ["session.started", None, "session.paused", None, None, "session.stopped"]
    with pytest.raises(IllegalTransition):
        life.fire(T.RESUME)
    assert life.status is S.STOPPED
    assert life.fire(T.DELETE).removes_record
    assert life.deleted
    for trigger in Trigger:
        with pytest.raises(SessionDeleted) as info:
            life.fire(trigger)
        assert info.value.code == "NOT_FOUND"
        assert ApiError.from_loki(info.value).status == 404
    assert life.status is S.STOPPED


# -- the generated doc ---------------------------------------------------------


def test_doc_is_current() -> None:
    assert DOC.read_text(encoding="utf-8") == render_markdown(), (
        "docs/session-states.md is out of date: "
        "run `python -m lokid.session_state > docs/session-states.md`"
    )


def test_main_prints_the_doc(capsys: pytest.CaptureFixture[str]) -> None:
    session_state.main()
    assert capsys.readouterr().out == render_markdown()


def test_doc_transition_table_is_the_table() -> None:
    lines = render_markdown().splitlines()
    header = next(line for line in lines if line.startswith("| status | `pause`"))
    columns = [Trigger(c.strip(" `")) for c in header.strip("|").split("|")[1:]]
    assert set(columns) == set(Trigger)
    rows = lines[lines.index(header) + 2 : lines.index(header) + 2 + len(Status)]
    parsed: dict[tuple[Status, Trigger], Status] = {}
    for row in rows:
        first, *cells = (c.strip() for c in row.strip("|").split("|"))
        status = Status(first.strip("`"))
        for trigger, cell in zip(columns, cells, strict=True):
            if cell == "—":
                continue
            if cell in ("(same)", "*removed*"):
                parsed[status, trigger] = status
            else:
                parsed[status, trigger] = Status(cell.strip("`"))
    assert parsed == EXPECTED


def test_doc_diagram_is_the_table() -> None:
    text = render_markdown()
    block = text.split("```mermaid\n", 1)[1].split("```", 1)[0].splitlines()
    assert block[0] == "stateDiagram-v2"
    edges = set()
    for line in block[1:]:
        match = re.fullmatch(r"    (\S+) --> (\S+): (.+)", line)
        assert match, line
        start, end, labels = match.groups()
        for label in labels.split(", "):
            edges.add((start, label, end))
    expected = {("[*]", "create", "starting")} | {
        (s.value, t.value, "[*]" if t is T.DELETE else target.value)
        for (s, t), target in EXPECTED.items()
    }
    assert edges == expected


# -- the stateful model --------------------------------------------------------


class SessionModel(RuleBasedStateMachine):
    """Random trigger sequences against a `Lifecycle` and a model of its agents.

    Two rules: one fires any trigger (mostly illegal ones, which must be
    refused without a change), the other walks the table, firing one of the
    triggers `allowed` says are legal now, so long lives are explored too.
    The model knows what the runner guarantees: agents start and exit one at
    a time; none is left after `agents_gone`, after a failure (the runner
    kills them first) or after a daemon restart (reconciliation kills them);
    the runner reports `complete` only when no agent runs and `agent_exit`
    only when one does.
    """

    def __init__(self) -> None:
        super().__init__()
        self.life = Lifecycle()
        self.agents = 0

    def possible(self, trigger: Trigger) -> bool:
        """Whether the runner could report `trigger` now (user commands always can)."""
        if trigger is T.AGENT_EXIT:
            return self.agents > 0
        if trigger is T.COMPLETE:
            return self.agents == 0
        return True

    @precondition(lambda self: self.life.deleted or is_terminal(self.life.status))
    @rule()
    def next_session(self) -> None:
        """A finished session absorbs every trigger; go on exploring with a new one."""
        self.life = Lifecycle()
        self.agents = 0

    @rule(trigger=st.sampled_from(Trigger))
    def any_trigger(self, trigger: Trigger) -> None:
        if self.possible(trigger):
            self.fire(trigger)

    @rule(data=st.data())
    def legal_trigger(self, data: st.DataObject) -> None:
        choices = sorted(t for t in allowed(self.life.status) if self.possible(t))
        if choices:
            self.fire(data.draw(st.sampled_from(choices)))

    def fire(self, trigger: Trigger) -> None:
        before, was_deleted = self.life.status, self.life.deleted
        should_accept = self.expect_accepted(trigger)
        try:
            transition = self.life.fire(trigger)
        except SessionDeleted:
            assert was_deleted
            assert self.life.status is before
            return
        except IllegalTransition as exc:
            assert not was_deleted, "a deleted session must answer 404, not 409"
            assert self.life.status is before, "an illegal trigger changed the status"
            assert exc.details == {"status": before.value, "trigger": trigger.value}
            assert trigger not in allowed(before)
            assert should_accept is not True, f"{trigger} refused while {before}"
            return
        assert not was_deleted, "a deleted session accepted a trigger"
        assert should_accept is not False, f"{trigger} accepted while {before}"
        assert trigger in allowed(before)
        assert (transition.before, transition.after) == (before, self.life.status)
        self.check(transition)
        self.apply(transition)

    def expect_accepted(self, trigger: Trigger) -> bool | None:
        """What the rules demand regardless of the table (None: the table decides)."""
        status = self.life.status
        if trigger is T.AGENT_EXIT:
            return True  # a running agent's exit is never refused
        if trigger is T.AGENTS_GONE:
            return status is S.STOPPING  # it, and only it, ends a stop
        if trigger is T.DAEMON_RESTART:
            return is_active(status)  # reconciliation covers exactly the active
        if trigger is T.DELETE:
            return not is_active(status)
        if trigger in (T.AGENT_START, T.PAUSE):
            return status is S.RUNNING  # paused sessions start no agents
        if trigger is T.INPUT:
            return status in (S.RUNNING, S.PAUSED)
        if is_terminal(status):
            return False
        return None

    def check(self, t: Transition) -> None:
        if is_terminal(t.before):
            assert t.trigger is T.DELETE and t.after is t.before, "left a terminal status"
        if t.after is S.INTERRUPTED and t.before is not S.INTERRUPTED:
            assert t.trigger is T.DAEMON_RESTART and is_active(t.before)
        if t.before is S.STOPPING and t.after is not S.STOPPING:
            assert t.after is S.STOPPED
            assert t.trigger in (T.AGENTS_GONE, T.DAEMON_RESTART)
        if t.before is S.PAUSED and t.after is S.RUNNING:
            assert t.trigger is T.RESUME, "a paused session ran again by itself"
        if t.trigger in (T.INPUT, T.AGENT_START, T.AGENT_EXIT):
            assert not t.changed, f"{t.trigger} changed the status"
        assert t.event == EXPECTED_EVENTS.get((t.before, t.after))

    def apply(self, t: Transition) -> None:
        if t.trigger is T.AGENT_START:
            self.agents += 1
        elif t.trigger is T.AGENT_EXIT:
            self.agents -= 1
        elif t.trigger in (T.AGENTS_GONE, T.FAIL, T.DAEMON_RESTART):
            self.agents = 0

    @invariant()
    def one_status_and_consistent_flags(self) -> None:
        status = self.life.status
        assert isinstance(status, Status)
        assert is_active(status) == (status in ACTIVE_LITERAL)
        assert is_terminal(status) == (status in TERMINAL_LITERAL)
        assert [is_active(status), is_terminal(status), status is S.INTERRUPTED].count(True) == 1

    @invariant()
    def agents_run_only_in_a_working_session(self) -> None:
        if self.agents:
            assert self.life.status in (S.RUNNING, S.PAUSED, S.STOPPING), self.life.status
        if not is_active(self.life.status):
            assert self.agents == 0, f"agents left running in a {self.life.status} session"

    @invariant()
    def a_deleted_session_was_not_active(self) -> None:
        if self.life.deleted:
            assert not is_active(self.life.status)

    @invariant()
    def a_stopping_session_can_always_finish_stopping(self) -> None:
        if self.life.status is S.STOPPING and not self.life.deleted:
            assert T.AGENTS_GONE in allowed(S.STOPPING)


SessionModel.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestSessionModel = SessionModel.TestCase


def test_model_invariants_hold_in_every_reachable_state() -> None:
    """The stateful model's checks, exhaustively: every trigger from every state it can reach.

    Model states are (status, agents running, deleted), agents capped at 2.
    Hypothesis samples long sequences; this walk covers every pair once.
    """
    Key = tuple[Status, int, bool]

    def model(key: Key) -> SessionModel:
        m = SessionModel()
        m.life = Lifecycle(status=key[0], deleted=key[2])
        m.agents = key[1]
        return m

    start: Key = (INITIAL, 0, False)
    seen, todo = {start}, deque([start])
    while todo:
        key = todo.popleft()
        for trigger in Trigger:
            m = model(key)
            if not m.possible(trigger) or (trigger is T.AGENT_START and m.agents >= 2):
                continue
            m.fire(trigger)
            m.one_status_and_consistent_flags()
            m.agents_run_only_in_a_working_session()
            m.a_deleted_session_was_not_active()
            m.a_stopping_session_can_always_finish_stopping()
            after: Key = (m.life.status, m.agents, m.life.deleted)
            if after not in seen:
                seen.add(after)
                todo.append(after)
    assert {status for status, _, _ in seen} == set(Status)
    assert (S.PAUSED, 2, False) in seen  # agents outlive a pause
