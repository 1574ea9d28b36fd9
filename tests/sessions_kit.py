"""Helpers for session tests: a project with a PRD, the fake agent on PATH, waiting on the API.

`SessionLab` gives an in-process daemon (`running_daemon`) whose agents are
the fake Claude CLI (`tests/fake_agent.py`, installed as `claude` in a folder
put first on PATH), an httpx client for its API, and helpers that wait -
bounded - for a session status or an event.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from lokid.daemon import Daemon
from lokid.process import group_members

from . import fake_agent
from .test_events_http import api, running_daemon

WAIT_SECONDS = 30.0

PRD_THREE = """\
# Todo app

## Features
- Add a todo item
- Mark an item done
- Delete an item
"""


def make_project(root: Path, prd: str = PRD_THREE, name: str = "proj") -> Path:
    project = root / name
    project.mkdir(parents=True, exist_ok=True)
    (project / "prd.md").write_text(prd)
    return project


def install_fake_agent(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put the fake `claude` first on PATH; return the log file of its invocations."""
    bin_dir = root / "bin"
    fake_agent.install(bin_dir, ("claude",))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    log = root / "agent-log.jsonl"
    monkeypatch.setenv("FAKE_AGENT_LOG", str(log))
    monkeypatch.setenv("FAKE_AGENT_LIFETIME", "120")
    return log


def invocations(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def live_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    return [pid for pid, state in group_members(pgid) if state != "Z"]


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], what: str, timeout: float = WAIT_SECONDS
) -> None:
    """Poll `check` (processes and files give no event to wait on) until true, bounded."""
    with trio.move_on_after(timeout):
        while True:
            result = check()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await trio.sleep(0.02)
    raise AssertionError(f"timed out waiting until {what}")


class Lab:
    def __init__(self, daemon: Daemon, client: httpx.AsyncClient) -> None:
        self.daemon = daemon
        self.client = client

    async def create(self, body: dict[str, Any], **headers: str) -> dict[str, Any]:
        answer = await self.client.post("/api/sessions", json=body, headers=headers)
        assert answer.status_code == 201, answer.text
        created: dict[str, Any] = answer.json()
        return created

    async def session(self, session_id: str) -> dict[str, Any]:
        answer = await self.client.get(f"/api/sessions/{session_id}")
        assert answer.status_code == 200, answer.text
        session: dict[str, Any] = answer.json()
        return session

    async def tasks(self, session_id: str) -> list[dict[str, Any]]:
        answer = await self.client.get(f"/api/sessions/{session_id}/tasks")
        assert answer.status_code == 200, answer.text
        tasks: list[dict[str, Any]] = answer.json()["tasks"]
        return tasks

    async def events(self, session_id: str, *types: str) -> list[dict[str, Any]]:
        params = {"sessionId": session_id, "limit": "1000", "minLevel": "debug"}
        if types:
            params["types"] = ",".join(types)
        answer = await self.client.get("/api/events/history", params=params)
        assert answer.status_code == 200, answer.text
        events: list[dict[str, Any]] = answer.json()["events"]
        return events

    async def wait_status(
        self, session_id: str, *statuses: str, timeout: float = WAIT_SECONDS
    ) -> dict[str, Any]:
        with trio.move_on_after(timeout):
            while True:
                session = await self.session(session_id)
                if session["status"] in statuses:
                    return session
                await trio.sleep(0.02)
        raise AssertionError(f"session never became {statuses}: {await self.session(session_id)}")

    async def wait_event(
        self, session_id: str, type: str, count: int = 1, timeout: float = WAIT_SECONDS
    ) -> list[dict[str, Any]]:
        with trio.move_on_after(timeout):
            while True:
                found = await self.events(session_id, type)
                if len(found) >= count:
                    return found
                await trio.sleep(0.02)
        raise AssertionError(f"no {count} x {type} event: {await self.events(session_id)}")

    async def post(self, path: str, body: Any = None) -> httpx.Response:
        return await self.client.post(path, json=body)


@asynccontextmanager
async def lab(home: Path, **settings: Any) -> AsyncIterator[Lab]:
    settings.setdefault("retry_base", 0.01)
    settings.setdefault("retry_cap", 0.05)
    settings.setdefault("agent_grace", 1.0)
    async with (
        running_daemon(home, **settings) as daemon,
        httpx.AsyncClient(base_url=api(daemon), timeout=10) as client,
    ):
        yield Lab(daemon, client)


def json_field(path: Path, key: str) -> Any:
    """`key` of the JSON object in `path`, or None while the file does not exist yet
    (the `.loki/` mirror follows the store within a second)."""
    try:
        return json.loads(path.read_text()).get(key)
    except FileNotFoundError:
        return None


def git(project: Path, *args: str) -> str:
    """Run git in `project` (with an author for commits); its output."""
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@localhost", *args],
        cwd=project,
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def make_git_project(root: Path, prd: str) -> Path:
    """`make_project` as a git repository: everything in it committed on `main`."""
    project = make_project(root, prd)
    git(project, "init", "-q", "-b", "main")
    git(project, "add", "-A")
    git(project, "commit", "-qm", "start")
    return project
