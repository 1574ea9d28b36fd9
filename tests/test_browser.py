"""The web dashboard in a real browser: Debian's Chromium driven by Playwright, against
a real `loki serve` whose agents are the fake Claude CLI (tests/fake_agent.py).

One daemon and one browser serve the whole module (a second daemon, with auth on,
serves the auth test); each test has its own browser context (its own tab storage).
Every wait is bounded (browser_kit.TIMEOUT_MS, or SLOW_TIMEOUT_MS for agent work).
Skipped, with the reason, only when /usr/bin/chromium is missing.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from .browser_kit import (
    CHROMIUM,
    LAUNCH_ARGS,
    SLOW_TIMEOUT_MS,
    TIMEOUT_MS,
    VIEWPORT,
    Api,
    Shots,
    check_view,
    make_project,
    running_daemon,
)
from .daemon_proc import DaemonProcess

if not CHROMIUM.exists():
    pytest.skip(
        f"{CHROMIUM} is missing: install Debian's chromium package (`make test` does, as root) "
        "to run the browser tests",
        allow_module_level=True,
    )

from playwright.sync_api import (
    Browser,
    BrowserContext,
    Locator,
    Page,
    Position,
    expect,
    sync_playwright,
)

pytestmark = pytest.mark.e2e

THREE_FEATURES = """\
# Todo app

## Features
- Add a todo item
- Mark an item done
- Delete an item
"""

SLOW_PRD = """\
# Slow app

## Features
- First feature [mode:slow] [seconds:30]
- Second feature
"""

FLOOD_PRD = """\
# Chatty app

## Features
- Warm up [mode:slow] [seconds:3]
- Talk a lot [mode:flood] [lines:1500]
"""


GRIP: Position = {"x": 24, "y": 12}  # where a card is grabbed: on its title


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("browser")


@pytest.fixture(scope="module")
def daemon(root: Path) -> Iterator[DaemonProcess]:
    with running_daemon(root / "plain") as daemon:
        yield daemon


@pytest.fixture(scope="module")
def api(daemon: DaemonProcess) -> Iterator[Api]:
    client = Api(daemon)
    yield client
    client.close()


@pytest.fixture(scope="module")
def shots(root: Path) -> Shots:
    return Shots(root / "screenshots")


class Tab:
    """A page plus what went wrong in it: uncaught exceptions and CSP violations."""

    def __init__(self, context: BrowserContext) -> None:
        self.page = context.new_page()
        self.problems: list[str] = []
        self.page.on("pageerror", lambda error: self.problems.append(f"page error: {error}"))
        self.page.on(
            "console",
            lambda message: (
                self.problems.append(f"console: {message.text}")
                if "Content Security Policy" in message.text or "Refused to" in message.text
                else None
            ),
        )


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(TIMEOUT_MS)
    yield context
    context.close()


@pytest.fixture
def tab(context: BrowserContext) -> Iterator[Tab]:
    tab = Tab(context)
    yield tab
    assert tab.problems == []


def titles(page: Page, column: str) -> Locator:
    """The titles of a board column's cards, top to bottom."""
    return page.get_by_test_id(f"column-{column}").get_by_test_id("card-title")


def open_view(tab: Tab, daemon: DaemonProcess, route: str) -> Page:
    tab.page.goto(f"{daemon.dashboard_url}/#{route}")
    expect(tab.page.get_by_test_id("live-status")).to_have_text("Live updates: live")
    return tab.page


# -- sessions ---------------------------------------------------------------------------


def test_start_a_session_with_pasted_prd_and_watch_it_complete(
    tab: Tab, daemon: DaemonProcess, api: Api, root: Path, shots: Shots
) -> None:
    project = root / "pasted"
    project.mkdir()
    page = open_view(tab, daemon, "/sessions")
    form = page.get_by_test_id("start-form")
    form.get_by_label("Paste the text").check()
    form.get_by_label("PRD text").fill(THREE_FEATURES)
    form.get_by_label("Project folder").fill(str(project))
    form.get_by_role("button", name="Start session").click()

    expect(page).to_have_url(re.compile(r"#/sessions/session-"))
    session_id = page.url.rsplit("/", 1)[1]
    status = page.get_by_test_id("session-status-slot")
    expect(status).to_have_text("completed", timeout=SLOW_TIMEOUT_MS)
    session = api.session(session_id)
    assert session["status"] == "completed"
    assert (project / ".loki" / "prd.md").read_text() == THREE_FEATURES

    # the facts, the tasks and the live log agree with the API
    expect(page.get_by_test_id("session-phase")).to_have_text("completion")
    expect(page.get_by_test_id("session-iteration")).to_have_text(str(session["iteration"]))
    expect(page.get_by_test_id("session-cost")).to_have_text(f"${session['costUsd']:.4f}")
    expect(page.get_by_test_id("session-exit")).to_have_text("allTasksCompleted")
    rows = page.get_by_test_id("task-row")
    expect(rows).to_have_count(3)
    expect(rows.get_by_test_id("task-status")).to_have_text(["completed"] * 3)
    log = page.get_by_test_id("event-log")
    expect(log.locator('[data-type="session.completed"]')).to_have_count(1)
    expect(log.locator('[data-type="task.completed"]')).to_have_count(3)

    # the log's filters
    page.get_by_label("Type").select_option("session.*")
    types = log.get_by_test_id("log-line").evaluate_all("lines => lines.map(l => l.dataset.type)")
    assert types and all(t.startswith("session.") for t in types), types
    page.get_by_label("Type").select_option("")
    page.get_by_label("Level").select_option("info")
    expect(log.locator('[data-level="debug"]')).to_have_count(0)
    page.get_by_label("Level").select_option("error")
    expect(log.get_by_test_id("log-line")).to_have_count(0)
    expect(log).to_contain_text("No event matches the filters")

    # and the list shows it
    page.get_by_role("link", name="← All sessions").click()
    row = page.locator(f'[data-testid="session-row"][data-session-id="{session_id}"]')
    expect(row.get_by_test_id("session-status")).to_have_text("completed")
    expect(row).to_contain_text("completion")
    expect(row).to_contain_text("3/3")


def test_an_api_error_is_shown_in_words(tab: Tab, daemon: DaemonProcess, root: Path) -> None:
    missing = root / "nowhere" / "prd.md"
    page = open_view(tab, daemon, "/sessions")
    # keyboard: the first Tab reaches the skip link, which shows a visible focus ring
    page.keyboard.press("Tab")
    focused = page.evaluate(
        "(el => [el.textContent, getComputedStyle(el).outlineStyle])(document.activeElement)"
    )
    assert focused == ["Skip to content", "solid"]

    form = page.get_by_test_id("start-form")
    form.get_by_label("PRD path").fill(str(missing))
    form.get_by_role("button", name="Start session").click()
    error = page.get_by_test_id("start-error")
    expect(error).to_have_text(f"PRD not found: {missing} does not exist")
    expect(error).to_have_attribute("role", "alert")
    expect(form.get_by_label("PRD path")).to_have_attribute("aria-invalid", "true")
    expect(page).to_have_url(re.compile(r"#/sessions$"))

    # a session that does not exist: a clear empty state, not a blank page
    page.goto(f"{daemon.dashboard_url}/#/sessions/session-nope")
    expect(page.get_by_test_id("empty-state")).to_contain_text("No such session")


def test_a_number_the_browser_cannot_read_is_refused_at_its_field(
    tab: Tab, daemon: DaemonProcess, api: Api, root: Path
) -> None:
    """Chromium reports "5e" in a number field as value "" with validity.badInput: the
    form must say so, not start a session without the budget (or a token that never
    expires, or a discovery at the default depth)."""
    project = make_project(root, "bad-number", THREE_FEATURES)
    before = api.json("GET", "/api/sessions")["total"]
    page = open_view(tab, daemon, "/sessions")
    posts: list[str] = []  # every POST, and every discovery (a GET)
    page.on(
        "request",
        lambda r: posts.append(r.url) if r.method == "POST" or "discover" in r.url else None,
    )
    form = page.get_by_test_id("start-form")
    form.get_by_label("PRD path").fill(str(project / "prd.md"))
    form.get_by_text("Options").click()
    for label, typed in (("Budget (USD)", "5e"), ("Max iterations", "2-3")):
        control = form.get_by_label(label)
        control.click()
        page.keyboard.type(typed)
        form.get_by_role("button", name="Start session").click()
        expect(page.get_by_test_id("start-error")).to_have_text(f"{label} must be a number.")
        expect(control).to_have_attribute("aria-invalid", "true")
        expect(control).to_be_focused()
        note = form.get_by_test_id("field-error")
        expect(note).to_have_text(f"{label} must be a number.")
        assert (note.get_attribute("id") or "?") in (
            control.get_attribute("aria-describedby") or ""
        )
        control.fill("")
    assert posts == []
    expect(page).to_have_url(re.compile(r"#/sessions$"))
    assert api.json("GET", "/api/sessions")["total"] == before

    # emptied, the fields are left out again (the daemon's defaults apply)
    with page.expect_request(lambda r: r.method == "POST") as sent:
        form.get_by_role("button", name="Start session").click()
    assert "options" not in (sent.value.post_data_json or {})
    expect(page).to_have_url(re.compile(r"#/sessions/session-"))
    session_id = page.url.rsplit("/", 1)[1]

    page.goto(f"{daemon.dashboard_url}/#/registry")
    depth = page.get_by_label("Depth")
    depth.fill("")
    depth.click()
    page.keyboard.type("3e")
    page.get_by_role("button", name="Discover", exact=True).click()
    expect(page.get_by_test_id("discover-error")).to_have_text("Depth must be a number.")
    expect(depth).to_have_attribute("aria-invalid", "true")
    assert not any("/api/registry/discover" in url for url in posts), posts
    api.wait_session(session_id, lambda s: s["status"] == "completed")


def test_pause_resume_input_and_stop_from_the_page(
    tab: Tab, daemon: DaemonProcess, api: Api, root: Path
) -> None:
    project = make_project(root, "slow", SLOW_PRD)
    page = open_view(tab, daemon, "/sessions")
    form = page.get_by_test_id("start-form")
    form.get_by_label("PRD path").fill(str(project / "prd.md"))
    form.get_by_role("button", name="Start session").click()
    expect(page).to_have_url(re.compile(r"#/sessions/session-"))
    session_id = page.url.rsplit("/", 1)[1]
    status = page.get_by_test_id("session-status-slot")
    pause = page.get_by_role("button", name="Pause")
    resume = page.get_by_role("button", name="Resume")
    stop = page.get_by_role("button", name="Stop")

    expect(status).to_have_text("running")
    api.wait_session(session_id, lambda s: s["tasks"]["active"] == 1)
    expect(page.get_by_test_id("task-row").first.get_by_test_id("task-status")).to_have_text(
        "active"
    )
    expect(resume).to_be_disabled()

    pause.click()
    expect(status).to_have_text("paused")
    assert api.session(session_id)["status"] == "paused"
    expect(pause).to_be_disabled()
    log = page.get_by_test_id("event-log")
    expect(log.locator('[data-type="session.paused"]')).to_have_count(1)

    resume.click()
    expect(status).to_have_text("running")
    assert api.session(session_id)["status"] == "running"
    expect(log.locator('[data-type="session.resumed"]')).to_have_count(1)

    page.get_by_label("Message for the agent").fill("Use SQLite for storage")
    page.get_by_role("button", name="Send input").click()
    expect(page.get_by_test_id("input-result")).to_have_text(
        "Input queued: it goes into the next agent prompt."
    )
    api.eventually(lambda: len(api.events(session_id, "input.received")) == 1, "input stored")
    expect(log.locator('[data-type="input.received"]')).to_have_count(1)

    stop.click()
    expect(status).to_have_text("stopped", timeout=SLOW_TIMEOUT_MS)
    assert api.session(session_id)["status"] == "stopped"
    expect(log.locator('[data-type="session.stopped"]')).to_have_count(1)
    expect(stop).to_be_disabled()
    expect(page.get_by_role("button", name="Delete")).to_be_enabled()


def test_a_session_deleted_elsewhere_turns_into_no_such_session(
    tab: Tab, daemon: DaemonProcess, api: Api, root: Path
) -> None:
    """A delete sends no event: the page of a finished session re-reads it every 15 s
    (the page's clock is driven here) and then says it is gone."""
    project = make_project(root, "deleted-elsewhere", THREE_FEATURES)
    session_id = api.create_session({"prd": str(project / "prd.md")})
    api.wait_session(session_id, lambda s: s["status"] == "completed")
    tab.page.clock.install()
    page = open_view(tab, daemon, f"/sessions/{session_id}")
    expect(page.get_by_test_id("session-status-slot")).to_have_text("completed")
    expect(page.get_by_role("button", name="Delete")).to_be_enabled()
    api.json("DELETE", f"/api/sessions/{session_id}", expect=204)
    page.clock.run_for(16_000)
    expect(page.get_by_test_id("empty-state")).to_contain_text("No such session")
    expect(page.get_by_role("button", name="Delete")).to_have_count(0)


def test_the_event_log_keeps_at_most_1000_lines(
    tab: Tab, daemon: DaemonProcess, api: Api, root: Path
) -> None:
    project = make_project(root, "flood", FLOOD_PRD)
    session_id = api.create_session({"prd": str(project / "prd.md")})
    page = open_view(tab, daemon, f"/sessions/{session_id}")
    expect(page.get_by_test_id("log-state")).to_have_text("live")
    expect(page.get_by_test_id("session-status-slot")).to_have_text(
        "completed", timeout=SLOW_TIMEOUT_MS
    )
    lines = page.get_by_test_id("event-log").get_by_test_id("log-line")
    expect(lines.last).to_have_attribute("data-type", "session.completed")
    assert len(api.events(session_id, "agent.output")) == 1000  # a full page: more exist
    expect(lines).to_have_count(1000)
    # the oldest were dropped: the first line kept is no longer the session's first event
    assert lines.first.get_attribute("data-type") == "agent.output"


def test_the_sse_client_parses_chunks_and_resumes_with_last_event_id(
    tab: Tab, daemon: DaemonProcess
) -> None:
    page = open_view(tab, daemon, "/registry")
    result = page.evaluate(
        """async () => {
      const { EventStream, SseParser, backoffDelay } = await import('/ui/sse.js');
      const parsed = [];
      const comments = [];
      const parser = new SseParser((m) => parsed.push(m), (c) => comments.push(c));
      for (const piece of ['id: 1\\r\\nda', 'ta: {"a":', '1}\\r\\n\\r', '\\n: keep-alive\\n\\n',
                           'id: 2\\nevent: log\\ndata: x\\ndata: y\\n\\n']) parser.feed(piece);

      const calls = [];
      const realFetch = window.fetch;
      window.fetch = async (url, init) => {
        if (!String(url).includes('sessionId=fake')) return realFetch(url, init);
        calls.push({ url: String(url), lastId: init.headers['Last-Event-ID'] ?? null });
        const body = calls.length === 1
          ? 'retry: 3000\\n\\n: connected\\n\\n'
            + 'id: 41\\ndata: {"id":41}\\n\\nid: 42\\ndata: {"id":42}\\n\\n'
          : 'id: 43\\ndata: {"id":43}\\n\\n';
        return new Response(new Blob([body]).stream(), { status: 200 });
      };
      const ids = [];
      const states = [];
      try {
        await new Promise((resolve, reject) => {
          setTimeout(() => reject(new Error('no reconnect within 5 s')), 5000);
          const stream = new EventStream({
            query: { sessionId: 'fake', history: 10 },
            onStatus: (state) => states.push(state),
            onEvents: (events) => {
              ids.push(...events.map((e) => e.id));
              if (ids.length >= 3) { stream.stop(); resolve(); }
            },
          });
          stream.start();
        });
      } finally {
        window.fetch = realFetch;
      }
      const delays = [0, 1, 5, 50].map((n) => backoffDelay(n));
      return { parsed, comments, calls, ids, states, delays };
    }"""
    )
    assert result["parsed"] == [
        {"id": "1", "event": "message", "data": '{"a":1}'},
        {"id": "2", "event": "log", "data": "x\ny"},
    ]
    assert result["comments"] == ["keep-alive"]
    assert result["ids"] == [41, 42, 43]
    first, second = result["calls"]
    assert "history=10" in first["url"] and first["lastId"] is None
    assert "history" not in second["url"] and second["lastId"] == "42"
    assert "reconnecting" in result["states"]
    assert 750 <= result["delays"][0] <= 1250
    assert all(d <= 37_500 for d in result["delays"])  # bounded: 30 s ± 25 %


def test_the_ws_client_reconnects_with_backoff_and_sends_the_token(
    tab: Tab, daemon: DaemonProcess
) -> None:
    page = open_view(tab, daemon, "/registry")
    result = page.evaluate(
        """async () => {
      const { LiveSocket, matches } = await import('/ui/ws.js');
      const { setToken, clearToken } = await import('/ui/api.js');
      const urls = [];
      class FakeSocket extends EventTarget {
        constructor(url) {
          super();
          urls.push(url);
          this.readyState = 0;
          setTimeout(() => {
            if (urls.length === 1) {  // the first try fails, as a refused handshake does
              this.dispatchEvent(new CloseEvent('close', { code: 1006 }));
              return;
            }
            this.readyState = 1;
            this.dispatchEvent(new Event('open'));
            const message = { type: 'task.moved', data: { id: 'task-1' } };
            this.dispatchEvent(new MessageEvent('message', { data: JSON.stringify(message) }));
          }, 10);
        }
        send() {}
        close() {}
      }
      FakeSocket.OPEN = 1;
      const RealSocket = window.WebSocket;
      window.WebSocket = FakeSocket;
      setToken('loki_token/with?odd=chars');
      const states = [];
      const got = [];
      const socket = new LiveSocket();
      try {
        await new Promise((resolve, reject) => {
          setTimeout(() => reject(new Error('no reconnect within 5 s')), 5000);
          socket.onStatus((state) => states.push(state));
          socket.subscribe(['project.*'], () => got.push('wrong'));
          socket.subscribe(['task.*'], (m) => { got.push(m.data.id); resolve(); });
          socket.connect();
        });
      } finally {
        socket.close();
        window.WebSocket = RealSocket;
        clearToken();
      }
      const patterns = [matches('task.*', 'task.moved'), matches('task.*', 'taskmaster'),
                        matches('*', 'registry.updated'), matches('task.moved', 'task.moved')];
      return { urls, states, got, patterns };
    }"""
    )
    host = daemon.dashboard_url.removeprefix("http://")
    assert result["urls"] == [f"ws://{host}/ws?token=loki_token%2Fwith%3Fodd%3Dchars"] * 2
    assert result["states"][:4] == ["closed", "connecting", "reconnecting", "reconnecting"]
    assert "open" in result["states"]
    assert result["got"] == ["task-1"]
    assert result["patterns"] == [True, False, True, True]


def test_the_ws_client_backs_off_from_refused_handshakes_and_stops_on_forbidden(
    tab: Tab, daemon: DaemonProcess
) -> None:
    """The daemon accepts a refused handshake and closes it with 1008: an `open` that
    never delivers must not reset the backoff nor count as live (views re-read on
    "open"); a 1008 FORBIDDEN (a token without `read`) ends the retries. (A 1008
    UNAUTHORIZED ends them too, and asks for a token: a test with a daemon below.)"""
    page = open_view(tab, daemon, "/registry")
    result = page.evaluate(
        """async () => {
      const { LiveSocket } = await import('/ui/ws.js');
      const urls = [];
      const delays = [];
      const realTimeout = window.setTimeout;
      let refusal = 'RATE_LIMITED: Too many requests; retry after 1 s';
      class RefusedSocket extends EventTarget {
        constructor(url) {
          super();
          urls.push(url);
          this.readyState = 0;
          realTimeout(() => {
            this.readyState = 1;
            this.dispatchEvent(new Event('open'));
            this.readyState = 3;
            const reason = urls.length < 5 ? refusal : 'FORBIDDEN: This token lacks the read scope';
            this.dispatchEvent(new CloseEvent('close', { code: 1008, reason }));
          }, 1);
        }
        send() {}
        close() {}
      }
      RefusedSocket.OPEN = 1;
      const RealSocket = window.WebSocket;
      window.WebSocket = RefusedSocket;
      // the retry timers run at once, their delays recorded
      window.setTimeout = (fn, ms, ...args) => {
        if (ms >= 500) delays.push(ms);
        return realTimeout(fn, 0, ...args);
      };
      const states = [];
      const socket = new LiveSocket();
      try {
        await new Promise((resolve, reject) => {
          realTimeout(() => reject(new Error('never refused for good')), 5000);
          socket.onStatus((state, detail) => {
            states.push(detail && detail.reason ? `${state}: ${detail.reason}` : state);
            if (state === 'refused') resolve();
          });
          socket.connect();
        });
        await new Promise((resolve) => realTimeout(resolve, 200));  // no retry follows
      } finally {
        window.setTimeout = realTimeout;
        socket.close();
        window.WebSocket = RealSocket;
      }
      return { tries: urls.length, delays, states };
    }"""
    )
    assert result["tries"] == 5, result
    assert not any(state.startswith("open") for state in result["states"]), result["states"]
    assert result["states"][-2] == "refused: FORBIDDEN: This token lacks the read scope"
    # 1 s, 2 s, 4 s, 8 s, each ±25 %
    delays = result["delays"]
    assert len(delays) == 4, delays
    for attempt, delay in enumerate(delays):
        assert 0.75 * 1000 * 2**attempt <= delay <= 1.25 * 1000 * 2**attempt, delays


def test_a_token_without_read_gets_one_websocket_try_and_says_why(
    browser: Browser, root: Path
) -> None:
    """An audit-only token signs in; the page's WebSocket is refused with 1008 FORBIDDEN,
    which the header shows, and it is not retried (each try was a 403 in the audit log)."""
    with running_daemon(root / "audit-only", LOKI_ENTERPRISE_AUTH="true") as daemon:
        with daemon.control() as owner:
            auditor = owner.post(
                "/dashboard/api/enterprise/tokens", json={"name": "auditor", "scopes": ["audit"]}
            ).json()
        context = browser.new_context(viewport=VIEWPORT)
        context.set_default_timeout(TIMEOUT_MS)
        try:
            tab = Tab(context)
            page = tab.page
            sockets: list[str] = []
            page.on("websocket", lambda ws: sockets.append(ws.url))
            page.goto(f"{daemon.dashboard_url}/#/audit")
            page.get_by_label("API token").fill(auditor["token"])
            page.get_by_role("button", name="Sign in").click()
            expect(page.get_by_test_id("audit-row").first).to_be_visible()
            expect(page.get_by_test_id("live-status")).to_have_text(
                "Live updates: off (refused: FORBIDDEN: This token lacks the 'read' scope "
                "needed for GET /ws)"
            )
            page.wait_for_timeout(2500)  # the old page retried about once a second
            assert len(sockets) == 1, sockets
            with daemon.control() as owner:
                refused = owner.get(
                    "/dashboard/api/enterprise/audit?action=auth.forbidden&limit=100"
                ).json()
            ws_refusals = [e for e in refused["entries"] if e["path"] == "/ws"]
            assert len(ws_refusals) == 1, ws_refusals
            assert tab.problems == []
        finally:
            context.close()


def test_a_token_revoked_under_the_page_asks_for_a_token_at_once_without_ws_retries(
    browser: Browser, root: Path
) -> None:
    """The page's token is revoked while the page is open: the daemon closes `/ws` with
    1008 `UNAUTHORIZED: Token revoked`, and that close alone brings the sign-in prompt
    back (no HTTP call is due: the page's clock is driven past every backoff delay and
    the status timer only afterwards). The socket is not tried again: one handshake,
    and no `/ws` refusal in the audit log."""
    with running_daemon(root / "revoked", LOKI_ENTERPRISE_AUTH="true") as daemon:
        with daemon.control() as owner:
            reader = owner.post(
                "/dashboard/api/enterprise/tokens", json={"name": "viewer", "scopes": ["read"]}
            ).json()
        context = browser.new_context(viewport=VIEWPORT)
        context.set_default_timeout(TIMEOUT_MS)
        try:
            tab = Tab(context)
            page = tab.page
            page.clock.install()
            sockets: list[str] = []
            page.on("websocket", lambda ws: sockets.append(ws.url))
            page.goto(f"{daemon.dashboard_url}/#/board")
            page.get_by_label("API token").fill(reader["token"])
            page.get_by_role("button", name="Sign in").click()
            expect(page.get_by_test_id("live-status")).to_have_text("Live updates: live")
            page.clock.pause_at(page.evaluate("Date.now()") + 1000)  # no timer fires by itself
            with daemon.control() as owner:
                owner.delete(f"/dashboard/api/enterprise/tokens/{reader['id']}")
            dialog = page.get_by_test_id("token-dialog")
            expect(dialog).to_be_visible(timeout=3000)
            expect(page.get_by_test_id("token-error")).to_have_text("Token revoked")
            expect(page.get_by_test_id("live-status")).to_have_text("Live updates: off")
            assert page.evaluate("sessionStorage.getItem('lokid.token')") is None
            page.clock.run_for(60_000)  # 1 + 2 + 4 + 8 + 16 s of backoff would have passed
            page.wait_for_timeout(500)  # a handshake started by a timer would show by now
            assert len(sockets) == 1, sockets
            with daemon.control() as owner:
                refused = owner.get(
                    "/dashboard/api/enterprise/audit?action=auth.unauthorized&limit=100"
                ).json()
            assert [e for e in refused["entries"] if e["path"] == "/ws"] == []
            assert tab.problems == []
        finally:
            context.close()


# -- the board --------------------------------------------------------------------------


def test_drag_a_card_persists_and_appears_in_a_second_browser(
    tab: Tab, browser: Browser, daemon: DaemonProcess, api: Api
) -> None:
    project_id = api.create_project("Drag and drop")
    one, two, three = (api.create_card(project_id, t) for t in ("One", "Two", "Three"))
    done = api.create_card(project_id, "Shipped", "done")
    page = open_view(tab, daemon, f"/board/{project_id}")
    other_context = browser.new_context(viewport=VIEWPORT)
    other_context.set_default_timeout(TIMEOUT_MS)
    try:
        other = Tab(other_context)
        open_view(other, daemon, f"/board/{project_id}")
        card = page.get_by_test_id("card").filter(has_text="Two")
        expect(card).to_have_attribute("data-column", "backlog")

        # drag "Two" to the empty "In progress" column
        # (grab it by its title: a press on its column picker would open the picker)
        card.drag_to(page.get_by_test_id("column-in_progress"), source_position=GRIP)
        in_progress = titles(page, "in_progress")
        expect(in_progress).to_have_text(["Two"])
        api.eventually(lambda: api.column(project_id, "in_progress") == ["Two"], "moved")
        assert (api.card(two)["column"], api.card(two)["position"]) == ("in_progress", 0)
        assert api.column(project_id, "backlog") == ["One", "Three"]
        # ...and the other browser shows it without a reload
        expect(titles(other.page, "in_progress")).to_have_text(["Two"])
        expect(titles(other.page, "backlog")).to_have_text(["One", "Three"])

        # drag "Three" above "Shipped" in "Done": position 0 there
        target = page.get_by_test_id("card").filter(has_text="Shipped")
        page.get_by_test_id("card").filter(has_text="Three").drag_to(
            target, source_position=GRIP, target_position={"x": 20.0, "y": 4.0}
        )
        expect(titles(page, "done")).to_have_text(["Three", "Shipped"])
        api.eventually(lambda: api.column(project_id, "done") == ["Three", "Shipped"], "moved")
        assert (api.card(three)["position"], api.card(done)["position"]) == (0, 1)
        expect(titles(other.page, "done")).to_have_text(["Three", "Shipped"])

        # the keyboard way, in the other browser: the card's column picker and "down"
        other.page.get_by_label("Column of “One”").select_option("review")
        expect(titles(page, "review")).to_have_text(["One"])
        api.eventually(lambda: api.card(one)["column"] == "review", "moved to review")
        assert api.card(one)["position"] == 0
        other.page.get_by_role("button", name="Move “Three” down").click()
        expect(titles(page, "done")).to_have_text(["Shipped", "Three"])
        # the focus stays on the moved card (its "down" is disabled now: on its picker)
        expect(other.page.get_by_label("Column of “Three”")).to_be_focused()
        api.eventually(lambda: api.column(project_id, "done") == ["Shipped", "Three"], "moved")

        # a reload shows what the server has
        page.reload()
        expect(titles(page, "in_progress")).to_have_text(["Two"])
        expect(titles(page, "done")).to_have_text(["Shipped", "Three"])
        assert other.problems == []
    finally:
        other_context.close()


def test_projects_and_cards_are_created_edited_and_deleted_from_the_page(
    tab: Tab, daemon: DaemonProcess, api: Api
) -> None:
    page = open_view(tab, daemon, "/board")
    page.on("dialog", lambda dialog: dialog.accept())  # the confirm() before a delete
    page.get_by_role("button", name="New project").click()
    dialog = page.get_by_test_id("project-dialog")
    dialog.get_by_role("button", name="Create project").click()  # no name: the server says why
    expect(dialog.get_by_test_id("project-dialog-error")).to_contain_text("name")
    dialog.get_by_label("Name").fill("Website")
    dialog.get_by_role("button", name="Create project").click()
    expect(dialog).to_have_count(0)
    expect(page.get_by_label("Project")).to_have_text(re.compile("Website"))
    project_id = page.url.rsplit("/", 1)[1]
    assert project_id.startswith("proj-")
    assert api.json("GET", f"/api/projects/{project_id}")["name"] == "Website"
    expect(page.get_by_test_id("board-empty")).to_be_visible()

    page.get_by_role("button", name="Add card").click()
    dialog = page.get_by_test_id("card-dialog")
    dialog.get_by_label("Title").fill("Write the landing page")
    dialog.get_by_label("Priority").select_option("high")
    dialog.get_by_label("Column").select_option("todo")
    dialog.get_by_role("button", name="Add card").click()
    card = page.get_by_test_id("column-todo").get_by_test_id("card")
    expect(card.get_by_test_id("card-title")).to_have_text("Write the landing page")
    expect(card).to_contain_text("high")
    api.eventually(
        lambda: len(api.json("GET", f"/api/tasks?project_id={project_id}")["tasks"]) == 1, "created"
    )
    [created] = api.json("GET", f"/api/tasks?project_id={project_id}")["tasks"]
    assert (created["column"], created["priority"]) == ("todo", "high")

    card.get_by_role("button", name="Edit “Write the landing page”").click()
    dialog = page.get_by_test_id("card-dialog")
    dialog.get_by_label("Title").fill("Write the home page")
    dialog.get_by_role("button", name="Save").click()
    expect(card.get_by_test_id("card-title")).to_have_text("Write the home page")
    api.eventually(lambda: api.card(created["id"])["title"] == "Write the home page", "saved")

    card.get_by_role("button", name="Delete “Write the home page”").click()
    expect(page.get_by_test_id("card")).to_have_count(0)
    api.eventually(
        lambda: api.client.get(f"/api/tasks/{created['id']}").status_code == 404, "deleted"
    )


def test_the_board_lists_the_newest_1000_projects_and_the_one_its_address_names(
    context: BrowserContext, root: Path
) -> None:
    """`GET /api/projects` answers a page (100 by default, at most 1000): the board asks
    for the largest page, says when the list is cut, and still opens an older project
    named in its address. Its own daemon: 1,001 projects would crowd the other tests."""
    with running_daemon(root / "many-projects") as daemon:
        api = Api(daemon)
        try:
            oldest = api.create_project("The oldest")
            newest = ""
            for n in range(1000):
                newest = api.create_project(f"Project {n:04}")
            tab = Tab(context)
            page = open_view(tab, daemon, f"/board/{oldest}")
            select = page.get_by_test_id("project-select")
            expect(select).to_have_value(oldest)
            expect(select.locator("option")).to_have_count(1001)  # the page, and the named one
            expect(page.get_by_test_id("board-subtitle")).to_contain_text(
                "the newest 1000 projects are listed"
            )
            page.goto(f"{daemon.dashboard_url}/#/board/{newest}")
            expect(select).to_have_value(newest)
            expect(select.locator("option")).to_have_count(1000)
            assert tab.problems == []
        finally:
            api.close()


# -- auth, audit, tokens ------------------------------------------------------------------


def test_with_auth_on_a_token_prompt_then_every_view_and_the_admin_views(
    browser: Browser, root: Path, shots: Shots
) -> None:
    with running_daemon(root / "auth", LOKI_ENTERPRISE_AUTH="true") as daemon:
        with daemon.control() as owner:
            made = owner.post(
                "/dashboard/api/enterprise/tokens", json={"name": "admin", "scopes": ["admin"]}
            ).json()
            reader = owner.post(
                "/dashboard/api/enterprise/tokens", json={"name": "viewer", "scopes": ["read"]}
            ).json()
        context = browser.new_context(viewport=VIEWPORT)
        context.set_default_timeout(TIMEOUT_MS)
        try:
            tab = Tab(context)
            page = tab.page
            page.goto(daemon.dashboard_url)
            dialog = page.get_by_test_id("token-dialog")
            expect(dialog).to_be_visible()
            page.get_by_label("API token").fill("loki_not-a-real-token")
            page.get_by_role("button", name="Sign in").click()
            expect(page.get_by_test_id("token-error")).to_have_text(
                "Invalid token: not a lokid API token (mistyped or truncated?)"
            )
            page.get_by_label("API token").fill(made["token"])
            page.get_by_role("button", name="Sign in").click()
            expect(dialog).to_be_hidden()
            assert page.evaluate("sessionStorage.getItem('lokid.token')") == made["token"]
            expect(page.get_by_test_id("empty-state")).to_contain_text("No sessions yet")
            expect(page.get_by_test_id("live-status")).to_have_text("Live updates: live")

            for route, text in (("board", "No projects yet"), ("registry", "No registered")):
                page.get_by_test_id(f"nav-{route}").click()
                expect(page.get_by_test_id("empty-state")).to_contain_text(text)

            page.get_by_test_id("nav-audit").click()
            rows = page.get_by_test_id("audit-row")
            expect(rows.filter(has_text="auth.unauthorized").first).to_be_visible()
            expect(page.get_by_test_id("audit-chain")).to_have_text("valid")
            page.get_by_test_id("audit-action").fill("token.*")
            page.get_by_role("button", name="Apply").click()
            expect(rows).to_have_count(2)
            page.get_by_role("button", name="Reset").click()
            expect(rows.filter(has_text="auth.unauthorized").first).to_be_visible()
            shots.take(page, "audit")

            # every column of the tokens table at its widest: a used token, an expiry
            with daemon.control() as owner:
                owner.post(
                    "/dashboard/api/enterprise/tokens",
                    json={"name": "ops", "scopes": ["read", "write", "audit"], "expires_days": 9},
                )
            used = Api(daemon, reader["token"])
            used.json("GET", "/api/sessions")
            used.close()
            page.get_by_test_id("nav-tokens").click()
            expect(page.get_by_test_id("token-row")).to_have_count(3)
            viewer = page.get_by_test_id("token-row").filter(has_text="viewer")
            expect(viewer.locator("td").nth(5)).not_to_have_text("never")
            check_view(page)  # 1280 px: no sideways scroll, in the table either
            # "1e" in the days: refused at the field, not a token that never expires
            page.get_by_label("Name").fill("days-1e")
            page.get_by_label("Expires after (days)").click()
            page.keyboard.type("1e")
            page.get_by_role("button", name="Create token").click()
            expect(page.get_by_test_id("token-create-error")).to_have_text(
                "Expires after (days) must be a number."
            )
            expect(page.get_by_label("Expires after (days)")).to_have_attribute(
                "aria-invalid", "true"
            )
            expect(page.get_by_test_id("token-row")).to_have_count(3)
            page.get_by_label("Expires after (days)").fill("")
            page.get_by_label("Name").fill("ci-bot")
            page.get_by_test_id("token-scope-write").check()
            page.get_by_label("Expires after (days)").fill("30")
            shots.take(page, "tokens")  # before the secret is on the screen
            page.get_by_role("button", name="Create token").click()
            secret = page.get_by_test_id("token-secret-value")
            expect(secret).to_have_text(re.compile(r"^loki_\w{49}$"))
            expect(page.get_by_test_id("token-row")).to_have_count(4)
            row = page.get_by_test_id("token-row").filter(has_text="ci-bot")
            expect(row).to_contain_text("read, write")
            expect(row.get_by_test_id("token-state")).to_have_text("active")
            page.once("dialog", lambda dialog: dialog.accept())
            row.get_by_role("button", name="Revoke ci-bot").click()
            expect(row.get_by_test_id("token-state")).to_have_text("revoked")

            # a token revoked under the page: its WebSocket's close asks for a token again
            with daemon.control() as owner:
                owner.delete(f"/dashboard/api/enterprise/tokens/{made['id']}")
            expect(dialog).to_be_visible()
            expect(page.get_by_test_id("token-error")).to_have_text("Token revoked")

            # a read-only token: the admin views are not offered, and explained if visited
            page.get_by_label("API token").fill(reader["token"])
            page.get_by_role("button", name="Sign in").click()
            expect(dialog).to_be_hidden()
            expect(page.get_by_test_id("nav-sessions")).to_be_visible()
            expect(page.get_by_test_id("nav-audit")).to_be_hidden()
            expect(page.get_by_test_id("nav-tokens")).to_be_hidden()
            page.goto(f"{daemon.dashboard_url}/#/audit")
            expect(page.get_by_test_id("empty-state")).to_contain_text(
                "This token lacks the 'audit' scope"
            )
            assert tab.problems == []
        finally:
            context.close()


def test_the_audit_date_filter_takes_days_in_the_time_zone_the_table_shows(
    browser: Browser, daemon: DaemonProcess, api: Api
) -> None:
    """The table shows local times; From and To are local days, sent as the UTC
    instants of their midnights (the API reads a bare date as a UTC day)."""
    api.create_project("Audited")  # at least one entry
    context = browser.new_context(viewport=VIEWPORT, timezone_id="Pacific/Kiritimati")  # UTC+14
    context.set_default_timeout(TIMEOUT_MS)
    try:
        tab = Tab(context)
        page = open_view(tab, daemon, "/audit")
        newest = page.get_by_test_id("audit-row").first
        shown = newest.locator("td").nth(1).inner_text()  # "YYYY-MM-DD HH:MM:SS", local
        number = newest.locator("td").first.inner_text()
        day = shown.split(" ")[0]
        page.get_by_label("From", exact=True).fill(day)
        page.get_by_label("To", exact=True).fill(day)
        with page.expect_request(lambda r: "/api/enterprise/audit?" in r.url) as sent:
            page.get_by_role("button", name="Apply").click()
        query = parse_qs(urlsplit(sent.value.url).query)
        year, month, date = map(int, day.split("-"))
        midnight = datetime(year, month, date, tzinfo=timezone(timedelta(hours=14)))
        utc = "%Y-%m-%dT%H:%M:%S.000Z"  # Date.toISOString()
        assert query["start"] == [midnight.astimezone(UTC).strftime(utc)]  # the day before, 10:00
        assert query["end"] == [(midnight + timedelta(days=1)).astimezone(UTC).strftime(utc)]
        # the entry shown on that day is found by that day
        expect(page.get_by_test_id("audit-row").filter(has_text=shown).first).to_be_visible()
        expect(page.get_by_test_id("audit-row").first.locator("td").first).to_have_text(number)
        assert tab.problems == []
    finally:
        context.close()


# -- screenshots ------------------------------------------------------------------------


def test_screenshots_of_each_view(
    tab: Tab, daemon: DaemonProcess, api: Api, root: Path, shots: Shots
) -> None:
    project = make_project(root, "webshop", THREE_FEATURES)
    session_id = api.create_session({"prd": str(project / "prd.md")})
    api.wait_session(session_id, lambda s: s["status"] == "completed")
    slow = make_project(root, "slow-shop", SLOW_PRD)
    running = api.create_session({"prd": str(slow / "prd.md")})
    api.wait_session(running, lambda s: s["tasks"]["active"] == 1)
    try:
        page = open_view(tab, daemon, "/sessions")
        expect(page.get_by_test_id("session-row").first).to_be_visible()
        shots.take(page, "sessions")

        page.goto(f"{daemon.dashboard_url}/#/sessions/{session_id}")
        expect(page.get_by_test_id("session-status-slot")).to_have_text("completed")
        expect(page.get_by_test_id("event-log").get_by_test_id("log-line").last).to_have_attribute(
            "data-type", "session.completed"
        )
        page.get_by_label("Level").select_option("info")
        shots.take(page, "session")

        board = api.create_project("Webshop")
        for title, column in (
            ("Product catalogue", "done"),
            ("Shopping cart", "review"),
            ("Checkout with card payments", "in_progress"),
            ("Order history", "todo"),
            ("Wish lists", "backlog"),
            ("Gift cards", "backlog"),
        ):
            api.create_card(board, title, column)
        page.goto(f"{daemon.dashboard_url}/#/board/{board}")
        expect(page.get_by_test_id("card")).to_have_count(6)
        shots.take(page, "board")

        (root / "blog" / ".loki").mkdir(parents=True)  # a project to discover and register
        api.json("POST", "/api/registry/projects", {"path": str(project)}, expect=201)
        api.json("POST", "/api/registry/projects", {"path": str(slow)}, expect=201)
        page.goto(f"{daemon.dashboard_url}/#/registry")
        expect(page.get_by_test_id("registry-row")).to_have_count(2)
        # a control acting on an item names it: one "Check health of …" per project
        for name in ("webshop", "slow-shop"):
            expect(
                page.get_by_role("button", name=f"Check health of {name}", exact=True)
            ).to_have_count(1)
        page.get_by_test_id("registry-row").first.get_by_role("button", name="Check health").click()
        expect(page.get_by_test_id("health-status")).to_have_text(re.compile("healthy|degraded"))
        page.get_by_test_id("discover-roots").fill(str(root))
        page.get_by_role("button", name="Discover", exact=True).click()
        expect(page.get_by_test_id("found-row").first).to_be_visible()
        expect(page.get_by_role("button", name="Register blog", exact=True)).to_have_count(1)
        shots.take(page, "registry")
        page.get_by_role("button", name="Sync all").click()
        expect(page.get_by_test_id("registry-sync-result")).to_contain_text("Synced 2: 2 ok")
        found = page.get_by_test_id("found-row").filter(has_text="blog")
        found.get_by_role("button", name="Register blog").click()
        expect(found).to_contain_text("registered")
        expect(page.get_by_test_id("registry-row")).to_have_count(3)
    finally:
        api.json("POST", f"/api/sessions/{running}/stop")
        api.wait_session(running, lambda s: s["status"] == "stopped")
    for view in ("sessions", "session", "board", "registry"):
        assert (shots.folder / f"{view}.png").stat().st_size > 1000

    # a smaller laptop screen: every view still fits its width
    page.set_viewport_size({"width": 1280, "height": 720})
    for route, heading in (
        (f"/sessions/{session_id}", "Session"),
        ("/sessions", "Sessions"),
        (f"/board/{board}", "Board"),
        ("/registry", "Registry"),
        ("/audit", "Audit log"),
        ("/tokens", "API tokens"),
    ):
        page.goto(f"{daemon.dashboard_url}/#{route}")
        expect(page.get_by_role("heading", level=1)).to_contain_text(heading)
        check_view(page)
