"""Session start latency and rate, agent-output ingest, 500 slow sessions (issue 4), vs bare agents.

    python -m bench sessions [--quick] [--measure start rate ingest concurrent]
                             [--starts 200] [--burst 400] [--concurrency 32]
                             [--lines 50000] [--subscribers 10]
                             [--sessions 500] [--slow-seconds 30] [--window 10]
                             [--no-pin] [--json]

A real `loki serve` subprocess (temporary LOKI_HOME, loopback, ports 0) runs
pinned to CPU 0; its agents inherit the pin. The driver (this process: trio,
raw sockets) runs on CPU 1. Every figure is set against a floor measured in
the same run by `bench/bare_agents.py`, also pinned to CPU 0: the same
agent script spawned and waited for from Python, or its output read through a
pipe. One fresh daemon per group of measures (LOKI_MAX_AGENTS raised to fit,
LOKI_AGENT_GRACE 2 s); every project folder, the fake agents and LOKI_HOME
live in one temporary folder (under `$TMPDIR`, else /tmp), removed at the end.
What a new file and a new folder cost in it (kernel CPU) is probed before and
after the runs and printed: on ext4 without a journal it depends on the recent
deletions near that folder (docs/performance.md, "Sessions").

1. start   - `POST /api/sessions` (provider `command`, a shell agent that
             reads its prompt and prints one line), then `session.started`
             seen on an SSE stream (`/api/events?types=session.started,...`), one
             session at a time, each in its own project folder; the next
             POST waits until the previous session has ended, so the daemon
             is quiet. p50/p99 in ms against bare spawn+wait of the agent.
2. rate    - `--burst` sessions POSTed over `--concurrency` keep-alive
             connections as fast as they are answered (each session also
             runs its agent meanwhile); starts/s = sessions / (first POST ->
             last `session.started`), against bare spawn+wait of the same
             agent at the same concurrency.
3. ingest  - one session of provider `claude`, whose fake `claude` (first on
             the daemon's PATH) `cat`s a stream-json file: init, `--lines`
             assistant-text lines, result. `--subscribers` SSE streams
             (`types=agent.output`) count frames; lines/s = lines / (first
             `agent.output` on any stream -> last on every stream), against
             Python reading the same script's output through a pipe (split
             into lines, and split + `json.loads`).
4. concurrent - `--sessions` sessions whose agent prints a line every
             second for `--slow-seconds` s (bash, no fork per line). Once
             every agent runs: daemon CPU (utime+stime from /proc per second
             of wall time), VmRSS per session (minus idle), `/health` p99 at
             100 req/s on one keep-alive connection, each against the same
             daemon idle just before. The window is `--window` s (cut
             short if the agents would end within it); the idle probing
             as long, so both p99s are read from as many probes.

Also printed: where a sequential start's time goes (median ms from the
session row's `createdAt` to its first events, from `/api/events/history`),
the daemon's CPU per session / per line, and which share of it ran on the
trio thread (`/proc/<pid>/task/<pid>/stat`; the rest is worker threads: the
store, `.loki/` files, spawning).

Clean-up: the daemon gets SIGTERM (it stops every session's agent group),
then /proc is searched for any process whose command line names the
temporary folder; one found is reported (and killed) - none should be.

Investigation knobs (cProfile of the measured parts, per-function thread
CPU, trio task steps, experiments): see `bench/sessions_daemon.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import trio

from bench import sessions_daemon
from bench.audit import mount_of
from bench.events import _fmt, percentile
from bench.health import _wait_for_port
from bench.publisher import raise_fd_limit

HOST = "127.0.0.1"
SERVER_CPU = 0
DRIVER_CPU = 1
TWO_CPUS = {SERVER_CPU, DRIVER_CPU} <= os.sched_getaffinity(0)  # read before the driver pins
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
PRD = "# App\n\n## Features\n- Do it\n"
ENDED = ("session.completed", "session.failed")
# About the size of the prompt lokid builds for the PRD above.
PROMPT = (
    "You are implementing the product described in the PRD at /tmp/x/prd.md (App).\n\n"
    "Iteration 1. Your task is prd-001: Do it\n\n" + "Work in the project folder. " * 8
)
QUICK = {
    "starts": 50,
    "burst": 100,
    "lines": 10_000,
    "sessions": 100,
    "slow_seconds": 15,
    "window": 4.0,
}

# Goals of issue 4.
START_P99_MS = 25.0
STARTS_PER_S = 200.0
LINES_PER_S = 20_000.0
HEALTH_RATIO = 2.0


# -- the file system's price of a new inode ----------------------------------------------

INODE_PROBE = 200  # files and folders made (and removed) per probe
LOKI_INODES = 14  # new inodes of a one-task session's `.loki/` (docs/performance.md)


def inode_cost_us(folder: Path) -> tuple[float, float]:
    """CPU (µs, nearly all of it the kernel's) of one new file and of one new folder in
    `folder`: the mean of `INODE_PROBE` each, by this thread's CPU clock.

    A session's `.loki/` is 14 new inodes, and what one costs depends on the file
    system and on its recent deletions: ext4 without a journal skips inodes freed in
    the last minute(s) when it allocates, so a folder where many files were just
    removed (test suites, earlier runs) makes each create dearer (docs/performance.md,
    "Sessions"). Printed so a run's figures can be read against it.
    """
    probe = Path(tempfile.mkdtemp(prefix="inode-probe-", dir=folder))
    try:
        costs: dict[str, float] = {}
        for kind, make in (
            ("file", lambda path: os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))),
            ("folder", os.mkdir),
        ):
            before = time.thread_time()
            for i in range(INODE_PROBE):
                make(f"{probe}/{kind}{i}")
            costs[kind] = (time.thread_time() - before) / INODE_PROBE * 1e6
        return costs["file"], costs["folder"]
    finally:
        shutil.rmtree(probe, ignore_errors=True)


# -- the temporary folder: fake agents, projects, LOKI_HOME ----------------------------


class Workspace:
    """Everything the benchmark writes, under one temporary folder."""

    def __init__(self, root: Path, *, lines: int, slow_seconds: int) -> None:
        self.root = root
        self.bin = root / "bin"
        self.bin.mkdir()
        self.projects = root / "projects"
        self.projects.mkdir()
        self.quick_agent = root / "agent.sh"
        self.quick_agent.write_text("#!/bin/sh\ncat >/dev/null\necho done\n")
        self.slow_agent = root / "slow.sh"
        fifo = root / "never"  # opened read-write and never written: `read -t` times out
        os.mkfifo(fifo)
        self.slow_agent.write_text(
            "#!/bin/bash\n"
            f"exec 3<>{fifo}\n"
            "while read -r _; do :; done\n"  # the prompt, up to EOF
            f"for ((i = 1; i <= {slow_seconds}; i++)); do\n"
            '  echo "tick $i"\n'
            "  read -r -t 1 -u 3 _\n"
            "done\n"
        )
        self.stream = root / "stream.jsonl"
        _write_stream_json(self.stream, lines)
        self.claude = self.bin / "claude"
        self.claude.write_text(f"#!/bin/sh\nexec cat {self.stream}\n")
        self.claude.chmod(0o755)
        self.prompt = root / "prompt.txt"
        self.prompt.write_text(PROMPT)
        self._projects = 0
        self._homes = 0

    def project(self) -> Path:
        """A new project folder with its PRD; returns the PRD's path."""
        self._projects += 1
        folder = self.projects / f"p{self._projects:05d}"
        folder.mkdir()
        prd = folder / "prd.md"
        prd.write_text(PRD)
        return prd

    def home(self) -> Path:
        self._homes += 1
        home = self.root / f"home{self._homes}"
        home.mkdir()
        return home

    def command_body(self, prd: Path, agent: Path) -> dict[str, Any]:
        shell = "/bin/bash" if agent == self.slow_agent else "/bin/sh"
        return {"prd": str(prd), "provider": "command", "options": {"command": [shell, str(agent)]}}


def _write_stream_json(path: Path, lines: int) -> None:
    """Claude Code's stream-json: init, `lines` assistant texts, a result."""
    session = "5f0c6d3e-1b2a-4c3d-9e8f-0a1b2c3d4e5f"
    with path.open("w") as out:
        out.write(
            json.dumps(
                {
                    "type": "system",
                    "subtype": "init",
                    "session_id": session,
                    "model": "claude-bench",
                    "tools": [],
                }
            )
            + "\n"
        )
        for n in range(lines):
            message = {
                "type": "assistant",
                "message": {
                    "id": f"msg_{n:08d}",
                    "type": "message",
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": f"Line {n}: looking at the next file to change."}
                    ],
                },
                "parent_tool_use_id": None,
                "session_id": session,
            }
            out.write(json.dumps(message) + "\n")
        out.write(
            json.dumps(
                {
                    "type": "result",
                    "subtype": "success",
                    "is_error": False,
                    "duration_ms": 1000,
                    "num_turns": 1,
                    "total_cost_usd": 0.01,
                    "result": "done",
                    "session_id": session,
                    "usage": {"input_tokens": 10, "output_tokens": lines},
                }
            )
            + "\n"
        )


def leftovers(root: Path) -> list[tuple[int, str]]:
    """Live processes whose command line names `root` (our agents and their children)."""
    needle = os.fsencode(root)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline:
            found.append((int(entry.name), cmdline.replace(b"\0", b" ").decode(errors="replace")))
    return found


# -- the daemon and the bare floor ---------------------------------------------------------


def _pin_server(pin: bool) -> Callable[[], None]:
    def pin_to_server_cpu() -> None:
        # Not `len(sched_getaffinity(0)) > 1`: the child inherits the driver's pin to CPU 1.
        if pin:
            os.sched_setaffinity(0, {SERVER_CPU})

    return pin_to_server_cpu


class Daemon:
    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.process = process
        self.pid = process.pid
        self.port = port
        self.log = log

    def rss_kb(self) -> int:
        with open(f"/proc/{self.pid}/statm") as statm:
            return int(statm.read().split()[1]) * PAGE_KB

    def cpu_seconds(self) -> float:
        return _cpu(f"/proc/{self.pid}/stat")

    def main_thread_cpu_seconds(self) -> float:
        """CPU of the trio loop's thread alone (the rest: worker threads, e.g. the store's)."""
        return _cpu(f"/proc/{self.pid}/task/{self.pid}/stat")


class CpuMeter:
    """The daemon's CPU seconds since the meter was made: all threads, and the trio thread's."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.total = daemon.cpu_seconds()
        self.main = daemon.main_thread_cpu_seconds()
        self.wall = time.perf_counter()
        self.profiling = bool(os.environ.get("BENCH_SESSIONS_PROFILE"))
        if self.profiling:  # bench/sessions_daemon.py: profile from here to `close`
            daemon.process.send_signal(sessions_daemon.PROFILE_ON)

    def close(self) -> None:
        if self.profiling:
            self.daemon.process.send_signal(sessions_daemon.PROFILE_OFF)
            self.profiling = False

    def read(self) -> tuple[float, float, float]:
        """(CPU seconds, of which on the trio loop's thread, wall seconds)."""
        return (
            self.daemon.cpu_seconds() - self.total,
            self.daemon.main_thread_cpu_seconds() - self.main,
            time.perf_counter() - self.wall,
        )


def _cpu(path: str) -> float:
    with open(path) as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


@contextlib.contextmanager
def lokid(workspace: Workspace, *, pin: bool, max_agents: int) -> Iterator[Daemon]:
    home = workspace.home()
    env = {
        **os.environ,
        "LOKI_HOME": str(home),
        "LOKI_LOG_LEVEL": "warning",
        "LOKI_MAX_AGENTS": str(max_agents),
        "LOKI_MAX_SESSIONS": str(max(1000, 2 * max_agents)),
        "LOKI_AGENT_GRACE": "2",
        "PATH": f"{workspace.bin}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    for key in ("LOKI_API_PORT", "LOKI_DASHBOARD_PORT", "LOKI_DATA_DIR", "LOKI_SOCKET"):
        env.pop(key, None)
    log = home / "daemon.log"
    # Investigation knobs (bench/sessions_daemon.py) need a launcher; else the real thing.
    module = "bench.sessions_daemon" if sessions_daemon.wanted() else "lokid"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", module, "serve", "--port", "0", "--dashboard-port", "0"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_pin_server(pin),
        )
    try:
        port = _wait_for_port(home / "lokid" / "lokid.sock", process)
        yield Daemon(process, port, log)
    except BaseException:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        print("lokid's log, last lines:\n" + "\n".join(tail), file=sys.stderr)
        raise
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            print("warning: lokid did not exit 90 s after SIGTERM; killed", file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def bare(workspace: Workspace, pin: bool, *args: str) -> dict[str, Any]:
    output = subprocess.run(
        [sys.executable, "-m", "bench.bare_agents", *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        preexec_fn=_pin_server(pin),
        env={**os.environ, "PATH": f"{workspace.bin}{os.pathsep}{os.environ.get('PATH', '')}"},
    ).stdout
    result: dict[str, Any] = json.loads(output)
    return result


# -- HTTP/1.1 on raw trio sockets ------------------------------------------------------------


class Connection:
    """One keep-alive HTTP/1.1 connection (Content-Length answers); reopened when closed."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stream: trio.SocketStream | None = None
        self.buffer = b""

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        payload = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        request = head.encode() + b"\r\n" + payload
        for _attempt in range(3):
            if self.stream is None:
                self.stream = await trio.open_tcp_stream(HOST, self.port)
                self.buffer = b""
            answer = await self._exchange(self.stream, request)
            if answer is None:  # closed by the server before answering: reconnect, resend
                await self.aclose()
                continue
            status, content, close = answer
            if close:
                await self.aclose()
            return status, content
        raise RuntimeError(f"{method} {path}: connection closed three times in a row")

    async def _exchange(
        self, stream: trio.SocketStream, request: bytes
    ) -> tuple[int, bytes, bool] | None:
        try:
            await stream.send_all(request)
        except trio.BrokenResourceError:
            return None
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end >= 0:
                head = self.buffer[:head_end].lower()
                at = head.find(b"content-length:")
                if at < 0:
                    raise RuntimeError(f"answer without Content-Length: {head[:200]!r}")
                stop = head.find(b"\r\n", at)
                length = int(head[at + 15 : stop if stop >= 0 else len(head)])
                end = head_end + 4 + length
                if len(self.buffer) >= end:
                    status = int(self.buffer[9:12])
                    content = self.buffer[head_end + 4 : end]
                    self.buffer = self.buffer[end:]
                    return status, content, b"connection: close" in head
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return None
            if not data:
                return None
            self.buffer += data

    async def aclose(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()
            self.stream = None


class Dechunker:
    """HTTP/1.1 chunked transfer coding -> the body bytes, fed as they arrive."""

    def __init__(self) -> None:
        self.raw = b""
        self.left = 0  # bytes of the current chunk still to come
        self.skip = 0  # bytes of the CRLF after a chunk still to skip
        self.ended = False

    def feed(self, data: bytes) -> bytes:
        self.raw += data
        out = []
        while not self.ended:
            if self.left:
                take = self.raw[: self.left]
                out.append(take)
                self.left -= len(take)
                self.raw = self.raw[len(take) :]
                if self.left:
                    break
                self.skip = 2
            if self.skip:
                n = min(self.skip, len(self.raw))
                self.raw = self.raw[n:]
                self.skip -= n
                if self.skip:
                    break
            end = self.raw.find(b"\r\n")
            if end < 0:
                break
            size = int(self.raw[:end].split(b";")[0], 16)
            self.raw = self.raw[end + 2 :]
            if size == 0:
                self.ended = True
            self.left = size
        return b"".join(out)


async def open_sse(port: int, query: str) -> tuple[trio.SocketStream, Dechunker, bytes]:
    """A subscribed event stream: (stream, its de-chunker, body bytes after `: connected`)."""
    stream = await trio.open_tcp_stream(HOST, port)
    await stream.send_all(
        f"GET /api/events?{query} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
    raw = b""
    while (head_end := raw.find(b"\r\n\r\n")) < 0:
        data = await stream.receive_some(65536)
        if not data:
            raise RuntimeError(f"event stream closed before its head: {raw!r}")
        raw += data
    if not raw.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"event stream answered {raw[:300]!r}")
    dechunker = Dechunker()
    body = dechunker.feed(raw[head_end + 4 :])
    while (at := body.find(b": connected\n\n")) < 0:
        data = await stream.receive_some(65536)
        if not data:
            raise RuntimeError(f"event stream closed before `: connected`: {body!r}")
        body += dechunker.feed(data)
    return stream, dechunker, body[at + len(b": connected\n\n") :]


class Watcher:
    """One SSE stream, every event parsed: arrival times by session and type."""

    def __init__(self, port: int, types: str) -> None:
        self.port = port
        self.types = types
        self.arrivals: dict[str, dict[str, float]] = defaultdict(dict)
        self.counts: Counter[str] = Counter()
        self._changed = trio.Event()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        stream, dechunker, body = await open_sse(self.port, f"types={self.types}")
        task_status.started()
        tail = b""
        async with stream:
            while True:
                now = time.perf_counter()
                buffer = tail + body
                end = buffer.rfind(b"\n\n")
                if end >= 0:
                    tail = buffer[end + 2 :]
                    for line in buffer[:end].split(b"\n"):
                        if line.startswith(b"data: "):
                            envelope = json.loads(line[6:])
                            kind = envelope["type"]
                            self.arrivals[envelope["sessionId"]].setdefault(kind, now)
                            self.counts[kind] += 1
                    self._changed.set()
                    self._changed = trio.Event()
                else:
                    tail = buffer
                if dechunker.ended:
                    raise RuntimeError(f"the event stream ended: {tail!r}")
                data = await stream.receive_some(262144)
                if not data:
                    raise RuntimeError("the event stream was closed")
                body = dechunker.feed(data)

    async def wait_for(self, session_id: str, kinds: tuple[str, ...], timeout: float) -> str:
        """The first of `kinds` seen for the session (waits for it)."""
        with trio.fail_after(timeout):
            while True:
                seen = self.arrivals.get(session_id, {})
                for kind in kinds:
                    if kind in seen:
                        return kind
                await self._changed.wait()

    async def wait_count(self, kind: str, count: int, timeout: float) -> bool:
        with trio.move_on_after(timeout):
            while self.counts[kind] < count:
                await self._changed.wait()
            return True
        return False


async def create(connection: Connection, body: dict[str, Any]) -> str:
    status, content = await connection.request("POST", "/api/sessions", body)
    if status != 201:
        raise RuntimeError(f"POST /api/sessions answered {status}: {content[:300]!r}")
    session_id: str = json.loads(content)["id"]
    return session_id


async def health_probe(port: int, rate: float, seconds: float) -> list[float]:
    """`GET /health` at `rate`/s on one keep-alive connection; latencies in seconds."""
    connection = Connection(port)
    latencies: list[float] = []
    try:
        start = trio.current_time()
        for n in range(max(1, round(rate * seconds))):
            await trio.sleep_until(start + n / rate)
            sent = time.perf_counter()
            status, content = await connection.request("GET", "/health")
            latencies.append(time.perf_counter() - sent)
            if status != 200:
                raise RuntimeError(f"/health answered {status}: {content[:200]!r}")
    finally:
        await connection.aclose()
    return latencies


# -- 1 and 2: session starts ----------------------------------------------------------------

TIMELINE = (
    "phase.started",
    "task.created",
    "phase.completed",
    "session.started",
    "task.started",
    "agent.spawned",
)


async def start_timeline(connection: Connection, session_ids: list[str]) -> dict[str, float]:
    """Median ms from a session's `createdAt` to the first stored event of each TIMELINE type.

    Daemon clock, millisecond timestamps: where a start's time goes, not a measurement.
    """
    offsets: dict[str, list[float]] = defaultdict(list)
    for session_id in session_ids:
        _status, content = await connection.request("GET", f"/api/sessions/{session_id}")
        created = _when(json.loads(content)["createdAt"])
        _status, content = await connection.request(
            "GET", f"/api/events/history?sessionId={session_id}&limit=100"
        )
        seen: set[str] = set()
        for event in json.loads(content)["events"]:
            if event["type"] in TIMELINE and event["type"] not in seen:
                seen.add(event["type"])
                offsets[event["type"]].append((_when(event["timestamp"]) - created) * 1000)
    return {kind: statistics.median(offsets[kind]) for kind in TIMELINE if offsets[kind]}


def _when(iso: str) -> float:
    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


async def measure_starts(
    daemon: Daemon, workspace: Workspace, args: argparse.Namespace
) -> dict[str, Any]:
    result: dict[str, Any] = {}
    watcher = Watcher(daemon.port, "session.started,session.completed,session.failed")
    connection = Connection(daemon.port)
    body = workspace.command_body
    async with trio.open_nursery() as nursery:
        await nursery.start(watcher.run)
        failed: list[str] = []

        async def one(connection: Connection, prd: Path) -> tuple[str, float, float]:
            """Start one session: (id, when the POST was sent, seconds until its answer)."""
            sent = time.perf_counter()
            session_id = await create(connection, body(prd, workspace.quick_agent))
            answered = time.perf_counter() - sent
            await watcher.wait_for(session_id, ("session.started", "session.failed"), 30)
            return session_id, sent, answered

        # Warm-up: first-use costs (imports, caches, the first thread of each pool).
        for _ in range(5):
            session_id, _sent, _answered = await one(connection, workspace.project())
            await watcher.wait_for(session_id, ENDED, 30)

        if "start" in args.measure:
            latencies: list[float] = []
            answers: list[float] = []
            meter = CpuMeter(daemon)
            started_ids: list[str] = []
            for _ in range(args.starts):
                session_id, sent, answered = await one(connection, workspace.project())
                started = watcher.arrivals[session_id].get("session.started")
                if started is None:
                    failed.append(session_id)
                    continue
                started_ids.append(session_id)
                latencies.append(started - sent)
                answers.append(answered)
                if await watcher.wait_for(session_id, ENDED, 30) == "session.failed":
                    failed.append(session_id)
            cpu, main, _wall = meter.read()
            meter.close()
            result["start_cpu_ms_per_session"] = cpu / args.starts * 1000
            result["start_cpu_main_share"] = main / cpu
            result["start_p50_ms"] = percentile(latencies, 50) * 1000
            result["start_p99_ms"] = percentile(latencies, 99) * 1000
            result["start_max_ms"] = max(latencies, default=float("nan")) * 1000
            result["post_p50_ms"] = percentile(answers, 50) * 1000
            result["post_p99_ms"] = percentile(answers, 99) * 1000
            result["start_count"] = len(latencies)
            result["start_timeline_ms"] = await start_timeline(connection, started_ids[-50:])

        if "rate" in args.measure:
            prds = [workspace.project() for _ in range(args.burst)]
            ids: dict[str, float] = {}
            started_before = watcher.counts["session.started"]
            first_sent = time.perf_counter()
            meter = CpuMeter(daemon)

            async def poster(connection: Connection) -> None:
                try:
                    while prds:
                        prd = prds.pop()
                        sent = time.perf_counter()
                        ids[await create(connection, body(prd, workspace.quick_agent))] = sent
                finally:
                    await connection.aclose()

            async with trio.open_nursery() as posters:
                for _ in range(args.concurrency):
                    posters.start_soon(poster, Connection(daemon.port))
            posted = time.perf_counter()
            await watcher.wait_count("session.started", started_before + args.burst, 60)
            starts = [watcher.arrivals[sid].get("session.started") for sid in ids]
            started_at = [t for t in starts if t is not None]
            last = max(started_at, default=float("nan"))
            cpu, main, wall = meter.read()
            result["rate_cpu_busy"] = cpu / wall
            result["rate_cpu_main_share"] = main / cpu
            result["rate_starts_per_s"] = len(started_at) / (last - first_sent)
            result["rate_posts_per_s"] = len(ids) / (posted - first_sent)
            result["rate_started"] = len(started_at)
            lags = [t - ids[sid] for sid, t in zip(ids, starts, strict=True) if t is not None]
            result["rate_start_p50_ms"] = percentile(lags, 50) * 1000
            result["rate_start_p99_ms"] = percentile(lags, 99) * 1000
            for session_id in ids:
                with trio.move_on_after(60):
                    if await watcher.wait_for(session_id, ENDED, 60) == "session.failed":
                        failed.append(session_id)
            result["rate_drain_s"] = time.perf_counter() - first_sent
            cpu, main, wall = meter.read()  # the whole life of the burst's sessions
            meter.close()
            result["rate_cpu_ms_per_session"] = cpu / args.burst * 1000
        result["failed_sessions"] = len(failed)
        await connection.aclose()
        nursery.cancel_scope.cancel()
    return result


# -- 3: agent-output ingest ----------------------------------------------------------------


class FrameCount:
    """One `agent.output` stream that counts frames: when the first and the n-th came."""

    def __init__(self) -> None:
        self.frames = 0
        self.first = 0.0
        self.reached = 0.0
        self.ended_early = False


async def count_frames(
    port: int, counter: FrameCount, expected: int, *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    stream, dechunker, body = await open_sse(port, "types=agent.output")
    task_status.started()
    tail = b""
    async with stream:
        while True:
            now = time.perf_counter()
            buffer = tail + body
            end = buffer.rfind(b"\n\n")
            if end >= 0:
                count = buffer.count(b"data: ", 0, end)
                tail = buffer[end + 2 :]
                if count:
                    if not counter.frames:
                        counter.first = now
                    counter.frames += count
                    if counter.frames >= expected and not counter.reached:
                        counter.reached = now
            else:
                tail = buffer
            if dechunker.ended:
                counter.ended_early = counter.frames < expected
                return
            data = await stream.receive_some(262144)
            if not data:
                counter.ended_early = counter.frames < expected
                return
            body = dechunker.feed(data)


async def measure_ingest(
    daemon: Daemon, workspace: Workspace, args: argparse.Namespace
) -> dict[str, Any]:
    watcher = Watcher(daemon.port, "session.started,session.completed,session.failed")
    connection = Connection(daemon.port)
    counters = [FrameCount() for _ in range(args.subscribers)]
    claude_body = {"prd": str(workspace.project()), "provider": "claude"}
    result: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(watcher.run)
        # Warm-up: one short command session.
        warm = await create(
            connection, workspace.command_body(workspace.project(), workspace.quick_agent)
        )
        await watcher.wait_for(warm, ENDED, 30)
        async with trio.open_nursery() as streams:
            for counter in counters:
                await streams.start(count_frames, daemon.port, counter, args.lines)
            meter = CpuMeter(daemon)
            sent = time.perf_counter()
            session_id = await create(connection, claude_body)
            ended = await watcher.wait_for(session_id, ENDED, 300)
            with trio.move_on_after(30):
                while not all(c.reached or c.ended_early for c in counters):  # noqa: ASYNC110
                    await trio.sleep(0.01)
            cpu, main, wall = meter.read()
            meter.close()
            streams.cancel_scope.cancel()
        first = min((c.first for c in counters if c.frames), default=float("nan"))
        complete = all(c.reached for c in counters)
        last = max(c.reached for c in counters) if complete else float("nan")
        result["ingest_lines_per_s"] = args.lines / (last - first)
        result["ingest_seconds"] = last - first
        result["ingest_post_to_last_s"] = last - sent
        result["ingest_session"] = ended
        result["ingest_delivered"] = [c.frames for c in counters]
        result["ingest_streams_cut"] = sum(c.ended_early for c in counters)
        result["ingest_cpu_us_per_line"] = cpu / args.lines * 1e6
        result["ingest_cpu_busy"] = cpu / wall
        result["ingest_cpu_main_share"] = main / cpu
        await connection.aclose()
        nursery.cancel_scope.cancel()
    return result


# -- 4: many slow sessions ----------------------------------------------------------------


async def agents_active(port: int) -> int:
    connection = Connection(port)
    try:
        status, content = await connection.request("GET", "/api/status")
    finally:
        await connection.aclose()
    if status != 200:
        raise RuntimeError(f"/api/status answered {status}")
    active: int = json.loads(content)["agents"]["active"]
    return active


async def measure_concurrent(
    daemon: Daemon, workspace: Workspace, args: argparse.Namespace
) -> dict[str, Any]:
    watcher = Watcher(daemon.port, "session.started,agent.spawned,session.completed,session.failed")
    connection = Connection(daemon.port)
    result: dict[str, Any] = {"sessions": args.sessions}
    async with trio.open_nursery() as nursery:
        await nursery.start(watcher.run)
        for _ in range(3):  # warm-up
            warm = await create(
                connection, workspace.command_body(workspace.project(), workspace.quick_agent)
            )
            await watcher.wait_for(warm, ENDED, 30)
        await connection.aclose()
        await trio.sleep(1.0)

        rss_idle = daemon.rss_kb()
        cpu_before = daemon.cpu_seconds()
        clock = time.perf_counter()
        idle_health = await health_probe(daemon.port, args.health_rate, args.idle_seconds)
        result["cpu_idle"] = (daemon.cpu_seconds() - cpu_before) / (time.perf_counter() - clock)
        result["rss_idle_kb"] = rss_idle
        result["health_idle_p50_ms"] = percentile(idle_health, 50) * 1000
        result["health_idle_p99_ms"] = percentile(idle_health, 99) * 1000

        prds = [workspace.project() for _ in range(args.sessions)]
        spawned_before = watcher.counts["agent.spawned"]
        first_sent = time.perf_counter()

        async def poster(connection: Connection) -> None:
            try:
                while prds:
                    await create(
                        connection, workspace.command_body(prds.pop(), workspace.slow_agent)
                    )
            finally:
                await connection.aclose()

        async with trio.open_nursery() as posters:
            for _ in range(args.concurrency):
                posters.start_soon(poster, Connection(daemon.port))
        all_running = await watcher.wait_count(
            "agent.spawned", spawned_before + args.sessions, args.slow_seconds
        )
        running_at = time.perf_counter()
        result["start_all_s"] = running_at - first_sent
        result["all_running"] = all_running
        await trio.sleep(1.0)
        # The first agents end `slow_seconds` after their start; stay 2 s clear of that.
        window = min(args.window, first_sent + args.slow_seconds - 2 - time.perf_counter())
        result["window_s"] = window
        if window < 1:
            raise RuntimeError(
                f"starting {args.sessions} sessions took {result['start_all_s']:.1f} s: no time "
                f"left to measure before the agents end; raise --slow-seconds"
            )
        meter = CpuMeter(daemon)
        loaded_health = await health_probe(daemon.port, args.health_rate, window)
        cpu, main, wall = meter.read()
        meter.close()
        result["cpu_loaded"] = cpu / wall
        result["cpu_loaded_main_share"] = main / cpu
        result["rss_loaded_kb"] = daemon.rss_kb()
        result["agents_active"] = await agents_active(daemon.port)
        result["health_load_p50_ms"] = percentile(loaded_health, 50) * 1000
        result["health_load_p99_ms"] = percentile(loaded_health, 99) * 1000
        result["kb_per_session"] = (result["rss_loaded_kb"] - rss_idle) / args.sessions
        result["cpu_ms_per_session_s"] = (
            (result["cpu_loaded"] - result["cpu_idle"]) / args.sessions * 1000
        )
        result["ended_early"] = sum(
            1 for kinds in watcher.arrivals.values() if "session.failed" in kinds
        )
        nursery.cancel_scope.cancel()
    return result


# -- the run and the table ------------------------------------------------------------------


def run(workspace: Workspace, args: argparse.Namespace) -> dict[str, Any]:
    pin = TWO_CPUS and not args.pin_off
    results: dict[str, Any] = {}
    agent = ["/bin/sh", str(workspace.quick_agent)]
    stdin = str(workspace.prompt)

    def checked(label: str) -> None:
        left = leftovers(workspace.root)
        results.setdefault("leftovers", {})[label] = [cmd for _, cmd in left]
        for pid, _ in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    if {"start", "rate"} & set(args.measure):
        serial = bare(workspace, pin, "spawn", str(args.starts), "1", stdin, "--", *agent)
        results["bare_spawn_p50_ms"] = percentile(serial["latencies"], 50) * 1000
        results["bare_spawn_p99_ms"] = percentile(serial["latencies"], 99) * 1000
        burst = bare(
            workspace, pin, "spawn", str(args.burst), str(args.concurrency), stdin, "--", *agent
        )
        results["bare_spawns_per_s"] = args.burst / burst["seconds"]
        checked("bare spawns")
        with lokid(workspace, pin=pin, max_agents=max(600, args.burst)) as daemon:
            results.update(trio.run(measure_starts, daemon, workspace, args))
        checked("start/rate daemon")
        _progress(args, "starts", results)
    if "ingest" in args.measure:
        piped = bare(workspace, pin, "pipe", "--", str(workspace.claude))
        results["bare_read_lines_per_s"] = piped["read"]["lines"] / piped["read"]["seconds"]
        results["bare_parse_lines_per_s"] = piped["parse"]["lines"] / piped["parse"]["seconds"]
        with lokid(workspace, pin=pin, max_agents=10) as daemon:
            results.update(trio.run(measure_ingest, daemon, workspace, args))
        checked("ingest daemon")
        _progress(args, "ingest", results)
    if "concurrent" in args.measure:
        with lokid(workspace, pin=pin, max_agents=max(600, args.sessions + 10)) as daemon:
            results["concurrent"] = trio.run(measure_concurrent, daemon, workspace, args)
            stopping = time.perf_counter()
            CpuMeter(daemon)  # with BENCH_SESSIONS_PROFILE: profile the shutdown too
            daemon.process.send_signal(signal.SIGTERM)
            daemon.process.wait(timeout=90)
            results["concurrent"]["shutdown_s"] = time.perf_counter() - stopping
        checked("concurrent daemon")
        _progress(args, "concurrent", results)
    return results


def _progress(args: argparse.Namespace, label: str, results: dict[str, Any]) -> None:
    if not args.json:
        print(f"{label} done", file=sys.stderr)


def rows(results: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """(label, lokid, floor, ratio, goal, met) for the table."""
    out: list[dict[str, Any]] = []

    def row(label: str, value: float, floor: float | None, goal: str, met: bool | None) -> None:
        out.append(
            {
                "label": label,
                "lokid": value,
                "floor": floor,
                "ratio": value / floor if floor else None,
                "goal": goal,
                "met": met,
            }
        )

    if "start_p99_ms" in results:
        row(
            "start: POST -> session.started p99 ms",
            results["start_p99_ms"],
            results["bare_spawn_p99_ms"],
            f"<= {START_P99_MS:g} ms",
            results["start_p99_ms"] <= START_P99_MS,
        )
        row(
            "start: POST -> session.started p50 ms",
            results["start_p50_ms"],
            results["bare_spawn_p50_ms"],
            "",
            None,
        )
        row("start: POST answered p99 ms", results["post_p99_ms"], None, "", None)
        row("start: daemon CPU ms per session", results["start_cpu_ms_per_session"], None, "", None)
    if "rate_starts_per_s" in results:
        row(
            f"rate: starts/s, {args.burst} over {args.concurrency} conns",
            results["rate_starts_per_s"],
            results["bare_spawns_per_s"],
            f">= {STARTS_PER_S:g}/s",
            results["rate_starts_per_s"] >= STARTS_PER_S,
        )
        row("rate: POST -> session.started p99 ms", results["rate_start_p99_ms"], None, "", None)
        row("rate: daemon CPU ms per session", results["rate_cpu_ms_per_session"], None, "", None)
    if "ingest_lines_per_s" in results:
        row(
            f"ingest: lines/s to {args.subscribers} streams",
            results["ingest_lines_per_s"],
            results["bare_parse_lines_per_s"],
            f">= {LINES_PER_S:,.0f}/s",
            results["ingest_lines_per_s"] >= LINES_PER_S and not results["ingest_streams_cut"],
        )
        row(
            "ingest: pipe read only, lines/s (floor)",
            results["bare_read_lines_per_s"],
            None,
            "",
            None,
        )
        row("ingest: daemon CPU us per line", results["ingest_cpu_us_per_line"], None, "", None)
    if "concurrent" in results:
        c = results["concurrent"]
        n = c["sessions"]
        row(
            f"{n} sessions: /health p99 ms (vs idle)",
            c["health_load_p99_ms"],
            c["health_idle_p99_ms"],
            f"ratio <= {HEALTH_RATIO:g}",
            c["health_load_p99_ms"] <= HEALTH_RATIO * c["health_idle_p99_ms"]
            and c["agents_active"] >= n,
        )
        row(
            f"{n} sessions: daemon CPU % of a core (vs idle)",
            c["cpu_loaded"] * 100,
            c["cpu_idle"] * 100,
            "",
            None,
        )
        row(f"{n} sessions: CPU ms/s per session", c["cpu_ms_per_session_s"], None, "", None)
        row(
            f"{n} sessions: RSS MB (vs idle)",
            c["rss_loaded_kb"] / 1024,
            c["rss_idle_kb"] / 1024,
            "",
            None,
        )
        row(f"{n} sessions: RSS KB per session", c["kb_per_session"], None, "", None)
        row(f"{n} sessions: started/s (to agent.spawned)", n / c["start_all_s"], None, "", None)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench sessions", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller counts (about 30 s)")
    parser.add_argument(
        "--measure",
        nargs="+",
        choices=("start", "rate", "ingest", "concurrent"),
        default=["start", "rate", "ingest", "concurrent"],
        metavar="M",
    )
    parser.add_argument("--starts", type=int, default=200, help="sequential starts")
    parser.add_argument("--burst", type=int, default=400, help="sessions POSTed for the rate")
    parser.add_argument("--concurrency", type=int, default=32, help="POST connections")
    parser.add_argument("--lines", type=int, default=50_000, help="assistant lines to ingest")
    parser.add_argument("--subscribers", type=int, default=10)
    parser.add_argument("--sessions", type=int, default=500, help="slow concurrent sessions")
    parser.add_argument("--slow-seconds", type=int, default=30, help="how long a slow agent runs")
    parser.add_argument("--window", type=float, default=10.0, help="seconds measured under load")
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=None,
        help="idle /health probing (default: --window, so both p99s come from as many probes)",
    )
    parser.add_argument("--health-rate", type=float, default=100.0, help="/health req/s")
    parser.add_argument("--no-pin", dest="pin_off", action="store_true", help="no CPU pinning")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    if args.idle_seconds is None:
        args.idle_seconds = args.window
    raise_fd_limit()
    if TWO_CPUS and not args.pin_off:
        os.sched_setaffinity(0, {DRIVER_CPU})

    root = Path(tempfile.mkdtemp(prefix="lokid-bench-sessions-"))
    try:
        workspace = Workspace(root, lines=args.lines, slow_seconds=args.slow_seconds)
        inodes_before = inode_cost_us(workspace.projects)
        started = time.perf_counter()
        results = run(workspace, args)
        results["total_s"] = time.perf_counter() - started
        results["inode_us"] = {"before": inodes_before, "after": inode_cost_us(workspace.projects)}
        results["file_system"] = mount_of(root)
    finally:
        left = leftovers(root)
        for pid, _ in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)
    table = rows(results, args)
    if args.json:
        print(json.dumps({"args": vars(args), "rows": table, "results": results}, indent=2))
    else:
        report(results, table, args)
    return 0


def report(results: dict[str, Any], table: list[dict[str, Any]], args: argparse.Namespace) -> None:
    pinned = TWO_CPUS and not args.pin_off
    where = "daemon and agents on CPU 0, driver on CPU 1" if pinned else "not pinned"
    print(
        f"sessions: lokid vs the same agents without a daemon ({where}); {results['total_s']:.0f} s"
    )
    print(f"{'':<46} {'lokid':>10} {'floor':>10} {'ratio':>7}  goal")
    for r in table:
        verdict = "" if r["met"] is None else ("PASS" if r["met"] else "FAIL")
        floor = "" if r["floor"] is None else _fmt(r["floor"])
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        print(
            f"{r['label']:<46} {_fmt(r['lokid']):>10} {floor:>10} {ratio:>7}  "
            f"{r['goal']} {verdict}".rstrip()
        )
    point, device, kind = results["file_system"]
    (file_before, folder_before), (file_after, folder_after) = (
        results["inode_us"]["before"],
        results["inode_us"]["after"],
    )
    notes = [
        f"projects on {kind} {device} (mounted at {point}): a new file costs "
        f"{file_before:.0f} µs of CPU there before the runs and {file_after:.0f} after, "
        f"a new folder {folder_before:.0f} / {folder_after:.0f} µs "
        f"(a session's .loki/ makes {LOKI_INODES}; tmpfs ~10 µs each)"
    ]
    if timeline := results.get("start_timeline_ms"):
        notes.append(
            "a start, median ms after the session row's createdAt: "
            + ", ".join(f"{kind} {ms:.0f}" for kind, ms in timeline.items())
        )
    c = results.get("concurrent", {})
    shares = [
        (label, results.get(key) if key in results else c.get(key))
        for label, key in (
            ("sequential starts", "start_cpu_main_share"),
            ("start burst", "rate_cpu_main_share"),
            ("ingest", "ingest_cpu_main_share"),
            (f"{c.get('sessions')} sessions", "cpu_loaded_main_share"),
        )
    ]
    if any(share is not None for _, share in shares):
        notes.append(
            "share of the daemon's CPU on its trio thread (the rest: worker threads): "
            + ", ".join(f"{label} {share:.0%}" for label, share in shares if share is not None)
        )
    if results.get("failed_sessions"):
        notes.append(f"{results['failed_sessions']} start sessions failed")
    if results.get("ingest_streams_cut"):
        notes.append(f"{results['ingest_streams_cut']} ingest streams were cut off as slow")
    if "ingest_session" in results and results["ingest_session"] != "session.completed":
        notes.append(f"the ingest session ended {results['ingest_session']}")
    if c:
        if c["agents_active"] < c["sessions"]:
            notes.append(f"only {c['agents_active']} of {c['sessions']} agents were running")
        if c["window_s"] < args.window:
            notes.append(f"the load window was cut to {c['window_s']:.1f} s")
        notes.append(f"shutdown with {c['sessions']} running agents took {c['shutdown_s']:.1f} s")
    left_over = {k: v for k, v in results.get("leftovers", {}).items() if v}
    notes.append(
        "no agent process left after any daemon"
        if not left_over
        else f"LEFT OVER (killed): {left_over}"
    )
    if sessions_daemon.wanted():
        knobs = [k for k in sessions_daemon.KNOBS if os.environ.get(k)]
        notes.append(f"investigation knobs set ({', '.join(knobs)}): not lokid's own figures")
    for note in notes:
        print(f"note: {note}")
