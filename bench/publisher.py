"""The stdin/stdout control protocol shared by the two `events` benchmark servers.

A server prints its HTTP port on stdout once it accepts connections, then
reads commands from stdin, one a line, and answers each with one line:

    rate R seconds S   publish R events/s for S seconds   -> "done <published> <seconds>"
    burst N            publish N events at once           -> "done <published> <seconds>"
    stats              open event streams                 -> "subscribers <n>"

and, for investigation (see `bench.investigate`):

    steps              trio task steps so far             -> "steps <n>" (BENCH_TRIO_STATS=1)
    steps by task      the same per task name             -> "name=n<TAB>..."
    gc                 the cyclic collector's view        -> "objects <n> frozen <n> ..."
    gc types           the 25 commonest tracked types     -> "name=count ..."

Every event is a `log` event whose data is `{"sent": time.time(), "seq": n}`
(`sent` taken when the event is handed to the server), so the driver on the same
machine measures event -> client latency as `time.time() - sent`. End of
stdin stops the server.

Each event is handed to `publish` in its own task, so a publish that waits
(lokid's waits for the store commit) never delays the next one's schedule;
the server keeps the order (lokid's bus orders its mailbox; the bare
broadcaster has one fan-out task). When the loop is saturated the publisher
runs late; it then publishes every event that is due at once, so the offered
rate stays the same for both servers (`sent` is still the real publish time).
"""

from __future__ import annotations

import collections
import gc
import resource
import sys
import time
from collections.abc import Awaitable, Callable

import trio

from bench.investigate import LoopStats

Publish = Callable[[int, float], Awaitable[None]]


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        wanted = 65536 if hard == resource.RLIM_INFINITY else hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def reply(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def serve_commands(
    publish: Publish, subscribers: Callable[[], int], loop_stats: LoopStats | None = None
) -> None:
    """Run commands from stdin until it closes."""
    seq = 0
    while line := await trio.to_thread.run_sync(sys.stdin.readline):
        words = line.split()
        if not words:
            continue
        if words[0] == "stats":
            reply(f"subscribers {subscribers()}")
            continue
        if words[0] == "steps":
            if loop_stats is None:
                reply("steps -1")
            elif words[1:] == ["by", "task"]:
                reply("\t".join(f"{name}={n}" for name, n in loop_stats.by_task.most_common()))
            else:
                reply(f"steps {loop_stats.steps}")
            continue
        if words[0] == "gc" and words[1:] == ["types"]:
            counts = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
            reply(" ".join(f"{name}={count}" for name, count in counts.most_common(25)))
            continue
        if words[0] == "gc":
            reply(
                f"objects {len(gc.get_objects())} frozen {gc.get_freeze_count()} "
                f"count {gc.get_count()} threshold {gc.get_threshold()}"
            )
            continue
        if words[0] == "rate" and len(words) == 4 and words[2] == "seconds":
            rate, seconds = float(words[1]), float(words[3])
            count = max(1, round(rate * seconds))
        elif words[0] == "burst" and len(words) == 2:
            rate, count = 0.0, int(words[1])
        else:
            reply(f"error unknown command {line.strip()!r}")
            continue
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            published = 0
            while published < count:
                # Everything due now at once: on a saturated loop this task runs once per
                # scheduler pass, which must not lower the offered rate.
                due = (
                    count if not rate else min(count, int((trio.current_time() - start) * rate) + 1)
                )
                while published < due:
                    seq += 1
                    published += 1
                    nursery.start_soon(publish, seq, time.time())
                if published < count:
                    await trio.sleep_until(start + published / rate)
        reply(f"done {count} {trio.current_time() - start:.3f}")
