"""End to end: how `loki serve` is stopped (docs/operations.md): the signals it
handles besides SIGTERM, and `loki api stop`.

A foreground `loki serve` gets SIGHUP when its terminal closes; before the
daemon handled it, the default action ended it at once and its agents ran on.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import select
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lokid import cli
from lokid.daemon import HURRY_SECONDS
from lokid.process import identity

from . import fake_agent
from .cli_kit import Cli
from .daemon_proc import DaemonProcess, group_members, wait_until

pytestmark = pytest.mark.e2e

Factory = Callable[..., DaemonProcess]
_agents: list[int] = []


@pytest.fixture(autouse=True)
def _kill_leftover_agents() -> Iterator[None]:
    """A failing test (an old daemon that died on the signal) leaves no agent running."""
    yield
    while _agents:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(_agents.pop(), signal.SIGKILL)


def _daemon_with_an_agent(
    daemon_factory: Factory,
    tmp_path: Path,
    mode: str = "hang",
    *,
    grace: str = "20",
    args: tuple[str, ...] = (),
    **popen: Any,
) -> tuple[DaemonProcess, int]:
    """A daemon whose session's agent never ends by itself (`hang` ends on SIGTERM,
    `ignore-term` only on SIGKILL, after `agent_grace`, `grace`); the agent's pid."""
    bin_dir = tmp_path / "bin"
    fake_agent.install(bin_dir, ("claude",))
    agent_log = tmp_path / "agents.jsonl"
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_AGENT_LOG": str(agent_log),
        "FAKE_AGENT_LIFETIME": "60",  # a leaked agent does not outlive the test run by much
        "LOKI_AGENT_GRACE": grace,
    }
    daemon = daemon_factory(extra_env=env).start(*args, **popen)
    project = tmp_path / "project"
    project.mkdir()
    body = {
        "prdText": f"# Todo\n\n## Features\n- Add a todo item [mode:{mode}]\n",
        "projectDir": str(project),
        "provider": "claude",
    }
    created = httpx.post(f"{daemon.api_url}/api/sessions", json=body, timeout=10)
    assert created.status_code == 201, created.text
    wait_until(lambda: agent_log.exists() and agent_log.read_text().strip(), "the agent started")
    agent = int(json.loads(agent_log.read_text().splitlines()[0])["pid"])
    _agents.append(agent)
    wait_until(lambda: agent in group_members(agent), "the agent's group")
    return daemon, agent


def _read_stderr_until(process: subprocess.Popen[bytes], text: str, timeout: float = 10.0) -> str:
    """What the daemon logged until a line holding `text` (the daemon keeps running)."""
    assert process.stderr is not None
    seen = b""
    deadline = time.monotonic() + timeout
    while text.encode() not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"timed out waiting for {text!r} in the log: {seen.decode()}"
        readable, _, _ = select.select([process.stderr], [], [], left)
        if readable:
            chunk = os.read(process.stderr.fileno(), 65536)
            assert chunk, f"the daemon's stderr ended before {text!r}: {seen.decode()}"
            seen += chunk
    return seen.decode()


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGQUIT], ids=lambda s: s.name)
def test_a_hangup_or_quit_is_a_graceful_stop_that_leaves_no_agent(
    daemon_factory: Factory, tmp_path: Path, signum: signal.Signals
) -> None:
    """The terminal of `loki serve` went away (SIGHUP), or Ctrl-\\ (SIGQUIT): exit 0
    within `shutdown_grace`, no agent left, the pid file and the socket removed, the
    run recorded as clean and the session `interrupted` (resumable)."""
    daemon, agent = _daemon_with_an_agent(daemon_factory, tmp_path)
    assert daemon.process is not None
    started = time.monotonic()
    daemon.process.send_signal(signum)
    _, err = daemon.process.communicate(timeout=30)
    log = err.decode()
    assert daemon.process.returncode == 0, log
    assert time.monotonic() - started < 10.0 + HURRY_SECONDS, log
    assert f"received {signum.name}: stopping gracefully" in log
    assert group_members(agent) == []
    assert not (daemon.data / "lokid.pid").exists()
    assert not daemon.socket.exists()
    with sqlite3.connect(daemon.data / "lokid.db") as db:
        runs = db.execute("SELECT clean FROM daemon_runs").fetchall()
        sessions = db.execute("SELECT status FROM sessions").fetchall()
    assert runs == [(1,)]
    assert sessions == [("interrupted",)]


def test_a_second_hangup_hurries_the_stop(daemon_factory: Factory, tmp_path: Path) -> None:
    """An agent that ignores SIGTERM holds a graceful stop for `shutdown_grace` (10 s);
    a second SIGHUP kills it at once, as a second SIGTERM does."""
    daemon, agent = _daemon_with_an_agent(daemon_factory, tmp_path, "ignore-term")
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGHUP)
    first = _read_stderr_until(daemon.process, "received SIGHUP: stopping gracefully")
    started = time.monotonic()
    daemon.process.send_signal(signal.SIGHUP)
    _, err = daemon.process.communicate(timeout=30)
    log = first + err.decode()
    assert daemon.process.returncode == 0, log
    assert time.monotonic() - started < HURRY_SECONDS + 1.0, log
    assert "received SIGHUP again: hurrying the stop" in log
    assert group_members(agent) == []


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGUSR2], ids=lambda s: s.name)
def test_usr1_and_usr2_are_logged_and_change_nothing(
    daemon_factory: Factory, signum: signal.Signals
) -> None:
    daemon = daemon_factory().start()
    assert daemon.process is not None
    daemon.process.send_signal(signum)
    _read_stderr_until(daemon.process, f"received {signum.name}: ignored")
    assert httpx.get(f"{daemon.api_url}/health/ready", timeout=5).status_code == 200
    code, err = daemon.terminate()
    assert code == 0, err


def _ignore_sighup() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def test_a_hangup_ignored_at_start_stays_ignored(daemon_factory: Factory, tmp_path: Path) -> None:
    """`nohup loki serve`: the operator asked to outlive the terminal."""
    daemon, agent = _daemon_with_an_agent(daemon_factory, tmp_path, preexec_fn=_ignore_sighup)
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGHUP)
    # SIGUSR1 after it: once the daemon logged that one, a SIGHUP it acted on would show.
    daemon.process.send_signal(signal.SIGUSR1)
    log = _read_stderr_until(daemon.process, "received SIGUSR1")
    assert "SIGHUP" not in log
    assert httpx.get(f"{daemon.api_url}/health/ready", timeout=5).status_code == 200
    assert group_members(agent) == [agent]
    code, err = daemon.terminate()
    assert code == 0, err
    assert group_members(agent) == []


# -- loki api stop ---------------------------------------------------------------------------


def test_api_stop_waits_for_the_daemons_own_stop_bound(
    daemon_factory: Factory, tmp_path: Path
) -> None:
    """Regression: `loki api stop` waited its own shell's shutdown_grace + 5 s and said
    `did not stop` (exit 1) while the daemon, started with a longer grace, was still in
    its normal graceful stop (an agent ignoring SIGTERM holds it for `agent_grace`)."""
    daemon, agent = _daemon_with_an_agent(
        daemon_factory, tmp_path, "ignore-term", grace="8", args=("--shutdown-grace", "20")
    )
    assert daemon.process is not None
    with daemon.control() as client:
        assert client.get("/api/status").json()["stopBoundSeconds"] == 20 + HURRY_SECONDS
    env = {**os.environ, "LOKI_HOME": str(daemon.home), "LOKI_SHUTDOWN_GRACE": "0.5"}
    started = time.monotonic()
    stopped = subprocess.run(
        [sys.executable, "-m", "lokid", "api", "stop"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stderr.endswith(" stopped\n")
    assert time.monotonic() - started > 8.0  # the agent's grace: what this shell had not known
    assert daemon.process.wait(timeout=10) == 0
    assert group_members(agent) == []


def test_api_stop_falls_back_on_its_own_configuration(
    loki: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon that does not say its bound (here: nothing answers on the socket) is
    waited for this configuration's shutdown_grace + 2 s (+ the margin)."""
    home = tmp_path / "home"
    (home / "lokid").mkdir(parents=True)
    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(15, 1); time.sleep(60)"],
        stdin=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: identity(stubborn.pid), "the process started")
        wait_until(lambda: _ignores_sigterm(stubborn.pid), "SIGTERM ignored")
        recorded = identity(stubborn.pid)
        assert recorded is not None
        (home / "lokid" / "lokid.pid").write_text(recorded.render() + "\n")
        monkeypatch.setenv("LOKI_SHUTDOWN_GRACE", "0.1")
        monkeypatch.setattr(cli, "STOP_MARGIN", 0.1)
        started = time.monotonic()
        result = loki(home, "api", "stop")
        elapsed = time.monotonic() - started
    finally:
        stubborn.kill()
        stubborn.wait(timeout=10)
    assert result.code == 1
    assert (
        f"lokid (pid {stubborn.pid}) did not stop within 2.2s (lokid did not say its stop "
        "bound: this configuration's shutdown_grace 0.1 s + 2.1 s)"
    ) in result.err
    assert 2.2 <= elapsed < 2.2 + 5.0


def _ignores_sigterm(pid: int) -> bool:
    """SigIgn of /proc/PID/status has SIGTERM's bit."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


def test_the_cli_knows_the_daemons_hurry() -> None:
    assert cli.HURRY_SECONDS == HURRY_SECONDS


# -- the start after a SIGKILL ---------------------------------------------------------------


def test_the_start_after_a_sigkill_warns_of_the_unclean_run(daemon_factory: Factory) -> None:
    """docs/operations.md, "After a crash": one WARNING line names the run that did not
    stop (its pid and start); a start after a clean stop says nothing of the kind."""
    killed = daemon_factory().start()
    assert killed.process is not None
    killed_pid = killed.process.pid
    with killed.control() as client:
        started_at = client.get("/api/status").json()["startedAt"]
    killed.kill()

    after_kill = daemon_factory().start()
    code, log = after_kill.terminate()
    assert code == 0, log
    warnings = [line for line in log.splitlines() if "did not stop cleanly" in line]
    assert len(warnings) == 1, log
    assert " WARNING lokid: the previous lokid run (pid " + str(killed_pid) in warnings[0]
    recorded = warnings[0].split("started ")[1].split(")")[0]
    assert abs(_seconds(recorded) - _seconds(started_at)) < 5.0, (recorded, started_at)

    after_clean_stop = daemon_factory().start()
    code, log = after_clean_stop.terminate()
    assert code == 0, log
    assert "did not stop cleanly" not in log


def _seconds(timestamp: str) -> float:
    return datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


# -- a stop signal during the start ----------------------------------------------------------

START_POINTS = [
    "serve.begin",  # the configuration read, nothing opened yet
    "daemon.locked",  # the lock taken, the pid file written
    "daemon.listening",  # the listeners bound, the control socket's file made
    "daemon.tree_starting",  # the signal watcher up, the supervisor tree not started
    "daemon.started",  # the tree started (store open, sessions reconciled), not ready yet
]


def _assert_stopped_cleanly(daemon: DaemonProcess, err: str) -> None:
    """Nothing of the daemon left: no traceback, pid file, socket or process of its
    group, and a store (if it was opened) whose every run was recorded stopped."""
    assert daemon.process is not None
    assert "Traceback" not in err, err
    assert not (daemon.data / "lokid.pid").exists(), err
    assert not daemon.socket.exists(), err
    assert group_members(daemon.process.pid) == []
    database = daemon.data / "lokid.db"
    if database.exists():
        assert not (daemon.data / "lokid.db-wal").exists()  # closed: checkpointed and removed
        with contextlib.closing(sqlite3.connect(database)) as db:
            runs = db.execute("SELECT clean FROM daemon_runs").fetchall()
        assert all(clean == 1 for (clean,) in runs), runs


@pytest.mark.parametrize("point", START_POINTS)
def test_sigterm_at_any_point_of_the_start_is_an_orderly_stop(
    daemon_factory: Factory, point: str
) -> None:
    """Regression: before the supervisor tree's signal watcher was up, SIGTERM had its
    default action - the daemon died at once, leaving its pid file and socket."""
    daemon = daemon_factory(extra_env={"LOKI_CRASH_AT": f"{point}:SIGTERM"})
    daemon.start(wait=False)
    assert daemon.process is not None
    _, raw = daemon.process.communicate(timeout=30)
    err = raw.decode()
    assert f"crash point {point}: sending SIGTERM" in err
    assert daemon.process.returncode == 0, err
    assert "received SIGTERM" in err, err
    if point != "daemon.started":  # there the watcher may take it just after "ready"
        assert "ready:" not in err
    _assert_stopped_cleanly(daemon, err)


@pytest.mark.parametrize(
    "signum", [signal.SIGINT, signal.SIGHUP, signal.SIGQUIT], ids=lambda s: s.name
)
def test_every_stop_signal_during_the_start_is_an_orderly_stop(
    daemon_factory: Factory, signum: signal.Signals
) -> None:
    """SIGINT was worse than SIGTERM: Python's KeyboardInterrupt, with a traceback."""
    daemon = daemon_factory(extra_env={"LOKI_CRASH_AT": f"daemon.locked:{signum.name}"})
    daemon.start(wait=False)
    assert daemon.process is not None
    _, raw = daemon.process.communicate(timeout=30)
    err = raw.decode()
    assert daemon.process.returncode == 0, err
    assert f"received {signum.name}" in err, err
    _assert_stopped_cleanly(daemon, err)


def test_sigusr1_during_the_start_is_ignored(daemon_factory: Factory) -> None:
    daemon = daemon_factory(extra_env={"LOKI_CRASH_AT": "daemon.listening:SIGUSR1"})
    daemon.start()  # ready: the signal did not end it
    code, err = daemon.terminate()
    assert code == 0, err
    assert "received SIGUSR1" in err and "ignored" in err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_second_signal_as_the_stopped_daemon_exits_changes_nothing(
    daemon_factory: Factory, signum: signal.Signals
) -> None:
    """Regression: once `loki serve` returned, `cli.run` put back the handlers it found
    (Python's), so a second signal in the last moments of the process's exit - an
    impatient operator's, a supervisor's second TERM - ended an orderly stop with status
    143 (SIGTERM) or 130 (SIGINT) instead of 0. Found by sending a start a stop signal
    and a SIGINT within 0.3 s: 3 runs in 16."""
    daemon = daemon_factory(extra_env={"LOKI_CRASH_AT": f"serve.returned:{signum.name}"})
    daemon.start()
    code, err = daemon.terminate()
    assert f"crash point serve.returned: sending {signum.name}" in err
    assert code == 0, err
    assert "Traceback" not in err, err
    _assert_stopped_cleanly(daemon, err)


@pytest.mark.parametrize("milestone", [None, "lokid.pid", "lokid.sock", "lokid.db"])
def test_sigterm_from_outside_early_in_the_start_leaves_nothing(
    daemon_factory: Factory, tmp_path: Path, milestone: str | None
) -> None:
    """Without a crash point: SIGTERM right after the spawn lands while Python itself
    starts (before lokid's first line runs: the default action, exit -15, nothing
    made yet) or early in lokid's start (exit 0); or as soon as the pid file, the
    socket or the database appears. Either way nothing is left behind."""
    daemon = daemon_factory(tmp_path / "home")
    daemon.start(wait=False)
    assert daemon.process is not None
    if milestone is not None:
        wait_until(lambda: (daemon.data / milestone).exists(), f"{milestone} exists")
    daemon.process.send_signal(signal.SIGTERM)
    _, raw = daemon.process.communicate(timeout=30)
    err = raw.decode()
    allowed = (0, -signal.SIGTERM) if milestone is None else (0,)
    assert daemon.process.returncode in allowed, err
    _assert_stopped_cleanly(daemon, err)
