"""API fuzzing: schemathesis against each listener's `/openapi.json` on a live daemon.

`loki serve` runs as a subprocess in bubblewrap (the host's files read-only,
only the test's folder writable: generated requests name any folder, and a
session writes `.loki/` into its project and runs commands there), with auth
on, the fake agent as every provider's CLI first on its PATH (so sessions
really start) and a scratch HOME holding the projects `schemathesis.toml`
points generated requests at. Schemathesis runs over both listeners at once,
each in its own process, with every check (`--checks all`), a fixed seed and
a few examples per operation; any failure fails the test with schemathesis's
own report. Afterwards the daemon must still be healthy and must not have
logged a traceback: a crashed actor is answered 503, which no check calls a
failure.

The quick run is part of `make test`. A longer one:

    LOKI_FUZZ_EXAMPLES=500 .venv/bin/python -m pytest tests/test_fuzz.py

runs every operation of both listeners; the quick run fuzzes the routes both
listeners serve with the same handlers (`SHARED`) on the API listener only.
`LOKI_FUZZ_SEED` picks another seed. What is configured and why: docs/fuzzing.md.

Below the fuzz run: what it found, pinned as plain tests, and property tests
that the document's patterns accept exactly what the validators accept.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lokid import board
from lokid.actors.registry_scanner import validate_name as validate_registry_name
from lokid.audit import parse_action_filter, parse_timestamp
from lokid.errors import LokiError
from lokid.events import parse_level
from lokid.http import board as board_http
from lokid.http import enterprise
from lokid.http import events as events_http
from lokid.http import registry as registry_http
from lokid.http.events import _last_event_id
from lokid.http.registry import parse_register_body
from lokid.http.surface import BOOLEAN_PARAM, IDEMPOTENCY_KEY, Surface, bool_param, words
from lokid.http.ws import DashboardHub, install_ws
from lokid.idempotency import validate_key
from lokid.providers import PROVIDER_INFO
from lokid.registry import learning_type
from lokid.sandbox import sandbox_problem
from lokid.session_records import parse_session_request, query_int, validate_input_message
from lokid.tokens import validate_name

from . import fake_agent
from .asgi import call
from .daemon_proc import DaemonProcess

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "schemathesis.toml"
QUICK = "LOKI_FUZZ_EXAMPLES" not in os.environ
EXAMPLES = int(os.environ.get("LOKI_FUZZ_EXAMPLES", "5"))
SHARED = "^/(health|api/status$|openapi[.]json$|api/sessions|api/events)"
"""Routes both listeners serve with the very same handlers: the quick run fuzzes them on
the API listener only (the coverage phase of GET /api/events alone takes seconds)."""
SEED = int(os.environ.get("LOKI_FUZZ_SEED", "8"))
PRD = "# Fuzz\n\n## Features\n- One small thing\n"
PROJECTS = (
    "fuzz",
    "fuzz/a",
    "fuzz/b",
    "fuzz/c",
)  # under HOME: the dictionaries of schemathesis.toml


@pytest.mark.e2e
def test_both_listeners_pass_every_schemathesis_check(tmp_path: Path) -> None:
    pytest.importorskip("schemathesis", reason="schemathesis is a test dependency")
    problem = sandbox_problem()
    if problem is not None:
        pytest.skip(f"the fuzzed daemon runs in bubblewrap: {problem}")
    daemon = start_daemon(tmp_path)
    try:
        fuzz(daemon, tmp_path)
    finally:
        daemon.kill()


def fuzz(daemon: DaemonProcess, root: Path) -> None:
    log = drain(daemon)
    with daemon.control() as owner:
        made = owner.post(
            "/dashboard/api/enterprise/tokens", json={"name": "fuzz", "scopes": ["admin"]}
        )
    assert made.status_code == 201, made.text
    token = made.json()["token"]

    runs = {
        "api": Fuzz("api", daemon.api_url, token, root / "api"),
        "dashboard": Fuzz(
            "dashboard",
            daemon.dashboard_url,
            token,
            root / "dashboard",
            ("--exclude-path-regex", SHARED) if QUICK else (),
        ),
    }
    for run in runs.values():
        run.start()
    reports = {name: run.wait() for name, run in runs.items()}

    failed = {name: output for name, (code, output) in reports.items() if code != 0}
    assert not failed, "\n\n".join(
        f"===== schemathesis on the {name} listener =====\n{output}"
        for name, output in failed.items()
    )
    answer = httpx.get(f"{daemon.api_url}/health", timeout=5)
    assert answer.status_code == 200, answer.text
    assert "Traceback" not in log.text(), log.text()


def start_daemon(root: Path) -> DaemonProcess:
    # Every provider's CLI is the fake agent: a session of any provider gets created
    # (only claude's runs well, which is beside the point here).
    bin_dir = root / "bin"
    fake_agent.install(bin_dir, [p.cli for p in PROVIDER_INFO.values() if p.cli is not None])
    home = root / "user"
    for project in PROJECTS:
        folder = home / project
        (folder / ".loki").mkdir(parents=True)  # its own project folder, not a parent's
        (folder / "prd.md").write_text(PRD)
    env = {
        "LOKI_ENTERPRISE_AUTH": "true",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(home),  # ~ in generated requests (schemathesis.toml) is the scratch home
        "LOKI_REGISTRY_ROOTS": "~/fuzz",
        "FAKE_AGENT_LIFETIME": "60",
    }
    return SandboxedDaemon(root / "loki", writable=root, extra_env=env).start()


REPOSITORY = Path(__file__).resolve().parents[1]


class SandboxedDaemon(DaemonProcess):
    """`loki serve` in bubblewrap: the host's files read-only but for `writable`, a private
    /tmp. Generated requests name any folder (`projectDir: "/"`), and a session writes
    `.loki/` into its project folder and runs commands there (`options.verify`, provider
    `command`): here that can only ever be the test's own folder."""

    def __init__(self, home: Path, *, writable: Path, extra_env: dict[str, str]) -> None:
        super().__init__(home, extra_env=extra_env)
        self.writable = writable

    def start(self, *args: str, wait: bool = True, **popen: Any) -> DaemonProcess:
        sandbox = ["bwrap", "--ro-bind", "/", "/", "--tmpfs", "/tmp"]
        # The checkout and its venv stay visible (read-only) when they live under /tmp,
        # as a CI clone may.
        for seen in sorted({REPOSITORY, Path(sys.prefix).resolve()}):
            sandbox += ["--ro-bind", str(seen), str(seen)]
        sandbox += ["--bind", str(self.writable), str(self.writable)]
        sandbox += ["--dev", "/dev", "--proc", "/proc", "--"]
        serve = ["-m", "lokid", "serve", "--port", "0", "--dashboard-port", "0", *args]
        self.process = subprocess.Popen(
            [*sandbox, sys.executable, *serve],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # kill() ends bwrap and the daemon: one process group
            **popen,
        )
        if wait:
            self.wait_ready()
        return self


class DaemonLog:
    """The daemon's stderr, read as it comes (a full pipe would block the daemon)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def text(self) -> str:
        return "".join(self.lines)


def drain(daemon: DaemonProcess) -> DaemonLog:
    assert daemon.process is not None and daemon.process.stderr is not None
    stream = daemon.process.stderr
    log = DaemonLog()

    def read() -> None:
        for line in stream:
            log.lines.append(line.decode(errors="replace"))

    threading.Thread(target=read, daemon=True).start()
    return log


class Fuzz:
    """`st run` against one listener, as a subprocess (its output is the report)."""

    def __init__(
        self, name: str, url: str, token: str, folder: Path, options: Sequence[str] = ()
    ) -> None:
        self.name = name
        self.url = url
        self.token = token
        self.folder = folder
        self.options = tuple(options)
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.folder.mkdir()
        answer = httpx.get(
            f"{self.url}/openapi.json",
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        document = self.folder / "openapi.json"
        document.write_bytes(answer.content)
        argv = [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "--config-file",
            str(CONFIG),
            "--no-color",
            "run",
            str(document),
            "--url",
            self.url,
            "--checks",
            "all",
            "--max-examples",
            str(EXAMPLES),
            "--seed",
            str(SEED),
            "--generation-database",
            "none",
            *self.options,
        ]
        env = {**os.environ, "LOKI_FUZZ_TOKEN": self.token, "COLUMNS": "120"}
        self.process = subprocess.Popen(
            argv,
            cwd=self.folder,  # its caches and reports stay in the test's folder
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )

    def wait(self) -> tuple[int, str]:
        assert self.process is not None
        try:
            output, _ = self.process.communicate(timeout=120 + 6 * EXAMPLES)
        except subprocess.TimeoutExpired:
            self.process.kill()
            output, _ = self.process.communicate()
            return -1, f"timed out\n{output}"
        return self.process.returncode, output


# -- what the fuzzing found, pinned -------------------------------------------------------
#
# Each of these was a 500, a crashed actor or a dropped connection before; now it is the
# seed's error body naming the field (docs/fuzzing.md, "What the first runs found").


def refusal(call: Callable[[], object]) -> LokiError:
    with pytest.raises(LokiError) as caught:
        call()
    return caught.value


@pytest.mark.parametrize(
    "body, field",
    [
        ({"prd": "/\ud800/prd.md"}, "prd"),
        ({"prdText": "# x\n- a\n", "projectDir": "/\ud800"}, "projectDir"),
        ({"prd": "~nosuchuser-lokid/prd.md"}, "prd"),
        ({"prdText": "# x\n- a\n", "projectDir": "~nosuchuser-lokid"}, "projectDir"),
        (
            {"prd": "/x/prd.md", "provider": "command", "options": {"command": ["a\udc00"]}},
            "options.command[0]",
        ),
    ],
)
def test_session_bodies_that_crashed_are_422(body: dict[str, Any], field: str) -> None:
    error = refusal(lambda: parse_session_request(body, default_provider="claude"))
    assert (error.code, error.details["field"]) == ("VALIDATION_ERROR", field)


def test_a_lone_surrogate_is_refused_before_it_reaches_an_actor() -> None:
    assert refusal(lambda: validate_input_message({"message": "hi \ud800"})).code == (
        "VALIDATION_ERROR"
    )
    bodies: list[dict[str, Any]] = [{"path": "/x", "name": "\ud800"}, {"path": "/\udfff"}]
    for body in bodies:
        assert refusal(partial(parse_register_body, body)).code == "VALIDATION_ERROR"


@pytest.mark.parametrize("text", ["--5", "²", "+5", "1_0", "0x1", "5" * 21])
def test_query_integers_are_ascii_digits(text: str) -> None:
    error = refusal(lambda: query_int({"limit": text}, "limit", 100, 1, 1000))
    assert (error.code, error.details["field"]) == ("BAD_REQUEST", "limit")
    assert query_int({"limit": " 7 "}, "limit", 100, 1, 1000) == 7


@pytest.mark.parametrize("header", [b"\xb2", b"9" * 5000, b"9223372036854775808", b"-1"])
def test_a_bad_last_event_id_is_400_not_a_dropped_connection(header: bytes) -> None:
    scope = {"headers": [(b"last-event-id", header)]}
    error = refusal(lambda: _last_event_id(scope, {}))
    assert error.details["field"] == "Last-Event-ID"


def test_last_event_id_in_the_query_is_checked_even_with_the_header() -> None:
    scope = {"headers": [(b"last-event-id", b"5")]}
    assert _last_event_id(scope, {"lastEventId": "3"}) == 5
    error = refusal(lambda: _last_event_id(scope, {"lastEventId": str(2**63)}))
    assert error.details["field"] == "lastEventId"


async def test_a_plain_get_of_the_websocket_says_what_is_missing() -> None:
    surface = Surface("test", "0")
    install_ws(surface, DashboardHub())
    answer = await call(surface, "GET", "/ws")
    assert answer.status == 400
    error = answer.json()["error"]
    assert error["code"] == "BAD_REQUEST"
    assert "Upgrade: websocket" in error["message"]
    assert ("GET", "/ws") in {(r.method, r.path) for r in surface.routes}  # documented once


def test_a_parameter_another_one_wins_over_is_still_checked() -> None:
    assert registry_http._depth({"depth": "2", "max_depth": "5"}) == 2
    assert registry_http._depth({"max_depth": "5"}) == 5
    error = refusal(lambda: registry_http._depth({"depth": "2", "max_depth": "null"}))
    assert error.details["field"] == "max_depth"


def test_a_board_position_may_be_an_integral_float() -> None:
    assert board.parse_move({"column": "todo", "position": 3.0}).position == 3
    assert refusal(lambda: board.parse_move({"column": "todo", "position": 3.5})).code == (
        "VALIDATION_ERROR"
    )


# -- the document's patterns say what the validators do ----------------------------------
#
# Schemathesis draws values from these patterns (valid) and from outside them (invalid);
# a pattern stricter or looser than its validator is a failure there. Here the two are
# compared directly, on text rich in what `strip()` removes and control characters.

TRICKY = " \t\n\r\x0b\x0c\x1c\x1f\x85\xa0\u2028\u2029\u202a\u2066\x00\x7f\x9f*.-_aZ0K\u212a"
TEXT = st.text(st.sampled_from(TRICKY) | st.characters(exclude_categories=["Cs"]), max_size=12)


def matches(schema: Mapping[str, Any], value: str) -> bool:
    if "anyOf" in schema:
        return any(matches(option, value) for option in schema["anyOf"])
    if "const" in schema:
        return bool(value == schema["const"])
    if schema.get("type") == "boolean":  # as a query value
        return value in ("true", "false")
    return re.search(schema["pattern"], value) is not None


def accepted(call: Callable[[], object]) -> bool:
    try:
        call()
    except LokiError:
        return False
    return True


@given(TEXT | st.text(st.sampled_from(" a\t"), min_size=95, max_size=105))
def test_token_names(value: str) -> None:
    schema = enterprise.TOKEN_BODY["properties"]["name"]
    assert matches(schema, value) == accepted(lambda: validate_name(value))


@given(TEXT | st.text(st.sampled_from(" a\t"), min_size=195, max_size=205))
def test_registry_names(value: str) -> None:
    schema = registry_http.REGISTER_BODY_NAME
    assert matches(schema, value) == accepted(lambda: validate_registry_name(value))


@given(TEXT | st.text(st.sampled_from(" a\t"), min_size=195, max_size=205))
def test_project_names(value: str) -> None:
    schema = board_http.PROJECT_CREATE_BODY["properties"]["name"]
    assert matches(schema, value) == accepted(lambda: board._line(value, "name", 200))


@given(TEXT | st.text(st.sampled_from(" a\t~"), min_size=250, max_size=260))
def test_idempotency_keys(value: str) -> None:
    assert matches(IDEMPOTENCY_KEY, value) == accepted(lambda: validate_key(value))


@given(TEXT | st.sampled_from(["TRUE", " off ", "Yes", "", "  ", "1", "2", "nope", "On\t"]))
def test_query_flags(value: str) -> None:
    parses = accepted(lambda: bool_param({"flag": value}, "flag", False))
    assert matches(BOOLEAN_PARAM, value) == parses


@given(TEXT | st.sampled_from(["DEBUG", " warn ", "Error", "info\n", "warnings"]))
def test_min_level(value: str) -> None:
    schema = events_http.FILTER_PARAMS[2].schema
    assert matches(schema, value) == accepted(lambda: parse_level(value))


@given(TEXT | st.sampled_from(["Mistakes", " success ", "successe", "pattern", "PATTERNSES"]))
def test_learning_types(value: str) -> None:
    schema = words(*registry_http.LEARNING_WORDS)
    assert matches(schema, value) == (learning_type(value) is not None)


@given(TEXT | st.sampled_from(["session.*", " task.* ", "a.b.*", "*", ".*", "x*", "a-b_c.*"]))
def test_audit_action_filters(value: str) -> None:
    assert matches(enterprise.ACTION, value) == accepted(lambda: parse_action_filter(value))


@given(
    st.text(st.sampled_from("0123456789-:TZ+. "), max_size=30)
    | st.datetimes().map(lambda moment: moment.isoformat() + "Z")
    | st.dates().map(str)
)
def test_audit_timestamps(value: str) -> None:
    """The pattern is the syntax: a value outside it is refused for its syntax; one inside
    is accepted, or refused only for the calendar (February 30, out of range in UTC)."""
    try:
        parse_timestamp(value, field="start")
    except LokiError as error:
        assert matches(enterprise.TIMESTAMP, value) == ("not a valid time" in error.message)
    else:
        assert matches(enterprise.TIMESTAMP, value)
