"""The Kanban board (issue 6): peerbench `crud` against a fresh lokid, beside the older figures.

    python -m bench board [--rounds 3] [--peerbench PATH] [--json] [--no-wrk] [-- CRUD ARGS]

Each round is a `bench.peer` round: a new `loki serve` (temporary LOKI_HOME,
ports 0, pinned to CPU 0 when the machine has two) and
`../shared/peerbench/workloads.py crud --url <dashboard> --server-pid <pid>`
pinned to CPU 1 (`taskset -c 1`): one project, 1,000 sequential
`POST /api/tasks`, 200 `GET /api/tasks?project_id=...&limit=1000` (all
1,000 tasks in each answer; the driver's default query would get the first
page of 100), 500 `POST /api/tasks/{id}/move` over 8 connections (random
column, random position), then every task read back and each column's
positions checked.

Each round also runs the driver, with the same arguments and `--verify none`,
against `bench.null_server` (a no-op server with fixed answers of the same
size, pinned like the daemon): the driver's own cost on this machine, which
no server can remove from a figure.

When Debian's `wrk` is installed (and without `--no-wrk`), each round also
runs `bench.board_wrk`: creates (c=1) and moves (c=8) against a fresh
daemon with wrk as the client, which, unlike the Python driver, is not
saturated by eight requests in flight.

Printed: the issue's figures as medians of the rounds, next to the older
implementation's (peerbench/README.md, this machine kind) and the goal; the
driver's floor for the same figures and what is left of each for lokid; then,
per round, the invariant check: tasks seen, columns, duplicates, gaps, and
tasks whose column differs from the driver's last successful move (0: no
move lost). `--json` prints every round's raw result.

The driver needs httpx (in the venv); `websockets` only for ws-fanout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench import board_wrk, peer
from bench.loadgen import wrk_available

MAX_SECONDS = 900
WRK_SECONDS = 2
LIST_QUERY = "project_id={pid}&limit=1000"  # every one of the 1,000 tasks, not the default page


def invariant_line(result: dict[str, Any]) -> str:
    """One round's position check, in words."""
    check = result.get("invariant_after_moves")
    if not isinstance(check, dict):
        return "no invariant check (the driver did not read the tasks back)"
    columns = check.get("columns", {})
    duplicates = sum(c.get("duplicate_positions", 0) for c in columns.values())
    gaps = sum(c.get("missing_positions", 0) for c in columns.values())
    sizes = ", ".join(f"{name} {c.get('n')}" for name, c in sorted(columns.items()))
    held = "held" if check.get("invariant_held") else "BROKEN"
    return (
        f"invariant {held}: {check.get('tasks_seen')} tasks seen via {check.get('via')} "
        f"({sizes}); duplicates {duplicates}, gaps {gaps}, "
        f"column differs from the last move {check.get('column_mismatch_vs_driver')}"
    )


FLOOR_FIGURES = (
    ("1000 sequential POST /api/tasks, mean ms", ("create", "mean_ms")),
    ("GET /api/tasks?project_id= (1000 tasks), p99 ms", ("list", "p99_ms")),
    ("500 moves at c=8, p99 ms", ("move", "ok", "p99_ms")),
)


def print_floor(rounds: list[dict[str, Any]], floors: list[dict[str, Any]]) -> None:
    """The same figures from the driver against `bench.null_server`: what the driver costs
    by itself, and what is left of each figure for lokid."""
    print()
    print(f"{'driver floor (no-op server, same run)':<58} {'floor':>10} {'lokid-floor':>12}")
    for label, keys in FLOOR_FIGURES:
        get = peer.getter(*keys)
        floor = peer.median([get(r) for r in floors])
        value = peer.median([get(r) for r in rounds])
        left = "n/a" if floor is None or value is None else f"{value - floor:,.2f}"
        shown = "n/a" if floor is None else f"{floor:,.2f}"
        print(f"{label:<58} {shown:>10} {left:>12}")


def print_wrk(results: list[dict[str, Any]]) -> None:
    """The creates and moves again with wrk as the client (`bench.board_wrk`)."""
    print()
    print(
        f"{'the same with wrk as the client (' + str(WRK_SECONDS) + ' s each)':<58} {'lokid':>10}"
    )
    for label, keys in (
        ("sequential POST /api/tasks (c=1), mean ms", ("create", "mean_ms")),
        ("sequential POST /api/tasks (c=1), p99 ms", ("create", "p99_ms")),
        ("moves at c=8, p50 ms", ("move", "p50_ms")),
        ("moves at c=8, p99 ms", ("move", "p99_ms")),
    ):
        value = peer.median([peer.getter(*keys)(r) for r in results])
        print(f"{label:<58} {'n/a' if value is None else f'{value:,.2f}':>10}")
    for number, result in enumerate(results, 1):
        print(f"wrk round {number}: {board_wrk.describe(result)}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench board", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--peerbench", type=Path, default=peer.PEERBENCH)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--no-wrk", action="store_true", help="skip the rounds with wrk")
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if not args.peerbench.exists():
        raise SystemExit(f"no peerbench driver at {args.peerbench} (pass --peerbench PATH)")
    if "--list-query" not in extra:
        extra = ["--list-query", LIST_QUERY, *extra]
    rounds = []
    floors = []
    wrk_rounds = []
    crud_args = ["--max-seconds", str(MAX_SECONDS), *extra]
    for number in range(args.rounds):
        rounds.append(peer.run_round("crud", args.peerbench, crud_args, None))
        floor_args = [*crud_args, "--verify", "none"]
        floors.append(peer.run_round("crud", args.peerbench, floor_args, None, floor=True))
        if wrk_available() and not args.no_wrk:
            wrk_rounds.append(board_wrk.run_round(WRK_SECONDS))
        print(f"round {number + 1} done", file=sys.stderr)
    if args.json:
        print(
            json.dumps({"workload": "crud", "rounds": rounds, "floors": floors, "wrk": wrk_rounds})
        )
        return 0
    pinned = "server CPU 0, driver CPU 1" if peer.TWO_CPUS else "not pinned (one CPU)"
    print(f"board: peerbench crud, {args.rounds} rounds, medians; {pinned}")
    peer.print_figures("crud", rounds)
    print_floor(rounds, floors)
    if wrk_rounds:
        print_wrk(wrk_rounds)
    for number, result in enumerate(rounds, 1):
        create = result.get("create", {})
        moves = result.get("move", {}).get("ok", {})
        listed = result.get("list", {})
        print(
            f"round {number}: create mean {create.get('mean_ms')} ms p99 {create.get('p99_ms')} ms;"
            f" list p99 {listed.get('p99_ms')} ms ({listed.get('items_returned')} tasks"
            f" per answer, {listed.get('bytes')} bytes);"
            f" move p50 {moves.get('p50_ms')} p99 {moves.get('p99_ms')} ms;"
            f" {invariant_line(result)}"
        )
    return 0
