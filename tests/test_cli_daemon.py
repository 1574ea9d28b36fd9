"""`loki api|dashboard start`, `lokid`, and how the CLI reports what goes wrong.

Most tests run `loki` in this process or parse its arguments; the ones marked
e2e start a real daemon.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from lokid.cli import build_lokid_parser, build_parser, serve_argv

from .daemon_proc import run_cli, wait_until

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
