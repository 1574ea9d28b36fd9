"""A thread lane: dedicated OS threads that run blocking calls for trio tasks, in order.

Why not `trio.to_thread.run_sync`: each call there takes a capacity-limiter
token, a cancel scope, a copied context and a thread from trio's cache, and
posts its answer through a generic wake-up; on this machine kind a no-op
round trip costs ~100 us, most of it beside the call. The store makes one
such trip per write and per read, so it is on the path of every request. A
lane keeps its threads waiting on one queue and answers by rescheduling the
caller directly: ~50 us for the same no-op (docs/performance.md, "Thread
hops").

How the answer comes back: the thread writes to an eventfd the caller waits
on with `trio.lowlevel.wait_readable`, so trio's I/O wait resumes the caller
itself. Answering with `TrioToken.run_sync_soon(reschedule, ...)` instead
takes two task steps and two turns of the run loop (trio's system task that
runs the callbacks wakes first, then it reschedules the caller): 10-30 us
more per round trip here, most after a blocking fsync (docs/performance.md,
"Audit appends", sixth session). `run_ordered` keeps that older path for a
job that itself hands callbacks to `run_sync_soon` and whose caller must
resume after them (the store's commit hooks): the callbacks run first in,
first out, so the caller's wake-up, queued last, runs after them.

Rules:

* `run(fn, *args)` queues a job and waits for its outcome, which it returns
  or raises. Jobs start in the order they were queued; a one-thread lane
  runs them one at a time (the store's single writer).
* Cancellation, as in `trio.to_thread.run_sync`: a job still in the queue is
  withdrawn (it never runs, `run` raises `Cancelled`); a job that started
  runs to its end and `run` returns its outcome (the cancellation is seen
  at the caller's next checkpoint). `run_to_end` never withdraws its job:
  queued or started, it runs, and its outcome is returned the same way.
* Each waiting caller holds an eventfd from the lane's pool (at most
  `WAKE_FDS` are made per lane; a caller that finds none free is answered
  through `run_sync_soon`, like `run_ordered`). `close()` closes the free
  ones; the rest are closed when the lane is garbage-collected. Where
  `os.eventfd` does not exist (not Linux), every answer takes that path.
* Threads start on the first job and stay until `close()`, which lets them
  finish what is queued and end; the next `run` starts new ones. They are
  daemon threads, so a blocked call never keeps the process alive.
* Bound: `run` waits for its own job, so the queue holds at most one job
  per waiting task; the callers bound their number (the store's writes
  come through its bounded mailbox or wait with a deadline, its reads are
  made by request and actor tasks, each waiting for its answer).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar, cast

import attrs
import outcome
import trio

T = TypeVar("T")

_QUEUED, _RUNNING, _WITHDRAWN = 0, 1, 2

WAKE_FDS = 64  # eventfds a lane makes at most: callers waiting at once with the fast answer
_HAS_EVENTFD = hasattr(os, "eventfd")


@attrs.frozen
class ThreadLaneStatistics:
    name: str
    threads: int
    queued: int  # jobs waiting for a thread
    running: int  # jobs on a thread now
    done: int  # jobs finished since the lane was made
    withdrawn: int  # jobs cancelled before they started


class _Job:
    __slots__ = ("args", "fn", "result", "state", "task", "token", "wake")

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        task: trio.lowlevel.Task | None,
        token: trio.lowlevel.TrioToken | None,
        wake: int | None,
    ) -> None:
        self.fn = fn
        self.args = args
        self.task = task
        self.token = token
        self.wake = wake  # the eventfd its caller waits on; None: reschedule `task` via `token`
        self.result: outcome.Outcome[Any] | None = None
        self.state = _QUEUED


def _close_fds(fds: list[int]) -> None:
    while fds:
        os.close(fds.pop())


class ThreadLane:
    """`threads` dedicated threads named `name` running jobs for trio tasks (module rules)."""

    def __init__(self, name: str, threads: int = 1) -> None:
        if threads < 1:
            raise ValueError("a lane needs at least one thread")
        self.name = name
        self.threads = threads
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards job states and the counters
        self._workers: list[threading.Thread] = []
        self._queued = 0
        self._running = 0
        self._done = 0
        self._withdrawn = 0
        self._wake_fds: list[int] = []  # free eventfds (trio thread only)
        self._wake_made = 0  # eventfds made and not closed
        weakref.finalize(self, _close_fds, self._wake_fds)

    @property
    def busy(self) -> bool:
        """A job is queued or running (a new job would wait or share the lane)."""
        return self._queued + self._running > 0

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on one of the lane's threads; its value, or its exception."""
        await trio.lowlevel.checkpoint_if_cancelled()
        wake = self._take_wake_fd()
        if wake is None:
            return await self._run_rescheduled(fn, args)
        job = _Job(fn, args, None, None, wake)
        self._queue(job)
        try:
            await trio.lowlevel.wait_readable(wake)
        except BaseException as exc:
            with self._lock:
                withdrawn = job.state == _QUEUED
                if withdrawn:
                    job.state = _WITHDRAWN
                    self._queued -= 1
                    self._withdrawn += 1
            if withdrawn:
                self._wake_fds.append(wake)  # never written to
                raise
            # It runs: wait for its outcome, as `run_ordered` does.
            await self._outcome_after(wake, exc)
        else:
            os.eventfd_read(wake)
            self._wake_fds.append(wake)
        return cast("outcome.Outcome[T]", job.result).unwrap()

    async def run_to_end(self, fn: Callable[..., T], *args: Any) -> T:
        """`run`, but the job is never withdrawn: once queued it runs, and `run_to_end`
        returns its outcome even to a caller cancelled meanwhile (who sees the
        cancellation at its next checkpoint; module rules).

        For a caller whose job must not be lost to its own cancellation and which
        cannot afford a shielded cancel scope per call (the audit writer's lone
        append, ~10 us each). The wait is bounded by the jobs queued ahead of it
        and its own run time, so a caller should use it on an idle lane only."""
        wake = self._take_wake_fd()
        if wake is None:
            return await self._run_rescheduled(fn, args, withdraw=False)
        job = _Job(fn, args, None, None, wake)
        self._queue(job)
        try:
            await trio.lowlevel.wait_readable(wake)
        except BaseException as exc:
            await self._outcome_after(wake, exc)  # queued or running: it runs
        else:
            os.eventfd_read(wake)
            self._wake_fds.append(wake)
        return cast("outcome.Outcome[T]", job.result).unwrap()

    async def _outcome_after(self, wake: int, exc: BaseException) -> None:
        """The caller's wait on `wake` ended with `exc` while its job runs (or will):
        wait for the outcome, shielded, and give `wake` back. A cancellation is then
        seen at the caller's next checkpoint; anything else is raised here."""
        with trio.CancelScope(shield=True):
            await trio.lowlevel.wait_readable(wake)
        os.eventfd_read(wake)
        self._wake_fds.append(wake)
        if not isinstance(exc, trio.Cancelled):
            raise exc

    async def run_ordered(self, fn: Callable[..., T], *args: Any) -> T:
        """`run`, answered through `TrioToken.run_sync_soon`: the caller resumes after
        every callback `fn` queued there (module docstring)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        return await self._run_rescheduled(fn, args)

    async def _run_rescheduled(
        self, fn: Callable[..., T], args: tuple[Any, ...], *, withdraw: bool = True
    ) -> T:
        job = _Job(fn, args, trio.lowlevel.current_task(), trio.lowlevel.current_trio_token(), None)
        self._queue(job)

        def abort(_: Any) -> trio.lowlevel.Abort:
            with self._lock:
                if not withdraw or job.state != _QUEUED:
                    return trio.lowlevel.Abort.FAILED  # it runs; its outcome will come
                job.state = _WITHDRAWN
                self._queued -= 1
                self._withdrawn += 1
            return trio.lowlevel.Abort.SUCCEEDED

        # The job's outcome is sent in with `reschedule`, which unwraps it here.
        return cast(T, await trio.lowlevel.wait_task_rescheduled(abort))

    def _queue(self, job: _Job) -> None:
        with self._lock:
            self._queued += 1
        if len(self._workers) < self.threads:
            self._start_workers()
        self._jobs.put(job)

    def _take_wake_fd(self) -> int | None:
        if self._wake_fds:
            return self._wake_fds.pop()
        if not _HAS_EVENTFD or self._wake_made >= WAKE_FDS:
            return None
        try:
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except OSError:  # e.g. out of file descriptors: the answer through the token still works
            return None
        self._wake_made += 1
        return fd

    def close(self) -> None:
        """Let the threads finish the queued jobs and end (call it from the trio thread)."""
        workers, self._workers = self._workers, []
        for _ in workers:
            self._jobs.put(None)
        self._wake_made -= len(self._wake_fds)
        _close_fds(self._wake_fds)  # (the ones in use come back to the pool)

    def statistics(self) -> ThreadLaneStatistics:
        return ThreadLaneStatistics(
            name=self.name,
            threads=len(self._workers),
            queued=self._queued,
            running=self._running,
            done=self._done,
            withdrawn=self._withdrawn,
        )

    def _start_workers(self) -> None:
        while len(self._workers) < self.threads:
            worker = threading.Thread(
                target=self._work, name=f"{self.name}-{len(self._workers)}", daemon=True
            )
            worker.start()
            self._workers.append(worker)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            with self._lock:
                if job.state == _WITHDRAWN:
                    continue
                job.state = _RUNNING
                self._queued -= 1
                self._running += 1
            result = outcome.capture(job.fn, *job.args)
            with self._lock:
                self._running -= 1
                self._done += 1
            if job.wake is not None:
                job.result = result
                os.eventfd_write(job.wake, 1)
                continue
            assert job.token is not None and job.task is not None
            with contextlib.suppress(trio.RunFinishedError):  # the caller's run ended
                job.token.run_sync_soon(trio.lowlevel.reschedule, job.task, result)
