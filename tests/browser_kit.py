"""Helpers for the browser tests (tests/test_browser.py): Debian's Chromium driven by
Playwright, a real `loki serve` whose agents are the fake Claude CLI, an httpx client
for the Dashboard API, bounded waits on it, and screenshots.

Playwright never downloads a browser here: `launch(executable_path=CHROMIUM)`.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import Page, ViewportSize

from . import fake_agent
from .daemon_proc import DaemonProcess

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT: ViewportSize = {"width": 1280, "height": 800}
TIMEOUT_MS = 8_000  # every Playwright wait (actions and expect) is bounded by this
SLOW_TIMEOUT_MS = 20_000  # waiting for a session to finish its work
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"


def daemon_env(root: Path, **extra: str) -> dict[str, str]:
    """Environment for a daemon whose `claude` is the fake agent (installed under root/bin)."""
    bin_dir = root / "bin"
    fake_agent.install(bin_dir, ("claude",))
    return {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_AGENT_LIFETIME": "120",  # a leaked fake agent does not outlive the test run
        "LOKI_AGENT_GRACE": "1",  # stop: SIGTERM, then SIGKILL after 1 s (not 5)
        **extra,
    }


@contextmanager
def running_daemon(root: Path, **extra: str) -> Iterator[DaemonProcess]:
    """A `loki serve` subprocess with the fake agent; stopped (or killed) at the end."""
    daemon = DaemonProcess(root / "home", extra_env=daemon_env(root, **extra))
    daemon.start()
    try:
        yield daemon
    finally:
        try:
            daemon.terminate(timeout=20)
        finally:
            daemon.kill()


def make_project(root: Path, name: str, prd: str) -> Path:
    """A project folder holding prd.md."""
    project = root / name
    project.mkdir(parents=True, exist_ok=True)
    (project / "prd.md").write_text(prd)
    return project


class Api:
    """The Dashboard API over TCP, as the page sees it (optionally with a token)."""

    def __init__(self, daemon: DaemonProcess, token: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=daemon.dashboard_url, headers=headers, timeout=10)

    def close(self) -> None:
        self.client.close()

    def json(self, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
        answer = self.client.request(method, path, json=body)
        assert answer.status_code == expect, (method, path, answer.status_code, answer.text)
        return answer.json() if answer.content else None

    def eventually(self, check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
        """Poll `check` until true, at most `timeout` seconds (the page's request may still
        be on its way when the page already shows its change)."""
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, f"timed out waiting until {what}"
            time.sleep(0.05)

    def session(self, session_id: str) -> dict[str, Any]:
        session: dict[str, Any] = self.json("GET", f"/api/sessions/{session_id}")
        return session

    def create_session(self, body: dict[str, Any]) -> str:
        created: dict[str, Any] = self.json("POST", "/api/sessions", body, expect=201)
        return str(created["id"])

    def wait_session(
        self, session_id: str, done: Callable[[dict[str, Any]], bool], timeout: float = 20.0
    ) -> dict[str, Any]:
        """Poll the session until `done(session)`, at most `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            session = self.session(session_id)
            if done(session):
                return session
            assert time.monotonic() < deadline, f"session never got there: {session}"
            time.sleep(0.05)

    def events(self, session_id: str, types: str) -> list[dict[str, Any]]:
        answer = self.json(
            "GET",
            f"/api/events/history?sessionId={session_id}&types={types}&limit=1000&minLevel=debug",
        )
        events: list[dict[str, Any]] = answer["events"]
        return events

    def create_project(self, name: str) -> str:
        project: dict[str, Any] = self.json("POST", "/api/projects", {"name": name}, expect=201)
        return str(project["id"])

    def create_card(self, project_id: str, title: str, column: str = "backlog") -> str:
        body = {"project_id": project_id, "title": title, "column": column}
        card: dict[str, Any] = self.json("POST", "/api/tasks", body, expect=201)
        return str(card["id"])

    def card(self, card_id: str) -> dict[str, Any]:
        card: dict[str, Any] = self.json("GET", f"/api/tasks/{card_id}")
        return card

    def column(self, project_id: str, column: str) -> list[str]:
        """Titles of a column's cards, by position."""
        answer = self.json("GET", f"/api/tasks?project_id={project_id}&column={column}")
        return [task["title"] for task in answer["tasks"]]


UNLABELLED = """() => [...document.querySelectorAll('input, select, textarea, button, a[href]')]
  .filter((el) => el.getClientRects().length > 0)
  .filter((el) => {
    const labels = el.labels ? [...el.labels].map((l) => l.textContent).join('') : '';
    const text = ['BUTTON', 'A'].includes(el.tagName) ? el.textContent : '';
    const named = [el.getAttribute('aria-label'), labels, text, el.getAttribute('title')]
      .some((name) => name && name.trim());
    return !named && !el.getAttribute('aria-labelledby');
  })
  .map((el) => el.outerHTML.slice(0, 160))"""


OVERFLOWING_TABLES = """() => [...document.querySelectorAll('.table-wrap')]
  .filter((wrap) => wrap.getClientRects().length > 0 && wrap.scrollWidth > wrap.clientWidth)
  .map((wrap) => `${wrap.querySelector('caption')?.textContent}: `
    + `${wrap.scrollWidth} px in ${wrap.clientWidth} px`)"""


def check_view(page: Page) -> None:
    """What every view must do: a name on every visible control (label, aria-label or
    text), and no horizontal scrolling at the page's width (1280 px: a laptop), of the
    page or of a table in its wrapper."""
    unlabelled: list[str] = page.evaluate(UNLABELLED)
    assert unlabelled == [], f"controls without an accessible name: {unlabelled}"
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page scrolls sideways by {overflow} px"
    # a table scrolling inside its wrapper hides its last columns (the buttons) just the same
    tables: list[str] = page.evaluate(OVERFLOWING_TABLES)
    assert tables == [], f"tables that scroll sideways: {tables}"


class Shots:
    """Screenshots of the views, into a temp folder; with LOKI_UPDATE_SCREENSHOTS=1 also
    into docs/screenshots/ (what the README shows)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.update = os.environ.get("LOKI_UPDATE_SCREENSHOTS") == "1"

    def take(self, page: Page, view: str) -> Path:
        """Check the view (`check_view`), then save its screenshot."""
        check_view(page)
        page.evaluate("document.activeElement && document.activeElement.blur()")
        path = self.folder / f"{view}.png"
        page.screenshot(path=str(path))
        assert path.stat().st_size > 1000, f"screenshot of {view} is empty"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if self.update:
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, SCREENSHOTS / f"{view}.png")
        return path
