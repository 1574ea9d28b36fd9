"""lokid.thread_lane: dedicated threads running blocking calls for trio tasks, in order."""

from __future__ import annotations

import contextlib
import os
import threading

import pytest
import trio
import trio.testing

from lokid import thread_lane
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


def eventfds() -> int:
    """The eventfds this process has open."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    return count


async def test_a_caller_waits_on_an_eventfd_of_the_lane_and_close_closes_them() -> None:
    lane = ThreadLane("t")
    hold = Hold("held")
    before = eventfds()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lane.run, hold)
            await hold.entered()
            assert eventfds() == before + 1  # the waiting caller's
            hold.release.set()
        assert [await lane.run(lambda n=n: n) for n in range(20)] == list(range(20))
        assert eventfds() == before + 1  # one caller at a time: one eventfd, reused
    finally:
        lane.close()
    assert eventfds() == before


async def test_callers_beyond_the_eventfd_pool_are_answered_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(thread_lane, "WAKE_FDS", 3)
    lane = ThreadLane("t", threads=2)
    before = eventfds()
    most = 0
    got: list[int] = []

    def job(n: int) -> int:
        nonlocal most
        most = max(most, eventfds() - before)
        return n

    async def caller(n: int) -> None:
        got.append(await lane.run(job, n))

    try:
        async with trio.open_nursery() as nursery:
            for n in range(40):
                nursery.start_soon(caller, n)
        assert sorted(got) == list(range(40))
        assert most == 3  # the pool's bound; the others were answered through the token
    finally:
        lane.close()
    assert eventfds() == before


async def test_run_ordered_resumes_the_caller_after_the_callbacks_its_job_queued() -> None:
    lane = ThreadLane("t")
    token = trio.lowlevel.current_trio_token()
    seen: list[int] = []

    def job(n: int) -> int:
        token.run_sync_soon(seen.append, n)
        return n

    try:
        for n in range(50):
            assert await lane.run_ordered(job, n) == n
            assert seen[-1:] == [n]
    finally:
        lane.close()


def test_a_lane_serves_one_trio_run_after_another() -> None:
    lane = ThreadLane("t")
    try:
        for n in range(3):  # each run has its own epoll: the reused eventfd is added again
            assert trio.run(lane.run, lambda n=n: n * 2) == n * 2
    finally:
        lane.close()


async def test_without_an_eventfd_the_caller_is_answered_through_the_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_fds(*args: object) -> int:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(os, "eventfd", no_fds)
    lane = ThreadLane("t")
    try:
        assert await lane.run(lambda: "answered") == "answered"
        with pytest.raises(ZeroDivisionError):
            await lane.run(lambda: 1 / 0)
    finally:
        lane.close()


@pytest.mark.parametrize("eventfd", [True, False], ids=["eventfd", "token"])
async def test_run_to_end_never_withdraws_a_queued_job(
    monkeypatch: pytest.MonkeyPatch, eventfd: bool
) -> None:
    """Cancelled while its job waits behind another, `run_to_end` still runs the job and
    returns its value; the cancellation is seen at the caller's next checkpoint. (Both
    answers: the eventfd, and the token's where no eventfd can be made.)"""
    if not eventfd:

        def no_fds(*args: object) -> int:
            raise OSError(24, "Too many open files")

        monkeypatch.setattr(os, "eventfd", no_fds)
    lane = ThreadLane("t")
    hold = Hold()
    ran: list[str] = []
    got: list[str] = []

    def job() -> str:
        ran.append("job")
        return "value"

    async def caller(scope: trio.CancelScope) -> None:
        with scope:
            got.append(await lane.run_to_end(job))
            await trio.lowlevel.checkpoint()  # where the cancellation is seen
            got.append("not cancelled")

    try:
        scope = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lane.run, hold)
            await hold.entered()
            nursery.start_soon(caller, scope)
            await trio.testing.wait_all_tasks_blocked()
            assert lane.statistics().queued == 1
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert got == [] and lane.statistics().queued == 1  # still queued, still waited for
            hold.release.set()
        assert ran == ["job"] and got == ["value"]
        assert scope.cancelled_caught
        assert lane.statistics().withdrawn == 0
    finally:
        lane.close()


async def test_run_to_end_of_an_already_cancelled_caller_runs_the_job() -> None:
    lane = ThreadLane("t")
    got: list[str] = []
    try:
        with trio.CancelScope() as scope:
            scope.cancel()
            got.append(await lane.run_to_end(lambda: "ran"))
            await trio.lowlevel.checkpoint()
        assert scope.cancelled_caught and got == ["ran"]
        with pytest.raises(ZeroDivisionError):
            await lane.run_to_end(lambda: 1 / 0)
    finally:
        lane.close()
