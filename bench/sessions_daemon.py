"""`loki serve` with investigation knobs, for `python -m bench sessions`; all off by default.

    python -m bench.sessions_daemon serve [loki serve flags]

The benchmark starts the daemon through this module only when one of these is
set in its environment (else it runs `python -m lokid serve` itself):

    BENCH_SESSIONS_PROFILE=DIR        cProfile the daemon's trio thread during the measured parts
                                      only (PROFILE_ON .. PROFILE_OFF); DIR/<home>.prof at exit
    BENCH_SESSIONS_GROUP_WINDOW=S     the store's group-commit window (default 0: no window)
    BENCH_SESSIONS_MIRROR_INTERVAL=S  `RunnerSettings.mirror_interval` (default 0.25 s)
    BENCH_SESSIONS_CONTROL_POLL=S     `RunnerSettings.control_poll` (default 1 s): how often
                                      each session's scheduler wakes to check `.loki/` files
    BENCH_SESSIONS_NO_FSYNC=1         `os.fsync` is a no-op: `.loki/` files are written without
                                      it (SQLite's own fsyncs are not Python's: unchanged)
    BENCH_SESSIONS_THREAD_STATS=DIR   CPU and wall time of every `trio.to_thread.run_sync`
                                      call, by function; DIR/<home>.threads.txt at exit
    BENCH_SESSIONS_TRIO_STATS=DIR     trio task steps (by task) and run-loop passes
                                      (`bench.investigate.LoopStats`); DIR/<home>.trio.txt
    BENCH_SESSIONS_STORE_STATS=DIR    the store's counters at exit (writes, reads, commits);
                                      DIR/<home>.store.txt

They change what is measured; figures for docs/performance.md are taken
without them.
"""

from __future__ import annotations

import atexit
import collections
import cProfile
import functools
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import trio

from bench.investigate import LoopStats

PROFILE_ON = signal.SIGRTMIN  # real-time signals: lokid leaves them alone
PROFILE_OFF = signal.SIGRTMIN + 1

KNOBS = (
    "BENCH_SESSIONS_PROFILE",
    "BENCH_SESSIONS_GROUP_WINDOW",
    "BENCH_SESSIONS_MIRROR_INTERVAL",
    "BENCH_SESSIONS_CONTROL_POLL",
    "BENCH_SESSIONS_THREAD_STATS",
    "BENCH_SESSIONS_TRIO_STATS",
    "BENCH_SESSIONS_NO_FSYNC",
    "BENCH_SESSIONS_STORE_STATS",
)


def wanted() -> bool:
    return any(os.environ.get(knob) for knob in KNOBS)


def _patch() -> None:
    """Replace the constructors `lokid.daemon` calls with ones that have the knob's value."""
    from lokid import daemon

    names = vars(daemon)
    if window := os.environ.get("BENCH_SESSIONS_GROUP_WINDOW"):
        names["StoreActor"] = functools.partial(names["StoreActor"], group_window=float(window))
    if os.environ.get("BENCH_SESSIONS_NO_FSYNC"):
        os.fsync = lambda fd: None
    settings = {
        field: float(value)
        for field, knob in (
            ("mirror_interval", "BENCH_SESSIONS_MIRROR_INTERVAL"),
            ("control_poll", "BENCH_SESSIONS_CONTROL_POLL"),
        )
        if (value := os.environ.get(knob))
    }
    if settings:
        names["RunnerSettings"] = functools.partial(names["RunnerSettings"], **settings)
    if store_dir := os.environ.get("BENCH_SESSIONS_STORE_STATS"):
        made: list[Any] = []
        store_actor = names["StoreActor"]

        def store(*args: Any, **kwargs: Any) -> Any:
            made.append(store_actor(*args, **kwargs))
            return made[-1]

        def report() -> None:
            home = Path(os.environ.get("LOKI_HOME", "lokid")).name
            lines = []
            for actor in made:
                stats = actor.statistics()
                lines.append(
                    f"writes {stats.writes} reads {stats.read_count} commits {stats.batches}"
                )
            (Path(store_dir) / f"{home}.store.txt").write_text("\n".join(lines) + "\n")

        names["StoreActor"] = store
        atexit.register(report)


class ThreadStats:
    """Per function run in a worker thread: calls, thread CPU seconds, wall seconds."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.cpu: collections.defaultdict[str, float] = collections.defaultdict(float)
        self.wall: collections.defaultdict[str, float] = collections.defaultdict(float)
        self.lock = threading.Lock()

    def install(self) -> None:
        original = trio.to_thread.run_sync

        async def run_sync(fn: Any, *args: Any, **kwargs: Any) -> Any:
            name = _name(fn)

            def timed(*inner: Any) -> Any:
                cpu, wall = time.thread_time(), time.perf_counter()
                try:
                    return fn(*inner)
                finally:
                    cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
                    with self.lock:
                        self.calls[name] += 1
                        self.cpu[name] += cpu
                        self.wall[name] += wall

            return await original(timed, *args, **kwargs)

        vars(trio.to_thread)["run_sync"] = run_sync

    def report(self) -> str:
        lines = [f"{'thread CPU s':>12} {'wall s':>8} {'calls':>7}  function"]
        for name, cpu in sorted(self.cpu.items(), key=lambda item: -item[1]):
            lines.append(f"{cpu:>12.3f} {self.wall[name]:>8.3f} {self.calls[name]:>7}  {name}")
        return "\n".join(lines) + "\n"


def _name(fn: Any) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    code = getattr(fn, "__code__", None)
    where = f" ({Path(code.co_filename).name}:{code.co_firstlineno})" if code else ""
    return f"{getattr(fn, '__qualname__', repr(fn))}{where}"


def main(argv: list[str]) -> int:
    _patch()
    from lokid.cli import main as loki

    home = Path(os.environ.get("LOKI_HOME", "lokid")).name
    if trio_dir := os.environ.get("BENCH_SESSIONS_TRIO_STATS"):
        loop = LoopStats()
        vars(trio)["run"] = functools.partial(trio.run, instruments=[loop])

        def report() -> None:
            steps = "\n".join(f"{n:>10} {name}" for name, n in loop.by_task.most_common(40))
            text = f"{loop.steps} task steps, {loop.passes} passes\n{steps}\n"
            (Path(trio_dir) / f"{home}.trio.txt").write_text(text)

        atexit.register(report)
    if stats_dir := os.environ.get("BENCH_SESSIONS_THREAD_STATS"):
        stats = ThreadStats()
        stats.install()
        atexit.register(
            lambda: (Path(stats_dir) / f"{home}.threads.txt").write_text(stats.report())
        )
    if profile_dir := os.environ.get("BENCH_SESSIONS_PROFILE"):
        # Only the measured parts: the benchmark sends PROFILE_ON before and PROFILE_OFF after
        # each. (Not SIGUSR1/2: lokid logs and ignores those itself, which replaced these
        # handlers and left the profile empty.)
        profiler = cProfile.Profile()
        signal.signal(PROFILE_ON, lambda signum, frame: profiler.enable())
        signal.signal(PROFILE_OFF, lambda signum, frame: profiler.disable())

        def dump() -> None:
            profiler.disable()
            profiler.dump_stats(str(Path(profile_dir) / f"{home}.prof"))

        atexit.register(dump)
    return loki(argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
