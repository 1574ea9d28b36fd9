"""The board's creates and moves with wrk as the client: lokid's figures without a saturated driver.

Used by `python -m bench board` when Debian's `wrk` is installed. The
peerbench driver is a Python client that, with eight moves in flight, uses
most of its CPU by itself (its p99 against a no-op server is 12-20 ms); wrk
is C and stays far from that, so what it measures is the daemon's.

One round, against a fresh `loki serve` pinned like the peerbench rounds
(wrk pinned to the driver's CPU):

1. one project, then `POST /api/tasks` over one connection for `seconds`
   (each task titled by its number): mean and p99 of a create;
2. the first 1,000 tasks' ids, then `POST /api/tasks/{id}/move` over eight
   connections for `seconds` (a random task, column and position; a
   position past the end means the end, so no move is refused): p50, p99;
3. every task read back: each column numbered 0..n-1 without duplicates.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from bench import peer
from bench.loadgen import run_wrk

COLUMNS = ("backlog", "todo", "in_progress", "review", "done")

CREATE_LUA = """
local project = os.getenv("LOKI_PROJECT")
local n = 0
request = function()
  n = n + 1
  local body = '{"project_id":"' .. project .. '","title":"wrk task ' .. n .. '"}'
  return wrk.format("POST", "/api/tasks", {["Content-Type"] = "application/json"}, body)
end
"""

MOVE_LUA = """
local ids = {}
for line in io.lines(os.getenv("LOKI_TASK_IDS")) do ids[#ids + 1] = line end
local columns = {"backlog", "todo", "in_progress", "review", "done"}
math.randomseed(1)
request = function()
  local id = ids[math.random(#ids)]
  local body = '{"column":"' .. columns[math.random(#columns)] .. '","position":'
    .. math.random(0, 300) .. '}'
  return wrk.format("POST", "/api/tasks/" .. id .. "/move",
    {["Content-Type"] = "application/json"}, body)
end
"""


def run_round(seconds: float) -> dict[str, Any]:
    """One round (module docstring): the figures and the invariant check."""
    prefix = ["taskset", "-c", str(peer.DRIVER_CPU)] if peer.TWO_CPUS else []
    with (
        peer.lokid({}) as (url, _pid),
        tempfile.TemporaryDirectory(prefix="lokid-bench-wrk-") as scratch,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        folder = Path(scratch)
        (folder / "create.lua").write_text(CREATE_LUA)
        (folder / "move.lua").write_text(MOVE_LUA)
        address = urlsplit(url)
        host, port = address.hostname or "127.0.0.1", address.port or 80
        project = client.post("/api/projects", json={"name": "wrk"}).json()["id"]
        created = run_wrk(
            host,
            port,
            "/",
            concurrency=1,
            duration=seconds,
            script=folder / "create.lua",
            env={"LOKI_PROJECT": project},
            prefix=prefix,
        )
        tasks = client.get("/api/tasks", params={"project_id": project, "limit": 1000}).json()
        ids = folder / "ids.txt"
        ids.write_text("".join(f"{task['id']}\n" for task in tasks["tasks"]))
        moved = run_wrk(
            host,
            port,
            "/",
            concurrency=8,
            duration=seconds,
            script=folder / "move.lua",
            env={"LOKI_TASK_IDS": str(ids)},
            prefix=prefix,
        )
        return {
            "create": {
                "n": created.requests,
                "errors": created.errors,
                "mean_ms": created.mean_ms,
                "p99_ms": created.p99_ms,
            },
            "move": {
                "n": moved.requests,
                "errors": moved.errors,
                "p50_ms": moved.p50_ms,
                "p99_ms": moved.p99_ms,
            },
            "invariant": check_columns(client, project),
        }


def check_columns(client: httpx.Client, project: str) -> dict[str, Any]:
    """Every task of `project`, page by page; per column, are positions exactly 0..n-1?"""
    positions: dict[str, list[int]] = {column: [] for column in COLUMNS}
    offset = 0
    while True:
        page = client.get(
            "/api/tasks", params={"project_id": project, "limit": 1000, "offset": offset}
        ).json()
        for task in page["tasks"]:
            positions[task["column"]].append(task["position"])
        offset += len(page["tasks"])
        if not page["tasks"] or offset >= page["total"]:
            break
    dense = all(sorted(found) == list(range(len(found))) for found in positions.values())
    return {"tasks": offset, "dense": dense, "sizes": {c: len(p) for c, p in positions.items()}}


def describe(result: dict[str, Any]) -> str:
    create, move, invariant = result["create"], result["move"], result["invariant"]
    return (
        f"wrk: {create['n']} creates (c=1) mean {create['mean_ms']:.2f} ms"
        f" p99 {create['p99_ms']:.2f} ms; {move['n']} moves (c=8) p50 {move['p50_ms']:.2f}"
        f" p99 {move['p99_ms']:.2f} ms; non-2xx {create['errors'] + move['errors']};"
        f" {invariant['tasks']} tasks, positions dense: {invariant['dense']}"
        f" ({json.dumps(invariant['sizes'])})"
    )
