"""A burst of 100k events into a running daemon: rate, nothing lost, /health meanwhile.

    python -m bench burst [--events 100000] [--subscribers 100]

In-process (real daemon, real store, real listener for /health probes at
100/s); reports the publish rate, that every event was stored, and the
/health p99 during the burst as a ratio to idle, measured in the same run.
Subscribers that never read are cut off as slow, as they should be.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time

import httpx
import trio

from lokid.config import load_config
from lokid.daemon import Daemon, serve
from lokid.events import EventFilter, Level


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def _run(events: int, subscribers: int) -> None:
    home = tempfile.mkdtemp(prefix="lokid-burst-")
    config = load_config(
        {"api_port": 0, "dashboard_port": 0, "log_level": "warning"},
        environ={"LOKI_HOME": home},
    )
    async with trio.open_nursery() as nursery:
        daemon: Daemon = await nursery.start(functools.partial(serve, config))
        assert daemon.listeners is not None
        url = daemon.listeners.urls()["api"] + "/health"
        idle_streams = [daemon.bus.subscribe(EventFilter()) for _ in range(subscribers)]
        latencies: list[float] = []
        done = trio.Event()

        async def probe() -> None:
            async with httpx.AsyncClient() as client:
                while not done.is_set():
                    start = time.perf_counter()
                    answer = await client.get(url)
                    latencies.append((time.perf_counter() - start) * 1000)
                    assert answer.status_code == 200
                    await trio.sleep(0.01)

        nursery.start_soon(probe)
        await trio.sleep(1.0)
        idle = list(latencies)
        latencies.clear()
        start = time.perf_counter()
        for n in range(events):
            await daemon.bus.emit("agent.output", "bench", Level.DEBUG, {"n": n})
        last = await daemon.bus.publish("log")
        seconds = time.perf_counter() - start
        done.set()
        stored = (await daemon.bus.counts())["total"]
        cut = sum(1 for s in idle_streams if s.closed_reason == "slow")
        print(f"{events} events in {seconds:.1f}s: {events / seconds:,.0f}/s; last id {last.id}")
        print(f"stored: {stored} (expected {events + 2}: the start event, the burst, the last one)")
        print(
            f"/health p99 idle {_p99(idle):.1f} ms, during the burst {_p99(latencies):.1f} ms "
            f"(ratio {_p99(latencies) / _p99(idle):.2f}), max {max(latencies):.1f} ms"
        )
        print(f"{cut} of {subscribers} never-reading subscribers cut off as slow")
        daemon.request_shutdown()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench burst", description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--subscribers", type=int, default=100)
    args = parser.parse_args(argv)
    trio.run(_run, args.events, args.subscribers)
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
