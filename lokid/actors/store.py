"""The store actor: the one owner of lokid's SQLite database.

Theory of operation:

* **One writer, group commit.** Every change goes through `write(fn)`, an
  `ask` of a `Write(fn)` message. The actor takes the first write from its
  mailbox, gathers whatever else is waiting (and, with `group_window` > 0,
  what arrives within that many seconds; at most `max_batch` writes), and
  runs the whole batch in one transaction on the writer thread. The default
  window is 0: writes that arrive while a batch commits wait in the mailbox
  and form the next batch, so a lone write commits at once and a busy store
  still groups (a fixed window added its length to every lone write, e.g.
  each step of a session start): `BEGIN IMMEDIATE`, each `fn(db)` inside its own `SAVEPOINT`,
  `COMMIT`. Only after `COMMIT` returned does any caller get its answer, so
  an acknowledged write is a committed write. With `synchronous=FULL` in WAL
  mode that commit is on disk (one fsync of the WAL per batch, shared by
  every write in it): a crash or power loss after the answer loses nothing.
* **One fsync per audited request.** A write made while serving a request
  whose outcome the gate will audit (`SYNC_FOLLOWS` is set in its task)
  commits with `synchronous=NORMAL`: written to the WAL, not fsync'd. The
  request's audit entry commits next on this same writer with
  `synchronous=FULL` before the answer is sent, and its fsync of the WAL
  makes the earlier frames durable too. A kill of the daemon loses neither
  (the frames are in the OS's cache); a power loss between the two commits
  can lose the change, but its request was never answered with success. A
  batch commits with FULL if any write in it is not deferred this way.
* **Commit hooks run in commit order.** `write(fn, on_commit=hook)` calls
  `hook(value)` on the trio thread once the transaction holding `fn`'s
  change has committed, before `write` returns, and the hooks of all writes
  run in the order their changes committed (the writer thread hands them
  to `TrioToken.run_sync_soon`, which runs callbacks first in, first out).
  This is where a change is announced (the `/ws` hub): announcing after
  `write` returned would follow the order in which trio happens to resume
  the callers, which is not the commit order. A hook must not block; what it
  raises is logged. A write that failed, or whose batch did not commit,
  calls no hook.
* **A failing write rolls back only itself.** Its savepoint is rolled back,
  its caller gets the exception, the rest of the batch commits. SQLite errors
  are turned into `LokiError`s so the store keeps running: a constraint
  violation is `Conflict`, a disk/I/O failure is `StoreUnavailable`, any
  other SQLite error (bad SQL, missing table) is `StoreError`, a bug in the
  caller. Exceptions that are not SQLite's reach the caller unchanged.
* **If COMMIT fails** (disk full, I/O error, file made read-only) nothing of
  the batch was written: every caller whose write had succeeded gets
  `StoreUnavailable`, `writable` turns False (`unwritable_reason` says why),
  and the actor keeps serving; the next batch that commits turns it True
  again. A write that fails on its own with a storage error (disk full inside
  its statement) turns it False too. While it is False and no write comes,
  the actor probes every `probe_interval` seconds with a one-row write to
  `meta`, so `/health` recovers once space returns even on an idle daemon.
* **Write functions do not control the transaction.** While `fn` runs, an
  SQLite authorizer refuses BEGIN, COMMIT and ROLLBACK (and touching the
  batch's savepoint); `fn` gets `StoreError` instead of silently committing
  or discarding its neighbours' work. Nested `db.atomic()` blocks are fine
  (they are savepoints). If a write destroys the transaction anyway (a
  trigger's `RAISE(ROLLBACK)`), that write fails and the batch is run again
  without it - so `fn` may be called more than once and must do database
  work only. A storage failure that destroys the transaction fails the batch.
* **Reads do not queue behind writes.** `read(fn)` runs on one of `readers`
  read-only connections (`PRAGMA query_only`) on one of `readers` reader
  threads; WAL lets readers run while the writer holds its
  transaction. Each read is one transaction, so `fn` sees one consistent
  snapshot containing every write acknowledged before `read` was called.
* **Nothing blocks the trio loop.** Opening, migrating, checking, batches,
  reads and closing all run on the store's own threads (`lokid.thread_lane`):
  one writer thread, whose queue keeps every write of the store in order
  and one at a time, and `readers` reader threads. The store never waits
  for threads used by the rest of the daemon, nor they for it.
* `fn` must return plain data: a generator or a cursor with pending rows
  would be consumed outside its transaction, so returning one is a
  `StoreError` (return `list(db.query(...))`). `fn` must not keep `db`.

Start (`setup`, before the supervisor hears "started"): create the folder
(0700), open the writer, `PRAGMA quick_check`, refuse a schema newer than
`lokid.migrations` knows, switch to WAL, `synchronous=FULL`,
`foreign_keys=ON`, `busy_timeout`, apply pending migrations. Every failure
is a `StoreOpenError` whose one-line message names the file and what to do.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import pathlib
import sqlite3
import threading
import time
import types
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar, cast

import attrs
import sqlite_utils
import trio

from lokid import migrations as _migrations
from lokid.actor import Actor, ActorStatistics, Call, Reply, WhenFull
from lokid.errors import AskTimeout, Conflict, LokiError, NotFound, StoreOpenError, Unavailable
from lokid.migrations import Migration
from lokid.thread_lane import ThreadLane
from lokid.timefmt import utc_now_iso

T = TypeVar("T")

CommitHook = Callable[[Any], None]
"""`write(..., on_commit=hook)`: called with the write's value once it committed."""

log = logging.getLogger("lokid.store")

SYNC_FOLLOWS: contextvars.ContextVar[trio.lowlevel.Task | None] = contextvars.ContextVar(
    "lokid_store_sync_follows", default=None
)
"""Set (by the HTTP layer) to the task serving a request whose audit entry commits on
this store before anyone is answered: that task's `write`s commit without their own
fsync (see the module rules). It names the task because tasks it spawns inherit the
variable (a session actor started by the request must not inherit the exemption)."""

BUSY_TIMEOUT_MS = 5000
"""How long a statement waits for a lock held by another connection or process."""

PROBE_INTERVAL = 1.0
"""While not writable, how often the idle writer tries a one-row write to learn it can again."""

# Distinct statement texts: Python's sqlite3 caches prepared statements by
# text, and the authorizer only sees a statement when it is prepared. A
# caller's plain "COMMIT" is never one of these, so it is always checked.
_BEGIN = "BEGIN IMMEDIATE /* lokid batch */"
_COMMIT = "COMMIT /* lokid batch */"
_ROLLBACK = "ROLLBACK /* lokid batch */"
_SYNC_FULL = "PRAGMA synchronous = FULL"
_SYNC_NORMAL = "PRAGMA synchronous = NORMAL"
_SAVEPOINT_NAME = "lokid_write"
_SAVEPOINT = f"SAVEPOINT {_SAVEPOINT_NAME}"
_RELEASE = f"RELEASE {_SAVEPOINT_NAME}"
_ROLLBACK_TO = f"ROLLBACK TO {_SAVEPOINT_NAME}"

# Primary result codes (the low byte of `sqlite_errorcode`).
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_NOMEM = 7
_SQLITE_READONLY = 8
_SQLITE_IOERR = 10
_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_CANTOPEN = 14
_SQLITE_PROTOCOL = 15
_SQLITE_AUTH = 23
_SQLITE_NOTADB = 26

# Failures of the file, the disk or the lock, not of the SQL.
_STORAGE_CODES = frozenset(
    {
        _SQLITE_BUSY,
        _SQLITE_LOCKED,
        _SQLITE_NOMEM,
        _SQLITE_READONLY,
        _SQLITE_IOERR,
        _SQLITE_CORRUPT,
        _SQLITE_FULL,
        _SQLITE_CANTOPEN,
        _SQLITE_PROTOCOL,
        _SQLITE_NOTADB,
    }
)


# -- errors ----------------------------------------------------------------------


class StoreError(LokiError):
    """A store function failed with an SQLite error that is a bug in its SQL.

    Bad syntax, a missing table or column, a write inside `read`, a write
    function that tries to end the transaction, a lazy result. Code
    `INTERNAL_ERROR`: the API answers 500, which is always a bug.
    """


class StoreUnavailable(Unavailable):
    """The database cannot do this now: disk full, I/O error, read-only, locked, closed.

    For a write, nothing of it was committed. Code `UNAVAILABLE` (503).
    """


# -- messages and records ----------------------------------------------------------


@attrs.frozen
class Write:
    """Run `fn(db)` in the next batch; the answer is its return value once committed."""

    fn: Callable[[sqlite_utils.Database], Any]
    sync_follows: bool = False  # `SYNC_FOLLOWS` of the caller
    on_commit: CommitHook | None = None


@attrs.frozen
class StoreStatistics(ActorStatistics):
    """`ActorStatistics` plus the store's own counters.

    `handled`/`failed` count writes answered with a value / an error;
    `writes` counts writes run (a write re-run after its batch was restarted
    counts once); `batches` counts transactions attempted, `commit_failures`
    those whose COMMIT (or BEGIN) failed. `writes_abandoned` are writes whose
    caller gave up (timed out) before the batch started: they are not run.
    Commit latency is the time of the COMMIT statement (the WAL fsync).
    `commits_deferred` counts commits without an fsync of their own
    (`SYNC_FOLLOWS`).
    """

    path: str
    schema_version: int | None
    writable: bool
    batches: int
    writes: int
    writes_abandoned: int
    commit_failures: int
    last_batch_size: int
    max_batch_seen: int
    commit_latency_ms_last: float | None
    commit_latency_ms_avg: float | None
    commits_deferred: int
    read_count: int
    readers_busy: int
    readers_open: int


@attrs.frozen
class DaemonRun:
    """One row of `daemon_runs`: a daemon's start, and whether it recorded a clean stop."""

    id: int
    pid: int
    started_at: str  # ISO-8601, UTC
    version: str
    clean: bool  # False: it never said stop (killed, crashed, the machine went down)


@attrs.frozen
class _BatchResult:
    replies: list[Reply]
    runs: int
    committed: bool
    commit_seconds: float | None
    failure: str | None
    storage_failed: bool


class _TransactionLost(Exception):
    """Internal: a write ended the batch's transaction; `cause` is why."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


# -- the actor ---------------------------------------------------------------------


class StoreActor(Actor[Any]):
    """Owner of the SQLite database: single writer with group commit, pooled readers.

    Mailbox: `mailbox_size = 1024`, `when_full = WhenFull.BLOCK`. A full
    mailbox makes writers wait (back-pressure); `write(timeout=...)` bounds
    the wait for enqueue and commit together. A write that times out in the
    mailbox is not run; one that times out later may still commit (the
    answer `AskTimeout` means "outcome unknown"). Reads do not use the
    mailbox.

    On a graceful stop the actor runs every write already in its mailbox,
    then closes the connections (`teardown`).
    """

    mailbox_size: ClassVar[int] = 1024
    when_full: ClassVar[WhenFull] = WhenFull.BLOCK

    def __init__(
        self,
        path: pathlib.Path,
        *,
        group_window: float = 0.0,
        max_batch: int = 256,
        readers: int = 4,
        name: str = "store",
        migrations: Sequence[Migration] = _migrations.MIGRATIONS,
        probe_interval: float = PROBE_INTERVAL,
    ) -> None:
        if group_window < 0:
            raise ValueError("group_window must be >= 0")
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if readers < 1:
            raise ValueError("readers must be >= 1")
        _migrations.check_sequence(migrations)
        super().__init__(name)
        self.path = pathlib.Path(path)
        self.group_window = group_window
        self.direct_when_idle = group_window == 0  # see `write`
        self.max_batch = max_batch
        self.readers = readers
        self.probe_interval = probe_interval
        self._migrations = tuple(migrations)
        self._db: sqlite_utils.Database | None = None
        self._schema_version: int | None = None
        self._writable = False
        self._unwritable_reason: str | None = None
        self._file_identity: tuple[int, int] | None = None  # (st_dev, st_ino) when opened
        self._guard = False  # read by the authorizer, on the writer thread
        self._writer = ThreadLane(f"{name}-writer")  # one thread: the one writer
        self._reader = ThreadLane(f"{name}-reader", readers)
        self._pool_lock = threading.Lock()
        self._idle_readers: list[sqlite_utils.Database] = []
        self._readers_open = 0
        self._generation = 0
        # statistics
        self._batches = 0
        self._writes = 0
        self._abandoned = 0
        self._commit_failures = 0
        self._last_batch_size = 0
        self._max_batch_seen = 0
        self._commit_ms_last: float | None = None
        self._commit_seconds_total = 0.0
        self._commits = 0
        # told each committed batch's COMMIT time in seconds (lokid.metrics' histogram)
        self.commit_observer: Callable[[float], None] | None = None
        self._commits_deferred = 0
        self._sync_full = True  # the writer connection's `synchronous` (writer thread only)
        self._reads = 0
        self._token: trio.lowlevel.TrioToken | None = None  # for the commit hooks

    # -- callers ---------------------------------------------------------------

    async def write(
        self,
        fn: Callable[[sqlite_utils.Database], T],
        *,
        timeout: float = 10.0,
        on_commit: Callable[[T], None] | None = None,
    ) -> T:
        """Run `fn(db)` in the writer's next batch; return its result once committed.

        `on_commit(result)` runs on the trio thread right after the commit, in
        commit order with every other write's hook (see the module).

        Raises what `fn` raised (SQLite errors as `Conflict`, `StoreUnavailable`
        or `StoreError`), `StoreUnavailable` if the batch's COMMIT failed, and
        `AskTimeout` after `timeout` seconds (mailbox wait included).

        When the writer is idle (nothing in the mailbox, no batch running, no
        group window to wait for) the write runs at once from the caller's task
        (`write_alone`): a lone write skips two task hand-offs, and a busy
        store still groups, since every write that finds it busy queues.
        """
        marked = SYNC_FOLLOWS.get()
        follows = marked is not None and marked is trio.lowlevel.current_task()
        if (
            self.direct_when_idle
            and self.running
            and not self._writer.busy
            and self.mailbox_empty()
        ):
            return await self.write_alone(
                fn, timeout=timeout, sync_follows=follows, on_commit=on_commit
            )
        return cast(T, await self.ask(Write(fn, follows, on_commit), timeout=timeout))

    async def write_alone(
        self,
        fn: Callable[[sqlite_utils.Database], T],
        *,
        timeout: float = 10.0,
        sync_follows: bool = False,
        on_commit: Callable[[T], None] | None = None,
        to_end: bool = False,
    ) -> T:
        """Run `fn(db)` in a transaction of its own, from the caller's task; once committed,
        its return value.

        For a caller that gathers its own batches (the audit writer): no mailbox
        and no hand-off to the store's task and back, which is two task wake-ups
        (~0.2 ms per write on this VM; see docs/performance.md). It queues on
        the writer thread with the store's batches, so there is still one
        writer. Same answers as `write`; `AskTimeout` when
        the writer stayed busy for `timeout` seconds (then `fn` did not run).
        Always durable on return unless `sync_follows` (see `SYNC_FOLLOWS`).

        `to_end` (no `on_commit`), on a writer that is `writer_idle`: the write
        is never withdrawn, so it runs and commits even if the caller is
        cancelled while it waits; the caller gets its answer and sees the
        cancellation at its next checkpoint (`ThreadLane.run_to_end`). What a
        shielded cancel scope would give, without one (the audit writer's
        lone appends). On a busy writer it is ignored.
        """
        if self._db is None or not self.running:
            raise StoreUnavailable(f"{self.name}: the database {self.path} is not open")
        generation = self._generation
        job = (self._execute_alone, fn, generation, sync_follows, on_commit)
        # A hook must run before this returns: the ordered answer (`ThreadLane.run_ordered`).
        run = self._writer.run if on_commit is None else self._writer.run_ordered
        if to_end and on_commit is None and not self._writer.busy:
            result = await self._writer.run_to_end(*job)
        elif not self._writer.busy:
            # The writer thread takes it at once, and a started job is never withdrawn:
            # the deadline could not end the wait, and a cancel scope costs ~30 Python
            # calls (about 10 us here: docs/performance.md, "Audit appends").
            result = await run(*job)
        else:
            with trio.move_on_after(timeout) as waited:
                result = await run(*job)
            if waited.cancelled_caught:
                raise AskTimeout(f"{self.name}: the writer stayed busy for {timeout:g} s")
        if result is None:
            raise StoreUnavailable(f"{self.name}: the database {self.path} was closed")
        self._account(result)
        [answer] = result.replies
        self._answer(None, answer)
        if answer.error is not None:
            raise answer.error
        return cast(T, answer.value)

    def _execute_alone(
        self,
        fn: Callable[[sqlite_utils.Database], Any],
        generation: int,
        sync_follows: bool,
        on_commit: CommitHook | None,
    ) -> _BatchResult | None:
        if self._db is None or generation != self._generation:
            return None  # closed (or reopened) while this write waited for the writer
        return self._execute_batch(
            [fn], durable=not sync_follows, hooks=() if on_commit is None else [on_commit]
        )

    @property
    def writer_idle(self) -> bool:
        """Open and running, and nothing queued or running on the writer thread: a
        `write_alone` now starts at once (with `to_end`, it cannot be withdrawn)."""
        return self._db is not None and self._running and not self._writer.busy

    async def read(self, fn: Callable[[sqlite_utils.Database], T]) -> T:
        """Run `fn(db)` on a read-only connection in a worker thread; return its result.

        `fn` runs in one read transaction (one snapshot). It waits only for a
        free reader (at most `readers` at once), never for the writer.
        """
        if self._db is None:
            raise StoreUnavailable(f"{self.name}: the database {self.path} is not open")
        generation = self._generation
        try:
            return await self._reader.run(self._read_sync, fn, generation)
        finally:
            self._reads += 1

    @property
    def writable(self) -> bool:
        """The store is open and its last batch did not fail for the disk or the file."""
        return self._db is not None and self._writable

    @property
    def unwritable_reason(self) -> str | None:
        """Why `writable` is False (one line, for `/health`); None while it is True."""
        if self._db is None:
            return f"the database {self.path} is not open"
        return None if self._writable else self._unwritable_reason or "not writable"

    @property
    def file_problem(self) -> str | None:
        """Why the open database is no longer the file at `path`, for `/health`; else None.

        A data dir removed under a running daemon (`rm -rf`): SQLite keeps writing
        to the unlinked file and every write succeeds, but all of it is lost when
        the daemon exits, and a new daemon on that path has its own file. One
        `stat`: cheap enough for every `/health`. Writes are not refused for it.
        """
        if self._db is None or self._file_identity is None:
            return None
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            return f"the database {self.path} was removed: what is written now is lost at exit"
        except OSError:
            return None  # not the question asked here (a full or read-only disk shows elsewhere)
        if (info.st_dev, info.st_ino) != self._file_identity:
            return (
                f"the database {self.path} was replaced by another file: "
                "what is written now is lost at exit"
            )
        return None

    @property
    def schema_version(self) -> int | None:
        return self._schema_version

    # -- daemon runs -----------------------------------------------------------

    async def record_start(self, pid: int, version: str) -> int:
        """Record a daemon start; return the run id for `record_stop`.

        Runs still without a stop (the daemon died) are marked `clean = 0`.
        """
        started_at = utc_now_iso()

        def insert(db: sqlite_utils.Database) -> int:
            db.execute(
                "UPDATE daemon_runs SET clean = 0 WHERE clean IS NULL AND stopped_at IS NULL"
            )
            cursor = db.execute(
                "INSERT INTO daemon_runs (pid, started_at, version) VALUES (?, ?, ?)",
                (pid, started_at, version),
            )
            return int(cast(int, cursor.lastrowid))

        return await self.write(insert)

    async def record_stop(self, run_id: int) -> None:
        """Record the clean stop of run `run_id` (`stopped_at`, `clean = 1`)."""
        stopped_at = utc_now_iso()

        def update(db: sqlite_utils.Database) -> int:
            cursor = db.execute(
                "UPDATE daemon_runs SET stopped_at = ?, clean = 1 WHERE id = ?",
                (stopped_at, run_id),
            )
            return cursor.rowcount

        if await self.write(update) == 0:
            raise NotFound(f"no daemon run {run_id}")

    async def previous_run_unclean(self, run_id: int | None = None) -> bool:
        """True if the newest run before `run_id` (or the newest at all) did not stop cleanly."""
        previous = await self.previous_run(run_id)
        return previous is not None and not previous.clean

    async def previous_run(self, run_id: int | None = None) -> DaemonRun | None:
        """The newest run before `run_id` (or the newest at all); None if there is none."""

        def query(db: sqlite_utils.Database) -> DaemonRun | None:
            row = db.execute(
                "SELECT id, pid, started_at, version, clean FROM daemon_runs"
                " WHERE ? IS NULL OR id < ? ORDER BY id DESC LIMIT 1",
                (run_id, run_id),
            ).fetchone()
            if row is None:
                return None
            return DaemonRun(row[0], row[1], row[2], row[3], clean=row[4] == 1)

        return await self.read(query)

    # -- the task: start and stop ------------------------------------------------

    async def setup(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        db, version = await self._writer.run(self._open_sync)
        self._generation += 1
        self._schema_version = version
        self._writable = True
        self._db = db

    async def teardown(self) -> None:
        db, self._db = self._db, None
        self._writable = False
        self._generation += 1
        with self._pool_lock:
            idle, self._idle_readers = self._idle_readers, []
            self._readers_open -= len(idle)
        try:
            await self._writer.run(_close_all, [*idle, db])
        finally:
            self._writer.close()
            self._reader.close()

    def _open_sync(self) -> tuple[sqlite_utils.Database, int]:
        path = self.path
        _check_path(path)
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            problems = [str(row[0]) for row in conn.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise StoreOpenError(
                    f"{path} is corrupt (quick_check: {_one_line(problems)}): {_MOVE_ASIDE}"
                )
            known = _migrations.latest_version(self._migrations)
            found = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if found > known:
                raise StoreOpenError(_too_new(path, found, known))
            mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            if mode.lower() != "wal":
                raise StoreOpenError(
                    f"cannot put {path} in WAL mode (it stays in {mode!r} mode): keep the data "
                    "directory on a local file system that supports shared memory and locks"
                )
            conn.execute(_SYNC_FULL)
            self._sync_full = True
            conn.execute("PRAGMA foreign_keys = ON")
            db = sqlite_utils.Database(conn)
            _migrations.migrate(db, self._migrations)
            version = _migrations.current_version(db)
            conn.set_authorizer(self._authorize)
            _fsync_dir(path.parent)
            opened = os.stat(path)
            self._file_identity = (opened.st_dev, opened.st_ino)
        except BaseException as exc:
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            if isinstance(exc, StoreOpenError):
                raise
            if isinstance(exc, _migrations.SchemaTooNew):
                raise StoreOpenError(_too_new(path, exc.found, exc.known)) from exc
            if isinstance(exc, _migrations.MigrationFailed):
                raise StoreOpenError(
                    f"cannot upgrade {path}: {exc}; nothing of it was written (the file stays "
                    f"at schema version {exc.migration.version - 1}): this is a lokid bug, "
                    "report it, and run the previous lokid version meanwhile"
                ) from exc
            if isinstance(exc, sqlite3.Error):
                raise StoreOpenError(_describe_open_error(path, exc)) from exc
            if isinstance(exc, OSError):
                raise StoreOpenError(f"cannot open {path}: {exc.strerror or exc}") from exc
            raise
        return db, version

    # -- the task: the writer ----------------------------------------------------

    async def serve(self) -> None:
        while (first := await self._next_or_probe()) is not None:
            batch = [first]
            try:
                await self._gather(batch)
            finally:
                # Also when cancelled while gathering: messages taken from the
                # mailbox are answered, never dropped.
                await self._run_batch(batch)

    async def _next_or_probe(self) -> Any | None:
        """The next message; while not writable, probe the disk whenever none comes for a while.

        It wakes every `probe_interval` even while writable: `write_alone` may turn
        `writable` False from a caller's task while this one waits.
        """
        while True:
            with trio.move_on_after(self.probe_interval):
                return await self.next_message()
            if not self._writable:
                await self._probe()

    async def _probe(self) -> None:
        """One durable one-row write of our own (a WAL frame): if it commits, the disk takes
        writes again and `writable` turns True. Not counted as a caller's write."""

        def touch(db: sqlite_utils.Database) -> None:
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('store_probe', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (utc_now_iso(),),
            )

        fns: list[Callable[[sqlite_utils.Database], Any]] = [touch]
        with trio.CancelScope(shield=True):
            try:
                result = await self._writer.run(self._execute_batch, fns, True)
            except sqlite3.Error:  # e.g. the pragma before the batch: still not writable
                return
        [answer] = result.replies
        if result.committed and answer.error is None:
            self._set_writable(True, None)

    def _set_writable(self, writable: bool, reason: str | None) -> None:
        if writable and not self._writable:
            log.info("%s: the database %s takes writes again", self.name, self.path)
        elif not writable and self._writable:
            log.error("%s: the database %s is not writable: %s", self.name, self.path, reason)
        self._writable = writable
        self._unwritable_reason = None if writable else reason

    async def _gather(self, batch: list[Any]) -> None:
        """Add to `batch` what arrives within `group_window`, up to `max_batch`."""
        deadline = trio.current_time() + self.group_window
        while len(batch) < self.max_batch:
            message = self.next_message_nowait()
            if message is None:
                with trio.move_on_at(deadline):
                    message = await self.next_message()
                if message is None:  # the window closed, or stopping and empty
                    return
            batch.append(message)

    async def _run_batch(self, batch: list[Any]) -> None:
        with trio.CancelScope(shield=True):
            jobs: list[tuple[Write, Any]] = []
            durable = False
            for message in batch:
                payload, reply = (
                    (message.message, message.reply)
                    if isinstance(message, Call)
                    else (message, None)
                )
                if reply is not None and reply.statistics().open_receive_channels == 0:
                    reply.close()
                    self._abandoned += 1
                elif not isinstance(payload, Write):
                    self._answer(
                        reply, Reply(error=TypeError(f"{self.name} cannot handle {payload!r}"))
                    )
                else:
                    jobs.append((payload, reply))
                    durable = durable or not payload.sync_follows
            if not jobs:
                return
            hooks = [write.on_commit for write, _ in jobs]
            # Hooks run before their writes' callers resume: the ordered answer.
            run = self._writer.run if hooks.count(None) == len(hooks) else self._writer.run_ordered
            try:
                result = await run(
                    self._execute_batch, [write.fn for write, _ in jobs], durable, hooks
                )
            except BaseException:
                # A bug in the store: the actor crashes. Closing the reply
                # channels tells these callers at once (`ActorUnavailable`).
                for _, reply in jobs:
                    if reply is not None:
                        reply.close()
                raise
            self._account(result)
            for (_, reply), answer in zip(jobs, result.replies, strict=True):
                self._answer(reply, answer)

    def _answer(self, reply: trio.MemorySendChannel[Reply] | None, answer: Reply) -> None:
        if answer.error is None:
            self._handled += 1
        else:
            self._failed += 1
            self._last_error = f"{type(answer.error).__name__}: {answer.error}"
        if reply is None:
            return
        # The caller may have given up (AskTimeout) in the meantime.
        with reply, contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            reply.send_nowait(answer)

    def _account(self, result: _BatchResult) -> None:
        size = len(result.replies)
        self._batches += result.runs
        self._writes += size
        self._last_batch_size = size
        self._max_batch_seen = max(self._max_batch_seen, size)
        if result.committed:
            if result.storage_failed:  # a write failed on its own for the disk
                self._set_writable(False, result.failure)
            else:
                self._set_writable(True, None)
            assert result.commit_seconds is not None
            self._commits += 1
            self._commit_seconds_total += result.commit_seconds
            self._commit_ms_last = result.commit_seconds * 1000
            if self.commit_observer is not None:
                self.commit_observer(result.commit_seconds)
        else:
            self._commit_failures += 1
            if result.storage_failed:
                self._set_writable(False, result.failure)
            self._last_error = f"batch of {size} not committed: {result.failure}"

    # -- the writer thread ---------------------------------------------------------

    def _authorize(
        self,
        action: int,
        arg1: str | None,
        arg2: str | None,
        dbname: str | None,
        source: str | None,
    ) -> int:
        if self._guard and (
            action == sqlite3.SQLITE_TRANSACTION
            or (action == sqlite3.SQLITE_SAVEPOINT and arg2 == _SAVEPOINT_NAME)
        ):
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    def _execute_batch(
        self,
        fns: list[Callable[[sqlite_utils.Database], Any]],
        durable: bool = True,
        hooks: Sequence[CommitHook | None] = (),
    ) -> _BatchResult:
        """Run `fns` in one transaction; `durable`: commit with an fsync (see the module).

        `hooks[i]`, if any, is handed `fns[i]`'s value once the batch committed."""
        db = self._db
        if db is None:  # pragma: no cover - serve only runs between setup and teardown
            raise RuntimeError("the store is not open")
        conn = db.conn
        if durable != self._sync_full:  # a pragma, so outside the transaction
            conn.execute(_SYNC_FULL if durable else _SYNC_NORMAL)
            self._sync_full = durable
        failed: dict[int, BaseException] = {}  # writes that failed on their own
        pending = list(range(len(fns)))
        runs = 0
        while True:
            runs += 1
            answers: dict[int, Reply] = {}
            try:
                conn.execute(_BEGIN)
                for index in pending:
                    try:
                        answers[index] = self._run_one(db, fns[index])
                    except _TransactionLost as lost:
                        if _is_storage_error(lost.cause):
                            raise lost.cause from None
                        failed[index] = _caller_error(lost.cause, reading=False)
                        break
                    if answers[index].error is not None:
                        failed[index] = cast(BaseException, answers[index].error)
                else:
                    started = time.perf_counter()
                    conn.execute(_COMMIT)
                    commit_seconds = time.perf_counter() - started
                    replies = [answers.get(i) or Reply(error=failed[i]) for i in range(len(fns))]
                    if hooks:
                        self._hand_over_hooks(hooks, replies)
                    if not durable:
                        self._commits_deferred += 1
                    # A write that failed for the disk (not for its SQL) says the disk is bad.
                    disk = (
                        next((e for e in failed.values() if isinstance(e, StoreUnavailable)), None)
                        if failed
                        else None
                    )
                    failure = None if disk is None else str(disk)
                    return _BatchResult(
                        replies, runs, True, commit_seconds, failure, disk is not None
                    )
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute(_ROLLBACK)
                replies = [
                    Reply(error=failed[i]) if i in failed else Reply(error=self._not_committed(exc))
                    for i in range(len(fns))
                ]
                failure = f"{exc} ({_error_name(exc)})"
                return _BatchResult(replies, runs, False, None, failure, _is_storage_error(exc))
            # A write destroyed the transaction: what ran before it was rolled
            # back with it. Run the batch again without the writes that failed.
            if conn.in_transaction:  # pragma: no cover - _TransactionLost means it is gone
                conn.execute(_ROLLBACK)
            pending = [i for i in pending if i not in failed]

    def _hand_over_hooks(self, hooks: Sequence[CommitHook | None], replies: list[Reply]) -> None:
        """Queue the committed writes' hooks for the trio thread, in commit order."""
        token = self._token
        if token is None:
            return
        for hook, reply in zip(hooks, replies, strict=False):
            if hook is not None and reply.error is None:
                with contextlib.suppress(trio.RunFinishedError):
                    token.run_sync_soon(_run_hook, hook, reply.value)

    def _not_committed(self, exc: sqlite3.Error) -> LokiError:
        message = f"{self.name}: nothing of this write was committed: {exc}"
        details = {"sqlite_error": _error_name(exc)}
        if _is_storage_error(exc):
            return StoreUnavailable(message, details=details)
        # Not the disk: e.g. a deferred constraint that failed at COMMIT (a bug).
        return StoreError(message, details=details)

    def _run_one(
        self, db: sqlite_utils.Database, fn: Callable[[sqlite_utils.Database], Any]
    ) -> Reply:
        """Run one write in its own savepoint; a failure rolls back only that savepoint.

        Raises `_TransactionLost` if the write ended the batch's transaction,
        and `sqlite3.Error` if the savepoint itself cannot be handled.
        """
        conn = db.conn
        conn.execute(_SAVEPOINT)
        self._guard = True
        try:
            value = fn(db)
            _reject_lazy(value, "write")
        except Exception as exc:
            self._guard = False
            if not conn.in_transaction:
                raise _TransactionLost(exc) from exc
            conn.execute(_ROLLBACK_TO)
            conn.execute(_RELEASE)
            return Reply(error=_caller_error(exc, reading=False))
        finally:
            self._guard = False
        if not conn.in_transaction:
            raise _TransactionLost(
                StoreError("the write function ended the batch's transaction; it must not")
            )
        conn.execute(_RELEASE)
        return Reply(value=value)

    # -- readers -----------------------------------------------------------------

    def _read_sync(self, fn: Callable[[sqlite_utils.Database], T], generation: int) -> T:
        db = self._checkout_reader()
        conn = db.conn
        healthy = True
        try:
            try:
                conn.execute("BEGIN")
            except sqlite3.Error as exc:
                healthy = False
                raise _caller_error(exc, reading=True) from exc
            try:
                value = fn(db)
                _reject_lazy(value, "read")
            except Exception as exc:
                error = _caller_error(exc, reading=True)
                if error is exc:
                    raise
                raise error from exc
            finally:
                # A read-only transaction: ending it releases the snapshot.
                if conn.in_transaction:
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        healthy = False
            return value
        finally:
            self._checkin_reader(db, generation, healthy)

    def _checkout_reader(self) -> sqlite_utils.Database:
        with self._pool_lock:
            if self._idle_readers:
                return self._idle_readers.pop()
            self._readers_open += 1
        try:
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            try:
                conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                conn.execute("PRAGMA query_only = ON")
                return sqlite_utils.Database(conn)
            except BaseException:
                conn.close()
                raise
        except sqlite3.Error as exc:
            with self._pool_lock:
                self._readers_open -= 1
            raise StoreUnavailable(
                f"{self.name}: cannot open a reader on {self.path}: {exc}",
                details={"sqlite_error": _error_name(exc)},
            ) from exc

    def _checkin_reader(self, db: sqlite_utils.Database, generation: int, healthy: bool) -> None:
        with self._pool_lock:
            keep = healthy and generation == self._generation and self._db is not None
            if keep:
                self._idle_readers.append(db)
                return
            self._readers_open -= 1
        _close_all([db])

    # -- introspection -------------------------------------------------------------

    def statistics(self) -> StoreStatistics:
        base = super().statistics()
        return StoreStatistics(
            **attrs.asdict(base, recurse=False),
            path=str(self.path),
            schema_version=self._schema_version,
            writable=self.writable,
            batches=self._batches,
            writes=self._writes,
            writes_abandoned=self._abandoned,
            commit_failures=self._commit_failures,
            last_batch_size=self._last_batch_size,
            max_batch_seen=self._max_batch_seen,
            commit_latency_ms_last=self._commit_ms_last,
            commit_latency_ms_avg=(
                self._commit_seconds_total * 1000 / self._commits if self._commits else None
            ),
            commits_deferred=self._commits_deferred,
            read_count=self._reads,
            readers_busy=self._reader.statistics().running,
            readers_open=self._readers_open,
        )


# -- helpers -----------------------------------------------------------------------

_MOVE_ASIDE = (
    "restore it from a backup, or move it aside (with its -wal and -shm files) "
    "and lokid starts with an empty store"
)


def _one_line(problems: list[str], limit: int = 160) -> str:
    lines = [line.strip() for text in problems for line in text.splitlines()]
    text = "; ".join(line for line in lines if line and not line.startswith("***"))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _too_new(path: pathlib.Path, found: int, known: int) -> str:
    return (
        f"{path} has schema version {found}, newer than this lokid knows ({known}): "
        "run the lokid version that wrote it, or restore a backup made by this version"
    )


def _check_path(path: pathlib.Path) -> None:
    folder = path.parent
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreOpenError(
            f"cannot create the folder {folder} for the database: {exc.strerror or exc}: "
            "create it (mode 0700) or choose another data directory"
        ) from None
    if path.is_dir():
        raise StoreOpenError(
            f"{path} is a directory, not a database file: move it aside "
            "or choose another data directory"
        )
    uid = os.geteuid()
    if not os.access(folder, os.R_OK | os.W_OK | os.X_OK):
        raise StoreOpenError(
            f"cannot open {path}: its folder is not writable by uid {uid} (SQLite keeps its "
            "-wal and -shm files there): fix the folder's owner or mode"
        )
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise StoreOpenError(
            f"cannot open {path}: permission denied for uid {uid}: fix the file's owner or "
            "mode, or run lokid as its owner"
        )


def _describe_open_error(path: pathlib.Path, exc: sqlite3.Error) -> str:
    code = _primary_code(exc)
    if code == _SQLITE_NOTADB:
        return f"{path} is not a SQLite database (or its header is damaged): {_MOVE_ASIDE}"
    if code == _SQLITE_CORRUPT:
        return f"{path} is corrupt ({exc}): {_MOVE_ASIDE}"
    if code in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return f"{path} is locked by another process: stop the other program using it"
    if code == _SQLITE_FULL:
        return f"no space left on the device of {path}: free some disk space"
    if code == _SQLITE_READONLY:
        return f"{path} is read-only (file, folder or mount): make it writable for lokid"
    if code == _SQLITE_IOERR:
        return f"I/O error on {path} ({exc}): check the disk; {_MOVE_ASIDE}"
    if code == _SQLITE_CANTOPEN:
        return f"cannot open {path} ({exc}): check that it is a file lokid may read and write"
    return f"cannot open {path}: {exc} ({_error_name(exc)})"


def _primary_code(exc: BaseException) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def _error_name(exc: BaseException) -> str:
    return str(getattr(exc, "sqlite_errorname", None) or type(exc).__name__)


def _is_storage_error(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.Error) and _primary_code(exc) in _STORAGE_CODES


def _caller_error(exc: BaseException, *, reading: bool) -> BaseException:
    """What a caller gets for an exception raised while its function ran."""
    if not isinstance(exc, sqlite3.Error):
        return exc  # a LokiError, or the caller's own exception
    details = {"sqlite_error": _error_name(exc)}
    code = _primary_code(exc)
    if isinstance(exc, sqlite3.IntegrityError):
        return Conflict(f"constraint failed: {exc}", details=details)
    if code == _SQLITE_AUTH:
        return StoreError(
            "a write function must not BEGIN, COMMIT or ROLLBACK: the store commits each batch",
            details=details,
        )
    if reading and code == _SQLITE_READONLY:
        return StoreError(f"a read function tried to write ({exc}): use write()", details=details)
    if code in _STORAGE_CODES:
        return StoreUnavailable(f"the database cannot do this now: {exc}", details=details)
    return StoreError(f"SQLite error: {exc}", details=details)


def _run_hook(hook: CommitHook, value: Any) -> None:
    """One commit hook, on the trio thread (`run_sync_soon`: it must not raise)."""
    try:
        hook(value)
    except Exception:
        log.exception("a commit hook failed; the write itself is committed")


def _reject_lazy(value: object, kind: str) -> None:
    lazy = isinstance(value, types.GeneratorType) or (
        isinstance(value, sqlite3.Cursor) and value.description is not None
    )
    if lazy:
        raise StoreError(
            f"a {kind} function returned {type(value).__name__}, which would be consumed "
            "outside its transaction: return a list (e.g. list(db.query(...)))"
        )


def _close_all(databases: Sequence[sqlite_utils.Database | None]) -> None:
    for db in databases:
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.close()


def _fsync_dir(folder: pathlib.Path) -> None:
    """Make the database's directory entry durable (the file may be new)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
