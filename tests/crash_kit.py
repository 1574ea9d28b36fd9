"""Crash-point testing: a mixed load on a real `loki serve`, a SIGKILL at a seeded moment,
a restart on the same LOKI_HOME, and the checks of DESIGN.md §8 (see docs/reliability.md).

One run (`run_seed`) is:

1. **Load.** The daemon runs as a subprocess (its own process group, stderr to a
   file) with the fake agent on PATH as `claude`. Trio tasks, each with its own
   RNG derived from the seed, so what each one does depends on the seed and not
   on how the tasks interleave:

   * `sessions`: creates sessions (a fresh project folder each, an
     `Idempotency-Key` each), whose PRD features pick fake-agent modes - quick,
     slow, hanging, ignoring SIGTERM and forking a grandchild, failing, flooding
     output, malformed output, adding tasks;
   * `commands`: pause, resume, stop, input and delete on those sessions;
   * `board-N`: a project each on the Dashboard listener, then task creates and
     moves (one request at a time per worker, so "the last acknowledged column"
     of a task is well defined);
   * `tokens`: token creates and revokes over the control socket;
   * `sse-*`: subscribers on `/api/events` (API listener with `minLevel=debug`,
     Dashboard listener, control socket with a type filter) recording every
     event they receive.

   Every request is journalled before it is sent (in flight) and when a 2xx
   answer arrives (acknowledged). A daemon can send nothing once it is dead,
   so every 2xx the client read is an answer the daemon gave before the kill.

2. **Crash.** At `kill_at` seconds into the load (seeded) the daemon's process
   group gets SIGKILL - or, with some seeds, at the first agent spawn after
   `kill_at` (the `claude` wrapper appends its pid to a file before it execs the
   fake agent; the harness polls that file every millisecond), the crash point
   between "agent forked" and "agent recorded". Agents run in their own
   sessions and survive the kill, as a real crash leaves them. With some seeds
   the first restart is SIGKILLed again during its start-up (a crash during
   recovery), and a third daemon is started.

3. **Checks** (each failure is a line of the report; all of them are collected):
   `PRAGMA integrity_check` on a copy of the crashed files, on the live file
   (a separate read-only connection) and after the final graceful stop; the
   audit chain (the verify route, and `loki audit verify --offline` after the
   stop); every acknowledged write present - sessions (and their status after
   the last acknowledged command), input (its `input.received` event), board
   projects, tasks in their last acknowledged column (or the target of a move in
   flight), tokens and revokes - and each in the audit log; a retried create
   with the same `Idempotency-Key` answers the same session; every received
   event in the events table with the same id, type and session (except events
   of deleted sessions, which a delete removes); ids strictly increasing on
   each stream; no process of the run (found by a marker in its environment)
   alive once the restarted daemon is ready, besides the daemon itself; no open
   agent record; every session in a legal status (none `starting`, `running`
   or `stopping`; `paused` only if a pause was acknowledged or in flight;
   `interrupted` only with its `session.interrupted` event); no session task
   left `active`; dense board positions; the restarted daemon stops with exit 0.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from lokid.session_state import Status

from . import fake_agent
from .daemon_proc import DaemonProcess, run_cli

MARK_VAR = "LOKI_CRASH_MARK"
READY_SECONDS = 30.0
SEED_SECONDS = 120.0  # the whole of one seed: load, crash, restarts, checks
REQUEST_SECONDS = 10.0
DEFAULT_LOAD_SECONDS = 3.0
DOUBLE_CRASH_CHANCE = 0.25
AT_SPAWN_CHANCE = 0.3

# What a session may be after the restart, given the last command acknowledged for it
# (docs/session-states.md): `starting`/`running` become `interrupted` unless they had
# already ended (`completed`, `failed`); `paused` stays `paused` (or failed while paused:
# `complete` is legal only from `running`); `stopping` ends `stopped`; a delete, gone.
GONE = "(deleted)"
AFTER_RUNNING = frozenset({Status.INTERRUPTED.value, Status.COMPLETED.value, Status.FAILED.value})
AFTER: dict[str, frozenset[str]] = {
    "create": AFTER_RUNNING,
    "resume": AFTER_RUNNING,
    "pause": frozenset({Status.PAUSED.value, Status.FAILED.value}),
    "stop": frozenset({Status.STOPPED.value}),
    "delete": frozenset({GONE}),
}
ALL_STATUSES = frozenset(s.value for s in Status)

AGENT_MODES: tuple[tuple[str, int], ...] = (
    ("ok", 3),
    ("slow", 4),
    ("hang", 1),
    ("ignore-term", 2),
    ("fail", 1),
    ("flood", 1),
    ("malformed", 1),
    ("add-task", 1),
)
COLUMNS = ("backlog", "todo", "in_progress", "review", "done")


def load_seconds() -> float:
    return float(os.environ.get("LOKI_CRASH_LOAD_SECONDS", DEFAULT_LOAD_SECONDS))


# -- the daemon ----------------------------------------------------------------------------


class CrashDaemon(DaemonProcess):
    """`loki serve` with its stderr in a file (a long run must not fill a pipe nobody reads)."""

    def __init__(self, home: Path, log: Path, env: dict[str, str]) -> None:
        super().__init__(home, extra_env=env)
        self.log = log
        self.started_at = 0.0

    def launch(self) -> None:
        argv = [sys.executable, "-m", "lokid", "serve", "--port", "0", "--dashboard-port", "0"]
        with self.log.open("ab") as err:
            err.write(f"\n===== launch at {time.strftime('%H:%M:%S')} =====\n".encode())
            err.flush()
            self.process = subprocess.Popen(
                argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )
        self.started_at = time.monotonic()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def ready(self, timeout: float = READY_SECONDS) -> dict[str, Any]:
        """Wait (bounded) until `/api/status` says `running` on the control socket."""
        assert self.process is not None
        with trio.move_on_after(timeout):
            while True:
                if self.process.poll() is not None:
                    raise AssertionError(
                        f"daemon exited {self.process.returncode} before it was ready:\n"
                        + self.log_tail()
                    )
                if self.socket.exists():
                    try:
                        async with self.async_control() as client:
                            answer = await client.get("/api/status")
                        if answer.status_code == 200 and answer.json()["phase"] == "running":
                            self.status = answer.json()
                            return self.status
                    except httpx.HTTPError:
                        pass
                await trio.sleep(0.05)
        raise AssertionError(f"daemon not ready after {timeout} s:\n{self.log_tail()}")

    def async_control(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(self.socket)),
            base_url="http://lokid",
            timeout=REQUEST_SECONDS,
        )

    def sigkill(self) -> None:
        """SIGKILL the daemon's process group (not its agents: they have their own)."""
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    async def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait (bounded); the exit code, or None if it had to be killed."""
        assert self.process is not None
        process = self.process
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        with trio.move_on_after(timeout):
            while process.poll() is None:  # noqa: ASYNC110 (a Popen gives no event)
                await trio.sleep(0.05)
            return process.returncode
        self.kill()
        return None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no daemon log)"
        return "\n".join(text.splitlines()[-lines:])


# -- processes of the run --------------------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    pid: int
    start: int  # clock ticks since boot: with the pid, the identity of a process
    state: str
    pgid: int
    cmdline: str

    def describe(self) -> str:
        return (
            f"pid {self.pid} (start {self.start}, pgid {self.pgid}, state {self.state}): "
            f"{self.cmdline[:160]}"
        )


def marked_processes(mark: str) -> list[Proc]:
    """Live (non-zombie) processes whose environment holds `LOKI_CRASH_MARK=<mark>`: the
    daemons of the run and every agent (and grandchild) they started."""
    needle = f"{MARK_VAR}={mark}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] in ("Z", "X"):
            continue
        found.append(
            Proc(
                pid=int(entry.name),
                start=int(fields[19]),
                state=fields[0],
                pgid=int(fields[2]),
                cmdline=cmdline.strip(),
            )
        )
    return sorted(found, key=lambda p: p.pid)


def kill_marked(mark: str) -> list[Proc]:
    """SIGKILL every process of the run still alive (each found by its marker just now)."""
    killed = []
    for proc in marked_processes(mark):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(proc.pid, signal.SIGKILL)
            killed.append(proc)
    return killed


# -- the journal -------------------------------------------------------------------------------


@dataclass
class SessionRecord:
    id: str
    project: Path
    key: str
    body: dict[str, Any]
    modes: list[str]
    allowed: frozenset[str] = AFTER_RUNNING
    in_flight: frozenset[str] | None = None  # what a command whose answer never came allows
    paused_acked: bool = False
    commands: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)


@dataclass
class BoardTask:
    id: str
    project: str
    column: str  # the last acknowledged column
    in_flight: str | None = None  # the target of a move whose answer never came


@dataclass
class TokenRecord:
    id: str
    revoked: bool = False


@dataclass
class Received:
    id: int
    type: str
    session: str | None


class Journal:
    """What the clients did and saw: acknowledged writes, requests in flight, events."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.t0 = 0.0
        self.killed = False
        self.kill_at: float | None = None
        self.timeline: list[str] = []
        self.problems: list[str] = []
        self.sessions: dict[str, SessionRecord] = {}
        self.deleted_sessions: set[str] = set()
        self.projects: dict[str, str] = {}  # id -> name
        self.tasks: dict[str, BoardTask] = {}
        self.tokens: dict[str, TokenRecord] = {}
        self.received: dict[str, list[Received]] = {}
        self.audited: Counter[tuple[str, str, int]] = Counter()
        self.requests = 0
        self.acked = 0

    def now(self) -> float:
        return trio.current_time() - self.t0

    def note(self, text: str) -> None:
        self.timeline.append(f"{self.now():7.3f}s {text}")

    def ack(self, action: str, resource: str, status: int) -> None:
        """A 2xx answer: the write is acknowledged, and so is its audit entry."""
        self.acked += 1
        self.audited[(action, resource, status)] += 1
        self.note(f"ack {action} {resource} {status}")

    def failed_request(self, what: str, error: BaseException) -> None:
        """A request that got no answer: expected once the daemon is dead, a problem before."""
        if not self.killed:
            self.problems.append(f"{what} failed before the kill ({self.now():.3f} s): {error!r}")
        else:
            self.note(f"in flight at the kill: {what} ({type(error).__name__})")

    def unexpected(self, what: str, answer: httpx.Response) -> None:
        self.problems.append(
            f"{what} answered {answer.status_code} at {self.now():.3f} s: {answer.text[:300]}"
        )

    async def expect(
        self, what: str, status: int, request: Awaitable[httpx.Response]
    ) -> httpx.Response | None:
        """Send one request (counted); its answer if it has `status`, else None, with the
        failure recorded (`failed_request` or `unexpected`)."""
        self.requests += 1
        try:
            answer = await request
        except httpx.HTTPError as exc:
            self.failed_request(what, exc)
            return None
        if answer.status_code != status:
            self.unexpected(what, answer)
            return None
        return answer


# -- the load ----------------------------------------------------------------------------------


@dataclass
class Clients:
    api: httpx.AsyncClient
    dashboard: httpx.AsyncClient
    control: httpx.AsyncClient


class Load:
    def __init__(self, seed: int, root: Path, journal: Journal, clients: Clients) -> None:
        self.seed = seed
        self.root = root
        self.journal = journal
        self.c = clients
        self.session_ids: list[str] = []  # acknowledged, in order

    def rng(self, name: str) -> random.Random:
        return random.Random(f"{self.seed}/{name}")

    async def run(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self.sessions)
        nursery.start_soon(self.commands)
        for n in range(2):
            nursery.start_soon(self.board, n)
        nursery.start_soon(self.tokens)

    # -- sessions ---------------------------------------------------------------------

    def prd(self, rng: random.Random) -> tuple[str, list[str]]:
        modes = rng.choices([m for m, _ in AGENT_MODES], [w for _, w in AGENT_MODES], k=3)
        modes = modes[: rng.randint(1, 3)]
        lines = []
        for n, mode in enumerate(modes, start=1):
            extra = ""
            if mode == "slow":
                extra = f" [seconds:{rng.uniform(0.5, 4.0):.2f}]"
            elif mode == "flood":
                extra = f" [lines:{rng.randint(50, 400)}]"
            lines.append(f"- Feature {n} [mode:{mode}]{extra}")
        return "# Crash app\n\n## Features\n" + "\n".join(lines) + "\n", modes

    async def sessions(self) -> None:
        rng = self.rng("sessions")
        j = self.journal
        for n in range(1000):
            project = self.root / "projects" / f"s{n:03d}"
            project.mkdir(parents=True)
            text, modes = self.prd(rng)
            (project / "prd.md").write_text(text)
            body = {"prd": str(project / "prd.md")}
            key = f"crash-{self.seed}-{n}"
            answer = await j.expect(
                f"POST /api/sessions ({key}, modes {modes})",
                201,
                self.c.api.post("/api/sessions", json=body, headers={"Idempotency-Key": key}),
            )
            if answer is None:
                return
            sid = answer.json()["id"]
            j.sessions[sid] = SessionRecord(sid, project, key, body, modes)
            self.session_ids.append(sid)
            j.ack("session.create", sid, 201)
            await trio.sleep(rng.uniform(0.15, 0.7))
            if j.killed:
                return

    async def commands(self) -> None:
        rng = self.rng("commands")
        j = self.journal
        while True:
            await trio.sleep(rng.uniform(0.1, 0.4))
            if j.killed:
                return
            live = [s for s in self.session_ids if s not in j.deleted_sessions]
            if not live:
                continue
            sid = rng.choice(live)
            record = j.sessions[sid]
            command = rng.choices(["pause", "resume", "stop", "input", "delete"], [4, 3, 2, 3, 2])[
                0
            ]
            if not await self.command(record, command):
                return

    async def command(self, record: SessionRecord, command: str) -> bool:
        """One command; False once the daemon is gone."""
        j = self.journal
        sid = record.id
        if command in AFTER:
            record.in_flight = AFTER[command]
        record.commands.append(f"{command} sent at {j.now():.3f}s")
        j.requests += 1
        try:
            if command == "delete":
                answer = await self.c.api.delete(f"/api/sessions/{sid}")
            elif command == "input":
                answer = await self.c.api.post(
                    f"/api/sessions/{sid}/input", json={"message": f"note {j.requests}"}
                )
            else:
                answer = await self.c.api.post(f"/api/sessions/{sid}/{command}")
        except httpx.HTTPError as exc:
            j.failed_request(f"{command} {sid}", exc)
            return False
        record.in_flight = None
        record.commands[-1] += f", answered {answer.status_code} at {j.now():.3f}s"
        if answer.status_code in (409, 404):  # refused by the state machine: nothing changed
            return True
        if answer.status_code // 100 != 2:
            j.unexpected(f"{command} {sid}", answer)
            return True
        j.ack(f"session.{command}", sid, answer.status_code)
        if command == "delete":
            j.deleted_sessions.add(sid)
            record.allowed = frozenset({GONE})
        elif command == "input":
            record.inputs.append(str(answer.json()["id"]))
        elif command in AFTER:
            record.allowed = AFTER[command]
            record.paused_acked = record.paused_acked or command == "pause"
        return True

    # -- the board --------------------------------------------------------------------

    async def board(self, n: int) -> None:
        rng = self.rng(f"board-{n}")
        j = self.journal
        name = f"crash board {n}"
        answer = await j.expect(
            f"POST /api/projects ({name})",
            201,
            self.c.dashboard.post("/api/projects", json={"name": name}),
        )
        if answer is None:
            return
        project = answer.json()["id"]
        j.projects[project] = name
        j.ack("project.create", project, 201)
        mine: list[BoardTask] = []
        while True:
            await trio.sleep(rng.uniform(0.005, 0.08))
            if j.killed:
                return
            column = rng.choice(COLUMNS)
            if not mine or rng.random() < 0.35:
                body: dict[str, Any] = {"project_id": project, "title": f"card {j.requests}"}
                body["column"] = column
                answer = await j.expect(
                    f"POST /api/tasks in {column}",
                    201,
                    self.c.dashboard.post("/api/tasks", json=body),
                )
                if answer is None:
                    return
                task = BoardTask(answer.json()["id"], project, answer.json()["column"])
                mine.append(task)
                j.tasks[task.id] = task
                j.ack("task.create", task.id, 201)
                continue
            task = rng.choice(mine)
            move: dict[str, Any] = {"column": column}
            if rng.random() < 0.5:
                move["position"] = rng.randint(0, 5)
            task.in_flight = column
            answer = await j.expect(
                f"move {task.id} {task.column} -> {column}",
                200,
                self.c.dashboard.post(f"/api/tasks/{task.id}/move", json=move),
            )
            if answer is None:
                return
            task.in_flight = None
            task.column = answer.json()["column"]
            j.ack("task.move", task.id, 200)

    # -- tokens -----------------------------------------------------------------------

    async def tokens(self) -> None:
        rng = self.rng("tokens")
        j = self.journal
        while True:
            await trio.sleep(rng.uniform(0.03, 0.25))
            if j.killed:
                return
            live = [t for t in j.tokens.values() if not t.revoked]
            if live and rng.random() < 0.3:
                token = rng.choice(live)
                answer = await j.expect(
                    f"revoke {token.id}",
                    200,
                    self.c.control.delete(f"/dashboard/api/enterprise/tokens/{token.id}"),
                )
                if answer is None:
                    return
                token.revoked = True
                j.ack("token.revoke", token.id, 200)
                continue
            body = {"name": f"crash {j.requests}", "scopes": [rng.choice(["read", "write"])]}
            answer = await j.expect(
                "POST /dashboard/api/enterprise/tokens",
                201,
                self.c.control.post("/dashboard/api/enterprise/tokens", json=body),
            )
            if answer is None:
                return
            tid = answer.json()["id"]
            j.tokens[tid] = TokenRecord(tid)
            j.ack("token.create", tid, 201)


async def subscribe(
    name: str,
    client: httpx.AsyncClient,
    params: dict[str, str],
    journal: Journal,
    connected: trio.Event,
) -> None:
    """Record every event of one SSE stream until it ends (the daemon dies)."""
    seen = journal.received.setdefault(name, [])
    try:
        async with client.stream("GET", "/api/events", params=params, timeout=None) as stream:
            if stream.status_code != 200:
                journal.problems.append(f"{name}: /api/events answered {stream.status_code}")
                connected.set()
                return
            async for line in stream.aiter_lines():
                if line.startswith(":"):
                    connected.set()
                elif line.startswith("data:"):
                    try:
                        event = json.loads(line[5:])
                    except ValueError:
                        continue  # a frame cut by the kill was not received
                    if event.get("id") is not None:
                        seen.append(Received(int(event["id"]), event["type"], event["sessionId"]))
    except (httpx.HTTPError, httpx.StreamError) as exc:
        if not journal.killed:
            journal.problems.append(f"{name}: the stream broke before the kill: {exc!r}")
    finally:
        connected.set()
    if not journal.killed:
        journal.problems.append(f"{name}: the stream ended before the kill")


# -- the database ------------------------------------------------------------------------------


def read_only(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)


def integrity(db: Path, *, copy_to: Path | None = None) -> str:
    """`PRAGMA integrity_check` of `db` - of a copy (with its WAL) in `copy_to` if given,
    so that the crashed files themselves stay as the restarted daemon will find them."""
    if copy_to is not None:
        copy_to.mkdir(parents=True, exist_ok=True)
        for suffix in ("", "-wal"):
            source = Path(f"{db}{suffix}")
            if source.exists():
                shutil.copyfile(source, copy_to / (db.name + suffix))
        with contextlib.closing(sqlite3.connect(copy_to / db.name, timeout=10)) as conn:
            rows = conn.execute("PRAGMA integrity_check").fetchall()
    else:
        with contextlib.closing(read_only(db)) as conn:
            rows = conn.execute("PRAGMA integrity_check").fetchall()
    return "; ".join(str(r[0]) for r in rows)


def query(db: Path, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    with contextlib.closing(read_only(db)) as conn:
        return conn.execute(sql, params).fetchall()


# -- one seed ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What the seed decides besides the load: when and how the daemon dies."""

    kill_at: float  # seconds into the load
    at_spawn: bool  # from kill_at on, wait for the next agent spawn and kill right then
    double_crash: float | None  # kill the first restart this many seconds after its launch

    @classmethod
    def of(cls, seed: int) -> Plan:
        rng = random.Random(f"{seed}/plan")
        kill_at = round(rng.uniform(0.1, load_seconds()), 3)
        at_spawn = rng.random() < AT_SPAWN_CHANCE
        double = round(rng.uniform(0.0, 1.5), 3) if rng.random() < DOUBLE_CRASH_CHANCE else None
        return cls(kill_at, at_spawn, double)

    def describe(self) -> str:
        text = f"kill at {self.kill_at:.3f} s"
        if self.at_spawn:
            text += " or the first agent spawn after it"
        if self.double_crash is not None:
            text += f", restart killed {self.double_crash:.3f} s after its launch"
        return text


@dataclass
class Outcome:
    seed: int
    plan: Plan
    problems: list[str]
    duration: float
    summary: str
    report: str


def install_agent(bin_dir: Path, spawns: Path) -> None:
    """`claude` = the fake agent, behind a wrapper that first appends its pid to `spawns`:
    the harness sees a spawn within a millisecond or so, well before the agent's
    Python is up (the kill-at-spawn crash point)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    wrapper = bin_dir / "claude"
    script = Path(fake_agent.__file__).resolve()
    wrapper.write_text(
        "#!/bin/sh\n"
        f"echo $$ >> {shlex.quote(str(spawns))}\n"
        f'exec {shlex.quote(sys.executable)} {shlex.quote(str(script))} "$@"\n'
    )
    wrapper.chmod(0o755)


def agent_env(root: Path, mark: str) -> dict[str, str]:
    bin_dir = root / "bin"
    install_agent(bin_dir, root / "spawns.txt")
    return {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_AGENT_LOG": str(root / "agent-log.jsonl"),
        "FAKE_AGENT_LIFETIME": "60",
        "FAKE_AGENT_TICK": "0.25",
        "LOKI_AGENT_GRACE": "0.5",
        "LOKI_RETRY_BASE": "0.05",
        "LOKI_RETRY_CAP": "0.2",
        "LOKI_REGISTRY_ROOTS": str(root / "projects"),
        MARK_VAR: mark,
    }


def agent_log(root: Path) -> dict[int, dict[str, Any]]:
    path = root / "agent-log.jsonl"
    if not path.exists():
        return {}
    calls = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {int(c["pid"]): c for c in calls}


async def run_seed(seed: int, root: Path) -> Outcome:
    """Load, crash, restart and check one seed; never raises for a failed check."""
    plan = Plan.of(seed)
    double_crash = plan.double_crash
    mark = uuid.uuid4().hex
    env = agent_env(root, mark)
    home = root / "home"
    db = home / "lokid" / "lokid.db"
    journal = Journal(seed)
    daemons: list[CrashDaemon] = []
    started = time.monotonic()
    before_kill: list[Proc] = []
    try:
        with trio.fail_after(SEED_SECONDS):
            first = CrashDaemon(home, root / "daemon.log", env)
            daemons.append(first)
            first.launch()
            await first.ready()
            before_kill = await load_and_kill(seed, root, first, journal, plan, mark)
            crashed = await trio.to_thread.run_sync(
                lambda: integrity(db, copy_to=root / "crash-copy")
            )
            if crashed != "ok":
                journal.problems.append(f"integrity_check of the crashed files: {crashed}")
            if double_crash is not None:
                second = CrashDaemon(home, root / "daemon.log", env)
                daemons.append(second)
                second.launch()
                await trio.sleep(double_crash)
                if second.process is not None and second.process.poll() is not None:
                    journal.problems.append(
                        f"the first restart exited {second.process.returncode} within "
                        f"{double_crash} s:\n{second.log_tail()}"
                    )
                second.sigkill()
                journal.note(f"restart killed again {double_crash} s after its launch")
            final = CrashDaemon(home, root / "daemon.log", env)
            daemons.append(final)
            final.launch()
            await final.ready()
            await check_restarted(root, final, journal, mark, before_kill, db)
            code = await final.stop()
            if code != 0:
                journal.problems.append(
                    "the restarted daemon "
                    + ("did not stop within 30 s" if code is None else f"exited {code}")
                    + f" after SIGTERM:\n{final.log_tail()}"
                )
            await check_stopped(home, db, journal)
    except trio.TooSlowError:
        journal.problems.append(f"the seed took more than {SEED_SECONDS} s")
    except AssertionError as exc:
        journal.problems.append(str(exc))
    except Exception:  # a check that could not even run: still a report with the seed
        journal.problems.append(f"error at {journal.now():.3f} s:\n{traceback.format_exc()}")
    finally:
        for daemon in daemons:
            daemon.kill()
        leftovers = kill_marked(mark)
        if leftovers:
            journal.note("killed at cleanup: " + ", ".join(p.describe() for p in leftovers))
    duration = time.monotonic() - started
    summary = (
        f"seed {seed}: {plan.describe()}; killed at {journal.kill_at or 0:.3f} s"
        + f", {journal.requests} requests ({journal.acked} acknowledged), "
        f"{len(journal.sessions)} sessions, {len(journal.tasks)} board tasks, "
        f"{len(journal.tokens)} tokens, "
        f"{sum(len(v) for v in journal.received.values())} events received, "
        f"{len(before_kill)} agent processes at the kill, {duration:.1f} s: "
        + ("ok" if not journal.problems else f"{len(journal.problems)} problems")
    )
    report = summary
    if journal.problems or os.environ.get("LOKI_CRASH_VERBOSE"):
        report = "\n".join(
            [
                summary,
                f"reproduce: LOKI_CRASH_SEED={seed} .venv/bin/python -m pytest -q "
                "tests/test_crash.py",
                "problems:",
                *(f"  - {p}" for p in journal.problems),
                "sessions (acknowledged):",
                *(
                    f"  {r.id} modes={r.modes} allowed={sorted(r.allowed)} "
                    f"in_flight={sorted(r.in_flight) if r.in_flight else None} "
                    f"commands={r.commands}"
                    for r in journal.sessions.values()
                ),
                "agent processes alive at the kill:",
                *(f"  {p.describe()}" for p in before_kill),
                "timeline (last 60):",
                *(f"  {line}" for line in journal.timeline[-60:]),
                "daemon log (last 60 lines):",
                daemons[-1].log_tail(60) if daemons else "(none)",
            ]
        )
    return Outcome(seed, plan, journal.problems, duration, summary, report)


async def load_and_kill(
    seed: int, root: Path, daemon: CrashDaemon, journal: Journal, plan: Plan, mark: str
) -> list[Proc]:
    """Subscribers connect, the load starts, and `plan.kill_at` seconds later (or at the
    next agent spawn after that) SIGKILL; returns the agent processes alive right after."""
    async with (
        httpx.AsyncClient(base_url=daemon.api_url, timeout=REQUEST_SECONDS) as api,
        httpx.AsyncClient(base_url=daemon.dashboard_url, timeout=REQUEST_SECONDS) as dashboard,
        daemon.async_control() as control,
        trio.open_nursery() as nursery,
    ):
        streams: tuple[tuple[str, httpx.AsyncClient, dict[str, str]], ...] = (
            ("sse-api-debug", api, {"minLevel": "debug"}),
            ("sse-dashboard", dashboard, {}),
            ("sse-socket-session", control, {"types": "session.*,task.*,input.*"}),
        )
        with trio.fail_after(10):
            for name, client, params in streams:
                connected = trio.Event()
                nursery.start_soon(subscribe, name, client, params, journal, connected)
                await connected.wait()
        journal.t0 = trio.current_time()
        journal.note("load starts")
        load = Load(seed, root, journal, Clients(api, dashboard, control))
        await load.run(nursery)
        await trio.sleep(plan.kill_at)
        if plan.at_spawn:
            await next_spawn(root / "spawns.txt", journal)
        journal.killed = True
        journal.kill_at = journal.now()
        daemon.sigkill()
        journal.note(f"SIGKILL (daemon up {time.monotonic() - daemon.started_at:.3f} s)")
        alive = [p for p in marked_processes(mark) if p.pid != daemon.pid]
        journal.note(f"after the kill: {len(alive)} agent processes alive")
        # Whatever is still waiting for an answer gets a transport error now; bounded anyway.
        with trio.move_on_after(REQUEST_SECONDS + 2):
            while len(nursery.child_tasks) > 0:  # noqa: ASYNC110 (no event for "all done")
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
    return alive


def spawned(spawns: Path) -> list[str]:
    """The pids the `claude` wrapper appended so far."""
    try:
        return spawns.read_text().split()
    except FileNotFoundError:
        return []


async def next_spawn(spawns: Path, journal: Journal, timeout: float = 5.0) -> None:
    """Return as soon as an agent is forked (the wrapper's file grows), polling every ms;
    after `timeout` without a spawn, return anyway (the kill happens then)."""
    count = len(spawned(spawns))
    with trio.move_on_after(timeout):
        while len(now := spawned(spawns)) <= count:  # noqa: ASYNC110 (a file gives no event)
            await trio.sleep(0.001)
        journal.note(f"agent spawn seen: pid {now[-1]}")
        return
    journal.note(f"no agent spawn within {timeout} s")


# Every process `agent.spawned` gets its `agent.completed`/`agent.failed` (docs/sessions.md);
# after the restart nothing runs, so (session, agentId) of any without one is a problem.
UNENDED_AGENTS = """
SELECT s.session_id, json_extract(s.data, '$.agentId') FROM events s
WHERE s.type = 'agent.spawned' AND json_extract(s.data, '$.kind') = 'process'
AND NOT EXISTS (
    SELECT 1 FROM events e
    WHERE e.session_id = s.session_id AND e.type IN ('agent.completed', 'agent.failed')
    AND json_extract(e.data, '$.agentId') = json_extract(s.data, '$.agentId')
)
"""


async def check_restarted(
    root: Path,
    daemon: CrashDaemon,
    journal: Journal,
    mark: str,
    before_kill: list[Proc],
    db: Path,
) -> None:
    """Every check that needs the restarted daemon running."""
    problems = journal.problems
    # No process of the run may be alive now but the daemon (and what is in its group).
    survivors = [p for p in marked_processes(mark) if p.pgid != daemon.pid]
    if survivors:
        logged = agent_log(root)
        earlier = {(p.pid, p.start) for p in before_kill}
        recorded = {
            int(pid): (ended, reason)
            for pid, ended, reason in query(
                db, "SELECT pid, ended_at, end_reason FROM agents ORDER BY id"
            )
        }
        for p in survivors:
            call = logged.get(p.pid) or logged.get(p.pgid) or {}
            row = recorded.get(p.pgid)
            problems.append(
                f"alive after the restart: pid {p.pid} (pgid {p.pgid}, "
                + ("alive at the kill" if (p.pid, p.start) in earlier else "forked after the kill")
                + "), "
                + (f"agent row {row}" if row else "NO agent row for its group (never recorded)")
                + f", fake agent mode {call.get('mode')}, cwd {call.get('cwd')}: {p.cmdline[:80]}"
            )
    open_rows = query(db, "SELECT id, session_id, pid FROM agents WHERE ended_at IS NULL")
    if open_rows:
        problems.append(f"agent records still open after the restart: {open_rows}")
    unended = query(db, UNENDED_AGENTS)
    if unended:
        problems.append(f"agent processes spawned and never ended after the restart: {unended}")

    async with (
        httpx.AsyncClient(base_url=daemon.api_url, timeout=REQUEST_SECONDS) as api,
        httpx.AsyncClient(base_url=daemon.dashboard_url, timeout=REQUEST_SECONDS) as dashboard,
        daemon.async_control() as control,
    ):
        await check_sessions(api, journal, db)
        await check_board(dashboard, journal)
        await check_tokens(control, journal)
        verify = (await control.get("/dashboard/api/enterprise/audit/verify")).json()
        if not verify.get("valid"):
            problems.append(f"audit chain (verify route): {verify}")
    check_events(journal, db)
    check_audited(journal, db)
    live = await trio.to_thread.run_sync(lambda: integrity(db))
    if live != "ok":
        problems.append(f"integrity_check while the restarted daemon runs: {live}")


async def check_sessions(api: httpx.AsyncClient, journal: Journal, db: Path) -> None:
    problems = journal.problems
    listed: dict[str, dict[str, Any]] = {}
    offset = 0
    while True:
        page = (await api.get("/api/sessions", params={"limit": 1000, "offset": offset})).json()
        listed.update((s["id"], s) for s in page["sessions"])
        offset += len(page["sessions"])
        if not page["sessions"] or offset >= page["total"]:
            break
    for record in journal.sessions.values():
        status = listed[record.id]["status"] if record.id in listed else GONE
        allowed = record.allowed | (record.in_flight or frozenset())
        if status not in allowed:
            problems.append(
                f"session {record.id} is {status}; after its acknowledged commands it may be "
                f"{sorted(allowed)} (commands: {record.commands})"
            )
    pause_known = {
        r.id for r in journal.sessions.values() if r.paused_acked or r.in_flight is not None
    }
    for sid, session in listed.items():
        status = session["status"]
        if status not in ALL_STATUSES:
            problems.append(f"session {sid} has an unknown status {status!r}")
        elif status in ("starting", "running", "stopping"):
            problems.append(f"session {sid} is still {status} after the restart")
        elif status == "paused" and sid not in pause_known:
            problems.append(f"session {sid} is paused, but no pause was sent")
        if sid not in journal.sessions:
            journal.note(f"session {sid} (create not acknowledged) is {status}")
    interrupted = [sid for sid, s in listed.items() if s["status"] == "interrupted"]
    if interrupted:
        rows = query(db, "SELECT session_id, data FROM events WHERE type = 'session.interrupted'")
        announced = {sid for sid, data in rows if "daemon restart" in data}
        for sid in interrupted:
            if sid not in announced:
                problems.append(f"session {sid} is interrupted without a session.interrupted event")
    # Acknowledged input is stored: its `input.received` event is in history.
    inputs = {
        i
        for r in journal.sessions.values()
        if GONE not in r.allowed | (r.in_flight or frozenset())
        for i in r.inputs
    }
    if inputs:
        rows = query(db, "SELECT data FROM events WHERE type = 'input.received'")
        stored = {json.loads(data)["inputId"] for (data,) in rows}
        missing = sorted(inputs - stored)
        if missing:
            problems.append(f"acknowledged inputs without input.received: {missing}")
    active = (await api.get("/api/tasks/active", params={"limit": 1000})).json()
    if active["total"]:
        tasks = [(t.get("sessionId"), t.get("id")) for t in active["tasks"]]
        problems.append(f"session tasks still active after the restart: {tasks}")
    # An acknowledged create is remembered with its Idempotency-Key across the crash.
    for record in list(journal.sessions.values())[:3]:
        if record.id in journal.deleted_sessions:
            continue
        again = await api.post(
            "/api/sessions", json=record.body, headers={"Idempotency-Key": record.key}
        )
        if again.status_code // 100 != 2 or again.json().get("id") != record.id:
            problems.append(
                f"retry of the acknowledged create {record.key} answered "
                f"{again.status_code} {again.text[:200]}, not session {record.id}"
            )


async def check_board(dashboard: httpx.AsyncClient, journal: Journal) -> None:
    problems = journal.problems
    for project in journal.projects:
        answer = await dashboard.get(f"/api/projects/{project}")
        if answer.status_code != 200:
            problems.append(f"acknowledged project {project} is gone: {answer.status_code}")
            continue
        tasks = (
            await dashboard.get("/api/tasks", params={"project_id": project, "limit": 1000})
        ).json()["tasks"]
        by_id = {t["id"]: t for t in tasks}
        for task in journal.tasks.values():
            if task.project != project:
                continue
            found = by_id.get(task.id)
            allowed = {task.column} | ({task.in_flight} if task.in_flight else set())
            if found is None:
                problems.append(f"acknowledged board task {task.id} is missing")
            elif found["column"] not in allowed:
                problems.append(
                    f"board task {task.id} is in {found['column']}, but its last acknowledged "
                    f"column is {task.column} (in flight: {task.in_flight})"
                )
        columns: dict[str, list[int]] = {}
        for t in tasks:
            columns.setdefault(t["column"], []).append(t["position"])
        for column, positions in columns.items():
            if sorted(positions) != list(range(len(positions))):
                problems.append(f"project {project} column {column}: positions {sorted(positions)}")


async def check_tokens(control: httpx.AsyncClient, journal: Journal) -> None:
    answer = await control.get("/dashboard/api/enterprise/tokens", params={"limit": 1000})
    listed = {t["id"]: t for t in answer.json()["tokens"]}
    for token in journal.tokens.values():
        found = listed.get(token.id)
        if found is None:
            journal.problems.append(f"acknowledged token {token.id} is missing")
        elif token.revoked and not found["revoked"]:
            journal.problems.append(f"token {token.id}: its revoke was acknowledged, not stored")


def check_events(journal: Journal, db: Path) -> None:
    # Deleting a session deletes its events (session_records.delete_session): those of a
    # session whose delete was acknowledged, or in flight, may be gone.
    deleted = {
        r.id
        for r in journal.sessions.values()
        if GONE in r.allowed or (r.in_flight is not None and GONE in r.in_flight)
    }
    received: dict[int, Received] = {}
    for name, events in journal.received.items():
        ids = [e.id for e in events]
        if any(b <= a for a, b in itertools.pairwise(ids)):
            journal.problems.append(f"{name}: ids not strictly increasing: {ids[:50]}...")
        received.update((e.id, e) for e in events if e.session not in deleted)
    if not received:
        return
    stored: dict[int, tuple[str, str | None]] = {}
    wanted = sorted(received)
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        marks = ",".join("?" * len(chunk))
        for id, type, session in query(
            db, f"SELECT id, type, session_id FROM events WHERE id IN ({marks})", chunk
        ):
            stored[int(id)] = (type, session)
    missing = [i for i in wanted if i not in stored]
    if missing:
        journal.problems.append(
            f"{len(missing)} received events are not in history: "
            + ", ".join(f"{i} {received[i].type}" for i in missing[:20])
        )
    differ = [
        i for i in wanted if i in stored and stored[i] != (received[i].type, received[i].session)
    ]
    if differ:
        journal.problems.append(
            "received events differ from history: "
            + ", ".join(f"{i}: got {received[i]}, stored {stored[i]}" for i in differ[:10])
        )


def check_audited(journal: Journal, db: Path) -> None:
    """Every acknowledged change has its audit entry (recorded before the answer)."""
    entries: Counter[tuple[str, str, int]] = Counter()
    for action, resource, status in query(
        db, "SELECT action, resource, status FROM audit_log WHERE status IS NOT NULL"
    ):
        entries[(action, resource or "", int(status))] += 1
    short = [
        f"{key} acknowledged {count}x, audited {entries[key]}x"
        for key, count in journal.audited.items()
        if entries[key] < count
    ]
    if short:
        journal.problems.append(
            "acknowledged changes missing from the audit log: " + "; ".join(short)
        )


async def check_stopped(home: Path, db: Path, journal: Journal) -> None:
    """After the graceful stop: the file is sound and the chain verifies offline."""
    final = await trio.to_thread.run_sync(lambda: integrity(db))
    if final != "ok":
        journal.problems.append(f"integrity_check after the graceful stop: {final}")
    verified = await trio.to_thread.run_sync(
        lambda: run_cli(["audit", "verify", "--offline"], home)
    )
    if verified.returncode != 0:
        journal.problems.append(
            f"loki audit verify --offline exited {verified.returncode}: "
            f"{verified.stdout.strip()} {verified.stderr.strip()}"
        )
