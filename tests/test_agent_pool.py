"""AgentPool on a real store with real processes: cap, fairness, records, reconciliation, stop."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import attrs
import pytest
import sqlite_utils
import trio
import trio.testing

from lokid.actors.agent_pool import (
    GONE,
    RECONCILED,
    AgentPool,
    AgentPoolStatistics,
    PoolBusy,
    PoolClosed,
    _boot_id,
)
from lokid.actors.store import StoreActor, StoreError, StoreUnavailable
from lokid.agent_host import HOLD_ARGV, AgentSpec, EndReason, RunResult, still_held
from lokid.process import ProcessIdentity, group_members, is_same_process, start_ticks

from .child_status import StubChildStatus
from .proc_kit import running

PY = sys.executable
WAIT = 30
# Agents the pool must stop live 20 s at most: the pool's stops are shielded (they
# cannot be cut short by `fail_after`), so a pool that fails to stop an agent makes
# its test fail after at most that long instead of hanging the suite.

# Ignores SIGTERM and leaves a grandchild (same group) that ignores it too.
STUBBORN = textwrap.dedent(
    """
    import os, signal, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(20)
        os._exit(0)
    print("ready", flush=True)
    time.sleep(20)
    """
)

# The leader forks a member that sleeps, says so, and exits: an orphaned group.
ORPHANING = textwrap.dedent(
    """
    import os, time
    if os.fork() == 0:
        time.sleep(20)
        os._exit(0)
    print("ready", flush=True)
    """
)


@contextlib.asynccontextmanager
async def running_store(tmp_path: pathlib.Path) -> AsyncIterator[StoreActor]:
    store = StoreActor(tmp_path / "lokid.db")
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        yield store
        nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def running_pool(
    store: StoreActor, status: StubChildStatus | None = None, **options: Any
) -> AsyncIterator[AgentPool]:
    """Run a pool until the block ends, then stop it the way the supervisor does."""
    status = status or StubChildStatus()
    pool = AgentPool(store, **options)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(pool.run, task_status=status))
        await status.started_event.wait()
        yield pool
        status.shutdown_requested.set()


@contextlib.asynccontextmanager
async def store_and_pool(tmp_path: pathlib.Path, **options: Any) -> AsyncIterator[AgentPool]:
    with trio.fail_after(WAIT):
        async with running_store(tmp_path) as store, running_pool(store, **options) as pool:
            yield pool


def live(pgid: int) -> list[int]:
    return [pid for pid, state in group_members(pgid) if state != "Z"]


def marked(marker: str) -> list[int]:
    """Pids of live processes whose command line contains `marker`."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as handle:
                cmdline = handle.read()
        except OSError:
            continue
        if marker.encode() in cmdline and live_pid(int(entry.name)):
            found.append(int(entry.name))
    return found


def live_pid(pid: int) -> bool:
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] != "Z"


async def agent_rows(store: StoreActor) -> list[dict[str, Any]]:
    return await store.read(lambda db: list(db.query("SELECT * FROM agents ORDER BY id")))


def sleeper(tmp_path: pathlib.Path, seconds: float, marker: str = "") -> AgentSpec:
    script = f"import time; time.sleep({seconds})"
    return AgentSpec((PY, "-c", script, *([marker] if marker else [])), tmp_path)


# -- cap and fairness --------------------------------------------------------------


async def test_cap_holds_for_many_requests_of_one_session(tmp_path: pathlib.Path) -> None:
    marker = f"lokid-cap-{uuid.uuid4()}"
    peaks = {"pool": 0, "proc": 0}
    async with store_and_pool(tmp_path, max_agents=2) as pool:
        assert (pool.capacity, pool.active) == (2, 0)

        async def one() -> None:
            async with pool.slot("A") as slot:
                run = await slot.start(sleeper(tmp_path, 0.4, marker))
                assert (await run.wait()).exit_code == 0

        async def sample(done: trio.Event) -> None:
            while not done.is_set():
                peaks["pool"] = max(peaks["pool"], pool.active, pool.statistics().slots_held)
                peaks["proc"] = max(peaks["proc"], len(marked(marker)))
                await trio.sleep(0.02)

        done = trio.Event()
        async with trio.open_nursery() as sampler:
            sampler.start_soon(sample, done)
            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(one)
            done.set()
        stats = pool.statistics()
        rows = await agent_rows(pool.store)
    assert peaks == {"pool": 2, "proc": 2}  # the cap was reached and never exceeded
    assert (stats.started_total, stats.ended_total, stats.slots_held, stats.active) == (5, 5, 0, 0)
    assert [(r["end_reason"], r["exit_code"]) for r in rows] == [("exited", 0)] * 5
    assert marked(marker) == []


async def test_a_session_asking_once_is_not_starved_by_one_asking_often(
    tmp_path: pathlib.Path,
) -> None:
    granted: list[str] = []
    async with store_and_pool(tmp_path, max_agents=1) as pool:
        release_first = trio.Event()

        async def request(session_id: str, name: str, gate: trio.Event | None = None) -> None:
            async with pool.slot(session_id):
                granted.append(name)
                if gate is not None:
                    await gate.wait()
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(request, "A", "A1", release_first)
            await trio.testing.wait_all_tasks_blocked()
            for n in range(2, 7):  # A queues five more, one after the other
                nursery.start_soon(request, "A", f"A{n}")
                await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(request, "B", "B1")
            await trio.testing.wait_all_tasks_blocked()
            stats = pool.statistics()
            assert stats.waiting == {"A": 5, "B": 1}
            assert stats.waiting_total == 6
            release_first.set()
    assert granted == ["A1", "B1", "A2", "A3", "A4", "A5", "A6"]


async def test_fewest_held_first_then_least_recently_served(tmp_path: pathlib.Path) -> None:
    granted: list[str] = []
    async with store_and_pool(tmp_path, max_agents=3) as pool:
        gates = {name: trio.Event() for name in ("A1", "A2", "B1", "A3", "C1", "B2")}

        async def request(session_id: str, name: str) -> None:
            async with pool.slot(session_id):
                granted.append(name)
                await gates[name].wait()

        async with trio.open_nursery() as nursery:
            for session_id, name in [("A", "A1"), ("A", "A2"), ("B", "B1")]:
                nursery.start_soon(request, session_id, name)
                await trio.testing.wait_all_tasks_blocked()
            # Full: A holds 2, B holds 1. Queue A3, then C1, then B2.
            for session_id, name in [("A", "A3"), ("C", "C1"), ("B", "B2")]:
                nursery.start_soon(request, session_id, name)
                await trio.testing.wait_all_tasks_blocked()
            assert granted == ["A1", "A2", "B1"]
            gates["A1"].set()  # A holds 1, B 1, C 0 -> C1
            await trio.testing.wait_all_tasks_blocked()
            assert granted[-1] == "C1"
            gates["A2"].set()  # A 0, B 1, C 1 -> A3
            await trio.testing.wait_all_tasks_blocked()
            assert granted[-1] == "A3"
            gates["C1"].set()  # only B waits -> B2
            await trio.testing.wait_all_tasks_blocked()
            assert granted[-1] == "B2"
            for gate in gates.values():
                gate.set()
    assert granted == ["A1", "A2", "B1", "C1", "A3", "B2"]


async def test_per_session_cap_leaves_free_slots_to_others(tmp_path: pathlib.Path) -> None:
    granted: list[str] = []
    async with store_and_pool(tmp_path, max_agents=3) as pool:
        gates = {name: trio.Event() for name in ("A1", "A2", "B1")}

        async def request(session_id: str, name: str) -> None:
            async with pool.slot(session_id, max_for_session=1):
                granted.append(name)
                await gates[name].wait()

        async with trio.open_nursery() as nursery:
            for session_id, name in [("A", "A1"), ("A", "A2"), ("B", "B1")]:
                nursery.start_soon(request, session_id, name)
                await trio.testing.wait_all_tasks_blocked()
            stats = pool.statistics()
            assert granted == ["A1", "B1"]  # A2 waits although a slot is free
            assert (stats.slots_held, stats.waiting) == (2, {"A": 1})
            gates["A1"].set()
            await trio.testing.wait_all_tasks_blocked()
            assert granted == ["A1", "B1", "A2"]
            for gate in gates.values():
                gate.set()
        with pytest.raises(ValueError, match="max_for_session"):
            async with pool.slot("A", max_for_session=0):
                pass


async def test_waiting_bounds_refuse_at_once(tmp_path: pathlib.Path) -> None:
    options = {"max_agents": 1, "max_waiters_per_session": 2, "max_waiting_sessions": 1}
    async with store_and_pool(tmp_path, **options) as pool:
        release = trio.Event()

        async def hold(session_id: str) -> None:
            async with pool.slot(session_id):
                await release.wait()

        async with trio.open_nursery() as nursery:
            for _ in range(3):  # one holds, two wait
                nursery.start_soon(hold, "A")
                await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(PoolBusy, match="already has 2 requests waiting"):
                async with pool.slot("A"):
                    pass
            with pytest.raises(PoolBusy, match="1 sessions are already waiting"):
                async with pool.slot("B"):
                    pass
            stats = pool.statistics()
            assert (stats.rejected_total, stats.waiting) == (2, {"A": 2})
            release.set()
        assert pool.statistics().slots_held == 0


async def test_cancelled_waiters_leave_the_queue_clean(tmp_path: pathlib.Path) -> None:
    async with store_and_pool(tmp_path, max_agents=1) as pool:
        release = trio.Event()
        reached: list[str] = []

        async def hold() -> None:
            async with pool.slot("A"):
                await release.wait()

        async def wait_then_record(scope: trio.CancelScope) -> None:
            with scope:
                async with pool.slot("B"):
                    reached.append("B")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold)
            await trio.testing.wait_all_tasks_blocked()
            scope = trio.CancelScope()
            nursery.start_soon(wait_then_record, scope)
            await trio.testing.wait_all_tasks_blocked()
            assert pool.statistics().waiting == {"B": 1}
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            stats = pool.statistics()
            assert (stats.waiting, stats.waiting_total, stats.slots_held) == ({}, 0, 1)
            release.set()
        assert reached == []
        assert pool.statistics().slots_held == 0

        # Granted at once, but cancelled at the checkpoint before the block: given back.
        with trio.CancelScope() as cancelled:
            cancelled.cancel()
            async with pool.slot("C"):
                pytest.fail("the block must not run")  # pragma: no cover
        assert pool.statistics().slots_held == 0
        with trio.fail_after(1):
            async with pool.slot("D"):
                assert pool.statistics().slots_held == 1
        assert pool._held_by_session == {} and pool._last_grant == {}


# -- records -----------------------------------------------------------------------


async def test_row_is_committed_before_start_returns_and_closed_after(
    tmp_path: pathlib.Path,
) -> None:
    async with store_and_pool(tmp_path, max_agents=2, grace=2) as pool:
        async with pool.slot("s-1") as slot:
            run = await slot.start(sleeper(tmp_path, 20), task_id="prd-001")
            rows = await agent_rows(pool.store)  # nothing waited on the run yet
            assert is_same_process(run.identity)
            assert pool.active == 1
        after = await agent_rows(pool.store)
        stats = pool.statistics()
    assert len(rows) == 1
    row = rows[0]
    assert row["id"] == slot.row_id
    assert (row["pid"], row["start_ticks"]) == (run.identity.pid, run.identity.start_ticks)
    assert (row["session_id"], row["task_id"]) == ("s-1", "prd-001")
    assert json.loads(row["argv"]) == [PY, "-c", "import time; time.sleep(20)"]
    assert row["started_at"] is not None and row["boot_id"]
    assert (row["ended_at"], row["exit_code"], row["end_reason"]) == (None, None, None)
    # Leaving the block stopped the live agent and closed its row.
    assert after[0]["ended_at"] is not None
    assert (after[0]["exit_code"], after[0]["end_reason"]) == (-signal.SIGTERM, "stopped")
    assert live(run.identity.pid) == []
    assert (stats.stopped_at_release, stats.active, stats.slots_held) == (1, 0, 0)


async def test_exit_code_of_an_agent_that_ends_by_itself(tmp_path: pathlib.Path) -> None:
    async with store_and_pool(tmp_path) as pool:
        async with pool.slot("s-1") as slot:
            run = await slot.start(AgentSpec((PY, "-c", "raise SystemExit(3)"), tmp_path))
            result = await run.wait()
            with pytest.raises(RuntimeError, match="one agent"):
                await slot.start(sleeper(tmp_path, 1))
        rows = await agent_rows(pool.store)
        stats = pool.statistics()
    assert result.exit_code == 3
    assert [(r["end_reason"], r["exit_code"]) for r in rows] == [("exited", 3)]
    assert (stats.stopped_at_release, stats.started_total) == (0, 1)


async def test_an_agent_that_cannot_be_recorded_does_not_run(tmp_path: pathlib.Path) -> None:
    marker = f"lokid-unrecorded-{uuid.uuid4()}"
    async with store_and_pool(tmp_path, grace=1) as pool:
        await pool.store.write(lambda db: db.execute("ALTER TABLE agents RENAME TO agents_gone"))
        async with pool.slot("s-1") as slot:
            with pytest.raises(StoreError, match="no such table"):
                await slot.start(sleeper(tmp_path, 20, marker))
            assert slot.run is None
            assert marked(marker) == []  # stopped before `start` raised
        stats = pool.statistics()
    assert marked(marker) == []
    assert (stats.start_failures, stats.started_total, stats.active) == (1, 0, 0)


async def test_a_missing_executable_fails_the_start_and_frees_the_slot(
    tmp_path: pathlib.Path,
) -> None:
    async with store_and_pool(tmp_path) as pool:
        async with pool.slot("s-1") as slot:
            with pytest.raises(FileNotFoundError):
                await slot.start(AgentSpec(("/nonexistent/agent",), tmp_path))
        stats = pool.statistics()
        rows = await agent_rows(pool.store)
    assert (stats.start_failures, stats.slots_held, rows) == (1, 0, [])


# -- stopping ----------------------------------------------------------------------


async def test_cancelled_session_stops_its_agent(tmp_path: pathlib.Path) -> None:
    async with store_and_pool(tmp_path, grace=1) as pool:
        started = trio.Event()
        runs = []

        async def session(scope: trio.CancelScope) -> None:
            with scope:
                async with pool.slot("s-1") as slot:
                    runs.append(await slot.start(sleeper(tmp_path, 20)))
                    started.set()
                    await trio.sleep_forever()

        scope = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session, scope)
            await started.wait()
            scope.cancel()
        rows = await agent_rows(pool.store)
        stats = pool.statistics()
    assert live(runs[0].identity.pid) == []
    assert rows[0]["end_reason"] == "stopped"
    assert (stats.slots_held, stats.active) == (0, 0)


async def test_stop_all_leaves_no_process_and_closes_the_pool(tmp_path: pathlib.Path) -> None:
    results: dict[str, RunResult] = {}
    refused: list[BaseException] = []
    async with store_and_pool(tmp_path, max_agents=2, grace=0.5) as pool:
        ready = {"stubborn": trio.Event(), "plain": trio.Event()}
        pgids: dict[str, int] = {}

        async def agent(name: str, spec: AgentSpec) -> None:
            async with pool.slot(name) as slot:
                run = await slot.start(spec)
                pgids[name] = run.identity.pid
                if name == "stubborn":
                    async for line in run.lines():
                        assert line.data == b"ready"
                        break
                ready[name].set()
                results[name] = await run.wait()

        async def waiter() -> None:
            try:
                async with pool.slot("late"):
                    pytest.fail("the pool was full, then closed")  # pragma: no cover
            except PoolClosed as exc:
                refused.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(agent, "stubborn", AgentSpec((PY, "-c", STUBBORN), tmp_path))
            nursery.start_soon(agent, "plain", sleeper(tmp_path, 20))
            for event in ready.values():
                await event.wait()
            assert len(live(pgids["stubborn"])) == 2  # the agent and its grandchild
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert pool.statistics().waiting == {"late": 1}
            assert await pool.stop_all(0.5) == 2
            assert all(live(pgid) == [] for pgid in pgids.values())
        rows = await agent_rows(pool.store)
        with pytest.raises(PoolClosed):
            async with pool.slot("after"):
                pass  # pragma: no cover
        stats = pool.statistics()
    assert len(refused) == 1
    assert results["stubborn"].escalated and results["stubborn"].exit_code == -signal.SIGKILL
    assert results["plain"].reason is EndReason.STOPPED and not results["plain"].escalated
    assert [r["end_reason"] for r in rows] == ["stopped", "stopped"]
    assert all(r["ended_at"] is not None for r in rows)
    assert (stats.open, stats.active, stats.slots_held, stats.escalated_total) == (False, 0, 0, 1)


async def test_pool_task_cancelled_stops_its_agents_first(tmp_path: pathlib.Path) -> None:
    with trio.fail_after(WAIT):
        async with running_store(tmp_path) as store:
            pool = AgentPool(store, grace=1)
            started = trio.Event()
            identities: list[ProcessIdentity] = []
            async with trio.open_nursery() as sessions, trio.open_nursery() as pool_nursery:
                await pool_nursery.start(pool.run)

                async def session() -> None:
                    async with pool.slot("s-1") as slot:
                        # Short enough that a pool whose cancellation cannot stop it
                        # fails here (row "exited") instead of hanging the suite.
                        run = await slot.start(sleeper(tmp_path, 15))
                        identities.append(run.identity)
                        started.set()
                        await run.wait()

                sessions.start_soon(session)
                await started.wait()
                pool_nursery.cancel_scope.cancel()  # not a graceful stop
            rows = await agent_rows(store)
    assert live(identities[0].pid) == []
    assert rows[0]["end_reason"] == "stopped" and rows[0]["ended_at"] is not None
    assert not pool.running and pool.active == 0


@pytest.mark.parametrize("checkpoints", [0, 1, 2, 3, 5])
async def test_pool_cancelled_right_after_it_started_does_not_hang(
    tmp_path: pathlib.Path, checkpoints: int
) -> None:
    # A regression hangs in shielded code, which `fail_after` cannot end: a
    # watchdog breaks the hang through the pool's agent scope and fails the test.
    hung = False
    with trio.fail_after(WAIT):
        async with running_store(tmp_path) as store:
            pool = AgentPool(store)
            done = trio.Event()

            async def run_pool(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                try:
                    await pool.run(task_status=task_status)
                finally:
                    done.set()

            async def watchdog() -> None:
                nonlocal hung
                with trio.move_on_after(5):
                    await done.wait()
                    return
                hung = True
                if pool._host_scope is not None:
                    pool._host_scope.cancel()

            async with trio.open_nursery() as outer:
                outer.start_soon(watchdog)
                async with trio.open_nursery() as nursery:
                    await nursery.start(run_pool)
                    for _ in range(checkpoints):
                        await trio.lowlevel.checkpoint()
                    nursery.cancel_scope.cancel()
    assert not hung
    assert not pool.running


async def test_hurry_kills_agents_at_once_even_in_their_grace(tmp_path: pathlib.Path) -> None:
    """A hurried daemon stop: agents get SIGKILL now, not after the pool's 30 s grace; the
    groups are still checked empty and the rows closed, and the pool takes no new agent."""
    results: dict[str, RunResult] = {}
    async with store_and_pool(tmp_path, grace=30) as pool:
        ready = {"leaving": trio.Event(), "working": trio.Event()}
        pgids: dict[str, int] = {}
        leave = trio.Event()

        async def agent(name: str) -> None:
            async with pool.slot(name) as slot:
                run = await slot.start(AgentSpec((PY, "-c", STUBBORN), tmp_path))
                pgids[name] = run.identity.pid
                async for line in run.lines():
                    assert line.data == b"ready"
                    break
                ready[name].set()
                if name == "leaving":
                    await leave.wait()  # the slot's exit stops it with the 30 s grace
                else:
                    results[name] = await run.wait()

        async with trio.open_nursery() as nursery:
            for name in ready:
                nursery.start_soon(agent, name)
            for event in ready.values():
                await event.wait()
            leave.set()
            await trio.sleep(0.3)  # "leaving" is in its SIGTERM grace now
            assert len(live(pgids["leaving"])) == 2
            t0 = trio.current_time()
            assert pool.hurry() == 2
        elapsed = trio.current_time() - t0
        assert all(live(pgid) == [] for pgid in pgids.values())
        rows = await agent_rows(pool.store)
        with pytest.raises(PoolClosed):
            async with pool.slot("after"):
                pass  # pragma: no cover
        stats = pool.statistics()
    assert elapsed < 5.0  # not the 30 s grace (nor the agents' own 20 s)
    assert results["working"].exit_code == -signal.SIGKILL and results["working"].escalated
    assert [(r["end_reason"], r["exit_code"]) for r in rows] == [("stopped", -9)] * 2
    assert (stats.active, stats.slots_held, stats.escalated_total) == (0, 0, 2)


async def test_a_stopped_store_is_not_waited_for_to_close_a_row(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The store went first (a daemon stop cut short): stopping the agent does not wait
    `ROW_WRITE_TIMEOUT` for an answer that never comes; the next start closes the row."""
    with trio.fail_after(WAIT):
        store = StoreActor(tmp_path / "lokid.db")
        async with trio.open_nursery() as outer:
            store_scope = trio.CancelScope()

            async def run_store(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                with store_scope:
                    await store.run(task_status=task_status)

            await outer.start(run_store)
            async with running_pool(store, grace=0.5) as pool, pool.slot("s-1") as slot:
                run = await slot.start(sleeper(tmp_path, 20))
                store_scope.cancel()
                while store.running:  # noqa: ASYNC110
                    await trio.sleep(0.01)
                t0 = trio.current_time()
                assert await pool.stop_all() == 1
                elapsed = trio.current_time() - t0
            stats = pool.statistics()
        assert live(run.identity.pid) == []
        async with running_store(tmp_path) as reopened:
            left_open = await agent_rows(reopened)
            async with running_pool(reopened) as next_pool:
                outcomes = next_pool.last_reconcile
            rows = await agent_rows(reopened)
    assert elapsed < 2.0  # ROW_WRITE_TIMEOUT is 10 s
    assert stats.record_failures == 1
    assert "row of agent 1 left open, the store has stopped" in caplog.text
    assert left_open[0]["ended_at"] is None
    assert [(o.end_reason, o.detail) for o in outcomes] == [(GONE, "exited")]
    assert rows[0]["ended_at"] is not None


class RefusingStore(StoreActor):
    """A store that refuses every write while `refuse` (a database locked by another
    process): `StoreUnavailable`, nothing committed."""

    refuse = False

    async def write(self, fn: Any, *, timeout: float = 10.0, on_commit: Any = None) -> Any:
        if self.refuse:
            raise StoreUnavailable("store: nothing of this write was committed: database is locked")
        return await super().write(fn, timeout=timeout, on_commit=on_commit)


async def test_a_row_close_the_store_refused_is_retried_once_it_takes_writes(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The row was written once and left open until the next start: a stopped session
    still counted an active agent. Now the slot is freed and the close retried."""
    caplog.set_level(logging.INFO, "lokid.agents")
    with trio.fail_after(WAIT):
        store = RefusingStore(tmp_path / "lokid.db")
        async with trio.open_nursery() as outer:
            await outer.start(store.run)
            async with running_pool(store, grace=0.5) as pool:
                async with pool.slot("s-1") as slot:
                    run = await slot.start(sleeper(tmp_path, 20))
                    store.refuse = True
                    await run.stop(0.5)
                assert pool.statistics().slots_held == 0  # not held for the store
                assert (await agent_rows(store))[0]["ended_at"] is None
                await trio.sleep(1.0)  # tries that are refused too (CLOSE_RETRY_FIRST is 0.5 s)
                store.refuse = False
                while (await agent_rows(store))[0]["ended_at"] is None:  # noqa: ASYNC110
                    await trio.sleep(0.05)
                (row,) = await agent_rows(store)
                stats = pool.statistics()
            outer.cancel_scope.cancel()
    assert row["end_reason"] == "stopped" and row["exit_code"] is not None
    assert stats.record_failures == 1
    assert "could not close the row of agent 1: store: nothing of this write" in caplog.text
    assert "row of agent 1 closed after the store took writes again" in caplog.text


async def test_graceful_stop_restart_opens_the_pool_again(tmp_path: pathlib.Path) -> None:
    with trio.fail_after(WAIT):
        async with running_store(tmp_path) as store:
            async with running_pool(store, max_agents=1) as pool:
                pass
            with pytest.raises(PoolClosed):
                async with pool.slot("s-1"):
                    pass  # pragma: no cover
            async with trio.open_nursery() as nursery:
                status = StubChildStatus()
                nursery.start_soon(functools.partial(pool.run, task_status=status))
                await status.started_event.wait()
                async with pool.slot("s-1") as slot:
                    run = await slot.start(sleeper(tmp_path, 0))
                    await run.wait()
                status.shutdown_requested.set()
    assert pool.statistics().started_total == 1


# -- reconciliation ----------------------------------------------------------------


def spawn_group(script: str) -> subprocess.Popen[bytes]:
    """A process group started the way the pool starts agents, waiting for "ready"."""
    process = subprocess.Popen([PY, "-c", script], stdout=subprocess.PIPE, start_new_session=True)
    assert process.stdout is not None
    assert process.stdout.readline() == b"ready\n"
    return process


@attrs.frozen
class Leftover:
    """An open row as a crashed daemon left it, and the process group behind it."""

    session_id: str
    pid: int
    start_ticks: int
    boot_id: str | None


@attrs.define
class Leftovers:
    rows: dict[str, Leftover]
    processes: dict[str, subprocess.Popen[bytes]]
    bystanders: dict[str, ProcessIdentity]  # processes reconciliation must not touch


@pytest.fixture
def leftovers() -> Iterator[Leftovers]:
    boot_id = pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    stubborn = spawn_group(STUBBORN)  # leader and grandchild ignore SIGTERM
    orphaning = spawn_group(ORPHANING)  # the leader exits, a member stays in its group
    orphan_ticks = start_ticks(orphaning.pid)
    orphaning.wait()  # reaped: no process has the leader's pid any more
    innocent = subprocess.Popen(["sleep", "20"], start_new_session=True)
    rebooted = subprocess.Popen(["sleep", "20"], start_new_session=True)
    exited = subprocess.Popen(["true"], start_new_session=True)
    exited_ticks = start_ticks(exited.pid)
    exited.wait()
    processes = {
        "stubborn": stubborn,
        "orphaning": orphaning,
        "innocent": innocent,
        "rebooted": rebooted,
    }
    ticks = {name: start_ticks(process.pid) or 0 for name, process in processes.items()}
    ticks.update(orphaning=orphan_ticks or 0, exited=exited_ticks or 1)
    rows = {
        "stubborn": Leftover("s-1", stubborn.pid, ticks["stubborn"], boot_id),
        "orphaning": Leftover("s-1", orphaning.pid, ticks["orphaning"], boot_id),
        # The pid now names another process: the recorded start time is off by one.
        "innocent": Leftover("s-2", innocent.pid, ticks["innocent"] + 1, boot_id),
        # The right pid and start time, but recorded during another boot.
        "rebooted": Leftover("s-2", rebooted.pid, ticks["rebooted"], "other-boot"),
        # Gone (and reaped) before the restart; an old row without a boot id.
        "exited": Leftover("s-3", exited.pid, ticks["exited"], None),
    }
    bystanders = {
        name: ProcessIdentity(processes[name].pid, ticks[name]) for name in ("innocent", "rebooted")
    }
    try:
        yield Leftovers(rows, processes, bystanders)
    finally:
        for name, process in processes.items():
            if live(process.pid):  # only what reconciliation failed to kill, or bystanders
                os.killpg(process.pid, signal.SIGKILL)
            if name != "orphaning":
                process.wait()
            if process.stdout is not None:
                process.stdout.close()


async def insert_open_row(store: StoreActor, row: Leftover) -> int:
    def insert(db: sqlite_utils.Database) -> int:
        cursor = db.execute(
            "INSERT INTO agents (session_id, pid, start_ticks, argv, started_at, boot_id)"
            " VALUES (?, ?, ?, '[]', '2025-01-01T00:00:00.000Z', ?)",
            (row.session_id, row.pid, row.start_ticks, row.boot_id),
        )
        return int(cursor.lastrowid or 0)

    return await store.write(insert)


async def test_reconcile_kills_what_a_crashed_daemon_left_and_nothing_else(
    tmp_path: pathlib.Path, leftovers: Leftovers
) -> None:
    stubborn, orphaning = leftovers.processes["stubborn"], leftovers.processes["orphaning"]
    assert len(live(stubborn.pid)) == 2 and len(live(orphaning.pid)) == 1
    with trio.fail_after(WAIT):
        async with running_store(tmp_path) as store:
            ids = {name: await insert_open_row(store, row) for name, row in leftovers.rows.items()}
            async with running_pool(store, grace=0.5) as pool:
                # setup ran before "started": the groups are gone already
                assert live(stubborn.pid) == []
                assert live(orphaning.pid) == []
                stats = pool.statistics()
                outcomes = {o.row_id: o for o in pool.last_reconcile}
            rows = {r["id"]: r for r in await agent_rows(store)}
    for name, identity in leftovers.bystanders.items():
        assert is_same_process(identity) and live_pid(identity.pid), name
    assert stubborn.wait() == -signal.SIGKILL  # killed by the pool (TERM was ignored)
    expected = {
        "stubborn": (RECONCILED, "killed"),
        "orphaning": (RECONCILED, "orphaned group killed"),
        "innocent": (GONE, "pid reused by another process"),
        "rebooted": (GONE, "recorded before a reboot"),
        "exited": (GONE, "exited"),
    }
    for name, (reason, detail) in expected.items():
        row = rows[ids[name]]
        assert (row["end_reason"], row["exit_code"]) == (reason, None), name
        assert row["ended_at"] is not None, name
        assert (outcomes[ids[name]].end_reason, outcomes[ids[name]].detail) == (reason, detail)
    assert len(outcomes[ids["stubborn"]].killed) == 2 and outcomes[ids["stubborn"]].escalated
    assert len(outcomes[ids["orphaning"]].killed) == 1
    assert isinstance(stats, AgentPoolStatistics)
    assert (stats.reconciled_killed, stats.reconciled_processes, stats.reconciled_gone) == (2, 3, 3)
    assert stats.survivors_total == 0


@pytest.fixture
def launchers(tmp_path: pathlib.Path) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """Held launchers (`HOLD_ARGV`) as a daemon killed at each point leaves them: one
    still waiting for its release, one released (now `sleep`), one that saw end-of-file
    and left `<tmp_path>/held/<pid>.<start ticks>`."""
    held = tmp_path / "held"
    held.mkdir()
    waiting = subprocess.Popen(  # stdin kept open: it waits for a release that never comes
        [*HOLD_ARGV, "", "sleep", "20"], stdin=subprocess.PIPE, start_new_session=True
    )
    released = subprocess.Popen(
        [*HOLD_ARGV, "", "sleep", "20"], stdin=subprocess.PIPE, start_new_session=True
    )
    died = subprocess.Popen([*HOLD_ARGV, str(held), "true"], stdin=subprocess.DEVNULL)
    try:
        assert died.wait(timeout=WAIT) == 125
        assert running(released.pid, [*HOLD_ARGV, "", "sleep", "20"])
        assert released.stdin is not None
        released.stdin.write(b"\n")
        released.stdin.flush()
        assert running(released.pid, ["sleep", "20"])  # exec'd
        assert running(waiting.pid, [*HOLD_ARGV, "", "sleep", "20"])
        assert still_held(waiting.pid) and not still_held(released.pid)
        yield {"waiting": waiting, "released": released, "died": died}
    finally:
        for process in (waiting, released):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            assert process.stdin is not None
            process.stdin.close()


async def add_applied_inputs(store: StoreActor, rows: dict[str, int]) -> None:
    """Inputs of session `s-1` marked applied, each naming its agent row (input id -> row)."""

    def add(db: sqlite_utils.Database) -> None:
        for input_id, row_id in rows.items():
            db.execute(
                "INSERT INTO session_inputs (id, session_id, message, status,"
                " created_at, applied_at, agent_row) VALUES"
                " (?, 's-1', 'm', 'applied', '2025-01-01T00:00:00.000Z',"
                " '2025-01-01T00:00:01.000Z', ?)",
                (input_id, row_id),
            )

    await store.write(add)


async def input_states(store: StoreActor) -> dict[str, tuple[str, int | None]]:
    """Every stored input: id -> (status, agent row)."""
    return await store.read(
        lambda db: {
            r["id"]: (r["status"], r["agent_row"]) for r in db.query("SELECT * FROM session_inputs")
        }
    )


async def test_reconcile_queues_again_the_inputs_of_agents_that_never_ran(
    tmp_path: pathlib.Path, launchers: dict[str, subprocess.Popen[bytes]]
) -> None:
    """A daemon that died after recording an agent's start (and marking the inputs its
    prompt carried applied) and before releasing it: the agent never ran. The launcher
    either still waits (a restart faster than its end-of-file) or left `<held>/<pid>`;
    their inputs are queued again with the rows' close, and the markers go. A released
    agent's inputs stay applied."""
    boot_id = await trio.to_thread.run_sync(_boot_id)
    held = tmp_path / "held"
    with trio.fail_after(WAIT):
        async with running_store(tmp_path) as store:
            rows = {}
            (marker,) = os.listdir(held)  # `died` is gone: its file has its start ticks
            died_ticks = int(marker.split(".")[1])
            for name, process in launchers.items():
                ticks = died_ticks if name == "died" else start_ticks(process.pid) or 1
                rows[name] = await insert_open_row(
                    store, Leftover("s-1", process.pid, ticks, boot_id)
                )

            await add_applied_inputs(store, {f"input-{name}": row for name, row in rows.items()})
            async with running_pool(store, grace=0.5, held_dir=held) as pool:
                outcomes = {o.row_id: o for o in pool.last_reconcile}
            inputs = await input_states(store)
    assert {name: outcomes[row].never_ran for name, row in rows.items()} == {
        "waiting": True,
        "released": False,
        "died": True,
    }
    assert outcomes[rows["waiting"]].requeued_inputs == ("input-waiting",)
    assert outcomes[rows["died"]].requeued_inputs == ("input-died",)
    assert outcomes[rows["released"]].requeued_inputs == ()
    assert inputs == {
        "input-waiting": ("queued", None),
        "input-died": ("queued", None),
        "input-released": ("applied", rows["released"]),
    }
    assert os.listdir(held) == []


def _held_launcher_that_saw_eof(held: pathlib.Path) -> int:
    """Run a held launcher whose daemon is gone (end-of-file at once); its pid."""
    died = subprocess.Popen([*HOLD_ARGV, str(held), "true"], stdin=subprocess.DEVNULL)
    assert died.wait(timeout=WAIT) == 125
    return died.pid


async def test_a_held_marker_speaks_only_of_its_own_launcher_not_a_later_process_with_its_pid(
    tmp_path: pathlib.Path,
) -> None:
    """Regression: `held/<pid>` named the pid only, so an open row of another process
    that had the same pid (an agent that ran, its row left open by a refused close)
    was taken for the launcher that never ran, and its inputs were delivered again.
    The file names the launcher's start time too: that row's inputs stay applied."""
    boot_id = await trio.to_thread.run_sync(_boot_id)
    held = tmp_path / "held"
    held.mkdir()
    died = await trio.to_thread.run_sync(_held_launcher_that_saw_eof, held)
    (name,) = os.listdir(held)
    pid, ticks = (int(part) for part in name.split("."))
    assert pid == died
    with trio.fail_after(WAIT):
        async with running_store(tmp_path) as store:
            ran = await insert_open_row(store, Leftover("s-1", pid, ticks - 1, boot_id))
            never = await insert_open_row(store, Leftover("s-1", pid, ticks, boot_id))

            await add_applied_inputs(store, {"input-ran": ran, "input-never": never})
            async with running_pool(store, grace=0.5, held_dir=held) as pool:
                outcomes = {o.row_id: o for o in pool.last_reconcile}
            inputs = await input_states(store)
    assert (outcomes[ran].never_ran, outcomes[never].never_ran) == (False, True)
    assert inputs == {"input-ran": ("applied", ran), "input-never": ("queued", None)}
    assert os.listdir(held) == []


async def test_reconcile_leaves_this_daemons_agents_alone(tmp_path: pathlib.Path) -> None:
    async with store_and_pool(tmp_path) as pool, pool.slot("s-1") as slot:
        run = await slot.start(sleeper(tmp_path, 20))
        assert await pool.reconcile() == []
        assert is_same_process(run.identity)
        rows = await agent_rows(pool.store)
        assert rows[0]["ended_at"] is None
    assert live(run.identity.pid) == []
