"""The `.loki/` folder of a project: its file formats and safe file I/O.

Rules (docs/loki-dir.md has every file, its writer and an example):

* **Compatibility.** The formats are the older Loki Mode runner's
  (`reference/runtime.md` §3), so its CLI, dashboard and the registry can
  read what lokid writes: camelCase JSON, 2-space indent, UTF-8, one
  trailing newline. Timestamps are written ISO-8601 UTC with milliseconds and
  `Z`; any ISO-8601 form is read. Keys this module does not know are kept in
  `extra` and written back unchanged.
* **Pure codecs.** `encode_*` take a record and return bytes; `decode_*`
  take bytes and return a record or raise `LokiDirFormatError`. No I/O.
* **One error for bad files.** Reading a file someone else wrote never
  raises anything but `LokiDirFormatError(path, reason)` (bad JSON, wrong
  shape, binary, not UTF-8, too large, not a regular file, unreadable), so
  the caller can turn it into a `warning` event and carry on. A missing file
  is not an error: the readers return `None`. Queue files are read
  leniently: a bad *entry* is skipped and reported in `QueueFile.warnings`,
  only a bad *file* raises.
* **Atomic writes.** `atomic_write_bytes`: a temp file in the same folder
  (`.<name>.<random>.lokid-tmp`), written, fchmod 0644, fsync'd, then
  `os.replace`d over the target and the folder fsync'd. A reader sees the
  old file or the new one, never half of one; a crash leaves at worst a
  stale temp file, which `init_loki_dir` sweeps after 5 minutes. Failures
  raise `LokiDirWriteError(path, reason)` and leave the old file intact.
* **Shared files.** Only `queue/pending.json` has a second writer (the
  agent appends tasks). Read it with `read_file` (bytes plus a `FileStamp`
  taken from the same open file), ingest with `ingest_pending`, and write
  it back with `replace_if_unchanged`, which refuses when the file changed
  since the read (re-read and retry), so an agent's append is never lost
  to lokid's rewrite except within the stat-to-rename window.
* **Control files** `PAUSE`, `STOP`, `HUMAN_INPUT.md`,
  `signals/COMPLETION_REQUESTED`, `signals/TASK_COMPLETION_CLAIMED`: their
  presence is the signal (`read_controls`). `HUMAN_INPUT.md` is consumed by
  renaming it into a claim `logs/human-input-<timestamp>.<input id>.claimed`
  first and reading the renamed file, so text another tool appends after the
  rename lands in a fresh `HUMAN_INPUT.md` for the next read instead of being
  lost. Once the input is stored the claim becomes the record
  `logs/human-input-<timestamp>.md`; a claim left behind (a crash between the
  rename and the store) is found and stored under its id, once. Symbolic
  links, non-regular files, binary or over-64-KiB inputs are moved to
  `logs/human-input-REJECTED-<timestamp>.md` and reported, never read.
  Completion signals are read and deleted.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import functools
import hashlib
import json
import os
import random
import re
import stat
import tempfile
import time
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from lokid.errors import LokiError
from lokid.jsontypes import (
    json_error_text,
    json_type_name,
    loads_bounded,
    may_hold_lone_surrogates,
    without_lone_surrogates,
)
from lokid.prd import (
    MAX_ACCEPTANCE_ITEMS,
    MAX_CRITERION_CHARS,
    MAX_DESCRIPTION_CHARS,
    MAX_TITLE_CHARS,
    PRIORITY_CRITICAL,
    PRIORITY_HIGH,
    PRIORITY_LOW,
    PRIORITY_MEDIUM,
    PrdTask,
)
from lokid.timefmt import iso, utc_now

MAX_LOKI_FILE_BYTES = 5 * 1024 * 1024
"""Largest `.loki/` JSON file read; a bigger one is reported, not read."""
MAX_HUMAN_INPUT_BYTES = 64 * 1024
"""Same bound as `POST /api/sessions/{id}/input`."""
MAX_SIGNAL_BYTES = 64 * 1024
MAX_INGEST_PER_READ = 50
"""New agent tasks taken from `queue/pending.json` per read; the rest wait for the next."""
MAX_TASK_ID_CHARS = 64
STALE_TEMP_SECONDS = 300

QUEUE_NAMES: tuple[str, ...] = ("pending", "in-progress", "completed", "failed", "dead-letter")
"""The queue files (`queue/<name>.json`) `init_loki_dir` creates as `[]`."""

QUEUE_FOR_STATUS: Mapping[str, str] = {
    "pending": "pending",
    "active": "in-progress",
    "completed": "completed",
    "failed": "failed",
}
"""lokid task status -> the queue file that lists it."""

QUEUE_STATUS: Mapping[str, str] = {
    "pending": "pending",
    "active": "in_progress",
    "completed": "completed",
    "failed": "failed",
}
"""lokid task status -> `status` in the queue entry (the reference spells `in_progress`)."""

_TEMP_SUFFIX = ".lokid-tmp"
_TASK_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")


class LokiDirFormatError(LokiError):
    """A `.loki/` file exists but cannot be used; `reason` says why in one line."""

    def __init__(self, path: Path | str | None, reason: str) -> None:
        self.path = Path(path) if path is not None else None
        self.reason = reason
        where = str(self.path) if self.path is not None else "<data>"
        super().__init__(f"{where}: {reason}", details={"path": where, "reason": reason})

    def at(self, path: Path) -> LokiDirFormatError:
        """The same error, naming the file the bytes came from."""
        return LokiDirFormatError(path, self.reason)


class LokiDirWriteError(LokiError):
    """A `.loki/` file or folder could not be written; the old file is intact."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}", details={"path": str(path), "reason": reason})


# -- layout ------------------------------------------------------------------------


@attrs.frozen
class LokiPaths:
    """Where everything lives under `<project>/.loki/` (each path built once: a
    session looks at some of them on every scheduling step and mirror write)."""

    project: Path
    root: Path

    @classmethod
    def for_project(cls, project_dir: str | os.PathLike[str]) -> LokiPaths:
        project = Path(project_dir)
        return cls(project=project, root=project / ".loki")

    @functools.cached_property
    def state_dir(self) -> Path:
        return self.root / "state"

    @functools.cached_property
    def queue_dir(self) -> Path:
        return self.root / "queue"

    @functools.cached_property
    def signals_dir(self) -> Path:
        return self.root / "signals"

    @functools.cached_property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @functools.cached_property
    def orchestrator(self) -> Path:
        return self.state_dir / "orchestrator.json"

    @functools.cached_property
    def autonomy_state(self) -> Path:
        return self.root / "autonomy-state.json"

    @functools.cached_property
    def prd(self) -> Path:
        """Where an inline `prdText` is written (DESIGN.md §5)."""
        return self.root / "prd.md"

    @functools.cached_property
    def pause(self) -> Path:
        return self.root / "PAUSE"

    @functools.cached_property
    def stop(self) -> Path:
        return self.root / "STOP"

    @functools.cached_property
    def human_input(self) -> Path:
        return self.root / "HUMAN_INPUT.md"

    @functools.cached_property
    def completion_requested(self) -> Path:
        return self.signals_dir / "COMPLETION_REQUESTED"

    @functools.cached_property
    def task_completion_claimed(self) -> Path:
        return self.signals_dir / "TASK_COMPLETION_CLAIMED"

    @functools.cached_property
    def current_task(self) -> Path:
        return self.queue_dir / "current-task.json"

    def queue(self, name: str) -> Path:
        """`queue/<name>.json`; `name` is one of `QUEUE_NAMES` (or `review`)."""
        if name not in (*QUEUE_NAMES, "review"):
            raise ValueError(f"unknown queue {name!r}")
        return self.queue_dir / f"{name}.json"

    @functools.cached_property
    def pending(self) -> Path:
        return self.queue("pending")

    @functools.cached_property
    def in_progress(self) -> Path:
        return self.queue("in-progress")

    @functools.cached_property
    def completed(self) -> Path:
        return self.queue("completed")

    @functools.cached_property
    def failed(self) -> Path:
        return self.queue("failed")


def init_loki_dir(project_dir: str | os.PathLike[str]) -> LokiPaths:
    """Create what lokid uses under `<project>/.loki/`; never touch what exists.

    Folders `.loki/`, `state/`, `queue/`, `signals/`, `logs/` (mode 0755 less
    the umask, like `mkdir -p`); each `queue/<name>.json` of `QUEUE_NAMES` as
    `[]` if absent (created with a hard link from a complete temp file, so a
    reader or an agent racing us never sees it half-written, and an existing
    file is never replaced, even a malformed one). Stale lokid temp files
    (older than 5 minutes) are removed. Control files of a previous run are
    left alone: see `clear_stale_controls`.
    """
    project = Path(project_dir)
    if not project.is_dir():
        raise LokiDirWriteError(project, "project folder does not exist or is not a folder")
    paths = LokiPaths.for_project(project)
    made: set[Path] = set()  # new folders: nothing in them to sweep
    for folder in (paths.root, paths.state_dir, paths.queue_dir, paths.signals_dir, paths.logs_dir):
        try:
            os.mkdir(folder, 0o755)
            made.add(folder)
        except FileExistsError:
            if not folder.is_dir():
                raise LokiDirWriteError(folder, "exists and is not a folder") from None
        except OSError as exc:
            raise LokiDirWriteError(folder, f"cannot create folder: {_why(exc)}") from exc
    for name in QUEUE_NAMES:
        _create_if_absent(paths.queue(name), b"[]\n")
    for folder in (paths.root, paths.state_dir, paths.queue_dir):
        if folder not in made:
            sweep_temp_files(folder)
    return paths


def sweep_temp_files(folder: Path, *, older_than: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Remove lokid temp files older than `older_than` seconds (left by a crash)."""
    removed: list[Path] = []
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not (entry.name.startswith(".") and entry.name.endswith(_TEMP_SUFFIX)):
            continue
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime > older_than:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


# -- atomic writes and bounded reads -----------------------------------------------


@attrs.frozen
class FileStamp:
    """Identity and version of a file as seen by one read (for compare-and-swap)."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileStamp:
        return cls(device=st.st_dev, inode=st.st_ino, size=st.st_size, mtime_ns=st.st_mtime_ns)


@attrs.frozen
class FileContent:
    data: bytes
    stamp: FileStamp


def _why(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


_TEMP_NAMES = random.Random()  # temp file names only: not secrets, O_EXCL settles a clash
_TEMP_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_"  # `tempfile`'s own


def _temp_file(path: Path, data: bytes, mode: int, *, durable: bool = True) -> str:
    """A complete (with `durable`: fsync'd) temp file next to `path`; its name.

    `tempfile.mkstemp`'s name and flags (`.<name>.<8 random>.lokid-tmp`, `O_EXCL`,
    mode 0600 until the `fchmod`), without its path handling or a file object:
    half the Python time of a write (every `.loki/` write makes one).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    prefix = f"{os.fspath(path.parent)}/.{path.name}."
    for _ in range(tempfile.TMP_MAX):
        tmp = prefix + "".join(_TEMP_NAMES.choices(_TEMP_CHARS, k=8)) + _TEMP_SUFFIX
        try:
            fd = os.open(tmp, flags, 0o600)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(errno.EEXIST, "no usable temporary file name found")
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fchmod(fd, mode)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o644, durable: bool = True) -> None:
    """Replace `path` with `data` atomically and durably (see the module docstring).

    `durable=False` skips both fsyncs: readers still see the old file or the
    new one, never a mix, but a power loss may lose the write. For mirrors of
    state kept durably elsewhere (the session's `.loki/` files: the store is
    the source of truth), where two fsyncs per file would cost more than the
    file is worth.
    """
    tmp: str | None = None
    try:
        tmp = _temp_file(path, data, mode, durable=durable)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, OSError):
            raise LokiDirWriteError(path, f"cannot write: {_why(exc)}") from exc
        raise
    if durable:
        _fsync_dir(path.parent)


def _create_if_absent(path: Path, data: bytes) -> bool:
    """Create `path` with `data` unless something already has that name; True if created.

    Not fsync'd: it creates empty queue files, which the next `init_loki_dir`
    creates again if a power loss took them.
    """
    if os.path.lexists(path):  # the common case, without a temp file
        return False
    try:
        tmp = _temp_file(path, data, 0o644, durable=False)
    except OSError as exc:
        raise LokiDirWriteError(path, f"cannot write: {_why(exc)}") from exc
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise LokiDirWriteError(path, f"cannot create: {_why(exc)}") from exc
        # No hard links on this file system: O_EXCL create (tiny, non-atomic content).
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            return False
        except OSError as inner:
            raise LokiDirWriteError(path, f"cannot create: {_why(inner)}") from inner
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return True


def file_stamp(path: Path) -> FileStamp | None:
    """The file's stamp now, `None` if it does not exist (or cannot be stat'ed)."""
    try:
        return FileStamp.of(os.stat(path))
    except OSError:
        return None


def replace_if_unchanged(
    path: Path, data: bytes, expected: FileStamp | None, *, durable: bool = True
) -> bool:
    """Write `data` only if `path` is still what a read stamped `expected` (None: absent).

    False (nothing written) when the file changed in between: re-read, merge,
    try again. The check and the rename are not one atomic step; the window
    left is the few microseconds between them.
    """
    if file_stamp(path) != expected:
        return False
    atomic_write_bytes(path, data, durable=durable)
    return True


def read_file(
    path: Path, *, limit: int = MAX_LOKI_FILE_BYTES, follow_symlinks: bool = True
) -> FileContent | None:
    """The file's bytes and stamp, `None` if absent; else `LokiDirFormatError`.

    Opens without blocking (a FIFO named like a state file cannot hang the
    caller), requires a regular file, and reads at most `limit` bytes.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_symlinks:
            raise LokiDirFormatError(path, "is a symbolic link, not a regular file") from None
        if exc.errno == errno.ENOTDIR:
            raise LokiDirFormatError(path, "a parent of it is not a folder") from None
        raise LokiDirFormatError(path, f"cannot open: {_why(exc)}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise LokiDirFormatError(path, f"is {kind}")
        if st.st_size > limit:
            raise LokiDirFormatError(path, f"is {st.st_size} bytes; the limit is {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise LokiDirFormatError(path, f"is more than {limit} bytes")
        return FileContent(data=b"".join(chunks), stamp=FileStamp.of(st))
    except OSError as exc:
        raise LokiDirFormatError(path, f"cannot read: {_why(exc)}") from None
    finally:
        os.close(fd)


# -- JSON ------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _loads(data: bytes, path: Path | None) -> Any:
    if len(data) > MAX_LOKI_FILE_BYTES:
        raise LokiDirFormatError(
            path, f"is {len(data)} bytes; the limit is {MAX_LOKI_FILE_BYTES} bytes"
        )
    nul = data.find(b"\x00")
    if nul >= 0:
        raise LokiDirFormatError(path, f"is binary: NUL byte at offset {nul}")
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        bad = data[exc.start : exc.start + 1].hex()
        raise LokiDirFormatError(
            path, f"is not UTF-8: invalid byte 0x{bad} at offset {exc.start}"
        ) from None
    if not text.strip():
        raise LokiDirFormatError(path, "is empty")
    try:
        value = loads_bounded(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise LokiDirFormatError(path, f"is not valid JSON: {json_error_text(exc)}") from None
    except ValueError as exc:  # NaN/Infinity; too deep, an integer of too many digits
        raise LokiDirFormatError(path, f"is not usable JSON: {exc}") from None
    if may_hold_lone_surrogates(text):  # "\ud800": SQLite, events and answers refuse it
        return without_lone_surrogates(value)
    return value


def _dumps(value: Any) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode()


class _Shape(Exception):
    """A field of a known name has the wrong type (internal; becomes an error or a warning)."""


class _Fields:
    """Typed access to a JSON object's known keys; everything else is `extra`."""

    def __init__(self, obj: Mapping[str, Any], where: str = "") -> None:
        self.obj = obj
        self.where = where
        self.used: set[str] = set()

    def _get(self, key: str) -> Any:
        self.used.add(key)
        return self.obj.get(key)

    def fail(self, key: str, expected: str, value: Any) -> _Shape:
        return _Shape(f"{self.where}{key}: expected {expected}, got {json_type_name(value)}")

    def str_(self, key: str, default: str | None = None) -> str | None:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.fail(key, "a string", value)
        return value

    def req_str(self, key: str) -> str:
        value = self.str_(key)
        if value is None:
            raise _Shape(f"{self.where}{key}: missing")
        return value

    def int_(self, key: str, default: int | None = None) -> int | None:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, "an integer", value)
        return value

    def number(self, key: str) -> int | float | None:
        value = self._get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, "a number", value)
        return value

    def time(self, key: str) -> dt.datetime | None:
        value = self.str_(key)
        return None if value is None else _parse_time(value, f"{self.where}{key}")

    def obj_(self, key: str) -> dict[str, Any]:
        value = self._get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, "an object", value)
        return value

    def strings(self, key: str) -> tuple[str, ...]:
        value = self._get(key)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(key, "an array of strings", value)
        return tuple(value)

    def extra(self) -> dict[str, Any]:
        return {k: v for k, v in self.obj.items() if k not in self.used}


def _parse_time(value: str, where: str) -> dt.datetime:
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        raise _Shape(f"{where}: not an ISO-8601 timestamp: {value[:40]!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC)


def _put(out: dict[str, Any], key: str, value: Any) -> None:
    if value is not None:
        out[key] = iso(value) if isinstance(value, dt.datetime) else value


def _object(value: Any, path: Path | None, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise LokiDirFormatError(
            path, f"expected {what} (a JSON object), got {json_type_name(value)}"
        )
    return value


# -- state/orchestrator.json -----------------------------------------------------------


@attrs.frozen
class OrchestratorState:
    """`state/orchestrator.json`: the run's phase and counters.

    `current_phase` is upper case in the reference (`BOOTSTRAP`, `BUILDING`,
    `COMPLETED`, `FAILED`, or what an agent wrote); `orchestrator_phase`
    maps lokid's phases. Unknown top-level keys are kept in `extra`;
    unknown keys inside `metrics` are not kept.
    """

    current_phase: str
    version: str = ""
    started_at: dt.datetime | None = None
    agents: dict[str, Any] = attrs.Factory(dict)
    tasks_completed: int = 0
    tasks_failed: int = 0
    retries: int = 0
    current_task: str | None = None
    iteration: int | None = None
    extra: dict[str, Any] = attrs.Factory(dict)


def orchestrator_phase(phase: str) -> str:
    """A lokid phase (`bootstrap`, `development`, `qa`, ...) as the reference writes it."""
    return phase.strip().upper().replace("-", "_").replace(" ", "_")


def encode_orchestrator(state: OrchestratorState) -> bytes:
    out: dict[str, Any] = {
        "version": state.version,
        "currentPhase": state.current_phase,
    }
    _put(out, "startedAt", state.started_at)
    out["agents"] = state.agents
    out["metrics"] = {
        "tasksCompleted": state.tasks_completed,
        "tasksFailed": state.tasks_failed,
        "retries": state.retries,
    }
    _put(out, "currentTask", state.current_task)
    _put(out, "iteration", state.iteration)
    for key, value in state.extra.items():
        out.setdefault(key, value)
    return _dumps(out)


def decode_orchestrator(data: bytes, path: Path | None = None) -> OrchestratorState:
    obj = _object(_loads(data, path), path, "the orchestrator state")
    fields = _Fields(obj)
    try:
        metrics = _Fields(fields.obj_("metrics"), "metrics.")
        return OrchestratorState(
            current_phase=fields.req_str("currentPhase"),
            version=fields.str_("version", "") or "",
            started_at=fields.time("startedAt"),
            agents=fields.obj_("agents"),
            tasks_completed=metrics.int_("tasksCompleted", 0) or 0,
            tasks_failed=metrics.int_("tasksFailed", 0) or 0,
            retries=metrics.int_("retries", 0) or 0,
            current_task=fields.str_("currentTask"),
            iteration=fields.int_("iteration"),
            extra=fields.extra(),
        )
    except _Shape as exc:
        raise LokiDirFormatError(path, str(exc)) from None


# -- autonomy-state.json ---------------------------------------------------------------


@attrs.frozen
class AutonomyState:
    """`.loki/autonomy-state.json`: the run's status and counters (reference §1.14).

    `status` uses the reference's words (`autonomy_status` maps lokid's
    session statuses). Keys that are `None` are left out of the file.
    """

    status: str
    iteration_count: int = 0
    retry_count: int = 0
    last_exit_code: int = 0
    last_run: dt.datetime | None = None
    prd_path: str = ""
    pid: int | None = None
    max_retries: int | None = None
    base_wait: int | float | None = None
    extra: dict[str, Any] = attrs.Factory(dict)


_AUTONOMY_STATUS = {
    "starting": "running",
    "running": "running",
    "paused": "paused",
    "stopping": "running",
    "stopped": "stopped",
    "interrupted": "interrupted",
    "completed": "completion_promise_fulfilled",
}
_AUTONOMY_FAILED = {
    "maxIterations": "max_iterations_reached",
    "maxDurationSeconds": "max_duration_reached",
    "budgetUsd": "budget_exceeded",
    "maxConsecutiveFailures": "max_retries_exceeded",
}


def autonomy_status(session_status: str, exit_reason: str | None = None) -> str:
    """A lokid session status (and exit reason) in the reference's `status` vocabulary.

    `completed` becomes `completion_promise_fulfilled` (terminal, success, for
    every reader); `failed` becomes `max_iterations_reached`,
    `max_duration_reached`, `budget_exceeded` or `max_retries_exceeded` when
    the exit reason is that limit, else `failed`; `starting`/`stopping` are
    `running` (the reference has no such words). Anything unknown: `failed`
    if it is a failure, else passed through.
    """
    if session_status == "failed":
        return _AUTONOMY_FAILED.get(exit_reason or "", "failed")
    return _AUTONOMY_STATUS.get(session_status, session_status)


def encode_autonomy_state(state: AutonomyState) -> bytes:
    out: dict[str, Any] = {
        "retryCount": state.retry_count,
        "iterationCount": state.iteration_count,
        "status": state.status,
        "lastExitCode": state.last_exit_code,
    }
    _put(out, "lastRun", state.last_run)
    out["prdPath"] = state.prd_path
    _put(out, "pid", state.pid)
    _put(out, "maxRetries", state.max_retries)
    _put(out, "baseWait", state.base_wait)
    for key, value in state.extra.items():
        out.setdefault(key, value)
    return _dumps(out)


def decode_autonomy_state(data: bytes, path: Path | None = None) -> AutonomyState:
    obj = _object(_loads(data, path), path, "the autonomy state")
    fields = _Fields(obj)
    try:
        return AutonomyState(
            status=fields.req_str("status"),
            iteration_count=fields.int_("iterationCount", 0) or 0,
            retry_count=fields.int_("retryCount", 0) or 0,
            last_exit_code=fields.int_("lastExitCode", 0) or 0,
            last_run=fields.time("lastRun"),
            prd_path=fields.str_("prdPath", "") or "",
            pid=fields.int_("pid"),
            max_retries=fields.int_("maxRetries"),
            base_wait=fields.number("baseWait"),
            extra=fields.extra(),
        )
    except _Shape as exc:
        raise LokiDirFormatError(path, str(exc)) from None


# -- queue/*.json ----------------------------------------------------------------------


@attrs.frozen
class QueueTask:
    """One entry of a `queue/*.json` file (reference §1.6).

    `priority` is what the file says: the reference writes `high`, `medium`,
    `low`; agents may write numbers. `queue_priority`/`priority_from_queue`
    convert to and from lokid's 0-3 scale.
    """

    id: str
    title: str = ""
    description: str = ""
    status: str = "pending"
    priority: str | int | None = None
    source: str | None = None
    type: str | None = None
    project: str | None = None
    acceptance_criteria: tuple[str, ...] = ()
    user_story: str | None = None
    created_at: dt.datetime | None = None
    started_at: dt.datetime | None = None
    completed_at: dt.datetime | None = None
    error: str | None = None
    extra: dict[str, Any] = attrs.Factory(dict)


@attrs.frozen
class QueueFile:
    """A decoded queue file. `wrapper`: the other keys of the `{"tasks": [...]}` form."""

    tasks: tuple[QueueTask, ...]
    wrapper: dict[str, Any] | None = None
    warnings: tuple[str, ...] = ()


_QUEUE_PRIORITY_LABELS = {
    PRIORITY_CRITICAL: "high",
    PRIORITY_HIGH: "high",
    PRIORITY_MEDIUM: "medium",
    PRIORITY_LOW: "low",
}
_PRIORITY_FROM_LABEL = {
    "critical": PRIORITY_CRITICAL,
    "urgent": PRIORITY_CRITICAL,
    "p0": PRIORITY_CRITICAL,
    "high": PRIORITY_HIGH,
    "p1": PRIORITY_HIGH,
    "medium": PRIORITY_MEDIUM,
    "normal": PRIORITY_MEDIUM,
    "p2": PRIORITY_MEDIUM,
    "low": PRIORITY_LOW,
    "p3": PRIORITY_LOW,
}


def queue_priority(priority: int) -> str:
    """lokid's 0-3 priority as the reference writes it (`critical` is written `high`)."""
    return _QUEUE_PRIORITY_LABELS.get(priority, "medium")


def priority_from_queue(value: Any) -> int | None:
    """A queue entry's priority on lokid's 0-3 scale; `None` if it cannot be read.

    Words: critical/urgent/p0 0, high/p1 1, medium/normal/p2 2, low/p3 3.
    Integers 0-3 are taken as lokid's scale.
    """
    if isinstance(value, str):
        return _PRIORITY_FROM_LABEL.get(value.strip().lower())
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 3:
        return value
    return None


def queue_task_from_prd(
    task: PrdTask, *, project: str | None = None, status: str = "pending"
) -> QueueTask:
    """A parsed PRD task as the reference's PRD queue entry (`source: "prd"`)."""
    return QueueTask(
        id=task.id,
        title=task.title,
        description=task.description,
        status=status,
        priority=queue_priority(task.priority),
        source="prd",
        project=project,
        acceptance_criteria=task.acceptance,
    )


def _encode_task(task: QueueTask) -> dict[str, Any]:
    out: dict[str, Any] = {"id": task.id}
    _put(out, "type", task.type)
    out["title"] = task.title
    out["description"] = task.description
    out["status"] = task.status
    _put(out, "priority", task.priority)
    _put(out, "source", task.source)
    _put(out, "project", task.project)
    out["acceptance_criteria"] = list(task.acceptance_criteria)
    _put(out, "user_story", task.user_story)
    _put(out, "createdAt", task.created_at)
    _put(out, "startedAt", task.started_at)
    _put(out, "completedAt", task.completed_at)
    _put(out, "error", task.error)
    for key, value in task.extra.items():
        out.setdefault(key, value)
    return out


def _decode_task(entry: Any, index: int) -> QueueTask:
    """One queue entry; `_Shape` names what is wrong with it."""
    where = f"entry {index}: "
    if not isinstance(entry, dict):
        raise _Shape(f"{where}expected an object, got {json_type_name(entry)}")
    fields = _Fields(entry, where)
    task_id = fields.str_("id")
    if not task_id:
        raise _Shape(f"{where}id: missing or empty")
    priority = fields._get("priority")
    if priority is not None and (isinstance(priority, bool) or not isinstance(priority, str | int)):
        raise fields.fail("priority", "a string or an integer", priority)
    return QueueTask(
        id=task_id,
        title=fields.str_("title", "") or "",
        description=fields.str_("description", "") or "",
        status=fields.str_("status", "pending") or "pending",
        priority=priority,
        source=fields.str_("source"),
        type=fields.str_("type"),
        project=fields.str_("project"),
        acceptance_criteria=fields.strings("acceptance_criteria"),
        user_story=fields.str_("user_story"),
        created_at=fields.time("createdAt"),
        started_at=fields.time("startedAt"),
        completed_at=fields.time("completedAt"),
        error=fields.str_("error"),
        extra=fields.extra(),
    )


def _entries(value: Any, path: Path | None) -> tuple[list[Any], dict[str, Any] | None]:
    """A queue file's entries: a bare array, or an object with a `tasks` array."""
    if isinstance(value, list):
        return value, None
    if isinstance(value, dict):
        tasks = value.get("tasks")
        if not isinstance(tasks, list):
            found = f"tasks is {json_type_name(tasks)}" if "tasks" in value else 'no "tasks" key'
            raise LokiDirFormatError(
                path, f'expected an array or an object with a "tasks" array; {found}'
            )
        return tasks, {k: v for k, v in value.items() if k != "tasks"}
    raise LokiDirFormatError(
        path, f'expected an array or an object with a "tasks" array, got {json_type_name(value)}'
    )


def encode_queue(tasks: Iterable[QueueTask], wrapper: Mapping[str, Any] | None = None) -> bytes:
    """A queue file: a bare array, or `{**wrapper, "tasks": [...]}` to keep another tool's form."""
    entries = [_encode_task(task) for task in tasks]
    if wrapper is None:
        return _dumps(entries)
    return _dumps({**{k: v for k, v in wrapper.items() if k != "tasks"}, "tasks": entries})


def decode_queue(data: bytes, path: Path | None = None) -> QueueFile:
    """A queue file; bad entries are skipped and described in `warnings`."""
    entries, wrapper = _entries(_loads(data, path), path)
    tasks: list[QueueTask] = []
    warnings: list[str] = []
    for index, entry in enumerate(entries):
        try:
            tasks.append(_decode_task(entry, index))
        except _Shape as exc:
            warnings.append(f"{exc}; entry skipped")
    return QueueFile(tasks=tuple(tasks), wrapper=wrapper, warnings=tuple(warnings))


def encode_current_task(task: QueueTask | None) -> bytes:
    """`queue/current-task.json`: the task being worked on, `{}` between iterations."""
    return _dumps({} if task is None else _encode_task(task))


def decode_current_task(data: bytes, path: Path | None = None) -> QueueTask | None:
    obj = _object(_loads(data, path), path, "the current task")
    if not obj:
        return None
    try:
        return _decode_task(obj, 0)
    except _Shape as exc:
        raise LokiDirFormatError(path, str(exc).removeprefix("entry 0: ")) from None


# -- tasks an agent appended to queue/pending.json -------------------------------------


@attrs.frozen
class AgentTask:
    """A new task taken from `queue/pending.json` (DESIGN.md §5: `source: agent`)."""

    id: str
    title: str
    description: str
    priority: int
    acceptance: tuple[str, ...]


@attrs.frozen
class IngestResult:
    tasks: tuple[AgentTask, ...]
    """New, valid tasks in file order, at most `max_new`."""
    warnings: tuple[str, ...]
    """One line per rejected entry or cut field; deterministic, so repeats can be suppressed."""
    deferred: int
    """Valid new tasks past `max_new`, left in the file for the next read."""
    wrapper: dict[str, Any] | None = None
    """The other keys of the `{"tasks": [...]}` form (None: a bare array), for a rewrite
    to keep the file's form."""


def _derived_id(entry: Mapping[str, Any]) -> str:
    canonical = json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "agent-" + hashlib.sha256(canonical.encode()).hexdigest()[:12]


def _bounded(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[: limit - 1].rstrip() + "\u2026"


def ingest_pending(
    data: bytes,
    known_ids: Collection[str],
    *,
    max_new: int = MAX_INGEST_PER_READ,
    path: Path | None = None,
) -> IngestResult:
    """The tasks in `pending.json` that lokid does not know yet, validated and bounded.

    * Entries whose `id` is in `known_ids` are lokid's own (or already taken):
      skipped silently. An entry without `id` gets `agent-<12 hex>`, a hash of
      its content, so the same entry is recognised on every read.
    * Rejected with a warning: not an object; `id` not a string of 1-64
      characters from `A-Z a-z 0-9 . _ : -`; a second entry with an id already
      seen in this file; `status` other than `pending`; no non-empty `title`.
    * Accepted with a warning: a title over 200 characters or a description
      over 4000 (cut with an ellipsis), more than 20 criteria or criteria over
      500 characters (cut), an unreadable `priority` (medium), wrong-typed
      `description`/`acceptance_criteria` (ignored).
    * At most `max_new` tasks per read; the count of the rest is `deferred`.
    A file that is not a queue at all raises `LokiDirFormatError`.
    """
    entries, wrapper = _entries(_loads(data, path), path)
    known = set(known_ids)
    seen: set[str] = set()
    tasks: list[AgentTask] = []
    warnings: list[str] = []
    deferred = 0
    for index, entry in enumerate(entries):
        where = f"entry {index}"
        if not isinstance(entry, dict):
            warnings.append(f"{where}: expected an object, got {json_type_name(entry)}; rejected")
            continue
        raw_id = entry.get("id")
        if raw_id is None:
            task_id = _derived_id(entry)
        elif (
            not isinstance(raw_id, str)
            or len(raw_id) > MAX_TASK_ID_CHARS
            or not _TASK_ID_RE.match(raw_id)
        ):
            shown = json.dumps(raw_id, ensure_ascii=True)[:80]
            warnings.append(
                f"{where}: id {shown} is not 1-{MAX_TASK_ID_CHARS} characters of "
                "A-Z a-z 0-9 . _ : -; rejected"
            )
            continue
        else:
            task_id = raw_id
        if task_id in known:
            continue
        where = f"{where} ({task_id})"
        if task_id in seen:
            warnings.append(f"{where}: duplicate id in this file; rejected")
            continue
        seen.add(task_id)
        status = entry.get("status")
        if status is not None and status != "pending":
            shown = json.dumps(status, ensure_ascii=True)[:40]
            warnings.append(f'{where}: status {shown} is not "pending"; rejected')
            continue
        title = entry.get("title")
        title = " ".join(title.split()) if isinstance(title, str) else ""
        if not title:
            warnings.append(f"{where}: no title; rejected")
            continue
        if len(tasks) >= max_new:
            deferred += 1
            continue
        if len(title) > MAX_TITLE_CHARS:
            warnings.append(f"{where}: title cut to {MAX_TITLE_CHARS} characters")
            title = _bounded(title, MAX_TITLE_CHARS)
        description = entry.get("description", "")
        if not isinstance(description, str):
            warnings.append(f"{where}: description is {json_type_name(description)}; ignored")
            description = ""
        if len(description) > MAX_DESCRIPTION_CHARS:
            warnings.append(f"{where}: description cut to {MAX_DESCRIPTION_CHARS} characters")
            description = _bounded(description, MAX_DESCRIPTION_CHARS)
        acceptance = _agent_criteria(entry.get("acceptance_criteria"), where, warnings)
        priority = PRIORITY_MEDIUM
        if "priority" in entry:
            read = priority_from_queue(entry["priority"])
            if read is None:
                shown = json.dumps(entry["priority"], ensure_ascii=True)[:40]
                warnings.append(f"{where}: priority {shown} not understood; medium used")
            else:
                priority = read
        tasks.append(
            AgentTask(
                id=task_id,
                title=title,
                description=description,
                priority=priority,
                acceptance=acceptance,
            )
        )
    if deferred:
        warnings.append(
            f"{deferred} more new task(s) left for the next read (at most {max_new} per read)"
        )
    return IngestResult(
        tasks=tuple(tasks), warnings=tuple(warnings), deferred=deferred, wrapper=wrapper
    )


def _agent_criteria(value: Any, where: str, warnings: list[str]) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        warnings.append(f"{where}: acceptance_criteria is {json_type_name(value)}; ignored")
        return ()
    strings = [" ".join(v.split()) for v in value if isinstance(v, str)]
    if len(strings) != len(value):
        warnings.append(f"{where}: {len(value) - len(strings)} non-string criteria ignored")
    strings = [s for s in strings if s]
    if len(strings) > MAX_ACCEPTANCE_ITEMS:
        warnings.append(f"{where}: only the first {MAX_ACCEPTANCE_ITEMS} criteria kept")
        strings = strings[:MAX_ACCEPTANCE_ITEMS]
    if any(len(s) > MAX_CRITERION_CHARS for s in strings):
        warnings.append(f"{where}: criteria cut to {MAX_CRITERION_CHARS} characters")
        strings = [_bounded(s, MAX_CRITERION_CHARS) for s in strings]
    return tuple(strings)


# -- reading and writing the files -------------------------------------------------------


def _read_decoded(path: Path, decode: Any) -> Any:
    content = read_file(path)
    if content is None:
        return None
    try:
        return decode(content.data, path)
    except LokiDirFormatError as exc:
        raise exc.at(path) from None


def read_orchestrator(path: Path) -> OrchestratorState | None:
    """`state/orchestrator.json`; `None` if absent; `LokiDirFormatError` if unusable."""
    result: OrchestratorState | None = _read_decoded(path, decode_orchestrator)
    return result


def write_orchestrator(path: Path, state: OrchestratorState) -> None:
    atomic_write_bytes(path, encode_orchestrator(state))


def read_autonomy_state(path: Path) -> AutonomyState | None:
    """`autonomy-state.json`; `None` if absent; `LokiDirFormatError` if unusable."""
    result: AutonomyState | None = _read_decoded(path, decode_autonomy_state)
    return result


def write_autonomy_state(path: Path, state: AutonomyState) -> None:
    atomic_write_bytes(path, encode_autonomy_state(state))


def read_queue(path: Path) -> QueueFile | None:
    """A `queue/*.json` file; `None` if absent; `LokiDirFormatError` if not a queue at all."""
    result: QueueFile | None = _read_decoded(path, decode_queue)
    return result


def write_queue(
    path: Path, tasks: Iterable[QueueTask], wrapper: Mapping[str, Any] | None = None
) -> None:
    atomic_write_bytes(path, encode_queue(tasks, wrapper))


def read_current_task(path: Path) -> QueueTask | None:
    result: QueueTask | None = _read_decoded(path, decode_current_task)
    return result


def write_current_task(path: Path, task: QueueTask | None) -> None:
    atomic_write_bytes(path, encode_current_task(task))


def ingest_pending_file(
    path: Path, known_ids: Collection[str], *, max_new: int = MAX_INGEST_PER_READ
) -> tuple[IngestResult, FileStamp | None]:
    """`ingest_pending` on the file, and the stamp to pass to `replace_if_unchanged`.

    An absent file is an empty result with stamp `None`.
    """
    content = read_file(path)
    if content is None:
        return IngestResult(tasks=(), warnings=(), deferred=0), None
    try:
        result = ingest_pending(content.data, known_ids, max_new=max_new, path=path)
    except LokiDirFormatError as exc:
        raise exc.at(path) from None
    return result, content.stamp


# -- control files ---------------------------------------------------------------------


@attrs.frozen
class ControlFiles:
    """Which control files exist now (their presence is the signal)."""

    pause: bool
    stop: bool
    human_input: bool
    completion_requested: bool


class ControlWatch:
    """`read_controls` for one project, its paths built once: a session looks at
    its control files on every poll (five `lstat` calls, no path allocation)."""

    def __init__(self, paths: LokiPaths) -> None:
        self._pause = os.fspath(paths.pause)
        self._stop = os.fspath(paths.stop)
        self._human_input = os.fspath(paths.human_input)
        self._completion = (
            os.fspath(paths.completion_requested),
            os.fspath(paths.task_completion_claimed),
        )

    def read(self) -> ControlFiles:
        """Never raises: a name that cannot be checked counts as absent."""
        exists = os.path.lexists
        return ControlFiles(
            pause=exists(self._pause),
            stop=exists(self._stop),
            human_input=exists(self._human_input),
            completion_requested=exists(self._completion[0]) or exists(self._completion[1]),
        )


def read_controls(paths: LokiPaths) -> ControlFiles:
    """Which control files exist now; never raises (see `ControlWatch`)."""
    return ControlWatch(paths).read()


def create_control(path: Path, content: bytes = b"") -> None:
    """Write a control file (`PAUSE`, `STOP`, ...) atomically."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    atomic_write_bytes(path, content)


def consume_control(path: Path) -> bool:
    """Remove a control file; True if it was there (False also when it cannot be removed)."""
    try:
        os.unlink(path)
    except OSError:
        return False
    return True


def clear_stale_controls(paths: LokiPaths) -> tuple[str, ...]:
    """At the start of a new session: drop `PAUSE`, `STOP` and completion signals left
    by an earlier run (a stale STOP would end the new session at once). Returns
    the names removed. `HUMAN_INPUT.md` is kept: it is input still to deliver.
    """
    removed = []
    for path in (
        paths.pause,
        paths.stop,
        paths.completion_requested,
        paths.task_completion_claimed,
    ):
        if consume_control(path):
            removed.append(str(path.relative_to(paths.root)))
    return tuple(removed)


CLAIM_SUFFIX = ".claimed"
_CLAIM_NAME = re.compile(
    r"human-input-(?P<stamp>[0-9TZ.\-]+)\.(?P<id>input-[0-9A-Za-z]{1,64})\.claimed"
)


@attrs.frozen
class HumanInput:
    text: str
    """The input, surrounding whitespace stripped; never empty."""
    processed_path: Path
    """The claim: `logs/human-input-<timestamp>.<input id>.claimed`, until it is stored."""
    input_id: str
    """The id its input is stored under: the claim's name holds it, so a claim a crash
    left is stored once, whether or not its first store committed."""


def _file_time(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%S.") + (
        f"{moment.astimezone(dt.UTC).microsecond // 1000:03d}Z"
    )


def _unused(folder: Path, stem: str, suffix: str) -> Path:
    candidate = folder / f"{stem}{suffix}"
    counter = 2
    while os.path.lexists(candidate):
        candidate = folder / f"{stem}-{counter}{suffix}"
        counter += 1
    return candidate


def _reject(paths: LokiPaths, current: Path, stamp: str, reason: str) -> LokiDirFormatError:
    """Move a file that is never read to `logs/human-input-REJECTED-<stamp>.md`."""
    source = paths.human_input
    target = _unused(paths.logs_dir, f"human-input-REJECTED-{stamp}", ".md")
    try:
        os.rename(current, target)
    except OSError as exc:
        return LokiDirFormatError(source, f"{reason}; could not move it aside: {_why(exc)}")
    return LokiDirFormatError(source, f"{reason}; moved to {target}")


def consume_human_input(
    paths: LokiPaths, *, input_id: str, now: dt.datetime | None = None
) -> HumanInput | None:
    """Claim `HUMAN_INPUT.md` for the input `input_id`: `None` if absent or blank, else
    its text.

    The file is renamed to the claim `logs/human-input-<timestamp>.<input_id>.claimed`
    before it is read (see the module docstring); once its input is stored the caller
    renames the claim to the record `logs/human-input-<timestamp>.md`
    (`settle_human_input`). A claim still there was never known stored: a crash came
    in between, and `pending_human_inputs` finds it. A symbolic link or other
    non-regular file, a file over `MAX_HUMAN_INPUT_BYTES`, binary or non-UTF-8
    content is renamed to `logs/human-input-REJECTED-<timestamp>.md` instead and
    reported with `LokiDirFormatError`; it is not offered again.
    """
    source = paths.human_input
    stamp = _file_time(now or utc_now())
    try:
        st = os.lstat(source)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LokiDirFormatError(source, f"cannot check: {_why(exc)}") from None
    try:
        paths.logs_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        raise LokiDirFormatError(source, f"cannot create {paths.logs_dir}: {_why(exc)}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        raise _reject(paths, source, stamp, f"is {kind}; it is not read")
    claimed = paths.logs_dir / f"human-input-{stamp}.{input_id}{CLAIM_SUFFIX}"
    try:
        os.rename(source, claimed)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LokiDirFormatError(source, f"cannot move to {claimed}: {_why(exc)}") from None
    return _read_claim(paths, claimed, stamp, input_id)


def _read_claim(paths: LokiPaths, claimed: Path, stamp: str, input_id: str) -> HumanInput | None:
    try:
        content = read_file(claimed, limit=MAX_HUMAN_INPUT_BYTES, follow_symlinks=False)
    except LokiDirFormatError as exc:
        raise _reject(paths, claimed, stamp, exc.reason) from None
    if content is None:
        return None
    data = content.data
    if b"\x00" in data:
        raise _reject(paths, claimed, stamp, "is binary (NUL bytes)")
    try:
        text = data.decode("utf-8").removeprefix("\ufeff").strip()
    except UnicodeDecodeError as exc:
        raise _reject(
            paths, claimed, stamp, f"is not UTF-8 (invalid byte at offset {exc.start})"
        ) from None
    note = HumanInput(text=text, processed_path=claimed, input_id=input_id)
    if not text:  # nothing to store: the claim is the record at once (or at the next look)
        with contextlib.suppress(OSError):
            settle_human_input(paths, note)
        return None
    return note


def settle_human_input(paths: LokiPaths, note: HumanInput) -> Path:
    """Its input is stored: rename the claim to `logs/human-input-<timestamp>.md`, the
    record of what was taken (`-2`, `-3`... if taken). `OSError` if it cannot be
    renamed: the claim stays, and storing it again finds its id stored."""
    name = note.processed_path.name
    stamp = name.removeprefix("human-input-").removesuffix(f".{note.input_id}{CLAIM_SUFFIX}")
    record = _unused(paths.logs_dir, f"human-input-{stamp}", ".md")
    os.rename(note.processed_path, record)
    return record


def pending_human_inputs(paths: LokiPaths) -> tuple[list[HumanInput], list[LokiDirFormatError]]:
    """The claims in `logs/` not known stored (a daemon died between the rename and
    the commit of the input, or the store refused it), oldest first, and the
    problems of those that cannot be read (each moved aside as `REJECTED`).

    One `listdir` of `logs/`: the session looks once when its actor starts, and
    again after the store refused a write."""
    try:
        names = os.listdir(paths.logs_dir)
    except FileNotFoundError:
        return [], []
    except OSError as exc:
        return [], [LokiDirFormatError(paths.logs_dir, f"cannot list: {_why(exc)}")]
    notes: list[HumanInput] = []
    problems: list[LokiDirFormatError] = []
    for name in sorted(names):
        match = _CLAIM_NAME.fullmatch(name)
        if match is None:
            continue
        try:
            note = _read_claim(
                paths, paths.logs_dir / name, match.group("stamp"), match.group("id")
            )
        except LokiDirFormatError as exc:
            problems.append(exc)
            continue
        if note is not None:
            notes.append(note)
    return notes, problems


@attrs.frozen
class CompletionRequest:
    """The agent asked to complete the session (reference §1.10)."""

    sources: tuple[str, ...]
    """`COMPLETION_REQUESTED` and/or `TASK_COMPLETION_CLAIMED`: the files consumed."""
    statement: str | None = None
    evidence: str | None = None
    confidence: str | None = None
    warnings: tuple[str, ...] = ()
    """Content that could not be read; the request stands anyway."""


def consume_completion_request(paths: LokiPaths) -> CompletionRequest | None:
    """Read and delete the completion signals; `None` if there is none. Never raises.

    `COMPLETION_REQUESTED` is touched by the agent; its text, if any, is the
    statement. `TASK_COMPLETION_CLAIMED` is the MCP tool's JSON
    (`statement`, `evidence`, `confidence`). Unreadable content is a warning:
    the file's existence is the request.
    """
    sources: list[str] = []
    warnings: list[str] = []
    statement = evidence = confidence = None
    for name, path in (
        ("COMPLETION_REQUESTED", paths.completion_requested),
        ("TASK_COMPLETION_CLAIMED", paths.task_completion_claimed),
    ):
        if not os.path.lexists(path):
            continue
        sources.append(name)
        try:
            content = read_file(path, limit=MAX_SIGNAL_BYTES, follow_symlinks=False)
        except LokiDirFormatError as exc:
            warnings.append(f"{name}: {exc.reason}")
            content = None
        if not consume_control(path) and os.path.lexists(path):
            warnings.append(f"{name}: could not be removed; it will be seen again")
        if content is None or not content.data.strip():
            continue
        if name == "COMPLETION_REQUESTED":
            try:
                statement = content.data.decode("utf-8").strip() or statement
            except UnicodeDecodeError:
                warnings.append(f"{name}: content is not UTF-8; ignored")
            continue
        try:
            claim = _object(_loads(content.data, path), path, "a completion claim")
        except LokiDirFormatError as exc:
            warnings.append(f"{name}: {exc.reason}")
            continue
        for key in ("statement", "evidence", "confidence"):
            value = claim.get(key)
            if value is not None and not isinstance(value, str):
                warnings.append(f"{name}: {key} is {json_type_name(value)}; ignored")
        statement = _str_or(claim.get("statement"), statement)
        evidence = _str_or(claim.get("evidence"), evidence)
        confidence = _str_or(claim.get("confidence"), confidence)
    if not sources:
        return None
    return CompletionRequest(
        sources=tuple(sources),
        statement=statement,
        evidence=evidence,
        confidence=confidence,
        warnings=tuple(warnings),
    )


def _str_or(value: Any, default: str | None) -> str | None:
    return value.strip() or default if isinstance(value, str) else default
