"""Durable audit appends, one at a time and with group commit, vs raw fsync/s on the same disk.

    python -m bench audit [--seconds 3] [--concurrency 256] [--rounds 3]
                          [--dir PATH] [--allow-tmpfs] [--json]

Everything runs in this process, in a temporary folder on the same file
system as the repository (checked against /proc/mounts and printed; a tmpfs
or ramfs is refused, since fsync there costs nothing). Each round measures,
each for `--seconds`:

1. fsync       - the baseline: write 4 KiB in place in a 1 MiB file and
                 `os.fsync` it, in a loop on one thread: the cheapest durable
                 write this disk does (a WAL that is reused after a
                 checkpoint is written in place too). Also shown: 4 KiB
                 appended per fsync (the file grows: metadata is synced too).
2. sqlite      - for orientation: one connection (WAL, synchronous=FULL),
                 one audit-sized INSERT + COMMIT at a time, no trio.
3. store       - for orientation: `StoreActor.write` of one small row at a
                 time (the floor of any durable write through lokid).
4. sequential  - `AuditWriter.record` (what the gate calls for every
                 mutating request: `append` without building the entry's
                 record) one at a time: appends/s and the latency of each
                 append (what a mutating request waits).
5. concurrent  - `--concurrency` tasks appending in a loop (group commit):
                 appends/s, per-append latency, entries per commit.
6. verify      - `verify_store` over everything written (entries/s), the
                 cost of `chain_valid` in the summary and `loki audit verify`.
7. request     - a mutating request (POST, in-memory ASGI, through a
                 `Surface` and its `Gate`) one at a time, with the audit
                 writer and without it, alternating in blocks: the added
                 latency per mutating request is the difference of the p99s.

Goals (issue 5): sequential >= 3,000/s, concurrent >= 50,000/s, added latency
per append p99 <= 2 ms; reported with the ratio to fsync/s of the same
round. The printed figures are medians of the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import sqlite_utils
import trio

from lokid.actors.audit_writer import AuditWriter, verify_store
from lokid.actors.store import StoreActor
from lokid.daemon import tune_collector
from lokid.http.gate import Gate
from lokid.http.surface import Surface

REPO = pathlib.Path(__file__).resolve().parent.parent
MEMORY_FILE_SYSTEMS = {"tmpfs", "ramfs", "devtmpfs"}

GOALS = {"sequential": 3_000.0, "concurrent": 50_000.0, "latency_p99_ms": 2.0}
REQUEST_BLOCK = 200  # requests per block; audited and plain blocks alternate


# -- where ------------------------------------------------------------------------------


def mount_of(path: pathlib.Path) -> tuple[str, str, str]:
    """(mount point, device, file system type) of `path`, from /proc/mounts."""
    best = ("/", "?", "?")
    resolved = str(path.resolve())
    with open("/proc/mounts") as mounts:
        for line in mounts:
            device, point, kind = line.split()[:3]
            point = point.replace("\\040", " ")
            inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best[0]):
                best = (point, device, kind)
    return best


def choose_folder(requested: str | None, allow_tmpfs: bool) -> tuple[pathlib.Path, str]:
    """A fresh folder on the repository's file system; and a line saying where it is."""
    if requested is not None:
        parent = pathlib.Path(requested)
    else:
        parent = pathlib.Path(tempfile.gettempdir())
        same_device = os.stat(parent).st_dev == os.stat(REPO).st_dev
        if not same_device or mount_of(parent)[2] in MEMORY_FILE_SYSTEMS:
            parent = REPO  # the temp folder is elsewhere: use the repository's own disk
    point, device, kind = mount_of(parent)
    if kind in MEMORY_FILE_SYSTEMS and not allow_tmpfs:
        raise SystemExit(f"{parent} is on {kind} ({point}): fsync costs nothing there")
    folder = pathlib.Path(tempfile.mkdtemp(prefix="lokid-bench-audit-", dir=parent))
    repo_point, repo_device, _ = mount_of(REPO)
    same = "same file system as the repository" if repo_point == point else "NOT the repo's disk"
    return folder, f"{folder}: {kind} on {device} mounted at {point} ({same}, {repo_device})"


# -- measurements ---------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def timed_loop(seconds: float, step: Callable[[], None]) -> tuple[int, float, list[float]]:
    latencies: list[float] = []
    started = time.perf_counter()
    deadline = started + seconds
    while (now := time.perf_counter()) < deadline:
        step()
        latencies.append(time.perf_counter() - now)
    return len(latencies), time.perf_counter() - started, latencies


def measure_fsync(folder: pathlib.Path, seconds: float, *, append: bool) -> dict[str, float]:
    """4 KiB written and fsync'd per step: in place in a 1 MiB file, or appended."""
    path = folder / "fsync.bin"
    block = os.urandom(4096)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else 0), 0o600)
    try:
        if not append:
            os.write(fd, block * 256)
            os.fsync(fd)
        offsets = iter(range(10**12))

        def step() -> None:
            if append:
                os.write(fd, block)
            else:
                os.pwrite(fd, block, next(offsets) % 256 * 4096)
            os.fsync(fd)

        count, elapsed, latencies = timed_loop(seconds, step)
    finally:
        os.close(fd)
        path.unlink()
    return rates(count, elapsed, latencies)


def measure_sqlite(folder: pathlib.Path, seconds: float) -> dict[str, float]:
    path = folder / "raw.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute(
        "CREATE TABLE audit_log (id INTEGER PRIMARY KEY, timestamp TEXT, actor TEXT,"
        " action TEXT, resource TEXT, method TEXT, path TEXT, status INTEGER, ip TEXT,"
        " details TEXT, prev_hash TEXT, hash TEXT)"
    )
    conn.execute("CREATE INDEX a ON audit_log (timestamp, id)")
    conn.execute("CREATE INDEX b ON audit_log (action, id)")
    row = (
        "2026-11-28T12:00:00.000Z",
        "tok-1",
        "task.move",
        "task-1",
        "POST",
        "/api/tasks/task-1/move",
        200,
        "127.0.0.1",
        '{"column":"done"}',
        "0" * 64,
        "f" * 64,
    )
    ids = iter(range(1, 10**9))

    def step() -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO audit_log VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", (next(ids), *row))
        conn.execute("COMMIT")

    try:
        count, elapsed, latencies = timed_loop(seconds, step)
    finally:
        conn.close()
    return rates(count, elapsed, latencies)


def rates(count: int, elapsed: float, latencies: list[float]) -> dict[str, float]:
    return {
        "per_s": count / elapsed,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "count": count,
    }


async def measure_store(folder: pathlib.Path, seconds: float) -> dict[str, float]:
    store = StoreActor(folder / "store.db")
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        latencies: list[float] = []
        n = 0

        def write(db: sqlite_utils.Database) -> None:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('bench', ?)", [n])

        started = time.perf_counter()
        deadline = started + seconds
        while (now := time.perf_counter()) < deadline:
            n += 1
            await store.write(write)
            latencies.append(time.perf_counter() - now)
        elapsed = time.perf_counter() - started
        nursery.cancel_scope.cancel()
    return rates(len(latencies), elapsed, latencies)


async def measure_audit(
    folder: pathlib.Path, seconds: float, concurrency: int
) -> dict[str, dict[str, float]]:
    store = StoreActor(folder / "audit.db")
    writer = AuditWriter(store)
    results: dict[str, dict[str, float]] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await nursery.start(writer.run)

        async def append(n: int) -> None:
            await writer.record(
                actor=f"tok-{n % 50}",
                action="task.move",
                resource=f"task-{n}",
                method="POST",
                path=f"/api/tasks/task-{n}/move",
                status=200,
                ip="127.0.0.1",
                details={"column": "done", "position": n % 10},
            )

        for _ in range(200):  # warm-up: imports, caches, the first WAL pages
            await append(0)

        for name, tasks in (("sequential", 1), ("concurrent", concurrency)):
            latencies: list[float] = []
            batches_before = writer.statistics().batches
            appended_before = writer.statistics().appended
            deadline = time.perf_counter() + seconds

            started = time.perf_counter()
            async with trio.open_nursery() as workers:
                for worker in range(tasks):
                    workers.start_soon(append_loop, append, worker, tasks, latencies, deadline)
            elapsed = time.perf_counter() - started
            stats = writer.statistics()
            results[name] = rates(len(latencies), elapsed, latencies)
            commits = stats.batches - batches_before
            results[name]["per_commit"] = (stats.appended - appended_before) / max(1, commits)

        started = time.perf_counter()
        report = await store.read(verify_store)
        elapsed = time.perf_counter() - started
        if not report.valid:
            raise SystemExit(f"the chain the benchmark wrote does not verify: {report.message}")
        results["verify"] = {"per_s": report.entries_checked / elapsed, "count": elapsed}
        nursery.cancel_scope.cancel()
    return results


async def measure_requests(folder: pathlib.Path, seconds: float) -> dict[str, dict[str, float]]:
    """p50/p99 of one POST at a time through a Surface: with the audit writer, and without."""
    store = StoreActor(folder / "requests.db")
    writer = AuditWriter(store)
    latencies: dict[str, list[float]] = {"audited": [], "plain": []}
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await nursery.start(writer.run)
        apps = {"audited": request_surface(Gate(audit=writer)), "plain": request_surface(Gate())}
        for _ in range(100):  # warm-up
            for app in apps.values():
                await post(app, 0)
        deadline = time.perf_counter() + seconds
        n = 0
        while time.perf_counter() < deadline:
            for kind, app in apps.items():
                for _ in range(REQUEST_BLOCK):
                    n += 1
                    started = time.perf_counter()
                    await post(app, n)
                    latencies[kind].append(time.perf_counter() - started)
        nursery.cancel_scope.cancel()
    return {kind: rates(len(values), sum(values), values) for kind, values in latencies.items()}


def request_surface(gate: Gate) -> Surface:
    surface = Surface("bench", "0")
    surface.gate = gate

    @surface.route(
        "POST", "/api/sessions/{id}/stop", "stop", responses={200: "ok"}, requires="write"
    )
    async def stop(id: str) -> dict[str, Any]:
        return {"id": id, "status": "stopping"}

    return surface


async def post(app: Surface, n: int) -> None:
    """One `POST /api/sessions/s-<n>/stop` over in-memory ASGI; checks the 200."""
    path = f"/api/sessions/s-{n}/stop"
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"bench"), (b"content-length", b"0")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8420),
        "extensions": {},
    }
    status: list[int] = []
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(scope, receive, send)
    if status != [200]:
        raise SystemExit(f"the benchmark request was answered {status}")


async def append_loop(
    append: Callable[[int], Awaitable[None]],
    first: int,
    step: int,
    latencies: list[float],
    deadline: float,
) -> None:
    n = first
    while (now := time.perf_counter()) < deadline:
        await append(n)
        latencies.append(time.perf_counter() - now)
        n += step


def one_round(folder: pathlib.Path, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    work = pathlib.Path(tempfile.mkdtemp(prefix="round-", dir=folder))
    try:
        result = {"fsync": measure_fsync(work, args.seconds, append=False)}
        result["fsync_append"] = measure_fsync(work, args.seconds, append=True)
        result["sqlite"] = measure_sqlite(work, args.seconds)
        result["store"] = trio.run(measure_store, work, args.seconds)
        result.update(trio.run(measure_audit, work, args.seconds, args.concurrency))
        requests = trio.run(measure_requests, work, args.seconds)
        result["request_audited"] = requests["audited"]
        result["request_plain"] = requests["plain"]
        return result
    finally:
        shutil.rmtree(work)


# -- report ------------------------------------------------------------------------------


def median(rounds: list[dict[str, dict[str, float]]], kind: str, key: str) -> float:
    return statistics.median(r[kind][key] for r in rounds)


def summarize(rounds: list[dict[str, dict[str, float]]]) -> list[dict[str, Any]]:
    fsync = median(rounds, "fsync", "per_s")
    rows: list[dict[str, Any]] = []
    for kind, label in (
        ("fsync", "raw fsync, 4 KiB in place: the baseline"),
        ("fsync_append", "raw fsync, 4 KiB appended"),
        ("sqlite", "SQLite INSERT+COMMIT, one thread"),
        ("store", "StoreActor.write, one at a time"),
        ("sequential", "audit append, one at a time"),
        ("concurrent", "audit append, group commit"),
    ):
        per_s = median(rounds, kind, "per_s")
        row: dict[str, Any] = {
            "kind": kind,
            "label": label,
            "per_s": per_s,
            "ratio": per_s / fsync,
            "p50_ms": median(rounds, kind, "p50_ms"),
            "p99_ms": median(rounds, kind, "p99_ms"),
            "rounds": [r[kind]["per_s"] for r in rounds],
            "goal": None,
            "met": None,
        }
        if kind in GOALS:
            row["goal"] = f">= {GOALS[kind]:,.0f}/s"
            row["met"] = per_s >= GOALS[kind]
        if kind == "concurrent":
            row["per_commit"] = median(rounds, kind, "per_commit")
        rows.append(row)
    for kind, label in (
        ("request_plain", "POST through the gate, no audit"),
        ("request_audited", "POST through the gate, audited"),
    ):
        rows.append(
            {
                "kind": kind,
                "label": label,
                "p50_ms": median(rounds, kind, "p50_ms"),
                "p99_ms": median(rounds, kind, "p99_ms"),
            }
        )
    added = statistics.median(
        r["request_audited"]["p99_ms"] - r["request_plain"]["p99_ms"] for r in rounds
    )
    rows.append(
        {
            "kind": "latency",
            "label": "added latency per mutating request, p99",
            "p99_ms": added,
            "goal": f"<= {GOALS['latency_p99_ms']:g} ms",
            "met": added <= GOALS["latency_p99_ms"],
        }
    )
    rows.append({"kind": "verify", "label": "verify", "per_s": median(rounds, "verify", "per_s")})
    return rows


def _fmt(value: float) -> str:
    if value != value:
        return "nan"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench audit", description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", help="parent of the temporary folder (default: see above)")
    parser.add_argument("--allow-tmpfs", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    folder, where = choose_folder(args.dir, args.allow_tmpfs)
    tune_collector()  # the daemon's collector settings: what the daemon's appends run with
    rounds = []
    try:
        for number in range(args.rounds):
            rounds.append(one_round(folder, args))
            if not args.json:
                brief = ", ".join(
                    f"{kind} {rounds[-1][kind]['per_s']:,.0f}/s"
                    for kind in (
                        "fsync",
                        "fsync_append",
                        "sqlite",
                        "store",
                        "sequential",
                        "concurrent",
                    )
                )
                print(f"round {number + 1}: {brief}", file=sys.stderr)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    rows = summarize(rounds)
    if args.json:
        print(json.dumps({"args": vars(args), "where": where, "rows": rows, "rounds": rounds}))
        return 0
    print(f"durable audit appends vs raw fsync, {args.rounds} rounds x {args.seconds:g} s, medians")
    print(f"folder {where}")
    print(f"{'':<44} {'per s':>9} {'/fsync':>7} {'p50 ms':>7} {'p99 ms':>7}  goal")
    for row in rows:
        verdict = "" if row.get("met") is None else ("met" if row["met"] else "MISSED")
        goal = f"{row['goal']} {verdict}" if row.get("goal") else ""
        if row["kind"].startswith("request_"):
            p50, p99 = _fmt(row["p50_ms"]), _fmt(row["p99_ms"])
            print(f"{row['label']:<44} {'':>9} {'':>7} {p50:>7} {p99:>7}")
        elif row["kind"] == "latency":
            print(f"{row['label']:<44} {'':>9} {'':>7} {'':>7} {_fmt(row['p99_ms']):>7}  {goal}")
        elif row["kind"] == "verify":
            print(f"{'verify_store (entries/s)':<44} {_fmt(row['per_s']):>9}")
        else:
            print(
                f"{row['label']:<44} {_fmt(row['per_s']):>9} {row['ratio']:>7.2f} "
                f"{_fmt(row['p50_ms']):>7} {_fmt(row['p99_ms']):>7}  {goal}"
            )
    concurrent = next(r for r in rows if r["kind"] == "concurrent")
    print(
        f"group commit at concurrency {args.concurrency}: "
        f"{concurrent['per_commit']:.0f} entries per commit (median)"
    )
    return 0
