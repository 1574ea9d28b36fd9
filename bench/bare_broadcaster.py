"""Baseline for `python -m bench events`: an SSE broadcaster on bare trio sockets.

No HTTP framework, no ASGI, no store: each connection's request head is read
by hand; `GET /health` gets the same JSON as lokid's (keep-alive), `GET
/api/events` gets lokid's SSE headers (chunked, as Hypercorn sends them),
the same opening (`retry:` + `: connected`), then every broadcast frame -
the same `id: N` / `data: <envelope>` bytes lokid sends, for the same
`{"id", "type", "timestamp", "sessionId", "level", "data"}` envelope.

The simplest correct broadcaster: one fan-out task takes whatever events are
waiting, encodes them once, and appends the bytes to each connection's
bounded queue (a checkpoint every 256 connections); each connection's task
sends everything queued as one chunk. A client that falls 1024 writes behind
is dropped. The same shape as lokid's bus, minus everything else - the floor
a trio process on this machine can reach.

Speaks the stdin/stdout protocol of `bench.publisher`.
"""

from __future__ import annotations

import collections
import json
import socket

import trio

from bench.investigate import gc_experiment, trio_stats
from bench.publisher import raise_fd_limit, reply, serve_commands
from lokid.timefmt import utc_now_iso

CHECKPOINT_EVERY = 256
QUEUE_CAPACITY = 1024
HEARTBEAT = 15.0
MAX_HEAD = 16384

SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"content-type: text/event-stream; charset=utf-8\r\n"
    b"cache-control: no-cache\r\n"
    b"x-accel-buffering: no\r\n"
    b"transfer-encoding: chunked\r\n"
    b"\r\n"
)
OPENING = b"retry: 3000\n\n: connected\n\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def health_response() -> bytes:
    body = json.dumps(
        {"status": "healthy", "timestamp": utc_now_iso()}, separators=(",", ":")
    ).encode()
    return (
        b"HTTP/1.1 200 OK\r\n"
        b"content-type: application/json\r\n"
        b"cache-control: no-store\r\n"
        b"content-length: %d\r\n\r\n%b" % (len(body), body)
    )


class Connection:
    def __init__(self) -> None:
        self.queue: collections.deque[bytes] = collections.deque()
        self.wakeup = trio.Event()
        self.closed = False

    def offer(self, data: bytes) -> None:
        if self.closed:
            return
        if len(self.queue) >= QUEUE_CAPACITY:
            self.closed = True
            self.queue.clear()
        else:
            self.queue.append(data)
        self.wakeup.set()


class Broadcaster:
    def __init__(self) -> None:
        self.connections: set[Connection] = set()
        self.last_id = 0
        self._send, self._receive = trio.open_memory_channel[tuple[int, float]](float("inf"))

    async def publish(self, seq: int, sent: float) -> None:
        self._send.send_nowait((seq, sent))

    async def fan_out_loop(self) -> None:
        async for first in self._receive:
            batch = [first]
            while True:
                try:
                    batch.append(self._receive.receive_nowait())
                except trio.WouldBlock:
                    break
            timestamp = utc_now_iso()
            frames = []
            for seq, sent in batch:
                self.last_id += 1
                envelope = {
                    "id": self.last_id,
                    "type": "log",
                    "timestamp": timestamp,
                    "sessionId": None,
                    "level": "info",
                    "data": {"sent": sent, "seq": seq},
                }
                text = json.dumps(envelope, separators=(",", ":"), ensure_ascii=False)
                frames.append(f"id: {self.last_id}\ndata: {text}\n\n".encode())
            data = b"".join(frames)
            for index, connection in enumerate(list(self.connections), start=1):
                connection.offer(data)
                if index % CHECKPOINT_EVERY == 0:
                    await trio.lowlevel.checkpoint()

    async def handle(self, stream: trio.SocketStream) -> None:
        buffer = b""
        async with stream:
            while True:
                while (end := buffer.find(b"\r\n\r\n")) < 0:
                    if len(buffer) > MAX_HEAD:
                        return
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buffer += data
                head, buffer = buffer[:end], buffer[end + 4 :]
                request_line = head.split(b"\r\n", 1)[0].split()
                if len(request_line) < 2 or request_line[0] != b"GET":
                    await stream.send_all(b"HTTP/1.1 405 Not Allowed\r\ncontent-length: 0\r\n\r\n")
                    continue
                path = request_line[1].split(b"?", 1)[0]
                if path == b"/health":
                    await stream.send_all(health_response())
                elif path == b"/api/events":
                    await self.stream_events(stream)
                    return
                else:
                    await stream.send_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")

    async def stream_events(self, stream: trio.SocketStream) -> None:
        connection = Connection()
        self.connections.add(connection)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_on_eof, stream, nursery.cancel_scope)
                await stream.send_all(SSE_HEAD + chunk(OPENING))
                while not connection.closed:
                    with trio.move_on_after(HEARTBEAT) as idle:
                        while not connection.queue and not connection.closed:
                            connection.wakeup = trio.Event()
                            await connection.wakeup.wait()
                    if idle.cancelled_caught:
                        await stream.send_all(chunk(b": keep-alive\n\n"))
                    elif connection.queue:
                        data = b"".join(connection.queue)
                        connection.queue.clear()
                        await stream.send_all(chunk(data))
                await stream.send_all(chunk(b": closed: slow\n\n") + b"0\r\n\r\n")
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            connection.closed = True
            self.connections.discard(connection)


async def _cancel_on_eof(stream: trio.SocketStream, scope: trio.CancelScope) -> None:
    try:
        while await stream.receive_some(4096):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    scope.cancel()


async def main() -> None:
    raise_fd_limit()
    gc_pauses = gc_experiment("bare")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    broadcaster = Broadcaster()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(broadcaster.fan_out_loop)
        nursery.start_soon(trio.serve_listeners, broadcaster.handle, [listener])
        reply(str(sock.getsockname()[1]))
        loop_stats = trio_stats()
        await serve_commands(broadcaster.publish, lambda: len(broadcaster.connections), loop_stats)
        nursery.cancel_scope.cancel()
    if gc_pauses is not None:
        gc_pauses.report()
    if loop_stats is not None:
        loop_stats.report()


if __name__ == "__main__":
    trio.run(main)
