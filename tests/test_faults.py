"""Fault injection (issue 8, item 3): floods of agent output, a full disk, a read-only data dir.

What each fault does to the daemon, and which test (here or elsewhere) covers
it, is in docs/faults.md. The agent faults that other files already cover
(hang, ignore SIGTERM and fork a grandchild, malformed output, no result,
rate limits, timeouts) are not repeated here.

End-to-end tests (`e2e`) run `loki serve` as a subprocess. The disk faults
need root: a tmpfs of a few MiB (`mount -t tmpfs -o size=8m`) is a disk that
fills up; an ext4 image on a loop device mounted `errors=remount-ro`, with
an error injected through `/sys/fs/ext4/<dev>/trigger_fs_error`, is a data
dir the kernel makes read-only under a running daemon (a plain
`mount -o remount,ro` is refused while the daemon holds its files open for
writing). Each is skipped with a message where it cannot be set up. Every
mount, loop device, daemon and agent is removed in a `finally`.

The floods stream `FLOOD_BYTES` (200 MiB; 1 GiB with `LOKI_FAULTS_FULL=1`).
Tests marked `xfail` document daemon bugs outside the files this work could
change (docs/faults.md, "Known problems"); they are strict where the outcome
is deterministic, so a fix makes them fail until the marker is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import trio

from lokid.actors.store import StoreActor, StoreUnavailable
from lokid.agent_host import MAX_LINE_BYTES, AgentSpec, LocalAgentHost, OutputLine, Stream

from . import fake_agent
from .daemon_proc import DaemonProcess, group_members, wait_until
from .test_store import db_path, file_size_limit, insert, items_store, names, running

MIB = 1024 * 1024
FULL = os.environ.get("LOKI_FAULTS_FULL", "") == "1"
FLOOD_BYTES = 1024 * MIB if FULL else 200 * MIB
FLOOD_LINE = 64 * 1024  # bytes per line of the long-line flood
RSS_GROWTH_BOUND = 128 * MIB  # the daemon's VmRSS may grow this much over its idle value
HEALTH_BOUND = 1.0  # seconds: the slowest /health answer allowed while an agent floods
TMPFS_SIZE = "8m"
WAIT = 30.0  # the bound of every wait on the daemon
FLOOD_WAIT = 240.0 if FULL else 60.0

e2e = pytest.mark.e2e


# -- helpers ---------------------------------------------------------------------------


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def unmount(target: pathlib.Path) -> None:
    if run("umount", str(target)).returncode != 0:
        run("umount", "-l", str(target))  # still busy: detach it anyway


@contextlib.contextmanager
def tmpfs(target: pathlib.Path, size: str = TMPFS_SIZE) -> Iterator[pathlib.Path]:
    """A tmpfs of `size` at `target` (skip if it cannot be mounted); unmounted at the end."""
    need_root()
    target.mkdir(parents=True, exist_ok=True)
    mounted = run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(target))
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield target
    finally:
        unmount(target)


@contextlib.contextmanager
def ext4_loop(root: pathlib.Path) -> Iterator[tuple[pathlib.Path, pathlib.Path, str]]:
    """A 64 MiB ext4 image on a loop device, mounted `errors=remount-ro` at root/"disk".

    Yields (mount point, image, device name). Skips where there is no loop
    device, no mkfs.ext4 or no ext4 error injection.
    """
    need_root()
    for tool in ("losetup", "mkfs.ext4", "e2fsck"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    image = root / "ext4.img"
    mnt = root / "disk"
    mnt.mkdir(parents=True, exist_ok=True)
    with image.open("wb") as handle:
        handle.truncate(64 * MIB)
    made = run("mkfs.ext4", "-q", "-F", str(image))
    if made.returncode != 0:
        pytest.skip(f"mkfs.ext4 failed: {made.stderr.strip()}")
    attached = run("losetup", "--find", "--show", str(image))
    if attached.returncode != 0:
        pytest.skip(f"no loop device: {attached.stderr.strip()}")
    device = attached.stdout.strip()
    try:
        mounted = run("mount", "-t", "ext4", "-o", "errors=remount-ro", device, str(mnt))
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount an ext4 loop device: {mounted.stderr.strip()}")
        name = pathlib.Path(device).name
        if not pathlib.Path(f"/sys/fs/ext4/{name}/trigger_fs_error").exists():
            unmount(mnt)
            pytest.skip("this kernel has no ext4 error injection (trigger_fs_error)")
        try:
            yield mnt, image, device
        finally:
            unmount(mnt)
    finally:
        run("losetup", "-d", device)


def make_read_only(device: str) -> None:
    """What the kernel does on an ext4 error with errors=remount-ro, to a running daemon."""
    name = pathlib.Path(device).name
    pathlib.Path(f"/sys/fs/ext4/{name}/trigger_fs_error").write_text("lokid fault test\n")


def fill(path: pathlib.Path) -> None:
    """Write `path` until the file system is full (to the last byte)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (MIB, 64 * 1024, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\xff" * size)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def rss(pid: int) -> int:
    """VmRSS of `pid` in bytes."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def kill_group_of(pid_file: pathlib.Path, marker: str) -> None:
    """SIGKILL the process group of the agent that wrote `pid_file`, if it is still ours."""
    with contextlib.suppress(OSError, ValueError):
        pid = int(pid_file.read_text().split()[0])
        cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
        if marker.encode() in cmdline:
            os.killpg(pid, signal.SIGKILL)


def error_of(answer: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = answer.json()["error"]
    return error


def assert_unavailable(answer: httpx.Response, cause: str) -> None:
    """503, code UNAVAILABLE, and the cause named in the error body."""
    assert answer.status_code == 503, (answer.status_code, answer.text)
    error = error_of(answer)
    assert error["code"] == "UNAVAILABLE", answer.text
    assert cause in json.dumps(error), answer.text


class Watch:
    """In a thread: the daemon's peak VmRSS and the slowest `/health` answer, every 50 ms."""

    def __init__(self, daemon: DaemonProcess) -> None:
        assert daemon.process is not None
        self.pid = daemon.process.pid
        self.url = daemon.api_url
        self.baseline = rss(self.pid)
        self.peak = self.baseline
        self.slowest = 0.0
        self.statuses: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self._stop.is_set():
                with contextlib.suppress(OSError, AssertionError):
                    self.peak = max(self.peak, rss(self.pid))
                started = time.monotonic()
                try:
                    status = client.get("/health").status_code
                except httpx.HTTPError:
                    status = 0
                self.slowest = max(self.slowest, time.monotonic() - started)
                self.statuses.add(status)
                self._stop.wait(0.05)

    @property
    def growth(self) -> int:
        return self.peak - self.baseline

    def check(self) -> None:
        assert self.statuses == {200}, f"/health answered {self.statuses} during the flood"
        assert self.slowest < HEALTH_BOUND, f"/health took {self.slowest:.2f} s during the flood"
        assert self.growth < RSS_GROWTH_BOUND, (
            f"the daemon's RSS grew {self.growth / MIB:.0f} MiB "
            f"(bound {RSS_GROWTH_BOUND / MIB:.0f} MiB) during the flood"
        )


# An agent for provider `command`: floods stdout as told by its arguments, then exits 0.
FLOOD_AGENT = textwrap.dedent(
    """
    import os, sys
    kind, total, pid_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    with open(pid_file, "w") as handle:
        handle.write(str(os.getpid()))
    sys.stdin.buffer.read()
    out = sys.stdout.buffer
    if kind == "endless":  # one line without a newline, then a short one
        block = b"z" * (1 << 20)
    else:  # lines of `kind` bytes (the newline included)
        line = b"y" * (int(kind) - 1) + b"\\n"
        block = line * max(1, (1 << 20) // len(line))
    sent = 0
    while total < 0 or sent < total:
        out.write(block)
        sent += len(block)
    if kind == "endless":
        out.write(b"\\nafter the endless line\\n")
    out.flush()
    """
)


class FloodLab:
    """A daemon on free ports, a project, and the flood agent as a `command` provider."""

    def __init__(self, root: pathlib.Path) -> None:
        self.root = root
        self.script = root / "flood_agent.py"
        self.script.write_text(FLOOD_AGENT)
        self.pid_file = root / "agent.pid"
        self.project = root / "project"
        self.project.mkdir()
        self.daemon = DaemonProcess(
            root / "home",
            extra_env={"LOKI_AGENT_GRACE": "1", "LOKI_LOG_LEVEL": "warning"},
        )

    def __enter__(self) -> FloodLab:
        self.daemon.start()
        self.api = httpx.Client(base_url=self.daemon.api_url, timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.api.close()
        self.daemon.kill()
        kill_group_of(self.pid_file, str(self.script))

    def start(self, kind: str, total: int) -> str:
        body = command_session(
            "# Flood\n\n## Features\n- Print a lot\n",
            self.project,
            [sys.executable, str(self.script), kind, str(total), str(self.pid_file)],
        )
        answer = self.api.post("/api/sessions", json=body)
        assert answer.status_code == 201, answer.text
        session_id: str = answer.json()["id"]
        return session_id

    def session(self, session_id: str) -> dict[str, Any]:
        answer = self.api.get(f"/api/sessions/{session_id}")
        assert answer.status_code == 200, answer.text
        found: dict[str, Any] = answer.json()
        return found

    def wait_status(self, session_id: str, statuses: set[str], timeout: float) -> dict[str, Any]:
        found: dict[str, Any] = wait_until(
            lambda: (s := self.session(session_id))["status"] in statuses and s,
            f"session {session_id} is one of {sorted(statuses)}",
            timeout,
        )
        return found

    def events(self, session_id: str, types: str) -> list[dict[str, Any]]:
        answer = self.api.get(
            "/api/events/history", params={"sessionId": session_id, "types": types, "limit": 1000}
        )
        assert answer.status_code == 200, answer.text
        found: list[dict[str, Any]] = answer.json()["events"]
        return found

    def output_events(self) -> int:
        stats = self.api.get("/api/events/stats").json()
        return int(stats["byType"].get("agent.output", 0))

    def agent_pid(self) -> int:
        return int(wait_until(lambda: self.pid_file.exists() and self.pid_file.read_text(), "pid"))


# -- the store: recovery and classification (in process) ------------------------------


def writable(store: StoreActor) -> bool:
    """`store.writable`, read anew (a property mypy would otherwise narrow across awaits)."""
    return store.writable


async def test_store_probe_notices_that_writes_work_again(tmp_path: pathlib.Path) -> None:
    """No caller needs to write for `writable` (and /health) to recover once space returns."""
    path = db_path(tmp_path)
    store = items_store(tmp_path, probe_interval=0.05)
    async with running(store):
        await store.write(insert("before"))
        files = [path, path.with_name(path.name + "-wal")]
        limit = max(f.stat().st_size for f in files)  # no file may grow: the disk is full
        with file_size_limit(limit):
            with pytest.raises(StoreUnavailable):
                await store.write(insert("x" * (512 * 1024)))
            assert not writable(store)
            assert store.unwritable_reason is not None
            await trio.sleep(0.5)  # ten probes, all refused by the "disk"
            assert not writable(store)
            assert store.statistics().commit_failures == 1  # probes are not callers' failures
        with trio.fail_after(5):
            while not writable(store):  # noqa: ASYNC110 - no event for "the disk has room"
                await trio.sleep(0.02)
        assert store.statistics().writable
        assert await store.read(names) == ["before"]
        probe = await store.read(
            lambda db: db.execute("SELECT value FROM meta WHERE key = 'store_probe'").fetchone()
        )
        assert probe is not None


async def test_a_write_failing_for_the_disk_alone_clears_writable(tmp_path: pathlib.Path) -> None:
    """Disk full inside one write's statement: the others commit, but the store says so."""

    def full(db: Any) -> None:
        error = sqlite3.OperationalError("database or disk is full")
        error.sqlite_errorcode = 13
        error.sqlite_errorname = "SQLITE_FULL"
        raise error

    store = items_store(tmp_path, probe_interval=60.0)
    async with running(store):
        with pytest.raises(StoreUnavailable):
            await store.write(full)
        assert not writable(store)
        assert "disk is full" in (store.unwritable_reason or "")
        await store.write(insert("fine"))
        assert writable(store)
        assert await store.read(names) == ["fine"]


def test_store_probe_interval_default() -> None:
    assert StoreActor(pathlib.Path("/nonexistent/x.db")).probe_interval == 1.0


# -- agent output: bounds (in process) ------------------------------------------------


async def test_an_endless_line_is_one_truncated_line(tmp_path: pathlib.Path) -> None:
    """The rest of a cut line is read and dropped: no stream of 1 MiB fragments."""
    script = (
        "import sys; out = sys.stdout.buffer\n"
        "for _ in range(8): out.write(b'z' * (1 << 20))\n"
        "out.write(b'\\nshort\\n')\n"
    )
    lines: list[OutputLine] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            agent = await LocalAgentHost(nursery).start(
                AgentSpec((sys.executable, "-c", script), tmp_path)
            )
            async for line in agent.lines():
                lines.append(line)
            await agent.wait()
    stdout = [line for line in lines if line.stream is Stream.STDOUT]
    assert [(len(line.data), line.truncated) for line in stdout] == [
        (MAX_LINE_BYTES, True),
        (5, False),
    ]
    assert stdout[1].data == b"short"


# -- agent output: floods through a running daemon -------------------------------------


@e2e
@pytest.mark.parametrize("kind", ["long-lines", "endless-line"])
def test_an_output_flood_keeps_the_daemon_bounded(tmp_path: pathlib.Path, kind: str) -> None:
    """FLOOD_BYTES of output: bounded RSS, /health answers, the session completes."""
    with FloodLab(tmp_path) as lab:
        with Watch(lab.daemon) as watch:
            started = time.monotonic()
            sid = lab.start(str(FLOOD_LINE) if kind == "long-lines" else "endless", FLOOD_BYTES)
            session = lab.wait_status(sid, {"completed", "failed", "stopped"}, FLOOD_WAIT)
            elapsed = time.monotonic() - started
        watch.check()
        assert session["status"] == "completed", session
        assert session["tasks"]["completed"] == 1, session
        [done] = lab.events(sid, "agent.completed")
        assert (done["data"]["exitCode"], done["data"]["endReason"]) == (0, "exited")
        assert done["data"]["survivors"] == []
        outputs = lab.events(sid, "agent.output")
        assert all(len(e["data"]["text"]) <= 2000 for e in outputs)
        if kind == "long-lines":
            assert lab.output_events() == FLOOD_BYTES // FLOOD_LINE
        else:
            texts = [e["data"]["text"] for e in outputs]
            assert len(texts) == 2, f"{len(texts)} output events for one endless line"
            assert texts[0].startswith("zzz") and texts[1] == "after the endless line"
        print(
            f"{kind}: {FLOOD_BYTES / MIB:.0f} MiB in {elapsed:.1f} s, RSS +{watch.growth / MIB:.0f}"
            f" MiB, slowest /health {watch.slowest * 1000:.0f} ms"
        )


@e2e
def test_stop_during_an_endless_flood(tmp_path: pathlib.Path) -> None:
    """An agent that never stops printing is stopped on request; its group is gone."""
    with FloodLab(tmp_path) as lab:
        with Watch(lab.daemon) as watch:
            sid = lab.start(str(FLOOD_LINE), -1)
            pid = lab.agent_pid()
            wait_until(lambda: lab.output_events() > 1000, "the agent floods")
            answer = lab.api.post(f"/api/sessions/{sid}/stop")
            assert answer.status_code == 200, answer.text
            session = lab.wait_status(sid, {"stopped", "failed", "completed"}, 15)
        watch.check()
        assert session["status"] == "stopped", session
        assert group_members(pid) == []
        assert session["tasks"]["active"] == 0, session
        assert len(lab.events(sid, "session.stopped")) == 1


@e2e
@pytest.mark.skipif(not FULL, reason="takes ~30 s: runs with LOKI_FAULTS_FULL=1")
def test_a_flood_of_short_lines_keeps_the_daemon_bounded(tmp_path: pathlib.Path) -> None:
    """100-byte lines, endlessly: each is an event, far more than the store takes per second."""
    with FloodLab(tmp_path) as lab:
        with Watch(lab.daemon) as watch:
            sid = lab.start("100", -1)
            lab.agent_pid()
            time.sleep(30.0)
        watch.check()  # fails today (RSS and /health); the daemon and agent are killed on exit
        answer = lab.api.post(f"/api/sessions/{sid}/stop")
        assert answer.status_code == 200, answer.text
        session = lab.wait_status(sid, {"stopped", "failed", "completed"}, 10)
        assert session["status"] == "stopped"


# -- a full disk -----------------------------------------------------------------------


@e2e
def test_a_full_disk_is_503_loses_nothing_and_recovers(tmp_path: pathlib.Path) -> None:
    with tmpfs(tmp_path / "disk") as disk:
        project_dir = tmp_path / "project"
        project_dir.mkdir()
        daemon = DaemonProcess(disk / "home")
        try:
            daemon.start()
            with (
                httpx.Client(base_url=daemon.api_url, timeout=10) as api,
                httpx.Client(base_url=daemon.dashboard_url, timeout=10) as dash,
            ):
                check_full_disk(daemon, api, dash, disk, project_dir)
            code, err = daemon.terminate()
            assert code == 0, err
            assert "Traceback" not in err, err
        finally:
            daemon.kill()


def command_session(prd_text: str, project_dir: pathlib.Path, command: list[str]) -> dict[str, Any]:
    """A `POST /api/sessions` body: provider `command` running `command` in `project_dir`."""
    return {
        "prdText": prd_text,
        "projectDir": str(project_dir),
        "provider": "command",
        "options": {"command": command},
    }


def check_full_disk(
    daemon: DaemonProcess,
    api: httpx.Client,
    dash: httpx.Client,
    disk: pathlib.Path,
    project_dir: pathlib.Path,
) -> None:
    # Acknowledged before the disk fills: a finished session and a board.
    session = api.post(
        "/api/sessions",
        json=command_session(
            "# App\n\n## Features\n- One\n", project_dir, [sys.executable, "-c", "print('done')"]
        ),
    )
    assert session.status_code == 201, session.text
    sid = session.json()["id"]
    wait_until(lambda: api.get(f"/api/sessions/{sid}").json()["status"] == "completed", "done")
    project = dash.post("/api/projects", json={"name": "kept"}).json()
    acknowledged = []
    for i in range(20):
        task = {"project_id": project["id"], "title": f"before {i}", "description": "d" * 9000}
        answer = dash.post("/api/tasks", json=task)
        assert answer.status_code == 201, answer.text
        acknowledged.append(answer.json()["id"])

    filler = disk / "filler"
    fill(filler)
    # Writes: never a success that was not stored, never a 500; 503 UNAVAILABLE naming the disk.
    refused = 0
    for i in range(60):
        task = {"project_id": project["id"], "title": f"full {i}", "description": "e" * 9000}
        answer = dash.post("/api/tasks", json=task)
        if answer.status_code == 201:
            acknowledged.append(answer.json()["id"])  # it fit: it must survive too
            continue
        assert_unavailable(answer, "disk is full")
        refused += 1
        if refused >= 5:
            break
    assert refused >= 5, "the full disk never refused a write"
    assert_unavailable(dash.post("/api/projects", json={"name": "no room"}), "disk is full")
    refused_session = api.post(
        "/api/sessions",
        json=command_session(
            "# B\n\n## Features\n- Two\n", project_dir, [sys.executable, "-c", "print('never')"]
        ),
    )
    assert_unavailable(refused_session, "disk is full")

    # The daemon stays up and says why.
    assert daemon.process is not None and daemon.process.poll() is None
    health = api.get("/health")
    assert health.status_code == 503, health.text
    assert "disk is full" in health.json()["details"]["store"], health.text
    ready = api.get("/health/ready")
    assert ready.status_code == 503 and "store" in ready.json()["details"], ready.text
    assert api.get("/health/live").status_code == 200
    assert api.get("/api/status").status_code == 200

    # Nothing acknowledged is lost, and everything is still readable.
    def listed() -> set[str]:
        answer = dash.get("/api/tasks", params={"project_id": project["id"], "limit": 1000})
        assert answer.status_code == 200, answer.text
        return {t["id"] for t in answer.json()["tasks"]}

    assert set(acknowledged) <= listed()
    assert api.get(f"/api/sessions/{sid}").json()["status"] == "completed"
    verify = dash.get("/api/enterprise/audit/verify")
    assert verify.status_code == 200 and verify.json()["valid"], verify.text

    # Space returns: /health recovers by itself (no write needed), then writes work.
    filler.unlink()
    wait_until(lambda: api.get("/health").status_code == 200, "/health is healthy again", 10)
    assert api.get("/health/ready").status_code == 200
    answer = dash.post("/api/tasks", json={"project_id": project["id"], "title": "after"})
    assert answer.status_code == 201, answer.text
    acknowledged.append(answer.json()["id"])
    assert set(acknowledged) <= listed()
    verify = dash.get("/api/enterprise/audit/verify")
    assert verify.status_code == 200 and verify.json()["valid"], verify.text


@e2e
def test_a_running_session_survives_a_full_disk(tmp_path: pathlib.Path) -> None:
    bin_dir = tmp_path / "bin"
    fake_agent.install(bin_dir, ("claude",))
    project_dir = tmp_path / "project"
    project_dir.mkdir()
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_AGENT_LIFETIME": "60",
        "LOKI_AGENT_GRACE": "1",
    }
    with tmpfs(tmp_path / "disk") as disk:
        daemon = DaemonProcess(disk / "home", extra_env=env)
        try:
            daemon.start()
            with httpx.Client(base_url=daemon.api_url, timeout=10) as api:
                prd = "# App\n\n## Features\n- A [mode:slow] [seconds:4]\n- B\n"
                answer = api.post(
                    "/api/sessions", json={"prdText": prd, "projectDir": str(project_dir)}
                )
                assert answer.status_code == 201, answer.text
                sid = answer.json()["id"]
                wait_until(
                    lambda: api.get(f"/api/sessions/{sid}").json()["status"] == "running", "run"
                )
                fill(disk / "filler")
                deadline = time.monotonic() + 8.0
                while time.monotonic() < deadline:
                    assert daemon.process is not None
                    assert daemon.process.poll() is None, "the daemon exited on a full disk"
                    assert api.get("/health").status_code in (200, 503)
                    time.sleep(0.2)
                (disk / "filler").unlink()
                wait_until(lambda: api.get("/health").status_code == 200, "healthy again", 10)
                assert api.get(f"/api/sessions/{sid}").status_code == 200
        finally:
            daemon.kill()  # the slow agent ends by itself within seconds


# -- a read-only data dir ----------------------------------------------------------------


def check_read_only(
    daemon: DaemonProcess, api: httpx.Client, dash: httpx.Client, device: str
) -> tuple[str, list[str]]:
    """Acknowledge a project and tasks, make the file system read-only, check the daemon."""
    project = dash.post("/api/projects", json={"name": "kept"}).json()
    acknowledged = []
    for i in range(5):
        answer = dash.post("/api/tasks", json={"project_id": project["id"], "title": f"t{i}"})
        assert answer.status_code == 201, answer.text
        acknowledged.append(answer.json()["id"])
    make_read_only(device)
    for i in range(3):
        answer = dash.post("/api/tasks", json={"project_id": project["id"], "title": f"ro {i}"})
        assert_unavailable(answer, "I/O error")
    assert daemon.process is not None and daemon.process.poll() is None
    health = api.get("/health")
    assert health.status_code == 503, health.text
    assert "I/O error" in health.json()["details"]["store"], health.text
    assert api.get("/health/ready").status_code == 503
    assert api.get("/health/live").status_code == 200
    answer = dash.get("/api/tasks", params={"project_id": project["id"]})
    assert answer.status_code == 200, answer.text
    assert {t["id"] for t in answer.json()["tasks"]} == set(acknowledged)
    return project["id"], acknowledged


@e2e
def test_a_data_dir_made_read_only_is_503_and_keeps_what_was_committed(
    tmp_path: pathlib.Path,
) -> None:
    with ext4_loop(tmp_path) as (mnt, _image, device):
        daemon = DaemonProcess(mnt / "home")
        try:
            daemon.start()
            with (
                httpx.Client(base_url=daemon.api_url, timeout=10) as api,
                httpx.Client(base_url=daemon.dashboard_url, timeout=10) as dash,
            ):
                project_id, acknowledged = check_read_only(daemon, api, dash, device)
        finally:
            daemon.kill()  # a graceful stop here is the xfail test below
        # The operator repairs the file system; a new daemon has every acknowledged write.
        unmount(mnt)
        repaired = run("e2fsck", "-fy", device)
        assert repaired.returncode in (0, 1), repaired.stdout + repaired.stderr
        mounted = run("mount", "-t", "ext4", device, str(mnt))
        assert mounted.returncode == 0, mounted.stderr
        again = DaemonProcess(mnt / "home")
        try:
            again.start()
            with httpx.Client(base_url=again.dashboard_url, timeout=10) as dash:
                answer = dash.get("/api/tasks", params={"project_id": project_id})
                assert {t["id"] for t in answer.json()["tasks"]} == set(acknowledged)
                answer = dash.post("/api/tasks", json={"project_id": project_id, "title": "new"})
                assert answer.status_code == 201, answer.text
                verify = dash.get("/api/enterprise/audit/verify")
                assert verify.status_code == 200 and verify.json()["valid"], verify.text
            with httpx.Client(base_url=again.api_url, timeout=10) as api:
                assert api.get("/health").status_code == 200
            code, err = again.terminate()
            assert code == 0, err
        finally:
            again.kill()


@e2e
def test_a_graceful_stop_on_a_read_only_data_dir_is_clean(tmp_path: pathlib.Path) -> None:
    with ext4_loop(tmp_path) as (mnt, _image, device):
        daemon = DaemonProcess(mnt / "home")
        try:
            daemon.start()
            make_read_only(device)
            code, err = daemon.terminate()
            assert "Traceback" not in err, err
            assert code == 0, err
        finally:
            daemon.kill()


def start_and_stop(home: pathlib.Path) -> None:
    """Run a daemon on `home` once, stopping it cleanly."""
    daemon = DaemonProcess(home)
    try:
        daemon.start()
        code, err = daemon.terminate()
        assert code == 0, err
    finally:
        daemon.kill()


def start_refused(home: pathlib.Path) -> tuple[int, str]:
    """Start a daemon that must not start; its exit code and stderr."""
    daemon = DaemonProcess(home)
    try:
        daemon.start(wait=False)
        assert daemon.process is not None
        _, err = daemon.process.communicate(timeout=WAIT)
        return daemon.process.returncode, err.decode()
    finally:
        daemon.kill()


@e2e
def test_starting_on_a_read_only_data_dir_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    with tmpfs(tmp_path / "disk") as disk:
        start_and_stop(disk / "home")  # a data dir that has been used
        remounted = run("mount", "-o", "remount,ro", str(disk))
        assert remounted.returncode == 0, remounted.stderr
        for home, expected in ((disk / "home", "lokid.lock"), (disk / "fresh", "data dir")):
            code, err = start_refused(home)
            assert code == 1, err
            assert "Traceback" not in err, err
            [line] = [line for line in err.splitlines() if line.startswith("lokid: ")]
            assert expected in line and "Read-only file system" in line, err


@e2e
def test_starting_on_a_full_disk_is_a_clear_error_or_unhealthy(tmp_path: pathlib.Path) -> None:
    with tmpfs(tmp_path / "disk") as disk:
        start_and_stop(disk / "home")  # a data dir that has been used
        fill(disk / "filler")
        daemon = DaemonProcess(disk / "home")
        try:
            daemon.start(wait=False)
            assert daemon.process is not None
            try:
                daemon.wait_ready(timeout=WAIT)
            except AssertionError as exc:  # it did not start: then with a clear message
                message = str(exc)
                assert "Traceback" not in message, message
                assert "lokid: " in message, message
            else:  # it started: then it says the store is not writable
                with httpx.Client(base_url=daemon.api_url, timeout=10) as api:
                    assert api.get("/health").status_code == 503
        finally:
            daemon.kill()
