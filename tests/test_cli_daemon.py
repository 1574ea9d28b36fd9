"""`loki api|dashboard start`, `lokid`, and how the CLI reports what goes wrong.

Most tests run `loki` in this process or parse its arguments; the ones marked
e2e start a real daemon.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lokid import cli
from lokid.cli import build_lokid_parser, build_parser, serve_argv

from .cli_kit import Cli
from .daemon_proc import DaemonProcess, run_cli, wait_until

GLOBAL_OPTIONS = [("--config", "cfg/ok.toml"), ("--data-dir", "d"), ("--socket", "s/l.sock")]


def given(args: Any) -> dict[str, Any]:
    """The options a parsed command line sets (config flags and --config)."""
    values = {key: value for key, value in vars(args).items() if key.startswith("cfg_")}
    values["config"] = args.config
    return {key: value for key, value in values.items() if value is not None}


@pytest.mark.parametrize("view", ["api", "dashboard"])
@pytest.mark.parametrize("option", GLOBAL_OPTIONS, ids=[o for o, _ in GLOBAL_OPTIONS])
def test_start_hands_each_global_option_to_the_daemon(view: str, option: tuple[str, str]) -> None:
    """Regression: they followed `serve`, and the daemon exited 2 (unrecognized arguments)."""
    args = build_parser().parse_args([*option, view, "start", "--port", "0"])
    argv = serve_argv(args)
    assert argv[:3] == [sys.executable, "-m", "lokid"]
    daemon = build_parser().parse_args(argv[3:])  # what `python -m lokid` parses
    assert daemon.command == "serve"
    assert given(daemon) == given(args)
    assert len(given(args)) == 2  # the option and the port


@pytest.mark.parametrize("option", GLOBAL_OPTIONS, ids=[o for o, _ in GLOBAL_OPTIONS])
def test_lokid_takes_the_global_options_anywhere(option: tuple[str, str]) -> None:
    """Regression: `lokid --config F` was `loki serve --config F`, refused."""
    before = build_lokid_parser().parse_args([*option, "--port", "0"])
    after = build_lokid_parser().parse_args(["--port", "0", *option])
    assert (
        given(before)
        == given(after)
        == given(build_parser().parse_args([*option, "serve", "--port", "0"]))
    )


def global_setup(tmp_path: Path) -> tuple[list[str], Path]:
    """--config, --data-dir and --socket, all away from LOKI_HOME; and the socket."""
    config = tmp_path / "ok.toml"
    config.write_text('default_provider = "command"\ndashboard_port = 0\napi_port = 0\n')
    socket_path = tmp_path / "s" / "l.sock"
    options = ["--config", str(config), "--data-dir", str(tmp_path / "d")]
    return [*options, "--socket", str(socket_path)], socket_path


def commands(parser: argparse.ArgumentParser, words: str) -> Iterator[tuple[str, Any]]:
    """(`loki api start`, its parser) for every command, `loki` itself first."""
    yield words, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, command in action.choices.items():
                yield from commands(command, f"{words} {name}")


@pytest.mark.parametrize("root", ["loki", "lokid"])
def test_every_command_and_option_has_its_help(root: str) -> None:
    """Regression: `--port` of `api|dashboard start` and `--json` of the status commands had
    none, and no command's --help had a description (the generated reference made them up)."""
    parser = build_parser() if root == "loki" else build_lokid_parser()
    for words, command in commands(parser, root):
        assert command.description, words
        for action in command._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, (words, action.option_strings or action.dest)


@pytest.mark.parametrize(
    ("view", "port_help"),
    [("api", "HTTP API port (0 = any)"), ("dashboard", "dashboard port; taken -> the next")],
)
def test_start_help_describes_the_command_and_its_port(
    capsys: pytest.CaptureFixture[str], view: str, port_help: str
) -> None:
    with pytest.raises(SystemExit) as exit:
        cli.main([view, "start", "--help"])
    assert exit.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Start the daemon in the background if needed." in text
    assert f"--port N {port_help}" in text


@pytest.mark.e2e
def test_api_start_with_global_options_starts_that_daemon(tmp_path: Path) -> None:
    options, socket_path = global_setup(tmp_path)
    home = tmp_path / "home"
    try:
        started = run_cli([*options, "api", "start"], home)
        assert started.returncode == 0, started.stderr
        assert f"socket: {socket_path}" in started.stdout
        status = json.loads(run_cli([*options, "status", "--json"], home).stdout)
        assert status["provider"] == "command"  # the config file was read
        assert (tmp_path / "d" / "lokid.pid").is_file()
    finally:
        stopped = run_cli([*options, "api", "stop"], home)
    assert stopped.returncode == 0, stopped.stderr


@pytest.mark.e2e
def test_lokid_with_global_options_serves(tmp_path: Path) -> None:
    options, socket_path = global_setup(tmp_path)
    code = "import sys; from lokid.cli import lokid_main; sys.exit(lokid_main())"
    process = subprocess.Popen(
        [sys.executable, "-c", code, "--log-level", "warning", *options],
        env={**os.environ, "LOKI_HOME": str(tmp_path / "home")},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:

        def status() -> Any:
            if process.poll() is not None or not socket_path.exists():
                return process.poll() is not None and {"exited": process.returncode}
            transport = httpx.HTTPTransport(uds=str(socket_path))
            with httpx.Client(transport=transport, base_url="http://lokid", timeout=5) as client:
                try:
                    answer = client.get("/api/status").json()
                except httpx.TransportError:
                    return None
            return answer if answer.get("phase") == "running" else None

        answer = wait_until(status, "lokid serves on its --socket")
        assert answer.get("provider") == "command", answer
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err.decode()


# -- one-line errors, never a traceback -----------------------------------------------

HINT = "Start it with `loki serve` or `loki api start`."


@pytest.fixture
def stopped_daemon(tmp_path: Path) -> Iterator[Path]:
    """The home of a daemon that accepts connections and never answers (`kill -STOP`)."""
    home = tmp_path / "home"
    (home / "lokid").mkdir(parents=True)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(home / "lokid" / "lokid.sock"))
    listener.listen()
    yield home
    listener.close()


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["api", "status"],
        ["dashboard", "status"],
        ["api", "start"],
        ["sessions"],
        ["events"],
        ["tasks"],
        ["token", "ls"],
    ],
)
def test_a_daemon_that_does_not_answer_is_a_one_line_error(
    loki: Cli, stopped_daemon: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    """Regression: an httpx.ReadTimeout traceback (after 5 s, or 40 s for `loki sessions`)."""
    for name in ("STATUS_TIMEOUT", "COMMAND_TIMEOUT", "EVENTS_TIMEOUT"):
        monkeypatch.setattr(cli, name, 0.2)
    monkeypatch.setattr(cli, "_spawned", [])
    result = loki.fails(stopped_daemon, *command)
    sock = stopped_daemon / "lokid" / "lokid.sock"
    assert (
        result.err == f"loki: lokid did not answer on {sock} within 0.2 s (stopped, or too busy?)\n"
    )
    assert cli._spawned == []  # `api start` did not start a second daemon


@pytest.mark.parametrize("command", [["status"], ["config", "show"], ["api", "start"], ["serve"]])
def test_a_config_file_that_is_not_utf8_is_a_config_error(
    loki: Cli, tmp_path: Path, command: list[str]
) -> None:
    """Regression: every command ended in a UnicodeDecodeError traceback."""
    (tmp_path / "lokid.toml").write_bytes(b"\xff\xfe = 1")
    result = loki(tmp_path, *command)
    assert result.code == 2
    file = tmp_path / "lokid.toml"
    assert (
        result.err == f"loki: config file {file} is not valid UTF-8: invalid start byte at byte 0\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "--port", "http"], "invalid api_port from flag: 'http' is not an integer"),
        (["serve", "--max-agents", "1_0"], "invalid max_agents from flag: '1_0' is not an integer"),
        (
            ["serve", "--shutdown-grace", "x"],
            "invalid shutdown_grace from flag: 'x' is not a number",
        ),
        (["api", "start", "--port", "-"], "invalid api_port from flag: '-' is not an integer"),
    ],
)
def test_a_bad_flag_value_is_the_one_line_config_error(
    loki: Cli, tmp_path: Path, args: list[str], message: str
) -> None:
    """Not argparse's usage and `invalid int value` (the environment's got one line)."""
    result = loki(tmp_path, *args)
    assert (result.code, result.err) == (2, f"loki: {message}\n")


@pytest.mark.parametrize(
    ("variable", "setting"),
    [("LOKI_HOME", "LOKI_HOME"), ("LOKI_DATA_DIR", "data_dir"), ("LOKI_SOCKET", "socket_path")],
)
def test_a_home_of_no_such_user_is_a_config_error(
    loki: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str, setting: str
) -> None:
    """Regression: RuntimeError: Could not determine home directory."""
    home = Path("~nosuchuser/x") if variable == "LOKI_HOME" else tmp_path
    if variable != "LOKI_HOME":
        monkeypatch.setenv(variable, "~nosuchuser/x")
    result = loki(home, "status")
    assert result.code == 2
    assert result.err == (
        f"loki: invalid {setting} from env {variable}: '~nosuchuser/x': "
        "cannot find the home directory of user 'nosuchuser'\n"
    )


def test_api_start_on_a_home_that_is_a_file_says_so(loki: Cli, tmp_path: Path) -> None:
    """Regression: a NotADirectoryError traceback (`loki serve` said it in one line)."""
    home = tmp_path / "home"
    home.write_text("")
    result = loki.fails(home, "api", "start")
    assert result.err == f"loki: cannot create data dir {home / 'lokid'}: Not a directory\n"


def test_api_start_that_cannot_write_its_log_says_so(loki: Cli, tmp_path: Path) -> None:
    """Regression: an OSError traceback (e.g. a read-only data dir)."""
    log = tmp_path / "lokid" / "lokid.log"
    log.mkdir(parents=True)  # cannot be opened for writing, even by root
    result = loki.fails(tmp_path, "api", "start")
    assert result.err == f"loki: cannot start lokid: {log}: Is a directory\n"


@pytest.mark.parametrize("follow", [[], ["-f"]])
def test_events_when_not_running_say_where_and_what_to_do(
    loki: Cli, tmp_path: Path, follow: list[str]
) -> None:
    """Regression: no hint, and `-f` did not name the socket."""
    sock = tmp_path / "lokid" / "lokid.sock"
    result = loki.fails(tmp_path, "events", *follow)
    assert result.err == f"lokid is not running (no control socket at {sock}). {HINT}\n"
    sock.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))  # a socket file nothing listens on
    stale.close()
    result = loki.fails(tmp_path, "events", *follow)
    assert result.err.startswith(f"lokid is not running (nothing answers on {sock}: ")
    assert result.err.endswith(f"). {HINT}\n")


def _envelope(event_id: int, message: str) -> dict[str, Any]:
    return {
        "id": event_id,
        "type": "log",
        "timestamp": "2026-11-29T10:00:00.000Z",
        "sessionId": None,
        "level": "info",
        "data": {"message": message},
    }


RESETS = [
    (
        {"reason": "expired", "lastEventId": 41, "firstAvailableId": 120, "message": "m"},
        "events 42-119 were removed by retention, missed here; replaying from 120",
    ),
    (
        {"reason": "expired", "lastEventId": 41, "firstAvailableId": 43, "message": "m"},
        "event 42 was removed by retention, missed here; replaying from 43",
    ),
    (
        {"reason": "expired", "lastEventId": 41, "firstAvailableId": None, "message": "m"},
        "every event after 41 was removed by retention; following new events",
    ),
    (
        {"reason": "unknown", "lastEventId": 900, "latestId": 12, "message": "m"},
        "the daemon has no event 900 (its latest is 12, so none up to 12 is replayed); "
        "following new events",
    ),
]


@pytest.mark.parametrize(("reset", "said"), RESETS)
def test_events_follow_shows_a_stream_reset_and_keeps_following(
    loki: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reset: dict[str, Any], said: str
) -> None:
    """Regression: a `stream.reset` (no id, no timestamp: no event envelope) ended
    `loki events -f` with KeyError 'timestamp' after a reconnect past retention."""

    class ResettingClient:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def __enter__(self) -> ResettingClient:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def stream_events(self, params: dict[str, str]) -> Iterator[dict[str, Any]]:
            yield _envelope(41, "before")
            yield {"type": "stream.reset", "data": reset}
            yield _envelope(120, "after")

    monkeypatch.setattr(cli, "ControlClient", ResettingClient)
    result = loki.ok(tmp_path, "events", "-f")
    before, shown, after = result.out.splitlines()
    assert before.endswith("    41 info    log before")
    assert shown.endswith(f"     - warning stream.reset {said}")
    assert after.endswith("   120 info    log after")


@pytest.mark.e2e
@pytest.mark.parametrize(("browser", "says"), [("false", True), ("true", False)])
def test_dashboard_open_without_a_browser_says_where_to_go(
    daemon: DaemonProcess, browser: str, says: bool
) -> None:
    """`webbrowser` runs $BROWSER: `false` is a machine where no browser opens."""
    opened = subprocess.run(
        [sys.executable, "-m", "lokid", "dashboard", "start", "--open"],
        env={**os.environ, "LOKI_HOME": str(daemon.home), "BROWSER": browser},
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert opened.returncode == 0, opened.stderr
    assert ("no web browser found here; open http://127.0.0.1:" in opened.stderr) is says


@pytest.mark.e2e
def test_a_start_failing_after_the_waiting_line_ends_that_line_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The error went on the same line as "waiting for lokid to become ready ..."."""
    from lokid.config import Config

    child = subprocess.Popen(["sh", "-c", "sleep 1.5; exit 3"])
    monkeypatch.setattr(cli, "_spawned", [child])
    monkeypatch.setattr(cli, "_daemon_status", lambda config, *, quiet=False: None)
    try:
        with pytest.raises(cli.CliError, match=r"lokid exited during start-up \(exit 3\)"):
            cli._wait_ready(Config(loki_home=tmp_path))
    finally:
        child.kill()
        child.wait(timeout=10)
    assert capsys.readouterr().err == "waiting for lokid to become ready ... failed\n"


def test_api_start_whose_daemon_lost_the_socket_path_says_so(
    loki: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: two `loki api start` at once (two data dirs, one socket path): the one
    whose daemon lost the path took the winner's status on that path for its own and
    printed `lokid started` with the winner's pid; its daemon had exited, refused."""
    path = tmp_path / "s" / "l.sock"
    winner = DaemonProcess(tmp_path / "a", extra_env={"LOKI_SOCKET": str(path)})
    winner.socket = path
    winner.start()
    assert winner.process is not None
    monkeypatch.setenv("LOKI_SOCKET", str(path))
    monkeypatch.setenv("LOKI_API_PORT", "0")
    monkeypatch.setenv("LOKI_DASHBOARD_PORT", "0")
    monkeypatch.setattr(cli, "_spawned", [])
    real_status = cli._daemon_status
    calls = []

    def nobody_at_first(config: Any, *, quiet: bool = False) -> Any:
        """The check before the spawn ran before the winner was listening."""
        calls.append(config)
        return None if len(calls) == 1 else real_status(config, quiet=quiet)

    monkeypatch.setattr(cli, "_daemon_status", nobody_at_first)
    try:
        result = loki.fails(tmp_path / "b", "api", "start")
    finally:
        for process in cli._spawned:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)
        winner.kill()
    assert result.out == ""
    assert "lokid exited during start-up (exit 1):\n" in result.err, result.err
    assert (
        f"another lokid (pid {winner.process.pid}) serves or is starting on the control socket "
        f"{path}"
    ) in result.err
