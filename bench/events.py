"""SSE fan-out, one-event latency, /health under load and memory per stream, vs bare trio.

    python -m bench events [--subscribers 1000] [--rate 50] [--duration 5]
                           [--rounds 3] [--measure fanout single health memory]
                           [--sample-every 10] [--json]

Two servers, each started fresh for every round and pinned to CPU 0: lokid
(`bench/events_server.py`: the real daemon, events published through
`daemon.bus.publish`) and the bare-trio SSE broadcaster
(`bench/bare_broadcaster.py`: same bytes on the wire, no framework). The
driver (this process, CPU 1) runs the same sequence against each, alternating
which goes first, and compares medians of the rounds:

1. memory   - VmRSS of the server before and after opening N idle streams
              (each counted once it received `: connected`), per stream.
2. single   - one event to the N streams, `--bursts` times: p99 (and max)
              of event -> client latency over every delivery.
3. fanout   - `--rate` events/s for `--duration` s to the N streams:
              deliveries/s and event -> client p50/p99.
4. health   - during the fan-out, `GET /health` at `--health-rate` req/s on
              one keep-alive connection: p99 (idle p99 taken before, for
              reference).

Every stream counts every frame (by scanning for `data:` lines); to keep the
Python driver off the critical path the fan-out parses `sent` only on every
`--sample-every`-th stream (the single-event test parses all). The driver's
own CPU use is printed: near 100 % would mean it, not the server, is the
limit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import trio

from bench.publisher import raise_fd_limit

SERVER_CPU = 0
DRIVER_CPU = 1
HOST = "127.0.0.1"
SERVERS = {"bare": "bench.bare_broadcaster", "lokid": "bench.events_server"}
MEASURES = ("fanout", "single", "health", "memory")
CONNECTED = b": connected\n\n"  # the stream's opening comment: subscribed from here on
CONNECT_PARALLEL = 64  # connections in their handshake at once (stay under the backlog)
CLK_TCK = os.sysconf("SC_CLK_TCK")


TWO_CPUS = {SERVER_CPU, DRIVER_CPU} <= os.sched_getaffinity(0)  # read before the driver pins


def _pin_server() -> None:
    # Not `len(sched_getaffinity(0)) > 1`: this child inherits the driver's pin to CPU 1.
    if TWO_CPUS:
        os.sched_setaffinity(0, {SERVER_CPU})


class Server:
    def __init__(self, kind: str, process: subprocess.Popen[str], port: int) -> None:
        self.kind = kind
        self.process = process
        self.port = port
        self.pid = process.pid

    def command(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    async def answer(self, timeout: float = 30.0) -> str:
        assert self.process.stdout is not None
        with trio.fail_after(timeout):
            line = await trio.to_thread.run_sync(
                self.process.stdout.readline, abandon_on_cancel=True
            )
        if not line:
            raise RuntimeError(f"{self.kind} server exited (code {self.process.poll()})")
        return line.strip()

    async def ask(self, line: str, timeout: float = 30.0) -> str:
        self.command(line)
        return await self.answer(timeout)

    def rss_kb(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def cpu_times() -> dict[int, tuple[int, int]]:
    """Per CPU: (busy, total) jiffies from /proc/stat; busy includes irq and softirq."""
    times = {}
    with open("/proc/stat") as stat:
        for line in stat:
            name, *fields = line.split()
            if name.startswith("cpu") and name != "cpu":
                values = [int(v) for v in fields[:8]]
                idle = values[3] + values[4]  # idle + iowait
                times[int(name[3:])] = (sum(values) - idle, sum(values))
    return times


def cpu_busy(before: dict[int, tuple[int, int]], cpu: int) -> float:
    after = cpu_times()
    busy = after[cpu][0] - before[cpu][0]
    total = after[cpu][1] - before[cpu][1]
    return busy / total if total else float("nan")


@contextmanager
def start_server(kind: str) -> Iterator[Server]:
    process = subprocess.Popen(
        [sys.executable, "-m", SERVERS[kind]],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=_pin_server,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.strip().isdigit():
            raise SystemExit(f"{kind} server did not start (said {line!r})")
        yield Server(kind, process, int(line))
    finally:
        assert process.stdin is not None
        with suppress(BrokenPipeError):
            process.stdin.close()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


class Phase:
    """What the streams received while one measurement ran."""

    def __init__(self, parse_all: bool) -> None:
        self.parse_all = parse_all
        self.frames = 0
        self.latencies: list[float] = []  # seconds, event -> client
        self.last_rx = 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


class Driver:
    def __init__(self, server: Server, sample_every: int) -> None:
        self.server = server
        self.sample_every = sample_every
        self.phase: Phase | None = None
        self.connected = 0
        self.ended = 0
        self.stray = 0
        self.request = (
            f"GET /api/events HTTP/1.1\r\nHost: {HOST}:{server.port}\r\n"
            "Accept: text/event-stream\r\n\r\n"
        ).encode()

    async def subscriber(self, index: int, limiter: trio.CapacityLimiter) -> None:
        sampled = index % self.sample_every == 0
        async with limiter:
            stream = await trio.open_tcp_stream(HOST, self.server.port)
            await stream.send_all(self.request)
            buffer = b""
            while (at := buffer.find(CONNECTED)) < 0:
                data = await stream.receive_some(65536)
                if not data:
                    raise RuntimeError(f"stream {index} closed before `: connected`: {buffer!r}")
                buffer += data
            if not buffer.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"stream {index}: {buffer[:200]!r}")
            tail = buffer[at + len(CONNECTED) :]
        self.connected += 1
        async with stream:
            while True:
                data = await stream.receive_some(262144)
                if not data:
                    self.ended += 1
                    return
                now = time.time()
                buffer = tail + data
                end = buffer.rfind(b"\n\n")
                if end < 0:
                    tail = buffer
                    continue
                complete, tail = buffer[: end + 2], buffer[end + 2 :]
                count = complete.count(b"\ndata: ")
                if not count:
                    continue
                phase = self.phase
                if phase is None:
                    self.stray += count
                    continue
                phase.frames += count
                phase.last_rx = now
                if sampled or phase.parse_all:
                    latencies = phase.latencies
                    at = complete.find(b'"sent":')
                    while at >= 0:
                        comma = complete.find(b",", at)
                        latencies.append(now - float(complete[at + 7 : comma]))
                        at = complete.find(b'"sent":', comma)

    async def open_streams(self, nursery: trio.Nursery, count: int, timeout: float) -> None:
        target = self.connected + count
        limiter = trio.CapacityLimiter(CONNECT_PARALLEL)
        for index in range(count):
            nursery.start_soon(self.subscriber, index, limiter)
        with trio.fail_after(timeout):
            while self.connected < target:  # noqa: ASYNC110 - polling a counter is enough here
                await trio.sleep(0.01)

    async def wait_frames(self, phase: Phase, expected: int, timeout: float) -> bool:
        deadline = trio.current_time() + timeout
        while phase.frames < expected:
            if trio.current_time() > deadline:
                return False
            await trio.sleep(0.005)
        return True

    async def wait_subscribers(self, expected: int, timeout: float) -> int:
        deadline = trio.current_time() + timeout
        while True:
            seen = int((await self.server.ask("stats")).split()[1])
            if seen == expected or trio.current_time() > deadline:
                return seen
            await trio.sleep(0.05)

    async def health(self, rate: float, seconds: float) -> list[float]:
        """GET /health on one keep-alive connection at `rate`/s; latencies in seconds.

        Hypercorn closes a keep-alive connection after 1000 requests
        (`keep_alive_max_requests`), so a closed connection is reopened and
        the request sent again (its latency counted from the resend).
        """
        request = f"GET /health HTTP/1.1\r\nHost: {HOST}:{self.server.port}\r\n\r\n".encode()
        latencies: list[float] = []
        stream: trio.SocketStream | None = None
        buffer = b""
        try:
            start = trio.current_time()
            for n in range(max(1, round(rate * seconds))):
                await trio.sleep_until(start + n / rate)
                for _attempt in range(3):
                    if stream is None:
                        stream = await trio.open_tcp_stream(HOST, self.server.port)
                        buffer = b""
                    sent = time.perf_counter()
                    answer = await _exchange(stream, request, buffer)
                    if answer is None:  # closed by the server: reconnect and resend
                        await stream.aclose()
                        stream = None
                        continue
                    latencies.append(time.perf_counter() - sent)
                    buffer, close = answer
                    if close:
                        await stream.aclose()
                        stream = None
                    break
                else:
                    raise RuntimeError("/health: connection closed three times in a row")
        finally:
            if stream is not None:
                await stream.aclose()
        return latencies


async def _exchange(
    stream: trio.SocketStream, request: bytes, buffer: bytes
) -> tuple[bytes, bool] | None:
    """Send one request, read one Content-Length response: (rest, connection closes)."""
    try:
        await stream.send_all(request)
    except trio.BrokenResourceError:
        return None
    while True:
        head_end = buffer.find(b"\r\n\r\n")
        if head_end >= 0:
            head = buffer[:head_end].lower()
            at = head.find(b"content-length:")
            stop = head.find(b"\r\n", at)
            length = int(head[at + 15 : stop if stop >= 0 else len(head)])
            if len(buffer) >= head_end + 4 + length:
                if not buffer.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"/health answered {buffer[:100]!r}")
                return buffer[head_end + 4 + length :], b"connection: close" in head
        try:
            data = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            return None
        if not data:
            return None
        buffer += data


async def measure_server(server: Server, args: argparse.Namespace) -> dict[str, Any]:
    driver = Driver(server, args.sample_every)
    n = args.subscribers
    result: dict[str, Any] = {"server": server.kind, "n": n}
    async with trio.open_nursery() as streams:
        # Warm-up: a few streams and one event, so first-use costs are not measured.
        async with trio.open_nursery() as warm:
            await driver.open_streams(warm, 16, timeout=30)
            await server.ask("burst 1")
            await driver.health(50, 0.2)
            await trio.sleep(0.2)
            warm.cancel_scope.cancel()
        driver.connected = 0
        await driver.wait_subscribers(0, timeout=10)
        await trio.sleep(0.3)

        rss_before = server.rss_kb()
        started = time.perf_counter()
        await driver.open_streams(streams, n, timeout=60)
        result["connect_seconds"] = time.perf_counter() - started
        result["subscribers_seen"] = await driver.wait_subscribers(n, timeout=10)
        await trio.sleep(args.settle)
        rss_after = server.rss_kb()
        idle_health = await driver.health(args.health_rate, 1.0)
        result["rss_before_kb"] = rss_before
        result["rss_after_kb"] = rss_after
        result["kb_per_subscriber"] = (rss_after - rss_before) / n
        result["health_idle_p99_ms"] = percentile(idle_health, 99) * 1000

        if "single" in args.measure:
            phase = Phase(parse_all=True)
            driver.phase = phase
            worst: list[float] = []
            missing = 0
            cpu_before = server.cpu_seconds()
            for burst in range(args.bursts):
                before = len(phase.latencies)
                await server.ask("burst 1")
                if not await driver.wait_frames(phase, n * (burst + 1), timeout=10):
                    missing += n * (burst + 1) - phase.frames
                    phase.frames = n * (burst + 1)
                worst.append(max(phase.latencies[before:], default=float("nan")))
                await trio.sleep(args.burst_gap)
            driver.phase = None
            cpu = server.cpu_seconds() - cpu_before  # the gaps between events cost ~0 at rest
            result["cpu_us_per_delivery"] = cpu / (n * args.bursts) * 1e6
            result["single_p50_ms"] = percentile(phase.latencies, 50) * 1000
            result["single_p99_ms"] = percentile(phase.latencies, 99) * 1000
            result["single_last_ms"] = statistics.median(worst) * 1000
            result["single_missing"] = missing

        if "fanout" in args.measure or "health" in args.measure:
            phase = Phase(parse_all=False)
            expected = round(args.rate * args.duration) * n
            health: list[float] = []
            driver.phase = phase
            cpu_before = server.cpu_seconds()
            driver_cpu_before = time.process_time()
            cpus_before = cpu_times()
            t0 = time.time()
            async with trio.open_nursery() as nursery:
                if "health" in args.measure:

                    async def probe() -> None:
                        health.extend(await driver.health(args.health_rate, args.duration))

                    nursery.start_soon(probe)
                server.command(f"rate {args.rate:g} seconds {args.duration:g}")
                published = await server.answer(timeout=args.duration + 60)
                complete = await driver.wait_frames(phase, expected, timeout=args.drain)
            wall = time.time() - t0
            driver.phase = None
            elapsed = (phase.last_rx - t0) if complete else wall
            result["fanout_expected"] = expected
            result["fanout_delivered"] = phase.frames
            result["fanout_complete"] = complete
            result["fanout_published"] = published
            result["deliveries_per_s"] = phase.frames / elapsed
            result["fanout_p50_ms"] = percentile(phase.latencies, 50) * 1000
            result["fanout_p99_ms"] = percentile(phase.latencies, 99) * 1000
            result["fanout_max_ms"] = max(phase.latencies, default=float("nan")) * 1000
            result["fanout_sampled"] = len(phase.latencies)
            server_cpu = server.cpu_seconds() - cpu_before
            result["fanout_cpu_us_per_delivery"] = server_cpu / max(1, phase.frames) * 1e6
            result["server_cpu"] = server_cpu / wall
            result["driver_cpu"] = (time.process_time() - driver_cpu_before) / wall
            result["cpu0_busy"] = cpu_busy(cpus_before, SERVER_CPU)
            result["cpu1_busy"] = cpu_busy(cpus_before, DRIVER_CPU)
            # Busy time of each CPU not spent by our process there: other processes of a
            # shared machine (and a few % of kernel network work).
            result["cpu0_other"] = max(0.0, result["cpu0_busy"] - result["server_cpu"])
            result["cpu1_other"] = max(0.0, result["cpu1_busy"] - result["driver_cpu"])
            if health:
                result["health_load_p50_ms"] = percentile(health, 50) * 1000
                result["health_load_p99_ms"] = percentile(health, 99) * 1000
                result["health_load_requests"] = len(health)
        result["streams_ended_early"] = driver.ended
        streams.cancel_scope.cancel()
    return result


# metric key, label, ratio direction ("higher" = lokid/bare should be high), goal
ROWS: list[tuple[str, str, str, float | None, str]] = [
    ("deliveries_per_s", "fan-out deliveries/s", "higher", 0.5, "fanout"),
    ("fanout_p50_ms", "fan-out event->client p50 ms", "lower", None, "fanout"),
    ("fanout_p99_ms", "fan-out event->client p99 ms", "lower", None, "fanout"),
    ("single_p99_ms", "one event to N: p99 ms", "lower", 3.0, "single"),
    ("single_last_ms", "one event to N: last client ms", "lower", None, "single"),
    ("cpu_us_per_delivery", "server CPU us/delivery, 1 event", "lower", None, "single"),
    ("health_load_p99_ms", "/health p99 under fan-out ms", "lower", 1.5, "health"),
    ("health_idle_p99_ms", "/health p99, N idle streams ms", "lower", None, "memory"),
    ("kb_per_subscriber", "KB per idle subscriber", "lower", None, "memory"),
]
KB_GOAL = 40.0
NOISY = 0.10  # CPU used by other processes during a fan-out that makes a round suspect


def summarize(rounds: list[dict[str, dict[str, Any]]], measures: list[str]) -> list[dict[str, Any]]:
    rows = []
    for key, label, direction, goal, needs in ROWS:
        if needs not in measures and needs != "memory":  # memory is measured every time
            continue
        values = {
            kind: [r[kind][key] for r in rounds if key in r[kind]] for kind in ("bare", "lokid")
        }
        if not values["bare"] or not values["lokid"]:
            continue
        bare = statistics.median(values["bare"])
        lokid = statistics.median(values["lokid"])
        ratio = lokid / bare if bare else float("nan")
        row: dict[str, Any] = {
            "metric": key,
            "label": label,
            "bare": bare,
            "lokid": lokid,
            "ratio": ratio,
            "bare_rounds": values["bare"],
            "lokid_rounds": values["lokid"],
            "goal": None,
            "met": None,
        }
        if goal is not None:
            row["goal"] = f"ratio {'>=' if direction == 'higher' else '<='} {goal:g}"
            row["met"] = ratio >= goal if direction == "higher" else ratio <= goal
        if key == "kb_per_subscriber":
            row["goal"] = f"lokid <= {KB_GOAL:g} KB"
            row["met"] = lokid <= KB_GOAL
        rows.append(row)
    return rows


def _fmt(value: float) -> str:
    if value != value:
        return "nan"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench events", description=__doc__)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=50.0, help="events/s in the fan-out")
    parser.add_argument("--duration", type=float, default=5.0, help="fan-out seconds")
    parser.add_argument("--drain", type=float, default=15.0, help="max wait for late frames")
    parser.add_argument("--bursts", type=int, default=20, help="single events sent")
    parser.add_argument("--burst-gap", type=float, default=0.1)
    parser.add_argument("--health-rate", type=float, default=100.0, help="/health req/s")
    parser.add_argument("--settle", type=float, default=1.5, help="idle seconds before RSS")
    parser.add_argument("--sample-every", type=int, default=10, help="fan-out latency sampling")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--measure", nargs="+", choices=MEASURES, default=list(MEASURES), metavar="M"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    raise_fd_limit()
    if TWO_CPUS:
        os.sched_setaffinity(0, {DRIVER_CPU})

    rounds: list[dict[str, dict[str, Any]]] = []
    for number in range(args.rounds):
        order = ("bare", "lokid") if number % 2 == 0 else ("lokid", "bare")
        this: dict[str, dict[str, Any]] = {}
        for kind in order:
            with start_server(kind) as server:
                this[kind] = trio.run(measure_server, server, args)
            if not args.json:
                print(f"round {number + 1} {kind}: " + _brief(this[kind]), file=sys.stderr)
        rounds.append(this)
    rows = summarize(rounds, args.measure)

    if args.json:
        print(json.dumps({"args": vars(args), "rows": rows, "rounds": rounds}, indent=2))
        return 0
    print(
        f"SSE: lokid vs bare-trio broadcaster, {args.subscribers} streams, "
        f"{args.rate:g} ev/s x {args.duration:g}s, {args.rounds} rounds (alternating), medians"
    )
    print(
        f"fan-out latency parsed on every {args.sample_every}th stream, all streams counted; "
        f"single: {args.bursts} events, all parsed; /health at {args.health_rate:g} req/s"
    )
    print(f"{'':<34} {'bare':>10} {'lokid':>10} {'ratio':>7}  goal")
    for row in rows:
        verdict = "" if row["met"] is None else ("met" if row["met"] else "MISSED")
        goal = f"{row['goal']} {verdict}" if row["goal"] else ""
        print(
            f"{row['label']:<34} {_fmt(row['bare']):>10} {_fmt(row['lokid']):>10} "
            f"{row['ratio']:>7.2f}  {goal}"
        )
    for kind in ("bare", "lokid"):
        fanouts = [r[kind] for r in rounds if "server_cpu" in r[kind]]
        if fanouts:
            print(
                f"during fan-out, {kind}: server CPU "
                + "/".join(f"{r['server_cpu']:.0%}" for r in fanouts)
                + ", driver CPU "
                + "/".join(f"{r['driver_cpu']:.0%}" for r in fanouts)
                + ", others on CPU 0 "
                + "/".join(f"{r['cpu0_other']:.0%}" for r in fanouts)
                + ", on CPU 1 "
                + "/".join(f"{r['cpu1_other']:.0%}" for r in fanouts)
                + " (per round)"
            )
    noisy = [
        f"round {number + 1} {kind}"
        for number, r in enumerate(rounds)
        for kind in ("bare", "lokid")
        if max(r[kind].get("cpu0_other", 0.0), r[kind].get("cpu1_other", 0.0)) > NOISY
    ]
    if noisy:
        print(
            f"warning: something else used > {NOISY:.0%} of CPU 0 or 1 in {', '.join(noisy)}; "
            "latency figures of those rounds are inflated (CPU us/delivery is not)"
        )
    return 0


def _brief(result: dict[str, Any]) -> str:
    parts = [f"{result['kb_per_subscriber']:.1f} KB/stream"]
    if "single_p99_ms" in result:
        parts.append(f"single p99 {result['single_p99_ms']:.1f} ms")
    if "deliveries_per_s" in result:
        parts.append(
            f"fan-out {result['deliveries_per_s']:,.0f}/s "
            f"({result['fanout_delivered']}/{result['fanout_expected']}) "
            f"p99 {result['fanout_p99_ms']:.1f} ms, server CPU {result['server_cpu']:.0%}, "
            f"driver CPU {result['driver_cpu']:.0%}, "
            f"CPU0/CPU1 busy {result['cpu0_busy']:.0%}/{result['cpu1_busy']:.0%}, "
            f"others CPU0/CPU1 {result['cpu0_other']:.0%}/{result['cpu1_other']:.0%}"
        )
    if "health_load_p99_ms" in result:
        parts.append(f"/health p99 {result['health_load_p99_ms']:.1f} ms")
    if result["streams_ended_early"] or result["subscribers_seen"] != result.get("n"):
        parts.append(
            f"streams seen by the server {result['subscribers_seen']}, "
            f"ended by the server {result['streams_ended_early']}"
        )
    return "; ".join(parts)
