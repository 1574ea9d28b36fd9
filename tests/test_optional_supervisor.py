"""A registry that keeps failing, in a real in-process daemon: it touches nothing else.

The registry scanner is the one non-essential actor (it only serves the
Dashboard's project registry); it runs under the `optional` supervisor, which
never escalates (docs/architecture.md, `lokid.supervisor` "Back-off"). The
daemon runs on a `MockClock` at real speed, so sockets, threads and agents
behave as usual while the test jumps over the 30 s back-off instead of waiting
for it. The bug is injected by replacing a `RegistryScanner` method.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from lokid import cli
from lokid.actors.registry_scanner import ListEntries, RegistryScanner
from lokid.config import load_config
from lokid.daemon import OPTIONAL_BACKOFF, Daemon, Phase, serve
from lokid.events import Level

from .sessions_kit import eventually, install_fake_agent, make_project
from .test_events_http import Stream

BUG = "RuntimeError: injected registry bug"
DOWN = re.compile(
    r"the project registry is down after repeated failures \(last: (?P<last>.+)\); "
    r"lokid starts it again in (?P<seconds>\d+) s, the rest of lokid is not affected"
)


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Trio's clock at real speed, which the test may jump forward (pytest-trio uses it)."""
    return trio.testing.MockClock(rate=1.0)


@contextlib.asynccontextmanager
async def daemon_at(home: Path) -> AsyncIterator[Daemon]:
    config = load_config(
        {"api_port": 0, "dashboard_port": 0, "agent_grace": 1.0},
        environ={"LOKI_HOME": str(home)},
    )
    # 30 s of the bound are the back-off jumped over; the rest is real time.
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            daemon: Daemon = await nursery.start(functools.partial(serve, config))
            yield daemon
            daemon.request_shutdown()


def url(daemon: Daemon, listener: str) -> str:
    assert daemon.listeners is not None
    return daemon.listeners.urls()[listener]


def crash_on(monkeypatch: pytest.MonkeyPatch, method: str, message: type | None) -> list[bool]:
    """Make `RegistryScanner.<method>` raise `BUG` (for `handle`: for `message` only)
    while the returned flag's `[0]` is true."""
    crashing = [True]
    real = getattr(RegistryScanner, method)

    async def buggy(self: RegistryScanner, *args: Any) -> Any:
        if crashing[0] and (message is None or isinstance(args[0], message)):
            raise RuntimeError("injected registry bug")
        return await real(self, *args)

    monkeypatch.setattr(RegistryScanner, method, buggy)
    return crashing


def child(tree: dict[str, Any], *path: str) -> dict[str, Any]:
    """A child of the `/api/status` supervisor tree, by ids from the root."""
    node: dict[str, Any] = {"detail": tree}
    for child_id in path:
        node = next(c for c in node["detail"]["children"] if c["id"] == child_id)
    return node


async def assert_registry_refused(client: httpx.AsyncClient) -> re.Match[str]:
    """Every registry route answers 503 with the error body at once, without asking."""
    answers = []
    with trio.fail_after(2):  # never a hang: refused before anything is queued
        answers.append(await client.get("/api/registry/projects"))
        answers.append(await client.get("/api/registry/discover"))
        answers.append(await client.post("/api/registry/projects", json={"path": "/tmp"}))
        answers.append(await client.post("/api/registry/sync"))
    for answer in answers:
        assert answer.status_code == 503, answer.text
        error = answer.json()["error"]
        assert error["code"] == "UNAVAILABLE"
        assert set(error["details"]) == {"component", "last_exit", "retry_in_seconds"}
    match = DOWN.fullmatch(answers[-1].json()["error"]["message"])
    assert match is not None, answers[-1].text
    return match


async def test_a_registry_crashing_on_every_request_touches_no_stream_session_or_listener(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: trio.testing.MockClock
) -> None:
    install_fake_agent(tmp_path, monkeypatch)
    crashing = crash_on(monkeypatch, "handle", ListEntries)
    project = make_project(tmp_path, "# App\n\n## Features\n- Forever [mode:hang]\n")
    async with (
        daemon_at(tmp_path / "home") as daemon,
        httpx.AsyncClient(base_url=url(daemon, "api"), timeout=10) as api,
        # One connection, kept alive: every registry request and answer goes over it.
        httpx.AsyncClient(
            base_url=url(daemon, "dashboard"), timeout=10, limits=httpx.Limits(max_connections=1)
        ) as dashboard,
        api.stream("GET", "/api/events", params={"minLevel": "debug"}) as response,
    ):
        events = Stream(response)
        assert await events.frame() == {"retry": "3000"}
        created = await api.post("/api/sessions", json={"prd": str(project / "prd.md")})
        assert created.status_code == 201, created.text
        sid = created.json()["id"]

        async def agent_runs() -> bool:
            session = (await api.get(f"/api/sessions/{sid}")).json()
            return session["status"] == "running" and daemon.pool.active == 1

        await eventually(agent_runs, "the session's agent runs")

        # Six crashes within 30 s: one more than the old root's intensity allowed.
        crashes = 0
        while True:
            answer = await dashboard.get("/api/registry/projects")
            assert answer.status_code == 503, answer.text
            if DOWN.fullmatch(answer.json()["error"]["message"]):
                break
            assert answer.json()["error"]["message"] == (
                "registry_scanner stopped before it replied"
            )
            crashes += 1
            assert crashes <= 6
        assert crashes == 6
        down = await assert_registry_refused(dashboard)
        assert down["last"] == BUG and 28 <= int(down["seconds"]) <= 30

        # The rest of the daemon did not notice.
        assert daemon.phase is Phase.RUNNING and daemon.failure is None
        published = await daemon.bus.publish("log", None, Level.INFO, {"message": "still here"})
        while True:  # the stream opened before the crashes delivers what came after
            frame = await events.frame()
            if frame.get("id") == str(published.id):
                break
        assert (await api.get(f"/api/sessions/{sid}")).json()["status"] == "running"
        assert daemon.pool.active == 1
        for probe in ("/health", "/health/ready"):  # the registry is not a core actor
            assert (await dashboard.get(probe)).status_code == 200
        metrics = (await api.get("/metrics")).text
        assert 'lokid_supervisor_down{supervisor="optional"} 1.0' in metrics.splitlines()

        status = (await api.get("/api/status")).json()
        tree = status["supervisor"]
        assert [c["id"] for c in tree["children"]] == [
            "store",
            "audit_writer",
            "event_bus",
            "agent_pool",
            "sessions",
            "optional",
            "listeners",
        ]
        assert tree["restartsTotal"] == 0
        listeners = child(tree, "listeners")
        assert listeners["restarts"] == 0 and listeners["detail"]["restartsTotal"] == 0
        sessions = child(tree, "sessions")["detail"]["supervisor"]
        assert sessions["restartsTotal"] == 0
        optional = child(tree, "optional")
        assert (optional["running"], optional["restarts"]) == (True, 0)
        backoff = optional["detail"]["backoff"]
        assert (backoff["down"], backoff["timesDown"], backoff["delaySeconds"]) == (True, 1, 30)
        assert 28 <= backoff["retryInSeconds"] <= 30
        assert "more than 5 restarts in 30 s" in backoff["lastFailure"]
        registry = child(tree, "optional", "registry")
        assert (registry["running"], registry["restarts"], registry["lastExit"]) == (
            False,
            5,
            BUG,
        )
        assert registry["detail"]["refusing"] is True and registry["detail"]["refused"] >= 4
        lines = cli._tree_lines(tree)
        assert any(
            re.fullmatch(
                r"\s+optional \(one_for_one\) restarts=6 DOWN, retry in (28|29|30)s .+", line
            )
            for line in lines
        ), lines
        assert f"      registry: down restarts=5 mailbox=0/256 last_exit={BUG}" in lines

        # After the back-off the registry runs again (the bug is fixed meanwhile).
        crashing[0] = False
        clock.jump(OPTIONAL_BACKOFF.first)
        await eventually(lambda: daemon.registry.running, "the registry runs again")
        answer = await dashboard.get("/api/registry/projects")
        assert answer.status_code == 200, answer.text
        assert answer.json()["projects"] == []
        backoff = daemon.optional.statistics().backoff
        assert backoff is not None and (backoff.down, backoff.times_down) == (False, 1)
        assert daemon.registry.statistics().refusing is False
        assert daemon.root.statistics().restarts_total == 0
        assert (await api.get(f"/api/sessions/{sid}")).json()["status"] == "running"
        tree = (await api.get("/api/status")).json()["supervisor"]
        # the dashboard client's one connection was never dropped
        assert child(tree, "listeners", "dashboard")["detail"]["connectionsTotal"] == 1


async def test_a_registry_that_cannot_start_leaves_the_daemon_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: trio.testing.MockClock
) -> None:
    failing = crash_on(monkeypatch, "setup", None)
    async with (
        daemon_at(tmp_path / "home") as daemon,
        httpx.AsyncClient(base_url=url(daemon, "dashboard"), timeout=10) as client,
    ):
        assert daemon.phase is Phase.RUNNING
        down = await assert_registry_refused(client)
        assert down["last"] == BUG
        assert (await client.get("/health")).json()["status"] == "healthy"
        assert (await client.get("/health/ready")).json() == {"ready": True}
        backoff = daemon.optional.statistics().backoff
        assert backoff is not None and backoff.last_failure == (
            f"supervisor 'optional' failed to start: child 'registry' failed to start ({BUG})"
        )

        failing[0] = False
        clock.jump(OPTIONAL_BACKOFF.first)
        await eventually(lambda: daemon.registry.running, "the registry runs")
        answer = await client.get("/api/registry/projects")
        assert answer.status_code == 200, answer.text
