"""lokid under test for `python -m bench events`: the real daemon, in this process.

`Daemon(config).run()` with a temporary LOKI_HOME, ports 0 and log level
warning; events go through `daemon.bus.publish` (store commit, tail,
fan-out), exactly as the daemon's own actors publish them. Prints the API
port once ready, then speaks the stdin/stdout protocol of `bench.publisher`;
a closed stdin asks the daemon for a graceful shutdown.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

import trio

from bench.investigate import gc_experiment, trio_stats
from bench.publisher import raise_fd_limit, reply, serve_commands
from lokid.config import load_config
from lokid.daemon import Daemon
from lokid.events import Level


def patch_send_lock() -> None:
    """BENCH_PATCH_SEND_LOCK=1 (investigation only): what lokid would gain from a
    write path without the extra yield of Hypercorn's uncontended `send_lock`.

    Hypercorn's `TCPServer.protocol_send` takes a `trio.Lock` around every
    write; an uncontended `Lock.acquire` still yields to the scheduler
    (`cancel_shielded_checkpoint`), so each SSE write costs a full run-loop
    pass more than the write itself. This takes the lock without yielding
    when it is free (and waits as before when it is not).
    """
    from hypercorn.events import Closed, RawData

    from lokid.actors.listener import _TCPServer

    original = _TCPServer.protocol_send

    async def protocol_send(self: Any, event: Any) -> None:
        if not isinstance(event, RawData) or self.send_lock.locked():
            await original(self, event)
            return
        self.send_lock.acquire_nowait()
        try:
            with trio.CancelScope(shield=True):
                await self.stream.send_all(event.data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await self.protocol.handle(Closed())
        finally:
            self.send_lock.release()

    _TCPServer.protocol_send = protocol_send  # type: ignore[method-assign]


async def main() -> None:
    if os.environ.get("BENCH_PATCH_SEND_LOCK"):
        patch_send_lock()
    raise_fd_limit()
    gc_pauses = gc_experiment("lokid")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="lokid-bench-") as home:
        config = load_config(
            {"api_port": 0, "dashboard_port": 0, "log_level": "warning"},
            environ={"LOKI_HOME": home},
        )
        daemon = Daemon(config)

        async def publish(seq: int, sent: float) -> None:
            await daemon.bus.publish("log", None, Level.INFO, {"sent": sent, "seq": seq})

        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            assert daemon.listeners is not None
            reply(str(daemon.listeners.api.getsockname()[1]))
            loop_stats = trio_stats()
            await serve_commands(publish, lambda: daemon.bus.subscriber_count, loop_stats)
            daemon.request_shutdown()
    if gc_pauses is not None:
        gc_pauses.report()
    if loop_stats is not None:
        loop_stats.report()


if __name__ == "__main__":
    trio.run(main)
