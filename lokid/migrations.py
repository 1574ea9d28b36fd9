"""Versioned schema migrations for the lokid database.

Rules of operation:

* `MIGRATIONS` is an ordered tuple; versions are 1, 2, 3, ... with no gap.
  A migration, once released, is never edited or removed: a later change to
  the schema is a new migration appended at the end.
* The version a database is at lives in `PRAGMA user_version` (in the file
  header, so it is read without any table). `schema_migrations` keeps one
  row per applied migration (`version`, `name`, `applied_at`) for people.
* `migrate` applies every pending migration in its own `BEGIN IMMEDIATE`
  transaction: the migration's statements, its `schema_migrations` row and
  the new `user_version` commit together or not at all. A database is
  therefore always exactly at one known version.
* A database at a version newer than the last migration this code knows
  was written by a newer lokid: `migrate` refuses it (`SchemaTooNew`)
  instead of guessing.
* A migration's `apply` receives the `sqlite_utils.Database` with the
  transaction already open. It must not BEGIN, COMMIT or ROLLBACK; it may
  use `db.execute`, `db.executescript` (sqlite-utils runs a script inside the
  open transaction) and the table API (`db[name].create(...)`).

This module does blocking I/O and knows nothing about trio: the store actor
calls it from a worker thread.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence

import attrs
import sqlite_utils


@attrs.frozen
class Migration:
    """One step of the schema: `apply` takes the database from `version - 1` to `version`."""

    version: int
    name: str
    apply: Callable[[sqlite_utils.Database], None]


class MigrationError(Exception):
    """Base of the failures of `migrate`; the store turns them into `StoreOpenError`."""


class SchemaTooNew(MigrationError):
    """The database is at a version newer than the last migration this code knows."""

    def __init__(self, found: int, known: int) -> None:
        super().__init__(f"schema version {found} is newer than this code knows ({known})")
        self.found = found
        self.known = known


class MigrationFailed(MigrationError):
    """A migration raised; its transaction was rolled back."""

    def __init__(self, migration: Migration, cause: BaseException) -> None:
        super().__init__(
            f"migration {migration.version} ({migration.name}) failed: "
            f"{type(cause).__name__}: {cause}"
        )
        self.migration = migration


# -- the migrations --------------------------------------------------------


def _m0001_meta_and_daemon_runs(db: sqlite_utils.Database) -> None:
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    db.execute(
        "CREATE TABLE daemon_runs ("
        " id INTEGER PRIMARY KEY,"
        " pid INTEGER,"
        " started_at TEXT,"
        " stopped_at TEXT,"
        " clean INTEGER,"
        " version TEXT"
        ")"
    )


def _m0002_events(db: sqlite_utils.Database) -> None:
    # AUTOINCREMENT: sqlite_sequence remembers the highest id ever used, so ids
    # stay strictly increasing across restarts even after retention deleted
    # every row. The bus assigns ids itself; explicit ids update the sequence.
    db.execute(
        "CREATE TABLE events ("
        " id INTEGER PRIMARY KEY AUTOINCREMENT,"
        " type TEXT NOT NULL,"
        " session_id TEXT,"
        " level INTEGER NOT NULL,"
        " timestamp TEXT NOT NULL,"
        " data TEXT NOT NULL"
        ")"
    )
    db.execute("CREATE INDEX events_session ON events (session_id, id)")
    db.execute("CREATE INDEX events_type ON events (type, id)")
    db.execute("CREATE INDEX events_timestamp ON events (timestamp)")


def _m0003_agents(db: sqlite_utils.Database) -> None:
    # One row per agent process the pool started. Identity is (pid,
    # start_ticks) of the group leader, within the boot `boot_id`: a restarted
    # daemon signals a recorded group only after checking all of them.
    db.execute(
        "CREATE TABLE agents ("
        " id INTEGER PRIMARY KEY,"
        " session_id TEXT NOT NULL,"
        " task_id TEXT,"
        " pid INTEGER NOT NULL,"
        " start_ticks INTEGER NOT NULL,"
        " argv TEXT,"
        " started_at TEXT NOT NULL,"
        " ended_at TEXT,"
        " exit_code INTEGER,"
        " end_reason TEXT,"
        " boot_id TEXT"
        ")"
    )
    # Reconciliation reads the open rows: a partial index keeps that cheap
    # however many ended rows accumulate.
    db.execute("CREATE INDEX agents_open ON agents (id) WHERE ended_at IS NULL")
    db.execute("CREATE INDEX agents_session ON agents (session_id, id)")


def _m0004_sessions_and_tasks(db: sqlite_utils.Database) -> None:
    db.execute(
        "CREATE TABLE sessions ("
        " id TEXT PRIMARY KEY,"
        " status TEXT NOT NULL,"
        " provider TEXT NOT NULL,"
        " prd TEXT NOT NULL,"
        " project_dir TEXT NOT NULL,"
        " options TEXT NOT NULL,"  # JSON, camelCase keys
        " phase TEXT,"
        " iteration INTEGER NOT NULL DEFAULT 0,"
        " created_at TEXT NOT NULL,"
        " started_at TEXT,"
        " updated_at TEXT NOT NULL,"
        " ended_at TEXT,"
        " exit_reason TEXT,"
        " cost_usd REAL NOT NULL DEFAULT 0,"
        " last_error TEXT"
        ")"
    )
    # Listing newest first, all or by status.
    db.execute("CREATE INDEX sessions_created ON sessions (created_at DESC, id DESC)")
    db.execute("CREATE INDEX sessions_status ON sessions (status, created_at DESC, id DESC)")
    # One active session per project folder: the record functions check it in
    # the writing transaction (to name the other session); this is the backstop.
    # The statuses are session_state.ACTIVE as of this migration.
    db.execute(
        "CREATE UNIQUE INDEX sessions_one_active ON sessions (project_dir)"
        " WHERE status IN ('starting', 'running', 'paused', 'stopping')"
    )
    db.execute(
        "CREATE TABLE tasks ("
        " session_id TEXT NOT NULL,"
        " id TEXT NOT NULL,"
        " title TEXT NOT NULL,"
        " description TEXT NOT NULL DEFAULT '',"
        " status TEXT NOT NULL,"
        " priority INTEGER NOT NULL,"
        " attempts INTEGER NOT NULL DEFAULT 0,"
        " agent TEXT,"
        " created_at TEXT NOT NULL,"
        " started_at TEXT,"
        " completed_at TEXT,"
        " error TEXT,"
        " source TEXT NOT NULL,"
        " position INTEGER NOT NULL,"
        " PRIMARY KEY (session_id, id)"
        ")"
    )
    # A session's tasks in order, by status (counts, the queue: priority then position).
    db.execute(
        "CREATE INDEX tasks_session_status ON tasks (session_id, status, priority, position)"
    )
    db.execute("CREATE INDEX tasks_status ON tasks (status, priority, position)")
    db.execute(
        "CREATE TABLE session_inputs ("
        " id TEXT PRIMARY KEY,"
        " session_id TEXT NOT NULL,"
        " message TEXT NOT NULL,"
        " status TEXT NOT NULL,"
        " created_at TEXT NOT NULL,"
        " applied_at TEXT"
        ")"
    )
    db.execute("CREATE INDEX session_inputs_session ON session_inputs (session_id, status, id)")


def _m0005_session_runner(db: sqlite_utils.Database) -> None:
    # What the runner needs to continue a session after a restart, and
    # Idempotency-Key answers of create routes (DESIGN.md §4: 24 h).
    db.execute("ALTER TABLE tasks ADD COLUMN acceptance TEXT NOT NULL DEFAULT '[]'")  # JSON list
    db.execute("ALTER TABLE tasks ADD COLUMN resume_id TEXT")  # provider session of a cut run
    db.execute(
        "CREATE TABLE idempotency_keys ("
        " route TEXT NOT NULL,"
        " key TEXT NOT NULL,"
        " body_sha256 TEXT NOT NULL,"
        " status INTEGER NOT NULL,"
        " response TEXT NOT NULL,"
        " created_at REAL NOT NULL,"  # unix seconds
        " PRIMARY KEY (route, key)"
        ")"
    )
    db.execute("CREATE INDEX idempotency_keys_age ON idempotency_keys (created_at)")


def _m0006_tokens_and_audit(db: sqlite_utils.Database) -> None:
    # API tokens (DESIGN.md §4): only the SHA-256 of a token is stored.
    db.execute(
        "CREATE TABLE api_tokens ("
        " id TEXT PRIMARY KEY,"  # tok-...
        " name TEXT NOT NULL,"
        " token_sha256 TEXT NOT NULL UNIQUE,"
        " scopes TEXT NOT NULL,"  # JSON list
        " created_at TEXT NOT NULL,"
        " expires_at TEXT,"
        " revoked_at TEXT,"
        " last_used_at TEXT"
        ")"
    )
    # The hash-chained audit log (DESIGN.md §7); ids are assigned by the writer.
    db.execute(
        "CREATE TABLE audit_log ("
        " id INTEGER PRIMARY KEY,"
        " timestamp TEXT NOT NULL,"
        " actor TEXT NOT NULL,"
        " action TEXT NOT NULL,"
        " resource TEXT,"
        " method TEXT,"
        " path TEXT,"
        " status INTEGER,"
        " ip TEXT,"
        " details TEXT NOT NULL,"  # JSON object
        " prev_hash TEXT NOT NULL,"
        " hash TEXT NOT NULL"
        ")"
    )
    db.execute("CREATE INDEX audit_log_timestamp ON audit_log (timestamp, id)")
    db.execute("CREATE INDEX audit_log_action ON audit_log (action, id)")
    # The chain's head, kept apart from the entries so that truncating or
    # deleting entries is detectable (one row, updated with every append).
    db.execute(
        "CREATE TABLE audit_anchor ("
        " one INTEGER PRIMARY KEY CHECK (one = 1),"
        " last_id INTEGER NOT NULL,"
        " last_hash TEXT NOT NULL,"
        " entries INTEGER NOT NULL"
        ")"
    )


def _m0007_board_and_registry(db: sqlite_utils.Database) -> None:
    # Dashboard projects and their Kanban board (DESIGN.md §7).
    db.execute(
        "CREATE TABLE projects ("
        " id TEXT PRIMARY KEY,"  # proj-...
        " name TEXT NOT NULL,"
        " path TEXT,"
        " description TEXT NOT NULL DEFAULT '',"
        " status TEXT NOT NULL DEFAULT 'active',"  # active | archived
        " created_at TEXT NOT NULL,"
        " updated_at TEXT NOT NULL"
        ")"
    )
    db.execute("CREATE INDEX projects_created ON projects (created_at, id)")
    db.execute(
        "CREATE TABLE board_tasks ("
        " id TEXT PRIMARY KEY,"  # task-...
        " project_id TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,"
        " title TEXT NOT NULL,"
        " description TEXT NOT NULL DEFAULT '',"
        " column_name TEXT NOT NULL,"  # backlog | todo | in_progress | review | done
        " status TEXT NOT NULL,"  # pending | active | completed | failed
        " priority TEXT NOT NULL DEFAULT 'medium',"  # low | medium | high | critical
        " position INTEGER NOT NULL,"  # 0..n-1 within (project, column)
        " created_at TEXT NOT NULL,"
        " updated_at TEXT NOT NULL"
        ")"
    )
    db.execute("CREATE INDEX board_tasks_column ON board_tasks (project_id, column_name, position)")
    db.execute("CREATE INDEX board_tasks_column_only ON board_tasks (column_name, position)")
    # The cross-project registry: folders (usually with .loki/) lokid keeps an eye on.
    db.execute(
        "CREATE TABLE registry ("
        " id TEXT PRIMARY KEY,"  # reg-<12 hex of sha256(realpath)>
        " name TEXT NOT NULL,"
        " path TEXT NOT NULL UNIQUE,"  # the real path
        " status TEXT NOT NULL DEFAULT 'ok',"  # ok | missing
        " has_loki INTEGER NOT NULL DEFAULT 0,"
        " registered_at TEXT NOT NULL,"
        " last_seen TEXT,"
        " tasks TEXT NOT NULL DEFAULT '{}'"  # JSON: counts by status at the last sync
        ")"
    )


def _m0008_cheaper_board_shifts(db: sqlite_utils.Database) -> None:
    # A move shifts the positions of every task between its old and new place; an
    # index holding `position` beside (project_id, column_name, position) made each
    # shift ~25 % dearer. The column filter across projects needs only the column.
    db.execute("DROP INDEX board_tasks_column_only")
    db.execute("CREATE INDEX board_tasks_by_column ON board_tasks (column_name)")


def _m0009_sparse_board_ranks(db: sqlite_utils.Database) -> None:
    # Positions are computed when read (lokid.board); the table keeps a sparse rank, so
    # a move writes one row instead of shifting every task between its two places.
    # `board_tasks_column` follows the renamed column. Existing columns are numbered
    # densely first (repairing any damage), then spread out.
    db.execute("ALTER TABLE board_tasks RENAME COLUMN position TO rank")
    db.execute(
        "WITH ranked AS ("
        " SELECT rowid AS rid, (ROW_NUMBER() OVER"
        " (PARTITION BY project_id, column_name ORDER BY rank, rowid) - 1) * 1024 AS new"
        " FROM board_tasks)"
        " UPDATE board_tasks SET rank = ranked.new FROM ranked WHERE board_tasks.rowid = ranked.rid"
    )


def _m0010_stop_source(db: sqlite_utils.Database) -> None:
    # Who asked a session to stop (`api`, `.loki/STOP`): an actor restarted in the
    # middle of the stop reports it in its `session.stopped`. Not part of the API.
    db.execute("ALTER TABLE sessions ADD COLUMN stop_source TEXT")


def _m0011_idempotency_caller(db: sqlite_utils.Database) -> None:
    # `Idempotency-Key`s are scoped by caller too (lokid/idempotency.py): the token
    # that sent the key, '' for callers that need none. Rows written before say
    # nobody: they go to '' (the owner's scope), so a retry across the upgrade by a
    # caller without a token still finds its first answer (one with a token, within
    # the 24 h the rows are kept, creates anew: the row cannot say whose it was).
    db.execute(
        "CREATE TABLE idempotency_keys_by_caller ("
        " route TEXT NOT NULL,"
        " caller TEXT NOT NULL,"
        " key TEXT NOT NULL,"
        " body_sha256 TEXT NOT NULL,"
        " status INTEGER NOT NULL,"
        " response TEXT NOT NULL,"
        " created_at REAL NOT NULL,"  # unix seconds
        " PRIMARY KEY (route, caller, key)"
        ")"
    )
    db.execute(
        "INSERT INTO idempotency_keys_by_caller"
        " SELECT route, '', key, body_sha256, status, response, created_at FROM idempotency_keys"
    )
    db.execute("DROP TABLE idempotency_keys")
    db.execute("ALTER TABLE idempotency_keys_by_caller RENAME TO idempotency_keys")
    db.execute("CREATE INDEX idempotency_keys_age ON idempotency_keys (created_at)")


def _m0012_input_agent(db: sqlite_utils.Database) -> None:
    # The agent (its `agents` row) whose prompt carried an applied input: marked in the
    # transaction that records the agent's start. The next start puts the input back
    # in the queue if that agent never ran (the daemon died before letting it start).
    db.execute("ALTER TABLE session_inputs ADD COLUMN agent_row INTEGER")
    db.execute(
        "CREATE INDEX session_inputs_agent ON session_inputs (agent_row)"
        " WHERE agent_row IS NOT NULL"
    )


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "meta and daemon_runs", _m0001_meta_and_daemon_runs),
    Migration(2, "events", _m0002_events),
    Migration(3, "agents", _m0003_agents),
    Migration(4, "sessions and tasks", _m0004_sessions_and_tasks),
    Migration(5, "session runner", _m0005_session_runner),
    Migration(6, "tokens and audit", _m0006_tokens_and_audit),
    Migration(7, "board and registry", _m0007_board_and_registry),
    Migration(8, "cheaper board shifts", _m0008_cheaper_board_shifts),
    Migration(9, "sparse board ranks", _m0009_sparse_board_ranks),
    Migration(10, "stop source", _m0010_stop_source),
    Migration(11, "idempotency keys by caller", _m0011_idempotency_caller),
    Migration(12, "input agent", _m0012_input_agent),
)


# -- applying them -------------------------------------------------------------


def check_sequence(migrations: Sequence[Migration]) -> None:
    """Raise `ValueError` unless the versions are exactly 1, 2, ..., N."""
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise ValueError(f"migration versions must be 1..N in order, got {versions}")


def latest_version(migrations: Sequence[Migration] = MIGRATIONS) -> int:
    return migrations[-1].version if migrations else 0


def current_version(db: sqlite_utils.Database) -> int:
    row = db.execute("PRAGMA user_version").fetchone()
    return int(row[0])


def _utc_now() -> str:
    now = datetime.datetime.now(datetime.UTC)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def migrate(
    db: sqlite_utils.Database, migrations: Sequence[Migration] = MIGRATIONS
) -> list[Migration]:
    """Apply the pending migrations, each in its own transaction; return those applied.

    `db` must be in driver autocommit mode (`isolation_level=None`) with no
    transaction open. Raises `SchemaTooNew` or `MigrationFailed`; sqlite3
    errors that are not the migration's fault (the disk, a lock) propagate
    as they are.
    """
    check_sequence(migrations)
    known = latest_version(migrations)
    version = current_version(db)
    if version > known:
        raise SchemaTooNew(version, known)
    applied: list[Migration] = []
    for migration in migrations[version:]:
        _apply_one(db, migration)
        applied.append(migration)
    return applied


def _apply_one(db: sqlite_utils.Database, migration: Migration) -> None:
    conn = db.conn
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY,"
            " name TEXT NOT NULL,"
            " applied_at TEXT NOT NULL"
            ")"
        )
        try:
            migration.apply(db)
        except Exception as exc:
            raise MigrationFailed(migration, exc) from exc
        if not conn.in_transaction:
            raise MigrationFailed(
                migration, RuntimeError("it ended the transaction (COMMIT or ROLLBACK)")
            )
        conn.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
            (migration.version, migration.name, _utc_now()),
        )
        # PRAGMA takes no parameters; the version is an int we own.
        conn.execute(f"PRAGMA user_version = {int(migration.version)}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


check_sequence(MIGRATIONS)
