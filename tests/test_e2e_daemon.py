"""End to end: `loki serve` as a real subprocess, spoken to over TCP and the Unix socket."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import sqlite3
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from lokid.daemon import HURRY_SECONDS
from lokid.process import identity

from . import fake_agent
from .daemon_proc import DaemonProcess, group_members, run_cli, wait_until

pytestmark = pytest.mark.e2e

Factory = Callable[..., DaemonProcess]


def test_health_and_status_on_every_listener(daemon: DaemonProcess) -> None:
    for base in (daemon.api_url, daemon.dashboard_url):
        health = httpx.get(f"{base}/health", timeout=5)
        assert health.status_code == 200
        assert health.json()["status"] == "healthy"
        assert health.json()["timestamp"].endswith("Z")
        assert httpx.get(f"{base}/health/ready", timeout=5).json() == {"ready": True}
        assert httpx.get(f"{base}/health/live", timeout=5).json()["alive"] is True
        status = httpx.get(f"{base}/api/status", timeout=5).json()
        assert status["status"] == "idle"
        assert status["session"] is None
        assert status["agents"] == {"active": 0, "total": 10}
        assert status["provider"] == "claude"
    with daemon.control() as client:
        assert client.get("/health").json()["status"] == "healthy"
        assert client.get("/dashboard/health").json()["status"] == "healthy"
        assert (
            client.get("/dashboard/openapi.json").json()["info"]["title"] == "lokid Dashboard API"
        )


def test_status_shows_the_supervisor_tree(daemon: DaemonProcess) -> None:
    status = httpx.get(f"{daemon.api_url}/api/status", timeout=5).json()
    tree = status["supervisor"]
    assert tree["name"] == "lokid"
    assert [c["id"] for c in tree["children"]] == [
        "store",
        "audit_writer",
        "event_bus",
        "agent_pool",
        "sessions",
        "optional",
        "listeners",
    ]
    store = tree["children"][0]
    assert store["running"] is True
    assert store["detail"]["mailboxSize"] > 0
    optional = tree["children"][5]["detail"]
    assert [c["id"] for c in optional["children"]] == ["registry"]
    assert optional["backoff"]["down"] is False
    listeners = tree["children"][-1]["detail"]
    assert [c["id"] for c in listeners["children"]] == ["api", "dashboard", "control"]


def test_unknown_route_and_method_use_the_error_body(daemon: DaemonProcess) -> None:
    missing = httpx.get(f"{daemon.api_url}/api/nothing", timeout=5)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "NOT_FOUND"
    wrong = httpx.post(f"{daemon.api_url}/health", timeout=5)
    assert wrong.status_code == 405
    assert wrong.json()["error"]["code"] == "METHOD_NOT_ALLOWED"


def test_openapi_lists_every_route(daemon: DaemonProcess) -> None:
    doc = httpx.get(f"{daemon.api_url}/openapi.json", timeout=5).json()
    assert {"/health", "/health/ready", "/health/live", "/api/status", "/openapi.json"} <= set(
        doc["paths"]
    )


def test_control_socket_is_private(daemon: DaemonProcess) -> None:
    mode = daemon.socket.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(daemon.socket.parent.stat().st_mode) == 0o700


def test_a_data_dir_others_could_enter_is_made_0700_at_start(
    daemon_factory: Factory, tmp_path: Path
) -> None:
    """DESIGN.md §2: the control socket is "mode 0600 in a 0700 folder". A data dir that
    existed with mode 0755 (say, restored with `cp -r`) was kept so, and with it the
    database, 0644, was readable by every local user."""
    data = tmp_path / "home" / "lokid"
    data.mkdir(parents=True)
    data.chmod(0o755)
    daemon = daemon_factory().start()
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o600
    code, err = daemon.terminate()
    assert code == 0
    assert f"the data dir {data} had mode 0755" in err
    assert "made it 0700" in err


def test_a_used_data_dir_made_loose_is_made_0700_not_refused(
    daemon_factory: Factory, tmp_path: Path
) -> None:
    """Regression: a data dir a daemon has run in holds what that daemon made there (its
    agents' held-marker folder among them). Restored with mode 0755, the next start
    called that folder "files that are not lokid's" and refused to start, so the
    restore the 0700 rule was written for could not start at all."""
    first = daemon_factory().start()
    assert first.terminate()[0] == 0
    data = first.data
    made = sorted(p.name for p in data.iterdir())
    assert all(name.startswith("lokid") for name in made), made
    data.chmod(0o755)
    second = daemon_factory().start()
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    code, err = second.terminate()
    assert code == 0, err
    assert f"the data dir {data} had mode 0755" in err


def test_a_data_dir_holding_other_files_is_refused_and_left_alone(
    daemon_factory: Factory, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    (home / "notes.txt").write_text("mine")
    daemon = daemon_factory(extra_env={"LOKI_DATA_DIR": str(home)}).start(wait=False)
    assert daemon.process is not None
    _, err = daemon.process.communicate(timeout=20)
    assert daemon.process.returncode == 1
    assert "holds files that are not lokid's ('notes.txt')" in err.decode()
    assert "Traceback" not in err.decode()
    assert stat.S_IMODE(home.stat().st_mode) == 0o755
    assert sorted(p.name for p in home.iterdir()) == ["notes.txt"]


def test_control_socket_connections_whose_client_hung_up_are_let_go(
    daemon: DaemonProcess,
) -> None:
    """Hypercorn held each for its keep-alive timeout (75 s): 4,000 clients that send a
    request and hang up without reading filled the socket's connection slots."""
    for _ in range(10):
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(daemon.socket))
            client.sendall(b"GET /health HTTP/1.1\r\nHost: l\r\n\r\n")
    metric = 'lokid_listener_connections{listener="control"} '

    def only_the_asking_one() -> bool:
        with daemon.control() as owner:
            lines = owner.get("/metrics").text.splitlines()
        return [line for line in lines if line.startswith(metric)] == [metric + "1.0"]

    wait_until(only_the_asking_one, "the hung-up connections let go", timeout=5)


def test_second_daemon_on_the_same_socket_is_refused_and_the_folder_kept(
    daemon_factory: Factory, tmp_path: Path
) -> None:
    """Regression: another data dir with the same LOKI_SOCKET took the first daemon's
    socket over (and removed it on exit); the socket's shared folder was chmod-ed 0700."""
    shared = tmp_path / "s"
    shared.mkdir()
    shared.chmod(0o1777)
    path = shared / "l.sock"
    first = daemon_factory(tmp_path / "a", extra_env={"LOKI_SOCKET": str(path)})
    first.socket = path
    first.start()
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    second = daemon_factory(tmp_path / "b", extra_env={"LOKI_SOCKET": str(path)}).start(wait=False)
    assert second.process is not None
    _, err = second.process.communicate(timeout=20)
    assert second.process.returncode == 1
    assert first.process is not None
    assert (
        f"another lokid (pid {first.process.pid}) serves or is starting on the control socket "
        f"{path} (it holds {path}.lock)"
    ) in err.decode()
    assert "Traceback" not in err.decode()
    with first.control() as client:
        assert client.get("/api/status").json()["pid"] == first.process.pid
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777


def test_a_daemon_whose_data_dir_was_removed_leaves_the_next_daemons_socket(
    daemon_factory: Factory, tmp_path: Path
) -> None:
    """`rm -rf $LOKI_HOME/lokid` under a daemon, a second daemon on the same home, then
    SIGTERM to the first: it removed the second's `lokid.sock` by name. And the first's
    /health said healthy while every write it acknowledged was to be lost."""
    home = tmp_path / "home"
    first = daemon_factory(home).start()
    shutil.rmtree(home / "lokid")
    # Its writes still succeed, into an unlinked file: /health says they are lost at exit.
    health = httpx.get(f"{first.api_url}/health", timeout=5)
    assert health.status_code == 503, health.text
    assert health.json()["details"]["store"] == (
        f"the database {home / 'lokid' / 'lokid.db'} was removed: "
        "what is written now is lost at exit"
    )
    second = daemon_factory(home).start()
    inode = second.socket.lstat().st_ino
    code, err = first.terminate()
    assert code == 0, err
    assert "is no longer the socket this daemon bound (another daemon's?): left in place" in err
    assert second.socket.lstat().st_ino == inode
    assert second.process is not None
    with second.control() as client:
        assert client.get("/api/status").json()["pid"] == second.process.pid
    code, err = second.terminate()
    assert code == 0, err
    assert not second.socket.exists()  # its own socket: removed as before


def test_serve_is_refused_while_another_start_holds_the_socket_path(
    daemon_factory: Factory, tmp_path: Path
) -> None:
    """The test holds `<socket>.lock` as a daemon in the middle of its start would: a
    stale socket file there, nobody listening yet. `loki serve` must not take the path."""
    path = tmp_path / "s" / "l.sock"
    path.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    inode = path.lstat().st_ino
    me = identity()
    assert me is not None
    with open(path.with_name("l.sock.lock"), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write(me.render() + "\n")
        held.flush()
        second = daemon_factory(tmp_path / "b", extra_env={"LOKI_SOCKET": str(path)})
        second.start(wait=False)
        assert second.process is not None
        _, err = second.process.communicate(timeout=20)
    assert second.process.returncode == 1, err.decode()
    assert (
        f"lokid: another lokid (pid {me.pid}) serves or is starting on the control socket "
        f"{path} (it holds {path}.lock); stop it, or choose another socket path "
        "(--socket, LOKI_SOCKET)\n"
    ) == err.decode()
    assert path.lstat().st_ino == inode  # the holder's path is not touched


def test_two_daemons_started_at_once_on_one_socket_one_serves(
    daemon_factory: Factory, tmp_path: Path
) -> None:
    """Regression: "nobody listens, unlink, bind" was not atomic: two daemons (two data
    dirs) started together could both find the path free, and the second took it from
    the first. Now exactly one serves; the other exits 1 and leaves its files alone."""
    path = tmp_path / "s" / "l.sock"
    env = {"LOKI_SOCKET": str(path)}
    pair = [daemon_factory(tmp_path / name, extra_env=env) for name in ("a", "b")]
    for daemon in pair:
        daemon.socket = path
        daemon.start(wait=False)
    processes = [daemon.process for daemon in pair if daemon.process is not None]
    assert len(processes) == 2
    wait_until(lambda: any(p.poll() is not None for p in processes), "one of the two exits")
    loser, winner = sorted(pair, key=lambda d: d.process.poll() is None)  # type: ignore[union-attr]
    assert loser.process is not None and winner.process is not None
    _, err = loser.process.communicate(timeout=20)
    assert loser.process.returncode == 1, err.decode()
    # The winner may not have recorded its pid yet when the loser read the lock file.
    message = err.decode().replace(f" (pid {winner.process.pid})", "")
    assert f"another lokid serves or is starting on the control socket {path} " in message
    assert "Traceback" not in message
    assert winner.wait_ready()["pid"] == winner.process.pid
    with winner.control() as client:
        assert client.get("/api/status").json()["pid"] == winner.process.pid
    code, err_text = winner.terminate()
    assert code == 0, err_text
    assert not path.exists()  # removed by the one that served it
    assert stat.S_IMODE(path.with_name("l.sock.lock").stat().st_mode) == 0o600  # left in place


def test_second_daemon_on_same_data_dir_exits_with_message(
    daemon: DaemonProcess, daemon_factory: Factory
) -> None:
    second = daemon_factory(daemon.home).start(wait=False)
    assert second.process is not None
    _, err = second.process.communicate(timeout=20)
    assert second.process.returncode == 1
    assert "already running" in err.decode()
    assert f"pid {daemon.process.pid}" in err.decode()  # type: ignore[union-attr]
    assert "Traceback" not in err.decode()
    # The first one is unharmed.
    assert httpx.get(f"{daemon.api_url}/health", timeout=5).status_code == 200


def test_sigterm_under_load_exits_zero_and_leaves_no_process(daemon: DaemonProcess) -> None:
    assert daemon.process is not None
    stop = threading.Event()
    answered = [0]

    def hammer() -> None:
        with httpx.Client(timeout=5) as client:
            while not stop.is_set():
                try:
                    client.get(f"{daemon.api_url}/health")
                    answered[0] += 1
                except httpx.TransportError:
                    return

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while answered[0] < 200 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert answered[0] >= 200
    started = time.monotonic()
    code, err = daemon.terminate()
    stop.set()
    for thread in threads:
        thread.join(timeout=10)
    assert code == 0, err
    assert time.monotonic() - started < 10.0
    assert group_members(daemon.process.pid) == []
    assert not daemon.socket.exists()
    assert not (daemon.data / "lokid.pid").exists()


@pytest.mark.parametrize(
    ("args", "signals", "bound"),
    [
        # agent_grace 20 s > shutdown_grace 1 s: the grace runs out, the agent gets SIGKILL
        pytest.param(("--shutdown-grace", "1"), (signal.SIGTERM,), 1.0, id="grace-runs-out"),
        # shutdown_grace 10 s: a second signal 0.5 s later kills the agent at once
        pytest.param((), (signal.SIGTERM, signal.SIGTERM), 0.5, id="second-sigterm"),
        pytest.param((), (signal.SIGINT, signal.SIGINT), 0.5, id="second-sigint"),
    ],
)
def test_a_stop_is_bounded_and_leaves_no_agent_that_ignores_sigterm(
    daemon_factory: Factory,
    tmp_path: Path,
    args: tuple[str, ...],
    signals: tuple[signal.Signals, ...],
    bound: float,
) -> None:
    """docs/operations.md: exit 0 within `shutdown_grace` (or the second signal) plus
    `HURRY_SECONDS`; every agent process group killed, its row closed by this stop."""
    bin_dir = tmp_path / "bin"
    fake_agent.install(bin_dir, ("claude",))
    pid_file = tmp_path / "agent.pids"
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_AGENT_PID_FILE": str(pid_file),
        "FAKE_AGENT_LIFETIME": "60",
        "LOKI_AGENT_GRACE": "20",
    }
    daemon = daemon_factory(extra_env=env).start(*args)
    assert daemon.process is not None
    project = tmp_path / "project"
    project.mkdir()
    body = {
        "prdText": "# Todo\n\n## Features\n- Add a todo item [mode:ignore-term]\n",
        "projectDir": str(project),
        "provider": "claude",
    }
    created = httpx.post(f"{daemon.api_url}/api/sessions", json=body, timeout=10)
    assert created.status_code == 201, created.text
    wait_until(lambda: len(pid_file.read_text().split()) == 2 if pid_file.exists() else 0, "agent")
    agent, grandchild = (int(pid) for pid in pid_file.read_text().split())
    try:
        started = time.monotonic()
        daemon.process.send_signal(signals[0])
        for signum in signals[1:]:
            time.sleep(0.5)
            daemon.process.send_signal(signum)
        _, err = daemon.process.communicate(timeout=30)
        elapsed = time.monotonic() - started
        assert daemon.process.returncode == 0, err.decode()
        assert elapsed < bound + HURRY_SECONDS, err.decode()
        assert group_members(agent) == []
        assert not any(_alive(pid) for pid in (agent, grandchild))
    finally:
        for pid in (agent, grandchild):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    with sqlite3.connect(daemon.data / "lokid.db") as db:
        rows = db.execute("SELECT pid, ended_at, exit_code, end_reason FROM agents").fetchall()
    assert [(pid, exit_code, reason) for pid, _, exit_code, reason in rows] == [
        (agent, -signal.SIGKILL, "stopped")
    ]
    assert rows[0][1] is not None
    assert "could not close" not in err.decode()


def test_sigint_is_a_graceful_stop_too(daemon: DaemonProcess) -> None:
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGINT)
    assert daemon.process.wait(timeout=20) == 0


def test_dashboard_port_taken_moves_to_the_next_free_port(daemon_factory: Factory) -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = blocker.getsockname()[1]
    try:
        daemon = daemon_factory()
        assert daemon.process is None
        argv_env = {**daemon.env}
        daemon.env = argv_env
        daemon.start("--dashboard-port", str(taken))
        port = int(daemon.dashboard_url.rsplit(":", 1)[1])
        assert port > taken
        assert port <= taken + 100
        assert httpx.get(f"{daemon.dashboard_url}/health", timeout=5).status_code == 200
    finally:
        blocker.close()


def test_api_port_taken_is_a_clear_error(daemon_factory: Factory) -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    try:
        proc = daemon_factory().start("--port", str(blocker.getsockname()[1]), wait=False)
        assert proc.process is not None
        _, err = proc.process.communicate(timeout=20)
        assert proc.process.returncode == 1
        assert "the port is in use" in err.decode()
        assert "Traceback" not in err.decode()
    finally:
        blocker.close()


def test_non_loopback_without_auth_is_refused(daemon_factory: Factory) -> None:
    proc = daemon_factory().start("--host", "0.0.0.0", wait=False)
    assert proc.process is not None
    _, err = proc.process.communicate(timeout=20)
    assert proc.process.returncode == 1
    assert "refusing to serve the HTTP API on http://0.0.0.0" in err.decode()
    assert "--allow-insecure-remote" in err.decode()


@pytest.mark.parametrize(
    ("variable", "value"),
    [("LOKI_EVENT_RETENTION_DAYS", "1000000"), ("LOKI_EVENT_RETENTION_COUNT", "9" * 20)],
)
def test_retention_beyond_its_bound_is_a_config_error(
    daemon_factory: Factory, variable: str, value: str
) -> None:
    """Regression: these crashed the event bus at start (exit 1 after 31 s, or after `ready`)."""
    proc = daemon_factory(extra_env={variable: value}).start(wait=False)
    assert proc.process is not None
    _, err = proc.process.communicate(timeout=20)
    assert proc.process.returncode == 2
    assert f"from env {variable}: {value} is above the maximum" in err.decode()
    assert "Traceback" not in err.decode()


def test_corrupt_database_is_a_clear_error(daemon_factory: Factory, tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "lokid").mkdir(parents=True)
    (home / "lokid" / "lokid.db").write_bytes(b"this is not a database" * 100)
    proc = daemon_factory(home).start(wait=False)
    assert proc.process is not None
    _, err = proc.process.communicate(timeout=20)
    assert proc.process.returncode == 1
    text = err.decode()
    assert "lokid.db" in text
    assert "Traceback" not in text
    assert not (home / "lokid" / "lokid.sock").exists()


def test_sd_notify_ready_watchdog_stopping(daemon_factory: Factory, tmp_path: Path) -> None:
    notify_path = tmp_path / "notify"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(notify_path))
    server.settimeout(10)
    try:
        daemon = daemon_factory(
            extra_env={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "200000"}
        ).start()
        messages: list[str] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sum("WATCHDOG=1" in m for m in messages) < 3:
            messages.append(server.recv(4096).decode())
        ready = [m for m in messages if "READY=1" in m]
        assert len(ready) == 1
        assert "STATUS=serving api http://127.0.0.1:" in ready[0]
        assert messages.index(ready[0]) > 0  # STATUS=starting came first
        assert messages[0] == "STATUS=starting"
        assert sum("WATCHDOG=1" in m for m in messages) >= 3
        code, _ = daemon.terminate()
        assert code == 0
        rest = []
        while True:
            try:
                rest.append(server.recv(4096).decode())
            except TimeoutError:
                break
            if any("STOPPING=1" in m for m in rest):
                break
        assert any(m.startswith("STOPPING=1") for m in rest)
    finally:
        server.close()


ACTIVATE = """
import os, sys
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, "-m", "lokid", "serve"])
"""


def test_socket_activation_uses_inherited_fds(daemon_factory: Factory, tmp_path: Path) -> None:
    api = socket.socket()
    api.bind(("127.0.0.1", 0))
    api.listen()
    dash = socket.socket()
    dash.bind(("127.0.0.1", 0))
    dash.listen()
    control_path = tmp_path / "sock" / "ctl.sock"
    control_path.parent.mkdir(mode=0o700)
    control = socket.socket(socket.AF_UNIX)
    control.bind(str(control_path))
    control.listen()
    fds = (api.fileno(), dash.fileno(), control.fileno())

    def place_fds() -> None:
        # In the child, between fork and exec: put the sockets at 3, 4, 5.
        copies = [os.dup(fd) for fd in fds]
        for target, fd in enumerate(copies, start=3):
            os.dup2(fd, target)
            os.set_inheritable(target, True)

    daemon = daemon_factory(
        extra_env={"LISTEN_FDS": "3", "LISTEN_FDNAMES": "api:dashboard:control"}
    )
    assert daemon.process is None
    daemon.socket = control_path
    daemon.process = subprocess.Popen(
        [sys.executable, "-c", ACTIVATE],
        env=daemon.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=place_fds,
        pass_fds=(3, 4, 5),  # keep what place_fds put there (close_fds runs after it)
    )
    status = daemon.wait_ready()
    assert status["listeners"]["api"] == f"http://127.0.0.1:{api.getsockname()[1]}"
    assert status["listeners"]["dashboard"] == f"http://127.0.0.1:{dash.getsockname()[1]}"
    api_answer = httpx.get(f"http://127.0.0.1:{api.getsockname()[1]}/health", timeout=5)
    assert api_answer.status_code == 200
    code, err = daemon.terminate()
    assert code == 0, err
    # The daemon bound nothing of its own: the default socket path was never created.
    assert not (daemon.data / "lokid.sock").exists()
    for sock in (api, dash, control):
        sock.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")
def test_control_socket_refuses_other_uids(daemon_factory: Factory) -> None:
    # Open the folders so that uid 65534 can reach the socket file at all; the peer check
    # must still refuse it (the file mode alone is not what protects the daemon).
    home = Path(tempfile.mkdtemp(prefix="lokid-peer-"))
    try:
        _refuse_other_uid(daemon_factory(home).start())
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _refuse_other_uid(daemon: DaemonProcess) -> None:
    for folder in (daemon.home, daemon.socket.parent):
        os.chmod(folder, 0o711)
    os.chmod(daemon.socket, 0o666)
    script = (
        "import os, socket;"
        "os.setgid(65534); os.setuid(65534);"
        "s = socket.socket(socket.AF_UNIX); s.connect(%r);"
        "s.sendall(b'GET /api/status HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n');"
        "print(b''.join(iter(lambda: s.recv(65536), b'')).decode())"
    ).replace("%r", repr(str(daemon.socket)))
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=20
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("HTTP/1.1 403")
    assert '"code":"FORBIDDEN"' in result.stdout
    assert "uid 65534 may not use the control socket" in result.stdout


def test_cli_status_when_not_running_exits_1(tmp_path: Path) -> None:
    result = run_cli(["status"], tmp_path / "nohome")
    assert result.returncode == 1
    assert "lokid is not running" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_status_over_the_socket(daemon: DaemonProcess) -> None:
    result = run_cli(["status"], daemon.home)
    assert result.returncode == 0, result.stderr
    assert "status     idle" in result.stdout
    assert "supervisor tree:" in result.stdout
    assert "store: running" in result.stdout
    as_json = run_cli(["status", "--json"], daemon.home)
    import json

    parsed = json.loads(as_json.stdout)
    assert parsed["listeners"]["api"] == daemon.api_url


def test_cli_api_start_status_stop(tmp_path: Path) -> None:
    home = tmp_path / "home"
    started = run_cli(["api", "start", "--port", "0"], home)
    try:
        assert started.returncode == 0, started.stderr
        assert started.stdout.startswith("lokid started: http://127.0.0.1:")
        again = run_cli(["api", "start", "--port", "0"], home)
        assert again.stdout.startswith("lokid already running")
        status = run_cli(["dashboard", "status"], home)
        assert status.returncode == 0
        assert "dashboard" not in status.stdout.splitlines()[1]  # the other view is listed second
        pid = int(status.stdout.split("(pid ")[1].split(")")[0])
        stopped = run_cli(["api", "stop"], home)
        assert stopped.returncode == 0, stopped.stderr
        assert "stopped" in stopped.stderr
        assert not _alive(pid)
        after = run_cli(["api", "status"], home)
        assert after.returncode == 1
        assert "not running" in after.stderr
    finally:
        run_cli(["api", "stop"], home)


def test_cli_config_show_names_sources(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "lokid.toml").write_text("max_agents = 4\n")
    env_result = subprocess.run(
        [sys.executable, "-m", "lokid", "config", "show", "--port", "9999"],
        env={**os.environ, "LOKI_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    # `config show` takes only global flags; serve flags are rejected by argparse.
    assert env_result.returncode == 2
    result = run_cli(["config", "show"], home)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("max_agents"))
    assert "4" in line and f"file {home / 'lokid.toml'}" in line


def _alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie nobody reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] != "Z"


def follow_events(home: Path) -> subprocess.Popen[str]:
    """`loki events --follow --json` as a child; the caller reads and ends it."""
    return subprocess.Popen(
        [sys.executable, "-m", "lokid", "events", "--follow", "--json"],
        env={**os.environ, "LOKI_HOME": str(home)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_cli_events_history_and_follow(daemon: DaemonProcess) -> None:
    listed = run_cli(["events", "--json"], daemon.home)
    assert listed.returncode == 0, listed.stderr
    first = json.loads(listed.stdout.splitlines()[0])
    assert first["type"] == "log"
    assert first["data"]["message"].startswith("lokid ")
    table = run_cli(["events", "--types", "log"], daemon.home)
    assert " log " in table.stdout and "lokid" in table.stdout
    bad = run_cli(["events", "--types", "nope"], daemon.home)
    assert bad.returncode == 1
    assert "unknown event type(s) in types: nope" in bad.stderr
    follower = follow_events(daemon.home)
    try:
        assert follower.stdout is not None
        replayed = json.loads(follower.stdout.readline())  # history first, then live
        assert replayed["id"] == first["id"]
    finally:
        follower.kill()
        follower.wait(timeout=10)


def test_sigterm_with_open_event_streams_exits_promptly(daemon: DaemonProcess) -> None:
    assert daemon.process is not None
    ended = threading.Event()
    tail: list[str] = []

    def follow() -> None:
        with (
            httpx.Client(timeout=30) as client,
            client.stream("GET", f"{daemon.api_url}/api/events") as r,
        ):
            for line in r.iter_lines():
                tail.append(line)
        ended.set()

    readers = [threading.Thread(target=follow) for _ in range(3)]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + 10
    while sum(": connected" in line for line in tail) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    started = time.monotonic()
    code, err = daemon.terminate()
    assert code == 0, err
    # Streams are ended at once instead of holding the listeners' drain (grace 10 s).
    assert time.monotonic() - started < 5
    for reader in readers:
        reader.join(timeout=10)
    assert ended.is_set()
    assert ": closed: shutdown" in tail


def test_sigterm_with_a_control_socket_stream_nobody_reads_is_bounded(
    daemon_factory: Factory, tmp_path: Path
) -> None:
    """`loki events -f | less` left on a page: the control socket's stream (served by
    Hypercorn) has a write stuck on a full socket buffer. The stop still exits 0 within
    `shutdown_grace` + `HURRY_SECONDS` (docs/operations.md); the write held it forever."""
    bin_dir = tmp_path / "bin"
    fake_agent.install(bin_dir, ("claude",))
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_AGENT_LIFETIME": "60"}
    daemon = daemon_factory(extra_env=env).start("--shutdown-grace", "2")
    assert daemon.process is not None
    project = tmp_path / "project"
    project.mkdir()
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(str(daemon.socket))
        stalled.sendall(b"GET /api/events HTTP/1.1\r\nHost: lokid\r\n\r\n")  # never read
        body = {
            "prdText": "# Flood\n\n## Features\n- Flood [mode:flood] [lines:30000]\n",
            "projectDir": str(project),
            "provider": "claude",
        }
        created = httpx.post(f"{daemon.api_url}/api/sessions", json=body, timeout=10)
        assert created.status_code == 201, created.text

        def cut_slow() -> bool:
            stats = httpx.get(f"{daemon.api_url}/api/events/stats", timeout=5).json()
            return bool(stats["bus"]["subscribersCutSlow"])

        wait_until(cut_slow, "the stalled stream fell behind")  # its writes are stuck now
        started = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        try:
            _, err = daemon.process.communicate(timeout=2 + HURRY_SECONDS + 10)
        except subprocess.TimeoutExpired:
            raise AssertionError("the daemon did not exit while the stream was stalled") from None
        elapsed = time.monotonic() - started
    finally:
        stalled.close()
    assert daemon.process.returncode == 0, err.decode()
    assert elapsed < 2 + HURRY_SECONDS, err.decode()


def test_sigterm_with_a_client_that_reopens_its_stream_exits_at_once(
    daemon: DaemonProcess,
) -> None:
    """`curl -N $API/api/events $API/api/events`: the second request, made the moment the
    first stream ends, is refused (503, or a closed connection), not served until the
    listeners' drain times out (9 s)."""
    assert daemon.process is not None
    connected = threading.Event()
    second: list[object] = []

    def follow() -> None:
        with httpx.Client(timeout=30) as client:
            with client.stream("GET", f"{daemon.api_url}/api/events") as first:
                for line in first.iter_lines():
                    if line == ": connected":
                        connected.set()
            try:
                with client.stream("GET", f"{daemon.api_url}/api/events") as again:
                    again.read()
                    second.append((again.status_code, again.json()["error"]))
            except httpx.TransportError as exc:
                second.append(exc)

    reader = threading.Thread(target=follow)
    reader.start()
    assert connected.wait(10)
    started = time.monotonic()
    code, err = daemon.terminate()
    elapsed = time.monotonic() - started
    reader.join(timeout=30)
    assert code == 0, err
    assert elapsed < 3, err
    [answer] = second
    if not isinstance(answer, httpx.TransportError):
        assert answer == (
            503,
            {"code": "UNAVAILABLE", "message": "lokid is stopping", "details": {}},
        )


def test_cli_events_follow_ends_cleanly_when_the_daemon_stops(daemon: DaemonProcess) -> None:
    """`loki events -f` stops following (exit 0, one line on stderr) instead of reconnecting
    to a stopping daemon, which held the stop for 9 s and ended in "not running"."""
    assert daemon.process is not None
    follower = follow_events(daemon.home)
    try:
        assert follower.stdout is not None
        assert json.loads(follower.stdout.readline())["type"] == "log"  # following now
        started = time.monotonic()
        code, err = daemon.terminate()
        elapsed = time.monotonic() - started
        out, errors = follower.communicate(timeout=30)
    finally:
        follower.kill()
        follower.wait(timeout=10)
    assert code == 0, err
    assert elapsed < 3, err
    assert follower.returncode == 0, errors
    assert errors == "loki: lokid is stopping: the event stream ended\n"
    assert json.loads(out.splitlines()[-1])["data"]["message"] == "lokid stopping"


def _stalled_client(
    family: socket.AddressFamily, address: tuple[str, int] | str, request: bytes
) -> socket.socket:
    """A client that sends `request` and never reads what comes back (a small buffer)."""
    client = socket.socket(family, socket.SOCK_STREAM)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(address)
    client.sendall(request)
    return client


def test_a_stop_with_stalled_stream_clients_interrupts_the_session_and_exits_0(
    daemon_factory: Factory, tmp_path: Path
) -> None:
    """Regression: with stream clients that stopped reading on every listener, the
    listeners drained one after the other (each up to `shutdown_grace` - 1 s) while the
    session kept starting runs; the hurry then killed its agent, which was failed and
    retried, the retry met the closed agent pool (`PoolClosed`: 3 crashes,
    `runnerCrashed`), and a shielded write held the hurried stop: `loki api stop`
    said "did not stop". Now the session winds down the moment the stop begins (no
    new run; its run is cut off, not failed) and ends `interrupted`, and the stop
    exits 0 within `shutdown_grace` + `HURRY_SECONDS`."""
    bin_dir = tmp_path / "bin"
    fake_agent.install(bin_dir, ("claude",))
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_AGENT_LIFETIME": "90"}
    grace = 4.0
    daemon = daemon_factory(extra_env=env).start("--shutdown-grace", str(grace))
    assert daemon.process is not None
    api = daemon.api_url.removeprefix("http://").split(":")
    dash = daemon.dashboard_url.removeprefix("http://").split(":")
    api_address, dash_address = (api[0], int(api[1])), (dash[0], int(dash[1]))
    sse = b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    websocket = (
        b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    project = tmp_path / "project"
    project.mkdir()
    prd = (
        "# Stalled\n\n## Features\n- One [mode:flood] [lines:20000]\n"
        "- Two [mode:slow] [seconds:2]\n- Three [mode:slow] [seconds:60]\n"
    )
    stalled: list[socket.socket] = []
    try:
        stalled += [
            _stalled_client(socket.AF_INET, api_address, sse),
            _stalled_client(socket.AF_INET, api_address, sse),
            _stalled_client(socket.AF_INET, dash_address, sse.replace(b"1.1", b"1.0")),
            _stalled_client(socket.AF_INET, dash_address, websocket),
            _stalled_client(socket.AF_UNIX, str(daemon.socket), sse),
        ]
        body = {"prdText": prd, "projectDir": str(project), "provider": "claude"}
        created = httpx.post(f"{daemon.api_url}/api/sessions", json=body, timeout=10)
        assert created.status_code == 201, created.text
        sid = created.json()["id"]

        def second_run_started() -> bool:
            history = httpx.get(
                f"{daemon.api_url}/api/events/history",
                params={"sessionId": sid, "types": "task.started"},
                timeout=5,
            ).json()["events"]
            return len(history) >= 2

        wait_until(second_run_started, "the second run started")
        started = time.monotonic()
        stopped = run_cli(["api", "stop"], daemon.home)
        elapsed = time.monotonic() - started
        _, err = daemon.process.communicate(timeout=10)
    finally:
        for client in stalled:
            client.close()
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr + err.decode()
    assert "did not stop" not in stopped.stdout + stopped.stderr
    assert daemon.process.returncode == 0, err.decode()
    assert elapsed < grace + HURRY_SECONDS, err.decode()
    assert "crashed" not in err.decode()

    with sqlite3.connect(daemon.data / "lokid.db") as db:
        status, reason = db.execute(
            "SELECT status, exit_reason FROM sessions WHERE id = ?", (sid,)
        ).fetchone()
        tasks = db.execute(
            "SELECT id, status FROM tasks WHERE session_id = ? ORDER BY id", (sid,)
        ).fetchall()
        events = db.execute(
            "SELECT id, type, data FROM events WHERE session_id = ? OR session_id IS NULL"
            " ORDER BY id",
            (sid,),
        ).fetchall()
    assert (status, reason) == ("interrupted", None)
    assert tasks == [("prd-001", "completed"), ("prd-002", "pending"), ("prd-003", "pending")]
    (stop_at,) = [i for i, _, data in events if json.loads(data).get("message") == "lokid stopping"]
    after = [kind for i, kind, _ in events if i > stop_at]
    assert not [kind for kind in after if kind in ("task.started", "agent.spawned", "task.failed")]
    assert [kind for kind in after if kind.startswith("session.")] == ["session.interrupted"]
    ends = [json.loads(data) for _, kind, data in events if kind == "agent.failed"]
    assert [(end["taskId"], end["code"], end["error"]) for end in ends] == [
        ("prd-002", "stopped", "run cut off: the daemon is stopping")
    ]


def _reset_connections(family: socket.AddressFamily, address: Any, count: int) -> None:
    """Connect and close at once: over TCP with a reset (SO_LINGER 0), as port scanners
    and TCP health checks do; a Unix socket has no reset, its peer is just gone."""
    for _ in range(count):
        with socket.socket(family, socket.SOCK_STREAM) as client:
            client.settimeout(5)
            client.connect(address)
            if family == socket.AF_INET:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _listener_stats(daemon: DaemonProcess) -> dict[str, dict[str, Any]]:
    """Each listener's child in /api/status's supervisor tree (restarts, detail)."""
    with daemon.control() as client:
        tree = client.get("/api/status").json()["supervisor"]
    listeners = next(c for c in tree["children"] if c["id"] == "listeners")
    return {c["id"]: c for c in listeners["detail"]["children"]}


def test_connections_reset_at_once_cost_only_themselves(
    daemon_factory: Factory, tmp_path: Path
) -> None:
    """Each connection reset before it was served crashed its listener (ENOTCONN from
    `getpeername()`); a few dozen in a row went past the restart intensity and stopped
    the daemon, killing the session's agent and cutting every stream. Now each is
    dropped and counted, and the session, the listeners and an open stream go on.

    The first round is sent while the daemon is stopped (SIGSTOP), so that every one of
    those connections is reset before it is accepted; the second races the daemon."""
    bin_dir = tmp_path / "bin"
    fake_agent.install(bin_dir, ("claude",))
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_AGENT_LIFETIME": "90"}
    daemon = daemon_factory(extra_env=env).start()
    assert daemon.process is not None
    project = tmp_path / "project"
    project.mkdir()
    body = {
        "prdText": "# Resets\n\n## Features\n- One [mode:slow] [seconds:60]\n",
        "projectDir": str(project),
        "provider": "claude",
    }
    created = httpx.post(f"{daemon.api_url}/api/sessions", json=body, timeout=10)
    assert created.status_code == 201, created.text
    sid = created.json()["id"]

    def agent_running() -> bool:
        status = httpx.get(f"{daemon.api_url}/api/status", timeout=5).json()
        return bool(status["agents"]["active"] == 1)

    wait_until(agent_running, "the session's agent runs")
    api, dashboard = (
        (url.removeprefix("http://").split(":")[0], int(url.rsplit(":", 1)[1]))
        for url in (daemon.api_url, daemon.dashboard_url)
    )
    stream = socket.create_connection(api, timeout=10)
    try:
        stream.sendall(b"GET /api/events?types=session.stopped HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        seen = b""
        while b": connected" not in seen:
            seen += stream.recv(65536)

        os.kill(daemon.process.pid, signal.SIGSTOP)
        try:
            _reset_connections(socket.AF_INET, api, 100)
            _reset_connections(socket.AF_INET, dashboard, 100)
            _reset_connections(socket.AF_UNIX, str(daemon.socket), 100)
        finally:
            os.kill(daemon.process.pid, signal.SIGCONT)
        _reset_connections(socket.AF_INET, api, 200)
        _reset_connections(socket.AF_INET, dashboard, 200)
        _reset_connections(socket.AF_UNIX, str(daemon.socket), 200)

        def all_served() -> dict[str, dict[str, Any]] | None:
            stats = _listener_stats(daemon)
            wanted = {"api": 301, "dashboard": 300, "control": 300}  # the stream is the 301st
            done = all(stats[n]["detail"]["connectionsTotal"] >= t for n, t in wanted.items())
            return stats if done else None

        stats = wait_until(all_served, "every connection was taken", timeout=20)
        assert daemon.process.poll() is None
        for name in ("api", "dashboard", "control"):
            assert stats[name]["restarts"] == 0, stats[name]
            assert stats[name]["detail"]["running"] is True
            assert stats[name]["detail"]["connectionsFailed"] == 0
        assert stats["api"]["detail"]["connectionsDropped"] >= 100
        assert stats["dashboard"]["detail"]["connectionsDropped"] >= 100
        assert agent_running()  # the session's agent was not killed

        # The stream opened before is still open and gets a later event.
        stopped = httpx.post(f"{daemon.api_url}/api/sessions/{sid}/stop", timeout=10)
        assert stopped.status_code in (200, 202), stopped.text
        deadline = time.monotonic() + 30
        while b'"type":"session.stopped"' not in seen:
            assert time.monotonic() < deadline, f"no session.stopped: {seen[-500:]!r}"
            chunk = stream.recv(65536)
            assert chunk, f"the stream ended: {seen[-500:]!r}"
            seen += chunk
        assert sid.encode() in seen
    finally:
        stream.close()
    code, err = daemon.terminate()
    assert code == 0, err
    assert "crashed" not in err
    assert "Traceback" not in err


def _one_exchange(family: socket.AddressFamily, address: Any, data: bytes) -> bytes:
    """Send `data` at once, read until the daemon closes the connection."""
    with socket.socket(family) as client:
        client.settimeout(10)
        client.connect(address)
        client.sendall(data)
        raw = b""
        while chunk := client.recv(65536):
            raw += chunk
    return raw


def test_bytes_after_an_http_1_0_request_are_ignored_on_every_listener(
    daemon: DaemonProcess,
) -> None:
    """A request that is the client's last (HTTP/1.0, or Connection: close) followed by
    more bytes gets its whole answer, and the connection is closed; h11's "Got data when
    expecting EOF" made it a 400, or cut the answer after its head. Nothing is logged
    above INFO; no connection counts as failed."""
    api, dashboard = (
        (url.removeprefix("http://").split(":")[0], int(url.rsplit(":", 1)[1]))
        for url in (daemon.api_url, daemon.dashboard_url)
    )
    junk = b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\nJUNK\r\n\r\n"
    cases = [
        (socket.AF_INET, api, b"GET /health HTTP/1.0\r\n\r\n", b'"status":"healthy"'),
        (
            socket.AF_INET,
            api,
            b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",  # inline
            b'"status":"healthy"',
        ),
        # Quart (Hypercorn) routes, on the dashboard and on the control socket
        (socket.AF_INET, dashboard, b"GET /api/enterprise/tokens HTTP/1.0\r\n\r\n", b'"tokens"'),
        (
            socket.AF_INET,
            dashboard,
            b"GET /api/enterprise/tokens HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            b'"tokens"',
        ),
        (socket.AF_UNIX, str(daemon.socket), b"GET /api/status HTTP/1.0\r\n\r\n", b'"version"'),
    ]
    for family, address, request, expected in cases:
        raw = _one_exchange(family, address, request + junk)
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), (request, raw[:300])
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        assert len(body) == length, (request, raw[:300])  # whole, and only one answer
        assert expected in body
    stats = _listener_stats(daemon)
    for name in ("api", "dashboard", "control"):
        assert stats[name]["detail"]["connectionsFailed"] == 0, stats[name]
        assert stats[name]["restarts"] == 0
    code, err = daemon.terminate()
    assert code == 0
    assert not [line for line in err.splitlines() if " WARNING " in line or " ERROR " in line], err
    assert "Traceback" not in err
