"""Sessions, tasks and session inputs: request validation and the store records.

Two halves:

* `parse_session_request` turns the body of `POST /api/sessions` into a
  `SessionRequest`, or raises `ValidationFailed` (422) naming the field
  (`details.field`). It reads the file system (the PRD, the project folder)
  and looks CLIs up on PATH (`which`), nothing else; it writes nothing.
* The record functions take a `sqlite_utils.Database` and are meant to run
  inside `StoreActor.write` / `StoreActor.read` (one transaction each). They
  return plain JSON-ready dicts in the HTTP API's shapes (DESIGN.md §5,
  camelCase keys).

Decisions (where DESIGN.md is silent):

* `agents {active, total}` of a session is read from the `agents` table
  (migration 3): `active` = rows of the session without `ended_at`, `total`
  = all its rows. A caller that knows better may replace the value.
* Option defaults: `parallel=False`, `sandbox=False`, `maxAgents=None` (the
  daemon's global cap), `maxIterations=50`, `maxDurationSeconds=None` (no
  limit), `budgetUsd=None` (no limit), `model=None` (the CLI's default),
  `verify=None`, `command=None`. A session's `options` in JSON has every key.
* A JSON `null` for a top-level key or an option counts as absent.
* A relative `prd` without `projectDir` is refused (relative to what?).
* A missing provider CLI is reported with `details.field = "provider"`, or
  `"options.command"` for provider `command` (whose program comes from there).
* One active session per `projectDir` is checked in the writing transaction
  (`insert_session`, and `update_session` when it makes a session active),
  with a partial unique index as the backstop.
* `queued_tasks` without a session: pending tasks of active sessions only
  (the others will not run), by priority, then position, then session age.
  The global task list is newest session first, then the session's order.
* `delete_session` refuses an active session (`IllegalTransition`, 409) and
  removes the session's tasks, inputs and events; the `agents` rows belong
  to the agent pool and stay.
"""

from __future__ import annotations

import enum
import json
import math
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import attrs
import sqlite_utils

from lokid import providers
from lokid.config import PROVIDERS
from lokid.errors import Conflict, InvalidQuery, NotFound, ValidationFailed
from lokid.jsontypes import json_type_name, shown, undecodable
from lokid.prd import MAX_PRD_BYTES, validate_prd_bytes
from lokid.sandbox import sandbox_problem
from lokid.session_state import ACTIVE, Status, Trigger, is_active, next_status
from lokid.timefmt import utc_now_iso

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_INPUT_BYTES",
    "MAX_LIMIT",
    "MAX_PATH_CHARS",
    "ListQuery",
    "RunnerTask",
    "SessionOptions",
    "SessionRequest",
    "TaskSource",
    "TaskStatus",
    "active_session_ids",
    "active_tasks",
    "add_input",
    "agents_without_end",
    "delete_session",
    "get_session",
    "get_session_fields",
    "get_task",
    "insert_session",
    "insert_tasks",
    "interrupted_by_last_stop",
    "list_sessions",
    "list_tasks",
    "mark_inputs_applied",
    "new_input_id",
    "new_session_id",
    "parse_list_query",
    "parse_session_request",
    "pending_inputs",
    "queued_tasks",
    "refuse_unknown",
    "requeue_active_tasks",
    "requeue_inputs_of_agents",
    "requeue_inputs_of_unreleased",
    "runner_tasks",
    "session_counts",
    "session_iteration",
    "set_session_fields",
    "task_counts",
    "update_session",
    "update_task",
]

# -- limits ---------------------------------------------------------------------

MAX_PATH_CHARS = 4096
MAX_PROVIDER_CHARS = 64
MAX_MODEL_CHARS = 200
MAX_VERIFY_CHARS = 4096
MAX_ITERATIONS = 10_000
MAX_DURATION_SECONDS = 30 * 24 * 3600
MAX_AGENTS = 100
MAX_INPUT_BYTES = 64 * 1024
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_OFFSET = 2**62

PRD_TEXT_NAME = Path(".loki") / "prd.md"

_TOP_KEYS = ("prd", "prdText", "projectDir", "provider", "options")


class TaskStatus(enum.StrEnum):
    PENDING = "pending"
    ACTIVE = "active"
    COMPLETED = "completed"
    FAILED = "failed"


class TaskSource(enum.StrEnum):
    PRD = "prd"
    AGENT = "agent"
    USER = "user"


# -- ids ------------------------------------------------------------------------

_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"  # ascending in ASCII: ids sort by time


def _ulid() -> str:
    """26 characters: 48-bit milliseconds (10) then 80 random bits (16), Crockford base32."""
    value = (time.time_ns() // 1_000_000) << 80 | secrets.randbits(80)
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def new_session_id() -> str:
    """`session-` + 26 time-ordered characters: a later id sorts after an earlier one."""
    return f"session-{_ulid()}"


def new_input_id() -> str:
    return f"input-{_ulid()}"


# -- the request ----------------------------------------------------------------


@attrs.frozen
class SessionOptions:
    """`options` of `POST /api/sessions`, validated (DESIGN.md §5)."""

    parallel: bool = False
    sandbox: bool = False
    max_agents: int | None = None
    max_iterations: int = 50
    max_duration_seconds: int | None = None
    budget_usd: float | None = None
    model: str | None = None
    verify: str | None = None
    command: tuple[str, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        """camelCase, every key (the stored and the answered form)."""
        return {
            "parallel": self.parallel,
            "sandbox": self.sandbox,
            "maxAgents": self.max_agents,
            "maxIterations": self.max_iterations,
            "maxDurationSeconds": self.max_duration_seconds,
            "budgetUsd": self.budget_usd,
            "model": self.model,
            "verify": self.verify,
            "command": list(self.command) if self.command is not None else None,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SessionOptions:
        """The inverse of `to_json` (stored data, trusted)."""
        command = data.get("command")
        return cls(
            parallel=bool(data.get("parallel", False)),
            sandbox=bool(data.get("sandbox", False)),
            max_agents=data.get("maxAgents"),
            max_iterations=int(data.get("maxIterations", 50)),
            max_duration_seconds=data.get("maxDurationSeconds"),
            budget_usd=data.get("budgetUsd"),
            model=data.get("model"),
            verify=data.get("verify"),
            command=tuple(command) if command is not None else None,
        )


_OPTION_ATTRS = {
    "parallel": "parallel",
    "sandbox": "sandbox",
    "maxAgents": "max_agents",
    "maxIterations": "max_iterations",
    "maxDurationSeconds": "max_duration_seconds",
    "budgetUsd": "budget_usd",
    "model": "model",
    "verify": "verify",
    "command": "command",
}


@attrs.frozen
class SessionRequest:
    """A validated `POST /api/sessions`.

    `prd_text` is set for an inline PRD (`prdText`); `prd_path` is then
    `<project_dir>/.loki/prd.md`, which the runner writes (it may not exist yet).
    """

    prd_path: Path
    prd_text: str | None
    project_dir: Path
    provider: str
    options: SessionOptions


def _fail(message: str, field: str, **details: Any) -> ValidationFailed:
    return ValidationFailed(message, field=field, details=details or None)


def _encodable(text: str, field: str) -> None:
    """Refuse lone surrogates (JSON allows "\\ud800"): no file name, process argument or
    SQLite text can hold one, so they would fail far from here (a 500, a crashed actor)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _fail(f"{field} contains an invalid character (a lone surrogate)", field) from None


def _string(value: Any, field: str, limit: int) -> str:
    if not isinstance(value, str):
        raise _fail(f"{field} must be a string, not {json_type_name(value)}", field)
    if not value:
        raise _fail(f"{field} must not be empty", field)
    if len(value) > limit:
        raise _fail(f"{field} is longer than {limit} characters", field, limit=limit)
    if "\0" in value:
        raise _fail(f"{field} contains a NUL character", field)
    _encodable(value, field)
    return value


def _bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(f"{field} must be true or false, not {json_type_name(value)}", field)
    return value


def _int(value: Any, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(f"{field} must be an integer, not {json_type_name(value)}", field)
    if isinstance(value, float) and not value.is_integer():
        raise _fail(f"{field} must be an integer, not {value!r}", field)
    number = int(value)
    if not low <= number <= high:
        raise _fail(f"{field} must be between {low} and {high}, got {number}", field)
    return number


def _parse_options(raw: Any) -> tuple[SessionOptions, dict[str, Any]]:
    """The typed options and the raw mapping (for `providers.validate_options`)."""
    if raw is None:
        return SessionOptions(), {}
    if not isinstance(raw, Mapping):
        raise _fail(f"options must be an object, not {json_type_name(raw)}", "options")
    for key in raw:
        if key not in _OPTION_ATTRS:
            raise _fail(
                f"unknown option {key!r}; known options: {', '.join(_OPTION_ATTRS)}",
                f"options.{key}",
            )
    given = {k: v for k, v in raw.items() if v is not None}
    values: dict[str, Any] = {}
    for key in ("parallel", "sandbox"):
        if key in given:
            values[key] = _bool(given[key], f"options.{key}")
    if "maxAgents" in given:
        values["max_agents"] = _int(given["maxAgents"], "options.maxAgents", 1, MAX_AGENTS)
    if "maxIterations" in given:
        values["max_iterations"] = _int(
            given["maxIterations"], "options.maxIterations", 1, MAX_ITERATIONS
        )
    if "maxDurationSeconds" in given:
        values["max_duration_seconds"] = _int(
            given["maxDurationSeconds"], "options.maxDurationSeconds", 1, MAX_DURATION_SECONDS
        )
    if "budgetUsd" in given:
        budget = given["budgetUsd"]
        field = "options.budgetUsd"
        if isinstance(budget, bool) or not isinstance(budget, int | float):
            raise _fail(f"{field} must be a number, not {json_type_name(budget)}", field)
        if not math.isfinite(budget) or budget <= 0:
            raise _fail(f"{field} must be a finite number greater than 0, got {budget!r}", field)
        values["budget_usd"] = float(budget)
    if "model" in given:
        values["model"] = _string(given["model"], "options.model", MAX_MODEL_CHARS)
    if "verify" in given:
        values["verify"] = _string(given["verify"], "options.verify", MAX_VERIFY_CHARS)
    if "command" in given:
        values["command"] = providers.validate_command(given["command"])
        for index, arg in enumerate(values["command"]):
            _encodable(arg, f"options.command[{index}]")
    return SessionOptions(**values), given


def _read_prd(path: Path, field: str) -> str:
    """The PRD file's text, or `ValidationFailed(field)` naming what is wrong with it."""
    _utf8_path(path, field, "PRD")
    try:
        st = path.stat()
    except FileNotFoundError:
        raise _fail(f"PRD not found: {path} does not exist", field, path=str(path)) from None
    except NotADirectoryError:
        raise _fail(
            f"PRD not found: a part of {path} is not a directory", field, path=str(path)
        ) from None
    except OSError as exc:
        raise _fail(
            f"PRD {path} cannot be read: {exc.strerror or exc}", field, path=str(path)
        ) from None
    if stat.S_ISDIR(st.st_mode):
        raise _fail(f"PRD {path} is a directory, not a file", field, path=str(path))
    if not stat.S_ISREG(st.st_mode):
        raise _fail(f"PRD {path} is not a regular file", field, path=str(path))
    if st.st_size > MAX_PRD_BYTES:
        raise _fail(
            f"PRD is too large: {st.st_size} bytes; the limit is 5 MiB ({MAX_PRD_BYTES} bytes)",
            field,
            path=str(path),
            size=st.st_size,
            limit=MAX_PRD_BYTES,
        )
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_PRD_BYTES + 1)
    except PermissionError:
        raise _fail(
            f"PRD {path} is not readable by the daemon (permission denied)", field, path=str(path)
        ) from None
    except OSError as exc:
        raise _fail(
            f"PRD {path} cannot be read: {exc.strerror or exc}", field, path=str(path)
        ) from None
    try:
        return validate_prd_bytes(data)
    except ValidationFailed as exc:
        details = {k: v for k, v in exc.details.items() if k != "field"}
        raise _fail(f"{exc.message} ({path})", field, path=str(path), **details) from None


def _validate_inline_prd(text: str) -> str:
    try:
        return validate_prd_bytes(text.encode("utf-8", errors="surrogatepass"))
    except ValidationFailed as exc:
        details = {k: v for k, v in exc.details.items() if k != "field"}
        raise _fail(exc.message.replace("PRD", "prdText", 1), "prdText", **details) from None


def _default_project_dir(prd_path: Path) -> Path:
    """The nearest ancestor of the PRD holding `.git` or `.loki`, else the PRD's folder."""
    for folder in prd_path.parents:
        if (folder / ".git").exists() or (folder / ".loki").exists():
            return folder
    return prd_path.parent


def _utf8_path(path: Path, field: str, what: str) -> None:
    """A 422 for a path that is not UTF-8 (e.g. a symbolic link resolved to a folder whose
    name is not): SQLite, events and answers cannot carry it (docs/sessions.md)."""
    if undecodable(str(path)):
        text = shown(str(path))
        raise _fail(
            f"{what} {text} is not valid UTF-8: lokid cannot store or name it (rename it)",
            field,
            path=text,
        )


def _check_project_dir(path: Path) -> None:
    field = "projectDir"
    _utf8_path(path, field, "projectDir")
    try:
        st = path.stat()
    except FileNotFoundError:
        raise _fail(f"projectDir {path} does not exist", field, path=str(path)) from None
    except OSError as exc:
        raise _fail(
            f"projectDir {path} cannot be used: {exc.strerror or exc}", field, path=str(path)
        ) from None
    if not stat.S_ISDIR(st.st_mode):
        raise _fail(f"projectDir {path} is not a directory", field, path=str(path))
    if not os.access(path, os.W_OK | os.X_OK):
        raise _fail(f"projectDir {path} is not writable by the daemon", field, path=str(path))


def _expanded(text: str, field: str) -> Path:
    """`text` as a path, `~` and `~user` expanded; a 422 for a user without a home."""
    if not text.startswith("~"):
        return Path(text)
    try:
        return Path(text).expanduser()
    except RuntimeError:  # "Could not determine home directory."
        user = text[1:].partition("/")[0]
        raise _fail(
            f"{field}: cannot expand ~{user}: no such user (or no home directory)", field
        ) from None


def _absolute(text: str, field: str) -> Path:
    path = _expanded(text, field)
    if not path.is_absolute():
        raise _fail(f"{field} must be an absolute path, got {text!r}", field)
    return path


def parse_session_request(
    body: Mapping[str, Any],
    *,
    default_provider: str,
    which: Callable[[str], str | None] = shutil.which,
    sandbox_check: Callable[[str], str | None] = sandbox_problem,
) -> SessionRequest:
    """Validate the body of `POST /api/sessions` (DESIGN.md §5); 422 names the field."""
    if not isinstance(body, Mapping):
        raise _fail(f"the request body must be a JSON object, not {json_type_name(body)}", "body")
    for key in body:
        if key not in _TOP_KEYS:
            raise _fail(f"unknown key {key!r}; known keys: {', '.join(_TOP_KEYS)}", str(key))
    given = {k: v for k, v in body.items() if v is not None}

    # Shapes and types first, then the file system.
    prd_raw = _string(given["prd"], "prd", MAX_PATH_CHARS) if "prd" in given else None
    prd_text_raw: str | None = None
    if "prdText" in given:
        value = given["prdText"]
        if not isinstance(value, str):
            raise _fail(f"prdText must be a string, not {json_type_name(value)}", "prdText")
        prd_text_raw = value
    if (prd_raw is None) == (prd_text_raw is None):
        if prd_raw is None:
            raise _fail("give the PRD: either prd (a path) or prdText (the text)", "prd")
        raise _fail("give either prd or prdText, not both", "prdText")
    project_raw = (
        _string(given["projectDir"], "projectDir", MAX_PATH_CHARS)
        if "projectDir" in given
        else None
    )
    provider = (
        _string(given["provider"], "provider", MAX_PROVIDER_CHARS)
        if "provider" in given
        else default_provider
    )
    if provider not in PROVIDERS:
        raise _fail(
            f"unknown provider {provider!r}; expected one of {', '.join(PROVIDERS)}",
            "provider",
            known=list(PROVIDERS),
        )
    options, raw_options = _parse_options(given.get("options"))
    providers.validate_options(provider, raw_options)

    # The PRD and the project folder.
    project_dir = _absolute(project_raw, "projectDir") if project_raw is not None else None
    prd_text: str | None = None
    if prd_text_raw is not None:
        prd_text = _validate_inline_prd(prd_text_raw)
        if project_dir is None:
            raise _fail("projectDir is required with prdText", "projectDir")
        project_dir = project_dir.resolve()
        _check_project_dir(project_dir)
        prd_path = project_dir / PRD_TEXT_NAME
    else:
        assert prd_raw is not None
        raw_path = _expanded(prd_raw, "prd")
        if not raw_path.is_absolute():
            if project_dir is None:
                raise _fail(
                    f"prd must be an absolute path when no projectDir is given, got {prd_raw!r}",
                    "prd",
                )
            raw_path = project_dir / raw_path
        prd_path = raw_path.resolve()
        _read_prd(prd_path, "prd")
        project_dir = (
            project_dir.resolve() if project_dir is not None else _default_project_dir(prd_path)
        )
        _check_project_dir(project_dir)

    # What must be installed.
    program = providers.executable(provider, raw_options, project_dir=project_dir)
    if which(program) is None:
        raise _fail(
            providers.missing_cli_message(provider, program),
            "options.command" if provider == "command" else "provider",
            executable=program,
        )
    if options.sandbox:
        bwrap = which("bwrap")
        if bwrap is None:
            raise _fail(
                "options.sandbox needs bubblewrap (`bwrap`), which is not on the daemon's PATH "
                "(install the bubblewrap package, or start the session without sandbox)",
                "options.sandbox",
            )
        # bwrap present is not bwrap working (no user namespaces in a container, a
        # seccomp profile): refuse now rather than fail every agent run later.
        problem = sandbox_check(bwrap)
        if problem is not None:
            raise _fail(
                f"options.sandbox cannot be used on this machine: {problem}", "options.sandbox"
            )
    return SessionRequest(
        prd_path=prd_path,
        prd_text=prd_text,
        project_dir=project_dir,
        provider=provider,
        options=options,
    )


# -- list queries ---------------------------------------------------------------


class ListQuery(NamedTuple):
    status: str | None
    limit: int
    offset: int


SESSION_STATUSES: tuple[str, ...] = tuple(s.value for s in Status)
TASK_STATUSES: tuple[str, ...] = tuple(s.value for s in TaskStatus)


_INTEGER = re.compile(r"-?[0-9]+")  # not str.isdigit(): "²" is a digit to it, not to int()


def query_int(params: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    """An integer query parameter within [low, high]; `InvalidQuery` naming it otherwise."""
    raw = params.get(name)
    if raw is None:
        return default
    text = str(raw).strip()
    if not _INTEGER.fullmatch(text):
        raise InvalidQuery(f"{name} must be an integer, got {str(raw)[:50]!r}", field=name)
    if len(text) > 20:  # an integer, beyond any bound: say the bound, not its digits
        raise InvalidQuery(f"{name} must be between {low} and {high}", field=name)
    value = int(text)
    if not low <= value <= high:
        raise InvalidQuery(f"{name} must be between {low} and {high}, got {value}", field=name)
    return value


def refuse_unknown(names: Iterable[str], known: Iterable[str]) -> None:
    """400 naming the first query parameter of `names` that is not in `known` (the route's
    documented parameters). Ignoring it would make a filter the route does not have
    (`/api/tasks/active?status=completed`) look applied (DESIGN.md §4)."""
    allowed = tuple(known)
    for name in names:
        if name not in allowed:
            takes = ", ".join(allowed) if allowed else "no query parameters"
            raise InvalidQuery(
                f"{name[:50]!r} is not a query parameter of this route (it takes {takes})",
                field=name[:100],
            )


def parse_list_query(params: Mapping[str, Any], *, statuses: Iterable[str] | None) -> ListQuery:
    """`status`, `limit` (default 100, 1..1000), `offset` (>= 0) of a list route; 400 if bad.

    `statuses`: the `status` values the route filters by (`SESSION_STATUSES`,
    `TASK_STATUSES`); None for a route without a status filter. Any other parameter,
    `status` on a route without one included, is refused (`refuse_unknown`).
    """
    known = () if statuses is None else tuple(statuses)
    refuse_unknown(params, ("status", "limit", "offset") if known else ("limit", "offset"))
    status = params.get("status")
    if status is not None:
        status = str(status)
        if status not in known:
            raise InvalidQuery(
                f"status must be one of {', '.join(known)}, got {status[:50]!r}",
                field="status",
            )
    limit = query_int(params, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    offset = query_int(params, "offset", 0, 0, MAX_OFFSET)
    return ListQuery(status, limit, offset)


# -- records: sessions ----------------------------------------------------------

_ACTIVE_VALUES = tuple(sorted(s.value for s in ACTIVE))
_ACTIVE_SQL = ", ".join("?" for _ in _ACTIVE_VALUES)

_SESSION_COLUMNS = frozenset(
    {
        "status",
        "provider",
        "prd",
        "project_dir",
        "options",
        "phase",
        "iteration",
        "started_at",
        "updated_at",
        "ended_at",
        "exit_reason",
        "cost_usd",
        "last_error",
        "stop_source",
    }
)


def _one(db: sqlite_utils.Database, sql: str, params: Sequence[Any]) -> dict[str, Any] | None:
    rows = list(db.query(sql, params))
    return rows[0] if rows else None


def _session_row(db: sqlite_utils.Database, session_id: str) -> dict[str, Any]:
    row = _one(db, "SELECT * FROM sessions WHERE id = ?", (session_id,))
    if row is None:
        raise NotFound("Session not found", details={"sessionId": session_id})
    return row


def task_counts(db: sqlite_utils.Database, session_id: str) -> dict[str, int]:
    """`{total, pending, active, completed, failed}` of the session's tasks."""
    counts = {status.value: 0 for status in TaskStatus}
    for row in db.query(
        "SELECT status, COUNT(*) AS n FROM tasks WHERE session_id = ? GROUP BY status",
        (session_id,),
    ):
        counts[row["status"]] = int(row["n"])
    return {"total": sum(counts.values()), **counts}


def _agent_counts(db: sqlite_utils.Database, session_id: str) -> dict[str, int]:
    row = _one(
        db,
        "SELECT COUNT(*) AS total, COUNT(*) - COUNT(ended_at) AS active"
        " FROM agents WHERE session_id = ?",
        (session_id,),
    )
    assert row is not None
    return {"active": int(row["active"] or 0), "total": int(row["total"] or 0)}


def _session_json(
    db: sqlite_utils.Database, row: Mapping[str, Any], *, counts: bool = True
) -> dict[str, Any]:
    session = {
        "id": row["id"],
        "status": row["status"],
        "provider": row["provider"],
        "prd": row["prd"],
        "projectDir": row["project_dir"],
        "options": json.loads(row["options"]),
        "phase": row["phase"],
        "iteration": row["iteration"],
        "createdAt": row["created_at"],
        "startedAt": row["started_at"],
        "updatedAt": row["updated_at"],
        "endedAt": row["ended_at"],
        "exitReason": row["exit_reason"],
        "agents": None,
        "tasks": None,
        "costUsd": row["cost_usd"],
    }
    if counts:
        session["agents"] = _agent_counts(db, row["id"])
        session["tasks"] = task_counts(db, row["id"])
    return session


def _other_active(
    db: sqlite_utils.Database, project_dir: str, session_id: str
) -> dict[str, Any] | None:
    return _one(
        db,
        f"SELECT id, status FROM sessions WHERE project_dir = ? AND id != ?"
        f" AND status IN ({_ACTIVE_SQL}) LIMIT 1",
        (project_dir, session_id, *_ACTIVE_VALUES),
    )


def _refuse_second_active(db: sqlite_utils.Database, project_dir: str, session_id: str) -> None:
    other = _other_active(db, project_dir, session_id)
    if other is not None:
        raise Conflict(
            f"session {other['id']} is already {other['status']} in {project_dir}; "
            "stop it first (one active session per projectDir)",
            details={"sessionId": other["id"], "projectDir": project_dir},
        )


def insert_session(
    db: sqlite_utils.Database,
    request: SessionRequest,
    *,
    session_id: str | None = None,
    now: str | None = None,
) -> dict[str, Any]:
    """Record a new `starting` session; 409 (`details.sessionId`) if its projectDir is taken."""
    session_id = session_id or new_session_id()
    now = now or utc_now_iso()
    project_dir = str(request.project_dir)
    _refuse_second_active(db, project_dir, session_id)
    db.execute(
        "INSERT INTO sessions (id, status, provider, prd, project_dir, options, phase,"
        " iteration, created_at, started_at, updated_at, ended_at, exit_reason, cost_usd,"
        " last_error) VALUES (?, ?, ?, ?, ?, ?, NULL, 0, ?, NULL, ?, NULL, NULL, 0.0, NULL)",
        (
            session_id,
            Status.STARTING.value,
            request.provider,
            str(request.prd_path),
            project_dir,
            json.dumps(request.options.to_json()),
            now,
            now,
        ),
    )
    return get_session(db, session_id)


def get_session(db: sqlite_utils.Database, session_id: str) -> dict[str, Any]:
    """The session's JSON (DESIGN.md §5); `NotFound` ("Session not found")."""
    return _session_json(db, _session_row(db, session_id))


def get_session_fields(db: sqlite_utils.Database, session_id: str) -> dict[str, Any]:
    """`get_session` without the counts (`agents` and `tasks` are None): one query, not
    three, for a reader that wants the session's own fields (the `.loki/` mirror)."""
    return _session_json(db, _session_row(db, session_id), counts=False)


def session_iteration(db: sqlite_utils.Database, session_id: str) -> int:
    """The session's `iteration` (one query, not the whole JSON)."""
    return int(_session_row(db, session_id)["iteration"])


def stop_source(db: sqlite_utils.Database, session_id: str) -> str | None:
    """Who asked the session to stop (`api`, `.loki/STOP`), as stored with the stop."""
    source: str | None = _session_row(db, session_id)["stop_source"]
    return source


def session_options(db: sqlite_utils.Database, session_id: str) -> SessionOptions:
    """The stored options of a session, typed."""
    return SessionOptions.from_json(json.loads(_session_row(db, session_id)["options"]))


def list_sessions(
    db: sqlite_utils.Database,
    *,
    status: str | None = None,
    limit: int = DEFAULT_LIMIT,
    offset: int = 0,
) -> dict[str, Any]:
    """`{"sessions": [...], "total", "limit", "offset"}`, newest first."""
    where, params = ("WHERE status = ?", [status]) if status is not None else ("", [])
    total_row = _one(db, f"SELECT COUNT(*) AS n FROM sessions {where}", params)
    assert total_row is not None
    rows = list(
        db.query(
            f"SELECT * FROM sessions {where} ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?",
            [*params, limit, offset],
        )
    )
    return {
        "sessions": [_session_json(db, row) for row in rows],
        "total": int(total_row["n"]),
        "limit": limit,
        "offset": offset,
    }


def update_session(db: sqlite_utils.Database, session_id: str, **fields: Any) -> dict[str, Any]:
    """Set columns (snake_case names: `status`, `phase`, `iteration`, `started_at`, ...).

    `updated_at` is set to now unless given. Making a session active checks
    the one-active-session-per-projectDir rule (409). Returns the session's JSON.
    """
    set_session_fields(db, session_id, **fields)
    return get_session(db, session_id)


def set_session_fields(db: sqlite_utils.Database, session_id: str, **fields: Any) -> None:
    """`update_session` for a writer that does not want the session's JSON back (it
    costs three more queries: the row, its tasks' and its agents' counts)."""
    unknown = set(fields) - _SESSION_COLUMNS
    if unknown:
        raise TypeError(f"update_session: unknown fields {sorted(unknown)}")
    row = _session_row(db, session_id)
    if "status" in fields:
        status = Status(fields["status"])
        fields["status"] = status.value
        if is_active(status):
            _refuse_second_active(db, fields.get("project_dir", row["project_dir"]), session_id)
    if "options" in fields and not isinstance(fields["options"], str):
        options = fields["options"]
        fields["options"] = json.dumps(
            options.to_json() if isinstance(options, SessionOptions) else options
        )
    fields.setdefault("updated_at", utc_now_iso())
    names = sorted(fields)
    db.execute(
        f"UPDATE sessions SET {', '.join(f'{name} = ?' for name in names)} WHERE id = ?",
        [*(fields[name] for name in names), session_id],
    )


def delete_session(db: sqlite_utils.Database, session_id: str) -> None:
    """Remove a session that is not active, with its tasks, inputs and events.

    `NotFound` if there is none; `IllegalTransition` (409, `details.status`) while active.
    """
    row = _session_row(db, session_id)
    next_status(Status(row["status"]), Trigger.DELETE)
    db.execute("DELETE FROM tasks WHERE session_id = ?", (session_id,))
    db.execute("DELETE FROM session_inputs WHERE session_id = ?", (session_id,))
    db.execute("DELETE FROM events WHERE session_id = ?", (session_id,))
    db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))


# -- records: tasks -------------------------------------------------------------

_TASK_COLUMNS = frozenset(
    {
        "title",
        "description",
        "status",
        "priority",
        "attempts",
        "agent",
        "started_at",
        "completed_at",
        "error",
        "resume_id",
    }
)


def _task_json(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "sessionId": row["session_id"],
        "title": row["title"],
        "description": row["description"],
        "status": row["status"],
        "priority": row["priority"],
        "attempts": row["attempts"],
        "agent": row["agent"],
        "createdAt": row["created_at"],
        "startedAt": row["started_at"],
        "completedAt": row["completed_at"],
        "error": row["error"],
        "source": row["source"],
    }


class NewTask(Protocol):
    """What `insert_tasks` needs of a task (`PrdTask`, `lokidir.AgentTask`, ...)."""

    @property
    def id(self) -> str: ...
    @property
    def title(self) -> str: ...
    @property
    def description(self) -> str: ...
    @property
    def priority(self) -> int: ...
    @property
    def acceptance(self) -> tuple[str, ...]: ...


def insert_tasks(
    db: sqlite_utils.Database,
    session_id: str,
    tasks: Sequence[NewTask],
    *,
    source: str = TaskSource.PRD,
    now: str | None = None,
) -> list[dict[str, Any]]:
    """Add `pending` tasks after the session's last one; return their JSON.

    A task id already used in the session is a `Conflict` (the primary key).
    """
    source = TaskSource(source).value
    now = now or utc_now_iso()
    _session_row(db, session_id)
    row = _one(
        db,
        "SELECT COALESCE(MAX(position), -1) AS last FROM tasks WHERE session_id = ?",
        (session_id,),
    )
    assert row is not None
    position = int(row["last"]) + 1
    for offset, task in enumerate(tasks):
        db.execute(
            "INSERT INTO tasks (session_id, id, title, description, status, priority, attempts,"
            " agent, created_at, started_at, completed_at, error, source, position, acceptance)"
            " VALUES (?, ?, ?, ?, ?, ?, 0, NULL, ?, NULL, NULL, NULL, ?, ?, ?)",
            (
                session_id,
                task.id,
                task.title,
                task.description,
                TaskStatus.PENDING.value,
                task.priority,
                now,
                source,
                position + offset,
                json.dumps(list(task.acceptance)),
            ),
        )
    return [get_task(db, session_id, task.id) for task in tasks]


def _task_page(
    db: sqlite_utils.Database,
    where: str,
    params: Sequence[Any],
    order: str,
    limit: int,
    offset: int,
) -> dict[str, Any]:
    base = f"FROM tasks t JOIN sessions s ON s.id = t.session_id {where}"
    total_row = _one(db, f"SELECT COUNT(*) AS n {base}", params)
    assert total_row is not None
    rows = db.query(
        f"SELECT t.* {base} ORDER BY {order} LIMIT ? OFFSET ?", [*params, limit, offset]
    )
    return {
        "tasks": [_task_json(row) for row in rows],
        "total": int(total_row["n"]),
        "limit": limit,
        "offset": offset,
    }


def list_tasks(
    db: sqlite_utils.Database,
    *,
    session_id: str | None = None,
    status: str | None = None,
    limit: int = DEFAULT_LIMIT,
    offset: int = 0,
) -> dict[str, Any]:
    """`{"tasks": [...], "total", "limit", "offset"}`.

    With `session_id`: that session's tasks in their order (`NotFound` if no
    such session). Without: newest session first, each in its order.
    """
    clauses: list[str] = []
    params: list[Any] = []
    if session_id is not None:
        _session_row(db, session_id)
        clauses.append("t.session_id = ?")
        params.append(session_id)
    if status is not None:
        clauses.append("t.status = ?")
        params.append(TaskStatus(status).value)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    return _task_page(
        db, where, params, "s.created_at DESC, t.session_id DESC, t.position", limit, offset
    )


def active_tasks(
    db: sqlite_utils.Database,
    *,
    session_id: str | None = None,
    limit: int = DEFAULT_LIMIT,
    offset: int = 0,
) -> dict[str, Any]:
    """Tasks being worked on (`active`), oldest session first, in task order."""
    where = "WHERE t.status = ?"
    params: list[Any] = [TaskStatus.ACTIVE.value]
    if session_id is not None:
        where += " AND t.session_id = ?"
        params.append(session_id)
    return _task_page(db, where, params, "s.created_at, t.session_id, t.position", limit, offset)


def queued_tasks(
    db: sqlite_utils.Database,
    *,
    session_id: str | None = None,
    limit: int = DEFAULT_LIMIT,
    offset: int = 0,
) -> dict[str, Any]:
    """Pending tasks in the order they will run: priority, then position.

    Without `session_id` only active sessions' tasks (the others do not run),
    ties between sessions broken by the older session first.
    """
    where = "WHERE t.status = ?"
    params: list[Any] = [TaskStatus.PENDING.value]
    if session_id is not None:
        where += " AND t.session_id = ?"
        params.append(session_id)
    else:
        where += f" AND s.status IN ({_ACTIVE_SQL})"
        params.extend(_ACTIVE_VALUES)
    return _task_page(
        db, where, params, "t.priority, t.position, s.created_at, t.session_id", limit, offset
    )


def get_task(db: sqlite_utils.Database, session_id: str, task_id: str) -> dict[str, Any]:
    """The task's JSON; `NotFound` ("Task not found")."""
    row = _one(db, "SELECT * FROM tasks WHERE session_id = ? AND id = ?", (session_id, task_id))
    if row is None:
        raise NotFound("Task not found", details={"sessionId": session_id, "taskId": task_id})
    return _task_json(row)


def update_task(
    db: sqlite_utils.Database, session_id: str, task_id: str, **fields: Any
) -> dict[str, Any]:
    """Set task columns: `status`, `attempts`, `agent`, `started_at`, `completed_at`, `error`..."""
    unknown = set(fields) - _TASK_COLUMNS
    if unknown:
        raise TypeError(f"update_task: unknown fields {sorted(unknown)}")
    get_task(db, session_id, task_id)
    if "status" in fields:
        fields["status"] = TaskStatus(fields["status"]).value
    if fields:
        names = sorted(fields)
        db.execute(
            f"UPDATE tasks SET {', '.join(f'{name} = ?' for name in names)}"
            " WHERE session_id = ? AND id = ?",
            [*(fields[name] for name in names), session_id, task_id],
        )
    return get_task(db, session_id, task_id)


# -- records: inputs ------------------------------------------------------------


def validate_input_message(body: Mapping[str, Any]) -> str:
    """`{"message": "..."}` of `POST /api/sessions/{id}/input` (≤ 64 KiB); 422 otherwise."""
    for key in body:
        if key != "message":
            raise _fail(f"unknown key {key!r}; known keys: message", str(key))
    message = body.get("message")
    if not isinstance(message, str):
        raise _fail(f"message must be a string, not {json_type_name(message)}", "message")
    if not message.strip():
        raise _fail("message must not be empty", "message")
    _encodable(message, "message")
    size = len(message.encode("utf-8", errors="surrogatepass"))
    if size > MAX_INPUT_BYTES:
        raise _fail(
            f"message is {size} bytes; the limit is 64 KiB ({MAX_INPUT_BYTES} bytes)",
            "message",
            limit=MAX_INPUT_BYTES,
        )
    return message


def add_input(
    db: sqlite_utils.Database,
    session_id: str,
    message: str,
    *,
    now: str | None = None,
    input_id: str | None = None,
) -> dict[str, Any]:
    """Queue a message for the session's next agent prompt: `{id, sessionId, status}`.

    `NotFound` for no such session; `IllegalTransition` (409) unless it is
    running or paused. The message is validated (`validate_input_message` rules).
    `input_id`: the id chosen before (a claimed `HUMAN_INPUT.md` names it), else a new one.
    """
    message = validate_input_message({"message": message})
    row = _session_row(db, session_id)
    next_status(Status(row["status"]), Trigger.INPUT)
    input_id = input_id or new_input_id()
    db.execute(
        "INSERT INTO session_inputs (id, session_id, message, status, created_at, applied_at)"
        " VALUES (?, ?, ?, 'queued', ?, NULL)",
        (input_id, session_id, message, now or utc_now_iso()),
    )
    return {"id": input_id, "sessionId": session_id, "status": "queued"}


def pending_inputs(db: sqlite_utils.Database, session_id: str) -> list[dict[str, Any]]:
    """The session's queued inputs, oldest first: `{id, sessionId, message, createdAt}`."""
    return [
        {
            "id": row["id"],
            "sessionId": row["session_id"],
            "message": row["message"],
            "createdAt": row["created_at"],
        }
        for row in db.query(
            "SELECT * FROM session_inputs WHERE session_id = ? AND status = 'queued'"
            " ORDER BY created_at, id",
            (session_id,),
        )
    ]


def mark_inputs_applied(
    db: sqlite_utils.Database,
    input_ids: Sequence[str],
    *,
    now: str | None = None,
    agent_row: int | None = None,
) -> list[str]:
    """Mark queued inputs delivered (`applied`) to the agent of row `agent_row` (in
    `agents`); return the ids this changed.

    An id already applied is left as it is and not returned: the caller
    publishes `input.applied` for the returned ids only, so an input is
    reported applied once.
    """
    now = now or utc_now_iso()
    changed: list[str] = []
    for input_id in input_ids:
        cursor = db.execute(
            "UPDATE session_inputs SET status = 'applied', applied_at = ?, agent_row = ?"
            " WHERE id = ? AND status = 'queued'",
            (now, agent_row, input_id),
        )
        if cursor.rowcount:
            changed.append(input_id)
    return changed


def requeue_inputs_of_agents(db: sqlite_utils.Database, agent_rows: Sequence[int]) -> list[str]:
    """Put back in the queue the inputs applied to agents that never ran (a daemon died
    after recording their start and before letting them run); the ids, oldest first.
    They keep their `created_at`, so they go into the next prompt first."""
    requeued: list[str] = []
    for row in agent_rows:
        ids = [
            r["id"]
            for r in db.query(
                "SELECT id FROM session_inputs WHERE agent_row = ? AND status = 'applied'"
                " ORDER BY created_at, id",
                (row,),
            )
        ]
        db.execute(
            "UPDATE session_inputs SET status = 'queued', applied_at = NULL, agent_row = NULL"
            " WHERE agent_row = ? AND status = 'applied'",
            (row,),
        )
        requeued.extend(ids)
    return requeued


def requeue_inputs_of_unreleased(
    db: sqlite_utils.Database, input_ids: Sequence[str], *, ended_at: str
) -> list[str]:
    """Undo a recorded start whose agent was never let run: the pool stopped it held
    because the record's write did not answer in time, and the write committed after
    all. Its inputs (those of `input_ids` marked applied) are `queued` again and its
    `agents` row is closed (`stopped`); the ids queued again (none: it never landed)."""
    marks = ",".join("?" * len(input_ids))
    rows = sorted(
        {
            int(r["agent_row"])
            for r in db.query(
                f"SELECT agent_row FROM session_inputs WHERE id IN ({marks})"
                " AND status = 'applied' AND agent_row IS NOT NULL",
                list(input_ids),
            )
        }
    )
    db.conn.executemany(
        "UPDATE agents SET ended_at = ?, exit_code = NULL, end_reason = 'stopped'"
        " WHERE id = ? AND ended_at IS NULL",
        [(ended_at, row) for row in rows],
    )
    return requeue_inputs_of_agents(db, rows)


# -- records: what the runner reads -----------------------------------------------


@attrs.frozen
class RunnerTask:
    """A task as the session runner sees it (more than the API shows)."""

    id: str
    title: str
    description: str
    status: str
    priority: int
    attempts: int
    error: str | None
    source: str
    position: int
    acceptance: tuple[str, ...]
    resume_id: str | None
    created_at: str
    started_at: str | None
    completed_at: str | None


def runner_tasks(db: sqlite_utils.Database, session_id: str) -> list[RunnerTask]:
    """Every task of the session in run order: priority, then position."""
    return [
        RunnerTask(
            id=row["id"],
            title=row["title"],
            description=row["description"],
            status=row["status"],
            priority=row["priority"],
            attempts=row["attempts"],
            error=row["error"],
            source=row["source"],
            position=row["position"],
            acceptance=tuple(json.loads(row["acceptance"] or "[]")),
            resume_id=row["resume_id"],
            created_at=row["created_at"],
            started_at=row["started_at"],
            completed_at=row["completed_at"],
        )
        for row in db.query(
            "SELECT * FROM tasks WHERE session_id = ? ORDER BY priority, position", (session_id,)
        )
    ]


def agents_without_end(db: sqlite_utils.Database, session_id: str) -> list[dict[str, Any]]:
    """The `agent.spawned` data of the session's agent processes that have no
    `agent.completed`/`agent.failed` yet (a daemon crash cut their runs off), in order.

    Two passes over the session's agent events, not one subquery per agent: a
    session's history may hold many thousands of output events.
    """
    ended = {
        row["agent_id"]
        for row in db.query(
            "SELECT json_extract(data, '$.agentId') AS agent_id FROM events"
            " WHERE session_id = ? AND type IN ('agent.completed', 'agent.failed')",
            (session_id,),
        )
    }
    spawned = [
        json.loads(row["data"])
        for row in db.query(
            "SELECT data FROM events WHERE session_id = ? AND type = 'agent.spawned'"
            " AND json_extract(data, '$.kind') = 'process' ORDER BY id",
            (session_id,),
        )
    ]
    return [data for data in spawned if data.get("agentId") not in ended]


def requeue_active_tasks(db: sqlite_utils.Database, session_id: str, note: str) -> int:
    """Put the session's `active` tasks back to `pending` (their run was cut off)."""
    cursor = db.execute(
        "UPDATE tasks SET status = 'pending', error = ? WHERE session_id = ? AND status = 'active'",
        (note, session_id),
    )
    return cursor.rowcount


def session_counts(db: sqlite_utils.Database) -> dict[str, int]:
    """How many sessions are in each status (statuses with none are left out)."""
    return {
        row["status"]: int(row["n"])
        for row in db.query("SELECT status, COUNT(*) AS n FROM sessions GROUP BY status")
    }


def active_session_ids(db: sqlite_utils.Database) -> list[tuple[str, str]]:
    """(id, status) of every active session, oldest first (start-up reconciliation)."""
    return [
        (row["id"], row["status"])
        for row in db.query(
            f"SELECT id, status FROM sessions WHERE status IN ({_ACTIVE_SQL})"
            " ORDER BY created_at, id",
            _ACTIVE_VALUES,
        )
    ]


def interrupted_by_last_stop(db: sqlite_utils.Database) -> list[str]:
    """Ids of the sessions the last daemon run's graceful stop interrupted, oldest first
    (`LOKI_RESUME_ON_START`); read before this run is recorded.

    They are `interrupted` since that run's `stopped_at` (recorded as its stop began);
    a session interrupted before (and left so) is not one of them. After a crash (no
    `stopped_at`) there are none: the start's reconciliation interrupts what ran.
    """
    row = db.execute("SELECT stopped_at FROM daemon_runs ORDER BY id DESC LIMIT 1").fetchone()
    if row is None or row[0] is None:
        return []
    return [
        row["id"]
        for row in db.query(
            "SELECT id FROM sessions WHERE status = ? AND updated_at >= ? ORDER BY created_at, id",
            (Status.INTERRUPTED.value, row[0]),
        )
    ]
