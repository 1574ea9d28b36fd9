"""/health req/s and p99 at c=1 and c=32, as a ratio to a raw ASGI app on the same listener.

    python -m bench health [--duration 3] [--rounds 3] [--path /health] [--json]

Servers run pinned to CPU 0, the load generator to CPU 1 (when the machine
has two). Baseline and lokid alternate, round by round, so drift on a shared
machine hits both; the medians of the rounds are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import trio

from bench.loadgen import LoadResult, run_load, run_wrk, wrk_available

SERVER_CPU = 0
DRIVER_CPU = 1
TWO_CPUS = {SERVER_CPU, DRIVER_CPU} <= os.sched_getaffinity(0)  # read before the driver pins


def _pin_server() -> None:
    # Not `len(sched_getaffinity(0)) > 1`: the child inherits the driver's pin to CPU 1.
    if TWO_CPUS:
        os.sched_setaffinity(0, {SERVER_CPU})


@contextmanager
def raw_server() -> Iterator[int]:
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.raw_server"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        preexec_fn=_pin_server,
    )
    try:
        assert process.stdout is not None
        yield int(process.stdout.readline())
    finally:
        assert process.stdin is not None
        process.stdin.close()
        process.wait(timeout=10)


@contextmanager
def lokid_server() -> Iterator[int]:
    with tempfile.TemporaryDirectory(prefix="lokid-bench-") as home:
        env = {**os.environ, "LOKI_HOME": home, "LOKI_LOG_LEVEL": "warning"}
        process = subprocess.Popen(
            [sys.executable, "-m", "lokid", "serve", "--port", "0", "--dashboard-port", "0"],
            env=env,
            preexec_fn=_pin_server,
        )
        try:
            yield _wait_for_port(Path(home) / "lokid" / "lokid.sock", process)
        finally:
            process.terminate()
            process.wait(timeout=30)


def _wait_for_port(socket_path: Path, process: subprocess.Popen[bytes]) -> int:
    """The API port of a starting daemon, once it answers `running` on its socket."""
    return int(wait_ready(socket_path, process)["listeners"]["api"].rsplit(":", 1)[1])


def wait_ready(socket_path: Path, process: subprocess.Popen[bytes]) -> dict[str, Any]:
    """The `/api/status` of a starting daemon once it is `running` (30 s at most)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("lokid exited during start-up")
        if socket_path.exists():
            try:
                with httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path))) as client:
                    status = client.get("http://lokid/api/status").json()
                if status["phase"] == "running":
                    return dict(status)
            except httpx.TransportError:
                pass
        time.sleep(0.05)
    raise SystemExit("lokid did not become ready")


def measure(port: int, path: str, concurrency: int, duration: float, driver: str) -> LoadResult:
    if driver == "wrk":
        run_wrk("127.0.0.1", port, path, concurrency=concurrency, duration=1)  # warm-up
        return run_wrk("127.0.0.1", port, path, concurrency=concurrency, duration=duration)
    trio.run(lambda: run_load("127.0.0.1", port, path, concurrency=concurrency, duration=0.5))
    return trio.run(
        lambda: run_load("127.0.0.1", port, path, concurrency=concurrency, duration=duration)
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench health", description=__doc__)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--path", default="/health")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--driver",
        choices=["auto", "wrk", "python"],
        default="auto",
        help="load generator: wrk (Debian package) when installed, else the Python one",
    )
    args = parser.parse_args(argv)
    driver = args.driver
    if driver == "auto":
        driver = "wrk" if wrk_available() else "python"
    if TWO_CPUS:
        os.sched_setaffinity(0, {DRIVER_CPU})

    results: dict[str, dict[int, list[LoadResult]]] = {"raw": {}, "lokid": {}}
    with raw_server() as raw_port, lokid_server() as lokid_port:
        for concurrency in args.concurrency:
            for _ in range(args.rounds):
                for name, port in (("raw", raw_port), ("lokid", lokid_port)):
                    result = measure(port, args.path, concurrency, args.duration, driver)
                    results[name].setdefault(concurrency, []).append(result)

    report: list[dict[str, Any]] = []
    for concurrency in args.concurrency:
        raw = results["raw"][concurrency]
        ours = results["lokid"][concurrency]
        row = {
            "path": args.path,
            "concurrency": concurrency,
            "raw_rps": statistics.median(r.rps for r in raw),
            "lokid_rps": statistics.median(r.rps for r in ours),
            "raw_p99_ms": statistics.median(r.p99 for r in raw),
            "lokid_p99_ms": statistics.median(r.p99 for r in ours),
            "errors": sum(r.errors for r in raw + ours),
            "driver": driver,
        }
        row["rps_ratio"] = row["lokid_rps"] / row["raw_rps"]
        row["p99_ratio"] = row["lokid_p99_ms"] / row["raw_p99_ms"]
        report.append(row)

    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"GET {args.path}: lokid vs a raw ASGI app on the same Hypercorn trio listener")
    print(f"{args.rounds} alternating rounds of {args.duration:g}s; medians; driver: {driver}")
    print(
        f"{'c':>3} {'raw req/s':>10} {'lokid req/s':>12} {'ratio':>6} "
        f"{'raw p99':>9} {'lokid p99':>10} {'ratio':>6} {'errors':>6}"
    )
    for row in report:
        print(
            f"{row['concurrency']:>3} {row['raw_rps']:>10.0f} {row['lokid_rps']:>12.0f} "
            f"{row['rps_ratio']:>6.2f} {row['raw_p99_ms']:>7.2f}ms {row['lokid_p99_ms']:>8.2f}ms "
            f"{row['p99_ratio']:>6.2f} {row['errors']:>6}"
        )
    return 0
