"""Every route x every kind of caller, against a real `loki serve` with auth on.

The routes come from the daemon's own route tables (`Surface.routes`), so a
new route is covered the moment it exists; `DECLARED` pins each route's
required scope, so adding a route or changing what it needs is a decision
this file records, not an accident.
"""

from __future__ import annotations

import json
import re
import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lokid.config import Config
from lokid.daemon import Daemon
from lokid.http.gate import OPEN
from lokid.http.surface import Route
from lokid.tokens import grants

from .daemon_proc import DaemonProcess

DECLARED: dict[tuple[str, str, str], str] = {
    # (surface, method, path): required scope
    ("api", "GET", "/health"): "open",
    ("api", "GET", "/health/ready"): "open",
    ("api", "GET", "/health/live"): "open",
    ("api", "GET", "/openapi.json"): "read",
    ("api", "GET", "/api/status"): "read",
    ("api", "GET", "/api/sessions"): "read",
    ("api", "GET", "/api/sessions/{id}"): "read",
    ("api", "GET", "/api/sessions/{id}/tasks"): "read",
    ("api", "GET", "/api/sessions/{id}/tasks/{taskId}"): "read",
    ("api", "GET", "/api/tasks"): "read",
    ("api", "GET", "/api/tasks/active"): "read",
    ("api", "GET", "/api/tasks/queue"): "read",
    ("api", "POST", "/api/sessions"): "write",
    ("api", "POST", "/api/sessions/{id}/stop"): "write",
    ("api", "POST", "/api/sessions/{id}/pause"): "write",
    ("api", "POST", "/api/sessions/{id}/resume"): "write",
    ("api", "POST", "/api/sessions/{id}/input"): "write",
    ("api", "DELETE", "/api/sessions/{id}"): "write",
    ("api", "GET", "/api/events"): "read",
    ("api", "GET", "/api/events/history"): "read",
    ("api", "GET", "/api/events/stats"): "read",
    ("api", "GET", "/metrics"): "read",
    ("dashboard", "GET", "/health"): "open",
    ("dashboard", "GET", "/health/ready"): "open",
    ("dashboard", "GET", "/health/live"): "open",
    ("dashboard", "GET", "/openapi.json"): "read",
    ("dashboard", "GET", "/"): "open",
    ("dashboard", "GET", "/ui/{name}"): "open",
    ("dashboard", "GET", "/api/status"): "read",
    ("dashboard", "GET", "/api/sessions"): "read",
    ("dashboard", "GET", "/api/sessions/{id}"): "read",
    ("dashboard", "GET", "/api/sessions/{id}/tasks"): "read",
    ("dashboard", "GET", "/api/sessions/{id}/tasks/{taskId}"): "read",
    ("dashboard", "POST", "/api/sessions"): "write",
    ("dashboard", "POST", "/api/sessions/{id}/stop"): "write",
    ("dashboard", "POST", "/api/sessions/{id}/pause"): "write",
    ("dashboard", "POST", "/api/sessions/{id}/resume"): "write",
    ("dashboard", "POST", "/api/sessions/{id}/input"): "write",
    ("dashboard", "DELETE", "/api/sessions/{id}"): "write",
    ("dashboard", "GET", "/api/events"): "read",
    ("dashboard", "GET", "/api/events/history"): "read",
    ("dashboard", "GET", "/api/events/stats"): "read",
    ("dashboard", "GET", "/api/enterprise/status"): "read",
    ("dashboard", "POST", "/api/enterprise/tokens"): "admin",
    ("dashboard", "GET", "/api/enterprise/tokens"): "admin",
    ("dashboard", "DELETE", "/api/enterprise/tokens/{id}"): "admin",
    ("dashboard", "GET", "/api/enterprise/audit"): "audit",
    ("dashboard", "GET", "/api/enterprise/audit/summary"): "audit",
    ("dashboard", "GET", "/api/enterprise/audit/verify"): "audit",
    ("dashboard", "GET", "/ws"): "read",
    ("dashboard", "GET", "/api/projects"): "read",
    ("dashboard", "POST", "/api/projects"): "write",
    ("dashboard", "GET", "/api/projects/{id}"): "read",
    ("dashboard", "PUT", "/api/projects/{id}"): "write",
    ("dashboard", "DELETE", "/api/projects/{id}"): "write",
    ("dashboard", "GET", "/api/tasks"): "read",
    ("dashboard", "POST", "/api/tasks"): "write",
    ("dashboard", "GET", "/api/tasks/{id}"): "read",
    ("dashboard", "PUT", "/api/tasks/{id}"): "write",
    ("dashboard", "DELETE", "/api/tasks/{id}"): "write",
    ("dashboard", "POST", "/api/tasks/{id}/move"): "write",
    ("dashboard", "GET", "/api/registry/projects"): "read",
    ("dashboard", "POST", "/api/registry/projects"): "write",
    ("dashboard", "GET", "/api/registry/projects/{id}"): "read",
    ("dashboard", "DELETE", "/api/registry/projects/{id}"): "write",
    ("dashboard", "GET", "/api/registry/projects/{id}/health"): "read",
    ("dashboard", "GET", "/api/registry/discover"): "read",
    ("dashboard", "POST", "/api/registry/sync"): "write",
    ("dashboard", "GET", "/api/registry/tasks"): "read",
    ("dashboard", "GET", "/api/registry/learnings"): "read",
}

# Callers: name -> the scopes of its token (None: no valid token at all).
CALLERS: dict[str, tuple[str, ...] | None] = {
    "none": None,
    "read": ("read",),
    "write": ("write",),
    "audit": ("audit",),
    "admin": ("admin",),
    "expired": None,
    "revoked": None,
}


def route_table(tmp: Path) -> list[tuple[str, Route]]:
    daemon = Daemon(Config(loki_home=tmp))  # built, not started: its surfaces are the tables
    return [("api", r) for r in daemon.api.routes] + [
        ("dashboard", r) for r in daemon.dashboard.routes
    ]


def test_every_route_declares_the_scope_recorded_here(tmp_path: Path) -> None:
    declared = {(name, r.method, r.path): r.requires for name, r in route_table(tmp_path)}
    assert declared == DECLARED


@pytest.fixture(scope="module")
def guarded(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[DaemonProcess, dict[str, str]]]:
    home = tmp_path_factory.mktemp("home")
    daemon = DaemonProcess(home, extra_env={"LOKI_ENTERPRISE_AUTH": "true"}).start()
    tokens: dict[str, str] = {}
    try:
        with daemon.control() as owner:
            for name in ("read", "write", "audit", "admin", "expired", "revoked"):
                scopes = list(CALLERS[name] or ("admin",))
                answer = owner.post(
                    "/dashboard/api/enterprise/tokens", json={"name": name, "scopes": scopes}
                )
                assert answer.status_code == 201, answer.text
                tokens[name] = answer.json()["token"]
                if name == "revoked":
                    token_id = answer.json()["id"]
                    assert (
                        owner.delete(f"/dashboard/api/enterprise/tokens/{token_id}").status_code
                        == 200
                    )
                if name == "expired":
                    with sqlite3.connect(daemon.data / "lokid.db") as db:
                        db.execute(
                            "UPDATE api_tokens SET expires_at = '2020-01-01T00:00:00.000Z'"
                            " WHERE id = ?",
                            (answer.json()["id"],),
                        )
        yield daemon, tokens
    finally:
        daemon.kill()


def _request(client: httpx.Client, method: str, url: str, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with client.stream(method, url, headers=headers) as response:
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            return response  # an endless stream: the status line is the answer
        response.read()
        return response


def test_every_route_and_caller_gets_the_declared_answer(
    guarded: tuple[DaemonProcess, dict[str, str]], tmp_path: Path
) -> None:
    daemon, tokens = guarded
    bases = {"api": daemon.api_url, "dashboard": daemon.dashboard_url}
    with daemon.control() as owner:
        before = owner.get("/dashboard/api/enterprise/audit?limit=1").json()
    first_new = (before["entries"][0]["id"] if before["entries"] else 0) + 1
    refusals = 0
    changes = 0
    wrong: list[str] = []
    with httpx.Client(timeout=10) as client:
        for surface, route in route_table(tmp_path):
            url = bases[surface] + re.sub(r"{\w+}", "nope-1", route.path)
            for caller, scopes in CALLERS.items():
                answer = _request(client, route.method, url, tokens.get(caller))
                status = answer.status_code
                where = f"{caller:>8} {route.method} {surface}{route.path}: {status}"
                if route.requires == OPEN:
                    expected: Any = "handled"
                elif scopes is None:
                    expected = 401
                elif route.requires == "authenticated" or grants(scopes, route.requires):
                    expected = "handled"
                else:
                    expected = 403
                if expected == "handled":
                    if status in (401, 403) or status >= 500:
                        wrong.append(f"{where}, expected the handler's answer")
                    elif route.method not in ("GET", "HEAD"):
                        changes += 1
                    continue
                refusals += 1
                if status != expected:
                    wrong.append(f"{where}, expected {expected}")
                    continue
                error = answer.json()["error"]
                if expected == 401:
                    assert error["code"] == "UNAUTHORIZED", where
                else:
                    assert error["code"] == "FORBIDDEN", where
                    assert error["details"]["required_scope"] == route.requires, where
    assert not wrong, "\n".join(wrong)
    assert refusals > 100 and changes > 10  # the matrix really ran

    # Every refusal and every change that reached a handler is in the audit log.
    with daemon.control() as owner:
        entries = owner.get("/dashboard/api/enterprise/audit?limit=1000").json()["entries"]
    new = [e for e in entries if e["id"] >= first_new]
    assert sum(e["action"].startswith("auth.") for e in new) == refusals
    assert sum(not e["action"].startswith("auth.") for e in new) == changes
    expired = [e for e in new if e["details"].get("reason") == "expired"]
    assert expired and all(e["actor"].startswith("tok-") for e in expired)


def test_tokens_in_the_wrong_shape_are_401_with_a_reason(
    guarded: tuple[DaemonProcess, dict[str, str]],
) -> None:
    daemon, tokens = guarded
    url = f"{daemon.api_url}/api/sessions"
    cases = {
        "Basic dXNlcjpwYXNz": "malformed",
        "Bearer": "malformed",
        "Bearer loki_short": "malformed",
        "Bearer " + tokens["read"][:-1] + ("A" if tokens["read"][-1] != "A" else "B"): "malformed",
    }
    for header, reason in cases.items():
        answer = httpx.get(url, headers={"Authorization": header}, timeout=5)
        assert answer.status_code == 401, header
        assert answer.json()["error"]["details"]["reason"] == reason, header
    assert httpx.get(url, timeout=5).json()["error"]["details"]["reason"] == "missing"


def test_the_owner_on_the_socket_needs_no_token(
    guarded: tuple[DaemonProcess, dict[str, str]],
) -> None:
    daemon, _ = guarded
    with daemon.control() as owner:
        assert owner.get("/api/sessions").status_code == 200
        assert owner.get("/dashboard/api/enterprise/audit/summary").json()["chain_valid"] is True
        assert owner.get("/dashboard/api/enterprise/status").json()["auth_enabled"] is True


def test_a_revoked_token_stops_working_at_once(
    guarded: tuple[DaemonProcess, dict[str, str]],
) -> None:
    daemon, _ = guarded
    with daemon.control() as owner:
        made = owner.post(
            "/dashboard/api/enterprise/tokens", json={"name": "short-lived", "scopes": ["read"]}
        ).json()
        headers = {"Authorization": f"Bearer {made['token']}"}
        assert httpx.get(f"{daemon.api_url}/api/status", headers=headers).status_code == 200
        listed = owner.get("/dashboard/api/enterprise/tokens").json()["tokens"]
        used = next(t for t in listed if t["id"] == made["id"])
        assert used["last_used_at"] is not None
        assert "token" not in used and "token_sha256" not in used
        owner.delete(f"/dashboard/api/enterprise/tokens/{made['id']}")
    answer = httpx.get(f"{daemon.api_url}/api/status", headers=headers)
    assert answer.status_code == 401
    assert answer.json()["error"]["details"]["reason"] == "revoked"


def _raw(base: str, method: str, target: str, token: str) -> tuple[int, dict[str, Any]]:
    """One request with `target` exactly as written (httpx would normalise it)."""
    host, port = base.removeprefix("http://").split(":")
    head = (
        f"{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
        f"Authorization: Bearer {token}\r\nContent-Length: 2\r\n\r\n{{}}"
    )
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode())
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    status_line, _, rest = raw.partition(b"\r\n")
    body = rest.partition(b"\r\n\r\n")[2]
    return int(status_line.split()[1]), json.loads(body) if body.startswith(b"{") else {}


def test_no_spelling_of_a_path_gets_past_the_scope_check(
    guarded: tuple[DaemonProcess, dict[str, str]], tmp_path: Path
) -> None:
    """Regression: `//api/enterprise/tokens`, `/%2Fapi/...` and the absolute form
    `POST http://localhost/api/enterprise/tokens` let a read token mint admin tokens: the
    gate judged an undeclared path while Quart's router merged slashes and parsed URLs."""
    daemon, tokens = guarded
    bases = {"api": daemon.api_url, "dashboard": daemon.dashboard_url}
    checked = 0
    wrong: list[str] = []
    for surface, route in route_table(tmp_path):
        if route.requires in (OPEN, "read", "authenticated"):
            continue
        path = re.sub(r"{\w+}", "nope-1", route.path)
        base = bases[surface]
        spellings = {
            f"/{path}": 404,  # not the route: no route has `//api/...`
            f"/%2F{path[1:]}": 404,
            f"{base}{path}": 403,  # the absolute form of the route itself
            f"http://localhost{path}": 403,
        }
        for target, expected in spellings.items():
            status, body = _raw(base, route.method, target, tokens["read"])
            where = f"{route.method} {surface} {target}: {status} {body}"
            named = body.get("error", {}).get("details", {}).get("required_scope")
            if status != expected or (expected == 403 and named != route.requires):
                wrong.append(where)
            checked += 1
    assert not wrong, "\n".join(wrong)
    assert checked > 40


def test_an_absolute_form_target_is_served_as_its_path(
    guarded: tuple[DaemonProcess, dict[str, str]],
) -> None:
    """RFC 9112 §3.2.2: a server must accept `GET http://host/path` (it was a 404 naming
    the very route on the lean routes)."""
    daemon, tokens = guarded
    for base, path in ((daemon.api_url, "/api/status"), (daemon.dashboard_url, "/api/projects")):
        status, body = _raw(base, "GET", f"{base}{path}?", tokens["read"])
        assert status == 200, body
