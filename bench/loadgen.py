"""A small HTTP/1.1 keep-alive load generator on trio raw sockets (loopback only).

Each of `concurrency` connections sends one request, reads the whole
response (Content-Length framing), records the latency, and repeats until
the duration is over. Pure Python, so run it on its own core: at the
request rates of a Python server it is not the bottleneck (the `raw`
baseline in the same run shows its ceiling).
"""

from __future__ import annotations

import statistics
import time

import attrs
import trio


@attrs.frozen
class LoadResult:
    requests: int
    errors: int
    seconds: float
    latencies_ms: tuple[float, ...]

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies_ms) if self.latencies_ms else float("nan")

    @property
    def p99(self) -> float:
        return self.percentile(99)


async def _connection(
    host: str, port: int, request: bytes, deadline: float, latencies: list[float], errors: list[int]
) -> None:
    stream = await trio.open_tcp_stream(host, port)
    buffer = b""
    async with stream:
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            await stream.send_all(request)
            while True:
                head_end = buffer.find(b"\r\n\r\n")
                if head_end >= 0:
                    head = buffer[:head_end].lower()
                    length_at = head.find(b"content-length:")
                    length = int(head[length_at + 15 : head.find(b"\r\n", length_at)].strip() or 0)
                    total = head_end + 4 + length
                    if len(buffer) >= total:
                        if not buffer.startswith(b"HTTP/1.1 200"):
                            errors.append(1)
                        buffer = buffer[total:]
                        break
                chunk = await stream.receive_some(65536)
                if not chunk:
                    errors.append(1)
                    return
                buffer += chunk
            latencies.append((time.perf_counter() - start) * 1000)


async def run_load(
    host: str, port: int, path: str, *, concurrency: int, duration: float
) -> LoadResult:
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    latencies: list[float] = []
    errors: list[int] = []
    start = time.perf_counter()
    deadline = start + duration
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(_connection, host, port, request, deadline, latencies, errors)
    seconds = time.perf_counter() - start
    return LoadResult(len(latencies), len(errors), seconds, tuple(latencies))
