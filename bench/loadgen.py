"""HTTP/1.1 keep-alive load generators (loopback only): wrk when installed, else pure Python.

`run_wrk` runs Debian's `wrk` and reads its summary; `run_load` is the
fallback: a small generator on trio raw sockets.

Each of `concurrency` connections sends one request, reads the whole
response (Content-Length framing), records the latency, and repeats until
the duration is over. Pure Python, so run it on its own core: at the
request rates of a Python server it is not the bottleneck (the `raw`
baseline in the same run shows its ceiling).
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

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


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def run_wrk(
    host: str,
    port: int,
    path: str,
    *,
    concurrency: int,
    duration: float,
    script: Path | None = None,
    env: dict[str, str] | None = None,
    prefix: Sequence[str] = (),
) -> WrkResult:
    """One wrk run; latencies holds only its p50 and p99 (what wrk reports).

    `script`: a wrk Lua script (`-s`), which sees `env` in its environment;
    `prefix`: what to run wrk under (e.g. `taskset -c 1`).
    """
    output = subprocess.run(
        [
            *prefix,
            "wrk",
            "-t1",
            f"-c{concurrency}",
            f"-d{max(1, round(duration))}s",
            "--latency",
            *(["-s", str(script)] if script is not None else []),
            f"http://{host}:{port}{path}",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=duration + 30,
        env={**os.environ, **(env or {})},
    ).stdout

    def latency(label: str) -> float:
        found = re.search(rf"^\s*{label}\s+([\d.]+)(us|ms|s)\s*$", output, re.M)
        if found is None:
            raise RuntimeError(f"no {label} latency in wrk output:\n{output}")
        return float(found.group(1)) * _UNITS[found.group(2)]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    done = re.search(r"(\d+) requests in ([\d.]+)(s|ms)", output)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if rps is None or done is None:
        raise RuntimeError(f"unexpected wrk output:\n{output}")
    seconds = float(done.group(2)) / (1000 if done.group(3) == "ms" else 1)
    return WrkResult(
        requests=int(done.group(1)),
        errors=int(errors.group(1)) if errors else 0,
        seconds=seconds,
        latencies_ms=(),
        p50_ms=latency("50%"),
        p99_ms=latency("99%"),
        mean_ms=_wrk_mean(output),
    )


def _wrk_mean(output: str) -> float:
    """The `Latency avg` of wrk's thread stats."""
    found = re.search(r"^\s*Latency\s+([\d.]+)(us|ms|s)\s", output, re.M)
    if found is None:
        raise RuntimeError(f"no mean latency in wrk output:\n{output}")
    return float(found.group(1)) * _UNITS[found.group(2)]


@attrs.frozen
class WrkResult(LoadResult):
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    mean_ms: float = 0.0

    @property
    def p50(self) -> float:
        return self.p50_ms

    @property
    def p99(self) -> float:
        return self.p99_ms
