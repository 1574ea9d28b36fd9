"""The `loki` command line (and `lokid`, which is `loki serve`).

Control commands talk HTTP to the daemon over its Unix socket. Every command
takes `--json` where it prints data, prints a clear message and exits 1 when
the daemon is not running, and shows progress on waits longer than a moment.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
import webbrowser
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lokid import __version__
from lokid.client import ApiCallFailed, ControlClient, DaemonNotRunning
from lokid.config import Config, load_config
from lokid.errors import ConfigError, LokiError, StartupError
from lokid.pidfile import running_daemon

START_TIMEOUT = 30.0
POLL_INTERVAL = 0.1


class CliError(Exception):
    """Print the message to stderr and exit with `code`."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# -- argument parsing ----------------------------------------------------------

SERVE_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    # flag -> (config field, argparse options)
    "--host": ("api_host", {"metavar": "ADDR", "help": "HTTP API listen address"}),
    "--port": ("api_port", {"type": int, "metavar": "N", "help": "HTTP API port (0 = any)"}),
    "--dashboard-host": ("dashboard_host", {"metavar": "ADDR", "help": "dashboard address"}),
    "--dashboard-port": ("dashboard_port", {"type": int, "metavar": "N", "help": "dashboard port"}),
    "--allow-insecure-remote": (
        "allow_insecure_remote",
        {"action": "store_const", "const": True, "help": "allow non-loopback without auth"},
    ),
    "--provider": ("default_provider", {"metavar": "NAME", "help": "default provider"}),
    "--max-agents": ("max_agents", {"type": int, "metavar": "N", "help": "agent process cap"}),
    "--shutdown-grace": ("shutdown_grace", {"type": float, "metavar": "S", "help": "seconds"}),
    "--log-level": ("log_level", {"metavar": "LEVEL", "help": "debug|info|warning|error"}),
}

GLOBAL_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "--data-dir": ("data_dir", {"metavar": "DIR", "help": "data directory"}),
    "--socket": ("socket_path", {"metavar": "PATH", "help": "control socket path"}),
}


def _add_flags(
    parser: argparse.ArgumentParser, flags: dict[str, tuple[str, dict[str, Any]]]
) -> None:
    for flag, (field, options) in flags.items():
        parser.add_argument(flag, dest=f"cfg_{field}", default=None, **options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loki", description="Run and steer lokid, the Loki Mode daemon."
    )
    parser.add_argument("--version", action="version", version=f"lokid {__version__}")
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML config file")
    _add_flags(parser, GLOBAL_FLAGS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the daemon in the foreground")
    _add_flags(serve, SERVE_FLAGS)
    serve.set_defaults(handler=cmd_serve)

    for name, port_field in (("api", "api_port"), ("dashboard", "dashboard_port")):
        group = commands.add_parser(name, help=f"start, stop or inspect the daemon ({name} view)")
        actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")
        start = actions.add_parser("start", help="start the daemon in the background if needed")
        start.add_argument("--port", dest=f"cfg_{port_field}", type=int, default=None, metavar="N")
        if name == "dashboard":
            start.add_argument(
                "--open", action="store_true", help="open the dashboard in a browser"
            )
        start.set_defaults(handler=cmd_start, view=name)
        stop = actions.add_parser("stop", help="stop the daemon (SIGTERM, wait for a clean exit)")
        stop.set_defaults(handler=cmd_stop, view=name)
        status = actions.add_parser("status", help="is the daemon running, and where")
        status.add_argument("--json", action="store_true")
        status.set_defaults(handler=cmd_view_status, view=name)

    status = commands.add_parser("status", help="daemon status over the control socket")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=cmd_status)

    events = commands.add_parser("events", help="event history, or follow the live stream")
    events.add_argument("--follow", "-f", action="store_true", help="stream live events (SSE)")
    events.add_argument("--session", metavar="ID", help="only this session's events")
    events.add_argument("--types", metavar="LIST", help="comma list; `task.*` matches a family")
    events.add_argument("--min-level", metavar="LEVEL", help="debug, info, warning, error")
    events.add_argument("--limit", type=int, default=50, help="history size (default 50)")
    events.add_argument("--json", action="store_true", help="one envelope (JSON) per line")
    events.set_defaults(handler=cmd_events)

    config = commands.add_parser("config", help="configuration")
    config_actions = config.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = config_actions.add_parser("show", help="the effective configuration and its sources")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=cmd_config_show)
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    flags = {key[4:]: value for key, value in vars(args).items() if key.startswith("cfg_")}
    return load_config(flags, config_file=args.config)


# -- commands ------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace, config: Config) -> int:
    import trio

    from lokid.daemon import DaemonFailed, serve

    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        trio.run(lambda: serve(config, handle_signals=True))
    except StartupError as exc:
        raise CliError(f"lokid: {exc.message}") from None
    except DaemonFailed as exc:
        raise CliError(f"lokid: {exc.message}") from None
    return 0


def cmd_start(args: argparse.Namespace, config: Config) -> int:
    existing = _daemon_status(config, quiet=True)
    if existing is None:
        _spawn_daemon(args, config)
        existing = _wait_ready(config)
        verb = "started"
    else:
        verb = "already running"
    _print_where(args.view, existing, verb)
    if getattr(args, "open", False):
        webbrowser.open(existing["listeners"]["dashboard"])
    return 0


def _spawn_daemon(args: argparse.Namespace, config: Config) -> None:
    argv = [sys.executable, "-m", "lokid", "serve"]
    if args.config:
        argv += ["--config", str(args.config)]
    flags = {key[4:]: value for key, value in vars(args).items() if key.startswith("cfg_")}
    for flag, (field, _) in {**GLOBAL_FLAGS, **SERVE_FLAGS}.items():
        value = flags.get(field)
        if value is True:
            argv.append(flag)
        elif value is not None:
            argv += [flag, str(value)]
    config.data_path.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(config.log_file, "ab") as log_file:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
        )
    _spawned.append(process)


_spawned: list[subprocess.Popen[bytes]] = []


def _wait_ready(config: Config) -> dict[str, Any]:
    deadline = time.monotonic() + START_TIMEOUT
    shown = False
    while time.monotonic() < deadline:
        process = _spawned[-1]
        if process.poll() is not None:
            raise CliError(
                f"lokid exited during start-up (exit {process.returncode}):\n"
                + _tail(config.log_file)
            )
        status = _daemon_status(config, quiet=True)
        if status is not None and status.get("phase") == "running":
            if shown:
                print(" ready", file=sys.stderr)
            return status
        if not shown and time.monotonic() > deadline - START_TIMEOUT + 1.0:
            print("waiting for lokid to become ready ...", end="", file=sys.stderr, flush=True)
            shown = True
        time.sleep(POLL_INTERVAL)
    raise CliError(f"lokid did not become ready within {START_TIMEOUT:g}s; see {config.log_file}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def cmd_stop(args: argparse.Namespace, config: Config) -> int:
    daemon = running_daemon(config.pid_file)
    if daemon is None:
        raise CliError(f"lokid is not running (no live daemon recorded in {config.pid_file})")
    os.kill(daemon.pid, signal.SIGTERM)
    deadline = time.monotonic() + config.shutdown_grace + 5.0
    print(f"stopping lokid (pid {daemon.pid}) ...", end="", file=sys.stderr, flush=True)
    while running_daemon(config.pid_file) is not None and _alive(daemon.pid):
        if time.monotonic() > deadline:
            print(" still running", file=sys.stderr)
            raise CliError(
                f"lokid (pid {daemon.pid}) did not stop within {config.shutdown_grace + 5:g}s"
            )
        time.sleep(POLL_INTERVAL)
    print(" stopped", file=sys.stderr)
    return 0


def _alive(pid: int) -> bool:
    from lokid.process import is_zombie

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not is_zombie(pid)


def cmd_view_status(args: argparse.Namespace, config: Config) -> int:
    status = _daemon_status(config)
    assert status is not None
    if args.json:
        print(json.dumps({"running": True, "pid": status["pid"], "listeners": status["listeners"]}))
    else:
        _print_where(args.view, status, "running")
    return 0


def _print_where(view: str, status: dict[str, Any], verb: str) -> None:
    listeners = status["listeners"]
    main = listeners["dashboard"] if view == "dashboard" else listeners["api"]
    print(f"lokid {verb}: {main} (pid {status['pid']})")
    other = "api" if view == "dashboard" else "dashboard"
    print(f"  {other}: {listeners[other]}")
    print(f"  socket: {listeners['socket']}")


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    status = _daemon_status(config)
    assert status is not None
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    agents = status["agents"]
    rows = [
        ("status", status["status"]),
        ("version", status["version"]),
        ("pid", str(status["pid"])),
        ("uptime", _duration(status["uptimeSeconds"])),
        ("provider", status["provider"]),
        ("session", status["session"]["id"] if status["session"] else "-"),
        ("agents", f"{agents['active']}/{agents['total']}"),
        ("api", status["listeners"]["api"]),
        ("dashboard", status["listeners"]["dashboard"]),
        ("socket", status["listeners"]["socket"]),
    ]
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print("\nsupervisor tree:")
    for line in _tree_lines(status["supervisor"]):
        print(line)
    return 0


def _tree_lines(stats: dict[str, Any], indent: str = "  ") -> list[str]:
    lines = [f"{indent}{stats['name']} ({stats['strategy']}) restarts={stats['restartsTotal']}"]
    for child in stats["children"]:
        state = "running" if child["running"] else "stopped"
        detail = child.get("detail") or {}
        if isinstance(detail, dict) and "strategy" in detail:
            lines.extend(_tree_lines(detail, indent + "  "))
            continue
        extra = ""
        if isinstance(detail, dict) and "mailboxUsed" in detail:
            extra = f" mailbox={detail['mailboxUsed']}/{detail['mailboxSize']}"
        if isinstance(detail, dict) and "connectionsOpen" in detail:
            extra = f" connections={detail['connectionsOpen']}"
        last = f" last_exit={child['lastExit']}" if child.get("lastExit") else ""
        lines.append(f"{indent}  {child['id']}: {state} restarts={child['restarts']}{extra}{last}")
    return lines


def _duration(seconds: float) -> str:
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m {secs}s"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def cmd_events(args: argparse.Namespace, config: Config) -> int:
    query = {
        key: value
        for key, value in (
            ("sessionId", args.session),
            ("types", args.types),
            ("minLevel", args.min_level),
        )
        if value is not None
    }
    with ControlClient(config.socket, timeout=10.0) as client:
        if not args.follow:
            answer = client.get("/api/events/history", params={**query, "limit": args.limit})
            for event in answer["events"]:
                _print_event(event, as_json=args.json)
            return 0
        for event in client.stream_events(params={**query, "history": str(args.limit)}):
            _print_event(event, as_json=args.json)
    return 0


def _print_event(event: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(event, separators=(",", ":")), flush=True)
        return
    session = f" [{event['sessionId']}]" if event.get("sessionId") else ""
    data = event.get("data") or {}
    text = data.get("message") if isinstance(data.get("message"), str) else json.dumps(data)
    level = event.get("level", "info")
    print(
        f"{event['timestamp']} {event['id']:>6} {level:<7} {event['type']}{session} {text}",
        flush=True,
    )


def cmd_config_show(args: argparse.Namespace, config: Config) -> int:
    rows = config.show()
    if args.json:
        print(json.dumps({key: {"value": value, "source": source} for key, value, source in rows}))
        return 0
    width = max(len(key) for key, _, _ in rows)
    value_width = max(len(value) for _, value, _ in rows)
    for key, value, source in rows:
        print(f"{key:<{width}}  {value:<{value_width}}  ({source})")
    return 0


def _daemon_status(config: Config, *, quiet: bool = False) -> dict[str, Any] | None:
    try:
        with ControlClient(config.socket, timeout=5.0) as client:
            status: dict[str, Any] = client.get("/api/status")
            return status
    except DaemonNotRunning as exc:
        if quiet:
            return None
        raise CliError(f"{exc.message}. Start it with `loki serve` or `loki api start`.") from None


# -- entry points --------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace, Config], int] = args.handler
    try:
        config = config_from_args(args)
        return handler(args, config)
    except ConfigError as exc:
        print(f"loki: {exc.message}", file=sys.stderr)
        return 2
    except CliError as exc:
        print(str(exc), file=sys.stderr)
        return exc.code
    except ApiCallFailed as exc:
        print(f"loki: {exc.message}", file=sys.stderr)
        return 1
    except LokiError as exc:
        print(f"loki: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def lokid_main(argv: Sequence[str] | None = None) -> int:
    """`lokid [flags]` is `loki serve [flags]`."""
    return main(["serve", *(sys.argv[1:] if argv is None else argv)])
