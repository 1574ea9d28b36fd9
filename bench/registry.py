"""Registry discovery vs a plain scandir walk, and the warm task aggregation (issue 6 goals).

    python -m bench registry [--rounds 5] [--reps 200] [--dir PATH] [--json]
                             [--dirs 20000] [--depth 4] [--fanout 10] [--projects 200]
                             [--tasks-per-project 20] [--register 100]

Everything runs in this process, on peerbench's synthetic tree
(`../shared/peerbench/workloads.py`, `build_tree`: `--dirs` folders,
`--depth` levels, `--projects` Loki projects with `--tasks-per-project`
tasks each), built in a temporary folder (under `--dir`) and removed after.

1. discover - `lokid.registry.discover(tree, depth)` against a plain
   `os.scandir` walk of the same tree (every folder, nothing skipped, no
   depth bound: the cheapest walk that lists it all), alternating, `--rounds`
   times each, in this run; the goal is a median ratio <= 1.5. Also shown:
   the same plain walk with discovery's rules (hidden folders skipped, depth
   bound) but no project detection, to separate the cost of the rules from
   the cost of the bookkeeping.
2. tasks - `lokid.registry.aggregate_tasks` over the first `--register`
   projects with a warm `FileCache`: `--reps` calls with the default page
   (100) and with `limit=1000`: p50/p99. The files are first let age past
   `RACY_SECONDS`, so "warm" means what it means an hour after a write.
3. http - the same through the routes, in memory (no sockets): a `Surface`
   with a running `StoreActor` and `RegistryScanner`, the projects
   registered with `POST /api/registry/projects`, then `GET
   /api/registry/tasks` `--reps` times (p50/p99; goal p99 <= 20 ms) and
   `GET /api/registry/discover` once while a probe task measures how late
   the trio loop wakes up (`sleep(1 ms)` overshoot): the walk runs in a
   worker thread, so the loop's lag stays small.

The HTTP-level runs against a live daemon (peerbench `discover` and
`registry-tasks`, with `/health` probed during discover) are `python -m
bench peer discover` and `python -m bench peer registry-tasks`.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from lokid import registry
from lokid.actors.registry_scanner import RegistryScanner
from lokid.actors.store import StoreActor
from lokid.http.gate import Gate
from lokid.http.registry import install_registry
from lokid.http.surface import Surface

REPO = Path(__file__).resolve().parent.parent
PEERBENCH = REPO.parent / "shared" / "peerbench" / "workloads.py"
GOALS = {"discover_ratio": 1.5, "tasks_p99_ms": 20.0}


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile, as peerbench computes it."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(q / 100.0 * len(ordered)) - 1))
    return ordered[k]


def summary(samples_s: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in samples_s]
    return {
        "n": len(ms),
        "p50_ms": round(pct(ms, 50), 3),
        "p99_ms": round(pct(ms, 99), 3),
        "max_ms": round(max(ms), 3),
    }


# -- the tree -----------------------------------------------------------------------------


def build_tree(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """peerbench's `build_tree` (imported from its file: the very same tree)."""
    if not PEERBENCH.exists():
        raise SystemExit(f"peerbench not found at {PEERBENCH}")
    spec = importlib.util.spec_from_file_location("peerbench_workloads", PEERBENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    params = argparse.Namespace(
        root=str(root),
        dirs=args.dirs,
        depth=args.depth,
        fanout=args.fanout,
        projects=args.projects,
        tasks_per_project=args.tasks_per_project,
    )
    manifest: dict[str, Any] = module.build_tree(params)
    return manifest


# -- 1. discover vs plain walks -----------------------------------------------------------


def plain_walk(root: str) -> int:
    """The baseline: list every folder below `root` with os.scandir, nothing else."""
    stack = [root]
    folders = 0
    while stack:
        path = stack.pop()
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
        folders += 1
    return folders


def ruled_walk(root: str, depth: int) -> int:
    """The baseline with discovery's rules: hidden folders skipped, `depth` bound."""
    stack = [(root, 0)]
    folders = 0
    while stack:
        path, level = stack.pop()
        with os.scandir(path) as entries:
            for entry in entries:
                if level < depth and entry.name[0] != "." and entry.is_dir(follow_symlinks=False):
                    stack.append((entry.path, level + 1))
        folders += 1
    return folders


def bench_discover(root: str, depth: int, rounds: int, projects: int) -> dict[str, Any]:
    plain_walk(root)  # warm the dentry cache once: every run then reads from memory
    times: dict[str, list[float]] = {"plain": [], "ruled": [], "discover": []}
    found = folders = 0
    for number in range(rounds):
        order = ["plain", "ruled", "discover"]
        if number % 2:
            order.reverse()  # drift hits both sides
        for kind in order:
            started = time.perf_counter()
            if kind == "plain":
                plain_walk(root)
            elif kind == "ruled":
                ruled_walk(root, depth)
            else:
                result = registry.discover([root], depth)
                found, folders = len(result.projects), result.folders
            times[kind].append(time.perf_counter() - started)
    med = {kind: statistics.median(values) * 1000 for kind, values in times.items()}
    return {
        "plain_ms": round(med["plain"], 2),
        "ruled_ms": round(med["ruled"], 2),
        "discover_ms": round(med["discover"], 2),
        "ratio": round(med["discover"] / med["plain"], 3),
        "ratio_to_ruled": round(med["discover"] / med["ruled"], 3),
        "found": found,
        "expected": projects,
        "folders_listed": folders,
        "rounds": rounds,
    }


# -- 2. the aggregation -------------------------------------------------------------------


def age_past_racy(paths: list[str]) -> float:
    """Wait until every queue file is older than RACY_SECONDS; the seconds waited."""
    newest = max(os.stat(p + "/.loki/queue/pending.json").st_mtime for p in paths)
    wait = max(0.0, newest + registry.RACY_SECONDS + 0.1 - time.time())
    time.sleep(wait)
    return wait


def bench_tasks(paths: list[str], reps: int) -> dict[str, Any]:
    refs = [registry.ProjectRef(registry.registry_id(p), os.path.basename(p), p) for p in paths]
    cache = registry.FileCache()
    started = time.perf_counter()
    cold = registry.aggregate_tasks(refs, cache=cache)
    cold_ms = (time.perf_counter() - started) * 1000
    out: dict[str, Any] = {"cold_ms": round(cold_ms, 2), "total": cold["total"]}
    for limit in (100, 1000):
        samples = []
        for _ in range(reps):
            started = time.perf_counter()
            answer = registry.aggregate_tasks(refs, limit=limit, cache=cache)
            samples.append(time.perf_counter() - started)
        assert answer["total"] == cold["total"] and not answer["errors"], answer["errors"][:3]
        encode = time.perf_counter()
        body = json.dumps(answer)
        out[f"limit_{limit}"] = {
            **summary(samples),
            "returned": len(answer["tasks"]),
            "json_ms": round((time.perf_counter() - encode) * 1000, 3),
            "bytes": len(body),
        }
    out["cache"] = _stats(cache)
    return out


def _stats(cache: registry.FileCache) -> dict[str, int]:
    stats = cache.statistics()
    return {"entries": stats.entries, "hits": stats.hits, "misses": stats.misses}


# -- 3. through the routes, in memory -----------------------------------------------------


async def asgi(app: Any, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    """One request through an ASGI app in memory (like tests/asgi.py)."""
    path, _, query = path.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", b"bench"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 57374),
    }
    events = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if events:
            return events.pop(0)
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, data


async def bench_http(
    folder: Path, root: str, paths: list[str], depth: int, reps: int
) -> dict[str, Any]:
    store = StoreActor(folder / "lokid.db")
    scanner = RegistryScanner(store, loki_home=folder, initial_sync=False)
    out: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await nursery.start(scanner.run)
        surface = Surface("bench", "0")
        install_registry(surface, scanner, Gate())
        started = time.perf_counter()
        for path in paths:
            status, _ = await asgi(
                surface, "POST", "/api/registry/projects", json.dumps({"path": path}).encode()
            )
            assert status == 201, status
        out["register_ms_each"] = round((time.perf_counter() - started) * 1000 / len(paths), 3)
        for query in ("", "?limit=1000"):
            await asgi(surface, "GET", "/api/registry/tasks" + query)  # warm
            samples = []
            for _ in range(reps):
                started = time.perf_counter()
                status, body = await asgi(surface, "GET", "/api/registry/tasks" + query)
                samples.append(time.perf_counter() - started)
                assert status == 200
            answer = json.loads(body)
            out["tasks" + (query.replace("?", "_").replace("=", "_") or "")] = {
                **summary(samples),
                "returned": len(answer["tasks"]),
                "total": answer["total"],
            }
        lags: list[float] = []
        done = trio.Event()

        async def probe() -> None:
            while not done.is_set():
                before = trio.current_time()
                await trio.sleep(0.001)
                lags.append(max(0.0, trio.current_time() - before - 0.001))

        nursery.start_soon(probe)
        await trio.sleep(0.05)
        baseline = len(lags)
        started = time.perf_counter()
        status, body = await asgi(
            surface, "GET", f"/api/registry/discover?roots={root}&depth={depth}"
        )
        took = time.perf_counter() - started
        done.set()
        assert status == 200
        during = lags[baseline:] or [0.0]
        out["discover"] = {
            "ms": round(took * 1000, 2),
            "found": json.loads(body)["total"],
            "loop_lag_samples": len(during),
            "loop_lag_p50_ms": round(pct(during, 50) * 1000, 3),
            "loop_lag_p99_ms": round(pct(during, 99) * 1000, 3),
            "loop_lag_max_ms": round(max(during) * 1000, 3),
        }
        nursery.cancel_scope.cancel()
    return out


# -- main ---------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench registry", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5, help="discover/walk runs each")
    parser.add_argument("--reps", type=int, default=200, help="aggregations per measurement")
    parser.add_argument("--dir", help="parent of the temporary folder (default: the system's)")
    parser.add_argument("--dirs", type=int, default=20000)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--fanout", type=int, default=10)
    parser.add_argument("--projects", type=int, default=200)
    parser.add_argument("--tasks-per-project", type=int, default=20)
    parser.add_argument("--register", type=int, default=100, help="projects aggregated")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="lokid-bench-registry-", dir=args.dir))
    try:
        tree = build_tree(folder / "tree", args)
        root = tree["root"]
        paths = tree["projects"][: args.register]
        print(f"tree: {tree['folders']} folders in {folder}", file=sys.stderr)
        discover = bench_discover(root, args.depth, args.rounds, len(tree["projects"]))
        waited = age_past_racy(paths)
        tasks = bench_tasks(paths, args.reps)
        http = trio.run(functools.partial(bench_http, folder, root, paths, args.depth, args.reps))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result = {
        "args": vars(args),
        "where": str(folder),
        "discover": discover,
        "tasks": {**tasks, "aged_s": round(waited, 2)},
        "http": http,
        "goals": GOALS,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    report(result, args)
    return 0


def _verdict(value: float, goal: float) -> str:
    return f"<= {goal:g} {'met' if value <= goal else 'MISSED'}"


def report(result: dict[str, Any], args: argparse.Namespace) -> None:
    d, t, h = result["discover"], result["tasks"], result["http"]
    print(
        f"registry: {args.dirs} folders, depth {args.depth}, {args.projects} projects; "
        f"{args.register} projects x {args.tasks_per_project} tasks aggregated"
    )
    rows = [
        ("plain os.scandir walk, median ms", f"{d['plain_ms']:.1f}", ""),
        ("  same, with discovery's rules, median ms", f"{d['ruled_ms']:.1f}", ""),
        ("discover (in process), median ms", f"{d['discover_ms']:.1f}", ""),
        ("discover / plain walk", f"{d['ratio']:.2f}", _verdict(d["ratio"], 1.5)),
        ("projects found", f"{d['found']} of {d['expected']}", ""),
        ("aggregate, cold, ms", f"{t['cold_ms']:.1f}", ""),
        ("aggregate warm (page 100), p50 / p99 ms",
         f"{t['limit_100']['p50_ms']:.2f} / {t['limit_100']['p99_ms']:.2f}", ""),
        ("aggregate warm (limit 1000), p50 / p99 ms",
         f"{t['limit_1000']['p50_ms']:.2f} / {t['limit_1000']['p99_ms']:.2f}", ""),
        ("GET /api/registry/tasks in memory, p50 / p99 ms",
         f"{h['tasks']['p50_ms']:.2f} / {h['tasks']['p99_ms']:.2f}",
         _verdict(h["tasks"]["p99_ms"], 20.0)),
        ("  ?limit=1000, p50 / p99 ms",
         f"{h['tasks_limit_1000']['p50_ms']:.2f} / {h['tasks_limit_1000']['p99_ms']:.2f}",
         _verdict(h["tasks_limit_1000"]["p99_ms"], 20.0)),
        ("GET /api/registry/discover in memory, ms", f"{h['discover']['ms']:.1f}", ""),
        ("  trio loop lag during it, p99 / max ms",
         f"{h['discover']['loop_lag_p99_ms']:.2f} / {h['discover']['loop_lag_max_ms']:.2f}", ""),
    ]  # fmt: skip
    width = max(len(label) for label, _, _ in rows)
    for label, value, goal in rows:
        print(f"{label:<{width}}  {value:>16}  {goal}".rstrip())
