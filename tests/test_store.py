"""The store actor on real SQLite files: open, migrations, group commit, reads, failures."""

from __future__ import annotations

import contextlib
import functools
import os
import pathlib
import resource
import signal
import sqlite3
import stat
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import sqlite_utils
import trio
import trio.testing

from lokid.actors import StoreActor, StoreStatistics
from lokid.actors.store import SYNC_FOLLOWS, DaemonRun, StoreError, StoreUnavailable
from lokid.errors import AskTimeout, Conflict, StoreOpenError
from lokid.migrations import MIGRATIONS, Migration, check_sequence, latest_version

from .child_status import StubChildStatus

# The store's mechanism is tested against the first migration only, so that
# later issues' migrations (events, sessions, ...) do not change these tests.
BASE_MIGRATIONS = MIGRATIONS[:1]

WAIT = 5.0  # the bound of every wait in this file


@contextlib.asynccontextmanager
async def running(
    store: StoreActor, status: StubChildStatus | None = None
) -> AsyncIterator[StoreActor]:
    """Run `store` until the block ends, then stop it gracefully and wait for it."""
    status = status or StubChildStatus()
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(store.run, task_status=status))
            await status.started_event.wait()
            yield store
            status.shutdown_requested.set()


def db_path(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "data" / "lokid.db"


def raw(path: pathlib.Path) -> sqlite3.Connection:
    """A plain connection to inspect a file behind the store's back."""
    return sqlite3.connect(path, isolation_level=None)


def create_items(db: sqlite_utils.Database) -> None:
    db.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE)")


MIGRATION_ITEMS = Migration(2, "items", create_items)


def insert(name: str) -> Callable[[sqlite_utils.Database], int]:
    def fn(db: sqlite_utils.Database) -> int:
        cursor = db.execute("INSERT INTO items (name) VALUES (?)", (name,))
        return int(cursor.lastrowid or 0)

    return fn


def names(db: sqlite_utils.Database) -> list[str]:
    return [row[0] for row in db.execute("SELECT name FROM items ORDER BY id")]


def items_store(tmp_path: pathlib.Path, **kwargs: Any) -> StoreActor:
    return StoreActor(db_path(tmp_path), migrations=(*BASE_MIGRATIONS, MIGRATION_ITEMS), **kwargs)


async def queue_writes(
    nursery: trio.Nursery, store: StoreActor, fns: list[Callable[[sqlite_utils.Database], Any]]
) -> list[Any]:
    """Put `fns` in the mailbox (in order) and collect each caller's value or exception."""
    outcomes: list[Any] = [None] * len(fns)

    async def one(index: int) -> None:
        try:
            outcomes[index] = await store.write(fns[index], timeout=WAIT)
        except Exception as exc:
            outcomes[index] = exc

    for index in range(len(fns)):
        nursery.start_soon(one, index)
        await trio.testing.wait_all_tasks_blocked()  # keeps the mailbox order
    return outcomes


@contextlib.asynccontextmanager
async def one_batch(
    store: StoreActor, fns: list[Callable[[sqlite_utils.Database], Any]]
) -> AsyncIterator[list[Any]]:
    """Queue `fns` before the actor runs (so they form one batch), run it, yield the outcomes."""
    status = StubChildStatus()
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as callers:
                outcomes = await queue_writes(callers, store, fns)
                nursery.start_soon(functools.partial(store.run, task_status=status))
            yield outcomes
            status.shutdown_requested.set()


# -- open and migrations -------------------------------------------------------------


async def test_open_creates_folder_and_applies_migrations(tmp_path: pathlib.Path) -> None:
    path = db_path(tmp_path)
    async with running(StoreActor(path, migrations=BASE_MIGRATIONS)) as store:
        stats = store.statistics()
        assert isinstance(stats, StoreStatistics)
        assert stats.writable
        assert (stats.running, stats.schema_version, stats.path) == (True, 1, str(path))
        tables = await store.read(lambda db: sorted(db.table_names()))
    assert tables == ["daemon_runs", "meta", "schema_migrations"]
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    with contextlib.closing(raw(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (1,)
        rows = conn.execute("SELECT version, name FROM schema_migrations").fetchall()
        assert rows == [(1, "meta and daemon_runs")]
    assert not store.writable
    assert not store.statistics().running


async def test_reopen_is_idempotent(tmp_path: pathlib.Path) -> None:
    path = db_path(tmp_path)
    async with running(StoreActor(path, migrations=BASE_MIGRATIONS)):
        pass
    with contextlib.closing(raw(path)) as conn:
        first = conn.execute("SELECT * FROM schema_migrations").fetchall()
    store = StoreActor(path, migrations=BASE_MIGRATIONS)
    for _ in range(2):  # also the same actor object twice (a supervisor restart)
        async with running(store):
            assert store.statistics().schema_version == 1
    with contextlib.closing(raw(path)) as conn:
        assert conn.execute("SELECT * FROM schema_migrations").fetchall() == first
        assert conn.execute("PRAGMA user_version").fetchone() == (1,)


async def test_appended_migration_is_applied_once(tmp_path: pathlib.Path) -> None:
    async with running(StoreActor(db_path(tmp_path), migrations=BASE_MIGRATIONS)):
        pass
    calls: list[int] = []

    def counted(db: sqlite_utils.Database) -> None:
        calls.append(1)
        create_items(db)

    migrations = (*BASE_MIGRATIONS, Migration(2, "items", counted))
    for _ in range(2):
        async with running(StoreActor(db_path(tmp_path), migrations=migrations)) as store:
            assert store.statistics().schema_version == 2
            assert await store.read(lambda db: db["items"].exists())
    assert calls == [1]
    with contextlib.closing(raw(db_path(tmp_path))) as conn:
        rows = conn.execute("SELECT version, name FROM schema_migrations ORDER BY version")
        assert rows.fetchall() == [(1, "meta and daemon_runs"), (2, "items")]


async def test_failing_migration_leaves_the_previous_version(tmp_path: pathlib.Path) -> None:
    def broken(db: sqlite_utils.Database) -> None:
        create_items(db)
        raise RuntimeError("boom")

    path = db_path(tmp_path)
    store = StoreActor(path, migrations=(*BASE_MIGRATIONS, Migration(2, "broken", broken)))
    with trio.fail_after(WAIT), pytest.raises(StoreOpenError) as info:
        await store.run()
    assert str(path) in info.value.message
    assert "migration 2 (broken) failed: RuntimeError: boom" in info.value.message
    with contextlib.closing(raw(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (1,)
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert "items" not in tables


def test_migration_versions_must_be_1_to_n() -> None:
    check_sequence(MIGRATIONS)
    with pytest.raises(ValueError, match=r"1\.\.N"):
        check_sequence((*BASE_MIGRATIONS, Migration(3, "gap", create_items)))


async def test_wal_synchronous_full_and_foreign_keys(tmp_path: pathlib.Path) -> None:
    path = db_path(tmp_path)
    async with running(StoreActor(path, migrations=BASE_MIGRATIONS)) as store:

        def pragmas(db: sqlite_utils.Database) -> tuple[Any, ...]:
            return tuple(
                db.execute(f"PRAGMA {name}").fetchone()[0]
                for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
            )

        # On the writer connection, where it matters (synchronous is per connection).
        assert await store.write(pragmas) == ("wal", 2, 1, 5000)  # 2 = FULL
    # WAL is recorded in the file header: bytes 18 and 19 are 2 for WAL.
    assert path.read_bytes()[18:20] == b"\x02\x02"


def synchronous(db: sqlite_utils.Database) -> int:
    """The writer connection's `synchronous` while this write's batch runs (1 NORMAL, 2 FULL)."""
    return int(db.execute("PRAGMA synchronous").fetchone()[0])


async def write_marked(store: StoreActor, fn: Callable[[sqlite_utils.Database], Any]) -> Any:
    """`store.write(fn)` from a task marked as the HTTP layer marks an audited request's."""
    token = SYNC_FOLLOWS.set(trio.lowlevel.current_task())
    try:
        return await store.write(fn, timeout=WAIT)
    finally:
        SYNC_FOLLOWS.reset(token)


async def test_a_write_whose_audit_commit_follows_skips_only_its_own_fsync(
    tmp_path: pathlib.Path,
) -> None:
    async with running(StoreActor(db_path(tmp_path), migrations=BASE_MIGRATIONS)) as store:
        assert await store.write(synchronous) == 2
        assert await write_marked(store, synchronous) == 1
        assert await store.write(synchronous) == 2  # back to FULL for everyone else
        assert store.statistics().commits_deferred == 1
        assert await store.write_alone(synchronous) == 2  # the audit writer's path

        # A task spawned by a marked task inherits the variable but not the exemption
        # (a session actor started by a request commits durably).
        inherited: list[int] = []

        async def spawned() -> None:
            inherited.append(await store.write(synchronous))

        token = SYNC_FOLLOWS.set(trio.lowlevel.current_task())
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(spawned)
        finally:
            SYNC_FOLLOWS.reset(token)
        assert inherited == [2]
        assert store.statistics().commits_deferred == 1


@pytest.mark.parametrize(("marked", "expected"), [((True, True), 1), ((True, False), 2)])
async def test_a_batch_skips_its_fsync_only_if_every_write_in_it_may(
    tmp_path: pathlib.Path, marked: tuple[bool, bool], expected: int
) -> None:
    store = StoreActor(db_path(tmp_path), migrations=BASE_MIGRATIONS)
    status = StubChildStatus()
    modes: list[int] = []

    async def one(mark: bool) -> None:
        modes.append(await (write_marked(store, synchronous) if mark else store.write(synchronous)))

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as callers:
                for mark in marked:  # queued before the actor runs: one batch
                    callers.start_soon(one, mark)
                    await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(functools.partial(store.run, task_status=status))
            status.shutdown_requested.set()
    assert modes == [expected, expected]
    assert store.statistics().max_batch_seen == 2


# -- errors at start -------------------------------------------------------------------


async def open_error(store: StoreActor) -> str:
    with trio.fail_after(WAIT), pytest.raises(StoreOpenError) as info:
        await store.run()
    message = info.value.message
    assert "\n" not in message
    assert str(store.path) in message
    assert not store.statistics().running
    return message


async def test_garbage_file_is_refused(tmp_path: pathlib.Path) -> None:
    path = db_path(tmp_path)
    path.parent.mkdir()
    garbage = bytes(range(256)) * 64
    path.write_bytes(garbage)
    message = await open_error(StoreActor(path, migrations=BASE_MIGRATIONS))
    assert "is not a SQLite database" in message
    assert "restore it from a backup, or move it aside" in message
    assert path.read_bytes() == garbage  # refused without touching it


async def test_corrupt_pages_are_refused(tmp_path: pathlib.Path) -> None:
    path = db_path(tmp_path)
    path.parent.mkdir()
    with contextlib.closing(raw(path)) as conn:
        conn.execute("BEGIN")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, s TEXT)")
        conn.executemany("INSERT INTO t (s) VALUES (?)", [(f"row {i} " * 5,) for i in range(2000)])
        conn.execute("CREATE INDEX t_s ON t (s)")
        conn.execute("COMMIT")
    with path.open("r+b") as file:
        file.seek(4096 * 30)
        file.write(b"\xa5" * 4096 * 2)
    message = await open_error(StoreActor(path, migrations=BASE_MIGRATIONS))
    assert "is corrupt" in message
    assert "restore it from a backup" in message


async def test_directory_is_refused(tmp_path: pathlib.Path) -> None:
    path = db_path(tmp_path)
    path.mkdir(parents=True)
    assert "is a directory" in await open_error(StoreActor(path, migrations=BASE_MIGRATIONS))


async def test_schema_from_the_future_is_refused(tmp_path: pathlib.Path) -> None:
    path = db_path(tmp_path)
    async with running(StoreActor(path, migrations=BASE_MIGRATIONS)):
        pass
    with contextlib.closing(raw(path)) as conn:
        conn.execute("PRAGMA user_version = 99")
    message = await open_error(StoreActor(path, migrations=BASE_MIGRATIONS))
    assert "schema version 99, newer than this lokid knows (1)" in message


# -- group commit ------------------------------------------------------------------------


@pytest.mark.parametrize("group_window", [0.002, 0.0])
async def test_concurrent_writes_are_grouped(tmp_path: pathlib.Path, group_window: float) -> None:
    # With no window, batches form from what queued up during the previous commit.
    async with running(items_store(tmp_path, group_window=group_window)) as store:

        async def writer(task: int) -> None:
            for n in range(10):
                await store.write(insert(f"{task}-{n}"), timeout=WAIT)

        async with trio.open_nursery() as nursery:
            for task in range(50):
                nursery.start_soon(writer, task)
        stats = store.statistics()
        assert len(await store.read(names)) == 500
    assert (stats.writes, stats.handled, stats.failed) == (500, 500, 0)
    assert stats.batches < 500
    assert stats.max_batch_seen > 1
    assert stats.commit_latency_ms_avg is not None


async def test_failing_write_rolls_back_only_itself(tmp_path: pathlib.Path) -> None:
    def fails(db: sqlite_utils.Database) -> None:
        insert("doomed")(db)
        raise ValueError("not this one")

    store = items_store(tmp_path)
    async with one_batch(store, [insert("a"), fails, insert("b")]) as outcomes:
        assert await store.read(names) == ["a", "b"]
        stats = store.statistics()
    assert outcomes[0] == 1
    assert isinstance(outcomes[1], ValueError)
    assert outcomes[2] == 2
    assert (stats.batches, stats.last_batch_size, stats.handled, stats.failed) == (1, 3, 2, 1)


async def test_commit_hooks_run_in_commit_order_before_the_caller_resumes(
    tmp_path: pathlib.Path,
) -> None:
    """50 tasks x 10 writes, grouped and alone: each hook sees its write's value, once,
    in the order the writer thread ran the writes (the commit order), and before
    `write` returns to its caller - whatever order trio resumes the callers in."""
    ran: list[str] = []  # appended on the writer thread, in execution order
    hooked: list[str] = []
    returned_after_hook: list[bool] = []

    def named(name: str) -> Callable[[sqlite_utils.Database], str]:
        def fn(db: sqlite_utils.Database) -> str:
            insert(name)(db)
            ran.append(name)
            return name

        return fn

    async with running(items_store(tmp_path)) as store:

        async def writer(task: int) -> None:
            for n in range(10):
                name = f"{task}-{n}"
                value = await store.write(named(name), timeout=WAIT, on_commit=hooked.append)
                returned_after_hook.append(value in hooked)

        async with trio.open_nursery() as nursery:
            for task in range(50):
                nursery.start_soon(writer, task)
        stats = store.statistics()
        assert await store.read(names) == ran  # ids follow the commit order too
    assert stats.max_batch_seen > 1  # batches of several writes, not only lone ones
    assert len(ran) == 500
    assert hooked == ran
    assert all(returned_after_hook)


async def test_failed_writes_call_no_hook_and_a_failing_hook_is_logged(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    hooked: list[Any] = []

    def broken(value: Any) -> None:
        raise RuntimeError("listener gone")

    def fails(db: sqlite_utils.Database) -> None:
        raise ValueError("not this one")

    async with running(items_store(tmp_path)) as store:
        with pytest.raises(ValueError, match="not this one"):
            await store.write(fails, on_commit=hooked.append)
        await store.write(insert("a"), on_commit=hooked.append)
        with pytest.raises(Conflict):
            await store.write(insert("a"), on_commit=hooked.append)  # UNIQUE: refused
        assert await store.write(insert("b"), on_commit=broken) == 2
        assert await store.write(insert("c"), on_commit=hooked.append) == 3  # still serving
    assert hooked == [1, 3]
    assert "a commit hook failed" in caplog.text
    assert "listener gone" in caplog.text


async def test_a_batch_that_does_not_commit_calls_no_hook(tmp_path: pathlib.Path) -> None:
    path = db_path(tmp_path)
    hooked: list[Any] = []
    async with running(items_store(tmp_path)) as store:
        await store.write(insert("before"), on_commit=hooked.append)
        files = [path, path.with_name(path.name + "-wal")]
        limit = max(f.stat().st_size for f in files) + 64 * 1024
        big = "x" * (limit + 256 * 1024)  # fits SQLite's page cache: written at COMMIT
        with file_size_limit(limit), pytest.raises(StoreUnavailable):
            await store.write(insert(big), on_commit=hooked.append)
        await store.write(insert("after"), on_commit=hooked.append)
    assert hooked == [1, 2]  # the failed commit's rowid 2 was never announced; "after" got 2


async def test_integrity_error_is_conflict_and_the_store_keeps_serving(
    tmp_path: pathlib.Path,
) -> None:
    async with running(items_store(tmp_path)) as store:
        await store.write(insert("a"))
        with pytest.raises(Conflict) as info:
            await store.write(insert("a"))
        assert info.value.code == "CONFLICT"
        assert info.value.details["sqlite_error"] == "SQLITE_CONSTRAINT_UNIQUE"
        with pytest.raises(StoreError, match="no such table"):
            await store.write(lambda db: db.execute("INSERT INTO nowhere VALUES (1)"))
        await store.write(insert("b"))
        assert await store.read(names) == ["a", "b"]
        stats = store.statistics()
    assert (stats.crashes, stats.failed, stats.handled) == (0, 2, 2)
    assert stats.writable


async def test_a_write_cannot_end_the_batch_transaction(tmp_path: pathlib.Path) -> None:
    def commits(db: sqlite_utils.Database) -> None:
        insert("sneaky")(db)
        db.conn.commit()

    store = items_store(tmp_path)
    async with one_batch(store, [insert("a"), commits, insert("b")]) as outcomes:
        assert await store.read(names) == ["a", "b"]
    assert isinstance(outcomes[1], StoreError)
    assert "must not BEGIN, COMMIT or ROLLBACK" in str(outcomes[1])


async def test_trigger_rollback_fails_its_write_and_reruns_the_others(
    tmp_path: pathlib.Path,
) -> None:
    def forbid(db: sqlite_utils.Database) -> None:
        create_items(db)
        db.execute(
            "CREATE TRIGGER no_x BEFORE INSERT ON items WHEN NEW.name = 'x' "
            "BEGIN SELECT RAISE(ROLLBACK, 'x is forbidden'); END"
        )

    store = StoreActor(
        db_path(tmp_path), migrations=(*BASE_MIGRATIONS, Migration(2, "items", forbid))
    )
    async with one_batch(store, [insert("a"), insert("x"), insert("b")]) as outcomes:
        assert await store.read(names) == ["a", "b"]
        stats = store.statistics()
    assert isinstance(outcomes[1], Conflict)
    assert "x is forbidden" in str(outcomes[1])
    assert outcomes[0] == 1 and outcomes[2] == 2
    assert (stats.batches, stats.writes, stats.failed) == (2, 3, 1)


async def test_lazy_results_are_refused(tmp_path: pathlib.Path) -> None:
    async with running(items_store(tmp_path)) as store:

        def lazy(db: sqlite_utils.Database) -> Iterator[dict[str, Any]]:
            insert("a")(db)
            return db.query("SELECT * FROM items")

        with pytest.raises(StoreError, match="return a list"):
            await store.write(lazy)
        with pytest.raises(StoreError, match="return a list"):
            await store.read(lambda db: db.execute("SELECT * FROM items"))
        assert await store.read(names) == []


async def test_timed_out_write_in_the_mailbox_is_not_run(tmp_path: pathlib.Path) -> None:
    ran: list[str] = []

    def record(db: sqlite_utils.Database) -> None:
        ran.append("ran")

    store = items_store(tmp_path)
    with pytest.raises(AskTimeout):
        await store.write(record, timeout=0.01)  # nobody serves the mailbox yet
    async with running(store):
        await store.write(insert("a"))  # (alone, maybe, while the store's task drops the other)
        await trio.testing.wait_all_tasks_blocked()
        stats = store.statistics()
    assert ran == []
    assert (stats.writes_abandoned, stats.writes) == (1, 1)


# -- reads -------------------------------------------------------------------------------


async def test_reads_run_while_a_write_is_in_progress(tmp_path: pathlib.Path) -> None:
    inside = threading.Event()
    release = threading.Event()

    def slow(db: sqlite_utils.Database) -> int:
        value = insert("slow")(db)
        inside.set()
        assert release.wait(WAIT)
        return value

    async with running(items_store(tmp_path, readers=2)) as store:
        await store.write(insert("a"))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.write, slow)
            assert await trio.to_thread.run_sync(inside.wait, WAIT)
            # The writer is inside its transaction; reads neither wait for it nor see it.
            seen: list[list[str]] = []

            async def reader() -> None:
                seen.append(await store.read(names))

            async with trio.open_nursery() as readers:
                for _ in range(4):
                    readers.start_soon(reader)
            assert seen == [["a"]] * 4
            assert not release.is_set()
            release.set()
        assert await store.read(names) == ["a", "slow"]
        stats = store.statistics()
    assert stats.read_count == 5
    assert stats.readers_busy == 0
    assert 1 <= stats.readers_open <= 2


async def test_read_functions_cannot_write(tmp_path: pathlib.Path) -> None:
    async with running(items_store(tmp_path)) as store:
        with pytest.raises(StoreError, match="read function tried to write"):
            await store.read(insert("a"))
        assert await store.read(names) == []


async def test_write_alone_commits_from_the_callers_task_beside_batches(
    tmp_path: pathlib.Path,
) -> None:
    async with running(items_store(tmp_path)) as store:
        answers: dict[str, Any] = {}

        async def batched(name: str) -> None:
            answers[name] = await store.write(insert(name))

        async def alone(name: str) -> None:
            answers[name] = await store.write_alone(insert(name))

        async with trio.open_nursery() as nursery:
            for n in range(20):  # the two kinds interleave; the writer limiter keeps one writer
                nursery.start_soon(batched, f"b{n}")
                nursery.start_soon(alone, f"a{n}")
        assert sorted(answers.values()) == list(range(1, 41))
        assert sorted(await store.read(names)) == sorted(answers)
        with pytest.raises(Conflict):
            await store.write_alone(insert("a0"))
        with pytest.raises(ValueError, match="caller's bug"):
            await store.write_alone(lambda db: (_ for _ in ()).throw(ValueError("caller's bug")))
        stats = store.statistics()
    assert (stats.failed, stats.handled) == (2, 40)
    assert stats.writable and stats.crashes == 0


async def test_write_alone_when_not_open_is_unavailable(tmp_path: pathlib.Path) -> None:
    with pytest.raises(StoreUnavailable):
        await items_store(tmp_path).write_alone(insert("a"))


async def test_write_alone_gives_up_on_a_busy_writer_without_running(
    tmp_path: pathlib.Path,
) -> None:
    inside = threading.Event()
    release = threading.Event()

    def hold() -> None:  # keeps the writer thread busy until released
        inside.set()
        assert release.wait(WAIT)

    async with running(items_store(tmp_path)) as store, trio.open_nursery() as nursery:
        nursery.start_soon(store._writer.run, hold)
        assert await trio.to_thread.run_sync(inside.wait, WAIT)
        try:
            with pytest.raises(AskTimeout):
                await store.write_alone(insert("late"), timeout=0.2)
        finally:
            release.set()
        assert store._writer.statistics().withdrawn == 1  # taken out of the queue, never run
        assert await store.read(names) == []


async def test_read_when_not_open_is_unavailable(tmp_path: pathlib.Path) -> None:
    with pytest.raises(StoreUnavailable):
        await StoreActor(db_path(tmp_path), migrations=BASE_MIGRATIONS).read(names)


# -- stop, failures, daemon runs ----------------------------------------------------------


async def test_graceful_stop_runs_every_queued_write(tmp_path: pathlib.Path) -> None:
    inside = threading.Event()
    release = threading.Event()

    def slow(db: sqlite_utils.Database) -> None:
        inside.set()
        assert release.wait(WAIT)

    store = items_store(tmp_path, max_batch=4)
    store.direct_when_idle = False  # `slow` must hold the actor's own batch, not the caller's
    status = StubChildStatus()
    outcomes: list[Any] = []
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(store.run, task_status=status))
            await status.started_event.wait()
            nursery.start_soon(store.write, slow)
            assert await trio.to_thread.run_sync(inside.wait, WAIT)
            async with trio.open_nursery() as callers:
                outcomes = await queue_writes(callers, store, [insert(f"q{i}") for i in range(20)])
                assert store.statistics().mailbox_used == 20
                status.shutdown_requested.set()
                await trio.testing.wait_all_tasks_blocked()
                release.set()
        # Here the actor's run has returned.
    assert outcomes == list(range(1, 21))
    assert not store.writable
    with contextlib.closing(raw(store.path)) as conn:
        assert conn.execute("SELECT count(*) FROM items").fetchone() == (20,)


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Make every write past `limit` bytes into a file fail with EFBIG (a real I/O error)."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


async def test_commit_failure_fails_the_batch_and_clears_writable(
    tmp_path: pathlib.Path,
) -> None:
    path = db_path(tmp_path)
    async with running(items_store(tmp_path)) as store:
        await store.write(insert("before"))
        files = [path, path.with_name(path.name + "-wal")]
        limit = max(f.stat().st_size for f in files) + 64 * 1024
        big = "x" * (limit + 256 * 1024)  # fits SQLite's page cache: written at COMMIT
        with file_size_limit(limit), pytest.raises(StoreUnavailable) as info:
            await store.write(insert(big))
        assert info.value.code == "UNAVAILABLE"
        assert "nothing of this write was committed" in info.value.message
        stats = store.statistics()
        assert (stats.commit_failures, stats.writable, stats.running) == (1, False, True)
        assert not store.writable
        # The disk is fine again: the next commit succeeds and says so.
        await store.write(insert("after"))
        assert store.statistics().writable
        assert await store.read(names) == ["before", "after"]


async def test_daemon_runs_are_recorded(tmp_path: pathlib.Path) -> None:
    path = db_path(tmp_path)
    async with running(StoreActor(path, migrations=BASE_MIGRATIONS)) as store:
        assert not await store.previous_run_unclean()
        first = await store.record_start(os.getpid(), "0.1.0")
    async with running(
        StoreActor(path, migrations=BASE_MIGRATIONS)
    ) as store:  # the first run never said stop
        assert await store.previous_run_unclean()
        second = await store.record_start(4242, "0.1.1")
        assert await store.previous_run_unclean(second)
        await store.record_stop(second)
    async with running(StoreActor(path, migrations=BASE_MIGRATIONS)) as store:
        assert not await store.previous_run_unclean()
        rows = await store.read(
            lambda db: list(db.query("SELECT id, pid, version, clean FROM daemon_runs"))
        )
    assert rows == [
        {"id": first, "pid": os.getpid(), "version": "0.1.0", "clean": 0},
        {"id": second, "pid": 4242, "version": "0.1.1", "clean": 1},
    ]


async def test_the_previous_run_is_read_with_when_it_started(tmp_path: pathlib.Path) -> None:
    """What the daemon's start-up warning about an unclean previous run names."""
    path = db_path(tmp_path)
    async with running(StoreActor(path, migrations=BASE_MIGRATIONS)) as store:
        assert await store.previous_run() is None
        first = await store.record_start(4242, "0.1.0")
        second = await store.record_start(4343, "0.1.1")  # the first never said stop
        previous = await store.previous_run(second)
        started_at = await store.read(
            lambda db: db.execute(
                "SELECT started_at FROM daemon_runs WHERE id = ?", (first,)
            ).fetchone()[0]
        )
        assert previous == DaemonRun(first, 4242, started_at, "0.1.0", clean=False)
        assert started_at.endswith("Z")
        await store.record_stop(second)
        newest = await store.previous_run()
        assert newest is not None
        assert (newest.id, newest.clean) == (second, True)


async def test_every_released_migration_applies_to_a_new_database(tmp_path: pathlib.Path) -> None:
    async with running(StoreActor(db_path(tmp_path))) as store:
        assert store.statistics().schema_version == latest_version()
        tables = await store.read(lambda db: set(db.table_names()))
    assert {"daemon_runs", "meta", "schema_migrations", "events"} <= tables
