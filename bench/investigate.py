"""Investigation knobs of the `events` benchmark servers, all off by default.

Set in the environment of `python -m bench events` (the servers inherit it):

    BENCH_GC_LOG=1              log the cyclic collector's pauses (stderr, at exit)
    BENCH_GC_THRESHOLD=off      gc.disable(); or "a,b,c" for gc.set_threshold(a, b, c)
    BENCH_GC_THRESHOLD_LOKID=.. the same for one server only (also _BARE)
    BENCH_TRIO_STATS=1          count trio task steps and run-loop passes (stderr, at exit;
                                per task name with the `steps by task` command)
    BENCH_PATCH_SEND_LOCK=1     lokid only: see `bench.events_server.patch_send_lock`

They change what is measured; figures for docs/performance.md are taken
without them.
"""

from __future__ import annotations

import collections
import gc
import os
import sys
import time

import trio


class GcPauses:
    """With BENCH_GC_LOG=1: the cyclic collector's pauses, summed up on stderr at exit."""

    def __init__(self) -> None:
        self.started = 0.0
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self.long: list[tuple[float, int, float, int]] = []  # (when, generation, pause, freed)
        gc.callbacks.append(self.callback)

    def callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
        else:
            pause = time.perf_counter() - self.started
            self.pauses[info["generation"]].append(pause)
            if pause > 0.005:
                self.long.append((time.time(), info["generation"], pause, info["collected"]))

    def report(self) -> None:
        for when, generation, pause, freed in self.long:
            print(
                f"gc pause at {when:.3f}: gen{generation} {pause * 1000:.1f} ms, {freed} freed",
                file=sys.stderr,
            )
        for generation, pauses in self.pauses.items():
            if pauses:
                print(
                    f"gc gen{generation}: {len(pauses)} collections, "
                    f"total {sum(pauses) * 1000:.1f} ms, max {max(pauses) * 1000:.2f} ms",
                    file=sys.stderr,
                )


class LoopStats(trio.abc.Instrument):
    """With BENCH_TRIO_STATS=1: task steps and scheduler passes, on stderr at exit.

    A pass is one turn of trio's run loop (I/O wait, then every runnable task
    one step). A task that yields waits for the next pass, so on a loaded
    loop each yield on a request's path costs about one pass.
    """

    def __init__(self) -> None:
        self.steps = 0
        self.by_task: collections.Counter[str] = collections.Counter()
        self.passes = 0
        self.pass_started = 0.0
        self.pass_seconds: list[float] = []

    def after_io_wait(self, timeout: float) -> None:
        now = time.perf_counter()
        if self.pass_started:
            self.pass_seconds.append(now - self.pass_started)
        self.pass_started = now
        self.passes += 1

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1
        self.by_task[task.name] += 1

    def report(self) -> None:
        busy = sorted(s for s in self.pass_seconds if s > 0.001)
        print(f"trio: {self.steps} task steps, {self.passes} passes", file=sys.stderr)
        if busy:
            print(
                f"trio: passes > 1 ms: {len(busy)}, median {busy[len(busy) // 2] * 1000:.1f} ms, "
                f"p99 {busy[int(0.99 * len(busy))] * 1000:.1f} ms, max {busy[-1] * 1000:.1f} ms",
                file=sys.stderr,
            )


def gc_experiment(server: str) -> GcPauses | None:
    """Investigation knobs (environment), off by default.

    BENCH_GC_LOG=1           log the collector's pauses (stderr, at exit)
    BENCH_GC_THRESHOLD=off   gc.disable(); or "a,b,c" for gc.set_threshold(a, b, c)
    BENCH_GC_THRESHOLD_LOKID / _BARE: the same for one server only
    BENCH_TRIO_STATS=1       count task steps and run-loop passes (see LoopStats)
    """
    setting = os.environ.get(f"BENCH_GC_THRESHOLD_{server.upper()}") or os.environ.get(
        "BENCH_GC_THRESHOLD"
    )
    if setting == "off":
        gc.disable()
    elif setting:
        gc.set_threshold(*(int(v) for v in setting.split(",")))
    return GcPauses() if os.environ.get("BENCH_GC_LOG") else None


def trio_stats() -> LoopStats | None:
    if not os.environ.get("BENCH_TRIO_STATS"):
        return None
    stats = LoopStats()
    trio.lowlevel.add_instrument(stats)
    return stats
