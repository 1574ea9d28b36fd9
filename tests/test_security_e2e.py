"""Auth, rate limits, CORS and the audit log on a real `loki serve`, end to end.

The daemon binds `0.0.0.0` in one test (allowed with auth on); every request
still goes to loopback.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from .daemon_proc import DaemonProcess

ORIGIN = "http://localhost:3000"


def test_a_remote_listener_is_allowed_with_auth_and_then_guarded(
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    daemon = daemon_factory(extra_env={"LOKI_ENTERPRISE_AUTH": "true"}).start("--host", "0.0.0.0")
    port = daemon.api_url.rsplit(":", 1)[1]
    url = f"http://127.0.0.1:{port}"
    assert daemon.api_url.startswith("http://0.0.0.0:")
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200
    refused = httpx.get(f"{url}/api/status", timeout=5)
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "UNAUTHORIZED"
    with daemon.control() as owner:  # the bootstrap path: the owner on the socket
        made = owner.post(
            "/dashboard/api/enterprise/tokens", json={"name": "ci", "scopes": ["read"]}
        ).json()
    headers = {"Authorization": f"Bearer {made['token']}"}
    assert httpx.get(f"{url}/api/status", headers=headers, timeout=5).status_code == 200
    denied = httpx.post(f"{url}/api/sessions", json={}, headers=headers, timeout=5)
    assert denied.status_code == 403
    assert denied.json()["error"]["details"]["required_scope"] == "write"


def test_rate_limit_headers_on_every_route_kind_and_429(
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    daemon = daemon_factory(extra_env={"LOKI_RATE_LIMIT": "5/3600"}).start()
    api = daemon.api_url
    with httpx.Client(timeout=5) as client:
        inline = client.get(f"{api}/api/status")  # lean route: the inline HTTP/1.1 path
        quart = client.get(f"{api}/api/sessions")  # Quart view through Hypercorn
        change = client.post(f"{api}/api/sessions/nope/stop")
        for answer, remaining in ((inline, "4"), (quart, "3"), (change, "2")):
            assert answer.headers["x-ratelimit-limit"] == "5"
            assert answer.headers["x-ratelimit-remaining"] == remaining
            assert int(answer.headers["x-ratelimit-reset"]) > 1_700_000_000
        assert change.status_code == 404
        statuses = [client.get(f"{api}/api/status").status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        limited = client.get(f"{api}/api/sessions")
        assert limited.status_code == 429
        assert int(limited.headers["retry-after"]) >= 700
        assert limited.json()["error"]["retry_after"] == int(limited.headers["retry-after"])
        health = client.get(f"{api}/health")
        assert health.status_code == 200 and "x-ratelimit-limit" not in health.headers
    with daemon.control() as owner:  # the owner's socket is not limited
        assert owner.get("/api/status").status_code == 200


def test_cors_for_a_listed_origin_on_a_live_daemon(
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    daemon = daemon_factory(extra_env={"LOKI_CORS_ORIGINS": ORIGIN}).start()
    url = f"{daemon.dashboard_url}/api/enterprise/status"
    with httpx.Client(timeout=5) as client:
        preflight = client.options(
            url,
            headers={"Origin": ORIGIN, "Access-Control-Request-Method": "GET"},
        )
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == ORIGIN
        answer = client.get(url, headers={"Origin": ORIGIN})
        assert answer.status_code == 200
        assert answer.headers["access-control-allow-origin"] == ORIGIN
        other = client.get(url, headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_changes_on_every_surface_are_audited_and_the_chain_verifies(
    daemon: DaemonProcess,
) -> None:
    with httpx.Client(timeout=5) as client:
        assert client.post(f"{daemon.api_url}/api/sessions/nope/stop").status_code == 404
        assert client.delete(f"{daemon.dashboard_url}/api/enterprise/tokens/tok-x").status_code
        # refused for a query parameter the route does not declare: audited too
        assert client.post(f"{daemon.api_url}/api/sessions/nope/pause?nwo=1").status_code == 400
    with daemon.control() as owner:
        assert owner.post("/api/sessions/nope/pause").status_code == 404
        assert owner.post("/dashboard/api/projects?dry=1", json={"name": "p"}).status_code == 400
        entries = owner.get("/dashboard/api/enterprise/audit").json()["entries"]
        summary = owner.get("/dashboard/api/enterprise/audit/summary").json()
    seen = [(e["action"], e["status"], e["actor"], e["resource"]) for e in reversed(entries)]
    assert [s[:3] for s in seen[-5:]] == [
        ("session.stop", 404, "127.0.0.1"),
        ("token.revoke", 404, "127.0.0.1"),
        ("session.pause", 400, "127.0.0.1"),
        ("session.pause", 404, f"uid:{os.getuid()}"),
        ("project.create", 400, f"uid:{os.getuid()}"),
    ]
    assert [s[3] for s in seen[-5:-1]] == ["nope", "tok-x", "nope", "nope"]
    assert summary["chain_valid"] is True
    assert summary["by_action"]["session.stop"] == 1


def test_a_web_page_cannot_start_a_session_on_a_daemon_without_auth(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    body = json.dumps({"prdText": "# Build it\n", "projectDir": str(tmp_path)})
    page = {"Content-Type": "text/plain", "Origin": "http://evil.example"}
    answer = httpx.post(f"{daemon.api_url}/api/sessions", content=body, headers=page, timeout=5)
    assert answer.status_code == 403
    assert answer.json()["error"]["details"]["reason"] == "cross_origin"
    rebound = httpx.get(
        f"{daemon.api_url}/api/sessions", headers={"Host": "attacker.example"}, timeout=5
    )
    assert rebound.status_code == 403
    with daemon.control() as owner:
        assert owner.get("/api/sessions").json()["total"] == 0
        refusals = owner.get("/dashboard/api/enterprise/audit?action=auth.*").json()["entries"]
    assert [e["details"]["reason"] for e in refusals] == ["host", "cross_origin"]


def test_a_web_page_cannot_register_projects_through_discover(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    (tmp_path / "work" / "app" / ".loki").mkdir(parents=True)
    url = f"{daemon.dashboard_url}/api/registry/discover"
    query = {"roots": str(tmp_path / "work"), "register": "true"}
    pages = [
        {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "cross-site"},  # an <img src=...> on another site
    ]
    with httpx.Client(timeout=5) as client:
        for page in pages:
            answer = client.get(url, params=query, headers=page)
            assert answer.status_code == 403, page
            assert answer.json()["error"]["details"]["reason"] == "cross_origin"
        assert client.get(f"{daemon.dashboard_url}/api/registry/projects").json()["total"] == 0
        registered = client.get(url, params=query).json()  # curl: no Origin
        assert registered["registered"] == 1
    with daemon.control() as owner:
        assert owner.get("/dashboard/api/registry/discover", params=query).status_code == 200
        entries = owner.get("/dashboard/api/enterprise/audit").json()["entries"]
    seen = [(e["action"], e["status"], e["actor"]) for e in reversed(entries)]
    assert seen == [
        ("auth.forbidden", 403, "127.0.0.1"),
        ("auth.forbidden", 403, "127.0.0.1"),
        ("registry.discover", 200, "127.0.0.1"),
        ("registry.discover", 200, f"uid:{os.getuid()}"),
    ]
    attempted = [e["details"]["action"] for e in reversed(entries) if e["status"] == 403]
    assert attempted == ["registry.discover"] * 2  # what the admitted one is recorded as


def read_until(lines: Iterator[str], wanted: str) -> None:
    """Read an event stream's lines up to `wanted` (bounded by the client's read timeout)."""
    for line in lines:
        if line == wanted:
            return
    raise AssertionError(f"the stream ended before {wanted!r}")


def test_revoking_a_token_ends_the_event_streams_opened_with_it(
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    daemon = daemon_factory(extra_env={"LOKI_ENTERPRISE_AUTH": "true"}).start()
    with daemon.control() as owner:
        made = owner.post(
            "/dashboard/api/enterprise/tokens", json={"name": "feed", "scopes": ["read"]}
        ).json()
    token = {"Authorization": f"Bearer {made['token']}"}
    # The inline path, and Hypercorn's (the inline path hands `Expect` over).
    handed_over = {**token, "Expect": "100-continue"}
    with (
        httpx.Client(timeout=5) as client,
        client.stream("GET", f"{daemon.api_url}/api/events", headers=token) as inline,
        client.stream("GET", f"{daemon.dashboard_url}/api/events", headers=handed_over) as asgi,
    ):
        streams = [inline.iter_lines(), asgi.iter_lines()]
        for lines in streams:
            read_until(lines, ": connected")
        with daemon.control() as owner:
            assert owner.delete(f"/dashboard/api/enterprise/tokens/{made['id']}").is_success
        for lines in streams:  # each ends by itself (a read timeout fails the test)
            assert [line for line in lines if line] == [": closed: Token revoked"]
    again = httpx.get(f"{daemon.api_url}/api/events/stats", headers=token, timeout=5)
    assert again.json()["error"]["message"] == "Token revoked"


def test_an_idempotent_replay_is_audited_as_a_replay(daemon: DaemonProcess, tmp_path: Path) -> None:
    """A retry with the same `Idempotency-Key` creates nothing: its entry says `replay`,
    and its answer `Idempotent-Replayed: true` (lean routes inline, and Quart routes)."""
    (tmp_path / "reg").mkdir()
    dashboard = daemon.dashboard_url
    with httpx.Client(timeout=5) as client:
        project = client.post(f"{dashboard}/api/projects", json={"name": "p"}).json()
        creates = [
            (f"{dashboard}/api/projects", {"name": "q"}),
            (f"{dashboard}/api/tasks", {"project_id": project["id"], "title": "t"}),
            (f"{dashboard}/api/registry/projects", {"path": str(tmp_path / "reg")}),
            (f"{dashboard}/api/enterprise/tokens", {"name": "ci", "scopes": ["read"]}),
        ]
        for n, (url, body) in enumerate(creates):
            key = {"Idempotency-Key": f"once-{n}"}
            first = client.post(url, json=body, headers=key)
            again = client.post(url, json=body, headers=key)
            assert (first.status_code, again.status_code) == (201, 201), url
            assert "idempotent-replayed" not in first.headers
            assert again.headers["idempotent-replayed"] == "true"
    with daemon.control() as owner:
        entries = owner.get("/dashboard/api/enterprise/audit").json()["entries"]
    seen = [(e["action"], e["details"].get("replay", False)) for e in reversed(entries)][1:]
    assert seen == [
        ("project.create", False),
        ("project.create", True),
        ("task.create", False),
        ("task.create", True),
        ("registry.add", False),
        ("registry.add", True),
        ("token.create", False),
        ("token.create", True),
    ]


def handshake(url: str, target: str) -> tuple[int, dict[str, str]]:
    """A WebSocket handshake over a raw socket: the answer's status and headers."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    request = (
        f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=5) as conn:
        conn.sendall(request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(4096)
            if not chunk:
                break
            head += chunk
    lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers


def test_websocket_handshakes_carry_the_rate_limit_headers(
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    daemon = daemon_factory(extra_env={"LOKI_RATE_LIMIT": "4/3600"}).start()
    answers = [
        handshake(daemon.dashboard_url, target)
        for target in ("/ws", "/ws?foo=1", "/wsx", "/ws", "/ws")
    ]
    assert [status for status, _ in answers] == [101, 400, 404, 101, 101]
    remaining = [headers.get("x-ratelimit-remaining") for _, headers in answers]
    assert remaining == ["3", "2", "1", "0", "0"]  # the last: refused (429), closed with 1008
    assert all(headers["x-ratelimit-limit"] == "4" for _, headers in answers)


def test_a_flood_of_refused_web_page_requests_is_rate_limited(
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    """Cross-origin and foreign-Host 403s use up the budget (each is an audit entry):
    on the inline path (a lean route) and through Quart (a Quart view) alike."""
    daemon = daemon_factory(extra_env={"LOKI_RATE_LIMIT": "4/3600"}).start()
    page = {"Origin": "http://evil.example"}
    with httpx.Client(timeout=5) as client:
        inline = [
            client.post(f"{daemon.api_url}/api/sessions/x/stop", headers=page) for _ in range(2)
        ]
        tokens = f"{daemon.dashboard_url}/api/enterprise/tokens"
        quart = [client.post(tokens, json={}, headers={"Host": "evil.example"}) for _ in range(3)]
    answers = [*inline, *quart]  # one budget: the client's address
    assert [a.status_code for a in answers] == [403, 403, 403, 403, 429]
    assert [a.headers["x-ratelimit-remaining"] for a in answers] == ["3", "2", "1", "0", "0"]
    assert [a.json()["error"]["details"].get("reason") for a in answers[:4]] == [
        "cross_origin",
        "cross_origin",
        "host",
        "host",
    ]
    with daemon.control() as owner:
        refusals = owner.get("/dashboard/api/enterprise/audit?action=auth.*").json()["total"]
    assert refusals == 4


def test_idempotency_keys_are_each_callers_own(
    daemon_factory: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    """Two tokens that send the same key and body make two things: neither gets the
    other's answer (a token's secret, a project's id) or learns of the other's key."""
    daemon = daemon_factory(extra_env={"LOKI_ENTERPRISE_AUTH": "true"}).start()
    with daemon.control() as owner:
        made = [
            owner.post(
                "/dashboard/api/enterprise/tokens", json={"name": name, "scopes": ["admin"]}
            ).json()
            for name in ("alice", "bob")
        ]
    alice, bob = ({"Authorization": f"Bearer {m['token']}"} for m in made)
    dashboard = daemon.dashboard_url
    key = {"Idempotency-Key": "shared-key"}
    with httpx.Client(timeout=5) as client:

        def post(path: str, who: dict[str, str], body: dict[str, Any]) -> httpx.Response:
            return client.post(f"{dashboard}{path}", json=body, headers={**who, **key})

        for path, body in (
            ("/api/projects", {"name": "p"}),
            ("/api/enterprise/tokens", {"name": "ci", "scopes": ["read"]}),
        ):
            first, other = post(path, alice, body), post(path, bob, body)
            again = post(path, alice, body)
            assert [a.status_code for a in (first, other, again)] == [201, 201, 201], path
            assert "idempotent-replayed" not in other.headers
            assert other.json()["id"] != first.json()["id"]
            assert again.headers["idempotent-replayed"] == "true"
            assert again.json()["id"] == first.json()["id"]
            # Each caller's own key with another body: a 409 for the key's owner only.
            changed = {**body, "name": "changed"}
            assert post(path, alice, changed).status_code == 409
            assert post(path, bob, changed).status_code == 409
        assert first.json()["token"] and other.json()["token"]  # a secret of each one's own
        project = client.post(f"{dashboard}/api/projects", json={"name": "q"}, headers=alice).json()
        task = {"project_id": project["id"], "title": "t"}
        tasks = [post("/api/tasks", who, task).json()["id"] for who in (alice, bob, alice)]
        assert tasks[0] == tasks[2] != tasks[1]
        (tmp_path / "reg").mkdir()
        place = {"path": str(tmp_path / "reg")}
        assert post("/api/registry/projects", alice, place).status_code == 201
        taken = post("/api/registry/projects", bob, place)  # not alice's answer: a new try
        assert taken.status_code == 409 and "idempotent-replayed" not in taken.headers


def test_repeated_idempotency_key_or_origin_headers_are_refused(daemon: DaemonProcess) -> None:
    """A singleton header sent twice: which one a proxy in front read is unknowable."""
    url = f"{daemon.dashboard_url}/api/projects"
    with httpx.Client(timeout=5) as client:
        keys = [("Idempotency-Key", "a"), ("Idempotency-Key", "b")]
        answer = client.post(url, json={"name": "p"}, headers=keys)
        assert answer.status_code == 400
        assert answer.json()["error"]["details"]["field"] == "Idempotency-Key"
        origins = [("Origin", daemon.dashboard_url), ("Origin", "http://evil.example")]
        refused = client.post(url, json={"name": "p"}, headers=origins)
        assert refused.status_code == 403
        assert refused.json()["error"]["details"]["reason"] == "cross_origin"
        listed = client.get(f"{daemon.dashboard_url}/api/projects").json()
    assert listed == []  # neither made a project
