"""systemd's protocols: sd_notify and socket activation, unit by unit and end to end.

The end-to-end tests play the service manager: they bind the listeners and pass
them as fds 3, 4, 5 with LISTEN_* set as systemd sets them, and they own the
NOTIFY_SOCKET the daemon reports READY/WATCHDOG/STOPPING to.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from lokid.config import Config
from lokid.daemon import Daemon
from lokid.errors import StartupError
from lokid.systemd import Notifier, inherited_sockets, watchdog_interval

from .daemon_proc import DaemonProcess


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.settimeout(2)
    yield path, server
    server.close()


def test_notifier_sends_ready_status_watchdog_stopping(
    notify_socket: tuple[str, socket.socket],
) -> None:
    path, server = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    notifier.ready("serving")
    assert server.recv(4096).decode().split("\n") == [
        "READY=1",
        "STATUS=serving",
        f"MAINPID={os.getpid()}",
    ]
    notifier.watchdog()
    assert server.recv(4096) == b"WATCHDOG=1"
    notifier.stopping("bye")
    assert server.recv(4096) == b"STOPPING=1\nSTATUS=bye"
    notifier.close()


def test_notifier_abstract_namespace() -> None:
    name = f"lokid-test-{os.getpid()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind("\0" + name)
    server.settimeout(2)
    try:
        Notifier({"NOTIFY_SOCKET": "@" + name}).status("hello")
        assert server.recv(100) == b"STATUS=hello"
    finally:
        server.close()


def test_notifier_without_manager_is_a_no_op(tmp_path: Path) -> None:
    assert not Notifier({}).enabled
    assert Notifier({}).ready("x") is False
    # A socket path that does not exist: disabled, never raises.
    assert Notifier({"NOTIFY_SOCKET": str(tmp_path / "nope")}).watchdog() is False


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}, 0.1),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "zero"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
    ],
)
def test_watchdog_interval_is_half_the_timeout(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env) == expected


def _listen_at(fd: int) -> socket.socket:
    """A listening socket whose descriptor is exactly `fd` (as systemd would pass it)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    if sock.fileno() != fd:
        os.dup2(sock.fileno(), fd)
        sock.close()
        return socket.socket(fileno=fd)
    return sock


@pytest.fixture
def fds_3_4() -> Iterator[None]:
    saved = [os.dup(fd) if _is_open(fd) else None for fd in (3, 4)]
    yield
    for fd, copy in zip((3, 4), saved, strict=True):
        if copy is None:
            with contextlib.suppress(OSError):
                os.close(fd)
        else:
            os.dup2(copy, fd)
            os.close(copy)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_inherited_named_sockets(fds_3_4: None) -> None:
    first, second = _listen_at(3), _listen_at(4)
    ports = (first.getsockname()[1], second.getsockname()[1])
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "dashboard:api"}
    sockets = inherited_sockets(env)
    assert set(sockets) == {"dashboard", "api"}
    assert sockets["dashboard"].getsockname()[1] == ports[0]
    assert sockets["api"].getsockname()[1] == ports[1]


def test_inherited_sockets_ignored_for_another_pid() -> None:
    assert inherited_sockets({"LISTEN_PID": "1", "LISTEN_FDS": "2"}) == {}


def test_unknown_socket_name_is_a_startup_error(fds_3_4: None) -> None:
    _listen_at(3)
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "web"}
    with pytest.raises(StartupError, match="named 'web'"):
        inherited_sockets(env)


def test_fds_named_after_the_unit_are_taken_in_order(fds_3_4: None) -> None:
    first, second = _listen_at(3), _listen_at(4)
    env = {
        "LISTEN_PID": str(os.getpid()),
        "LISTEN_FDS": "2",
        "LISTEN_FDNAMES": "lokid.socket:lokid.socket",
    }
    sockets = inherited_sockets(env)
    assert sockets["api"].getsockname() == first.getsockname()
    assert sockets["dashboard"].getsockname() == second.getsockname()


# -- the daemon under a (fake) service manager -----------------------------------------------

# What systemd does between fork and exec, as a tiny program: move the sockets it was given
# to fds 3, 4, 5..., set LISTEN_PID to its own pid (the daemon's, after exec) and LISTEN_FDS,
# then exec the daemon. argv: COUNT FD... PROGRAM ARGS...
LAUNCHER = """
import fcntl, os, sys
count = int(sys.argv[1])
sources = [int(arg) for arg in sys.argv[2 : 2 + count]]
program = sys.argv[2 + count :]
moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in sources]
for fd in sources:
    os.close(fd)
for target, fd in enumerate(moved, start=3):
    os.dup2(fd, target)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = str(count)
os.execv(program[0], program)
"""

WAIT = 20.0  # every wait below is bounded by this


def _tcp_listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


def _unix_listener(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, 0o600)
    sock.listen(16)
    return sock


def _short_dir() -> Path:
    """A folder short enough for Unix socket paths (pytest's tmp_path can be long)."""
    return Path(tempfile.mkdtemp(prefix="lokid-sd-"))


def _port(sock: socket.socket) -> int:
    port: int = sock.getsockname()[1]
    return port


@pytest.mark.e2e
@pytest.mark.parametrize(
    "order",
    [("api", "dashboard", "control"), ("control", "api", "dashboard")],
    ids=["in-order", "shuffled"],
)
def test_socket_activation_end_to_end(tmp_path: Path, order: tuple[str, ...]) -> None:
    """Listeners bound before the daemon exists are the ones it serves, by name.

    systemd passes the fds of several socket units in no fixed order, hence the
    shuffled case: only LISTEN_FDNAMES says which is which.
    """
    folder = _short_dir()
    control_path = folder / "activated.sock"
    listeners = {
        "api": _tcp_listener(),
        "dashboard": _tcp_listener(),
        "control": _unix_listener(control_path),
    }
    # A client that connects before the daemon runs waits in the backlog and is served.
    early = socket.create_connection(("127.0.0.1", _port(listeners["api"])), timeout=WAIT)
    early.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")

    daemon = DaemonProcess(tmp_path / "home", extra_env={"LISTEN_FDNAMES": ":".join(order)})
    daemon.socket = control_path  # where wait_ready() talks to it
    fds = [listeners[name].fileno() for name in order]
    argv = [sys.executable, "-c", LAUNCHER, str(len(fds)), *map(str, fds)]
    argv += [sys.executable, "-m", "lokid", "serve", "--port", "0", "--dashboard-port", "0"]
    daemon.process = subprocess.Popen(
        argv,
        env=daemon.env,
        pass_fds=fds,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        status = daemon.wait_ready(WAIT)
        api = f"http://127.0.0.1:{_port(listeners['api'])}"
        dashboard = f"http://127.0.0.1:{_port(listeners['dashboard'])}"
        assert status["listeners"] == {
            "api": api,
            "dashboard": dashboard,
            "socket": str(control_path),
        }
        answer = b""
        while chunk := early.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]

        # Each name reached its own application: the titles tell the two TCP apps apart.
        api_doc = httpx.get(f"{api}/openapi.json", timeout=5).json()
        assert api_doc["info"]["title"] == "lokid HTTP API"
        dashboard_doc = httpx.get(f"{dashboard}/openapi.json", timeout=5).json()
        assert dashboard_doc["info"]["title"] == "lokid Dashboard API"
        assert httpx.get(f"{dashboard}/health", timeout=5).json()["status"] == "healthy"
        with daemon.control() as client:
            assert client.get("/api/status").json()["listeners"]["socket"] == str(control_path)
            assert client.get("/dashboard/health").json()["status"] == "healthy"
        # It bound nothing of its own: no control socket at the configured place.
        assert not (daemon.data / "lokid.sock").exists()

        code, err = daemon.terminate()
        assert code == 0, err
        # A passed socket belongs to the service manager: never unlinked.
        assert control_path.exists()
    finally:
        daemon.kill()
        early.close()
        for sock in listeners.values():
            sock.close()
        shutil.rmtree(folder, ignore_errors=True)


SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")


def _free_ports(count: int) -> list[int]:
    held = [_tcp_listener() for _ in range(count)]
    ports = [_port(sock) for sock in held]
    for sock in held:
        sock.close()
    return ports


@pytest.mark.e2e
@pytest.mark.skipif(
    SOCKET_ACTIVATE is None,
    reason="systemd-socket-activate is not installed (Debian: apt-get install systemd)",
)
def test_systemd_socket_activate_names_reach_the_daemon(tmp_path: Path) -> None:
    """The same, with systemd's own implementation of the protocol setting LISTEN_*."""
    assert SOCKET_ACTIVATE is not None
    folder = _short_dir()
    control_path = folder / "activated.sock"
    api_port, dashboard_port = _free_ports(2)
    daemon = DaemonProcess(tmp_path / "home")
    daemon.socket = control_path
    argv = [SOCKET_ACTIVATE, "-l", str(control_path), "-l", f"127.0.0.1:{dashboard_port}"]
    argv += ["-l", f"127.0.0.1:{api_port}", "--fdname=control:dashboard:api"]
    # systemd-socket-activate passes on only TERM, PATH, USER and HOME: without these
    # the daemon would use ~/.loki, the real home of whoever runs the tests.
    argv += [
        f"--setenv={key}={value}"
        for key, value in daemon.env.items()
        if key.startswith("LOKI_") or key == "PYTHONPATH"
    ]
    argv += [sys.executable, "-m", "lokid", "serve", "--port", "0", "--dashboard-port", "0"]
    daemon.process = subprocess.Popen(
        argv,
        env=daemon.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        status = daemon.wait_ready(WAIT)
        assert status["listeners"] == {
            "api": f"http://127.0.0.1:{api_port}",
            "dashboard": f"http://127.0.0.1:{dashboard_port}",
            "socket": str(control_path),
        }
        dashboard_doc = httpx.get(f"http://127.0.0.1:{dashboard_port}/openapi.json", timeout=5)
        assert dashboard_doc.json()["info"]["title"] == "lokid Dashboard API"
        assert (tmp_path / "home" / "lokid" / "lokid.db").exists()  # its own home, not ~/.loki
        code, err = daemon.terminate()
        assert code == 0, err
    finally:
        daemon.kill()
        shutil.rmtree(folder, ignore_errors=True)


class NotifyReceiver:
    """The service manager's end of NOTIFY_SOCKET: datagrams with their arrival times."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.messages: list[tuple[float, list[str]]] = []

    def until(self, line: str, timeout: float = WAIT) -> list[str]:
        """Receive until a datagram holding `line` arrives; that datagram's lines."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {line} within {timeout} s; got {self.messages}")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            lines = data.decode().split("\n")
            self.messages.append((time.monotonic(), lines))
            if line in lines:
                return lines

    def collect(self, seconds: float) -> list[tuple[float, list[str]]]:
        """Everything that arrives during the next `seconds`."""
        got: list[tuple[float, list[str]]] = []
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            got.append((time.monotonic(), data.decode().split("\n")))
        self.messages += got
        return got

    def close(self) -> None:
        self.sock.close()


@pytest.mark.e2e
def test_daemon_notifies_ready_watchdog_and_stopping(tmp_path: Path) -> None:
    folder = _short_dir()
    receiver = NotifyReceiver(folder)
    timeout_usec = 400_000  # pings expected every 0.2 s
    daemon = DaemonProcess(
        tmp_path / "home",
        extra_env={"NOTIFY_SOCKET": str(receiver.path), "WATCHDOG_USEC": str(timeout_usec)},
    )
    daemon.env.pop("WATCHDOG_PID", None)
    try:
        daemon.start(wait=False)
        assert daemon.process is not None
        ready = receiver.until("READY=1")
        assert f"MAINPID={daemon.process.pid}" in ready
        assert any(line.startswith("STATUS=serving api http://127.0.0.1:") for line in ready)
        assert daemon.wait_ready(WAIT)["phase"] == "running"  # READY=1 meant it

        pings = [at for at, lines in receiver.collect(2.0) if lines == ["WATCHDOG=1"]]
        assert len(pings) >= 6, receiver.messages
        gaps = sorted(b - a for a, b in itertools.pairwise(pings))
        median = gaps[len(gaps) // 2]
        assert 0.1 < median < 0.3, gaps  # half of WATCHDOG_USEC
        assert gaps[-1] < timeout_usec / 1e6, gaps  # systemd would have killed it

        daemon.process.send_signal(signal.SIGTERM)
        stopping = receiver.until("STOPPING=1")
        assert any(line.startswith("STATUS=stopping") for line in stopping)
        code, err = daemon.terminate()
        assert code == 0, err
    finally:
        daemon.kill()
        receiver.close()
        shutil.rmtree(folder, ignore_errors=True)


def _freeze_the_loop(seconds: float) -> None:
    """Block the calling thread: from a trio task, the whole event loop stops."""
    time.sleep(seconds)


async def test_a_frozen_event_loop_stops_the_watchdog_pings(tmp_path: Path) -> None:
    """The pings come from the trio loop itself, so a stuck loop is a missed ping.

    A thread receives the datagrams (the trio thread is the one that freezes).
    """
    folder = _short_dir()
    receiver = NotifyReceiver(folder)
    receiver.sock.settimeout(0.01)
    arrivals: list[float] = []
    done = threading.Event()

    def receive() -> None:
        while not done.is_set():
            try:
                data = receiver.sock.recv(64)
            except TimeoutError:
                continue
            if data == b"WATCHDOG=1":
                arrivals.append(time.monotonic())

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    interval = 0.1
    daemon = Daemon(
        Config(loki_home=tmp_path), notifier=Notifier({"NOTIFY_SOCKET": str(receiver.path)})
    )
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(daemon._watchdog, interval)
            await trio.sleep(5 * interval)
            pinging = len(arrivals)
            frozen_at = time.monotonic()
            _freeze_the_loop(10 * interval)
            thawed_at = time.monotonic()
            await trio.sleep(5 * interval)
            nursery.cancel_scope.cancel()
    finally:
        done.set()
        thread.join(timeout=WAIT)
        receiver.close()
        daemon.notifier.close()
        shutil.rmtree(folder, ignore_errors=True)
    assert pinging >= 3, arrivals
    # A ping sent just before the freeze may be read a moment later; none is sent during it.
    during = [at for at in arrivals if frozen_at + interval < at < thawed_at]
    assert during == [], (frozen_at, thawed_at, arrivals)
    after = [at for at in arrivals if at >= thawed_at]
    assert len(after) >= 3, (thawed_at, arrivals)
    assert after[0] - thawed_at < interval, "the first ping after the freeze is at once"
