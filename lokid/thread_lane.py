"""A thread lane: dedicated OS threads that run blocking calls for trio tasks, in order.

Why not `trio.to_thread.run_sync`: each call there takes a capacity-limiter
token, a cancel scope, a copied context and a thread from trio's cache, and
posts its answer through a generic wake-up; on this machine kind a no-op
round trip costs ~100 us, most of it beside the call. The store makes one
such trip per write and per read, so it is on the path of every request. A
lane keeps its threads waiting on one queue and answers by rescheduling the
caller directly: ~50 us for the same no-op (docs/performance.md, "Thread
hops").

Rules:

* `run(fn, *args)` queues a job and waits for its outcome, which it returns
  or raises. Jobs start in the order they were queued; a one-thread lane
  runs them one at a time (the store's single writer).
* Cancellation, as in `trio.to_thread.run_sync`: a job still in the queue is
  withdrawn (it never runs, `run` raises `Cancelled`); a job that started
  runs to its end and `run` returns its outcome (the cancellation is seen
  at the caller's next checkpoint).
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
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar, cast

import attrs
import outcome
import trio

T = TypeVar("T")

_QUEUED, _RUNNING, _WITHDRAWN = 0, 1, 2


@attrs.frozen
class ThreadLaneStatistics:
    name: str
    threads: int
    queued: int  # jobs waiting for a thread
    running: int  # jobs on a thread now
    done: int  # jobs finished since the lane was made
    withdrawn: int  # jobs cancelled before they started


class _Job:
    __slots__ = ("args", "fn", "state", "task", "token")

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        task: trio.lowlevel.Task,
        token: trio.lowlevel.TrioToken,
    ) -> None:
        self.fn = fn
        self.args = args
        self.task = task
        self.token = token
        self.state = _QUEUED


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

    @property
    def busy(self) -> bool:
        """A job is queued or running (a new job would wait or share the lane)."""
        return self._queued + self._running > 0

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on one of the lane's threads; its value, or its exception."""
        await trio.lowlevel.checkpoint_if_cancelled()
        job = _Job(fn, args, trio.lowlevel.current_task(), trio.lowlevel.current_trio_token())
        with self._lock:
            self._queued += 1
        if len(self._workers) < self.threads:
            self._start_workers()
        self._jobs.put(job)

        def abort(_: Any) -> trio.lowlevel.Abort:
            with self._lock:
                if job.state != _QUEUED:
                    return trio.lowlevel.Abort.FAILED  # it runs; its outcome will come
                job.state = _WITHDRAWN
                self._queued -= 1
                self._withdrawn += 1
            return trio.lowlevel.Abort.SUCCEEDED

        # The job's outcome is sent in with `reschedule`, which unwraps it here.
        return cast(T, await trio.lowlevel.wait_task_rescheduled(abort))

    def close(self) -> None:
        """Let the threads finish the queued jobs and end (call it from the trio thread)."""
        workers, self._workers = self._workers, []
        for _ in workers:
            self._jobs.put(None)

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
            with contextlib.suppress(trio.RunFinishedError):  # the caller's run ended
                job.token.run_sync_soon(trio.lowlevel.reschedule, job.task, result)
