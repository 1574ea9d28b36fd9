"""lokid.thread_lane: dedicated threads running blocking calls for trio tasks, in order."""

from __future__ import annotations

import threading

import pytest
import trio
import trio.testing

from lokid.thread_lane import ThreadLane

WAIT = 10.0  # real seconds any thread-side wait may take at most


class Hold:
    """A job that keeps a lane's thread busy until the test releases it."""

    def __init__(self, value: str | None = None) -> None:
        self.value = value
        self.inside = threading.Event()
        self.release = threading.Event()

    def __call__(self) -> str | None:
        self.inside.set()
        assert self.release.wait(WAIT)
        return self.value

    async def entered(self) -> None:
        assert await trio.to_thread.run_sync(self.inside.wait, WAIT)


async def test_run_returns_the_value_and_raises_the_exception_of_the_call() -> None:
    lane = ThreadLane("t")
    try:
        assert await lane.run(lambda a, b: a + b, 2, 3) == 5
        with pytest.raises(ZeroDivisionError):
            await lane.run(lambda: 1 / 0)
        assert await lane.run(threading.current_thread) is not threading.current_thread()
        assert lane.statistics().done == 2 + 1
    finally:
        lane.close()


async def test_a_one_thread_lane_runs_jobs_one_at_a_time_in_queue_order() -> None:
    lane = ThreadLane("t")
    order: list[int] = []
    inside = 0
    most = 0
    lock = threading.Lock()

    def job(i: int) -> None:
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        order.append(i)
        with lock:
            inside -= 1

    try:
        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(lane.run, job, i)
                await trio.testing.wait_all_tasks_blocked()  # queued before the next starts
        assert order == list(range(50))
        assert most == 1
        assert lane.statistics().threads == 1
    finally:
        lane.close()


async def test_a_lane_of_three_runs_three_jobs_at_once() -> None:
    lane = ThreadLane("t", threads=3)
    barrier = threading.Barrier(3, timeout=WAIT)  # breaks unless three jobs meet
    try:
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(lane.run, barrier.wait)
        assert lane.statistics().threads == 3
    finally:
        lane.close()


async def test_a_cancelled_queued_job_is_withdrawn_and_never_runs() -> None:
    lane = ThreadLane("t")
    hold = Hold()
    ran: list[str] = []
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lane.run, hold)
            await hold.entered()
            with trio.move_on_after(0.1) as waited:
                await lane.run(ran.append, "late")
            assert waited.cancelled_caught
            assert lane.statistics().withdrawn == 1
            assert lane.statistics().queued == 0
            hold.release.set()
        await lane.run(ran.append, "next")
        assert ran == ["next"]  # the withdrawn job never ran
    finally:
        lane.close()


async def test_a_job_cancelled_while_running_finishes_and_gives_its_value() -> None:
    lane = ThreadLane("t")
    hold = Hold("done")
    got: list[str | None] = []

    async def caller(scope: trio.CancelScope) -> None:
        with scope:
            got.append(await lane.run(hold))

    try:
        scope = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller, scope)
            await hold.entered()
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert got == []  # still waiting for the running job
            hold.release.set()
        assert got == ["done"]
        assert lane.statistics().withdrawn == 0
    finally:
        lane.close()


async def test_close_ends_the_threads_and_the_next_run_starts_new_ones() -> None:
    lane = ThreadLane("t", threads=2)
    first = await lane.run(threading.current_thread)
    lane.close()
    first.join(WAIT)
    assert not first.is_alive()
    assert lane.statistics().threads == 0
    second = await lane.run(threading.current_thread)
    assert second is not first and second.is_alive()
    lane.close()


async def test_busy_is_true_while_a_job_is_queued_or_running() -> None:
    lane = ThreadLane("t")
    hold = Hold()

    def busy() -> bool:  # (a call: mypy would narrow the property across the awaits)
        return lane.busy

    try:
        assert not busy()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lane.run, hold)
            await hold.entered()
            assert busy()
            assert lane.statistics().running == 1
            hold.release.set()
        assert not busy()
    finally:
        lane.close()


def test_a_lane_needs_a_thread() -> None:
    with pytest.raises(ValueError, match="at least one thread"):
        ThreadLane("t", threads=0)
