"""The supervisor against the matrix of OTP's supervisor_SUITE, on the virtual clock.

Children are driven from the test through `Harness`: every start, every
stop by the supervisor (a cancellation or a shutdown request) and every exit
the child makes by itself lands in one `log`, so orders and counts are
asserted exactly. Every test takes `autojump_clock`: time only moves when all
tasks are blocked, so timeouts are exact and cost nothing.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import attrs
import pytest
import trio
from trio.testing import MockClock, wait_all_tasks_blocked

from lokid.actor import Actor, ActorStatistics
from lokid.supervisor import (
    BRUTAL_KILL,
    INFINITY,
    Backoff,
    BackoffStatistics,
    ChildAlreadyExists,
    ChildCounts,
    ChildInfo,
    ChildNotFound,
    ChildRunning,
    ChildSpec,
    ChildStartError,
    ChildStatus,
    Restart,
    RestartIntensityExceeded,
    Strategy,
    Supervisor,
    SupervisorNotRunning,
    SupervisorStartError,
    SupervisorStatistics,
    TooManyChildren,
)

PERMANENT, TRANSIENT, TEMPORARY = Restart.PERMANENT, Restart.TRANSIENT, Restart.TEMPORARY
ONE_FOR_ONE, ONE_FOR_ALL, REST_FOR_ONE = (
    Strategy.ONE_FOR_ONE,
    Strategy.ONE_FOR_ALL,
    Strategy.REST_FOR_ONE,
)


WATCHDOG = 10_000.0
"""Virtual seconds after which a supervisor under test counts as hung (see `start`)."""


class Boom(Exception):
    """What test children raise."""


class Fatal(BaseException):
    """A BaseException that is not an Exception: must not be swallowed."""


class Harness:
    """Children whose life is driven by the test and written to one log.

    Log lines: ``start X``, ``fail X`` (start raised), ``exit X <how>`` (the
    child ended by itself after an order from the test) and ``stop X`` (the
    supervisor cancelled it).
    """

    def __init__(self) -> None:
        self.log: list[str] = []
        self.starts: Counter[str] = Counter()
        self.fail_start: dict[str, int] = {}  # id -> how many next starts fail (-1: all)
        self.orders: dict[str, trio.MemorySendChannel[str]] = {}

    def spec(
        self,
        child_id: str,
        restart: Restart = PERMANENT,
        **kwargs: Any,
    ) -> ChildSpec:
        return ChildSpec(child_id, functools.partial(self.child, child_id), restart, **kwargs)

    async def child(self, child_id: str, *, task_status: ChildStatus) -> None:
        self.starts[child_id] += 1
        failures = self.fail_start.get(child_id, 0)
        if failures:
            self.fail_start[child_id] = failures - 1 if failures > 0 else failures
            self.log.append(f"fail {child_id}")
            raise Boom(f"{child_id} cannot start")
        send, receive = trio.open_memory_channel[str](1)
        self.orders[child_id] = send
        self.log.append(f"start {child_id}")
        try:
            task_status.started(f"{child_id}#{self.starts[child_id]}")
            how = await receive.receive()
        except trio.Cancelled:
            self.log.append(f"stop {child_id}")
            raise
        self.log.append(f"exit {child_id} {how}")
        if how == "crash":
            raise Boom(f"{child_id} crashed")
        if how == "group":
            raise ExceptionGroup("two failures", [Boom("one"), Boom("two")])
        if how == "bare":
            raise Boom
        if how == "fatal":
            raise Fatal("not an Exception")

    async def exit(self, child_id: str, how: str) -> None:
        """Make the current incarnation of `child_id` end (`normal`, `crash`, ...)."""
        self.orders[child_id].send_nowait(how)
        await wait_all_tasks_blocked()


@attrs.define
class Running:
    """A supervisor `run` under test: what it raised after it had started."""

    supervisor: Supervisor
    finished: trio.Event = attrs.Factory(trio.Event)
    error: Exception | None = None


async def start(nursery: trio.Nursery, supervisor: Supervisor) -> Running:
    """Start `supervisor.run` in `nursery`; a start failure raises here.

    A watchdog fails the test if `run` has not returned after `WATCHDOG`
    virtual seconds: with the autojump clock a deadlock (everything waiting
    for an event that never comes) then fails at once instead of hanging.
    """
    running = Running(supervisor)

    async def watchdog() -> None:
        with trio.move_on_after(WATCHDOG):
            await running.finished.wait()
        if not running.finished.is_set():
            raise AssertionError(f"{supervisor!r} still running after {WATCHDOG:g} s")

    async def run(*, task_status: trio.TaskStatus[Supervisor]) -> None:
        try:
            await supervisor.run(task_status=task_status)
        except Exception as exc:
            running.error = exc
        finally:
            running.finished.set()

    await nursery.start(run)
    nursery.start_soon(watchdog)
    return running


def ids(supervisor: Supervisor) -> list[str]:
    return [info.id for info in supervisor.which_children()]


def info(supervisor: Supervisor, child_id: str) -> ChildInfo:
    return next(i for i in supervisor.which_children() if i.id == child_id)


# -- start and stop ----------------------------------------------------------


async def test_children_start_in_spec_order_and_stop_in_reverse(autojump_clock: MockClock) -> None:
    h = Harness()
    sup = Supervisor("s", [h.spec("a"), h.spec("b"), h.spec("c")])
    async with trio.open_nursery() as nursery:
        assert await nursery.start(sup.run) is sup
        assert h.log == ["start a", "start b", "start c"]
        assert ids(sup) == ["a", "b", "c"]
        assert sup.count_children() == ChildCounts(specs=3, active=3)
        sup.request_stop()
    assert h.log[3:] == ["stop c", "stop b", "stop a"]
    assert [(i.running, i.last_exit) for i in sup.which_children()] == [(False, "shutdown")] * 3
    assert sup.statistics().running is False


async def test_start_failure_stops_started_children_in_reverse_and_raises(
    autojump_clock: MockClock,
) -> None:
    h = Harness()
    h.fail_start["c"] = 1
    sup = Supervisor("s", [h.spec("a"), h.spec("b"), h.spec("c"), h.spec("d")])
    with pytest.raises(SupervisorStartError) as caught:
        await sup.run()
    assert h.log == ["start a", "start b", "fail c", "stop b", "stop a"]
    assert caught.value.child_id == "c"
    assert caught.value.reason == "Boom: c cannot start"
    assert isinstance(caught.value.cause, Boom)
    assert caught.value.__cause__ is caught.value.cause
    assert sup.count_children() == ChildCounts(specs=4, active=0)
    # stopped by the shutdown protocol, not cancelled along with the nursery
    exits = [i.last_exit for i in sup.which_children()]
    assert exits == ["shutdown", "shutdown", "Boom: c cannot start", None]


async def test_child_returning_before_started_fails_the_start(autojump_clock: MockClock) -> None:
    async def lazy(*, task_status: ChildStatus) -> None:
        return

    h = Harness()
    sup = Supervisor("s", [h.spec("a"), ChildSpec("lazy", lazy)])
    with pytest.raises(SupervisorStartError) as caught:
        await sup.run()
    assert (caught.value.child_id, caught.value.reason) == ("lazy", "normal")
    assert caught.value.cause is None
    assert h.log == ["start a", "stop a"]


async def test_start_failure_of_nested_supervisor_fails_the_parent(
    autojump_clock: MockClock,
) -> None:
    h = Harness()
    h.fail_start["x"] = 1
    inner = Supervisor("inner", [h.spec("x")])
    outer = Supervisor("outer", [h.spec("a"), inner.as_child()])
    with pytest.raises(SupervisorStartError) as caught:
        await outer.run()
    assert caught.value.child_id == "inner"
    assert isinstance(caught.value.cause, SupervisorStartError)
    assert caught.value.cause.child_id == "x"
    assert h.log == ["start a", "fail x", "stop a"]


# -- the restart matrix --------------------------------------------------------

RESTARTED_LOG = {
    ONE_FOR_ONE: ["start b"],
    ONE_FOR_ALL: ["stop c", "stop a", "start a", "start b", "start c"],
    REST_FOR_ONE: ["stop c", "start b", "start c"],
}
RESTARTED_STARTS = {
    ONE_FOR_ONE: {"a": 1, "b": 2, "c": 1},
    ONE_FOR_ALL: {"a": 2, "b": 2, "c": 2},
    REST_FOR_ONE: {"a": 1, "b": 2, "c": 2},
}


@pytest.mark.parametrize("how", ["normal", "crash"])
@pytest.mark.parametrize("restart", list(Restart))
@pytest.mark.parametrize("strategy", list(Strategy))
async def test_restart_matrix(
    strategy: Strategy, restart: Restart, how: str, autojump_clock: MockClock
) -> None:
    """Child b (of permanent a, b, c) exits; who is stopped and started again."""
    h = Harness()
    sup = Supervisor("s", [h.spec("a"), h.spec("b", restart), h.spec("c")], strategy=strategy)
    async with trio.open_nursery() as nursery:
        running = await start(nursery, sup)
        h.log.clear()
        await h.exit("b", how)

        restarted = restart is PERMANENT or (restart is TRANSIENT and how == "crash")
        reason = "normal" if how == "normal" else "Boom: b crashed"
        assert h.log == [f"exit b {how}"] + (RESTARTED_LOG[strategy] if restarted else [])
        expected_starts = RESTARTED_STARTS[strategy] if restarted else {"a": 1, "b": 1, "c": 1}
        assert dict(h.starts) == expected_starts

        stats = sup.statistics()
        children = {c.id: c for c in stats.children}
        if restart is TEMPORARY:
            assert ids(sup) == ["a", "c"]
        else:
            assert ids(sup) == ["a", "b", "c"]
            assert (children["b"].running, children["b"].last_exit) == (restarted, reason)
            assert children["b"].restarts == int(restarted)
        siblings_restarted = [
            c for c in ("a", "c") if restarted and RESTARTED_STARTS[strategy][c] == 2
        ]
        for sibling in ("a", "c"):
            assert children[sibling].running
            assert children[sibling].restarts == int(sibling in siblings_restarted)
            assert children[sibling].last_exit == (
                "shutdown" if sibling in siblings_restarted else None
            )
        assert stats.restarts_total == int(restarted)
        assert stats.restarts_in_window == int(restarted)
        sup.request_stop()
    assert running.error is None


@pytest.mark.parametrize("strategy", [ONE_FOR_ALL, REST_FOR_ONE])
async def test_temporary_children_stopped_by_a_restart_are_removed(
    strategy: Strategy, autojump_clock: MockClock
) -> None:
    h = Harness()
    sup = Supervisor("s", [h.spec("a"), h.spec("t", TEMPORARY), h.spec("c")], strategy=strategy)
    async with trio.open_nursery() as nursery:
        await start(nursery, sup)
        h.log.clear()
        await h.exit("a", "crash")
        assert h.log == ["exit a crash", "stop c", "stop t", "start a", "start c"]
        assert ids(sup) == ["a", "c"]
        assert h.starts["t"] == 1
        sup.request_stop()


async def test_one_for_all_restarts_a_terminated_child_like_otp(autojump_clock: MockClock) -> None:
    """OTP's start_children starts every kept spec, even one stopped by terminate_child."""
    h = Harness()
    sup = Supervisor("s", [h.spec("a"), h.spec("b"), h.spec("c")], strategy=ONE_FOR_ALL)
    async with trio.open_nursery() as nursery:
        await start(nursery, sup)
        await sup.terminate_child("c")
        assert info(sup, "c").running is False
        h.log.clear()
        await h.exit("a", "crash")
        assert h.log == ["exit a crash", "stop b", "start a", "start b", "start c"]
        assert info(sup, "c").running is True
        sup.request_stop()


async def test_sibling_that_died_during_a_restart_is_restarted_once(
    autojump_clock: MockClock,
) -> None:
    """b's own exit notice is stale once a's one_for_all restart collected b's exit."""
    h = Harness()
    sup = Supervisor("s", [h.spec("a"), h.spec("b")], strategy=ONE_FOR_ALL)
    async with trio.open_nursery() as nursery:
        await start(nursery, sup)
        h.log.clear()
        h.orders["a"].send_nowait("crash")
        h.orders["b"].send_nowait("crash")
        await wait_all_tasks_blocked()
        # trio does not promise which of the two runs first
        assert sorted(h.log[:2]) == ["exit a crash", "exit b crash"]
        assert h.log[2:] == ["start a", "start b"]
        assert dict(h.starts) == {"a": 2, "b": 2}
        assert sup.statistics().restarts_total == 1
        assert [i.last_exit for i in sup.which_children()] == [
            "Boom: a crashed",
            "Boom: b crashed",
        ]
        sup.request_stop()


async def test_dynamic_child_crash_is_restarted(autojump_clock: MockClock) -> None:
    h = Harness()
    sup = Supervisor("s", [h.spec("a")], strategy=REST_FOR_ONE)
    async with trio.open_nursery() as nursery:
        await start(nursery, sup)
        await sup.start_child(h.spec("d"))
        h.log.clear()
        await h.exit("a", "crash")
        assert h.log == ["exit a crash", "stop d", "start a", "start d"]
        sup.request_stop()


async def test_a_crash_and_a_failed_restart_are_logged_with_their_traceback(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """OTP's crash report: the exit reason alone does not say where the bug is (a crashed
    actor left only its reason in the daemon's log)."""
    h = Harness()
    sup = Supervisor("s", [h.spec("a")], max_restarts=3)
    with caplog.at_level(logging.ERROR, logger="lokid.supervisor"):
        async with trio.open_nursery() as nursery:
            await start(nursery, sup)
            h.fail_start["a"] = 1
            await h.exit("a", "crash")
            sup.request_stop()
    crash, failed = caplog.records
    assert crash.getMessage() == "supervisor 's': child 'a' crashed: Boom: a crashed"
    assert crash.exc_info is not None and isinstance(crash.exc_info[1], Boom)
    assert "in child" in caplog.text  # the frame that raised, in Harness.child
    restart = "supervisor 's': restarting child 'a' failed: Boom: a cannot start"
    assert failed.getMessage() == restart
    assert failed.exc_info is not None and str(failed.exc_info[1]) == "a cannot start"


# -- restart intensity -------------------------------------------------------


async def test_more_than_max_restarts_within_period_escalates(autojump_clock: MockClock) -> None:
    h = Harness()
    sup = Supervisor("s", [h.spec("a"), h.spec("b"), h.spec("c")], max_restarts=3, period=5)
    async with trio.open_nursery() as nursery:
        running = await start(nursery, sup)
        for _ in range(3):
            await h.exit("b", "crash")
            await trio.sleep(1)
        assert not running.finished.is_set()
        h.log.clear()
        await h.exit("b", "crash")
        await running.finished.wait()
    assert h.log == ["exit b crash", "stop c", "stop a"]
    assert h.starts["b"] == 4
    error = running.error
    assert isinstance(error, RestartIntensityExceeded)
    assert (error.child_id, error.reason) == ("b", "Boom: b crashed")
    assert (error.max_restarts, error.period) == (3, 5)
    stats = sup.statistics()
    assert (stats.running, stats.restarts_total) == (False, 4)
    assert sup.count_children() == ChildCounts(specs=3, active=0)


async def test_max_restarts_zero_escalates_on_first_exit(autojump_clock: MockClock) -> None:
    h = Harness()
    sup = Supervisor("s", [h.spec("a")], max_restarts=0)
    async with trio.open_nursery() as nursery:
        running = await start(nursery, sup)
        await h.exit("a", "crash")
    assert isinstance(running.error, RestartIntensityExceeded)
    assert h.starts["a"] == 1


async def test_restarts_spread_over_more_than_period_do_not_escalate(
    autojump_clock: MockClock,
) -> None:
    h = Harness()
    sup = Supervisor("s", [h.spec("a")], max_restarts=2, period=5)
    async with trio.open_nursery() as nursery:
        running = await start(nursery, sup)
        for _ in range(10):  # a stamp every 3 s: at most 2 within any 5 s
            await h.exit("a", "crash")
            await trio.sleep(3)
        assert running.error is None and not running.finished.is_set()
        stats = sup.statistics()
        assert (stats.restarts_total, stats.restarts_in_window) == (10, 1)
        assert h.starts["a"] == 11
        await trio.sleep(2.5)
        assert sup.statistics().restarts_in_window == 0
        sup.request_stop()
    assert running.error is None


@pytest.mark.parametrize(("gap", "escalates"), [(5.0, True), (5.001, False)])
async def test_period_boundary_is_inclusive_like_otp(
    gap: float, escalates: bool, autojump_clock: MockClock
) -> None:
    h = Harness()
    sup = Supervisor("s", [h.spec("a")], max_restarts=1, period=5)
    async with trio.open_nursery() as nursery:
        running = await start(nursery, sup)
        await h.exit("a", "crash")
        await trio.sleep(gap)
        await h.exit("a", "crash")
        assert running.finished.is_set() is escalates
        sup.request_stop()
    assert isinstance(running.error, RestartIntensityExceeded) is escalates


async def test_child_that_can_never_restart_escalates(autojump_clock: MockClock) -> None:
    h = Harness()
    sup = Supervisor("s", [h.spec("a"), h.spec("b")], max_restarts=3)
    async with trio.open_nursery() as nursery:
        running = await start(nursery, sup)
        h.fail_start["a"] = -1
        h.log.clear()
        await h.exit("a", "crash")
        await running.finished.wait()
    # attempts 1-3 fail to start, attempt 4 is one too many
    assert h.log == ["exit a crash", "fail a", "fail a", "fail a", "stop b"]
    assert isinstance(running.error, RestartIntensityExceeded)
    assert running.error.reason == "Boom: a cannot start"
    assert sup.statistics().restarts_total == 4


async def test_failed_restart_is_retried_as_a_new_attempt(autojump_clock: MockClock) -> None:
    h = Harness()
    sup = Supervisor("s", [h.spec("a")], max_restarts=3)
    async with trio.open_nursery() as nursery:
        running = await start(nursery, sup)
        h.fail_start["a"] = 1
        h.log.clear()
        await h.exit("a", "crash")
        assert h.log == ["exit a crash", "fail a", "start a"]
        a = info(sup, "a")
        assert (a.running, a.restarts) == (True, 1)
        assert sup.statistics().restarts_total == 2
        sup.request_stop()
    assert running.error is None


async def test_nested_supervisor_escalation_restarts_it_then_escalates_the_parent(
    autojump_clock: MockClock,
) -> None:
    h = Harness()
    inner = Supervisor("inner", [h.spec("x"), h.spec("y")], max_restarts=0)
    outer = Supervisor("outer", [h.spec("a"), inner.as_child(), h.spec("z")], max_restarts=1)
    async with trio.open_nursery() as nursery:
        running = await start(nursery, outer)
        h.log.clear()
        await h.exit("x", "crash")
        # inner gives up (stops y) and outer starts a fresh inner; a and z are untouched
        assert h.log == ["exit x crash", "stop y", "start x", "start y"]
        nested = info(outer, "inner")
        assert (nested.running, nested.restarts) == (True, 1)
        assert nested.last_exit == (
            "RestartIntensityExceeded: supervisor 'inner': more than 0 restarts in 5 s "
            "(last: child 'x' exited with Boom: x crashed)"
        )
        h.log.clear()
        await h.exit("x", "crash")
        await running.finished.wait()
    # second escalation within the period is one restart too many for outer
    assert h.log == ["exit x crash", "stop y", "stop z", "stop a"]
    assert isinstance(running.error, RestartIntensityExceeded)
    assert running.error.supervisor == "outer"
    assert running.error.child_id == "inner"
    assert dict(h.starts) == {"a": 1, "x": 2, "y": 2, "z": 1}


# -- back-off instead of escalation ----------------------------------------------


@attrs.define
class Hooks:
    """`on_down`/`on_up` of a back-off supervisor: their calls, on the virtual clock."""

    log: list[str] = attrs.Factory(list)
    up: trio.Event = attrs.Factory(trio.Event)

    def on_down(self) -> None:
        self.log.append(f"down {trio.current_time():g}")

    def on_up(self) -> None:
        self.log.append(f"up {trio.current_time():g}")
        self.up.set()

    async def wait_up(self) -> None:
        """Until the next `on_up` and the fresh start after it are done."""
        await self.up.wait()
        self.up = trio.Event()
        await wait_all_tasks_blocked()


BACKOFF = Backoff(first=30, factor=2, max=100, reset_after=300)


def backed_off(h: Harness, hooks: Hooks, *child_ids: str, max_restarts: int = 0) -> Supervisor:
    return Supervisor(
        "opt",
        [h.spec(child_id) for child_id in child_ids],
        max_restarts=max_restarts,
        period=5,
        backoff=BACKOFF,
        on_down=hooks.on_down,
        on_up=hooks.on_up,
    )


def backoff_of(sup: Supervisor) -> BackoffStatistics:
    stats = sup.statistics().backoff
    assert stats is not None
    return stats


async def test_backoff_takes_the_children_down_instead_of_escalating(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    h, hooks = Harness(), Hooks()
    sup = backed_off(h, hooks, "a", "b", max_restarts=2)
    with caplog.at_level(logging.ERROR, logger="lokid.supervisor"):
        async with trio.open_nursery() as nursery:
            running = await start(nursery, sup)
            for _ in range(2):
                await h.exit("a", "crash")
            h.log.clear()
            await h.exit("a", "crash")  # the third restart within 5 s: one too many
            assert h.log == ["exit a crash", "stop b"]  # stopped as for an escalation
            assert not running.finished.is_set() and running.error is None
            assert hooks.log == ["down 0"]
            down = backoff_of(sup)
            assert down == BackoffStatistics(
                down=True,
                times_down=1,
                times_in_a_row=1,
                last_failure="supervisor 'opt': more than 2 restarts in 5 s "
                "(last: child 'a' exited with Boom: a crashed)",
                delay_seconds=30,
                down_seconds=0,
                retry_in_seconds=30,
            )
            assert [(c.running, c.last_exit) for c in sup.which_children()] == [
                (False, "Boom: a crashed"),
                (False, "shutdown"),
            ]
            with pytest.raises(SupervisorNotRunning):
                await sup.start_child(h.spec("c"))
            with pytest.raises(SupervisorNotRunning):
                await sup.restart_child("a")
            await trio.sleep(29.5)
            assert backoff_of(sup).retry_in_seconds == 0.5
            assert backoff_of(sup).down_seconds == 29.5
            assert h.log == ["exit a crash", "stop b"]
            await hooks.wait_up()
            assert trio.current_time() == 30
            assert h.log[2:] == ["start a", "start b"]  # a fresh incarnation, in order
            assert hooks.log == ["down 0", "up 30"]
            stats = sup.statistics()
            assert (stats.running, stats.restarts_in_window) == (True, 0)
            assert [(c.running, c.restarts) for c in stats.children] == [(True, 0), (True, 0)]
            assert stats.backoff is not None
            assert (stats.backoff.down, stats.backoff.times_down) == (False, 1)
            assert (stats.backoff.down_seconds, stats.backoff.retry_in_seconds) == (None, None)
            await sup.start_child(h.spec("c"))  # takes children again
            sup.request_stop()
    assert running.error is None
    [record] = [r for r in caplog.records if "stay down" in r.getMessage()]
    assert record.getMessage() == (
        "supervisor 'opt': more than 2 restarts in 5 s (last: child 'a' "
        "exited with Boom: a crashed); its children stay down for 30 s (down 1 time(s) in a row)"
    )


async def test_backoff_doubles_up_to_max_and_starts_over_after_stable_running(
    autojump_clock: MockClock,
) -> None:
    h, hooks = Harness(), Hooks()
    sup = backed_off(h, hooks, "a")  # max_restarts=0: every crash takes it down
    async with trio.open_nursery() as nursery:
        await start(nursery, sup)
        delays = []
        for _ in range(4):
            await h.exit("a", "crash")
            began = trio.current_time()
            await hooks.wait_up()
            delays.append(trio.current_time() - began)
        assert delays == [30, 60, 100, 100]  # doubling, at most `max`
        assert backoff_of(sup).times_in_a_row == 4
        await trio.sleep(299)  # up, but not yet `reset_after`
        assert backoff_of(sup).times_in_a_row == 4
        await trio.sleep(1)
        assert backoff_of(sup).times_in_a_row == 0
        await h.exit("a", "crash")
        began = trio.current_time()
        await hooks.wait_up()
        assert trio.current_time() - began == 30  # counted from the first delay again
        stats = backoff_of(sup)
        assert (stats.times_down, stats.times_in_a_row, stats.delay_seconds) == (5, 1, 30)
        sup.request_stop()
    assert h.starts["a"] == 6


async def test_backoff_children_that_cannot_start_leave_the_supervisor_started_and_down(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    h, hooks = Harness(), Hooks()
    h.fail_start["b"] = 2  # at the first start and at the first retry
    sup = backed_off(h, hooks, "a", "b")
    with caplog.at_level(logging.ERROR, logger="lokid.supervisor"):
        async with trio.open_nursery() as nursery:
            running = await start(nursery, sup)  # started: its children are down
            assert h.log == ["start a", "fail b", "stop a"]
            down = backoff_of(sup)
            assert (down.down, down.retry_in_seconds) == (True, 30)
            assert down.last_failure == (
                "supervisor 'opt' failed to start: child 'b' failed to start (Boom: b cannot start)"
            )
            await hooks.wait_up()
            assert h.log[3:] == ["start a", "fail b", "stop a"]
            assert backoff_of(sup).retry_in_seconds == 60  # down twice in a row
            await hooks.wait_up()
            assert h.log[6:] == ["start a", "start b"]
            assert trio.current_time() == 90
            sup.request_stop()
    assert running.error is None
    # the start failure's traceback is in the log: nothing else reports it
    first = next(r for r in caplog.records if "stay down for 30 s" in r.getMessage())
    assert first.exc_info is not None and isinstance(first.exc_info[1], Boom)


async def test_a_stop_request_while_down_returns_at_once(autojump_clock: MockClock) -> None:
    h, hooks = Harness(), Hooks()
    sup = backed_off(h, hooks, "a")
    async with trio.open_nursery() as nursery:
        running = await start(nursery, sup)
        await trio.sleep(7)
        await h.exit("a", "crash")
        await trio.sleep(10)
        sup.request_stop()
        await running.finished.wait()
        assert trio.current_time() == 17
    assert running.error is None
    assert hooks.log == ["down 7", "up 17"]  # every on_down has its on_up
    assert h.starts["a"] == 1
    assert backoff_of(sup).down is False


async def test_a_backoff_supervisor_never_reaches_its_parent(autojump_clock: MockClock) -> None:
    """Where the daemon puts the registry: under rest_for_one, before the listeners."""
    h, hooks = Harness(), Hooks()
    inner = backed_off(h, hooks, "x")
    outer = Supervisor("outer", [h.spec("a"), inner.as_child(), h.spec("z")], strategy=REST_FOR_ONE)
    async with trio.open_nursery() as nursery:
        running = await start(nursery, outer)
        h.log.clear()
        for _ in range(3):  # each crash exceeds max_restarts=0
            await h.exit("x", "crash")
            await hooks.wait_up()
        assert h.log == ["exit x crash", "start x"] * 3  # z was never restarted
        stats = outer.statistics()
        assert stats.restarts_total == 0
        assert [(c.id, c.running, c.restarts) for c in stats.children] == [
            ("a", True, 0),
            ("opt", True, 0),
            ("z", True, 0),
        ]
        await h.exit("x", "crash")
        detail = outer.statistics().children[1].detail
        assert isinstance(detail, SupervisorStatistics) and detail.backoff is not None
        assert (detail.backoff.down, detail.backoff.times_in_a_row) == (True, 4)
        h.log.clear()
        outer.request_stop()  # while down: the stop goes on in order
    assert h.log == ["stop z", "stop a"]
    assert running.error is None and not outer.statistics().running


async def test_a_failing_hook_is_logged_and_ignored(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> None:
        raise RuntimeError("hook bug")

    h = Harness()
    sup = Supervisor("opt", [h.spec("a")], max_restarts=0, backoff=BACKOFF, on_down=broken)
    with caplog.at_level(logging.ERROR, logger="lokid.supervisor"):
        async with trio.open_nursery() as nursery:
            running = await start(nursery, sup)
            await h.exit("a", "crash")
            await trio.sleep(30)
            await wait_all_tasks_blocked()
            assert h.starts["a"] == 2
            sup.request_stop()
    assert running.error is None
    assert "supervisor 'opt': on_down hook failed" in caplog.text


def test_backoff_delays_are_bounded_however_long_it_runs() -> None:
    policy = Backoff()  # the defaults: 30 s doubling to 10 min
    assert [policy.delay(n) for n in range(1, 8)] == [30, 60, 120, 240, 480, 600, 600]
    assert policy.delay(1_000_000) == 600  # no overflow
    assert Backoff(first=5, max=50, factor=1).delay(100) == 5


@pytest.mark.parametrize(
    "make",
    [
        lambda: Backoff(first=0),
        lambda: Backoff(first=math.inf, max=math.inf),
        lambda: Backoff(first=60, max=30),
        lambda: Backoff(factor=0.5),
        lambda: Backoff(factor=math.nan),
        lambda: Backoff(reset_after=-1),
        lambda: Supervisor("s", on_down=lambda: None),
        lambda: Supervisor("s", on_up=lambda: None),
    ],
)
def test_invalid_backoff_arguments(make: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        make()


# -- the shutdown protocol -----------------------------------------------------


@attrs.define
class Trapper:
    """A child that traps shutdown and returns `grace` seconds after the request
    (never, for None); records when it was asked and whether it was cancelled."""

    grace: float | None
    asked_at: float | None = None
    cancelled_at: float | None = None

    async def __call__(self, *, task_status: ChildStatus) -> None:
        task_status.started()
        try:
            await task_status.shutdown_requested.wait()
            self.asked_at = trio.current_time()
            if self.grace is None:
                await trio.sleep_forever()
            await trio.sleep(self.grace)
        except trio.Cancelled:
            self.cancelled_at = trio.current_time()
            raise


async def stop_timed(sup: Supervisor, child_id: str) -> float:
    before = trio.current_time()
    await sup.terminate_child(child_id)
    return trio.current_time() - before


@pytest.mark.parametrize(
    ("grace", "shutdown", "elapsed", "reason", "asked", "cancelled"),
    [
        pytest.param(None, 2.5, 2.5, "killed", True, True, id="ignores-shutdown-killed-at-timeout"),
        pytest.param(3.0, 10.0, 3.0, "shutdown", True, False, id="returns-in-time"),
        pytest.param(None, BRUTAL_KILL, 0.0, "killed", False, True, id="brutal-kill-immediate"),
        pytest.param(1000.0, INFINITY, 1000.0, "shutdown", True, False, id="infinity-waits"),
    ],
)
async def test_trapping_child_shutdown_protocol(
    grace: float | None,
    shutdown: float,
    elapsed: float,
    reason: str,
    asked: bool,
    cancelled: bool,
    autojump_clock: MockClock,
) -> None:
    child = Trapper(grace)
    sup = Supervisor("s", [ChildSpec("t", child, shutdown=shutdown, traps_shutdown=True)])
    async with trio.open_nursery() as nursery:
        await start(nursery, sup)
        t0 = trio.current_time()
        assert await stop_timed(sup, "t") == pytest.approx(elapsed)
        assert info(sup, "t").last_exit == reason
        assert (child.asked_at is not None) is asked
        assert (child.cancelled_at is not None) is cancelled
        if asked:
            assert child.asked_at == t0
        if cancelled:
            assert child.cancelled_at == pytest.approx(t0 + elapsed)
        sup.request_stop()


@pytest.mark.parametrize("after_kill", ["return", "raise"])
async def test_killed_child_exits_killed_however_it_ends(
    after_kill: str, autojump_clock: MockClock
) -> None:
    """Trio's kill can be caught; the reason is still "killed", as in OTP."""

    async def stubborn(*, task_status: ChildStatus) -> None:
        task_status.started()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            if after_kill == "raise":
                raise Boom("cleanup failed") from None
            return

    for shutdown, traps in ((BRUTAL_KILL, True), (1.0, True)):
        sup = Supervisor("s", [ChildSpec("t", stubborn, shutdown=shutdown, traps_shutdown=traps)])
        async with trio.open_nursery() as nursery:
            running = await start(nursery, sup)
            await sup.terminate_child("t")
            assert info(sup, "t").last_exit == "killed"
            await sup.restart_child("t")
            sup.request_stop()
        assert running.error is None
        assert info(sup, "t").last_exit == "killed"


async def test_cancelled_terminate_still_kills_the_child_and_does_not_restart_it(
    autojump_clock: MockClock,
) -> None:
    """A stop whose caller gives up is completed by the monitor: killed, not restarted."""
    child = Trapper(grace=None)
    sup = Supervisor("s", [ChildSpec("t", child, shutdown=10.0, traps_shutdown=True)])
    async with trio.open_nursery() as nursery:
        await start(nursery, sup)
        t0 = trio.current_time()
        with trio.move_on_after(1.0):
            await sup.terminate_child("t")
        await wait_all_tasks_blocked()
        assert child.cancelled_at == t0 + 1.0
        assert info(sup, "t") == ChildInfo("t", False, PERMANENT, 0, "killed")
        assert sup.statistics().restarts_total == 0
        sup.request_stop()


async def test_child_not_trapping_shutdown_is_cancelled_at_once(autojump_clock: MockClock) -> None:
    child = Trapper(grace=1.0)
    sup = Supervisor("s", [ChildSpec("t", child, shutdown=10.0, traps_shutdown=False)])
    async with trio.open_nursery() as nursery:
        await start(nursery, sup)
        assert await stop_timed(sup, "t") == 0
        assert (child.asked_at, info(sup, "t").last_exit) == (None, "shutdown")
        sup.request_stop()


async def test_supervisor_shutdown_applies_each_childs_protocol_in_reverse(
    autojump_clock: MockClock,
) -> None:
    first, second = Trapper(grace=None), Trapper(grace=1.0)
    sup = Supervisor(
        "s",
        [
            ChildSpec("first", first, shutdown=4.0, traps_shutdown=True),
            ChildSpec("second", second, shutdown=4.0, traps_shutdown=True),
        ],
    )
    async with trio.open_nursery() as nursery:
        running = await start(nursery, sup)
        t0 = trio.current_time()
        sup.request_stop()
        await running.finished.wait()
        assert trio.current_time() - t0 == pytest.approx(5.0)
    assert second.asked_at == t0
    assert first.asked_at == pytest.approx(t0 + 1.0)
    assert [i.last_exit for i in sup.which_children()] == ["killed", "shutdown"]
    assert sup.statistics().last_exit == "first: killed"


async def test_hurry_kills_the_waited_child_and_the_rest_at_once_in_reverse_order(
    autojump_clock: MockClock,
) -> None:
    """A second stop request: no child waits out its shutdown time any more, but the
    kills still go in reverse start order, each waited for, so a child's clean-up still
    finds the children started before it running (the daemon's store)."""
    log: list[str] = []
    running_ids: set[str] = set()

    def stubborn(child_id: str, cleanup: float) -> ChildSpec:
        async def child(*, task_status: ChildStatus) -> None:
            running_ids.add(child_id)
            task_status.started()
            try:
                await trio.sleep_forever()  # ignores the shutdown request
            finally:
                with trio.CancelScope(shield=True):
                    log.append(f"kill {child_id} at {trio.current_time() - t0:g}")
                    log.append(f"{child_id} sees {sorted(running_ids - {child_id})}")
                    await trio.sleep(cleanup)  # a shielded clean-up
                running_ids.discard(child_id)

        return ChildSpec(child_id, child, shutdown=30.0, traps_shutdown=True)

    sup = Supervisor("s", [stubborn("store", 0.0), stubborn("pool", 0.5), stubborn("api", 0.0)])
    async with trio.open_nursery() as nursery:
        running = await start(nursery, sup)
        t0 = trio.current_time()
        sup.request_stop()  # "api" gets its 30 s...
        await trio.sleep(3.0)
        sup.hurry()  # ... cut at 3 s; "pool" and "store" are never asked
        sup.hurry()  # idempotent
        await running.finished.wait()
        assert trio.current_time() - t0 == pytest.approx(3.5)
    assert log == [
        "kill api at 3",
        "api sees ['pool', 'store']",
        "kill pool at 3",
        "pool sees ['store']",
        "kill store at 3.5",
        "store sees []",
    ]
    assert [i.last_exit for i in sup.which_children()] == ["killed"] * 3
    assert running.error is None
    sup.hurry()  # not running: nothing happens


async def test_hurry_before_a_stop_request_stops_too(autojump_clock: MockClock) -> None:
    h = Harness()
    child = Trapper(grace=None)
    sup = Supervisor("s", [h.spec("a"), ChildSpec("t", child, shutdown=10.0, traps_shutdown=True)])
    async with trio.open_nursery() as nursery:
        running = await start(nursery, sup)
        t0 = trio.current_time()
        sup.hurry()
        await running.finished.wait()
        assert trio.current_time() == t0
    assert child.asked_at is None and child.cancelled_at == t0
    assert h.log == ["start a", "stop a"]
    assert [i.last_exit for i in sup.which_children()] == ["killed", "killed"]


async def test_parent_stop_reaches_nested_children_in_reverse_order(
    autojump_clock: MockClock,
) -> None:
    h = Harness()
    inner = Supervisor("inner", [h.spec("x"), h.spec("y")])
    outer = Supervisor("outer", [h.spec("a"), inner.as_child("sub"), h.spec("z")])
    async with trio.open_nursery() as nursery:
        running = await start(nursery, outer)
        detail = outer.statistics().children[1].detail
        assert isinstance(detail, SupervisorStatistics)
        assert (detail.name, [c.id for c in detail.children]) == ("inner", ["x", "y"])
        h.log.clear()
        outer.request_stop()
    assert h.log == ["stop z", "stop y", "stop x", "stop a"]
    assert info(outer, "sub").last_exit == "shutdown"
    assert running.error is None


async def test_actor_drains_its_mailbox_when_stopped(autojump_clock: MockClock) -> None:
    class Recorder(Actor[str]):
        def __init__(self) -> None:
            super().__init__("recorder")
            self.seen: list[str] = []

        async def handle(self, message: str) -> None:
            await trio.sleep(1)
            self.seen.append(message)

    actor = Recorder()
    spec = ChildSpec("rec", actor.run, traps_shutdown=True, statistics=actor.statistics)
    sup = Supervisor("s", [spec])
    async with trio.open_nursery() as nursery:
        running = await start(nursery, sup)
        for message in ("m1", "m2", "m3"):
            actor.tell_nowait(message)
        sup.request_stop()
        await running.finished.wait()
    assert actor.seen == ["m1", "m2", "m3"]
    assert info(sup, "rec").last_exit == "shutdown"
    detail = sup.statistics().children[0].detail
    assert isinstance(detail, ActorStatistics) and detail.handled == 3


async def test_outside_cancellation_cancels_the_children(autojump_clock: MockClock) -> None:
    h = Harness()
    sup = Supervisor("s", [h.spec("a"), h.spec("b")])
    with trio.move_on_after(1):
        await sup.run()
    assert sorted(h.log) == ["start a", "start b", "stop a", "stop b"]
    assert sup.count_children() == ChildCounts(specs=2, active=0)
    assert [i.last_exit for i in sup.which_children()] == ["killed", "killed"]


# -- exits never leak --------------------------------------------------------


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("crash", "Boom: a crashed"),
        ("group", "ExceptionGroup: two failures (2 sub-exceptions)"),
        ("bare", "Boom"),
        ("normal", "normal"),
    ],
)
async def test_child_exits_never_reach_siblings(
    how: str, reason: str, autojump_clock: MockClock
) -> None:
    h = Harness()
    sup = Supervisor("s", [h.spec("a", TEMPORARY), h.spec("b")])
    async with trio.open_nursery() as nursery:
        running = await start(nursery, sup)
        await h.exit("a", how)
        assert h.log == ["start a", "start b", f"exit a {how}"]
        assert sup.statistics().last_exit == f"a: {reason}"
        assert info(sup, "b").running
        sup.request_stop()
    assert running.error is None


async def test_base_exceptions_from_children_propagate(autojump_clock: MockClock) -> None:
    h = Harness()
    sup = Supervisor("s", [h.spec("a"), h.spec("b")])
    with pytest.RaisesGroup(pytest.RaisesGroup(Fatal)):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await h.exit("a", "fatal")
    assert h.log == ["start a", "start b", "exit a fatal", "stop b"]


# -- dynamic children ---------------------------------------------------------


async def test_dynamic_children_api(autojump_clock: MockClock) -> None:
    h = Harness()
    sup = Supervisor("s", [h.spec("a")])
    async with trio.open_nursery() as nursery:
        await start(nursery, sup)
        assert await sup.start_child(h.spec("d")) == "d#1"
        assert await sup.start_child(h.spec("t", TEMPORARY)) == "t#1"
        assert ids(sup) == ["a", "d", "t"]
        with pytest.raises(ChildAlreadyExists):
            await sup.start_child(h.spec("d"))
        with pytest.raises(ChildAlreadyExists):
            await sup.start_child(h.spec("a"))

        with pytest.raises(ChildRunning):
            await sup.restart_child("d")
        with pytest.raises(ChildRunning):
            sup.delete_child("d")

        await sup.terminate_child("d")
        assert info(sup, "d") == ChildInfo("d", False, PERMANENT, 0, "shutdown")
        assert sup.count_children() == ChildCounts(specs=3, active=2)
        await sup.terminate_child("d")  # not running: nothing to do
        assert await sup.restart_child("d") == "d#2"
        assert sup.count_children() == ChildCounts(specs=3, active=3)

        await sup.terminate_child("t")  # temporary: the spec goes with it
        assert ids(sup) == ["a", "d"]

        await sup.terminate_child("d")
        sup.delete_child("d")
        assert ids(sup) == ["a"]
        assert await sup.start_child(h.spec("d")) == "d#3"  # the id is free again

        for call in (sup.terminate_child, sup.restart_child):
            with pytest.raises(ChildNotFound):
                await call("nope")
        with pytest.raises(ChildNotFound):
            sup.delete_child("nope")
        sup.request_stop()
    assert h.log[-2:] == ["stop d", "stop a"]


async def test_start_child_failure_keeps_no_spec(autojump_clock: MockClock) -> None:
    h = Harness()
    h.fail_start["d"] = 1
    sup = Supervisor("s", [h.spec("a")])
    async with trio.open_nursery() as nursery:
        await start(nursery, sup)
        with pytest.raises(ChildStartError) as caught:
            await sup.start_child(h.spec("d"))
        assert (caught.value.child_id, caught.value.reason) == ("d", "Boom: d cannot start")
        assert ids(sup) == ["a"]
        assert await sup.start_child(h.spec("d")) == "d#2"
        sup.request_stop()


async def test_restart_child_failure_leaves_it_terminated(autojump_clock: MockClock) -> None:
    h = Harness()
    sup = Supervisor("s", [h.spec("a")])
    async with trio.open_nursery() as nursery:
        await start(nursery, sup)
        await sup.terminate_child("a")
        h.fail_start["a"] = 1
        with pytest.raises(ChildStartError):
            await sup.restart_child("a")
        assert info(sup, "a") == ChildInfo("a", False, PERMANENT, 0, "Boom: a cannot start")
        assert sup.statistics().restarts_total == 0  # manual restarts are not intensity
        sup.request_stop()


async def test_start_child_needs_a_running_supervisor(autojump_clock: MockClock) -> None:
    h = Harness()
    sup = Supervisor("s")
    with pytest.raises(SupervisorNotRunning):
        await sup.start_child(h.spec("d"))
    async with trio.open_nursery() as nursery:
        await start(nursery, sup)
        await sup.start_child(h.spec("d"))
        sup.request_stop()
        with pytest.raises(SupervisorNotRunning):
            await sup.start_child(h.spec("e"))
    with pytest.raises(SupervisorNotRunning):
        await sup.restart_child("d")
    assert h.starts == Counter({"d": 1})


async def test_thousand_dynamic_children_start_and_stop_in_order(
    autojump_clock: MockClock,
) -> None:
    h = Harness()
    sup = Supervisor("s", [h.spec("static")], max_children=1001)
    names = [f"d{i}" for i in range(1000)]
    async with trio.open_nursery() as nursery:
        await start(nursery, sup)
        for name in names:
            await sup.start_child(h.spec(name, TRANSIENT))
        assert sup.count_children() == ChildCounts(specs=1001, active=1001)
        with pytest.raises(TooManyChildren):
            await sup.start_child(h.spec("one-too-many"))
        h.log.clear()
        sup.request_stop()
    assert h.log == [f"stop {name}" for name in reversed(names)] + ["stop static"]
    assert sup.count_children() == ChildCounts(specs=1001, active=0)


async def test_max_children_bounds_specs(autojump_clock: MockClock) -> None:
    h = Harness()
    with pytest.raises(TooManyChildren):
        Supervisor("s", [h.spec("a"), h.spec("b")], max_children=1)
    with pytest.raises(ChildAlreadyExists):
        Supervisor("s", [h.spec("a"), h.spec("a")])
    sup = Supervisor("s", [h.spec("a")], max_children=2)
    async with trio.open_nursery() as nursery:
        await start(nursery, sup)
        await sup.start_child(h.spec("b"))
        with pytest.raises(TooManyChildren):
            await sup.start_child(h.spec("c"))
        await sup.terminate_child("b")
        with pytest.raises(TooManyChildren):  # a terminated child keeps its spec
            await sup.start_child(h.spec("c"))
        sup.delete_child("b")
        await sup.start_child(h.spec("c"))
        assert ids(sup) == ["a", "c"]
        sup.request_stop()


async def test_start_child_waits_for_a_restart_in_progress(autojump_clock: MockClock) -> None:
    """Structural changes are serialised: d is added only after the one_for_all restart."""
    h = Harness()
    slow = Trapper(grace=2.0)
    sup = Supervisor(
        "s",
        [ChildSpec("slow", slow, shutdown=10.0, traps_shutdown=True), h.spec("b")],
        strategy=ONE_FOR_ALL,
    )
    async with trio.open_nursery() as nursery:
        await start(nursery, sup)
        h.log.clear()
        h.orders["b"].send_nowait("crash")
        await trio.sleep(1)  # the restart is waiting for `slow` to stop
        assert h.log == ["exit b crash"]
        t0 = trio.current_time()
        assert await sup.start_child(h.spec("d")) == "d#1"
        assert trio.current_time() - t0 == pytest.approx(1.0)
        assert h.log == ["exit b crash", "start b", "start d"]
        assert ids(sup) == ["slow", "b", "d"]
        sup.request_stop()


async def test_a_supervisor_runs_again_from_its_static_specs(autojump_clock: MockClock) -> None:
    h = Harness()
    sup = Supervisor("s", [h.spec("a")])
    async with trio.open_nursery() as nursery:
        await start(nursery, sup)
        await sup.start_child(h.spec("d"))
        with pytest.raises(RuntimeError, match="already running"):
            await sup.run()
        sup.request_stop()
    async with trio.open_nursery() as nursery:
        await start(nursery, sup)
        assert ids(sup) == ["a"]
        assert h.starts == Counter({"a": 2, "d": 1})
        sup.request_stop()


# -- statistics and records ----------------------------------------------------


async def test_statistics(autojump_clock: MockClock) -> None:
    h = Harness()
    calls: list[str] = []

    def detail() -> dict[str, int]:
        calls.append("a")
        return {"answer": 42}

    sup = Supervisor("s", [h.spec("a", statistics=detail), h.spec("b", TRANSIENT)], period=10)
    before = sup.statistics()
    assert (before.running, before.restarts_total, before.last_exit) == (False, 0, None)
    async with trio.open_nursery() as nursery:
        await start(nursery, sup)
        await trio.sleep(2)
        await h.exit("a", "crash")
        stats = sup.statistics()
        assert (stats.name, stats.strategy, stats.running) == ("s", "one_for_one", True)
        a, b = stats.children
        assert (a.id, a.restart, a.running, a.restarts) == ("a", "permanent", True, 1)
        assert (a.last_exit, a.detail) == ("Boom: a crashed", {"answer": 42})
        assert a.running_seconds == 0.0  # restarted just now
        assert (b.id, b.restart, b.restarts, b.last_exit) == ("b", "transient", 0, None)
        assert (b.running_seconds, b.detail) == (2.0, None)  # started at 0
        assert (stats.restarts_total, stats.restarts_in_window) == (1, 1)
        assert stats.last_exit == "a: Boom: a crashed"
        await trio.sleep(10.5)
        assert sup.statistics().restarts_in_window == 0
        await h.exit("b", "normal")
        b = sup.statistics().children[1]
        assert (b.running, b.running_seconds, b.last_exit) == (False, None, "normal")
        sup.request_stop()
    assert calls == ["a"] * 4  # one per statistics() call
    assert sup.statistics().restarts_total == 1


def test_as_child_spec() -> None:
    sup = Supervisor("inner")
    spec = sup.as_child()
    assert spec == ChildSpec(
        "inner",
        sup.run,
        PERMANENT,
        shutdown=INFINITY,
        traps_shutdown=True,
        statistics=sup.statistics,
    )
    assert sup.as_child("x", restart=TRANSIENT).id == "x"
    assert sup.as_child("x", restart=TRANSIENT).restart is TRANSIENT


async def _noop(*, task_status: ChildStatus) -> None:
    task_status.started()


@pytest.mark.parametrize(
    "make",
    [
        lambda: ChildSpec("", _noop),
        lambda: ChildSpec("a", _noop, shutdown=-1),
        lambda: ChildSpec("a", _noop, shutdown=float("nan")),
        lambda: Supervisor("s", max_restarts=-1),
        lambda: Supervisor("s", period=0),
        lambda: Supervisor("s", max_children=0),
    ],
)
def test_invalid_arguments(make: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        make()


async def test_child_status_outside_a_supervisor(autojump_clock: MockClock) -> None:
    status = ChildStatus()
    status.started("x")
    with pytest.raises(RuntimeError, match="twice"):
        status.started("y")
    assert not status.shutdown_requested.is_set()


async def test_forget_finished_drops_specs_of_children_that_will_not_restart(
    autojump_clock: MockClock,
) -> None:
    h = Harness()
    sup = Supervisor("s", forget_finished=True, max_children=2)
    async with trio.open_nursery() as nursery:
        await start(nursery, sup)
        await sup.start_child(h.spec("done", TRANSIENT))
        await sup.start_child(h.spec("crashes", TRANSIENT))
        await h.exit("done", "normal")
        await h.exit("crashes", "crash")
        # the normal exit is forgotten (its slot is free again); the crash is restarted
        assert ids(sup) == ["crashes"]
        assert h.starts["crashes"] == 2
        await sup.start_child(h.spec("next", TRANSIENT))
        sup.request_stop()
    assert ids(sup) == ["crashes", "next"]  # stopped by the supervisor: kept, as OTP does
