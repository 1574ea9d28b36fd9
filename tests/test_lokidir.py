""".loki/ formats and file I/O (lokid.lokidir): round trips, atomicity, malformed files."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lokid import lokidir
from lokid.lokidir import (
    MAX_HUMAN_INPUT_BYTES,
    MAX_LOKI_FILE_BYTES,
    QUEUE_NAMES,
    AgentTask,
    AutonomyState,
    LokiDirFormatError,
    LokiDirWriteError,
    LokiPaths,
    OrchestratorState,
    QueueFile,
    QueueTask,
    atomic_write_bytes,
    autonomy_status,
    clear_stale_controls,
    consume_completion_request,
    consume_human_input,
    create_control,
    decode_autonomy_state,
    decode_current_task,
    decode_orchestrator,
    decode_queue,
    encode_autonomy_state,
    encode_current_task,
    encode_orchestrator,
    encode_queue,
    ingest_pending,
    ingest_pending_file,
    init_loki_dir,
    orchestrator_phase,
    priority_from_queue,
    queue_priority,
    queue_task_from_prd,
    read_autonomy_state,
    read_controls,
    read_current_task,
    read_orchestrator,
    read_queue,
    replace_if_unchanged,
    write_autonomy_state,
    write_current_task,
    write_orchestrator,
    write_queue,
)
from lokid.prd import PrdTask

T0 = dt.datetime(2026, 3, 1, 12, 30, 45, 123000, tzinfo=dt.UTC)
T1 = dt.datetime(2026, 3, 1, 12, 31, 0, 0, tzinfo=dt.UTC)


@pytest.fixture
def paths(tmp_path: Path) -> LokiPaths:
    return init_loki_dir(tmp_path)


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- init_loki_dir ------------------------------------------------------------------


def test_init_creates_the_layout_and_empty_queues(tmp_path: Path) -> None:
    paths = init_loki_dir(tmp_path)
    assert paths.root == tmp_path / ".loki"
    umask = os.umask(0)
    os.umask(umask)
    for folder in (paths.root, paths.state_dir, paths.queue_dir, paths.signals_dir, paths.logs_dir):
        assert folder.is_dir()
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755 & ~umask
    assert files_in(paths.queue_dir) == sorted(f"{name}.json" for name in QUEUE_NAMES)
    for name in QUEUE_NAMES:
        assert paths.queue(name).read_bytes() == b"[]\n"
        assert stat.S_IMODE(paths.queue(name).stat().st_mode) == 0o644
    assert read_queue(paths.pending) == QueueFile(tasks=())


def test_init_is_idempotent_and_never_replaces_existing_files(tmp_path: Path) -> None:
    paths = init_loki_dir(tmp_path)
    paths.pending.write_bytes(b"{not json")  # an agent's half-written file: not ours to fix
    paths.completed.write_bytes(b'[{"id": "x"}]')
    assert init_loki_dir(tmp_path) == paths
    assert paths.pending.read_bytes() == b"{not json"
    assert paths.completed.read_bytes() == b'[{"id": "x"}]'
    assert not [p for p in paths.queue_dir.iterdir() if p.name.startswith(".")]


def test_init_refuses_a_missing_project_or_a_file_in_the_way(tmp_path: Path) -> None:
    with pytest.raises(LokiDirWriteError, match="does not exist"):
        init_loki_dir(tmp_path / "nope")
    (tmp_path / ".loki").write_text("not a folder")
    with pytest.raises(LokiDirWriteError, match="exists and is not a folder") as info:
        init_loki_dir(tmp_path)
    assert info.value.path == tmp_path / ".loki"


def test_init_sweeps_stale_temp_files_only(tmp_path: Path) -> None:
    paths = init_loki_dir(tmp_path)
    stale = paths.state_dir / ".orchestrator.json.abc123.lokid-tmp"
    fresh = paths.queue_dir / ".pending.json.def456.lokid-tmp"
    other = paths.state_dir / ".someone-elses.tmp"
    for path in (stale, fresh, other):
        path.write_text("partial")
    old = time.time() - 600
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    init_loki_dir(tmp_path)
    assert not stale.exists()
    assert fresh.exists() and other.exists()


def test_init_sweeps_only_folders_it_did_not_just_make(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    swept: list[Path] = []
    real = lokidir.sweep_temp_files

    def sweep(folder: Path, **kwargs: Any) -> list[Path]:
        swept.append(folder)
        return real(folder, **kwargs)

    monkeypatch.setattr(lokidir, "sweep_temp_files", sweep)
    paths = init_loki_dir(tmp_path)
    assert swept == []  # a new .loki/ holds no temp file of ours
    init_loki_dir(tmp_path)
    assert swept == [paths.root, paths.state_dir, paths.queue_dir]


def test_temp_files_are_named_for_the_sweep_and_get_the_mode(tmp_path: Path) -> None:
    target = tmp_path / "orchestrator.json"
    tmp = lokidir._temp_file(target, b"{}\n", 0o644, durable=False)
    name = os.path.basename(tmp)
    assert os.path.dirname(tmp) == str(tmp_path)
    assert name.startswith(".orchestrator.json.") and name.endswith(".lokid-tmp")
    assert len(name) == len(".orchestrator.json.") + 8 + len(".lokid-tmp")
    assert stat.S_IMODE(os.stat(tmp).st_mode) == 0o644
    assert Path(tmp).read_bytes() == b"{}\n"


# -- round trips -----------------------------------------------------------------------

ORCHESTRATOR = OrchestratorState(
    current_phase="DEVELOPMENT",
    version="lokid 0.1.0",
    started_at=T0,
    agents={"agent-1": {"status": "running"}},
    tasks_completed=3,
    tasks_failed=1,
    retries=2,
    current_task="prd-004",
    iteration=7,
    extra={"complexity": "standard", "sessionId": "session-abc"},
)

AUTONOMY = AutonomyState(
    status="running",
    iteration_count=7,
    retry_count=1,
    last_exit_code=0,
    last_run=T0,
    prd_path="./prd.md",
    pid=4242,
    max_retries=50,
    base_wait=60,
    extra={"sessionId": "session-abc"},
)

TASKS = (
    QueueTask(
        id="prd-001",
        title="User can reset password via email link",
        description="The link expires after one hour.",
        status="pending",
        priority="high",
        source="prd",
        project="Invoicely",
        acceptance_criteria=("Expired links show an error", "Links work once"),
    ),
    QueueTask(
        id="prd-002",
        title="Export invoices",
        status="in_progress",
        priority=2,
        source="prd",
        started_at=T0,
        extra={"agent": "claude", "notes": ["tried csv first"]},
    ),
    QueueTask(
        id="iteration-3",
        type="iteration",
        title="Iteration 3 failed (exit 1)",
        status="failed",
        started_at=T0,
        completed_at=T1,
        error="tests failed",
        created_at=T0,
        user_story="As a user, I want exports",
    ),
)


def test_orchestrator_round_trip_and_reference_shape() -> None:
    data = encode_orchestrator(ORCHESTRATOR)
    assert decode_orchestrator(data) == ORCHESTRATOR
    assert json.loads(data) == {
        "version": "lokid 0.1.0",
        "currentPhase": "DEVELOPMENT",
        "startedAt": "2026-03-01T12:30:45.123Z",
        "agents": {"agent-1": {"status": "running"}},
        "metrics": {"tasksCompleted": 3, "tasksFailed": 1, "retries": 2},
        "currentTask": "prd-004",
        "iteration": 7,
        "complexity": "standard",
        "sessionId": "session-abc",
    }
    assert data.endswith(b"}\n") and b'\n  "version"' in data  # 2-space indent, final newline
    minimal = OrchestratorState(current_phase="BOOTSTRAP")
    assert decode_orchestrator(encode_orchestrator(minimal)) == minimal


def test_orchestrator_reads_what_the_reference_wrote() -> None:
    written = (
        b'{"version":"9.22.12","currentPhase":"BUILDING","startedAt":"2026-01-01T00:00:00Z",'
        b'"agents":{},"metrics":{"tasksCompleted":0,"tasksFailed":0,"retries":0}}'
    )
    state = decode_orchestrator(written)
    assert state.current_phase == "BUILDING"
    assert state.started_at == dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert json.loads(encode_orchestrator(state))["startedAt"] == "2026-01-01T00:00:00.000Z"


def test_autonomy_state_round_trip_and_reference_shape() -> None:
    data = encode_autonomy_state(AUTONOMY)
    assert decode_autonomy_state(data) == AUTONOMY
    assert list(json.loads(data)) == [
        "retryCount",
        "iterationCount",
        "status",
        "lastExitCode",
        "lastRun",
        "prdPath",
        "pid",
        "maxRetries",
        "baseWait",
        "sessionId",
    ]
    reference = (
        b'{"retryCount": 0, "iterationCount": 7, "status": "running", "lastExitCode": 0,'
        b' "lastRun": "2026-01-01T00:00:00Z", "prdPath": "./prd.md", "pid": 12345,'
        b' "maxRetries": 50, "baseWait": 60}'
    )
    state = decode_autonomy_state(reference)
    assert (state.iteration_count, state.pid, state.base_wait) == (7, 12345, 60)
    minimal = AutonomyState(status="paused")
    assert decode_autonomy_state(encode_autonomy_state(minimal)) == minimal
    assert "pid" not in json.loads(encode_autonomy_state(minimal))  # None: left out


@pytest.mark.parametrize("wrapper", [None, {"version": 2, "owner": "agent"}])
def test_queue_round_trip_bare_and_wrapped(wrapper: dict[str, Any] | None) -> None:
    data = encode_queue(TASKS, wrapper)
    assert decode_queue(data) == QueueFile(tasks=TASKS, wrapper=wrapper)
    loaded = json.loads(data)
    entries = loaded if wrapper is None else loaded["tasks"]
    assert entries[0] == {
        "id": "prd-001",
        "title": "User can reset password via email link",
        "description": "The link expires after one hour.",
        "status": "pending",
        "priority": "high",
        "source": "prd",
        "project": "Invoicely",
        "acceptance_criteria": ["Expired links show an error", "Links work once"],
    }
    assert entries[2]["completedAt"] == "2026-03-01T12:31:00.000Z"


def test_current_task_round_trip() -> None:
    assert encode_current_task(None) == b"{}\n"
    assert decode_current_task(b"{}") is None
    assert decode_current_task(encode_current_task(TASKS[1])) == TASKS[1]


def test_files_round_trip_through_the_readers_and_writers(paths: LokiPaths) -> None:
    assert read_orchestrator(paths.orchestrator) is None  # absent is not an error
    assert read_autonomy_state(paths.autonomy_state) is None
    assert read_current_task(paths.current_task) is None
    write_orchestrator(paths.orchestrator, ORCHESTRATOR)
    write_autonomy_state(paths.autonomy_state, AUTONOMY)
    write_queue(paths.in_progress, TASKS[1:2])
    write_current_task(paths.current_task, TASKS[1])
    assert read_orchestrator(paths.orchestrator) == ORCHESTRATOR
    assert read_autonomy_state(paths.autonomy_state) == AUTONOMY
    assert read_queue(paths.in_progress) == QueueFile(tasks=TASKS[1:2])
    assert read_current_task(paths.current_task) == TASKS[1]
    for folder in (paths.state_dir, paths.queue_dir, paths.root):
        assert not [n for n in files_in(folder) if n.endswith(".lokid-tmp")]


def test_prd_tasks_become_reference_queue_entries() -> None:
    task = PrdTask(
        id="prd-001",
        title="Login",
        description="Email and password",
        priority=0,
        acceptance=("Wrong password is rejected",),
        section="Features",
        line=9,
    )
    entry = queue_task_from_prd(task, project="Invoicely")
    assert json.loads(encode_queue([entry]))[0] == {
        "id": "prd-001",
        "title": "Login",
        "description": "Email and password",
        "status": "pending",
        "priority": "high",  # critical is written high: the reference knows high/medium/low
        "source": "prd",
        "project": "Invoicely",
        "acceptance_criteria": ["Wrong password is rejected"],
    }


# -- atomic writes -------------------------------------------------------------------


def test_atomic_write_leaves_no_temp_file_and_mode_0644(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    atomic_write_bytes(target, b"one\n")
    atomic_write_bytes(target, b"two\n")
    assert target.read_bytes() == b"two\n"
    assert files_in(tmp_path) == ["state.json"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (OSError(28, "No space left on device"), LokiDirWriteError),
        (KeyboardInterrupt(), KeyboardInterrupt),
    ],
)
def test_a_crash_between_write_and_replace_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: BaseException, expected: type
) -> None:
    target = tmp_path / "orchestrator.json"
    write_orchestrator(target, ORCHESTRATOR)
    before = target.read_bytes()
    seen: list[bytes] = []

    def crash(src: str, dst: str) -> None:
        seen.append(Path(src).read_bytes())  # the complete new content was on disk
        raise failure

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(expected) as info:
        write_orchestrator(target, OrchestratorState(current_phase="COMPLETED"))
    assert seen == [encode_orchestrator(OrchestratorState(current_phase="COMPLETED"))]
    assert target.read_bytes() == before
    assert read_orchestrator(target) == ORCHESTRATOR
    assert files_in(tmp_path) == ["orchestrator.json"]
    if isinstance(info.value, LokiDirWriteError):
        assert info.value.path == target
        assert "No space left on device" in info.value.message


def test_a_failed_fsync_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "pending.json"
    target.write_bytes(b"[]\n")

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(LokiDirWriteError, match="Input/output error"):
        atomic_write_bytes(target, b'[{"id": "a"}]\n')
    assert target.read_bytes() == b"[]\n"
    assert files_in(tmp_path) == ["pending.json"]


def test_replace_if_unchanged_refuses_after_a_concurrent_append(paths: LokiPaths) -> None:
    paths.pending.write_text('[{"id": "a", "title": "A"}]')
    result, stamp = ingest_pending_file(paths.pending, set())
    assert [t.id for t in result.tasks] == ["a"]
    # The agent appends between our read and our write (same inode, new size).
    paths.pending.write_text('[{"id": "a", "title": "A"}, {"id": "b", "title": "B"}]')
    assert not replace_if_unchanged(paths.pending, encode_queue([]), stamp)
    assert "b" in paths.pending.read_text()
    result, stamp = ingest_pending_file(paths.pending, {"a"})
    assert [t.id for t in result.tasks] == ["b"]
    assert replace_if_unchanged(paths.pending, encode_queue([]), stamp)
    assert paths.pending.read_bytes() == b"[]\n"
    # Absent file: stamp None; replaced only while it is still absent.
    paths.pending.unlink()
    assert ingest_pending_file(paths.pending, set()) == (
        lokidir.IngestResult(tasks=(), warnings=(), deferred=0),
        None,
    )
    assert replace_if_unchanged(paths.pending, b"[]\n", None)
    assert not replace_if_unchanged(paths.pending, b"[]\n", None)


# -- malformed files -----------------------------------------------------------------

Reader = Callable[[Path], object]
READERS: dict[str, Reader] = {
    "orchestrator": read_orchestrator,
    "autonomy": read_autonomy_state,
    "queue": read_queue,
    "current-task": read_current_task,
}

MALFORMED_FOR_ALL: list[tuple[str, bytes, str]] = [
    ("bad json", b'{"currentPhase": ', "is not valid JSON: Expecting value at line 1 column 18"),
    ("empty", b"", "is empty"),
    ("whitespace", b" \n ", "is empty"),
    ("binary", b'{"a":\x00}', "is binary: NUL byte at offset 5"),
    ("not utf-8", b'{"status": "caf\xe9"}', "is not UTF-8: invalid byte 0xe9 at offset 15"),
    ("nan", b'{"status": NaN}', "is not usable JSON: NaN is not JSON"),
    ("control", b'{"a": "\x01"}', "is not valid JSON: Invalid control character at line 1"),
    ("deep", b"[" * 100_000 + b"]" * 100_000, "is not usable JSON: nested more than 100 levels"),
    # parses, but would fail wherever it is encoded again (a RecursionError near the limit)
    ("deep 990", b'{"a":' * 990 + b"1" + b"}" * 990, "nested more than 100 levels deep"),
    ("huge int", b'{"pid": ' + b"9" * 5000 + b"}", "usable JSON: an integer has more than 4300"),
    ("scalar", b"42", "got a number"),
]


@pytest.mark.parametrize("reader_name", sorted(READERS))
@pytest.mark.parametrize(("label", "data", "reason"), MALFORMED_FOR_ALL, ids=lambda v: str(v)[:12])
def test_malformed_file_raises_only_the_precise_error(
    tmp_path: Path, reader_name: str, label: str, data: bytes, reason: str
) -> None:
    target = tmp_path / "file.json"
    target.write_bytes(data)
    with pytest.raises(LokiDirFormatError) as info:
        READERS[reader_name](target)
    assert reason in info.value.reason, (label, info.value.reason)
    assert info.value.path == target
    assert info.value.message == f"{target}: {info.value.reason}"


@pytest.mark.parametrize(
    ("reader_name", "value", "reason"),
    [
        ("orchestrator", [], "expected the orchestrator state (a JSON object), got an array"),
        ("orchestrator", {"version": "1"}, "currentPhase: missing"),
        ("orchestrator", {"currentPhase": 3}, "currentPhase: expected a string, got a number"),
        (
            "orchestrator",
            {"currentPhase": "X", "metrics": {"retries": "2"}},
            "metrics.retries: expected an integer, got a string",
        ),
        ("orchestrator", {"currentPhase": "X", "startedAt": "yesterday"}, "not an ISO-8601"),
        ("orchestrator", {"currentPhase": "X", "agents": []}, "agents: expected an object"),
        ("autonomy", {"status": "running", "pid": True}, "pid: expected an integer, got a boolean"),
        ("autonomy", {"iterationCount": 1}, "status: missing"),
        ("autonomy", {"status": "running", "baseWait": "60"}, "baseWait: expected a number"),
        ("queue", {"items": []}, 'an object with a "tasks" array; no "tasks" key'),
        ("queue", "tasks", "got a string"),
        ("current-task", [], "expected the current task (a JSON object), got an array"),
        ("current-task", {"title": "no id"}, "id: missing or empty"),
    ],
)
def test_wrong_shapes_are_named(tmp_path: Path, reader_name: str, value: Any, reason: str) -> None:
    target = tmp_path / "file.json"
    target.write_text(json.dumps(value))
    with pytest.raises(LokiDirFormatError) as info:
        READERS[reader_name](target)
    assert reason in info.value.reason


@pytest.mark.parametrize("reader_name", sorted(READERS))
def test_files_that_are_not_files(tmp_path: Path, reader_name: str) -> None:
    read = READERS[reader_name]
    folder = tmp_path / "folder.json"
    folder.mkdir()
    with pytest.raises(LokiDirFormatError, match="is a folder"):
        read(folder)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(LokiDirFormatError, match="not a regular file"):
        read(fifo)  # and does not block waiting for a writer
    (tmp_path / "plain").write_text("x")
    with pytest.raises(LokiDirFormatError, match="a parent of it is not a folder"):
        read(tmp_path / "plain" / "child.json")
    big = tmp_path / "big.json"
    big.write_bytes(b"[" + b" " * MAX_LOKI_FILE_BYTES + b"]")
    with pytest.raises(LokiDirFormatError, match=f"the limit is {MAX_LOKI_FILE_BYTES} bytes"):
        read(big)
    assert read(tmp_path / "absent.json") is None


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulated: the tests may run as root, who can open a mode-000 file.
    target = tmp_path / "orchestrator.json"
    write_orchestrator(target, ORCHESTRATOR)
    real_open, real_read = os.open, os.read

    def denied(path: Any, flags: int, *args: Any) -> int:
        if Path(path) == target:
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(LokiDirFormatError, match="cannot open: Permission denied"):
        read_orchestrator(target)
    monkeypatch.setattr(os, "open", real_open)

    def failing(fd: int, size: int) -> bytes:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "read", failing)
    with pytest.raises(LokiDirFormatError, match="cannot read: Input/output error"):
        read_orchestrator(target)
    monkeypatch.setattr(os, "read", real_read)
    assert read_orchestrator(target) == ORCHESTRATOR


def test_pure_decoders_bound_their_input_too() -> None:
    too_big = b"[" + b" " * MAX_LOKI_FILE_BYTES + b"]"
    for decode in (decode_queue, decode_orchestrator, decode_autonomy_state):
        with pytest.raises(LokiDirFormatError) as info:
            decode(too_big)
        assert info.value.reason == f"is {len(too_big)} bytes; the limit is 5242880 bytes"
        assert info.value.path is None and info.value.message.startswith("<data>: ")


def test_a_lone_surrogate_escape_in_a_loki_file_is_read_as_u_fffd() -> None:
    """JSON allows "\\ud800"; SQLite, events and answers cannot carry what it decodes
    to (a crashed actor, a 500), so `.loki` files are read with U+FFFD in its place.
    A proper pair ("\\ud83d\\ude00") is one character and is kept."""
    data = b'[{"id": "a\\ud800", "title": "x\\udcff \\ud83d\\ude00", "description": "ok"}]'
    (task,) = decode_queue(data).tasks
    assert (task.id, task.title, task.description) == ("a\ufffd", "x\ufffd \U0001f600", "ok")
    clean = b'[{"id": "b", "title": "\\ud83d\\ude00"}]'
    assert decode_queue(clean).tasks[0].title == "\U0001f600"


def test_queue_entries_are_read_leniently() -> None:
    data = json.dumps(
        [
            {"id": "good", "title": "Good"},
            "a string",
            {"title": "no id"},
            {"id": "bad-title", "title": ["x"]},
            {"id": "bad-time", "createdAt": "tuesday"},
            {"id": "bad-priority", "priority": {"level": 1}},
            {"id": "also-good", "priority": 3, "acceptance_criteria": ["a"]},
        ]
    ).encode()
    queue = decode_queue(data)
    assert [t.id for t in queue.tasks] == ["good", "also-good"]
    assert queue.warnings == (
        "entry 1: expected an object, got a string; entry skipped",
        "entry 2: id: missing or empty; entry skipped",
        "entry 3: title: expected a string, got an array; entry skipped",
        "entry 4: createdAt: not an ISO-8601 timestamp: 'tuesday'; entry skipped",
        "entry 5: priority: expected a string or an integer, got an object; entry skipped",
    )


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_KEYS = ["id", "title", "status", "priority", "currentPhase", "metrics", "startedAt", "tasks"]
_DECODERS: list[Callable[[bytes], object]] = [
    decode_orchestrator,
    decode_autonomy_state,
    decode_queue,
    decode_current_task,
    lambda data: ingest_pending(data, set()),
]


@settings(max_examples=150, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=64),
        _JSON.map(lambda v: json.dumps(v).encode()),
        st.dictionaries(st.sampled_from(_KEYS), _JSON, max_size=5).map(
            lambda v: json.dumps(v).encode()
        ),
        st.lists(st.dictionaries(st.sampled_from(_KEYS), _JSON, max_size=4), max_size=3).map(
            lambda v: json.dumps(v).encode()
        ),
    )
)
def test_decoders_raise_nothing_but_the_format_error(data: bytes) -> None:
    for decode in _DECODERS:
        with contextlib.suppress(LokiDirFormatError):
            decode(data)


# -- tasks appended by an agent --------------------------------------------------------


def pending(*entries: Any, wrapped: bool = False) -> bytes:
    return json.dumps({"tasks": list(entries)} if wrapped else list(entries)).encode()


def test_ingest_takes_new_valid_tasks_and_skips_known_ones() -> None:
    data = pending(
        {"id": "prd-001", "title": "Ours", "status": "pending", "priority": "high"},
        {
            "id": "agent-fix-1",
            "title": "Fix the flaky login test",
            "description": "It fails one run in ten.",
            "priority": "low",
            "acceptance_criteria": ["Passes 100 runs in a row"],
        },
        {"id": "todo-2", "title": "Add a README", "priority": 0},
    )
    result = ingest_pending(data, {"prd-001"})
    assert result.tasks == (
        AgentTask(
            id="agent-fix-1",
            title="Fix the flaky login test",
            description="It fails one run in ten.",
            priority=3,
            acceptance=("Passes 100 runs in a row",),
        ),
        AgentTask(id="todo-2", title="Add a README", description="", priority=0, acceptance=()),
    )
    assert result.warnings == ()
    assert result.deferred == 0
    # The same file after lokid learned them: nothing new.
    assert ingest_pending(data, {"prd-001", "agent-fix-1", "todo-2"}).tasks == ()


def test_ingest_rejects_bad_entries_with_warnings() -> None:
    data = pending(
        "just a string",
        {"id": 17, "title": "numeric id"},
        {"id": "has space", "title": "bad id"},
        {"id": "x" * 65, "title": "long id"},
        {"id": "dup", "title": "First"},
        {"id": "dup", "title": "Second"},
        {"id": "done", "title": "Already done", "status": "completed"},
        {"id": "untitled", "title": "   "},
        {"id": "notitle"},
        {"id": "ok", "title": "Fine", "description": 5, "priority": "someday"},
        wrapped=True,
    )
    result = ingest_pending(data, set())
    assert [t.id for t in result.tasks] == ["dup", "ok"]
    assert result.tasks[1].priority == 2  # medium when unreadable
    assert result.warnings == (
        "entry 0: expected an object, got a string; rejected",
        "entry 1: id 17 is not 1-64 characters of A-Z a-z 0-9 . _ : -; rejected",
        'entry 2: id "has space" is not 1-64 characters of A-Z a-z 0-9 . _ : -; rejected',
        f'entry 3: id "{"x" * 65}" is not 1-64 characters of A-Z a-z 0-9 . _ : -; rejected',
        "entry 5 (dup): duplicate id in this file; rejected",
        'entry 6 (done): status "completed" is not "pending"; rejected',
        "entry 7 (untitled): no title; rejected",
        "entry 8 (notitle): no title; rejected",
        "entry 9 (ok): description is a number; ignored",
        'entry 9 (ok): priority "someday" not understood; medium used',
    )


def test_ingest_bounds_titles_criteria_and_the_number_of_new_tasks() -> None:
    long_title = "Refactor " + "the billing module " * 20
    criteria = [f"criterion {i}" for i in range(25)]
    entries = [{"id": "big", "title": long_title, "acceptance_criteria": criteria}]
    entries += [{"id": f"t-{i}", "title": f"Task {i}"} for i in range(60)]
    result = ingest_pending(pending(*entries), set(), max_new=50)
    assert len(result.tasks) == 50
    assert result.tasks[-1].id == "t-48"
    assert result.deferred == 11
    big = result.tasks[0]
    assert len(big.title) <= 200 and big.title.endswith("…")
    assert long_title.startswith(big.title[:-1])
    assert len(big.acceptance) == 20
    assert result.warnings == (
        "entry 0 (big): title cut to 200 characters",
        "entry 0 (big): only the first 20 criteria kept",
        "11 more new task(s) left for the next read (at most 50 per read)",
    )
    # The next read, knowing the first 50, takes the rest.
    later = ingest_pending(pending(*entries), {t.id for t in result.tasks})
    assert [t.id for t in later.tasks] == [f"t-{i}" for i in range(49, 60)]


def test_ingest_gives_entries_without_id_a_stable_content_id() -> None:
    first = ingest_pending(pending({"title": "Write docs", "priority": "medium"}), set())
    reordered = ingest_pending(b'[{"priority": "medium", "title": "Write docs"}]', set())
    [task] = first.tasks
    assert task.id.startswith("agent-") and len(task.id) == len("agent-") + 12
    assert reordered.tasks == first.tasks
    assert (
        ingest_pending(pending({"title": "Write docs", "priority": "medium"}), {task.id}).tasks
        == ()
    )
    twice = ingest_pending(pending({"title": "Same"}, {"title": "Same"}), set())
    assert len(twice.tasks) == 1
    assert twice.warnings[0].endswith("duplicate id in this file; rejected")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"[{", "is not valid JSON"),
        (b'{"tasks": 3}', "tasks is a number"),
        (b"\xff\xfe", "is not UTF-8"),
    ],
)
def test_ingest_of_a_file_that_is_not_a_queue(tmp_path: Path, data: bytes, reason: str) -> None:
    with pytest.raises(LokiDirFormatError, match=reason):
        ingest_pending(data, set())
    target = tmp_path / "pending.json"
    target.write_bytes(data)
    with pytest.raises(LokiDirFormatError) as info:
        ingest_pending_file(target, set())
    assert info.value.path == target


# -- control files ---------------------------------------------------------------------


def test_read_controls(paths: LokiPaths) -> None:
    assert read_controls(paths) == lokidir.ControlFiles(False, False, False, False)
    create_control(paths.pause)
    paths.human_input.write_text("hi")
    paths.task_completion_claimed.write_text("{}")
    os.symlink(paths.root / "nowhere", paths.stop)  # a dangling link still counts
    assert read_controls(paths) == lokidir.ControlFiles(True, True, True, True)


def test_human_input_is_claimed_by_rename_then_read(paths: LokiPaths) -> None:
    assert consume_human_input(paths, input_id="input-A") is None
    paths.human_input.write_text("\n  Please use PostgreSQL, not SQLite.\n\n")
    taken = consume_human_input(paths, input_id="input-A", now=T0)
    claim = paths.logs_dir / "human-input-20260301T123045.123Z.input-A.claimed"
    assert taken == lokidir.HumanInput(
        text="Please use PostgreSQL, not SQLite.", processed_path=claim, input_id="input-A"
    )
    assert not paths.human_input.exists()
    assert claim.read_text() == "\n  Please use PostgreSQL, not SQLite.\n\n"
    assert consume_human_input(paths, input_id="input-B", now=T0) is None  # not twice
    # Stored: the claim becomes the record; a second one within the same millisecond
    # gets its own record.
    record = lokidir.settle_human_input(paths, taken)
    assert record == paths.logs_dir / "human-input-20260301T123045.123Z.md"
    assert files_in(paths.logs_dir) == [record.name]
    paths.human_input.write_text("And add tests.")
    again = consume_human_input(paths, input_id="input-B", now=T0)
    assert again is not None
    assert lokidir.settle_human_input(paths, again).name == "human-input-20260301T123045.123Z-2.md"


def test_claims_left_in_logs_are_found_oldest_first(paths: LokiPaths) -> None:
    """A claim not settled (a crash before its input was stored) is offered again under
    its own id; records, rejects and other files in logs/ are not."""
    assert lokidir.pending_human_inputs(paths) == ([], [])
    later = T0 + dt.timedelta(seconds=1)
    for when, input_id, text in ((later, "input-2", "Second."), (T0, "input-1", "First.")):
        paths.human_input.write_text(text)
        assert consume_human_input(paths, input_id=input_id, now=when) is not None
    (paths.logs_dir / "human-input-20260101T000000.000Z.md").write_text("delivered long ago")
    (paths.logs_dir / "human-input-20260301T123047.000Z.input-3.claimed").write_bytes(b"\xff")
    (paths.logs_dir / "human-input-20260301T123048.000Z.input-4.claimed").write_text("  \n")
    notes, problems = lokidir.pending_human_inputs(paths)
    assert [(n.input_id, n.text) for n in notes] == [("input-1", "First."), ("input-2", "Second.")]
    (problem,) = problems
    assert "is not UTF-8" in problem.reason and "REJECTED" in problem.reason
    assert "human-input-20260301T123048.000Z.md" in files_in(paths.logs_dir)  # blank: a record
    for note in notes:
        lokidir.settle_human_input(paths, note)
    assert lokidir.pending_human_inputs(paths) == ([], [])


def test_blank_human_input_is_consumed_and_ignored(paths: LokiPaths) -> None:
    paths.human_input.write_text(" \n\t")
    assert consume_human_input(paths, input_id="input-A", now=T0) is None
    assert not paths.human_input.exists()
    assert files_in(paths.logs_dir) == ["human-input-20260301T123045.123Z.md"]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"x" * (MAX_HUMAN_INPUT_BYTES + 1), f"the limit is {MAX_HUMAN_INPUT_BYTES} bytes"),
        (b"hello\x00world", "is binary"),
        (b"caf\xe9", "is not UTF-8"),
    ],
)
def test_bad_human_input_is_moved_aside_and_reported(
    paths: LokiPaths, content: bytes, reason: str
) -> None:
    paths.human_input.write_bytes(content)
    with pytest.raises(LokiDirFormatError, match=reason) as info:
        consume_human_input(paths, input_id="input-A", now=T0)
    rejected = paths.logs_dir / "human-input-REJECTED-20260301T123045.123Z.md"
    assert str(rejected) in info.value.reason
    assert rejected.read_bytes() == content
    assert not paths.human_input.exists()
    assert files_in(paths.logs_dir) == [rejected.name]
    assert consume_human_input(paths, input_id="input-B", now=T0) is None  # not offered again


def test_a_symlinked_human_input_is_never_read(paths: LokiPaths, tmp_path: Path) -> None:
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    os.symlink(secret, paths.human_input)
    with pytest.raises(LokiDirFormatError, match="is a symbolic link; it is not read"):
        consume_human_input(paths, input_id="input-A", now=T0)
    rejected = paths.logs_dir / "human-input-REJECTED-20260301T123045.123Z.md"
    assert rejected.is_symlink()  # the link itself was moved; its target untouched
    assert secret.read_text() == "PRIVATE KEY"
    assert not os.path.lexists(paths.human_input)


def test_completion_requested_touch_and_statement(paths: LokiPaths) -> None:
    assert consume_completion_request(paths) is None
    paths.completion_requested.touch()
    assert consume_completion_request(paths) == lokidir.CompletionRequest(
        sources=("COMPLETION_REQUESTED",)
    )
    assert not paths.completion_requested.exists()
    paths.completion_requested.write_text("All PRD tasks are done; tests pass.\n")
    request = consume_completion_request(paths)
    assert request is not None and request.statement == "All PRD tasks are done; tests pass."


def test_task_completion_claim_json(paths: LokiPaths) -> None:
    claim = {
        "type": "task_completion_claim",
        "statement": "Done",
        "evidence": "pytest: 120 passed",
        "confidence": "high",
        "timestamp": "2026-03-01T12:00:00Z",
    }
    paths.task_completion_claimed.write_text(json.dumps(claim))
    paths.completion_requested.touch()
    assert consume_completion_request(paths) == lokidir.CompletionRequest(
        sources=("COMPLETION_REQUESTED", "TASK_COMPLETION_CLAIMED"),
        statement="Done",
        evidence="pytest: 120 passed",
        confidence="high",
    )
    assert files_in(paths.signals_dir) == []


def test_unreadable_completion_claim_still_requests_completion(paths: LokiPaths) -> None:
    paths.task_completion_claimed.write_bytes(b'{"statement": ')
    request = consume_completion_request(paths)
    assert request is not None
    assert request.sources == ("TASK_COMPLETION_CLAIMED",)
    assert request.statement is None
    assert request.warnings == (
        "TASK_COMPLETION_CLAIMED: is not valid JSON: Expecting value at line 1 column 15",
    )
    assert not paths.task_completion_claimed.exists()


def test_clear_stale_controls_keeps_human_input(paths: LokiPaths) -> None:
    for path in (paths.pause, paths.stop, paths.completion_requested, paths.human_input):
        create_control(path, b"x")
    assert clear_stale_controls(paths) == ("PAUSE", "STOP", "signals/COMPLETION_REQUESTED")
    assert files_in(paths.root) == ["HUMAN_INPUT.md", "logs", "queue", "signals", "state"]
    assert clear_stale_controls(paths) == ()


# -- vocabularies ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "reason", "expected"),
    [
        ("starting", None, "running"),
        ("running", None, "running"),
        ("paused", None, "paused"),
        ("stopping", None, "running"),
        ("stopped", None, "stopped"),
        ("interrupted", None, "interrupted"),
        ("completed", None, "completion_promise_fulfilled"),
        ("failed", "maxIterations", "max_iterations_reached"),
        ("failed", "maxDurationSeconds", "max_duration_reached"),
        ("failed", "budgetUsd", "budget_exceeded"),
        ("failed", "maxConsecutiveFailures", "max_retries_exceeded"),
        ("failed", "verify", "failed"),
        ("failed", None, "failed"),
    ],
)
def test_autonomy_status(status: str, reason: str | None, expected: str) -> None:
    assert autonomy_status(status, reason) == expected


def test_priority_words_and_phases() -> None:
    assert [queue_priority(p) for p in (0, 1, 2, 3)] == ["high", "high", "medium", "low"]
    assert [priority_from_queue(v) for v in ("Critical", "high", "P2", "low", 1, 7, True)] == [
        0,
        1,
        2,
        3,
        1,
        None,
        None,
    ]
    assert [orchestrator_phase(p) for p in ("bootstrap", "development", "qa")] == [
        "BOOTSTRAP",
        "DEVELOPMENT",
        "QA",
    ]
    with pytest.raises(ValueError, match="unknown queue"):
        LokiPaths.for_project("/p").queue("done")


def test_a_mirror_write_skips_the_fsyncs_but_stays_atomic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    target = tmp_path / "state.json"
    atomic_write_bytes(target, b"durable\n")
    assert len(synced) == 2  # the file, then the folder
    synced.clear()
    atomic_write_bytes(target, b"mirror\n", durable=False)
    assert synced == []
    assert target.read_bytes() == b"mirror\n"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temp file left
