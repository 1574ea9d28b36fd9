"""Baseline server: a raw ASGI app answering /health on lokid's own Hypercorn trio listener.

Same listener code, same socket set-up, same JSON; no routing, no Quart, no
daemon. What lokid adds on top of this is what the `health` benchmark shows.
"""

from __future__ import annotations

import socket
import sys
from typing import Any

import trio

from lokid.actors.listener import HttpListener
from lokid.http.convert import dumps
from lokid.timefmt import utc_now_iso


async def raw_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = dumps({"status": "healthy", "timestamp": utc_now_iso()})
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def main() -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    listener = HttpListener("raw", raw_app, [sock])
    async with trio.open_nursery() as nursery:
        await nursery.start(listener.run)
        print(sock.getsockname()[1], flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)  # until the benchmark closes our stdin
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
