"""The peerbench Dashboard API workloads against a fresh lokid, next to the older figures.

    python -m bench peer WORKLOAD [--rounds 3] [--peerbench PATH] [--json] [-- WORKLOAD ARGS]

WORKLOAD is one of `crud`, `discover`, `registry-tasks`, `ws-fanout`,
`health`. Each round starts a new `loki serve` (temporary LOKI_HOME,
pinned to CPU 0), runs `../shared/peerbench/workloads.py WORKLOAD` pinned
to CPU 1 with `--url` (the dashboard listener) and `--server-pid`, keeps its
JSON line, and stops the daemon. The figures the issue names are printed as
medians of the rounds beside the older implementation's (peerbench/README.md,
measured on this machine kind) and the goal; `--json` prints every round.
`discover` and `registry-tasks` build their synthetic tree once, in a
temporary folder shared by the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.health import wait_ready

REPO = Path(__file__).resolve().parent.parent
PEERBENCH = REPO.parent / "shared" / "peerbench" / "workloads.py"
SERVER_CPU, DRIVER_CPU = 0, 1
TWO_CPUS = {SERVER_CPU, DRIVER_CPU} <= os.sched_getaffinity(0)

Getter = Callable[[dict[str, Any]], float | None]


def getter(*keys: str) -> Getter:
    def get(result: dict[str, Any]) -> float | None:
        value: Any = result
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return float(value) if isinstance(value, (int, float)) else None

    return get


# workload -> [(label, getter, older implementation, goal as (op, value) or None)]
FIGURES: dict[str, list[tuple[str, Getter, str, tuple[str, float] | None]]] = {
    "crud": [
        (
            "1000 sequential POST /api/tasks, mean ms",
            getter("create", "mean_ms"),
            "3.40",
            ("<=", 1.5),
        ),
        (
            "GET /api/tasks?project_id= (1000 tasks), p99 ms",
            getter("list", "p99_ms"),
            "[] returned",
            ("<=", 20.0),
        ),
        ("500 moves at c=8, p99 ms", getter("move", "ok", "p99_ms"), "235", ("<=", 20.0)),
        (
            "moves rejected",
            lambda r: float(r.get("move", {}).get("rejected", {}).get("n", 0)),
            "",
            ("<=", 0.0),
        ),
        (
            "positions broken after the moves (0 = invariant holds)",
            lambda r: _broken(r),
            "6 of 6 runs",
            ("<=", 0.0),
        ),
    ],
    "discover": [
        ("discover 20,000 folders, median ms", getter("median_ms"), "842", None),
        ("projects found (of 200)", getter("found"), "", (">=", 200.0)),
        (
            "/health p99 ms during discover",
            getter("health_probe_during_one_extra_call", "health", "p99_ms"),
            "stalled",
            None,
        ),
    ],
    "registry-tasks": [
        ("GET /api/registry/tasks (100 x 20), p50 ms", getter("get", "p50_ms"), "54", None),
        (
            "GET /api/registry/tasks (100 x 20), p99 ms",
            getter("get", "p99_ms"),
            "101",
            ("<=", 20.0),
        ),
        ("tasks returned (of 2000)", getter("count_returned"), "", None),
    ],
    "ws-fanout": [
        ("clients connected (of 200)", getter("clients_connected"), "60", (">=", 200.0)),
        ("delivery latency p50 ms", getter("latency", "p50_ms"), "10.9", None),
        ("delivery latency p99 ms", getter("latency", "p99_ms"), "75", ("<=", 30.0)),
        (
            "messages received / expected",
            lambda r: _ratio(r, "messages_received", "messages_expected"),
            "",
            (">=", 1.0),
        ),
    ],
    "health": [
        ("GET /health c=1, req/s", lambda r: _wrk(r, 1, "req_per_s"), "2,797", None),
        ("GET /health c=1, p99 ms", lambda r: _wrk(r, 1, "p99_ms"), "0.48", None),
        ("GET /health c=32, req/s", lambda r: _wrk(r, 32, "req_per_s"), "2,555", None),
        ("GET /health c=32, p99 ms", lambda r: _wrk(r, 32, "p99_ms"), "69", None),
    ],
}


def _wrk(result: dict[str, Any], connections: int, key: str) -> float | None:
    for run in result.get("runs", []):
        if run.get("connections") == connections and isinstance(run.get(key), (int, float)):
            return float(run[key])
    return None


def _broken(result: dict[str, Any]) -> float | None:
    check = result.get("invariant_after_moves")
    if not isinstance(check, dict):
        return None
    return 0.0 if check.get("invariant_held") else 1.0


def _ratio(result: dict[str, Any], top: str, bottom: str) -> float | None:
    a, b = result.get(top), result.get(bottom)
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def _pin_server() -> None:
    if TWO_CPUS:
        os.sched_setaffinity(0, {SERVER_CPU})


@contextmanager
def lokid(env_extra: dict[str, str]) -> Iterator[tuple[str, int]]:
    """A fresh daemon: (dashboard URL, pid)."""
    with tempfile.TemporaryDirectory(prefix="lokid-bench-peer-") as home:
        env = {**os.environ, "LOKI_HOME": home, "LOKI_LOG_LEVEL": "warning", **env_extra}
        process = subprocess.Popen(
            [sys.executable, "-m", "lokid", "serve", "--port", "0", "--dashboard-port", "0"],
            env=env,
            preexec_fn=_pin_server,
        )
        try:
            status = wait_ready(Path(home) / "lokid" / "lokid.sock", process)
            yield str(status["listeners"]["dashboard"]), process.pid
        finally:
            process.terminate()
            process.wait(timeout=60)


@contextmanager
def null_server() -> Iterator[tuple[str, int]]:
    """`bench.null_server` (the driver's floor), pinned like the daemon: (URL, pid)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.null_server"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        preexec_fn=_pin_server,
    )
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        yield f"http://127.0.0.1:{port}", process.pid
    finally:
        process.kill()
        process.wait(timeout=60)


def run_round(
    workload: str, peerbench: Path, extra: list[str], tree: Path | None, *, floor: bool = False
) -> dict[str, Any]:
    """One run of the driver against a fresh daemon, or (`floor`) against `null_server`."""
    env_extra: dict[str, str] = {}
    if tree is not None:
        env_extra["HOME"] = str(tree)  # discovery's default roots stay inside the tree
    with null_server() if floor else lokid(env_extra) as (url, pid):
        argv = [sys.executable, str(peerbench), workload, "--url", url, "--server-pid", str(pid)]
        if tree is not None:
            argv += ["--root", str(tree / "tree")]
        if TWO_CPUS:
            argv = ["taskset", "-c", str(DRIVER_CPU), *argv]
        done = subprocess.run(
            [*argv, *extra], capture_output=True, text=True, timeout=1800, check=False
        )
    if done.returncode != 0:
        raise SystemExit(f"peerbench {workload} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"peerbench {workload} printed no result:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _verdict(value: float | None, goal: tuple[str, float] | None) -> str:
    if goal is None or value is None:
        return ""
    op, target = goal
    met = value <= target if op == "<=" else value >= target
    return f"{op} {target:g}: {'met' if met else 'MISSED'}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench peer", description=__doc__)
    parser.add_argument("workload", choices=sorted(FIGURES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--peerbench", type=Path, default=PEERBENCH)
    parser.add_argument("--json", action="store_true")
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.extra = extra
    if not args.peerbench.exists():
        raise SystemExit(f"no peerbench driver at {args.peerbench} (pass --peerbench PATH)")
    tree: Path | None = None
    if args.workload in ("discover", "registry-tasks"):
        tree = Path(tempfile.mkdtemp(prefix="lokid-bench-tree-"))
    try:
        rounds = []
        for number in range(args.rounds):
            rounds.append(run_round(args.workload, args.peerbench, args.extra, tree))
            print(f"round {number + 1} done", file=sys.stderr)
    finally:
        if tree is not None:
            shutil.rmtree(tree, ignore_errors=True)
    if args.json:
        print(json.dumps({"workload": args.workload, "rounds": rounds}))
        return 0
    print(f"peerbench {args.workload}, {args.rounds} rounds, medians (older: peerbench/README.md)")
    print_figures(args.workload, rounds)
    return 0


def print_figures(workload: str, rounds: list[dict[str, Any]]) -> None:
    """The issue's figures for `workload`: medians of the rounds, the older's, the goal."""
    print(f"{'':<58} {'lokid':>10} {'older':>12}  goal")
    for label, get, older, goal in FIGURES[workload]:
        value = median([get(r) for r in rounds])
        shown = "n/a" if value is None else f"{value:,.2f}"
        print(f"{label:<58} {shown:>10} {older:>12}  {_verdict(value, goal)}")
