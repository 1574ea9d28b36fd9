"""Daemon CPU per board move on a fixed board, as a ratio to its CPU per `GET /health`.

`python -m bench board_moves [--rounds 3] [--seconds 8] [--tasks 1000]`

`bench board`'s wrk moves depend on how many tasks its timed create phase
made (a move renumbers its columns), so its figures move from run to run of
the same code. Here each round makes a fresh `loki serve` (pinned like
`bench.peer`), one project with exactly `--tasks` tasks, then with wrk
(pinned to the driver's CPU), for `--seconds` each:

1. `GET /health` at c=8: the baseline, the cheapest request the daemon
   answers, measured in the same daemon;
2. `POST /api/tasks/{id}/move` at c=8 (`bench.board_wrk`'s script: random
   task, column and position).

The daemon's CPU (utime + stime of all its threads, `/proc/<pid>/stat`) is
read around each phase. Printed per round and as medians: moves, p50/p99,
CPU per move, CPU per `/health`, and their ratio (what compares across
machines and hours). For an A/B of two revisions, run it with
`PYTHONPATH=<checkout>` alternating.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from bench import peer
from bench.board_wrk import MOVE_LUA
from bench.loadgen import WrkResult, run_wrk


def daemon_cpu(pid: int) -> float:
    """Seconds of CPU the process used so far (all threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_round(seconds: float, tasks: int) -> dict[str, Any]:
    prefix = ["taskset", "-c", str(peer.DRIVER_CPU)] if peer.TWO_CPUS else []
    with (
        peer.lokid({}) as (url, pid),
        tempfile.TemporaryDirectory(prefix="lokid-bench-moves-") as scratch,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        folder = Path(scratch)
        (folder / "move.lua").write_text(MOVE_LUA)
        project = client.post("/api/projects", json={"name": "moves"}).json()["id"]
        for n in range(tasks):
            client.post("/api/tasks", json={"project_id": project, "title": f"task {n}"})
        page = client.get("/api/tasks", params={"project_id": project, "limit": 1000}).json()
        ids = folder / "ids.txt"
        ids.write_text("".join(f"{task['id']}\n" for task in page["tasks"]))
        address = urlsplit(url)
        host, port = address.hostname or "127.0.0.1", address.port or 80

        def measured(path: str, **options: Any) -> tuple[WrkResult, float]:
            before = daemon_cpu(pid)
            result = run_wrk(
                host, port, path, concurrency=8, duration=seconds, prefix=prefix, **options
            )
            return result, (daemon_cpu(pid) - before) / max(1, result.requests)

        _, health_cpu = measured("/health")
        moves, move_cpu = measured("/", script=folder / "move.lua", env={"LOKI_TASK_IDS": str(ids)})
        return {
            "moves": moves.requests,
            "errors": moves.errors,
            "p50_ms": moves.p50_ms,
            "p99_ms": moves.p99_ms,
            "move_cpu_us": move_cpu * 1e6,
            "health_cpu_us": health_cpu * 1e6,
            "ratio": move_cpu / health_cpu if health_cpu else float("nan"),
        }


def describe(result: dict[str, Any]) -> str:
    return (
        f"{result['moves']} moves (non-2xx {result['errors']}), p50 {result['p50_ms']:.2f}"
        f" p99 {result['p99_ms']:.2f} ms; daemon CPU {result['move_cpu_us']:.0f} us per move,"
        f" {result['health_cpu_us']:.0f} us per /health: ratio {result['ratio']:.2f}"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench board_moves", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--tasks", type=int, default=1000)
    args = parser.parse_args(argv)
    results = []
    for number in range(1, args.rounds + 1):
        result = run_round(args.seconds, args.tasks)
        print(f"round {number}: {describe(result)}", flush=True)
        results.append(result)
    median = {key: statistics.median(r[key] for r in results) for key in results[0]}
    print(f"median: {describe(median)}")
    return 0
