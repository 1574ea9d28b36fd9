"""The registry scanner: the one owner of the `registry` table and its file-system work.

Theory of operation (DESIGN.md §7 "Registry", docs/registry.md):

* **One writer.** Every change to the `registry` table (register,
  unregister, the write-back of a sync, registering what a discovery found)
  is a message handled by the actor's loop, one at a time, so checks such
  as "this real path is already registered" (409) cannot race. The table
  is mirrored in memory (loaded in `setup`; at most `max_entries` rows), so
  listing and getting entries costs no store read.
* **Slow work is a job, not a loop turn.** Discovery, health checks, syncs,
  task aggregation and learnings are taken from the mailbox like any
  message but run as *jobs*: tasks in the actor's own nursery, so a
  60-second discovery never delays a register or a listing. At most
  `max_jobs` jobs run at once; beyond that the request is refused at once
  with `Unavailable` (503, "retry"), never queued without bound. A job that
  must change the table (sync, `discover?register=true`) sends a message
  to the actor's own mailbox for the write.
* **File-system work never runs on the trio loop.** Jobs call the
  synchronous functions of `lokid.registry` through
  `trio.to_thread.run_sync` with one `trio.CapacityLimiter` of
  `fs_threads` tokens, shared by every job: at most `fs_threads` threads
  touch the disk for the registry at once (bounded concurrency), the rest
  wait for a token. The functions only read, so a cancelled job abandons
  its thread (`abandon_on_cancel=True`) instead of blocking shutdown.
* **Syncs coalesce.** One sync runs at a time; callers that arrive while
  one runs wait for the next, which serves all of them (the answer is never
  older than the question). The periodic sync (every `interval` seconds,
  the first right after start) is one more caller.
* **Task counts come from the cache.** `lokid.registry.FileCache` keeps
  parsed queue files by stamp (module doc there), shared by syncs and the
  task aggregation, so a warm `GET /api/registry/tasks` costs one `lstat`
  per file.
* **`notify("registry.updated", data)`** is called after every committed
  change (register, unregister, a sync or discovery that changed
  something); it must not block (the dashboard hub's `publish`). A failing
  `notify` is logged, never fatal.

Mailbox: `mailbox_size = 256`, `when_full = WhenFull.BLOCK`: callers wait
for room (bounded by their `ask` timeout). On a graceful stop the messages
already in the mailbox are handled; running jobs are then cancelled (their
callers get `ActorUnavailable`; a cancelled job has written nothing, since
its write is a separate message).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import attrs
import sqlite_utils
import trio

from lokid import idempotency
from lokid import registry as fs
from lokid.actor import Actor, ActorStatistics, Call, Reply, WhenFull
from lokid.actors.store import StoreActor
from lokid.errors import Conflict, LokiError, NotFound, Unavailable, ValidationFailed
from lokid.timefmt import utc_now_iso

__all__ = [
    "MAX_ENTRIES",
    "MAX_NAME_CHARS",
    "RegistryEntry",
    "RegistryScanner",
    "RegistryScannerStatistics",
    "validate_name",
]

log = logging.getLogger("lokid.registry")

T = TypeVar("T")

MAX_ENTRIES = 10_000
"""Registered projects at most (a register beyond it is 422)."""
MAX_NAME_CHARS = 200
MAX_NOTIFY_IDS = 100
"""Ids listed in one `registry.updated` message (the rest are counted)."""
DEFAULT_INTERVAL = 300.0

ENTRY_STATUSES: tuple[str, ...] = ("ok", "missing", "unreadable")
"""`lokid.registry.Probe.status`: `unreadable` keeps the stored `.loki` flag, counts and
`last_seen` (what the daemon cannot see, it does not know), as `missing` does."""

Notify = Callable[[str, dict[str, Any]], None]


def _no_notify(type: str, data: dict[str, Any]) -> None:
    return None


def validate_name(name: str) -> str:
    """An entry's name, stripped: 1-`MAX_NAME_CHARS` characters, none that
    `lokid.registry.forbidden_character` refuses (the rule of token names); else 422."""
    name = name.strip()
    if not name or len(name) > MAX_NAME_CHARS:
        raise ValidationFailed(f"name must be 1-{MAX_NAME_CHARS} characters", field="name")
    bad = fs.forbidden_character(name)
    if bad is not None:
        raise ValidationFailed(
            f"name must not contain control characters (found U+{ord(bad):04X})", field="name"
        )
    return name


# -- records ---------------------------------------------------------------------------


@attrs.frozen
class RegistryEntry:
    """One row of the `registry` table (DESIGN.md §7 entry)."""

    id: str
    name: str
    path: str
    status: str  # ok | missing | unreadable
    has_loki: bool
    registered_at: str
    last_seen: str | None
    tasks: Mapping[str, int]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "path": self.path,
            "status": self.status,
            "has_loki": self.has_loki,
            "registered_at": self.registered_at,
            "last_seen": self.last_seen,
            "tasks": dict(self.tasks),
        }

    def ref(self) -> fs.ProjectRef:
        return fs.ProjectRef(self.id, self.name, self.path)

    def row(self) -> tuple[Any, ...]:
        return (
            self.id,
            self.name,
            self.path,
            self.status,
            int(self.has_loki),
            self.registered_at,
            self.last_seen,
            json.dumps(dict(self.tasks), separators=(",", ":")),
        )


_COLUMNS = "id, name, path, status, has_loki, registered_at, last_seen, tasks"
_INSERT = f"INSERT INTO registry ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
_UPDATE = "UPDATE registry SET status = ?, has_loki = ?, last_seen = ?, tasks = ? WHERE id = ?"


def _entry_from_row(row: Sequence[Any]) -> RegistryEntry:
    try:
        counts = json.loads(row[7] or "{}")
    except ValueError:
        counts = {}
    if not isinstance(counts, dict):
        counts = {}
    tasks = {**fs.EMPTY_COUNTS}
    tasks.update({k: v for k, v in counts.items() if k in tasks and isinstance(v, int)})
    return RegistryEntry(
        id=str(row[0]),
        name=str(row[1]),
        path=str(row[2]),
        status=str(row[3]),
        has_loki=bool(row[4]),
        registered_at=str(row[5]),
        last_seen=None if row[6] is None else str(row[6]),
        tasks=tasks,
    )


def _load(db: sqlite_utils.Database) -> list[RegistryEntry]:
    """Every entry, in registration order (rowid breaks ties of the same millisecond)."""
    rows = db.execute(f"SELECT {_COLUMNS} FROM registry ORDER BY registered_at, rowid")
    return [_entry_from_row(row) for row in rows]


# -- messages --------------------------------------------------------------------------


@attrs.frozen
class ListEntries:
    status: str | None
    limit: int
    offset: int


@attrs.frozen
class GetEntry:
    id: str


@attrs.frozen
class Register:
    path: str
    name: str | None
    idempotent: idempotency.Once | None = None  # the first answer is stored with the insert


@attrs.frozen
class Unregister:
    id: str


@attrs.frozen
class _RegisterFound:
    """Register what a discovery found, probed (from a job; handled by the loop)."""

    found: tuple[tuple[fs.Found, fs.Probe], ...]


@attrs.frozen
class _ApplySync:
    """The write-back of one sync (from a job; handled by the loop)."""

    entries: tuple[RegistryEntry, ...]


@attrs.frozen
class CheckHealth:
    id: str


@attrs.frozen
class Discover:
    roots: tuple[str, ...] | None  # None: the configured default roots
    depth: int
    register: bool


@attrs.frozen
class Sync:
    pass


@attrs.frozen
class Tasks:
    project_ids: tuple[str, ...] | None
    status: str | None
    limit: int
    offset: int


@attrs.frozen
class Learnings:
    type: str | None
    q: str | None
    limit: int
    offset: int


_JOBS = (CheckHealth, Discover, Sync, Tasks, Learnings)


@attrs.frozen
class RegistryScannerStatistics(ActorStatistics):
    entries: int
    max_entries: int
    jobs: int
    jobs_peak: int
    max_jobs: int
    jobs_refused: int
    fs_threads: int
    fs_threads_busy: int
    sync_interval: float
    syncs: int
    last_sync_at: str | None
    last_sync_ms: float | None
    discovers: int
    last_discover_ms: float | None
    task_cache: fs.CacheStatistics
    learnings_cache: fs.CacheStatistics


@attrs.define
class _SyncRound:
    done: trio.Event = attrs.Factory(trio.Event)
    result: dict[str, Any] | None = None
    error: LokiError | None = None


# -- the actor -------------------------------------------------------------------------


class RegistryScanner(Actor[Any]):
    """Owner of the `registry` table and of the registry's file-system work (module doc).

    Bounds: `max_entries` registered projects; `max_jobs` jobs at once
    (beyond: 503); `fs_threads` worker threads at once; the caches of
    `lokid.registry` (`CACHE_FILES`, `CACHE_WEIGHT`); discovery's own caps
    (`MAX_DISCOVER_RESULTS`, `MAX_DISCOVER_FOLDERS`, `discover_seconds`).
    """

    mailbox_size: ClassVar[int] = 256
    when_full: ClassVar[WhenFull] = WhenFull.BLOCK

    def __init__(
        self,
        store: StoreActor,
        *,
        loki_home: Path | str,
        default_roots: Sequence[str] = fs.DEFAULT_ROOTS,
        interval: float = DEFAULT_INTERVAL,
        notify: Notify = _no_notify,
        fs_threads: int = 4,
        max_jobs: int = 64,
        max_entries: int = MAX_ENTRIES,
        discover_seconds: float = fs.DISCOVER_SECONDS,
        initial_sync: bool = True,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be > 0 seconds")
        if fs_threads < 1 or max_jobs < 1 or max_entries < 1:
            raise ValueError("fs_threads, max_jobs and max_entries must be >= 1")
        super().__init__("registry_scanner")
        self.store = store
        self.loki_home = str(loki_home)
        self.default_roots = tuple(default_roots)
        self.interval = interval
        self.notify = notify
        self.max_jobs = max_jobs
        self.max_entries = max_entries
        self.discover_seconds = discover_seconds
        self.initial_sync = initial_sync
        self.cache = fs.FileCache()
        self.learnings_cache = fs.FileCache(max_entries=16, max_weight=300_000)
        self._limiter = trio.CapacityLimiter(fs_threads)
        self._entries: dict[str, RegistryEntry] = {}
        self._by_path: dict[str, str] = {}
        self._order: list[RegistryEntry] | None = None  # newest first; None: recompute
        self._rank: dict[str, int] = {}  # registration order (a counter, not the clock)
        self._registered = 0
        self._jobs = 0
        self._jobs_peak = 0
        self._jobs_refused = 0
        self._sync_lock = trio.Lock()
        self._next_sync: _SyncRound | None = None
        self._syncs = 0
        self._last_sync_at: str | None = None
        self._last_sync_ms: float | None = None
        self._discovers = 0
        self._last_discover_ms: float | None = None

    # -- callers ------------------------------------------------------------------------

    async def list_entries(
        self, status: str | None = None, limit: int = 100, offset: int = 0
    ) -> dict[str, Any]:
        """`{"projects": [...], "total", "limit", "offset"}`, newest registration first."""
        answer: dict[str, Any] = await self.ask(ListEntries(status, limit, offset))
        return answer

    async def get(self, id: str) -> dict[str, Any]:
        answer: dict[str, Any] = await self.ask(GetEntry(id))
        return answer

    async def register(
        self, path: str, name: str | None = None, *, idempotent: idempotency.Once | None = None
    ) -> dict[str, Any]:
        """Register an existing folder (422 `path` if it is not one; 409 if registered).

        With `idempotent`, a second call with the same key and body gets the first
        answer (`lokid.idempotency`); the same key with another body is 409.
        """
        if name is not None:
            name = validate_name(name)
        if not path or len(path) > fs.MAX_PATH_CHARS or "\x00" in path:
            raise ValidationFailed(
                f"path must be 1-{fs.MAX_PATH_CHARS} characters without NUL", field="path"
            )
        if not (path.startswith("/") or path.startswith("~")):
            raise ValidationFailed(
                f"path must be absolute (or start with ~), got {path[:80]!r}", field="path"
            )
        answer: dict[str, Any] = await self.ask(Register(path, name, idempotent), timeout=30.0)
        return answer

    async def unregister(self, id: str) -> None:
        await self.ask(Unregister(id))

    async def check_health(self, id: str) -> dict[str, Any]:
        answer: dict[str, Any] = await self.ask(CheckHealth(id), timeout=60.0)
        return answer

    async def discover(
        self,
        roots: Sequence[str] | None = None,
        depth: int = fs.DEFAULT_DEPTH,
        *,
        register: bool = False,
    ) -> dict[str, Any]:
        """Walk `roots` (default: the configured ones) for projects; with `register`, add
        those not yet registered. See `lokid.registry.discover`."""
        if not fs.MIN_DEPTH <= depth <= fs.MAX_DEPTH:
            raise ValidationFailed(
                f"depth must be between {fs.MIN_DEPTH} and {fs.MAX_DEPTH}", field="depth"
            )
        message = Discover(None if roots is None else tuple(roots), depth, register)
        answer: dict[str, Any] = await self.ask(message, timeout=self.discover_seconds + 30.0)
        return answer

    async def sync(self) -> dict[str, Any]:
        """Refresh every entry; `{"total", "ok", "missing", "unreadable", "updated", "errors",
        ...}`."""
        answer: dict[str, Any] = await self.ask(Sync(), timeout=300.0)
        return answer

    async def tasks(
        self,
        project_ids: Sequence[str] | None = None,
        status: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> dict[str, Any]:
        """Tasks of every registered project (or of `project_ids`); see
        `lokid.registry.aggregate_tasks`."""
        ids = None if project_ids is None else tuple(project_ids)
        answer: dict[str, Any] = await self.ask(Tasks(ids, status, limit, offset), timeout=60.0)
        return answer

    async def learnings(
        self, type: str | None = None, q: str | None = None, limit: int = 100, offset: int = 0
    ) -> dict[str, Any]:
        answer: dict[str, Any] = await self.ask(Learnings(type, q, limit, offset), timeout=60.0)
        return answer

    def entry_count(self) -> int:
        return len(self._entries)

    # -- the task -------------------------------------------------------------------------

    async def setup(self) -> None:
        entries = await self.store.read(_load)
        self._entries = {e.id: e for e in entries}
        self._by_path = {e.path: e.id for e in entries}
        self._rank = {e.id: number for number, e in enumerate(entries)}
        self._registered = len(entries)
        self._order = None

    async def serve(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._periodic)
            while (message := await self.next_message()) is not None:
                if isinstance(message, Call) and isinstance(message.message, _JOBS):
                    if self._jobs >= self.max_jobs:
                        self._refuse(message)
                        continue
                    self._jobs += 1
                    self._jobs_peak = max(self._jobs_peak, self._jobs)
                    nursery.start_soon(self._job, message)
                else:
                    await self.dispatch(message)
            nursery.cancel_scope.cancel()

    def _refuse(self, call: Call) -> None:
        self._jobs_refused += 1
        self._failed += 1
        error = Unavailable(
            f"the registry scanner is busy ({self.max_jobs} requests in progress); retry shortly",
            details={"max_jobs": self.max_jobs},
        )
        with call.reply, contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            call.reply.send_nowait(Reply(error=error))

    async def _job(self, call: Call) -> None:
        try:
            await self.dispatch(call)
        finally:
            self._jobs -= 1

    async def _periodic(self) -> None:
        """The first sync right after start (if configured), then one every `interval` s."""
        if not self.initial_sync:
            await trio.sleep(self.interval)
        while True:
            if self._entries:
                try:
                    await self._sync()
                except LokiError as exc:
                    log.warning("periodic registry sync failed: %s", exc)
            await trio.sleep(self.interval)

    async def handle(self, message: Any) -> Any:
        if isinstance(message, ListEntries):
            return self._list(message)
        if isinstance(message, GetEntry):
            return self._entry(message.id).to_json()
        if isinstance(message, Register):
            return await self._register(message)
        if isinstance(message, Unregister):
            return await self._unregister(message.id)
        if isinstance(message, _RegisterFound):
            return await self._register_found(message.found)
        if isinstance(message, _ApplySync):
            return await self._apply_sync(message.entries)
        if isinstance(message, CheckHealth):
            return await self._health(message.id)
        if isinstance(message, Discover):
            return await self._discover(message)
        if isinstance(message, Sync):
            return await self._sync()
        if isinstance(message, Tasks):
            return await self._tasks(message)
        if isinstance(message, Learnings):
            return await self._fs(
                _learnings,
                self.loki_home,
                message,
                self.learnings_cache,
            )
        return await super().handle(message)

    async def _fs(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on a worker thread, at most `fs_threads` at once (module doc)."""
        return await trio.to_thread.run_sync(
            fn, *args, limiter=self._limiter, abandon_on_cancel=True
        )

    def _announce(self, data: dict[str, Any]) -> None:
        try:
            self.notify("registry.updated", data)
        except Exception:
            log.exception("registry.updated notification failed")

    # -- the table (loop turns) ---------------------------------------------------------

    def _ordered(self) -> list[RegistryEntry]:
        if self._order is None:
            self._order = sorted(
                self._entries.values(), key=lambda e: self._rank.get(e.id, 0), reverse=True
            )
        return self._order

    def _list(self, query: ListEntries) -> dict[str, Any]:
        entries = self._ordered()
        if query.status is not None:
            entries = [e for e in entries if e.status == query.status]
        page = entries[query.offset : query.offset + query.limit]
        return {
            "projects": [e.to_json() for e in page],
            "total": len(entries),
            "limit": query.limit,
            "offset": query.offset,
        }

    def _entry(self, id: str) -> RegistryEntry:
        entry = self._entries.get(id)
        if entry is None:
            raise NotFound(f"Registry project {id} not found", details={"id": id})
        return entry

    def _put(self, entry: RegistryEntry) -> None:
        old = self._entries.get(entry.id)
        if old is not None and old.path != entry.path:
            self._by_path.pop(old.path, None)
        if entry.id not in self._rank:
            self._rank[entry.id] = self._registered
            self._registered += 1
        self._entries[entry.id] = entry
        self._by_path[entry.path] = entry.id
        self._order = None

    async def _register(self, message: Register) -> dict[str, Any]:
        once = message.idempotent
        if once is not None:  # a retry: the first answer, even if the folder is gone now
            first = await self.store.read(
                lambda db: idempotency.lookup_only(db, once.route, once.key, once.digest)
            )
            if first is not None:
                remembered: dict[str, Any] = first.body
                return remembered
        candidate = await self._fs(fs.resolve_folder, message.path)
        if candidate.path is None:
            problem = candidate.problem
            assert problem is not None
            reason = {
                "missing": "does not exist",
                "not_a_folder": "is not a folder",
                "symlink_loop": "is a symbolic link loop",
                "permission_denied": "cannot be reached (permission denied)",
                "not_utf8": "is not valid UTF-8 (lokid cannot name it in JSON or store it; "
                "rename the folder)",
            }.get(problem.kind, f"cannot be used ({problem.message})")
            if fs.unexpanded(problem.path):  # ~user: no such user (or no home)
                reason = f"cannot be used ({problem.message})"
            raise ValidationFailed(
                f"path {problem.path} {reason}",
                field="path",
                details={"kind": problem.kind, "path": problem.path},
            )
        real = candidate.path
        existing = self._by_path.get(real)
        if existing is not None:
            raise Conflict(
                f"{real} is already registered as {existing}",
                details={"id": existing, "path": real},
            )
        if len(self._entries) >= self.max_entries:
            raise ValidationFailed(
                f"the registry holds its maximum of {self.max_entries} projects",
                field="path",
                details={"limit": self.max_entries},
            )
        found = await self._fs(fs.probe, real, self.cache)
        now = utc_now_iso()
        entry = RegistryEntry(
            id=fs.registry_id(real),
            name=message.name or fs.folder_label(Path(real).name or real),
            path=real,
            status=found.status,
            has_loki=found.has_loki,
            registered_at=now,
            last_seen=now if found.status == "ok" else None,
            tasks=dict(found.tasks),
        )
        if entry.id in self._entries:  # 48-bit prefix collision of two different paths
            raise Conflict(
                f"another path is registered under {entry.id}",
                details={"id": entry.id, "path": self._entries[entry.id].path},
            )
        row = entry.row()
        answer = entry.to_json()

        def insert(db: sqlite_utils.Database) -> None:
            if once is not None:
                idempotency.lookup(db, once.route, once.key, once.digest)  # prunes old keys
            db.execute(_INSERT, row)
            if once is not None:
                idempotency.remember(db, once.route, once.key, once.digest, 201, answer)

        await self.store.write(insert)
        self._put(entry)
        self._announce({"action": "registered", "id": entry.id, "project": entry.to_json()})
        return answer

    async def _unregister(self, id: str) -> None:
        entry = self._entry(id)
        await self.store.write(lambda db: db.execute("DELETE FROM registry WHERE id = ?", [id]))
        self._entries.pop(id, None)
        self._by_path.pop(entry.path, None)
        self._rank.pop(id, None)
        self._order = None
        self.cache.forget(entry.path.rstrip("/") + "/.loki/")
        self._announce({"action": "unregistered", "id": id, "path": entry.path})

    async def _register_found(self, found: tuple[tuple[fs.Found, fs.Probe], ...]) -> dict[str, Any]:
        """Register the discovered projects that are not registered yet, in one write."""
        now = utc_now_iso()
        new: list[RegistryEntry] = []
        skipped = 0
        for item, probed in found:
            if item.path in self._by_path or item.id in self._entries:
                continue
            if len(self._entries) + len(new) >= self.max_entries:
                skipped += 1
                continue
            new.append(
                RegistryEntry(
                    id=item.id,
                    name=item.name,
                    path=item.path,
                    status=probed.status,
                    has_loki=probed.has_loki,
                    registered_at=now,
                    last_seen=now if probed.status == "ok" else None,
                    tasks=dict(probed.tasks),
                )
            )
        if new:
            rows = [e.row() for e in new]
            await self.store.write(lambda db: db.conn.executemany(_INSERT, rows))
            for entry in new:
                self._put(entry)
            ids = [e.id for e in new]
            self._announce(
                {
                    "action": "discovered",
                    "ids": ids[:MAX_NOTIFY_IDS],
                    "count": len(ids),
                }
            )
        return {"registered": [e.id for e in new], "skipped": skipped}

    async def _apply_sync(self, entries: tuple[RegistryEntry, ...]) -> list[str]:
        """Write what a sync learnt; entries unregistered meanwhile are left out."""
        live = [e for e in entries if e.id in self._entries]
        if not live:
            return []
        rows = [
            (
                e.status,
                int(e.has_loki),
                e.last_seen,
                json.dumps(dict(e.tasks), separators=(",", ":")),
                e.id,
            )
            for e in live
        ]
        await self.store.write(lambda db: db.conn.executemany(_UPDATE, rows))
        changed = []
        for entry in live:
            current = self._entries.get(entry.id)
            if current is None:
                continue
            if (current.status, current.has_loki, dict(current.tasks)) != (
                entry.status,
                entry.has_loki,
                dict(entry.tasks),
            ):
                changed.append(entry.id)
            self._put(attrs.evolve(current, **_sync_fields(entry)))
        return changed

    # -- jobs -----------------------------------------------------------------------------

    async def _health(self, id: str) -> dict[str, Any]:
        entry = self._entry(id)
        report = await self._fs(fs.health, entry.path)
        return {
            "id": entry.id,
            "name": entry.name,
            "path": entry.path,
            **report.to_json(),
            "checked_at": utc_now_iso(),
        }

    async def _discover(self, message: Discover) -> dict[str, Any]:
        explicit = message.roots is not None
        roots = message.roots if message.roots is not None else self.default_roots
        started = time.perf_counter()
        found = await self._fs(_discover, roots, message.depth, explicit, self.discover_seconds)
        self._discovers += 1
        self._last_discover_ms = round((time.perf_counter() - started) * 1000, 3)
        errors = fs.Problems()
        errors.extend(found.errors)
        errors.omitted += found.errors_omitted
        registered_now: list[str] = []
        fresh_found = [f for f in found.projects if f.path not in self._by_path]
        if message.register and fresh_found:
            probes = await self._fs(fs.probe_many, [f.path for f in fresh_found], self.cache)
            pairs = tuple(zip(fresh_found, probes, strict=True))
            result = await self.ask(_RegisterFound(pairs), timeout=60.0)
            registered_now = result["registered"]
            if result["skipped"]:
                errors.add(
                    fs.Problem(
                        "",
                        "limit",
                        f"{result['skipped']} projects not registered: the registry holds "
                        f"its maximum of {self.max_entries}",
                    )
                )
        fresh = set(registered_now)
        projects = [
            {
                **item.to_json(),
                "registered": item.path in self._by_path,
                **({"registered_now": item.id in fresh} if message.register else {}),
            }
            for item in found.projects
        ]
        answer: dict[str, Any] = {
            "projects": projects,
            "total": len(projects),
            "depth": found.depth,
            "roots": [r.to_json() for r in found.roots],
            "folders": found.folders,
            "truncated": found.truncated,
            "truncated_reason": found.truncated_reason,
            "seconds": round(found.seconds, 6),
            "errors": errors.to_json(),
            "errors_omitted": errors.omitted,
        }
        if message.register:
            answer["registered"] = len(registered_now)
        return answer

    async def _sync(self) -> dict[str, Any]:
        """One sync for this caller and every caller waiting with it (module doc)."""
        current = self._next_sync
        if current is None:
            current = self._next_sync = _SyncRound()
        async with self._sync_lock:
            if not current.done.is_set():
                if self._next_sync is current:
                    self._next_sync = None  # later callers start the next round
                try:
                    current.result = await self._sync_once()
                except LokiError as exc:
                    current.error = exc
                finally:
                    current.done.set()
        if current.error is not None:
            raise current.error
        assert current.result is not None
        return current.result

    async def _sync_once(self) -> dict[str, Any]:
        started = time.perf_counter()
        entries = list(self._entries.values())
        probes = await self._fs(fs.probe_many, [e.path for e in entries], self.cache)
        now = utc_now_iso()
        errors = fs.Problems()
        refreshed: list[RegistryEntry] = []
        for entry, found in zip(entries, probes, strict=True):
            errors.extend(found.problems)
            refreshed.append(
                attrs.evolve(
                    entry,
                    status=found.status,
                    has_loki=found.has_loki if found.status == "ok" else entry.has_loki,
                    tasks=dict(found.tasks) if found.status == "ok" else entry.tasks,
                    last_seen=now if found.status == "ok" else entry.last_seen,
                )
            )
        changed: list[str] = []
        if refreshed:
            changed = await self.ask(_ApplySync(tuple(refreshed)), timeout=60.0)
        if changed:
            self._announce(
                {"action": "synced", "ids": changed[:MAX_NOTIFY_IDS], "count": len(changed)}
            )
        self._syncs += 1
        self._last_sync_at = now
        self._last_sync_ms = round((time.perf_counter() - started) * 1000, 3)
        by_status = dict.fromkeys(ENTRY_STATUSES, 0)
        for entry in refreshed:
            by_status[entry.status] += 1
        return {
            "total": len(refreshed),
            **by_status,
            "updated": len(changed),
            "errors": errors.to_json(),
            "errors_omitted": errors.omitted,
            "synced_at": now,
            "seconds": round(time.perf_counter() - started, 6),
        }

    async def _tasks(self, message: Tasks) -> dict[str, Any]:
        if message.project_ids is None:
            refs = [e.ref() for e in self._ordered()]
        else:
            refs = []
            for id in message.project_ids:
                entry = self._entries.get(id)
                if entry is None:
                    raise NotFound(
                        f"Registry project {id} not found",
                        details={"field": "project_id", "id": id},
                    )
                refs.append(entry.ref())
        return await self._fs(_aggregate, refs, message, self.cache)

    # -- introspection --------------------------------------------------------------------

    def statistics(self) -> RegistryScannerStatistics:
        base = super().statistics()
        return RegistryScannerStatistics(
            **attrs.asdict(base, recurse=False),
            entries=len(self._entries),
            max_entries=self.max_entries,
            jobs=self._jobs,
            jobs_peak=self._jobs_peak,
            max_jobs=self.max_jobs,
            jobs_refused=self._jobs_refused,
            fs_threads=int(self._limiter.total_tokens),
            fs_threads_busy=self._limiter.borrowed_tokens,
            sync_interval=self.interval,
            syncs=self._syncs,
            last_sync_at=self._last_sync_at,
            last_sync_ms=self._last_sync_ms,
            discovers=self._discovers,
            last_discover_ms=self._last_discover_ms,
            task_cache=self.cache.statistics(),
            learnings_cache=self.learnings_cache.statistics(),
        )


def _sync_fields(entry: RegistryEntry) -> dict[str, Any]:
    return {
        "status": entry.status,
        "has_loki": entry.has_loki,
        "tasks": entry.tasks,
        "last_seen": entry.last_seen,
    }


# -- thread bodies (plain functions: what runs off the loop) --------------------------


def _discover(roots: Sequence[str], depth: int, explicit: bool, seconds: float) -> fs.Discovery:
    return fs.discover(roots, depth, explicit=explicit, seconds=seconds)


def _aggregate(
    refs: Sequence[fs.ProjectRef], message: Tasks, cache: fs.FileCache
) -> dict[str, Any]:
    return fs.aggregate_tasks(
        refs, status=message.status, limit=message.limit, offset=message.offset, cache=cache
    )


def _learnings(loki_home: str, message: Learnings, cache: fs.FileCache) -> dict[str, Any]:
    return fs.read_learnings(
        loki_home, message.type, message.q, message.limit, offset=message.offset, cache=cache
    )
