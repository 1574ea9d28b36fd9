"""The `loki` command line (and `lokid`, which is `loki serve`).

Control commands talk HTTP to the daemon over its Unix socket. Every command
takes `--json` where it prints data, prints a clear message and exits 1 when
the daemon is not running, and shows progress on waits longer than a moment.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.parse
import webbrowser
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lokid import __version__
from lokid.client import (
    ApiCallFailed,
    ControlClient,
    DaemonHungUp,
    DaemonNotAnswering,
    DaemonNotRunning,
)
from lokid.config import Config, expand_user, load_config, shown_text
from lokid.crashpoints import crash_point
from lokid.errors import ConfigError, LokiError, StartupError
from lokid.pidfile import running_daemon
from lokid.session_state import Status
from lokid.startsignals import EarlySignals
from lokid.textrules import unshown
from lokid.timefmt import utc_now_iso

START_TIMEOUT = 30.0
COMMAND_TIMEOUT = 40.0  # the daemon answers a session command within 30 s
STATUS_TIMEOUT = 5.0  # /api/status answers at once; a daemon that does not is stuck
EVENTS_TIMEOUT = 10.0  # `loki events`: one page of history; `-f`: the stream's head
POLL_INTERVAL = 0.1
STOP_MARGIN = 5.0  # `loki api stop` waits the daemon's stop bound + this (its exit, slow kernels)
HURRY_SECONDS = 2.0  # lokid.daemon.HURRY_SECONDS (not imported: that would load trio)


class CliError(Exception):
    """Print the message to stderr and exit with `code`."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# -- argument parsing ----------------------------------------------------------


def _idempotency_key(raw: str) -> str:
    """An argparse type: the daemon's rule, checked before anything is sent (an HTTP
    client cannot even send some values, e.g. with a leading space or non-ASCII)."""
    from lokid import idempotency  # only when the option is given: it imports sqlite_utils

    try:
        key = idempotency.validate_key(raw)
    except LokiError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None
    assert key is not None
    return key


SERVE_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    # flag -> (config field, argparse options). Values stay text: `lokid.config` checks
    # them as it checks the environment's, with the same one-line message.
    "--host": ("api_host", {"metavar": "ADDR", "help": "HTTP API listen address"}),
    "--port": ("api_port", {"metavar": "N", "help": "HTTP API port (0 = any)"}),
    "--dashboard-host": ("dashboard_host", {"metavar": "ADDR", "help": "dashboard address"}),
    "--dashboard-port": ("dashboard_port", {"metavar": "N", "help": "dashboard port"}),
    "--allow-insecure-remote": (
        "allow_insecure_remote",
        {"action": "store_const", "const": True, "help": "allow non-loopback without auth"},
    ),
    "--provider": ("default_provider", {"metavar": "NAME", "help": "default provider"}),
    "--max-agents": ("max_agents", {"metavar": "N", "help": "agent process cap"}),
    "--shutdown-grace": ("shutdown_grace", {"metavar": "S", "help": "seconds"}),
    "--log-level": ("log_level", {"metavar": "LEVEL", "help": "debug|info|warning|error"}),
}

GLOBAL_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "--data-dir": ("data_dir", {"metavar": "DIR", "help": "data directory"}),
    "--socket": ("socket_path", {"metavar": "PATH", "help": "control socket path"}),
}


JSON_TABLE = "print JSON instead of a table"
SESSION_ID = "the session's id (`loki sessions` lists them)"


def _add_flags(
    parser: argparse.ArgumentParser, flags: dict[str, tuple[str, dict[str, Any]]]
) -> None:
    for flag, (field, options) in flags.items():
        parser.add_argument(flag, dest=f"cfg_{field}", default=None, **options)


def _add_global_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"lokid {__version__}")
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML config file")
    _add_flags(parser, GLOBAL_FLAGS)


def build_lokid_parser() -> argparse.ArgumentParser:
    """`lokid`: `loki serve` whose global options may come in any order with the others."""
    parser = argparse.ArgumentParser(
        prog="lokid",
        description="Run lokid, the Loki Mode daemon, in the foreground (`loki serve`).",
    )
    _add_global_options(parser)
    _add_flags(parser, SERVE_FLAGS)
    parser.set_defaults(handler=cmd_serve)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loki", description="Run and steer lokid, the Loki Mode daemon."
    )
    _add_global_options(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the daemon in the foreground")
    _add_flags(serve, SERVE_FLAGS)
    serve.set_defaults(handler=cmd_serve)

    for name, port_field, port_help in (
        ("api", "api_port", "HTTP API port (0 = any)"),
        ("dashboard", "dashboard_port", "dashboard port; taken -> the next free one; 0 = any"),
    ):
        group = commands.add_parser(name, help=f"start, stop or inspect the daemon ({name} view)")
        actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")
        start = actions.add_parser("start", help="start the daemon in the background if needed")
        start.add_argument(
            "--port", dest=f"cfg_{port_field}", default=None, metavar="N", help=port_help
        )
        if name == "dashboard":
            start.add_argument(
                "--open", action="store_true", help="open the dashboard in a browser"
            )
        start.set_defaults(handler=cmd_start, view=name)
        stop = actions.add_parser("stop", help="stop the daemon (SIGTERM, wait for a clean exit)")
        stop.set_defaults(handler=cmd_stop, view=name)
        status = actions.add_parser("status", help="is the daemon running, and where")
        status.add_argument("--json", action="store_true", help=JSON_TABLE)
        status.set_defaults(handler=cmd_view_status, view=name)

    status = commands.add_parser("status", help="daemon status over the control socket")
    status.add_argument("--json", action="store_true", help=JSON_TABLE)
    status.set_defaults(handler=cmd_status)

    events = commands.add_parser("events", help="event history, or follow the live stream")
    events.add_argument("--follow", "-f", action="store_true", help="stream live events (SSE)")
    events.add_argument("--session", metavar="ID", help="only this session's events")
    events.add_argument("--types", metavar="LIST", help="comma list; `task.*` matches a family")
    events.add_argument("--min-level", metavar="LEVEL", help="debug, info, warning, error")
    events.add_argument("--limit", type=int, default=50, help="history size (default 50)")
    events.add_argument("--json", action="store_true", help="one envelope (JSON) per line")
    events.set_defaults(handler=cmd_events)

    _add_session_commands(commands)
    _add_enterprise_commands(commands)
    _add_registry_commands(commands)

    config = commands.add_parser("config", help="configuration")
    config_actions = config.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = config_actions.add_parser("show", help="the effective configuration and its sources")
    show.add_argument("--json", action="store_true", help=JSON_TABLE)
    show.set_defaults(handler=cmd_config_show)

    _add_service_commands(commands)
    _describe_commands(parser)
    return parser


def _describe_commands(parser: argparse.ArgumentParser) -> None:
    """Open each command's `--help` with its summary (argparse shows that only in the
    parent's list), so that `--help` and the generated reference say the same."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        summaries = {choice.dest: choice.help for choice in action._choices_actions}
        for name, command in action.choices.items():
            summary = summaries.get(name)
            if command.description is None and summary:
                command.description = summary[:1].upper() + summary[1:].rstrip(".") + "."
            _describe_commands(command)


def _add_service_commands(commands: Any) -> None:
    """`loki service install` (lokid.service; docs/operations.md, systemd)."""
    service = commands.add_parser("service", help="systemd units for this installation")
    actions = service.add_subparsers(dest="action", required=True, metavar="ACTION")
    install = actions.add_parser("install", help="write lokid.service and its socket units")
    install.add_argument("--user", action="store_true", help="user units (systemctl --user)")
    install.add_argument(
        "--unit-dir",
        metavar="DIR",
        help="where to write them (default: "
        "/etc/systemd/system, or ~/.config/systemd/user with --user)",
    )
    install.add_argument("--dry-run", action="store_true", help="print the units, write nothing")
    install.add_argument("--force", action="store_true", help="overwrite units that differ")
    install.add_argument(
        "--enable",
        action="store_true",
        help="then run systemctl daemon-reload and enable --now lokid.socket",
    )
    install.add_argument(
        "--run-as",
        metavar="USER",
        help="system units: the account lokid and its agents run as "
        "(default: $SUDO_USER, else the current user)",
    )
    install.add_argument(
        "--exec",
        metavar="PATH",
        help="the lokid executable (default: the one of this installation)",
    )
    install.set_defaults(handler=cmd_service_install)


def cmd_service_install(args: argparse.Namespace, config: Config) -> int:
    from lokid.service import install_command

    return install_command(args, config)


SESSION_STATUSES = tuple(status.value for status in Status)
# lokid.tokens.SCOPES (a test keeps them equal); importing it costs every command ~65 ms
TOKEN_SCOPES = ("read", "write", "audit", "admin")
TASK_STATUSES = ("pending", "active", "completed", "failed")


def _add_session_commands(commands: Any) -> None:
    """`loki start`, `loki sessions ...`, `loki tasks` (DESIGN.md §3)."""
    start = commands.add_parser("start", help="start a session over a PRD")
    start.add_argument("prd", metavar="PRD", help="the PRD file (relative to this folder)")
    start.add_argument(
        "--provider", metavar="P", help="claude, codex, gemini, ... (default: the daemon's)"
    )
    start.add_argument("--project", metavar="DIR", help="project folder (default: from the PRD)")
    start.add_argument("--parallel", action="store_true", help="run independent tasks at once")
    start.add_argument("--sandbox", action="store_true", help="run agents under bubblewrap")
    start.add_argument("--max-iterations", type=int, metavar="N", help="agent runs at most")
    start.add_argument("--verify", metavar="CMD", help="shell command that must pass to complete")
    start.add_argument(
        "--idempotency-key",
        metavar="K",
        type=_idempotency_key,
        help="retry-safe: same key, one session (1-255 printable ASCII characters)",
    )
    start.add_argument("--json", action="store_true", help="print the API answer")
    start.set_defaults(handler=cmd_session_start)

    sessions = commands.add_parser("sessions", help="list, show and steer sessions")
    _add_list_flags(sessions, argparse.SUPPRESS)
    sessions.set_defaults(handler=cmd_sessions_ls, status=None, limit=None, json=False)
    actions = sessions.add_subparsers(dest="action", metavar="ACTION")
    ls = actions.add_parser("ls", help="sessions, newest first (the default)")
    _add_list_flags(ls, argparse.SUPPRESS)
    ls.set_defaults(handler=cmd_sessions_ls)
    show = actions.add_parser("show", help="one session and its tasks")
    show.add_argument("id", metavar="ID", help=SESSION_ID)
    show.add_argument("--json", action="store_true", help="print the API answer")
    show.set_defaults(handler=cmd_sessions_show)
    for name, summary in (
        ("stop", "stop a session (its agents are stopped)"),
        ("pause", "pause a session between agent runs"),
        ("resume", "resume a paused or interrupted session"),
    ):
        command = actions.add_parser(name, help=summary)
        command.add_argument("id", metavar="ID", help=SESSION_ID)
        if name == "pause":
            command.add_argument("--now", action="store_true", help="stop running agents too")
        command.add_argument("--json", action="store_true", help="print the API answer")
        command.set_defaults(handler=cmd_sessions_command, command_name=name)
    send = actions.add_parser("input", help="send a message into the next agent prompt")
    send.add_argument("id", metavar="ID", help=SESSION_ID)
    send.add_argument("message", metavar="MESSAGE", help="the message; `-` reads it from stdin")
    send.add_argument(
        "--idempotency-key",
        metavar="K",
        type=_idempotency_key,
        help="retry-safe: same key, one input (1-255 printable ASCII characters)",
    )
    send.add_argument("--json", action="store_true", help="print the API answer")
    send.set_defaults(handler=cmd_sessions_input)
    rm = actions.add_parser("rm", help="delete a session that is not active (not its files)")
    rm.add_argument("id", metavar="ID", help=SESSION_ID)
    rm.add_argument("--json", action="store_true", help='print {"id", "deleted": true}')
    rm.set_defaults(handler=cmd_sessions_rm)

    tasks = commands.add_parser("tasks", help="tasks of every session, or of one")
    tasks.add_argument("--session", metavar="ID", help="only this session's tasks")
    which = tasks.add_mutually_exclusive_group()
    which.add_argument("--status", choices=TASK_STATUSES, help="only tasks in this status")
    which.add_argument("--active", action="store_true", help="tasks an agent works on now")
    which.add_argument("--queue", action="store_true", help="pending tasks, in run order")
    tasks.add_argument("--limit", type=int, metavar="N", help="at most N (default 100)")
    tasks.add_argument("--json", action="store_true", help="print the API answer")
    tasks.set_defaults(handler=cmd_tasks)


def _add_list_flags(parser: argparse.ArgumentParser, default: Any) -> None:
    # Given on `sessions` or on `sessions ls`; SUPPRESS keeps one from erasing the other.
    parser.add_argument(
        "--status",
        choices=SESSION_STATUSES,
        default=default,
        metavar="S",
        help=f"only sessions in this status ({', '.join(SESSION_STATUSES)})",
    )
    parser.add_argument("--limit", type=int, metavar="N", default=default, help="default 100")
    parser.add_argument("--json", action="store_true", default=default, help="the API answer")


def _add_enterprise_commands(commands: Any) -> None:
    """`loki token ...` and `loki audit ...` (DESIGN.md §3, §4)."""
    token = commands.add_parser("token", help="create, list and revoke API tokens")
    actions = token.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="create a token (its secret is shown once)")
    create.add_argument("--name", required=True, metavar="NAME", help="what the token is for")
    create.add_argument(
        "--scopes",
        required=True,
        action="append",
        metavar="LIST",
        help=f"comma list of {', '.join(TOKEN_SCOPES)} (may be repeated)",
    )
    create.add_argument("--expires-days", type=int, metavar="N", help="default: never expires")
    create.add_argument("--json", action="store_true", help="print the API answer")
    create.set_defaults(handler=cmd_token_create)
    ls = actions.add_parser("ls", help="tokens, newest first (never their secrets)")
    _add_page_flags(ls, None)
    ls.add_argument("--json", action="store_true", help="print the API answer")
    ls.set_defaults(handler=cmd_token_ls)
    revoke = actions.add_parser("revoke", help="revoke a token (it stays listed)")
    revoke.add_argument("id", metavar="ID", help="the token's id (`loki token ls` lists them)")
    revoke.add_argument("--json", action="store_true", help="print the API answer")
    revoke.set_defaults(handler=cmd_token_revoke)

    audit = commands.add_parser("audit", help="the audit log: entries, summary, verify")
    _add_audit_list_flags(audit, argparse.SUPPRESS)
    audit.set_defaults(
        handler=cmd_audit_ls,
        start=None,
        end=None,
        audit_action=None,
        limit=None,
        offset=None,
        json=False,
    )
    audit_actions = audit.add_subparsers(dest="action", metavar="ACTION")
    audit_ls = audit_actions.add_parser("ls", help="entries, newest first (the default)")
    _add_audit_list_flags(audit_ls, argparse.SUPPRESS)
    audit_ls.set_defaults(handler=cmd_audit_ls)
    summary = audit_actions.add_parser("summary", help="totals by action, actor and status")
    summary.add_argument("--json", action="store_true", help="print the API answer")
    summary.set_defaults(handler=cmd_audit_summary)
    verify = audit_actions.add_parser("verify", help="check the hash chain; exit 1 on any problem")
    verify.add_argument(
        "--offline",
        action="store_true",
        help="read the database file, not the daemon (the default when it is not running)",
    )
    verify.add_argument("--json", action="store_true", help="print the report")
    verify.set_defaults(handler=cmd_audit_verify)


def _add_page_flags(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("--limit", type=int, metavar="N", default=default, help="default 100")
    parser.add_argument("--offset", type=int, metavar="N", default=default, help="skip N")


def _add_audit_list_flags(parser: argparse.ArgumentParser, default: Any) -> None:
    # Given on `audit` or on `audit ls`; SUPPRESS keeps one from erasing the other.
    parser.add_argument(
        "--start", metavar="T", default=default, help="entries at or after (ISO-8601 or date)"
    )
    parser.add_argument(
        "--end", metavar="T", default=default, help="entries before (a date: that whole day)"
    )
    parser.add_argument(
        "--action",
        dest="audit_action",
        metavar="A",
        default=default,
        help="exact (token.create) or a family (session.*)",
    )
    _add_page_flags(parser, default)
    parser.add_argument("--json", action="store_true", default=default, help="the API answer")


REGISTRY_STATUSES = ("ok", "missing", "unreadable")  # lokid.actors.registry_scanner.ENTRY_STATUSES


def _add_registry_commands(commands: Any) -> None:
    """`loki registry [ls|add|rm|discover|sync]` (DESIGN.md §3, §7)."""
    registry = commands.add_parser("registry", help="the cross-project registry of .loki folders")
    _add_registry_list_flags(registry, argparse.SUPPRESS)
    registry.set_defaults(handler=cmd_registry_ls, status=None, limit=None, offset=None, json=False)
    actions = registry.add_subparsers(dest="action", metavar="ACTION")
    ls = actions.add_parser("ls", help="registered projects, newest first (the default)")
    _add_registry_list_flags(ls, argparse.SUPPRESS)
    ls.set_defaults(handler=cmd_registry_ls)
    add = actions.add_parser("add", help="register a project folder")
    add.add_argument("path", metavar="PATH", help="the folder (relative to this one)")
    add.add_argument("--name", metavar="NAME", help="default: the folder's name")
    add.add_argument("--json", action="store_true", help="print the API answer")
    add.set_defaults(handler=cmd_registry_add)
    rm = actions.add_parser("rm", help="unregister a project (its files are not touched)")
    rm.add_argument("target", metavar="ID|PATH", help="a reg- id, or the registered folder")
    rm.add_argument("--json", action="store_true", help='print {"id", "unregistered": true}')
    rm.set_defaults(handler=cmd_registry_rm)
    discover = actions.add_parser("discover", help="find folders holding .loki/")
    discover.add_argument(
        "--root",
        dest="roots",
        action="append",
        metavar="DIR",
        help="where to look (may be repeated; default: the daemon's configured roots)",
    )
    discover.add_argument("--depth", type=int, metavar="N", help="folders below a root (1-10)")
    discover.add_argument("--register", action="store_true", help="register what is new")
    discover.add_argument("--json", action="store_true", help="print the API answer")
    discover.set_defaults(handler=cmd_registry_discover)
    sync = actions.add_parser("sync", help="refresh every entry (status, task counts) now")
    sync.add_argument("--json", action="store_true", help="print the API answer")
    sync.set_defaults(handler=cmd_registry_sync)


def _add_registry_list_flags(parser: argparse.ArgumentParser, default: Any) -> None:
    # Given on `registry` or on `registry ls`; SUPPRESS keeps one from erasing the other.
    parser.add_argument(
        "--status",
        choices=REGISTRY_STATUSES,
        default=default,
        metavar="S",
        help="only entries in this status (ok, missing, unreadable)",
    )
    _add_page_flags(parser, default)
    parser.add_argument("--json", action="store_true", default=default, help="the API answer")


ARGUMENT_NAMES = {
    # dest -> what the user typed, for the messages of `check_arguments`
    "prd": "PRD",
    "path": "PATH",
    "id": "ID",
    "message": "MESSAGE",
    "target": "ID|PATH",
    "audit_action": "--action",
    "roots": "--root",
}
NOT_EMPTY = frozenset({"prd", "path", "id", "target", "project", "session", "roots"})
"""Paths and ids: an empty one (an unset `$VAR`) would mean this folder, or a route's
collection, not what the user meant."""


def _argument_name(dest: str) -> str:
    return ARGUMENT_NAMES.get(dest, "--" + dest.replace("_", "-"))


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse, in one line, text arguments lokid cannot take (exit 2, as argparse's).

    Python hands undecodable argv bytes over as lone surrogates: they cannot go
    into the API's JSON or URLs (httpx failed with a UnicodeEncodeError). The
    config flags (`cfg_*`) are local paths and values `lokid.config` checks.
    """
    for dest, value in vars(args).items():
        if dest.startswith("cfg_") or dest in ("handler", "config"):
            continue
        for text in value if isinstance(value, list) else [value]:
            if not isinstance(text, str):
                continue
            name = _argument_name(dest)
            if not _is_utf8(text):
                raise CliError(f"loki: {name} is not valid UTF-8: {_shown(text)}", code=2)
            if dest in NOT_EMPTY and not text:
                raise CliError(f"loki: {name} is empty (an unset variable?)", code=2)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def config_from_args(args: argparse.Namespace) -> Config:
    flags = {key[4:]: value for key, value in vars(args).items() if key.startswith("cfg_")}
    return load_config(flags, config_file=args.config)


# -- commands ------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace, config: Config) -> int:
    # Noted from `run` on (before the configuration is read); `lokid.startsignals`.
    early: EarlySignals = getattr(args, "early_signals", None) or EarlySignals.install()
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    crash_point("serve.begin")
    import trio

    from lokid.daemon import DaemonFailed, serve

    try:
        trio.run(lambda: serve(config, handle_signals=True, early=early))
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
        _check_running_port(args, config, existing)
    _print_where(args.view, existing, verb)
    if getattr(args, "open", False):
        url = existing["listeners"]["dashboard"]
        if not webbrowser.open(url):  # e.g. a server without a desktop
            print(_shown(f"loki: no web browser found here; open {url} yourself"), file=sys.stderr)
    return 0


def _check_running_port(args: argparse.Namespace, config: Config, status: dict[str, Any]) -> None:
    """A `--port` the running daemon does not serve on: its port stays (a start does not
    move a running daemon). The API's port is a fixed address, so that is an error; the
    dashboard's is a wish anyway (taken -> the next free one), so a warning."""
    field = f"{args.view}_port"
    if getattr(args, f"cfg_{field}", None) is None or getattr(config, field) == 0:
        return
    wanted = getattr(config, field)
    try:
        running = urllib.parse.urlsplit(status["listeners"][args.view]).port
    except (KeyError, TypeError, ValueError):
        return
    if running == wanted:
        return
    said = (
        f"lokid already runs with the {args.view} on port {running}, not {wanted}; "
        f"to move it, stop it first (`loki {args.view} stop`)"
    )
    if args.view == "api":
        raise CliError(f"loki: {said}")
    print(f"loki: warning: {said}", file=sys.stderr)


def serve_argv(args: argparse.Namespace) -> list[str]:
    """`python -m lokid [global options] serve [options]` with the options `args` were given.

    The global options go before `serve`: argparse refuses them after the command."""
    flags = {key[4:]: value for key, value in vars(args).items() if key.startswith("cfg_")}
    argv = [sys.executable, "-m", "lokid"]
    if args.config:
        argv += ["--config", str(args.config)]
    argv += _flag_words(GLOBAL_FLAGS, flags)
    argv.append("serve")
    argv += _flag_words(SERVE_FLAGS, flags)
    return argv


def _flag_words(known: dict[str, tuple[str, dict[str, Any]]], flags: dict[str, Any]) -> list[str]:
    words: list[str] = []
    for flag, (field, _) in known.items():
        value = flags.get(field)
        if value is True:
            words.append(flag)
        elif value is not None:
            words += [flag, str(value)]
    return words


def _spawn_daemon(args: argparse.Namespace, config: Config) -> None:
    argv = serve_argv(args)
    try:
        config.data_path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:  # the words of `loki serve`'s own refusal
        raise CliError(f"loki: cannot create data dir {config.data_path}: {exc.strerror}") from None
    try:
        with open(config.log_file, "ab") as log_file:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,
            )
    except OSError as exc:  # the log cannot be written (a read-only data dir), or no python
        raise CliError(f"loki: cannot start lokid: {exc.filename}: {exc.strerror}") from None
    _spawned.append(process)


_spawned: list[subprocess.Popen[bytes]] = []


def _wait_ready(config: Config) -> dict[str, Any]:
    deadline = time.monotonic() + START_TIMEOUT
    shown = False
    while time.monotonic() < deadline:
        process = _spawned[-1]
        if process.poll() is not None:
            if shown:  # end the "waiting ..." line before the error
                print(" failed", file=sys.stderr)
            raise CliError(
                f"lokid exited during start-up (exit {process.returncode}):\n"
                + _tail(config.log_file)
            )
        try:
            status = _daemon_status(config, quiet=True)
        except (DaemonNotAnswering, DaemonHungUp):  # busy starting: wait until START_TIMEOUT
            status = None
        # Only our child's answer: a daemon of another data dir that won the socket
        # path while ours started answers there too, and ours then exits refused.
        if status is not None and status.get("phase") == "running" and status["pid"] == process.pid:
            if shown:
                print(" ready", file=sys.stderr)
            return status
        if not shown and time.monotonic() > deadline - START_TIMEOUT + 1.0:
            print("waiting for lokid to become ready ...", end="", file=sys.stderr, flush=True)
            shown = True
        time.sleep(POLL_INTERVAL)
    if shown:
        print(" not ready", file=sys.stderr)
    raise CliError(f"lokid did not become ready within {START_TIMEOUT:g}s; see {config.log_file}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def cmd_stop(args: argparse.Namespace, config: Config) -> int:
    _check_pid_file(config.pid_file)
    daemon = running_daemon(config.pid_file)
    if daemon is None:
        raise CliError(f"lokid is not running (no live daemon recorded in {config.pid_file})")
    bound, whose = _stop_bound(config, daemon.pid)  # asked before the stop: then it may not answer
    try:
        os.kill(daemon.pid, signal.SIGTERM)
    except PermissionError:
        raise CliError(
            f"loki: lokid (pid {daemon.pid}) runs as another account: this user may not stop "
            "it (Operation not permitted); stop it as that account or as root "
            "(`systemctl stop lokid` for the system units)"
        ) from None
    wait = bound + STOP_MARGIN
    deadline = time.monotonic() + wait
    print(f"stopping lokid (pid {daemon.pid}) ...", end="", file=sys.stderr, flush=True)
    while running_daemon(config.pid_file) is not None and _alive(daemon.pid):
        if time.monotonic() > deadline:
            print(" still running", file=sys.stderr)
            raise CliError(
                f"lokid (pid {daemon.pid}) did not stop within {wait:g}s ({whose}); "
                "it may still be stopping: see its log"
            )
        time.sleep(POLL_INTERVAL)
    print(" stopped", file=sys.stderr)
    return 0


def _stop_bound(config: Config, pid: int) -> tuple[float, str]:
    """How long the daemon `pid` may take to stop, and where that bound comes from.

    The daemon's own (`stopBoundSeconds` of /api/status, from its `shutdown_grace`,
    which this shell's settings need not share); else, when it does not say (no
    answer within STATUS_TIMEOUT, another daemon on the socket path, an older lokid),
    this configuration's `shutdown_grace` + HURRY_SECONDS."""
    try:
        status = _daemon_status(config, quiet=True)
    except LokiError:
        status = None
    bound = status.get("stopBoundSeconds") if status and status.get("pid") == pid else None
    if isinstance(bound, int | float) and not isinstance(bound, bool) and 0 < bound < math.inf:
        return float(bound), f"its stop bound {bound:g} s + {STOP_MARGIN:g} s"
    return (
        config.shutdown_grace + HURRY_SECONDS,
        f"lokid did not say its stop bound: this configuration's shutdown_grace "
        f"{config.shutdown_grace:g} s + {HURRY_SECONDS + STOP_MARGIN:g} s",
    )


def _check_pid_file(path: Path) -> None:
    """An unreadable pid file is not "not running": the daemon is another account's."""
    try:
        with path.open("rb"):
            pass
    except FileNotFoundError:
        return
    except OSError as exc:
        raise CliError(
            f"loki: cannot read lokid's pid file {path}: {exc.strerror} (lokid runs as "
            "another account? stop it as that account or as root)"
        ) from None


def _alive(pid: int) -> bool:
    from lokid.process import is_zombie

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another account's process: alive
        return True
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
    print(_shown(f"lokid {verb}: {main} (pid {status['pid']})"))
    other = "api" if view == "dashboard" else "dashboard"
    print(_shown(f"  {other}: {listeners[other]}"))
    print(_shown(f"  socket: {listeners['socket']}"))


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
    _print_fields(rows)
    print("\nsupervisor tree:")
    for line in _tree_lines(status["supervisor"]):
        print(_shown(line))
    return 0


def _tree_lines(stats: dict[str, Any], indent: str = "  ") -> list[str]:
    head = f"{indent}{stats['name']} ({stats['strategy']}) restarts={stats['restartsTotal']}"
    backoff = stats.get("backoff") or {}
    down = bool(backoff.get("down"))
    if down:  # a back-off supervisor keeping its children down (lokid.supervisor)
        retry = math.ceil(backoff.get("retryInSeconds") or 0)
        head += f" DOWN, retry in {_duration(retry)} (last failure: {backoff.get('lastFailure')})"
    lines = [head]
    for child in stats["children"]:
        state = "running" if child["running"] else "down" if down else "stopped"
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


EVENTS_FLAGS = {
    "history": "--limit",
    "limit": "--limit",
    "sessionId": "--session",
    "types": "--types",
    "minLevel": "--min-level",
}
"""The query parameter `loki events` sends for each flag: a refusal names the flag."""


def cmd_events(args: argparse.Namespace, config: Config) -> int:
    try:
        return _events(args, config)
    except ApiCallFailed as exc:
        flag = EVENTS_FLAGS.get(exc.field or "")
        if flag is None or exc.field is None or not exc.message.startswith(exc.field):
            raise
        raise CliError(f"loki: {flag}{exc.message.removeprefix(exc.field)}") from None


def _events(args: argparse.Namespace, config: Config) -> int:
    query = {
        key: value
        for key, value in (
            ("sessionId", args.session),
            ("types", args.types),
            ("minLevel", args.min_level),
        )
        if value is not None
    }
    if not args.follow:
        params = {**query, "limit": args.limit}
        answer = _call(config, "GET", "/api/events/history", params=params, timeout=EVENTS_TIMEOUT)
        for event in answer["events"]:
            _print_event(event, as_json=args.json)
        return 0
    try:
        with ControlClient(config.socket, timeout=EVENTS_TIMEOUT) as client:
            for event in client.stream_events(params={**query, "history": str(args.limit)}):
                _print_event(event, as_json=args.json)
    except DaemonNotRunning as exc:
        raise _not_running(exc) from None
    # The stream only ends for good when the daemon stops (a clean end of the follow).
    print("loki: lokid is stopping: the event stream ended", file=sys.stderr)
    return 0


def _print_event(event: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(event, separators=(",", ":")), flush=True)
        return
    if event.get("type") == "stream.reset" and "id" not in event:
        # Not an event envelope (no id, no timestamp): the daemon could not replay all.
        text = _shown(_reset_text(event.get("data") or {}))
        print(f"{utc_now_iso()} {'-':>6} {'warning':<7} stream.reset {text}", flush=True)
        return
    session = f" [{event['sessionId']}]" if event.get("sessionId") else ""
    data = event.get("data") or {}
    message = data.get("message")
    text = _shown(message) if isinstance(message, str) else json.dumps(data)
    level = event.get("level", "info")
    print(
        f"{event['timestamp']} {event['id']:>6} {level:<7} {event['type']}{session} {text}",
        flush=True,
    )


def _reset_text(data: dict[str, Any]) -> str:
    """What a `stream.reset` means for the reader: which events it will not see."""
    after = int(data.get("lastEventId") or 0)
    if data.get("reason") == "expired":
        first = data.get("firstAvailableId")
        if first is None:
            return f"every event after {after} was removed by retention; following new events"
        lost = (
            f"event {after + 1} was"
            if first == after + 2
            else f"events {after + 1}-{first - 1} were"
        )
        return f"{lost} removed by retention, missed here; replaying from {first}"
    if data.get("reason") == "unknown":
        latest = data.get("latestId")
        return (
            f"the daemon has no event {after} (its latest is {latest}, so none up to "
            f"{latest} is replayed); following new events"
        )
    return str(data.get("message", "the stream could not be replayed completely"))


def cmd_config_show(args: argparse.Namespace, config: Config) -> int:
    rows = config.show()
    if args.json:
        print(json.dumps({key: {"value": value, "source": source} for key, value, source in rows}))
        return 0
    texts = [(key, _shown(shown_text(value)), _shown(source)) for key, value, source in rows]
    width = max(len(key) for key, _, _ in texts)
    value_width = max(len(text) for _, text, _ in texts)
    for key, text, source in texts:
        print(f"{key:<{width}}  {text:<{value_width}}  ({source})")
    return 0


def _daemon_status(config: Config, *, quiet: bool = False) -> dict[str, Any] | None:
    try:
        with ControlClient(config.socket, timeout=STATUS_TIMEOUT) as client:
            status: dict[str, Any] = client.get("/api/status")
            return status
    except DaemonNotRunning as exc:
        if quiet:
            return None
        raise _not_running(exc) from None


def _not_running(exc: DaemonNotRunning) -> CliError:
    return CliError(f"{exc.message}. Start it with `loki serve` or `loki api start`.")


def _call(config: Config, method: str, path: str, **kwargs: Any) -> Any:
    """One request over the control socket; the answer's JSON (None for 204)."""
    try:
        with ControlClient(config.socket, timeout=COMMAND_TIMEOUT) as client:
            return client.request(method, path, **kwargs)
    except DaemonNotRunning as exc:
        raise _not_running(exc) from None


# -- sessions and tasks ----------------------------------------------------------


def _path_argument(text: str, name: str) -> str:
    """A path argument as the daemon needs it: absolute, relative ones against this
    folder, a leading `~` or `~user` expanded (in every path argument, as in the
    config's paths, quoted or not)."""
    try:
        return os.path.abspath(expand_user(text))
    except ValueError as exc:
        raise CliError(f"loki: {name}: {exc}", code=2) from None


def cmd_session_start(args: argparse.Namespace, config: Config) -> int:
    body: dict[str, Any] = {"prd": _path_argument(args.prd, "PRD")}
    if args.provider is not None:
        body["provider"] = args.provider
    if args.project is not None:
        body["projectDir"] = _path_argument(args.project, "--project")
    options: dict[str, Any] = {}
    if args.parallel:
        options["parallel"] = True
    if args.sandbox:
        options["sandbox"] = True
    if args.max_iterations is not None:
        options["maxIterations"] = args.max_iterations
    if args.verify is not None:
        options["verify"] = args.verify
    if options:
        body["options"] = options
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
    answer = _call(config, "POST", "/api/sessions", json=body, headers=headers)
    return _print_id_and_status(args, answer)


def cmd_sessions_ls(args: argparse.Namespace, config: Config) -> int:
    params = {"status": args.status, "limit": args.limit}
    answer = _call(
        config,
        "GET",
        "/api/sessions",
        params={key: value for key, value in params.items() if value is not None},
    )
    if args.json:
        _print_json(answer)
        return 0
    rows = [
        (
            session["id"],
            session["status"],
            session["phase"] or "-",
            str(session["iteration"]),
            f"{session['tasks']['completed']}/{session['tasks']['total']}",
            _cost(session["costUsd"]),
            session["createdAt"],
        )
        for session in answer["sessions"]
    ]
    headers = ("ID", "STATUS", "PHASE", "ITER", "TASKS", "COST", "CREATED")
    _print_table(headers, rows, empty="no sessions")
    _print_more(answer, "sessions")
    return 0


def cmd_sessions_show(args: argparse.Namespace, config: Config) -> int:
    session = _call(config, "GET", f"/api/sessions/{_quote(args.id)}")
    if args.json:
        _print_json(session)
        return 0
    tasks, agents, options = session["tasks"], session["agents"], session["options"]
    set_options = {key: value for key, value in options.items() if value not in (None, False)}
    rows = [
        ("id", session["id"]),
        ("status", session["status"]),
        ("provider", session["provider"]),
        ("prd", session["prd"]),
        ("project", session["projectDir"]),
        ("phase", session["phase"] or "-"),
        ("iteration", str(session["iteration"])),
        (
            "tasks",
            f"{tasks['completed']}/{tasks['total']} completed, {tasks['active']} active, "
            f"{tasks['pending']} pending, {tasks['failed']} failed",
        ),
        ("agents", f"{agents['active']} active, {agents['total']} run"),
        ("cost", _cost(session["costUsd"])),
        ("options", ", ".join(f"{k}={_option(v)}" for k, v in set_options.items()) or "-"),
        ("created", session["createdAt"]),
        ("started", session["startedAt"] or "-"),
        ("updated", session["updatedAt"] or "-"),
        ("ended", session["endedAt"] or "-"),
        ("exit reason", session["exitReason"] or "-"),
    ]
    _print_fields(rows)
    listed = _call(config, "GET", f"/api/sessions/{_quote(args.id)}/tasks")
    print()
    _print_tasks(listed["tasks"], with_session=False)
    _print_more(listed, "tasks")
    return 0


def cmd_sessions_command(args: argparse.Namespace, config: Config) -> int:
    params = {"now": "true"} if getattr(args, "now", False) else {}
    path = f"/api/sessions/{_quote(args.id)}/{args.command_name}"
    session = _call(config, "POST", path, params=params)
    return _print_id_and_status(args, session)


def cmd_sessions_input(args: argparse.Namespace, config: Config) -> int:
    message = _stdin_text("MESSAGE") if args.message == "-" else args.message
    path = f"/api/sessions/{_quote(args.id)}/input"
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
    answer = _call(config, "POST", path, json={"message": message}, headers=headers)
    if args.json:
        _print_json(answer)
    else:
        print(_shown(f"{answer['id']} {answer['status']} for {answer['sessionId']}"))
    return 0


def _stdin_text(name: str) -> str:
    """All of stdin as UTF-8 text (the API takes nothing else); exit 2 if it is not."""
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CliError(
            f"loki: {name} on stdin is not valid UTF-8: {exc.reason} at byte {exc.start}", code=2
        ) from None


def cmd_sessions_rm(args: argparse.Namespace, config: Config) -> int:
    _call(config, "DELETE", f"/api/sessions/{_quote(args.id)}")
    if args.json:
        _print_json({"id": args.id, "deleted": True})
    else:
        print(_shown(f"{args.id} deleted"))
    return 0


def cmd_tasks(args: argparse.Namespace, config: Config) -> int:
    params: dict[str, Any] = {} if args.limit is None else {"limit": args.limit}
    if args.session is not None:
        # One session: its list, filtered (the global active/queue routes take no session).
        status = "active" if args.active else "pending" if args.queue else args.status
        if status is not None:
            params["status"] = status
        answer = _call(config, "GET", f"/api/sessions/{_quote(args.session)}/tasks", params=params)
        if args.queue:  # run order: priority, then the session's order (a stable sort)
            answer["tasks"].sort(key=lambda task: task["priority"])
    elif args.active or args.queue:
        path = "/api/tasks/active" if args.active else "/api/tasks/queue"
        answer = _call(config, "GET", path, params=params)
    else:
        if args.status is not None:
            params["status"] = args.status
        answer = _call(config, "GET", "/api/tasks", params=params)
    if args.json:
        _print_json(answer)
        return 0
    _print_tasks(answer["tasks"], with_session=args.session is None)
    _print_more(answer, "tasks")
    return 0


# -- tokens and the audit log ------------------------------------------------------

ENTERPRISE = "/dashboard/api/enterprise"  # the Dashboard API, over the control socket
NAME_WIDTH = 40
RESOURCE_WIDTH = 40


def cmd_token_create(args: argparse.Namespace, config: Config) -> int:
    scopes = [scope.strip() for given in args.scopes for scope in given.split(",") if scope.strip()]
    body: dict[str, Any] = {"name": args.name, "scopes": scopes}
    if args.expires_days is not None:
        body["expires_days"] = args.expires_days
    token = _call(config, "POST", f"{ENTERPRISE}/tokens", json=body)
    if args.json:
        _print_json(token)
        return 0
    _print_fields(
        [
            ("id", token["id"]),
            ("name", token["name"]),
            ("scopes", ", ".join(token["scopes"])),
            ("created", token["created_at"]),
            ("expires", token["expires_at"] or "never"),
        ]
    )
    print()
    print("token (shown only this once; lokid keeps only its hash, so store it now):")
    print(token["token"])
    return 0


def cmd_token_ls(args: argparse.Namespace, config: Config) -> int:
    params = {"limit": args.limit, "offset": args.offset}
    answer = _call(
        config,
        "GET",
        f"{ENTERPRISE}/tokens",
        params={key: value for key, value in params.items() if value is not None},
    )
    if args.json:
        _print_json(answer)
        return 0
    rows = [
        (
            token["id"],
            _clip_escaped(token["name"], NAME_WIDTH),
            ",".join(token["scopes"]) or "-",
            token["created_at"],
            token["expires_at"] or "never",
            token["last_used_at"] or "never",
            _token_state(token),
        )
        for token in answer["tokens"]
    ]
    headers = ("ID", "NAME", "SCOPES", "CREATED", "EXPIRES", "LAST USED", "STATE")
    _print_table(headers, rows, empty="no tokens")
    _print_more(answer, "tokens")
    return 0


def _token_state(token: dict[str, Any]) -> str:
    if token["revoked_at"] is not None:
        return "revoked"  # revoked and expired: the deliberate act
    return "expired" if token["expired"] else "active"


def cmd_token_revoke(args: argparse.Namespace, config: Config) -> int:
    token = _call(config, "DELETE", f"{ENTERPRISE}/tokens/{_quote(args.id)}")
    if args.json:
        _print_json(token)
    else:
        print(_shown(f"{token['id']} revoked at {token['revoked_at']}"))
    return 0


def cmd_audit_ls(args: argparse.Namespace, config: Config) -> int:
    params = {
        "start": args.start,
        "end": args.end,
        "action": args.audit_action,
        "limit": args.limit,
        "offset": args.offset,
    }
    answer = _call(
        config,
        "GET",
        f"{ENTERPRISE}/audit",
        params={key: value for key, value in params.items() if value is not None},
    )
    if args.json:
        _print_json(answer)
        return 0
    rows = [
        (
            str(entry["id"]),
            entry["timestamp"],
            entry["actor"],
            entry["action"],
            _clip_escaped(entry["resource"] or "-", RESOURCE_WIDTH),
            "-" if entry["status"] is None else str(entry["status"]),
        )
        for entry in answer["entries"]
    ]
    headers = ("ID", "TIME", "ACTOR", "ACTION", "RESOURCE", "STATUS")
    _print_table(headers, rows, empty="no audit entries")
    _print_more(answer, "entries")
    return 0


def cmd_audit_summary(args: argparse.Namespace, config: Config) -> int:
    summary = _call(config, "GET", f"{ENTERPRISE}/audit/summary")
    if args.json:
        _print_json(summary)
        return 0
    chain = summary["chain"]
    if summary["chain_valid"]:
        verdict = "valid"
    elif not chain["valid"]:
        verdict = f"INVALID: {_problem(chain)} (run `loki audit verify`)"
    else:
        verdict = f"INVALID: {summary.get('head_problem') or 'see the daemon log'}"
    _print_fields(
        [
            ("entries", str(summary["total"])),
            ("first", summary["first_timestamp"] or "-"),
            ("last", summary["last_timestamp"] or "-"),
            ("chain", verdict),
        ]
    )
    omitted = summary.get("omitted", {})
    for key in ("action", "actor", "status"):
        counts: dict[str, int] = summary[f"by_{key}"]
        print(f"\nby {key}:")
        if not counts:
            print("  -")
        width = max((len(_shown(name)) for name in counts), default=0)
        for name, count in counts.items():
            print(f"  {_shown(name):<{width}}  {count}")
        if omitted.get(key):
            print(f"  ({omitted[key]} more)")
    return 0


def cmd_audit_verify(args: argparse.Namespace, config: Config) -> int:
    report = None if args.offline else _verify_online(config)
    if report is None:
        report = {
            **_verify_offline(config.database),
            "verified_by": "database",
            "database": str(config.database),
        }
        how = f"verified offline from {config.database}"
    else:
        how = f"verified by the running daemon at {config.socket}"
    if args.json:
        _print_json(report)
    elif report["valid"]:
        print(_shown(f"audit log valid: {report['message']} ({how})"))
        if report["head_id"]:
            print(f"head: entry {report['head_id']}, hash {report['head_hash']}")
    else:
        first_bad = report["first_bad_id"]
        print(_shown(f"audit log INVALID ({how})"))
        _print_fields(
            [
                ("problem", report["reason"]),
                ("first bad", "-" if first_bad is None else f"entry {first_bad}"),
                ("detail", report["message"]),
                ("checked", _entries(report["entries_checked"])),
                ("last good", f"entry {report['head_id']}" if report["head_id"] else "none"),
            ]
        )
    return 0 if report["valid"] else 1


def _verify_online(config: Config) -> dict[str, Any] | None:
    """The daemon's verdict, or None when it is not running."""
    try:
        with ControlClient(config.socket, timeout=COMMAND_TIMEOUT) as client:
            report: dict[str, Any] = client.get(f"{ENTERPRISE}/audit/verify")
    except DaemonNotRunning:
        print("lokid is not running; verifying the database file", file=sys.stderr)
        return None
    return {**report, "verified_by": "daemon"}


def _verify_offline(database: Path) -> dict[str, Any]:
    """`verify_store` on the database file, read-only, in one read transaction."""
    import sqlite_utils

    from lokid.actors.audit_writer import verify_store

    try:
        found = database.is_file()
    except OSError as exc:  # a data dir of another account
        raise CliError(f"loki: cannot open {database}: {exc.strerror}") from None
    if not found:
        raise CliError(f"loki: no database to verify at {database} (is LOKI_HOME right?)")
    uri = database.resolve().as_uri() + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise CliError(f"loki: cannot open {database}: {exc}") from None
    try:
        conn.execute("BEGIN")  # the entries and the anchor: one snapshot
        try:
            report = verify_store(sqlite_utils.Database(conn))
        finally:
            conn.execute("ROLLBACK")
    except sqlite3.Error as exc:
        raise CliError(f"loki: cannot read the audit log in {database}: {exc}") from None
    finally:
        conn.close()
    return report.to_json()


# -- the registry -------------------------------------------------------------------

REGISTRY = "/dashboard/api/registry"  # the Dashboard API, over the control socket
REGISTRY_TIMEOUT = 150.0  # a discovery may walk for up to 60 s, a sync of many folders longer
PATH_WIDTH = 60


def cmd_registry_ls(args: argparse.Namespace, config: Config) -> int:
    params = {"status": args.status, "limit": args.limit, "offset": args.offset}
    answer = _call(
        config,
        "GET",
        f"{REGISTRY}/projects",
        params={key: value for key, value in params.items() if value is not None},
    )
    if args.json:
        _print_json(answer)
        return 0
    rows = [
        (
            entry["id"],
            _clip(entry["name"], NAME_WIDTH),
            entry["status"],
            "yes" if entry["has_loki"] else "no",
            _task_counts(entry["tasks"]),
            entry["last_seen"] or "never",
            entry["path"],
        )
        for entry in answer["projects"]
    ]
    headers = ("ID", "NAME", "STATUS", "LOKI", "TASKS P/A/C/F", "LAST SEEN", "PATH")
    _print_table(headers, rows, empty="no registered projects")
    _print_more(answer, "projects")
    return 0


def _task_counts(tasks: dict[str, int]) -> str:
    return "/".join(str(tasks.get(key, 0)) for key in TASK_STATUSES)


def cmd_registry_add(args: argparse.Namespace, config: Config) -> int:
    body: dict[str, Any] = {"path": _path_argument(args.path, "PATH")}
    if args.name is not None:
        body["name"] = args.name
    entry = _call(config, "POST", f"{REGISTRY}/projects", json=body)
    if args.json:
        _print_json(entry)
        return 0
    _print_fields(
        [
            ("id", entry["id"]),
            ("name", entry["name"]),
            ("path", entry["path"]),
            ("status", entry["status"]),
            (".loki", "yes" if entry["has_loki"] else "no"),
            ("tasks", f"{entry['tasks']['total']} ({_task_counts(entry['tasks'])} P/A/C/F)"),
        ]
    )
    return 0


REGISTRY_ID = re.compile(r"reg-[0-9a-f]{12}")


def _registry_id_of(project: str) -> str:
    """An id as given, or the id of a folder (what the daemon computes from its real path).

    Only the exact id form is an id: a folder named `reg-stuff` is a folder (one named
    like an id is reached as `./reg-…`)."""
    if REGISTRY_ID.fullmatch(project):
        return project
    import hashlib

    real = os.path.realpath(_path_argument(project, "ID|PATH"))
    return "reg-" + hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def cmd_registry_rm(args: argparse.Namespace, config: Config) -> int:
    registry_id = _registry_id_of(args.target)
    _call(config, "DELETE", f"{REGISTRY}/projects/{_quote(registry_id)}")
    if args.json:
        _print_json({"id": registry_id, "unregistered": True})
    else:
        print(f"{registry_id} unregistered")
    return 0


def cmd_registry_discover(args: argparse.Namespace, config: Config) -> int:
    params: dict[str, Any] = {}
    roots = [_path_argument(root, "--root") for root in args.roots or ()]
    for root in roots:
        if "," in root:
            raise CliError(f"loki: a root cannot hold a comma (roots are a comma list): {root}")
    if roots:  # one comma list: of a repeated `roots` only the last would count
        params["roots"] = ",".join(roots)
    if args.depth is not None:
        params["depth"] = args.depth
    if args.register:
        params["register"] = "true"
    if not args.json:
        where = ", ".join(roots) or "the configured roots"
        print(_shown(f"looking for .loki folders under {where} ..."), file=sys.stderr, flush=True)
    answer = _call(config, "GET", f"{REGISTRY}/discover", params=params, timeout=REGISTRY_TIMEOUT)
    if args.json:
        _print_json(answer)
        return 0
    rows = [
        (
            found["id"],
            _clip(found["name"], NAME_WIDTH),
            ("new" if found.get("registered_now") else "yes") if found["registered"] else "no",
            found["path"],
        )
        for found in answer["projects"]
    ]
    _print_table(("ID", "NAME", "REGISTERED", "PATH"), rows, empty="no projects found")
    summary = (
        f"{answer['total']} projects in {answer['folders']} folders"
        f" ({answer['seconds']:.2f} s, depth {answer['depth']})"
    )
    if args.register:
        summary += f"; {answer['registered']} newly registered"
    print(summary, file=sys.stderr)
    _print_problems(answer)
    if answer["truncated"]:
        print(_shown(f"warning: {answer['truncated_reason']}"), file=sys.stderr)
    return 0


def cmd_registry_sync(args: argparse.Namespace, config: Config) -> int:
    summary = _call(config, "POST", f"{REGISTRY}/sync", timeout=REGISTRY_TIMEOUT)
    if args.json:
        _print_json(summary)
        return 0
    _print_fields(
        [
            ("total", str(summary["total"])),
            ("ok", str(summary["ok"])),
            ("missing", str(summary["missing"])),
            ("unreadable", str(summary["unreadable"])),
            ("updated", str(summary["updated"])),
        ]
    )
    _print_problems(summary)
    return 0


def _print_problems(answer: dict[str, Any]) -> None:
    """The file-system problems an answer lists, as warnings on stderr."""
    for problem in answer.get("errors", []):
        where = f"{problem['path']}: " if problem["path"] else ""
        print(_shown(f"warning: {where}{problem['message']} ({problem['kind']})"), file=sys.stderr)
    if answer.get("errors_omitted"):
        print(f"warning: {answer['errors_omitted']} more problems", file=sys.stderr)


def _entries(count: int) -> str:
    return f"{count} entry" if count == 1 else f"{count} entries"


def _problem(report: dict[str, Any]) -> str:
    where = "" if report["first_bad_id"] is None else f"entry {report['first_bad_id']} "
    return f"{where}{report['reason']}: {report['message']}"


def _print_fields(rows: Sequence[tuple[str, str]]) -> None:
    """A key/value view; values shown escaped (`_shown`): paths and names are anyone's."""
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {_shown(value)}")


TITLE_WIDTH = 60


def _print_tasks(tasks: list[dict[str, Any]], *, with_session: bool) -> None:
    headers: tuple[str, ...] = ("SESSION",) if with_session else ()
    headers += ("TASK", "STATUS", "PRI", "TRIES", "TITLE")
    rows = [
        ((task["sessionId"],) if with_session else ())
        + (
            task["id"],
            task["status"],
            str(task["priority"]),
            str(task["attempts"]),
            _clip(task["title"], TITLE_WIDTH),
        )
        for task in tasks
    ]
    _print_table(headers, rows, empty="no tasks")


def _shown(text: str) -> str:
    """`text` with every character `lokid.textrules.unshown` names written as a Python
    escape (`\\x1b`, `\\u200e`): control and format characters (bidirectional controls,
    zero-width ones), line separators. A terminal would act on them or hide them (an
    escape sequence in a folder name or an agent's output could rewrite what the screen
    shows), so tables and event lines show them escaped. The lone surrogates Python
    makes of a path's undecodable bytes cannot be printed at all: shown as `\\xff`."""
    if text.isprintable():  # the common case, checked in C
        return text
    return "".join(_escaped(char) if unshown(char) else char for char in text)


def _escaped(character: str) -> str:
    if "\udc80" <= character <= "\udcff":  # an undecodable byte of a path (surrogateescape)
        return f"\\x{ord(character) - 0xDC00:02x}"
    return character.encode("unicode_escape").decode()


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, empty: str) -> None:
    if not rows:
        print(empty)
        return
    rows = [[_shown(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in (headers, *rows)) for i in range(len(headers))]
    for row in (headers, *rows):
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def _print_more(answer: dict[str, Any], what: str) -> None:
    shown = len(answer[what])
    if answer["offset"] + shown < answer["total"]:
        print(f"({shown} of {answer['total']} {what}; use --limit for more)", file=sys.stderr)


def _print_id_and_status(args: argparse.Namespace, answer: dict[str, Any]) -> int:
    """The answer of a command that changed a session: JSON, or `<id> <status>`."""
    if args.json:
        _print_json(answer)
    else:
        print(_shown(f"{answer['id']} {answer['status']}"))
    return 0


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _cost(value: float | None) -> str:
    return f"${value or 0.0:.4f}"


def _option(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _clip(text: str, width: int) -> str:
    """`text` on one line (white space runs folded to one space), cut to `width`."""
    return _cut(" ".join(text.split()), width)


def _clip_escaped(text: str, width: int) -> str:
    """`text` with control characters escaped, not folded (`\\n`, `\\t`), cut to
    `width`: for listings that are evidence (the audit log, token names), where
    `a\\nb` must not look like `a b`."""
    return _cut(_shown(text), width)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def _quote(segment: str) -> str:
    """An id as one URL path segment (a stray `/` or `?` cannot reach another route)."""
    return urllib.parse.quote(segment, safe="")


# -- entry points --------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """`loki ...`; without `argv` (the process's own: the `loki` script, `python -m
    lokid`) the process exits when this returns (`run`'s `in_process`)."""
    return run(build_parser().parse_args(argv), in_process=argv is not None)


def lokid_main(argv: Sequence[str] | None = None) -> int:
    """`lokid [options]` is `loki [global options] serve [options]`."""
    return run(build_lokid_parser().parse_args(argv), in_process=argv is not None)


def _print_error(message: str) -> None:
    """An error on stderr, each line shown escaped: it quotes paths and the daemon's text
    (a start-up failure's lines of the log are the only ones a message spans)."""
    print("\n".join(_shown(line) for line in message.split("\n")), file=sys.stderr)


def run(args: argparse.Namespace, *, in_process: bool = True) -> int:
    """Run the command `args` name; an error is one line on stderr and its exit code.

    `serve` notes the stop signals from here on (`lokid.startsignals`). An in-process
    caller (the tests) gets its own handlers back when it returns; a process that exits
    next (`in_process=False`) ignores them from then on (`EarlySignals.settle`): with
    Python's, a second signal in the last moments of the exit ended an orderly stop
    with status 143 or 130 (docs/operations.md)."""
    # `serve`: before anything else, so that a stop signal now is an orderly stop.
    early = EarlySignals.install() if args.handler is cmd_serve else None
    args.early_signals = early
    try:
        return _run(args)
    finally:
        if early is not None:
            if in_process:
                early.restore()
            else:
                early.settle()
            crash_point("serve.returned")


def _run(args: argparse.Namespace) -> int:
    handler: Callable[[argparse.Namespace, Config], int] = args.handler
    try:
        check_arguments(args)
        config = config_from_args(args)
        return handler(args, config)
    except ConfigError as exc:
        _print_error(f"loki: {exc.message}")
        return 2
    except CliError as exc:
        _print_error(str(exc))
        return exc.code
    except ApiCallFailed as exc:
        field = f" [field: {exc.field}]" if exc.field else ""
        _print_error(f"loki: {exc.message}{field}")
        return 1
    except LokiError as exc:
        _print_error(f"loki: {exc.message}")
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`loki sessions | head -1`): stop quietly like other tools,
        # with the status of a SIGPIPE; stdout is pointed at /dev/null so that Python's
        # own flush at exit does not fail on the broken pipe again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
